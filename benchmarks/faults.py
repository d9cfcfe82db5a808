"""Faults made to happen against the real services, and what each cost: labels lost, labels duplicated, wrong-model
answers, failed requests. Then a soak: minutes of concurrent labelling, webhooks, polls, pushes and alias moves
while Label Studio and the label receiver are restarted at random; at the end every label is accounted for.

Everything is real and local: a Label Studio server (`cytoloop stack`, its own venv), the label receiver
(`cytoloop review serve`, the webhook target), an MLflow registry (SQLite), fresh processes for new replicas. Each
fault is one scenario; its counts are measured from what Label Studio and the registry hold afterwards, never
assumed:

  labels lost        annotations Label Studio holds that the label store does not hold live (after the system's
                     own remedy: the next poll), plus tasks queued for Label Studio that never reached it
  labels duplicated  label-store rows live for annotations Label Studio no longer holds, plus tasks imported twice
  wrong-model answers  a site answered with, or a gate judged against, a version its alias does not name; alias
                     moves that should have been refused; a rollback to a version the trail does not justify
  failed requests    a replica that could serve (a last known good version on disk) but answers nothing

Serving faults inside Ray Serve (one request's model failure in a merged batch, a 1.7 GB body) and the access
faults are tested in CI (tests/integration/test_serving.py, test_stack_network.py, test_review_loop.py), not here.

    python benchmarks/faults.py --cells ../shared/data/cells --soak-minutes 10

Writes the table into docs/benchmarks.md (section `faults`). Exit code 1 when any count is not 0.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

from _docs import DOCS, replace_section

from cytoloop.config import Settings
from labelstudio.bootstrap import SECRET_HEADER, ensure_project, ensure_webhook
from labelstudio.client import invite_url, server_identity, user_token
from labelstudio.label_config import prediction_result
from labelstudio.loop import ReviewLoop
from labelstudio.outbox import Outbox
from labelstudio.push import push_outbox
from labelstudio.store import LabelStore
from labelstudio.sync import as_dict, sync
from ops.stack import Stack, label_studio_url, stack_secrets, webhook_url

CLASSES = ["lymphocyte", "monocyte", "neutrophil"]


@dataclass
class Row:
    fault: str
    done: str
    lost: int = 0
    duplicated: int = 0
    wrong_model: int = 0
    failed_requests: int = 0
    seconds: float = 0.0


@dataclass
class World:
    """The running services of one benchmark run."""

    root: Path
    settings: Settings
    stack: Stack
    loop: ReviewLoop
    server: str
    names: list[str] = field(default_factory=list)

    @property
    def client(self):
        return self.loop.client

    def project(self, title: str, tasks: int) -> tuple[int, list[int]]:
        """A fresh project with its webhook to the receiver, and `tasks` tasks; returns (id, task ids)."""
        project_id = ensure_project(self.client, f"{title} {len(self.names)}", CLASSES, labels_required=1)
        self.names.append(title)
        secret = stack_secrets(self.settings)["webhook_secret"]
        ensure_webhook(self.client, project_id, f"{webhook_url(self.settings)}?server={self.server}", secret)
        self.client.projects.import_tasks(id=project_id, request=[_task(title, i) for i in range(tasks)])
        return project_id, sorted(t.id for t in self.client.tasks.list(project=project_id))

    def account(self, project_id: int) -> tuple[int, int]:
        """(lost, duplicated) labels of a project: Label Studio's annotations against the store's live rows."""
        held = {
            int(a["id"])
            for task in self.client.tasks.list(project=project_id, fields="all")
            for a in (as_dict(task).get("annotations") or [])
        }
        stored = self.loop.store.live_ids(project_id, self.server)
        return len(held - stored), len(stored - held)


def _task(site: str, i: int, bad: bool = False) -> dict:
    data = {
        "task_key": f"{site}:cell{i}@v1",
        "site": site,
        "cell_id": f"cell{i}",
        "image": f"/data/cell{i}.png",
        "classes": CLASSES,
    }
    if bad:
        data["image"] = None  # Label Studio refuses it (HTTP 400)
    return {"data": data}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait(condition, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return False


def start_world(cells: Path) -> World:
    root = Path(tempfile.mkdtemp(prefix="cyf-"))  # short: Ray-free, but Label Studio's paths stay readable
    settings = Settings(
        home=root / "home",
        stack={"label_studio_port": _free_port(), "images_root": cells, "ray": False, "start_timeout_s": 300},
        review={"webhook_port": _free_port(), "labels_required": 1, "poll_every_s": 3600},
        registry={"tracking_uri": f"sqlite:///{root}/mlflow.db"},
    )
    stack = Stack(settings)
    stack.up(only=["label-studio", "labels"])
    loop = ReviewLoop(settings)
    return World(root, settings, stack, loop, loop.server)


# -- labels -----------------------------------------------------------------------------------------------------
def label(client, task_id: int, name: str = "neutrophil") -> int:
    return client.annotations.create(id=task_id, result=prediction_result(name)).id


def webhook_during_poll(world: World) -> Row:
    project_id, tasks = world.project("webhook during poll", 6)
    for task_id in tasks[:3]:
        label(world.client, task_id)
    sync(world.client, world.loop.store, [project_id], world.server)

    def meanwhile(n: int) -> None:
        if n == 1:  # the listing is in hand; the receiver stores the new label while the poll goes on
            new = label(world.client, tasks[0], "lymphocyte")
            _wait(lambda: new in world.loop.store.live_ids(project_id, world.server))

    sync(world.client, world.loop.store, [project_id], world.server, on_annotation=meanwhile)
    lost, dup = world.account(project_id)
    return Row("label stored by webhook while a poll lists", "annotate during the listing", lost, dup)


def task_deleted_during_poll(world: World) -> Row:
    project_id, tasks = world.project("deleted during poll", 6)
    for task_id in tasks:
        label(world.client, task_id, "monocyte")
    sync(world.client, world.loop.store, [project_id], world.server, page_size=2)

    def meanwhile(n: int) -> None:
        if n == 1:
            world.client.tasks.delete(id=tasks[1])  # on the page being read: the next task slides onto it

    sync(world.client, world.loop.store, [project_id], world.server, on_annotation=meanwhile, page_size=2)
    kept = set(world.loop.store.live_ids(project_id, world.server))
    sync(world.client, world.loop.store, [project_id], world.server, page_size=2)  # the remedy: the next poll
    lost, dup = world.account(project_id)
    lost_meanwhile = len(set(world.loop.store.live_ids(project_id, world.server)) - kept)  # gone, then back
    return Row(
        "task deleted while a poll pages", "delete a task on the page read; poll again", lost + lost_meanwhile, dup
    )


def malformed_event(world: World) -> Row:
    import httpx

    project_id, tasks = world.project("malformed event", 4)
    secret = stack_secrets(world.settings)["webhook_secret"]
    bad = {"action": "ANNOTATION_CREATED", "annotation": {"id": "not a number"}, "task": None}
    httpx.post(
        f"{webhook_url(world.settings)}?server={world.server}",
        json=bad,
        headers={SECRET_HEADER: secret},
        timeout=10,
    )
    made = [label(world.client, task_id) for task_id in tasks]
    _wait(lambda: set(made) <= world.loop.store.live_ids(project_id, world.server))  # webhooks only, no poll
    lost, dup = world.account(project_id)
    return Row("malformed webhook event first in the queue", "post a broken event, then label", lost, dup)


def refused_task(world: World) -> Row:
    outbox = Outbox(world.root / "refused-outbox.db")
    site = f"refused{len(world.names)}"
    outbox.enqueue([_task(site, 0), _task(site, 1, bad=True), *(_task(site, i) for i in range(2, 6))])
    projects: dict[str, int] = {}

    def ensure(name: str, classes: list[str]) -> int:
        if name not in projects:
            projects[name] = ensure_project(world.client, f"{name} {len(world.names)}", classes, labels_required=1)
        return projects[name]

    push_outbox(world.client, outbox, ensure, batch=10)
    keys = [t.data["task_key"] for t in world.client.tasks.list(project=projects[site], fields="task_only")]
    good = {f"{site}:cell{i}@v1" for i in range(6) if i != 1}
    return Row(
        "a task Label Studio refuses", "push 6 tasks, one invalid", len(good - set(keys)), len(keys) - len(set(keys))
    )


def two_pushes(world: World) -> Row:
    from label_studio_sdk import LabelStudio

    site = f"twice{len(world.names)}"
    project_id = ensure_project(world.client, f"{site}", CLASSES, labels_required=1)
    Outbox(world.root / "twice-outbox.db").enqueue([_task(site, i) for i in range(30)])
    start = threading.Barrier(2)
    token = stack_secrets(world.settings)["admin_token"]

    def push() -> None:
        client = LabelStudio(base_url=label_studio_url(world.settings), api_key=token)
        start.wait()
        push_outbox(client, Outbox(world.root / "twice-outbox.db"), lambda s, c: project_id, batch=5)

    threads = [threading.Thread(target=push) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    keys = [t.data["task_key"] for t in world.client.tasks.list(project=project_id, fields="task_only")]
    return Row("two pushes at once", "two threads push 30 tasks", 30 - len(set(keys)), len(keys) - len(set(keys)))


_SYNC_THEN_HANG = """
import sys, time
from pathlib import Path
from cytoloop.config import load_settings
from labelstudio.loop import ReviewLoop
from labelstudio.store import LabelStore
from labelstudio.sync import as_dict, sync
loop = ReviewLoop(load_settings(Path(sys.argv[1])))
def hang(n):
    if n == 3:
        print("stored 3", flush=True)
        time.sleep(600)
sync(loop.client, LabelStore(Path(sys.argv[2])), [int(sys.argv[3])], loop.server, on_annotation=hang)
"""


def killed_sync(world: World) -> Row:
    project_id, tasks = world.project("killed sync", 8)
    made = {label(world.client, t) for t in tasks}
    settings_file = world.root / "settings.json"
    settings_file.write_text(
        world.settings.model_dump_json(
            exclude={"stack": {"admin_password", "admin_token"}, "review": {"webhook_secret"}}, exclude_none=True
        )
    )
    store_path = world.root / "killed.db"
    child = subprocess.Popen(
        [sys.executable, "-c", _SYNC_THEN_HANG, str(settings_file), str(store_path), str(project_id)],
        stdout=subprocess.PIPE,
        text=True,
    )
    child.stdout.readline()
    os.kill(child.pid, signal.SIGKILL)
    child.wait(timeout=30)
    store = LabelStore(store_path)
    sync(world.client, store, [project_id], world.server)
    stored = store.live_ids(project_id, world.server)
    return Row(
        "sync killed (SIGKILL) half-way, run again", "kill after 3 of 8 labels", len(made - stored), len(stored - made)
    )


def receiver_down(world: World) -> Row:
    project_id, tasks = world.project("receiver down", 4)
    world.stack.down(only=["labels"])
    try:
        for task_id in tasks:
            label(world.client, task_id)
    finally:
        world.stack.up(only=["labels"])
    sync(world.client, world.loop.store, [project_id], world.server)
    lost, dup = world.account(project_id)
    return Row("label receiver down while annotators label", "stop the receiver, label 4, poll", lost, dup)


def recreated_label_studio(world: World) -> Row:
    """A second and a third server, fresh (ids from 1), one store: the old labels must stay, each once."""
    from label_studio_sdk import LabelStudio

    store = LabelStore(world.root / "recreated.db")
    made = 0
    for name in ("old", "new"):
        settings = world.settings.model_copy(
            update={
                "home": world.root / name,
                "stack": world.settings.stack.model_copy(update={"label_studio_port": _free_port()}),
            }
        )
        stack = Stack(settings)
        stack.up(only=["label-studio"])
        try:
            client = LabelStudio(base_url=label_studio_url(settings), api_key=stack_secrets(settings)["admin_token"])
            project_id = ensure_project(client, "recreated", CLASSES, labels_required=1)
            client.projects.import_tasks(id=project_id, request=[_task(name, i) for i in range(3)])
            for task in client.tasks.list(project=project_id):
                label(client, task.id)
            sync(client, store, [project_id], server_identity(client))
        finally:
            stack.down()
        made += 3
    live = len(store.labels())
    return Row(
        "Label Studio recreated (ids start again at 1)",
        "label 3 on each of two servers",
        max(0, made - live),
        max(0, live - made),
    )


def replaced_label_studio_tasks(world: World) -> Row:
    """Six tasks pushed to a Label Studio that is then replaced by a fresh one; the next push must bring the new
    one every task (none had labels), once, however often it runs."""
    from label_studio_sdk import LabelStudio

    outbox = Outbox(world.root / "replaced-outbox.db")
    site = f"replaced{len(world.names)}"
    outbox.enqueue([_task(site, i) for i in range(6)])
    keys: list[str] = []
    for name in ("before", "after"):
        settings = world.settings.model_copy(
            update={
                "home": world.root / f"replaced-{name}",
                "stack": world.settings.stack.model_copy(update={"label_studio_port": _free_port()}),
            }
        )
        stack = Stack(settings)
        stack.up(only=["label-studio"])
        try:
            client = LabelStudio(base_url=label_studio_url(settings), api_key=stack_secrets(settings)["admin_token"])
            project_id = ensure_project(client, site, CLASSES, labels_required=1)
            for _ in range(2):  # a second push must change nothing
                push_outbox(client, outbox, lambda s, c, pid=project_id: pid, batch=10)
            keys = [t.data["task_key"] for t in client.tasks.list(project=project_id, fields="task_only")]
        finally:
            stack.down()
    return Row(
        "Label Studio replaced after taking tasks",
        "push 6 tasks, replace the server, push twice",
        6 - len(set(keys)),
        len(keys) - len(set(keys)),
    )


# -- models -----------------------------------------------------------------------------------------------------
def _registry(world: World, name: str):
    from cytoloop.models.baseline import BaselineClassifier
    from cytoloop.registry import Registry

    model_dir = world.root / f"{name}-model"
    BaselineClassifier(["a", "b"], world.settings.data, world.settings.baseline).save(model_dir)
    uri = f"sqlite:///{world.root / name}.db"
    registry = Registry(uri, name, audit_log=world.root / name / "registry" / "alias-moves.jsonl")
    versions = [registry.log_model(model_dir, "cells").version for _ in range(3)]
    registry.move_alias("cells", "champion", versions[0], why="first", action="first")
    return registry, versions, uri, model_dir


def two_gates(world: World) -> Row:
    from cytoloop.policy.promotion import GateVerdict, apply_verdict
    from cytoloop.registry import AliasMoved, Registry

    registry, (v1, v2, v3), uri, _ = _registry(world, "gates")
    start, won = threading.Barrier(2), []

    def gate(version: str) -> None:
        own = Registry(uri, "gates", audit_log=registry.audit_log)
        verdict = GateVerdict(passed=True, reasons=["better"], challenger={}, champion={}, champion_version=v1)
        start.wait()
        try:
            won.append(apply_verdict(own, "cells", version, "champion", verdict).to_version)
        except AliasMoved:
            pass

    threads = [threading.Thread(target=gate, args=(v,)) for v in (v2, v3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return Row("two gates judged against one champion at once", "two threads promote", wrong_model=len(won) - 1)


_CRASH = """
import os, sys
from cytoloop.registry import Registry
registry = Registry(sys.argv[1], "crash", audit_log=sys.argv[2])
real = registry.set_alias
def set_alias(name, alias, version):
    real(name, alias, version)
    os._exit(9)
registry.set_alias = set_alias
registry.move_alias("cells", "champion", sys.argv[3], why="dies mid-move")
"""


def killed_move(world: World) -> Row:
    registry, (v1, v2, v3), uri, _ = _registry(world, "crash")
    registry.move_alias("cells", "champion", v2, why="second")
    subprocess.run([sys.executable, "-c", _CRASH, uri, str(registry.audit_log), v3], capture_output=True)
    back = registry.rollback("cells", "champion", why="undo")
    return Row(
        "alias move killed after the alias moved, then rollback",
        "kill, roll back",
        wrong_model=int(back.to_version != v2),
    )


_REPLICA = """
import json, sys
from cytoloop.config import RegistryConfig, RoutingConfig, ServeConfig
from cytoloop.serving.live import LiveModel, ServiceCache
from cytoloop.serving.model_source import ModelSource
source = ModelSource(ServeConfig(), RegistryConfig(tracking_uri=sys.argv[1], cache_dir=sys.argv[2], model_name="cells"))
try:
    live = LiveModel(None, source, ServiceCache(source, RoutingConfig()))
    print(json.dumps({"version": live.service.ref.version}))
except Exception as error:
    print(json.dumps({"error": type(error).__name__}))
"""


def _new_replica(uri: str, cache: Path) -> dict:
    env = {**os.environ, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
    done = subprocess.run([sys.executable, "-c", _REPLICA, uri, str(cache)], capture_output=True, text=True, env=env)
    return json.loads(done.stdout.strip().splitlines()[-1])


def replica_registry_down(world: World) -> Row:
    registry, (v1, _, _), uri, _ = _registry(world, "down")
    cache = world.root / "down-cache"
    _new_replica(uri, cache)  # a replica served v1 on this host before
    answer = _new_replica(f"http://127.0.0.1:{_free_port()}", cache)  # the registry server is down
    return Row(
        "new replica while the registry is down",
        "start a replica, registry unreachable",
        wrong_model=int(answer.get("version") not in (None, v1)),
        failed_requests=int("error" in answer),
    )


def replica_corrupt_champion(world: World) -> Row:
    from cytoloop.models.base import WEIGHTS_FILE

    registry, (v1, _, _), uri, model_dir = _registry(world, "corrupt")
    cache = world.root / "corrupt-cache"
    _new_replica(uri, cache)
    v4 = registry.log_model(model_dir, "cells").version
    model_id = registry.client.get_model_version("cells", v4).source.rsplit("/", 1)[-1]  # models:/m-...
    [weights] = [p for p in (world.root / "artifacts").rglob(WEIGHTS_FILE) if model_id in str(p)]
    weights.write_bytes(b"not a model")  # corrupted in the artifact store after registration
    registry.move_alias("cells", "champion", v4, why="a bad upload")
    answer = _new_replica(uri, cache)
    return Row(
        "new replica, the champion's weights corrupt",
        "corrupt its weights in the artifact store",
        wrong_model=int(answer.get("version") not in (None, v1)),
        failed_requests=int("error" in answer),
    )


def registry_unreachable_site(world: World) -> Row:
    from cytoloop.registry import Registry, RegistryUnavailable

    registry, (v1, v2, _), uri, _ = _registry(world, "site")
    registry.move_alias("cells", "champion-north", v2, why="site model")
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    down = Registry(f"http://127.0.0.1:{_free_port()}", "site")
    try:
        answer = down.for_site("cells", "north").version  # anything here would be a guess
    except RegistryUnavailable:
        answer = None
    return Row(
        "site alias read while the registry is unreachable",
        "resolve champion-north",
        wrong_model=int(answer is not None),
    )


SCENARIOS = [
    webhook_during_poll,
    task_deleted_during_poll,
    malformed_event,
    refused_task,
    two_pushes,
    killed_sync,
    receiver_down,
    recreated_label_studio,
    replaced_label_studio_tasks,
    two_gates,
    killed_move,
    registry_unreachable_site,
    replica_registry_down,
    replica_corrupt_champion,
]


# -- soak -------------------------------------------------------------------------------------------------------
def soak(world: World, minutes: float, seed: int = 0) -> tuple[Row, dict]:
    """Annotators label, relabel and delete; webhooks arrive; a poller polls; a pusher pushes new tasks; two gate
    threads move an alias compare-and-set; Label Studio or the receiver is restarted at random. Then quiet, one
    final poll, and the books must balance."""
    from label_studio_sdk import LabelStudio

    from cytoloop.policy.promotion import GateVerdict, apply_verdict
    from cytoloop.registry import AliasMoved, Registry, RegistryError

    rng = random.Random(seed)
    project_id, _ = world.project("soak", 20)
    invite = invite_url(label_studio_url(world.settings), stack_secrets(world.settings)["admin_token"])
    annotators = []
    for i in range(2):
        _, token = user_token(label_studio_url(world.settings), f"soak{i}@lab.test", f"soak-pw-{i}-x", invite)
        annotators.append(LabelStudio(base_url=label_studio_url(world.settings), api_key=token))
    registry, versions, uri, _ = _registry(world, "soak")
    outbox = Outbox(world.root / "soak-outbox.db")
    stop = threading.Event()
    stats = {
        "created": 0,
        "updated": 0,
        "deleted": 0,
        "polls": 0,
        "pushed": 0,
        "moves": 0,
        "refused_moves": 0,
        "label_studio_restarts": 0,
        "receiver_restarts": 0,
        "errors_while_down": 0,
    }
    lock = threading.Lock()

    def bump(key: str, n: int = 1) -> None:
        with lock:
            stats[key] += n

    def annotate(client, who: int) -> None:
        own: list[int] = []
        local = random.Random(seed + who)
        while not stop.is_set():
            try:
                tasks = [t.id for t in client.tasks.list(project=project_id, fields="task_only")]
                roll = local.random()
                if own and roll < 0.15:
                    client.annotations.delete(id=own.pop(local.randrange(len(own))))
                    bump("deleted")
                elif own and roll < 0.35:
                    client.annotations.update(id=local.choice(own), result=prediction_result(local.choice(CLASSES)))
                    bump("updated")
                else:
                    own.append(
                        client.annotations.create(
                            id=local.choice(tasks), result=prediction_result(local.choice(CLASSES))
                        ).id
                    )
                    bump("created")
            except Exception:
                bump("errors_while_down")
                time.sleep(1.0)
            time.sleep(local.uniform(0.05, 0.4))

    def poll() -> None:
        while not stop.wait(3.0):
            try:
                sync(world.client, world.loop.store, [project_id], world.server)
                bump("polls")
            except Exception:
                bump("errors_while_down")

    def push() -> None:
        n = 100
        while not stop.wait(5.0):
            outbox.enqueue([_task("soak", n + i) for i in range(3)])
            n += 3
            try:
                bump("pushed", push_outbox(world.client, outbox, lambda s, c: project_id, batch=10).pushed)
            except Exception:
                bump("errors_while_down")

    def move(worker: int) -> None:
        own = Registry(uri, "soak", audit_log=registry.audit_log)
        local = random.Random(seed + 10 + worker)
        while not stop.wait(local.uniform(0.5, 2.0)):
            try:
                current = own.alias_version("cells", "champion")
                verdict = GateVerdict(True, ["soak"], {}, {}, champion_version=current)
                apply_verdict(own, "cells", local.choice(versions), "champion", verdict)
                bump("moves")
            except AliasMoved:
                bump("refused_moves")
            except RegistryError:
                bump("errors_while_down")

    def chaos() -> None:
        while not stop.wait(rng.uniform(40, 80)):
            which = rng.choice(["label-studio", "labels"])
            world.stack.down(only=[which])
            time.sleep(rng.uniform(2, 8))
            world.stack.up(only=[which])
            bump("label_studio_restarts" if which == "label-studio" else "receiver_restarts")

    threads = [threading.Thread(target=annotate, args=(c, i)) for i, c in enumerate(annotators)]
    threads += [threading.Thread(target=poll), threading.Thread(target=push), threading.Thread(target=chaos)]
    threads += [threading.Thread(target=move, args=(i,)) for i in range(2)]
    began = time.monotonic()
    for thread in threads:
        thread.start()
    time.sleep(minutes * 60)
    stop.set()
    for thread in threads:
        thread.join(timeout=120)
    world.stack.up(only=["label-studio", "labels"])
    seconds = time.monotonic() - began
    push_outbox(world.client, outbox, lambda s, c: project_id, batch=10)
    _wait(lambda: world.loop.store.event_counts()["pending"] == 0, 60)
    sync(world.client, world.loop.store, [project_id], world.server)
    lost, duplicated = world.account(project_id)
    keys = [t.data["task_key"] for t in world.client.tasks.list(project=project_id, fields="task_only")]
    missing_tasks = len(pushed_keys(outbox) - set(keys))  # marked pushed, yet not in Label Studio
    history = registry.alias_history("cells", "champion")
    trail_ok = history and history[-1].to_version == registry.alias_version("cells", "champion")
    gaps = sum(1 for a, b in zip(history, history[1:]) if a.to_version != b.from_version)
    row = Row(
        f"soak: {minutes:g} min, all at once, random restarts",
        f"{stats['created']}+{stats['updated']}+{stats['deleted']} label changes, "
        f"{stats['label_studio_restarts']}+{stats['receiver_restarts']} restarts, {stats['moves']} moves",
        lost + missing_tasks,
        duplicated + len(keys) - len(set(keys)),
        int(not trail_ok) + gaps,
        0,
        seconds,
    )
    return row, stats


def pushed_keys(outbox: Outbox) -> set[str]:
    from labelstudio import sqlite

    with sqlite.connect(outbox.path) as db:
        return {r[0] for r in db.execute("SELECT task_key FROM outbox WHERE pushed_at IS NOT NULL")}


# -- report -----------------------------------------------------------------------------------------------------
def table(rows: list[Row]) -> str:
    lines = [
        "| fault | what was done | labels lost | labels duplicated | wrong-model answers | failed requests |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r.fault} | {r.done} | {r.lost} | {r.duplicated} | {r.wrong_model} | {r.failed_requests} |" for r in rows
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--cells", type=Path, default=Path("../shared/data/cells"), help="images root Label Studio serves"
    )
    parser.add_argument("--soak-minutes", type=float, default=10.0, help="0: no soak")
    parser.add_argument("--no-docs", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = parser.parse_args()
    world = start_world(args.cells.resolve())
    rows: list[Row] = []
    stats: dict = {}
    try:
        for scenario in SCENARIOS:
            began = time.monotonic()
            row = scenario(world)
            row.seconds = time.monotonic() - began
            rows.append(row)
            print(
                f"{row.fault}: lost {row.lost}, duplicated {row.duplicated}, wrong model {row.wrong_model}, "
                f"failed {row.failed_requests} ({row.seconds:.0f} s)",
                flush=True,
            )
        if args.soak_minutes > 0:
            row, stats = soak(world, args.soak_minutes)
            rows.append(row)
            print(
                f"{row.fault}: {row.done}; lost {row.lost}, duplicated {row.duplicated}, "
                f"trail {row.wrong_model}; {stats}"
            )
    finally:
        world.stack.down()
        shutil.rmtree(world.root, ignore_errors=True)
    body = table(rows)
    print(body)
    if not args.no_docs:
        command = f"python benchmarks/faults.py --cells {args.cells} --soak-minutes {args.soak_minutes:g}"
        body = (
            f"Command: `{command}`. Machine: {platform.machine()}, 2 cores, no GPU. Date: {date.today().isoformat()}.\n"
            "Real Label Studio 1.23, label receiver, MLflow (SQLite), new replicas as new processes; counts measured "
            "from what Label Studio and the registry hold afterwards (after the system's own next poll).\n\n"
            + body
            + (f"\nSoak activity: {json.dumps(stats)}.\n" if stats else "")
        )
        replace_section(DOCS, "faults", body, title="Faults: labels lost, duplicated, wrong models, failed requests")
    return int(any(r.lost or r.duplicated or r.wrong_model or r.failed_requests for r in rows))


if __name__ == "__main__":
    sys.exit(main())

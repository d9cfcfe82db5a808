"""The review loop against a real Label Studio (see conftest.py) and our real label receiver (`review serve`).

The tests share one Label Studio and one story, told by module fixtures so that any test, run alone or in any
order, finds the story as far as it needs it: `routed` routes real cells out, `labelled` labels them as two real
annotator accounts (webhooks, then one missed while the receiver is down); the tests check what each step did,
interrupt a sync, stop Label Studio during routing. Predictions are fixed fakes (routing is what is tested here,
not a model): their probabilities decide each cell's reason. Cells are the shared real images, served to Label
Studio by local-files serving, never copied.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from dataclasses import dataclass

import httpx
import numpy as np
import pytest
from label_studio_sdk import LabelStudio
from typer.testing import CliRunner

from cytoloop.data.records import load_records
from cytoloop.models.base import Predictions
from labelstudio import sqlite

pytestmark = pytest.mark.integration

CLASSES = ["lymphocyte", "monocyte", "neutrophil", "blast"]
SITES = ("jtsc", "bccd")


@dataclass
class World:
    loop: object  # labelstudio.loop.ReviewLoop
    server: object  # conftest.LabelStudioServer
    records: list
    predictions: Predictions
    annotators: dict  # email -> (user id, SDK client)


def fake_predictions(n: int) -> Predictions:
    """Cell i: accept (conf .95), review (.40-.55), review, anomaly (score 3); confidences all distinct."""
    probs, anomaly = [], []
    for i in range(n):
        kind = i % 4
        conf = {0: 0.95, 1: 0.40, 2: 0.50, 3: 0.90}[kind] + i * 0.002
        label = i % 3  # never "blast": anomalies come from the score here
        row = np.full(len(CLASSES), (1 - conf) / (len(CLASSES) - 1))
        row[label] = conf
        probs.append(row)
        anomaly.append(3.0 if kind == 3 else 0.0)
    return Predictions(np.array(probs), np.array(anomaly), np.ones(n))


def wait_for(condition, timeout=30.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.3)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def ls_annotations(world: World) -> dict[int, str]:
    """annotation id -> chosen class, straight from Label Studio, across our projects."""
    from labelstudio.label_config import parse_result

    found = {}
    for project_id in world.loop.projects().values():
        for task in world.loop.client.tasks.list(project=project_id, fields="all"):
            for annotation in task.annotations or []:
                annotation = annotation if isinstance(annotation, dict) else annotation.model_dump()
                found[annotation["id"]] = parse_result(annotation["result"])[0]
    return found


def ls_task_keys(world: World) -> list[str]:
    from labelstudio.push import project_task_keys

    keys = []
    for project_id in world.loop.projects().values():
        keys += list(project_task_keys(world.loop.client, project_id))
    return keys


def store_annotations(store) -> dict[int, str]:
    return {label.annotation_id: label.label for label in store.labels()}


def annotate(client, task_id: int, label: str, abnormal: bool = False):
    from labelstudio.label_config import ABNORMAL, prediction_result

    result = prediction_result(label)
    if abnormal:
        result.append({"from_name": "flags", "to_name": "image", "type": "choices", "value": {"choices": [ABNORMAL]}})
    return client.annotations.create(id=task_id, result=result)


@pytest.fixture(scope="module")
def world(label_studio, cells_dir) -> World:
    from label_studio_sdk import LabelStudio

    from cytoloop.config import RoutingConfig
    from labelstudio.client import invite_url, user_token
    from labelstudio.loop import ReviewLoop

    records = load_records(cells_dir)
    chosen = [r for site in SITES for r in [r for r in records if r.domain == site][:8]]
    label_studio.stack.up(only=["labels"])  # the webhook receiver, as `cytoloop stack up` runs it
    annotators = {}
    invite = invite_url(label_studio.url, label_studio.token)  # sign-up is closed without it
    for email in ("ann1@lab.test", "ann2@lab.test"):
        user_id, token = user_token(label_studio.url, email, "annotator-pw-123", invite)
        annotators[email] = (user_id, LabelStudio(base_url=label_studio.url, api_key=token))
    routing = {"review_below": 0.7, "anomaly_above": 1.0, "audit_fraction": 0.0, "always_review": ["blast"]}
    settings = label_studio.settings.model_copy(update={"routing": RoutingConfig(**routing)})
    return World(ReviewLoop(settings), label_studio, chosen, fake_predictions(len(chosen)), annotators)


def test_label_studio_is_closed_to_strangers(label_studio, tmp_path):
    """Sign-up needs the organisation's invite link (a reset voids the old one), and the admin's password and token
    are on no command line of the host (`ps` shows every user's)."""
    from pathlib import Path

    from labelstudio.client import invite_url, user_token
    from ops.cli import app
    from ops.stack import stack_secrets

    secret = stack_secrets(label_studio.settings)
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().decode(errors="replace")
        except OSError:  # a process that ended meanwhile
            continue
        assert secret["admin_password"] not in text and secret["admin_token"] not in text, cmdline
    # nor in a file another user of the host can read: Label Studio's database holds the token in plain text
    data = Path(label_studio.settings.home) / "label-studio"
    assert data.stat().st_mode & 0o077 == 0, oct(data.stat().st_mode)

    with httpx.Client(base_url=label_studio.url, timeout=30) as anonymous:  # the sign-up form, as a stranger
        anonymous.get("/user/signup/")
        csrf = anonymous.cookies.get("csrftoken") or ""
        refused = anonymous.post(
            "/user/signup/",
            data={"email": "stranger@outside.test", "password": "strange-pw-1", "csrfmiddlewaretoken": csrf},
            headers={"Referer": f"{label_studio.url}/user/signup/"},
        )
    assert refused.status_code == 403
    with pytest.raises(PermissionError, match="no invite link"):
        user_token(label_studio.url, "stranger@outside.test", "strange-pw-1")

    config = tmp_path / "settings.json"
    config.write_text(label_studio.settings.model_dump_json(exclude_none=True))
    old = invite_url(label_studio.url, label_studio.token)
    reset = CliRunner().invoke(app, ["review", "invite", "--reset", "--config", str(config)])
    assert reset.exit_code == 0, reset.output
    new = reset.stdout.strip()
    assert new.startswith(f"{label_studio.url}/user/signup/?token=") and new != old
    with pytest.raises(PermissionError):
        user_token(label_studio.url, "stranger@outside.test", "strange-pw-1", old)  # a voided link
    user_id, _ = user_token(label_studio.url, "invited@lab.test", "invited-pw-1", new)
    admin = LabelStudio(base_url=label_studio.url, api_key=label_studio.token)
    emails = {u.email for u in admin.users.list()}
    assert "invited@lab.test" in emails and "stranger@outside.test" not in emails


def test_stack_up_is_idempotent_and_a_taken_port_is_named(label_studio, tmp_path):
    from ops.stack import Stack, StackError

    before = {s.name: s.pid for s in label_studio.stack.status()}
    label_studio.stack.up(only=["label-studio"])
    after = {s.name: (s.state, s.pid) for s in label_studio.stack.status()}
    assert after["label-studio"] == ("up", before["label-studio"])
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        settings = label_studio.settings.model_copy(
            update={
                "home": tmp_path / "other",
                "review": label_studio.settings.review.model_copy(update={"webhook_port": busy.getsockname()[1]}),
            }
        )
        with pytest.raises(StackError, match=f"port {busy.getsockname()[1]} .* taken"):
            Stack(settings).up(only=["labels"])


def test_bootstrap_twice_creates_nothing_twice(world):
    from labelstudio.label_config import ARTEFACT, OTHER, config_classes

    first = world.loop.bootstrap("jtsc", CLASSES)
    assert world.loop.bootstrap("jtsc", CLASSES) == first
    client = world.loop.client
    assert [p.id for p in client.projects.list() if p.title == "CytoLoop review: jtsc"] == [first]
    assert len(client.webhooks.list(project=str(first))) == 1
    assert len(client.import_storage.local.list(project=first)) == 1
    project = client.projects.get(id=first)
    assert project.maximum_annotations == 2
    assert OTHER in project.label_config and ARTEFACT in project.label_config and "blast" in project.label_config
    world.loop.bootstrap("jtsc", ["lymphocyte", "basophil"])  # a new model's classes are added, none removed
    assert config_classes(client.projects.get(id=first).label_config) == [*CLASSES, "basophil"]
    # two bootstraps at once (a route and the poll) both found no webhook and both made one: every event came
    # twice, for good; the next bootstrap keeps one
    [hook] = client.webhooks.list(project=str(first))
    twin = client.webhooks.create(
        url=hook.url, project=first, send_payload=True, headers=hook.headers, actions=hook.actions, is_active=True
    )
    world.loop.bootstrap("jtsc", CLASSES)
    assert [h.id for h in client.webhooks.list(project=str(first))] == [hook.id] and twin.id != hook.id


@dataclass
class Routed:
    first: object  # labelstudio.loop.RouteReport: 16 cells, a budget of 10
    again: object  # the same cells and version again, the same budget
    third: object  # and once more, without a budget


@pytest.fixture(scope="module")
def routed(world) -> Routed:
    """The first step of the story: the 16 cells routed for version v1, three times over."""
    first = world.loop.route(world.records, world.predictions, CLASSES, "v1", budget=10)
    again = world.loop.route(world.records, world.predictions, CLASSES, "v1", budget=10)
    return Routed(first, again, world.loop.route(world.records, world.predictions, CLASSES, "v1"))


def test_stack_status_exits_0_when_every_service_of_the_stack_is_up(world, tmp_path):
    from ops.cli import app

    config = tmp_path / "settings.json"
    config.write_text(
        world.loop.settings.model_dump_json(
            exclude={"stack": {"admin_password", "admin_token"}, "review": {"webhook_secret"}}, exclude_none=True
        )
    )
    shown = CliRunner().invoke(app, ["stack", "status", "--config", str(config)])
    assert shown.exit_code == 0 and "labels        up" in shown.output and "ray           disabled" in shown.output


def test_route_and_push_real_cells_one_task_per_cell_and_version(world, routed):
    report = routed.first
    assert report.reasons == {"accept": 4, "review": 8, "anomaly": 4}
    assert (report.chosen, report.queued, report.push.pushed, report.push.pending) == (10, 10, 10, 0)
    assert report.push.error is None and set(report.by_site) == set(SITES)
    assert (routed.again.chosen, routed.again.already_queued) == (2, 10)  # the two left over, nothing twice
    assert routed.third.chosen == 0
    keys = [k for k in ls_task_keys(world) if k.endswith("@v1")]
    assert len(keys) == 12 == len(set(keys))

    # the task carries the cell, its routing and the prediction; Label Studio serves the real image
    project_id = world.loop.projects()["jtsc"]
    task = next(iter(world.loop.client.tasks.list(project=project_id, fields="all")))
    assert task.data["reason"] in ("review", "anomaly") and task.data["site"] == "jtsc"
    [prediction] = [p if isinstance(p, dict) else p.model_dump() for p in task.predictions]
    assert prediction["model_version"] == "v1" and 0 < prediction["score"] < 1
    image = httpx.get(world.server.url + task.data["image"], headers={"Authorization": f"Token {world.server.token}"})
    assert image.status_code == 200 and len(image.content) > 1000


@dataclass
class Labelled:
    tasks: list  # the first five jtsc tasks, by id
    changing: object  # ann2's label of task 2, changed from monocyte to lymphocyte
    doomed: object  # ann1's label of task 4, deleted
    missed: object  # ann2's label of task 4, made while the label receiver was down
    by_webhook: dict[int, str]  # the store's labels once the webhooks were applied
    sources: set[str]  # where those came from
    before_poll: dict[int, str]  # the store's labels after the missed one was made, before any poll
    poll: object  # labelstudio.sync.SyncReport of the poll that followed


@pytest.fixture(scope="module")
def labelled(world, routed) -> Labelled:
    """The second step: two annotators label the first five jtsc tasks (jtsc tasks 0-1 agreed, 2 a tie, 3 agreed
    but flagged abnormal, 4 one label), one label is changed and one deleted, all by webhook; then one label is
    made while the receiver is down and a poll brings it."""
    from labelstudio.label_config import prediction_result

    (_, ann1), (_, ann2) = world.annotators.values()
    project_id = world.loop.projects()["jtsc"]
    tasks = sorted(world.loop.client.tasks.list(project=project_id), key=lambda t: t.id)[:5]
    store = world.loop.store

    for task in tasks[:4]:
        annotate(ann1, task.id, "neutrophil")
    annotate(ann2, tasks[0].id, "neutrophil")
    annotate(ann2, tasks[1].id, "neutrophil")
    changing = annotate(ann2, tasks[2].id, "monocyte")
    annotate(ann2, tasks[3].id, "neutrophil", abnormal=True)
    ann2.annotations.update(id=changing.id, result=prediction_result("lymphocyte"))
    doomed = annotate(ann1, tasks[4].id, "monocyte")
    ann1.annotations.delete(id=doomed.id)
    wait_for(lambda: store.counts()["retracted"] == 1, what="webhook events applied")
    by_webhook = store_annotations(store)
    with sqlite.connect(store.path) as db:
        sources = {row[0] for row in db.execute("SELECT DISTINCT source FROM annotations")}

    # a webhook missed: the receiver is down while an annotator labels; a poll recovers it
    world.server.stack.down(only=["labels"])
    try:  # the receiver comes back whatever this part finds: later tests need it
        missed = annotate(ann2, tasks[4].id, "neutrophil")
        before_poll = store_annotations(store)
        poll = world.loop.sync()
    finally:
        world.server.stack.up(only=["labels"])
    return Labelled(tasks, changing, doomed, missed, by_webhook, sources, before_poll, poll)


def test_labels_come_back_by_webhook_and_poll_exactly_once(world, labelled):
    (id1, _), (id2, _) = world.annotators.values()
    assert id1 != id2
    store = world.loop.store

    # webhooks: created, updated and deleted all arrive through the receiver
    labels = labelled.by_webhook
    assert len(labels) == 8 and labels[labelled.changing.id] == "lymphocyte" and labelled.doomed.id not in labels
    assert labelled.sources == {"webhook"}

    # the label made while the receiver was down: missing until the poll brought it
    assert labelled.missed.id not in labelled.before_poll
    assert labelled.poll.changed == 1 and store_annotations(store)[labelled.missed.id] == "neutrophil"

    # replaying every event and polling again changes nothing; the store equals Label Studio, each label once
    with sqlite.connect(store.path) as db:
        events = [(row[0], row[1]) for row in db.execute("SELECT body, server FROM events")]
    assert {server for _, server in events} == {world.loop.server}  # each event says which server sent it
    for body, server in events:
        store.record_event(body, server)
    store.process_events()
    assert world.loop.sync().changed == 0
    assert store_annotations(store) == ls_annotations(world)
    with sqlite.connect(store.path) as db:
        assert db.execute("SELECT COUNT(*) FROM annotations WHERE retracted_at IS NULL").fetchone()[0] == 9


# A sync in its own process that stops after storing its third annotation, to be killed there.
SYNC_THEN_HANG = """
import sys, time
from pathlib import Path
from cytoloop.config import load_settings
from labelstudio.loop import ReviewLoop
from labelstudio.store import LabelStore
from labelstudio.sync import sync

loop = ReviewLoop(load_settings(Path(sys.argv[1])))

def hang_after_three(n):
    if n == 3:
        print("stored 3", flush=True)
        time.sleep(600)

sync(loop.client, LabelStore(Path(sys.argv[2])), loop.projects().values(), loop.server, on_annotation=hang_after_three)
"""


def test_a_sync_killed_half_way_and_rerun_holds_each_label_once(world, labelled, tmp_path):
    """SIGKILL (no exception handler, no `finally`, no clean close of the store) after three labels are stored;
    the rerun must bring the rest, each label exactly once."""
    from labelstudio.store import LabelStore
    from labelstudio.sync import sync
    from tests.integration.conftest import kill_when_it_says

    settings_file = tmp_path / "settings.json"
    settings_file.write_text(
        world.loop.settings.model_dump_json(
            exclude={"stack": {"admin_password", "admin_token"}, "review": {"webhook_secret"}}, exclude_none=True
        )
    )
    store_path = tmp_path / "labels.db"
    kill_when_it_says(SYNC_THEN_HANG, [str(settings_file), str(store_path)], "stored 3")

    fresh = LabelStore(store_path)
    assert len(store_annotations(fresh)) == 3
    sync(world.loop.client, fresh, world.loop.projects().values(), world.loop.server)
    assert sync(world.loop.client, fresh, world.loop.projects().values(), world.loop.server).changed == 0
    assert store_annotations(fresh) == ls_annotations(world)
    assert fresh.counts()["annotations"] == len(ls_annotations(world))


def test_consensus_report_and_training_manifest(world, labelled, tmp_path):
    from ops.cli import app

    report = world.loop.report()
    # as `labelled` left them: jtsc tasks 0-1 agreed, 2 a tie (neutrophil / lymphocyte), 3 agreed but flagged
    # abnormal, 4 one label
    assert report["status"] == {"agreed": 3, "tie": 1, "pending": 1}
    assert [(c["status"], c["abnormal"]) for c in report["senior_review"]] in (
        [("tie", False), ("agreed", True)],
        [("agreed", True), ("tie", False)],
    )
    ann1 = report["annotators"]["ann1@lab.test"]
    assert (ann1["labelled"], ann1["compared"], ann1["agreement"]) == (4, 4, 0.75)

    settings_file = tmp_path / "settings.json"
    settings_file.write_text(
        world.server.settings.model_dump_json(
            exclude={"stack": {"admin_password", "admin_token"}, "review": {"webhook_secret"}}, exclude_none=True
        )
    )
    printed = CliRunner().invoke(app, ["review", "report", "--config", str(settings_file)])
    assert printed.exit_code == 0, printed.output
    assert "senior review: 2 cell(s)" in printed.output
    assert "audit: the model was wrong on 0 of 0 audited cells with a consensus (error rate -)" in printed.output
    out = tmp_path / "reviewed.csv"
    result = CliRunner().invoke(app, ["review", "export", "--config", str(settings_file), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "exported 3 cell(s)" in result.output
    records = load_records(out)  # what `cytoloop train --data` reads
    assert len(records) == 3 and {r.label for r in records} <= set(CLASSES)
    assert all(r.path.is_file() for r in records)
    with out.open() as handle:
        header = handle.readline().strip().split(",")
    assert header[:3] == ["path", "label", "domain"] and {"annotators", "model_versions", "labelled_at"} <= set(header)


def test_label_studio_down_while_routing_loses_nothing(world, routed):
    before = ls_task_keys(world)
    world.server.stop()
    try:  # Label Studio comes back whatever this part finds: later tests need it
        down = world.loop.route(world.records, world.predictions, CLASSES, "v2", budget=3)
        assert down.queued == 3 and down.push.error and down.push.pending == 3
        assert world.loop.outbox.counts()["pending"] == 3
    finally:
        world.server.start()
    back = world.loop.push()
    assert (back.pushed, back.pending, back.error) == (3, 0, None)
    assert world.loop.push().pushed == 0
    keys = ls_task_keys(world)
    assert len(keys) == len(set(keys)) and sorted(set(keys) - set(before)) == sorted(
        k for k in keys if k.endswith("@v2")
    )
    assert sum(k.endswith("@v2") for k in keys) == 3


def test_label_studio_failing_under_a_command_is_one_line_and_loses_nothing(world, routed, tmp_path):
    """Label Studio answers 500 (its database locked under load) to a sync's task listing, and to a push's
    question which server it is: `review sync` and `review push` ended in a traceback, exit 1 (a bug, to a
    scheduler). Now one line naming Label Studio and what it failed: the sync exits 2, keeping what it had stored;
    the push leaves its tasks waiting (exit 7 while any wait) and they go once Label Studio answers."""
    from ops.cli import app
    from tests.faults import FailingServer

    front = FailingServer(world.server.url, lambda method, path: path.startswith(("/api/tasks", "/api/organizations")))
    settings = world.loop.settings
    settings = settings.model_copy(
        update={"review": settings.review.model_copy(update={"label_studio_url": front.url})}
    )
    config = tmp_path / "settings.json"
    config.write_text(
        settings.model_dump_json(
            exclude={"stack": {"admin_password", "admin_token"}, "review": {"webhook_secret"}}, exclude_none=True
        )
    )
    waiting = world.loop.route(world.records, world.predictions, CLASSES, "v-failing", budget=2, push=False)
    try:
        front.failing = True
        synced = CliRunner().invoke(app, ["review", "sync", "--config", str(config)])
        assert synced.exit_code == 2, synced.output + repr(synced.exception)
        said = " ".join(synced.output.split())
        assert (
            f"Label Studio at {front.url} failed (HTTP 500) during the sync; the labels stored before are kept" in said
        )
        pushed = CliRunner().invoke(app, ["review", "push", "--config", str(config)])
        assert pushed.exit_code == 7, pushed.output + repr(pushed.exception)
        assert f"Label Studio at {front.url} failed (HTTP 500) when asked which server" in " ".join(
            pushed.output.split()
        )
        assert world.loop.outbox.counts()["pending"] == waiting.queued == 2
        front.failing = False
        assert CliRunner().invoke(app, ["review", "push", "--config", str(config)]).exit_code == 0
        assert world.loop.outbox.counts()["pending"] == 0
    finally:
        front.close()


def test_route_command_scores_real_cells_with_a_model(world, tiny_overrides, tmp_path):
    """`cytoloop review route` end to end: a tiny model trained on real cells scores other real cells."""
    from cytoloop.config import load_settings
    from cytoloop.workflows import train_model
    from ops.cli import app

    records = load_records(world.server.settings.stack.images_root)
    jtsc = [r for r in records if r.domain == "jtsc" and r.label in CLASSES[:3]]
    train = [r for label in CLASSES[:3] for r in [r for r in jtsc if r.label == label][:6]]
    train_model("baseline", train, load_settings(overrides=tiny_overrides), tmp_path / "model")
    unseen = [r for r in jtsc if r not in train][:12]
    data = tmp_path / "unseen.csv"
    data.write_text("path,label,domain\n" + "".join(f"{r.path},,{r.domain}\n" for r in unseen))

    settings = world.loop.settings.model_copy(
        update={"routing": world.loop.settings.routing.model_copy(update={"review_below": 1.0})}
    )  # a 10-step model is never confident: everything goes to review
    config = tmp_path / "settings.json"
    config.write_text(
        settings.model_dump_json(
            exclude={"stack": {"admin_password", "admin_token"}, "review": {"webhook_secret"}}, exclude_none=True
        )
    )
    args = [
        "review",
        "route",
        "--model",
        str(tmp_path / "model"),
        "--data",
        str(data),
        "--site",
        "clinic",
        "--model-version",
        "tiny-1",
        "--budget",
        "5",
        "--config",
        str(config),
    ]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    assert "5 chosen, 5 newly queued" in first.output and "pushed 5 task(s)" in first.output
    keys = [k for k in ls_task_keys(world) if k.startswith("clinic:")]
    assert len(keys) == 5 and all(k.endswith("@tiny-1") for k in keys)
    again = CliRunner().invoke(app, [*args, "--json"])  # for a scheduler: the report as JSON on stdout
    assert again.exit_code == 0 and json.loads(again.stdout)["already_queued"] >= 5
    synced = CliRunner().invoke(app, ["review", "sync", "--json", "--config", str(config)])
    assert synced.exit_code == 0 and set(json.loads(synced.stdout)) >= {"events", "seen", "changed", "retracted"}
    bad = CliRunner().invoke(
        app, ["review", "route", "--model", str(tmp_path / "missing"), "--data", str(data), "--config", str(config)]
    )
    assert bad.exit_code == 2 and "missing" in bad.output


def test_labels_required_raised_reaches_every_project_at_the_next_sync(world, routed):
    """`review.labels_required` raised from 2 to 3 reached only a site whose tasks a push sent: every other
    project kept `maximum_annotations` 2, so Label Studio took its tasks off the queue at two labels while
    consensus waited for three, each such cell pending for good. A sync now sets it on every project."""
    from labelstudio.loop import ReviewLoop

    settings = world.loop.settings
    raised = settings.model_copy(update={"review": settings.review.model_copy(update={"labels_required": 3})})
    projects = [project_id for _, project_id in world.loop.titled_projects()]
    assert {world.loop.client.projects.get(id=p).maximum_annotations for p in projects} == {2}
    try:
        ReviewLoop(raised).sync()
        assert {world.loop.client.projects.get(id=p).maximum_annotations for p in projects} == {3}
    finally:  # the module's other tests need two
        ReviewLoop(settings).sync()
    assert {world.loop.client.projects.get(id=p).maximum_annotations for p in projects} == {2}


def test_label_studio_retrieves_predictions_from_the_ml_backend(label_studio, cells_dir, tiny_overrides, tmp_path):
    """Connected under Settings -> Model (the ML-backend protocol), CytoLoop answers Label Studio's "Retrieve
    predictions" for tasks imported without any: each task gets a pre-annotation with the served version."""

    import uvicorn
    from label_studio_sdk import LabelStudio

    from cytoloop.config import load_settings
    from cytoloop.data.records import select
    from cytoloop.workflows import train_model
    from labelstudio.bootstrap import ensure_project
    from labelstudio.ml_backend import Backend, create_app
    from labelstudio.tasks import image_url
    from tests.integration.conftest import free_port

    records = load_records(cells_dir)
    train = [r for c in CLASSES[:3] for r in select(records, ["jtsc"], [c])[:8]]
    train_model("baseline", train, load_settings(overrides=tiny_overrides), tmp_path / "model", classes=CLASSES[:3])
    serve_settings = label_studio.settings.serve.model_copy(update={"model_dir": tmp_path / "model"})
    backend = Backend(label_studio.settings.model_copy(update={"serve": serve_settings}))
    port = free_port()
    login = ("label-studio", "ml-backend-password")
    app = create_app(backend, *login)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started, what="the ML backend")
    try:
        admin = LabelStudio(base_url=label_studio.url, api_key=label_studio.token)
        project_id = ensure_project(admin, "ml backend", CLASSES[:3], labels_required=1)
        cells = [r.path for r in select(records, ["bccd"], CLASSES[:3])[:5]]
        admin.projects.import_tasks(  # as a lab imports its own cells: an image URL, no predictions
            id=project_id, request=[{"data": {"image": image_url(p, cells_dir)}} for p in cells]
        )
        url = f"http://127.0.0.1:{port}"
        admin.ml.create(
            project=project_id,
            url=url,
            title="CytoLoop",
            auth_method="BASIC_AUTH",
            basic_auth_user=login[0],
            basic_auth_pass=login[1],
        )
        admin.actions.create(id="retrieve_tasks_predictions", project=project_id, selected_items={"all": True})
        version = backend.site(None).service.ref.version
        tasks = list(admin.tasks.list(project=project_id, fields="all"))
        predictions = [p if isinstance(p, dict) else p.model_dump() for t in tasks for p in (t.predictions or [])]
        assert len(predictions) == 5 and {p["model_version"] for p in predictions} == {version}
        assert all(0 < p["score"] <= 1 and p["result"][0]["value"]["choices"][0] in CLASSES for p in predictions)
    finally:
        server.should_exit = True
        thread.join(timeout=10)

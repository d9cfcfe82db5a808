"""The fine-tune as a Ray job on a real two-node Ray cluster, as on a KubeRay cluster (docs/deploy.md).

Two `ray start` nodes on 127.0.0.1 (a head and a worker, one CPU each, so that two Ray Train workers can only
run one per node); the job `python -m jobs.finetune` goes in through the Ray Jobs API, exactly what a RayJob's
submitter or `ray job submit` sends, and the registered version comes back from the MLflow registry.
Both nodes see the same files (one host), which stands in for the shared volume a real cluster mounts.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from test_retraining import TWO, make_settings, train_and_register  # same directory, on sys.path under pytest

from cytoloop.data.records import load_records, select

pytestmark = pytest.mark.integration

START_TIMEOUT_S = 120
JOB_TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def process_tree(root_pids: list[int]) -> set[tuple[int, str]]:
    """(pid, start time) of the given processes and all their descendants: what teardown may kill, and only that
    (the start time guards against a pid reused by someone else's process in the meantime)."""
    parents: dict[int, int] = {}
    started: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            parents[int(entry.name)], started[int(entry.name)] = int(fields[1]), fields[19]
    found, frontier = set(), [pid for pid in root_pids if pid in parents]
    while frontier:
        pid = frontier.pop()
        found.add((pid, started[pid]))
        frontier.extend(child for child, parent in parents.items() if parent == pid)
    return found


def kill_leftovers(processes: set[tuple[int, str]]) -> None:
    for pid, start in processes:
        try:
            if (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[19] == start:
                os.kill(pid, signal.SIGKILL)
        except (OSError, IndexError):
            continue


@dataclass
class TwoNodeCluster:
    dashboard_url: str
    node_ids: set[str]


def node_ports() -> list[str]:
    """Every port a node binds, chosen free: two raylets share this host, and other people's Rays may too."""
    return [
        "--node-manager-port",
        str(free_port()),
        "--object-manager-port",
        str(free_port()),
        "--dashboard-agent-listen-port",
        str(free_port()),
        "--dashboard-agent-grpc-port",
        str(free_port()),
        "--runtime-env-agent-port",
        str(free_port()),
        "--metrics-export-port",
        str(free_port()),
    ]


@pytest.fixture(scope="module")
def cluster():
    """A head and a worker node started with `ray start --block` (their own temp dirs and ports), torn down by
    SIGTERM to exactly these two commands, then SIGKILL to whatever of their process trees is left."""
    from ray.util.state import list_nodes

    root = Path(tempfile.mkdtemp(prefix="cyl_rc_", dir="/tmp"))  # short: Ray's socket paths must stay < 107 chars
    env = {k: v for k, v in os.environ.items() if not k.startswith("CYTOLOOP_")}  # the job reads its config file
    env.update(
        {
            "RAY_AUTH_MODE": "disabled",
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_worker_niceness": "0",  # read by the raylets: +15 would starve the workers on a busy box
            "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
        }
    )  # no 30 s drain on SIGTERM: nothing is served
    ray = str(Path(sys.executable).with_name("ray"))
    gcs_port, dashboard_port = free_port(), free_port()
    common = [
        "--node-ip-address",
        "127.0.0.1",
        "--num-cpus",
        "1",
        "--object-store-memory",
        str(100 * 2**20),
        "--disable-usage-stats",
        "--block",
    ]
    head_command = [
        ray,
        "start",
        "--head",
        "--port",
        str(gcs_port),
        "--dashboard-host",
        "127.0.0.1",
        "--dashboard-port",
        str(dashboard_port),
        "--include-dashboard",
        "true",
        "--ray-client-server-port",
        str(free_port()),
        "--temp-dir",
        str(root / "head"),
        *common,
        *node_ports(),
    ]
    worker_command = [
        ray,
        "start",
        "--address",
        f"127.0.0.1:{gcs_port}",
        "--temp-dir",
        str(root / "worker"),
        *common,
        *node_ports(),
    ]
    dashboard_url = f"http://127.0.0.1:{dashboard_port}"
    started: list[subprocess.Popen] = []
    gave_up: list[int] = []  # process groups of a `ray start` that exited

    def start(command: list[str], name: str) -> None:
        log = (root / f"{name}.log").open("w")
        started.append(subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))

    class NodeExited(Exception):
        pass

    def wait_for_nodes(count: int) -> set[str]:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            for process, name in zip(started, ("head", "worker")):
                if process.poll() is not None:
                    raise NodeExited(
                        name,
                        f"ray start ({name}) exited with {process.returncode}:\n"
                        f"{(root / f'{name}.log').read_text()[-3000:]}",
                    )
            try:
                alive = {n.node_id for n in list_nodes(address=dashboard_url, filters=[("state", "=", "ALIVE")])}
            except Exception:  # the dashboard is not up yet
                alive = set()
            if len(alive) == count:
                return alive
            time.sleep(1)
        pytest.fail(f"{count} alive Ray node(s) expected within {START_TIMEOUT_S} s; logs in {root}", pytrace=False)

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAY_AUTH_MODE", "disabled")  # for this process's state and job clients
        try:
            start(head_command, "head")
            try:
                wait_for_nodes(1)
            except NodeExited as exited:
                pytest.fail(exited.args[1], pytrace=False)
            for attempt in (1, 2):
                start(worker_command, "worker")
                try:
                    nodes = wait_for_nodes(2)
                    break
                except NodeExited as exited:
                    # Ray gives a node's raylet 30 s (fixed) to register: on a busy 2-core box the worker's
                    # `ray start` gave up once; a second start is what a person would do
                    if exited.args[0] != "worker" or attempt == 2:
                        pytest.fail(exited.args[1], pytrace=False)
                    gave_up.append(started.pop().pid)  # its own session: what it left (a raylet) is killed now
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(gave_up[-1], signal.SIGKILL)
            yield TwoNodeCluster(dashboard_url, nodes)
        finally:
            ours = process_tree([p.pid for p in started])
            for process in reversed(started):  # worker first, then the head
                process.terminate()  # `ray start --block` stops its node's processes on SIGTERM
            for process in started:
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    pass
            kill_leftovers(ours)
            for group in gave_up:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(group, signal.SIGKILL)
            shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def champion(tmp_path_factory, cells_dir, tiny_overrides):
    """A tiny diffusion champion in a SQLite registry, its settings in root/config.json (two Ray Train workers)."""
    from cytoloop.models.finetune import write_manifest

    root = tmp_path_factory.mktemp("cluster")
    records = load_records(cells_dir)
    with pytest.MonkeyPatch.context() as patch:
        for name in [n for n in os.environ if n.startswith("CYTOLOOP_")]:
            patch.delenv(name)
        settings = make_settings(root, tiny_overrides, "cluster-test")
        seed = [r for label in TWO for r in select(records, ["jtsc"], [label])[:20]]
        _, version = train_and_register("diffusion", seed, settings, root / "champion")
    assert settings.finetune.num_workers == 2
    write_manifest([r for label in TWO for r in select(records, ["bccd"], [label])[:15]], root / "labels.csv")
    write_manifest(select(records, ["bccd"], ["monocyte"])[:5], root / "monocytes.csv")
    return {"root": root, "settings": settings, "version": version}


def test_an_unknown_class_is_refused_before_any_worker_starts(champion, capsys, clean_env):
    from jobs.finetune import main

    root = champion["root"]
    code = main(["--labels", str(root / "monocytes.csv"), "--config", str(root / "config.json")])
    assert code == 2
    assert "label(s) monocyte are not classes of cluster-test" in capsys.readouterr().err


def test_finetune_job_on_two_nodes_registers_a_version(cluster, champion):
    from ray.job_submission import JobStatus, JobSubmissionClient
    from ray.util.state import list_actors

    from cytoloop.registry import open_registry

    root, settings = champion["root"], champion["settings"]
    client = JobSubmissionClient(cluster.dashboard_url)
    # No working_dir: the nodes run this venv, where the project is installed (a container image, on KubeRay).
    entrypoint = shlex.join(
        [
            sys.executable,
            "-m",
            "jobs.finetune",
            "--labels",
            str(root / "labels.csv"),
            "--config",
            str(root / "config.json"),
        ]
    )
    job = client.submit_job(
        entrypoint=entrypoint,
        runtime_env={
            "env_vars": {"HF_HUB_OFFLINE": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "TOKENIZERS_PARALLELISM": "false"}
        },
    )

    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not (status := client.get_job_status(job)).is_terminal() and time.monotonic() < deadline:
        time.sleep(0.5)
    logs = client.get_job_logs(job)
    if not status.is_terminal():
        client.stop_job(job)
    assert status == JobStatus.SUCCEEDED, (
        f"job {job} is {status.value} (limit {JOB_TIMEOUT_S} s); its log ends:\n{logs[-4000:]}"
    )

    outcome = json.loads([line for line in logs.splitlines() if line.startswith('{"name": ')][-1])
    assert set(outcome) >= {"version", "passed", "reasons", "alias"} and outcome["alias"] == "champion"
    version = open_registry(settings).version(settings.registry.model_name, outcome["version"])
    assert int(version.version) > int(champion["version"])
    assert version.tags["parent_version"] == champion["version"]
    assert version.tags["ray_run"].startswith(f"global-v{champion['version']}-")
    assert (settings.home / "retrain" / "state.json").is_file()  # the retrain policy counts new labels from here

    workers = list_actors(address=cluster.dashboard_url, filters=[("class_name", "=", "RayTrainWorker")])
    assert {w.node_id for w in workers} == cluster.node_ids, "the two Ray Train workers did not use both nodes"

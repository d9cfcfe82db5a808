"""Session-wide real services for integration tests, and a real local Ray for the modules that need one.

`label_studio`: ONE real Label Studio server for the whole test session, started through `ops.stack` (the
code `cytoloop stack up` runs) on a free port, with its data, HOME and TMPDIR in a temporary folder. Its virtualenv
is shared per machine (~/.cache/cytoloop/venvs/label-studio-<version>): the first run on a fresh machine creates it
(~2 min) and a migrated template database (~45 s), once; later runs and fresh clones reuse both, and start-up is
then ~7 s (more on a busy machine).
"""

from __future__ import annotations

import shutil
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest


def kill_when_it_says(script: str, args: list[str], says: str) -> int:
    """Run `script` (python -c) with `args` until it prints the line `says` (it then waits there), SIGKILL it:
    no exception handler, no `finally`, no clean close runs. Returns the dead process's pid."""
    import os
    import signal
    import subprocess
    import sys
    import threading

    child = subprocess.Popen(
        [sys.executable, "-c", script, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    guard = threading.Timer(120, child.kill)  # a child that never reports must not hang the suite
    guard.start()
    try:
        line = child.stdout.readline()
    finally:
        guard.cancel()
    assert line.strip() == says, child.stderr.read() if child.poll() is not None else line
    os.kill(child.pid, signal.SIGKILL)
    assert child.wait(timeout=30) == -signal.SIGKILL
    return child.pid


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def local_ray(prefix: str) -> Iterator[None]:
    """A real Ray on this machine for the duration (2 CPUs, no auth, no dashboard), in its own short temp folder:
    Ray's socket paths must stay under 107 characters. Workers run at niceness 0: Ray's default +15 lets them
    barely run on a busy shared box."""
    import ray

    if ray.is_initialized():  # a module that left its Ray up would hand later modules a cluster of its making
        raise RuntimeError("a Ray from an earlier test module is still up: each module starts and stops its own")
    temp_dir = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
    with pytest.MonkeyPatch.context() as environment:  # undone with the cluster
        environment.setenv("RAY_AUTH_MODE", "disabled")
        environment.setenv("RAY_worker_niceness", "0")
        ray.init(num_cpus=2, include_dashboard=False, _temp_dir=temp_dir, log_to_driver=False)
        try:
            yield
        finally:
            ray.shutdown()
            shutil.rmtree(temp_dir, ignore_errors=True)


@dataclass
class LabelStudioServer:
    settings: object  # cytoloop.config.Settings: home, ports, images root of this session's stack
    stack: object  # ops.stack.Stack
    url: str
    token: str

    def stop(self) -> None:
        self.stack.down(only=["label-studio"])

    def start(self) -> None:
        self.stack.up(only=["label-studio"])


@pytest.fixture(scope="session")
def label_studio(cells_dir) -> LabelStudioServer:
    """A real Label Studio (admin + legacy token set non-interactively) whose local-files root is the real cells."""
    from cytoloop.config import Settings
    from ops.stack import Stack, label_studio_url, stack_secrets

    root = Path(tempfile.mkdtemp(prefix="cyl-"))  # short: the path ends up in Label Studio's and Ray's settings
    settings = Settings(
        home=root / "home",
        stack={
            "label_studio_port": free_port(),
            "images_root": cells_dir,
            "ray": False,
            "mlflow_server": False,
            "start_timeout_s": 300,
        },
        review={"webhook_port": free_port(), "labels_required": 2, "poll_every_s": 3600},
        registry={"tracking_uri": f"sqlite:///{root}/mlflow.db"},
    )
    stack = Stack(settings)
    try:
        stack.up(only=["label-studio"])
        yield LabelStudioServer(settings, stack, label_studio_url(settings), stack_secrets(settings)["admin_token"])
    finally:
        stack.down()
        shutil.rmtree(root, ignore_errors=True)

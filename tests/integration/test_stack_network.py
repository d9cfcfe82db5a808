"""Ray's head as `cytoloop stack up` starts it, facing the network: started for real, probed from outside."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from cytoloop.config import Settings
from ops.stack import Stack, stack_secrets

pytestmark = pytest.mark.integration


def _machine_address() -> str:
    """This machine's address on its network (not loopback): where remote annotators would reach it."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect(("10.255.255.255", 1))  # no packet is sent: this only picks the outgoing interface
        return probe.getsockname()[0]


def test_a_ray_head_on_the_network_refuses_jobs_without_its_token(tmp_path):
    """A Ray head bound to the machine's network address runs with token authentication: its Jobs API (arbitrary
    code) answers 401 to a request without the token, and serves one that carries it. `up` returns once the Jobs
    API answers (it used to return when the GCS port opened, seconds before the dashboard). `down` stops it on
    SIGTERM: sent to the whole group at once, Ray's processes waited on each other until the SIGKILL."""
    import threading
    import urllib.error
    import urllib.request

    address = _machine_address()
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        dashboard = free.getsockname()[1]
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        gcs = free.getsockname()[1]
    home = Path(tempfile.mkdtemp(prefix="cyr-"))  # short: Ray's socket paths
    settings = Settings(
        home=home,
        stack={
            "images_root": tmp_path / "images",
            "ray_host": address,
            "ray_port": gcs,
            "ray_dashboard_port": dashboard,
            "ray_num_cpus": 1,
            "start_timeout_s": 180,
        },
    )
    stack = Stack(settings)
    try:
        stack.up(only=["ray"])
        url = f"http://{address}:{dashboard}/api/jobs/"
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(url, timeout=30)
        assert refused.value.code in (401, 403)
        token = stack_secrets(settings)["ray_token"]
        request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(request, timeout=30) as answered:
            assert answered.status == 200
        # a driver joins with the environment the stack gives it (the demo's did not: refused, a traceback)
        driver = "import sys, ray; ray.init(address=sys.argv[1]); print(ray.get(ray.remote(lambda: 7).remote()))"
        joined = subprocess.run(
            [sys.executable, "-c", driver, f"{address}:{gcs}"],
            env={**os.environ, **stack.ray_client_environment()},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert joined.returncode == 0 and joined.stdout.strip() == "7", joined.stderr[-2000:]
        stopped: list[list[str]] = []
        stopping = threading.Thread(target=lambda: stopped.append(stack.down(timeout_s=90)))
        stopping.start()
        stopping.join(timeout=45)
        assert stopped == [["ray"]], "the Ray head did not stop on SIGTERM"
    finally:
        stack.down()
        shutil.rmtree(home, ignore_errors=True)


def test_the_mlflow_server_on_the_network_asks_who_is_there(tmp_path):
    """`stack.mlflow_server` on an address other machines reach used to serve the registry (every model, every
    alias move) to anyone. It now runs MLflow's basic-auth app: 401 without credentials, the admin gets in."""
    import base64
    import urllib.error
    import urllib.request

    address = _machine_address()
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    (tmp_path / "images").mkdir()
    settings = Settings(
        home=tmp_path / "home",
        stack={
            "images_root": tmp_path / "images",
            "host": address,
            "ray": False,
            "mlflow_server": True,
            "mlflow_port": port,
            "start_timeout_s": 180,
        },
    )
    stack = Stack(settings)
    try:
        stack.up(only=["mlflow"])
        url = f"http://{address}:{port}/api/2.0/mlflow/registered-models/search"
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(url, timeout=30)
        assert refused.value.code == 401
        login = base64.b64encode(f"admin:{stack_secrets(settings)['mlflow_admin_password']}".encode()).decode()
        request = urllib.request.Request(url, headers={"Authorization": f"Basic {login}"})
        with urllib.request.urlopen(request, timeout=30) as answered:
            assert answered.status == 200
    finally:
        stack.down()

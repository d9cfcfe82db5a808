"""`cytoloop stack down` with the classifier running on the stack's Ray: started for real, stopped for real."""

from __future__ import annotations

import logging
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path

import pytest

from cytoloop.config import Settings
from ops.stack import Stack

pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        return free.getsockname()[1]


def test_down_lets_serve_stop_its_replicas_so_they_write_their_waiting_events(cells_dir, tmp_path, caplog):
    """`down` stopped Ray under Serve: Ray's own stop waited for Serve's actors until `down` killed them all 30 s
    later, with whatever prediction-log events the replicas still held. It now shuts Serve down first (the
    dashboard's Serve API): each replica ends in Serve's graceful stop, writing its waiting events, and Ray then
    stops on SIGTERM in seconds. The log is a FIFO nobody reads (opening it to write blocks, as on a stalled mount)
    until 3 s into the `down`. The `down` runs with the ports moved in the settings since `up` (as `up` tells a
    user to do before moving a service): it must ask the dashboard the head was started with."""
    import httpx
    import ray
    import torch
    from ray import serve

    from cytoloop.config import BaselineModelConfig, DataConfig
    from cytoloop.data.records import load_records, select
    from cytoloop.models.baseline import BaselineClassifier
    from cytoloop.policy.drift import PredictionEvent
    from services.app import build_app
    from tests.faults import HungDisk

    torch.manual_seed(0)
    classes = ["eosinophil", "lymphocyte", "monocyte", "neutrophil"]
    model = BaselineClassifier(classes, DataConfig(image_size=16), BaselineModelConfig(channels=(4, 8)))
    model_dir = model.save(tmp_path / "model")
    cells = [Path(r.path) for r in select(load_records(cells_dir), ["jtsc"])[:4]]
    disk = HungDisk(tmp_path / "predictions.jsonl")
    home = Path(tempfile.mkdtemp(prefix="cyd-"))  # short: Ray's socket paths
    (tmp_path / "images").mkdir()
    port = _free_port()
    settings = Settings(
        home=home,
        stack={
            "images_root": tmp_path / "images",
            "ray_port": _free_port(),
            "ray_dashboard_port": _free_port(),
            "ray_num_cpus": 2,
            "start_timeout_s": 180,
        },
        serve={"model_dir": model_dir, "port": port, "prediction_log": disk.path, "num_cpus": 0.5},
    )
    stack = Stack(settings)
    returned, started = threading.Timer(3.0, disk.come_back), False
    try:
        stack.up(only=["ray"])
        ray.init(address=f"127.0.0.1:{settings.stack.ray_port}", log_to_driver=False)
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(settings), name=settings.serve.app_name, route_prefix="/", blocking=False)
        deadline = time.monotonic() + 120
        while httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=60).status_code != 200:
            assert time.monotonic() < deadline, "the app never became ready"
            time.sleep(0.5)
        answered = []
        for batch in (cells[:2], cells[2:]):  # the first's events in the hung append, the next's waiting behind it
            files = [("files", (p.name, p.read_bytes())) for p in batch]
            response = httpx.post(f"http://127.0.0.1:{port}/v1/classify", files=files, timeout=120)
            assert response.status_code == 200, response.text
            answered += [cell["label"] for cell in response.json()["cells"]]
            time.sleep(0.5)
        assert len(answered) == 4 and not disk.written
        ray.shutdown()  # the driver leaves; the app runs on in the stack's Ray

        caplog.set_level(logging.WARNING, logger="ops.stack")
        began = time.monotonic()
        returned.start()
        started = True
        moved = {"ray_port": _free_port(), "ray_dashboard_port": _free_port()}
        assert Stack(settings.model_copy(update={"stack": settings.stack.model_copy(update=moved)})).down() == ["ray"]
        took = time.monotonic() - began
    finally:
        ray.shutdown()
        stack.down()
        if started:
            returned.join()
        deadline = time.monotonic() + 5
        while disk.written.count(b"\n") < 4 and time.monotonic() < deadline:  # the reader's last read
            time.sleep(0.1)
        disk.close()
        shutil.rmtree(home, ignore_errors=True)
    events = [PredictionEvent.model_validate_json(line) for line in disk.written.decode().splitlines()]
    assert sorted(e.predicted for e in events) == sorted(answered)
    assert "did not stop on SIGTERM" not in caplog.text and took < 30, f"down took {took:.0f} s"

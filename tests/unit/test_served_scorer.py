"""The served scoring job's client (`jobs.score.ServedScorer`) against a real HTTP server on 127.0.0.1 that says
what the service says when a replica stops or it is overloaded: 503 with Retry-After, "send them again"."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from jobs import score
from jobs.score import ServedScorer

ANSWER = {
    "status": "ok",
    "probabilities": {"a": 0.9, "b": 0.1},
    "anomaly": 0.0,
    "model": {"version": "3"},
}


@pytest.fixture
def service(monkeypatch):
    """A classify endpoint answering 503 (Retry-After: 0) to its first `busy[0]` requests, then every cell."""
    busy, asked = [2], []
    monkeypatch.setattr(score, "BACKOFF_CAP_S", 0.05)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            asked.append(len(body["cells"]))
            if len(asked) <= busy[0]:
                status, answer = 503, {"detail": "the classifier stopped or is overloaded; send them again"}
            else:
                status, answer = 200, {"cells": [ANSWER for _ in body["cells"]]}
            data = json.dumps(answer).encode()
            self.send_response(status)
            if status == 503:
                self.send_header("Retry-After", "0")
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", busy, asked
    server.shutdown()
    server.server_close()


def _batch(tmp_path, n=3) -> dict[str, np.ndarray]:
    paths = []
    for i in range(n):
        (tmp_path / f"{i}.png").write_bytes(b"not decoded by this server")
        paths.append(str(tmp_path / f"{i}.png"))
    return {"path": np.array(paths, dtype=object), "site": np.array([""] * n, dtype=object)}


def test_a_passing_503_is_asked_again_and_every_cell_answered(service, tmp_path):
    """A replica stopping (a redeploy, a scale-down) answers 503 "send them again": that ended the whole job, and
    every batch it had answered was lost."""
    url, _, asked = service
    out = ServedScorer(url)(_batch(tmp_path))
    assert list(out["ok"]) == [True, True, True] and asked == [3, 3, 3]


def test_a_service_that_stays_overloaded_ends_the_job_naming_why(service, tmp_path):
    url, busy, asked = service
    busy[0] = 100
    with pytest.raises(RuntimeError, match="HTTP 503: .*send them again"):
        ServedScorer(url)(_batch(tmp_path))
    assert len(asked) == score.RETRIES + 1


def test_a_refused_connection_is_asked_again_and_a_read_timeout_is_not(tmp_path, monkeypatch):
    """A service restarting refuses connections for a moment: asked again. A replica that hangs (a read timeout) is
    not: each try would hold the batch for the whole timeout and send it again to an overloaded service."""
    import socket

    import httpx

    monkeypatch.setattr(score, "BACKOFF_CAP_S", 0.05)
    with socket.socket() as closed:  # nothing listens on this port
        closed.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{closed.getsockname()[1]}"
    tries = []
    real = httpx.Client.post

    def counted(self, *args, **kwargs):
        tries.append(1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(httpx.Client, "post", counted)
    with pytest.raises(httpx.ConnectError):
        ServedScorer(url)(_batch(tmp_path))
    assert len(tries) == score.RETRIES + 1

    with socket.socket() as silent:  # accepts, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        tries.clear()
        with pytest.raises(httpx.ReadTimeout):
            ServedScorer(f"http://127.0.0.1:{silent.getsockname()[1]}", timeout_s=0.3)(_batch(tmp_path))
    assert len(tries) == 1

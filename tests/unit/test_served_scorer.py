"""The scoring jobs' workers. The served client (`jobs.score.ServedScorer`) against a real HTTP server on
127.0.0.1 that says what the service says when a replica stops or it is overloaded (503 with Retry-After, "send them
again"), resets a connection or answers something else; the offline worker (`ModelScorer`) on a real model
directory."""

from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from pydantic import ValidationError

from jobs import score
from jobs.score import ServedScorer
from services.schemas import ClassifyRequest
from tests.faults import ScriptedServer

MODEL = {"name": "cells", "version": "3", "alias": "champion"}


def _answer(index: int, name: str) -> dict:
    """One cell's answer as the service writes it (`services.schemas.CellAnswer`)."""
    return {
        "status": "ok",
        "index": index,
        "name": name,
        "cell_id": f"sha256:{index:024d}",
        "label": "a",
        "probabilities": {"a": 0.9, "b": 0.1},
        "confidence": 0.9,
        "uncertainty": 0.33,
        "anomaly": 0.0,
        "route": "accept",
        "model": MODEL,
    }


def _response(cells: list[dict]) -> dict:
    """A whole classify answer (`services.schemas.ClassifyResponse`) to a request's cells."""
    answers = [_answer(i, cell["name"]) for i, cell in enumerate(cells)]
    batch = {"replica": "r1", "batch": 1, "requests": 1, "cells": len(cells)}
    return {"site": None, "sample_id": None, "n_cells": len(cells), "n_errors": 0, "cells": answers, "batch": batch}


@pytest.fixture
def service(monkeypatch):
    """A classify endpoint answering 503 (Retry-After: 0) to its first `busy[0]` requests, then every cell."""
    busy, asked = [2], []
    monkeypatch.setattr(score, "BACKOFF_CAP_S", 0.05)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            asked.append(len(body["cells"]))
            try:  # as the service reads a request
                ClassifyRequest.model_validate(body)
            except ValidationError as error:
                status, answer = 422, {"detail": str(error)}
            else:
                if len(asked) <= busy[0]:
                    status, answer = 503, {"detail": "the classifier stopped or is overloaded; send them again"}
                else:
                    status, answer = 200, _response(body["cells"])
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


def test_a_cell_under_a_long_path_is_scored_in_its_batch(service, tmp_path):
    """The cell's whole path was sent as its name, which the service caps at 256 characters: a pool under a deep
    folder had every request refused (422), then each cell asked alone, and the long-path cells failed."""
    url, busy, asked = service
    busy[0] = 0
    deep = tmp_path / ("d" * 120) / ("e" * 120)
    deep.mkdir(parents=True)
    (deep / "cell.png").write_bytes(b"not decoded by this server")
    batch = _batch(tmp_path, n=2)
    batch["path"] = np.array([*batch["path"], str(deep / "cell.png")], dtype=object)
    batch["site"] = np.array([""] * 3, dtype=object)
    out = ServedScorer(url)(batch)
    assert list(out["ok"]) == [True, True, True] and asked == [3]  # one request, every cell answered
    assert list(out["path"]) == list(batch["path"])


@pytest.fixture
def scripted(monkeypatch):
    """A server answering by a script the test fills (`tests.faults.ScriptedServer`)."""
    monkeypatch.setattr(score, "BACKOFF_CAP_S", 0.05)
    server = ScriptedServer()
    yield server.url, server.script
    server.close()


def _ok(n: int) -> tuple[int, str, bytes]:
    return 200, "application/json", json.dumps(_response([{"name": f"{i}.png"} for i in range(n)])).encode()


def test_a_connection_reset_while_awaiting_the_answer_is_asked_again(scripted, tmp_path):
    """A connection reset after the request was sent (httpx.ReadError) was not asked again, unlike a refused one:
    it ended the whole Ray Data job and every batch it had answered was lost."""
    url, script = scripted
    script += [("reset",), _ok(3)]
    out = ServedScorer(url)(_batch(tmp_path))
    assert list(out["ok"]) == [True, True, True] and not script


def test_an_answer_that_is_not_the_service_s_ends_the_job_naming_it(scripted, tmp_path):
    """A wrong `serve_url` answering 200 with a page ended the job with a JSONDecodeError naming nothing; an answer
    of fewer cells than sent would have paired answers with the wrong cells."""
    url, script = scripted
    script.append((200, "text/html", b"<html>a login page</html>"))
    with pytest.raises(RuntimeError, match=rf"{url}/v1/classify answered 200 with no classify answer.*address"):
        ServedScorer(url)(_batch(tmp_path))
    script.append(_ok(2))
    with pytest.raises(RuntimeError, match="answered 2 cells to a request of 3"):
        ServedScorer(url)(_batch(tmp_path))


def test_a_worker_scores_only_the_model_version_its_run_began_with(tmp_path, tiny_settings):
    """Offline scoring names its answers by the model directory's hash taken as the run began; a worker loading the
    directory later (a `cytoloop tune` saving over it, a worker Ray restarted) scored with other contents under
    that name."""
    from cytoloop.config import RoutingConfig
    from cytoloop.errors import CytoLoopError
    from cytoloop.models.baseline import BaselineClassifier
    from cytoloop.serving.model_source import local_ref
    from jobs.score import ModelScorer, check_unchanged

    directory = tmp_path / "model"
    BaselineClassifier(["a", "b"], tiny_settings.data, tiny_settings.baseline).save(directory)
    routing = RoutingConfig().model_dump(mode="json")
    began = local_ref(directory).version
    assert ModelScorer(str(directory), routing, None, version=began).service.ref.version == began  # threads as set
    check_unchanged(directory, began)  # the driver's check, when the run ends with a Ray error: nothing to say
    BaselineClassifier(["a", "b", "c"], tiny_settings.data, tiny_settings.baseline).save(directory)  # saved over
    with pytest.raises(CytoLoopError, match=f"changed since this scoring run began \\(as {began}, now local-"):
        ModelScorer(str(directory), routing, None, version=began)
    # the worker's refusal reaches the driver as Ray's actor error, which names no model: the driver says it
    with pytest.raises(CytoLoopError, match=f"model changed during this scoring run \\(as {began}, now local-"):
        check_unchanged(directory, began)

"""The classifier over HTTP, against a real Ray Serve on 127.0.0.1 and a real MLflow registry (a SQLite file).

Once per session: tiny models are trained on a few real cells (two baselines with different classes, one diffusion
model), registered, and given aliases: `champion` (baseline, 4 classes), `champion-siteb` (baseline, 2 classes),
`champion-sited` (diffusion), `champion-moving` (moved by a test); site `sitec` reports two classes only. Then Ray (own
temp dir, 2 CPUs, no auth, no dashboard) and Serve (a free port) start, with an API key and small limits. Cells are sent
as the files they are in ../shared/data/cells; nothing is copied.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.integration

API_KEY = "test-key-7d1c"
MODEL = "cells-serving-test"
FOUR = ["eosinophil", "lymphocyte", "monocyte", "neutrophil"]
TWO = ["lymphocyte", "neutrophil"]
LIMITS = {"max_cells_per_request": 24, "max_image_bytes": 400_000, "max_image_pixels": 400 * 400}


@dataclass
class Stack:
    url: str
    registry: object
    versions: dict[str, str]  # role -> registry version
    cells: list[Path]  # real cells for requests (not used in training)
    settings: object

    def post(self, path: str, headers: dict | None = None, **kwargs) -> httpx.Response:
        return httpx.post(self.url + path, headers={"X-API-Key": API_KEY, **(headers or {})}, timeout=120, **kwargs)

    def classify_files(self, paths: list[Path], site: str | None = None, **kwargs) -> httpx.Response:
        files = [("files", (p.name, p.read_bytes())) for p in paths]
        data = {"site": site} if site else {}
        return self.post("/v1/classify", files=files, data=data, **kwargs)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _train(kind, records, classes, overrides, out):
    from cytoloop.config import load_settings
    from cytoloop.workflows import train_model

    train_model(kind, records, load_settings(overrides=overrides), out, classes=classes)
    return out


@pytest.fixture(scope="module")  # its Ray and environment end with this module: later modules start their own
def serving(cells_dir, tiny_overrides, tmp_path_factory):
    import ray
    from ray import serve

    from cytoloop.config import load_settings
    from cytoloop.data.records import load_records, select
    from cytoloop.registry import Registry
    from services.app import build_app

    root = tmp_path_factory.mktemp("serving")
    records = load_records(cells_dir)
    train = [r for c in FOUR for r in select(records, ["jtsc"], [c])[:12]]
    two = [r for r in train if r.label in TWO]
    models = {
        "four": _train("baseline", train, FOUR, tiny_overrides, root / "four"),
        "two": _train("baseline", two, TWO, tiny_overrides, root / "two"),
        "diffusion": _train("diffusion", two, TWO, tiny_overrides, root / "diffusion"),
    }
    # a model that loads but fails on every cell, on any hardware: its cells are resized to 17 px, which the UNet's
    # down- and up-sampling cannot bring back to one size
    models["poisoned"] = root / "poisoned"
    environment = pytest.MonkeyPatch()  # undone when the module's tests are done
    shutil.copytree(models["diffusion"], models["poisoned"])
    meta = json.loads((models["poisoned"] / "model.json").read_text())
    meta["data"]["image_size"] = 17
    (models["poisoned"] / "model.json").write_text(json.dumps(meta))
    environment.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    registry = Registry(f"sqlite:///{root}/mlflow.db", experiment="serving-test")
    registry.client.create_experiment("serving-test", artifact_location=str(root / "artifacts"))
    versions = {
        "four": registry.log_model(models["four"], MODEL).version,
        "two": registry.log_model(models["two"], MODEL).version,
        "diffusion": registry.log_model(models["diffusion"], MODEL).version,
        "moved": registry.log_model(models["two"], MODEL).version,
        "poisoned": registry.log_model(models["poisoned"], MODEL).version,
    }
    registry.set_alias(MODEL, "champion", versions["four"])
    registry.set_alias(MODEL, "champion-siteb", versions["two"])
    registry.set_alias(MODEL, "champion-sited", versions["diffusion"])
    registry.set_alias(MODEL, "champion-moving", versions["four"])
    registry.set_alias(MODEL, "champion-poisoned", versions["poisoned"])

    settings = load_settings(
        overrides={
            "registry": {"tracking_uri": registry.tracking_uri, "cache_dir": str(root / "cache"), "model_name": MODEL},
            "serve": {
                **LIMITS,
                "api_key": API_KEY,
                "alias_poll_s": 0.5,
                "max_batch_size": 8,
                "batch_wait_s": 0.1,
                "max_ongoing_requests": 32,
                "num_cpus": 0.5,
                "prediction_log": str(root / "predictions.jsonl"),
            },
            "routing": {"review_below": 0.6, "anomaly_above": None, "audit_fraction": 0.0},
            "differential": {"min_cells": 4},
            # sitec reports two of the global champion's classes; sitex one no model has
            "sites": {"sitec": {"classes": TWO}, "sitex": {"classes": ["platelet"]}},
        }
    )
    temp_dir = tempfile.mkdtemp(prefix="ray_srv_", dir="/tmp")  # short: Ray's socket paths must stay < 107 chars
    environment.setenv("RAY_AUTH_MODE", "disabled")
    environment.setenv("RAY_worker_niceness", "0")  # Ray starts workers at +15: on a busy machine no proxy starts
    environment.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # replicas meeting a down registry need not wait
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=temp_dir, log_to_driver=False)
    port = _free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(settings), name="cytoloop", route_prefix="/", blocking=False)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while httpx.get(url + "/readyz", timeout=30).status_code != 200:
            assert time.monotonic() < deadline, httpx.get(url + "/readyz", timeout=30).text
            time.sleep(0.5)
        request_cells = [r.path for r in select(records, ["bccd", "cellavision"], FOUR)[::40]]
        yield Stack(url, registry, versions, request_cells, settings)
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
        environment.undo()


def _ok_cells(response: httpx.Response) -> list[dict]:
    assert response.status_code == 200, response.text
    return [c for c in response.json()["cells"] if c["status"] == "ok"]


def test_a_site_reporting_fewer_classes_gets_its_cells_decided_among_them(serving):
    paths = serving.cells[:6]
    everything = _ok_cells(serving.classify_files(paths))
    assert len(everything) == len(paths)
    mine = _ok_cells(serving.classify_files(paths, site="sitec"))  # no champion-sitec: the global champion serves
    assert [c["model"]["version"] for c in mine] == [serving.versions["four"]] * len(paths)
    for whole, cell in zip(everything, mine):
        assert cell["label"] in TWO and all(cell["probabilities"][c] == 0 for c in FOUR if c not in TWO)
        assert abs(sum(cell["probabilities"].values()) - 1) < 1e-5
        kept = sum(whole["probabilities"][c] for c in TWO)
        assert cell["probabilities"]["neutrophil"] == pytest.approx(whole["probabilities"]["neutrophil"] / kept)
    assert all(min(whole["probabilities"].values()) > 0 for whole in everything)  # the global model: every class
    refused = serving.classify_files(paths[:1], site="sitex")
    assert refused.status_code == 503 and "platelet" in refused.json()["detail"]


def test_real_cells_classified_over_http(serving):
    paths = serving.cells[:6]
    cells = _ok_cells(serving.classify_files(paths))
    assert [c["name"] for c in cells] == [p.name for p in paths]
    for cell in cells:
        assert set(cell["probabilities"]) == set(FOUR)
        assert abs(sum(cell["probabilities"].values()) - 1) < 1e-5
        assert cell["label"] == max(cell["probabilities"], key=cell["probabilities"].get)
        assert cell["confidence"] == pytest.approx(max(cell["probabilities"].values()))
        assert 0 <= cell["uncertainty"] <= 1.3863  # entropy of 4 classes is at most ln 4
        assert cell["route"] == ("accept" if cell["confidence"] >= 0.6 else "review")
        assert cell["model"] == {
            "name": MODEL,
            "version": serving.versions["four"],
            "alias": "champion",
            "kind": "baseline",
            "last_known_good": None,
        }
    # the same cells as base64 JSON get the same answers
    body = {"cells": [{"name": p.name, "image_b64": base64.b64encode(p.read_bytes()).decode()} for p in paths]}
    again = _ok_cells(serving.post("/v1/classify", json=body))
    assert [c["probabilities"] for c in again] == [c["probabilities"] for c in cells]


def test_served_cells_feed_the_drift_log(serving):
    from cytoloop.policy.drift import read_events

    log = serving.settings.serve.prediction_log
    before = len(read_events(log)) if log.exists() else 0  # other tests' events, siteb's among them, come first
    cells = _ok_cells(serving.classify_files(serving.cells[:3], site="siteb"))
    ids = {c["cell_id"] for c in cells}
    deadline = time.monotonic() + 30  # the replica writes the log after it has answered
    while True:
        logged = read_events(log)[before:] if log.exists() else []  # written after the answers, the first time too
        events = [e for e in logged if e.site == "siteb" and e.cell_id in ids]
        if len(events) >= len(cells) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert len(events) == len(cells)
    assert {e.model_version for e in events} == {serving.versions["two"]}
    assert sorted(e.predicted for e in events) == sorted(c["label"] for c in cells)
    assert all(e.colour is not None and len(e.colour) == 6 for e in events)


def test_diffusion_model_served_for_its_site(serving):
    cells = _ok_cells(serving.classify_files(serving.cells[:2], site="sited"))
    assert {c["model"]["kind"] for c in cells} == {"diffusion"}
    assert {c["model"]["version"] for c in cells} == {serving.versions["diffusion"]}
    assert set(cells[0]["probabilities"]) == set(TWO)


def test_site_without_its_own_alias_gets_the_global_champion(serving):
    (cell,) = _ok_cells(serving.classify_files(serving.cells[:1], site="st-elsewhere"))
    assert cell["model"]["version"] == serving.versions["four"] and cell["model"]["alias"] == "champion"
    (siteb,) = _ok_cells(serving.classify_files(serving.cells[:1], site="siteb"))
    assert siteb["model"]["version"] == serving.versions["two"] and siteb["model"]["alias"] == "champion-siteb"


def test_bad_cell_gets_its_own_error_and_others_are_answered(serving):
    good = serving.cells[0]
    files = [
        ("files", ("good.bmp", good.read_bytes())),
        ("files", ("notes.txt", b"not an image at all")),
        ("files", ("cut.bmp", good.read_bytes()[: len(good.read_bytes()) // 2])),
    ]
    response = serving.post("/v1/classify", files=files)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["n_cells"] == 3 and body["n_errors"] == 2
    good_entry, text, cut = body["cells"]
    assert good_entry["status"] == "ok" and good_entry["index"] == 0
    assert (text["index"], text["reason"]) == (1, "not_an_image") and "notes.txt" in text["message"]
    assert (cut["index"], cut["reason"]) == (2, "truncated") and "cut.bmp" in cut["message"]


def _png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 120, 160)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize(
    "name, data, status, words",
    [
        ("notes.txt", b"hello, not an image", 422, ["notes.txt", "not an image", "BMP"]),
        ("half.bmp", None, 422, ["half.bmp", "truncated"]),
        ("huge.bmp", b"BM" + bytes(500_000), 413, ["huge.bmp", "500002 bytes", "400000"]),
        ("wide.png", _png(800, 400), 413, ["wide.png", "800x400", "160000"]),
        ("empty.png", b"", 422, ["empty.png", "empty"]),
    ],
)
def test_bad_inputs_are_4xx_saying_which_and_why(serving, name, data, status, words):
    if data is None:
        whole = serving.cells[0].read_bytes()
        data = whole[: len(whole) // 3]
    response = serving.post("/v1/classify", files=[("files", (name, data))])
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    for word in words:
        assert word in detail, detail


def test_request_level_limits(serving):
    empty = serving.post("/v1/classify", json={"cells": []})
    assert empty.status_code == 400 and "empty request" in empty.json()["detail"]
    none = serving.post("/v1/classify", files={"site": (None, "x")})
    assert none.status_code == 400 and "no cell images" in none.json()["detail"]
    one = serving.cells[0].read_bytes()
    too_many = serving.post("/v1/classify", files=[("files", (f"{i}.bmp", one)) for i in range(25)])
    assert too_many.status_code == 413 and "too many cells" in too_many.json()["detail"]
    assert "24" in too_many.json()["detail"]
    as_json = serving.post("/v1/classify", json={"cells": [{"image_b64": base64.b64encode(one).decode()}] * 25})
    assert as_json.status_code == 413 and "25 in one request" in as_json.json()["detail"]
    wrong_type = serving.post("/v1/classify", content=one, headers={"content-type": "image/bmp"})
    assert wrong_type.status_code == 415 and "multipart/form-data" in wrong_type.json()["detail"]
    bad_site = serving.post("/v1/classify", json={"cells": [{"image_b64": "AAAA"}], "site": "../etc"})
    assert bad_site.status_code == 422 and "site" in bad_site.json()["detail"]
    bad_b64 = serving.post("/v1/classify", json={"cells": [{"name": "x", "image_b64": "not base64!"}]})
    assert bad_b64.status_code == 422 and "base64" in bad_b64.json()["detail"]
    dotted = serving.post("/v1/classify", json={"cells": [{"image_b64": "AAAA"}], "site": "st.marys"})
    assert dotted.status_code == 422 and "site" in dotted.json()["detail"]  # was a 503: no alias can hold a '.'
    cased = serving.post(
        "/v1/classify",
        json={"cells": [{"image_b64": base64.b64encode(one).decode()}]},
        headers={"content-type": "Application/JSON; charset=utf-8"},
    )
    assert cased.status_code == 200, cased.text  # media types are case-insensitive
    lookalike = serving.post("/v1/classify", content=b"{}", headers={"content-type": "application/jsonx"})
    assert lookalike.status_code == 415


def test_a_file_name_the_answer_cannot_hold_fails_its_cell_only(serving):
    """A multipart body's charset decodes its part headers: with unicode_escape a file name became a lone
    surrogate, which no JSON answer can hold: the request failed with a 500 after its cells were classified."""
    one = serving.cells[0].read_bytes()
    boundary = "cytoloop-test-boundary"
    parts = [
        (b'form-data; name="files"; filename="good.bmp"', one),
        (b'form-data; name="files"; filename="\\ud800.bmp"', one),
    ]
    body = (
        b"".join(
            f"--{boundary}\r\n".encode() + b"Content-Disposition: " + disposition + b"\r\n"
            b"Content-Type: image/bmp\r\n\r\n" + data + b"\r\n"
            for disposition, data in parts
        )
        + f"--{boundary}--\r\n".encode()
    )
    content_type = f"multipart/form-data; boundary={boundary}; charset=unicode_escape"
    response = serving.post("/v1/classify", content=body, headers={"content-type": content_type})
    assert response.status_code == 200, response.text
    good, bad = response.json()["cells"]
    assert good["status"] == "ok" and (bad["status"], bad["reason"], bad["name"]) == ("error", "bad_name", "cell-1")
    assert "not valid UTF-8" in bad["message"]


def test_api_key_required_and_checked(serving):
    files = [("files", (serving.cells[0].name, serving.cells[0].read_bytes()))]
    missing = httpx.post(serving.url + "/v1/classify", files=files, timeout=60)
    assert missing.status_code == 401 and "X-API-Key" in missing.json()["detail"]
    wrong = httpx.post(serving.url + "/v1/classify", files=files, headers={"X-API-Key": "nope"}, timeout=60)
    assert wrong.status_code == 401 and wrong.json()["detail"] == "invalid API key"
    assert httpx.get(serving.url + "/v1/models", timeout=60).status_code == 401
    assert httpx.get(serving.url + "/healthz", timeout=60).status_code == 200  # probes need no key


def test_models_health_and_docs(serving):
    assert httpx.get(serving.url + "/readyz", timeout=60).json()["status"] == "ready"  # a replica holds the global
    models = httpx.get(serving.url + "/v1/models", headers={"X-API-Key": API_KEY}, timeout=60)
    assert models.status_code == 200, models.text
    kinds = {entry["site"]: entry["model"]["kind"] for entry in models.json()["served"]}
    assert kinds[None] in ("diffusion", "baseline")  # was null always: the replica's view never carried it
    served = {entry["site"]: entry["model"]["version"] for entry in models.json()["served"]}
    assert served[None] == serving.versions["four"] and served["siteb"] == serving.versions["two"]
    assert served["sited"] == serving.versions["diffusion"]
    classes = {entry["site"]: entry["classes"] for entry in models.json()["served"]}
    assert served["sitec"] == serving.versions["four"] and classes["sitec"] == TWO  # no alias, its own classes
    assert classes[None] is None and classes["siteb"] is None
    ready = httpx.get(serving.url + "/readyz", timeout=60).json()
    assert ready["status"] == "ready" and ready["model_version"] == serving.versions["four"]  # a field, not prose
    schema = httpx.get(serving.url + "/openapi.json", timeout=60).json()
    assert {"/v1/classify", "/v1/samples/{sample_id}/differential", "/v1/models", "/healthz", "/readyz"} <= set(
        schema["paths"]
    )
    assert "#/$defs/" not in json.dumps(schema)  # the hand-written request bodies are self-contained
    assert httpx.get(serving.url + "/docs", timeout=60).status_code == 200


def test_differential_counts_and_triage(serving):
    paths = serving.cells[:6]
    files = [("files", (p.name, p.read_bytes())) for p in paths] + [("files", ("bad.txt", b"nope"))]
    response = serving.post("/v1/samples/smear-17/differential", files=files)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["sample_id"] == "smear-17"
    assert (body["n_cells"], body["n_classified"], body["n_failed"]) == (7, 6, 1)
    assert set(body["counts"]) == set(FOUR) and sum(body["counts"].values()) == 6
    assert sum(body["percentages"].values()) == pytest.approx(100.0)
    review = sum(c["route"] == "review" for c in body["cells"] if c["status"] == "ok")
    assert body["n_review"] == review
    assert body["triage"] == ("hematologist" if body["flags"] else "routine")
    assert len(body["flags"]) == len(body["reasons"])
    bad = serving.post("/v1/samples/..%2F/differential", files=files[:1])
    assert bad.status_code in (404, 422)
    twice = files[:3] + [files[1]]  # a client's retry resending a crop: counted twice, it skews the differential
    repeated = serving.post("/v1/samples/smear-17/differential", files=twice)
    assert repeated.status_code == 422 and "cell 3 = cell 1" in repeated.json()["detail"], repeated.text
    keyless = httpx.post(serving.url + "/v1/samples/bad%20id/differential", files=files[:1], timeout=60)
    assert keyless.status_code == 401  # the key is checked before anything of the request
    other = serving.post("/v1/samples/smear-17/differential", files=files[:1], data={"sample_id": "smear-18"})
    assert other.status_code == 422 and "contradicts" in other.text  # never answered under the wrong smear


def test_two_sites_under_concurrent_batched_requests_get_their_own_models(serving):
    """Requests for two sites interleave on one replica and are batched (ray#56633 served one site's model to the
    other's requests before the fix): every answer must come from its own site's model."""
    expected = {None: (serving.versions["four"], set(FOUR)), "siteb": (serving.versions["two"], set(TWO))}
    jobs = [(None if i % 2 else "siteb", serving.cells[i % len(serving.cells)]) for i in range(40)]
    with ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(lambda job: (job[0], serving.classify_files([job[1]], site=job[0])), jobs))
    batches = {}
    for site, response in responses:
        body = response.json()
        assert response.status_code == 200, response.text
        cell = body["cells"][0]
        version, classes = expected[site]
        assert cell["model"]["version"] == version and set(cell["probabilities"]) == classes
        key = (body["batch"]["replica"], body["batch"]["batch"])
        batches.setdefault(key, set()).add(site)
    assert all(len(sites) == 1 for sites in batches.values()), "a batch mixed two sites"
    sizes = [r.json()["batch"]["requests"] for _, r in responses]
    assert max(sizes) > 1, "no request was ever batched with another: the test did not exercise batching"


def test_alias_moved_during_a_stream_of_requests(serving):
    """Move `champion-moving` while requests keep coming: no request fails, and the answered version switches."""
    answered: list[str] = []
    failures: list[str] = []
    stop = threading.Event()
    cell = serving.cells[1]

    def stream():
        while not stop.is_set():
            try:
                response = serving.classify_files([cell], site="moving")
            except Exception as error:  # a connection broken over the switch is a failure too, not a dead thread
                failures.append(repr(error))
                return
            if response.status_code != 200:
                failures.append(f"{response.status_code}: {response.text}")
            else:
                answered.append(response.json()["cells"][0]["model"]["version"])

    clients = [threading.Thread(target=stream) for _ in range(3)]
    for client in clients:
        client.start()
    try:
        deadline = time.monotonic() + 30
        while len(answered) < 10 and time.monotonic() < deadline:
            time.sleep(0.1)
        serving.registry.set_alias(MODEL, "champion-moving", serving.versions["moved"])
        moved_at = len(answered)
        while serving.versions["moved"] not in answered[moved_at:] and time.monotonic() < deadline + 30:
            time.sleep(0.1)
        time.sleep(0.5)  # a few more requests on the new version
    finally:
        stop.set()
        for client in clients:
            client.join(timeout=120)
    assert not failures, failures[:3]
    assert not any(client.is_alive() for client in clients), "a client hung over the switch"
    assert answered[0] == serving.versions["four"]
    assert answered[-1] == serving.versions["moved"], answered[-10:]
    # answers are appended as the clients receive them, so the last old-version batch may land just after the
    # first new one; past that, only the new version may answer
    switch = answered.index(serving.versions["moved"]) + len(clients)
    assert set(answered[switch:]) == {serving.versions["moved"]}, "a request went back to the old version"


def test_without_a_model_requests_are_503_saying_why(serving):
    """A registry model with no champion alias: the service runs, is not ready, and says so."""
    from ray import serve

    from services.app import build_app

    settings = serving.settings.model_copy(
        update={"serve": serving.settings.serve.model_copy(update={"model_name": "no-such-model"})}
    )
    serve.run(build_app(settings), name="broken", route_prefix="/broken", blocking=False)
    try:
        ready = httpx.get(serving.url + "/broken/readyz", timeout=60)
        assert ready.status_code == 503 and "no-such-model" not in ready.json()["detail"]  # no internals to anyone
        files = [("files", (serving.cells[0].name, serving.cells[0].read_bytes()))]
        response = serving.post("/broken/v1/classify", files=files)
        assert response.status_code == 503 and "no model for site" in response.json()["detail"]
        # the reason stays in the log: a registry error names the registry's address, credentials and all
        assert (
            "no-such-model" not in response.json()["detail"] and "the service log says why" in response.json()["detail"]
        )
    finally:
        serve.delete("broken")


def test_a_replica_that_cannot_reach_the_registry_serves_its_last_known_good_version(serving):
    """A new replica whose registry server is down (nothing listens on its port) used to answer 503 for ever. It
    serves the version last served on this host instead, and says so in /readyz, /v1/models and every answer."""
    import socket

    from ray import serve

    from services.app import build_app

    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        down = f"http://127.0.0.1:{closed.getsockname()[1]}"
    registry = serving.settings.registry.model_copy(update={"tracking_uri": down})
    serve.run(build_app(serving.settings.model_copy(update={"registry": registry})), name="lkg", route_prefix="/lkg")
    try:
        ready = httpx.get(serving.url + "/lkg/readyz", timeout=120)
        assert ready.status_code == 200, ready.text
        assert ready.json()["model_version"] == serving.versions["four"]
        assert "registry could not be read" in ready.json()["last_known_good"] and down not in ready.text
        models = httpx.get(serving.url + "/lkg/v1/models", headers={"X-API-Key": API_KEY}, timeout=60)
        assert models.status_code == 200, models.text
        [entry] = models.json()["served"]  # the registry cannot say more: what this replica serves
        assert entry["site"] is None and entry["model"]["version"] == serving.versions["four"]
        assert entry["model"]["last_known_good"]
        files = [("files", (p.name, p.read_bytes())) for p in serving.cells[:2]]
        answer = serving.post("/lkg/v1/classify", files=files)
        assert answer.status_code == 200 and answer.json()["cells"][0]["model"]["last_known_good"], answer.text
    finally:
        serve.delete("lkg")
    current = serving.classify_files(serving.cells[:1])  # the app with its registry: the alias's version, no flag
    assert current.status_code == 200 and current.json()["cells"][0]["model"]["last_known_good"] is None


def test_changed_routing_reconfigures_the_running_replica_in_place(serving, tmp_path):
    """A new `user_config` (here: review everything under 0.99 confidence) reaches the running replica through
    `reconfigure`: the same replica, its model still loaded, answers with the new routing."""
    from ray import serve

    from services.classifier import live_config

    config_file = tmp_path / "settings.json"

    def deploy(review_below: float) -> None:  # as `serve deploy` applies a config file: only user_config differs
        from ray.serve.context import _get_global_client
        from ray.serve.schema import ServeDeploySchema

        live = live_config(serving.settings)
        live["routing"]["review_below"] = review_below
        settings = serving.settings.model_dump(mode="json", exclude_none=True)
        settings["serve"]["api_key"] = API_KEY  # dumped masked, as every secret
        config_file.write_text(json.dumps(settings))
        app = {
            "name": "live",
            "route_prefix": "/live",
            "import_path": "services.app:build",
            "args": {"config": str(config_file)},
            "deployments": [{"name": "Classifier", "user_config": live}],
        }
        try:
            _get_global_client().deploy_apps(ServeDeploySchema(applications=[app]), _blocking=True)
        except TimeoutError:
            raise AssertionError(serve.status().applications["live"].message) from None

    def ask() -> dict:
        files = [("files", (p.name, p.read_bytes())) for p in serving.cells[:6]]
        response = serving.post("/live/v1/classify", files=files)
        assert response.status_code == 200, response.text
        return response.json()

    deploy(0.0)
    try:
        before = ask()
        assert {c["route"] for c in before["cells"]} == {"accept"}
        deploy(0.99)
        deadline = time.monotonic() + 60
        after = ask()
        while {c["route"] for c in after["cells"]} != {"review"}:
            assert time.monotonic() < deadline, after
            time.sleep(0.5)
            after = ask()
        assert after["batch"]["replica"] == before["batch"]["replica"]  # reconfigured, not restarted
    finally:
        serve.delete("live")


def test_batch_scoring_sends_each_sites_cells_to_that_sites_model(serving, tmp_path):
    """A Ray Data batch holding cells of two sites (batches are cut by size, not by site) used to be sent whole to
    the global model. Each site's cells now reach that site's champion."""
    from jobs.score import ServedScorer

    scorer = ServedScorer(serving.url, api_key=API_KEY)
    paths = [str(p) for p in serving.cells[:4]]
    sites = ["siteb", "", "siteb", "sited"]
    out = scorer({"path": np.array(paths, dtype=object), "site": np.array(sites, dtype=object)})
    version_of = dict(zip(out["path"], out["version"]))
    expected = {"siteb": serving.versions["two"], "": serving.versions["four"], "sited": serving.versions["diffusion"]}
    assert [version_of[p] for p in paths] == [expected[s] for s in sites]
    # a site's share of a batch with no decodable cell (422 for the whole request) and a file gone: those cells
    # are named failures, the others still answered (the whole Ray Data job used to die)
    junk, other, gone = tmp_path / "junk.png", tmp_path / "other.png", tmp_path / "gone.png"
    junk.write_bytes(b"not an image")
    other.write_bytes(b"nor this")
    batch = {
        "path": np.array([paths[0], str(junk), str(other), str(gone)], dtype=object),
        "site": np.array(["", "sited", "sited", ""], dtype=object),
    }
    out = scorer(batch)
    status = {p: (ok, error.split(":")[0]) for p, ok, error in zip(out["path"], out["ok"], out["error"])}
    assert status == {
        paths[0]: (True, ""),
        str(junk): (False, "HTTP 422"),
        str(other): (False, "HTTP 422"),
        str(gone): (False, "unreadable"),
    }
    with pytest.raises(RuntimeError, match="HTTP 401"):  # a wrong key is the job's failure, not every cell's
        ServedScorer(serving.url, api_key="not-the-key")(batch)


def test_a_model_that_fails_fails_only_its_own_requests(serving):
    """A site whose model raises on its cells, sent with requests of another site: the whole Ray batch used to
    fail with a plain-text 500. Now the failing site's requests get a JSON 500 and the others their answers. (Which
    requests share a Ray batch is Ray's timing and not in the answers; without the fix this test fails on the
    plain-text 500 whether or not they shared one.)"""
    import threading

    results: dict[str, list[httpx.Response]] = {"siteb": [], "poisoned": []}
    start = threading.Barrier(4)

    def ask(site: str) -> None:
        start.wait()
        results[site].append(serving.classify_files(serving.cells[:2], site=site))

    threads = [threading.Thread(target=ask, args=(site,)) for site in ("siteb", "siteb", "siteb", "poisoned")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert [r.status_code for r in results["siteb"]] == [200, 200, 200]
    [failed] = results["poisoned"]
    assert failed.status_code == 500 and "failed on these cells" in failed.json()["detail"]


def test_a_replica_killed_mid_request_is_a_503_to_send_again(serving, tmp_path):
    """The classifier replica dies (its process killed) while it scores a request: the caller used to get a
    plain-text 500 from the framework; now a JSON 503 with Retry-After, and Serve's new replica answers the request
    sent again. Its own app (`dying`), so the module's other replicas are not disturbed; its model is the diffusion
    version made slow on purpose (10,000 trials a cell: a second or two for the one cell MLflow runs it on when
    registering it, a minute for the request's 24 cells), so that the request is surely still running when killed."""
    import ray
    from ray import serve

    from cytoloop.serving.pyfunc import cytoloop_directory
    from services.app import build_app

    slow = tmp_path / "slow"
    shutil.copytree(cytoloop_directory(serving.registry.download(MODEL, serving.versions["diffusion"], tmp_path)), slow)
    meta = json.loads((slow / "model.json").read_text())
    meta["scoring"].update(min_trials=10000, max_trials=10000)
    (slow / "model.json").write_text(json.dumps(meta))
    serving.registry.set_alias(MODEL, "champion-slow", serving.registry.log_model(slow, MODEL).version)
    serve.run(build_app(serving.settings), name="dying", route_prefix="/dying", blocking=False)
    try:
        deadline = time.monotonic() + 120
        while httpx.get(serving.url + "/dying/readyz", timeout=60).status_code != 200:
            assert time.monotonic() < deadline, "the app never became ready"
            time.sleep(0.5)
        [replica] = [
            a
            for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith("SERVE_REPLICA::dying#Classifier")
        ]
        actor = ray.get_actor(replica["name"], namespace=replica["namespace"])
        pid = ray.get(actor.__ray_call__.remote(lambda _: os.getpid()), timeout=60)
        files = [("files", (p.name, p.read_bytes())) for p in (serving.cells * 24)[:24]]
        answers: list[httpx.Response] = []
        sender = threading.Thread(
            target=lambda: answers.append(serving.post("/dying/v1/classify", files=files, data={"site": "slow"}))
        )
        ticks = os.sysconf("SC_CLK_TCK")

        def cpu_seconds() -> float:  # the replica's user and system time (/proc/<pid>/stat fields 14 and 15)
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / ticks

        idle = cpu_seconds()
        sender.start()
        deadline = time.monotonic() + 90
        while cpu_seconds() - idle < 2.0:  # the request has reached the replica, which loads the version and scores
            assert time.monotonic() < deadline and not answers, "the replica never started on the request"
            time.sleep(0.2)
        assert not answers, f"the request ended before the replica was killed: {answers[0].text[:200]}"
        os.kill(pid, signal.SIGKILL)  # as the kernel's OOM killer would
        sender.join(timeout=120)
        [killed] = answers
        assert killed.status_code == 503, killed.text
        assert "send them again" in killed.json()["detail"] and killed.headers["Retry-After"] == "5"
        again = serving.post("/dying/v1/classify", files=files[:1])  # the global champion, on the new replica
        assert again.status_code == 200, again.text
    finally:
        serve.delete("dying")


def test_a_stopping_replica_writes_the_events_waiting_for_its_log_disk(serving, tmp_path):
    """A replica that Serve stopped (a redeploy, a scale-down, an app deleted) took with it the events still
    waiting for a slow log disk; now Serve's graceful stop awaits them. Its own app (`stopping`) with its own log, a
    FIFO nobody reads (opening it to write blocks, as on a stalled mount) until 5 s into the app's deletion."""
    from ray import serve

    from cytoloop.policy.drift import PredictionEvent
    from services.app import build_app
    from tests.faults import HungDisk

    disk = HungDisk(tmp_path / "predictions.jsonl")
    settings = serving.settings.model_copy(
        update={"serve": serving.settings.serve.model_copy(update={"prediction_log": disk.path})}
    )
    serve.run(build_app(settings), name="stopping", route_prefix="/stopping", blocking=False)
    try:
        deadline = time.monotonic() + 120
        while httpx.get(serving.url + "/stopping/readyz", timeout=60).status_code != 200:
            assert time.monotonic() < deadline, "the app never became ready"
            time.sleep(0.5)
        cells = []
        for batch in (serving.cells[:2], serving.cells[2:4]):  # the first's events in the hung append, the next's
            files = [("files", (p.name, p.read_bytes())) for p in batch]  # waiting behind it
            cells += _ok_cells(serving.post("/stopping/v1/classify", files=files))
            time.sleep(0.5)
        assert len(cells) == 4 and not disk.written  # the events wait for the disk
    finally:
        returned = threading.Timer(5.0, disk.come_back)  # the disk comes back 5 s into the stop
        returned.start()
        serve.delete("stopping")  # returns once the replicas are gone
        returned.join()
        deadline = time.monotonic() + 5
        while disk.written.count(b"\n") < 4 and time.monotonic() < deadline:  # the reader's last read
            time.sleep(0.1)
        disk.close()
    events = [PredictionEvent.model_validate_json(line) for line in disk.written.decode().splitlines()]
    assert sorted(e.predicted for e in events) == sorted(c["label"] for c in cells)


def test_a_hung_prediction_log_disk_holds_no_answer(serving):
    """The replica wrote a batch's drift-log lines before answering it, so a hung log disk held every request for as
    long as it hung. Here the log is a FIFO nobody reads (opening it to write blocks, as on a stalled mount): the
    answers still come back, and the events follow once the disk does. Last in the module: the log is swapped."""
    from cytoloop.policy.drift import PredictionEvent
    from tests.faults import HungDisk

    log = serving.settings.serve.prediction_log
    size, quiet = -1, time.monotonic()
    while time.monotonic() - quiet < 1.0:  # earlier tests' events written, so only this test's go to the FIFO
        if log.exists() and log.stat().st_size != size:
            size, quiet = log.stat().st_size, time.monotonic()
        time.sleep(0.1)
    kept = log.with_name(log.name + ".kept")
    if log.exists():
        log.rename(kept)
    disk = HungDisk(log)
    try:
        files = [("files", (p.name, p.read_bytes())) for p in serving.cells[:2]]
        answer = httpx.post(
            serving.url + "/v1/classify",
            headers={"X-API-Key": API_KEY},
            files=files,
            data={"site": "siteb"},
            timeout=30,
        )
    finally:
        disk.come_back()  # also after a failure: a replica's writer must not hang for ever
        deadline = time.monotonic() + 30
        while disk.written.count(b"\n") < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        disk.close()
        if kept.exists():
            kept.rename(log)
    cells = _ok_cells(answer)
    assert len(cells) == 2
    events = [PredictionEvent.model_validate_json(line) for line in disk.written.decode().splitlines()]
    assert sorted(e.predicted for e in events if e.site == "siteb") == sorted(c["label"] for c in cells)

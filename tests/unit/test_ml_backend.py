"""The Label Studio ML backend without Label Studio: the protocol's routes over a real local model directory."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from cytoloop.config import Settings
from cytoloop.models.baseline import BaselineClassifier
from labelstudio.ml_backend import Backend, create_app

LOGIN = ("label-studio", "a-password")


def logged_in(app) -> TestClient:
    """A client sending the login on every request, as Label Studio connected with Basic Auth does."""
    client = TestClient(app)
    client.auth = LOGIN
    return client


@pytest.fixture
def backend(tmp_path, tiny_settings):
    BaselineClassifier(["a", "b"], tiny_settings.data, tiny_settings.baseline).save(tmp_path / "model")
    (tmp_path / "images").mkdir()
    for i in range(3):
        rgb = np.random.default_rng(i).integers(0, 255, (20, 20, 3), dtype=np.uint8)
        Image.fromarray(rgb).save(tmp_path / "images" / f"{i}.png")
    settings = Settings(serve={"model_dir": tmp_path / "model"}, stack={"images_root": tmp_path / "images"})
    slow = [sys.executable, "-c", "import time; time.sleep(3)"]
    exported = []
    return Backend(settings, retrain_command=slow, export=lambda: exported.append(1)), exported, tmp_path


def test_predict_answers_every_task_but_keeps_audits_blind(backend):
    backend, _, root = backend
    tasks = [
        {"id": 1, "data": {"image": "/data/local-files/?d=images/0.png"}},  # a lab's own import
        {"id": 2, "data": {"image_path": str(root / "images" / "1.png"), "task_key": "k2", "reason": "review"}},
        {"id": 3, "data": {"image_path": str(root / "images" / "2.png"), "task_key": "k3"}},  # an audit
        {"id": 4, "data": {"image": "/data/local-files/?d=../secrets.json"}},  # outside the images root
        {"id": 5, "data": {"image_path": "/dev/zero", "reason": "review"}},  # read for ever before
        {"id": 6, "data": {"image_path": str(root / "elsewhere.png"), "reason": "review"}},  # outside the root
        {"id": 7, "data": {"image_path": str(root / "images" / "huge.png"), "reason": "review"}},  # 25 Mpx
    ]
    Image.open(root / "images" / "0.png").save(root / "elsewhere.png")  # a real image, but not one of the cells
    Image.new("1", (5000, 5000)).save(root / "images" / "huge.png")  # a few kB declaring over serve's pixel limit
    with logged_in(create_app(backend, *LOGIN)) as client:
        assert client.get("/health").json()["status"] == "UP"
        version = client.post("/setup", json={"project": "1.0", "schema": "<View/>"}).json()["model_version"]
        results = client.post("/predict", json={"tasks": tasks}).json()["results"]
    assert [bool(r["result"]) for r in results] == [True, True, False, False, False, False, False]
    assert {r["model_version"] for r in results[:2]} == {version}
    assert results[0]["result"][0]["value"]["choices"][0] in ("a", "b") and 0 < results[0]["score"] <= 1


def test_a_task_of_another_shape_gets_no_prediction_and_the_others_still_do(backend):
    """A task whose data is not an object, or whose image_path or site is not a string, failed the whole call with
    a 500; a site that is no site name was kept with a model of its own, one per string sent. An empty site (a
    CSV import's empty column) is the global champion's."""
    backend, _, root = backend
    good = {"id": 1, "data": {"image_path": str(root / "images" / "0.png"), "reason": "review", "site": ""}}
    odd = [
        {"id": 2, "data": "x"},
        {"id": 3, "data": [1]},
        {"id": 4, "data": {"image_path": 5}},
        {"id": 5, "data": {"image_path": str(root / "images" / "1.png"), "site": ["a"]}},
        {"id": 6, "data": {"image_path": str(root / "images" / "1.png"), "site": "../../x"}},
    ]
    with logged_in(create_app(backend, *LOGIN)) as client:
        answer = client.post("/predict", json={"tasks": [good, *odd]})
    assert answer.status_code == 200
    assert [bool(r["result"]) for r in answer.json()["results"]] == [True] + [False] * len(odd)
    assert set(backend._sites) == {None}  # no model kept for "../../x"


def test_training_events_start_one_retrain_in_the_background(backend):
    backend, exported, _ = backend
    with logged_in(create_app(backend, *LOGIN)) as client:
        first = client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 1}})
        again = client.post("/webhook", json={"action": "ANNOTATION_CREATED"})  # while the first one runs
        other = client.post("/webhook", json={"action": "PROJECT_UPDATED"})
        assert client.post("/webhook", json={}).status_code == 422  # no action: it was a 201 saying action null
    assert first.status_code == 201 and first.json()["training_started"] is True
    assert again.json()["training_started"] is False and other.json()["training_started"] is False
    assert exported == [1]  # the consensus labels were exported for it first
    backend.retrains[0].wait(timeout=30)


def test_a_retrain_s_label_export_holds_up_no_prediction(backend):
    """One lock covered the site table, each site's first model load and a retrain's label export: while a
    training event exported the labels (a large store, a slow disk), every prediction of every site waited."""
    import threading

    backend, _, root = backend
    exporting, release = threading.Event(), threading.Event()

    def slow_export():
        exporting.set()
        release.wait(10)

    backend.export = slow_export
    training = threading.Thread(target=backend.train, args=("START_TRAINING",))
    answered: list = []
    task = {"id": 1, "data": {"image_path": str(root / "images" / "0.png"), "reason": "review"}}
    predicting = threading.Thread(target=lambda: answered.append(backend.predict([task])))
    training.start()
    try:
        assert exporting.wait(10)
        predicting.start()
        predicting.join(timeout=5)
        assert answered and answered[0][0].result, "the prediction waited for the export"
    finally:
        release.set()
        training.join()
        if predicting.is_alive():
            predicting.join()
    backend.retrains[0].wait(timeout=30)


def test_a_site_without_a_usable_model_leaves_only_its_own_tasks_unanswered(backend):
    """Site 'east' asks for classes the served model lacks: its tasks get no prediction, the others still do
    (one site's broken model used to fail the whole request with a 500)."""
    backend, _, root = backend
    sites = {"east": {"classes": ["a", "zzz"]}}
    backend = Backend(
        Settings(serve={"model_dir": root / "model"}, stack={"images_root": root / "images"}, sites=sites)
    )
    tasks = [
        {"id": 1, "data": {"image_path": str(root / "images" / "0.png"), "site": "east", "reason": "review"}},
        {"id": 2, "data": {"image_path": str(root / "images" / "1.png"), "reason": "review"}},
    ]
    with pytest.raises(Exception, match="zzz"):
        backend.site("east")
    assert [bool(p.result) for p in backend.predict(tasks)] == [False, True]


def test_setup_without_a_champion_is_a_503_saying_why(tmp_path):
    """A withdrawn (or not yet registered) champion made /setup a bare 500."""
    settings = Settings(
        registry={"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "cache_dir": tmp_path / "cache"},
        stack={"images_root": tmp_path},
    )
    with logged_in(create_app(Backend(settings), *LOGIN)) as client:
        answer = client.post("/setup", json={"project": "1.0", "schema": "<View/>"})
    assert answer.status_code == 503 and "no model to connect" in answer.json()["detail"]
    assert "sqlite" not in answer.json()["detail"] and "service log" in answer.json()["detail"]  # no address


def test_every_route_asks_for_the_login(backend):
    """The routes read cells under the images root and start retraining: without Label Studio's Basic Auth login
    (or with a wrong one) every one is refused, before any work."""
    backend, exported, root = backend
    task = {"id": 1, "data": {"image_path": str(root / "images" / "0.png"), "reason": "review"}}
    with TestClient(create_app(backend, *LOGIN)) as client:
        for auth in (None, ("label-studio", "wrong"), ("someone", "a-password")):
            answers = [
                client.get("/health", auth=auth),
                client.post("/setup", json={"project": "1.0"}, auth=auth),
                client.post("/predict", json={"tasks": [task]}, auth=auth),
                client.post("/webhook", json={"action": "START_TRAINING"}, auth=auth),
            ]
            assert {a.status_code for a in answers} == {401}, [a.text for a in answers]
            assert answers[0].headers["WWW-Authenticate"] == "Basic"
        assert client.get("/health", auth=LOGIN).status_code == 200
    assert exported == [] and backend.retrains == []  # no retrain was started by the refused events
    with pytest.raises(ValueError, match="password"):
        create_app(backend, "label-studio", "")


def test_the_login_comes_before_the_body_and_nothing_is_open(backend):
    """FastAPI read and parsed a body before its login dependency: without a login, a body that was not JSON got
    a 422 describing it, and /docs, /redoc and /openapi.json answered anyone."""
    backend, _, _ = backend
    with TestClient(create_app(backend, *LOGIN)) as client:
        headers = {"content-type": "application/json"}
        for path in ("/predict", "/webhook", "/setup"):
            assert client.post(path, content=b"{not json", headers=headers).status_code == 401
        for path in ("/docs", "/redoc", "/openapi.json"):
            assert client.get(path).status_code == 401 and client.get(path, auth=LOGIN).status_code == 404
        assert client.post("/predict", content=b"{not json", headers=headers, auth=LOGIN).status_code == 422
        huge = client.post("/predict", headers={**headers, "content-length": str(64 << 20)}, auth=LOGIN)
        assert huge.status_code == 413


def test_a_model_failing_on_one_site_s_cells_leaves_the_other_sites_answered(backend, monkeypatch):
    """A model that loads but fails at inference (out of memory, a bad version) failed the whole /predict with a
    500, every other site's pre-annotations lost with it."""
    backend, _, root = backend
    tasks = [
        {"id": 1, "data": {"image_path": str(root / "images" / "0.png"), "site": "east", "reason": "review"}},
        {"id": 2, "data": {"image_path": str(root / "images" / "1.png"), "reason": "review"}},
    ]
    service = backend.site("east").service  # the same model serves both sites here: it fails on east's cell
    classify = service.classify

    def out_of_memory_on_east(cells):
        if any(name == "0.png" for name, _ in cells):
            raise RuntimeError("CUDA out of memory")
        return classify(cells)

    monkeypatch.setattr(service, "classify", out_of_memory_on_east)
    assert [bool(p.result) for p in backend.predict(tasks)] == [False, True]


def test_a_failing_label_export_starts_no_retrain_and_is_no_500(backend):
    """The export refuses (it would replace a manifest of earlier labels with an empty one): every training event
    was a 500, and Label Studio showed its users an error for an export they never asked for."""
    from cytoloop.errors import UsageError

    backend, _, _ = backend

    def refusing():
        raise UsageError("no agreed labels: consensus.csv left as it was")

    backend.export = refusing
    with logged_in(create_app(backend, *LOGIN)) as client:
        answer = client.post("/webhook", json={"action": "START_TRAINING"})
    assert answer.status_code == 201 and answer.json()["training_started"] is False and backend.retrains == []

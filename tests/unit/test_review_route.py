"""Routing into the outbox without a Label Studio (push=False): what a cell is, and when it is not asked again."""

from __future__ import annotations

import numpy as np
from PIL import Image

from cytoloop.config import Settings
from cytoloop.data.records import read_manifest
from cytoloop.models.base import Predictions
from labelstudio.label_config import prediction_result
from labelstudio.loop import ReviewLoop
from labelstudio.store import cell_key
from labelstudio.tasks import cell_uid

CLASSES = ["lymphocyte", "monocyte", "neutrophil"]


def _batch(root, name: str, seed: int):
    """A batch folder of three cells named 001.png..003.png (as every scanner export names them) + its manifest."""
    folder = root / name
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(1, 4):
        Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
    manifest = folder / "manifest.csv"
    manifest.write_text("path,label,domain\n" + "".join(f"{i:03d}.png,,north\n" for i in range(1, 4)))
    return read_manifest(manifest)


def _uncertain(n: int) -> Predictions:
    """Uncertain (top probability 0.5, below review_below) and unlike each other (no near-duplicates)."""
    probs = np.array([np.roll([0.5, 0.3, 0.2], i) for i in range(n)])
    return Predictions(probs, np.zeros(n), np.ones(n))


def _loop(tmp_path) -> ReviewLoop:
    routing = {"review_below": 0.7, "anomaly_above": None, "audit_fraction": 0.0}
    return ReviewLoop(Settings(home=tmp_path / "home", stack={"images_root": tmp_path / "images"}, routing=routing))


def test_two_batches_with_the_same_file_names_are_different_cells(tmp_path):
    """Each batch's manifest names its cells 001.png..003.png: by dataset-relative path they were the same three
    cells, and the second batch was never asked about. By content, six cells, six tasks."""
    first, second = _batch(tmp_path / "images", "batch1", 1), _batch(tmp_path / "images", "batch2", 2)
    assert [r.cell_id for r in first] == [r.cell_id for r in second]  # the names collide
    loop = _loop(tmp_path)
    assert loop.route(first, _uncertain(3), CLASSES, "v1", push=False).queued == 3
    report = loop.route(second, _uncertain(3), CLASSES, "v1", push=False)
    assert (report.queued, report.already_queued) == (3, 0)
    again = loop.route(first, _uncertain(3), CLASSES, "v1", push=False)  # the same images: nothing new
    assert (again.queued, again.already_queued) == (0, 3)


def test_the_same_image_twice_in_one_call_is_one_task_per_site_and_each_goes_to_its_own(tmp_path):
    """The same image in two labs' folders, routed in one call: keyed by image alone, both tasks went to the last
    copy's site (one task; the other lab's never queued, chosen again every round); within one site a second copy
    spent a second pick of the budget on one task."""
    import shutil

    cells = _batch(tmp_path / "images", "north", 5)
    south = tmp_path / "images" / "south"
    south.mkdir()
    shutil.copy(cells[0].path, south / "copy.png")
    (south / "manifest.csv").write_text("path,label,domain\ncopy.png,,south\n")
    [copy] = read_manifest(south / "manifest.csv")
    loop = _loop(tmp_path)
    probs = _uncertain(3).probs
    report = loop.route([cells[0], copy], Predictions(probs[:2], np.zeros(2), np.ones(2)), CLASSES, "v1", push=False)
    assert report.queued == 2 and report.by_site == {"north": 1, "south": 1}
    keys = {t["data"]["task_key"] for site_tasks in loop.outbox.pending().values() for t in site_tasks}
    uid = cell_uid(cells[0].path)
    assert keys == {f"north:{uid}@v1", f"south:{uid}@v1"}

    twice = [cells[1], cells[1], cells[2]]  # one site, one image listed twice, a budget of two
    report = loop.route(twice, Predictions(probs, np.zeros(3), np.ones(3)), CLASSES, "v1", push=False, budget=2)
    assert report.queued == 2 and report.chosen == 2  # both other cells: the copy took no pick


def test_a_cell_with_consensus_is_not_routed_again_for_a_new_model_version(tmp_path):
    cells = _batch(tmp_path / "images", "batch1", 3)
    loop = _loop(tmp_path)
    assert loop.route(cells, _uncertain(3), CLASSES, "v1", push=False).queued == 3
    task = {"id": 1, "project": 1, "data": {"site": "north", "cell_id": cell_uid(cells[0].path), "task_key": "k"}}
    for annotator in (1, 2):  # two annotators agree on the first cell
        annotation = {
            "id": annotator,
            "completed_by": annotator,
            "result": prediction_result("monocyte"),
            "updated_at": f"2026-01-01T00:00:0{annotator}Z",
        }
        loop.store.upsert(annotation, task, "poll", "org1@x")
    assert [v.cell_key for v in loop.store.votes()] == [cell_key("north", cell_uid(cells[0].path))] * 2
    report = loop.route(cells, _uncertain(3), CLASSES, "v2", push=False)
    assert (report.already_decided, report.queued) == (1, 2)  # the two still open are asked again, not the agreed


def test_an_audit_task_shows_the_annotator_nothing_of_the_model_and_still_measures_it(tmp_path):
    """Audits measure how often auto-accepted cells are wrong; shown the model's answer, annotators anchor on it.
    An audit task carries no pre-annotation and no model field; the store keeps them, and the report's audit
    error rate is measured against them. A review task keeps its pre-annotation."""
    from labelstudio.export import review_report
    from labelstudio.tasks import MODEL_FIELDS

    cells = _batch(tmp_path / "images", "batch1", 4)
    routing = {"review_below": 0.7, "anomaly_above": None, "audit_fraction": 1.0}
    loop = ReviewLoop(Settings(home=tmp_path / "home", stack={"images_root": tmp_path / "images"}, routing=routing))
    probs = np.array([[0.9, 0.05, 0.05], [0.05, 0.9, 0.05], [0.5, 0.3, 0.2]])  # two confident, one not
    report = loop.route(cells, Predictions(probs, np.zeros(3), np.ones(3)), CLASSES, "v1", push=False)
    assert report.reasons == {"audit": 2, "review": 1}
    tasks = [task for site_tasks in loop.outbox.pending().values() for task in site_tasks]
    audits = [t for t in tasks if "predictions" not in t]
    [review] = [t for t in tasks if "predictions" in t]
    assert len(audits) == 2 and all(not set(MODEL_FIELDS) & set(t["data"]) for t in audits)
    assert review["data"]["reason"] == "review" and review["data"]["model_label"] == "lymphocyte"
    for task in audits:  # both annotators say monocyte; the model said lymphocyte, then monocyte
        for annotator in (1, 2):
            annotation = {
                "id": annotator * 10 + audits.index(task),
                "completed_by": annotator,
                "result": prediction_result("monocyte"),
                "updated_at": "2026-01-01T00:00:01Z",
            }
            loop.store.upsert(annotation, {"id": 1, "project": 1, "data": task["data"]}, "poll", "org1-x")
    audit = review_report(loop.store, labels_required=2)["audit"]
    assert audit == {"cells": 2, "model_wrong": 1, "error_rate": 0.5}


def test_without_images_confident_cells_of_one_class_are_not_taken_for_near_duplicates(tmp_path):
    """Without images (the demo scores through Serve) the probability vectors were the cells' signatures: 70
    different neutrophils at 0.97-0.99 all looked alike, and with the budget filled from confident cells
    (`fill_budget`) a round sent a handful of its 40 (site-b: 14, 24 and 13)."""
    from cytoloop.config import RoutingConfig

    folder = tmp_path / "images" / "lab"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(70):
        Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
    (folder / "manifest.csv").write_text("path,label,domain\n" + "".join(f"{i:03d}.png,,lab\n" for i in range(70)))
    cells = read_manifest(folder / "manifest.csv")
    confidence = np.linspace(0.97, 0.99, 70)
    probs = np.stack([(1 - confidence) / 2, (1 - confidence) / 2, confidence], axis=1)  # all neutrophil
    routing = RoutingConfig(review_below=0.7, anomaly_above=None, audit_fraction=0.0, fill_budget=True)
    report = _loop(tmp_path).route(
        cells, Predictions(probs, np.full(70, 2), np.ones(70)), CLASSES, "v1", push=False, budget=40, routing=routing
    )
    assert report.queued == 40

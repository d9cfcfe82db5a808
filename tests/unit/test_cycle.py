"""The demo's pure parts: the one-time split, the simulated annotators' answers, the report."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from cytoloop.config import DemoConfig
from cytoloop.data.records import CellRecord, DatasetError
from jobs.cycle import RoundResult, anomaly_threshold, mix_blasts, reported_classes, round_table, split_site
from labelstudio.annotators import SimulatedAnnotator


def records(per_class: dict[str, int]) -> list[CellRecord]:
    return [
        CellRecord(f"{label}/{i}.png", Path(f"/cells/{label}/{i}.png"), label, "lab")
        for label, n in per_class.items()
        for i in range(n)
    ]


def test_copies_of_one_image_are_one_cell_of_the_site_split(tmp_path):
    """The split went by file: two copies of one image (jtsc's 112.bmp and 139.bmp are one lymphocyte) could land
    one on the learning curve and one in the pool, which was labelled and trained on, or in two held-out parts."""
    from PIL import Image

    cells = []
    for i in range(12):
        path = tmp_path / f"{i:03d}.png"
        Image.fromarray(np.full((8, 8, 3), 7 if i in (1, 2) else i * 20, np.uint8)).save(path)  # 001 = 002
        cells.append(CellRecord(path.name, path, "lymphocyte", "lab"))
    held_out = 0
    for seed in range(30):
        split = split_site(cells, DemoConfig(test_fraction=0.3, seed=seed), "site-a")
        parts = [
            {r.cell_id for r in p} & {"001.png", "002.png"} for p in (split.test, split.val, split.eval, split.pool)
        ]
        assert sorted(map(len, parts)) == [0, 0, 0, 2], (seed, parts)  # both copies in one part
        held_out += len(parts[3]) == 0
        assert sum(map(len, (split.test, split.val, split.eval, split.pool))) == 12
    assert held_out  # the seeds did hold the image out


def test_site_split_is_disjoint_per_class_and_seeded():
    cells = records({"neutrophil": 20, "lymphocyte": 14})
    config = DemoConfig(test_fraction=0.3)
    split = split_site(cells, config, "site-a")
    parts = (split.test, split.val, split.eval, split.pool)
    ids = [{r.cell_id for r in part} for part in parts]
    assert sum(map(len, ids)) == len(set().union(*ids)) == len(cells)  # disjoint and complete
    # 6 neutrophils held out: 2 for the curve, 2 to calibrate, 2 to gate; the other 14 are the pool
    assert [sum(r.label == "neutrophil" for r in part) for part in parts] == [2, 2, 2, 14]
    assert split_site(cells, config, "site-a") == split
    assert split_site(cells, config, "site-b").pool != split.pool  # each site draws its own
    assert split_site(cells, config.model_copy(update={"seed": 1}), "site-a").pool != split.pool


def test_a_class_too_small_for_the_split_is_named_with_its_site():
    with pytest.raises(DatasetError, match="site 'site-b': class 'monocyte' has 3 cells"):
        split_site(records({"neutrophil": 20, "monocyte": 3}), DemoConfig(), "site-b")


def test_blasts_are_mixed_in_at_their_share_and_never_twice():
    config = DemoConfig(blast_share=0.05)
    splits = {
        "a": split_site(records({"neutrophil": 200, "lymphocyte": 100}), config, "a"),
        "b": split_site(records({"monocyte": 60}), config, "b"),
    }
    blasts = [CellRecord(f"blast/{i}.png", Path(f"/cells/blast/{i}.png"), "blast", "allidb2") for i in range(40)]
    mixed = mix_blasts(splits, blasts, config)
    for site, split in mixed.items():
        assert set(split.blasts) <= set(split.pool) and split.test == splits[site].test
        assert len(split.pool) == len(splits[site].pool) + len(split.blasts)
        assert abs(len(split.blasts) / len(split.pool) - 0.05) < 0.01
    assert not set(mixed["a"].blasts) & set(mixed["b"].blasts)
    assert mix_blasts(splits, blasts, config) == mixed  # seeded
    with pytest.raises(DatasetError, match="blasts are needed"):
        mix_blasts(splits, blasts[:5], config)
    assert mix_blasts(splits, blasts, config.model_copy(update={"blast_share": 0.0})) == splits


def test_a_site_reports_the_base_model_s_classes_its_cells_have_never_the_blasts():
    config = DemoConfig(blast_share=0.1)
    split = split_site(records({"neutrophil": 40, "monocyte": 20}), config, "a")
    blasts = [CellRecord(f"blast/{i}.png", Path(f"/cells/blast/{i}.png"), "blast", "allidb2") for i in range(10)]
    mixed = mix_blasts({"a": split}, blasts, config)["a"]
    order = ["platelet", "monocyte", "lymphocyte", "neutrophil"]
    assert reported_classes(mixed, order, "blast") == ["monocyte", "neutrophil"]  # the model's order


def test_the_anomaly_threshold_is_a_quantile_of_the_sites_normal_cells():
    scores = np.arange(100, dtype=float)
    assert anomaly_threshold(scores, 0.95) == pytest.approx(94.05)
    assert anomaly_threshold(np.append(scores, np.nan), 0.5) == pytest.approx(49.5)
    from cytoloop.errors import UsageError

    with pytest.raises(UsageError, match="no finite anomaly score"):  # the CLI's one paragraph, not a traceback
        anomaly_threshold(np.array([np.nan]), 0.9)


def test_sites_must_not_share_a_lab():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="lab 'jtsc' is in two sites"):
        DemoConfig(sites={"a": ["jtsc"], "b": ["bccd", "jtsc"]})
    with pytest.raises(ValidationError, match="blast_domain 'allidb2' is also a site's lab"):
        DemoConfig(sites={"a": ["allidb2"]})
    with pytest.raises(ValidationError, match="names no lab"):
        DemoConfig(sites={"a": []})


def test_the_demo_freezes_each_sites_sets_once(tmp_path):
    from cytoloop.data.records import read_manifest
    from cytoloop.models.finetune import freeze, frozen_directory

    split = split_site(records({"neutrophil": 20, "lymphocyte": 14}), DemoConfig(), "site-a")
    directory = frozen_directory(tmp_path, "site-a")
    assert freeze(directory, split.val, split.eval)
    assert not freeze(directory, split.test, split.test)  # frozen means frozen
    assert [r.path for r in read_manifest(directory / "eval.csv")] == [r.path for r in split.eval]
    assert directory != frozen_directory(tmp_path, "site-b") != frozen_directory(tmp_path, None)


def test_blasts_of_a_sites_own_labs_are_refused_before_they_are_held_out_as_normal_cells():
    with pytest.raises(DatasetError, match="site 'site-a': 4 of its labs' cells are labelled 'blast'"):
        split_site(records({"neutrophil": 20, "blast": 4}), DemoConfig(), "site-a")


def test_a_rerun_with_another_split_in_the_same_home_is_refused_before_anything_starts(tmp_path):
    """The kept frozen sets of a seed-0 run used to be reused by a seed-1 run whose pool and learning curve held
    their cells: calibrated and gated on cells it had routed, trained on or drew its curve from."""
    from cytoloop.errors import UsageError
    from cytoloop.models.finetune import freeze, frozen_directory
    from jobs.cycle import check_kept_sets

    cells = records({"neutrophil": 20, "lymphocyte": 14})
    first = split_site(cells, DemoConfig(seed=0), "site-a")
    directory = frozen_directory(tmp_path, "site-a")
    freeze(directory, first.val, first.eval)
    check_kept_sets(directory, split_site(cells, DemoConfig(seed=0), "site-a"), "site-a")  # the same run again
    with pytest.raises(UsageError, match="site-a: the frozen val cells kept under .* are not this run's"):
        check_kept_sets(directory, split_site(cells, DemoConfig(seed=1), "site-a"), "site-a")


def annotator(email: str, error_rate: float) -> SimulatedAnnotator:
    return SimulatedAnnotator(email, 1, client=None, error_rate=error_rate)


def test_annotators_err_at_their_rate_independently_and_reproducibly():
    classes = ["neutrophil", "lymphocyte", "monocyte"]
    keys = [f"lab:cell{i}@1" for i in range(2000)]
    first, second = annotator("a@x", 0.1), annotator("b@x", 0.1)
    wrong_a = np.array([first.answer("neutrophil", classes, k) != "neutrophil" for k in keys])
    wrong_b = np.array([second.answer("neutrophil", classes, k) != "neutrophil" for k in keys])
    assert 0.08 < wrong_a.mean() < 0.12 and 0.08 < wrong_b.mean() < 0.12
    assert (wrong_a & wrong_b).mean() < 0.03  # independent errors: both wrong about 1 % of the time
    assert [first.answer("neutrophil", classes, k) for k in keys[:50]] == [
        annotator("a@x", 0.1).answer("neutrophil", classes, k) for k in keys[:50]
    ]
    assert all(annotator("c@x", 0.0).answer("monocyte", classes, k) == "monocyte" for k in keys[:200])
    with pytest.raises(ValueError, match="error_rate"):
        SimulatedAnnotator.sign_up("http://127.0.0.1:1", "x@y", "pw", error_rate=1.0)


def test_a_cell_of_a_class_the_task_lacks_is_named_a_new_class():
    from labelstudio.label_config import answer_result, parse_result

    classes = ["neutrophil", "lymphocyte"]
    answers = [annotator("a@x", 0.0).answer("blast", classes, f"k{i}") for i in range(20)]
    assert set(answers) == {"new:blast"}
    assert parse_result(answer_result("new:blast"))[0] == "new:blast"  # what Label Studio gives back, parsed
    assert parse_result(answer_result("lymphocyte"))[0] == "lymphocyte"
    noisy = {annotator("b@x", 0.5).answer("blast", classes, f"k{i}") for i in range(200)}
    assert noisy == {"new:blast", "neutrophil", "lymphocyte"}  # an error is a known class, as a person's would be


def site_rounds() -> list[RoundResult]:
    rounds = []
    for site, base in (("site-a", 0.6), ("site-b", 0.5)):
        rounds.append(RoundResult(0, site, 0, version="1", gate="base", served="1", balanced_accuracy=base, ece=0.2))
        rounds.append(
            RoundResult(
                1,
                site,
                30,
                scored=50,
                routed={"anomaly": 5, "review": 10, "accept": 35},  # 30 % flagged; 20 of 50 sent (the budget filled)
                sent=20,
                annotations=40,
                consensus=18,
                new_class_cells=2,
                anomaly_threshold=1.5,
                blasts={"scored": 4, "anomaly": 3, "sent": 3},
                version="2" if site == "site-a" else "3",
                gate="promoted" if site == "site-a" else "refused (ece worse)",
                served="2" if site == "site-a" else "1",
                balanced_accuracy=base + 0.1,
                ece=0.08,
                ece_calibrated={"mean": 0.1, "low": 0.05, "high": 0.16, "cells": 63.0},
                drift={"mean_confidence": 0.7, "review_fraction": 0.4, "psi_max": 0.1},
                seconds={"score": 3.0},
                not_scored={"held-out": 1, "pool": 2} if site == "site-b" else {},
            )
        )
    return rounds


def test_round_table_and_report(tmp_path):
    from cytoloop.evaluation.loop_report import write_report

    rounds = site_rounds()
    assert rounds[1].routed_fraction == 0.3
    table = round_table(rounds)
    assert "| 1 | site-a | 30 | 50 | 30% | 3/4 | 20 | 40 | 2 | v2 | promoted | v2 | 0.700 | 0.080 | 3 |" in table
    assert "| 0 | site-b | 0 | - | - | - | - | - | - | v1 | base | v1 | 0.500 | 0.200 | 0 |" in table
    rng = np.random.default_rng(0)
    predictions = {(r.site, r.round): (rng.dirichlet(np.ones(3), size=30), rng.integers(0, 3, size=30)) for r in rounds}
    sites = {"site-a": "jtsc, bccd", "site-b": "cellavision"}
    agreement = {
        "status": {"agreed": 18},
        "annotators": {"a@x": {"compared": 20, "agreement": 0.9}},
        "pairs": {"a@x / b@x": {"cells": 20, "agreement": 0.9, "kappa": 0.8}},
        "fleiss_kappa": {"cells": 20, "left_out": 0, "kappa": 0.75},
    }
    urls = {"MLflow experiment": "http://127.0.0.1:5000/#/experiments/1"}
    report = write_report(rounds, predictions, ["a", "b", "c"], tmp_path, "demo", table, sites, agreement, urls)
    text = report.read_text()
    plots = ["learning_curve.png", "blasts.png", "drift_site-a.png", "drift_site-b.png"]
    plots += [f"reliability_{site}_round{n}.png" for site in sites for n in (0, 1)]
    for plot in plots:
        assert (tmp_path / plot).stat().st_size > 1000 and f"({plot})" in text
    floor = "0.100 [0.050, 0.160] (63 cells)"
    assert f"| site-a | 0.600 / 0.200 (v1) | 0.700 / 0.080 (v2) | {floor} | 20 | 1 of 1 | 3 of 4 | 30.0% |" in text
    assert f"| site-b | 0.500 / 0.200 (v1) | 0.600 / 0.080 (v1) | {floor} | 20 | 0 of 1 | 3 of 4 | 30.0% |" in text
    # a rerun in the same home starts from the champion an earlier run left: called the base model, it was not
    from dataclasses import replace

    from cytoloop.evaluation.loop_report import _summary

    kept = [replace(r, gate="kept from an earlier run", served="5") if r.round == 0 else r for r in rounds]
    [(_, header, rows)] = [block for block in _summary(kept, sites) if block[0] == "table"]
    assert header[1] == "round 0: bal. acc. / ECE" and rows[0][1] == "0.600 / 0.200 (v5, an earlier run's champion)"
    # what the routing flagged, and what went to annotators with the budget filled (only the first was shown)
    assert "| 1 | site-a | 4 | 3 | 3 | 2 | 30.0% | 40.0% | 1.5 |" in text
    assert "| a@x / b@x | 20 | 90.0% | 0.800 |" in text and "Fleiss' kappa 0.750" in text
    assert "http://127.0.0.1:5000/#/experiments/1" in text
    assert "Cells Serve could not score, left out of those figures: site-b round 1: 1 held-out, 2 pool." in text
    page = (tmp_path / "report.html").read_text()
    assert page.count('src="data:image/png;base64,') == len(plots)  # self-contained: every plot inlined
    assert "<td>site-a</td>" in page and 'src="blasts.png"' not in page
    # redrawn from rounds.json, as the report's docstring promises (the routed share was not saved: AttributeError)
    from jobs.cycle import rounds_from_json, rounds_json

    saved = rounds_from_json(rounds_json(rounds))  # RoundResult(**row) refused the routed share it holds
    again = write_report(saved, predictions, ["a", "b", "c"], tmp_path / "again", "demo", table, sites, agreement, urls)
    assert again.read_text().replace("again/", "") == text.replace(str(tmp_path), str(tmp_path / "again"))


def test_held_out_answers_of_a_replica_not_yet_switched_are_scored_again(tmp_path, monkeypatch):
    """With several replicas, one that had not switched answered some held-out cells with the old version and the
    round's figures mixed two models; the cells are scored again until every answer is the switched version's,
    and a replica that never switches ends the demo with an error naming the versions."""
    from datetime import UTC, datetime

    from cytoloop.config import Settings
    from cytoloop.models.base import Predictions
    from jobs.cycle import Demo, LoopState
    from jobs.score import PoolScores

    cells = records({"neutrophil": 2, "lymphocyte": 2})
    probs = np.tile([0.9, 0.1], (4, 1))
    answers = [["3", "2", "3", "3"], ["3"] * 4]

    attempts, windows = [], []

    def scored(state, test, site, row, part):
        attempts.append(datetime.now(UTC))
        versions = answers.pop(0) if answers else ["2"] * 4
        return PoolScores(test, Predictions(probs, np.zeros(4), np.ones(4)), versions, {})

    demo = Demo(Settings(home=tmp_path, demo={"serve_switch_timeout_s": 1.0}), tmp_path)
    monkeypatch.setattr(demo, "_score", scored)
    monkeypatch.setattr(demo, "_drift", lambda since, site, version, cells: windows.append(since) or {})
    state = LoopState(None, ["neutrophil", "lymphocyte"], "1", {"north": "3"}, "http://serve", None)
    row = RoundResult(1, "north", 4)
    demo._evaluate(state, "north", cells, row)
    assert answers == [] and not np.isnan(row.balanced_accuracy)  # scored twice: the second time all from v3
    assert attempts[0] < windows[0] <= attempts[1]  # the drift window holds the kept attempt's events only
    with pytest.raises(TimeoutError, match="of 4 held-out cells, 4 by version 2, not 3"):
        demo._evaluate(state, "north", cells, row)  # v2 answers them for ever


def test_a_class_the_base_model_lacks_is_refused_before_any_site_s_sets_are_frozen(tmp_path, cells_dir, tiny_settings):
    """The demo froze each site's sets, then found a site class the base model lacks: the corrected run drew
    another split, which the kept frozen sets could not match, and the home refused every later run."""
    from cytoloop.config import Settings
    from cytoloop.models.baseline import BaselineClassifier
    from jobs.cycle import Demo

    BaselineClassifier(["neutrophil"], tiny_settings.data, tiny_settings.baseline).save(tmp_path / "base")
    classes = ["neutrophil", "lymphocyte", "monocyte", "eosinophil"]
    settings = Settings(home=tmp_path / "home", demo={"base_model": tmp_path / "base", "classes": classes})
    with pytest.raises(DatasetError, match="not classes of the base model"):
        Demo(settings, cells_dir).run()
    assert not (tmp_path / "home" / "frozen").exists()


def test_demo_settings_that_cannot_work_are_refused_before_anything_starts(tmp_path, cells_dir):
    """Fewer simulated annotators than the labels a consensus needs ran the stack, serving and a pool's scoring,
    then stopped with a traceback; a demo site name that is no site name ('../x') became an alias and a folder
    outside home. Both are refused first, naming the setting."""
    from pydantic import ValidationError

    from cytoloop.config import Settings
    from cytoloop.errors import UsageError
    from jobs.cycle import Demo

    three = Settings(home=tmp_path / "home", review={"labels_required": 3})
    with pytest.raises(UsageError, match=r"demo.error_rates has 2 simulated annotators, fewer than .* \(3\)"):
        Demo(three, cells_dir)
    extra = Settings(home=tmp_path / "home", demo={"error_rates": [0.02, 0.1, 0.3]})  # 2 labels a cell: one idle
    with pytest.raises(UsageError, match=r"3 simulated annotators, more than .* \(2\): .* \(rates \[0.3\]\) by none"):
        Demo(extra, cells_dir)
    assert not (tmp_path / "home").exists()
    with pytest.raises(ValidationError, match="invalid site name '../x' in demo.sites"):
        Settings(demo={"sites": {"../x": ["jtsc"]}})
    for title in ("Review {lab}", "Review", "Review {site!r}", "Review {site:>10}", "Review {site} {{x}}"):
        with pytest.raises(ValidationError, match=r"project_title\s+Value error, must hold \{site\} once"):
            Settings(review={"project_title": title})


def test_a_rerun_whose_champion_is_not_the_base_asked_for_is_refused(tmp_path, tiny_settings):
    """A rerun in the same home kept whatever @champion was there: an earlier run's from another base model (or a
    version promoted since) was reported in round 0 as the base model's figures."""
    import torch

    from cytoloop.config import Settings
    from cytoloop.errors import UsageError
    from cytoloop.models.baseline import BaselineClassifier
    from jobs.cycle import Demo

    for seed, directory in ((0, "base"), (1, "other")):
        torch.manual_seed(seed)
        BaselineClassifier(["neutrophil", "lymphocyte"], tiny_settings.data, tiny_settings.baseline).save(
            tmp_path / directory
        )

    def demo(base: str) -> Demo:
        registry = {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db", "cache_dir": tmp_path / "cache"}
        return Demo(Settings(home=tmp_path / "home", registry=registry, demo={"base_model": tmp_path / base}), tmp_path)

    classes, first = demo("base")._register_base()
    assert classes == ["neutrophil", "lymphocyte"]
    assert demo("base")._register_base() == (classes, first)  # the same base: kept, not registered again
    with pytest.raises(UsageError, match=f"is v{first}, not the base model .*other.* registered by a demo from .*base"):
        demo("other")._register_base()


def test_a_cell_serve_refuses_stops_the_wait_for_a_version_at_once(tmp_path):
    """The demo asks Serve which version answers a site with one held-out cell; a cell Serve refuses (a blank
    image: 422) was asked again until the timeout, which then blamed Serve for not switching."""
    from cytoloop.config import Settings
    from jobs.cycle import Demo, DemoStopped
    from tests.faults import ScriptedServer

    server = ScriptedServer()
    detail = b'{"detail": "blank.png: a blank image (every pixel within 2 levels of RGB (230, 225, 228))"}'
    server.script.append((422, "application/json", detail))
    cell = tmp_path / "blank.png"
    cell.write_bytes(b"the bytes Serve refuses")
    demo = Demo(Settings(home=tmp_path, demo={"serve_switch_timeout_s": 60.0}), tmp_path)
    try:
        began = time.monotonic()
        with pytest.raises(DemoStopped, match=r"Serve refused .*blank.png.*north: HTTP 422 .*blank image"):
            demo._wait_served(server.url, None, "3", "north", CellRecord("b", cell, None, "lab"))
        assert time.monotonic() - began < 10  # not the 60 s timeout
        # another program on Serve's port answering 200 with a page: a KeyError (or JSONDecodeError) traceback
        server.script.append((200, "text/html", b"<html><body>Jupyter</body></html>"))
        with pytest.raises(DemoStopped, match=r"answered 200 with no classify answer .* which version serves north"):
            demo._wait_served(server.url, None, "3", "north", CellRecord("b", cell, None, "lab"))
    finally:
        server.close()


def test_a_second_demo_in_the_same_home_is_refused_while_the_first_runs(tmp_path):
    """Two demos in one home routed into the same projects, their annotators labelled each other's tasks, and each
    overwrote the other's rounds, labels and plots: a report could show the other run's reliability diagrams."""
    from cytoloop.config import Settings
    from cytoloop.errors import UsageError
    from cytoloop.files import locked
    from jobs.cycle import Demo
    from tests.faults import held_by_another_thread

    demo = Demo(Settings(home=tmp_path / "home"), tmp_path / "no-data")
    with held_by_another_thread(lambda: locked(demo.dir / ".demo.lock")):  # as the running demo holds it
        with pytest.raises(UsageError, match="another demo runs in this home"):
            demo.run()
    with pytest.raises(DatasetError):  # once it ended, a demo runs (here: to the missing data)
        demo.run()

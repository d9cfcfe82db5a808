"""The demo's pure parts: the one-time split, the simulated annotators' answers, the report."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cytoloop.config import DemoConfig
from cytoloop.data.records import CellRecord, DatasetError
from jobs.cycle import RoundResult, round_table, split_for_demo
from labelstudio.annotators import SimulatedAnnotator


def records(per_class: dict[str, int]) -> list[CellRecord]:
    return [
        CellRecord(f"{label}/{i}.png", Path(f"/cells/{label}/{i}.png"), label, "lab")
        for label, n in per_class.items()
        for i in range(n)
    ]


def test_split_is_disjoint_per_class_and_seeded():
    cells = records({"neutrophil": 20, "lymphocyte": 14})
    config = DemoConfig(seed_per_class=3, test_fraction=0.3)
    split = split_for_demo(cells, config)
    parts = (split.test, split.val, split.eval, split.seed, split.pool)
    ids = [{r.cell_id for r in part} for part in parts]
    assert sum(map(len, ids)) == len(set().union(*ids)) == len(cells)  # disjoint and complete
    assert sorted(r.label for r in split.seed) == ["lymphocyte"] * 3 + ["neutrophil"] * 3
    # 6 neutrophils held out: 2 for the curve, 2 to calibrate, 2 to gate
    assert [sum(r.label == "neutrophil" for r in part) for part in parts[:3]] == [2, 2, 2]
    assert split_for_demo(cells, config) == split
    assert split_for_demo(cells, config.model_copy(update={"seed": 1})).seed != split.seed


def test_a_class_too_small_for_the_split_is_named():
    with pytest.raises(DatasetError, match="'monocyte' has 6 cells"):
        split_for_demo(records({"neutrophil": 20, "monocyte": 6}), DemoConfig(seed_per_class=3))


def test_the_demo_freezes_the_fine_tunes_sets_once(tmp_path):
    from cytoloop.data.records import read_manifest
    from cytoloop.models.finetune import freeze, frozen_directory

    split = split_for_demo(records({"neutrophil": 20, "lymphocyte": 14}), DemoConfig(seed_per_class=3))
    directory = frozen_directory(tmp_path, None)
    assert freeze(directory, split.val, split.eval)
    assert not freeze(directory, split.test, split.test)  # frozen means frozen
    assert [r.path for r in read_manifest(directory / "eval.csv")] == [r.path for r in split.eval]


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


def test_round_table_and_report(tmp_path):
    from cytoloop.evaluation.loop_report import write_report

    rounds = [
        RoundResult(0, 10, version="1", gate="seed", served="1", balanced_accuracy=0.6, ece=0.1),
        RoundResult(
            1,
            30,
            scored=50,
            routed={"review": 20, "accept": 30},
            sent=20,
            annotations=40,
            consensus=18,
            version="2",
            gate="promoted",
            served="2",
            balanced_accuracy=0.7,
            ece=0.08,
            drift={"mean_confidence": 0.7, "review_fraction": 0.4, "psi_max": 0.1},
            seconds={"score": 3.0},
        ),
    ]
    assert rounds[1].routed_fraction == 0.4
    table = round_table(rounds)
    assert "| 1 | 30 | 50 | 40% | 20 | 40 | 18 | v2 | promoted | v2 | 0.700 | 0.080 | 3 |" in table
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(3), size=(2, 30))
    truth = rng.integers(0, 3, size=(2, 30))
    report = write_report(rounds, list(zip(probs, truth)), ["a", "b", "c"], tmp_path, "demo", table)
    text = report.read_text()
    for plot in ("learning_curve.png", "routed.png", "drift.png", "reliability_round0.png", "reliability_round1.png"):
        assert (tmp_path / plot).is_file() and f"({plot})" in text

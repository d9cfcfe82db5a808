"""The differential count and the smear triage, on hand-made cell results."""

from __future__ import annotations

import pytest

from cytoloop.config import DifferentialConfig
from cytoloop.policy.differential import (
    BLASTS_SUSPECTED,
    MANY_FAILED,
    MANY_UNCERTAIN,
    TOO_FEW_CELLS,
    differential,
)
from cytoloop.serving.inference import CellFailure, CellResult

CLASSES = ["lymphocyte", "monocyte", "neutrophil"]


def cell(i: int, label: str, route: str = "accept") -> CellResult:
    return CellResult(i, f"c{i}", f"id{i}", label, {label: 1.0}, 1.0, 0.0, 0.0, route, 1)


def test_percentages_and_routine_smear():
    cells = [cell(i, "neutrophil") for i in range(6)] + [cell(6 + i, "lymphocyte") for i in range(3)]
    cells += [cell(9, "monocyte", "audit"), CellFailure(10, "bad", "not_an_image", "bad: not an image")]
    count = differential(cells, CLASSES, DifferentialConfig(min_cells=10))
    assert (count.n_cells, count.n_classified, count.n_failed) == (11, 10, 1)
    assert count.counts == {"lymphocyte": 3, "monocyte": 1, "neutrophil": 6}
    assert count.percentages == {"lymphocyte": 30.0, "monocyte": 10.0, "neutrophil": 60.0}
    assert count.n_audit == 1 and count.flags == [] and count.triage == "routine"


def test_flags_send_the_smear_to_a_hematologist():
    cells = [cell(i, "neutrophil") for i in range(40)] + [cell(40 + i, "lymphocyte", "anomaly") for i in range(3)]
    cells += [cell(43 + i, "monocyte", "review") for i in range(3)]
    count = differential(
        cells,
        CLASSES,
        DifferentialConfig(min_cells=100, max_review_fraction=0.1, blasts_min_cells=2, blasts_min_fraction=0.05),
    )
    assert count.flags == [TOO_FEW_CELLS, MANY_UNCERTAIN, BLASTS_SUSPECTED]
    assert len(count.reasons) == 3 and "46 classified cells" in count.reasons[0]
    assert "6 of 46" in count.reasons[1] and "3 of 46" in count.reasons[2]
    assert count.triage == "hematologist"


@pytest.mark.parametrize("anomalies, flagged", [(1, False), (2, True)])
def test_blasts_need_the_minimum_number_of_anomalies(anomalies, flagged):
    cells = [cell(i, "neutrophil") for i in range(100)] + [
        cell(100 + i, "monocyte", "anomaly") for i in range(anomalies)
    ]
    count = differential(
        cells,
        CLASSES,
        DifferentialConfig(min_cells=1, max_review_fraction=0.5, blasts_min_cells=2, blasts_min_fraction=0.01),
    )
    assert (BLASTS_SUSPECTED in count.flags) is flagged


def test_no_classified_cell():
    count = differential([CellFailure(0, "x", "truncated", "x: truncated")], CLASSES, DifferentialConfig())
    assert count.percentages == {c: 0.0 for c in CLASSES} and count.flags == [TOO_FEW_CELLS, MANY_FAILED]


@pytest.mark.parametrize("failures, flagged", [(12, False), (13, True)])
def test_a_smear_with_many_failed_cells_is_no_routine_count(failures, flagged):
    """108 cells classified, all confident, were a routine count however many of the smear's cells had failed."""
    cells = [cell(i, "neutrophil") for i in range(108)]
    cells += [CellFailure(108 + i, f"f{i}", "not_an_image", f"f{i}: not an image") for i in range(failures)]
    count = differential(cells, CLASSES, DifferentialConfig(min_cells=100, max_failed_fraction=0.1))
    assert (MANY_FAILED in count.flags) is flagged and count.n_failed == failures
    if flagged:
        assert count.reasons == ["13 of 121 cells failed (11% > 10%)"] and count.triage == "hematologist"

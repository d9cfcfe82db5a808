"""The differential count of one smear, and the triage that lets routine smears through.

A differential is the share of each white-cell class among a smear's classified cells. The triage flags a smear
for a hematologist when it has too few cells to count, too many cells the model was unsure of, too many cells
that failed (the count leaves them out: a smear half unreadable is no routine count of its other half), or enough
anomalous cells (routed 'anomaly': an anomaly score over the threshold, or a class such as blast that always goes
to review) to suspect blasts; otherwise it is routine. Cells that failed are counted, never hidden.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from cytoloop.config import DifferentialConfig
from cytoloop.serving.inference import CellFailure, CellResult

BLASTS_SUSPECTED = "blasts suspected"
TOO_FEW_CELLS = "too few cells"
MANY_UNCERTAIN = "many uncertain cells"
MANY_FAILED = "many failed cells"


@dataclass(frozen=True)
class Differential:
    n_cells: int
    n_classified: int
    n_failed: int
    counts: dict[str, int]
    percentages: dict[str, float]
    n_review: int  # routed 'review' (low confidence)
    n_anomaly: int  # routed 'anomaly'
    n_audit: int  # confident cells drawn for a quality audit; they do not make a smear non-routine
    flags: list[str] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)  # one sentence per flag, with the numbers behind it

    @property
    def triage(self) -> Literal["routine", "hematologist"]:
        return "hematologist" if self.flags else "routine"


def differential(
    cells: Sequence[CellResult | CellFailure], classes: Sequence[str], config: DifferentialConfig
) -> Differential:
    """Count a smear's classified cells per class (every model class listed, zeros included) and triage it."""
    results = [c for c in cells if isinstance(c, CellResult)]
    n = len(results)
    counts = Counter(c.label for c in results)
    routes = Counter(c.route for c in results)
    flags, reasons = [], []
    if n < config.min_cells:
        flags.append(TOO_FEW_CELLS)
        reasons.append(f"{n} classified cells, fewer than the {config.min_cells} a differential needs")
    uncertain = routes["review"] + routes["anomaly"]
    if n and uncertain / n > config.max_review_fraction:
        flags.append(MANY_UNCERTAIN)
        reasons.append(f"{uncertain} of {n} cells need review ({uncertain / n:.0%} > {config.max_review_fraction:.0%})")
    failed = len(cells) - n
    if failed and failed / len(cells) > config.max_failed_fraction:
        flags.append(MANY_FAILED)
        reasons.append(
            f"{failed} of {len(cells)} cells failed ({failed / len(cells):.0%} > {config.max_failed_fraction:.0%})"
        )
    anomalies = routes["anomaly"]
    if n and anomalies >= config.blasts_min_cells and anomalies / n >= config.blasts_min_fraction:
        flags.append(BLASTS_SUSPECTED)
        reasons.append(
            f"{anomalies} of {n} cells anomalous ({anomalies / n:.0%}; flagged from "
            f"{config.blasts_min_cells} cells and {config.blasts_min_fraction:.0%})"
        )
    return Differential(
        n_cells=len(cells),
        n_classified=n,
        n_failed=failed,
        counts={c: counts[c] for c in classes},
        percentages={c: (100.0 * counts[c] / n if n else 0.0) for c in classes},
        n_review=routes["review"],
        n_anomaly=anomalies,
        n_audit=routes["audit"],
        flags=flags,
        reasons=reasons,
    )

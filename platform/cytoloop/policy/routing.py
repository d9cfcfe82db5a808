"""Which scored cells a hematologist sees: a routing decision per cell, and a per-round labelling budget.

Pure functions over numbers (no model, no Label Studio), so the policy can be unit-tested and replayed:

- `anomaly` (highest priority): the anomaly score passes `anomaly_above`, or the predicted class is in
  `always_review` (for example blasts: a confident blast call still needs a human);
- `review`: confidence under `review_below`;
- `audit`: a small random share of the confident rest, so the error rate of auto-accepted cells can be measured.
  The draw is a hash of (seed, cell id): the same cell gets the same answer in every run and on every worker;
- `accept`: everything else.

`select_for_review` then spends a round's budget: anomalies first, then the least confident reviews, then
audits (then, with `fill_budget`, the least confident accepted cells, sent as reviews), spread across predicted
classes and samples, and skipping near-duplicates (cells of one sample and class whose signatures almost
coincide: usually the same cell imaged twice). A signature is any short vector the caller picks: a thumbnail of
the preprocessed image (what the review loop uses); an empty one is like no other (a cell scored elsewhere, with
no image at hand: probability vectors made every confident cell of a class alike).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from cytoloop.config import RoutingConfig

REASONS = ("anomaly", "review", "audit", "accept")


def audit_draw(cell_id: str, seed: int) -> float:
    """A uniform number in [0, 1) fixed by (seed, cell id): the same on every machine and in every run."""
    digest = hashlib.sha256(f"{seed}:{cell_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def route_cell(confidence: float, anomaly: float, label: str, config: RoutingConfig, cell_id: str | None = None) -> str:
    """The routing reason of one cell: 'anomaly', 'review', 'audit' or 'accept'.

    `label` is the predicted class, `anomaly` the model's anomaly score (compare it only with thresholds set for
    the same model). Without a `cell_id` no cell is ever drawn for audit (the draw needs a stable identity).
    """
    if not 0.0 <= confidence <= 1.0:
        raise ValueError(f"confidence must be in [0, 1], got {confidence!r}")
    if label in config.always_review or (config.anomaly_above is not None and anomaly > config.anomaly_above):
        return "anomaly"
    if confidence < config.review_below:
        return "review"
    if cell_id is not None and audit_draw(cell_id, config.seed) < config.audit_fraction:
        return "audit"
    return "accept"


@dataclass(frozen=True)
class ScoredCell:
    """One classified cell as routing sees it. `signature` (for near-duplicates) is compared by mean absolute
    difference; an empty one never matches."""

    cell_id: str
    sample_id: str
    label: str
    confidence: float
    anomaly: float
    signature: tuple[float, ...] = field(default=(), compare=False)


@dataclass(frozen=True)
class RoutedCell:
    cell: ScoredCell
    reason: str


def route_cells(cells: Sequence[ScoredCell], config: RoutingConfig) -> list[RoutedCell]:
    """Route every cell (accepted ones included, so a caller can count them)."""
    return [RoutedCell(c, route_cell(c.confidence, c.anomaly, c.label, config, c.cell_id)) for c in cells]


def _priority(routed: RoutedCell) -> tuple:
    tier = REASONS.index(routed.reason)
    cell = routed.cell
    # anomalies: most anomalous first; reviews and audits: least confident first; cell id breaks ties reproducibly
    key = -cell.anomaly if routed.reason == "anomaly" else cell.confidence
    return (tier, key, cell.cell_id)


def _near_duplicate(a: ScoredCell, b: ScoredCell, distance: float) -> bool:
    if a.sample_id != b.sample_id or a.label != b.label or not a.signature or len(a.signature) != len(b.signature):
        return False
    return sum(abs(x - y) for x, y in zip(a.signature, b.signature)) / len(a.signature) < distance


def select_for_review(
    routed: Sequence[RoutedCell], config: RoutingConfig, budget: int | None = None
) -> list[RoutedCell]:
    """Spend one round's budget on the routed cells; returns the chosen ones in priority order.

    Within a tier (anomaly, review, audit) the next pick is the highest-priority cell among those whose predicted
    class and sample have been picked least so far, so a budget of 20 over 3 classes and 4 samples is spread
    over all of them instead of going to 20 neutrophils of one smear. Near-duplicates of an already chosen cell are
    skipped. Accepted cells are chosen only with `config.fill_budget`, after every other tier, least confident
    first, and come back as reviews (an annotator sees them as one); the routing reason counts of `route_cells`
    still call them accepted. Cells not chosen simply wait for the next round.
    """
    budget = config.budget if budget is None else budget
    if budget < 0:
        raise ValueError(f"budget must be >= 0, got {budget}")
    tiers = REASONS if config.fill_budget else REASONS[:-1]
    candidates = sorted((r for r in routed if r.reason in tiers), key=_priority)
    chosen: list[RoutedCell] = []
    per_class: Counter[str] = Counter()
    per_sample: Counter[str] = Counter()
    for tier in tiers:
        pool = [r if tier != "accept" else RoutedCell(r.cell, "review") for r in candidates if r.reason == tier]
        while pool and len(chosen) < budget:
            best = min(
                range(len(pool)), key=lambda i: (per_class[pool[i].cell.label] + per_sample[pool[i].cell.sample_id], i)
            )
            pick = pool.pop(best)
            if any(_near_duplicate(pick.cell, c.cell, config.near_duplicate) for c in chosen):
                continue
            chosen.append(pick)
            per_class[pick.cell.label] += 1
            per_sample[pick.cell.sample_id] += 1
    return chosen

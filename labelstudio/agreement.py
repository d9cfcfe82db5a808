"""Chance-corrected agreement between annotators, from maintained libraries (scikit-learn, statsmodels).

Raw percent agreement flatters a skewed class mix: two annotators who both call 90 % of cells neutrophils agree on
most cells by chance alone. So the review report adds:

- Cohen's kappa per annotator pair, over the cells both labelled (`sklearn.metrics.cohen_kappa_score`);
- Fleiss' kappa for the project, over the cells with exactly `raters` labels, the number a cell needs before its
  consensus (`statsmodels.stats.inter_rater.fleiss_kappa`; Fleiss needs the same number of raters per cell, so
  cells with more or fewer are left out and counted).

A figure needs at least two cells and two distinct labels among them; otherwise it is None (kappa is undefined
when chance agreement is 1). Each figure comes with the number of cells it rests on.
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import combinations

from cytoloop.policy.consensus import Vote, latest_votes


def pair_kappas(votes: Iterable[Vote]) -> dict[tuple[str, str], dict[str, float | int | None]]:
    """Cohen's kappa for each pair of annotators with cells in common: {"cells", "kappa"}."""
    from sklearn.metrics import cohen_kappa_score

    shared: dict[tuple[str, str], tuple[list[str], list[str]]] = {}
    for cell_votes in latest_votes(votes).values():
        for a, b in combinations(sorted(cell_votes, key=lambda v: v.annotator), 2):
            left, right = shared.setdefault((a.annotator, b.annotator), ([], []))
            left.append(a.label)
            right.append(b.label)
    result: dict[tuple[str, str], dict[str, float | int | None]] = {}
    for pair, (left, right) in sorted(shared.items()):
        defined = len(left) >= 2 and len(set(left) | set(right)) >= 2
        kappa = float(cohen_kappa_score(left, right)) if defined else None
        result[pair] = {"cells": len(left), "kappa": None if kappa is None or kappa != kappa else kappa}
    return result


def fleiss(votes: Iterable[Vote], raters: int) -> dict[str, float | int | None]:
    """Fleiss' kappa over the cells with exactly `raters` distinct annotators: {"cells", "left_out", "kappa"}."""
    from statsmodels.stats.inter_rater import aggregate_raters, fleiss_kappa

    by_cell = latest_votes(votes)
    rows = [[v.label for v in cell_votes] for cell_votes in by_cell.values() if len(cell_votes) == raters]
    left_out = len(by_cell) - len(rows)
    if raters < 2 or len(rows) < 2 or len({label for row in rows for label in row}) < 2:
        return {"cells": len(rows), "left_out": left_out, "kappa": None}
    labels = sorted({label for row in rows for label in row})
    coded = [[labels.index(label) for label in row] for row in rows]
    table, _ = aggregate_raters(coded)
    kappa = float(fleiss_kappa(table, method="fleiss"))
    return {"cells": len(rows), "left_out": left_out, "kappa": None if kappa != kappa else kappa}

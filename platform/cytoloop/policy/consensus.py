"""From several hematologists' labels to one label per cell, and how much each annotator agrees with the others.

Open-source Label Studio has no overlap control and no agreement scores; this module is that part. It is pure
(votes in, decisions out) so the rules are easy to test and to explain:

- a cell needs `required` labels from distinct annotators before it has a consensus (an annotator who labels a
  cell twice counts once, with their latest label);
- the consensus is the label with more votes than any other (a majority; a plurality among 3+ annotators).
  A tie stays open (`status="tie"`) and never becomes training data by a coin flip;
- every cell whose annotators disagree once it has its `required` labels (a third label may still settle one
  still pending), that ends in a tie, or that someone flagged abnormal is surfaced for senior review.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from itertools import combinations

from cytoloop.times import parse_time


@dataclass(frozen=True)
class Vote:
    """One annotator's current label of one cell (a retracted annotation is simply not a vote)."""

    cell_key: str
    annotator: str
    label: str
    abnormal: bool = False
    labelled_at: str = ""


@dataclass
class CellConsensus:
    cell_key: str
    status: str  # "agreed", "tie" or "pending" (fewer labels than required)
    label: str | None
    votes: dict[str, int]
    annotators: list[str]
    abnormal: bool
    last_labelled_at: str
    senior_review: bool = field(default=False)


def latest_votes(votes: Iterable[Vote]) -> dict[str, list[Vote]]:
    """Votes grouped by cell, one per annotator (their latest)."""
    latest: dict[tuple[str, str], Vote] = {}
    for vote in votes:
        key = (vote.cell_key, vote.annotator)
        if key not in latest or parse_time(vote.labelled_at) >= parse_time(latest[key].labelled_at):
            latest[key] = vote
    by_cell: dict[str, list[Vote]] = defaultdict(list)
    for (cell_key, _), vote in sorted(latest.items()):
        by_cell[cell_key].append(vote)
    return dict(by_cell)


def consensus(votes: Iterable[Vote], required: int) -> dict[str, CellConsensus]:
    """The consensus of every cell that has at least one vote."""
    if required < 1:
        raise ValueError(f"required must be >= 1, got {required}")
    result = {}
    for cell_key, cell_votes in latest_votes(votes).items():
        counts = Counter(v.label for v in cell_votes).most_common()
        annotators = [v.annotator for v in cell_votes]
        abnormal = any(v.abnormal for v in cell_votes)
        if len(cell_votes) < required:
            status, label = "pending", None
        elif len(counts) > 1 and counts[0][1] == counts[1][1]:
            status, label = "tie", None
        else:
            status, label = "agreed", counts[0][0]
        disagreement = len(counts) > 1
        result[cell_key] = CellConsensus(
            cell_key=cell_key,
            status=status,
            label=label,
            votes=dict(counts),
            annotators=annotators,
            abnormal=abnormal,
            last_labelled_at=max((v.labelled_at for v in cell_votes), key=parse_time),
            senior_review=status == "tie" or abnormal or (disagreement and status != "pending"),
        )
    return result


def annotator_agreement(votes: Iterable[Vote]) -> dict[str, dict[str, float | int | None]]:
    """Per annotator: on cells others labelled too, how often their label matches the others' majority.

    `compared` counts the cells where the other annotators had a clear majority; `agreement` is the matching
    share (None when nothing could be compared). Leave-one-out keeps an annotator from agreeing with themself.
    """
    matched: Counter[str] = Counter()
    compared: Counter[str] = Counter()
    labelled: Counter[str] = Counter()
    for cell_votes in latest_votes(votes).values():
        for vote in cell_votes:
            labelled[vote.annotator] += 1
            others = Counter(v.label for v in cell_votes if v.annotator != vote.annotator).most_common()
            if not others or (len(others) > 1 and others[0][1] == others[1][1]):
                continue
            compared[vote.annotator] += 1
            matched[vote.annotator] += vote.label == others[0][0]
    return {
        a: {
            "labelled": labelled[a],
            "compared": compared[a],
            "agreement": matched[a] / compared[a] if compared[a] else None,
        }
        for a in sorted(labelled)
    }


def pairwise_agreement(votes: Iterable[Vote]) -> dict[tuple[str, str], dict[str, float | int]]:
    """For each pair of annotators with cells in common: how many they share and the share they label alike."""
    shared: Counter[tuple[str, str]] = Counter()
    same: Counter[tuple[str, str]] = Counter()
    for cell_votes in latest_votes(votes).values():
        for a, b in combinations(sorted(cell_votes, key=lambda v: v.annotator), 2):
            pair = (a.annotator, b.annotator)
            shared[pair] += 1
            same[pair] += a.label == b.label
    return {pair: {"cells": n, "agreement": same[pair] / n} for pair, n in sorted(shared.items())}

"""Consensus and agreement: majority with ties left open, latest label per annotator, senior-review flags."""

from __future__ import annotations

import pytest

from cytoloop.policy.consensus import Vote, annotator_agreement, consensus, pairwise_agreement


def v(cell, who, label, at="2026-01-01T00:00:00", abnormal=False):
    return Vote(cell, who, label, abnormal, at)


def test_majority_tie_and_pending():
    votes = [
        v("agree", "a", "neutrophil"),
        v("agree", "b", "neutrophil"),
        v("tie", "a", "neutrophil"),
        v("tie", "b", "lymphocyte"),
        v("majority", "a", "monocyte"),
        v("majority", "b", "monocyte"),
        v("majority", "c", "lymphocyte"),
        v("one", "a", "neutrophil"),
    ]
    result = consensus(votes, required=2)
    agree = result["agree"]
    assert (agree.status, agree.label, agree.senior_review) == ("agreed", "neutrophil", False)
    assert (result["tie"].status, result["tie"].label, result["tie"].senior_review) == ("tie", None, True)
    assert (result["majority"].status, result["majority"].label) == ("agreed", "monocyte")
    assert result["majority"].senior_review  # a disagreement, even when outvoted, is shown to the senior
    assert (result["one"].status, result["one"].label) == ("pending", None)
    assert consensus(votes, required=1)["one"].label == "neutrophil"


def test_an_annotator_counts_once_with_their_latest_label():
    votes = [
        v("c", "a", "lymphocyte", "2026-01-01"),
        v("c", "a", "neutrophil", "2026-01-02"),
        v("c", "b", "neutrophil", "2026-01-01"),
    ]
    result = consensus(votes, required=2)["c"]
    assert result.votes == {"neutrophil": 2} and result.annotators == ["a", "b"] and result.status == "agreed"
    assert result.last_labelled_at == "2026-01-02"


def test_latest_is_by_time_not_by_text():
    """Label Studio writes '09:00:00.250000Z', or '09:00:00Z' when the microseconds are 0. Compared as text,
    '.' sorts before 'Z', so a label at 09:00:00.25 counted as older than one at 09:00:00, and an annotator's
    correction a moment later could be lost; an offset other than Z was not compared at all."""
    for earlier, later in (
        ("2026-01-01T09:00:00.250000Z", "2026-01-01T09:00:01Z"),
        ("2026-01-01T09:00:00Z", "2026-01-01T09:00:00.250000Z"),
        ("2026-01-01T10:00:00+02:00", "2026-01-01T09:00:00Z"),  # 08:00 UTC, then 09:00 UTC
        ("", "2026-01-01T09:00:00"),  # no time: the earliest; no zone: UTC
    ):
        votes = [v("c", "a", "lymphocyte", earlier), v("c", "a", "neutrophil", later), v("c", "b", "neutrophil")]
        for ordered in (votes, votes[::-1]):
            result = consensus(ordered, required=2)["c"]
            assert (result.status, result.label, result.last_labelled_at) == ("agreed", "neutrophil", later)


def test_abnormal_flag_goes_to_senior_review():
    result = consensus([v("c", "a", "lymphocyte", abnormal=True), v("c", "b", "lymphocyte")], required=2)["c"]
    assert result.label == "lymphocyte" and result.abnormal and result.senior_review


def test_required_must_be_positive():
    with pytest.raises(ValueError, match="required"):
        consensus([], required=0)


def test_agreement_per_annotator_and_pair():
    votes = [
        v("1", "a", "x"),
        v("1", "b", "x"),
        v("1", "c", "y"),
        v("2", "a", "x"),
        v("2", "b", "x"),
        v("2", "c", "x"),
        v("3", "a", "x"),
        v("3", "b", "y"),  # a vs b alone: each compared with the other
    ]
    figures = annotator_agreement(votes)
    assert figures["c"] == {"labelled": 2, "compared": 2, "agreement": 0.5}
    assert figures["a"]["labelled"] == 3 and figures["a"]["compared"] == 2  # cell 1: b and c tie, not compared
    assert figures["a"]["agreement"] == pytest.approx(0.5)
    pairs = pairwise_agreement(votes)
    assert pairs[("a", "b")] == {"cells": 3, "agreement": pytest.approx(2 / 3)}
    assert pairs[("a", "c")] == {"cells": 2, "agreement": 0.5}


def test_chance_corrected_agreement_is_what_the_libraries_compute():
    """Two annotators who both call nearly every cell a neutrophil agree 90 % of the time by chance alone: raw
    agreement says 0.9, Cohen's kappa says they agree no better than chance. Fleiss' kappa for the project uses
    only the cells with the required number of labels, and says how many it left out."""
    from labelstudio.agreement import fleiss, pair_kappas

    votes = []
    for i in range(20):
        a = "lymphocyte" if i == 0 else "neutrophil"
        b = "lymphocyte" if i == 1 else "neutrophil"
        votes += [Vote(f"s:{i}", "ann1", a), Vote(f"s:{i}", "ann2", b)]
    votes.append(Vote("s:extra", "ann1", "monocyte"))  # one label only: not in Fleiss' table
    [(pair, figures)] = pair_kappas(votes).items()
    assert pair == ("ann1", "ann2") and figures["cells"] == 20
    assert figures["kappa"] == pytest.approx(-0.0526, abs=1e-3)  # (0.90 - 0.905) / (1 - 0.905)
    project = fleiss(votes, raters=2)
    assert (project["cells"], project["left_out"]) == (20, 1) and project["kappa"] < 0.0
    perfect = [Vote(f"s:{i}", who, ["a", "b"][i % 2]) for i in range(6) for who in ("x", "y", "z")]
    assert fleiss(perfect, raters=3)["kappa"] == pytest.approx(1.0)
    assert pair_kappas([Vote("s:0", "x", "a"), Vote("s:0", "y", "a")])[("x", "y")]["kappa"] is None  # undefined

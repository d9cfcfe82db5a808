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

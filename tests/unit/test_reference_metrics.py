"""The hand-written metrics against maintained reference implementations (docs/architecture.md says why each
stays hand-written): the same numbers, on random inputs without ties at bin edges."""

from __future__ import annotations

import numpy as np
import pytest

from cytoloop.evaluation import metrics


@pytest.fixture
def predictions():
    rng = np.random.default_rng(7)
    logits = rng.normal(size=(500, 5)) * 2
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    labels = np.where(rng.random(500) < 0.7, probs.argmax(axis=1), rng.integers(0, 5, 500))
    return probs, labels


def test_ece_is_torchmetrics_calibration_error(predictions):
    import torch
    from torchmetrics.functional.classification import multiclass_calibration_error

    probs, labels = predictions
    reference = multiclass_calibration_error(
        torch.tensor(probs), torch.tensor(labels), num_classes=5, n_bins=15, norm="l1"
    )
    assert metrics.expected_calibration_error(probs, labels, n_bins=15) == pytest.approx(float(reference), abs=1e-6)


def test_auroc_nll_brier_and_balanced_accuracy_are_scikit_learns(predictions):
    from sklearn.metrics import balanced_accuracy_score, log_loss, roc_auc_score

    probs, labels = predictions
    positive = labels == 0
    scores = np.round(probs[:, 0], 2)  # rounded: ties, which the Mann-Whitney form counts as 1/2
    assert metrics.auroc(scores, positive) == pytest.approx(roc_auc_score(positive, scores), abs=1e-12)
    assert metrics.negative_log_likelihood(probs, labels) == pytest.approx(log_loss(labels, probs), abs=1e-9)
    one_hot = np.eye(5)[labels]
    assert metrics.brier_score(probs, labels) == pytest.approx(np.mean(np.sum((probs - one_hot) ** 2, 1)))
    recall = metrics.per_class_recall(labels, probs.argmax(axis=1), 5)
    assert np.nanmean(recall) == pytest.approx(balanced_accuracy_score(labels, probs.argmax(axis=1)))


def test_bootstrap_interval_is_scipys_percentile_bootstrap():
    """Same resampling scheme, different random draws: the intervals agree to Monte-Carlo precision."""
    from scipy.stats import bootstrap

    values = np.random.default_rng(3).normal(1.0, 2.0, 400)
    ours = metrics.bootstrap_interval(lambda idx: float(values[idx].mean()), len(values), n_boot=4000, seed=1)
    theirs = bootstrap((values,), np.mean, n_resamples=4000, method="percentile", random_state=2).confidence_interval
    assert ours[0] == pytest.approx(theirs.low, abs=0.03) and ours[1] == pytest.approx(theirs.high, abs=0.03)

"""Classification, calibration and anomaly metrics on numpy arrays.

Shared by the evaluation of the diffusion classifier and of the CNN baseline, so both are
scored by exactly the same code. Conventions:

* labels are integer class indices in ``[0, n_classes)``;
* ``probs`` is an ``(N, K)`` array of class probabilities whose rows sum to 1 (within 1e-4);
* the predicted label of a probability row is its argmax (the first class on ties);
* every function raises ``ValueError`` naming the offending argument on bad input
  (empty arrays, wrong shapes, mismatched lengths, labels out of range).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection
from typing import Literal

import numpy as np

_ROW_SUM_TOL = 1e-4


def _labels(y: np.ndarray, name: str, n_classes: int | None = None) -> np.ndarray:
    """Check a non-empty 1-D array of integer class labels (optionally within ``[0, n_classes)``)."""
    y = np.asarray(y)
    if y.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {y.shape}")
    if y.size == 0:
        raise ValueError(f"{name} is empty")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{name} must hold integer class labels, got dtype {y.dtype}")
    if n_classes is not None and (y.min() < 0 or y.max() >= n_classes):
        raise ValueError(f"{name} has labels outside [0, {n_classes}): min {y.min()}, max {y.max()}")
    return y


def _probs(probs: np.ndarray) -> np.ndarray:
    """Check a non-empty ``(N, K)`` array of finite, non-negative rows that sum to 1."""
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[1] == 0:
        raise ValueError(f"probs must have shape (N, K) with K >= 1, got {probs.shape}")
    if probs.shape[0] == 0:
        raise ValueError("probs is empty")
    if not np.all(np.isfinite(probs)):
        raise ValueError("probs contains NaN or infinite values")
    if probs.min() < 0:
        raise ValueError(f"probs must be non-negative, got min {probs.min()}")
    worst = np.abs(probs.sum(axis=1) - 1.0).max()
    if worst > _ROW_SUM_TOL:
        raise ValueError(f"probs rows must sum to 1 within {_ROW_SUM_TOL}, worst deviation {worst:.3g}")
    return probs


def _same_length(a: np.ndarray, b: np.ndarray, name_a: str, name_b: str) -> None:
    if len(a) != len(b):
        raise ValueError(f"{name_a} and {name_b} differ in length: {len(a)} vs {len(b)}")


def _probs_and_labels(probs: np.ndarray, y_true: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    probs = _probs(probs)
    y_true = _labels(y_true, "y_true", probs.shape[1])
    _same_length(probs, y_true, "probs", "y_true")
    return probs, y_true


def _binary(x: np.ndarray, name: str) -> np.ndarray:
    """Check a non-empty 1-D array of booleans (or 0/1 values) and return it as bool."""
    x = np.asarray(x)
    if x.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {x.shape}")
    if x.size == 0:
        raise ValueError(f"{name} is empty")
    if x.dtype != np.bool_ and not np.all((x == 0) | (x == 1)):
        raise ValueError(f"{name} must be boolean or hold only 0/1 values")
    return x.astype(bool)


def _scores(x: np.ndarray, name: str) -> np.ndarray:
    """Check a non-empty 1-D array of finite real numbers."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {x.shape}")
    if x.size == 0:
        raise ValueError(f"{name} is empty")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return x


def _confidence(x: np.ndarray) -> np.ndarray:
    """Check a non-empty 1-D array of probabilities (top-label confidences, in [0, 1])."""
    x = _scores(x, "confidence")
    if x.min() < 0.0 or x.max() > 1.0:
        raise ValueError(f"confidence must lie in [0, 1], got min {x.min():.3g}, max {x.max():.3g}")
    return x


# --------------------------------------------------------------------------- classification


def accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Fraction of cells whose predicted label equals the true label."""
    y_true = _labels(y_true, "y_true")
    y_pred = _labels(y_pred, "y_pred")
    _same_length(y_true, y_pred, "y_true", "y_pred")
    return float(np.mean(y_true == y_pred))


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """``(n_classes, n_classes)`` int64 counts; rows are true classes, columns predicted classes."""
    if n_classes < 1:
        raise ValueError(f"n_classes must be >= 1, got {n_classes}")
    y_true = _labels(y_true, "y_true", n_classes)
    y_pred = _labels(y_pred, "y_pred", n_classes)
    _same_length(y_true, y_pred, "y_true", "y_pred")
    flat = np.bincount(y_true.astype(np.int64) * n_classes + y_pred, minlength=n_classes * n_classes)
    return flat.reshape(n_classes, n_classes).astype(np.int64)


def per_class_recall(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """Recall of each class; NaN for classes that never occur in ``y_true`` (recall is undefined)."""
    cm = confusion_matrix(y_true, y_pred, n_classes)
    support = cm.sum(axis=1)
    recall = np.full(n_classes, np.nan)
    present = support > 0
    recall[present] = np.diag(cm)[present] / support[present]
    return recall


def balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> float:
    """Mean recall over the classes present in ``y_true``; absent classes are ignored, not scored 0."""
    return float(np.nanmean(per_class_recall(y_true, y_pred, n_classes)))


# --------------------------------------------------------------------------- calibration


def reliability_bins(probs: np.ndarray, y_true: np.ndarray, n_bins: int = 15) -> dict[str, np.ndarray]:
    """Top-label confidence histogram, the single source of the binning used by the ECE.

    Bins are equal-width over (0, 1]: bin ``i`` holds confidences in ``(i/n_bins, (i+1)/n_bins]``
    (a confidence of exactly 0 goes to the first bin). Returns arrays of length ``n_bins``:
    ``bin_lower``, ``bin_upper``, ``confidence`` (mean top-label probability, NaN if the bin is
    empty), ``accuracy`` (fraction of argmax predictions that are right, NaN if empty), ``count``.
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    probs, y_true = _probs_and_labels(probs, y_true)
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == y_true).astype(np.float64)

    # Edges as i / n_bins (correctly rounded), so a confidence such as 0.3 lands in (0.2, 0.3].
    edges = np.arange(n_bins + 1) / n_bins
    bin_of = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, n_bins - 1)

    count = np.bincount(bin_of, minlength=n_bins)
    conf_sum = np.bincount(bin_of, weights=confidence, minlength=n_bins)
    correct_sum = np.bincount(bin_of, weights=correct, minlength=n_bins)
    mean_conf = np.full(n_bins, np.nan)
    mean_acc = np.full(n_bins, np.nan)
    filled = count > 0
    mean_conf[filled] = conf_sum[filled] / count[filled]
    mean_acc[filled] = correct_sum[filled] / count[filled]
    return {
        "bin_lower": edges[:-1],
        "bin_upper": edges[1:],
        "confidence": mean_conf,
        "accuracy": mean_acc,
        "count": count,
    }


def expected_calibration_error(probs: np.ndarray, y_true: np.ndarray, n_bins: int = 15) -> float:
    """Top-label ECE: sum over bins of ``count/N * |accuracy - confidence|`` (bins of ``reliability_bins``)."""
    bins = reliability_bins(probs, y_true, n_bins)
    filled = bins["count"] > 0
    gaps = np.abs(bins["accuracy"][filled] - bins["confidence"][filled])
    return float(np.sum(bins["count"][filled] * gaps) / bins["count"].sum())


def calibrated_ece(
    probs: np.ndarray, n_bins: int = 15, draws: int = 1000, seed: int = 0, alpha: float = 0.05
) -> tuple[float, float, float]:
    """The ECE that a perfectly calibrated model making exactly these predictions would show on this many cells:
    (mean, low, high), the range at level ``1 - alpha`` over ``draws`` simulated label sets.

    ECE measured on few cells is biased upwards: each bin's accuracy is a noisy proportion, and the absolute gap
    keeps the noise. Each draw marks every cell correct with probability its top-label confidence (which is what
    calibrated means) and computes the top-label ECE with the same bins. A measured ECE inside the range is what
    sampling alone gives; a target below the mean is one a perfect model meets on these cells only by luck (with
    typical confidences, 63 cells and a 0.08 target: about one draw in five).
    Deterministic for a given ``seed``.
    """
    probs = _probs(probs)
    if probs.shape[1] < 2:
        raise ValueError(f"probs needs at least 2 classes, got {probs.shape[1]}")
    return calibrated_ece_of_confidence(probs.max(axis=1), n_bins, draws, seed, alpha)


def calibrated_ece_of_confidence(
    confidence: np.ndarray, n_bins: int = 15, draws: int = 1000, seed: int = 0, alpha: float = 0.05
) -> tuple[float, float, float]:
    """`calibrated_ece` from top-label confidences alone (what a prediction log holds)."""
    if draws < 1:
        raise ValueError(f"draws must be >= 1, got {draws}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    confidence = _confidence(confidence)
    rng = np.random.default_rng(seed)
    values = [top_label_ece(confidence, rng.random(len(confidence)) < confidence, n_bins) for _ in range(draws)]
    low, high = np.quantile(values, [alpha / 2.0, 1.0 - alpha / 2.0])
    return float(np.mean(values)), float(low), float(high)


def top_label_ece(confidence: np.ndarray, correct: np.ndarray, n_bins: int = 15) -> float:
    """`expected_calibration_error` from top-label confidences and correctness (the bins of `reliability_bins`)."""
    confidence, correct = _confidence(confidence), _binary(correct, "correct")
    _same_length(confidence, correct, "confidence", "correct")
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    edges = np.arange(n_bins + 1) / n_bins
    bin_of = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, n_bins - 1)
    count = np.bincount(bin_of, minlength=n_bins)
    gap = np.abs(np.bincount(bin_of, correct.astype(float), n_bins) - np.bincount(bin_of, confidence, n_bins))
    return float(gap.sum() / count.sum())


def negative_log_likelihood(probs: np.ndarray, y_true: np.ndarray, eps: float = 1e-12) -> float:
    """Mean of ``-log p(true class)``; probabilities are floored at ``eps`` so a 0 gives a large finite value."""
    probs, y_true = _probs_and_labels(probs, y_true)
    p_true = probs[np.arange(len(y_true)), y_true]
    return float(-np.mean(np.log(np.maximum(p_true, eps))))


def brier_score(probs: np.ndarray, y_true: np.ndarray) -> float:
    """Mean over cells of the summed squared error against the one-hot label (range [0, 2])."""
    probs, y_true = _probs_and_labels(probs, y_true)
    one_hot = np.zeros_like(probs)
    one_hot[np.arange(len(y_true)), y_true] = 1.0
    return float(np.mean(np.sum((probs - one_hot) ** 2, axis=1)))


def entropy(probs: np.ndarray) -> np.ndarray:
    """Shannon entropy of each row in nats (natural log), with ``0 * log 0 = 0``."""
    probs = _probs(probs)
    safe = np.where(probs > 0, probs, 1.0)
    return -np.sum(probs * np.log(safe), axis=1)


# --------------------------------------------------------------------------- ranking / anomaly


def auroc(scores: np.ndarray, is_positive: np.ndarray) -> float:
    """Area under the ROC curve, higher score meaning "more positive".

    Computed as the Mann-Whitney statistic with average ranks, i.e. the probability that a random
    positive outscores a random negative, a tie counting 1/2. Raises ``ValueError`` if
    ``is_positive`` holds only one class (the AUROC is undefined then).
    """
    scores = _scores(scores, "scores")
    is_positive = _binary(is_positive, "is_positive")
    _same_length(scores, is_positive, "scores", "is_positive")
    n_pos = int(is_positive.sum())
    n_neg = len(is_positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"auroc needs both positives and negatives, got {n_pos} positive and {n_neg} negative")
    # Average 1-based rank of each distinct score: tied scores share the mean of their ranks.
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    mean_rank = ends - (counts - 1) / 2.0
    ranks = mean_rank[inverse]
    u = ranks[is_positive].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def selective_accuracy(confidence: np.ndarray, correct: np.ndarray, coverage: float) -> float:
    """Accuracy on the ``ceil(coverage * N)`` most confident cells (``0 < coverage <= 1``).

    Equal confidences are ranked by original order (stable sort), so the result is deterministic.
    ``coverage * N`` is rounded to 9 decimals before the ceiling so that e.g. 0.3 * 10 accepts 3.
    """
    if not 0.0 < coverage <= 1.0:
        raise ValueError(f"coverage must be in (0, 1], got {coverage}")
    confidence = _scores(confidence, "confidence")
    correct = _binary(correct, "correct")
    _same_length(confidence, correct, "confidence", "correct")
    n_accept = math.ceil(round(coverage * len(confidence), 9))
    order = np.argsort(-confidence, kind="stable")
    return float(np.mean(correct[order[:n_accept]]))


# --------------------------------------------------------------------------- uncertainty


def bootstrap_interval(
    values_fn: Callable[[np.ndarray], float],
    n: int,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    strata: np.ndarray | None = None,
    method: Literal["percentile", "basic"] = "percentile",
) -> tuple[float, float]:
    """Bootstrap ``(low, high)`` interval at level ``1 - alpha``: the percentile interval, or the basic (pivotal)
    one, ``2 * estimate - (high, low)`` around the estimate on all items, for a statistic whose estimator is
    biased on few items so that each resample biases it once more (a difference of binned ECEs: sampling noise
    raises a calibrated model's ECE and is absorbed by a miscalibrated one's gap, so the difference shrinks
    toward 0, and the percentile interval sat below even the shrunk estimate).

    ``values_fn`` receives an index array of length ``n`` drawn with replacement from ``range(n)``
    and returns the statistic on that resample; it must cope with any resample (e.g. a metric that
    needs both classes may raise). With ``strata`` (one value per item, e.g. each cell's true class) every
    resample keeps each stratum's size (`resample`). Deterministic for a given ``seed``.
    """
    _check_bootstrap(n, n_boot, alpha)
    if method not in ("percentile", "basic"):
        raise ValueError(f"method must be 'percentile' or 'basic', got {method!r}")
    rng = np.random.default_rng(seed)
    groups = _strata_groups(n, strata)
    stats = np.array([values_fn(resample(rng, groups)) for _ in range(n_boot)], dtype=np.float64)
    low, high = np.quantile(stats, [alpha / 2.0, 1.0 - alpha / 2.0])
    if method == "basic":
        low, high = _basic(values_fn(np.arange(n)), low, high)
    return float(low), float(high)


def _basic(estimate: float, low: float, high: float) -> tuple[float, float]:
    """The basic (pivotal) interval from a resampled statistic's percentile ends: reflected about the estimate."""
    return 2.0 * estimate - high, 2.0 * estimate - low


def resample(rng: np.random.Generator, groups: list[np.ndarray]) -> np.ndarray:
    """One bootstrap resample: each group's indices drawn with replacement, as many as the group holds.

    Stratified by true class, a resample of a gate set always holds every class: drawn from all cells at once, it
    misses a class of 3 cells in 60 one time in twenty, and balanced accuracy, averaged over the classes a
    resample holds, then drops that class's errors with it (a challenger that lost a rare class entirely got an
    interval reaching 0 and passed the gate)."""
    return np.concatenate([group[rng.integers(0, len(group), size=len(group))] for group in groups])


def _strata_groups(n: int, strata: np.ndarray | None) -> list[np.ndarray]:
    if strata is None:
        return [np.arange(n)]
    strata = np.asarray(strata)
    if strata.shape != (n,):
        raise ValueError(f"strata must hold one value per item ({n}), got shape {strata.shape}")
    return [np.flatnonzero(strata == value) for value in np.unique(strata)]


def _check_bootstrap(n: int, n_boot: int, alpha: float) -> None:
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")


def bootstrap_intervals(
    statistics: Callable[[np.ndarray], dict[str, float]],
    n: int,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    strata: np.ndarray | None = None,
    basic: Collection[str] = (),
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap intervals of several statistics computed on the same resamples; for the statistics
    named in ``basic`` (statistics that are never below 0), the basic (pivotal) interval around the estimate on all
    items (`bootstrap_interval`), its low end clipped at 0 (and, should its top reflect below 0, as for an estimate
    near 0 that most resamples exceed, from 0 to the percentile interval's top): for a statistic a resample biases
    once more, as ECE (resampled, a calibrated model's cells look less calibrated), whose percentile interval leans
    upward: more room above the estimate than below, as if the model were worse calibrated than measured.
    (Reflected, the basic interval holds the estimate exactly when the percentile one does; the bias correction is
    what it buys.)

    ``statistics`` receives an index array (``n`` draws with replacement) and returns named values; a value that
    is NaN on a resample (a class drawn zero times) is left out of that statistic's quantiles. A statistic NaN on
    every resample gets ``(nan, nan)``. With ``strata`` every resample keeps each stratum's size (`resample`):
    by true class, a class's recall is never missing from a resample. Deterministic for a given ``seed``.
    """
    _check_bootstrap(n, n_boot, alpha)
    rng = np.random.default_rng(seed)
    groups = _strata_groups(n, strata)
    draws: dict[str, list[float]] = {}
    for _ in range(n_boot):
        for name, value in statistics(resample(rng, groups)).items():
            draws.setdefault(name, []).append(float(value))
    estimates = statistics(np.arange(n)) if basic else {}
    out = {}
    for name, values in draws.items():
        finite = np.asarray(values)[~np.isnan(values)]
        low, high = np.quantile(finite, [alpha / 2.0, 1.0 - alpha / 2.0]) if len(finite) else (np.nan, np.nan)
        if name in basic and len(finite):
            reflected_low, reflected_high = _basic(estimates[name], low, high)
            # an estimate near 0 below most resamples reflects to a top below 0: then from 0 to the percentile top
            low, high = max(0.0, reflected_low), (reflected_high if reflected_high >= 0.0 else high)
        out[name] = (float(low), float(high))
    return out

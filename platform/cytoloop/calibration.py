"""Calibration: turning scores into probabilities a hematologist can take at face value.

Two things are fitted on the validation part of the split, never on test data:
- timestep weights w(t) for the diffusion classifier: each stratum of timesteps is weighted by how well it
  separates the true class from the others (mean margin over its variance, the optimal weight for combining
  independent noisy measurements), so uninformative timesteps stop diluting the decision;
- a temperature T for both models: probabilities are softmax(logits / T) with T minimising validation NLL.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize_scalar

from cytoloop.scoring import TrialLog


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature T > 0 minimising the NLL of softmax(logits / T) on labelled validation cells."""
    if len(logits) == 0:
        raise ValueError("cannot fit a temperature on zero validation cells")

    def nll(log_t: float) -> float:
        probs = softmax(logits / np.exp(log_t))
        return float(-np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, None)).mean())

    result = minimize_scalar(nll, bounds=(-12.0, 8.0), method="bounded")
    return float(np.exp(result.x))


def fit_timestep_weights(logs: list[TrialLog], labels: np.ndarray, bins: int) -> np.ndarray:
    """Per-stratum weights from exhaustive trials on labelled cells, normalised to mean 1.

    For each trial the margin is the mean error of the wrong classes minus the true class's error; a stratum with
    mean margin mu and variance var gets weight max(mu, 0) / var. Strata never sampled, or all non-informative,
    fall back to uniform weights.
    """
    margins: list[list[float]] = [[] for _ in range(bins)]
    for log, label in zip(logs, labels):
        for stratum, errors in zip(log.strata, log.errors):
            wrong = np.delete(errors, label)
            wrong = wrong[~np.isnan(wrong)]
            if len(wrong) and not np.isnan(errors[label]):
                margins[stratum].append(float(wrong.mean() - errors[label]))
    weights = np.zeros(bins)
    for b, values in enumerate(margins):
        if len(values) >= 2:
            weights[b] = max(np.mean(values), 0.0) / (np.var(values, ddof=1) + 1e-12)
    if weights.sum() <= 0:
        return np.ones(bins)
    return weights / weights.mean()


def calibrate(model, images: np.ndarray, labels: np.ndarray, progress: bool = False):
    """Fit a model's calibration on labelled validation cells, in place; returns the model.

    Diffusion: timestep weights from exhaustive trials, then the temperature on the scores the model will
    actually produce (adaptive, with those weights). Baseline: the temperature on its logits.
    """
    if model.kind == "diffusion":
        trials = model.scoring_config.calibration_trials
        exhaustive = model.scoring_config.model_copy(update={"min_trials": trials, "max_trials": trials})
        model.timestep_weights = None
        result = model.score(images, exhaustive, progress=progress)
        bins = model.scoring_config.timestep_bins
        model.timestep_weights = fit_timestep_weights(result.logs, labels, bins).tolist()
        model.temperature = fit_temperature(-model.score(images, progress=progress).class_error, labels)
    else:
        model.temperature = fit_temperature(model.logits(images), labels)
    return model

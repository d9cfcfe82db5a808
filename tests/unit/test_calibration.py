"""Calibration: temperature scaling recovers a known temperature; timestep weights favour informative strata."""

from __future__ import annotations

import numpy as np
import pytest

from cytoloop.scoring.calibration import fit_temperature, fit_timestep_weights, softmax
from cytoloop.scoring.trials import TrialLog


def _sample_labels(logits: np.ndarray, temperature: float, rng: np.random.Generator) -> np.ndarray:
    probs = softmax(logits / temperature)
    cumulative = probs.cumsum(axis=1)
    u = rng.random((len(logits), 1))
    return np.minimum((u > cumulative).sum(axis=1), logits.shape[1] - 1)


@pytest.mark.parametrize("true_t", [0.5, 2.0, 4.0])
def test_fit_temperature_recovers_known_temperature(true_t):
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3.0, size=(4000, 5))
    labels = _sample_labels(logits, true_t, rng)
    fitted = fit_temperature(logits, labels)
    assert fitted == pytest.approx(true_t, rel=0.2)


def test_fit_temperature_is_scale_equivariant():
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 2.0, size=(2000, 3))
    labels = _sample_labels(logits, 1.5, rng)
    assert fit_temperature(3 * logits, labels) == pytest.approx(3 * fit_temperature(logits, labels), rel=1e-3)


def test_fit_temperature_needs_cells():
    with pytest.raises(ValueError, match="zero"):
        fit_temperature(np.zeros((0, 3)), np.zeros(0, dtype=int))


def test_fit_temperature_refuses_rows_it_cannot_fit_on_and_takes_classes_out_of_play():
    """One NaN row, or one whose every class is -inf, made the NLL NaN and the search stopped anywhere (T = 0.013
    for a true 2: a model 150x too sure of itself); fewer labels than rows fitted on the first rows alone. A -inf
    for a class never in play (candidate classes) is fine."""
    rng = np.random.default_rng(2)
    logits = rng.normal(0, 3.0, size=(2000, 5))
    labels = _sample_labels(logits, 2.0, rng)
    for row in (np.full(5, np.nan), np.full(5, -np.inf), np.array([0, 1, np.inf, 0, 0])):
        with pytest.raises(ValueError, match=r"1 of 2000 cells have no usable logits .*, first at row 7"):
            fit_temperature(np.vstack([logits[:7], row, logits[8:]]), labels)
    with pytest.raises(ValueError, match="for 10 labels"):
        fit_temperature(logits, labels[:10])
    out_of_play = logits.copy()
    out_of_play[:, 4] = -np.inf  # never a candidate
    fitted = fit_temperature(out_of_play, np.minimum(labels, 3))
    assert 1.0 < fitted < 4.0


def test_one_confidently_wrong_cell_does_not_make_the_fitted_model_certain():
    """The NLL clipped each probability at 1e-12, capping a confidently wrong cell's cost at 27.6 nats whatever
    T: with one such cell among 200 otherwise easy ones the clipped loss fell toward the smallest T searched, and
    the fit returned 6e-6 where the NLL's minimum is at 1.2e-4 (a model 20x too sure, NLL 2.43 for 0.17). A cell
    whose labelled class was never in play (-inf) still counts for nothing."""
    from scipy.special import logsumexp

    rng = np.random.default_rng(0)
    logits = -rng.uniform(0.0002, 0.002, size=(200, 5))  # errors of a diffusion model: thousandths apart
    labels = rng.integers(0, 5, 200)
    logits[np.arange(200), labels] = 0.0
    labels[0] = (labels[0] + 1) % 5  # one cell labelled a class 0.003 behind the one the model is sure of
    logits[0, labels[0]] = -0.003

    def nll(t: float) -> float:
        scaled = logits / t
        return float((logsumexp(scaled, axis=1) - scaled[np.arange(200), labels]).mean())

    grid = np.exp(np.linspace(np.log(1e-5), np.log(1e-2), 3001))
    best = grid[np.argmin([nll(t) for t in grid])]
    assert fit_temperature(logits, labels) == pytest.approx(best, rel=0.01)
    never = np.vstack([logits, np.r_[0.0, -0.001, -np.inf, -0.001, -0.001]])  # its class (2) never in play
    assert fit_temperature(never, np.r_[labels, 2]) == pytest.approx(best, rel=0.01)
    with pytest.raises(ValueError, match="no cell's label is a class in play"):
        fit_temperature(never[-1:], np.array([2]))


def _logs(n_cells: int, n_trials: int, rng: np.random.Generator) -> tuple[list[TrialLog], np.ndarray]:
    """Three classes, two strata. Stratum 0: the true class's error is consistently 0.3 lower.
    Stratum 1: no margin at all (pure noise). Stratum 2 is never visited."""
    logs, labels = [], rng.integers(0, 3, n_cells)
    for label in labels:
        log = TrialLog()
        for k in range(n_trials):
            stratum = k % 2
            errors = 1.0 + rng.normal(0, 0.05, 3)
            if stratum == 0:
                errors[label] -= 0.3
            log.strata.append(stratum)
            log.errors.append(errors)
            log.null_errors.append(1.0)
        logs.append(log)
    return logs, labels


def test_timestep_weights_favour_informative_stratum():
    rng = np.random.default_rng(0)
    logs, labels = _logs(20, 10, rng)
    weights = fit_timestep_weights(logs, labels, bins=3)
    assert weights.shape == (3,)
    assert weights[0] > 10 * weights[1]
    assert weights.mean() == pytest.approx(1.0)
    assert (weights >= 0).all()


def test_timestep_weights_uniform_without_information():
    rng = np.random.default_rng(0)
    logs, labels = _logs(5, 4, rng)
    # wrong labels everywhere: the "true" class is never better, so no stratum is informative
    wrong = (labels + 1) % 3
    for log, label in zip(logs, wrong):
        for errors in log.errors:
            errors[label] += 1.0
    np.testing.assert_array_equal(fit_timestep_weights(logs, wrong, bins=3), np.ones(3))


def test_timestep_weights_ignore_eliminated_classes():
    """NaN errors (classes eliminated) are left out of the margin, not propagated."""
    log = TrialLog(
        strata=[0, 0, 1, 1],
        errors=[
            np.array([0.5, 1.0, 1.1]),
            np.array([0.5, 1.2, np.nan]),
            np.array([1.0, 1.0, 1.0]),
            np.array([1.1, 0.9, np.nan]),
        ],
        null_errors=[1.0] * 4,
    )
    weights = fit_timestep_weights([log], np.array([0]), bins=2)
    assert np.isfinite(weights).all()
    assert weights[0] > 0 and weights[1] == 0


def test_a_temperature_prior_keeps_a_few_right_cells_from_making_the_model_certain():
    from cytoloop.scoring.calibration import fit_temperature

    rng = np.random.default_rng(0)
    labels = np.arange(6) % 3
    logits = rng.normal(0, 1, size=(6, 3))
    logits[np.arange(6), labels] += 2.0  # all six classified right
    alone = fit_temperature(logits, labels)
    assert alone < 0.15  # the NLL alone: far sharper than any prior would allow
    pulled = fit_temperature(logits, labels, prior=1.0, prior_cells=20)
    assert 0.3 < pulled < 1.0
    # with many cells the data win over the same prior
    many = np.tile(labels, 200)
    noisy = rng.normal(0, 1, size=(len(many), 3))
    noisy[np.arange(len(many)), many] += 0.5
    data, both = fit_temperature(noisy, many), fit_temperature(noisy, many, prior=10.0, prior_cells=20)
    assert abs(np.log(both / data)) < 0.5 * abs(np.log(both / 10.0))


def test_even_subset_draws_every_class_as_evenly_as_its_cells_allow():
    from cytoloop.scoring.calibration import even_subset

    labels = np.array([0] * 50 + [1] * 3 + [2] * 20)
    chosen = even_subset(labels, 12, seed=1)
    assert len(chosen) == 12 and len(set(chosen.tolist())) == 12
    assert np.bincount(labels[chosen]).tolist() == [5, 3, 4]  # round-robin over classes until one runs out
    assert even_subset(labels, 12, seed=1).tolist() == chosen.tolist()  # seeded
    assert even_subset(labels, None).tolist() == list(range(73))
    assert even_subset(labels, 100).tolist() == list(range(73))

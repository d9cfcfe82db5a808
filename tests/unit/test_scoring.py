"""Diffusion scoring: adaptive elimination, seeded determinism, probabilities, config checks, log summaries.

Most tests use a fake denoiser that knows the true noise and adds a class-dependent error, so the right answer is
known; the determinism and probability tests use a tiny untrained diffusers UNet (16 px).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from cytoloop.config import DataConfig, DiffusionModelConfig, ScoringConfig
from cytoloop.models.diffusion import DiffusionClassifier, build_scheduler
from cytoloop.scoring.trials import TrialLog, decide, score_cells, summarise_log, trial_disagreement

N_CLASSES = 4
NULL = N_CLASSES
WINNER = 2
SIZE = 16


class FakeDenoiser:
    """Predicts the true noise of a known clean image plus a class-dependent perturbation.

    The perturbation's std is small for WINNER, larger for the null class and largest for the others, so the
    expected masked squared error is sigma_c**2: class 2 clearly best. Counts every input it receives.
    """

    sigmas = {WINNER: 0.1, NULL: 0.4}
    other_sigma = 0.6

    def __init__(self, x0: torch.Tensor, alphas_cumprod: torch.Tensor, seed: int = 123):
        self.x0 = x0
        self.alphas_cumprod = alphas_cumprod
        self.generator = torch.Generator().manual_seed(seed)
        self.inputs = 0
        self.calls = 0
        self.classes_seen: list[int] = []

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.inputs += x_t.shape[0]
        self.classes_seen.extend(c.tolist())
        abar = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        noise = (x_t - abar.sqrt() * self.x0) / (1 - abar).sqrt()
        sigma = torch.tensor([self.sigmas.get(int(k), self.other_sigma) for k in c]).view(-1, 1, 1, 1)
        return noise + sigma * torch.randn(x_t.shape, generator=self.generator)


@pytest.fixture(scope="module")
def alphas_cumprod() -> torch.Tensor:
    return build_scheduler(DiffusionModelConfig()).alphas_cumprod


@pytest.fixture(scope="module")
def x0() -> torch.Tensor:
    return torch.rand((3, SIZE, SIZE), generator=torch.Generator().manual_seed(7)) * 2 - 1


def _config(**update) -> ScoringConfig:
    base = dict(min_trials=4, max_trials=20, check_every=2, timestep_bins=4, batch_size=64, seed=0)
    base.update(update)
    return ScoringConfig(**base)


def _score_fake(x0, alphas_cumprod, config, n_cells=1):
    fake = FakeDenoiser(x0, alphas_cumprod)
    images = x0.expand(n_cells, *x0.shape).clone()
    result = score_cells(fake, alphas_cumprod, images, N_CLASSES, NULL, config)
    return result, fake


# --------------------------------------------------------------------------- adaptive elimination


def _evals_in_log(log) -> int:
    """Denoiser inputs a log accounts for: every measured class error and every measured null error."""
    return int((~np.isnan(np.stack(log.errors))).sum() + (~np.isnan(np.asarray(log.null_errors, float))).sum())


def test_exhaustive_and_adaptive_agree_on_clear_winner(x0, alphas_cumprod):
    exhaustive, fake_ex = _score_fake(x0, alphas_cumprod, _config(min_trials=20, max_trials=20))
    adaptive, fake_ad = _score_fake(x0, alphas_cumprod, _config())

    assert int(np.argmin(exhaustive.class_error[0])) == WINNER
    assert int(np.argmin(adaptive.class_error[0])) == WINNER
    # exhaustive: every trial evaluates every class (and the null class on the trials that ask for it)
    assert exhaustive.trials[0] == 20
    assert not np.isnan(np.stack(exhaustive.logs[0].errors)).any()
    assert exhaustive.evals[0] == _evals_in_log(exhaustive.logs[0]) >= 20 * N_CLASSES
    assert adaptive.evals[0] == _evals_in_log(adaptive.logs[0])
    # adaptive: with so clear a winner, the losers are dropped at the first test (after min_trials)
    assert adaptive.trials[0] == 4
    assert adaptive.evals[0] < exhaustive.evals[0]
    # the reported counts are exactly the inputs the denoiser received
    assert exhaustive.evals.sum() == fake_ex.inputs
    assert adaptive.evals.sum() == fake_ad.inputs
    assert set(fake_ad.classes_seen) == set(range(N_CLASSES + 1))


def test_elimination_never_drops_the_winner(x0, alphas_cumprod):
    """Over several cells (each its own noise), the winner is never eliminated and always decided."""
    images = torch.stack([x0 * s for s in (1.0, 0.5, -0.8, 0.2, 0.0)])
    for i, image in enumerate(images):
        fake = FakeDenoiser(image, alphas_cumprod, seed=i)
        result = score_cells(fake, alphas_cumprod, image[None], N_CLASSES, NULL, _config())
        log = result.logs[0]
        # the winner was measured in every trial (never NaN), and is the decision
        assert not np.isnan(np.stack(log.errors)[:, WINNER]).any()
        assert int(np.argmin(result.class_error[0])) == WINNER
        assert result.class_error[0, WINNER] == 0.0
        assert result.evals.sum() == fake.inputs


def test_evals_counted_per_cell_when_batched(x0, alphas_cumprod):
    """Several cells in one call, with a batch size that splits (cell, class) inputs across forward passes."""
    fake = FakeDenoiser(x0, alphas_cumprod)
    images = x0.expand(3, *x0.shape).clone()
    result = score_cells(fake, alphas_cumprod, images, N_CLASSES, NULL, _config(batch_size=7))
    assert result.evals.sum() == fake.inputs
    assert fake.calls > 1
    assert all(len(log.strata) == t for log, t in zip(result.logs, result.trials))
    assert (result.class_error.argmin(axis=1) == WINNER).all()


def test_without_null_class_no_null_inputs(x0, alphas_cumprod):
    result, fake = _score_fake(x0, alphas_cumprod, _config(score_null_class=False, min_trials=6, max_trials=6))
    assert NULL not in fake.classes_seen
    assert result.evals[0] == 6 * N_CLASSES == fake.inputs
    assert np.isnan(result.logs[0].null_errors).all()


def test_timesteps_stay_in_range_and_cycle_strata(x0, alphas_cumprod):
    seen_t = []

    def denoise(x_t, t, c):
        seen_t.extend(t.tolist())
        return torch.zeros_like(x_t)

    config = _config(min_trials=8, max_trials=8, t_min=100, t_max=300, timestep_bins=4)
    result = score_cells(denoise, alphas_cumprod, x0[None], N_CLASSES, NULL, config)
    assert min(seen_t) >= 100 and max(seen_t) < 300
    strata = result.logs[0].strata
    # each block of `bins` trials visits every stratum once
    assert sorted(strata[:4]) == [0, 1, 2, 3] and sorted(strata[4:]) == [0, 1, 2, 3]


def test_timestep_weights_shape_checked(x0, alphas_cumprod):
    with pytest.raises(ValueError, match="timestep_weights"):
        score_cells(lambda x, t, c: x, alphas_cumprod, x0[None], N_CLASSES, NULL, _config(), np.ones(3))


# --------------------------------------------------------------------------- determinism (tiny real UNet)


@pytest.fixture(scope="module")
def tiny_model() -> DiffusionClassifier:
    torch.manual_seed(0)
    model = DiffusionClassifier(
        ["a", "b", "c"],
        DataConfig(image_size=SIZE),
        DiffusionModelConfig(block_out_channels=(8, 16), norm_num_groups=4),
        ScoringConfig(min_trials=4, max_trials=8, check_every=2, timestep_bins=4, batch_size=64),
    )
    return model


@pytest.fixture(scope="module")
def cells() -> np.ndarray:
    rng = np.random.default_rng(3)
    return rng.uniform(-1, 1, size=(4, 3, SIZE, SIZE)).astype(np.float32)


def test_same_seed_same_errors(tiny_model, cells):
    first = tiny_model.score(cells)
    second = tiny_model.score(cells)
    np.testing.assert_array_equal(first.class_error, second.class_error)
    np.testing.assert_array_equal(first.evals, second.evals)
    np.testing.assert_array_equal(first.anomaly_null_ratio, second.anomaly_null_ratio)


def test_different_seed_different_errors(tiny_model, cells):
    base = tiny_model.scoring_config
    first = tiny_model.score(cells, base)
    other = tiny_model.score(cells, base.model_copy(update={"seed": 1}))
    assert not np.allclose(first.class_error, other.class_error)


def test_batched_equals_alone_and_reversed(tiny_model, cells):
    together = tiny_model.score(cells)
    alone = [tiny_model.score(cells[i : i + 1]) for i in range(len(cells))]
    reversed_ = tiny_model.score(cells[::-1].copy())

    decisions = together.class_error.argmin(axis=1)
    np.testing.assert_array_equal(decisions, [a.class_error[0].argmin() for a in alone])
    np.testing.assert_array_equal(decisions, reversed_.class_error.argmin(axis=1)[::-1])
    np.testing.assert_allclose(together.class_error, np.concatenate([a.class_error for a in alone]), atol=1e-5)
    np.testing.assert_allclose(together.class_error, reversed_.class_error[::-1], atol=1e-5)
    np.testing.assert_array_equal(together.trials, np.concatenate([a.trials for a in alone]))
    np.testing.assert_array_equal(together.evals, reversed_.evals[::-1])
    np.testing.assert_allclose(together.anomaly_null_ratio, reversed_.anomaly_null_ratio[::-1], atol=1e-5)


def test_probabilities_sum_to_one(tiny_model, cells):
    predictions = tiny_model.predictions_from_scores(tiny_model.score(cells))
    assert predictions.probs.shape == (len(cells), 3)
    np.testing.assert_allclose(predictions.probs.sum(axis=1), 1.0, atol=1e-9)
    assert (predictions.probs >= 0).all()
    np.testing.assert_array_equal(predictions.confidence, predictions.probs.max(axis=1))
    assert (predictions.entropy >= 0).all()
    assert (predictions.entropy <= np.log(3) + 1e-9).all()
    np.testing.assert_array_equal(predictions.labels, predictions.probs.argmax(axis=1))
    assert np.isfinite(predictions.anomaly).all()
    # a higher temperature flattens the distribution
    hot = tiny_model.predictions_from_scores(tiny_model.score(cells), temperature=1e6)
    np.testing.assert_allclose(hot.probs, 1 / 3, atol=1e-4)


def test_predict_with_other_config_keeps_anomaly_finite(tiny_model, cells):
    config = tiny_model.scoring_config.model_copy(update={"score_null_class": False})
    predictions = tiny_model.predict(cells, config=config)
    assert np.isfinite(predictions.anomaly).all()


# --------------------------------------------------------------------------- config validation


def test_t_range_validated():
    with pytest.raises(ValidationError, match="t_max"):
        ScoringConfig(t_min=500, t_max=100)


def test_trial_range_validated():
    with pytest.raises(ValidationError, match="max_trials"):
        ScoringConfig(min_trials=10, max_trials=5)


# --------------------------------------------------------------------------- summarise_log by hand


def test_summarise_log_with_weights():
    nan = np.nan
    log = TrialLog(
        strata=[0, 1, 0],
        errors=[np.array([1.0, 2.0, 4.0]), np.array([2.0, 1.0, nan]), np.array([3.0, 3.5, nan])],
        null_errors=[2.0, 1.5, 4.0],
    )
    weights = np.array([1.0, 2.0])
    class_error, min_error, null_ratio = summarise_log(log, weights)
    # weighted errors: trial 0 (w=1): [1, 2, 4]; trial 1 (w=2): [4, 2, nan]; trial 2 (w=1): [3, 3.5, nan]
    # the winner, among the classes in play to the end: mean class 0 = 8/3, class 1 = 7.5/3 -> class 1
    # minus the winner's, over each class's trials: [-1, 0, 2]  [2, 0, nan]  [-0.5, 0, nan] -> [0.5/3, 0, 2]
    np.testing.assert_allclose(class_error, [0.5 / 3, 0.0, 2.0])
    assert min_error == pytest.approx(7.5 / 3)
    # null ratio: mean of best - w * null = [2 - 2, 2 - 3, 3.5 - 4] -> (0 - 1 - 0.5) / 3
    assert null_ratio == pytest.approx(-0.5)


def test_a_class_dropped_early_never_outranks_the_decided_class():
    """Classes 0 and 1 trade places trial by trial and each collects sizeable errors against the trial's best;
    class 2, dropped after one close trial, kept its small early gap. Measured against each trial's best it would
    win; measured paired against the winner, over its own trials, it stays behind."""
    nan = np.nan
    rows = [[1.0, 2.0, 1.2], [2.0, 1.0, nan], [1.0, 2.0, nan], [2.0, 1.1, nan]]
    log = TrialLog(strata=[0] * 4, errors=[np.array(r) for r in rows], null_errors=[nan] * 4)
    class_error, min_error, _ = summarise_log(log, np.ones(1))
    np.testing.assert_allclose(class_error, [0.0, 0.1 / 4, 0.2])  # class 0 wins: mean 1.5 against 1.525
    assert min_error == pytest.approx(1.5)


def test_a_class_dropped_while_the_winner_lagged_stays_behind_it_after_the_softmax():
    """Class 0 is dropped after 4 trials, clearly behind class 2; class 1, worse than class 0 on those trials,
    wins later. Its paired difference to the winner is negative: it was clamped to the smallest float, which the
    softmax turns into a probability equal to the winner's, so argmax named the dropped class and the confidence
    halved."""
    config = ScoringConfig(min_trials=4, check_every=4, max_trials=8, elimination_p=0.05)
    base = np.array([1.0, 1.2, 0.9, 1.1])
    early = np.stack([base + 1 + np.array([0.01, -0.01, 0.01, -0.01]), base + [9, -0.5, 8, -0.4], base], axis=1)
    active, decided = decide(early, np.ones(3, dtype=bool), config)
    assert active.tolist() == [False, True, True] and not decided
    rows = [*early, *[np.array([np.nan, 0.1, 5.0])] * 4]
    log = TrialLog(strata=[0] * 8, errors=rows, null_errors=[np.nan] * 8)
    class_error, _, _ = summarise_log(log, np.ones(1))
    assert class_error[1] == 0.0 and class_error[0] == pytest.approx(1.0)  # behind class 2 by 1 on its trials
    for temperature in (1e-4, 1e-2, 1.0, 100.0):
        probs = np.exp(-class_error / temperature)
        assert probs.argmax() == 1 and probs[1] > probs[0]
    tied = TrialLog(strata=[0] * 2, errors=[np.array([1.0, 1.0])] * 2, null_errors=[np.nan] * 2)
    tie_error, _, _ = summarise_log(tied, np.ones(1))
    assert tie_error[1] > 0 and np.exp(-tie_error[1] / 1e-3) < 1.0  # an exact tie still ranks the winner first


def test_summarise_log_uniform_weights_is_plain_mean():
    log = TrialLog(strata=[0, 1], errors=[np.array([0.5, 0.7]), np.array([0.4, 0.9])], null_errors=[0.6, 0.6])
    class_error, min_error, null_ratio = summarise_log(log, np.ones(2))
    np.testing.assert_allclose(class_error, [0.0, 0.35])
    assert min_error == pytest.approx(0.45)
    assert null_ratio == pytest.approx(-0.15)


def test_trial_disagreement_counts_the_trials_that_voted_for_another_class():
    nan = np.nan
    log = TrialLog(
        strata=[0, 1, 0, 1],
        # winners among the classes in play: 0, 1, 1 (class 0 out of play), 0
        errors=[
            np.array([1.0, 2.0, 4.0]),
            np.array([2.0, 1.0, 3.0]),
            np.array([nan, 1.0, 2.0]),
            np.array([0.1, 0.2, nan]),
        ],
        null_errors=[nan] * 4,
    )
    assert trial_disagreement(log, 0) == pytest.approx(0.5)
    assert trial_disagreement(log, 1) == pytest.approx(0.5)
    assert trial_disagreement(log, 2) == pytest.approx(1.0)
    assert np.isnan(trial_disagreement(TrialLog(), 0))


def test_predictions_carry_each_cells_trial_disagreement(tiny_model, cells):
    result = tiny_model.score(cells)
    predictions = tiny_model.predictions_from_scores(result)
    votes = predictions.extra["disagreement"]
    assert votes.shape == (len(cells),)
    assert ((votes >= 0) & (votes <= 1)).all()
    expected = [trial_disagreement(log, int(c)) for log, c in zip(result.logs, predictions.labels)]
    np.testing.assert_allclose(votes, expected)

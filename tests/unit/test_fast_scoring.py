"""Fast scoring: few trials, null class on the first trials only, replay of logged trials, tuning, runtime options.

A deterministic fake denoiser (its error depends only on its inputs, never on batch composition) makes exact
comparisons possible: scoring a cell alone or in a batch, or replaying its exhaustive log, must give the same
trials, the same decision and the same evaluation count.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from cytoloop.config import DataConfig, DiffusionModelConfig, ScoringConfig
from cytoloop.models.diffusion import DiffusionClassifier, build_scheduler
from cytoloop.scoring.calibration import decision, evaluations_needed, reorderings, trials_needed, tune_scoring
from cytoloop.scoring.trials import RouteExits, TrialLog, replay, replay_decisions, score_cells

N_CLASSES = 4
NULL = N_CLASSES
SIZE = 16
FAST = dict(min_trials=1, check_every=1, elimination_p=0.05, max_trials=40, timestep_bins=4, batch_size=16)


class CountingDenoiser:
    """A prototype model: class c's cells are flat images at level PROTOTYPES[c] (the null class at 0), and the
    denoiser predicts the noise that would explain x_t under that class, plus a wobble that is a fixed function of
    its inputs (so results never depend on batch composition). The class whose prototype is nearest a cell's
    level wins; cells between two prototypes are close calls. Counts its calls and every input it receives.
    """

    def __init__(self, alphas_cumprod: torch.Tensor, wobble: float = 0.5):
        self.alphas_cumprod = alphas_cumprod
        self.wobble = wobble
        self.inputs = 0
        self.null_inputs = 0
        self.calls = 0

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.inputs += len(x_t)
        self.null_inputs += int((c == NULL).sum())
        abar = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        level = PROTOTYPES[c].view(-1, 1, 1, 1)
        explained = (x_t - abar.sqrt() * level) / (1 - abar).sqrt()
        return explained + self.wobble * torch.sin(17.0 * x_t + c.view(-1, 1, 1, 1).float())


PROTOTYPES = torch.tensor([-0.6, -0.2, 0.2, 0.6, 0.0])  # classes 0-3, then the null class
LEVELS = [-0.6, -0.2, 0.2, 0.6, -0.25, 0.03]
WINNERS = [0, 1, 2, 3, 1, 2]


def tiny_model(scoring: ScoringConfig, classes: tuple[str, ...] = ("a", "b", "c")) -> DiffusionClassifier:
    """An untrained 16-px diffusion classifier, its weights seeded: scoring around a real (tiny) UNet."""
    torch.manual_seed(0)
    return DiffusionClassifier(
        list(classes),
        DataConfig(image_size=SIZE),
        DiffusionModelConfig(block_out_channels=(8, 16), norm_num_groups=4),
        scoring,
    )


@pytest.fixture(scope="module")
def alphas_cumprod() -> torch.Tensor:
    return build_scheduler(DiffusionModelConfig()).alphas_cumprod


@pytest.fixture(scope="module")
def cells() -> torch.Tensor:
    texture = torch.rand((len(LEVELS), 3, SIZE, SIZE), generator=torch.Generator().manual_seed(11)) * 0.1
    return torch.tensor(LEVELS).view(-1, 1, 1, 1) + texture - 0.05


def _score(alphas_cumprod, cells, config):
    fake = CountingDenoiser(alphas_cumprod)
    result = score_cells(fake, alphas_cumprod, cells, N_CLASSES, NULL, config)
    return result, fake


def test_a_denoiser_that_gives_nan_is_an_error_not_a_near_tie(alphas_cumprod, cells):
    """NaN marks a class not played in a trial: a NaN error from the denoiser (a half-precision overflow) switched
    elimination off and gave the broken class about the winner's probability. It is an error naming the class."""
    fake = CountingDenoiser(alphas_cumprod)

    def broken(x_t, t, c):
        out = fake(x_t, t, c)
        out[c == 2] = float("nan")
        return out

    from cytoloop.errors import CytoLoopError

    with pytest.raises(
        CytoLoopError, match=r"non-finite error for \d+ of \d+ \(trial, class\) pairs, class index\(es\) \[2\]"
    ):
        score_cells(broken, alphas_cumprod, cells, N_CLASSES, NULL, ScoringConfig(**FAST))


def test_fast_settings_decide_in_few_evaluations(alphas_cumprod, cells):
    result, fake = _score(alphas_cumprod, cells, ScoringConfig(**FAST, null_trials=1))
    np.testing.assert_array_equal(result.class_error.argmin(axis=1), WINNERS)
    assert result.evals.mean() < 20 * (N_CLASSES + 1)  # the original rule's first test alone costs this much
    assert result.evals.sum() == fake.inputs
    assert fake.null_inputs == len(cells)  # the null class on the first trial of each cell only
    assert (result.trials < FAST["max_trials"]).all()
    assert np.isfinite(result.anomaly_null_ratio).all()


@pytest.mark.parametrize("null_trials", [None, 1, 3])
def test_evaluations_reported_are_evaluations_made(alphas_cumprod, cells, null_trials):
    config = ScoringConfig(**{**FAST, "batch_size": 7}, null_trials=null_trials)
    result, fake = _score(alphas_cumprod, cells, config)
    assert result.evals.sum() == fake.inputs
    expected_null = sum(t if null_trials is None else min(t, null_trials) for t in result.trials)
    assert fake.null_inputs == expected_null
    for log, evals in zip(result.logs, result.evals):
        measured = sum(int((~np.isnan(row)).sum()) for row in log.errors)
        assert evals == measured + int((~np.isnan(log.null_errors)).sum())


def test_no_cells_score_to_no_rows_of_every_class(alphas_cumprod, cells):
    """An empty batch gave class errors of shape (0, 0), on which the softmax's row maximum failed."""
    result, fake = _score(alphas_cumprod, cells[:0], ScoringConfig(**FAST))
    assert result.class_error.shape == (0, N_CLASSES) and fake.calls == 0 and len(result.evals) == 0


def test_batched_equals_one_at_a_time(alphas_cumprod, cells):
    config = ScoringConfig(**FAST, null_trials=2)
    together, _ = _score(alphas_cumprod, cells, config)
    for i in range(len(cells)):
        alone, _ = _score(alphas_cumprod, cells[i : i + 1], config)
        assert alone.trials[0] == together.trials[i]
        assert alone.evals[0] == together.evals[i]
        np.testing.assert_allclose(alone.class_error[0], together.class_error[i], atol=1e-5)


@pytest.mark.parametrize("rule", [dict(FAST), dict(FAST, min_trials=3, check_every=2)])
def test_lookahead_keeps_the_decisions_and_counts_what_it_ran(alphas_cumprod, cells, rule):
    """Running ahead of the elimination test (as scoring does on a GPU) changes neither a cell's log nor its
    decision; the trials run past a decision are counted as evaluations, and fewer, fuller batches are made."""
    config = ScoringConfig(**{**rule, "batch_size": 256}, null_trials=2)
    stepwise, stepwise_fake = _score(alphas_cumprod, cells, config.model_copy(update={"lookahead": 1}))
    ahead, ahead_fake = _score(alphas_cumprod, cells, config.model_copy(update={"lookahead": 8}))
    assert (stepwise.trials > rule["min_trials"]).any()  # some cells needed several tests: lookahead had work
    np.testing.assert_array_equal(ahead.trials, stepwise.trials)
    for a, b in zip(ahead.logs, stepwise.logs):
        assert a.strata == b.strata
        np.testing.assert_allclose(np.stack(a.errors), np.stack(b.errors), atol=1e-5)
        np.testing.assert_allclose(a.null_errors, b.null_errors, atol=1e-5)
    np.testing.assert_allclose(ahead.class_error, stepwise.class_error, atol=1e-5)
    assert ahead.evals.sum() == ahead_fake.inputs > stepwise.evals.sum() == stepwise_fake.inputs
    assert (ahead.evals >= stepwise.evals).all()
    assert ahead_fake.calls < stepwise_fake.calls


def test_lookahead_is_off_on_a_cpu_by_default(alphas_cumprod, cells):
    default, _ = _score(alphas_cumprod, cells, ScoringConfig(**{**FAST, "batch_size": 256}))
    off, _ = _score(alphas_cumprod, cells, ScoringConfig(**{**FAST, "batch_size": 256}, lookahead=1))
    np.testing.assert_array_equal(default.evals, off.evals)


def test_replay_reproduces_adaptive_scoring(alphas_cumprod, cells):
    """Replaying an exhaustive log gives exactly the trials, decision and evaluations of an adaptive run."""
    adaptive_config = ScoringConfig(**FAST, null_trials=2)
    exhaustive_config = adaptive_config.model_copy(update={"min_trials": 40, "max_trials": 40})
    exhaustive, _ = _score(alphas_cumprod, cells, exhaustive_config)
    adaptive, _ = _score(alphas_cumprod, cells, adaptive_config)
    weights = np.ones(adaptive_config.timestep_bins)
    for i, log in enumerate(exhaustive.logs):
        replayed, evals = replay(log, adaptive_config, weights)
        assert evals == adaptive.evals[i]
        assert replayed.strata == adaptive.logs[i].strata
        np.testing.assert_allclose(np.stack(replayed.errors), np.stack(adaptive.logs[i].errors), atol=1e-5)
        assert decision(replayed, weights) == adaptive.class_error[i].argmin()


def test_real_unet_batched_equals_alone_under_fast_settings():
    model = tiny_model(
        ScoringConfig(min_trials=1, check_every=1, elimination_p=0.2, max_trials=10, timestep_bins=4, null_trials=1)
    )
    images = np.random.default_rng(5).uniform(-1, 1, size=(5, 3, SIZE, SIZE)).astype(np.float32)
    together = model.score(images)
    for i in range(len(images)):
        alone = model.score(images[i : i + 1])
        assert alone.class_error[0].argmin() == together.class_error[i].argmin()
        assert alone.evals[0] == together.evals[i]
        assert alone.trials[0] == together.trials[i]


# --------------------------------------------------------------------------- tuning on a toy problem


def _toy_logs(n_cells: int, n_trials: int, seed: int) -> list[TrialLog]:
    """Class 0 truly best by a cell-specific margin (some cells are close calls), heavy per-trial noise."""
    rng = np.random.default_rng(seed)
    logs = []
    for _ in range(n_cells):
        margin = rng.exponential(0.05)
        means = np.array([1.0, 1.0 + margin, 1.1 + margin, 1.3])
        shared = rng.normal(0, 0.3, size=(n_trials, 1))  # the shared noise a paired test cancels
        errors = means + shared + rng.normal(0, 0.1, size=(n_trials, 4))
        logs.append(
            TrialLog(strata=[k % 4 for k in range(n_trials)], errors=list(errors), null_errors=[np.nan] * n_trials)
        )
    return logs


@pytest.mark.parametrize("min_trials", [1, 2, 5])
@pytest.mark.parametrize("p", [0.2, 0.02, 1e-3])
@pytest.mark.parametrize("prior", [None, 0.02])
@pytest.mark.parametrize("check_every,null_trials,max_trials", [(1, None, 60), (3, 2, 25)])
def test_replay_decisions_equals_one_replay_per_log(min_trials, p, prior, check_every, null_trials, max_trials):
    """Tuning replays every candidate on every cell through `replay_decisions` (all logs at once, running sums);
    its decisions and evaluation counts must be exactly those of `replay` log by log."""
    logs = [order for log in _toy_logs(12, 60, seed=3) for order in reorderings(log, 3, 4)]
    weights = np.array([0.7, 1.0, 1.3, 0.9])
    config = ScoringConfig(
        min_trials=min_trials,
        check_every=check_every,
        elimination_p=p,
        max_trials=max_trials,
        timestep_bins=4,
        null_trials=null_trials,
        variance_prior=prior,
        variance_prior_trials=2.0 if prior else 0.0,
    )
    decided, evals = replay_decisions(logs, config, weights)
    one_by_one = [replay(log, config, weights) for log in logs]
    assert decided.tolist() == [decision(replayed, weights) for replayed, _ in one_by_one]
    assert evals.tolist() == [e for _, e in one_by_one]
    assert len(set(evals.tolist())) > 1  # the rule stopped cells at different points: the test is not trivial


def test_replay_decisions_stops_a_one_class_log_at_once():
    """A log with one class is decided after its first block, as `decide` does, even before a t-test could run."""
    logs = [TrialLog(log.strata, [e[:1] for e in log.errors], log.null_errors) for log in _toy_logs(3, 20, seed=5)]
    config = ScoringConfig(min_trials=1, check_every=1, max_trials=20, timestep_bins=4)
    decided, evals = replay_decisions(logs, config, np.ones(4))
    assert decided.tolist() == [0, 0, 0]
    assert evals.tolist() == [replay(log, config, np.ones(4))[1] for log in logs] == [2, 2, 2]  # one class + null


def test_tuning_meets_the_agreement_target_cheaply():
    logs = _toy_logs(40, 60, seed=0)
    weights = np.ones(4)
    base = ScoringConfig(max_trials=60, timestep_bins=4, score_null_class=False)
    tuned, rows = tune_scoring(
        logs, weights, base, target_agreement=0.99, min_trials=(1, 2, 4, 8), p_values=(0.2, 0.05, 0.01, 2e-3)
    )
    assert tuned is not base
    # measured over every order of each cell's trials that tuning replays
    orders = [(order, decision(log, weights)) for log in logs for order in reorderings(log, base.tuning_orders, 4)]
    replays = [replay(order, tuned, weights) for order, _ in orders]
    agreement = np.mean([decision(r, weights) == ref for (r, _), (_, ref) in zip(replays, orders)])
    assert agreement >= 0.99
    evals = np.mean([e for _, e in replays])
    default_evals = np.mean([replay(order, base, weights)[1] for order, _ in orders])
    assert evals < default_evals
    # the chosen rule is the cheapest of those meeting the target
    meeting = [r for r in rows if r["agreement"] >= 0.99]
    assert evals == pytest.approx(min(r["evals_mean"] for r in meeting))


def test_tuning_keeps_config_when_target_unreachable():
    """A cell whose first trials favour class 0 and whose later ones favour class 1: any early stop disagrees."""
    errors = [np.array([0.0, 1.0]), np.array([0.0, 1.1])] + [np.array([1.0, 0.0])] * 8
    log = TrialLog(strata=[0] * 10, errors=errors, null_errors=[np.nan] * 10)
    base = ScoringConfig(max_trials=10, min_trials=10, timestep_bins=1, tuning_orders=1)
    tuned, rows = tune_scoring([log], np.ones(1), base, target_agreement=1.0, min_trials=(2,), p_values=(0.5,))
    assert tuned is base
    assert rows[0]["agreement"] == 0.0


def test_tuning_never_chooses_a_first_test_after_the_last_trial():
    """Every rule that tests at or after `max_trials` (or the last trial logged) is exhaustive scoring, so they
    tie, and the later candidate wins a tie: before, that could be min_trials 12 with max_trials 8, and a model
    saved that way failed to load (it broke CI once, on a machine whose numerics left only exhaustive scoring
    meeting the target)."""
    errors = [np.array([0.0, 1.0]), np.array([0.0, 1.1])] + [np.array([1.0, 0.0])] * 6  # early trials mislead
    log = TrialLog(strata=[0] * 8, errors=errors, null_errors=[np.nan] * 8)
    base = ScoringConfig(max_trials=8, min_trials=4, timestep_bins=1, tuning_orders=1, score_null_class=False)
    tuned, rows = tune_scoring(
        [log], np.ones(1), base, target_agreement=1.0, min_trials=(2, 8, 12), p_values=(0.5,), prior_trials=(0.0,)
    )
    assert [r["min_trials"] for r in rows] == [2, 8]
    assert rows[0]["agreement"] == 0.0 and rows[1]["agreement"] == 1.0  # only exhaustive scoring meets the target
    assert tuned.min_trials == 8
    ScoringConfig.model_validate(tuned.model_dump())  # what a saved model is loaded with
    with pytest.raises(ValueError, match="no min_trials candidate is within 8"):
        tune_scoring([log], np.ones(1), base, min_trials=(12, 16))
    # nor beyond the trials logged: with max_trials 200, min_trials 12 on 8 logged trials looks as cheap as 8
    roomy = base.model_copy(update={"max_trials": 200})
    _, rows = tune_scoring([log], np.ones(1), roomy, min_trials=(2, 8, 12), p_values=(0.5,), prior_trials=(0.0,))
    assert [r["min_trials"] for r in rows] == [2, 8]


def test_trials_needed_by_hand():
    # running decision: trial 1 -> class 1, after 2 -> class 0 (cumsum [1.0, 0.2] vs [0.0, 1.0] ...)
    log = TrialLog(
        strata=[0, 0, 0],
        errors=[np.array([1.0, 0.0]), np.array([0.0, 1.0]), np.array([0.0, 0.5])],
        null_errors=[np.nan] * 3,
    )
    assert trials_needed(log, np.ones(1)) == 2
    steady = TrialLog(strata=[0, 0], errors=[np.array([0.0, 1.0])] * 2, null_errors=[np.nan] * 2)
    assert trials_needed(steady, np.ones(1)) == 1


def test_evaluations_needed_by_hand():
    # class 0 is decided; class 1 is behind from trial 1, class 2 is ahead until trial 3 and behind from trial 4
    errors = [
        np.array([0.0, 1.0, -1.0]),
        np.array([0.0, 1.0, 0.5]),
        np.array([0.0, 1.0, 0.4]),
        np.array([0.0, 1.0, 0.2]),
    ]
    log = TrialLog(strata=[0] * 4, errors=errors, null_errors=[np.nan] * 4)
    # class 1 in play 1 trial, class 2 four (its total is -1, -0.5, -0.1, +0.1), class 0 as long as class 2
    assert evaluations_needed(log, np.ones(1)) == 1 + 4 + 4
    assert evaluations_needed(log, np.ones(1), null_trials=1) == 10
    assert evaluations_needed(log, np.ones(1), null_trials=None) == 9 + 4  # the null class on all four trials
    # a weight that shrinks trial 1 settles class 2 earlier: -0.1, +0.4 after two trials
    assert (
        evaluations_needed(TrialLog(strata=[0, 1, 1, 1], errors=errors, null_errors=[np.nan] * 4), np.array([0.1, 1.0]))
        == 1 + 2 + 2
    )


# --------------------------------------------------------------------------- runtime options


def test_fp16_on_cpu_rejected():
    with pytest.raises(ValidationError, match="fp16"):
        ScoringConfig(precision="fp16", device="cpu")


def test_bf16_channels_last_runs_on_cpu():
    model = tiny_model(
        ScoringConfig(min_trials=2, max_trials=2, timestep_bins=2, precision="bf16", channels_last=True, device="cpu"),
        ("a", "b"),
    )
    images = np.random.default_rng(0).uniform(-1, 1, size=(2, 3, SIZE, SIZE)).astype(np.float32)
    result = model.score(images)
    assert np.isfinite(result.class_error).all()
    assert (result.evals == 2 * 3).all()


def test_tune_model_scoring_sets_a_rule_and_temperature():
    from cytoloop.workflows import tune_model_scoring

    model = tiny_model(
        ScoringConfig(max_trials=6, min_trials=6, timestep_bins=2, tuning_trials=6, tuning_agreement=0.5), ("a", "b")
    )
    images = np.random.default_rng(1).uniform(-1, 1, size=(4, 3, SIZE, SIZE)).astype(np.float32)
    report = tune_model_scoring(model, images, np.array([0, 1, 0, 1]))
    assert report["chosen"] is not None and report["chosen"]["agreement"] >= 0.5
    assert model.scoring_config.min_trials == report["chosen"]["min_trials"]
    assert model.scoring_config.check_every == 1
    assert report["temperature"] == model.temperature > 0
    # two classes: at least the decided class and its rival on one trial, at most both on all six, null on each
    assert 2 + 1 <= report["evaluations_needed_mean"] <= 6 * 3


def test_a_site_s_temperature_is_fitted_on_cells_decided_among_its_classes():
    """Tuned for a site that reports two of three classes: the rule is the same, the temperature is the one that
    fits the scores the site is served (the third class out of play), not those over every class."""
    import copy

    from cytoloop.scoring.calibration import fit_temperature
    from cytoloop.workflows import tune_model_scoring

    model = tiny_model(
        ScoringConfig(max_trials=6, min_trials=6, timestep_bins=2, tuning_trials=6, tuning_agreement=0.5)
    )
    images = np.random.default_rng(1).uniform(-1, 1, size=(8, 3, SIZE, SIZE)).astype(np.float32)
    # labels the untrained model gets right between a and b, so its temperature is finite, not at the bound
    labels = model.score(images).class_error[:, :2].argmin(axis=1)
    site = copy.deepcopy(model)
    everything = tune_model_scoring(model, images, labels)
    allowed = np.array([True, True, False])
    mine = tune_model_scoring(site, images, labels, allowed=allowed)
    assert site.scoring_config == model.scoring_config  # the rule is tuned on all classes either way
    served = site.score(images, candidates=np.tile(allowed, (8, 1)))
    assert np.isinf(served.class_error[:, 2]).all()
    assert mine["temperature"] == pytest.approx(fit_temperature(-served.class_error, labels))
    assert mine["temperature"] != pytest.approx(everything["temperature"])


def test_unlabeled_cells_join_the_tuning_set_but_not_the_temperature():
    from cytoloop.workflows import tune_model_scoring

    config = ScoringConfig(max_trials=6, min_trials=6, timestep_bins=2, tuning_trials=6, tuning_agreement=0.5)
    model = tiny_model(config, ("a", "b"))
    rng = np.random.default_rng(1)
    images = rng.uniform(-1, 1, size=(4, 3, SIZE, SIZE)).astype(np.float32)
    unlabeled = rng.uniform(-1, 1, size=(3, 3, SIZE, SIZE)).astype(np.float32)
    scored = []
    score = model.score
    model.score = lambda cells, *args, **kwargs: scored.append(len(cells)) or score(cells, *args, **kwargs)
    report = tune_model_scoring(model, images, np.array([0, 1, 0, 1]), unlabeled=unlabeled)
    assert (report["n_cells"], report["n_unlabeled"]) == (4, 3)
    assert scored == [7, 4]  # exhaustive logs of all seven cells; the temperature from the four labelled ones
    assert report["chosen"] is not None


def test_temperature_cells_caps_the_cells_scored_for_the_temperature():
    """On a large validation split the temperature pass (every cell through the tuned rule) cost more than the
    exhaustive pass; `temperature_cells` caps it with a seeded draw that keeps the class mix, and the report's
    validation figures are those of the cells it was fitted on."""
    from cytoloop.evaluation import metrics
    from cytoloop.scoring.calibration import mixed_subset
    from cytoloop.workflows import tune_model_scoring

    config = ScoringConfig(
        max_trials=6, min_trials=6, timestep_bins=2, tuning_trials=6, tuning_agreement=0.5, temperature_cells=5
    )
    model = tiny_model(config, ("a", "b"))
    images = np.random.default_rng(1).uniform(-1, 1, size=(12, 3, SIZE, SIZE)).astype(np.float32)
    labels = np.array([0, 1, 1] * 4)
    scored = []
    score = model.score
    model.score = lambda cells, *args, **kwargs: scored.append(len(cells)) or score(cells, *args, **kwargs)
    report = tune_model_scoring(model, images, labels)
    assert scored == [12, 5] and report["n_temperature_cells"] == 5
    chosen = mixed_subset(12, 5, config.seed)
    assert len(set(chosen.tolist())) == 5 and (np.diff(chosen) > 0).all()
    assert np.array_equal(mixed_subset(12, 5, config.seed), chosen) and np.array_equal(
        mixed_subset(12, None), np.arange(12)
    )
    probs = model.predict(images[chosen]).probs
    assert report["validation"]["ece"] == pytest.approx(
        metrics.expected_calibration_error(probs, labels[chosen], n_bins=15), abs=1e-6
    )


def test_outside_split_leaves_out_every_part_of_the_models_split(tmp_path):
    import json

    from cytoloop.data.records import CellRecord
    from cytoloop.workflows import SPLIT_FILE, outside_split

    root = tmp_path / "cells"
    records = [CellRecord(f"d/{i}.png", root / f"d/{i}.png", None, "d") for i in range(6)]
    parts = {"train": ["d/0.png", "d/1.png"], "val": ["d/2.png"], "test": ["d/3.png"]}
    (tmp_path / SPLIT_FILE).write_text(json.dumps({"meta": {"data_root": str(root)}, "parts": parts}))
    assert [r.cell_id for r in outside_split(records, tmp_path)] == ["d/4.png", "d/5.png"]
    others = [CellRecord(f"e/{i}.png", root / f"e/{i}.png", None, "e") for i in range(3)]
    assert outside_split(others, tmp_path) == others  # another dataset: none of these cells was used


def test_a_models_split_is_found_whichever_manifest_or_checkout_lists_its_cells(tmp_path):
    """The combined manifest of all labs names a cell 'pbc/x.jpg', the lab's own manifest 'x.jpg', and another
    checkout has another root: each must still keep the model's training cells out of its evaluation."""
    import json

    from cytoloop.data.records import CellRecord, DatasetError
    from cytoloop.workflows import SPLIT_FILE, held_out

    parts = {"train": ["pbc/a/0.jpg", "pbc/a/1.jpg"], "val": ["pbc/a/2.jpg"], "test": ["pbc/a/3.jpg"]}
    (tmp_path / SPLIT_FILE).write_text(json.dumps({"meta": {"data_root": "/work/shared/data"}, "parts": parts}))
    combined = [CellRecord(f"pbc/a/{i}.jpg", tmp_path / f"ci/data/pbc/a/{i}.jpg", "a", "pbc") for i in range(5)]
    own = [CellRecord(f"a/{i}.jpg", tmp_path / f"ci/data/pbc/a/{i}.jpg", "a", "pbc") for i in range(5)]
    for records in (combined, own):
        kept, excluded = held_out(records, tmp_path)
        assert [r.path.name for r in kept] == ["3.jpg", "4.jpg"] and excluded == 3
        assert [r.path.name for r in held_out(records, tmp_path, part="test")[0]] == ["3.jpg"]
    other_lab = [CellRecord(f"jtsc/a/{i}.jpg", tmp_path / f"ci/data/jtsc/a/{i}.jpg", "a", "jtsc") for i in range(3)]
    assert held_out(other_lab, tmp_path) == (other_lab, 0)
    with pytest.raises(DatasetError, match="none of these 3 cells is in part 'test'"):
        held_out(other_lab, tmp_path, part="test")
    # a split file of another shape: named, not a KeyError, TypeError or AttributeError traceback in evaluate,
    # tune, distill or score --part
    for damaged in ({}, [], {"parts": []}, {"parts": {"test": "x"}}, {"meta": [], "parts": {}}):
        (tmp_path / SPLIT_FILE).write_text(json.dumps(damaged))
        with pytest.raises(DatasetError, match=f"{SPLIT_FILE}: not a split file"):
            held_out(combined, tmp_path, part="test")
    (tmp_path / SPLIT_FILE).write_text(json.dumps({"parts": {"test": ["x.jpg"]}}))  # no meta: its data root unknown
    with pytest.raises(DatasetError, match="made from a dataset it does not name"):
        held_out(other_lab, tmp_path, part="test")


def test_a_variance_prior_lets_the_first_trials_decide_and_shrinks_a_lucky_estimate():
    from cytoloop.scoring.trials import decide

    config = ScoringConfig(min_trials=1, elimination_p=0.05, variance_prior=0.01, variance_prior_trials=2.0)
    one_trial = np.array([[0.0, 1.0, 0.05]])  # class 1 is 10 prior sds worse, class 2 half of one
    active, done = decide(one_trial, np.ones(3, bool), config)
    assert active.tolist() == [True, False, True] and not done
    without = config.model_copy(update={"variance_prior": None})
    assert decide(one_trial, np.ones(3, bool), without)[0].all()  # no test on one trial without a prior
    # two trials that happen to agree closely: alone, a tiny variance makes a small gap look decisive
    lucky = np.array([[0.0, 0.05], [0.0, 0.0501]])
    assert decide(lucky, np.ones(2, bool), without.model_copy(update={"min_trials": 2}))[1]
    assert not decide(lucky, np.ones(2, bool), config)[1]


def test_tuning_offers_the_variance_prior_and_reports_it():
    logs = _toy_logs(30, 40, seed=1)
    tuned, rows = tune_scoring(
        logs,
        np.ones(4),
        ScoringConfig(max_trials=40, timestep_bins=4, score_null_class=False),
        target_agreement=0.9,
        min_trials=(1, 2),
        p_values=(0.1, 0.01),
    )
    assert {r["variance_prior_trials"] for r in rows} == {0.0, 2.0}
    assert not any(r["variance_prior_trials"] == 0 and r["min_trials"] == 1 for r in rows)
    with_prior = [r for r in rows if r["variance_prior_trials"] == 2.0]
    assert len(with_prior) == 4
    meeting = [r for r in rows if r["agreement"] >= 0.9]
    assert meeting, "no candidate met the target: the choice below would not be tested"
    cheapest = min(r["evals_mean"] for r in meeting)
    chosen = [r for r in meeting if r["evals_mean"] == cheapest][-1]  # ties: the later, more conservative one
    assert (tuned.min_trials, tuned.elimination_p) == (chosen["min_trials"], chosen["elimination_p"])
    assert (tuned.variance_prior is not None) == (chosen["variance_prior_trials"] > 0)
    assert tuned.variance_prior is None or tuned.variance_prior > 0


def test_reorderings_keep_the_trials_and_the_block_design():
    rng = np.random.default_rng(0)
    strata = [int(k) for block in range(3) for k in rng.permutation(4)] + [2, 0]  # 3 full blocks and a partial one
    log = TrialLog(strata=strata, errors=[rng.normal(size=3) for _ in strata], null_errors=list(range(len(strata))))
    orders = reorderings(log, 5, bins=4)
    assert orders[0] is log and len(orders) == 5
    for other in orders[1:]:
        # the same trials (each trial's errors travel with its stratum and null error)
        assert sorted(other.null_errors) == sorted(log.null_errors)
        for stratum, errors, null in zip(other.strata, other.errors, other.null_errors):
            assert stratum == log.strata[null] and np.array_equal(errors, log.errors[null])
        # blocks of 4 visit every stratum once, as scoring draws them
        assert all(sorted(other.strata[b : b + 4]) == [0, 1, 2, 3] for b in range(0, 12, 4))
        assert decision(other, np.ones(4)) == decision(log, np.ones(4))  # the reference does not move
    assert any(other.strata != log.strata or other.null_errors != log.null_errors for other in orders[1:])


def test_tuning_counts_a_cell_that_disagrees_in_some_orders():
    """One cell, class 0 better overall, but one trial that strongly favours class 1: a rule that stops after
    one trial disagrees exactly in the orders that draw that trial first, which one fixed order cannot show."""
    errors = [np.array([0.0, 1.0])] * 9 + [np.array([3.0, 0.0])]
    log = TrialLog(strata=[0] * 10, errors=errors, null_errors=[np.nan] * 10)
    base = ScoringConfig(max_trials=10, min_trials=10, timestep_bins=1, tuning_orders=200)
    _, rows = tune_scoring(
        [log], np.ones(1), base, target_agreement=1.0, min_trials=(1,), p_values=(0.5,), prior_trials=(2.0,)
    )
    assert 0.8 < rows[0]["agreement"] < 0.99  # about 9 orders in 10 start with a class-0 trial


# -- anomaly exit and candidate classes (issue #17) -------------------------------------------------------------
# Known cells sit on their class's level; anomalies sit on the null class's level (0.0), between classes 1 and 2,
# so no class explains them better than a generic cell, and they are close calls between two classes: without the
# exit they run long.
KNOWN_LEVELS = [-0.6, -0.2, 0.2, 0.6] * 3
ANOMALY_LEVELS = [0.0] * 6


@pytest.fixture(scope="module")
def mixed_cells() -> torch.Tensor:
    levels = KNOWN_LEVELS + ANOMALY_LEVELS
    texture = torch.rand((len(levels), 3, SIZE, SIZE), generator=torch.Generator().manual_seed(5)) * 0.1
    return torch.tensor(levels).view(-1, 1, 1, 1) + texture - 0.05


def test_anomaly_exit_routes_as_full_scoring_and_stops_the_anomalies_early(alphas_cumprod, mixed_cells):
    config = ScoringConfig(**{**FAST, "elimination_p": 0.01, "max_trials": 60, "min_trials": 3})
    full, _ = _score(alphas_cumprod, mixed_cells, config)
    is_anomaly = np.arange(len(mixed_cells)) >= len(KNOWN_LEVELS)
    # the routing threshold: halfway between the known cells' highest and the anomalies' lowest null ratio
    threshold = (full.anomaly_null_ratio[~is_anomaly].max() + full.anomaly_null_ratio[is_anomaly].min()) / 2
    assert (full.anomaly_null_ratio[is_anomaly] > threshold).all() and not full.exited.any()

    fake = CountingDenoiser(alphas_cumprod)
    exits = RouteExits(anomaly_above=threshold)
    fast = score_cells(fake, alphas_cumprod, mixed_cells, N_CLASSES, NULL, config, exits=exits)
    routed_full = full.anomaly_null_ratio > threshold
    routed_fast = fast.anomaly_null_ratio > threshold
    np.testing.assert_array_equal(routed_fast, routed_full)  # the same cells go to the anomaly queue
    np.testing.assert_array_equal(fast.exited, is_anomaly)  # every anomaly stopped early, no known cell did
    assert (fast.evals[is_anomaly] < full.evals[is_anomaly]).all()
    # known cells get the same trials and decisions; once their anomaly route is ruled out the null class leaves
    # play, which only saves evaluations: their anomaly scores average fewer trials and stay under the threshold
    np.testing.assert_array_equal(fast.class_error[~is_anomaly], full.class_error[~is_anomaly])
    np.testing.assert_array_equal(fast.trials[~is_anomaly], full.trials[~is_anomaly])
    null_scored = np.array([np.sum(~np.isnan(log.null_errors)) for log in fast.logs])
    assert (null_scored < fast.trials)[~is_anomaly].any()
    saved = full.evals - fast.evals
    np.testing.assert_array_equal(saved[~is_anomaly], (fast.trials - null_scored)[~is_anomaly])
    # scoring ahead of the tests (as on a GPU) drops the null trials run past the test that closed it
    ahead = score_cells(
        CountingDenoiser(alphas_cumprod),
        alphas_cumprod,
        mixed_cells,
        N_CLASSES,
        NULL,
        config.model_copy(update={"lookahead": 8, "batch_size": 1024}),
        exits=exits,
    )
    np.testing.assert_array_equal(ahead.anomaly_null_ratio, fast.anomaly_null_ratio)
    np.testing.assert_array_equal(ahead.class_error, fast.class_error)
    # without a threshold, or with the exit switched off, nothing stops early
    off = score_cells(
        fake,
        alphas_cumprod,
        mixed_cells,
        N_CLASSES,
        NULL,
        config.model_copy(update={"exit_p": None}),
        exits=exits,
    )
    assert not off.exited.any()
    np.testing.assert_array_equal(off.evals, full.evals)


def test_a_served_anomaly_is_routed_anomaly_with_a_provisional_class(alphas_cumprod, mixed_cells):
    """Through the model's `predict`: the exit marks the class provisional and routing still says anomaly."""
    from cytoloop.config import RoutingConfig
    from cytoloop.policy.routing import route_cell

    model = DiffusionClassifier(
        ["c0", "c1", "c2", "c3"],
        DataConfig(image_size=SIZE),
        DiffusionModelConfig(block_out_channels=(8, 16), norm_num_groups=4),
        ScoringConfig(**{**FAST, "min_trials": 3, "max_trials": 60}),
    )
    model.runtime_denoiser = lambda config: (CountingDenoiser(model.scheduler.alphas_cumprod), "cpu")
    images = mixed_cells.numpy()
    full = model.predict(images)
    is_anomaly = np.arange(len(images)) >= len(KNOWN_LEVELS)
    threshold = float((full.anomaly[~is_anomaly].max() + full.anomaly[is_anomaly].min()) / 2)
    routing = RoutingConfig(anomaly_above=threshold, always_review=[], audit_fraction=0.0)
    fast = model.predict(images, routing=routing)
    provisional = fast.extra["provisional"]
    assert provisional.any()

    def routes(predictions):
        pairs = zip(predictions.confidence, predictions.anomaly)
        return [route_cell(c, a, "c0", routing, str(i)) for i, (c, a) in enumerate(pairs)]

    assert routes(fast) == routes(full)  # every cell goes where full scoring sends it
    assert [r == "anomaly" for r in routes(fast)] == is_anomaly.tolist()
    assert fast.evals[provisional].sum() < full.evals[provisional].sum()


# Close calls: cells halfway between two classes' levels, far from the null class's: not anomalies, and their
# confidence stays under the review line however many trials they get.
CLEAR_LEVELS = [-0.6, -0.2, 0.2, 0.6] * 2
CLOSE_LEVELS = [-0.4, 0.4] * 3


def test_review_exit_stops_close_calls_where_routing_sends_them_anyway(alphas_cumprod):
    levels = CLEAR_LEVELS + CLOSE_LEVELS
    texture = torch.rand((len(levels), 3, SIZE, SIZE), generator=torch.Generator().manual_seed(7)) * 0.1
    images = torch.tensor(levels).view(-1, 1, 1, 1) + texture - 0.05
    is_close = np.arange(len(levels)) >= len(CLEAR_LEVELS)
    config = ScoringConfig(**{**FAST, "elimination_p": 0.001, "max_trials": 60, "min_trials": 3})
    full, _ = _score(alphas_cumprod, images, config)

    def runner_up_gap(result):
        ordered = np.sort(result.class_error, axis=1)
        return ordered[:, 1] - ordered[:, 0]

    margin = (runner_up_gap(full)[is_close].max() + runner_up_gap(full)[~is_close].min()) / 2
    assert (runner_up_gap(full)[is_close] < margin).all()  # full scoring: every close call under the review line
    fake = CountingDenoiser(alphas_cumprod)
    fast = score_cells(fake, alphas_cumprod, images, N_CLASSES, NULL, config, exits=RouteExits(review_margin=margin))
    np.testing.assert_array_equal(runner_up_gap(fast) < margin, runner_up_gap(full) < margin)  # same route
    assert fast.exited[is_close].any() and not fast.exited[~is_close].any()
    assert fast.evals[is_close].sum() < full.evals[is_close].sum()
    np.testing.assert_array_equal(fast.evals[~is_close], full.evals[~is_close])
    # a class routing always sends to senior review keeps its cells scored in full
    protected = score_cells(
        CountingDenoiser(alphas_cumprod),
        alphas_cumprod,
        images,
        N_CLASSES,
        NULL,
        config,
        exits=RouteExits(review_margin=margin, protected=(0, 1, 2, 3)),
    )
    assert not protected.exited.any()


def test_without_null_class_trials_a_close_call_still_takes_the_review_exit():
    """With `score_null_class` off the anomaly score is the min-error score, on another scale, and no gap to the
    null class is ever measured: passing the anomaly threshold on made 'anomaly ruled out' impossible, so the
    review exit never fired."""
    from cytoloop.config import RoutingConfig
    from cytoloop.scoring.trials import route_settled

    config = ScoringConfig(**{**FAST, "score_null_class": False})
    model = DiffusionClassifier(
        ["c0", "c1"], DataConfig(image_size=SIZE), DiffusionModelConfig(block_out_channels=(8, 16)), config
    )
    exits = model.route_exits(RoutingConfig(anomaly_above=0.5, always_review=[]))
    assert exits is not None and exits.anomaly_above is None and exits.review_margin is not None
    close = np.array([[1.0, 1.0 + 1e-6 * k] for k in range(8)]) * 1e-3  # a near-tie, trial after trial
    assert route_settled(close, np.full(8, np.nan), np.ones(2, dtype=bool), config, exits)


def test_candidate_classes_keep_the_exhaustive_winner_and_skip_the_rest(alphas_cumprod, cells):
    exhaustive = ScoringConfig(**{**FAST, "min_trials": 24, "max_trials": 24})
    full, _ = _score(alphas_cumprod, cells, exhaustive)
    winners = full.class_error.argmin(axis=1)
    rng = np.random.default_rng(0)
    for k in (2, 3):
        candidates = np.zeros((len(cells), N_CLASSES), dtype=bool)
        for i, winner in enumerate(winners):  # the winner plus k - 1 other classes, drawn at random
            others = rng.choice([c for c in range(N_CLASSES) if c != winner], k - 1, replace=False)
            candidates[i, [winner, *others]] = True
        fake = CountingDenoiser(alphas_cumprod)
        pruned = score_cells(fake, alphas_cumprod, cells, N_CLASSES, NULL, exhaustive, candidates=candidates)
        np.testing.assert_array_equal(pruned.class_error.argmin(axis=1), winners)
        assert np.isinf(pruned.class_error[~candidates]).all() and np.isfinite(pruned.class_error[candidates]).all()
        assert fake.inputs == len(cells) * 24 * (k + 1)  # k classes and the null class, every trial
    with pytest.raises(ValueError, match="candidates"):
        score_cells(
            CountingDenoiser(alphas_cumprod),
            alphas_cumprod,
            cells,
            N_CLASSES,
            NULL,
            exhaustive,
            candidates=np.zeros((len(cells), N_CLASSES), dtype=bool),
        )


def test_the_cascade_offers_the_teacher_the_students_top_classes():
    from cytoloop.models.cascade import top_k

    probs = np.array([[0.1, 0.5, 0.3, 0.1], [0.7, 0.1, 0.1, 0.1]])
    np.testing.assert_array_equal(
        top_k(probs, 2),
        [[False, True, True, False], [True, True, False, False]],  # ties: the lower index
    )
    assert top_k(probs, None) is None and top_k(probs, 4) is None


def test_dihedral_views_cover_the_eight_symmetries_and_keep_each_cells_answer(alphas_cumprod, cells):
    """The reference's random rotation/flip per trial: 8 distinct views; a cell still gets the same trials alone
    or in a batch; flat cells (no orientation) keep their class; the trials really differ from unrotated ones."""
    from cytoloop.scoring.trials import cell_view

    image = torch.arange(2 * 4 * 4, dtype=torch.float32).view(2, 4, 4)
    assert len({tuple(cell_view(image, v).flatten().tolist()) for v in range(8)}) == 8
    config = ScoringConfig(**FAST, trial_views="dihedral")
    together, _ = _score(alphas_cumprod, cells, config)
    np.testing.assert_array_equal(together.class_error.argmin(axis=1), WINNERS)
    for i in range(len(cells)):
        alone, _ = _score(alphas_cumprod, cells[i : i + 1], config)
        assert alone.evals[0] == together.evals[i]
        np.testing.assert_allclose(alone.class_error[0], together.class_error[i], atol=1e-6)
    unrotated, _ = _score(alphas_cumprod, cells, ScoringConfig(**FAST))
    assert not np.allclose(together.class_error, unrotated.class_error)


def test_refitted_weights_refit_the_variance_prior_they_scale():
    """A fine-tune recalibrating without tuning refits w(t) but kept the parent's variance prior, a variance of
    errors weighted by the parent's w(t): the child's t-tests shrank toward a variance on another scale."""
    from cytoloop.scoring.calibration import fit_weights, variance_prior

    model = tiny_model(
        ScoringConfig(timestep_bins=4, calibration_trials=5, variance_prior=123.0, variance_prior_trials=2, seed=3)
    )
    images = np.random.default_rng(4).uniform(-1, 1, size=(6, 3, SIZE, SIZE)).astype(np.float32)
    fit_weights(model, images, np.array([0, 1, 2] * 2))
    exhaustive = model.scoring_config.model_copy(update={"min_trials": 5, "max_trials": 5, "score_null_class": False})
    logs = model.score(images, exhaustive).logs
    expected = variance_prior(logs, np.asarray(model.timestep_weights))
    assert model.scoring_config.variance_prior == pytest.approx(expected, rel=1e-4) and expected != 123.0
    assert model.scoring_config.variance_prior_trials == 2


def test_one_exhaustive_pass_fits_the_weights_and_tunes_as_two_passes_did():
    """`fit_weights=True` takes w(t) from the first `calibration_trials` trials of the tuning pass instead of a
    pass of its own: the weights, the tuned rule, the temperature and the validation figures must be those of
    `fit_weights` followed by tuning (to float precision), with one denoiser pass fewer."""
    from cytoloop.evaluation import metrics
    from cytoloop.scoring.calibration import fit_weights
    from cytoloop.workflows import tune_model_scoring

    def fresh() -> DiffusionClassifier:
        return tiny_model(
            ScoringConfig(
                min_trials=2,
                max_trials=12,
                timestep_bins=4,
                calibration_trials=5,
                tuning_trials=12,
                tuning_agreement=0.6,
                seed=3,
            )
        )

    images = np.random.default_rng(4).uniform(-1, 1, size=(9, 3, SIZE, SIZE)).astype(np.float32)
    labels = np.array([0, 1, 2] * 3)
    two_passes = fresh()
    fit_weights(two_passes, images, labels)
    separate = tune_model_scoring(two_passes, images, labels)
    one_pass = fresh()
    passes = []
    score = one_pass.score
    one_pass.score = lambda cells, config=None, *a, **k: passes.append(config) or score(cells, config, *a, **k)
    merged = tune_model_scoring(one_pass, images, labels, fit_weights=True)

    assert len(passes) == 2  # the exhaustive pass and the tuned rule's scores for the temperature
    # equal to float32 precision: the same trials, packed into the denoiser's batches differently
    np.testing.assert_allclose(one_pass.timestep_weights, two_passes.timestep_weights, rtol=1e-4)
    assert one_pass.scoring_config.model_dump(exclude={"variance_prior"}) == two_passes.scoring_config.model_dump(
        exclude={"variance_prior"}
    )
    assert one_pass.temperature == pytest.approx(two_passes.temperature, rel=1e-3)
    assert merged["chosen"] == pytest.approx(separate["chosen"], rel=1e-3)
    probs = two_passes.predict(images).probs
    assert merged["validation"]["ece"] == pytest.approx(
        metrics.expected_calibration_error(probs, labels, n_bins=15), abs=1e-4
    )
    assert merged["validation"]["nll"] == pytest.approx(metrics.negative_log_likelihood(probs, labels), rel=1e-3)


def test_a_rule_kept_after_new_weights_gets_its_variance_prior_refitted_under_them(monkeypatch):
    """Tuning with new timestep weights that finds no rule meeting its target keeps the old rule; its variance
    prior, a variance of weighted errors, stayed the one fitted under the old weights (`calibration.fit_weights`
    refits it), so the kept rule tested with a prior of another scale."""
    import cytoloop.workflows as workflows
    from cytoloop.scoring.calibration import variance_prior
    from cytoloop.workflows import tune_model_scoring

    config = ScoringConfig(max_trials=6, min_trials=6, timestep_bins=2, tuning_trials=6, variance_prior=123.0)
    model = tiny_model(config, ("a", "b"))
    images = np.random.default_rng(1).uniform(-1, 1, size=(4, 3, SIZE, SIZE)).astype(np.float32)
    seen = {}

    def no_rule_meets_the_target(logs, weights, config, target):
        seen.update(logs=logs, weights=weights)
        failed = {"variance_prior_trials": 2.0, "min_trials": 6, "elimination_p": 2e-3, "agreement": 0.5}
        return config, [{**failed, "evals_mean": 10.0, "evals_p95": 12.0}]  # the kept rule's, below target

    monkeypatch.setattr(workflows, "tune_scoring", no_rule_meets_the_target)
    report = tune_model_scoring(model, images, np.array([0, 1, 0, 1]), fit_weights=True)
    assert model.scoring_config.min_trials == 6 and report["chosen"] is None  # the old rule kept, none chosen
    expected = variance_prior(seen["logs"], seen["weights"])
    assert model.scoring_config.variance_prior == pytest.approx(expected) and expected != 123.0

"""One pass, every class: a denoiser with one output head per class (`DiffusionModelConfig.conditioning = "heads"`).

The same network is scored two ways: through the shared pass (one evaluation per trial, every head read) and
through the per-class path (`DiffusionClassifier.denoise`, one input per class and trial, as an embedding model is
scored). The trials are the same (each cell's generator), so the errors, decisions and logs must be the same and
only the evaluation counts differ. The training loss, saving and loading, replay and tuning are checked on the
same tiny model.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from cytoloop.config import AugmentConfig, DataConfig, DiffusionModelConfig, ScoringConfig, TrainConfig
from cytoloop.models.diffusion import DiffusionClassifier
from cytoloop.models.loading import load_model
from cytoloop.models.train import UNLABELED, fit, heads_loss
from cytoloop.scoring.calibration import evaluations_needed, tune_scoring
from cytoloop.scoring.trials import replay, replay_decisions, score_cells

SIZE = 16
CLASSES = ["a", "b", "c"]
RULE = dict(min_trials=2, max_trials=12, check_every=1, elimination_p=0.2, timestep_bins=4, batch_size=10)


@pytest.fixture(scope="module")
def heads_model() -> DiffusionClassifier:
    torch.manual_seed(0)
    return DiffusionClassifier(
        CLASSES,
        DataConfig(image_size=SIZE),
        DiffusionModelConfig(conditioning="heads", block_out_channels=(8, 16), norm_num_groups=4),
        ScoringConfig(**RULE),
    )


@pytest.fixture(scope="module")
def cells() -> torch.Tensor:
    rng = np.random.default_rng(5)
    return torch.as_tensor(rng.uniform(-1, 1, size=(5, 3, SIZE, SIZE)).astype(np.float32))


class PerClass:
    """The heads model scored as an embedding model is: one input per (trial, class), counted."""

    def __init__(self, model: DiffusionClassifier):
        self.model, self.inputs = model, 0

    def __call__(self, x_t, t, class_index):
        self.inputs += len(x_t)
        return self.model.denoise(x_t, t, class_index)


def _both(model, cells, config):
    shared = model.score(cells, config)
    per_class = PerClass(model)
    with torch.inference_mode():
        separate = score_cells(per_class, model.scheduler.alphas_cumprod, cells, len(CLASSES), model.null_class, config)
    return shared, separate, per_class


def test_the_heads_denoiser_predicts_every_class_and_the_null_class(heads_model):
    assert heads_model.shared_pass
    assert heads_model.unet.config.out_channels == 3 * (len(CLASSES) + 1)
    assert heads_model.unet.config.num_class_embeds is None
    embedding = DiffusionClassifier(CLASSES, DataConfig(image_size=SIZE), DiffusionModelConfig(norm_num_groups=4))
    assert not embedding.shared_pass and embedding.unet.config.out_channels == 3


def test_exhaustive_shared_pass_measures_what_one_pass_per_class_does_for_one_evaluation_a_trial(heads_model, cells):
    config = heads_model.scoring_config.model_copy(update={"min_trials": 8, "max_trials": 8})
    shared, separate, per_class = _both(heads_model, cells, config)
    np.testing.assert_allclose(np.stack(shared.logs[0].errors), np.stack(separate.logs[0].errors), rtol=1e-4)
    np.testing.assert_allclose(shared.class_error, separate.class_error, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(shared.anomaly_null_ratio, separate.anomaly_null_ratio, rtol=1e-4, atol=1e-7)
    assert (shared.trials == 8).all()
    assert (shared.evals == 8).all()  # one evaluation per trial: every class and the null class from it
    assert separate.evals.sum() == per_class.inputs == len(cells) * 8 * (len(CLASSES) + 1)


def test_adaptive_shared_pass_decides_as_the_per_class_path_and_costs_its_trials(heads_model, cells):
    config = heads_model.scoring_config.model_copy(update={"null_trials": 1})
    shared, separate, _ = _both(heads_model, cells, config)
    np.testing.assert_array_equal(shared.class_error.argmin(axis=1), separate.class_error.argmin(axis=1))
    np.testing.assert_array_equal(shared.trials, separate.trials)
    np.testing.assert_array_equal(shared.evals, shared.trials)
    assert (separate.evals > shared.evals).all()
    # the null class is free in a shared pass: measured on every trial, not on the first `null_trials` only
    assert not np.isnan(shared.logs[0].null_errors).any()
    assert np.isnan(separate.logs[0].null_errors[1:]).all()


def test_replay_and_tuning_count_a_shared_pass_as_one_evaluation_per_trial(heads_model, cells):
    config = heads_model.scoring_config
    exhaustive = heads_model.score(cells, config.model_copy(update={"min_trials": 12, "max_trials": 12}))
    adaptive = heads_model.score(cells, config)
    weights = np.ones(config.timestep_bins)
    for i, log in enumerate(exhaustive.logs):
        replayed, evals = replay(log, config, weights, shared_pass=True)
        assert evals == len(replayed.strata) == adaptive.evals[i]
        assert replay(log, config, weights)[1] > evals  # the per-class count of the same replay
        assert evaluations_needed(log, weights, None, shared_pass=True) <= len(log.strata)
    decided, evals = replay_decisions(exhaustive.logs, config, weights, shared_pass=True)
    np.testing.assert_array_equal(evals, adaptive.evals)
    np.testing.assert_array_equal(decided, adaptive.class_error.argmin(axis=1))
    tuned, rows = tune_scoring(exhaustive.logs, weights, config, 0.5, shared_pass=True)
    assert all(row["evals_mean"] <= 12 for row in rows)


def test_heads_loss_trains_the_own_head_and_the_null_head_only():
    torch.manual_seed(0)
    model = DiffusionClassifier(
        CLASSES, DataConfig(image_size=SIZE), DiffusionModelConfig(conditioning="heads", norm_num_groups=4)
    )
    loss_fn = heads_loss(model.scheduler, model.null_class, TrainConfig())
    images = torch.rand((4, 3, SIZE, SIZE)) * 2 - 1
    labels = torch.tensor([1, 1, UNLABELED, 1])
    loss = loss_fn(model.unet, images, labels, torch.Generator().manual_seed(0))
    loss.backward()
    grad = model.unet.conv_out.weight.grad.unflatten(0, (len(CLASSES) + 1, 3)).abs().sum(dim=(1, 2, 3, 4))
    # heads 0 and 2: no cell of theirs; head 1: its cells; the null head (last): every cell
    assert grad[0] == 0 and grad[2] == 0
    assert grad[1] > 0 and grad[3] > 0


def test_a_heads_model_saves_and_loads_as_one(heads_model, cells, tmp_path):
    heads_model.save(tmp_path / "heads")
    loaded = load_model(tmp_path / "heads")
    assert loaded.model_config.conditioning == "heads" and loaded.shared_pass
    np.testing.assert_array_equal(loaded.score(cells).class_error, heads_model.score(cells).class_error)


def test_a_heads_denoiser_learns_to_tell_two_classes_apart():
    """Trained by its own objective (the heads loss) and scored by its shared pass, the heads separate reddish from
    bluish cells. Heads learn slower than a class embedding (which separates them in 60 steps): 300 steps here."""
    from test_train import red_blue  # same directory, on sys.path under pytest

    images, labels = red_blue(16)
    torch.manual_seed(0)
    model = DiffusionClassifier(
        ["red", "blue"],
        DataConfig(image_size=SIZE),
        DiffusionModelConfig(conditioning="heads", block_out_channels=(8, 16), norm_num_groups=4),
        ScoringConfig(min_trials=8, max_trials=8, timestep_bins=4),
    )
    config = TrainConfig(steps=300, batch_size=16, lr=3e-3, warmup_steps=2, seed=0, threads=1)
    network, loss = model.objective(config)
    trained, _ = fit(network, loss, images, labels, config, AugmentConfig())
    model.use_trained(trained)
    predictions = model.predict(images)
    assert np.mean(predictions.labels == labels) >= 0.75  # chance: 0.5; 0.875-1.0 over four training seeds
    assert (predictions.evals == 8).all()


def test_train_model_saves_a_heads_model_with_a_rule_tuned_on_its_cost(tmp_path, tiny_overrides, clean_env):
    """The whole `cytoloop train` path with `diffusion.conditioning = "heads"`: tuning counts one evaluation per
    trial, and the saved model scores as it was tuned."""
    import json

    from PIL import Image
    from test_train import red_blue

    from cytoloop.config import load_settings
    from cytoloop.data.records import CellRecord
    from cytoloop.workflows import train_model

    overrides = copy.deepcopy(tiny_overrides)
    overrides["diffusion"]["conditioning"] = "heads"
    settings = load_settings(overrides=overrides)
    images, labels = red_blue(12)
    records = []
    for i, (image, label) in enumerate(zip(images, labels)):
        path = tmp_path / "cells" / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(((image.transpose(1, 2, 0) + 1) * 127.5).astype(np.uint8)).save(path)
        records.append(CellRecord(f"{i}.png", path, ["red", "blue"][label], "lab"))
    train_model("diffusion", records, settings, tmp_path / "model", classes=["red", "blue"])
    saved = load_model(tmp_path / "model")
    assert saved.shared_pass and saved.model_config.conditioning == "heads"
    tuning = json.loads((tmp_path / "model" / "tuning.json").read_text())
    assert all(row["evals_mean"] <= settings.scoring.tuning_trials for row in tuning["candidates"])
    predictions = saved.predict(images[::4])
    np.testing.assert_array_equal(predictions.evals, predictions.extra["trials"])

"""What a recipe fixes: the settings that decide its model, of its own model kind only."""

from __future__ import annotations

from cytoloop.config import load_settings
from cytoloop.models.recipes import get_recipe


def test_a_recipe_names_the_settings_set_otherwise_of_its_own_model_kind_only(clean_env):
    """A CNN recipe refused a `diffusion.*` setting it never uses (and a diffusion recipe a `baseline.*` one)."""
    cnn, diffusion = get_recipe("base-pbc-cnn"), get_recipe("base-pbc")
    for recipe in (cnn, diffusion):
        assert recipe.unfixed(load_settings(None, recipe.settings_overrides())) == []
    overrides = {"diffusion": {"layers_per_block": 2}, "baseline": {"dropout": 0.5}, "train": {"threads": 1}}
    assert cnn.unfixed(load_settings(None, {**overrides, **cnn.settings_overrides()})) == ["baseline.dropout"]
    stray = {**overrides, **diffusion.settings_overrides()}
    assert diffusion.unfixed(load_settings(None, stray)) == ["diffusion.layers_per_block"]
    # what the recipe itself sets (its steps and seed), given otherwise: compared after the recipe's overrides it
    # always agreed, and CYTOLOOP_TRAIN__STEPS=5 trained 20,000 steps in silence
    assert diffusion.unfixed(load_settings(None, {"train": {"steps": 5, "seed": 3}})) == ["train.steps", "train.seed"]
    assert diffusion.unfixed(load_settings(None, {"train": {"steps": diffusion.steps}})) == []  # the same: no conflict
    assert diffusion.unfixed(load_settings(None, {"train": {"batch_size": 16}})) == ["train.batch_size"]


def test_train_with_a_recipe_refuses_its_settings_given_otherwise_by_the_environment(clean_env, tmp_path):
    from typer.testing import CliRunner

    from ops.cli import app

    clean_env.setenv("CYTOLOOP_TRAIN__STEPS", "5")
    result = CliRunner().invoke(
        app, ["train", "--data", str(tmp_path / "none.csv"), "--out", str(tmp_path / "m"), "--recipe", "base-pbc"]
    )
    message = " ".join(result.output.split())
    assert (
        result.exit_code == 2
        and "--recipe base-pbc fixes train.steps, which the settings file or CYTOLOOP_*" in message
    )


def test_a_new_model_s_initial_weights_come_from_the_training_seed(tiny_settings):
    """The network was built before `train.seed` was set: its initial weights came from torch's seed of the
    moment, another in every process, so two runs of one recipe started from different weights."""
    import torch

    from cytoloop.workflows import build_model

    def weights(seed: int, kind: str, process_state: int) -> list[torch.Tensor]:
        settings = tiny_settings.model_copy(update={"train": tiny_settings.train.model_copy(update={"seed": seed})})
        torch.manual_seed(process_state)  # whatever state the process happens to be in
        model = build_model(kind, ["a", "b"], settings)
        network = model.unet if kind == "diffusion" else model.network
        return [p.detach().clone() for p in network.parameters()]

    for kind in ("baseline", "diffusion"):
        first, again, other = weights(0, kind, 1), weights(0, kind, 2), weights(1, kind, 1)
        assert all(torch.equal(a, b) for a, b in zip(first, again))
        assert not all(torch.equal(a, b) for a, b in zip(first, other))

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

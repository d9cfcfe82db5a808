"""Named training recipes: how a shipped model was made, as data the `train` command runs again.

A shipped model's weights must never be the only record of how they were made. A recipe fixes everything that
decides the result: the model kind, which cells (domains and classes of a manifest), the split and training seed,
the budget and every setting that differs from the defaults. `cytoloop train --recipe base-pbc --data
../shared/data/manifest.csv --out DIR` then reproduces the model: the same split, the same steps, the same tuned
scoring (a run stopped half-way resumes from DIR's checkpoint). A setting of the sections that decide the model
(data, augmentation, training, the model, scoring) that a settings file or a `CYTOLOOP_*` variable gives otherwise
than the recipe (its own settings, steps and seed, else the defaults) is refused (`Recipe.unfixed`), so a stray
environment variable can neither make a different model under the recipe's name nor be overridden in silence. Settings
that do not change the result (threads, checkpoint and log cadence, how scoring runs on this machine) may still
come from them.

The data is a manifest that lists the recipe's domains: the combined manifest of all labs or the lab's own one;
the split names cells by path, so either gives the same cells.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from cytoloop.errors import UsageError


@dataclass(frozen=True)
class Recipe:
    """One reproducible training run."""

    name: str
    description: str
    model: Literal["diffusion", "baseline"]
    domains: tuple[str, ...]
    steps: int
    classes: tuple[str, ...] | None = None  # None: every labelled class of the domains
    seed: int = 0  # split and training
    overrides: dict = field(default_factory=dict)  # nested settings, as `load_settings(overrides=...)` takes them

    def settings_overrides(self) -> dict:
        """The recipe's settings with its budget and seed, ready for `load_settings`."""
        train = {**self.overrides.get("train", {}), "steps": self.steps, "seed": self.seed}
        return {**self.overrides, "train": train}

    def unfixed(self, given) -> list[str]:
        """The settings (`section.field`) that decide the model and that `given`, the settings of a settings file
        and `CYTOLOOP_*` variables without this recipe's (`load_settings(config)`), sets to other values than the
        recipe's (its overrides, else the defaults): they would train another model under this recipe's name, or
        be silently overridden by it. Compared on the settings with the recipe's overrides applied, the fields the
        recipe sets (its steps and seed) always agreed: `CYTOLOOP_TRAIN__STEPS=5` trained 20,000 steps."""
        from cytoloop.models.loading import RUNTIME_FIELDS

        wanted = self.settings_overrides()
        differing = []
        other = "baseline" if self.model == "diffusion" else "diffusion"  # the other kind's settings: not used
        for section in (s for s in DECISIVE_SECTIONS if s != other):
            part = getattr(given, section)
            expected = type(part)(**wanted.get(section, {})).model_dump(mode="json")
            free = RUNTIME_FIELDS if section == "scoring" else NEUTRAL_TRAIN_FIELDS if section == "train" else ()
            found, default = part.model_dump(mode="json"), type(part)().model_dump(mode="json")
            chosen = [key for key in expected if key in part.model_fields_set or found[key] != default[key]]
            differing += [f"{section}.{key}" for key in chosen if key not in free and found[key] != expected[key]]
        return differing


# the sections whose settings decide what a training run makes, and the training settings among them that do not
DECISIVE_SECTIONS = ("data", "augment", "train", "diffusion", "baseline", "scoring")
NEUTRAL_TRAIN_FIELDS = ("threads", "checkpoint_every", "log_every")

# PBC at 32 px on a 2-core CPU: bf16 autocast and batch 32 bring 20,000 steps to about 80 minutes
# (docs/benchmarks.md, "Base model"). The CNN baseline sees the same cells, split, batch and number of steps.
# Tuning the diffusion model's scoring on 120 validation cells (15 per class) x 200 exhaustive trials x 8 classes
# is about 200,000 denoiser evaluations, some 10 minutes of the same CPU.
_PBC_TRAINING = {"batch_size": 32, "precision": "bf16", "checkpoint_every": 500}
# The reference's held-out-class protocol: erythroblasts and immature granulocytes are kept out of training and
# scored as anomalies. 6,000 steps (about 25 minutes here) is a smaller budget than the base model's; both kinds get it.
_PBC_KNOWN_SIX = ("basophil", "eosinophil", "lymphocyte", "monocyte", "neutrophil", "platelet")

RECIPES: dict[str, Recipe] = {
    recipe.name: recipe
    for recipe in (
        Recipe(
            name="base-pbc",
            description="CytoLoop's base model: the diffusion classifier on PBC's eight classes, 32 px, 20,000 steps",
            model="diffusion",
            domains=("pbc",),
            steps=20_000,
            overrides={"data": {"image_size": 32}, "train": _PBC_TRAINING, "scoring": {"calibration_cells": 120}},
        ),
        Recipe(
            name="base-pbc-cnn",
            description="the CNN baseline on the same PBC cells, split, batch and steps as base-pbc",
            model="baseline",
            domains=("pbc",),
            steps=20_000,
            overrides={"data": {"image_size": 32}, "train": _PBC_TRAINING},
        ),
        Recipe(
            name="anomaly-pbc6",
            description="the reference's anomaly protocol: the diffusion classifier on PBC without erythroblasts and "
            "immature granulocytes (6 classes), 32 px, 6,000 steps",
            model="diffusion",
            domains=("pbc",),
            classes=_PBC_KNOWN_SIX,
            steps=6_000,
            overrides={"data": {"image_size": 32}, "train": _PBC_TRAINING, "scoring": {"calibration_cells": 120}},
        ),
        Recipe(
            name="anomaly-pbc6-cnn",
            description="the CNN baseline on the same six PBC classes, split, batch and steps as anomaly-pbc6",
            model="baseline",
            domains=("pbc",),
            classes=_PBC_KNOWN_SIX,
            steps=6_000,
            overrides={"data": {"image_size": 32}, "train": _PBC_TRAINING},
        ),
    )
}


def get_recipe(name: str) -> Recipe:
    """The recipe called `name`; an unknown name is a ValueError listing the known ones."""
    if name not in RECIPES:
        raise UsageError(f"unknown recipe {name!r}; known: {', '.join(sorted(RECIPES))}")
    return RECIPES[name]

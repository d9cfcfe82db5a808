"""Shared fixtures: where the real cells live, and settings for models small enough to train in seconds.

The real cell images are never copied into the repository: tests read them from `../shared/data/cells` next to
the repository (or from `$TEST_SHARED_CELLS`). When that folder is missing the tests that need it FAIL with a
message saying where they looked; they do not skip, so a misconfigured machine cannot pass silently.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

# Before anything imports diffusers / huggingface_hub: the tests never touch the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Ray Train's controller looks at its workers every 2 s, and each step of a run (workers up, running, finished)
# waits for a look: a fine-tune of a few steps took 15 s, a third of it waiting (10 s at 0.2 s, measured on 2
# cores). The tests' Rays (theirs and the stack's, started from here) inherit it; a real fine-tune's minutes do not
# notice either way.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")

import pytest  # noqa: E402
import torch  # noqa: E402

# The models under test are tiny: more than two threads only adds overhead (and oversubscribes a busy box).
torch.set_num_threads(min(2, torch.get_num_threads()))

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CELLS_DIR = REPO_ROOT / ".." / "shared" / "data" / "cells"
DATA_ENV = "TEST_SHARED_CELLS"  # not CYTOLOOP_*: every such variable is a setting

# A diffusion model and a CNN that train in well under a second per step at 16 px, and scoring that stops early.
TINY_OVERRIDES: dict = {
    "data": {"image_size": 16},
    "diffusion": {"block_out_channels": (8, 16), "norm_num_groups": 4, "layers_per_block": 1, "attention": False},
    "baseline": {"channels": (8, 16)},
    "train": {
        "steps": 10,
        "batch_size": 16,
        "warmup_steps": 2,
        "checkpoint_every": 5,
        "log_every": 2,
        "threads": 1,
        "seed": 0,
    },
    "scoring": {
        "min_trials": 4,
        "max_trials": 8,
        "check_every": 2,
        "calibration_trials": 4,
        "tuning_trials": 8,  # training ends by tuning the scoring on these exhaustive trials
        "tuning_orders": 2,
        "timestep_bins": 4,  # so that calibration's 4 exhaustive trials visit every stratum once
        "batch_size": 64,
        "seed": 0,
    },
}


def resolve_cells_dir() -> Path:
    override = os.environ.get(DATA_ENV)
    return Path(override).expanduser().resolve() if override else DEFAULT_CELLS_DIR.resolve()


@pytest.fixture
def clean_env(monkeypatch):
    """No CYTOLOOP_* settings from the developer's shell, for tests that build settings. Opt-in, so that other
    tests' own environment is left alone."""
    for name in list(os.environ):
        if name.startswith("CYTOLOOP_"):
            monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.fixture(scope="session")
def cells_dir() -> Path:
    """The shared folder of real cell images (with manifest.csv). Missing data is a failure, never a skip."""
    path = resolve_cells_dir()
    if not (path / "manifest.csv").is_file():
        pytest.fail(
            f"real cell images not found: expected {path}/manifest.csv "
            f"(the shared data lives at <repo>/../shared/data/cells; set {DATA_ENV}=/path/to/cells to override)",
            pytrace=False,
        )
    return path


@pytest.fixture(scope="session")
def tiny_overrides() -> dict:
    """The nested override dict of `tiny_settings`, one for the session (module fixtures use it): a test that
    changes it changes it for every later test, so change a `copy.deepcopy` of it."""
    return copy.deepcopy(TINY_OVERRIDES)


@pytest.fixture
def tiny_settings(tiny_overrides, clean_env):
    from cytoloop.config import load_settings

    return load_settings(overrides=copy.deepcopy(tiny_overrides))

"""What every CytoLoop classifier provides, and how a model directory is laid out.

A model directory holds `model.json` (kind, classes, the preprocessing it was trained with, its architecture,
calibration and provenance) and `weights.pt` (a state dict). Anything that can classify cells — the diffusion
classifier, the CNN baseline, the cascade of both — returns `Predictions`, so evaluation, serving and routing
never care which model they hold.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np

from cytoloop.config import DataConfig, RoutingConfig, TrainConfig
from cytoloop.errors import CytoLoopError, UsageError
from cytoloop.files import replaced_binary, write_text

if TYPE_CHECKING:
    import torch
    from torch import nn

    from cytoloop.models.train import LossFn

MODEL_FILE = "model.json"
WEIGHTS_FILE = "weights.pt"
# a model directory's files (beside its training checkpoints): what a registered version carries, and what a
# model replaced by another run (`train --overwrite`) leaves behind
MODEL_ARTIFACTS = (
    MODEL_FILE,
    WEIGHTS_FILE,
    "split.json",
    "training.json",
    "learning_curve.png",
    "colour_reference.json",
    "tuning.json",  # how the version's scoring rule was tuned (the model card reads it)
    "recipe.json",  # the command that makes it (a shipped model)
    "MODEL_CARD.md",
)


class ModelLoadError(CytoLoopError, ValueError):
    """A directory that is not a CytoLoop model, or one written by an incompatible version."""


@dataclass
class Predictions:
    """Per-cell outputs, row i for input cell i.

    `probs` are calibrated class probabilities (rows sum to 1); `confidence` is the top probability; `anomaly`
    grows with how badly the known classes explain a cell (its scale is per model: compare within a model only);
    `evals` counts the network evaluations spent on each cell (denoiser calls for the diffusion model, 1 for a CNN).
    `extra` holds model-specific per-cell arrays (alternative anomaly scores, raw errors) for analysis.
    """

    probs: np.ndarray
    anomaly: np.ndarray
    evals: np.ndarray
    extra: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def labels(self) -> np.ndarray:
        return self.probs.argmax(axis=1)

    @property
    def confidence(self) -> np.ndarray:
        return self.probs.max(axis=1)

    @property
    def entropy(self) -> np.ndarray:
        p = np.clip(self.probs, 1e-12, 1.0)
        return -(p * np.log(p)).sum(axis=1)

    def __len__(self) -> int:
        return len(self.probs)

    def subset(self, index: np.ndarray) -> Predictions:
        return Predictions(
            self.probs[index], self.anomaly[index], self.evals[index], {k: v[index] for k, v in self.extra.items()}
        )

    @staticmethod
    def concat(parts: list[Predictions]) -> Predictions:
        keys = parts[0].extra.keys()
        return Predictions(
            np.concatenate([p.probs for p in parts]),
            np.concatenate([p.anomaly for p in parts]),
            np.concatenate([p.evals for p in parts]),
            {k: np.concatenate([p.extra[k] for p in parts]) for k in keys},
        )


class Classifier(Protocol):
    """The small interface models plug in through (MONAI-Label style): classify preprocessed cells, save, describe."""

    kind: str
    classes: list[str]
    data_config: DataConfig

    def predict(
        self,
        images: np.ndarray,
        progress: bool = False,
        *,
        routing: RoutingConfig | None = None,
        candidates: np.ndarray | None = None,
    ) -> Predictions:
        """Classify preprocessed cells (N, 3, S, S) in [-1, 1]. `routing`: the thresholds the answers will be
        routed by; a model that scores in trials may stop a cell once its route is settled, marking its class
        provisional in `extra["provisional"]`; a model without trials ignores it. `candidates`: (N, classes)
        booleans, the classes each cell is decided among (a site's classes, `class_mask`); the others get
        probability 0 and no part in the anomaly score. None: all classes."""
        ...

    def save(self, directory: Path) -> Path: ...


def class_mask(classes: list[str], allowed: list[str] | None) -> np.ndarray | None:
    """The booleans over a model's `classes` that mark the `allowed` ones (a site's classes); None when `allowed`
    is None. Raises UsageError naming any allowed class the model does not have."""
    if allowed is None:
        return None
    unknown = sorted(set(allowed) - set(classes))
    if unknown or not allowed:
        raise UsageError(
            f"class(es) {', '.join(unknown) or '(none)'} to decide among are not classes of the model "
            f"({', '.join(classes)})"
        )
    return np.isin(classes, allowed)


def candidate_rows(mask: np.ndarray | None, n_cells: int) -> np.ndarray | None:
    """`mask` (one row of booleans) as the (n_cells, classes) `candidates` of `predict`; None stays None."""
    return None if mask is None else np.tile(mask, (n_cells, 1))


@runtime_checkable
class Trainable(Classifier, Protocol):
    """A classifier the one training loop (`train.fit`) can train and fine-tune: it names the network to train
    and its loss, and takes the trained network back. Training and fine-tuning go through this, never through
    the model's kind."""

    temperature: float
    info: dict
    learns_from_unlabeled: bool  # whether unlabeled cells have a use in its loss (the diffusion null class)

    def objective(self, config: TrainConfig) -> tuple[nn.Module, LossFn]:
        """The network to train (the model's own, trained in place) and the loss `fit` minimises."""
        ...

    def use_trained(self, network: nn.Module) -> None:
        """Take the trained network (the EMA copy `fit` returns) as the model's weights."""
        ...


def write_model_dir(directory: Path, meta: dict, state_dict: dict) -> Path:
    import torch

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # each file whole or not at all: weights written in place and stopped half-way (killed, a full disk) left a
    # model that loaded no more (`cytoloop tune` rewrites an accepted model's)
    with replaced_binary(directory / WEIGHTS_FILE) as handle:
        torch.save(state_dict, handle)
    write_text(directory / MODEL_FILE, json.dumps(meta, indent=1))
    return directory


def checked_images(images: np.ndarray | torch.Tensor, config: DataConfig) -> np.ndarray:
    """`images` as a model takes them, (cells, 3, size, size) finite floats from `data.preprocess`, or a UsageError
    saying what is wrong: a fully convolutional network would score a cell of another size without complaint,
    and a NaN pixel makes every class's error NaN, so no class is ever dropped and the answer is NaN."""
    if hasattr(images, "detach"):  # a torch tensor, wherever it lives and whatever its precision
        images = images.detach().cpu().float().numpy()
    array = np.asarray(images)
    size = config.image_size
    if array.ndim != 4 or array.shape[1:] != (3, size, size):
        raise UsageError(
            f"images must be (cells, 3, {size}, {size}) as data.preprocess makes them for this model, got shape "
            f"{array.shape}"
        )
    if not np.issubdtype(array.dtype, np.floating):
        raise UsageError(f"images must be floats (data.preprocess scales them to [-1, 1]), got {array.dtype}")
    bad = ~np.isfinite(array).all(axis=(1, 2, 3))
    if bad.any():
        raise UsageError(f"{bad.sum()} of {len(array)} images hold NaN or infinite pixels, first at row {bad.argmax()}")
    return array


def no_predictions(n_classes: int) -> Predictions:
    """The predictions for an empty batch."""
    return Predictions(np.zeros((0, n_classes)), np.zeros(0), np.zeros(0, dtype=int))


def read_model_record(directory: Path, name: str) -> dict | None:
    """A JSON record of a model directory (model.json, training.json, ...), None when it has none; a damaged one
    is named (not a traceback)."""
    path = Path(directory) / name
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ModelLoadError(f"{path}: not valid JSON ({error}); the file is damaged or was cut short") from None
    if not isinstance(record, dict):
        raise ModelLoadError(f"{path}: expected a JSON object, got {type(record).__name__}")
    return record


def read_model_meta(directory: Path) -> dict:
    meta = read_model_record(directory, MODEL_FILE)
    if meta is None:
        raise ModelLoadError(f"{directory}: not a CytoLoop model directory (no {MODEL_FILE})")
    return meta

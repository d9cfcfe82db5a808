"""The discriminative baseline: a small CNN trained from scratch through the same data path and CLI.

It is the yardstick for every claim made for the diffusion classifier, so it gets the same data, augmentation,
training budget and calibration (temperature scaling). Its anomaly score is the energy, -T·logsumexp(logits/T);
max-softmax is kept in `extra` for comparison.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from cytoloop.config import BaselineModelConfig, DataConfig, RoutingConfig, TrainConfig
from cytoloop.models.base import Predictions, checked_images, no_predictions, read_model_meta, write_model_dir

if TYPE_CHECKING:
    from cytoloop.models.train import LossFn


class SmallCNN(nn.Module):
    """Conv-BN-ReLU blocks, each halving the resolution, then global average pooling and a linear head."""

    def __init__(self, n_classes: int, channels: tuple[int, ...] = (32, 64, 128), dropout: float = 0.2):
        super().__init__()
        layers, previous = [], 3
        for width in channels:
            layers += [
                nn.Conv2d(previous, width, 3, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
                nn.Conv2d(width, width, 3, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
            previous = width
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(previous, n_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3), keepdim=True))


class BaselineClassifier:
    kind = "baseline"

    def __init__(
        self,
        classes: list[str],
        data_config: DataConfig,
        model_config: BaselineModelConfig,
        temperature: float = 1.0,
        info: dict | None = None,
    ):
        self.classes = list(classes)
        self.data_config = data_config
        self.model_config = model_config
        self.temperature = temperature
        self.info = dict(info or {})
        self.network: nn.Module = SmallCNN(len(classes), tuple(model_config.channels), model_config.dropout)
        # where `logits` runs the network (a scoring.device value): "auto" is CUDA when a GPU is present; loading
        # sets the machine's `scoring.device`, or a cascade's teacher's (`models.loading`)
        self.device = "auto"

    learns_from_unlabeled = False  # cross-entropy needs a label

    def objective(self, config: TrainConfig) -> tuple[nn.Module, LossFn]:
        """The CNN and its cross-entropy loss (`train.baseline_loss`)."""
        from cytoloop.models.train import baseline_loss

        return self.network, baseline_loss(config)

    def use_trained(self, network: nn.Module) -> None:
        self.network = network

    def logits(self, images: np.ndarray, batch_size: int | None = None) -> np.ndarray:
        """The network's logits on `self.device`, in batches of `batch_size` cells (None: 256 on a CPU, 4096 on a
        GPU, where a small batch is launch-bound)."""
        from cytoloop.models.diffusion import resolve_device

        device = resolve_device(self.device)
        # moved outside inference mode, in place: weights made there would be inference tensors, and a later
        # training round of this network (the active-learning benchmark's) could not take their gradients
        network = self.network.to(device).eval()
        size = batch_size or (4096 if device.type == "cuda" else 256)
        x = torch.as_tensor(images, dtype=torch.float32)
        with torch.inference_mode():
            return torch.cat([network(x[i : i + size].to(device)).cpu() for i in range(0, len(x), size)]).numpy()

    def predictions_from_logits(
        self, logits: np.ndarray, temperature: float | None = None, candidates: np.ndarray | None = None
    ) -> Predictions:
        """Calibrated probabilities and the energy score; a class outside a cell's `candidates` is left out of
        both (its logit is -inf: probability 0, no share of the partition function)."""
        scaled = logits / (temperature or self.temperature)
        if candidates is not None:
            candidates = np.asarray(candidates, dtype=bool)
            if candidates.shape != logits.shape or not candidates.any(axis=1).all():
                raise ValueError(f"candidates must be {logits.shape} booleans with a class for every cell")
            scaled = np.where(candidates, scaled, -np.inf)
        shifted = scaled - scaled.max(axis=1, keepdims=True)
        probs = np.exp(shifted)
        probs /= probs.sum(axis=1, keepdims=True)
        log_partition = np.log(np.exp(shifted).sum(axis=1)) + scaled.max(axis=1)
        energy = -(temperature or self.temperature) * log_partition
        return Predictions(
            probs=probs,
            anomaly=energy,
            evals=np.ones(len(logits), dtype=int),
            extra={"anomaly_max_softmax": 1.0 - probs.max(axis=1)},
        )

    def predict(
        self,
        images: np.ndarray,
        progress: bool = False,
        *,
        routing: RoutingConfig | None = None,
        candidates: np.ndarray | None = None,
    ) -> Predictions:
        """One CNN pass per cell (nothing to stop early: `routing` is ignored), decided among `candidates`."""
        array = checked_images(images, self.data_config)
        if len(array) == 0:
            return no_predictions(len(self.classes))
        return self.predictions_from_logits(self.logits(array), candidates=candidates)

    def save(self, directory: Path) -> Path:
        meta = {
            "kind": self.kind,
            "classes": self.classes,
            "data": self.data_config.model_dump(mode="json"),
            "model": self.model_config.model_dump(mode="json"),
            "temperature": self.temperature,
            "info": self.info,
        }
        return write_model_dir(Path(directory), meta, {k: v.cpu() for k, v in self.network.state_dict().items()})

    @classmethod
    def load(cls, directory: Path) -> BaselineClassifier:
        meta = read_model_meta(directory)
        model = cls(
            classes=meta["classes"],
            data_config=DataConfig(**meta["data"]),
            model_config=BaselineModelConfig(**meta["model"]),
            temperature=meta["temperature"],
            info=meta.get("info"),
        )
        model.network.load_state_dict(torch.load(Path(directory) / "weights.pt", weights_only=True))
        return model

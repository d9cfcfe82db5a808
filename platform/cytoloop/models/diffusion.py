"""The diffusion classifier: a class-conditional denoiser plus the scoring rule that turns it into a classifier.

The denoiser is a diffusers `UNet2DModel` with `num_class_embeds = len(classes) + 1`; the last embedding is the
null class, trained by classifier-free dropout and by unlabeled cells, so that every cell teaches the generative
model what a cell looks like. Classification is `scoring.score_cells`; probabilities are a softmax over the
negative class errors divided by a temperature fitted on validation data (`calibration.py`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from cytoloop.config import DataConfig, DiffusionModelConfig, RoutingConfig, ScoringConfig, TrainConfig
from cytoloop.errors import UsageError
from cytoloop.models.base import Predictions, checked_images, no_predictions, read_model_meta, write_model_dir
from cytoloop.scoring.trials import RouteExits, ScoreResult, score_cells, trial_disagreement
from cytoloop.threads import torch_threads

if TYPE_CHECKING:
    from cytoloop.models.train import LossFn


def build_unet(config: DiffusionModelConfig, image_size: int, n_classes: int):
    from diffusers import UNet2DModel

    levels = len(config.block_out_channels)
    down = ["DownBlock2D"] * levels
    up = ["UpBlock2D"] * levels
    if config.attention:
        down[-1], up[0] = "AttnDownBlock2D", "AttnUpBlock2D"
    return UNet2DModel(
        sample_size=image_size,
        in_channels=3,
        out_channels=3,
        block_out_channels=tuple(config.block_out_channels),
        layers_per_block=config.layers_per_block,
        down_block_types=tuple(down),
        up_block_types=tuple(up),
        norm_num_groups=config.norm_num_groups,
        num_class_embeds=n_classes + 1,
    )


def resolve_device(name: str) -> torch.device:
    """'auto' is CUDA when a GPU is present, else the CPU; asking for 'cuda' without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("scoring device 'cuda' was asked for, but torch sees no CUDA device")
    return torch.device(name)


def build_scheduler(config: DiffusionModelConfig):
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=config.num_train_timesteps, beta_schedule=config.beta_schedule, prediction_type="epsilon"
    )


class DiffusionClassifier:
    """A trained denoiser with everything needed to classify: classes, preprocessing, scoring and calibration."""

    kind = "diffusion"

    def __init__(
        self,
        classes: list[str],
        data_config: DataConfig,
        model_config: DiffusionModelConfig,
        scoring_config: ScoringConfig | None = None,
        temperature: float = 1.0,
        timestep_weights: list[float] | None = None,
        info: dict | None = None,
        unet=None,
    ):
        self.classes = list(classes)
        self.data_config = data_config
        self.model_config = model_config
        self.scoring_config = scoring_config or ScoringConfig()
        self.temperature = temperature
        self.timestep_weights = timestep_weights
        self.info = dict(info or {})
        # the model's own values of the runtime fields a machine replaced when loading it (`models.loading`):
        # `save` writes these, so one machine's precision or threads never travel on with the model
        self.own_runtime: dict[str, Any] = {}
        self.unet = unet if unet is not None else build_unet(model_config, data_config.image_size, len(classes))
        # (unet, its torch.compile), made on first use when `scoring.compile` asks for it
        self._compiled: tuple[torch.nn.Module, Callable] | None = None
        self.scheduler = build_scheduler(model_config)

    learns_from_unlabeled = True  # unlabeled cells train the null class

    def objective(self, config: TrainConfig) -> tuple[torch.nn.Module, LossFn]:
        """The denoiser and its epsilon-prediction loss (`train.diffusion_loss`)."""
        from cytoloop.models.train import diffusion_loss

        return self.unet, diffusion_loss(self.scheduler, self.null_class, config)

    def use_trained(self, network: torch.nn.Module) -> None:
        self.unet = network
        self._compiled = None

    @property
    def null_class(self) -> int:
        return len(self.classes)

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, class_index: torch.Tensor) -> torch.Tensor:
        return self.unet(x_t, t, class_labels=class_index).sample

    def runtime_denoiser(self, config: ScoringConfig) -> tuple[Callable, torch.device]:
        """The denoiser as scoring should run it: on its device, in its memory format, under autocast.

        bf16 autocast roughly halves a CPU forward pass where the CPU has bf16 instructions (avx512_bf16, AMX)
        and is the usual choice on a GPU; the errors are always computed in fp32.
        """
        device = resolve_device(config.device)
        if config.precision == "fp16" and device.type != "cuda":
            raise UsageError("precision fp16 needs a CUDA device; use bf16 on a CPU")
        dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[config.precision]
        memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
        self.unet.to(device=device, memory_format=memory_format).eval()
        network = self.unet
        if config.compile:
            if self._compiled is None or self._compiled[0] is not self.unet:  # compile once per network
                self._compiled = (self.unet, torch.compile(self.unet))
            network = self._compiled[1]

        def denoise(x_t: torch.Tensor, t: torch.Tensor, class_index: torch.Tensor) -> torch.Tensor:
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                return network(x_t.contiguous(memory_format=memory_format), t, class_labels=class_index).sample

        return denoise, device

    def score(
        self,
        images: np.ndarray | torch.Tensor,
        config: ScoringConfig | None = None,
        progress: bool = False,
        exits: RouteExits | None = None,
        candidates: np.ndarray | None = None,
    ) -> ScoreResult:
        """Raw diffusion scores (class errors, anomaly statistics, evaluation counts) for preprocessed cells; route
        exits and candidate classes as in `scoring.trials.score_cells`."""
        config = config or self.scoring_config
        weights = self.timestep_weights
        if weights is not None and len(weights) != config.timestep_bins:
            raise UsageError(
                f"the model's timestep weights were fitted for {len(weights)} timestep strata, but "
                f"scoring asks for timestep_bins={config.timestep_bins}; keep the model's timestep_bins "
                "or calibrate the model again"
            )
        denoise, device = self.runtime_denoiser(config)
        with torch_threads(config.threads):
            return score_cells(
                denoise,
                self.scheduler.alphas_cumprod,
                torch.as_tensor(checked_images(images, self.data_config), dtype=torch.float32),
                len(self.classes),
                self.null_class,
                config,
                None if weights is None else np.asarray(weights),
                progress=progress,
                device=device,
                exits=exits,
                candidates=candidates,
            )

    def predictions_from_scores(
        self, result: ScoreResult, temperature: float | None = None, config: ScoringConfig | None = None
    ) -> Predictions:
        """Calibrated predictions from raw scores; `config` must be the one the scores were made with."""
        config = config or self.scoring_config
        logits = -result.class_error / (temperature or self.temperature)
        logits = logits - logits.max(axis=1, keepdims=True)
        probs = np.exp(logits)
        probs /= probs.sum(axis=1, keepdims=True)
        anomaly = (
            result.anomaly_null_ratio
            if config.anomaly_score == "null_ratio" and config.score_null_class
            else result.anomaly_min_error
        )
        return Predictions(
            probs=probs,
            anomaly=anomaly,
            evals=result.evals,
            extra={
                "anomaly_min_error": result.anomaly_min_error,
                "anomaly_null_ratio": result.anomaly_null_ratio,
                "anomaly_gap": _negative_gap(result.class_error),
                "trials": result.trials,
                "provisional": result.exited,
                "disagreement": np.array(
                    [trial_disagreement(log, int(label)) for log, label in zip(result.logs, probs.argmax(axis=1))]
                ),
            },
        )

    def predict(
        self,
        images: np.ndarray,
        progress: bool = False,
        config: ScoringConfig | None = None,
        *,
        routing: RoutingConfig | None = None,
        candidates: np.ndarray | None = None,
    ) -> Predictions:
        """Calibrated predictions. With `routing` (the thresholds the answers will be routed by), a cell stops once
        its route is settled (past the anomaly threshold, or a close call under the review line) and its class is
        provisional (`extra["provisional"]`); `candidates` restricts each cell to some classes (`scoring.trials`)."""
        if np.size(images) == 0:  # `score` checks every other batch (once: it is on the serving path)
            checked_images(images, self.data_config)  # an empty batch of the wrong shape is still named
            return no_predictions(len(self.classes))
        result = self.score(images, config, progress, self.route_exits(routing, config), candidates)
        return self.predictions_from_scores(result, config=config)

    def route_exits(self, routing: RoutingConfig | None, config: ScoringConfig | None = None) -> RouteExits | None:
        """The routing thresholds in scoring's units: the anomaly threshold as is (the null-ratio score), the review
        line as the error gap under which the top class's probability stays below it (temperature x logit)."""
        if routing is None:
            return None
        config = config or self.scoring_config
        line = routing.review_below
        return RouteExits(
            # the anomaly threshold is on the null-ratio scale; without null-class trials there is nothing to test
            anomaly_above=routing.anomaly_above
            if config.anomaly_score == "null_ratio" and config.score_null_class
            else None,
            review_margin=self.temperature * float(np.log(line / (1 - line))) if 0.5 < line < 1 else None,
            protected=tuple(i for i, c in enumerate(self.classes) if c in routing.always_review),
        )

    @torch.inference_mode()
    def generate(self, class_name: str, n: int, steps: int = 50, guidance: float = 2.0, seed: int = 0) -> np.ndarray:
        """Sample n cells of one class with DDIM and classifier-free guidance; returns (n, S, S, 3) in [0, 1]."""
        from diffusers import DDIMScheduler

        if class_name not in self.classes:
            raise UsageError(f"unknown class {class_name!r}; valid: {', '.join(self.classes)}")
        self.unet.eval()
        sampler = DDIMScheduler.from_config(self.scheduler.config)
        sampler.set_timesteps(steps)
        generator = torch.Generator().manual_seed(seed)
        size = self.data_config.image_size
        device = next(self.unet.parameters()).device  # wherever scoring last put it
        x = torch.randn((n, 3, size, size), generator=generator).to(device)
        labels = torch.full((n,), self.classes.index(class_name), device=device)
        null = torch.full((n,), self.null_class, device=device)
        for t in sampler.timesteps:
            t_batch = torch.full((2 * n,), int(t), device=device)
            eps = self.denoise(torch.cat([x, x]), t_batch, torch.cat([labels, null]))
            eps_cond, eps_null = eps.chunk(2)
            eps = eps_null + guidance * (eps_cond - eps_null)
            x = sampler.step(eps, t, x, generator=generator).prev_sample
        return ((x.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).cpu().numpy()

    def save(self, directory: Path) -> Path:
        meta = {
            "kind": self.kind,
            "classes": self.classes,
            "data": self.data_config.model_dump(mode="json"),
            "model": self.model_config.model_dump(mode="json"),
            "scoring": self.scoring_config.model_dump(mode="json") | self.own_runtime,
            "temperature": self.temperature,
            "timestep_weights": self.timestep_weights,
            "info": self.info,
        }
        return write_model_dir(Path(directory), meta, {k: v.cpu() for k, v in self.unet.state_dict().items()})

    @classmethod
    def load(cls, directory: Path) -> DiffusionClassifier:
        meta = read_model_meta(directory)
        model = cls(
            classes=meta["classes"],
            data_config=DataConfig(**meta["data"]),
            model_config=DiffusionModelConfig(**meta["model"]),
            scoring_config=ScoringConfig(**meta["scoring"]),
            temperature=meta["temperature"],
            timestep_weights=meta.get("timestep_weights"),
            info=meta.get("info"),
        )
        model.unet.load_state_dict(torch.load(Path(directory) / "weights.pt", weights_only=True))
        return model


def _negative_gap(class_error: np.ndarray) -> np.ndarray:
    """The reference's anomaly statistic, as a score (higher: more anomalous): minus the gap between the best and
    the second-best class's error. A cell no class explains better than another has no gap."""
    if class_error.shape[1] < 2:
        return np.zeros(len(class_error))
    ordered = np.sort(class_error, axis=1)
    return -(ordered[:, 1] - ordered[:, 0])  # -inf for a cell scored on one candidate class: no rival, no doubt

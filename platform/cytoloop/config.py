"""The one configuration model of CytoLoop.

Every setting lives here, with its default, so that a run can be reproduced from the JSON it writes. Values
come, in increasing priority, from the defaults, an optional JSON file, and environment variables
`CYTOLOOP_<SECTION>__<FIELD>` (for example `CYTOLOOP_SCORING__MAX_TRIALS=100`). Validation happens once, at the
edge (CLI, service start-up); library functions receive validated section objects.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataConfig(_Section):
    """How a cell image becomes a model input. Saved with every model so serving can never drift from training."""

    image_size: int = Field(32, ge=16, le=512, description="model resolution in pixels (square)")
    crop_fraction: float = Field(
        0.8, gt=0.1, le=1.0, description="side of the central square crop, as a fraction of the shorter side"
    )
    stain_normalization: Literal["none", "reinhard"] = Field(
        "reinhard",
        description="'reinhard' matches each cell's colour moments (in l-alpha-beta space) to a fixed reference, "
        "removing most of the stain and camera shift between labs",
    )


class AugmentConfig(_Section):
    """Training-time augmentation; the colour part stands in for the stain variation between labs."""

    flips: bool = True
    rot90: bool = True
    hed_sigma: float = Field(0.05, ge=0.0, le=0.5, description="std of the multiplicative jitter per stain channel")
    hed_bias: float = Field(0.05, ge=0.0, le=0.5, description="std of the additive jitter per stain channel")
    brightness: float = Field(0.15, ge=0.0, le=1.0)
    contrast: float = Field(0.15, ge=0.0, le=1.0)
    saturation: float = Field(0.15, ge=0.0, le=1.0)


class DiffusionModelConfig(_Section):
    """Architecture of the class-conditional denoiser (a diffusers UNet2DModel with class embeddings)."""

    block_out_channels: tuple[int, ...] = (32, 64, 64)
    layers_per_block: int = Field(1, ge=1, le=4)
    attention: bool = Field(False, description="self-attention in the lowest-resolution block")
    norm_num_groups: int = 8
    num_train_timesteps: int = 1000
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "squaredcos_cap_v2"


class BaselineModelConfig(_Section):
    """The discriminative baseline: a small CNN trained through the same data path."""

    channels: tuple[int, ...] = (32, 64, 128)
    dropout: float = Field(0.2, ge=0.0, lt=1.0)


class TrainConfig(_Section):
    steps: int = Field(2000, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(2e-4, gt=0)
    weight_decay: float = Field(1e-2, ge=0)
    warmup_steps: int = Field(100, ge=0)
    ema_decay: float = Field(0.999, ge=0.0, lt=1.0)
    null_class_prob: float = Field(
        0.1, ge=0.0, le=1.0, description="classifier-free dropout: a labelled cell trains the null class this often"
    )
    min_snr_gamma: float | None = Field(5.0, description="Min-SNR loss weighting; None trains with the plain loss")
    label_smoothing: float = Field(0.05, ge=0.0, lt=1.0, description="baseline only")
    seed: int = 0
    checkpoint_every: int = Field(200, ge=1)
    log_every: int = Field(50, ge=1)
    threads: int | None = Field(None, ge=1, description="torch CPU threads; None leaves torch's default")


class ScoringConfig(_Section):
    """How the diffusion classifier turns denoising errors into a decision (see docs/method.md)."""

    min_trials: int = Field(20, ge=2, description="trials before any class may be eliminated")
    max_trials: int = Field(200, ge=2, description="a cell still undecided after this many trials stops here")
    check_every: int = Field(5, ge=1, description="trials between elimination tests")
    elimination_p: float = Field(
        2e-3, gt=0.0, lt=1.0, description="one-sided paired t-test p-value under which a class is dropped"
    )
    t_min: int = Field(50, ge=0, description="smallest timestep a trial may draw")
    t_max: int = Field(700, ge=1, description="largest timestep a trial may draw (exclusive)")
    timestep_bins: int = Field(10, ge=1, description="trials cycle through this many strata of [t_min, t_max)")
    mask_radius: float = Field(0.45, gt=0.0, le=0.75, description="error is measured inside this circle (x side)")
    score_null_class: bool = Field(
        True, description="also denoise with the null class so the anomaly score can compare against 'any cell'"
    )
    anomaly_score: Literal["null_ratio", "min_error"] = Field(
        "null_ratio",
        description="'null_ratio': best class error minus null-class error (no class explains the cell better than "
        "a generic cell); 'min_error': best class error alone",
    )
    batch_size: int = Field(256, ge=1, description="denoiser inputs per forward pass (cells x classes)")
    calibration_trials: int = Field(30, ge=2, description="exhaustive trials per validation cell to fit w(t)")
    seed: int = 0

    @model_validator(mode="after")
    def _check_ranges(self) -> "ScoringConfig":
        if self.t_max <= self.t_min:
            raise ValueError(f"t_max ({self.t_max}) must be larger than t_min ({self.t_min})")
        if self.max_trials < self.min_trials:
            raise ValueError(f"max_trials ({self.max_trials}) must be at least min_trials ({self.min_trials})")
        return self


class RegistryConfig(_Section):
    """Where models are tracked and registered (MLflow)."""

    tracking_uri: str = Field("sqlite:///.cytoloop/mlflow/mlflow.db", description="MLflow tracking URI")
    experiment: str = "cytoloop"
    model_name: str = Field("cytoloop-cells", description="registered model name")
    cache_dir: Path = Field(Path(".cytoloop/models"), description="downloaded model versions")


class Settings(BaseSettings):
    """All of CytoLoop's configuration, one section per concern."""

    model_config = SettingsConfigDict(env_prefix="CYTOLOOP_", env_nested_delimiter="__", extra="forbid")

    data: DataConfig = DataConfig()
    augment: AugmentConfig = AugmentConfig()
    diffusion: DiffusionModelConfig = DiffusionModelConfig()
    baseline: BaselineModelConfig = BaselineModelConfig()
    train: TrainConfig = TrainConfig()
    scoring: ScoringConfig = ScoringConfig()
    registry: RegistryConfig = RegistryConfig()
    home: Path = Field(Path(".cytoloop"), description="where runs, stores and service data live")


def load_settings(path: Path | None = None, overrides: dict | None = None) -> Settings:
    """Build settings: defaults < JSON file `path` < `CYTOLOOP_*` environment < explicit `overrides`.

    `overrides` is a nested dict such as `{"train": {"steps": 500}}` (what the CLI's flags set).
    Raises pydantic's ValidationError naming each bad field; the CLI turns it into a readable message.
    """
    values: dict = json.loads(Path(path).read_text()) if path else {}
    values = _deep_merge(values, Settings().model_dump(exclude_unset=True))
    values = _deep_merge(values, overrides or {})
    return Settings(**values)


def _deep_merge(base: dict, update: dict) -> dict:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged

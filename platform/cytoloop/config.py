"""The one configuration model of CytoLoop.

Every setting lives here, with its default, so that a run can be reproduced from the JSON it writes. Values
come, in increasing priority, from the defaults, an optional JSON file, and environment variables
`CYTOLOOP_<SECTION>__<FIELD>` (for example `CYTOLOOP_SCORING__MAX_TRIALS=100`). Validation happens once, at the
edge (CLI, service start-up); library functions receive validated section objects.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, EnvSettingsSource, SettingsConfigDict, SettingsError

from cytoloop.errors import UsageError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


_HOST_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"


def _check_host(host: str) -> str:
    """An interface to bind: an IPv4 or IPv6 address, or a host name (RFC 1123 labels). Checked here so that a
    typo is named as a bad address, not reported later by whichever rule or service trips over it first."""
    import ipaddress

    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        pass
    if len(host) > 253 or not re.fullmatch(rf"{_HOST_LABEL}(?:\.{_HOST_LABEL})*", host):
        raise ValueError(f"{host!r} is not an IP address or host name")
    return host


Host = Annotated[str, AfterValidator(_check_host)]


def _ipv4_or_name(host: str) -> str:
    """The stack's services are started, probed and reached over IPv4 (their URLs hold no IPv6 brackets): an IPv6
    address passed the settings and failed in `stack up` with "Address family for hostname not supported"."""
    import ipaddress

    try:
        version = ipaddress.ip_address(host).version
    except ValueError:  # a host name
        return host
    if version == 6:
        raise ValueError(f"{host!r} is an IPv6 address: the stack's services take an IPv4 address or a host name")
    return host


StackHost = Annotated[str, AfterValidator(_check_host), AfterValidator(_ipv4_or_name)]


def _not_empty(value: object) -> object:
    """An empty path setting (`CYTOLOOP_HOME=` in a script whose variable was not set) would mean the current
    folder, wherever a command happens to run: refused."""
    if isinstance(value, str) and not value.strip():
        raise ValueError("is empty: give a folder")
    return value


# every path setting: empty is refused rather than read as the current folder
SettingPath = Annotated[Path, BeforeValidator(_not_empty)]


def _not_empty_uri(value: object) -> object:
    """`CYTOLOOP_REGISTRY__TRACKING_URI=` (an unset variable) gave MLflow's own message about a file store."""
    if isinstance(value, str) and not value.strip():
        raise ValueError("is empty: give an MLflow tracking URI (http://..., sqlite:///...)")
    return value


class DataConfig(_Section):
    """How a cell image becomes a model input. Saved with every model so serving can never drift from training."""

    image_size: int = Field(32, ge=16, le=512, description="model resolution in pixels (square)")
    crop: Literal["center", "cell"] = Field(
        "cell",
        description="'center': the central square (crop_fraction of the shorter side); 'cell': a square centred on "
        "the nucleus and sized to it, so cells from labs with other magnifications come out at the same scale",
    )
    crop_fraction: float = Field(
        0.8,
        gt=0.1,
        le=1.0,
        description="'center' crop: side of the central square, as a fraction of the shorter side (the 'cell' "
        "crop's own fallback, when it finds no nucleus, is a fixed 0.8)",
    )
    cell_scale: float = Field(2.2, gt=0.5, le=10.0, description="'cell' crop: half side = this x nucleus radius")
    stain_normalization: Literal["none", "reinhard"] = Field(
        "reinhard",
        description="'reinhard' matches each cell's colour moments (in l-alpha-beta space) to a fixed reference, "
        "removing most of the stain and camera shift between labs",
    )
    stain_reference: tuple[float, float, float, float, float, float] | None = Field(
        None,
        description="Reinhard target (mean and std of l, alpha, beta); None: the built-in typical smear. A site "
        "model adapted with stain normalisation targets its champion's training colours",
    )


class DatasetsConfig(_Section):
    """Where commands that may run without `--data` find cells: a configured dataset, else one that
    `cytoloop data fetch` downloaded into `cache_dir` (see `datasets.resolve_data`)."""

    root: SettingPath | None = Field(
        None, description="manifest CSV or folder with one sub-folder per class, used when no --data is given"
    )
    cache_dir: SettingPath = Field(
        Path(".cytoloop/datasets"),
        description="where `cytoloop data fetch` puts public datasets (default: <home>/datasets)",
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
    tune_scoring: bool = Field(
        True,
        description="diffusion: end training by tuning the adaptive scoring on the validation cells (what "
        "`cytoloop tune` does), so the model is saved with its fast rule; off keeps the untuned default rule",
    )
    precision: Literal["fp32", "bf16"] = Field(
        "fp32",
        description="autocast dtype of the forward pass (weights, optimiser state and EMA stay fp32); bf16 needs a "
        "CPU with avx512_bf16/AMX or a GPU, where it is cheaper per step",
    )


class ScoringConfig(_Section):
    """How the diffusion classifier turns denoising errors into a decision (see docs/method.md)."""

    min_trials: int = Field(20, ge=1, description="trials before any class may be eliminated")
    max_trials: int = Field(200, ge=2, description="a cell still undecided after this many trials stops here")
    check_every: int = Field(5, ge=1, description="trials between elimination tests")
    elimination_p: float = Field(
        2e-3, gt=0.0, lt=1.0, description="one-sided paired t-test p-value under which a class is dropped"
    )
    variance_prior: float | None = Field(
        None,
        ge=0.0,
        description="prior variance of one trial's weighted error difference between two classes "
        "(fitted on validation cells by tuning); the elimination test shrinks each cell's own estimate toward it, "
        "which steadies the test over a cell's first few trials. None: the cell's own estimate alone",
    )
    variance_prior_trials: float = Field(
        2.0, ge=0.0, description="how many trials' worth of evidence `variance_prior` counts for"
    )
    t_min: int = Field(50, ge=0, description="smallest timestep a trial may draw")
    t_max: int = Field(700, ge=1, description="largest timestep a trial may draw (exclusive)")
    timestep_bins: int = Field(10, ge=1, description="trials cycle through this many strata of [t_min, t_max)")
    mask_radius: float = Field(0.45, gt=0.0, le=0.75, description="error is measured inside this circle (x side)")
    score_null_class: bool = Field(
        True, description="also denoise with the null class so the anomaly score can compare against 'any cell'"
    )
    null_trials: int | None = Field(
        None,
        ge=1,
        description="denoise with the null class only on a cell's first this-many trials (the anomaly score is "
        "their mean; the decision never needs the null class); None: on every trial",
    )
    anomaly_score: Literal["null_ratio", "min_error"] = Field(
        "null_ratio",
        description="'null_ratio': best class error minus null-class error (no class explains the cell better than "
        "a generic cell); 'min_error': best class error alone",
    )
    trial_views: Literal["identity", "dihedral"] = Field(
        "identity",
        description="'dihedral': each trial sees the cell in one of its 8 rotations/reflections, drawn per trial "
        "and shared by every class (a cell has no orientation: the reference's random rotation/flip per trial); "
        "'identity': as the cell was cropped",
    )
    exit_p: float | None = Field(
        0.01,
        gt=0.0,
        lt=1.0,
        description="where the routing thresholds are given (serving, review route), a cell whose route is settled "
        "by one-sided t-tests at this level stops scoring: past the anomaly threshold, or a close call under the "
        "review line; its class is then provisional (docs/method.md, route exits). The same test on the anomaly "
        "threshold takes the null class out of play once the anomaly route is ruled out. None: every cell runs "
        "its full trials",
    )
    batch_size: int | None = Field(
        None,
        ge=1,
        description="denoiser inputs per forward pass (cells x classes x trials); None: 64 on a CPU (small batches "
        "keep activations in cache), 1024 on a GPU",
    )
    lookahead: int | None = Field(
        None,
        ge=1,
        description="when a round of trials fills less than one denoiser batch, each cell may run up to this many "
        "check intervals ahead; the elimination test still runs after every interval, and trials past a cell's "
        "decision are dropped from its log (same decision) but counted in its evaluations. For GPUs, where a small "
        "batch takes as long as a full one; None: 1 (off) on a CPU, 16 on a GPU",
    )
    calibration_trials: int = Field(30, ge=2, description="exhaustive trials per validation cell to fit w(t)")
    tuning_trials: int = Field(
        200, ge=2, description="exhaustive trials per validation cell that `tune_scoring` must agree with"
    )
    tuning_agreement: float = Field(
        0.99, gt=0.0, le=1.0, description="fraction of validation cells whose tuned decision must match exhaustive"
    )
    calibration_cells: int | None = Field(
        200,
        ge=2,
        description="at most this many validation cells (an even, seeded draw over classes) go through "
        "the exhaustive passes that fit w(t) and tune the elimination rule, whose cost grows with cells x trials x "
        "classes; the temperature is fitted on `temperature_cells`. None: all of them",
    )
    temperature_cells: int | None = Field(
        None,
        ge=2,
        description="at most this many labelled validation cells (a seeded draw that keeps the class mix) are "
        "scored with the tuned rule to fit the temperature and report the validation ECE: one parameter needs a "
        "few hundred cells, and every cell of a large validation split costs minutes. None: all of them",
    )
    tuning_orders: int = Field(
        10,
        ge=1,
        description="tuning replays each validation cell's exhaustive trials in this many orders that "
        "scoring could equally have drawn (the exhaustive decision does not depend on the order), so agreement "
        "is a rate per cell, not one lucky or unlucky order",
    )
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="where the denoiser runs; auto: cuda if present")
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32",
        description="autocast dtype of the denoiser: bf16 pays on CPUs with avx512_bf16/AMX and may change a few "
        "close decisions; fp16 on CUDA only (docs/benchmarks.md compares them)",
    )
    channels_last: bool = Field(False, description="run the denoiser in channels-last memory format")
    compile: bool = Field(
        False,
        description="torch.compile the denoiser. Each new batch shape compiles again and adaptive scoring makes "
        "many, so it pays only in a long-running process (a service), not in one `cytoloop evaluate` run",
    )
    threads: int | None = Field(
        None,
        ge=1,
        description="torch CPU threads while scoring (restored afterwards); None leaves torch's default. On a CPU "
        "shared with other work use 1: oversubscribed threads spin and wait",
    )

    @model_validator(mode="after")
    def _check_ranges(self) -> ScoringConfig:
        if self.t_max <= self.t_min:
            raise ValueError(f"t_max ({self.t_max}) must be larger than t_min ({self.t_min})")
        if self.max_trials < self.min_trials:
            raise ValueError(f"max_trials ({self.max_trials}) must be at least min_trials ({self.min_trials})")
        if self.precision == "fp16" and self.device == "cpu":
            raise ValueError("precision fp16 needs device cuda (CPUs autocast to bf16)")
        return self


class RegistryConfig(_Section):
    """Where models are tracked and registered (MLflow)."""

    tracking_uri: Annotated[str, BeforeValidator(_not_empty_uri)] = Field(
        "sqlite:///.cytoloop/mlflow/mlflow.db", description="MLflow tracking URI (default: SQLite in <home>/mlflow)"
    )
    experiment: str = "cytoloop"
    model_name: str = Field("cytoloop-cells", description="registered model name")
    cache_dir: SettingPath = Field(
        Path(".cytoloop/models"), description="downloaded model versions (default: <home>/models)"
    )


class StackConfig(_Section):
    """The local services `cytoloop stack up` starts on one host; their data lives under `Settings.home`.

    Secrets left unset (None) are generated on the first `stack up` and kept in `<home>/secrets.json` (mode 0600),
    so a fresh checkout works without inventing passwords, and a restart keeps the same ones.
    """

    host: StackHost = Field("127.0.0.1", description="interface every service binds")
    label_studio_port: int = Field(8080, ge=1, le=65535)
    label_studio_version: str = Field("1.23.*", description="pip specifier of the Label Studio server")
    label_studio_venv: SettingPath | None = Field(
        None,
        description="virtualenv of the Label Studio server (an application, kept out of our venv); created on first "
        "use (~2 min). None: ~/.cache/cytoloop/venvs/label-studio-<version>, shared by all checkouts of a machine",
    )
    admin_email: str = "admin@cytoloop.local"
    admin_password: SecretStr | None = None
    admin_token: SecretStr | None = Field(
        None, min_length=6, description="Label Studio API token of the admin (legacy token; it ignores 5 or fewer)"
    )
    images_root: SettingPath | None = Field(
        None,
        description="folder Label Studio may serve cell images from (each project's local storage); Label Studio "
        "serves any file under its parent to any user who adds a storage there, so CytoLoop's home and MLflow "
        "database must lie outside that parent. Required to start Label Studio or route cells",
    )
    mlflow_server: bool = Field(False, description="also run `mlflow server` (UI); else MLflow is just a SQLite file")
    mlflow_port: int = Field(5000, ge=1, le=65535)
    mlflow_allowed_hosts: list[str] = Field(
        default_factory=list,
        description="host names other machines use to reach the MLflow UI server (besides `host`): MLflow refuses "
        "requests naming any other host",
    )
    ray: bool = Field(True, description="start a local Ray head")
    ray_port: int = Field(6379, ge=1, le=65535)
    ray_host: StackHost = Field(
        "127.0.0.1",
        description="interface the local Ray head and its dashboard bind (the dashboard is also the Jobs API: "
        "whoever reaches it runs code). Any address but loopback turns Ray's token authentication on, with the "
        "token `ray_token` of <home>/secrets.json (clients: RAY_AUTH_MODE=token, RAY_AUTH_TOKEN)",
    )
    ray_num_cpus: int | None = Field(None, ge=1)
    ray_dashboard: bool = Field(True, description="run the Ray dashboard (also the Ray Jobs API) with the head")
    ray_dashboard_port: int = Field(8265, ge=1, le=65535)
    start_timeout_s: float = Field(180.0, gt=0, description="how long a service may take to answer its health check")


class RoutingConfig(_Section):
    """Which scored cells a hematologist sees (see docs/review-loop.md)."""

    review_below: float = Field(0.7, ge=0.0, le=1.0, description="confidence under which a cell goes to review")
    anomaly_above: float | None = Field(
        None, description="anomaly score over which a cell is an anomaly; its scale is per model, None disables"
    )
    always_review: list[str] = Field(["blast"], description="predicted classes that always go to senior review")
    audit_fraction: float = Field(
        0.02, ge=0.0, le=1.0, description="share of confident cells reviewed anyway, to measure the auto-accept error"
    )
    seed: int = Field(0, description="seed of the audit draw (deterministic per cell id)")
    budget: int = Field(200, ge=0, description="cells sent to Label Studio per routing round")
    fill_budget: bool = Field(
        False,
        description="spend what the anomaly, review and audit routes leave of a round's budget on the least "
        "confident accepted cells (sent as reviews): a new site whose model is confidently wrong still gets its "
        "labels",
    )
    near_duplicate: float = Field(
        0.02,
        ge=0.0,
        description="cells of one sample and class whose signatures (image thumbnails) differ by less "
        "(mean absolute difference) are near-duplicates: only one is sent",
    )


class ReviewConfig(_Section):
    """The Label Studio side of the review loop: projects, label sync, consensus."""

    label_studio_url: str | None = Field(None, description="None: the stack's http://<host>:<label_studio_port>")
    project_title: str = Field("CytoLoop review: {site}", description="title of each site's project ({site})")

    @field_validator("project_title")
    @classmethod
    def _one_site_field(cls, title: str) -> str:
        """One `{site}` and no other brace: another field ('{lab}') raised KeyError when a project was made, and a
        title without `{site}` put every site's cells into one project."""
        # the literal '{site}' once and no other brace: a project is found again by its title around '{site}'
        # ('{site!r}' or '{site:>10}' formatted, and their projects were never polled)
        rest = title.replace("{site}", "", 1)
        if "{site}" not in title or "{" in rest or "}" in rest:
            raise ValueError(f"must hold {{site}} once and no other brace; got {title!r}")
        return title

    labels_required: int = Field(2, ge=1, description="labels a cell needs before its consensus counts")
    webhook_host: StackHost = "127.0.0.1"
    webhook_port: int = Field(8099, ge=1, le=65535, description="where our webhook receiver listens")
    webhook_secret: SecretStr | None = Field(None, description="shared secret Label Studio sends; None: generated")
    ml_backend_user: str = Field("label-studio", min_length=1, description="Basic Auth user of the ML backend")
    ml_backend_password: SecretStr | None = Field(
        None, description="the ML backend's Basic Auth password (Label Studio: Connect Model); None: generated"
    )
    poll_every_s: float = Field(60.0, gt=0, description="period of the poll that catches missed webhooks")
    push_batch: int = Field(100, ge=1, description="tasks per import request")


class FinetuneConfig(_Section):
    """The fine-tuning job (Ray Train): from the champion, on consensus labels plus the unlabeled pool.

    Batch size, EMA, checkpoint and log periods come from `train`; these replace its budget and learning rate,
    since fine-tuning starts from trained weights. The first export a scope (global or a site) sees is split once
    into training cells and frozen validation/evaluation sets kept in `<home>/frozen/<scope>/` (pre-seed those
    manifests to choose them yourself); later runs never train on a frozen cell.
    """

    steps: int = Field(500, ge=1)
    lr: float = Field(5e-5, gt=0)
    warmup_steps: int = Field(20, ge=0)
    num_workers: int = Field(1, ge=1, description="Ray Train workers; more than one trains data-parallel (DDP)")
    use_gpu: bool = False
    storage_path: SettingPath = Field(
        Path(".cytoloop/ray-train"),
        description="Ray Train checkpoints (made absolute; shared storage on a cluster); unset: `home`/ray-train",
    )
    max_failures: int = Field(2, ge=-1, description="worker failures a run survives, each resuming from its checkpoint")
    val_fraction: float = Field(0.15, gt=0.0, lt=0.5, description="share of the first export frozen for calibration")
    tuning_cells: int | None = Field(
        32,
        ge=2,
        description="a fine-tune re-tunes its scoring rule (w(t), the elimination rule) on at most this many of its "
        "frozen validation cells, drawn evenly over classes: the exhaustive passes cost cells x trials x classes and "
        "would outlast the fine-tune itself; the temperature is still fitted on all of them. None: the model's own "
        "scoring.calibration_cells",
    )
    temperature_prior_cells: float = Field(
        20.0,
        ge=0.0,
        description="the parent's temperature counts as this many frozen validation cells when the "
        "fine-tuned model's is refitted: a few cells all classified right would otherwise make it certain of "
        "everything",
    )
    eval_fraction: float = Field(0.2, gt=0.0, lt=0.5, description="share of the first export frozen for the gate")


class AdaptConfig(_Section):
    """Hospital adaptation: a site model fine-tuned from the champion on that hospital's labelled cells."""

    steps: int = Field(200, ge=1)
    lr: float = Field(5e-5, gt=0)
    hed_sigma: float = Field(0.1, ge=0.0, le=0.5, description="stain augmentation, stronger than in training")
    hed_bias: float = Field(0.1, ge=0.0, le=0.5)
    stain_normalize: bool = Field(
        False, description="normalise the site's cells to the champion's training colour reference (Reinhard)"
    )


class RetrainConfig(_Section):
    """When a retrain is due: enough new consensus labels, or enough time with some, or a drift flag."""

    min_new_labels: int = Field(200, ge=1, description="N: due as soon as this many new consensus labels arrived")
    max_hours: float = Field(168.0, gt=0, description="T: due after this many hours since the last retrain ...")
    min_labels_after_hours: int = Field(
        20,
        ge=1,
        description="M: ... if at least this many new labels arrived (at least 1: at 0 a retrain was due on the "
        "same labels, and a drift flag left up made every `retrain --if-due` fine-tune on them again)",
    )
    on_drift: bool = Field(True, description="a drift flag makes a retrain due (given at least M new labels)")


class PromotionConfig(_Section):
    """The gate a challenger passes before an alias moves to it: no metric worse than the champion's beyond these."""

    balanced_accuracy_tolerance: float = Field(0.01, ge=0.0, le=1.0)
    ece_tolerance: float = Field(0.02, ge=0.0, le=1.0)
    anomaly_auroc_tolerance: float = Field(0.02, ge=0.0, le=1.0)
    refuse_on: Literal["interval", "point"] = Field(
        "interval",
        description="'interval': refuse on balanced accuracy, ECE or anomaly AUROC only when the challenger is "
        "worse with confidence (its whole 95 % paired-bootstrap interval of the difference lies beyond the "
        "tolerance; where no interval can be formed, the point estimate decides); 'point': whenever the point "
        "estimate is worse beyond the tolerance (noisy on small gate sets)",
    )
    audited_manifest: SettingPath | None = Field(None, description="audited cells, evaluated with the frozen set")
    anomaly_manifest: SettingPath | None = Field(
        None, description="anomalies and normal cells; None skips the AUROC check"
    )
    anomaly_label: str = "blast"


class DriftConfig(_Section):
    """Drift per model version and site, per time window, against the training reference and the first window."""

    window_hours: float = Field(
        24.0,
        ge=1,
        description="at least an hour: MLflow's step of a window is the hour it starts (two windows in one "
        "hour were logged at one step)",
    )
    min_cells: int = Field(50, ge=1, description="a window with fewer cells is logged but raises no flag")
    psi_bins: int = Field(10, ge=2, description="quantile bins of the training reference for the PSI")
    psi_threshold: float = Field(0.25, gt=0, description="stain drift: PSI of any colour statistic above this ...")
    ks_alpha: float = Field(0.01, gt=0, lt=1, description="... whose KS test is significant at this level (Bonferroni)")
    ece_threshold: float = Field(0.1, gt=0, description="calibration drift: ECE on reviewed cells above this")
    accuracy_drop: float = Field(0.1, gt=0, description="calibration drift: accuracy this far under the first window")
    accuracy_alpha: float = Field(
        0.05, gt=0, lt=1, description="... and the drop significant at this level (one-sided two-proportion test)"
    )
    min_reviewed: int = Field(
        50,
        ge=1,
        description="a window's reviewed-cell figures (ECE, accuracy) raise a flag, or become the baseline accuracy, "
        "only from this many reviewed cells: on a handful one wrong label is an accuracy drop",
    )
    confidence_drop: float = Field(0.1, gt=0, description="confidence drift: mean confidence this far under the first")
    review_rise: float = Field(0.15, gt=0, description="confidence drift: review fraction this far over the first")


def is_loopback(host: str) -> bool:
    """Whether an address is reachable from this machine only."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve anywhere
        return False


class ServeConfig(_Section):
    """The classifier over HTTP (Ray Serve, `cytoloop serve`, infra/serve.yaml): limits, batching, model source.

    Models come from `model_dir` when it is set (one model for every site), else from the registry: the version
    behind `<model_name>@champion-<site>`, falling back to `@champion`. Replicas re-read those aliases every
    `alias_poll_s` and switch to a moved alias's version without failing a request in flight.
    """

    host: Host = Field("127.0.0.1", description="interface the HTTP proxy binds")
    port: int = Field(8000, ge=1, le=65535)
    app_name: str = Field("cytoloop", description="Ray Serve application name")
    model_dir: SettingPath | None = Field(None, description="serve this local model directory instead of the registry")
    model_name: str | None = Field(None, description="registered model to serve; None: registry.model_name")
    alias_poll_s: float = Field(30.0, gt=0, description="how often replicas re-resolve their models' aliases")
    max_batch_size: int = Field(
        16, ge=1, description="requests one model call combines (@serve.batch, plus those arriving while it runs)"
    )
    batch_wait_s: float = Field(0.02, ge=0, description="how long a batch waits to fill")
    max_ongoing_requests: int = Field(
        64, ge=1, description="per classifier replica; above max_batch_size, or batches can never fill"
    )
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float = Field(8.0, gt=0, description="autoscaling target per classifier replica")
    num_cpus: float = Field(1.0, ge=0, description="CPUs reserved per classifier replica")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per classifier replica (fractions share one GPU)")
    torch_threads: int | None = Field(1, ge=1, description="torch threads per classifier replica; None: torch default")
    max_cells_per_request: int = Field(256, ge=1)
    max_request_bytes: int = Field(
        32_000_000, ge=1, description="largest request body; a larger one is refused (413) before it is read whole"
    )
    max_image_bytes: int = Field(5_000_000, ge=1, description="largest accepted image file")
    max_image_pixels: int = Field(4096 * 4096, ge=1, description="largest accepted width x height")
    api_key: SecretStr | None = Field(None, description="required in the X-API-Key header when set; never logged")
    insecure: bool = Field(
        False,
        description="allow serving without an API key on an address other machines can reach (only on a "
        "network where everyone who can connect may read patients' cells)",
    )
    prediction_log: SettingPath | None = Field(
        None, description="append one JSON line per classified cell here (what `cytoloop drift --events` reads)"
    )

    @model_validator(mode="after")
    def _check_batching(self) -> ServeConfig:
        if self.max_ongoing_requests <= self.max_batch_size:
            raise ValueError(
                f"max_ongoing_requests ({self.max_ongoing_requests}) must be larger than max_batch_size "
                f"({self.max_batch_size}), or batches can never fill"
            )
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas ({self.max_replicas}) must be at least min_replicas ({self.min_replicas})")
        if not is_loopback(self.host) and self.api_key is None and not self.insecure:
            raise ValueError(
                f"host {self.host} lets other machines send and read cell images: set an API key "
                "(CYTOLOOP_SERVE__API_KEY) or, on a trusted network only, serve.insecure (cytoloop serve --insecure)"
            )
        return self


class DifferentialConfig(_Section):
    """The per-smear triage: when a differential count may pass as routine and when a hematologist must look."""

    min_cells: int = Field(100, ge=1, description="a smear with fewer classified cells is flagged 'too few cells'")
    max_review_fraction: float = Field(
        0.1, ge=0.0, le=1.0, description="a smear with more cells routed to review or anomaly is flagged"
    )
    blasts_min_cells: int = Field(
        2,
        ge=1,
        description="'blasts suspected' needs at least this many cells routed 'anomaly' (routing.anomaly_above "
        "or a routing.always_review class such as blast) ...",
    )
    blasts_min_fraction: float = Field(0.02, ge=0.0, le=1.0, description="... and at least this share of the cells")
    max_failed_fraction: float = Field(
        0.1,
        ge=0.0,
        le=1.0,
        description="a smear with more of its cells failed (not decoded, refused or not scored) is flagged: the "
        "count leaves them out, and they may be the cells that matter",
    )


class CascadeConfig(_Section):
    """The cascade: a small CNN distilled from the diffusion classifier answers the cells it is sure of and
    defers the rest to the diffusion classifier (docs/benchmarks.md has the accuracy/speed curve)."""

    threshold: float = Field(
        0.9,
        ge=0.0,
        description="the student answers a cell when its calibrated confidence is at least this; 0 never defers, "
        "above 1 always defers",
    )
    defer_fraction: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="when set, distillation picks the threshold that defers this fraction of validation cells",
    )
    label_weight: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="on labelled cells the student's target is this much the label and the rest the teacher's "
        "probabilities; unlabeled cells learn the teacher's probabilities alone",
    )
    candidates: int | None = Field(
        None,
        ge=2,
        description="the teacher decides a deferred cell among the student's top this-many classes only (candidate "
        "pruning: fewer denoiser evaluations per cell); None: among all classes",
    )


class SiteConfig(_Section):
    """One hospital CytoLoop serves (a site), beyond which model serves it (`champion-<site>`).

    `classes` is the site's vocabulary: the cell classes its hematologists report. A model trained elsewhere knows
    classes a site never sees on its smears (the PBC base model's erythroblasts, immature granulocytes and
    platelets, for labs that do not count them), and on a new stain it puts many of the site's cells there (29-80 %
    of other labs' cells, docs/benchmarks.md). With `classes` set, the site's cells are decided among those only,
    wherever the site is served or judged: its answers over HTTP (other classes get probability 0), its anomaly
    scores (how well the site's own classes explain a cell) and the promotion gate of its fine-tunes. A class the
    model does not have is refused when the site's model loads, naming the model's classes.

    `audited_manifest` is the site's own audited cells for its gate: judged on the shared manifest, a site's
    adaptation to its stain competed on every other site's audited cells too, where it is meant to be no better."""

    classes: list[str] | None = Field(
        None, min_length=1, description="the classes this site reports; None: every class of the model serving it"
    )
    audited_manifest: SettingPath | None = Field(
        None,
        description="this site's audited cells: its fine-tunes are judged on them with its frozen set, instead of on "
        "promotion.audited_manifest (other sites' cells, in other stains); None: on those",
    )

    @model_validator(mode="after")
    def _classes_once(self) -> SiteConfig:
        if self.classes is not None and len(set(self.classes)) != len(self.classes):
            raise ValueError(f"classes names a class twice: {self.classes}")
        return self


class DemoConfig(_Section):
    """`cytoloop demo`: the loop as a lab lives it, with simulated annotators.

    A base model (the shipped PBC model by default) is registered as the global champion; each site is a hospital
    whose unlabelled pool is other labs' cells in their own stain, with a few known blasts mixed in. Per site, the
    labelled cells are split once: `test_fraction` held out (a third each draws the curve, calibrates and gates
    the site's fine-tunes, never routed nor trained on); the rest is the pool. Each round, per site: score the pool
    through Serve, route, annotate, sync, fine-tune the base model on the site's labels (`adapt.steps`), gate
    on the site's frozen cells, move `champion-<site>` or record the refusal."""

    rounds: int = Field(3, ge=1, description="active-learning rounds, each over every site")
    base_model: SettingPath = Field(
        Path("models/base-pbc"), description="model directory registered as the global champion at the start"
    )
    sites: dict[str, list[str]] = Field(
        {"site-a": ["jtsc", "bccd"], "site-b": ["cellavision"]},
        description="each site (hospital) and the labs/domains of the data whose cells are its pool",
    )
    classes: list[str] | None = Field(None, description="the sites' classes to use; None: every class they have")
    site_classes: bool = Field(
        True,
        description="each site reports the classes its labs' cells have (`sites.<site>.classes`, unless set "
        "there): the site is served and gated on those; False: on every class of the base model",
    )
    test_fraction: float = Field(
        0.3,
        gt=0.0,
        lt=0.9,
        description="share of each site's cells held out, never routed nor trained on: a third each draws the "
        "learning curve, calibrates and gates the site's fine-tunes",
    )
    blast_domain: str = Field("allidb2", description="the lab/domain whose cells labelled `blast_label` are mixed in")
    blast_label: str = Field("blast", description="the label of the anomalous cells mixed into each site's pool")
    blast_share: float = Field(
        0.03, ge=0.0, lt=0.5, description="share of each site's pool that is mixed-in blasts (0: none)"
    )
    anomaly_quantile: float = Field(
        0.95,
        gt=0.0,
        lt=1.0,
        description="a site's anomaly threshold is this quantile of the anomaly scores of its frozen calibration "
        "cells (all normal), under the version serving it: 1 - quantile is the false-alarm share on normal cells",
    )
    pool_limit: int | None = Field(None, ge=1, description="score at most this many pool cells per site and round")
    budget: int = Field(40, ge=1, description="cells sent to Label Studio per site and round")
    fill_budget: bool = Field(
        True,
        description="spend each site's whole budget every round (`routing.fill_budget` for the sites' routing): "
        "a base model confidently wrong on a new stain routes few cells otherwise",
    )
    error_rates: list[float] = Field(
        [0.02, 0.1],
        min_length=1,
        description="one simulated annotator (a distinct Label Studio user) per entry: the chance they pick a "
        "wrong class",
    )
    seed: int = Field(0, description="seed of the splits, the blasts' draw and the annotators' errors")
    serve_switch_timeout_s: float = Field(300.0, gt=0, description="how long to wait for Serve to load a new champion")

    @model_validator(mode="after")
    def _sites_are_disjoint(self) -> DemoConfig:
        if not self.sites:
            raise ValueError("demo.sites is empty: name at least one site and its labs")
        seen: dict[str, str] = {}
        for site, domains in self.sites.items():
            if not domains:
                raise ValueError(f"demo.sites[{site!r}] names no lab")
            for domain in domains:
                if domain in seen:
                    raise ValueError(f"lab {domain!r} is in two sites ({seen[domain]!r} and {site!r})")
                seen[domain] = site
        if self.blast_share > 0 and self.blast_domain in seen:
            site = seen[self.blast_domain]
            raise ValueError(f"demo.blast_domain {self.blast_domain!r} is also a site's lab ({site!r})")
        if any(not 0.0 <= rate < 1.0 for rate in self.error_rates):
            raise ValueError(f"demo.error_rates must each be in [0, 1), got {self.error_rates}")
        return self


class Settings(BaseSettings):
    """All of CytoLoop's configuration, one section per concern."""

    model_config = SettingsConfigDict(env_prefix="CYTOLOOP_", env_nested_delimiter="__", extra="forbid")

    data: DataConfig = DataConfig()
    datasets: DatasetsConfig = DatasetsConfig()
    augment: AugmentConfig = AugmentConfig()
    diffusion: DiffusionModelConfig = DiffusionModelConfig()
    baseline: BaselineModelConfig = BaselineModelConfig()
    train: TrainConfig = TrainConfig()
    scoring: ScoringConfig = ScoringConfig()
    cascade: CascadeConfig = CascadeConfig()
    registry: RegistryConfig = RegistryConfig()
    stack: StackConfig = StackConfig()
    routing: RoutingConfig = RoutingConfig()
    review: ReviewConfig = ReviewConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    adapt: AdaptConfig = AdaptConfig()
    retrain: RetrainConfig = RetrainConfig()
    promotion: PromotionConfig = PromotionConfig()
    drift: DriftConfig = DriftConfig()
    serve: ServeConfig = ServeConfig()
    differential: DifferentialConfig = DifferentialConfig()
    demo: DemoConfig = DemoConfig()
    sites: dict[str, SiteConfig] = Field(
        default_factory=dict,
        description='per site (hospital) settings, by site name: CYTOLOOP_SITES=\'{"site-a": {"classes": [...]}}\'',
    )
    home: SettingPath = Field(Path(".cytoloop"), description="where runs, stores and service data live")

    @model_validator(mode="after")
    def _home_is_a_folder(self) -> Settings:
        if self.home.exists() and not self.home.is_dir():  # "afile/mlflow: Not a directory" from whatever wrote first
            raise ValueError(f"home {self.home} is a file, not a folder")
        return self

    @model_validator(mode="after")
    def _site_names(self) -> Settings:
        for site in self.sites:
            check_site_name(site, "in sites")
        for site in self.demo.sites:  # they become aliases and folders (frozen sets) too: '../x' left home
            check_site_name(site, "in demo.sites")
        return self

    def site_classes(self, site: str | None) -> list[str] | None:
        """The classes `site` reports (`sites.<site>.classes`); None for the global model or a site without them."""
        config = self.sites.get(site) if site else None
        return None if config is None else config.classes

    def site_promotion(self, site: str | None) -> PromotionConfig:
        """The gate of `site`'s fine-tunes (None: the global model's): `promotion`, judged on the site's own
        audited cells where it has them (`sites.<site>.audited_manifest`)."""
        config = self.sites.get(site) if site else None
        if config is None or config.audited_manifest is None:
            return self.promotion
        return self.promotion.model_copy(update={"audited_manifest": config.audited_manifest})

    def judged_manifests(self) -> list[Path]:
        """Every manifest of cells some gate judges on (the shared audited cells, the anomaly set, each site's
        audited cells): none of them may train a model's null class."""
        given = [self.promotion.audited_manifest, self.promotion.anomaly_manifest]
        return [p for p in given + [c.audited_manifest for c in self.sites.values()] if p is not None]

    @model_validator(mode="after")
    def _stores_under_home(self) -> Settings:
        """Stores left at their defaults live under `home`, so `CYTOLOOP_HOME` moves them all together; before,
        the MLflow database and the model and dataset caches stayed wherever a command happened to run."""
        registry: dict = {}
        if "tracking_uri" not in self.registry.model_fields_set:
            registry["tracking_uri"] = f"sqlite:///{self.home / 'mlflow' / 'mlflow.db'}"
        if "cache_dir" not in self.registry.model_fields_set:
            registry["cache_dir"] = self.home / "models"
        self.registry = self.registry.model_copy(update=registry)
        if "cache_dir" not in self.datasets.model_fields_set:
            self.datasets = self.datasets.model_copy(update={"cache_dir": self.home / "datasets"})
        if "storage_path" not in self.finetune.model_fields_set:  # Ray Train's checkpoints
            self.finetune = self.finetune.model_copy(update={"storage_path": self.home / "ray-train"})
        return self


# a site as a request names it (the gateway, the ML backend's tasks): alias names (champion-<site>) allow no '.'
SITE_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"
# the global scope's own name in tags (`site=global`), frozen sets (`frozen/global`) and locks: a site so named
# shared them, and its versions passed for global ones (promoted onto the global champion without --cross-site)
RESERVED_SITE_NAMES = ("global",)


def check_site_name(site: str, where: str = "") -> str:
    """A site name becomes part of alias names (`champion-<site>`), file names and Label Studio project titles:
    letters, digits, '-' and '_' only, as requests name it (`SITE_PATTERN`: the gateway and the ML backend refuse
    any other). Returns it, or raises UsageError naming it (and `where` it was given)."""
    if not re.fullmatch(SITE_PATTERN, site):
        raise UsageError(
            f"invalid site name {site!r}{' ' + where if where else ''}: use letters, digits, '-' and '_' (starting "
            "with a letter or digit, at most 64)"
        )
    if site.lower() in RESERVED_SITE_NAMES:  # any case: one folder on a case-insensitive file system
        raise UsageError(
            f"invalid site name {site!r}{' ' + where if where else ''}: {site.lower()!r} names the global model's "
            "scope (its tags, frozen sets and locks); choose another name"
        )
    return site


ENV_PREFIX = "CYTOLOOP_"


def load_settings(path: Path | None = None, overrides: dict | None = None) -> Settings:
    """Build settings: defaults < JSON file `path` (else `$CYTOLOOP_CONFIG`) < `CYTOLOOP_*` environment < explicit
    `overrides`.

    `overrides` is a nested dict such as `{"train": {"steps": 500}}` (what the CLI's flags set).
    Raises pydantic's ValidationError naming each bad field; the CLI turns it into a readable message. A
    `CYTOLOOP_*` variable naming no setting or section (a typo: CYTOLOOP_SCORNG__PRECISION, CYTOLOOP_HOEM) or
    holding unparsable JSON is a UsageError naming it: silently ignored, a typo would leave the default in force
    (`_check_environment_names`)."""
    source = path or os.environ.get("CYTOLOOP_CONFIG") or None  # `cytoloop --config` sets it for every command
    values: dict = _read_settings_file(Path(source)) if source else {}
    _check_environment_names()
    # the environment alone, unvalidated: validating it against the defaults would reject values that are only
    # valid together with the file's (e.g. max_trials below the default min_trials)
    source_of_environment = EnvSettingsSource(Settings)
    try:
        environment = source_of_environment()
    except SettingsError as error:  # names the section only: say which variables hold unreadable JSON
        named = _unreadable_variables(source_of_environment)
        raise UsageError(
            f"a CYTOLOOP_* environment variable cannot be read: {error}"
            + (f" (set: {', '.join(named)}; a list or mapping is written as JSON, e.g. '[\"blast\"]')" if named else "")
        ) from None
    values = _deep_merge(values, environment)
    values = _deep_merge(values, overrides or {})
    return Settings(**values)


def _unreadable_variables(source: EnvSettingsSource) -> list[str]:
    """The `CYTOLOOP_*` variables whose setting takes a list, mapping or section (read as JSON, as pydantic-settings
    reads it: `source.field_is_complex`) and whose value is not JSON; found through the settings' own fields, as
    pydantic-settings' error names only the section."""
    named = []
    for name, value in os.environ.items():
        if not name.upper().startswith(ENV_PREFIX):
            continue
        fields: dict[str, FieldInfo] | None = Settings.model_fields
        field = None
        for part in name[len(ENV_PREFIX) :].lower().split("__"):
            field = fields.get(part) if fields is not None else None
            if field is None:
                break
            nested = field.annotation
            fields = nested.model_fields if isinstance(nested, type) and issubclass(nested, BaseModel) else None
        if field is None or not source.field_is_complex(field):
            continue
        try:
            json.loads(value)
        except ValueError:
            named.append(name)
    return sorted(named)


# the variables Kubernetes gives every pod for each service of its namespace (KubeRay's `cytoloop-serve-svc` gives
# CYTOLOOP_SERVE_SVC_SERVICE_HOST, CYTOLOOP_SERVE_SVC_PORT_8000_TCP_ADDR, ...): no settings, and no typos
SERVICE_LINK = re.compile(r"_(SERVICE_HOST|SERVICE_PORT(_\w+)?|PORT(_\d+_(TCP|UDP|SCTP)(_(PROTO|PORT|ADDR))?)?)$")


def _check_environment_names() -> None:
    """Every `CYTOLOOP_*` variable must name a setting (`CYTOLOOP_HOME`) or a section (`CYTOLOOP_<SECTION>__<FIELD>`),
    except a Kubernetes service link (`SERVICE_LINK`), which must not stop a pod."""
    sections = set(Settings.model_fields)
    for name in os.environ:
        if not name.upper().startswith(ENV_PREFIX) or name.upper() == "CYTOLOOP_CONFIG":
            continue
        if "__" not in name and SERVICE_LINK.search(name.upper()):
            continue
        section = name[len(ENV_PREFIX) :].split("__", 1)[0].lower()
        if section not in sections:
            raise UsageError(
                f"environment variable {name}: no setting {section!r}; settings are {', '.join(sorted(sections))} "
                f"(CYTOLOOP_<SETTING>, or CYTOLOOP_<SECTION>__<FIELD>)"
            )


def _read_settings_file(path: Path) -> dict:
    """A JSON settings file as a dict, or a UsageError naming the file and what is wrong with it."""
    try:
        values = json.loads(path.read_text(encoding="utf-8-sig"))  # an editor's byte-order mark, as manifests take
    except FileNotFoundError:
        raise UsageError(f"settings file {path} not found") from None
    except IsADirectoryError:
        raise UsageError(f"settings file {path} is a folder, not a JSON file") from None
    except json.JSONDecodeError as error:
        raise UsageError(f"settings file {path} is not valid JSON: {error}") from None
    except UnicodeDecodeError as error:
        raise UsageError(f"settings file {path} is not UTF-8 text: {error}") from None
    if not isinstance(values, dict):
        raise UsageError(f"settings file {path} must hold a JSON object, got {type(values).__name__}")
    return values


def _deep_merge(base: dict, update: dict) -> dict:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged

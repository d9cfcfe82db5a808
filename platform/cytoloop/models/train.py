"""Training: one plain PyTorch loop shared by the diffusion classifier and the CNN baseline.

The loop (sampling, augmentation, AdamW with warm-up and cosine decay, gradient clipping, EMA weights,
checkpoints that resume exactly) is the same for both models, so a comparison between them is about the models,
not the training. What differs is the loss: `diffusion_loss` (epsilon-prediction with classifier-free dropout into
the null class and Min-SNR weighting) or `baseline_loss` (cross-entropy). Ray Train calls `fit` unchanged from a
worker; `on_log` is where it reports.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cytoloop.config import AugmentConfig, TrainConfig
from cytoloop.data.preprocess import augment
from cytoloop.files import remove_stale_temporaries, write_text
from cytoloop.threads import torch_threads

logger = logging.getLogger(__name__)

UNLABELED = -1
CHECKPOINT_FILE = "checkpoint.pt"
RUN_FILE = "run.json"  # beside the checkpoint: what run wrote it (`claim_checkpoints`)

# loss(network, images, labels, generator) -> scalar loss; labels use UNLABELED for cells without a label.
LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Generator], torch.Tensor]


@dataclass
class TrainResult:
    history: list[dict]
    seconds: float
    resumed_from: int


def diffusion_loss(scheduler, null_class: int, config: TrainConfig) -> LossFn:
    """Epsilon-prediction loss; labelled cells go to the null class with probability `null_class_prob`,
    unlabeled cells always, so the null class learns what any cell looks like."""
    alphas_cumprod = scheduler.alphas_cumprod
    num_timesteps = scheduler.config.num_train_timesteps

    def loss(
        network: nn.Module, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator
    ) -> torch.Tensor:
        batch, device = images.shape[0], images.device  # random draws stay on the CPU generator, then move
        dropped = (torch.rand(batch, generator=generator) < config.null_class_prob).to(device)
        classes = torch.where((labels == UNLABELED) | dropped, torch.full_like(labels, null_class), labels)
        t = torch.randint(0, num_timesteps, (batch,), generator=generator)
        noise = torch.randn(images.shape, generator=generator).to(device)
        abar = alphas_cumprod[t].view(-1, 1, 1, 1).to(device)
        t = t.to(device)
        x_t = abar.sqrt() * images + (1 - abar).sqrt() * noise
        predicted = network(x_t, t, class_labels=classes).sample.float()  # the loss in fp32 under autocast
        per_cell = ((predicted - noise) ** 2).mean(dim=(1, 2, 3))
        if config.min_snr_gamma is not None:
            snr = abar.view(-1) / (1 - abar.view(-1))
            per_cell = per_cell * torch.clamp(snr, max=config.min_snr_gamma) / snr
        return per_cell.mean()

    return loss


def baseline_loss(config: TrainConfig) -> LossFn:
    criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)

    def loss(
        network: nn.Module, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator
    ) -> torch.Tensor:
        return criterion(network(images).float(), labels)

    return loss


def sampling_weights(labels: np.ndarray, balanced: bool = True) -> np.ndarray:
    """Per-cell sampling probabilities: every labelled class equally often (rare classes matter as much in a
    differential), unlabeled cells as a group as often as one class."""
    if not balanced:
        return np.full(len(labels), 1.0 / len(labels))
    groups, counts = np.unique(labels, return_counts=True)
    weight_of = dict(zip(groups.tolist(), (1.0 / counts).tolist()))
    weights = np.array([weight_of[int(label)] for label in labels])
    return weights / weights.sum()


def fit(
    network: nn.Module,
    loss_fn: LossFn,
    images: np.ndarray,
    labels: np.ndarray,
    config: TrainConfig,
    augment_config: AugmentConfig,
    checkpoint_dir: Path | None = None,
    on_log: Callable[[dict], None] | None = None,
    progress: bool = False,
    stream: int = 0,
) -> tuple[nn.Module, TrainResult]:
    """Train `network` for `config.steps` steps; return its EMA copy (what gets evaluated and saved).

    With `checkpoint_dir`, a checkpoint is written every `checkpoint_every` steps and training resumes from it,
    so an interrupted run continues where it stopped and ends with the same weights as an uninterrupted one.
    With `config.precision` "bf16" the forward pass runs under bf16 autocast; the loss, the weights, the
    optimiser state and the EMA stay fp32. `config.threads` applies to this call only (the caller's thread count
    is restored). `network` may come wrapped in DistributedDataParallel (Ray Train's `prepare_model`): gradients
    are then averaged across workers, while the EMA and the checkpoints hold the plain model. Each such worker
    passes its rank as `stream`: worker 0 draws from `config.seed` as a single process does, every other worker
    from a stream of its own (batches, augmentations, noise, timesteps and dropout), which it derives again on
    resuming, as the checkpoint holds worker 0's generators only.
    """
    if stream < 0:
        raise ValueError(f"stream must be a worker rank (0 or more); got {stream}")
    if len(images) != len(labels) or len(images) == 0:
        raise ValueError(f"need as many labels as images and at least one cell; got {len(images)} and {len(labels)}")
    with torch_threads(config.threads):
        return _fit(network, loss_fn, images, labels, config, augment_config, checkpoint_dir, on_log, progress, stream)


def claim_checkpoints(folder: Path, run: dict, replace: bool = False, unrecorded_differs: str | None = None) -> None:
    """Let the training run described by `run` (what it trains on and how, flat and JSON-able; not its number of
    steps, which a later leg may raise) use the checkpoints in `folder`. Checkpoints another run wrote there are
    refused, naming what differs: resumed, they trained the new run's model from the old one's weights (with
    the same number of steps, not at all), or failed on a network of another shape. With `replace` they are
    removed instead and the run starts afresh. Checkpoints written before runs were recorded are resumed unless
    the caller knows what of theirs differs (`unrecorded_differs`, from a finished model's training report)."""
    from cytoloop.errors import UsageError

    run = json.loads(json.dumps(run))  # as it reads back
    folder = Path(folder)
    record = folder / RUN_FILE
    differ = None
    if (folder / CHECKPOINT_FILE).is_file():
        differ = _differs(run, record) if record.is_file() else unrecorded_differs
    if differ:
        if not replace:
            raise UsageError(
                f"{folder} holds the checkpoints of another training run (it differs in {differ}); "
                "train into another folder, or remove that one to start afresh"
            )
        (folder / CHECKPOINT_FILE).unlink()
        logger.warning(f"{folder}: the replaced model's checkpoints (another run: {differ}) removed")
    write_text(record, json.dumps(run, indent=1, sort_keys=True))


def _differs(run: dict, record: Path) -> str | None:
    """The settings in which `run` differs from the run recorded in `record` (None: the same run)."""
    try:
        earlier = json.loads(record.read_text())
    except ValueError:  # cut short: no run can be shown to be the same
        earlier = {}
    if not isinstance(earlier, dict):
        earlier = {}
    return ", ".join(sorted(k for k in run.keys() | earlier.keys() if run.get(k) != earlier.get(k))) or None


def _fit(
    network: nn.Module,
    loss_fn: LossFn,
    images: np.ndarray,
    labels: np.ndarray,
    config: TrainConfig,
    augment_config: AugmentConfig,
    checkpoint_dir: Path | None,
    on_log: Callable[[dict], None] | None,
    progress: bool,
    stream: int,
) -> tuple[nn.Module, TrainResult]:
    """The loop itself (`fit` checks the inputs and sets the thread count around it)."""
    from tqdm.auto import tqdm

    torch.manual_seed(config.seed)
    data = torch.as_tensor(images, dtype=torch.float32)
    targets = torch.as_tensor(labels, dtype=torch.long)
    weights = torch.as_tensor(sampling_weights(labels))
    module = getattr(network, "module", network)  # the plain model inside a DistributedDataParallel wrapper
    ema = copy.deepcopy(module).requires_grad_(False)
    optimizer = torch.optim.AdamW(network.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, config))
    generator = torch.Generator().manual_seed(config.seed)
    history: list[dict] = []
    start = 0
    checkpoint = Path(checkpoint_dir) / CHECKPOINT_FILE if checkpoint_dir else None
    cells = _cells_digest(data, targets) if checkpoint is not None else None
    if checkpoint is not None and checkpoint.is_file():
        # onto the CPU first: a GPU worker's checkpoint resumes on a CPU-only one too (each load below moves the
        # tensors to the model's device: the state dicts copy into it, the optimizer casts its state to it)
        state = torch.load(checkpoint, weights_only=False, map_location="cpu")
        # the records were the same (`claim_checkpoints`), not what was read; another data-parallel worker has a
        # shard of its own, and the checkpoint worker 0's
        if not stream and state.get("cells") not in (None, cells):
            from cytoloop.data.records import DatasetError

            raise DatasetError(
                f"{checkpoint}: the training cells read now ({len(data)}) are not those its steps trained on: an image "
                "that could not be read in one leg (a flaky mount, a file still being copied) or one changed since. "
                "Make every image readable as it was and run again, or train afresh into another folder"
            )
        module.load_state_dict(state["network"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])  # dropout draws from the global generator (on a GPU, its own)
        if not stream:  # (other workers reseed below)
            restore_cuda_generators(state.get("cuda_rng"))
        history, start = state["history"], state["step"]
        if start > config.steps:  # the loop ran no step: the longer-trained weights came back, called `steps`
            from cytoloop.errors import UsageError

            raise UsageError(
                f"{checkpoint} holds a run at step {start}, past train.steps = {config.steps}: give steps >= "
                f"{start} to go on with it, or remove {checkpoint.parent} to train {config.steps} steps afresh"
            )
        laid_out = state.get("steps")  # the steps its learning-rate schedule was laid out for (older: not kept)
        if laid_out is not None and laid_out != config.steps and start > config.warmup_steps and not stream:
            was = _lr_factor(start, config.model_copy(update={"steps": laid_out}))
            logger.warning(
                f"{checkpoint}: a leg of another length ({laid_out} -> {config.steps} steps) lays the cosine "
                f"learning-rate schedule out again from step {start}: the rate goes from {was:.3f} to "
                f"{_lr_factor(start, config):.3f} of its peak, so this is not the model {config.steps} steps in one "
                "run make (the history's lr shows where)"
            )
    if stream:  # another data-parallel worker: the same draws as worker 0 would pair every cell's noise with one
        # of worker 0's, halving the timesteps and noises a global batch averages over
        seed = int(np.random.SeedSequence([config.seed, stream, start]).generate_state(1)[0])
        generator.manual_seed(seed)
        torch.manual_seed(seed)

    device = next(module.parameters()).device  # the data stays on the CPU; each batch moves to the model
    began = time.perf_counter()
    network.train()
    bar = tqdm(
        range(start, config.steps),
        desc="training",
        unit="step",
        disable=not progress,
        initial=start,
        total=config.steps,
    )
    running = []
    for step in bar:
        index = torch.multinomial(weights, config.batch_size, replacement=True, generator=generator)
        batch = augment(data[index], augment_config, generator).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.precision == "bf16"):
            loss = loss_fn(network, batch, targets[index].to(device), generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(network.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        _update_ema(ema, module, min(config.ema_decay, (1 + step) / (10 + step)))
        running.append(loss.item())
        done = step + 1
        if done % config.log_every == 0 or done == config.steps:
            entry = {"step": done, "loss": float(np.mean(running)), "lr": schedule.get_last_lr()[0]}
            history.append(entry)
            running = []
            bar.set_postfix(loss=f"{entry['loss']:.4f}")
            if on_log:
                on_log(entry)
        if checkpoint is not None and (done % config.checkpoint_every == 0 or done == config.steps):
            checkpoint.parent.mkdir(parents=True, exist_ok=True)
            state = {
                "network": module.state_dict(),
                "ema": ema.state_dict(),
                "optimizer": optimizer.state_dict(),
                "schedule": schedule.state_dict(),
                "generator": generator.get_state(),
                "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                "history": history,
                "step": done,
                "steps": config.steps,
                "cells": cells,  # what it trained on, as read: a resume on other cells is refused
            }
            # atomic and on disk before the rename: a crash or power loss never leaves half (or an empty) checkpoint;
            # a name per process, so two writers never share one temporary file
            staging = checkpoint.with_name(f".{checkpoint.name}.{os.getpid()}.tmp")
            remove_stale_temporaries(checkpoint)  # a killed writer's, a big file
            with staging.open("wb") as handle:
                torch.save(state, handle)
                handle.flush()
                os.fsync(handle.fileno())
            staging.replace(checkpoint)
    bar.close()
    ema.eval()
    return ema, TrainResult(history, time.perf_counter() - began, start)


def _cells_digest(data: torch.Tensor, targets: torch.Tensor) -> str:
    """A digest of the training cells as read (pixels and labels, in order)."""
    import hashlib

    digest = hashlib.sha256(targets.numpy().tobytes())
    digest.update(data.numpy().tobytes())
    return digest.hexdigest()[:16]


def restore_cuda_generators(saved: list[torch.Tensor] | None) -> None:
    """Put saved CUDA generator states back on the devices this process sees. A checkpoint holds one per device
    its writer saw, and a run may resume seeing fewer (a one-GPU worker resuming a two-GPU run's checkpoint):
    `torch.cuda.set_rng_state_all` then failed on the first missing device. The first ones are restored; a
    device the writer did not see keeps its seeded state."""
    if saved is None or not torch.cuda.is_available():
        return
    for index, state in enumerate(saved[: torch.cuda.device_count()]):
        torch.cuda.set_rng_state(state, index)


def _lr_factor(step: int, config: TrainConfig) -> float:
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


@torch.no_grad()
def _update_ema(ema: nn.Module, network: nn.Module, decay: float) -> None:
    for ema_param, param in zip(ema.parameters(), network.parameters()):
        ema_param.lerp_(param, 1 - decay)
    for ema_buffer, buffer in zip(ema.buffers(), network.buffers()):
        ema_buffer.copy_(buffer)

"""Diffusion classification: which class's conditioning best explains a cell's noise?

For each cell we run *trials*. A trial draws one timestep t and one noise image eps, shared by every class still
in play (and the null class), noises the cell once, and asks the denoiser for eps under each class in one batched
call. The error of class c is the mean squared error between eps and its prediction inside a central circle (the
cell, not the background), times a weight w(t) fitted to where classes differ most. Classes are compared trial
by trial (paired), so the shared noise cancels; after `min_trials`, every `check_every` trials a one-sided paired
t-test drops each class that is clearly worse than the best one, and a cell is decided when one class is left or
it reaches `max_trials`.

Cells are scored together: the (cell, class, trial) inputs of all undecided cells are packed into large denoiser
batches, and a decided cell leaves the batch. Every cell draws its timesteps and noise from its own generator,
seeded by the scoring seed and the cell's pixels, so a cell gets the same answer alone or in any batch, in any
order, every time.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from scipy import stats

from cytoloop.config import ScoringConfig

# denoise(x_t, t, class_index) -> predicted noise; all three batched along dim 0.
Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class TrialLog:
    """Everything one cell's trials measured: unweighted errors per trial (NaN where a class was out of play)."""

    strata: list[int] = field(default_factory=list)
    errors: list[np.ndarray] = field(default_factory=list)  # each (n_classes,)
    null_errors: list[float] = field(default_factory=list)


@dataclass
class ScoreResult:
    """Per-cell outcome of diffusion scoring; row i for input cell i.

    `class_error`: mean over trials of the weighted error minus that trial's best active class (lower is better;
    the decided class has the lowest). `anomaly_min_error`: weighted error of the best class (no class explains the
    cell). `anomaly_null_ratio`: best class's error minus the null class's (a generic cell explains it as well as
    the best class). `evals`: denoiser evaluations actually run for the cell.
    """

    class_error: np.ndarray
    anomaly_min_error: np.ndarray
    anomaly_null_ratio: np.ndarray
    trials: np.ndarray
    evals: np.ndarray
    logs: list[TrialLog]


def cell_seed(image: torch.Tensor, seed: int) -> int:
    """A seed from the scoring seed and the cell's pixels, independent of batch composition and order."""
    digest = hashlib.sha256(np.ascontiguousarray(image.detach().cpu().numpy()).tobytes())
    digest.update(seed.to_bytes(8, "little", signed=True))
    return int.from_bytes(digest.digest()[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def circular_mask(size: int, radius_fraction: float) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    distance = torch.sqrt(coords[:, None] ** 2 + coords[None, :] ** 2)
    return (distance <= radius_fraction * size).float()


class _CellState:
    """The trials of one cell in flight: its generator, the classes still in play, what was measured."""

    def __init__(self, image: torch.Tensor, n_classes: int, config: ScoringConfig):
        self.image = image
        self.generator = torch.Generator().manual_seed(cell_seed(image, config.seed))
        self.active = np.ones(n_classes, dtype=bool)
        self.log = TrialLog()
        self.evals = 0
        self.done = False
        self._strata_queue: list[int] = []

    def next_stratum(self, bins: int) -> int:
        if not self._strata_queue:  # each block of `bins` trials visits every stratum once, in random order
            self._strata_queue = torch.randperm(bins, generator=self.generator).tolist()
        return self._strata_queue.pop()


def score_cells(
    denoise: Denoiser,
    alphas_cumprod: torch.Tensor,
    images: torch.Tensor,
    n_classes: int,
    null_class: int,
    config: ScoringConfig,
    timestep_weights: np.ndarray | None = None,
    progress: bool = False,
) -> ScoreResult:
    """Score preprocessed cells (N, 3, S, S) in [-1, 1] against `n_classes` classes (see module docstring).

    `timestep_weights` (length `config.timestep_bins`) weight each stratum's errors; None weighs all equally.
    For exhaustive scoring, set `min_trials == max_trials`.
    """
    from tqdm.auto import tqdm

    weights = np.ones(config.timestep_bins) if timestep_weights is None else np.asarray(timestep_weights, float)
    if weights.shape != (config.timestep_bins,):
        raise ValueError(f"timestep_weights has shape {weights.shape}, expected ({config.timestep_bins},)")
    mask = circular_mask(images.shape[-1], config.mask_radius)
    cells = [_CellState(image, n_classes, config) for image in images]
    bar = tqdm(total=len(cells), desc="scoring cells", unit="cell", disable=not progress)
    while True:
        pending = [cell for cell in cells if not cell.done]
        if not pending:
            break
        # Run trials in blocks that end where the next elimination test (or the trial limit) falls.
        jobs = []
        for cell in pending:
            n = len(cell.log.strata)
            block = config.min_trials - n if n < config.min_trials else config.check_every
            block = min(block, config.max_trials - n)
            jobs.extend((cell, _draw_trial(cell, config, alphas_cumprod.shape[0])) for _ in range(block))
        _run_trials(denoise, alphas_cumprod, jobs, null_class, config, mask)
        for cell in pending:
            if _decide(cell, config, weights):
                cell.done = True
                bar.update(1)
    bar.close()
    return _summarise(cells, weights, config)


def _draw_trial(cell: _CellState, config: ScoringConfig, num_timesteps: int) -> tuple[int, int, torch.Tensor]:
    stratum = cell.next_stratum(config.timestep_bins)
    t_max = min(config.t_max, num_timesteps)
    width = (t_max - config.t_min) / config.timestep_bins
    u = torch.rand((), generator=cell.generator).item()
    t = int(config.t_min + (stratum + u) * width)
    noise = torch.randn(cell.image.shape, generator=cell.generator)
    return stratum, min(t, t_max - 1), noise


def _run_trials(denoise, alphas_cumprod, jobs, null_class: int, config: ScoringConfig, mask: torch.Tensor) -> None:
    """Evaluate all (trial, class) pairs of `jobs` in batches and append the errors to each cell's log."""
    entries = []  # (job index, class index)
    for j, (cell, _) in enumerate(jobs):
        classes = np.flatnonzero(cell.active).tolist() + ([null_class] if config.score_null_class else [])
        entries.extend((j, c) for c in classes)
    errors = torch.empty(len(entries))
    mask_pixels = mask.sum() * jobs[0][0].image.shape[0]
    with torch.inference_mode():
        for start in range(0, len(entries), config.batch_size):
            chunk = entries[start : start + config.batch_size]
            x0 = torch.stack([jobs[j][0].image for j, _ in chunk])
            noise = torch.stack([jobs[j][1][2] for j, _ in chunk])
            t = torch.tensor([jobs[j][1][1] for j, _ in chunk])
            c = torch.tensor([cls for _, cls in chunk])
            abar = alphas_cumprod[t].view(-1, 1, 1, 1)
            x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
            predicted = denoise(x_t, t, c).float()
            errors[start : start + len(chunk)] = ((predicted - noise) ** 2 * mask).sum(dim=(1, 2, 3)) / mask_pixels
    per_job: dict[int, dict[int, float]] = {}
    for (j, c), e in zip(entries, errors.tolist()):
        per_job.setdefault(j, {})[c] = e
    for j, (cell, (stratum, _, _)) in enumerate(jobs):
        row = np.full(len(cell.active), np.nan)
        for c, e in per_job[j].items():
            if c != null_class:
                row[c] = e
        cell.log.strata.append(stratum)
        cell.log.errors.append(row)
        cell.log.null_errors.append(per_job[j].get(null_class, np.nan))
        cell.evals += len(per_job[j])


def _decide(cell: _CellState, config: ScoringConfig, weights: np.ndarray) -> bool:
    """Eliminate clearly worse classes; True when the cell needs no more trials."""
    n = len(cell.log.strata)
    if n >= config.max_trials or cell.active.sum() == 1:
        return True
    if n < config.min_trials:
        return False
    errors = np.stack(cell.log.errors) * weights[np.asarray(cell.log.strata)][:, None]
    active = np.flatnonzero(cell.active)
    means = errors[:, active].mean(axis=0)
    best = active[int(np.argmin(means))]
    for c in active:
        if c == best:
            continue
        diff = errors[:, c] - errors[:, best]
        sd = diff.std(ddof=1)
        if sd == 0:
            p = 0.0 if diff.mean() > 0 else 1.0
        else:
            p = float(stats.t.sf(diff.mean() / (sd / np.sqrt(n)), df=n - 1))
        if p < config.elimination_p:
            cell.active[c] = False
    return cell.active.sum() == 1


def _summarise(cells: list[_CellState], weights: np.ndarray, config: ScoringConfig) -> ScoreResult:
    rows = [summarise_log(cell.log, weights) for cell in cells]
    return ScoreResult(
        class_error=np.stack([r[0] for r in rows]) if rows else np.zeros((0, 0)),
        anomaly_min_error=np.array([r[1] for r in rows]),
        anomaly_null_ratio=np.array([r[2] for r in rows]),
        trials=np.array([len(cell.log.strata) for cell in cells]),
        evals=np.array([cell.evals for cell in cells]),
        logs=[cell.log for cell in cells],
    )


def summarise_log(log: TrialLog, weights: np.ndarray) -> tuple[np.ndarray, float, float]:
    """(class_error, min_error, null_ratio) of one cell from its trials under timestep weights `weights`.

    Separate from the trial loop so calibration can re-weight logged trials without running the denoiser again.
    """
    w = weights[np.asarray(log.strata)]
    errors = np.stack(log.errors) * w[:, None]
    relative = errors - np.nanmin(errors, axis=1, keepdims=True)
    class_error = np.nanmean(relative, axis=0)
    best = int(np.nanargmin(np.nanmean(errors, axis=0) + np.where(np.isnan(errors).any(axis=0), np.inf, 0)))
    best_error = errors[:, best]
    null_ratio = float(np.mean(best_error - np.asarray(log.null_errors) * w))
    return class_error, float(best_error.mean()), null_ratio

"""Diffusion classification: which class's conditioning best explains a cell's noise?

For each cell we run *trials*. A trial draws one timestep t and one noise image eps, shared by every class still
in play (and the null class), noises the cell once, and asks the denoiser for eps under each class in one batched
call. The error of class c is the mean squared error between eps and its prediction inside a central circle (the
cell, not the background), times a weight w(t) fitted to where classes differ most. Classes are compared trial
by trial (paired), so the shared noise cancels; after `min_trials`, every `check_every` trials a one-sided paired
t-test drops each class that is clearly worse than the best one, and a cell is decided when one class is left or
it reaches `max_trials`. With `null_trials = k` only a cell's first k trials also denoise under the null class:
the anomaly score needs a few of them, the decision none.

A cell's class errors (`class_error`, what its probabilities are a softmax of) are paired too: each class's mean
weighted error minus the winner's, over the trials that class played; the winner is the class in play to the end
with the lowest mean. A class the test dropped played only the early trials, on which the winner may have fared
worse than later: its error is then how far it was behind the best class of those trials (what it was dropped
for), so the decided class always has the highest probability.

With a `variance_prior` (fitted on validation cells) the test shrinks each cell's variance
estimate toward it: a t-test on two or three trials is otherwise at the mercy of a variance from two or three numbers.

Two shortcuts serve the cells that matter and the classes that cannot win:
- Route exits (`RouteExits`: the routing thresholds in scoring's units). A cell that fits no class is a close call
  between wrong classes and would run to the trial limit, yet its route is settled long before. At each test,
  by one-sided t-tests at `config.exit_p`, a cell stops when
  * anomaly: its null-class gap (best class's weighted error minus the null class's, on the trials that scored
    the null class) exceeds the routing threshold `anomaly_above`: routing calls it an anomaly whatever the
    remaining trials say about its class;
  * review: the runner-up's mean weighted error exceeds the best's by less than `review_margin` (temperature x
    logit of `routing.review_below`: its confidence is below the review line whatever more trials show), no
    class in play is one routing always sends to senior review, and the anomaly route is ruled out (its gap
    below `anomaly_above` with confidence).
  Its class guess is kept but marked provisional (`ScoreResult.exited`). With an anomaly threshold the null
  class also leaves play once the anomaly route is ruled out (the same test): its trials serve that one question,
  so a cell that goes on scoring its classes stops denoising under it. Its anomaly score then averages the trials
  that did, and lies below the threshold with confidence.
- Candidate classes. `candidates` (cells x classes, boolean) starts each cell with only those classes in play (a
  cheap scorer's top k); the others are never denoised, and their class error is +inf. Within the candidates the
  trials are the same as exhaustive scoring's, so if the exhaustive winner is a candidate it still wins.

With `trial_views = "dihedral"` each trial also draws one of the cell's 8 rotations/reflections and noises that
view (every class of the trial sees the same one): a cell has no orientation, so its error is averaged over them.

Cells are scored together: the (cell, class, trial) inputs of all undecided cells are packed into large denoiser
batches, and a decided cell leaves the batch. When the cells still undecided fill less than one batch (on a GPU a
small batch takes as long as a full one), each may run several check intervals ahead (`lookahead`); the test still
runs after every interval, so the decision is the same, and the trials past it only cost evaluations. Every cell
draws its timesteps and noise from its own generator, seeded by the scoring seed and the cell's pixels, so a cell
gets the same trials alone or in any batch, in any order, every time, and the same answer from the same batches.
The network's arithmetic may round differently by batch size (a GPU's kernels, and a CPU's too: errors ~1e-6
apart between one batch of 64 and cells one at a time), so a borderline test could, rarely, go the other way.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy import special

from cytoloop.config import ScoringConfig
from cytoloop.errors import CytoLoopError

# denoise(x_t, t, class_index) -> predicted noise; all three batched along dim 0.
Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

GPU_LOOKAHEAD = 16  # `scoring.lookahead` when unset on a GPU (on a CPU it stays 1: there, evaluations are time)


class NonFiniteError(CytoLoopError, FloatingPointError):
    """The denoiser gave a NaN or an infinite error: said as such, with the setting that may cause it, not as a
    traceback (a NaN also reads as a class not played, so it must never reach the trial log)."""


@dataclass
class TrialLog:
    """Everything one cell's trials measured: unweighted errors per trial (NaN where a class was out of play)."""

    strata: list[int] = field(default_factory=list)
    errors: list[np.ndarray] = field(default_factory=list)  # each (n_classes,)
    null_errors: list[float] = field(default_factory=list)


@dataclass
class ScoreResult:
    """Per-cell outcome of diffusion scoring; row i for input cell i.

    `class_error`: mean weighted error minus the decided class's, over the trials each class played (module
    docstring; lower is better; 0 for the decided class, which has the lowest; +inf for a class never in play).
    `anomaly_min_error`: weighted error of the best class (no class explains the cell). `anomaly_null_ratio`: best
    class's error minus the null class's (a generic cell explains it as well as the best class). `evals`: denoiser
    evaluations actually run for the cell. `exited`: the cell stopped early on a route exit (its class is
    provisional).
    """

    class_error: np.ndarray
    anomaly_min_error: np.ndarray
    anomaly_null_ratio: np.ndarray
    trials: np.ndarray
    evals: np.ndarray
    logs: list[TrialLog]
    exited: np.ndarray


@dataclass(frozen=True)
class RouteExits:
    """The routing the answers will go through, in scoring's units (see the module docstring). `anomaly_above`:
    threshold on the null-ratio score; `review_margin`: the best-vs-runner-up error gap under which a cell's
    confidence is below the review line; `protected`: classes routing always sends to senior review (a cell with
    one in play never takes the review exit). None disables that exit."""

    anomaly_above: float | None = None
    review_margin: float | None = None
    protected: tuple[int, ...] = ()


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

    def __init__(self, image: torch.Tensor, active: np.ndarray, config: ScoringConfig):
        self.image = image
        self.generator = torch.Generator().manual_seed(cell_seed(image, config.seed))
        self.active = active.copy()
        self.log = TrialLog()
        self.evals = 0
        self.done = False
        self.exited = False
        self.null_open = True  # False once a route exit has ruled the anomaly route out
        self._strata_queue: list[int] = []

    def next_stratum(self, bins: int) -> int:
        if not self._strata_queue:  # each block of `bins` trials visits every stratum once, in random order
            self._strata_queue = torch.randperm(bins, generator=self.generator).tolist()
        return self._strata_queue.pop()


@dataclass
class _Trial:
    """One trial of one cell: its number among the cell's trials, its timestep stratum and timestep, its noise."""

    cell: _CellState
    number: int
    stratum: int
    t: int
    noise: torch.Tensor
    view: int = 0  # one of the 8 rotations/reflections (`cell_view`); 0 is the cell as cropped


@dataclass
class _Measured:
    """What one trial measured: the errors of the classes in play (NaN for the others), the null class's error
    (NaN when not asked) and the denoiser evaluations it took."""

    errors: np.ndarray
    null_error: float
    evals: int


def score_cells(
    denoise: Denoiser,
    alphas_cumprod: torch.Tensor,
    images: torch.Tensor,
    n_classes: int,
    null_class: int,
    config: ScoringConfig,
    timestep_weights: np.ndarray | None = None,
    progress: bool = False,
    device: torch.device | str = "cpu",
    exits: RouteExits | None = None,
    candidates: np.ndarray | None = None,
) -> ScoreResult:
    """Score preprocessed cells (N, 3, S, S) in [-1, 1] against `n_classes` classes (see module docstring).

    `timestep_weights` (length `config.timestep_bins`) weight each stratum's errors; None weighs all equally.
    For exhaustive scoring, set `min_trials == max_trials`. Noise is always drawn on the CPU (so a cell gets the
    same trials on any machine); noising and the errors are computed on `device`, where `denoise` runs.
    `exits`: the routing thresholds a cell may stop on once its route is settled (None: never). `candidates`:
    (N, n_classes) booleans, the classes each cell starts with (None: all).
    """
    from tqdm.auto import tqdm

    weights = np.ones(config.timestep_bins) if timestep_weights is None else np.asarray(timestep_weights, float)
    if weights.shape != (config.timestep_bins,):
        raise ValueError(f"timestep_weights has shape {weights.shape}, expected ({config.timestep_bins},)")
    mask = circular_mask(images.shape[-1], config.mask_radius)
    device = torch.device(device)
    batch_size = config.batch_size or (1024 if device.type == "cuda" else 64)
    lookahead = config.lookahead or (GPU_LOOKAHEAD if device.type == "cuda" else 1)
    if candidates is None:
        candidates = np.ones((len(images), n_classes), dtype=bool)
    candidates = np.asarray(candidates, dtype=bool)
    if candidates.shape != (len(images), n_classes) or not candidates.any(axis=1).all():
        raise ValueError(f"candidates must be ({len(images)}, {n_classes}) booleans with a class for every cell")
    cells = [_CellState(image, active, config) for image, active in zip(images, candidates)]
    bar = tqdm(total=len(cells), desc="scoring cells", unit="cell", disable=not progress)
    while True:
        pending = [cell for cell in cells if not cell.done]
        if not pending:
            break
        # Each cell runs the trials up to its next elimination test (or the trial limit); where all of them fill
        # less than one batch, up to `lookahead - 1` further test intervals too.
        blocks = [_next_block(len(cell.log.strata), config) for cell in pending]
        inputs = sum(block * int(cell.active.sum()) for cell, block in zip(pending, blocks))
        extra = (min(lookahead, batch_size // inputs) - 1) * config.check_every if inputs < batch_size else 0
        trials: list[_Trial] = []
        for cell, block in zip(pending, blocks):
            n = len(cell.log.strata)
            block = min(block + extra, config.max_trials - n)
            trials.extend(_draw_trial(cell, n + k, config, alphas_cumprod.shape[0]) for k in range(block))
        measured = _run_trials(denoise, alphas_cumprod, trials, null_class, config, mask, device, batch_size)
        for trial, result in zip(trials, measured):
            _advance(trial.cell, trial.stratum, result, config, weights, exits)
        bar.update(sum(cell.done for cell in pending))
    bar.close()
    return _summarise(cells, weights, n_classes)


def _next_block(n: int, config: ScoringConfig) -> int:
    """Trials a cell with n trials runs before its next elimination test (the first test comes at `min_trials`)."""
    block = config.min_trials - n if n < config.min_trials else config.check_every
    return min(block, config.max_trials - n)


def _draw_trial(cell: _CellState, number: int, config: ScoringConfig, num_timesteps: int) -> _Trial:
    """The cell's next trial, drawn from its own generator: a stratum, a timestep within it, the noise."""
    stratum = cell.next_stratum(config.timestep_bins)
    t_max = min(config.t_max, num_timesteps)
    width = (t_max - config.t_min) / config.timestep_bins
    u = torch.rand((), generator=cell.generator).item()
    t = int(config.t_min + (stratum + u) * width)
    noise = torch.randn(cell.image.shape, generator=cell.generator)
    view = int(torch.randint(8, (), generator=cell.generator)) if config.trial_views == "dihedral" else 0
    return _Trial(cell, number, stratum, min(t, t_max - 1), noise, view)


def cell_view(image: torch.Tensor, view: int) -> torch.Tensor:
    """One of the 8 rotations/reflections of a (C, S, S) cell: `view % 4` quarter turns, mirrored when view >= 4."""
    turned = torch.rot90(image, view % 4, dims=(-2, -1))
    return torch.flip(turned, dims=(-1,)) if view >= 4 else turned


def _run_trials(
    denoise,
    alphas_cumprod,
    trials: list[_Trial],
    null_class: int,
    config: ScoringConfig,
    mask: torch.Tensor,
    device: torch.device,
    batch_size: int,
) -> list[_Measured]:
    """Evaluate all (trial, class) pairs of `trials` in batches; one measurement per trial."""
    entry_job, entry_class = [], []
    for j, trial in enumerate(trials):
        classes = np.flatnonzero(trial.cell.active).tolist()
        classes += [null_class] if trial.cell.null_open and wants_null(trial.number, config) else []
        entry_job.extend([j] * len(classes))
        entry_class.extend(classes)
    entry_job_t, entry_class_t = torch.tensor(entry_job), torch.tensor(entry_class)
    errors = torch.empty(len(entry_job))
    mask = mask.to(device)
    mask_pixels = mask.sum() * trials[0].cell.image.shape[0]
    alphas_cumprod = alphas_cumprod.to(device)
    with torch.inference_mode():
        for start in range(0, len(entry_job), batch_size):
            stop = min(start + batch_size, len(entry_job))
            first, last = entry_job[start], entry_job[stop - 1]  # entries are grouped by trial: stack each once
            batch = trials[first : last + 1]
            x0 = torch.stack([cell_view(trial.cell.image, trial.view) for trial in batch]).to(device, non_blocking=True)
            noise = torch.stack([trial.noise for trial in batch]).to(device, non_blocking=True)
            t_job = torch.tensor([trial.t for trial in batch], device=device)
            index = (entry_job_t[start:stop] - first).to(device)
            x0, noise, t = x0[index], noise[index], t_job[index]
            abar = alphas_cumprod[t].view(-1, 1, 1, 1)
            x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
            predicted = denoise(x_t, t, entry_class_t[start:stop].to(device)).float()
            error = ((predicted - noise) ** 2 * mask).sum(dim=(1, 2, 3)) / mask_pixels
            errors[start:stop] = error.cpu()
    if not torch.isfinite(errors).all():  # a NaN reads as a class not played: it was given a near-winner's odds
        broken = sorted({entry_class[i] for i in torch.nonzero(~torch.isfinite(errors)).flatten().tolist()})
        raise NonFiniteError(
            f"the denoiser gave a non-finite error for {int((~torch.isfinite(errors)).sum())} of {len(errors)} "
            f"(trial, class) pairs, class index(es) {broken} (scoring.precision {config.precision}: an overflow?)"
        )
    measured = [_Measured(np.full(len(trial.cell.active), np.nan), float("nan"), 0) for trial in trials]
    for j, c, e in zip(entry_job, entry_class, errors.tolist()):
        if c == null_class:
            measured[j].null_error = e
        else:
            measured[j].errors[c] = e
        measured[j].evals += 1
    return measured


def _advance(
    cell: _CellState,
    stratum: int,
    measured: _Measured,
    config: ScoringConfig,
    weights: np.ndarray,
    exits: RouteExits | None = None,
) -> None:
    """Add one measured trial to a cell, in trial order, testing for elimination (and for a route exit) where
    scoring one interval at a time would. A trial run ahead of a decision that came before it is dropped (it only
    adds to `evals`), and classes dropped earlier in the same round read NaN, so the log is what round-by-round
    scoring would make."""
    cell.evals += measured.evals
    if cell.done:
        return
    cell.log.strata.append(stratum)
    cell.log.errors.append(np.where(cell.active, measured.errors, np.nan))
    cell.log.null_errors.append(measured.null_error if cell.null_open else np.nan)
    n = len(cell.log.strata)
    if n >= config.max_trials or (n >= config.min_trials and (n - config.min_trials) % config.check_every == 0):
        w = weights[np.asarray(cell.log.strata)]
        weighted = np.stack(cell.log.errors) * w[:, None]
        null_weighted = np.asarray(cell.log.null_errors) * w
        if exits is not None and route_settled(weighted, null_weighted, cell.active, config, exits):
            cell.done = cell.exited = True
            return
        if exits is not None and cell.null_open and null_settled(weighted, null_weighted, cell.active, config, exits):
            cell.null_open = False
        cell.active, cell.done = decide(weighted, cell.active, config)


def route_settled(
    weighted: np.ndarray, null_weighted: np.ndarray, active: np.ndarray, config: ScoringConfig, exits: RouteExits
) -> bool:
    """Whether a cell's route is settled on what it measured so far (module docstring, "Route exits"): its anomaly
    gap clears `exits.anomaly_above`, or it is a close call below the review line with the anomaly route ruled
    out. A pure function of the measurements, like `decide`."""
    if config.exit_p is None:
        return False
    in_play = np.flatnonzero(active)
    order = in_play[np.argsort(weighted[:, in_play].mean(axis=0), kind="stable")]
    gap = _null_gap(weighted, null_weighted, int(order[0]), config)
    if exits.anomaly_above is not None and gap is not None and _beyond(gap, exits.anomaly_above, config.exit_p):
        return True
    if exits.review_margin is None or len(order) < 2 or any(int(c) in exits.protected for c in in_play):
        return False
    if exits.anomaly_above is not None and not _ruled_out(gap, exits.anomaly_above, config.exit_p):
        return False  # the anomaly route is not ruled out yet
    runner_up = weighted[:, order[1]] - weighted[:, order[0]]
    return _beyond(-runner_up, -exits.review_margin, config.exit_p)


def null_settled(
    weighted: np.ndarray, null_weighted: np.ndarray, active: np.ndarray, config: ScoringConfig, exits: RouteExits
) -> bool:
    """Whether the null class may leave play (module docstring, "Route exits"): the anomaly route is ruled out, so
    its trials have nothing left to decide. A pure function of the measurements, like `route_settled`."""
    if config.exit_p is None or exits.anomaly_above is None:
        return False
    in_play = np.flatnonzero(active)
    best = int(in_play[np.argmin(weighted[:, in_play].mean(axis=0))])
    return _ruled_out(_null_gap(weighted, null_weighted, best, config), exits.anomaly_above, config.exit_p)


def _ruled_out(gap: np.ndarray | None, anomaly_above: float, p: float) -> bool:
    """Whether a cell's null-class gap lies below the anomaly threshold, by a one-sided t-test at level p."""
    return gap is not None and _beyond(-gap, -anomaly_above, p)


def _null_gap(weighted: np.ndarray, null_weighted: np.ndarray, best: int, config: ScoringConfig) -> np.ndarray | None:
    """Per trial, the best class's weighted error minus the null class's, on the trials that scored it; None for
    the 'min_error' anomaly score (no null class in it)."""
    if config.anomaly_score != "null_ratio":
        return None
    measured = ~np.isnan(null_weighted)
    return weighted[measured, best] - null_weighted[measured]


def _beyond(values: np.ndarray, threshold: float, p: float) -> bool:
    """One-sided t-test that the mean of `values` exceeds `threshold` at level `p` (needs two values)."""
    n = len(values)
    if n < 2:
        return False
    mean, sd = float(values.mean()), float(values.std(ddof=1))
    if sd == 0:
        return mean > threshold
    return bool(special.stdtr(n - 1, -(mean - threshold) / (sd / np.sqrt(n))) < p)  # P(T >= t) at mean = threshold


def wants_null(trial: int, config: ScoringConfig) -> bool:
    """Whether trial number `trial` (0-based) of a cell also denoises under the null class."""
    return config.score_null_class and (config.null_trials is None or trial < config.null_trials)


def decide(weighted: np.ndarray, active: np.ndarray, config: ScoringConfig) -> tuple[np.ndarray, bool]:
    """One elimination step on a cell's weighted errors so far, (n_trials, n_classes): returns the classes still in
    play and whether the cell is decided. Columns of classes out of play are ignored.

    A pure function of what was measured, shared by the scoring loop and by `replay`, so tuning on logged
    trials simulates exactly what scoring would do.
    """
    n = len(weighted)
    if n >= config.max_trials or active.sum() == 1:
        return active, True
    prior = config.variance_prior is not None and config.variance_prior_trials > 0
    if n < max(config.min_trials, 1 if prior else 2):  # without a prior, a paired t-test needs two trials
        return active, False
    in_play = np.flatnonzero(active)
    errors = weighted[:, in_play]
    best = int(np.argmin(errors.mean(axis=0)))
    diff = errors - errors[:, [best]]
    mean = diff.mean(axis=0)
    variance = diff.var(axis=0, ddof=1) if n > 1 else np.zeros(len(in_play))
    df = float(n - 1)
    if prior and config.variance_prior is not None:  # the cell's variance shrunk toward the prior, as if it had
        k = config.variance_prior_trials  # k more trials of that variance
        variance = (k * config.variance_prior + (n - 1) * variance) / (k + n - 1)
        df = k + n - 1
    sd = np.sqrt(variance)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = special.stdtr(df, -mean / (sd / np.sqrt(n)))  # one-sided paired t-test: P(T >= t)
    p = np.where(sd == 0, np.where(mean > 0, 0.0, 1.0), p)
    active = active.copy()
    dropped = (p < config.elimination_p) & (np.arange(len(in_play)) != best)
    active[in_play[dropped]] = False
    return active, bool(active.sum() == 1)


def replay(log: TrialLog, config: ScoringConfig, weights: np.ndarray) -> tuple[TrialLog, int]:
    """What adaptive scoring under `config` would measure for a cell whose exhaustive trials are `log`.

    A cell's trials (timesteps, noise) come from its own generator and do not depend on which classes are in
    play, so adaptive scoring sees exactly a prefix of the exhaustive log, restricted to the classes still in
    play: tuning the elimination rule needs no denoiser. `log` must hold every class in every trial. Returns the
    replayed log and the denoiser evaluations it would cost (null-class ones as `config` asks).
    """
    errors = np.stack(log.errors)
    weighted = errors * weights[np.asarray(log.strata)][:, None]
    active = np.ones(errors.shape[1], dtype=bool)
    limit = min(config.max_trials, len(log.strata))
    out, evals = TrialLog(), 0
    while True:
        n = len(out.strata)
        for k in range(n, min(n + _next_block(n, config), limit)):
            out.strata.append(log.strata[k])
            out.errors.append(np.where(active, errors[k], np.nan))
            out.null_errors.append(log.null_errors[k] if wants_null(k, config) else np.nan)
            evals += int(active.sum()) + wants_null(k, config)
        if len(out.strata) >= limit:
            return out, evals
        active, done = decide(weighted[: len(out.strata)], active, config)
        if done:
            return out, evals


def replay_decisions(logs: list[TrialLog], config: ScoringConfig, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`replay` for many exhaustive logs of equal length at once: the class each cell's replay decides for (as
    `summarise_log` on the replayed log) and the evaluations it costs, identical to one `replay` per log.

    Tuning replays every candidate rule on every cell in several orders (about 10^5 replays for a fine-tune's 32
    cells), and one `replay` recomputes its t-tests from all trials so far at every test. Here all logs advance
    together, one test interval at a time (the schedule of tests depends only on the trial count), and the tests
    read running sums: per log and class the sum of weighted errors, and per pair of classes the sum of products,
    from which each paired difference's mean and variance follow without revisiting a trial.
    """
    if not logs:
        return np.zeros(0, dtype=int), np.zeros(0, dtype=int)
    if len({len(log.strata) for log in logs}) != 1:
        raise ValueError("replay_decisions needs logs of equal length (exhaustive logs); use replay per log")
    errors = np.stack([np.stack(log.errors) for log in logs])  # (L, T, C)
    strata = np.array([log.strata for log in logs])
    weighted = errors * weights[strata][:, :, None]
    n_logs, n_trials, n_classes = weighted.shape
    limit = min(config.max_trials, n_trials)
    prior = config.variance_prior is not None and config.variance_prior_trials > 0
    first_test = max(config.min_trials, 1 if prior else 2)
    active = np.ones((n_logs, n_classes), dtype=bool)
    running = np.ones(n_logs, dtype=bool)  # not yet decided
    dropped_at = np.full((n_logs, n_classes), limit)  # trials a class stayed in play for
    length = np.full(n_logs, limit)  # trials each replay ran
    evals = np.zeros(n_logs, dtype=int)
    sums = np.zeros((n_logs, n_classes))
    products = np.zeros((n_logs, n_classes, n_classes))
    n = 0
    while running.any():
        end = min(n + _next_block(n, config), limit)
        block = weighted[:, n:end]
        sums += block.sum(axis=1)
        products += np.einsum("ltc,ltd->lcd", block, block)
        nulls = sum(wants_null(k, config) for k in range(n, end))
        evals[running] += active[running].sum(axis=1) * (end - n) + nulls
        n = end
        if n >= limit:
            length[running] = n
            break
        alone = running & (active.sum(axis=1) == 1)  # one class left (a one-class model): decided at once
        length[alone], running[alone] = n, False
        if n < first_test or not running.any():
            continue
        rows = np.flatnonzero(running)
        play = active[rows]
        mean = sums[rows] / n
        best = np.argmin(np.where(play, mean, np.inf), axis=1)
        at = np.arange(len(rows))
        diff_mean = mean - mean[at, best][:, None]
        pairs = products[rows]
        own = np.einsum("lcc->lc", pairs)  # sum of squares of each class's errors
        squares = own + own[at, best][:, None] - 2 * pairs[at, :, best]  # sum of squared paired differences
        variance = np.maximum(squares - n * diff_mean**2, 0.0) / (n - 1) if n > 1 else np.zeros_like(mean)
        df = float(n - 1)
        if prior and config.variance_prior is not None:
            k = config.variance_prior_trials
            variance = (k * config.variance_prior + (n - 1) * variance) / (k + n - 1)
            df = k + n - 1
        sd = np.sqrt(variance)
        with np.errstate(divide="ignore", invalid="ignore"):
            p = special.stdtr(df, -diff_mean / (sd / np.sqrt(n)))
        p = np.where(sd == 0, np.where(diff_mean > 0, 0.0, 1.0), p)
        drop = play & (p < config.elimination_p) & (np.arange(n_classes)[None, :] != best[:, None])
        active[rows] = play & ~drop
        dropped_at[rows] = np.where(drop, n, dropped_at[rows])
        finished = active[rows].sum(axis=1) == 1
        length[rows[finished]] = n
        running[rows[finished]] = False
    # the replayed logs' decisions, as summarise_log takes them: a class's errors count while it was in play
    trial = np.arange(n_trials)[None, :, None]
    in_play = (trial < np.minimum(dropped_at, length[:, None])[:, None, :]) & (trial < length[:, None, None])
    class_error = class_errors(np.where(in_play, weighted, np.nan))
    return np.argmin(class_error, axis=1), evals


def _summarise(cells: list[_CellState], weights: np.ndarray, n_classes: int) -> ScoreResult:
    rows = [summarise_log(cell.log, weights) for cell in cells]
    return ScoreResult(
        class_error=np.stack([r[0] for r in rows]) if rows else np.zeros((0, n_classes)),
        anomaly_min_error=np.array([r[1] for r in rows]),
        anomaly_null_ratio=np.array([r[2] for r in rows]),
        trials=np.array([len(cell.log.strata) for cell in cells]),
        evals=np.array([cell.evals for cell in cells]),
        logs=[cell.log for cell in cells],
        exited=np.array([cell.exited for cell in cells], dtype=bool),
    )


def trial_disagreement(log: TrialLog, decided: int) -> float:
    """Share of a cell's trials whose lowest-error class (among the classes in play in that trial) is not
    `decided`, the class the cell was finally given: the classifier's own committee vote, each trial a member.

    A timestep weight scales every class of a trial alike, so the vote needs no weights. 0 for a cell every trial
    agreed on; NaN for a cell without trials. Acquisition uses it (`acquisition.disagreement_sampling`): a cell
    on which the trials disagree sits near a class boundary whatever its averaged probabilities say.
    """
    if not log.errors:
        return float("nan")
    errors = np.stack(log.errors)
    playing = ~np.isnan(errors)
    winners = np.argmin(np.where(playing, errors, np.inf), axis=1)
    return float(np.mean(winners != decided))


def class_errors(weighted: np.ndarray) -> np.ndarray:
    """Class errors from weighted errors (..., trials, classes), NaN where a class was out of play (module
    docstring): each class's mean paired difference to the winner over the trials it played, above 0 for every
    class but the winner; +inf for a class never in play (not a candidate). Leading axes are cells; a cell's
    trials past its last (all NaN) are ignored.

    A dropped class whose paired difference to the winner is not above 0 (the winner fared worse on the early
    trials that class played, and took over later) gets instead how far it was behind the best class of those
    trials, what the test dropped it for; failing that (exact ties), `TIE_GAP`: far enough above 0 that, after the
    softmax, the decided class's probability is still the highest.
    """
    played = ~np.isnan(weighted)
    count = played.sum(axis=-2)
    to_the_end = count == count.max(axis=-1, keepdims=True)  # in play in every trial the cell ran
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a never-played class's mean of nothing
        mean = np.where(to_the_end, np.nanmean(weighted, axis=-2), np.inf)
        winner = np.argmin(mean, axis=-1)[..., None]
        difference = np.nanmean(weighted - np.take_along_axis(weighted, winner[..., None], axis=-1), axis=-2)
    behind = np.where(difference > 0, difference, np.maximum(_behind_the_best(weighted, played), TIE_GAP))
    is_winner = np.arange(weighted.shape[-1]) == winner
    return np.where(count == 0, np.inf, np.where(is_winner, 0.0, behind))


TIE_GAP = 1e-12  # weighted errors are ~1e-4..1e-1 and temperatures of their order: exp(-1e-12 / T) is not 1


def _behind_the_best(weighted: np.ndarray, played: np.ndarray) -> np.ndarray:
    """(..., classes): each class's mean weighted error over the trials it played minus the lowest mean, over the
    same trials, of the classes that played all of them (itself included, so never below 0)."""
    values = np.where(played, weighted, 0.0)
    out = np.zeros(weighted.shape[:-2] + weighted.shape[-1:])
    for c in range(weighted.shape[-1]):
        mine = played[..., c : c + 1]  # (..., trials, 1)
        n = np.maximum(mine.sum(axis=-2), 1)  # (..., 1)
        shared = np.all(played | ~mine, axis=-2)  # (..., classes): played every trial c played
        means = np.where(mine, values, 0.0).sum(axis=-2) / n
        out[..., c] = means[..., c] - np.min(np.where(shared, means, np.inf), axis=-1)
    return out


def summarise_log(log: TrialLog, weights: np.ndarray) -> tuple[np.ndarray, float, float]:
    """(class_error, min_error, null_ratio) of one cell from its trials under timestep weights `weights`.

    The null ratio averages over the trials that scored the null class; NaN when none did. Separate from the
    trial loop so calibration can re-weight logged trials without running the denoiser again.
    """
    w = weights[np.asarray(log.strata)]
    errors = np.stack(log.errors) * w[:, None]
    class_error = class_errors(errors)
    best = int(np.argmin(class_error))
    best_error = errors[:, best]
    null_gap = best_error - np.asarray(log.null_errors) * w
    measured = ~np.isnan(null_gap)  # the null class may be scored on the first trials only (`null_trials`)
    null_ratio = float(null_gap[measured].mean()) if measured.any() else float("nan")
    return class_error, float(best_error.mean()), null_ratio

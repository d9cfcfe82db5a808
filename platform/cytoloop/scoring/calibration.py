"""Calibration: turning scores into probabilities a hematologist can take at face value.

Three things are fitted on the validation part of the split, never on test data:
- timestep weights w(t) for the diffusion classifier: each stratum of timesteps is weighted by how well it
  separates the true class from the others (mean margin over its variance, the optimal weight for combining
  independent noisy measurements), so uninformative timesteps stop diluting the decision;
- a temperature T for both models: probabilities are softmax(logits / T) with T minimising validation NLL;
- the elimination rule of adaptive scoring (`tune_scoring`): the cheapest (min_trials, elimination_p) whose
  decisions agree with exhaustive scoring on enough validation cells, found by replaying logged exhaustive
  trials (no extra denoiser calls).
"""

from __future__ import annotations

import logging

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import logsumexp

from cytoloop.config import ScoringConfig
from cytoloop.scoring.trials import TrialLog, replay_decisions, summarise_log

logger = logging.getLogger(__name__)
LOG_T_BOUNDS = (-12.0, 8.0)  # the temperatures searched: e^-12 to e^8

TUNING_MIN_TRIALS = (1, 2, 3, 4, 6, 8, 12)  # without a variance prior the first test needs two trials
TUNING_PRIOR_TRIALS = (0.0, 2.0)  # 0: no variance prior
TUNING_P_VALUES = (0.2, 0.1, 0.05, 0.02, 1e-2, 5e-3, 2e-3, 1e-3)


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def fit_temperature(
    logits: np.ndarray, labels: np.ndarray, prior: float | None = None, prior_cells: float = 0.0
) -> float:
    """The temperature T > 0 minimising the NLL of softmax(logits / T) on labelled validation cells.

    With a `prior` temperature worth `prior_cells` cells, log T is also pulled toward log(prior) (a Gaussian prior,
    MAP): on a handful of cells that are all classified right the NLL alone drives T toward 0, a model certain of
    everything. With many cells the prior fades.

    A row may hold -inf (a class never in play) but needs one finite logit and no NaN: one NaN row made the NLL
    NaN everywhere, and the search stopped wherever it was (T = 0.013 for a true 2: a model 150x too sure).
    """
    logits, labels = np.asarray(logits, dtype=float), np.asarray(labels)
    if len(logits) == 0:
        raise ValueError("cannot fit a temperature on zero validation cells")
    if logits.ndim != 2 or len(labels) != len(logits):
        raise ValueError(f"logits of shape {logits.shape} for {len(labels)} labels: one row per labelled cell")
    unusable = np.isnan(logits).any(axis=1) | np.isposinf(logits).any(axis=1) | ~np.isfinite(logits).any(axis=1)
    if unusable.any():
        raise ValueError(
            f"{int(unusable.sum())} of {len(logits)} cells have no usable logits (NaN, +inf, or -inf for every "
            f"class), first at row {int(unusable.argmax())}: a temperature fitted on them would be arbitrary"
        )
    pull = prior_cells / len(logits) if prior is not None and prior_cells > 0 else 0.0
    anchor = float(np.log(prior)) if pull and prior is not None else 0.0
    # a cell whose class was never in play has probability 0 at every T: it says nothing of T
    in_play = np.isfinite(logits[np.arange(len(labels)), labels])
    if not in_play.any():
        raise ValueError("no cell's label is a class in play: a temperature fitted on them would be arbitrary")
    logits, labels = logits[in_play], labels[in_play]

    def nll(log_t: float) -> float:
        # exact, from the log-sum-exp: the probability clipped at 1e-12 capped a confidently wrong cell's cost at
        # 27.6 nats whatever T, which gave the NLL a false minimum at a tiny T (one such cell in 200: T 20x too
        # small, a model 20x too sure, its NLL 2.43 for the best T's 0.17)
        scaled = logits / np.exp(log_t)
        fit = float((logsumexp(scaled, axis=1) - scaled[np.arange(len(labels)), labels]).mean())
        return fit + pull * (log_t - anchor) ** 2

    # the NLL is convex in 1/T, so one minimum; a grid first keeps the bounded search off a flat end of the range
    grid = np.linspace(*LOG_T_BOUNDS, 61)
    best = int(np.argmin([nll(float(g)) for g in grid]))
    bracket = (float(grid[max(best - 1, 0)]), float(grid[min(best + 1, len(grid) - 1)]))
    result = minimize_scalar(nll, bounds=bracket, method="bounded")
    if min(abs(result.x - bound) for bound in LOG_T_BOUNDS) < 1e-3:
        logger.warning(f"the fitted temperature {np.exp(result.x):.3g} lies at the end of the range searched")
    return float(np.exp(result.x))


def fit_timestep_weights(logs: list[TrialLog], labels: np.ndarray, bins: int) -> np.ndarray:
    """Per-stratum weights from exhaustive trials on labelled cells, normalised to mean 1.

    For each trial the margin is the mean error of the wrong classes minus the true class's error; a stratum with
    mean margin mu and variance var gets weight max(mu, 0) / var. Strata never sampled, or all non-informative,
    fall back to uniform weights.
    """
    margins: list[list[float]] = [[] for _ in range(bins)]  # per stratum
    for log, label in zip(logs, labels):
        for stratum, errors in zip(log.strata, log.errors):
            wrong = np.delete(errors, label)
            wrong = wrong[~np.isnan(wrong)]
            if len(wrong) and not np.isnan(errors[label]):
                margins[stratum].append(float(wrong.mean() - errors[label]))
    weights = np.zeros(bins)
    for b, values in enumerate(margins):
        if len(values) >= 2:
            weights[b] = max(float(np.mean(values)), 0.0) / (float(np.var(values, ddof=1)) + 1e-12)
    if weights.sum() <= 0:
        return np.ones(bins)
    return weights / weights.mean()


def calibrate(
    model,
    images: np.ndarray,
    labels: np.ndarray,
    progress: bool = False,
    prior_cells: float = 0.0,
    allowed: np.ndarray | None = None,
):
    """Fit a model's calibration on labelled validation cells, in place; returns the model.

    Diffusion: timestep weights (`fit_weights`), then the temperature on the scores the model will actually
    produce (adaptive, with those weights). Baseline: the temperature on its logits. With `prior_cells` the
    model's current temperature (a fine-tuned model's parent's) counts as that many cells (`fit_temperature`).
    `allowed` (booleans over the classes, a site's): the temperature is fitted on cells decided among those.
    """
    prior = model.temperature if prior_cells > 0 else None
    candidates = None if allowed is None else np.tile(allowed, (len(images), 1))
    if model.kind == "diffusion":
        fit_weights(model, images, labels, progress)
        scores = model.score(images, progress=progress, candidates=candidates)
        model.temperature = fit_temperature(-scores.class_error, labels, prior, prior_cells)
    else:
        logits = model.logits(images)
        if candidates is not None:
            logits = np.where(candidates, logits, -np.inf)
        model.temperature = fit_temperature(logits, labels, prior, prior_cells)
    return model


def fit_weights(model, images: np.ndarray, labels: np.ndarray, progress: bool = False):
    """Fit a diffusion model's timestep weights w(t) in place from `calibration_trials` exhaustive trials on at
    most `calibration_cells` labelled validation cells (`even_subset`); returns the model. A variance prior the
    rule carries is a variance of weighted errors, fitted under the old weights: it is refitted from the same
    trials under the new ones."""
    config = model.scoring_config
    exhaustive = config.model_copy(
        update={
            "min_trials": config.calibration_trials,
            "max_trials": config.calibration_trials,
            "score_null_class": False,
        }
    )
    model.timestep_weights = None
    subset = even_subset(labels, config.calibration_cells, config.seed)
    result = model.score(images[subset], exhaustive, progress=progress)
    weights = fit_timestep_weights(result.logs, labels[subset], config.timestep_bins)
    model.timestep_weights = weights.tolist()
    if config.variance_prior is not None:
        model.scoring_config = config.model_copy(update={"variance_prior": variance_prior(result.logs, weights)})
    return model


def mixed_subset(n_cells: int, n: int | None, seed: int = 0) -> np.ndarray:
    """Indices of at most `n` of `n_cells` cells drawn at random (seeded, sorted): the class mix stays what it is
    in expectation, as a temperature fitted for that mix needs (`even_subset` evens it out instead)."""
    if n is None or n >= n_cells:
        return np.arange(n_cells)
    return np.sort(np.random.default_rng(seed).choice(n_cells, size=n, replace=False))


def even_subset(labels: np.ndarray, n: int | None, seed: int = 0) -> np.ndarray:
    """Indices of at most `n` cells drawn as evenly over the classes as their counts allow (seeded, sorted).

    The exhaustive calibration passes cost cells x trials x classes; an even draw keeps every class's errors in
    the fit when only a few hundred of thousands of validation cells can be afforded."""
    if n is None or n >= len(labels):
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    pools = [list(rng.permutation(np.flatnonzero(labels == c))) for c in np.unique(labels)]
    chosen: list[int] = []
    while len(chosen) < n:
        for pool in pools:
            if pool and len(chosen) < n:
                chosen.append(int(pool.pop()))
    return np.sort(np.asarray(chosen))


def reorderings(log: TrialLog, n: int, bins: int, seed: int = 0) -> list[TrialLog]:
    """`log` and n - 1 other orders of its trials that scoring could as well have drawn.

    The exhaustive decision is a mean over all of a cell's trials and does not depend on their order, while an
    adaptive rule sees only a prefix. Trials within a timestep stratum are exchangeable and scoring visits the
    strata in blocks of `bins` in random order, so shuffling each stratum's trials and rebuilding the blocks gives
    another equally likely run against the same reference: tuning on n orders measures how often a rule disagrees
    on a cell, where one fixed order only says whether it did (65 validation cells x 1 order leave a 0.99 target
    no room for chance)."""
    rng = np.random.default_rng(seed)
    strata = np.asarray(log.strata)
    out = [log]
    for _ in range(n - 1):
        queues = [list(rng.permutation(np.flatnonzero(strata == k))) for k in range(bins)]
        order: list[int] = []
        while any(queues):
            block = [queue.pop() for queue in queues if queue]
            order.extend(block[i] for i in rng.permutation(len(block)))
        out.append(
            TrialLog(
                [log.strata[i] for i in order], [log.errors[i] for i in order], [log.null_errors[i] for i in order]
            )
        )
    return out


def decision(log: TrialLog, weights: np.ndarray) -> int:
    """The class a cell's trials decide for (lowest mean relative weighted error)."""
    return int(np.argmin(summarise_log(log, weights)[0]))


def trials_needed(log: TrialLog, weights: np.ndarray) -> int:
    """How many trials of an exhaustive log a cell really needs: the shortest prefix after which the running
    decision never changes again. A lower bound for any stopping rule (a rule cannot know it has stopped
    at the right time)."""
    errors = np.stack(log.errors) * weights[np.asarray(log.strata)][:, None]
    relative = errors - errors.min(axis=1, keepdims=True)
    running = np.cumsum(relative, axis=0).argmin(axis=1)
    changed = np.flatnonzero(running != running[-1])
    return int(changed[-1] + 2) if len(changed) else 1


def evaluations_needed(log: TrialLog, weights: np.ndarray, null_trials: int | None = 0) -> int:
    """How many denoiser evaluations of an exhaustive log a cell really needs: each class other than the decided
    one stays in play until its running comparison with the decided class is settled (behind from then on), and
    the decided class until the last of them leaves; the null class on the first `null_trials` of those trials
    (None: all, as `ScoringConfig.null_trials`). What a rule that knew when each comparison had settled would
    spend: the figure to hold a rule's mean evaluations against (`trials_needed` is the same idea for the
    decision as a whole)."""
    errors = np.stack(log.errors) * weights[np.asarray(log.strata)][:, None]
    totals = np.cumsum(errors, axis=0)
    decided = int(np.argmin(totals[-1]))
    in_play = []
    for c in range(errors.shape[1]):
        if c != decided:
            not_behind = np.flatnonzero(totals[:, c] <= totals[:, decided])
            in_play.append(min(int(not_behind[-1] + 2), len(errors)) if len(not_behind) else 1)
    trials = max(in_play, default=1)
    return sum(in_play) + trials + (trials if null_trials is None else min(null_trials, trials))


def variance_prior(logs: list[TrialLog], weights: np.ndarray) -> float:
    """The typical variance of one trial's weighted error difference between two classes: the median, over cells
    and class pairs, of each cell's variance across its trials (`logs` hold every class in every trial)."""
    variances = []
    for log in logs:
        errors = np.stack(log.errors) * weights[np.asarray(log.strata)][:, None]
        if len(errors) < 2:
            continue
        for a in range(errors.shape[1]):
            for b in range(a + 1, errors.shape[1]):
                variances.append(np.var(errors[:, a] - errors[:, b], ddof=1))
    if not variances:
        raise ValueError("a variance prior needs logs with at least two trials and two classes")
    return float(np.median(variances))


def tune_scoring(
    logs: list[TrialLog],
    weights: np.ndarray,
    config: ScoringConfig,
    target_agreement: float = 0.99,
    min_trials: tuple[int, ...] = TUNING_MIN_TRIALS,
    p_values: tuple[float, ...] = TUNING_P_VALUES,
    prior_trials: tuple[float, ...] = TUNING_PRIOR_TRIALS,
) -> tuple[ScoringConfig, list[dict]]:
    """The cheapest elimination rule whose decisions agree with exhaustive scoring on `target_agreement` of cells.

    `logs` are exhaustive trials (every class, every trial) of validation cells; the exhaustive decision is the
    one over the whole log, and each log is replayed in `config.tuning_orders` orders (`reorderings`), agreement
    and evaluations averaged over them. Every (prior weight, min_trials, elimination_p) candidate is replayed with
    `check_every = 1`, a prior weight k > 0 testing with the variance prior fitted on these logs counting as k
    trials; the candidate with the fewest mean evaluations among those meeting the target wins (ties: the later,
    more conservative one). If none meets it, `config` is returned unchanged. Returns the chosen config and one
    row per candidate.
    """
    if not logs:
        raise ValueError("cannot tune on zero validation cells")
    # A rule cannot test later than it stops, and a replay cannot see past the logged trials: a first test beyond
    # either is exhaustive scoring under another name. It ties with the real one and the later candidate wins ties,
    # so without this cap a model could be saved with min_trials above max_trials (and then fail to load) or with
    # a cost the replay never measured.
    limit = min(config.max_trials, min(len(log.errors) for log in logs))
    min_trials = tuple(m for m in min_trials if m <= limit)
    if not min_trials:
        raise ValueError(f"no min_trials candidate is within {limit} (max_trials, or the fewest trials logged)")
    prior = variance_prior(logs, weights) if any(k > 0 for k in prior_trials) else None
    reference = np.repeat([decision(log, weights) for log in logs], config.tuning_orders)
    logs = [order for log in logs for order in reorderings(log, config.tuning_orders, config.timestep_bins)]
    rows, best = [], None
    for k in prior_trials:
        for m in min_trials:
            if k == 0 and m < 2 and 2 in min_trials:
                continue  # without a prior, min_trials 1 is min_trials 2
            for p in p_values:
                candidate = config.model_copy(
                    update={
                        "min_trials": m,
                        "check_every": 1,
                        "elimination_p": p,
                        "variance_prior": prior if k > 0 else None,
                        "variance_prior_trials": k if k > 0 else config.variance_prior_trials,
                    }
                )
                decided, evals = replay_decisions(logs, candidate, weights)
                row = {
                    "variance_prior_trials": k,
                    "min_trials": m,
                    "elimination_p": p,
                    "agreement": float(np.mean(decided == reference)),
                    "evals_mean": float(evals.mean()),
                    "evals_p95": float(np.percentile(evals, 95)),
                }
                rows.append(row)
                cheaper = best is None or row["evals_mean"] <= best[0]["evals_mean"]
                if row["agreement"] >= target_agreement and cheaper:
                    best = (row, candidate)
    return (config if best is None else best[1]), rows

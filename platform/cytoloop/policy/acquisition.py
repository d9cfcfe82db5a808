"""Acquisition strategies: which unlabeled cells to send for labelling next (active learning).

A strategy (MONAI-Label style) is a small pure function: it takes the model's `Predictions` for the pool (wrapped
in a `Pool` with the cells' ids, samples and signatures, which only the routing policy uses), a budget and a seed,
and returns the indices of exactly `budget` distinct pool cells. Strategies never train or score anything, so
the active-learning benchmark, the review loop and the tests can replay them on stored predictions.

- `random`: a seeded uniform draw, the yardstick every other strategy must beat;
- `least_confidence`: the lowest top-class probability first;
- `margin`: the smallest gap between the two most probable classes first;
- `entropy`: the highest entropy of the class probabilities first;
- `disagreement`: the diffusion classifier's own committee: the highest share of a cell's trials that voted for
  another class than the one it was given (`scoring.trials.trial_disagreement`), ties by least confidence. Only
  a model that scores in trials offers it (`Predictions.extra["disagreement"]`); any other is a clear error;
- `routing`: the review loop's own policy (`routing.route_cells` + `routing.select_for_review`): anomalies
  first, then the least confident, then audits, spread across predicted classes and samples, skipping
  near-duplicates. It spends only on cells it routes to a human; when fewer than `budget` cells are routed (most
  are 'accept'), the rest of the budget goes to the least confident remaining cells, so every strategy labels the
  same number of cells per round.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from cytoloop.config import RoutingConfig
from cytoloop.errors import UsageError
from cytoloop.models.base import Predictions
from cytoloop.policy.routing import ScoredCell, route_cells, select_for_review


@dataclass(frozen=True)
class Pool:
    """The unlabeled cells a round may acquire from, row i for cell i.

    `sample_ids` (smear or lab of each cell; None: all one sample) and `signatures` (short vectors for the
    near-duplicate check, e.g. image thumbnails; None: the probability vectors) matter to the routing policy only.
    """

    predictions: Predictions
    cell_ids: Sequence[str]
    classes: Sequence[str]
    sample_ids: Sequence[str] | None = None
    signatures: np.ndarray | None = None

    def __post_init__(self) -> None:
        lengths = {len(self.predictions), len(self.cell_ids)}
        lengths |= {len(x) for x in (self.sample_ids, self.signatures) if x is not None}
        if len(lengths) != 1:
            raise ValueError(
                f"pool parts differ in length: {len(self.predictions)} predictions, "
                f"{len(self.cell_ids)} cell ids; sample ids and signatures must match too"
            )
        if len(set(self.cell_ids)) != len(self.cell_ids):
            raise ValueError("pool cell ids must be unique (routing tells cells apart by id)")
        columns = self.predictions.probs.shape[1] if self.predictions.probs.ndim == 2 else None
        if columns != len(self.classes):
            raise ValueError(
                f"pool probabilities have {columns} columns for {len(self.classes)} classes ({', '.join(self.classes)})"
            )

    def __len__(self) -> int:
        return len(self.cell_ids)


Strategy = Callable[[Pool, int, int], np.ndarray]


def _check_budget(pool: Pool, budget: int) -> None:
    if not 0 <= budget <= len(pool):
        raise ValueError(f"budget must be between 0 and the pool size ({len(pool)}), got {budget}")


def _lowest(scores: np.ndarray, budget: int, exclude: Sequence[int] = ()) -> np.ndarray:
    """Indices of the `budget` lowest scores (ties: the lower index), skipping `exclude`."""
    order = np.argsort(scores, kind="stable")
    excluded = set(int(i) for i in exclude)
    return np.array([i for i in order if int(i) not in excluded][:budget], dtype=int)


def random_sampling(pool: Pool, budget: int, seed: int = 0) -> np.ndarray:
    """A uniform draw without replacement, fixed by `seed`."""
    _check_budget(pool, budget)
    return np.sort(np.random.default_rng(seed).choice(len(pool), size=budget, replace=False))


def least_confidence(pool: Pool, budget: int, seed: int = 0) -> np.ndarray:
    """The cells whose top class probability is lowest (the seed is unused: the choice is deterministic)."""
    _check_budget(pool, budget)
    return _lowest(pool.predictions.confidence, budget)


def entropy_sampling(pool: Pool, budget: int, seed: int = 0) -> np.ndarray:
    """The cells whose class probabilities have the highest entropy (deterministic)."""
    _check_budget(pool, budget)
    return _lowest(-pool.predictions.entropy, budget)


def margin_sampling(pool: Pool, budget: int, seed: int = 0) -> np.ndarray:
    """The cells whose two most probable classes are closest (deterministic)."""
    _check_budget(pool, budget)
    if len(pool.classes) < 2:
        raise ValueError(f"margin sampling needs two classes or more; the pool has {len(pool.classes)}")
    top_two = np.sort(pool.predictions.probs, axis=1)[:, -2:]
    return _lowest(top_two[:, 1] - top_two[:, 0], budget)


def disagreement_sampling(pool: Pool, budget: int, seed: int = 0) -> np.ndarray:
    """The cells whose trials disagree most with their final class; ties (common: a share of a few trials) go
    to the least confident (deterministic)."""
    _check_budget(pool, budget)
    votes = pool.predictions.extra.get("disagreement")
    if votes is None:
        raise UsageError(
            "the disagreement strategy needs predictions from a model that scores in trials (the diffusion "
            "classifier); these have no per-cell trial disagreement"
        )
    order = np.lexsort((pool.predictions.confidence, -np.nan_to_num(votes, nan=0.0)))
    return np.array(order[:budget], dtype=int)


def routing_policy(config: RoutingConfig | None = None, anomaly_quantile: float = 0.95) -> Strategy:
    """The review loop's routing policy as a strategy.

    An anomaly score's scale is per model, so when `config.anomaly_above` is unset the threshold is the pool's
    `anomaly_quantile` quantile: the most anomalous (1 - quantile) share of the pool is routed 'anomaly'.
    """
    base = config or RoutingConfig()
    if not 0.0 < anomaly_quantile <= 1.0:
        raise ValueError(f"anomaly_quantile must be in (0, 1], got {anomaly_quantile}")

    def routing(pool: Pool, budget: int, seed: int = 0) -> np.ndarray:
        _check_budget(pool, budget)
        if not len(pool):  # as the other strategies answer it (the pool's quantile raised IndexError)
            return np.zeros(0, dtype=int)
        predictions = pool.predictions
        threshold = base.anomaly_above
        if threshold is None:
            threshold = float(np.quantile(predictions.anomaly, anomaly_quantile))
        routing_config = base.model_copy(update={"anomaly_above": threshold})
        samples = pool.sample_ids if pool.sample_ids is not None else ["pool"] * len(pool)
        signatures = pool.signatures if pool.signatures is not None else predictions.probs
        cells = [
            ScoredCell(
                str(cell_id),
                str(sample),
                pool.classes[int(label)],
                float(confidence),
                float(anomaly),
                tuple(float(v) for v in signature),
            )
            for cell_id, sample, label, confidence, anomaly, signature in zip(
                pool.cell_ids, samples, predictions.labels, predictions.confidence, predictions.anomaly, signatures
            )
        ]
        row_of = {cell.cell_id: i for i, cell in enumerate(cells)}
        chosen = [
            row_of[r.cell.cell_id]
            for r in select_for_review(route_cells(cells, routing_config), routing_config, budget)
        ]
        fill = _lowest(predictions.confidence, budget - len(chosen), exclude=chosen)
        return np.concatenate([np.array(chosen, dtype=int), fill])

    return routing


STRATEGIES: dict[str, Strategy] = {
    "random": random_sampling,
    "least_confidence": least_confidence,
    "margin": margin_sampling,
    "entropy": entropy_sampling,
    "disagreement": disagreement_sampling,
    "routing": routing_policy(),
}


def get_strategy(name: str, routing_config: RoutingConfig | None = None) -> Strategy:
    """The strategy registered as `name`; `routing_config` configures the routing policy (default settings
    otherwise). An unknown name is an error listing the valid ones."""
    if name not in STRATEGIES:
        raise UsageError(f"unknown acquisition strategy {name!r}; valid: {', '.join(STRATEGIES)}")
    if name == "routing" and routing_config is not None:
        return routing_policy(routing_config)
    return STRATEGIES[name]

"""Acquisition strategies on hand-made predictions: budgets, determinism, and what each one prefers."""

from __future__ import annotations

import numpy as np
import pytest

from cytoloop.config import RoutingConfig
from cytoloop.models.base import Predictions
from cytoloop.policy.acquisition import STRATEGIES, Pool, get_strategy, routing_policy

CLASSES = ["neutrophil", "lymphocyte", "monocyte", "eosinophil"]


def fake_pool(n: int = 40, seed: int = 0, anomaly: np.ndarray | None = None) -> Pool:
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, len(CLASSES))) * rng.uniform(0.1, 4.0, size=(n, 1))
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    anomaly = rng.normal(size=n) if anomaly is None else anomaly
    disagreement = rng.integers(0, 5, size=n) / 4  # a share of four trials: ties are common
    return Pool(
        Predictions(probs, anomaly, np.ones(n, dtype=int), {"disagreement": disagreement}),
        [f"cell-{i}" for i in range(n)],
        CLASSES,
        sample_ids=[f"s{i % 3}" for i in range(n)],
    )


@pytest.mark.parametrize("name", list(STRATEGIES))
@pytest.mark.parametrize("budget", [0, 1, 7, 40])
def test_exactly_budget_distinct_indices_from_the_pool(name, budget):
    pool = fake_pool()
    chosen = get_strategy(name)(pool, budget, 3)
    assert len(chosen) == budget
    assert len(set(chosen.tolist())) == budget
    assert all(0 <= i < len(pool) for i in chosen)


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_an_empty_pool_gives_no_cells(name):
    """The routing strategy took its anomaly threshold as the empty pool's quantile: IndexError; the others
    answered with no cells."""
    assert len(get_strategy(name)(fake_pool(0), 0, 3)) == 0


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_deterministic_for_a_seed(name):
    pool = fake_pool()
    assert np.array_equal(get_strategy(name)(pool, 10, 5), get_strategy(name)(pool, 10, 5))


def test_random_depends_on_the_seed():
    pool = fake_pool()
    assert not np.array_equal(get_strategy("random")(pool, 10, 1), get_strategy("random")(pool, 10, 2))


def test_least_confidence_picks_the_lowest_confidence():
    pool = fake_pool()
    chosen = get_strategy("least_confidence")(pool, 5, 0)
    assert set(chosen.tolist()) == set(np.argsort(pool.predictions.confidence)[:5].tolist())


def test_entropy_picks_the_highest_entropy():
    pool = fake_pool()
    chosen = get_strategy("entropy")(pool, 5, 0)
    assert set(chosen.tolist()) == set(np.argsort(-pool.predictions.entropy)[:5].tolist())


def test_margin_picks_the_closest_top_two():
    probs = np.array([[0.5, 0.45, 0.05, 0.0], [0.4, 0.2, 0.2, 0.2], [0.9, 0.05, 0.05, 0.0], [0.34, 0.33, 0.33, 0.0]])
    pool = Pool(Predictions(probs, np.zeros(4), np.ones(4, dtype=int)), ["a", "b", "c", "d"], CLASSES)
    # least confidence would take 3 and 1 (top 0.34, 0.4); the margin takes the close calls 3 and 0
    assert get_strategy("margin")(pool, 2, 0).tolist() == [3, 0]
    assert set(get_strategy("least_confidence")(pool, 2, 0).tolist()) == {3, 1}


def test_disagreement_picks_the_most_divided_trials_and_breaks_ties_by_confidence():
    probs = np.array([[0.9, 0.1, 0, 0], [0.6, 0.4, 0, 0], [0.7, 0.3, 0, 0], [0.99, 0.01, 0, 0]])
    votes = np.array([0.5, 0.25, 0.25, 0.0])
    pool = Pool(Predictions(probs, np.zeros(4), np.ones(4, dtype=int), {"disagreement": votes}), list("abcd"), CLASSES)
    assert get_strategy("disagreement")(pool, 3, 0).tolist() == [0, 1, 2]  # 1 before 2: less confident


def test_disagreement_without_trials_is_a_clear_error():
    pool = Pool(Predictions(np.full((3, 4), 0.25), np.zeros(3), np.ones(3, dtype=int)), list("abc"), CLASSES)
    with pytest.raises(ValueError, match="scores in trials"):
        get_strategy("disagreement")(pool, 1, 0)


def test_routing_prefers_anomalies():
    anomaly = np.zeros(40)
    anomaly[[3, 17, 29]] = 10.0  # confident or not, these three are the anomalies
    pool = fake_pool(anomaly=anomaly)
    chosen = routing_policy(RoutingConfig(anomaly_above=5.0, audit_fraction=0.0))(pool, 5, 0)
    assert set(chosen[:3].tolist()) == {3, 17, 29}
    by_quantile = routing_policy(anomaly_quantile=0.9)(pool, 3, 0)  # threshold: the pool's 90th percentile
    assert set(by_quantile.tolist()) == {3, 17, 29}


def test_routing_fills_the_budget_by_least_confidence_when_most_cells_are_accepted():
    pool = fake_pool()
    strategy = routing_policy(RoutingConfig(review_below=0.0, audit_fraction=0.0), anomaly_quantile=1.0)
    chosen = strategy(pool, 6, 0)  # nothing is routed: all six come from the least-confidence fill
    assert set(chosen.tolist()) == set(np.argsort(pool.predictions.confidence)[:6].tolist())


def test_unknown_strategy_and_bad_budget_are_clear_errors():
    with pytest.raises(ValueError, match="unknown acquisition strategy 'bald'; valid: random, least_confidence"):
        get_strategy("bald")
    with pytest.raises(ValueError, match="budget"):
        get_strategy("entropy")(fake_pool(n=5), 6, 0)


def test_a_pool_whose_classes_are_not_its_columns_and_margin_on_one_class_are_clear_errors():
    """A class list shorter than the probability columns failed later, in routing, with an IndexError; margin
    sampling on a one-class model with another IndexError."""
    full = fake_pool(n=4)
    with pytest.raises(ValueError, match="pool probabilities have 4 columns for 3 classes"):
        Pool(full.predictions, full.cell_ids, CLASSES[:3])
    one = Pool(Predictions(np.ones((3, 1)), np.zeros(3), np.ones(3, dtype=int)), ["a", "b", "c"], ["neutrophil"])
    with pytest.raises(ValueError, match="margin sampling needs two classes or more; the pool has 1"):
        get_strategy("margin")(one, 1, 0)

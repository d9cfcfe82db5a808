"""Routing policy and the per-round budget: pure functions, checked on hand-made cells."""

from __future__ import annotations

import pytest

from cytoloop.config import RoutingConfig
from cytoloop.policy.routing import RoutedCell, ScoredCell, audit_draw, route_cell, route_cells, select_for_review


def config(**changes) -> RoutingConfig:
    return RoutingConfig(
        **{
            "review_below": 0.7,
            "anomaly_above": 1.0,
            "always_review": ["blast"],
            "audit_fraction": 0.0,
            "budget": 10,
            **changes,
        }
    )


def test_reasons_in_priority_order():
    cfg = config()
    assert route_cell(0.95, 0.0, "neutrophil", cfg, "a") == "accept"
    assert route_cell(0.5, 0.0, "neutrophil", cfg, "a") == "review"
    assert route_cell(0.5, 2.0, "neutrophil", cfg, "a") == "anomaly"  # anomaly wins over review
    assert route_cell(0.99, 0.0, "blast", cfg, "a") == "anomaly"  # always-review class, however confident
    assert route_cell(0.99, 5.0, "neutrophil", config(anomaly_above=None), "a") == "accept"  # threshold disabled


def test_audit_is_a_deterministic_fraction_of_confident_cells():
    cfg = config(audit_fraction=0.1, seed=3)
    ids = [f"cell-{i}" for i in range(4000)]
    first = [route_cell(0.95, 0.0, "neutrophil", cfg, i) for i in ids]
    assert first == [route_cell(0.95, 0.0, "neutrophil", cfg, i) for i in ids]  # same cell, same answer
    share = first.count("audit") / len(ids)
    assert 0.08 < share < 0.12
    assert route_cell(0.95, 0.0, "neutrophil", cfg) == "accept"  # no identity, no audit
    assert route_cell(0.5, 0.0, "neutrophil", cfg, ids[0]) == "review"  # audits come only from confident cells
    other_seed = [route_cell(0.95, 0.0, "neutrophil", config(audit_fraction=0.1, seed=4), i) for i in ids]
    assert other_seed != first
    assert 0.0 <= audit_draw("x", 0) < 1.0


def test_bad_confidence_is_named():
    with pytest.raises(ValueError, match="confidence"):
        route_cell(1.5, 0.0, "neutrophil", config(), "a")


def cell(cell_id, label="neutrophil", conf=0.5, anomaly=0.0, sample="s1", signature=()):
    return ScoredCell(cell_id, sample, label, conf, anomaly, signature)


def test_budget_spends_anomalies_first_then_least_confident():
    cfg = config()
    cells = [
        cell("r1", conf=0.6),
        cell("r2", conf=0.3),
        cell("a1", anomaly=3.0, conf=0.9),
        cell("a2", anomaly=5.0, conf=0.9),
        cell("ok", conf=0.99),
    ]
    chosen = select_for_review(route_cells(cells, cfg), cfg, budget=3)
    assert [c.cell.cell_id for c in chosen] == ["a2", "a1", "r2"]
    assert all(c.reason != "accept" for c in select_for_review(route_cells(cells, cfg), cfg, budget=100))
    assert select_for_review(route_cells(cells, cfg), cfg, budget=0) == []


def test_budget_is_spread_over_classes_and_samples():
    cfg = config()
    cells = [cell(f"n{i}", "neutrophil", conf=0.1 + i * 0.01, sample="s1") for i in range(10)]
    cells += [cell("l1", "lymphocyte", conf=0.6, sample="s2"), cell("m1", "monocyte", conf=0.65, sample="s3")]
    chosen = [c.cell.cell_id for c in select_for_review(route_cells(cells, cfg), cfg, budget=4)]
    assert "l1" in chosen and "m1" in chosen  # not four of the (less confident) neutrophils of one sample
    assert chosen[0] == "n0"


def test_near_duplicates_do_not_use_the_budget():
    cfg = config(near_duplicate=0.02)
    same = (0.5, 0.5, 0.0)
    cells = [
        cell("d1", signature=same),
        cell("d2", signature=(0.51, 0.49, 0.0)),
        cell("x", signature=(0.6, 0.1, 0.3)),
        cell("other-sample", signature=same, sample="s2"),
    ]
    chosen = {c.cell.cell_id for c in select_for_review(route_cells(cells, cfg), cfg, budget=10)}
    assert chosen == {"d1", "x", "other-sample"} or chosen == {"d2", "x", "other-sample"}


def test_negative_budget_is_refused():
    with pytest.raises(ValueError, match="budget"):
        select_for_review([RoutedCell(cell("a"), "review")], config(), budget=-1)


def test_fill_budget_spends_the_rest_on_the_least_confident_accepted_cells():
    cells = [cell("a", anomaly=3.0, conf=0.9), cell("r", conf=0.5)]
    cells += [cell(f"ok{i}", conf=0.99 - i * 0.01, sample=f"s{i}") for i in range(6)]  # accepted: 0.99 .. 0.94
    routed = route_cells(cells, config())
    assert [c.cell.cell_id for c in select_for_review(routed, config(), budget=4)] == ["a", "r"]  # budget unspent
    filled = select_for_review(routed, config(fill_budget=True), budget=4)
    assert [c.cell.cell_id for c in filled] == ["a", "r", "ok5", "ok4"]  # then the least confident accepted
    assert [c.reason for c in filled] == ["anomaly", "review", "review", "review"]  # sent as reviews
    assert len(select_for_review(routed, config(fill_budget=True), budget=100)) == len(cells)


def test_a_reconfigure_during_a_model_call_does_not_change_the_call_s_routing(tiny_settings):
    """`set_routing` (a Serve reconfigure, in another thread) replaced the service's thresholds while a call ran:
    the model's early exits used one review threshold and the cells' routes another, so a cell that stopped
    scoring as a close call could be routed `accept`, its guessed label taken. The swap happens mid-call here."""
    import io

    import numpy as np
    from PIL import Image

    from cytoloop.models.baseline import BaselineClassifier
    from cytoloop.serving.inference import CellService
    from cytoloop.serving.model_source import ModelRef

    model = BaselineClassifier(["a", "b"], tiny_settings.data, tiny_settings.baseline)  # untrained: about 0.5
    service = CellService(model, ModelRef("cells", "1", "champion"), RoutingConfig(review_below=1.0, audit_fraction=0))
    predict = model.predict

    def reconfigured_meanwhile(*args, **kwargs):
        service.routing = RoutingConfig(review_below=0.0, audit_fraction=0)  # `set_routing`, from another thread
        return predict(*args, **kwargs)

    model.predict = reconfigured_meanwhile
    cells = []
    for i in range(3):
        buffer = io.BytesIO()
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(buffer, "PNG")
        cells.append((f"{i}.png", buffer.getvalue()))
    assert [answer.route for answer in service.classify(cells)] == ["review"] * 3  # the call's own thresholds
    assert [answer.route for answer in service.classify(cells)] == ["accept"] * 3  # the next call: the new ones

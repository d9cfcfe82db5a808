"""Evaluating over several labs at once: each lab is also scored on the classes it has."""

from __future__ import annotations

import numpy as np
from PIL import Image

from cytoloop.data.records import CellRecord
from cytoloop.workflows import evaluate_model, train_model


def _lab(root, domain, labels, n=8, seed=0):
    rng = np.random.default_rng(seed)
    colours = {"red": (200, 60, 60), "blue": (60, 60, 200), "green": (60, 200, 60)}
    records = []
    for label in labels:
        for i in range(n):
            pixels = np.clip(np.array(colours[label]) + rng.normal(0, 20, (16, 16, 3)), 0, 255).astype(np.uint8)
            path = root / domain / label / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(path)
            records.append(CellRecord(f"{domain}/{label}/{i}.png", path, label, domain))
    return records


def test_a_lab_with_fewer_classes_is_scored_on_the_classes_it_has(tmp_path, tiny_settings):
    model, _ = train_model(
        "baseline", _lab(tmp_path, "big", ["red", "blue", "green"], 10), tiny_settings, tmp_path / "model"
    )
    small = _lab(tmp_path, "small", ["red", "blue"], seed=1)  # a lab without 'green'
    other = _lab(tmp_path, "other", ["green", "blue"], seed=2)
    report = evaluate_model(model, small + other)
    per_domain = report["per_domain"]
    assert set(per_domain) == {"small", "other"}
    assert per_domain["small"]["n_cells"] == 16 and per_domain["small"]["per_class_recall"]["green"] is None
    recalls = [r for r in per_domain["small"]["per_class_recall"].values() if r is not None]
    assert per_domain["small"]["balanced_accuracy"] == np.mean(recalls)  # over red and blue only
    low, high = per_domain["other"]["intervals"]["balanced_accuracy"]
    assert low <= per_domain["other"]["balanced_accuracy"] <= high
    assert "per_domain" not in evaluate_model(model, small)  # one lab: the overall figures are its figures


def test_a_site_s_classes_decide_every_cell_and_are_named_in_the_report(tmp_path, tiny_settings):
    import pytest

    from cytoloop.errors import UsageError

    model, _ = train_model(
        "baseline", _lab(tmp_path, "big", ["red", "blue", "green"], 10), tiny_settings, tmp_path / "model"
    )
    small = _lab(tmp_path, "small", ["red", "blue"], seed=1)
    report = evaluate_model(model, small, per_cell=True, allowed=["red", "blue"])
    probs = np.array(report["per_cell"]["probs"])
    assert report["allowed_classes"] == ["red", "blue"] and (probs[:, model.classes.index("green")] == 0).all()
    assert evaluate_model(model, small)["allowed_classes"] is None
    with pytest.raises(UsageError, match="purple"):
        evaluate_model(model, small, allowed=["red", "purple"])


def test_an_alternative_anomaly_score_not_measured_on_every_cell_is_left_out_and_named():
    """With the null class off every cell's null-ratio score is NaN (and a cell left one candidate class has a
    class gap of -inf): AUROC raised on it, failing the whole evaluation and a gate with an anomaly set."""

    from cytoloop.models.base import Predictions
    from cytoloop.workflows import anomaly_metrics

    anomaly = np.array([0.9, 0.1, 0.8, 0.2, 0.7, 0.3])
    extra = {"anomaly_null_ratio": np.full(6, np.nan), "anomaly_gap": np.array([1, 0, 1, -np.inf, 1, 0.0])}
    predictions = Predictions(np.full((6, 2), 0.5), anomaly, np.ones(6), extra)
    result = anomaly_metrics(predictions, np.array([1, 0, 1, 0, 1, 0], dtype=bool))
    assert result["anomaly_auroc"] == 1.0
    assert result["anomaly_scores_not_measured"] == ["anomaly_gap", "anomaly_null_ratio"]
    assert result["anomaly_auroc_by_score"] == {}

"""The model card says only what the model directory and the evaluation reports say, intervals included."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from cytoloop.data.records import CellRecord
from cytoloop.evaluation.model_card import CARD_FILE, render_model_card, write_model_card
from cytoloop.workflows import anomaly_metrics, evaluate_model, held_out, train_model


def _cells(root, n=12):
    rng = np.random.default_rng(0)
    records = []
    for label, colour in (("red", (200, 60, 60)), ("blue", (60, 60, 200))):
        for i in range(n):
            pixels = np.clip(np.array(colour) + rng.normal(0, 20, (16, 16, 3)), 0, 255).astype(np.uint8)
            path = root / label / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(path)
            records.append(
                CellRecord(f"{label}/{i}.png", path, label, "lab", source="Lab A (2024)", license="CC BY 4.0")
            )
    return records


def test_card_shows_provenance_recipe_and_every_figure_with_its_interval(tmp_path, tiny_settings):
    records = _cells(tmp_path / "cells")
    out = tmp_path / "model"
    model, _ = train_model("baseline", records, tiny_settings, out)
    (out / "recipe.json").write_text(
        json.dumps(
            {
                "recipe": "tiny",
                "description": "a test model",
                "command": "cytoloop train --recipe tiny --data d --out m",
            }
        )
    )
    report = evaluate_model(model, held_out(records, out, part="test")[0])
    anomalies = anomaly_metrics(model.predict(np.zeros((6, 3, 16, 16), np.float32)), np.array([1, 0, 1, 0, 1, 0]))
    card = write_model_card(
        out, {"Lab A test": report, "Made-up anomalies": anomalies}, "For tests only.", "- Two colours, not cells."
    )
    text = card.read_text()
    assert card.name == CARD_FILE
    assert "lab: 24 labelled cells. Source: Lab A (2024). Licence: CC BY 4.0." in text
    assert "    cytoloop train --recipe tiny --data d --out m" in text
    low, high = report["intervals"]["balanced_accuracy"]
    assert f"| balanced accuracy | {report['balanced_accuracy']:.3f} [{low:.3f}, {high:.3f}] |" in text
    assert "Recall per class: blue " in text and "; red " in text
    assert f"Anomaly AUROC (3 anomalies of 6 cells): primary score {anomalies['anomaly_auroc']:.3f}" in text
    assert "## Intended use\n\nFor tests only." in text and "## Known limits\n\n- Two colours, not cells." in text
    # a CNN makes one pass per cell: no "denoiser evaluations" row (it showed 1.0, 1); evaluations leave out the
    # training and validation cells, not "use the test part" (any report may be shown)
    assert "denoiser evaluations" not in text and "Evaluations below leave out the training and validation" in text
    # one lab's part of a report (`per_domain`) has no accuracy at 90 % coverage: shown as '-', not an IndexError
    lab_part = {k: report[k] for k in ("n_cells", "accuracy", "balanced_accuracy", "ece", "nll", "per_class_recall")}
    text = write_model_card(out, {"Lab A alone": {**lab_part, "intervals": report["intervals"]}}).read_text()
    assert "| accuracy at 90 % coverage | - |" in text and "Recall per class: blue " in text


def test_card_needs_a_model_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a model directory"):
        render_model_card(tmp_path, {})


def test_a_damaged_record_or_a_partial_report_is_named_not_a_traceback(tmp_path, clean_env):
    """A model.json cut short was a JSONDecodeError, a report without its cell count a KeyError, while the card
    was written."""
    from typer.testing import CliRunner

    from cytoloop.models.base import ModelLoadError
    from ops.cli import app

    (tmp_path / "model.json").write_text('{"kind": "diffusion", "classes": [')
    with pytest.raises(ModelLoadError, match="model.json: not valid JSON"):
        render_model_card(tmp_path, {})
    (tmp_path / "model.json").write_text("{}")
    (tmp_path / "training.json").write_text("[]")
    with pytest.raises(ModelLoadError, match="training.json: expected a JSON object, got list"):
        render_model_card(tmp_path, {})
    report = tmp_path / "report.json"
    for figures, missing in (({"balanced_accuracy": 0.9}, "n_cells"), ({"anomaly_auroc": 0.8}, "anomaly_n")):
        report.write_text(json.dumps(figures))
        result = CliRunner().invoke(app, ["card", str(tmp_path), "--eval", f"lab={report}"])
        message = " ".join(result.output.split())
        assert result.exit_code == 2 and f"lacks {missing}" in message, message
    (tmp_path / "training.json").unlink()
    limits = tmp_path / "limits.md"
    limits.write_bytes(b"- \xe9tain: Latin-1, not UTF-8\n")
    result = CliRunner().invoke(app, ["card", str(tmp_path), "--limits", str(limits)])
    message = " ".join(result.output.split())
    assert result.exit_code == 2 and f"{limits}: not UTF-8 text" in message, message

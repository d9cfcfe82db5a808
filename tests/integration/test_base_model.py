"""The shipped base model (`models/base-pbc`): within its size budget, with its card, loaded like any model
directory, classifying held-out PBC cells far above chance, and registrable as the first champion through
`cytoloop register` into a real MLflow registry (a SQLite file under a temporary home)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.integration

BASE = Path(__file__).resolve().parents[2] / "models" / "base-pbc"
PBC_CLASSES = [
    "basophil",
    "eosinophil",
    "erythroblast",
    "immature_granulocyte",
    "lymphocyte",
    "monocyte",
    "neutrophil",
    "platelet",
]


@pytest.fixture(scope="module")
def test_cells(cells_dir):
    """Four held-out PBC test cells of each class, preprocessed for the base model."""
    from cytoloop.data.preprocess import load_cells
    from cytoloop.data.records import class_interleaved_subset, load_records, select
    from cytoloop.models.loading import load_model
    from cytoloop.workflows import held_out, label_indices

    model = load_model(BASE)
    records = select(load_records(cells_dir.parent / "manifest.csv"), ["pbc"])
    test, _ = held_out(records, BASE, part="test")
    cells = load_cells(class_interleaved_subset(test, 4 * len(PBC_CLASSES)), model.data_config)
    return model, cells.images, label_indices(cells.records, model.classes)


def test_the_base_model_is_small_documented_and_tuned():
    assert sum(f.stat().st_size for f in BASE.rglob("*") if f.is_file()) <= 25_000_000
    assert not (BASE / "checkpoints").exists()  # the optimiser state stays out of the shipped model
    meta = json.loads((BASE / "model.json").read_text())
    assert meta["kind"] == "diffusion" and meta["classes"] == PBC_CLASSES and meta["data"]["image_size"] == 32
    recipe = json.loads((BASE / "recipe.json").read_text())
    assert recipe["recipe"] == "base-pbc" and recipe["steps"] >= 20_000
    assert json.loads((BASE / "training.json").read_text())["steps"] == recipe["steps"]
    card = (BASE / "MODEL_CARD.md").read_text()
    for needed in (
        "CC BY 4.0",
        "Acevedo",
        "cytoloop train --recipe base-pbc",
        "## Intended use",
        "## Known limits",
        "balanced accuracy",
    ):
        assert needed in card, needed
    assert meta["scoring"]["check_every"] == 1  # the tuned rule, not the untuned default


def test_the_base_model_classifies_held_out_pbc_cells(test_cells):
    model, images, labels = test_cells
    predicted = model.predict(images).labels
    assert np.mean(predicted == labels) >= 0.6  # chance is 1/8


def test_the_base_model_registers_as_the_first_champion(tmp_path, test_cells, monkeypatch):
    env = {k: v for k, v in os.environ.items() if not k.startswith("CYTOLOOP_")}
    env.update(CYTOLOOP_HOME=str(tmp_path / "home"), HF_HUB_OFFLINE="1", MLFLOW_DISABLE_TELEMETRY="true")
    result = subprocess.run(
        [sys.executable, "-m", "ops.cli", "register", str(BASE), "--champion", "--reason", "base model"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "@champion: - -> v1" in result.stdout

    from cytoloop.config import load_settings
    from cytoloop.registry import open_registry

    for name in [n for n in os.environ if n.startswith("CYTOLOOP_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("CYTOLOOP_HOME", str(tmp_path / "home"))
    settings = load_settings()
    registry = open_registry(settings)
    champion = registry.by_alias(settings.registry.model_name, "champion")
    served = registry.load(settings.registry.model_name, champion.version, tmp_path / "cache")
    held = tmp_path / "cache" / settings.registry.model_name / champion.version
    for document in ("MODEL_CARD.md", "recipe.json", "tuning.json", "training.json"):  # the version tells its story
        assert (held / document).read_bytes() == (BASE / document).read_bytes(), document
    model, images, labels = test_cells
    assert served.classes == model.classes
    np.testing.assert_allclose(served.predict(images[:4]).probs, model.predict(images[:4]).probs)

"""Each plot function writes a non-empty PNG that PIL can open, creating missing folders."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cytoloop.evaluation import plots


def _assert_png(path: Path) -> None:
    assert path.is_file() and path.stat().st_size > 0
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size[0] > 0 and image.size[1] > 0


def _toy_predictions() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(40, 3))
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    y_true = rng.integers(0, 3, size=40)
    return probs, y_true


def test_reliability_diagram(tmp_path):
    probs, y_true = _toy_predictions()
    out = plots.reliability_diagram(probs, y_true, tmp_path / "new" / "rel.png", n_bins=10, title="toy")
    _assert_png(out)


@pytest.mark.parametrize("normalize", [True, False])
def test_confusion_matrix_plot(tmp_path, normalize):
    y_true = np.array([0, 0, 1, 1, 2])
    y_pred = np.array([0, 1, 1, 1, 0])
    # "absent" never occurs in y_true: its row shows counts only.
    names = ["neutrophil", "lymphocyte", "monocyte", "absent"]
    out = plots.confusion_matrix_plot(y_true, y_pred, names, tmp_path / "cm.png", normalize=normalize)
    _assert_png(out)


@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_image_grid(tmp_path, dtype):
    rng = np.random.default_rng(0)
    images = rng.random((5, 16, 16, 3))
    images = (images * 255).astype(np.uint8) if dtype is np.uint8 else images.astype(dtype)
    titles = [f"cell {i}" for i in range(5)]
    out = plots.image_grid(images, tmp_path / "grid.png", ncols=3, titles=titles)
    _assert_png(out)


def test_image_grid_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="shape"):
        plots.image_grid(np.zeros((2, 8, 8)), tmp_path / "bad.png")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        plots.image_grid(np.full((1, 8, 8, 3), 2.0), tmp_path / "bad.png")
    with pytest.raises(ValueError, match="titles"):
        plots.image_grid(np.zeros((2, 8, 8, 3)), tmp_path / "bad.png", titles=["one"])


def test_learning_curve(tmp_path):
    out = plots.learning_curve(
        [1, 2, 3],
        {"diffusion": [0.5, 0.6, 0.7], "cnn": [0.55, 0.6, 0.62]},
        tmp_path / "curves" / "lc.png",
        xlabel="round",
        ylabel="balanced accuracy",
        title="active learning",
    )
    _assert_png(out)


def test_learning_curve_rejects_length_mismatch(tmp_path):
    with pytest.raises(ValueError, match="cnn"):
        plots.learning_curve([1, 2], {"cnn": [0.5]}, tmp_path / "lc.png", xlabel="x", ylabel="y")


def test_accuracy_coverage_curve(tmp_path):
    coverages = [0.25, 0.5, 0.75, 1.0]
    out = plots.accuracy_coverage_curve(
        coverages, {"diffusion": [1.0, 0.9, 0.8, 0.7]}, tmp_path / "ac.png", title="selective"
    )
    _assert_png(out)

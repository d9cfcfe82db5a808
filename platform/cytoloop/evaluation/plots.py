"""Evaluation figures written to PNG files.

Figures are built with ``matplotlib.figure.Figure`` directly rather than ``pyplot``: nothing is
registered in pyplot's global figure list (so nothing leaks or needs closing), no GUI backend is
ever selected, and the caller's own matplotlib backend is left untouched. Matplotlib is imported
inside the functions so that importing this module stays cheap. Every function creates the
parent folders of ``path`` and returns ``path`` as a ``Path``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cytoloop.evaluation import metrics

if TYPE_CHECKING:
    from matplotlib.figure import Figure

_DPI = 120


def _new_figure(width: float, height: float) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=_DPI)


def _save(fig: Figure, path: Path | str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", bbox_inches="tight")
    return path


def reliability_diagram(
    probs: np.ndarray, y_true: np.ndarray, path: Path | str, n_bins: int = 15, title: str = ""
) -> Path:
    """Accuracy per confidence bin against the diagonal, with the gap shaded and the ECE in the title.

    Bins are those of ``metrics.reliability_bins``, so the picture and the reported ECE agree.
    A histogram of cells per bin sits below the diagram; empty bins draw no bar.
    """
    bins = metrics.reliability_bins(probs, y_true, n_bins)
    ece = metrics.expected_calibration_error(probs, y_true, n_bins)
    lower, upper = bins["bin_lower"], bins["bin_upper"]
    centers, width = (lower + upper) / 2.0, upper - lower
    filled = bins["count"] > 0
    acc, conf = bins["accuracy"][filled], bins["confidence"][filled]

    fig = _new_figure(5.0, 6.0)
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    top.bar(centers[filled], acc, width=width[filled], color="tab:blue", edgecolor="black", label="accuracy")
    top.bar(
        centers[filled],
        np.abs(conf - acc),
        bottom=np.minimum(conf, acc),
        width=width[filled],
        color="tab:red",
        alpha=0.3,
        hatch="//",
        edgecolor="tab:red",
        label="gap to confidence",
    )
    top.plot([0, 1], [0, 1], linestyle="--", color="gray", label="perfect calibration")
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.set_ylabel("accuracy")
    top.legend(loc="upper left")
    top.set_title(f"{title}  (ECE = {ece:.3f})" if title else f"ECE = {ece:.3f}")

    bottom.bar(centers, bins["count"], width=width, color="gray", edgecolor="black")
    bottom.set_xlabel("confidence (top-label probability)")
    bottom.set_ylabel("cells")
    return _save(fig, path)


def confusion_matrix_plot(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    class_names: list[str],
    path: Path | str,
    normalize: bool = True,
    title: str = "",
) -> Path:
    """Heatmap of the confusion matrix (rows true, columns predicted), each cell annotated.

    Every cell shows its count and its fraction of the true-class row. ``normalize`` picks what the
    colour encodes: the row fraction (default, comparable across imbalanced classes) or the raw count.
    Rows of classes absent from ``y_true`` show counts only.
    """
    n = len(class_names)
    cm = metrics.confusion_matrix(y_true, y_pred, n)
    support = cm.sum(axis=1, keepdims=True)
    fraction = np.divide(cm, support, out=np.zeros(cm.shape), where=support > 0)
    shown = fraction if normalize else cm

    size = max(4.0, 0.7 * n + 2.0)
    fig = _new_figure(size + 1.0, size)
    ax = fig.subplots()
    image = ax.imshow(shown, cmap="Blues", vmin=0, vmax=1 if normalize else max(int(cm.max()), 1))
    fig.colorbar(image, ax=ax, label="fraction of true class" if normalize else "cells")
    threshold = (1 if normalize else max(int(cm.max()), 1)) / 2.0
    for i in range(n):
        for j in range(n):
            text = f"{cm[i, j]}\n{fraction[i, j]:.0%}" if support[i, 0] > 0 else f"{cm[i, j]}"
            color = "white" if shown[i, j] > threshold else "black"
            ax.text(j, i, text, ha="center", va="center", fontsize=8, color=color)
    ax.set_xticks(range(n), class_names, rotation=45, ha="right")
    ax.set_yticks(range(n), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if title:
        ax.set_title(title)
    return _save(fig, path)


def image_grid(images: np.ndarray, path: Path | str, ncols: int = 8, titles: list[str] | None = None) -> Path:
    """Tile ``(N, H, W, 3)`` RGB images (uint8, or float in [0, 1]) into one PNG, row by row.

    Pixels are shown without interpolation so small cell crops stay sharp; ``titles``, if given,
    needs one string per image.
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must have shape (N, H, W, 3), got {images.shape}")
    if images.shape[0] == 0:
        raise ValueError("images is empty")
    if images.dtype != np.uint8:
        if not np.issubdtype(images.dtype, np.floating):
            raise ValueError(f"images must be uint8 or float in [0, 1], got dtype {images.dtype}")
        if not np.all(np.isfinite(images)) or images.min() < 0.0 or images.max() > 1.0:
            raise ValueError("float images must be finite and lie in [0, 1]")
    if ncols < 1:
        raise ValueError(f"ncols must be >= 1, got {ncols}")
    if titles is not None and len(titles) != len(images):
        raise ValueError(f"titles has {len(titles)} entries for {len(images)} images")

    ncols = min(ncols, len(images))
    nrows = math.ceil(len(images) / ncols)
    tile = 1.5
    fig = _new_figure(ncols * tile, nrows * (tile + (0.3 if titles else 0.0)))
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for k, ax in enumerate(axes):
        ax.axis("off")
        if k < len(images):
            ax.imshow(images[k], interpolation="nearest")
            if titles:
                ax.set_title(titles[k], fontsize=7)
    return _save(fig, path)


def learning_curve(
    xs: list[float] | np.ndarray,
    series: dict[str, list[float]],
    path: Path | str,
    xlabel: str,
    ylabel: str,
    title: str = "",
) -> Path:
    """One line with markers per named series, all sharing the x values ``xs``."""
    if not series:
        raise ValueError("series is empty")
    for name, ys in series.items():
        if len(ys) != len(xs):
            raise ValueError(f"series {name!r} has {len(ys)} values for {len(xs)} x values")

    fig = _new_figure(6.0, 4.0)
    ax = fig.subplots()
    for name, ys in series.items():
        ax.plot(xs, ys, marker="o", label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if len(xs) <= 12:  # rounds, label counts: each value its own tick, no 0.5 rounds
        ax.set_xticks(list(xs))
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the axes: it never hides a point
    if title:
        ax.set_title(title)
    return _save(fig, path)


def accuracy_coverage_curve(
    coverages: list[float] | np.ndarray,
    accuracies: dict[str, list[float]],
    path: Path | str,
    title: str = "",
) -> Path:
    """Selective accuracy against coverage (see ``metrics.selective_accuracy``), one line per model."""
    return learning_curve(coverages, accuracies, path, xlabel="coverage", ylabel="accuracy", title=title)

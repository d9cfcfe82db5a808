"""Loading any CytoLoop model from a local directory: the one place that knows every model kind.

Kept out of `models.base` so that the interface does not depend on its implementations (the cascade builds on
the base classes; the base would otherwise import the cascade back).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from cytoloop.models.base import Classifier, ModelLoadError, read_model_meta
from cytoloop.models.baseline import BaselineClassifier
from cytoloop.models.cascade import CascadeClassifier
from cytoloop.models.diffusion import DiffusionClassifier


def load_model(directory: Path | str) -> Classifier:
    """Load any CytoLoop model from a local directory (no hub access, ever)."""
    directory = Path(directory)
    kind = read_model_meta(directory).get("kind")
    loaders: dict[str, Callable[[Path], Any]] = {  # each returns a Classifier
        "diffusion": DiffusionClassifier.load,
        "baseline": BaselineClassifier.load,
        "cascade": CascadeClassifier.load,
    }
    if kind not in loaders:
        raise ModelLoadError(f"{directory}: unknown model kind {kind!r}; known: {', '.join(loaders)}")
    return loaders[str(kind)](directory)

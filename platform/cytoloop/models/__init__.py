"""Classifiers: the diffusion classifier, the CNN baseline, and the interface they share."""

from cytoloop.models.base import Classifier, ModelLoadError, Predictions, load_model

__all__ = ["Classifier", "ModelLoadError", "Predictions", "load_model"]

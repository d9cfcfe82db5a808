"""One loaded model put to work on cell images: bytes in, one answer per cell out.

This is what a serving replica runs for a batch, kept free of Ray and HTTP so it can be tested and reused (the
review loop's pre-annotation calls the same thing). Each cell is preprocessed through the one preprocessing path
with the model's own `data_config`; a cell that fails there gets a `CellFailure` and the rest are still
classified. Each result carries the routing decision of `routing.py`; the model version that produced it is the
service's `ref`, which callers put beside the answers (the HTTP answer's `model`, offline scoring's `version`).
A service made for a site with its own classes (`sites.<site>.classes`) decides every cell among those only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from cytoloop.config import RoutingConfig
from cytoloop.data.preprocess import BlankImageError, ImageError, preprocess
from cytoloop.data.records import cell_id
from cytoloop.models.base import Classifier, candidate_rows, class_mask
from cytoloop.policy.routing import route_cell
from cytoloop.serving.model_source import ModelRef


@dataclass(frozen=True)
class CellResult:
    """One classified cell. `uncertainty` is the entropy of `probabilities` (nats); `anomaly` is on the model's own
    scale; `route` is 'accept', 'review', 'anomaly' or 'audit'; `cell_id` a hash of the image bytes. `provisional`:
    scoring stopped early because the cell's route was settled (an anomaly, or a close call for review); its route
    is final, its label a guess."""

    index: int
    name: str
    cell_id: str
    label: str
    probabilities: dict[str, float]
    confidence: float
    uncertainty: float
    anomaly: float | None  # None where the model produced no finite score
    route: str
    evals: int
    provisional: bool = False


@dataclass(frozen=True)
class CellFailure:
    """A cell that could not be classified; `reason` is a short code, `message` says what and why."""

    index: int
    name: str
    reason: str
    message: str


class CellService:
    """A model with its identity (`ref`) and routing thresholds; `classify` answers a list of (name, bytes).
    `allowed`: the classes every cell is decided among (a site's, `SiteConfig.classes`; None: all the model's);
    one the model lacks raises UsageError here, before any cell is answered."""

    def __init__(self, model: Classifier, ref: ModelRef, routing: RoutingConfig, allowed: Sequence[str] | None = None):
        self.model, self.ref, self.routing = model, ref, routing
        self._mask = class_mask(model.classes, None if allowed is None else list(allowed))

    @property
    def classes(self) -> list[str]:
        return self.model.classes

    def classify(self, cells: Sequence[tuple[str, bytes]]) -> list[CellResult | CellFailure]:
        """Classify (name, image bytes) pairs in one model call; entry i answers cells[i] (and has index i)."""
        routing = self.routing  # once: a reconfigure in another thread must not change it within this call (cells
        # that stopped scoring as close calls under one threshold were routed under another, their guess accepted)
        answers: list[CellResult | CellFailure | None] = [None] * len(cells)
        images, rows = [], []
        for i, (name, data) in enumerate(cells):
            try:
                images.append(preprocess(data, self.model.data_config, name))
                rows.append(i)
            except ImageError as error:
                reason = "blank" if isinstance(error, BlankImageError) else "not_an_image"
                answers[i] = CellFailure(i, name, reason, str(error))
        if images:
            # a cell whose route is settled (clearly an anomaly, or a close call for review) stops scoring there
            predictions = self.model.predict(
                np.stack(images), routing=routing, candidates=candidate_rows(self._mask, len(images))
            )
            classes, entropy = self.model.classes, predictions.entropy
            provisional = predictions.extra.get("provisional", np.zeros(len(images), dtype=bool))
            for row, i in enumerate(rows):
                name, data = cells[i]
                probs = predictions.probs[row]
                label = classes[int(probs.argmax())]
                confidence, anomaly = float(probs.max()), float(predictions.anomaly[row])
                identity = cell_id(data)
                answers[i] = CellResult(
                    index=i,
                    name=name,
                    cell_id=identity,
                    label=label,
                    probabilities={c: float(p) for c, p in zip(classes, probs)},
                    confidence=confidence,
                    uncertainty=float(entropy[row]),
                    anomaly=anomaly if np.isfinite(anomaly) else None,
                    route=route_cell(confidence, anomaly, label, routing, identity),
                    evals=int(predictions.evals[row]),
                    provisional=bool(provisional[row]),
                )
        return [answer for answer in answers if answer is not None]  # every cell was answered above

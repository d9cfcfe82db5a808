"""The HTTP contract of the classifier service: every request and response body, as pydantic models.

These models are the OpenAPI schema at `/docs`; field descriptions are the API documentation.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from cytoloop.config import SITE_PATTERN

SAMPLE_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$"


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CellImage(_Body):
    name: str | None = Field(None, max_length=256, description="file name or your id for the cell; echoed back")
    image_b64: str = Field(..., description="the image file (BMP, JPEG, PNG or TIFF), base64-encoded")


class ClassifyRequest(_Body):
    """JSON form of a classification request (the multipart form takes `files` plus the same `site`/`sample_id`)."""

    cells: list[CellImage] = Field(..., description="one or more cell images")
    site: str | None = Field(None, pattern=SITE_PATTERN, description="hospital site: selects its adapted model")
    sample_id: str | None = Field(None, pattern=SAMPLE_PATTERN, description="smear/sample the cells come from")


class ModelInfo(_Body):
    name: str
    version: str
    alias: str | None = Field(None, description="registry alias that chose this version (None: a local directory)")
    kind: str | None = Field(None, description="diffusion or baseline (known once a replica loaded it)")
    last_known_good: str | None = Field(
        None,
        description="set when this version serves only as the last known good one, because the version the alias "
        "names cannot be had now: why, in words (the service log has the details)",
    )


class BatchInfo(_Body):
    """Which model call answered a request: requests sharing `replica` and `batch` were classified together."""

    replica: str
    batch: int
    requests: int
    cells: int


class CellAnswer(_Body):
    status: Literal["ok"] = "ok"
    index: int = Field(..., description="position of the cell in the request")
    name: str
    cell_id: str = Field(..., description="hash of the image bytes: the cell's identity in routing and review")
    label: str
    probabilities: dict[str, float] = Field(..., description="calibrated class probabilities (sum to 1)")
    confidence: float = Field(..., description="probability of the predicted class")
    uncertainty: float = Field(..., description="entropy of the probabilities, in nats")
    anomaly: float | None = Field(
        ..., description="anomaly score; its scale is per model version (None: no finite score)"
    )
    route: Literal["accept", "review", "anomaly", "audit"] = Field(
        ...,
        description="accept; review (low confidence); anomaly (anomalous or an always-review class); audit "
        "(a confident cell drawn for a quality check)",
    )
    provisional: bool = Field(
        False,
        description="the cell stopped scoring early once its route was settled (clearly an anomaly, or a close "
        "call for review): the route is final, label and probabilities a provisional guess",
    )
    model: ModelInfo


class CellError(_Body):
    status: Literal["error"] = "error"
    index: int
    name: str
    reason: str = Field(
        ..., description="not_an_image, truncated, too_large, too_many_pixels, empty, blank, bad_base64, bad_name"
    )
    message: str


Cell = Annotated[CellAnswer | CellError, Field(discriminator="status")]


class ClassifyResponse(_Body):
    site: str | None
    sample_id: str | None
    n_cells: int
    n_errors: int
    cells: list[Cell]
    batch: BatchInfo = Field(..., description="the model call that answered")


class DifferentialResponse(_Body):
    sample_id: str
    site: str | None
    triage: Literal["routine", "hematologist"] = Field(..., description="routine unless a flag is raised")
    flags: list[str] = Field(
        ..., description="e.g. 'blasts suspected', 'too few cells', 'many uncertain cells', 'many failed cells'"
    )
    reasons: list[str] = Field(..., description="one sentence per flag, with its numbers")
    n_cells: int
    n_classified: int
    n_failed: int
    counts: dict[str, int]
    percentages: dict[str, float] = Field(..., description="per class, of the classified cells")
    n_review: int
    n_anomaly: int
    n_audit: int
    model: ModelInfo
    cells: list[Cell]


class SiteModel(_Body):
    site: str | None = Field(..., description="None: the global champion, served to every site without its own")
    model: ModelInfo
    classes: list[str] | None = Field(
        None, description="the classes this site's cells are decided among (sites.<site>.classes); None: all"
    )


class ModelsResponse(_Body):
    source: str
    served: list[SiteModel]


class Health(_Body):
    status: Literal["ok", "ready", "not ready"]
    detail: str | None = None
    model_version: str | None = Field(None, description="/readyz: the global model version a replica has loaded")
    last_known_good: str | None = Field(
        None, description="/readyz: set when that version is the last known good one, not the alias's: why"
    )


class ErrorResponse(_Body):
    detail: str

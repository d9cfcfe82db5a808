"""The HTTP ingress (FastAPI on Ray Serve): authenticate, read and check the cells, ask the classifier, answer.

Routes: `POST /v1/classify`, `POST /v1/samples/{sample_id}/differential`, `GET /v1/models`, `GET /healthz`,
`GET /readyz`, and the OpenAPI docs at `/docs`. Request bodies are read by `uploads.py` (limits and per-cell
checks); classification happens in the `Classifier` deployment; the differential is `cytoloop.policy.differential`.
When `serve.api_key` is set, every `/v1` route needs it in the `X-API-Key` header; it is compared in constant time
and never logged or echoed.
"""

# No `from __future__ import annotations` here: FastAPI reads the route signatures at runtime.
import asyncio
import hmac
import logging

from fastapi import FastAPI, HTTPException, Request, Security
from fastapi.security import APIKeyHeader
from pydantic import SecretStr, ValidationError
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle
from starlette.responses import JSONResponse

from cytoloop.config import Settings
from cytoloop.data.records import cell_id
from cytoloop.policy.differential import differential
from cytoloop.serving.inference import CellFailure, CellResult
from cytoloop.serving.model_source import ModelSource
from services.classifier import GLOBAL_KEY, Answer, Refusal, site_key
from services.schemas import (
    CellAnswer,
    CellError,
    ClassifyRequest,
    ClassifyResponse,
    DifferentialResponse,
    ErrorResponse,
    Health,
    ModelInfo,
    ModelsResponse,
    SiteModel,
)
from services.shared_call import SharedCall
from services.uploads import Upload, read_upload, reject_if_nothing_usable

logger = logging.getLogger("ray.serve")

API_KEY_HEADER = "X-API-Key"
_api_key = APIKeyHeader(name=API_KEY_HEADER, auto_error=False, description="required when serve.api_key is set")
_errors = {code: {"model": ErrorResponse} for code in (400, 401, 413, 415, 422, 500, 503)}
# the classifier could not take or finish the request (its replica died mid-request, or too many are queued):
# nothing about the cells was wrong, so the caller may send them again
_UNAVAILABLE = (RayActorError, BackPressureError, DeploymentUnavailableError)
RETRY_AFTER_S = 5


def _inline(schema: dict) -> dict:
    """A JSON schema with its `$defs` references substituted, for use outside the components section."""
    defs = schema.pop("$defs", {})

    def resolve(node):
        if isinstance(node, dict):
            if "$ref" in node:
                return resolve(defs[node["$ref"].rsplit("/", 1)[-1]])
            return {key: resolve(value) for key, value in node.items()}
        if isinstance(node, list):
            return [resolve(item) for item in node]
        return node

    return resolve(schema)


_cells_body = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": _inline(ClassifyRequest.model_json_schema())},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["files"],
                    "properties": {
                        "files": {"type": "array", "items": {"type": "string", "format": "binary"}},
                        "site": {"type": "string"},
                        "sample_id": {"type": "string"},
                    },
                }
            },
        },
    }
}

api = FastAPI(
    title="CytoLoop classifier",
    version="1",
    description="Blood-cell classification with calibrated confidence, anomaly scores and review routing, "
    "per hospital site. See docs/serving.md.",
)


def check_api_key(expected: SecretStr | None, given: str | None) -> None:
    """Raise 401 unless `given` matches `expected` (no key configured: everything passes). Constant time."""
    if expected is None:
        return
    if not given:
        raise HTTPException(
            401,
            f"missing API key: send it in the {API_KEY_HEADER} header",
            headers={"WWW-Authenticate": API_KEY_HEADER},
        )
    if not hmac.compare_digest(given.encode(), expected.get_secret_value().encode()):
        raise HTTPException(401, "invalid API key", headers={"WWW-Authenticate": API_KEY_HEADER})


def model_info(answer: Answer) -> ModelInfo:
    model = answer.model
    return ModelInfo(
        name=model.name, version=model.version, alias=model.alias, kind=answer.kind, last_known_good=answer.fallback
    )


def cell_entries(upload: Upload, answer: Answer) -> list[CellAnswer | CellError]:
    """Every cell of the request at its position: the classifier's answer, or why it was refused."""
    entries: dict[int, CellAnswer | CellError] = {
        index: CellError(index=index, name=error.name, reason=error.reason, message=str(error))
        for index, error in upload.rejected
    }
    model = model_info(answer)
    for (index, _, _), cell in zip(upload.accepted, answer.cells):
        if isinstance(cell, CellFailure):
            entries[index] = CellError(index=index, name=cell.name, reason=cell.reason, message=cell.message)
        else:
            entries[index] = CellAnswer(
                index=index,
                name=cell.name,
                cell_id=cell.cell_id,
                label=cell.label,
                probabilities=cell.probabilities,
                confidence=cell.confidence,
                uncertainty=cell.uncertainty,
                anomaly=cell.anomaly,
                route=cell.route,
                provisional=cell.provisional,
                model=model,
            )
    return [entries[i] for i in sorted(entries)]


def repeated_images(upload: Upload) -> str:
    """Which accepted cells are an earlier one's image (its `cell_id`), as 'cell 7 = cell 2; …' ('' when none)."""
    first: dict[str, int] = {}
    repeats = []
    for index, _, data in upload.accepted:
        key = cell_id(data)
        if key in first:
            repeats.append(f"cell {index} = cell {first[key]}")
        first.setdefault(key, index)
    return "; ".join(repeats)


def last_line(error: BaseException) -> str:
    """The last line of an error's message (a remote error carries the whole traceback), or its type's name
    when the message is empty (`TimeoutError()`)."""
    lines = str(error).strip().splitlines()
    return lines[-1] if lines else type(error).__name__


@serve.deployment(name="Gateway")
@serve.ingress(api)
class Gateway:
    def __init__(self, classifier: DeploymentHandle, settings: Settings):
        self.classifier = classifier
        self.config = settings.serve
        self.differential_config = settings.differential
        self.source = ModelSource(settings.serve, settings.registry, settings.scoring)
        self.settings = settings  # each site's classes, for /v1/models
        self.site_versions = SharedCall(self.source.site_versions)  # one registry read at a time (shared_call.py)

    async def _classify(
        self, request: Request, key: str | None, sample_id: str | None = None, unique: bool = False
    ) -> tuple[Upload, Answer]:
        """Read, check and classify an upload; `sample_id`: the path's, which a body's own must not contradict;
        `unique`: the same image twice is refused (`repeated_images`)."""
        check_api_key(self.config.api_key, key)
        upload = await read_upload(request, self.config)
        if sample_id is not None and upload.sample_id not in (None, sample_id):
            raise HTTPException(422, f"sample_id {upload.sample_id!r} in the body contradicts the path's {sample_id!r}")
        if unique and (repeated := await asyncio.to_thread(repeated_images, upload)):  # hashing: off the loop
            raise HTTPException(422, f"the same image more than once: {repeated} (a smear counts each cell once)")
        reject_if_nothing_usable(upload)
        cells = [(name, data) for _, name, data in upload.accepted]
        site = site_key(upload.site)
        try:
            answer = await self.classifier.options(multiplexed_model_id=site).classify.remote(site, cells)
        except _UNAVAILABLE as error:
            logger.warning("the classifier did not answer a request for site %s: %s", site, last_line(error))
            raise HTTPException(
                503,
                "the classifier stopped or is overloaded before answering these cells; send them again",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            ) from error
        if isinstance(answer, Refusal):
            raise HTTPException(answer.status, answer.detail)
        return upload, answer

    @api.post(
        "/v1/classify",
        response_model=ClassifyResponse,
        responses=_errors,
        openapi_extra=_cells_body,
        summary="Classify cell images",
    )
    async def classify(self, request: Request, key: str | None = Security(_api_key)) -> ClassifyResponse:
        """One or many cells (multipart `files`, or JSON with base64 `cells`), optional `site` and `sample_id`.
        Each cell is answered at its position; a bad image gets an error entry and the others are still answered."""
        upload, answer = await self._classify(request, key)
        cells = cell_entries(upload, answer)
        return ClassifyResponse(
            site=upload.site,
            sample_id=upload.sample_id,
            n_cells=len(cells),
            n_errors=sum(isinstance(c, CellError) for c in cells),
            cells=cells,
            batch=answer.batch,
        )

    @api.post(
        "/v1/samples/{sample_id}/differential",
        response_model=DifferentialResponse,
        responses=_errors,
        openapi_extra=_cells_body,
        summary="Differential count and triage of one smear",
    )
    async def sample_differential(
        self, sample_id: str, request: Request, key: str | None = Security(_api_key)
    ) -> DifferentialResponse:
        """The cells of one smear in; percentages per class, cells needing review, flags such as 'blasts
        suspected', and the triage (routine, or to a hematologist) out. The same image twice is refused: a
        count would take it for two cells (a client's retry resending crops, one crop sent a hundred times)."""
        check_api_key(self.config.api_key, key)  # before anything of the request is looked at
        try:
            ClassifyRequest(cells=[], sample_id=sample_id)  # the path's sample id obeys the same pattern
        except ValidationError:
            raise HTTPException(
                422, f"invalid sample id {sample_id!r}: letters, digits and _ . : - (at most 128)"
            ) from None
        upload, answer = await self._classify(request, key, sample_id, unique=True)
        results: list[CellResult | CellFailure] = list(answer.cells) + [
            CellFailure(i, e.name, e.reason, str(e)) for i, e in upload.rejected
        ]
        count = differential(results, answer.classes, self.differential_config)
        return DifferentialResponse(
            sample_id=sample_id,
            site=upload.site,
            triage=count.triage,
            flags=count.flags,
            reasons=count.reasons,
            n_cells=count.n_cells,
            n_classified=count.n_classified,
            n_failed=count.n_failed,
            counts=count.counts,
            percentages=count.percentages,
            n_review=count.n_review,
            n_anomaly=count.n_anomaly,
            n_audit=count.n_audit,
            model=model_info(answer),
            cells=cell_entries(upload, answer),
        )

    @api.get("/v1/models", response_model=ModelsResponse, responses=_errors, summary="What is served, per site")
    async def models(self, key: str | None = Security(_api_key)) -> ModelsResponse:
        """The global champion and every site with its own alias or classes; any other site is served the global
        champion on all its classes.

        What the aliases name, from the registry, overlaid with what a replica really serves: a site served its
        last known good version says so (`last_known_good`). With the registry unreachable, the replica's view
        alone; 503 only when neither can be had."""
        check_api_key(self.config.api_key, key)
        try:
            named: dict | None = await self.site_versions()
        except Exception as error:
            logger.warning("/v1/models: the registry could not be read: %s", error)
            named = None
        try:
            held = {None if k == GLOBAL_KEY else k: v for k, v in (await self.classifier.served.remote()).items()}
        except Exception as error:
            logger.warning("/v1/models: no replica answered: %s", error)
            held = {}
        if named is None and not held:
            raise HTTPException(503, "cannot read the served models now; the service log says why")
        served = dict(named) if named is not None else {site: ref for site, (ref, _, _) in held.items()}
        if named is not None and None in served:  # a site with classes but no alias: the global champion, restricted
            served |= {site: served[None] for site in self.settings.sites if site not in served}
        entries = []
        for site, ref in served.items():
            fallback = kind = None
            if site in held:
                held_ref, held_fallback, held_kind = held[site]
                if held_fallback is not None:
                    ref, fallback = held_ref, held_fallback
                if (held_ref.name, held_ref.version) == (ref.name, ref.version):  # loaded there: its kind is known
                    kind = held_kind
            info = ModelInfo(name=ref.name, version=ref.version, alias=ref.alias, kind=kind, last_known_good=fallback)
            entries.append(SiteModel(site=site, model=info, classes=self.settings.site_classes(site)))
        return ModelsResponse(source=self.source.describe(), served=entries)

    @api.get("/healthz", response_model=Health, summary="The service process answers")
    async def healthz(self) -> Health:
        return Health(status="ok")

    @api.get("/readyz", response_model=Health, responses={503: {"model": Health}}, summary="A model is loaded")
    async def readyz(self):
        try:
            version, fallback = await self.classifier.ready.remote()
        except Exception as error:  # the details go to the service log, never to whoever asks
            logger.warning(f"/readyz: no model loaded: {last_line(error)}")
            detail = "no model loaded yet; the service log says why"
            return JSONResponse(Health(status="not ready", detail=detail).model_dump(), status_code=503)
        detail = f"global model version {version}" + (f" ({fallback})" if fallback else "")
        return Health(status="ready", detail=detail, model_version=str(version), last_known_good=fallback)

"""The webhook receiver: Label Studio POSTs annotation events here; we keep them and answer at once.

Label Studio waits 1 s for an answer and does not retry. So the request does the minimum that makes the event
durable and sound (check the shared secret, parse the JSON, check the shape of an event carrying labels, one
SQLite insert) and returns; a background thread applies stored events to the label store a moment later.
Whatever still goes missing, the poll (`sync.sync`) catches.
"""

from __future__ import annotations

import hmac
import json
import logging
import threading
from collections.abc import Callable
from contextlib import asynccontextmanager
from typing import Literal

from fastapi import FastAPI, HTTPException
from pydantic import BaseModel, ConfigDict, StrictInt, ValidationError

from cytoloop.errors import describe_validation_error
from labelstudio.bootstrap import SECRET_HEADER
from labelstudio.guard import Guard
from labelstudio.store import LabelStore

logger = logging.getLogger(__name__)


class _Sent(BaseModel):
    """What Label Studio sends holds more than is checked here: the rest is kept as sent."""

    model_config = ConfigDict(extra="allow")


class _Task(_Sent):
    id: StrictInt
    data: dict


class _Annotation(_Sent):
    id: StrictInt  # rows are keyed by it: 1.9 must not pass for annotation 1


class _BulkAnnotation(_Annotation):
    task: StrictInt


class _AnnotationEvent(_Sent):
    annotation: _Annotation
    task: _Task


class _AnnotationsEvent(_Sent):
    annotation: list[_BulkAnnotation]
    task: list[_Task]


class _DeletedEvent(_Sent):
    annotations: list[_Annotation]


# the events that carry labels, checked in the request: one of another shape is refused (422, naming what is
# wrong) instead of being taken and quarantined later, unseen by its sender; other actions are kept unchecked
LABEL_EVENTS: dict[str, type[BaseModel]] = {
    "ANNOTATION_CREATED": _AnnotationEvent,
    "ANNOTATION_UPDATED": _AnnotationEvent,
    "ANNOTATIONS_CREATED": _AnnotationsEvent,
    "ANNOTATIONS_DELETED": _DeletedEvent,
}


class Accepted(BaseModel):
    event: int
    action: str


class Health(BaseModel):
    status: Literal["ok"]
    pending_events: int


def create_app(
    store: LabelStore, secret: str, apply_every_s: float = 0.5, known_server: Callable[[], str | None] | None = None
) -> FastAPI:
    """A FastAPI app with POST /webhook and GET /health; applies stored events every `apply_every_s` seconds.

    `known_server` gives the identity of the Label Studio the loop polls, as last asked (the request never waits
    on Label Studio): an event naming another is refused (403), and every event is refused (503) while it gives
    None (Label Studio not reached yet). The identity comes from the webhook's URL, which the secret does not
    cover: labels filed under a server no poll reconciles would stay votes for good. Label Studio does not retry a
    refused webhook, and none is lost: the poll of the real server catches every label. Without `known_server`
    (a library caller of its own) no identity is checked."""
    stop = threading.Event()

    def apply_loop() -> None:
        failing = None  # the error of the current run of failures, logged once
        while not stop.wait(apply_every_s):
            try:
                store.process_events()
            except Exception as error:  # the database unusable for a while (locked, moved, disk full): retry
                if repr(error) != failing:
                    logger.exception("applying label events failed; retrying every %.1f s", apply_every_s)
                failing = repr(error)
            else:
                if failing is not None:
                    logger.info("applying label events works again")
                failing = None

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        worker = threading.Thread(target=apply_loop, name="apply-label-events", daemon=True)
        worker.start()
        yield
        stop.set()
        worker.join(timeout=5)
        store.process_events()

    # no /docs or /openapi.json: nothing here is for a person to browse, and the guard's login would not cover them
    app = FastAPI(title="CytoLoop label webhook", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(
        Guard,
        allowed=lambda headers: hmac.compare_digest(headers.get(SECRET_HEADER, "").encode(), secret.encode()),
        refusal=f"missing or wrong {SECRET_HEADER} header",
        open_paths=frozenset({"/health"}),
    )

    @app.post("/webhook", response_model=Accepted)
    def receive(request_body: dict, server: str = "") -> Accepted:
        """`server`: the identity of the Label Studio that sent it, part of the URL its webhook was registered
        with (`ReviewLoop.ensure_project`). The secret was checked, and the body's size capped, before the body
        was read (`guard.Guard`)."""
        expected = known_server() if known_server is not None else None
        if known_server is not None and expected is None:
            raise HTTPException(
                503,
                "this receiver has not reached Label Studio yet, so cannot tell whose event this is; the poll "
                "brings its labels",
            )
        if expected is not None and server != expected:
            raise HTTPException(status_code=403, detail=f"events from Label Studio {server!r} are not taken here")
        action = request_body.get("action")
        if not isinstance(action, str):
            raise HTTPException(status_code=422, detail="event has no 'action'")
        if action in LABEL_EVENTS:
            try:
                LABEL_EVENTS[action].model_validate(request_body)
            except ValidationError as error:
                problem = describe_validation_error(error, whole="event")
                logger.warning(f"{action} event refused: {problem}")
                raise HTTPException(status_code=422, detail=f"{action} event: {problem}") from None
        event_id = store.record_event(json.dumps(request_body), server)
        return Accepted(event=event_id, action=action)

    @app.get("/health", response_model=Health)
    def health() -> Health:
        return Health(status="ok", pending_events=store.event_counts()["pending"])

    return app

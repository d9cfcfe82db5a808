"""CytoLoop as a Label Studio ML backend (Settings -> Model in a project): the protocol labs already connect.

Label Studio calls four routes; each is thin over the same library the classifier service uses:

- `GET /health`: up, and which model source answers;
- `POST /setup`: Label Studio connects a project; answers the model version that would serve it;
- `POST /predict`: many tasks per call ("Retrieve predictions", or a new task): each task's cell is classified by
  its site's champion (`serving.live.LiveModel`, the alias `champion-<site>` else `champion`, the same rule as the
  classifier service) and answered as a pre-annotation with the version and the confidence as score. A cell is
  read from the task's `image_path` or its local-files URL, only under `stack.images_root` and within the
  service's image limits; an audit task (no model fields, `labelstudio.tasks`) gets no
  prediction: it must stay blind;
- `POST /webhook`: Label Studio's training events (`START_TRAINING`, and annotation events when "start training
  on annotation submission" is on) start `cytoloop retrain --if-due` in the background and answer at once, so a
  labelling session never waits on training.

Every route asks for HTTP Basic Auth (`review.ml_backend_user`, and `ml_backend_password` or the one generated
into `<home>/secrets.json`), which Label Studio sends when the connection's authentication is "Basic Auth": the
routes read cells and start retraining, for whoever reaches the port otherwise.

Pydantic models at the boundary; a task whose image cannot be read gets an empty result (Label Studio shows no
pre-annotation) and the reason in the service log.
"""

from __future__ import annotations

import base64
import hmac
import logging
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import parse_qs, urlsplit

from fastapi import FastAPI, HTTPException
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError
from starlette.datastructures import Headers

from cytoloop.config import SITE_PATTERN, Settings
from cytoloop.data.intake import Limits, check_image
from cytoloop.errors import describe_validation_error
from cytoloop.serving.inference import CellResult
from cytoloop.serving.live import LiveModel, ServiceCache
from cytoloop.serving.model_source import ModelSource
from labelstudio.guard import Guard
from labelstudio.label_config import prediction_result

logger = logging.getLogger(__name__)
TRAINING_EVENTS = ("START_TRAINING", "ANNOTATION_CREATED", "ANNOTATION_UPDATED")


class PredictRequest(BaseModel):
    tasks: list[dict[str, Any]]
    project: str | None = None
    label_config: str | None = None
    params: dict[str, Any] = Field(default_factory=dict)


class TaskData(BaseModel):
    """What this backend reads of a task's data; the rest is whatever was imported, and ignored. Each task is
    checked on its own: one task of another shape gets no prediction (and a log line), not the whole call a 500,
    and a site is a site name, not any string to keep a model for."""

    model_config = ConfigDict(extra="allow")

    image_path: str | None = None
    image: str | None = None
    # an empty site (a CSV import's empty column) is the global champion's
    site: Annotated[str | None, BeforeValidator(lambda v: None if v == "" else v)] = Field(None, pattern=SITE_PATTERN)
    task_key: str | None = None


class Prediction(BaseModel):
    result: list[dict[str, Any]]
    score: float | None = None
    model_version: str | None = None


class PredictResponse(BaseModel):
    results: list[Prediction]


class SetupRequest(BaseModel):
    project: str | None = None
    schema_: str | None = Field(None, alias="schema")
    model_version: str | None = None


class Health(BaseModel):
    status: str
    model_class: str


class WebhookEvent(BaseModel):
    """A Label Studio webhook event: its action decides; the rest (project, annotation, ...) is not read here."""

    model_config = ConfigDict(extra="allow")

    action: str


class WebhookAnswer(BaseModel):
    action: str
    training_started: bool


def image_file(data: TaskData, images_root: Path | None) -> Path:
    """The cell's file: the task's `image_path`, else its local-files URL resolved under the images root's parent
    (Label Studio's document root, `ops.stack`). Either must lie under the images root: a task's data is whatever
    was imported, so any other file of the host is refused."""
    if images_root is None:
        raise ValueError("stack.images_root is not set: no task image can be read")
    root = Path(images_root).resolve()
    if data.image_path:
        path, given = Path(data.image_path).resolve(), repr(data.image_path)
    else:
        url = data.image or ""
        served = parse_qs(urlsplit(url).query).get("d", [""])[0]
        if not served:
            raise ValueError(f"task has no image_path and no local-files image under the images root: {url!r}")
        path, given = (root.parent / served).resolve(), repr(url)
    if not path.is_relative_to(root):
        raise ValueError(f"{given} points outside the images root")
    return path


def _read_image(path: Path, limits: Limits) -> bytes:
    """A task's image file, refused unless a regular file within the service's own limits (`serve.max_image_bytes`,
    `serve.max_image_pixels`) in a format intake accepts (`intake.check_image`): `/dev/zero` would be read for
    ever, a small file can declare billions of pixels, and some formats run external programs to decode."""
    if not path.is_file():
        raise ValueError(f"{path} is not a regular file")
    if path.stat().st_size > limits.max_bytes:
        raise ValueError(f"{path} is larger than serve.max_image_bytes ({limits.max_bytes})")
    data = path.read_bytes()
    check_image(data, str(path), limits)  # CellRejected (a ValueError) names the file and the reason
    return data


class Backend:
    """The per-site models and the retrain trigger; plain and testable, FastAPI only routes to it."""

    def __init__(
        self,
        settings: Settings,
        retrain_command: list[str] | None = None,
        export: Callable[[], object] | None = None,
    ):
        self.settings = settings
        self.source = ModelSource(settings.serve, settings.registry, settings.scoring)
        self.services = ServiceCache(self.source, settings.routing)
        self._sites: dict[str | None, LiveModel] = {}
        # three locks: one lock over all of it held every prediction, of every site, while one site's model loaded
        # (a download) or a retrain's label export ran
        self._table = threading.Lock()  # `_sites` and `_loading`, held briefly
        self._loading: dict[str | None, threading.Lock] = {}  # a site's first load: its own callers wait for it
        self._retrain = threading.Lock()  # one retrain started at a time
        self.retrain_command, self.export = retrain_command, export
        self.retrains: list[subprocess.Popen] = []

    def site(self, site: str | None) -> LiveModel:
        with self._table:
            live = self._sites.get(site)
            loading = self._loading.setdefault(site, threading.Lock())
        if live is None:
            with loading:
                with self._table:
                    live = self._sites.get(site)
                if live is None:
                    live = LiveModel(site, self.source, self.services, self.settings.site_classes(site))
                    with self._table:
                        self._sites[site] = live
        try:
            live.refresh()  # follow the alias: Label Studio asks rarely, so ask the registry each time
        except Exception as error:  # keep answering with what is loaded
            logger.warning("site %s: alias check failed: %s", site or "*", error)
        return live

    def predict(self, tasks: list[dict[str, Any]]) -> list[Prediction]:
        by_site: dict[str | None, list[int]] = {}
        read: dict[int, TaskData] = {}
        for i, task in enumerate(tasks):
            try:
                data = read[i] = TaskData.model_validate(task.get("data") or {})
            except ValidationError as error:
                logger.warning("task %s: no prediction: %s", task.get("id"), describe_validation_error(error))
                continue
            if data.task_key and "reason" not in (data.model_extra or {}):  # an audit: it must stay blind
                continue
            by_site.setdefault(data.site or None, []).append(i)
        answers = [Prediction(result=[]) for _ in tasks]
        limits = Limits(self.settings.serve.max_image_bytes, self.settings.serve.max_image_pixels)
        for site, members in by_site.items():
            try:
                service = self.site(site).service
            except Exception as error:  # one site's model missing or broken: the other sites' tasks still answered
                logger.warning("site %s: no model to pre-annotate %d tasks: %s", site or "*", len(members), error)
                continue
            cells, rows = [], []
            for i in members:
                try:
                    path = image_file(read[i], self.settings.stack.images_root)
                    cells.append((path.name, _read_image(path, limits)))
                    rows.append(i)
                except (OSError, ValueError) as error:
                    logger.warning("task %s: no prediction: %s", tasks[i].get("id"), error)
            try:
                answered = service.classify(cells) if cells else []
            except Exception as error:  # the model failed on these cells: the other sites' tasks still answered
                logger.warning("site %s: the model failed on %d tasks: %r", site or "*", len(cells), error)
                continue
            for i, cell in zip(rows, answered):
                if isinstance(cell, CellResult):
                    answers[i] = Prediction(
                        result=prediction_result(cell.label), score=cell.confidence, model_version=service.ref.version
                    )
        return answers

    def train(self, action: str) -> bool:
        """For a training event: export the consensus labels and start `cytoloop retrain --if-due` on them in the
        background (the retrain policy decides whether it trains); True if started. One at a time."""
        if action not in TRAINING_EVENTS or self.retrain_command is None:
            return False
        with self._retrain:
            self.retrains = [p for p in self.retrains if p.poll() is None]  # poll() reaps the finished ones
            if self.retrains:  # a second one would find nothing new
                return False
            if self.export is not None:
                try:
                    self.export()
                except Exception as error:  # a 500 to every training event, and no retrain ever started
                    logger.warning("retrain not started: the label export failed: %s", error)
                    return False
            self.retrains.append(subprocess.Popen(self.retrain_command, stdin=subprocess.DEVNULL))
            return True


def retrain_command(labels: Path, config: Path | None = None) -> list[str]:
    """`cytoloop retrain --labels LABELS --if-due` in this interpreter."""
    command = [sys.executable, "-m", "ops.cli", "retrain", "--labels", str(labels), "--if-due"]
    return command + (["--config", str(config)] if config else [])


def basic_login(headers: Headers, user: str, password: str) -> bool:
    """Whether the request's HTTP Basic Auth login is `user` and `password` (compared in constant time)."""
    scheme, _, encoded = headers.get("authorization", "").partition(" ")
    try:
        given = base64.b64decode(encoded, validate=True).decode() if scheme.lower() == "basic" else ":"
    except (ValueError, UnicodeDecodeError):  # binascii.Error is a ValueError
        given = ":"
    name, _, secret = given.partition(":")
    user_ok = hmac.compare_digest(name.encode(), user.encode())
    return hmac.compare_digest(secret.encode(), password.encode()) and user_ok


def create_app(backend: Backend, user: str, password: str) -> FastAPI:
    """The routes, each behind HTTP Basic Auth with `user` and `password`, checked before a request's body is
    read (`guard.Guard`); no /docs or /openapi.json (they were open to anyone)."""
    if not password:
        raise ValueError("the ML backend needs a password (review.ml_backend_password or secrets.json)")
    app = FastAPI(title="CytoLoop ML backend for Label Studio", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(
        Guard,
        allowed=lambda headers: basic_login(headers, user, password),
        refusal="wrong or missing Basic Auth login",
        challenge={"WWW-Authenticate": "Basic"},
    )

    @app.get("/health", response_model=Health)
    def health() -> Health:
        return Health(status="UP", model_class=f"CytoLoop ({backend.source.describe()})")

    @app.post("/setup")
    def setup(request: SetupRequest) -> dict:
        try:
            return {"model_version": backend.site(None).service.ref.version}
        except Exception as error:  # no champion (none yet, or withdrawn): Label Studio shows the reason
            from cytoloop.registry import RegistryError

            logger.warning("no model to connect: %r", error)
            # a registry's error names its address, credentials and all: the log has it, not every caller
            why = "the registry has none now (the service log says why)" if isinstance(error, RegistryError) else error
            raise HTTPException(503, f"no model to connect: {why}") from None

    @app.post("/predict", response_model=PredictResponse)
    def predict(request: PredictRequest) -> PredictResponse:
        return PredictResponse(results=backend.predict(request.tasks))

    @app.post("/webhook", status_code=201, response_model=WebhookAnswer)
    def webhook(event: WebhookEvent) -> WebhookAnswer:
        return WebhookAnswer(action=event.action, training_started=backend.train(event.action))

    return app

"""Batch scoring with Ray Data: a pool of cells in, one prediction per cell out, two ways.

- Through the served classifier (`score_served`): Ray Data reads the pool in batches and a small actor pool posts
  each batch to the classifier service's `/v1/classify`, so a batch job scores with exactly the model version that
  serves the lab (and its replicas batch the requests), and every cell lands in the service's prediction log that
  the drift monitor reads. Rows are matched back to cells by path: Ray Data does not keep row order across batches.
- Offline, from a model directory (`score_offline`, `cytoloop score`): a lab's day of smears without a service.
  Each of `workers` Ray actors loads the model once and classifies its batches with the serving code itself
  (`CellService`: the same preprocessing, route exits and routing as `/v1/classify`), on `threads` torch threads
  (or a GPU each, `gpus`). Rows carry their index, so answers come back in the order of the records. The image
  files must be readable where the actors run (one machine, or a shared file system). With a `journal`
  (score_journal.py) every answer is written down as it arrives, and a stopped run scores only what it lacks.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cytoloop.config import RoutingConfig, ScoringConfig
from cytoloop.data.records import CellRecord, file_cell_id
from cytoloop.errors import UsageError
from cytoloop.models.base import Predictions, class_mask, read_model_meta
from jobs.room import check_room

if TYPE_CHECKING:  # the serving code imports torch: only the scoring actors need it at run time
    from cytoloop.serving.inference import CellResult


logger = logging.getLogger(__name__)

CELL_REFUSALS = (400, 413, 415, 422)  # what a request's cells can cause; 401, 403, 404, 429 and 5xx are the job's
# a replica stopped or the service overloaded (503, "send them again", with Retry-After), too many requests (429),
# a connection refused or dropped: asked again this many times, waiting as the service says (at most BACKOFF_CAP_S),
# before the job ends; one such moment ended a whole served scoring run, losing every batch already answered
RETRIES = 5
BACKOFF_CAP_S = 30.0


class ServedScorer:
    """Ray Data callable class: one HTTP client per actor, one request per batch of cells."""

    def __init__(self, url: str, api_key: str | None = None, timeout_s: float = 600.0):
        import httpx

        headers = {"X-API-Key": api_key} if api_key else {}
        self.client = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout_s)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One request per site of the batch: Ray Data cuts batches by size, not by site, and each site's cells
        must reach that site's champion (a batch straddling two sites used to go to the global model)."""
        paths = [str(p) for p in batch["path"]]
        sites = [str(s) for s in batch["site"]]
        answered: list[tuple[str, dict]] = []
        for site in dict.fromkeys(sites):
            mine, cells = [], []
            for path in (p for p, s in zip(paths, sites) if s == site):
                try:
                    data = Path(path).read_bytes()
                except OSError as error:  # this cell's failure, named in `failed`, not the whole job's
                    answered.append((path, _failure("unreadable", str(error))))
                    continue
                mine.append(path)  # answers come back in the order sent; the name is only echoed, and a path
                # over the service's 256 characters got the whole request refused, then each of its cells
                cells.append({"name": Path(path).name, "image_b64": base64.b64encode(data).decode()})
            if cells:
                answered += self._classify(mine, cells, site)
        out: dict[str, list] = {"path": [], "ok": [], "probabilities": [], "anomaly": [], "version": [], "error": []}
        for path, answer in answered:
            ok = answer["status"] == "ok"
            out["path"].append(path)
            out["ok"].append(ok)
            out["probabilities"].append(answer["probabilities"] if ok else {})
            out["anomaly"].append(answer["anomaly"] if ok and answer["anomaly"] is not None else float("nan"))
            out["version"].append(answer["model"]["version"] if ok else "")
            out["error"].append("" if ok else f"{answer['reason']}: {answer['message']}")
        return {key: np.array(values, dtype=object) for key, values in out.items()}

    def _classify(self, paths: list[str], cells: list[dict], site: str) -> list[tuple[str, dict]]:
        """Each cell's answer. A request refused whole for what is in it (no cell decodes, too large a body or too
        many cells: 400, 413, 415, 422) is asked again cell by cell, so a cell's own refusal becomes its named
        failure and the others are answered; a passing one (503, 429, a dropped connection) is asked again
        (`_post`); any other refusal (a wrong key or URL) ends the job."""
        response = self._post({"cells": cells, "site": site or None})
        if response.status_code == 200:
            return list(zip(paths, classify_answers(response, len(cells)), strict=True))
        if response.status_code in CELL_REFUSALS:
            if len(cells) == 1:
                return [(paths[0], _failure(f"HTTP {response.status_code}", _detail(response)))]
            return [answer for path, cell in zip(paths, cells) for answer in self._classify([path], [cell], site)]
        raise RuntimeError(f"the classifier answered HTTP {response.status_code}: {response.text[:300]}")

    def _post(self, body: dict):
        """POST /v1/classify, asked again after a passing refusal (see RETRIES); the last answer, or the last
        connection error raised, once the tries are spent."""
        import httpx

        for attempt in range(RETRIES + 1):
            try:
                response = self.client.post("/v1/classify", json=body)
            except (httpx.NetworkError, httpx.ConnectTimeout, httpx.RemoteProtocolError) as error:  # refused,
                # reset or dropped, sending or awaiting the answer (scoring again is harmless); not a read timeout:
                # a hung replica would hold the batch for RETRIES x the timeout, sent again to an overloaded service
                if attempt == RETRIES:
                    raise
                wait, why = 2.0**attempt, f"{type(error).__name__}: {error}"
            else:
                if response.status_code not in (429, 503) or attempt == RETRIES:
                    return response
                wait, why = _retry_after(response, 2.0**attempt), f"HTTP {response.status_code}: {_detail(response)}"
            wait = min(wait, BACKOFF_CAP_S)
            logger.warning(f"the classifier: {why}; asking again in {wait:g} s ({attempt + 1} of {RETRIES})")
            time.sleep(wait)
        raise AssertionError("unreachable")  # the loop returns or raises on its last attempt


def classify_answers(response, sent: int) -> list[dict]:
    """The cells of a 200 answer to `sent` cells, read by the service's own contract (`ClassifyResponse`): a body of
    another shape (a wrong `serve_url` answering with a page, a proxy's own 200) ended the job with a KeyError or a
    JSONDecodeError naming nothing, and an answer of fewer cells would have paired answers with the wrong cells."""
    from pydantic import ValidationError

    from services.schemas import ClassifyResponse

    try:
        parsed = ClassifyResponse.model_validate_json(response.content)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "the body"
        raise RuntimeError(
            f"{response.url} answered 200 with no classify answer ({where}: {first['msg']}): is it the classifier "
            "service's address?"
        ) from None
    if len(parsed.cells) != sent:
        raise RuntimeError(f"{response.url} answered {len(parsed.cells)} cells to a request of {sent}")
    return [cell.model_dump() for cell in parsed.cells]


def _same_image(path: str, answered: str) -> bool:
    """Whether the file at `path` still holds the image an answer (its content id `answered`) was of. A file this
    machine cannot read (a driver without the workers' image mount) is taken to: the workers read it, not this."""
    try:
        return file_cell_id(Path(path)) == answered
    except OSError:
        return True


def _retry_after(response, default: float) -> float:
    """The seconds a response's Retry-After asks for (a number of seconds; a date is taken as `default`)."""
    try:
        return max(0.0, float(response.headers.get("retry-after", default)))
    except ValueError:
        return default


def _failure(reason: str, message: str) -> dict:
    """A cell the scorer could not have answered, in the shape of the service's per-cell error entry."""
    return {"status": "error", "reason": reason, "message": message}


def _detail(response) -> str:
    try:
        return str(response.json().get("detail", ""))[:300]
    except ValueError:
        return response.text[:300]


@dataclass
class PoolScores:
    """Predictions for the cells that were scored, in the order of `records`; `failed` names the others."""

    records: list[CellRecord]
    predictions: Predictions
    versions: list[str]
    failed: dict[str, str]


def score_served(
    records: Sequence[CellRecord],
    url: str,
    classes: Sequence[str],
    api_key: str | None = None,
    batch_size: int = 32,
    concurrency: int = 1,
    site_of=lambda record: record.domain,
) -> PoolScores:
    """Score `records` through the service at `url` with Ray Data (joins the running Ray cluster).

    Probabilities are put in the order of `classes` (the model's). A cell the service rejects (say, a corrupt
    image) is left out of the predictions and named in `failed` with the reason; the others are scored.
    """
    import ray

    if not records:
        return PoolScores([], Predictions(np.zeros((0, len(classes))), np.zeros(0), np.zeros(0)), [], {})
    rows = [{"path": str(Path(r.path).resolve()), "site": site_of(r)} for r in records]
    rows.sort(key=lambda row: row["site"])  # fewer requests: most batches hold one site
    dataset = ray.data.from_items(rows).map_batches(
        ServedScorer,
        fn_constructor_kwargs={"url": url, "api_key": api_key},
        batch_size=batch_size,
        compute=ray.data.ActorPoolStrategy(size=concurrency),
        num_cpus=0.1,  # it waits on HTTP; the classifier replicas do the work
    )
    by_path = {row["path"]: row for row in dataset.take_all()}
    kept, probs, anomaly, versions, failed = [], [], [], [], {}
    for record in records:
        row = by_path[str(Path(record.path).resolve())]
        if not row["ok"]:
            failed[str(record.path)] = row["error"]
            continue
        missing = set(classes) - set(row["probabilities"])
        if missing:
            raise UsageError(
                f"the served model does not know {sorted(missing)}: it answers {sorted(row['probabilities'])}"
            )
        kept.append(record)
        probs.append([row["probabilities"][c] for c in classes])
        anomaly.append(row["anomaly"])
        versions.append(row["version"])
    predictions = Predictions(
        np.array(probs, dtype=float).reshape(-1, len(classes)), np.array(anomaly, float), np.zeros(len(kept))
    )
    return PoolScores(kept, predictions, versions, failed)


class ModelScorer:
    """Ray Data callable class for offline scoring: the model is loaded once per actor (never in a module global)
    and each batch is answered by `CellService.classify`, exactly as the classifier service answers a request."""

    def __init__(
        self,
        model_dir: str,
        routing: dict,
        threads: int | None,
        runtime: ScoringConfig | None = None,
        allowed: list[str] | None = None,
        version: str | None = None,
    ):
        """`version`: the directory's version (`local_ref`) when the run began; a worker that loads other contents
        (a model saved over it meanwhile, a worker Ray restarted later) raises ModelLoadError."""
        import torch

        from cytoloop.models.base import ModelLoadError
        from cytoloop.models.loading import load_model
        from cytoloop.serving.inference import CellService
        from cytoloop.serving.model_source import local_ref

        if threads:
            torch.set_num_threads(threads)
        directory = Path(model_dir)
        model = load_model(directory, runtime)
        ref = local_ref(directory)  # after loading: what was loaded is what the run records (`score_offline`)
        if version is not None and ref.version != version:
            raise ModelLoadError(
                f"{directory} changed since this scoring run began (as {version}, now {ref.version}): its answers "
                "would be recorded under a version they are not of; run it again"
            )
        self.service = CellService(model, ref, RoutingConfig(**routing), allowed)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from cytoloop.serving.inference import CellFailure, CellResult

        index = [int(i) for i in batch["index"]]
        paths = [str(p) for p in batch["path"]]
        cells, unreadable = [], {}
        for i, path in zip(index, paths):
            try:
                cells.append((i, path, Path(path).read_bytes()))
            except OSError as error:
                unreadable[i] = f"{path}: cannot be read ({error.strerror or error})"
        answers = self.service.classify([(path, data) for _, path, data in cells])
        out: dict[str, list] = {"index": [], "result": [], "error": [], "unreadable": []}
        for (i, _, _), answer in zip(cells, answers):  # classify answers entry k for cells[k]
            out["index"].append(i)
            out["result"].append(replace(answer, index=i) if isinstance(answer, CellResult) else None)
            out["error"].append(answer.message if isinstance(answer, CellFailure) else "")
            out["unreadable"].append(False)
        for i, message in unreadable.items():
            out["index"].append(i)
            out["result"].append(None)
            out["error"].append(message)
            out["unreadable"].append(True)
        return {key: np.array(values, dtype=object) for key, values in out.items()}


@dataclass
class OfflineScores:
    """One answer per record, in the order of the records: `results[i]` answers `records[i]`, or is None when the
    cell could not be scored and `failed[str(records[i].path)]` says why. `version` names the model directory's
    content (as serving it would); `seconds` is the wall time of the scoring alone (actors started to last row)."""

    records: list[CellRecord]
    results: list[CellResult | None]
    failed: dict[str, str]
    version: str
    seconds: float
    resumed: int = 0  # answers taken from the journal of an earlier, stopped run (not scored again)
    # of `failed`, the cells whose files could not be read (a mount missing on a worker, a permission): another run
    # may score them, unlike an image refused for what it holds
    unreadable: frozenset[str] = frozenset()

    @property
    def scored(self) -> list[CellResult]:
        return [result for result in self.results if result is not None]


def score_offline(
    records: Sequence[CellRecord],
    model_dir: Path,
    routing: RoutingConfig,
    workers: int = 1,
    threads: int | None = None,
    gpus: float = 0.0,
    batch_size: int = 64,
    runtime: ScoringConfig | None = None,
    allowed: list[str] | None = None,
    journal: Path | None = None,
    progress: bool = False,
    finish: Callable[[OfflineScores], None] | None = None,
) -> OfflineScores:
    """Classify `records` with the model in `model_dir` on `workers` Ray actors (joins the running Ray cluster,
    or starts a local one when there is none). `threads`: torch threads per actor (None: torch's default);
    `gpus`: GPUs per actor (0 on a CPU machine); `runtime`: how the model runs on the workers (`load_model`);
    `allowed`: the classes every cell is decided among (a site's, as it is served; None: all the model's). A
    cell whose file is missing or not an image is named in `failed` with the reason; every other cell is scored.
    `journal`: a file each answer is written to as it arrives (`score_journal.py`); given the journal of a
    stopped run of the same model and settings, only the cells it does not answer are scored. `progress`: a
    progress bar on stderr. `finish`: called with the scores while the journal is still held (its lock), so a
    caller that writes the scores out and then removes the journal does both before another run may take it."""
    import ray
    from tqdm.auto import tqdm

    from cytoloop.serving.model_source import local_ref
    from jobs.score_journal import ScoreJournal

    if workers < 1 or batch_size < 1:
        raise UsageError(f"workers and batch_size must be at least 1 (got {workers} and {batch_size})")
    if threads is not None and threads < 1:
        raise UsageError(f"threads must be at least 1 (got {threads})")
    version = local_ref(Path(model_dir)).version  # a clear error here, before any actor starts
    class_mask(read_model_meta(Path(model_dir))["classes"], allowed)  # so is a class the model lacks
    setup = {
        "version": version,
        "routing": routing.model_dump(mode="json"),
        "allowed": allowed,
        # what the settings set, as `load_model` applies only those: a default recorded as if chosen would pass
        # a bf16 model's answers off as fp32 ones
        "runtime": None if runtime is None else runtime.model_dump(mode="json", exclude_unset=True),
    }
    if gpus:  # on a GPU (device `auto` takes it): another device's numbers, whose close calls may go another way
        setup["gpus"] = True
    paths = [str(Path(r.path).resolve()) for r in records]
    results: list[CellResult | None] = [None] * len(records)
    failed: dict[str, str] = {}
    unreadable: set[str] = set()
    with ScoreJournal(journal, setup) if journal is not None else contextlib.nullcontext() as written:
        if not records:
            scores = OfflineScores([], [], {}, version, 0.0)
            if finish is not None:
                finish(scores)
            return scores
        if not ray.is_initialized():
            ray.init(include_dashboard=False, log_to_driver=False)
        if written is not None:
            # an answer counts for the image now at its path only: a journal of these settings left by a run of
            # days ago (set aside, then taken back) answered today's cells of the same file names with its own
            kept = {p: a for p, a in written.answers.items() if _same_image(p, a.cell_id)}
            if len(kept) < len(written.answers):
                logger.warning(
                    f"{len(written.answers) - len(kept)} answers of {journal} are of images no longer at their paths "
                    "(replaced since): scored again"
                )
            results = [None if p not in kept else replace(kept[p], index=i) for i, p in enumerate(paths)]
        todo = [(i, paths[i]) for i, result in enumerate(results) if result is None]
        if todo:  # a journal that answers every cell needs no actor
            cpus = threads or 1
            room = check_room(
                workers,
                cpus,
                gpus,
                together=False,
                asked=f"{workers} workers of {cpus:g} CPU(s) and {gpus:g} GPU(s) each",
                fewer="ask for fewer workers or threads",
                smaller="with fewer threads per worker" if cpus > 1 else "",
            )
            if room < workers:
                logger.warning(
                    f"about {room} of {workers} workers fit what the Ray cluster has free now; scoring starts on those"
                )
        resumed = len(records) - len(todo)
        if resumed:
            logger.info(f"{resumed} of {len(records)} cells answered by the stopped run of {journal}: not scored again")
        began = time.perf_counter()
        rows = _score_rows(todo, model_dir, routing, workers, threads, gpus, batch_size, runtime, allowed, version)
        with tqdm(total=len(records), initial=resumed, desc="scoring", unit="cell", disable=not progress) as bar:
            try:
                for i, result, error, not_read in rows:
                    if result is None:
                        failed[str(records[i].path)] = error
                        if not_read:
                            unreadable.add(str(records[i].path))
                    else:
                        results[i] = result
                        if written is not None:
                            written.write(paths[i], result)
                    bar.update()
            except ray.exceptions.RayError:
                check_unchanged(Path(model_dir), version)  # a worker's refusal of it comes as Ray's actor error
                raise
        seconds = time.perf_counter() - began
        scores = OfflineScores(list(records), results, failed, version, seconds, resumed, frozenset(unreadable))
        if finish is not None:
            finish(scores)
    return scores


def check_unchanged(model_dir: Path, version: str) -> None:
    """Raise ModelLoadError when `model_dir` no longer holds the model `version` names: a worker that found it
    changed (`ModelScorer`) ends the run with Ray's actor error, a traceback that never names the model; said so."""
    from cytoloop.models.base import ModelLoadError
    from cytoloop.serving.model_source import local_ref

    now = local_ref(model_dir).version
    if now != version:
        raise ModelLoadError(
            f"{model_dir} changed during this scoring run (as {version}, now {now}): its answers would be recorded "
            "under a version they are not of; run it again"
        )


def _score_rows(
    rows: list[tuple[int, str]],
    model_dir: Path,
    routing: RoutingConfig,
    workers: int,
    threads: int | None,
    gpus: float,
    batch_size: int,
    runtime: ScoringConfig | None,
    allowed: list[str] | None,
    version: str,
) -> Iterator[tuple[int, CellResult | None, str, bool]]:
    """(record index, answer or None, error, whether its file could not be read) for each (record index, resolved
    path), as Ray Data yields them; every worker scores with the model `version` names (`ModelScorer`)."""
    import ray

    if not rows:
        return
    dataset = ray.data.from_items([{"index": i, "path": path} for i, path in rows]).map_batches(
        ModelScorer,
        fn_constructor_kwargs={
            "model_dir": str(Path(model_dir).resolve()),
            "routing": routing.model_dump(mode="json"),
            "threads": threads,
            "runtime": runtime,
            "allowed": allowed,
            "version": version,
        },
        batch_size=batch_size,
        compute=ray.data.ActorPoolStrategy(size=workers),
        num_cpus=threads or 1,
        num_gpus=gpus,
    )
    for row in dataset.iter_rows():
        yield int(row["index"]), row["result"], str(row["error"]), bool(row["unreadable"])


def write_scores_csv(scores: OfflineScores, path: Path) -> Path:
    """One row per record, in the records' order: the answer's fields and one `p_<class>` column per class, or
    the reason in `error` for a cell that could not be scored (so no record silently drops out)."""
    import csv

    from cytoloop.files import replaced

    classes = list(scores.scored[0].probabilities) if scores.scored else []
    fields = ["path", "cell_id", "label", "confidence", "uncertainty", "anomaly", "route", "evals", "provisional"]
    with replaced(path, newline="") as handle:  # whole or not at all: a failure keeps the earlier file
        writer = csv.writer(handle)
        writer.writerow([*fields, *(f"p_{c}" for c in classes), "version", "error"])
        for record, result in zip(scores.records, scores.results):
            if result is None:
                writer.writerow(
                    [
                        record.path,
                        *[""] * (len(fields) - 1 + len(classes)),
                        scores.version,
                        scores.failed[str(record.path)],
                    ]
                )
                continue
            values = [getattr(result, f) for f in fields[1:]]
            writer.writerow(
                [
                    record.path,
                    *("" if v is None else v for v in values),
                    *(f"{result.probabilities[c]:.6f}" for c in classes),
                    scores.version,
                    "",
                ]
            )
    return path

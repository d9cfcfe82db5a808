"""The whole active-learning cycle on real cells, for `cytoloop demo`: what a lab sees CytoLoop do first.

    stack up (Label Studio, label receiver, MLflow, Ray)            once
    seed model on a few labels per class -> registry @champion      once
    Ray Serve serves @champion                                      once, then follows the alias
    per round:
      score the pool (Ray Data -> the served classifier)
      route uncertain / anomalous cells -> Label Studio tasks with the model's pre-annotation
      simulated annotators (distinct Label Studio users) answer through the API
      sync labels back (webhooks + poll) -> consensus -> training manifest
      fine-tune on Ray Train -> register in MLflow -> gate -> promote (or record the refusal)
      wait until Serve answers with the champion -> score the held-out test cells through it

Every arrow is the production code path (`labelstudio.loop.ReviewLoop`, `jobs.finetune.run_finetune`,
`services.app`); only the hematologists are simulated. The cells are split once: a held-out test set that draws
the learning curve, the frozen validation and evaluation sets every fine-tune calibrates and is gated on (none
of these is ever routed or trained on), the seed labels, and the pool the loop labels from.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cytoloop.config import DemoConfig, Settings
from cytoloop.data.records import CellRecord, DatasetError, read_manifest, select
from cytoloop.models.finetune import freeze, frozen_directory

if TYPE_CHECKING:
    from labelstudio.loop import ReviewLoop

logger = logging.getLogger(__name__)

DEMO_DIR = "demo"


@dataclass(frozen=True)
class DemoSplit:
    test: list[CellRecord]  # draws the learning curve
    val: list[CellRecord]  # frozen: every fine-tune recalibrates on these
    eval: list[CellRecord]  # frozen: the promotion gate judges versions on these
    seed: list[CellRecord]
    pool: list[CellRecord]


def split_for_demo(records: Sequence[CellRecord], config: DemoConfig) -> DemoSplit:
    """Per class (seeded): `test_fraction` of the cells held out, `seed_per_class` labelled, the rest the pool.

    The held-out cells are cut in three: the learning curve's test cells, and the frozen validation and evaluation
    sets of the fine-tuning job (in a lab: the first audited labels). Left to itself, the first fine-tune would
    cut those from the first round's few labels, and a temperature fitted, or a gate judged, on ten cells is
    noise; judging versions on the curve's own cells would report the luck of the version picked. A class with too
    few cells for three held-out cells, its seed labels and one pool cell is an error naming it."""
    by_class: dict[str, list[CellRecord]] = defaultdict(list)
    for record in records:
        if record.label is not None:
            by_class[record.label].append(record)
    rng = random.Random(config.seed)
    parts: dict[str, list[CellRecord]] = {name: [] for name in ("test", "val", "eval", "seed", "pool")}
    for label in sorted(by_class):
        cells = sorted(by_class[label], key=lambda r: r.cell_id)
        rng.shuffle(cells)
        held = max(3, round(config.test_fraction * len(cells)))
        if len(cells) < held + config.seed_per_class + 1:
            raise DatasetError(
                f"class {label!r} has {len(cells)} cells: too few for {held} held out, "
                f"{config.seed_per_class} seed (demo.seed_per_class) and one pool cell"
            )
        thirds = [held * k // 3 for k in range(4)]
        for name, start, end in zip(("test", "val", "eval"), thirds, thirds[1:]):
            parts[name] += cells[start:end]
        parts["seed"] += cells[held : held + config.seed_per_class]
        parts["pool"] += cells[held + config.seed_per_class :]
    return DemoSplit(**parts)


@dataclass
class RoundResult:
    """One row of the per-round table (round 0 is the seed model)."""

    round: int
    labels: int  # labelled cells the round's model could train on (seed + consensus)
    scored: int = 0
    routed: dict[str, int] = field(default_factory=dict)
    sent: int = 0
    annotations: int = 0
    consensus: int = 0
    version: str = ""
    gate: str = ""
    gate_reasons: list[str] = field(default_factory=list)
    served: str = ""
    balanced_accuracy: float = float("nan")
    ece: float = float("nan")
    drift: dict[str, float | None] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def routed_fraction(self) -> float:
        total = sum(self.routed.values())
        return (total - self.routed.get("accept", 0)) / total if total else float("nan")


@dataclass
class LoopState:
    """What the set-up stages produced and every round reads: passed explicitly, never set as attributes in an
    order the stages must keep. `champion` moves when a round's version is promoted."""

    review: ReviewLoop  # the Label Studio side (projects, outbox, label store)
    classes: list[str]
    champion: str  # the registry version @champion points at
    serve_url: str
    api_key: str | None
    annotators: list = field(default_factory=list)  # labelstudio.annotators.SimulatedAnnotator


@dataclass
class DemoOutcome:
    rounds: list[RoundResult]
    report: Path
    urls: dict[str, str]


class Demo:
    """One run of the cycle. `settings` are used as given except for what the demo must own (see `_demo_settings`)."""

    def __init__(self, settings: Settings, data: Path):
        self.data = Path(data)
        self.settings = _demo_settings(settings, self.data)
        self.config = self.settings.demo
        self.dir = Path(self.settings.home).resolve() / DEMO_DIR
        self.rounds: list[RoundResult] = []
        self.test_predictions: list[tuple[np.ndarray, np.ndarray]] = []  # per round: probs, true labels
        self.round_start: datetime | None = None  # Serve's predictions since then make the round's drift window

    # -- the run ---------------------------------------------------------------------------------------------------
    def run(self) -> DemoOutcome:
        from cytoloop.data.records import load_records

        self.dir.mkdir(parents=True, exist_ok=True)
        records = select(load_records(self.data), domains=self.config.domains, classes=self.config.classes)
        split = split_for_demo(records, self.config)
        self.truth = {str(Path(r.path).resolve()): r.label for r in records}  # what the simulated annotators know
        logger.info(
            f"data: {len(records)} labelled cells from {self.data}: held out {len(split.test)} for the "
            f"learning curve, {len(split.val)} to calibrate and {len(split.eval)} to gate each fine-tuned "
            f"version; {len(split.seed)} seed labels, {len(split.pool)} in the pool"
        )
        if not freeze(frozen_directory(self.settings.home, None), split.val, split.eval):
            logger.info(
                f"   (the frozen sets under {frozen_directory(self.settings.home, None)} are kept from an earlier run)"
            )
        with self.stage("stack up"):
            review = self._stack_up()
        with self.stage("seed model"):
            classes, champion = self._seed_model(split)
        with self.stage("serve"):
            serve_url, api_key = self._serve(champion)
        with self.stage("annotator accounts"):
            state = LoopState(review, classes, champion, serve_url, api_key, self._annotators())
        seed_row = RoundResult(0, len(split.seed), version=champion, gate="seed (manual)", served=champion)
        with self.stage("evaluate", seed_row):
            self._evaluate(state, split.test, seed_row)
        self._finish_round(seed_row)
        labelled = list(split.seed)
        for number in range(1, self.config.rounds + 1):
            labelled = self._round(state, number, split, labelled)
        report = self._write_report(state.classes)
        urls = self.urls(state)
        for name, url in urls.items():
            logger.info(f"{name}: {url}")
        logger.info(f"report: {report}")
        return DemoOutcome(self.rounds, report, urls)

    def _round(self, state: LoopState, number: int, split: DemoSplit, labelled: list[CellRecord]) -> list[CellRecord]:
        from jobs.finetune import run_finetune
        from jobs.score import score_served

        row = RoundResult(number, len(labelled))
        self.round_start = datetime.now(UTC)
        known = {str(Path(r.path).resolve()) for r in labelled}
        pool = [r for r in split.pool if str(Path(r.path).resolve()) not in known]
        if self.config.pool_limit is not None:
            pool = random.Random(self.config.seed + number).sample(pool, min(len(pool), self.config.pool_limit))
        with self.stage(f"round {number}: score pool", row, "score"):
            scores = score_served(pool, state.serve_url, state.classes, state.api_key)
            for path, reason in scores.failed.items():
                logger.info(f"  not scored: {path}: {reason}")
            row.scored = len(scores.records)
        with self.stage(f"round {number}: route to Label Studio", row, "route"):
            routed = state.review.route(
                scores.records, scores.predictions, state.classes, state.champion, budget=self.config.budget
            )
            if routed.push is not None and routed.push.error:
                raise RuntimeError(f"Label Studio did not take the tasks: {routed.push.error}")
            row.routed, row.sent = routed.reasons, routed.queued
        with self.stage(f"round {number}: annotate", row, "annotate"):
            projects = list(state.review.projects().values())
            row.annotations = sum(a.label_open_tasks(projects, self.truth) for a in state.annotators)
        with self.stage(f"round {number}: sync labels", row, "sync"):
            state.review.sync()
            export = state.review.export(self.dir / "labels.csv")
            consensus = read_manifest(Path(export["path"])) if export["exported"] else []
            row.consensus = len(consensus)
        labelled = _merge(split.seed, consensus)
        row.labels = len(labelled)
        with self.stage(f"round {number}: fine-tune on Ray Train, gate", row, "finetune"):
            outcome = run_finetune(self.settings, labelled, who="cytoloop demo")
            row.version = outcome.version.version
            row.gate = "promoted" if outcome.passed else f"refused ({', '.join(outcome.worse)} worse)"
            row.gate_reasons = outcome.reasons
        if outcome.passed:
            state.champion = row.version
        with self.stage(f"round {number}: Serve switches", row, "serve"):
            row.served = self._wait_served(state.serve_url, state.champion)
        with self.stage(f"round {number}: evaluate", row, "evaluate"):
            self._evaluate(state, split.test, row)
        self._finish_round(row)
        return labelled

    # -- stages ----------------------------------------------------------------------------------------------------
    @contextmanager
    def stage(self, name: str, row: RoundResult | None = None, key: str | None = None) -> Iterator[None]:
        """One progress line per stage, with its duration (kept in the round's row)."""
        logger.info(f"-> {name} ...")
        start = time.monotonic()
        yield
        seconds = time.monotonic() - start
        if row is not None:
            row.seconds[key or name] = round(seconds, 1)
        logger.info(f"   {name}: done in {seconds:.1f} s")

    def _stack_up(self) -> ReviewLoop:
        """Start the services, join the stack's Ray, and return the review loop over its Label Studio."""
        import ray
        from ray.data import DataContext

        from labelstudio.loop import ReviewLoop
        from ops.stack import Stack

        statuses = Stack(self.settings).up()
        down = [s.name for s in statuses if s.state not in ("up", "disabled")]
        if down:
            raise RuntimeError(f"services not up: {', '.join(down)} (see `cytoloop stack status`)")
        stack = self.settings.stack
        if not ray.is_initialized():
            ray.init(address=f"{stack.ray_host}:{stack.ray_port}", log_to_driver=False)
        # the demo prints one line per stage; Ray Data's own progress lines every few seconds would bury them
        DataContext.get_current().enable_progress_bars = False
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        return ReviewLoop(self.settings)

    def _seed_model(self, split: DemoSplit) -> tuple[list[str], str]:
        """Train, calibrate and register the seed model as @champion; returns its classes and version."""
        from cytoloop.models.finetune import code_revision, recalibrate
        from cytoloop.registry import CHAMPION, open_registry
        from cytoloop.workflows import train_model

        out = self.dir / "seed-model"
        model, _ = train_model(
            self.config.model,
            split.seed,
            self.settings,
            out,
            unlabeled=split.pool,
            split_seed=self.config.seed,
            progress=True,
        )
        # calibrated like every later version, on the frozen validation cells: its own split of a few seed labels
        # leaves a handful of validation cells, on which a fitted temperature is noise
        recalibrate(model, split.val)
        model.save(out)
        registry, name = open_registry(self.settings), self.settings.registry.model_name
        version = registry.log_model(
            out,
            name,
            tags={
                "kind": model.kind,
                "site": "global",
                "job": "demo-seed",
                "code_revision": code_revision(),
                "label_count": str(len(split.seed)),
            },
        )
        registry.move_alias(name, CHAMPION, version.version, why="cytoloop demo: seed model", who="cytoloop demo")
        return list(model.classes), version.version

    def _serve(self, champion: str) -> tuple[str, str | None]:
        """Run the classifier on Ray Serve; returns its URL and API key once it answers with `champion`."""
        from ray import serve

        from services.app import build_app

        config = self.settings.serve
        serve.start(http_options={"host": config.host, "port": config.port})
        serve.run(build_app(self.settings), name=config.app_name, route_prefix="/", blocking=False)
        url = f"http://{config.host}:{config.port}"
        self._wait_served(url, champion)
        return url, config.api_key.get_secret_value() if config.api_key else None

    def _wait_served(self, serve_url: str, version: str) -> str:
        """Block until the service answers with `version` for the global champion; returns the served version."""
        import httpx

        deadline = time.monotonic() + self.config.serve_switch_timeout_s
        served = ""
        while time.monotonic() < deadline:
            try:  # /readyz names the version a replica has loaded (/v1/models says what the registry names)
                ready = httpx.get(f"{serve_url}/readyz", timeout=10.0)
                if ready.status_code == 200:
                    served = ready.json()["model_version"]
                    if served == version:
                        return served
            except httpx.HTTPError:
                pass
            time.sleep(1.0)
        raise TimeoutError(
            f"Serve still answers with version {served or '(none)'} after "
            f"{self.config.serve_switch_timeout_s:.0f} s; expected {version} (demo.serve_switch_timeout_s)"
        )

    def _annotators(self) -> list:
        from labelstudio.annotators import SimulatedAnnotator
        from labelstudio.client import invite_url
        from ops.stack import label_studio_url, stack_secrets

        url = label_studio_url(self.settings)
        invite = invite_url(url, stack_secrets(self.settings)["admin_token"])  # sign-up is closed without it
        return [
            SimulatedAnnotator.sign_up(
                url,
                f"annotator{i + 1}@cytoloop.demo",
                f"demo-annotator-{i + 1}",
                self.config.error_rate,
                self.config.seed,
                invite,
            )
            for i in range(self.config.annotators)
        ]

    def _evaluate(self, state: LoopState, test: list[CellRecord], row: RoundResult) -> None:
        """Score the held-out cells through Serve (what the lab gets now) and draw the round's drift figures."""
        from cytoloop.evaluation import metrics
        from jobs.score import score_served

        start = self.round_start or datetime.now(UTC)
        scores = score_served(test, state.serve_url, state.classes, state.api_key)
        truth = np.array([state.classes.index(r.label) for r in scores.records])
        probs = scores.predictions.probs
        row.balanced_accuracy = metrics.balanced_accuracy(truth, probs.argmax(axis=1), len(state.classes))
        row.ece = metrics.expected_calibration_error(probs, truth)
        self.test_predictions.append((probs, truth))
        row.drift = self._drift(start, row.served or state.champion)

    def _drift(self, since: datetime, version: str) -> dict[str, float | None]:
        """Drift figures of the cells Serve classified this round (pool and test), logged to MLflow."""
        from cytoloop.policy.drift import WindowFigures, log_windows, read_colour_reference, read_events, window_figures
        from cytoloop.registry import open_registry

        log = self.settings.serve.prediction_log
        events = (
            [e for e in read_events(log) if e.time >= since and e.model_version == version]
            if log is not None and Path(log).is_file()
            else []
        )
        if not events:
            return {}
        name = self.settings.registry.model_name
        reference = read_colour_reference(Path(self.settings.registry.cache_dir).resolve() / name / version)
        figures = window_figures(events, reference, self.settings.drift)
        log_windows(open_registry(self.settings), name, [WindowFigures(version, None, since, len(events), figures, [])])
        return {k: figures.get(k) for k in ("mean_confidence", "review_fraction", "psi_max")}

    def _finish_round(self, row: RoundResult) -> None:
        self.rounds.append(row)
        (self.dir / "rounds.json").write_text(json.dumps([asdict(r) for r in self.rounds], indent=1, default=str))
        logger.info(round_table(self.rounds))

    # -- the end ---------------------------------------------------------------------------------------------------
    def urls(self, state: LoopState) -> dict[str, str]:
        from cytoloop.registry import open_registry
        from ops.stack import label_studio_url

        stack = self.settings.stack
        urls = {
            f"Label Studio project ({site})": f"{label_studio_url(self.settings)}/projects/{pid}"
            for site, pid in sorted(state.review.projects().items())
        }
        experiment = open_registry(self.settings).experiment_id()
        if stack.mlflow_server:
            urls["MLflow experiment"] = f"http://{stack.host}:{stack.mlflow_port}/#/experiments/{experiment}"
        else:
            urls["MLflow experiment"] = (
                f"experiment {experiment} in {self.settings.registry.tracking_uri} "
                "(`cytoloop stack up` with CYTOLOOP_STACK__MLFLOW_SERVER=true for the web UI)"
            )
        if stack.ray_dashboard:
            urls["Ray dashboard"] = f"http://{stack.ray_host}:{stack.ray_dashboard_port}"
        urls["classifier API"] = f"{state.serve_url}/docs"
        return urls

    def _write_report(self, classes: list[str]) -> Path:
        from cytoloop.evaluation.loop_report import write_report

        return write_report(
            self.rounds,
            self.test_predictions,
            classes,
            self.dir / "report",
            title=f"CytoLoop demo on {self.data}",
            table=round_table(self.rounds),
        )


def _demo_settings(settings: Settings, data: Path) -> Settings:
    """What the demo needs on top of the user's settings: Label Studio may serve the data's images, Serve follows
    aliases quickly and logs predictions (for drift), and leaves CPU for training and scoring beside it."""
    home = Path(settings.home).resolve()
    folder = (data if data.is_dir() else data.parent).resolve()
    stack = settings.stack
    if stack.images_root is None or not folder.is_relative_to(Path(stack.images_root).resolve()):
        stack = stack.model_copy(update={"images_root": folder})
    serve = settings.serve.model_copy(
        update={
            "alias_poll_s": min(settings.serve.alias_poll_s, 2.0),
            "prediction_log": settings.serve.prediction_log or home / DEMO_DIR / "predictions.jsonl",
            "num_cpus": min(settings.serve.num_cpus, 0.5),
        }
    )
    return settings.model_copy(update={"home": home, "serve": serve, "stack": stack})


def _merge(seed: Sequence[CellRecord], consensus: Sequence[CellRecord]) -> list[CellRecord]:
    """Seed labels plus consensus labels, one per cell (a consensus label of a seed cell wins)."""
    merged = {str(Path(r.path).resolve()): r for r in seed}
    merged.update({str(Path(r.path).resolve()): r for r in consensus})
    return list(merged.values())


def round_table(rounds: Sequence[RoundResult]) -> str:
    """The per-round table, as Markdown (also what the demo prints)."""
    lines = [
        "| round | labels | scored | routed | sent | annotations | consensus | version | gate | served "
        "| bal. acc. | ECE | seconds |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rounds:
        routed = f"{r.routed_fraction:.0%}" if r.routed else "-"
        lines.append(
            f"| {r.round} | {r.labels} | {r.scored or '-'} | {routed} | {r.sent or '-'} | "
            f"{r.annotations or '-'} | {r.consensus or '-'} | v{r.version} | {r.gate} | v{r.served} | "
            f"{r.balanced_accuracy:.3f} | {r.ece:.3f} | {sum(r.seconds.values()):.0f} |"
        )
    return "\n".join(lines)

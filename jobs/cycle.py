"""The whole loop as a lab lives it, for `cytoloop demo`: a base model meets new hospitals, finds their blasts and
learns their stain.

    stack up (Label Studio, label receiver, MLflow, Ray)                       once
    the base model (the shipped PBC model) -> registry @champion               once
    Ray Serve serves every site its champion (`champion-<site>`, else @champion)
    round 0: each site's held-out cells scored by the unadapted base model
    per round, per site:
      score the site's pool (its own cells, blasts mixed in) through Serve with Ray Data
      route: anomalies first (the site's threshold), then the least certain, audits -> the site's Label Studio project
      simulated annotators (distinct Label Studio users, one noisier) answer through the API
      sync labels back (webhooks + poll) -> consensus -> the site's training labels
      fine-tune the base model on them on Ray Train -> register in MLflow -> gate on the site's frozen cells
      -> move `champion-<site>` (or record the refusal) -> Serve switches for that site only
      -> score the site's held-out cells through Serve

Every arrow is the production code path (`labelstudio.loop.ReviewLoop`, `jobs.finetune.run_finetune`,
`services.app`); only the hematologists are simulated. Each site's labelled cells are split once: held-out test
cells that draw its learning curve, and the frozen calibration and gate sets of its fine-tunes (in a lab: its
first audited labels); none of these is ever routed or trained on. The rest is its pool, unlabelled as far as
the loop knows, with a few blasts of another lab mixed in: the cells a lab must not miss. A blast the annotators
recognise is named a new class ("other/unknown", `blast`): kept apart, never a fine-tuning label of a known class.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import random
import time
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cytoloop.config import DemoConfig, Settings
from cytoloop.data.records import CellRecord, DatasetError, cell_identity, load_records, read_manifest, select
from cytoloop.errors import CytoLoopError, UsageError
from cytoloop.models.finetune import freeze, frozen_directory

if TYPE_CHECKING:
    from jobs.score import PoolScores
    from labelstudio.loop import ReviewLoop

logger = logging.getLogger(__name__)


class DemoStopped(CytoLoopError, RuntimeError):
    """A round could not go on for a reason outside the code (a service not up, Label Studio refusing the tasks,
    no label agreed on): the CLI says why in one paragraph (exit 2), not with a bug's traceback (exit 1)."""


DEMO_DIR = "demo"
DRIFT_LOG_WAIT_S = 30.0  # how long the demo waits for its answers' events in the prediction log (written after)


@dataclass(frozen=True)
class SiteSplit:
    """One site's cells, split once. `blasts` are in `pool` too (the loop does not know which they are)."""

    test: list[CellRecord]  # draws the site's learning curve
    val: list[CellRecord]  # frozen: the site's fine-tunes recalibrate on these, and its anomaly threshold
    eval: list[CellRecord]  # frozen: the promotion gate judges the site's versions on these
    pool: list[CellRecord]
    blasts: list[CellRecord] = field(default_factory=list)


def split_site(records: Sequence[CellRecord], config: DemoConfig, site: str) -> SiteSplit:
    """Per class (seeded by the demo's seed and the site): `test_fraction` of the cells held out and cut in three
    (test, val, eval), the rest the pool; the copies of one image (`cell_identity`) are one cell, in one part. A
    class with too few cells for three held-out cells and one pool cell is an error naming it and the site."""
    by_class: dict[str, list[CellRecord]] = defaultdict(list)
    for record in records:
        if record.label is not None:
            by_class[record.label].append(record)
    if not by_class:
        raise DatasetError(f"site {site!r} has no labelled cells")
    if config.blast_label in by_class:  # held out as normal cells, they would set the anomaly threshold
        raise DatasetError(
            f"site {site!r}: {len(by_class[config.blast_label])} of its labs' cells are labelled "
            f"{config.blast_label!r}, the label of the anomalies mixed into its pool: choose demo.classes without it"
        )
    rng = random.Random(f"{config.seed}:{site}")
    identity = {str(r.path): cell_identity(r.path) for cells in by_class.values() for r in cells}
    parts: dict[str, list[CellRecord]] = {name: [] for name in ("test", "val", "eval", "pool")}
    for label in sorted(by_class):
        cells = sorted(by_class[label], key=lambda r: r.cell_id)
        rng.shuffle(cells)
        # copies of one image (jtsc's 112.bmp and 139.bmp are one lymphocyte) are one cell, in one part: one on the
        # learning curve and its twin in the pool was labelled and trained on
        images: dict[str, list[CellRecord]] = {}
        for cell in cells:
            images.setdefault(identity[str(cell.path)], []).append(cell)
        held = max(3, round(config.test_fraction * len(images)))
        if len(images) < held + 1:
            files = f" ({len(cells)} files)" if len(cells) != len(images) else ""
            raise DatasetError(
                f"site {site!r}: class {label!r} has {len(images)} cells{files}, too few for {held} held out and one "
                "pool cell (name the classes to use with --classes, demo.classes)"
            )
        thirds = [held * k // 3 for k in range(4)]
        for i, copies in enumerate(images.values()):
            name = "pool" if i >= held else ("test", "val", "eval")[max(k for k in range(3) if thirds[k] <= i)]
            parts[name] += copies
    # nor is a copy filed under another class in the pool while one is held out
    held_out = {identity[str(r.path)] for name in ("test", "val", "eval") for r in parts[name]}
    parts["pool"] = [r for r in parts["pool"] if identity[str(r.path)] not in held_out]
    return SiteSplit(**parts)


def check_kept_sets(directory: Path, split: SiteSplit, site: str) -> None:
    """The frozen sets an earlier run left under `directory` must be this split's: a rerun in the same home with
    another seed, share held out, class list or data would calibrate and gate on cells that are now in its pool
    or on its learning curve (and keep champions trained on them). Raises a UsageError before anything starts."""

    def paths(cells: Sequence[CellRecord]) -> set[str]:
        return {str(Path(r.path).resolve()) for r in cells}

    for part, cells in (("val", split.val), ("eval", split.eval)):
        kept = read_manifest(directory / f"{part}.csv")
        if paths(kept) != paths(cells):
            raise UsageError(
                f"{site}: the frozen {part} cells kept under {directory} are not this run's (another seed, "
                "test_fraction, class list or data made them): use a fresh home (CYTOLOOP_HOME) or the earlier "
                "run's settings"
            )


def mix_blasts(splits: dict[str, SiteSplit], blasts: Sequence[CellRecord], config: DemoConfig) -> dict[str, SiteSplit]:
    """Each site's pool with `blast_share` of it made of blasts (no blast in two sites), drawn with the demo's seed.

    A site of n pool cells gets round(n * share / (1 - share)) blasts, at least one when the share is not 0; too
    few blasts for all sites is an error saying how many are needed."""
    if config.blast_share == 0:
        return splits
    wanted = {
        site: max(1, round(len(split.pool) * config.blast_share / (1 - config.blast_share)))
        for site, split in splits.items()
    }
    if sum(wanted.values()) > len(blasts):
        raise DatasetError(
            f"{sum(wanted.values())} blasts are needed for demo.blast_share={config.blast_share} "
            f"({', '.join(f'{s}: {n}' for s, n in wanted.items())}), the data has {len(blasts)} "
            f"labelled {config.blast_label!r} in {config.blast_domain!r}"
        )
    drawn = sorted(blasts, key=lambda r: r.cell_id)
    random.Random(f"{config.seed}:blasts").shuffle(drawn)
    mixed, start = {}, 0
    for site, split in splits.items():
        mine = drawn[start : start + wanted[site]]
        start += wanted[site]
        pool = split.pool + mine
        random.Random(f"{config.seed}:{site}:pool").shuffle(pool)
        mixed[site] = SiteSplit(split.test, split.val, split.eval, pool, mine)
    return mixed


def reported_classes(split: SiteSplit, classes: Sequence[str], blast_label: str) -> list[str]:
    """The classes a site reports: those of `classes` (the base model's, in its order) its labelled cells have.
    The mixed-in blasts are not among them: the site does not know it will meet them."""
    have = {r.label for r in split.test + split.val + split.eval + split.pool if r.label and r.label != blast_label}
    return [c for c in classes if c in have]


def anomaly_threshold(normal_scores: np.ndarray, quantile: float) -> float:
    """The anomaly threshold a site routes with: the `quantile` quantile of the anomaly scores of its normal
    (labelled, known-class) cells under the model serving it. An anomaly score's scale is per model and per
    stain, so the threshold is set on the site's own cells, for a false-alarm share of 1 - quantile on them."""
    scores = np.asarray(normal_scores, dtype=float)
    scores = scores[np.isfinite(scores)]
    if not len(scores):
        raise UsageError("no finite anomaly score among the normal cells: the model gives none")
    return float(np.quantile(scores, quantile))


@dataclass
class RoundResult:
    """One row of the per-round table: one site in one round (round 0 is the unadapted base model)."""

    round: int
    site: str
    labels: int  # the site's consensus labels its round model trained on
    scored: int = 0
    routed: dict[str, int] = field(default_factory=dict)
    sent: int = 0
    annotations: int = 0
    consensus: int = 0
    new_class_cells: int = 0  # the site's cells the annotators agreed are a class the model lacks (say, blasts)
    anomaly_threshold: float | None = None
    blasts: dict[str, int] = field(default_factory=dict)  # in the scored pool, routed 'anomaly', sent
    version: str = ""
    gate: str = ""
    gate_reasons: list[str] = field(default_factory=list)
    served: str = ""  # the version that answered for the site after the round
    pool_version: str = ""  # the version that scored the site's pool this round
    balanced_accuracy: float = float("nan")
    ece: float = float("nan")
    # the ECE a perfectly calibrated model with the same predictions shows on these held-out cells (mean, low,
    # high, cells: `metrics.calibrated_ece`): on tens of cells sampling alone puts ECE near 0.1
    ece_calibrated: dict[str, float] = field(default_factory=dict)
    drift: dict[str, float | None] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    # cells Serve could not score, by part ("pool", "calibration", "held-out"): left out of that part's figures
    not_scored: dict[str, int] = field(default_factory=dict)

    @property
    def routed_fraction(self) -> float:
        total = sum(self.routed.values())
        return (total - self.routed.get("accept", 0)) / total if total else float("nan")


@dataclass
class LoopState:
    """What the set-up stages produced and every round reads: passed explicitly, never set as attributes in an
    order the stages must keep. `serving[site]` moves when a site's version is promoted."""

    review: ReviewLoop  # the Label Studio side (projects, outbox, label store)
    classes: list[str]
    base: str  # the registry version @champion points at: the base model
    serving: dict[str, str]  # site -> the version serving it
    serve_url: str
    api_key: str | None
    annotators: list = field(default_factory=list)  # labelstudio.annotators.SimulatedAnnotator


@dataclass
class DemoOutcome:
    rounds: list[RoundResult]
    report: Path
    urls: dict[str, str]


class Demo:
    """One run of the loop over every site. `settings` are used as given except for what the demo must own (see
    `_demo_settings`)."""

    def __init__(self, settings: Settings, data: Path):
        annotators, required = len(settings.demo.error_rates), settings.review.labels_required
        if annotators < required:  # before anything starts
            raise UsageError(
                f"demo.error_rates has {annotators} simulated annotators, fewer than review.labels_required "
                f"({required}): no cell could reach a consensus (the demo stopped on that after the stack, serving "
                "and a pool's scoring); give one rate per annotator"
            )
        if annotators > required:  # each task takes `required` labels, from the first annotators in order
            raise UsageError(
                f"demo.error_rates has {annotators} simulated annotators, more than review.labels_required "
                f"({required}): every cell would be labelled by the first {required} and the others (rates "
                f"{settings.demo.error_rates[required:]}) by none, shown with 0 cells; give one rate per label a "
                "cell takes"
            )
        self.data = Path(data)
        self.settings = _demo_settings(settings, self.data)
        self.config = self.settings.demo
        self.dir = Path(self.settings.home).resolve() / DEMO_DIR
        self.rounds: list[RoundResult] = []
        self.test_predictions: dict[tuple[str, int], tuple[np.ndarray, np.ndarray]] = {}  # probs, true labels
        self.round_start: datetime | None = None  # Serve's predictions since then make a site round's drift window
        # (site, version) -> the site's anomaly threshold under that version: a refused fine-tune leaves the site on
        # the version that already scored its calibration cells, so they are not scored again
        self.thresholds: dict[tuple[str, str], float] = {}

    # -- the run ---------------------------------------------------------------------------------------------------
    def run(self) -> DemoOutcome:
        """The whole demo; one at a time per home: two at once routed into the same projects, labelled each
        other's tasks and wrote one report with the other's plots."""
        from contextlib import ExitStack

        from cytoloop.files import Locked, locked

        with ExitStack() as held:
            try:
                held.enter_context(locked(self.dir / ".demo.lock", wait=False))
            except Locked:
                raise UsageError(
                    f"another demo runs in this home ({self.settings.home}); wait for it, or give this one another "
                    "home (CYTOLOOP_HOME)"
                ) from None
            return self._run()

    def _run(self) -> DemoOutcome:
        self.dir.mkdir(parents=True, exist_ok=True)
        splits = self._split()
        base_classes = self._check_classes(splits)  # before any service starts: a wrong class list fails in seconds
        self._site_classes(splits, base_classes)
        self._freeze(splits)
        with self.stage("stack up"):
            review = self._stack_up()
        with self.stage("base model"):
            classes, base = self._register_base()
        with self.stage("serve"):
            serve_url, api_key = self._serve()
            serving = {  # a rerun in the same home finds the site champions an earlier run promoted
                site: self._wait_served(serve_url, api_key, self._named_version(site), site, split.test[0])
                for site, split in splits.items()
            }
        with self.stage("annotator accounts"):
            state = LoopState(review, classes, base, serving, serve_url, api_key, self._annotators())
        for site, split in splits.items():
            gate = "base (registered)" if serving[site] == base else "kept from an earlier run"
            row = RoundResult(0, site, 0, version=serving[site], gate=gate, served=serving[site])
            self.round_start = datetime.now(UTC)
            with self.stage(f"{site}: evaluate the base model", row, "evaluate"):
                self._evaluate(state, site, split.test, row)
            self._finish_round(row)
        labelled: dict[str, list[CellRecord]] = {site: [] for site in splits}
        for number in range(1, self.config.rounds + 1):
            for site, split in splits.items():
                labelled[site] = self._round(state, number, site, split, labelled[site])
        report = self._write_report(state, splits)
        urls = self.urls(state)
        for name, url in urls.items():
            logger.info(f"{name}: {url}")
        logger.info(f"report: {report} (and report.html beside it)")
        return DemoOutcome(self.rounds, report, urls)

    def _split(self) -> dict[str, SiteSplit]:
        """Every site's split, blasts mixed in; the ground truth the annotators know (`_freeze` writes the frozen
        sets, once the classes are checked)."""
        records = load_records(self.data)
        config = self.config
        splits = {
            site: split_site(select(records, domains, config.classes), config, site)
            for site, domains in config.sites.items()
        }
        blasts = select(records, [config.blast_domain], [config.blast_label]) if config.blast_share > 0 else []
        splits = mix_blasts(splits, blasts, config)
        self.truth = {  # what the simulated annotators know: every cell a task can show
            str(Path(r.path).resolve()): r.label for split in splits.values() for r in split.pool if r.label is not None
        }
        for site, split in splits.items():
            logger.info(
                f"{site} ({', '.join(config.sites[site])}): {len(split.test)} held-out cells for its learning "
                f"curve, {len(split.val)} to calibrate and {len(split.eval)} to gate its versions; "
                f"{len(split.pool)} in its pool, {len(split.blasts)} of them {config.blast_label}s from "
                f"{config.blast_domain}"
            )
        return splits

    def _freeze(self, splits: dict[str, SiteSplit]) -> None:
        """Write each site's frozen sets, or check that the kept ones are this split's. After the class checks:
        frozen before them, a class the base model lacks left sets a corrected class list could not match, and
        the home refused every later run."""
        for site, split in splits.items():
            directory = frozen_directory(self.settings.home, site)
            if not freeze(directory, split.val, split.eval):
                check_kept_sets(directory, split, site)
                logger.info(f"   (the frozen sets under {directory} are kept from an earlier run)")

    def _round(
        self, state: LoopState, number: int, site: str, split: SiteSplit, labelled: list[CellRecord]
    ) -> list[CellRecord]:
        """One site's round; returns the site's labels so far."""
        from jobs.finetune import run_finetune

        row = RoundResult(number, site, len(labelled))
        self.round_start = datetime.now(UTC)
        known = {str(Path(r.path).resolve()) for r in labelled}
        pool = [r for r in split.pool if str(Path(r.path).resolve()) not in known]
        if self.config.pool_limit is not None:
            draw = random.Random(f"{self.config.seed}:{site}:{number}")
            pool = draw.sample(pool, min(len(pool), self.config.pool_limit))
        with self.stage(f"round {number}, {site}: score pool", row, "score"):
            scores = self._score(state, pool, site, row, "pool")
            row.scored = len(scores.records)
            # the version that scored most of the pool (all of it, unless the alias moved mid-batch)
            row.pool_version = Counter(scores.versions).most_common(1)[0][0] if scores.versions else ""
        with self.stage(f"round {number}, {site}: anomaly threshold", row, "threshold"):
            if (site, row.pool_version) not in self.thresholds:
                calibration = self._score(state, split.val, site, row, "calibration")
                if not calibration.records:  # said as what it is, not as "the model gives no anomaly score"
                    reasons = "; ".join(list(calibration.failed.values())[:3])
                    raise DatasetError(
                        f"{site}: none of its {len(split.val)} calibration cells could be scored ({reasons}): its "
                        "anomaly threshold cannot be set"
                    )
                self.thresholds[(site, row.pool_version)] = anomaly_threshold(
                    calibration.predictions.anomaly, self.config.anomaly_quantile
                )
            row.anomaly_threshold = self.thresholds[(site, row.pool_version)]
        routing = self.settings.routing.model_copy(
            update={"anomaly_above": row.anomaly_threshold, "fill_budget": self.config.fill_budget}
        )
        with self.stage(f"round {number}, {site}: route to Label Studio", row, "route"):
            routed = state.review.route(
                scores.records,
                scores.predictions,
                state.classes,
                row.pool_version,
                site=site,
                budget=self.config.budget,
                routing=routing,
            )
            if routed.push is not None and routed.push.error:
                raise DemoStopped(f"Label Studio did not take the tasks: {routed.push.error}")
            row.routed, row.sent = routed.reasons, routed.queued
            blasts = {str(r.path) for r in split.blasts}
            row.blasts = {
                "scored": sum(str(r.path) in blasts for r in scores.records),
                "anomaly": sum(routed.reason_of.get(path) == "anomaly" for path in blasts),
                "sent": len(blasts & set(routed.sent_paths)),
            }
        with self.stage(f"round {number}, {site}: annotate", row, "annotate"):
            project = state.review.projects()[site]
            row.annotations = sum(a.label_open_tasks([project], self.truth) for a in state.annotators)
        with self.stage(f"round {number}, {site}: sync labels", row, "sync"):
            state.review.sync()
            export = state.review.export(self.dir / "labels.csv")
            mine = {str(Path(r.path).resolve()) for r in split.pool}
            consensus = read_manifest(Path(export["path"])) if export["exported"] else []
            labelled = [r for r in consensus if str(Path(r.path).resolve()) in mine]
            new = export.get("new_classes")
            new_cells = read_manifest(Path(new["path"])) if new else []
            row.consensus = len(labelled)
            row.new_class_cells = sum(str(Path(r.path).resolve()) in mine for r in new_cells)
        row.labels = len(labelled)
        with self.stage(f"round {number}, {site}: fine-tune on Ray Train, gate", row, "finetune"):
            if not labelled:
                raise DemoStopped(f"{site}: no consensus label came back this round: nothing to fine-tune on")
            outcome = run_finetune(self.settings, labelled, site=site, who="cytoloop demo")
            row.version = outcome.version.version
            row.gate = "promoted" if outcome.passed else f"refused ({', '.join(outcome.worse) or 'stale'})"
            row.gate_reasons = outcome.reasons
        expected = row.version if outcome.passed else state.serving[site]
        with self.stage(f"round {number}, {site}: Serve switches", row, "serve"):
            row.served = self._wait_served(state.serve_url, state.api_key, expected, site, split.test[0])
            state.serving[site] = row.served
        with self.stage(f"round {number}, {site}: evaluate", row, "evaluate"):
            self._evaluate(state, site, split.test, row)
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

        services = Stack(self.settings)
        statuses = services.up()
        down = [s.name for s in statuses if s.state not in ("up", "disabled")]
        if down:
            raise DemoStopped(f"services not up: {', '.join(down)} (see `cytoloop stack status`)")
        stack = self.settings.stack
        if not ray.is_initialized():
            # off loopback the head asks for its token: a driver without it was refused (a RayError traceback)
            os.environ.update(services.ray_client_environment())
            ray.init(address=f"{stack.ray_host}:{stack.ray_port}", log_to_driver=False)
        # the demo prints one line per stage; Ray Data's own progress lines every few seconds would bury them
        DataContext.get_current().enable_progress_bars = False
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        return ReviewLoop(self.settings)

    def _check_classes(self, splits: dict[str, SiteSplit]) -> list[str]:
        """Every site class must be a class of the base model (blasts excepted: the model must not know them);
        returns the base model's classes."""
        from cytoloop.models.base import read_model_meta

        classes = read_model_meta(self._base_dir())["classes"]
        sites = {r.label for split in splits.values() for r in split.test + split.pool if r.label}
        unknown = sorted(sites - set(classes) - {self.config.blast_label})
        if unknown:
            raise DatasetError(
                f"the sites' class(es) {', '.join(unknown)} are not classes of the base model "
                f"({', '.join(classes)}); choose the sites' classes with demo.classes"
            )
        return classes

    def _site_classes(self, splits: dict[str, SiteSplit], order: list[str]) -> None:
        """With `demo.site_classes`, each site reports the classes its labs' cells have (blasts aside: no lab
        reports a class it has never seen), so Serve and the gate decide its cells among those; a site whose
        `sites.<site>.classes` is set keeps that. `order`: the base model's classes, the order they are listed in."""
        from cytoloop.config import SiteConfig

        if not self.config.site_classes:
            return
        sites = dict(self.settings.sites)
        for site, split in splits.items():
            if self.settings.site_classes(site) is None:
                sites[site] = SiteConfig(classes=reported_classes(split, order, self.config.blast_label))
            logger.info(f"{site} reports {', '.join(sites[site].classes or order)}")
        self.settings = self.settings.model_copy(update={"sites": sites})

    def _base_dir(self) -> Path:
        base = Path(self.config.base_model)
        if not (base / "model.json").is_file():
            raise UsageError(
                f"demo.base_model {base} is not a model directory (no model.json): give the shipped base model "
                "(models/base-pbc in the repository) or one of your own (--base-model)"
            )
        return base

    def _register_base(self) -> tuple[list[str], str]:
        """Register the base model directory as @champion (a rerun in the same home keeps the one it registered);
        returns its classes and version. A rerun whose @champion is another model (an earlier run from another
        base, a version promoted since) is refused: its round 0 would report that model as the base's."""
        from cytoloop.models.base import read_model_meta
        from cytoloop.models.finetune import code_revision
        from cytoloop.registry import CHAMPION, open_registry
        from cytoloop.serving.model_source import local_ref

        base = self._base_dir()
        meta = read_model_meta(base)
        registry, name = open_registry(self.settings), self.settings.registry.model_name
        current = registry.alias_version(name, CHAMPION)
        if current is not None:
            cache = Path(self.settings.registry.cache_dir)
            classes = list(registry.load(name, current, cache).classes)  # cached as cache/<name>/<version>
            if local_ref(cache / name / current).version != local_ref(base).version:
                earlier = registry.version(name, current).tags
                source = earlier.get("base_model") if earlier.get("job") == "demo-base" else None
                raise UsageError(
                    f"@champion in {self.settings.home} is v{current}, not the base model {base} this run starts "
                    f"from (their files differ; v{current} "
                    + (f"was registered by a demo from {source})" if source else "was not registered by a demo)")
                    + ": run the demo in a new home (CYTOLOOP_HOME) to start from this base"
                    + (f", or give --base-model {source} to go on from that run" if source else "")
                )
            logger.info(f"   @champion is v{current}, this base model, from an earlier run in {self.settings.home}")
            return classes, current
        version = registry.log_model(
            base,
            name,
            tags={
                "kind": meta["kind"],
                "site": "global",
                "job": "demo-base",
                "code_revision": code_revision(),
                "base_model": str(base.resolve()),
            },
        )
        registry.move_alias(
            name, CHAMPION, version.version, why=f"cytoloop demo: the base model {base}", who="cytoloop demo"
        )
        return list(meta["classes"]), version.version

    def _named_version(self, site: str) -> str:
        """The version the registry names for the site: its champion-<site>, else @champion."""
        from cytoloop.registry import open_registry

        return open_registry(self.settings).for_site(self.settings.registry.model_name, site).version

    def _serve(self) -> tuple[str, str | None]:
        """Run the classifier on Ray Serve; returns its URL and API key."""
        from ray import serve

        from services.app import build_app, start_serve

        config = self.settings.serve
        start_serve(self.settings)
        serve.run(build_app(self.settings), name=config.app_name, route_prefix="/", blocking=False)
        return f"http://{config.host}:{config.port}", config.api_key.get_secret_value() if config.api_key else None

    def _score(
        self, state: LoopState, records: Sequence[CellRecord], site: str, row: RoundResult, part: str
    ) -> PoolScores:
        """Cells scored through Serve as the site's (so by the site's champion). A cell it rejects is left out,
        named in the log and counted in `row.not_scored[part]` (the report says so beside the figures)."""
        from jobs.score import score_served

        scores = score_served(records, state.serve_url, state.classes, state.api_key, site_of=lambda _: site)
        for path, reason in scores.failed.items():
            logger.warning(f"  not scored ({site}, {part}): {path}: {reason}")
        if scores.failed:
            row.not_scored[part] = row.not_scored.get(part, 0) + len(scores.failed)
        return scores

    def _wait_served(self, serve_url: str, api_key: str | None, version: str, site: str, cell: CellRecord) -> str:
        """Block until Serve answers the site's cells with `version`; returns the version that answered."""
        import httpx

        from jobs.score import classify_answers

        deadline = time.monotonic() + self.config.serve_switch_timeout_s
        body = {"cells": [{"name": cell.cell_id, "image_b64": base64.b64encode(Path(cell.path).read_bytes()).decode()}]}
        headers = {"X-API-Key": api_key} if api_key else {}
        served = ""
        while time.monotonic() < deadline:
            try:
                answer = httpx.post(
                    f"{serve_url}/v1/classify", json={**body, "site": site}, headers=headers, timeout=60.0
                )
                if answer.status_code in (400, 413, 415, 422):  # the cell itself refused: waiting changes nothing
                    raise DemoStopped(
                        f"Serve refused {cell.path}, the cell the demo asks which version serves {site}: HTTP "
                        f"{answer.status_code} {answer.text[:300]}"
                    )
                if answer.status_code == 200:
                    try:  # by Serve's contract: another program's 200 on the port was a KeyError traceback
                        [first] = classify_answers(answer, 1)
                    except RuntimeError as error:
                        raise DemoStopped(f"{error} (the demo asked which version serves {site})") from None
                    served = first["model"]["version"] if first["status"] == "ok" else served
                    if served == version:
                        return served
            except httpx.HTTPError:
                pass
            time.sleep(1.0)
        raise TimeoutError(
            f"Serve still answers {site} with version {served or '(none)'} after "
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
                url, f"annotator{i + 1}@cytoloop.demo", f"demo-annotator-{i + 1}", rate, self.config.seed, invite
            )
            for i, rate in enumerate(self.config.error_rates)
        ]

    def _evaluate(self, state: LoopState, site: str, test: list[CellRecord], row: RoundResult) -> None:
        """Score the site's held-out cells through Serve (what the site gets now) and draw its drift figures. Every
        answer must come from the version Serve switched the site to (`state.serving`): with several replicas, one
        that had not switched yet answered some cells with the old version, and the round's figures mixed two
        models. Scored again until they all do, for up to `demo.serve_switch_timeout_s`."""
        from cytoloop.evaluation import metrics

        expected, deadline = state.serving[site], time.monotonic() + self.config.serve_switch_timeout_s
        not_scored = dict(row.not_scored)
        while True:
            began = datetime.now(UTC)  # the drift window: this attempt's answers only, not a discarded one's too
            row.not_scored = dict(not_scored)  # one attempt's failures, not every attempt's
            scores = self._score(state, test, site, row, "held-out")
            others = Counter(version for version in scores.versions if version != expected)
            if not others:
                break
            answered = ", ".join(f"{n} by version {v}" for v, n in sorted(others.items()))
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{site}: of {len(scores.versions)} held-out cells, {answered}, not {expected}, which Serve "
                    f"switched to {self.config.serve_switch_timeout_s:.0f} s ago or more (demo.serve_switch_timeout_s)"
                )
            logger.warning(f"  {site}: held-out cells answered {answered}, not {expected}: a replica still switches")
            time.sleep(1.0)
        truth = np.array([state.classes.index(r.label) for r in scores.records])
        probs = scores.predictions.probs
        row.balanced_accuracy = metrics.balanced_accuracy(truth, probs.argmax(axis=1), len(state.classes))
        row.ece = metrics.expected_calibration_error(probs, truth)
        mean, low, high = metrics.calibrated_ece(probs)
        row.ece_calibrated = {"mean": mean, "low": low, "high": high, "cells": float(len(truth))}
        self.test_predictions[(site, row.round)] = (probs, truth)
        row.drift = self._drift(began, site, row.served or state.serving[site], len(scores.versions))

    def _drift(self, since: datetime, site: str, version: str, cells: int) -> dict[str, float | None]:
        """Drift figures of the `cells` cells `version` classified for `site` since `since`: its held-out cells,
        the same every round, so the figures move with the model rather than with which cells it happened to score
        (a promoted version scored only those, a refused one the pool and calibration cells too). Logged to MLflow.

        The replicas write the log after answering (`serving/prediction_log.py`), so the events are waited for, up
        to `DRIFT_LOG_WAIT_S`; a window still short then is drawn from the events there, and says so."""
        from cytoloop.policy.drift import WindowFigures, log_windows, read_colour_reference, read_events, window_figures
        from cytoloop.registry import open_registry

        log = self.settings.serve.prediction_log
        if log is None:
            return {}
        deadline, read_at_size, events = time.monotonic() + DRIFT_LOG_WAIT_S, -1, []
        while True:
            size = Path(log).stat().st_size if Path(log).is_file() else -1
            if size != read_at_size:  # parsed again only once it has grown (it holds every round's events)
                read_at_size = size
                events = (
                    [e for e in read_events(log) if e.time >= since and e.model_version == version and e.site == site]
                    if size >= 0
                    else []
                )
            if len(events) >= cells or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        if len(events) < cells:
            logger.warning(f"  drift: {len(events)} of {cells} cells' events in {log} after {DRIFT_LOG_WAIT_S:g} s")
        if not events:
            return {}
        name = self.settings.registry.model_name
        reference = read_colour_reference(Path(self.settings.registry.cache_dir).resolve() / name / version)
        figures = window_figures(events, reference, self.settings.drift)
        window = WindowFigures(version, None, since, int(figures["n_cells"]), figures, [])
        log_windows(open_registry(self.settings), name, [window])
        return {k: figures.get(k) for k in ("mean_confidence", "review_fraction", "psi_max")}

    def _finish_round(self, row: RoundResult) -> None:
        self.rounds.append(row)
        (self.dir / "rounds.json").write_text(rounds_json(self.rounds))
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

    def _write_report(self, state: LoopState, splits: dict[str, SiteSplit]) -> Path:
        from cytoloop.evaluation.loop_report import write_report

        sites = {
            site: f"{', '.join(self.config.sites[site])}: {len(split.pool)} pool cells ({len(split.blasts)} "
            f"{self.config.blast_label}s mixed in), {len(split.test)} held out for the curve, {len(split.val)} to "
            f"calibrate, {len(split.eval)} to gate; reports "
            + ", ".join(self.settings.site_classes(site) or ["every class of the model"])
            for site, split in splits.items()
        }
        return write_report(
            self.rounds,
            self.test_predictions,
            state.classes,
            self.dir / "report",
            title=f"CytoLoop demo: base model v{state.base} meets {len(sites)} site(s)",
            table=round_table(self.rounds),
            sites=sites,
            agreement=state.review.report(),
            urls=self.urls(state),
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


def rounds_json(rounds: Sequence[RoundResult]) -> str:
    """The rounds as rounds.json keeps them, from which the report can be drawn again (`loop_report`): with the
    routed share, which the report reads as an attribute (a property, which `asdict` left out)."""
    return json.dumps([{**asdict(r), "routed_fraction": r.routed_fraction} for r in rounds], indent=1, default=str)


def rounds_from_json(text: str) -> list[RoundResult]:
    """The rounds `rounds_json` wrote (the routed share, derived, is read again from `routed`)."""
    return [RoundResult(**{k: v for k, v in row.items() if k != "routed_fraction"}) for row in json.loads(text)]


def round_table(rounds: Sequence[RoundResult]) -> str:
    """The per-round table, as Markdown (also what the demo prints)."""
    lines = [
        "| round | site | labels | scored | routed | blasts (anomaly/in pool) | sent | annotations | new class "
        "| version | gate | served | bal. acc. | ECE | seconds |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rounds:
        routed = f"{r.routed_fraction:.0%}" if r.routed else "-"
        blasts = f"{r.blasts.get('anomaly', 0)}/{r.blasts.get('scored', 0)}" if r.blasts else "-"
        lines.append(
            f"| {r.round} | {r.site} | {r.labels} | {r.scored or '-'} | {routed} | {blasts} | {r.sent or '-'} | "
            f"{r.annotations or '-'} | {r.new_class_cells or '-'} | v{r.version} | {r.gate} | v{r.served} | "
            f"{r.balanced_accuracy:.3f} | {r.ece:.3f} | {sum(r.seconds.values()):.0f} |"
        )
    return "\n".join(lines)

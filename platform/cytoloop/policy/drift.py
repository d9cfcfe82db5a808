"""Drift: is a served model still seeing what it was trained on, and still right about its own confidence?

Per model version and site, cells are grouped into time windows and three families of figures are computed:
- calibration: ECE and accuracy on the cells of the window that a person reviewed or audited (their label known);
- confidence: mean confidence, and the fraction of cells routed to review;
- input/stain: the colour statistics of incoming cells (mean and std of l, alpha, beta, measured before any stain
  normalisation) against the training reference the model carries (`colour_reference.json`), as the population
  stability index (PSI, on the reference's quantile bins) and the Kolmogorov-Smirnov statistic, per statistic;
  a statistic counts as shifted when its PSI is large and its KS test significant (small windows are noisy).
A flag is raised when a window breaks a threshold of `DriftConfig`: stain against the training reference,
calibration against an absolute ECE and the first window's accuracy, confidence against the first window. The
calibration flags also ask that the figure be beyond sampling noise, since reviewed cells are few and mostly the
unsure ones: an ECE above what a perfectly calibrated model shows on the same confidences in 95 % of label draws
(on 50 cells at confidence 0.35-0.7 such a model tops 0.1 in 4 windows of 5), and an accuracy drop significant by a
one-sided two-proportion test at `accuracy_alpha` (two windows of 50 at one true accuracy differ by over 0.1 in
one window of 8).

Serving logs one `PredictionEvent` per scored cell (JSON lines); `colour_statistics` computes its `colour`. The
service does not see the labels: `with_labels` fills in each event's reviewed or audited class from the consensus
export (`read_labels`), joined by site and cell id (a hash of its image), which the calibration figures need. A cell
scored more than once in a window by the same version for the same site (a retried request, a pool scored again)
counts once (`one_per_cell`): the figures describe cells, not requests.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from cytoloop.config import DataConfig, DriftConfig
from cytoloop.data.preprocess import ImageError, colour_moments, decode_image, to_model_input
from cytoloop.data.records import CellRecord, DatasetError
from cytoloop.errors import UsageError, describe_validation_error
from cytoloop.evaluation.metrics import calibrated_ece_of_confidence, top_label_ece
from cytoloop.files import locked, write_text
from cytoloop.times import as_utc, parse_time

logger = logging.getLogger(__name__)

REFERENCE_FILE = "colour_reference.json"
COLOUR_STATS = ("l_mean", "alpha_mean", "beta_mean", "l_std", "alpha_std", "beta_std")


class PredictionEvent(BaseModel):
    """One served prediction, as the drift monitor reads it from the prediction log."""

    model_config = ConfigDict(extra="ignore")

    time: datetime
    model_version: str
    site: str | None = None
    confidence: float = Field(ge=0.0, le=1.0)
    routed_to_review: bool
    predicted: str
    label: str | None = Field(None, description="the reviewed or audited label, once known")
    colour: list[float] | None = Field(None, min_length=6, max_length=6, description="`colour_statistics` of the cell")
    cell_id: str | None = Field(None, description="hash of the image (`data.records.cell_id`)")

    @field_validator("time")
    @classmethod
    def _utc(cls, time: datetime) -> datetime:
        """A time without a zone is UTC (what the service writes): every reader compares aware times."""
        return as_utc(time)


def colour_statistics(source: Path | bytes, config: DataConfig) -> np.ndarray:
    """The six colour statistics of a cell as the model crops it, before stain normalisation (which would hide
    exactly the shift drift looks for)."""
    raw = config.model_copy(update={"stain_normalization": "none"})
    rgb = (to_model_input(decode_image(source), raw).transpose(1, 2, 0) + 1.0) / 2.0
    return colour_moments(rgb)


def colour_statistics_of(records: Sequence[CellRecord], config: DataConfig) -> np.ndarray:
    """(N, 6) colour statistics of the readable cells among `records` (unreadable ones are left out)."""
    rows = []
    for record in records:
        try:
            rows.append(colour_statistics(record.path, config))
        except ImageError:
            continue
    return np.array(rows).reshape(-1, len(COLOUR_STATS))


def write_colour_reference(model_dir: Path, stats: np.ndarray) -> Path:
    path = Path(model_dir) / REFERENCE_FILE
    write_text(path, json.dumps({"statistics": list(COLOUR_STATS), "cells": np.round(stats, 5).tolist()}))
    return path


def read_colour_reference(model_dir: Path) -> np.ndarray | None:
    """The training colour statistics a model carries, or None for a model trained before they were kept."""
    path = Path(model_dir) / REFERENCE_FILE
    if not path.is_file():
        return None
    try:
        return np.asarray(json.loads(path.read_text())["cells"], dtype=float).reshape(-1, len(COLOUR_STATS))
    except (ValueError, KeyError, TypeError) as error:
        raise UsageError(f"{path}: not a colour reference ({type(error).__name__}: {error})") from None


def psi(reference: np.ndarray, observed: np.ndarray, bins: int = 10) -> float:
    """Population stability index of `observed` against `reference` on the reference's quantile bins.

    Rule of thumb: < 0.1 stable, 0.1-0.25 moderate shift, > 0.25 a shift worth acting on. Sampling noise alone
    adds about (bins - 1) / n to the PSI, so the bins are cut to at least ten cells each on both sides, and the
    counts are smoothed (+0.5) so an empty bin does not dominate.
    """
    bins = max(2, min(bins, len(reference) // 10, len(observed) // 10))
    edges = np.unique(np.quantile(reference, np.linspace(0, 1, bins + 1)[1:-1]))
    expected = np.bincount(np.searchsorted(edges, reference), minlength=len(edges) + 1) + 0.5
    actual = np.bincount(np.searchsorted(edges, observed), minlength=len(edges) + 1) + 0.5
    expected, actual = expected / expected.sum(), actual / actual.sum()
    return float(np.sum((actual - expected) * np.log(actual / expected)))


def ks_test(reference: np.ndarray, observed: np.ndarray) -> tuple[float, float]:
    """Two-sample Kolmogorov-Smirnov statistic and p-value."""
    from scipy.stats import ks_2samp

    result = ks_2samp(reference, observed)
    return float(result.statistic), float(result.pvalue)


def accuracy_drop_p(now: float, n_now: float, before: float, n_before: float) -> float:
    """One-sided p-value of a two-proportion z-test that the accuracy fell from `before` (on `n_before` cells)
    to `now` (on `n_now`): how often two windows at one true accuracy differ this much by chance."""
    from scipy.stats import norm

    if n_now <= 0 or n_before <= 0:
        return 1.0
    pooled = (now * n_now + before * n_before) / (n_now + n_before)
    spread = np.sqrt(pooled * (1 - pooled) * (1 / n_now + 1 / n_before))
    if spread == 0:  # all right (or all wrong) in both windows: no drop to test
        return 1.0
    return float(norm.sf((before - now) / spread))


@dataclass
class WindowFigures:
    """Drift figures of one (model version, site, time window)."""

    model_version: str
    site: str | None
    window_start: datetime
    n_cells: int
    figures: dict[str, float | None]
    flags: list[str]


def prediction_events(
    cells: Sequence[tuple[str, bytes]],
    results: Sequence,
    site: str | None,
    model_version: str,
    config: DataConfig,
    answered: datetime | None = None,
) -> list[PredictionEvent]:
    """The prediction-log events of one classified batch: one per answered cell (failures are not predictions).

    `results[i]` answers `cells[i]` (an `inference.CellResult`, or a failure, which is skipped). `answered`: when
    the batch was answered (default now), the events' time, as a window of the log selects cells by it.
    """
    now = answered or datetime.now(UTC)
    events = []
    for (_, data), result in zip(cells, results):
        if not hasattr(result, "confidence"):
            continue
        events.append(
            PredictionEvent(
                time=now,
                model_version=model_version,
                site=site,
                confidence=result.confidence,
                routed_to_review=result.route != "accept",
                predicted=result.label,
                colour=colour_statistics(data, config).tolist(),
                cell_id=result.cell_id,
            )
        )
    return events


def append_events(path: Path, events: Sequence[PredictionEvent]) -> None:
    """Append events to a JSON-lines log in one write (O_APPEND), so replicas sharing the file never interleave."""
    if not events:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = "".join(event.model_dump_json() + "\n" for event in events).encode()
    descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        view = memoryview(payload)
        while view:  # a write may take less than all (a signal, a nearly full disk): the rest follows
            view = view[os.write(descriptor, view) :]
    finally:
        os.close(descriptor)


def read_events(path: Path) -> list[PredictionEvent]:
    """Read a JSON-lines prediction log; a bad line is an error naming its line number and the problem. A line that
    is not JSON at all is one a writer was killed in (or a full disk cut): it is skipped with a warning naming
    it, as otherwise every later `cytoloop drift` failed on it; a log of nothing else is an error."""
    events, torn = [], []
    try:
        text = Path(path).read_text(encoding="utf-8-sig")  # a byte-order mark (an editor's save) is no torn line
    except UnicodeDecodeError as error:
        raise DatasetError(
            f"{path}: not a prediction log (not UTF-8 text: {error.reason} at byte {error.start})"
        ) from None
    lines = text.splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            events.append(PredictionEvent.model_validate_json(line))
        except ValidationError as error:
            if all(problem["type"] == "json_invalid" for problem in error.errors()):
                torn.append(number)
                continue
            problem = describe_validation_error(error, whole="line")
            raise DatasetError(f"{path}:{number}: not a prediction event ({problem})") from None
    # a new log whose first writer was killed: one event's start, cut short
    cut_last = torn == [len(lines)] and not text.endswith("\n") and lines[-1].startswith("{")
    if torn and not events and not cut_last:
        raise DatasetError(f"{path}: not a prediction log (no line is JSON: {', '.join(map(str, torn[:5]))}, ...)")
    if torn:
        shown = ", ".join(map(str, torn[:10])) + (", ..." if len(torn) > 10 else "")
        logger.warning(f"{path}: {len(torn)} line(s) cut short by a stopped writer skipped (line {shown})")
    return events


Labels = dict[tuple[str | None, str], str]  # (site, cell id) -> class; site None: the cell's class at every site


def read_labels(path: Path) -> Labels:
    """The classes of a consensus export (`cytoloop review export`: columns `cell_id`, `label`, and `site`), by
    site and cell, as consensus reached them. For events logged without a site, a cell's class is also kept under
    site None where every row that labelled it agrees. Where rows disagree (two sites, or a cell listed twice for
    one site), which class is true is not known, and the cell goes without one there."""
    by_site: dict[tuple[str | None, str], set[str]] = {}
    try:
        text = Path(path).read_text(encoding="utf-8-sig")  # a spreadsheet's byte-order mark is no part of a name
    except UnicodeDecodeError as error:
        raise DatasetError(
            f"{path}: not a label export (not UTF-8 text: {error.reason} at byte {error.start})"
        ) from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    missing = {"cell_id", "label", "site"} - set(reader.fieldnames or [])
    if missing:
        raise DatasetError(f"{path}: no {', '.join(sorted(missing))} column: not a consensus label export")
    for row in reader:
        if row["cell_id"] and row["label"]:
            for site in {row["site"] or None, None}:
                by_site.setdefault((site, row["cell_id"]), set()).add(row["label"])
    return {key: classes.pop() for key, classes in by_site.items() if len(classes) == 1}


def with_labels(events: Iterable[PredictionEvent], labels: Labels) -> list[PredictionEvent]:
    """The events, each with its cell's reviewed or audited class at its site where `labels` has one."""
    return [
        event.model_copy(update={"label": labels[(event.site, event.cell_id)]})
        if event.cell_id is not None and (event.site, event.cell_id) in labels
        else event
        for event in events
    ]


def one_per_cell(events: Sequence[PredictionEvent]) -> list[PredictionEvent]:
    """The events of one window, version and site with each cell once (its latest event); events of older logs,
    without a cell id, are all kept."""
    latest = {event.cell_id: i for i, event in enumerate(events) if event.cell_id is not None}
    return [event for i, event in enumerate(events) if event.cell_id is None or latest[event.cell_id] == i]


def window_figures(events: Sequence[PredictionEvent], reference: np.ndarray | None, config: DriftConfig) -> dict:
    """The drift figures of one window of one version and site (None where a figure cannot be computed); each cell
    counts once (`one_per_cell`)."""
    events = one_per_cell(events)
    figures: dict[str, float | None] = {
        "n_cells": float(len(events)),
        "mean_confidence": float(np.mean([e.confidence for e in events])),
        "review_fraction": float(np.mean([e.routed_to_review for e in events])),
    }
    reviewed = [e for e in events if e.label is not None]
    figures["n_reviewed"] = float(len(reviewed))
    if reviewed:
        correct = np.array([e.predicted == e.label for e in reviewed])
        figures["reviewed_accuracy"] = float(correct.mean())
        confidence = np.array([e.confidence for e in reviewed])
        figures["reviewed_ece"] = top_label_ece(confidence, correct)
        # what a calibrated model stays under in 95 % of label draws (the high end of a two-sided 90 % range)
        figures["reviewed_ece_noise"] = calibrated_ece_of_confidence(confidence, draws=400, alpha=0.1)[2]
    colours = np.array([e.colour for e in events if e.colour is not None]).reshape(-1, len(COLOUR_STATS))
    if reference is not None and len(reference) and len(colours):
        psis, ks_p = {}, {}
        for i, name in enumerate(COLOUR_STATS):
            psis[name] = figures[f"psi_{name}"] = psi(reference[:, i], colours[:, i], config.psi_bins)
            figures[f"ks_{name}"], ks_p[name] = ks_test(reference[:, i], colours[:, i])
            figures[f"ks_p_{name}"] = ks_p[name]
        figures["psi_max"] = max(psis.values())
        # shifted = large (PSI) and not sampling noise (KS, Bonferroni over the statistics)
        shifted = [psis[n] for n in COLOUR_STATS if ks_p[n] < config.ks_alpha / len(COLOUR_STATS)]
        figures["psi_significant_max"] = max(shifted, default=0.0)
    return figures


def window_flags(figures: dict, first: dict, config: DriftConfig) -> list[str]:
    """Which thresholds a window breaks; `first` is the first window of the same version and site."""
    if figures["n_cells"] < config.min_cells:
        return []
    flags = []
    if figures.get("psi_significant_max") is not None and figures["psi_significant_max"] > config.psi_threshold:
        flags.append(
            f"stain: colour PSI {figures['psi_significant_max']:.2f} > {config.psi_threshold} (KS-significant)"
        )
    judged = figures["n_reviewed"] >= config.min_reviewed  # on a handful of reviews one wrong label is a "drop"
    ece, noise = figures.get("reviewed_ece"), figures.get("reviewed_ece_noise")
    if judged and ece is not None and ece > config.ece_threshold and (noise is None or ece > noise):
        flags.append(
            f"calibration: ECE on reviewed cells {ece:.3f} > {config.ece_threshold}"
            + ("" if noise is None else f" and > {noise:.3f}, what a calibrated model shows on these cells")
        )
    if judged and figures.get("reviewed_accuracy") is not None and first.get("reviewed_accuracy") is not None:
        now, before = figures["reviewed_accuracy"], first["reviewed_accuracy"]
        p = accuracy_drop_p(now, figures["n_reviewed"], before, first["n_reviewed"])
        if now < before - config.accuracy_drop and p < config.accuracy_alpha:
            flags.append(f"calibration: accuracy on reviewed cells {now:.3f}, first window {before:.3f} (p = {p:.2g})")
    if figures["mean_confidence"] < first["mean_confidence"] - config.confidence_drop:
        flags.append(f"confidence: mean {figures['mean_confidence']:.3f}, first window {first['mean_confidence']:.3f}")
    if figures["review_fraction"] > first["review_fraction"] + config.review_rise:
        flags.append(
            f"confidence: review fraction {figures['review_fraction']:.3f}, first window {first['review_fraction']:.3f}"
        )
    return flags


def drift_windows(
    events: Iterable[PredictionEvent], references: dict[str, np.ndarray | None], config: DriftConfig
) -> list[WindowFigures]:
    """Group events by (model version, site) and time window; figures and flags for each window, oldest first.

    `references` maps a model version to its training colour statistics (None: no stain figures). A series'
    baseline is its first window of at least `config.min_cells` cells (a test call at deploy time is no
    baseline), its reviewed accuracy the first such window's with at least `config.min_reviewed` reviewed cells
    (which is also what a window needs for its own ECE and accuracy to raise a flag); no window is flagged before
    there is a baseline.
    """
    groups: dict[tuple, dict[int, list[PredictionEvent]]] = {}
    width = config.window_hours * 3600.0
    for event in events:
        window = int(event.time.timestamp() // width)
        groups.setdefault((event.model_version, event.site), {}).setdefault(window, []).append(event)
    out = []
    for (version, site), windows in sorted(groups.items(), key=lambda item: (item[0][0], item[0][1] or "")):
        first: dict | None = None
        for index in sorted(windows):
            figures = window_figures(windows[index], references.get(version), config)
            if figures["n_cells"] >= config.min_cells:
                if first is None:
                    first = dict(figures)
                    if figures["n_reviewed"] < config.min_reviewed:
                        first["reviewed_accuracy"] = None  # too few reviews to be the baseline
                if first.get("reviewed_accuracy") is None and figures["n_reviewed"] >= config.min_reviewed:
                    # the baseline accuracy and the cells it is of come from the same window
                    first["reviewed_accuracy"], first["n_reviewed"] = (
                        figures["reviewed_accuracy"],
                        figures["n_reviewed"],
                    )
            out.append(
                WindowFigures(
                    version,
                    site,
                    datetime.fromtimestamp(index * width, UTC),
                    int(figures["n_cells"]),
                    figures,
                    window_flags(figures, first, config) if first is not None else [],
                )
            )
    return out


def log_windows(registry, model_name: str, windows: Sequence[WindowFigures]) -> dict[tuple, str]:
    """Log each (version, site) series to MLflow as time series (one step per window); returns the run ids."""
    runs = {}
    series: dict[tuple, list[WindowFigures]] = {}
    for window in windows:
        series.setdefault((window.model_version, window.site), []).append(window)
    for (version, site), items in series.items():
        tags = {
            "cytoloop.kind": "drift",
            "cytoloop.model": model_name,
            "cytoloop.model_version": version,
            "cytoloop.site": site or "global",
        }
        # step: hours since the epoch at the window's start, so steps stay comparable across runs and windows
        points = [
            (
                int(w.window_start.timestamp() // 3600),
                int(w.window_start.timestamp() * 1000),
                {**w.figures, "flagged": float(bool(w.flags))},
            )
            for w in items
        ]
        runs[(version, site)] = registry.log_series(f"drift {model_name} v{version} {site or 'global'}", tags, points)
    return runs


def save_flags(path: Path, windows: Sequence[WindowFigures], min_cells: int) -> list[dict]:
    """Keep the verdict of each series' latest window of at least `min_cells` cells (its flags: what `cytoloop
    status` shows and the retrain policy reads), merged into the verdicts already saved: a verdict stands until a
    later judged window of its series replaces it. So a window just begun, too small to judge, does not clear the
    last verdict, nor does a log that lacks the series or ends before the saved window (an empty or rotated log).
    A clean verdict is kept too (with no flags): kept only when flagged, an older log run after a newer clean one
    brought back the flag the newer window had cleared. Returns every flag now saved (flagged verdicts only)."""
    latest: dict[tuple, WindowFigures] = {}
    for window in windows:
        if window.n_cells >= min_cells:
            latest[(window.model_version, window.site)] = window
    with locked(Path(path).with_name(Path(path).name + ".lock")):  # two `drift` runs (one per site's log) at once
        return _merge_flags(Path(path), latest)


def _merge_flags(path: Path, latest: dict[tuple, WindowFigures]) -> list[dict]:
    """`save_flags`' read-merge-write, under its lock: without it the last of two runs dropped the other's flag."""
    saved = {(str(f["model_version"]), f.get("site")): f for f in _load_verdicts(path)}
    for key, window in latest.items():
        earlier = saved.get(key)
        if earlier is not None and parse_time(earlier.get("window_start")) > window.window_start:
            continue
        saved[key] = {
            "model_version": window.model_version,
            "site": window.site,
            "window_start": window.window_start.isoformat(),
            "flags": window.flags,
        }
    verdicts = list(saved.values())
    write_text(path, json.dumps(verdicts, indent=1))
    return [v for v in verdicts if v.get("flags")]


def load_flags(path: Path) -> list[dict]:
    """The flagged verdicts `save_flags` kept (none yet: no flags). A file that is not a flags file is refused,
    naming it."""
    return [v for v in _load_verdicts(path) if v.get("flags")]


def _load_verdicts(path: Path) -> list[dict]:
    """Every verdict in the flags file, the clean ones too."""
    path = Path(path)
    if not path.is_file():
        return []
    try:
        flags = json.loads(path.read_text())
    except ValueError as error:
        raise UsageError(f"{path} is not a drift flags file ({error}); `cytoloop drift` writes it again") from None

    def verdict(f: object) -> bool:  # what `status` and the retrain policy read of each (a KeyError or "p; s; i")
        return (
            isinstance(f, dict)
            and "model_version" in f
            and isinstance(f.get("site"), str | None)
            and isinstance(f.get("flags", []), list)
            and all(isinstance(flag, str) for flag in f.get("flags", []))
        )

    if not isinstance(flags, list) or not all(verdict(f) for f in flags):
        raise UsageError(
            f"{path} is not a drift flags file (a list of windows, each with its model_version, site and a list of "
            "flags); `cytoloop drift` writes it"
        )
    return flags

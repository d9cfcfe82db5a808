"""Train and evaluate, end to end: the stages the CLI, the benchmarks and the Ray jobs all call.

`train_model`: select -> split (seeded, written to the model directory) -> preprocess -> fit -> calibrate (and, for
the diffusion model, tune its scoring) on the validation part -> save. `evaluate_model`: preprocess -> predict ->
metrics, JSON and plots. `tune_model_scoring`: fit the adaptive scoring's elimination rule on the validation part.
`distill_model`: build a cascade (a student CNN distilled from a diffusion model) from the teacher's train part.
Evaluation never scores a cell the model trained or calibrated on: those are excluded by the split the model
carries.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path, PurePosixPath
from typing import Any, Literal

import numpy as np

from cytoloop.config import Settings
from cytoloop.data.preprocess import load_cells
from cytoloop.data.records import (
    CellRecord,
    DatasetError,
    cell_identity,
    data_sources,
    read_split_file,
    records_fingerprint,
    stratified_split,
    write_split,
)
from cytoloop.errors import UsageError
from cytoloop.evaluation import metrics, plots
from cytoloop.files import write_text
from cytoloop.models.base import MODEL_ARTIFACTS, Classifier, Predictions, Trainable, candidate_rows, class_mask
from cytoloop.models.cascade import CascadeClassifier, distill
from cytoloop.models.diffusion import DiffusionClassifier, resolve_device
from cytoloop.models.loading import load_model
from cytoloop.models.train import UNLABELED, claim_checkpoints, fit
from cytoloop.policy.drift import colour_statistics_of, write_colour_reference
from cytoloop.scoring.calibration import (
    calibrate,
    evaluations_needed,
    even_subset,
    fit_temperature,
    fit_timestep_weights,
    mixed_subset,
    trials_needed,
    tune_scoring,
    variance_prior,
)
from cytoloop.scoring.trials import TrialLog

SPLIT_FILE = "split.json"
SPLIT_FRACTIONS = {"train": 0.7, "val": 0.1, "test": 0.2}
MIN_CELLS_PER_CLASS = len(SPLIT_FRACTIONS)  # a class trains, calibrates and is tested on cells of its own
UNLABELED_PART = "unlabeled"  # a split's part of the cells a diffusion model learnt its null class from
SEEN_PARTS = ("train", "val", UNLABELED_PART)  # what a model learnt or was calibrated on
ModelKind = Literal["diffusion", "baseline"]


def build_model(kind: ModelKind, classes: list[str], settings: Settings) -> Trainable:
    """A new, untrained model of `kind` with the settings' architecture, its initial weights drawn from
    `train.seed` (they came from torch's seed of the moment, another in every process: two runs of one recipe
    started from different weights, and `--seed` did not change them)."""
    import torch

    from cytoloop.models.baseline import BaselineClassifier

    builders: dict[str, Callable[[], Trainable]] = {
        "diffusion": lambda: DiffusionClassifier(classes, settings.data, settings.diffusion, settings.scoring),
        "baseline": lambda: BaselineClassifier(classes, settings.data, settings.baseline),
    }
    if kind not in builders:
        raise UsageError(f"unknown model kind {kind!r}; valid: {', '.join(builders)}")
    with torch.random.fork_rng(devices=[]):  # the caller's CPU random state is left as it was (`fit` reseeds all)
        torch.manual_seed(settings.train.seed)
        return builders[kind]()


def label_indices(records: Sequence[CellRecord], classes: list[str]) -> np.ndarray:
    """Class indices for labelled records; a label outside `classes` is an error naming the cell and the classes."""
    index = {name: i for i, name in enumerate(classes)}
    out = np.empty(len(records), dtype=int)
    for i, record in enumerate(records):
        if record.label not in index:
            raise DatasetError(
                f"{record.cell_id}: label {record.label!r} is not one of the model's classes ({', '.join(classes)})"
            )
        out[i] = index[record.label]
    return out


def train_model(
    kind: ModelKind,
    records: Sequence[CellRecord],
    settings: Settings,
    out: Path,
    classes: list[str] | None = None,
    unlabeled: Sequence[CellRecord] = (),
    split_seed: int = 0,
    progress: bool = False,
    split: dict[str, list[CellRecord]] | None = None,
    replace_other_run: bool = False,
) -> tuple[Trainable, dict]:
    """Train, calibrate and save a model into `out`; returns it and a training report (also in out/training.json).

    Checkpoints in out/checkpoints resume this run only (`claim_checkpoints`); another run's are refused, or with
    `replace_other_run` (`train --overwrite` over a finished model) removed so that this run starts afresh.

    `records` are labelled cells; they are split train/val/test (stratified by label and domain) and the split is
    written to out/split.json. A caller that must fix the parts itself (a low-data experiment: exactly n training
    cells per class, its test cells elsewhere) passes `split` with "train", "val" and "test" parts of `records`
    instead. `unlabeled` cells train only the diffusion model's null class. A diffusion model
    ends tuned (`train.tune_scoring`): w(t), then the fastest elimination rule that agrees with exhaustive scoring,
    then the temperature for that rule, all on the validation part (out/tuning.json).
    """
    out = Path(out)
    classes = classes or sorted({r.label for r in records if r.label is not None})
    if len(classes) < 2:
        raise UsageError(f"a classifier needs at least 2 classes; these cells give {classes or 'none'}")
    counts = Counter(r.label for r in records)
    if few := {name: counts[name] for name in classes if counts[name] < MIN_CELLS_PER_CLASS}:
        # a misspelt label ("neutrophill") trained as a class of one cell, drawn for 1/K of every batch
        named = ", ".join(f"{name!r} ({n})" for name, n in sorted(few.items()))
        raise DatasetError(
            f"too few labelled cells for a class: {named}; each needs at least {MIN_CELLS_PER_CLASS} to be trained, "
            "calibrated and tested on. A misspelt label makes a class of its own: correct it in the manifest, or "
            "name the classes to train (--classes)"
        )
    if split is None:
        split = stratified_split(records, SPLIT_FRACTIONS, seed=split_seed, together=lambda r: cell_identity(r.path))
    elif set(split) != set(SPLIT_FRACTIONS):
        raise UsageError(f"a given split needs the parts {sorted(SPLIT_FRACTIONS)}, got {sorted(split)}")
    model = build_model(kind, classes, settings)
    run: dict = {"kind": kind, "classes": classes, "training cells": cells_fingerprint(split["train"])}
    learns = model.learns_from_unlabeled and bool(unlabeled)
    run["unlabeled cells"] = cells_fingerprint(unlabeled) if learns else None
    # before anything is written: a refused run must leave a finished model's split.json as it was
    claim_checkpoints(
        out / "checkpoints",
        run | training_settings(settings, kind),
        replace=replace_other_run,
        unrecorded_differs=_finished_run_differs(out, kind, classes, split["train"]),
    )
    retire_model(out)
    parts = dict(split)
    if learns:  # cells it learnt from (its null class): held out of its evaluation as its labelled ones are
        parts[UNLABELED_PART] = list(unlabeled)
    write_split(
        parts,
        out / SPLIT_FILE,
        data_root=_data_root(records),
        seed=split_seed,
        fingerprint=records_fingerprint(records),
    )
    train = load_cells(split["train"], settings.data, progress)
    val = load_cells(split["val"], settings.data, progress)
    unread = sorted(set(classes) - {r.label for r in train.records}) if train.records else []
    if unread:  # it trained as a class with no cell, its name never the answer
        raise DatasetError(
            f"no training cell of {', '.join(map(repr, unread))} could be read{train.skipped_note()}; are the "
            "images where the manifest says?"
        )
    if not train.records and not val.records:  # not "too few cells": none of them is there (a moved manifest)
        raise DatasetError(
            f"none of the {len(split['train']) + len(split['val'])} training and validation cells could be read"
            f"{train.skipped_note()}; are the images where the manifest says?"
        )
    if not val.records:
        raise DatasetError(
            f"no validation cells to calibrate on: {len(records)} cells are too few; every "
            "(label, domain) group needs at least 2 cells, and calibration wants many more"
            + (val.skipped_note() or train.skipped_note())
        )
    extra = load_cells(unlabeled, settings.data, progress) if learns else None
    images, labels = train.images, label_indices(train.records, classes)
    if extra is not None:
        images = np.concatenate([images, extra.images])
        labels = np.concatenate([labels, np.full(len(extra.images), UNLABELED)])

    network, loss = model.objective(settings.train)
    network.to(resolve_device(settings.scoring.device))  # a GPU where there is one; `fit` moves each batch there
    trained, result = fit(
        network,
        loss,
        images,
        labels,
        settings.train,
        settings.augment,
        checkpoint_dir=out / "checkpoints",
        progress=progress,
    )
    model.use_trained(trained)

    began = time.perf_counter()
    val_labels = label_indices(val.records, classes)
    tuning = None
    if isinstance(model, DiffusionClassifier) and settings.train.tune_scoring:
        tuning = tune_model_scoring(model, val.images, val_labels, progress=progress, fit_weights=True)
        write_text(out / "tuning.json", json.dumps(tuning, indent=1))
    else:
        calibrate(model, val.images, val_labels, progress=progress)
    skipped = train.skipped + val.skipped + (extra.skipped if extra else [])
    report = {
        "kind": kind,
        "classes": classes,
        "steps": settings.train.steps,
        "train_seconds": result.seconds,
        "resumed_from_step": result.resumed_from,
        "calibration_seconds": time.perf_counter() - began,
        "n_train": len(train.records),
        "n_val": len(val.records),
        "n_unlabeled": 0 if extra is None else len(extra.records),
        "n_skipped": len(skipped),
        "skipped": skipped,
        "domains": sorted({r.domain for r in records}),
        "data_sources": data_sources(records),
        "data_fingerprint": records_fingerprint(split["train"]),
        "temperature": model.temperature,
        "tuned_rule": None if tuning is None else tuning["chosen"],
        "history": result.history,
        "settings": settings.model_dump(mode="json"),
    }
    model.info.update({k: report[k] for k in ("steps", "train_seconds", "n_train", "domains", "data_fingerprint")})
    model.save(out)
    # the colours of the training cells: the reference stain drift is measured against (drift.py)
    write_colour_reference(out, colour_statistics_of(train.records, settings.data))
    write_text(out / "training.json", json.dumps(report, indent=1))
    if result.history:
        plots.learning_curve(
            [h["step"] for h in result.history],
            {"training loss": [h["loss"] for h in result.history]},
            out / "learning_curve.png",
            xlabel="step",
            ylabel="loss",
            title=f"{kind} training",
        )
    return model, report


# a run's settings that later legs may change without making it another run (`claim_checkpoints`); precision is the
# autocast of the forward pass only (weights, optimiser and EMA stay fp32)
LEG_SETTINGS = {"steps", "checkpoint_every", "log_every", "threads", "tune_scoring", "precision"}


def retire_model(out: Path) -> None:
    """Remove the model a new run in `out` replaces (`train --overwrite`), its model.json first, before anything
    of the new run is written: a replacing run that failed or was killed left the old weights loading beside the
    new split (evaluate scored them on their own training cells, "0 excluded"), and its recipe, card and tuning
    report describing a model no longer there. The checkpoints stay (`claim_checkpoints` judged them)."""
    for name in MODEL_ARTIFACTS:
        (Path(out) / name).unlink(missing_ok=True)


def _finished_run_differs(out: Path, kind: str, classes: list[str], train: Sequence[CellRecord]) -> str | None:
    """What of a finished model's run (its training.json) differs from this one: for checkpoints written before
    runs were recorded (`claim_checkpoints`); None when nothing is known to differ."""
    try:
        report = json.loads((Path(out) / "training.json").read_text())
    except (OSError, ValueError):
        return None
    known = (("kind", kind), ("classes", classes), ("data_fingerprint", records_fingerprint(train)))
    return ", ".join(name for name, value in known if report.get(name) != value) or None


def cells_fingerprint(records: Sequence[CellRecord]) -> str:
    """Which cells (by resolved path) with which labels: the same cells listed by two manifests (a lab's own, the
    combined one, whose ids differ by their folder) give one fingerprint."""
    import hashlib

    digest = hashlib.sha256()
    for line in sorted(f"{Path(r.path).resolve()}\t{r.label}\t{r.domain}" for r in records):
        digest.update(line.encode() + b"\n")
    return digest.hexdigest()[:16]


def training_settings(settings: Settings, kind: str) -> dict:
    """The settings a training run of `kind` trains with, flat ("train.lr": ...), for `claim_checkpoints`."""
    sections = {"data": settings.data, "augment": settings.augment, "train": settings.train}
    sections[kind] = getattr(settings, kind)
    return {
        f"{name}.{key}": value
        for name, section in sections.items()
        for key, value in section.model_dump(mode="json").items()
        if not (name == "train" and key in LEG_SETTINGS)
    }


def _data_root(records: Sequence[CellRecord]) -> str:
    record = records[0]
    return str(record.path)[: -len(record.cell_id)].rstrip("/")


def _model_split(model_dir: Path) -> dict | None:
    """The model's split file, or None when it has none."""
    split_path = Path(model_dir) / SPLIT_FILE
    if not split_path.is_file():
        return None
    return read_split_file(split_path)


def _in_parts(records: Sequence[CellRecord], meta: dict, parts: Sequence[str]) -> np.ndarray:
    """Which records are cells of the given parts of a model's split.

    A split names cells by their path relative to the dataset the model was trained from. The same cell may be
    read through another manifest (the lab's own, or the combined one of all labs, whose ids carry the lab's
    folder) or from another checkout: a record is that cell when its path ends with the split's id. Matching by
    path suffix, not by the dataset root, is what keeps a model's training cells out of its evaluation however
    its data is pointed at.
    """
    # an id naming a file outside the manifest's folder ('../imgs/a.png') or by absolute path is still the end of
    # that file's path without its leading '../' and '/': as written, it matched no record, and the model was
    # evaluated on its own training cells without a word
    ids = {
        "/".join(p for p in PurePosixPath(i).parts if p not in ("/", ".."))
        for part in parts
        for i in meta["parts"].get(part, [])
    }
    depth = max((i.count("/") + 1 for i in ids), default=0)
    found = np.zeros(len(records), dtype=bool)
    for n, record in enumerate(records):
        pieces = Path(record.path).as_posix().split("/")
        found[n] = any("/".join(pieces[-k:]) in ids for k in range(1, min(depth, len(pieces)) + 1))
    return found


def held_out(records: Sequence[CellRecord], model_dir: Path, part: str | None = None) -> tuple[list[CellRecord], int]:
    """The records a model may be evaluated on: without its train and val cells and the unlabeled cells it learnt
    its null class from (evaluated on another lab's cells it had trained on unlabeled, it said "0 excluded"), or
    only the given part of its split (cells are matched by path, whichever manifest lists them: `_in_parts`).
    Returns (records, number excluded)."""
    meta = _model_split(model_dir)
    if meta is None:
        if part:
            raise DatasetError(f"{model_dir}: the model has no {SPLIT_FILE}; cannot select part {part!r}")
        return list(records), 0
    if part:
        if part not in meta["parts"]:
            raise DatasetError(f"unknown split part {part!r}; valid: {', '.join(meta['parts'])}")
        inside = _in_parts(records, meta, [part])
        if records and not inside.any():
            raise DatasetError(
                f"none of these {len(records)} cells is in part {part!r} of the model's split "
                f"(it was made from {meta.get('meta', {}).get('data_root') or 'a dataset it does not name'})"
            )
        kept = [r for r, keep in zip(records, inside) if keep]
        return kept, len(records) - len(kept)
    seen = _in_parts(records, meta, list(SEEN_PARTS))
    kept = [r for r, used in zip(records, seen) if not used]
    return kept, len(records) - len(kept)


def outside_held_out(records: Sequence[CellRecord], model_dir: Path) -> tuple[list[CellRecord], int]:
    """The records in neither the validation nor the test part of the model's split, and how many were left out:
    the cells a model fine-tuned from it may train on, so that its parent's held-out figures (and its own, on the
    split it carries, `carry_split`) stay held out."""
    meta = _model_split(model_dir)
    if meta is None:
        return list(records), 0
    held = _in_parts(records, meta, [part for part in ("val", "test") if part in meta["parts"]])
    kept = [r for r, h in zip(records, held) if not h]
    return kept, len(records) - len(kept)


def seen_by(records: Sequence[CellRecord], model_dir: Path) -> list[CellRecord]:
    """The records in the train, val or unlabeled part of the model's split: cells it learnt or was calibrated on,
    which a set it is judged on must not hold (`finetune.frozen_sets`' `not_frozen`). None when it carries no
    split."""
    meta = _model_split(model_dir)
    if meta is None:
        return []
    seen = _in_parts(records, meta, [part for part in SEEN_PARTS if part in meta["parts"]])
    return [r for r, s in zip(records, seen) if s]


def carry_split(parent_dir: Path, out: Path, train: Sequence[CellRecord], val: Sequence[CellRecord]) -> None:
    """Write `out`'s split: its parent's, with this fine-tune's training cells added to train and its calibration
    cells to val, each cell in one part only (train before val before test: a frozen calibration cell that was its
    parent's test cell is no test cell of this one). A fine-tuned version carried none: `evaluate` on it excluded
    nothing, scoring it on cells its parent (whose weights it starts from) trained on, and `--part test` failed.
    Nothing when the parent has none."""
    meta = _model_split(parent_dir)
    if meta is None:
        return
    parts = {name: set(ids) for name, ids in meta["parts"].items()}
    parts.setdefault("train", set()).update(r.cell_id for r in train)
    parts.setdefault("val", set()).update(r.cell_id for r in val)
    placed: set[str] = set()
    for name in ("train", "val", *[p for p in parts if p not in ("train", "val")]):
        parts[name] -= placed
        placed |= parts[name]
    payload = {
        "meta": {**meta.get("meta", {}), "carried_from": str(parent_dir)},
        "parts": {name: sorted(ids) for name, ids in parts.items()},
    }
    write_text(Path(out) / SPLIT_FILE, json.dumps(payload, indent=1))


def outside_split(records: Sequence[CellRecord], model_dir: Path) -> list[CellRecord]:
    """The records in none of the model's split parts (train, val, test): cells a model may be tuned on without
    labels and without touching the cells it is evaluated on."""
    meta = _model_split(model_dir)
    if meta is None:
        return list(records)
    used = _in_parts(records, meta, list(meta["parts"]))
    return [r for r, u in zip(records, used) if not u]


def evaluate_predictions(
    predictions: Predictions,
    labels: np.ndarray,
    classes: list[str],
    seconds: float,
    n_boot: int = 1000,
) -> dict:
    """The evaluation metrics from predictions on labelled cells, each with a 95 % bootstrap interval over the
    cells, resampled within each class (`intervals`: metric -> [low, high]; per-class recall as `recall <class>`)."""
    predicted = predictions.labels
    correct = predicted == labels
    recall = metrics.per_class_recall(labels, predicted, len(classes))
    probs, confidence = predictions.probs, predictions.confidence

    def statistics(index: np.ndarray) -> dict[str, float]:
        y, guess = labels[index], predicted[index]
        per_class = metrics.per_class_recall(y, guess, len(classes))
        values = {
            "accuracy": float(np.mean(correct[index])),
            "balanced_accuracy": float(np.nanmean(per_class)),
            "ece": metrics.expected_calibration_error(probs[index], y, n_bins=15),
            "nll": metrics.negative_log_likelihood(probs[index], y),
            "accuracy_at_90_coverage": metrics.selective_accuracy(confidence[index], correct[index], 0.9),
        }
        values.update({f"recall {c}": per_class[i] for i, c in enumerate(classes) if not np.isnan(recall[i])})
        return values

    # ECE: the basic interval (a resample biases it upward, and the percentile interval leans upward with it)
    intervals = metrics.bootstrap_intervals(statistics, len(labels), n_boot=n_boot, strata=labels, basic=("ece",))
    return {
        "n_cells": int(len(labels)),
        "accuracy": metrics.accuracy(labels, predicted),
        "balanced_accuracy": metrics.balanced_accuracy(labels, predicted, len(classes)),
        "per_class_recall": {c: (None if np.isnan(r) else float(r)) for c, r in zip(classes, recall)},
        "ece": metrics.expected_calibration_error(predictions.probs, labels, n_bins=15),
        "nll": metrics.negative_log_likelihood(predictions.probs, labels),
        "brier": metrics.brier_score(predictions.probs, labels),
        "accuracy_at_90_coverage": metrics.selective_accuracy(predictions.confidence, correct, 0.9),
        "mean_confidence": float(predictions.confidence.mean()),
        "denoiser_evals_per_cell": float(predictions.evals.mean()),
        "denoiser_evals_p95": float(np.percentile(predictions.evals, 95)),
        "cells_per_second": float(len(labels) / seconds) if seconds > 0 else None,
        "confusion_matrix": metrics.confusion_matrix(labels, predicted, len(classes)).tolist(),
        "intervals": {name: list(bounds) for name, bounds in intervals.items()},
    }


def anomaly_metrics(predictions: Predictions, is_anomaly: np.ndarray) -> dict:
    """AUROC of the model's anomaly score, and of every alternative score it reports, for anomalies vs normal, each
    with a 95 % bootstrap interval, anomalies and normal cells resampled apart (`anomaly_auroc_intervals`). An
    alternative score that is not finite on every cell was not measured on them (the null-class ratio with the
    null class off: NaN; the class gap of a cell left one candidate class: -inf): it is left out and named under
    `anomaly_scores_not_measured` (it failed the whole evaluation, and a gate with an anomaly set)."""
    alternatives = {name: values for name, values in predictions.extra.items() if name.startswith("anomaly")}
    unmeasured = sorted(name for name, values in alternatives.items() if not np.isfinite(values).all())
    scores = {"anomaly": predictions.anomaly, **{n: v for n, v in alternatives.items() if n not in unmeasured}}

    def statistics(index: np.ndarray) -> dict[str, float]:
        positive = is_anomaly[index]
        if positive.all() or not positive.any():
            return {name: float("nan") for name in scores}
        return {name: metrics.auroc(values[index], positive) for name, values in scores.items()}

    intervals = metrics.bootstrap_intervals(statistics, len(is_anomaly), strata=is_anomaly)
    result: dict[str, Any] = {
        "anomaly_auroc": metrics.auroc(predictions.anomaly, is_anomaly),
        "anomaly_n": int(len(is_anomaly)),
        "anomaly_n_positive": int(is_anomaly.sum()),
    }
    result["anomaly_auroc_by_score"] = {
        name: metrics.auroc(values, is_anomaly) for name, values in scores.items() if name != "anomaly"
    }
    result["anomaly_auroc_intervals"] = {name: list(bounds) for name, bounds in intervals.items()}
    if unmeasured:
        result["anomaly_scores_not_measured"] = unmeasured
    return result


def evaluate_model(
    model: Classifier,
    records: Sequence[CellRecord],
    json_out: Path | None = None,
    anomaly_records: Sequence[CellRecord] = (),
    anomaly_label: str = "blast",
    excluded: int = 0,
    progress: bool = False,
    per_cell: bool = False,
    allowed: list[str] | None = None,
) -> dict:
    """Evaluate on labelled cells (and optionally anomaly vs normal cells); write JSON and PNG plots beside it.

    With `per_cell`, the report also keeps each cell's id, label index and probabilities (`per_cell`), and each
    anomaly-set cell's id, whether it is an anomaly and its anomaly score (`per_cell_anomaly`), so two models
    evaluated on the same cells can be compared cell by cell (the promotion gate's intervals). With
    `allowed` (a site's classes), every cell is decided among those, as the site is served (`allowed_classes`)."""
    mask = class_mask(model.classes, allowed)
    cells = load_cells(records, model.data_config, progress)
    if not cells.records:
        raise DatasetError(f"none of the {len(records)} evaluation cells could be read{cells.skipped_note()}")
    labels = label_indices(cells.records, model.classes)
    began = time.perf_counter()
    predictions = model.predict(cells.images, progress=progress, candidates=candidate_rows(mask, len(cells.images)))
    seconds = time.perf_counter() - began
    report: dict[str, Any] = {
        "model_kind": model.kind,
        "classes": model.classes,
        "allowed_classes": allowed,
        "n_skipped": len(cells.skipped),
        "skipped": cells.skipped,
        "n_excluded_seen_in_training": excluded,
    }
    report.update(evaluate_predictions(predictions, labels, model.classes, seconds))
    domains = np.array([r.domain for r in cells.records])
    if len(set(domains)) > 1:  # several labs: each on the classes it has (balanced accuracy skips absent classes)
        report["per_domain"] = {}
        for domain in sorted(set(domains)):
            part = np.flatnonzero(domains == domain)
            figures = evaluate_predictions(predictions.subset(part), labels[part], model.classes, seconds)
            report["per_domain"][domain] = {
                k: figures[k]
                for k in ("n_cells", "accuracy", "balanced_accuracy", "ece", "nll", "per_class_recall", "intervals")
            }
    if per_cell:
        report["per_cell"] = {
            "cells": [r.cell_id for r in cells.records],
            "labels": labels.tolist(),
            "probs": np.round(predictions.probs, 6).tolist(),
        }
    if anomaly_records:
        anomaly_cells = load_cells(anomaly_records, model.data_config, progress)
        is_anomaly = np.array([r.label == anomaly_label for r in anomaly_cells.records])
        if is_anomaly.all() or not is_anomaly.any():
            raise DatasetError(f"anomaly data needs both '{anomaly_label}' cells and other cells")
        candidates = candidate_rows(mask, len(anomaly_cells.images))
        anomaly_predictions = model.predict(anomaly_cells.images, progress=progress, candidates=candidates)
        report.update(anomaly_metrics(anomaly_predictions, is_anomaly))
        if per_cell:
            report["per_cell_anomaly"] = {
                "cells": [r.cell_id for r in anomaly_cells.records],
                "positive": is_anomaly.tolist(),
                "scores": anomaly_predictions.anomaly.tolist(),  # unrounded: ties would move the AUROC
            }
        report["n_skipped"] += len(anomaly_cells.skipped)
        report["skipped"] += anomaly_cells.skipped
    if json_out is not None:
        json_out = Path(json_out)
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(report, indent=1))
        stem = json_out.with_suffix("")
        report["plots"] = [
            str(
                plots.reliability_diagram(
                    predictions.probs, labels, Path(f"{stem}.reliability.png"), title=f"{model.kind} reliability"
                )
            ),
            str(
                plots.confusion_matrix_plot(
                    labels,
                    predictions.labels,
                    model.classes,
                    Path(f"{stem}.confusion.png"),
                    title=f"{model.kind} confusion",
                )
            ),
        ]
        json_out.write_text(json.dumps(report, indent=1))
    return report


def tune_model_scoring(
    model: DiffusionClassifier,
    images: np.ndarray,
    labels: np.ndarray,
    progress: bool = False,
    unlabeled: np.ndarray | None = None,
    prior_cells: float = 0.0,
    fit_weights: bool = False,
    allowed: np.ndarray | None = None,
) -> dict:
    """Tune a diffusion model's adaptive scoring on labelled validation cells, in place; returns a report.

    Runs `tuning_trials` exhaustive trials per cell (at most `calibration_cells` labelled ones, drawn evenly over
    classes; no null class: the decision never uses it), picks the
    cheapest elimination rule agreeing with them on `tuning_agreement` of cells (`calibration.tune_scoring`),
    and refits the temperature for the scores the tuned rule produces (fewer trials, noisier errors), on at most
    `temperature_cells` of the labelled cells (a draw keeping the class mix).
    Agreement needs no labels, so `unlabeled` cells (from where the model will be used) join the tuning set:
    with 65 validation cells a 0.99 target allows no single disagreement. The temperature uses labelled cells only;
    with `prior_cells` the model's current temperature (a fine-tune's parent's) counts as that many cells.

    With `fit_weights` the timestep weights w(t) are fitted first, from the first `calibration_trials` trials of
    the same exhaustive pass: a cell's trials come from its own generator, so they are exactly the trials
    `calibration.fit_weights` would run on the same cells, and one pass over the denoiser serves both. The
    report's `validation` holds ECE, NLL and Brier of the tuned, recalibrated model on the cells the temperature
    was fitted on (from their scores), so a caller need not score them again.

    `allowed` (booleans over the classes, a site's, `models.base.class_mask`): the temperature is fitted on cells
    decided among those classes, as the site is served; the rule is tuned on all classes either way.
    """
    config = model.scoring_config
    prior = model.temperature if prior_cells > 0 else None
    trials = max(config.tuning_trials, config.calibration_trials) if fit_weights else config.tuning_trials
    exhaustive = config.model_copy(update={"min_trials": trials, "max_trials": trials, "score_null_class": False})
    labelled = even_subset(labels, config.calibration_cells, config.seed)
    tuning_images = images[labelled]
    if unlabeled is not None and len(unlabeled):
        tuning_images = np.concatenate([tuning_images, unlabeled])
    if fit_weights:
        model.timestep_weights = None
    logs = model.score(tuning_images, exhaustive, progress=progress).logs
    if fit_weights:
        first = [_first_trials(log, config.calibration_trials) for log in logs[: len(labelled)]]
        model.timestep_weights = fit_timestep_weights(first, labels[labelled], config.timestep_bins).tolist()
    logs = [_first_trials(log, config.tuning_trials) for log in logs]
    weights = np.ones(config.timestep_bins) if model.timestep_weights is None else np.asarray(model.timestep_weights)
    tuned, rows = tune_scoring(logs, weights, config, config.tuning_agreement)
    kept = tuned is config  # no rule met the target
    if kept and fit_weights and config.variance_prior is not None:  # the old rule stays, but its variance prior
        # was fitted under the old weights (`calibration.fit_weights` refits it)
        tuned = config.model_copy(update={"variance_prior": variance_prior(logs, weights)})
    model.scoring_config = tuned
    fitting = mixed_subset(len(images), config.temperature_cells, config.seed)
    final = model.score(images[fitting], progress=progress, candidates=candidate_rows(allowed, len(fitting)))
    model.temperature = fit_temperature(-final.class_error, labels[fitting], prior, prior_cells)
    probs = model.predictions_from_scores(final).probs
    needed = np.array([trials_needed(log, weights) for log in logs])
    null_trials = tuned.null_trials if tuned.score_null_class else 0
    evals_needed = np.array([evaluations_needed(log, weights, null_trials) for log in logs])
    prior_trials = tuned.variance_prior_trials if tuned.variance_prior is not None else 0.0
    chosen = [
        r
        for r in rows
        if not kept
        and (r["variance_prior_trials"], r["min_trials"], r["elimination_p"])
        == (prior_trials, tuned.min_trials, tuned.elimination_p)
    ]
    return {
        "n_cells": int(len(labelled)),
        "n_unlabeled": int(len(tuning_images) - len(labelled)),
        "n_temperature_cells": int(len(fitting)),
        "chosen": chosen[0] if chosen else None,  # None: no candidate met the target, scoring left unchanged
        "candidates": rows,
        "trials_needed_mean": float(needed.mean()),
        "trials_needed_p95": float(np.percentile(needed, 95)),
        "evaluations_needed_mean": float(evals_needed.mean()),
        "temperature": model.temperature,
        "validation": {
            "ece": metrics.expected_calibration_error(probs, labels[fitting], n_bins=15),
            "nll": metrics.negative_log_likelihood(probs, labels[fitting]),
            "brier": metrics.brier_score(probs, labels[fitting]),
        },
    }


def _first_trials(log: TrialLog, n: int) -> TrialLog:
    return TrialLog(log.strata[:n], log.errors[:n], log.null_errors[:n])


def distill_model(
    teacher_dir: Path,
    records: Sequence[CellRecord],
    settings: Settings,
    out: Path,
    unlabeled: Sequence[CellRecord] = (),
    tune: bool = True,
    progress: bool = False,
    replace_other_run: bool = False,
) -> tuple[CascadeClassifier, dict]:
    """Build a cascade from a trained diffusion model: (tune its scoring), distil a student, save into `out`
    (checkpoints as in `train_model`).

    The student learns from the teacher's train part (labelled) and from `unlabeled` cells, minus any cell of the
    teacher's validation or test part; its temperature (and, if asked, the threshold) comes from the validation
    part. The teacher's split is copied into `out`, so evaluating the cascade excludes the same cells.
    """
    from cytoloop.serving.model_source import local_ref

    teacher = load_model(teacher_dir)
    if not isinstance(teacher, DiffusionClassifier):
        raise UsageError(f"{teacher_dir} is a {teacher.kind} model; the teacher must be a diffusion model")
    out = Path(out)
    train_records, _ = held_out(records, teacher_dir, part="train")
    val_records, _ = held_out(records, teacher_dir, part="val")
    split = _model_split(teacher_dir) or {"parts": {}}
    unlabeled = [r for r, reserved in zip(unlabeled, _in_parts(unlabeled, split, ["val", "test"])) if not reserved]
    run: dict = {"kind": "cascade", "teacher": local_ref(Path(teacher_dir)).version, "tuned": tune}
    run |= {"training cells": cells_fingerprint(train_records), "unlabeled cells": cells_fingerprint(unlabeled)}
    student = {k: v for k, v in training_settings(settings, "baseline").items() if not k.startswith("data.")}
    claim_checkpoints(out / "checkpoints", run | student, replace=replace_other_run)  # before the teacher's tuning
    train = load_cells(train_records, teacher.data_config, progress)
    val = load_cells(val_records, teacher.data_config, progress)
    val_labels = label_indices(val.records, teacher.classes)
    report: dict = {"teacher": str(teacher_dir)}
    if tune:
        report["tuning"] = tune_model_scoring(teacher, val.images, val_labels, progress)
    images, labels = train.images, label_indices(train.records, teacher.classes)
    if unlabeled:
        extra = load_cells(unlabeled, teacher.data_config, progress)
        images = np.concatenate([images, extra.images])
        labels = np.concatenate([labels, np.full(len(extra.images), UNLABELED)])
    cascade, report["distillation"] = distill(
        teacher,
        images,
        labels,
        val.images,
        val_labels,
        settings.cascade,
        settings.train,
        settings.augment,
        settings.baseline,
        checkpoint_dir=out / "checkpoints",
        progress=progress,
    )
    cascade.save(out)
    (out / SPLIT_FILE).write_text((Path(teacher_dir) / SPLIT_FILE).read_text())
    (out / "distill.json").write_text(json.dumps(report, indent=1))
    return cascade, report

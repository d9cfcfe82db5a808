"""Fine-tuning a registered model on new labels: the pieces the Ray Train job and the benchmarks share.

A fine-tune starts from a trained model (the champion), keeps its classes and preprocessing, and continues
training with `train.fit` on the new labelled cells (and, for the diffusion model, the unlabeled pool, which
trains the null class). Afterwards the calibration is refitted on a frozen validation set, and a diffusion model's
scoring rule tuned again on it (`train.tune_scoring`), so every version is served with its own tuned rule.
Nothing here knows about Ray or MLflow: `jobs/finetune.py` runs `finetune` on each Ray Train worker and does the
registering.
"""

from __future__ import annotations

import csv
import glob
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cytoloop.config import AugmentConfig, DataConfig, Settings, TrainConfig
from cytoloop.data.preprocess import load_cells
from cytoloop.data.records import (
    CellRecord,
    DatasetError,
    cell_identity,
    load_records,
    read_manifest,
    stratified_split,
)
from cytoloop.evaluation import metrics
from cytoloop.files import locked, replaced, umask, write_text
from cytoloop.models.base import Classifier, Trainable, candidate_rows, class_mask
from cytoloop.models.train import UNLABELED, TrainResult, fit
from cytoloop.policy.drift import read_colour_reference
from cytoloop.scoring.calibration import calibrate
from cytoloop.workflows import label_indices

FROZEN_PARTS = ("val", "eval")


@dataclass
class FrozenSets:
    """The cells a scope trains on, and the frozen cells it calibrates (`val`) and is judged (`eval`) on."""

    train: list[CellRecord]
    val: list[CellRecord]
    eval: list[CellRecord]


def write_manifest(records: Sequence[CellRecord], path: Path) -> Path:
    """A manifest CSV with absolute paths, readable by `data.load_records` from anywhere (replaced whole)."""
    path = Path(path)
    with replaced(path, newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "domain", "source"])
        for r in records:
            writer.writerow([str(Path(r.path).resolve()), r.label or "", r.domain, r.source])
    return path


def frozen_directory(home: Path, site: str | None) -> Path:
    """Where a scope (the global model, or one site's) keeps its frozen val/eval sets."""
    return Path(home).resolve() / "frozen" / (site or "global")


def freeze(directory: Path, val: Sequence[CellRecord], eval_: Sequence[CellRecord]) -> bool:
    """Freeze a scope's val/eval sets from cells the caller chose (say, a lab's first audited labels) instead of
    letting the first fine-tune cut them from its labels. Sets already frozen stay as they are; returns whether
    these were written."""

    def chosen() -> Mapping[str, Sequence[CellRecord]]:
        for part, cells in (("val", val), ("eval", eval_)):
            if not any(r.label is not None for r in cells):
                raise DatasetError(f"a frozen {part} set needs labelled cells")
        return {"val": val, "eval": eval_}

    return _freeze_once(Path(directory), chosen)


def _freeze_once(directory: Path, make: Callable[[], Mapping[str, Sequence[CellRecord]]]) -> bool:
    """Write the sets `make()` returns as `directory`'s frozen sets unless the scope has them; whether it wrote.

    Both sets or neither: they are written into a folder of their own beside the scope's and that folder is
    renamed into place, so a process killed between the two files leaves no scope with half a freeze (the next
    run froze a new val set, or failed on the missing eval set). And once: two first fine-tunes of one scope at
    once (the ML backend's retrain and a scheduled one) each froze its own split, and one trained on cells the
    other's eval set then judged every later version on; the check and the write hold the scope's lock."""
    with locked(directory.parent / f".{directory.name}.lock"):
        if _is_frozen(directory):
            return False
        sets = make()
        if directory.is_dir() and any(directory.iterdir()):
            found = ", ".join(sorted(p.name for p in directory.iterdir()))
            raise DatasetError(
                f"{directory} holds files but no frozen sets ({found}): move them away to freeze this scope's sets"
            )
        for stale in directory.parent.glob(f".{glob.escape(directory.name)}.*.tmp"):  # of freezes killed mid-way
            shutil.rmtree(stale, ignore_errors=True)  # (the lock is held: none is being written now)
        staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp", dir=directory.parent))
        try:
            os.chmod(staging, 0o777 & ~umask())  # as `mkdir` makes a folder (mkdtemp's is owner-only)
            for part in FROZEN_PARTS:
                write_manifest(sets[part], staging / f"{part}.csv")
            if directory.is_dir():
                directory.rmdir()  # empty, as checked above
            os.rename(staging, directory)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return True


def _is_frozen(directory: Path) -> bool:
    """Whether `directory` holds a scope's frozen sets; a DatasetError if it holds only some of them (never written
    so since the sets are renamed into place together: a file removed by hand), as no set can be frozen again
    without the gate judging later versions on other cells than earlier ones."""
    present = [part for part in FROZEN_PARTS if (directory / f"{part}.csv").is_file()]
    if present and len(present) < len(FROZEN_PARTS):
        missing = sorted(set(FROZEN_PARTS) - set(present))
        raise DatasetError(
            f"{directory} holds the frozen {', '.join(present)} set but not {', '.join(missing)}: restore it from a "
            "backup, or remove the folder to freeze new sets (the gate then judges on other cells than before)"
        )
    return bool(present)


def frozen_elsewhere(home: Path, site: str | None) -> list[CellRecord]:
    """Every other scope's frozen val/eval cells (`frozen_directory`). A global retrain trains on the label store's
    export, which holds every site's labels: without these left out it trained on each site's frozen cells, and
    that site's next adaptation, from the new global champion, was calibrated and gated on cells its parent had
    already seen (against a site champion that had not)."""
    root, mine = Path(home).resolve() / "frozen", frozen_directory(home, site)
    records: list[CellRecord] = []
    scopes = (p for p in root.glob("*") if p.is_dir() and p != mine and not p.name.startswith("."))  # not staging
    for directory in sorted(scopes):
        for part in FROZEN_PARTS:
            if (directory / f"{part}.csv").is_file():
                records += read_manifest(directory / f"{part}.csv")
    return records


def frozen_sets(
    records: Sequence[CellRecord],
    directory: Path,
    val_fraction: float,
    eval_fraction: float,
    seed: int = 0,
    also_held: Sequence[CellRecord] = (),
    not_frozen: Sequence[CellRecord] = (),
) -> FrozenSets:
    """Split labelled `records` into training cells and the frozen val/eval sets kept in `directory`.

    The first call freezes a stratified split of `records` into `directory/{val,eval}.csv`; every later call
    reuses those files, so calibration and the promotion gate always see the same cells and no frozen cell is
    ever trained on, whatever new labels arrive. `also_held`: cells no scope may train on either (other scopes'
    frozen sets, `frozen_elsewhere`). `not_frozen`: cells the first freeze never puts in a frozen set (the
    parent's training and calibration cells, `workflows.seen_by`; the job then trains on the first and on neither
    the parent's calibration nor its test cells): the gate compares every challenger with the champion on the
    frozen cells, and a champion judged on cells it learnt (or was calibrated on) looked better than it is.
    """
    directory = Path(directory)
    paths = {part: directory / f"{part}.csv" for part in FROZEN_PARTS}
    labelled = [r for r in records if r.label is not None]
    if not labelled:
        raise DatasetError("no labelled cells to fine-tune on")

    def split() -> Mapping[str, Sequence[CellRecord]]:
        seen = {cell_identity(r.path) for r in not_frozen}
        candidates = [r for r in labelled if cell_identity(r.path) not in seen] if seen else labelled
        parts = stratified_split(
            candidates,
            {"train": 1 - val_fraction - eval_fraction, "val": val_fraction, "eval": eval_fraction},
            seed=seed,
            together=lambda r: cell_identity(r.path),
        )
        for part in FROZEN_PARTS:
            if not parts[part]:
                others = len(labelled) - len(candidates)
                why = f" ({others} others are the parent's training or calibration cells)" if others else ""
                raise DatasetError(f"too few labelled cells ({len(candidates)}){why} to freeze a {part} set")
        return parts

    _freeze_once(directory, split)
    frozen = {part: read_manifest(paths[part]) for part in FROZEN_PARTS}
    held = {cell_identity(r.path) for part in [*frozen.values(), also_held] for r in part}
    train = [r for r in labelled if cell_identity(r.path) not in held]
    if not train:
        raise DatasetError(
            f"every labelled cell is in a frozen set ({directory} or another scope's); nothing to train on"
        )
    return FrozenSets(train, frozen["val"], frozen["eval"])


def not_judged_on(
    pool: Sequence[CellRecord], judged: Sequence[CellRecord], manifests: Sequence[Path]
) -> list[CellRecord]:
    """The unlabeled `pool` without the cells models are calibrated and judged on: `judged` (the frozen sets) and
    the cells of `manifests` (`Settings.judged_manifests`: the gates' audited cells and the anomaly set). The pool
    trains the diffusion model's null class, and the gate scores the anomaly AUROC on the anomaly set: trained on,
    a challenger's anomaly figure was measured on its own training cells."""
    held = {cell_identity(r.path) for r in judged}
    for manifest in manifests:
        held |= {cell_identity(r.path) for r in load_records(manifest)}
    return [r for r in pool if cell_identity(r.path) not in held]


def training_arrays(
    model: Trainable, records: Sequence[CellRecord], unlabeled: Sequence[CellRecord] = ()
) -> tuple[np.ndarray, np.ndarray, list[CellRecord]]:
    """Preprocessed training cells and their class indices (UNLABELED for the pool, for a model that learns from
    unlabeled cells), and the
    labelled records that could be read. A label outside the model's classes is an error naming the cell."""
    cells = load_cells(records, model.data_config)
    if not cells.records:
        raise DatasetError(f"none of the {len(records)} training cells could be read{cells.skipped_note()}")
    images, labels = cells.images, label_indices(cells.records, model.classes)
    if model.learns_from_unlabeled and unlabeled:
        pool = load_cells(unlabeled, model.data_config)
        images = np.concatenate([images, pool.images])
        labels = np.concatenate([labels, np.full(len(pool.images), UNLABELED)])
    return images, labels, cells.records


def shard(labels: np.ndarray, rank: int, world: int) -> np.ndarray:
    """Indices of worker `rank`'s share: each class dealt round-robin; a class with fewer cells than workers goes
    whole to every worker, so each worker's balanced sampler sees every class."""
    index = []
    for group in np.unique(labels):
        members = np.flatnonzero(labels == group)
        index.append(members if len(members) < world else members[rank::world])
    return np.sort(np.concatenate(index))


def finetune_configs(settings: Settings, adapt: bool) -> tuple[TrainConfig, AugmentConfig]:
    """The training budget of a retrain (`finetune`) or a hospital adaptation (`adapt`, stronger stain jitter)."""
    section = settings.adapt if adapt else settings.finetune
    warmup = min(settings.finetune.warmup_steps, section.steps // 2)
    train = settings.train.model_copy(update={"steps": section.steps, "lr": section.lr, "warmup_steps": warmup})
    augment = settings.augment
    if adapt:
        augment = augment.model_copy(
            update={"hed_sigma": settings.adapt.hed_sigma, "hed_bias": settings.adapt.hed_bias}
        )
    return train, augment


def adapted_data_config(model: Classifier, model_dir: Path, stain_normalize: bool) -> DataConfig:
    """The preprocessing of a site model: the champion's, with stain normalisation to the champion's training
    colours if asked and not already normalising (a normalising champion already maps every cell to its target)."""
    config = model.data_config
    if not stain_normalize or config.stain_normalization == "reinhard":
        return config
    reference = read_colour_reference(model_dir)
    if reference is None or not len(reference):
        raise DatasetError(f"{model_dir}: the model carries no training colour reference to normalise towards")
    return config.model_copy(
        update={"stain_normalization": "reinhard", "stain_reference": tuple(float(v) for v in reference.mean(axis=0))}
    )


def finetune(
    model: Trainable,
    images: np.ndarray,
    labels: np.ndarray,
    train_config: TrainConfig,
    augment_config: AugmentConfig,
    checkpoint_dir: Path | None = None,
    on_log: Callable[[dict], None] | None = None,
    wrap: Callable | None = None,
    stream: int = 0,
) -> TrainResult:
    """Continue training `model`'s network in place (it ends holding the EMA weights); resumable like `fit`.

    `wrap` wraps the network before training (Ray Train's `prepare_model` for data-parallel workers), and such
    a worker passes its rank as `stream` (its own random draws, `fit`).
    """
    network, loss = model.objective(train_config)
    trained, result = fit(
        wrap(network) if wrap else network,
        loss,
        images,
        labels,
        train_config,
        augment_config,
        checkpoint_dir=checkpoint_dir,
        on_log=on_log,
        stream=stream,
    )
    model.use_trained(trained)
    return result


def _calibration_figures(
    model: Classifier, images: np.ndarray, labels: np.ndarray, allowed: np.ndarray | None
) -> dict[str, float]:
    probs = model.predict(images, candidates=candidate_rows(allowed, len(images))).probs
    return {
        "ece": metrics.expected_calibration_error(probs, labels, n_bins=15),
        "nll": metrics.negative_log_likelihood(probs, labels),
        "brier": metrics.brier_score(probs, labels),
    }


def recalibrate(
    model: Trainable,
    val_records: Sequence[CellRecord],
    prior_cells: float = 0.0,
    tune: bool = False,
    tuning_out: Path | None = None,
    tuning_cells: int | None = None,
    allowed: list[str] | None = None,
    progress: bool = False,
) -> dict[str, float]:
    """Refit the calibration on the frozen validation cells; ECE, NLL and Brier before (the parent's calibration
    on the new weights) and after, as `<metric>_before` / `<metric>_after`. The parent's temperature counts as
    `prior_cells` validation cells (`calibration.fit_temperature`).

    With `tune` a diffusion model's scoring rule is tuned again too (`workflows.tune_model_scoring`: w(t), the
    fastest elimination rule that agrees with exhaustive scoring on these cells, then the temperature), so a
    fine-tuned version is served with a rule fitted to its own weights, not its parent's; the tuning report goes
    to `tuning_out` (the model directory's tuning.json) when given. `tuning_cells` caps the validation cells of its
    exhaustive passes (below the model's own `scoring.calibration_cells`), which the model keeps.

    `allowed`: the classes of the site the model will serve (`SiteConfig.classes`); the temperature is fitted, and
    the figures measured, on cells decided among them, as the site is served."""
    from cytoloop.models.diffusion import DiffusionClassifier
    from cytoloop.workflows import tune_model_scoring

    cells = load_cells(val_records, model.data_config)
    if not cells.records:
        raise DatasetError(
            f"none of the {len(val_records)} frozen validation cells could be read{cells.skipped_note()}"
        )
    labels = label_indices(cells.records, model.classes)
    mask = class_mask(model.classes, allowed)
    before = _calibration_figures(model, cells.images, labels, mask)
    tuned = None
    if tune and isinstance(model, DiffusionClassifier):
        own = model.scoring_config.calibration_cells
        if tuning_cells is not None:
            capped = tuning_cells if own is None else min(own, tuning_cells)
            model.scoring_config = model.scoring_config.model_copy(update={"calibration_cells": capped})
        tuning = tune_model_scoring(
            model, cells.images, labels, prior_cells=prior_cells, fit_weights=True, allowed=mask, progress=progress
        )
        model.scoring_config = model.scoring_config.model_copy(update={"calibration_cells": own})
        tuned = tuning["chosen"]
        after = tuning["validation"]  # the tuned model's figures on these cells, from the scores it was fitted on
        if tuning_out is not None:
            write_text(Path(tuning_out), json.dumps(tuning, indent=1))
    else:
        calibrate(model, cells.images, labels, prior_cells=prior_cells, allowed=mask)
        after = _calibration_figures(model, cells.images, labels, mask)
    figures = {f"{k}_before": v for k, v in before.items()} | {f"{k}_after": v for k, v in after.items()}
    if tuned is not None:
        figures |= {"tuned_evals_mean": float(tuned["evals_mean"]), "tuned_agreement": float(tuned["agreement"])}
    return figures | {"temperature": float(model.temperature), "n_val": float(len(labels))}


def code_revision(repo: Path | None = None) -> str:
    """The git commit of the code (with '+dirty' for uncommitted changes), or 'unknown' outside a checkout."""
    cwd = repo or Path(__file__).resolve().parent
    if shutil.which("git") is None:
        return "unknown"
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    if commit.returncode != 0:
        return "unknown"
    return commit.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")

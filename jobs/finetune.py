"""The fine-tuning job: champion + new consensus labels -> a calibrated, registered, gated challenger.

    driver: parent version from the registry -> frozen val/eval sets -> Ray Train TorchTrainer (N workers)
    worker: load the parent, its shard of the cells -> `finetune.finetune` (train.fit) -> report every log period;
            rank 0 attaches the latest training checkpoint, and the trained model at the end
    driver: recalibrate on the frozen val set -> evaluate challenger and champion on the frozen eval set
            -> log params, metrics, plots to MLflow and register a version with its provenance tags
            -> the promotion gate records its verdict and moves the alias if the challenger is no worse

Resumable: a dead worker restarts the worker group from the latest checkpoint (`FailureConfig.max_failures`), and
rerunning the same job (same parent, same data) finds its run folder under `finetune.storage_path` and resumes there.
The same job adapts a hospital's model (`site=`): it starts from the global champion, trains on the site's cells
with stronger stain augmentation, and competes for `champion-<site>` against what serves that site now.
Workers read the cell images from their paths: on a cluster they must be on storage every node mounts.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from cytoloop.config import Settings, check_site_name
from cytoloop.data.records import CellRecord, DatasetError, records_fingerprint
from cytoloop.errors import UsageError, describe_validation_error
from cytoloop.registry import (
    CHAMPION,
    AliasMoved,
    NotRegistered,
    VersionInfo,
    challenger_alias,
    open_registry,
    site_alias,
)
from jobs.room import check_room

logger = logging.getLogger(__name__)

MODEL_SUBDIR = "model"
LOSS_FILE = "loss_curve.json"  # rank 0's training loss per log period, beside the fine-tuned model


def train_loop(config: dict) -> None:
    """One Ray Train worker: fine-tune its shard of the cells, report every log period, checkpoint via rank 0."""
    import ray.train
    import ray.train.torch
    import torch
    from ray.train import Checkpoint

    from cytoloop.config import AugmentConfig, DataConfig, TrainConfig
    from cytoloop.models.finetune import finetune, shard, training_arrays
    from cytoloop.models.loading import load_model
    from cytoloop.models.train import CHECKPOINT_FILE

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    train_config, augment_config = TrainConfig(**config["train"]), AugmentConfig(**config["augment"])
    if train_config.threads:
        torch.set_num_threads(train_config.threads)
    model = load_model(config["parent_dir"])
    model.data_config = DataConfig(**config["data"])
    images, labels, _ = training_arrays(model, config["records"], config["unlabeled"])
    index = shard(labels, rank, world)
    # the workers keep the global batch size between them, each drawing its own batches and noise (`stream`)
    train_config = train_config.model_copy(update={"batch_size": max(1, train_config.batch_size // world)})

    local = Path(tempfile.mkdtemp(prefix="cytoloop-finetune-"))
    try:  # a worker that fails or is restarted must not leave its copy of the checkpoint in /tmp
        restored = ray.train.get_checkpoint()
        if restored is not None:
            with restored.as_directory() as directory:
                shutil.copy2(Path(directory) / CHECKPOINT_FILE, local / CHECKPOINT_FILE)
        attached = {"mtime": (local / CHECKPOINT_FILE).stat().st_mtime_ns if restored is not None else None}

        def report(entry: dict) -> None:
            # `fit` writes its checkpoint after logging, so a checkpoint newer than the last one attached is complete.
            checkpoint_file = local / CHECKPOINT_FILE
            fresh = checkpoint_file.is_file() and checkpoint_file.stat().st_mtime_ns != attached["mtime"]
            if rank == 0 and fresh:
                attached["mtime"] = checkpoint_file.stat().st_mtime_ns
                ray.train.report(
                    entry, checkpoint=Checkpoint.from_directory(str(local)), delete_local_checkpoint_after_upload=False
                )
            else:
                ray.train.report(entry)

        wrap = ray.train.torch.prepare_model if world > 1 or config["use_gpu"] else None
        result = finetune(
            model, images[index], labels[index], train_config, augment_config, local, report, wrap, stream=rank
        )
        final = {
            "step": train_config.steps,
            "resumed_from_step": result.resumed_from,
            "train_seconds": result.seconds,
            "n_train_cells": int(len(index)),
        }
        if rank == 0:
            staging = Path(tempfile.mkdtemp(prefix="cytoloop-finetuned-"))
            shutil.copy2(local / CHECKPOINT_FILE, staging / CHECKPOINT_FILE)
            model.save(staging / MODEL_SUBDIR)
            # the loss per log period, logged to MLflow per step with the version: the whole run's, restored steps
            # included (this attempt's reports alone lost every step before a worker restart or a resume)
            (staging / MODEL_SUBDIR / LOSS_FILE).write_text(json.dumps(result.history))
            # Ray copies it into the run's storage; in its default (synchronous) mode it would leave this copy behind
            ray.train.report(
                final, checkpoint=Checkpoint.from_directory(str(staging)), delete_local_checkpoint_after_upload=True
            )
        else:
            ray.train.report(final)
    finally:
        shutil.rmtree(local, ignore_errors=True)


def fit_on_ray(settings: Settings, run_name: str, loop_config: dict, out: Path) -> dict:
    """Run `train_loop` on Ray Train and copy the trained model into `out`; returns rank 0's final metrics.

    The run lives in `finetune.storage_path/run_name`: an existing run of that name resumes from its checkpoint.
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if not ray.is_initialized():
        ray.init()
    workers, use_gpu = settings.finetune.num_workers, settings.finetune.use_gpu
    check_room(  # Ray Train would wait a minute per try for workers other work holds, and fail with Ray's words
        workers,
        0 if use_gpu else 1,  # what Ray Train asks per worker: a GPU, or else a CPU
        1 if use_gpu else 0,
        together=True,
        asked=f"finetune.num_workers {workers} worker(s) of 1 {'GPU' if use_gpu else 'CPU'} each",
        fewer="ask for fewer workers, or finetune.use_gpu false",
        smaller="with fewer workers" if workers > 1 else "",
    )
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=settings.finetune.num_workers, use_gpu=settings.finetune.use_gpu),
        run_config=RunConfig(
            name=run_name,
            storage_path=str(Path(settings.finetune.storage_path).resolve()),
            # a worker group that cannot be placed (CPUs held by others) fails after a few tries, not never
            failure_config=FailureConfig(max_failures=settings.finetune.max_failures, controller_failure_limit=3),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    result = trainer.fit()
    shutil.rmtree(out, ignore_errors=True)
    with result.checkpoint.as_directory() as directory:
        shutil.copytree(Path(directory) / MODEL_SUBDIR, out)
    return dict(result.metrics)


@dataclass
class FinetuneOutcome:
    """What a fine-tune produced: the registered version, the gate's verdict, and where the model lies."""

    version: VersionInfo
    passed: bool
    reasons: list[str]
    alias: str
    model_dir: Path
    metrics: dict
    worse: list[str]  # the metrics the gate refused it on (empty when it passed)

    @property
    def stale(self) -> bool:
        """Not promoted because another alias move came first (a newer model, a rollback): no verdict on its
        merits, so the labels it learned are not in the model that serves."""
        return not self.passed and self.version.tags.get("gate.verdict") == "stale"

    @property
    def state(self) -> str:
        """promoted; refused (by the gate, on its merits); stale (another alias move came first: run the job again,
        it judges its version against what serves then); withdrawn (a rerun of a job whose version passed and was
        promoted, moved off the alias since by a rollback or a newer model: nothing is done again)."""
        if self.passed:
            return "promoted"
        return {"stale": "stale", "pass": "withdrawn"}.get(self.version.tags.get("gate.verdict", ""), "refused")


def save_retrain_state(settings: Settings, records: Sequence[CellRecord], outcome: FinetuneOutcome) -> bool:
    """After a global retrain on `records`: count them as trained on, so the retrain policy counts new labels from
    here (`policy.retrain`); whether it did. Not after a stale outcome: its labels reached no serving model, and
    counting them held back the retrain they were due until as many more arrived."""
    from cytoloop.policy.retrain import save_state, state_path

    if outcome.stale:
        logger.warning(f"v{outcome.version.version} was not judged (another move came first): its labels still count")
        return False
    save_state(state_path(settings.home), records)
    return True


def run_finetune(
    settings: Settings,
    records: Sequence[CellRecord],
    unlabeled: Sequence[CellRecord] = (),
    site: str | None = None,
    stain_normalize: bool | None = None,
    who: str | None = None,
    progress: bool = False,
) -> FinetuneOutcome:
    """Fine-tune the global champion on labelled `records` (plus the `unlabeled` pool), register the result and
    put it through the promotion gate for the global champion alias, or for `champion-<site>` with `site`.
    `progress`: bars for the scoring after training (the re-tuned scoring rule, the gate's cells), minutes on a
    CPU that a command line otherwise spent in silence.

    One fine-tune of a scope at a time per home (a lock file; a second waits): two at once (the ML backend's
    retrain and a scheduled one) on the same labels shared one run folder, each deleting and copying the other's
    model, and on more labels the second built on a parent the first was about to replace and was then passed
    over as stale. Waiting, the second finds the first's version (same labels) or builds on it."""
    with finetune_lock(settings, site):
        return _run_finetune(settings, records, unlabeled, site, stain_normalize, who, progress)


def finetune_lock(settings: Settings, site: str | None, wait: bool = True) -> AbstractContextManager[None]:
    """The lock one fine-tune of a scope holds (`run_finetune`): a global retrain holds it also while it decides
    whether one is due and records what it trained on, so a second retrain decides on the first's outcome.
    `wait=False`: `files.Locked` at once while another holds it. Re-entrant in one thread."""
    from cytoloop.files import locked

    scope = site or "global"
    lock = Path(settings.home).resolve() / "finetune" / f".{scope}.lock"
    return locked(lock, wait=wait, waiting=f"the running fine-tune of {scope}")


def _run_finetune(
    settings: Settings,
    records: Sequence[CellRecord],
    unlabeled: Sequence[CellRecord] = (),
    site: str | None = None,
    stain_normalize: bool | None = None,
    who: str | None = None,
    progress: bool = False,
) -> FinetuneOutcome:
    from cytoloop.models.base import Trainable
    from cytoloop.models.finetune import (
        adapted_data_config,
        code_revision,
        finetune_configs,
        frozen_directory,
        frozen_elsewhere,
        frozen_sets,
        not_judged_on,
        recalibrate,
    )
    from cytoloop.models.loading import load_model
    from cytoloop.policy.drift import colour_statistics_of, read_colour_reference, write_colour_reference
    from cytoloop.policy.promotion import apply_verdict, compare, gate_figures, scoring_runtime, verdict_tags
    from cytoloop.workflows import carry_split, outside_held_out, seen_by

    registry = open_registry(settings)
    name, home = settings.registry.model_name, Path(settings.home).resolve()
    adapt = site is not None
    try:
        parent = registry.by_alias(name, CHAMPION)
    except NotRegistered:  # MLflow's own words named a missing registered model, not what to do
        raise UsageError(
            f"no champion of {name} to fine-tune in the registry at {settings.registry.tracking_uri}: register one "
            "first (`cytoloop register MODEL_DIR --champion --reason ...`)"
        ) from None
    cache = Path(settings.registry.cache_dir).resolve()
    parent_model = registry.load(name, parent.version, cache)
    parent_dir = cache / name / parent.version
    if not isinstance(parent_model, Trainable):
        raise UsageError(
            f"{name} v{parent.version} is a {parent_model.kind} model, which cannot be trained further; only "
            "diffusion and baseline models are fine-tuned (register the diffusion model itself as the champion)"
        )
    unknown = sorted({r.label for r in records} - set(parent_model.classes) - {None})
    if unknown:  # caught here, before any worker starts, with a message naming them
        raise DatasetError(
            f"label(s) {', '.join(unknown)} are not classes of {name} v{parent.version} "
            f"({', '.join(parent_model.classes)})"
        )
    normalize = settings.adapt.stain_normalize if stain_normalize is None else stain_normalize
    data_config = adapted_data_config(parent_model, parent_dir, adapt and normalize)
    # a global retrain takes every site's labels: the sites' frozen cells stay out (a site model is never judged at
    # the global gate, nor the parent of a global one, so a site's training may use the global gate's cells; the
    # global calibration cells stay out of it all the same, as its parent's split carries them: `outside_held_out`)
    elsewhere = frozen_elsewhere(home, site) if site is None else []
    sets = frozen_sets(
        records,
        frozen_directory(home, site),
        settings.finetune.val_fraction,
        settings.finetune.eval_fraction,
        seed=settings.train.seed,
        also_held=elsewhere,
        not_frozen=seen_by(records, parent_dir),
    )
    kept, parents_held_out = outside_held_out(sets.train, parent_dir)
    if parents_held_out:  # the parent's validation and test cells: its held-out figures must stay held out
        logger.info(
            f"   {parents_held_out} labelled cell(s) are in v{parent.version}'s validation or test part: not trained on"
        )
        if not kept:
            raise DatasetError(
                f"every labelled cell to train on is in v{parent.version}'s validation or test part: nothing to "
                "train on"
            )
        sets = replace(sets, train=kept)
    unlabeled = not_judged_on(unlabeled, [*sets.val, *sets.eval, *elsewhere], settings.judged_manifests())
    train_config, augment_config = finetune_configs(settings, adapt)
    snapshot = records_fingerprint(list(sets.train) + list(unlabeled))
    # the run is this parent, these cells AND these settings: a changed job trains afresh instead of resuming
    scaling = (settings.finetune.num_workers, settings.finetune.use_gpu)
    job = _settings_key(train_config, augment_config, data_config, settings.site_classes(site), scaling)
    run_name = job_name(site, parent, snapshot, job)
    earlier = parent.tags.get("ray_run", "")
    if not adapt and earlier.startswith("global-v") and earlier.endswith(f"-{snapshot}-{job}"):
        # this very job ran, promoted its version and stopped before saying so (the retrain state unsaved): its
        # version is the parent now, and training it again on the same labels would make a duplicate
        logger.info(f"   v{parent.version} is this job's own version, promoted before it stopped: nothing to do")
        return _outcome_of(registry, parent, CHAMPION, home / "finetune" / earlier)
    ran = [v for v in registry.versions(name) if v.tags.get("ray_run") == run_name]
    judged = [v for v in ran if v.tags.get("gate.verdict") in ("pass", "refused")]
    if judged:  # this very job reached its verdict before: its version, not a duplicate
        _complete_promotion(registry, name, judged[-1], site_alias(site), who)
        version = registry.version(name, judged[-1].version)
        return _outcome_of(registry, version, site_alias(site), home / "finetune" / run_name)
    # this job registered its version and stopped before the verdict, or another move came first (stale: no
    # verdict on its merits, and rerunning returned that stale outcome forever): that version is judged now,
    # against what serves, not registered again
    registered = ran[-1] if ran else None

    out = home / "finetune" / run_name
    allowed = settings.site_classes(site)  # a site's versions are calibrated and judged as they serve it
    if registered is None:
        loop_config = {
            "parent_dir": str(parent_dir),
            "records": list(sets.train),
            "unlabeled": list(unlabeled),
            "train": train_config.model_dump(mode="json"),
            "augment": augment_config.model_dump(mode="json"),
            "data": data_config.model_dump(mode="json"),
            "use_gpu": settings.finetune.use_gpu,
        }
        began = time.monotonic()
        trained = fit_on_ray(settings, run_name, loop_config, out)
        logger.info(
            f"   {run_name}: {train_config.steps} steps on {len(sets.train)} labelled cells on Ray Train in "
            f"{time.monotonic() - began:.0f} s"
        )

        began = time.monotonic()
        challenger = load_model(out, settings.scoring)  # recalibrated and gated in this machine's runtime
        calibration = recalibrate(
            challenger,
            sets.val,
            settings.finetune.temperature_prior_cells,
            tune=settings.train.tune_scoring,
            tuning_out=out / "tuning.json",
            tuning_cells=settings.finetune.tuning_cells,
            allowed=allowed,
            progress=progress,
        )
        reference = colour_statistics_of(sets.train, data_config)
        parent_reference = read_colour_reference(parent_dir)
        if not adapt and parent_reference is not None:  # a global model keeps its history; a site model its site
            reference = parent_reference if not len(reference) else np.concatenate([parent_reference, reference])
        logger.info(f"   recalibrated on {len(sets.val)} frozen cells in {time.monotonic() - began:.0f} s")
        challenger.info.update(
            {
                "parent_version": parent.version,
                "data_snapshot": snapshot,
                "site": site or "global",
                # its own training, not its parent's, which model.json carried on (a 500-step fine-tune said
                # 20,000 steps on PBC's 11,215 cells)
                "steps": train_config.steps,
                "n_train": len(sets.train),
                "domains": sorted({r.domain for r in sets.train}),
                "data_fingerprint": records_fingerprint(sets.train),
                "train_seconds": trained.get("train_seconds"),
            }
        )
        if allowed is not None:
            challenger.info["site_classes"] = allowed  # what its temperature was fitted for
        challenger.save(out)
        carry_split(parent_dir, out, sets.train, sets.val)
        write_colour_reference(out, reference)
    else:  # exactly what was registered is judged (settings changed since would make another model)
        logger.info(f"   v{registered.version} was registered by this job before it stopped: judged now")
        challenger = registry.load(name, registered.version, cache, settings.scoring)
        recorded = registry.client.get_run(registered.run_id).data.metrics  # logged with it by the stopped job
        calibration = {k.removeprefix("calibration_"): v for k, v in recorded.items() if k.startswith("calibration_")}
        trained = {k: recorded[k] for k in ("train_seconds", "resumed_from_step") if k in recorded}

    began = time.monotonic()
    data = gate_cells(sets, settings, site, challenger.classes)
    alias = site_alias(site)
    new = gate_figures(challenger, data, out / "evaluation" / "challenger.json", allowed, progress)
    try:
        current = registry.for_site(name, site)
        runtime = scoring_runtime(challenger)  # the champion's report counts only if it was scored alike
        champion = _kept_champion_figures(home, current, data, challenger.classes, out / "evaluation", runtime, allowed)
        if champion is None:
            champion = gate_figures(
                registry.load(name, current.version, cache, settings.scoring),
                data,
                out / "evaluation" / "champion.json",
                allowed,
                progress,
            )
    except NotRegistered:  # no champion yet; an unreachable registry raises: a gate needs the true champion
        current, champion = None, None
    verdict = compare(new, champion, settings.promotion)
    logger.info(f"   gated on {len(data.eval_records)} frozen cells in {time.monotonic() - began:.0f} s")
    verdict.champion_version = current.version if current else None

    recall = {f"recall_{k}": v for k, v in new["per_class_recall"].items() if v is not None}
    metrics = {
        **{f"calibration_{k}": v for k, v in calibration.items()},
        **recall,
        **{f"eval_{k}": new[k] for k in ("balanced_accuracy", "accuracy", "ece", "nll", "brier")},
        "train_seconds": float(trained.get("train_seconds", 0.0)),
        "resumed_from_step": float(trained.get("resumed_from_step", 0)),
    }
    if new.get("anomaly_auroc") is not None:
        metrics["eval_anomaly_auroc"] = new["anomaly_auroc"]
    (out / "evaluation" / "per_class_recall.json").write_text(json.dumps(new["per_class_recall"], indent=1))
    if registered is None:
        tags = {
            "parent_version": parent.version,
            "data_snapshot": snapshot,
            "label_count": str(len(sets.train)),
            "site": site or "global",
            "code_revision": code_revision(),
            "kind": challenger.kind,
            "job": "adapt" if adapt else "retrain",
            "ray_run": run_name,
        }
        params = {
            "steps": train_config.steps,
            "lr": train_config.lr,
            "batch_size": train_config.batch_size,
            "num_workers": settings.finetune.num_workers,
            "use_gpu": settings.finetune.use_gpu,
            "n_unlabeled": len(unlabeled),
            "n_val": len(sets.val),
            "n_eval": len(data.eval_records),
            "stain_normalization": data_config.stain_normalization,
            "hed_sigma": augment_config.hed_sigma,
        }
        artifacts = sorted((out / "evaluation").glob("*"))
        losses = json.loads((out / LOSS_FILE).read_text()) if (out / LOSS_FILE).is_file() else []
        version = registry.log_model(
            out,
            name,
            tags=tags,
            params=params,
            metrics=metrics,
            artifacts=artifacts,
            run_name=f"finetune-{site or 'global'}-v{parent.version}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}",
            step_metrics={"train_loss": [(int(e["step"]), float(e["loss"])) for e in losses if "loss" in e]},
            dataset=(sets.train, f"{site or 'global'}-labels-{snapshot}"),
        )
    else:
        version = registered
    registry.set_alias(name, challenger_alias(site), version.version)  # the version under judgement
    try:
        base_now: str | None = registry.by_alias(name, CHAMPION).version
    except NotRegistered:  # withdrawn while the job ran
        base_now = None
    if verdict.passed and base_now != parent.version:  # a newer model or a rollback since the job began
        superseded = (
            f"its parent v{parent.version} is no longer @{CHAMPION} (v{base_now or '-'} is): a newer model or a "
            "rollback came first; run the job again to build on what serves"
        )
        figures = {k: v for k, v in verdict_tags(verdict).items() if k not in ("gate.verdict", "gate.reasons")}
        registry.set_tags(name, version.version, figures)  # what the gate measured, kept as a refusal's is
        verdict.passed, verdict.reasons = False, [_mark_stale(registry, name, version.version, superseded)]
    else:  # a refusal is recorded as one, with its reasons, whatever serves now
        try:
            apply_verdict(registry, name, version.version, alias, verdict, who=who)
        except AliasMoved as moved:  # another version took the alias while this one was judged: not promoted
            verdict.passed, verdict.reasons = False, [_mark_stale(registry, name, version.version, str(moved))]
    return FinetuneOutcome(
        registry.version(name, version.version), verdict.passed, verdict.reasons, alias, out, metrics, verdict.worse
    )


def gate_cells(sets, settings: Settings, site: str | None, classes: list[str]):
    """The cells a challenger is judged on (`promotion.gate_data`): its scope's frozen eval set, and the audited
    cells (a site's own, `sites.<site>.audited_manifest`, where it has them) of the classes it is judged on, a
    site's own classes for a site's version (audited cells of another class are wrong for both models there by
    design, and would only water the comparison down)."""
    from cytoloop.policy.promotion import gate_data

    classes = settings.site_classes(site) or classes
    return gate_data(sets.eval, settings.site_promotion(site), classes, trained_on=sets.train)


def _kept_champion_figures(
    home: Path,
    champion: VersionInfo,
    data,
    classes: list[str],
    evaluation: Path,
    runtime: dict,
    allowed: list[str] | None,
) -> dict | None:
    """The champion's own gate report, when a fine-tune on this host promoted it after a gate on these very cells
    (`promotion.kept_gate_figures`); copied with its plots into this run's evaluation folder as `champion.*`, so
    the version's artifacts hold both sides as before. None when it must be scored again."""
    from cytoloop.policy.promotion import kept_gate_figures

    run = champion.tags.get("ray_run")
    kept = home / "finetune" / run / "evaluation" / "challenger.json" if run else None
    report = kept_gate_figures(kept, data, classes, runtime, allowed) if kept is not None else None
    if report is None:
        return None
    evaluation.mkdir(parents=True, exist_ok=True)
    for path in kept.parent.glob("challenger.*"):
        shutil.copyfile(path, evaluation / path.name.replace("challenger.", "champion.", 1))
    logger.info(f"   the champion v{champion.version}'s gate figures on these cells kept from its own gate")
    return report


def job_name(site: str | None, parent: VersionInfo, snapshot: str, settings_key: str) -> str:
    """A fine-tune's name (its Ray run, its folder, its versions' `ray_run` tag): what decides its result, so a
    rerun of the same job resumes it and any other job runs afresh. The parent by number and by its run: after a
    registry reset numbers start again at 1, and a job named by the number alone resumed the run of another
    parent that had had that number."""
    return f"{site or 'global'}-v{parent.version}-{(parent.run_id or 'none')[:8]}-{snapshot}-{settings_key}"


def _settings_key(
    train_config, augment_config, data_config, site_classes: list[str] | None = None, workers: tuple | None = None
) -> str:
    """A short hash of the settings that decide what a fine-tune produces (not threads, logging or checkpoint
    periods; a site's classes, which its calibration and gate use; `workers`, their number and whether on GPUs,
    which set each worker's batch and shard): part of the run's name, so that changing them never resumes another
    job's checkpoint nor returns a version made for other settings."""
    import hashlib

    decisive = {
        "train": train_config.model_dump(mode="json", exclude={"threads", "log_every", "checkpoint_every"}),
        "augment": augment_config.model_dump(mode="json"),
        "data": data_config.model_dump(mode="json"),
    }
    if site_classes is not None:  # absent otherwise: the runs made before sites had classes keep their names
        decisive["site_classes"] = site_classes
    if workers is not None:
        decisive["workers"] = list(workers)
    return hashlib.sha256(json.dumps(decisive, sort_keys=True).encode()).hexdigest()[:8]


def _mark_stale(registry, name: str, version: str, why: str) -> str:
    """Record that a version was not promoted because another move came first (`why`); returns the reason."""
    stale = f"not promoted: {why}"
    registry.set_tags(name, version, {"gate.verdict": "stale", "gate.reasons": json.dumps([stale])})
    return stale


def _complete_promotion(registry, name: str, version: VersionInfo, alias: str, who: str | None) -> None:
    """Finish the alias move of a job stopped after recording its pass and before moving `alias` (killed, or the
    registry gone between the two): compare-and-set against the champion it was judged against, as the gate
    would have, or marked stale if another move came first. Nothing to do for a refusal, or when the trail shows a
    move of `alias` to this version already (a person may have rolled it back since: never undone here)."""
    from cytoloop.policy.promotion import promote

    tags = version.tags
    if tags.get("gate.verdict") != "pass":
        return
    if any(move.to_version == version.version for move in registry.alias_history(name, alias)):
        return
    judged_against = tags.get("gate.champion_version", "none")
    reasons = [*json.loads(tags.get("gate.reasons", "[]")), "the move completed by a rerun of the job"]
    try:
        promote(
            registry, name, version.version, alias, reasons, None if judged_against == "none" else judged_against, who
        )
        logger.info(f"   v{version.version} passed its gate before the job stopped: {alias} moved to it now")
    except AliasMoved as moved:
        _mark_stale(registry, name, version.version, str(moved))


def _outcome_of(registry, version: VersionInfo, alias: str, model_dir: Path) -> FinetuneOutcome:
    """The outcome a finished run recorded on its registered version (its gate verdict and metrics), as it stands
    now: promoted if it serves `alias`. A version that passed but no longer serves `alias` (rolled back since, or
    replaced) is not reported promoted (a rerun said "promoted" of a version that did not serve;
    `FinetuneOutcome.state`: withdrawn); one the gate refused or passed over as stale that a person promoted since
    (`cytoloop promote`) is (reruns said "refused" of the version serving, or "stale" on every run)."""
    tags = version.tags
    metrics = dict(registry.client.get_run(version.run_id).data.metrics)
    reasons = json.loads(tags.get("gate.reasons", "[]"))
    verdict = tags.get("gate.verdict")
    serving = registry.serving_version(version.name, alias)
    passed = serving == version.version
    if verdict == "pass" and not passed:
        reasons.append(
            f"promoted once, moved off @{alias} since (v{serving or '-'} serves it now: a rollback or a newer "
            "model); nothing done again"
        )
    elif passed and verdict != "pass":  # it was reported refused (exit 3), or stale for ever (exit 5, labels unsaved)
        reasons.append(f"the gate's verdict was {verdict or 'never reached'}; a person promoted it since: it serves")
    return FinetuneOutcome(
        version, passed, reasons, alias, model_dir, metrics, json.loads(tags.get("gate.worse", "[]"))
    )


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m jobs.finetune`: the fine-tune as the entrypoint of a Ray job (a KubeRay RayJob, `ray job submit`).

    Inside a Ray job RAY_ADDRESS points at the job's cluster, so Ray Train's TorchTrainer joins that cluster (Ray
    connects on first use); run anywhere else, it starts a local Ray like `cytoloop retrain` does, which it mirrors
    (a global run records the retrain state; `--site` adapts like `cytoloop adapt`). The outcome is one JSON line
    on stdout, for whoever reads the job's logs: `passed` says whether the version was promoted, `state` why not
    (`FinetuneOutcome.state`: refused, stale, withdrawn). Unlike `cytoloop retrain` (exit codes 3 and 5), a version
    not promoted exits 0 here: the job ran to its verdict, and a RayJob that failed would be
    retried or raise an alarm for a model rightly kept out. Bad input (a missing file, an unknown class, an invalid
    setting, no champion yet, a folder that cannot be made) ends with one line naming it on stderr and exit code 2,
    never a traceback (exit 1: a bug).
    """
    from pydantic import ValidationError

    from cytoloop.config import load_settings
    from cytoloop.data.records import load_records
    from cytoloop.errors import CytoLoopError

    parser = argparse.ArgumentParser(
        prog="python -m jobs.finetune",
        description="Fine-tune the champion on new "
        "labels with Ray Train, register the result and put it through the gate.",
    )
    parser.add_argument("--labels", type=Path, required=True, help="labelled cells: manifest CSV (path,label,domain)")
    parser.add_argument("--unlabeled", type=Path, help="manifest CSV of the unlabeled pool (trains the null class)")
    parser.add_argument("--site", help="adapt for this hospital: compete for champion-<site>")
    parser.add_argument("--config", type=Path, help="JSON settings file (CYTOLOOP_* variables override it)")
    args = parser.parse_args(argv)

    def fail(message: str) -> int:
        print(f"error: {message}", file=sys.stderr)
        return 2

    if args.site is not None:  # the rule every other entry applies (`_lab` trained for hours, then never served)
        try:
            check_site_name(args.site, "(--site)")
        except UsageError as error:
            return fail(str(error))
    if args.config is not None and not args.config.is_file():
        return fail(f"settings file not found: {args.config}")
    try:
        settings = load_settings(args.config)
        records = [r for r in load_records(args.labels) if r.label is not None]
        if not records:
            raise DatasetError(f"{args.labels}: no labelled cells")
        pool = load_records(args.unlabeled) if args.unlabeled else []
        with finetune_lock(settings, args.site):  # the state recorded before another retrain may run
            outcome = run_finetune(settings, records, pool, site=args.site)
            if args.site is None:  # as `cytoloop retrain` does
                save_retrain_state(settings, records, outcome)
    except ValidationError as error:
        return fail(f"invalid configuration: {describe_validation_error(error)}")
    except (CytoLoopError, ValueError) as error:  # DatasetError, ModelLoadError, ImageError, RegistryError too
        return fail(str(error))
    except OSError as error:  # a folder where one is needed is a file, a refused permission (not only a missing file)
        return fail(f"{error.filename}: {error.strerror}" if error.filename and error.strerror else str(error))
    print(
        json.dumps(
            {
                "name": outcome.version.name,
                "version": outcome.version.version,
                "passed": outcome.passed,
                "state": outcome.state,
                "reasons": outcome.reasons,
                "alias": outcome.alias,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The cascade: a fast student answers the cells it is sure of; the diffusion classifier decides the rest.

The student is the baseline's SmallCNN, distilled from the diffusion classifier (the teacher): its target on every
cell is the teacher's probabilities, mixed on labelled cells with the label (`CascadeConfig.label_weight`), so
unlabeled cells teach it too. Its temperature is then fitted on labelled validation cells, and a cell whose
calibrated student confidence is below `threshold` is deferred to the teacher. The student costs one small CNN
pass per cell, the teacher tens of denoiser passes, so the deferred fraction sets the speed; the curve of
deferred fraction against accuracy and cells/s is in docs/benchmarks.md. With `candidates = k` the teacher
decides a deferred cell among the student's top k classes only: the others are never denoised (candidate-class
pruning); when the student ranks the exhaustive winner in its top k, the teacher's answer is unchanged.

On disk a cascade is a model directory whose `model.json` has kind "cascade", with the teacher and the student
as complete model directories inside it (`teacher/`, `student/`), each loadable on its own.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from cytoloop.config import AugmentConfig, BaselineModelConfig, CascadeConfig, RoutingConfig, TrainConfig
from cytoloop.errors import UsageError
from cytoloop.files import write_text
from cytoloop.models.base import MODEL_FILE, Predictions, read_model_meta
from cytoloop.models.baseline import BaselineClassifier
from cytoloop.models.diffusion import DiffusionClassifier
from cytoloop.models.train import LossFn, fit
from cytoloop.scoring.calibration import fit_temperature

TEACHER_DIR = "teacher"
STUDENT_DIR = "student"


def _both(top: np.ndarray | None, candidates: np.ndarray | None, rows: np.ndarray) -> np.ndarray | None:
    """The teacher's classes for the deferred `rows`: the student's top k among the cells' candidates."""
    if candidates is None:
        return top
    allowed = np.asarray(candidates, dtype=bool)[rows]
    return allowed if top is None else top & allowed


def top_k(probs: np.ndarray, k: int | None) -> np.ndarray | None:
    """(cells, classes) booleans marking each cell's k most probable classes; None (all classes) when k is None
    or not smaller than the number of classes."""
    if k is None or k >= probs.shape[1]:
        return None
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    mask = np.zeros(probs.shape, dtype=bool)
    np.put_along_axis(mask, order, True, axis=1)
    return mask


class CascadeClassifier:
    """Student first; cells under the confidence threshold go to the teacher and get the teacher's answer.

    `anomaly` is the student's energy score for every cell (one scale for all cells); for deferred cells the
    teacher's own anomaly score is in `extra["teacher_anomaly"]` (NaN elsewhere). `evals` counts one student pass
    per cell plus the teacher's denoiser evaluations for deferred cells.
    """

    kind = "cascade"

    def __init__(
        self,
        teacher: DiffusionClassifier,
        student: BaselineClassifier,
        config: CascadeConfig | None = None,
        info: dict | None = None,
    ):
        if teacher.classes != student.classes:
            raise UsageError(f"teacher classes {teacher.classes} differ from student classes {student.classes}")
        self.teacher = teacher
        self.student = student
        self.config = config or CascadeConfig()
        self.info = dict(info or {})

    @property
    def classes(self) -> list[str]:
        return self.teacher.classes

    @property
    def data_config(self):
        return self.teacher.data_config

    def predict(
        self,
        images: np.ndarray,
        progress: bool = False,
        *,
        routing: RoutingConfig | None = None,
        candidates: np.ndarray | None = None,
    ) -> Predictions:
        """Student first, the teacher for deferred cells. With `routing` the teacher may stop a deferred cell once
        it is a close call under the review line (the cascade's probabilities are the teacher's there); not on
        the anomaly threshold, which is on the student's scale (the cascade's anomaly score). Both decide among
        each cell's `candidates`; the teacher among the student's top k of them (`cascade.candidates`)."""
        fast = self.student.predict(images, candidates=candidates)
        deferred = fast.confidence < self.config.threshold
        # float64: the student's float32 rounded the teacher's near-ties (a dropped class a tiny gap behind the
        # winner) into exact ties, and the argmax then took the lower class, not the one the teacher decided
        probs, evals = fast.probs.astype(np.float64), fast.evals.copy()
        teacher_anomaly = np.full(len(images), np.nan)
        provisional = np.zeros(len(images), dtype=bool)  # a deferred cell the teacher stopped on a route exit
        if deferred.any():
            slow = self.teacher.predict(
                images[deferred],
                progress=progress,
                routing=None if routing is None else routing.model_copy(update={"anomaly_above": None}),
                candidates=_both(top_k(fast.probs[deferred], self.config.candidates), candidates, deferred),
            )
            probs[deferred] = slow.probs
            evals[deferred] += slow.evals
            teacher_anomaly[deferred] = slow.anomaly
            provisional[deferred] = slow.extra.get("provisional", False)
        return Predictions(
            probs=probs,
            anomaly=fast.anomaly,
            evals=evals,
            extra={
                **fast.extra,
                "deferred": deferred,
                "student_confidence": fast.confidence,
                "teacher_anomaly": teacher_anomaly,
                "provisional": provisional,
            },
        )

    def save(self, directory: Path) -> Path:
        directory = Path(directory)
        self.teacher.save(directory / TEACHER_DIR)
        self.student.save(directory / STUDENT_DIR)
        meta = {
            "kind": self.kind,
            "classes": self.classes,
            "data": self.data_config.model_dump(mode="json"),
            "cascade": self.config.model_dump(mode="json"),
            "teacher": TEACHER_DIR,
            "student": STUDENT_DIR,
            "info": self.info,
        }
        write_text(directory / MODEL_FILE, json.dumps(meta, indent=1))
        return directory

    @classmethod
    def load(cls, directory: Path) -> CascadeClassifier:
        meta = read_model_meta(directory)
        return cls(
            DiffusionClassifier.load(Path(directory) / meta["teacher"]),
            BaselineClassifier.load(Path(directory) / meta["student"]),
            CascadeConfig(**meta["cascade"]),
            info=meta.get("info"),
        )


def soft_targets(teacher_probs: np.ndarray, labels: np.ndarray, label_weight: float) -> np.ndarray:
    """Per-cell target distributions: the teacher's probabilities, mixed with the one-hot label where there is
    one (label < 0 marks an unlabeled cell, which keeps the teacher's probabilities alone)."""
    targets = np.asarray(teacher_probs, dtype=np.float64).copy()
    labelled = labels >= 0
    one_hot = np.eye(targets.shape[1])[labels[labelled]]
    targets[labelled] = (1 - label_weight) * targets[labelled] + label_weight * one_hot
    return targets


def distillation_loss(targets: np.ndarray) -> LossFn:
    """Cross-entropy against soft targets. `fit` hands the loss integer labels; here they are cell indices into
    `targets`, so the shared training loop (augmentation, EMA, checkpoints) runs unchanged. Its class balancing
    does not apply: each index is a class of one to `sampling_weights`, so cells are drawn uniformly, and the
    student learns the teacher on the distillation cells as they come (unlabeled ones included)."""
    table = torch.as_tensor(targets, dtype=torch.float32)

    def loss(network: torch.nn.Module, images: torch.Tensor, index: torch.Tensor, generator: torch.Generator):
        log_probs = torch.log_softmax(network(images), dim=1)
        # the table stays on the CPU; a student training on a GPU gets its rows moved to it (indexed there, it failed)
        return -(table[index.cpu()].to(log_probs.device) * log_probs).sum(dim=1).mean()

    return loss


def threshold_for_fraction(confidence: np.ndarray, fraction: float) -> float:
    """The confidence threshold under which `fraction` of these cells fall (deferred: confidence < threshold):
    midway between the last cell deferred and the first one kept. Cells tied with the last one deferred are
    deferred with it (a little more than `fraction`, never less)."""
    values = np.asarray(confidence)
    ordered = np.sort(values if np.issubdtype(values.dtype, np.floating) else values.astype(np.float64))
    deferred = int(np.ceil(round(fraction * len(ordered), 9)))
    if deferred <= 0:
        return 0.0
    if deferred >= len(ordered):
        return 1.0 + 1e-6
    last, first_kept = ordered[deferred - 1], ordered[deferred]
    if last == first_kept:  # the next value up in the confidences' own precision (float32 from the student)
        return float(np.nextafter(last, ordered.dtype.type(np.inf)))
    return float((np.float64(last) + np.float64(first_kept)) / 2)


def distill(
    teacher: DiffusionClassifier,
    images: np.ndarray,
    labels: np.ndarray,
    val_images: np.ndarray,
    val_labels: np.ndarray,
    config: CascadeConfig,
    train_config: TrainConfig,
    augment_config: AugmentConfig,
    student_config: BaselineModelConfig,
    teacher_probs: np.ndarray | None = None,
    checkpoint_dir: Path | None = None,
    progress: bool = False,
) -> tuple[CascadeClassifier, dict]:
    """Distil a student from `teacher` on `images` (labels < 0: unlabeled) and build the cascade.

    The teacher is run on every training cell once (pass `teacher_probs` to reuse earlier predictions); the
    student's temperature is fitted on the labelled validation cells, and with `config.defer_fraction` set the
    threshold is chosen there too. Returns the cascade and a report.
    """
    if teacher_probs is None:
        teacher_probs = teacher.predict(images, progress=progress).probs
    targets = soft_targets(teacher_probs, np.asarray(labels), config.label_weight)
    student = BaselineClassifier(teacher.classes, teacher.data_config, student_config)
    network, result = fit(
        student.network,
        distillation_loss(targets),
        images,
        np.arange(len(images)),
        train_config,
        augment_config,
        checkpoint_dir=checkpoint_dir,
        progress=progress,
    )
    student.use_trained(network)
    student.temperature = fit_temperature(student.logits(val_images), val_labels)
    val_confidence = student.predict(val_images).confidence
    if config.defer_fraction is not None:
        config = config.model_copy(update={"threshold": threshold_for_fraction(val_confidence, config.defer_fraction)})
    report = {
        "n_distill": int(len(images)),
        "n_labelled": int((np.asarray(labels) >= 0).sum()),
        "student_temperature": student.temperature,
        "threshold": config.threshold,
        "val_deferred_fraction": float(np.mean(val_confidence < config.threshold)),
        "train_seconds": result.seconds,
        "teacher_agreement_on_distill_cells": float(
            np.mean(student.predict(images).labels == teacher_probs.argmax(axis=1))
        ),
    }
    student.info.update({"distilled_from": teacher.info, "steps": train_config.steps})
    return CascadeClassifier(teacher, student, config, info=report), report

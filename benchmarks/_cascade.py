"""A cascade assembled from an existing diffusion model and an existing CNN (the CNN as the student, not distilled):
the benchmarks that serve or score a cascade build it from the models they already have."""

from __future__ import annotations

from pathlib import Path

from cytoloop.config import CascadeConfig
from cytoloop.models.baseline import BaselineClassifier
from cytoloop.models.cascade import CascadeClassifier
from cytoloop.models.diffusion import DiffusionClassifier
from cytoloop.models.loading import load_model


def assemble_cascade(target: Path, teacher: Path, student: Path, config: CascadeConfig) -> str:
    """Save the cascade of `teacher` behind `student` with `config` to `target` (replacing what is there), and
    return the sentence that says so in a benchmark's report."""
    slow, fast = load_model(teacher), load_model(student)
    if not isinstance(slow, DiffusionClassifier) or not isinstance(fast, BaselineClassifier):
        raise SystemExit(
            f"--cascade-from: need a diffusion model and a CNN, got {slow.kind} ({teacher}) and {fast.kind} ({student})"
        )
    CascadeClassifier(slow, fast, config).save(target)
    among = f", the teacher among the student's top {config.candidates} classes" if config.candidates else ""
    return (
        f"The cascade is {teacher} (teacher) behind {student} (the CNN as student, not distilled), threshold "
        f"{config.threshold}{among}."
    )

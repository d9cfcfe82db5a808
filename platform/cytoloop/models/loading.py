"""Loading any CytoLoop model from a local directory: the one place that knows every model kind.

Kept out of `models.base` so that the interface does not depend on its implementations (the cascade builds on
the base classes; the base would otherwise import the cascade back).
"""

from __future__ import annotations

import logging
import math
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from cytoloop.config import ScoringConfig
from cytoloop.errors import describe_validation_error
from cytoloop.models.base import MODEL_FILE, Classifier, ModelLoadError, read_model_meta
from cytoloop.models.baseline import BaselineClassifier
from cytoloop.models.cascade import CascadeClassifier
from cytoloop.models.diffusion import DiffusionClassifier

logger = logging.getLogger(__name__)

# How the denoiser runs on a machine, not what the model decides: a machine's settings may replace these.
RUNTIME_FIELDS = ("device", "precision", "channels_last", "compile", "threads", "batch_size", "lookahead")
# the model.json section each settings class is read from
SECTION_OF = {
    "DataConfig": "data",
    "DiffusionModelConfig": "model",
    "BaselineModelConfig": "model",
    "ScoringConfig": "scoring",
}


def _field_problem(meta: dict) -> str | None:
    """What is wrong with the fields every model's `model.json` may hold beside its sections, or None: the class
    list (a string was read as one class per letter), the temperature (every probability divides by it) and a
    diffusion model's timestep weights."""
    classes = meta.get("classes")
    if "classes" in meta and (
        not isinstance(classes, list)
        or not classes
        or not all(isinstance(c, str) and c.strip() for c in classes)
        or len(set(classes)) != len(classes)
    ):
        return f"classes: expected a list of distinct class names, got {classes!r:.80}"
    temperature = meta.get("temperature")
    if "temperature" in meta and (
        isinstance(temperature, bool) or not isinstance(temperature, int | float) or not 0 < temperature < math.inf
    ):
        return f"temperature: expected a finite number above 0, got {temperature!r:.40}"
    weights = meta.get("timestep_weights")
    if weights is not None:
        scoring = meta.get("scoring")
        bins = (scoring if isinstance(scoring, dict) else {}).get("timestep_bins", ScoringConfig().timestep_bins)
        numbers = isinstance(weights, list) and all(
            isinstance(w, int | float) and not isinstance(w, bool) and math.isfinite(w) for w in weights
        )
        if not numbers or len(weights) != bins:
            return f"timestep_weights: expected {bins} finite numbers (scoring.timestep_bins), got {weights!r:.80}"
    return None


def load_model(directory: Path | str, runtime: ScoringConfig | None = None) -> Classifier:
    """Load any CytoLoop model from a local directory (no hub access, ever).

    A diffusion model (or a cascade's teacher) scores as its `model.json` says. Pass the settings' scoring section
    as `runtime` and those of its `RUNTIME_FIELDS` that were set explicitly (`CYTOLOOP_SCORING__PRECISION=bf16`,
    a config file) replace the model's own: an operator picks the precision, device or threads of the machine at
    hand without editing the model. Its decisions (the tuned rule, w(t), the temperature) are never replaced, and
    a model saved after loading (a fine-tune's challenger, a re-tuned model) is saved with its own runtime, not
    the machine's (`DiffusionClassifier.own_runtime`).
    """
    directory = Path(directory)
    meta = read_model_meta(directory)
    kind = meta.get("kind")
    loaders: dict[str, Callable[[Path], Any]] = {  # each returns a Classifier
        "diffusion": DiffusionClassifier.load,
        "baseline": BaselineClassifier.load,
        "cascade": CascadeClassifier.load,
    }
    if kind not in loaders:
        raise ModelLoadError(f"{directory}: unknown model kind {kind!r}; known: {', '.join(loaders)}")
    if problem := _field_problem(meta):  # "temperature": "hot" loaded and registered, then failed every request
        raise ModelLoadError(f"{directory}: its {MODEL_FILE} is not a valid {kind} model ({problem})")
    for part in ("teacher", "student") if kind == "cascade" else ():  # its members load without `load_model`
        member = directory / str(meta.get(part, part))
        if member.is_dir() and (problem := _field_problem(read_model_meta(member))):
            raise ModelLoadError(f"{member}: its {MODEL_FILE} is not a valid {part} of a cascade ({problem})")
    sections = [k for k in ("data", "model", "scoring") if k in meta]
    if wrong := [k for k in sections if not isinstance(meta[k], dict)]:  # "data": null was a TypeError traceback
        raise ModelLoadError(
            f"{directory}: its {MODEL_FILE} is not a valid {kind} model ({', '.join(wrong)}: not an object)"
        )
    try:
        model = loaders[str(kind)](directory)
    except ValidationError as error:  # a model.json that no longer (or never did) describe a valid model
        # each section is validated alone, so its fields' names lack it: `data.image_size`, not `image_size`
        problems = describe_validation_error(error, section=SECTION_OF.get(error.title))
        raise ModelLoadError(f"{directory}: its {MODEL_FILE} is not a valid {kind} model: {problems}") from error
    except ModelLoadError:
        raise
    except KeyError as error:  # a model.json without a field every model has
        raise ModelLoadError(f"{directory}: its {MODEL_FILE} has no {error} field") from error
    except pickle.UnpicklingError as error:  # torch's own advice here (weights_only=False) is wrong for a damaged file
        raise ModelLoadError(
            f"{directory}: its weights file is damaged or not PyTorch's ({error.__class__.__name__})"
        ) from error
    except (OSError, RuntimeError, ValueError, EOFError) as error:
        # a missing or damaged weights file, or weights of another shape than model.json describes: the first
        # lines say which (torch's "Error(s) in loading state_dict" alone does not)
        lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
        detail = "; ".join(lines[:3]) or type(error).__name__
        raise ModelLoadError(f"{directory}: cannot load this {kind} model's files ({detail})") from error
    diffusion = model.teacher if isinstance(model, CascadeClassifier) else model
    if runtime is not None and isinstance(diffusion, DiffusionClassifier):
        # every set field the model does not take, not only the rule's (mask_radius, seed, ... were dropped unsaid),
        # where it differs from the model's own: a config file written whole (every field set) named all 22 of them
        given, own = runtime.model_dump(mode="json"), diffusion.scoring_config.model_dump(mode="json")
        ignored = [
            f"scoring.{field} {given[field]!r} (its own: {own[field]!r})"
            for field in sorted(runtime.model_fields_set)
            if field not in RUNTIME_FIELDS and given[field] != own[field]
        ]
        if ignored:  # said, not silently dropped (CYTOLOOP_SCORING__MAX_TRIALS=40 looked applied)
            logger.warning(
                f"{directory} scores with its own tuned rule and settings; not applied to it from the settings: "
                f"{', '.join(ignored)} (a new model trains with them; `evaluate --max-trials` caps the trials)"
            )
        update = {field: getattr(runtime, field) for field in RUNTIME_FIELDS if field in runtime.model_fields_set}
        if update:
            own = diffusion.scoring_config.model_dump(mode="json")
            diffusion.own_runtime = {field: own[field] for field in update}
            diffusion.scoring_config = ScoringConfig.model_validate({**diffusion.scoring_config.model_dump(), **update})
    cnn = model.student if isinstance(model, CascadeClassifier) else model
    if isinstance(cnn, BaselineClassifier):  # where the CNN runs: the machine's setting, or its teacher's device
        if runtime is not None and "device" in runtime.model_fields_set:
            cnn.device = runtime.device
        elif isinstance(model, CascadeClassifier):
            cnn.device = model.teacher.scoring_config.device
    return model

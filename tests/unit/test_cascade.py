"""The cascade: who answers which cell, what is saved, and how a student is distilled.

Tiny untrained models (16 px) stand in for the teacher and the student: the tests are about routing and
bookkeeping, not accuracy.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cytoloop.config import (
    AugmentConfig,
    BaselineModelConfig,
    CascadeConfig,
    DataConfig,
    DiffusionModelConfig,
    ScoringConfig,
    TrainConfig,
)
from cytoloop.models.baseline import BaselineClassifier
from cytoloop.models.cascade import CascadeClassifier, distill, soft_targets, threshold_for_fraction
from cytoloop.models.diffusion import DiffusionClassifier
from cytoloop.models.loading import load_model

SIZE = 16
CLASSES = ["a", "b", "c"]


@pytest.fixture(scope="module")
def teacher() -> DiffusionClassifier:
    torch.manual_seed(0)
    return DiffusionClassifier(
        CLASSES,
        DataConfig(image_size=SIZE),
        DiffusionModelConfig(block_out_channels=(8, 16), norm_num_groups=4),
        ScoringConfig(min_trials=1, check_every=1, elimination_p=0.2, max_trials=4, timestep_bins=2, null_trials=1),
    )


@pytest.fixture(scope="module")
def student() -> BaselineClassifier:
    torch.manual_seed(1)
    model = BaselineClassifier(CLASSES, DataConfig(image_size=SIZE), BaselineModelConfig(channels=(4, 8)))
    model.temperature = 0.05  # spread the untrained student's confidences over (1/3, 1)
    return model


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.random.default_rng(2).uniform(-1, 1, size=(12, 3, SIZE, SIZE)).astype(np.float32)


def test_defers_exactly_the_cells_under_the_threshold(teacher, student, images):
    fast = student.predict(images)
    threshold = float(np.median(fast.confidence))
    cascade = CascadeClassifier(teacher, student, CascadeConfig(threshold=threshold))
    predictions = cascade.predict(images)

    deferred = fast.confidence < threshold
    assert 0 < deferred.sum() < len(images)
    np.testing.assert_array_equal(predictions.extra["deferred"], deferred)
    # deferred cells carry the teacher's answer (scored alone or in a batch, a cell gets the same answer) ...
    slow = teacher.predict(images[deferred])
    np.testing.assert_allclose(predictions.probs[deferred], slow.probs, atol=1e-6)
    np.testing.assert_array_equal(predictions.evals[deferred], 1 + slow.evals)
    assert np.isfinite(predictions.extra["teacher_anomaly"][deferred]).all()
    # ... the others the student's, at the cost of one student pass
    np.testing.assert_allclose(predictions.probs[~deferred], fast.probs[~deferred])
    assert (predictions.evals[~deferred] == 1).all()
    assert np.isnan(predictions.extra["teacher_anomaly"][~deferred]).all()
    np.testing.assert_allclose(predictions.anomaly, fast.anomaly)


def test_a_deferred_cell_keeps_the_class_its_teacher_decided_however_close(teacher, student, images, monkeypatch):
    """The teacher's probabilities went into a copy of the student's float32 array: a class it dropped a tiny gap
    behind the winner (trials' TIE_GAP) became an exact tie, and the argmax answered the lower class, not the
    teacher's decision."""
    from cytoloop.models.base import Predictions

    def near_tie(cells, **_):  # class 1 decided, class 0 dropped a hair behind it
        probs = np.tile([0.5 - 1e-10, 0.5 + 1e-10, 0.0], (len(cells), 1))
        return Predictions(probs, np.zeros(len(cells)), np.full(len(cells), 4), {})

    monkeypatch.setattr(teacher, "predict", near_tie)
    cascade = CascadeClassifier(teacher, student, CascadeConfig(threshold=1.01))  # every cell deferred
    assert (cascade.predict(images).labels == 1).all()


def test_threshold_extremes(teacher, student, images):
    none = CascadeClassifier(teacher, student, CascadeConfig(threshold=0.0)).predict(images)
    assert not none.extra["deferred"].any()
    every = CascadeClassifier(teacher, student, CascadeConfig(threshold=1.0)).predict(images[:3])
    assert every.extra["deferred"].all()


def test_save_and_load_round_trip(teacher, student, images, tmp_path):
    threshold = float(np.median(student.predict(images).confidence))
    cascade = CascadeClassifier(teacher, student, CascadeConfig(threshold=threshold), info={"note": "test"})
    cascade.save(tmp_path / "cascade")
    loaded = load_model(tmp_path / "cascade")
    assert loaded.kind == "cascade"
    assert loaded.classes == CLASSES
    assert loaded.config.threshold == threshold
    assert load_model(tmp_path / "cascade" / "teacher").kind == "diffusion"
    assert load_model(tmp_path / "cascade" / "student").kind == "baseline"
    before, after = cascade.predict(images), loaded.predict(images)
    np.testing.assert_allclose(before.probs, after.probs, atol=1e-6)
    np.testing.assert_array_equal(before.extra["deferred"], after.extra["deferred"])
    # the CNN runs where the machine's setting says, or on its teacher's device (it ran on the CPU always)
    from cytoloop.config import ScoringConfig

    assert load_model(tmp_path / "cascade", ScoringConfig(device="cpu")).student.device == "cpu"
    assert load_model(tmp_path / "cascade").student.device == loaded.teacher.scoring_config.device
    assert load_model(tmp_path / "cascade" / "student", ScoringConfig(device="cpu")).device == "cpu"


def test_a_cascade_member_with_a_damaged_field_is_refused_naming_it(teacher, student, tmp_path):
    """The cascade's teacher and student load without `load_model`, so its field checks passed them by: a
    student whose temperature is "hot" loaded (and registered)."""
    import json

    from cytoloop.models.base import ModelLoadError

    CascadeClassifier(teacher, student, CascadeConfig(threshold=0.5)).save(tmp_path / "cascade")
    meta_file = tmp_path / "cascade" / "student" / "model.json"
    meta_file.write_text(json.dumps({**json.loads(meta_file.read_text()), "temperature": "hot"}))
    with pytest.raises(ModelLoadError, match="student: its model.json is not a valid student of a cascade"):
        load_model(tmp_path / "cascade")


def test_mismatched_classes_rejected(teacher):
    other = BaselineClassifier(["x", "y", "z"], DataConfig(image_size=SIZE), BaselineModelConfig(channels=(4,)))
    with pytest.raises(ValueError, match="classes"):
        CascadeClassifier(teacher, other)


def test_soft_targets_mix_labels_only_where_labelled():
    teacher_probs = np.array([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6]])
    targets = soft_targets(teacher_probs, np.array([1, -1]), label_weight=0.5)
    np.testing.assert_allclose(targets[0], [0.3, 0.65, 0.05])
    np.testing.assert_allclose(targets[1], teacher_probs[1])
    np.testing.assert_allclose(targets.sum(axis=1), 1.0)


@pytest.mark.parametrize("fraction", [0.0, 0.25, 0.5, 1.0])
def test_threshold_for_fraction_defers_that_fraction(fraction):
    confidence = np.random.default_rng(0).uniform(0.3, 1.0, size=40)
    threshold = threshold_for_fraction(confidence, fraction)
    assert np.mean(confidence < threshold) == pytest.approx(fraction)


def test_cells_tied_at_the_threshold_are_deferred_together():
    """A saturated student gives many cells the same confidence; the midpoint of two tied values is that value,
    and `confidence < threshold` then deferred fewer cells than asked (here none of the tied ones)."""
    for dtype in (np.float32, np.float64):  # the student's confidences are float32
        confidence = np.array([0.5, 0.9, 0.9, 0.9, 1.0], dtype=dtype)
        threshold = threshold_for_fraction(confidence, 0.4)
        assert np.mean(confidence < threshold) == pytest.approx(0.8)


def test_distill_builds_a_working_cascade(teacher, images):
    labels = np.array([0, 1, 2, 0, 1, 2, -1, -1])
    config = CascadeConfig(defer_fraction=0.5)
    cascade, report = distill(
        teacher,
        images[:8],
        labels,
        images[8:],
        np.array([0, 1, 2, 0]),
        config,
        TrainConfig(steps=3, batch_size=4, warmup_steps=1, log_every=1),
        AugmentConfig(),
        BaselineModelConfig(channels=(4, 8)),
    )
    assert report["n_distill"] == 8 and report["n_labelled"] == 6
    assert report["val_deferred_fraction"] == pytest.approx(0.5)
    assert cascade.config.threshold == report["threshold"]
    predictions = cascade.predict(images)
    assert predictions.probs.shape == (len(images), len(CLASSES))
    np.testing.assert_allclose(predictions.probs.sum(axis=1), 1.0, atol=1e-6)


def test_only_the_trainable_kinds_are_trainable(teacher, student):
    """Fine-tuning asks the model, not its kind: the diffusion model and the CNN can be trained further, a cascade
    (a threshold over two trained models) cannot."""
    from cytoloop.models.base import Trainable

    assert isinstance(teacher, Trainable) and isinstance(student, Trainable)
    assert not isinstance(CascadeClassifier(teacher, student, CascadeConfig(threshold=0.5)), Trainable)


def test_a_cascade_directory_is_served_and_versioned_by_its_parts(teacher, student, images, tmp_path):
    """A cascade keeps its weights in teacher/ and student/: serving it from a local directory must work (it used
    to fail: no weights.pt at the top) and a new student must be a new version."""
    from cytoloop.config import RegistryConfig, ServeConfig
    from cytoloop.serving.model_source import ModelSource

    CascadeClassifier(teacher, student, CascadeConfig(threshold=0.5)).save(tmp_path / "cascade")
    source = ModelSource(ServeConfig(model_dir=tmp_path / "cascade"), RegistryConfig())
    first = source.resolve(None)
    assert first.version.startswith("local-") and source.load(first).kind == "cascade"
    torch.manual_seed(7)
    other = BaselineClassifier(CLASSES, DataConfig(image_size=SIZE), BaselineModelConfig(channels=(4, 8)))
    other.save(tmp_path / "cascade" / "student")
    assert source.resolve(None).version != first.version


def test_a_site_s_classes_bind_the_student_and_the_teacher(teacher, student, images):
    allowed = np.tile([True, False, True], (len(images), 1))
    fast_all, fast = student.predict(images), student.predict(images, candidates=allowed)
    assert (fast.probs[:, 1] == 0).all() and np.allclose(fast.probs.sum(axis=1), 1)
    kept = fast_all.probs[:, [0, 2]]
    assert np.allclose(fast.probs[:, [0, 2]], kept / kept.sum(axis=1, keepdims=True), atol=1e-6)
    full = student.logits(images) / student.temperature
    energy = -student.temperature * np.log(np.exp(full[:, [0, 2]]).sum(axis=1))
    assert np.allclose(fast.anomaly, energy, atol=1e-4)  # the excluded class has no share of the energy
    for k in (None, 2):  # alone, and with the teacher deciding among the student's top k
        cascade = CascadeClassifier(teacher, student, CascadeConfig(threshold=1.1, candidates=k))
        predictions = cascade.predict(images, candidates=allowed)
        assert predictions.extra["deferred"].all() and (predictions.probs[:, 1] == 0).all()
    with pytest.raises(ValueError, match="candidates must be"):
        student.predict(images, candidates=np.zeros((len(images), 3), dtype=bool))


def test_a_deferred_cell_the_teacher_stopped_early_stays_provisional(teacher, student, images):
    """With routing the teacher may stop a deferred cell on a route exit; its class is then a guess, and the
    service must say so (`provisional`), as it does for the teacher alone."""
    from cytoloop.config import RoutingConfig

    scoring = teacher.scoring_config.model_copy(update={"min_trials": 2, "max_trials": 40, "exit_p": 0.2})
    eager = DiffusionClassifier(CLASSES, teacher.data_config, teacher.model_config, scoring, unet=teacher.unet)
    routing = RoutingConfig(review_below=0.9)
    alone = eager.predict(images[:6], routing=routing).extra["provisional"]
    assert alone.any(), "the teacher must stop some cells early for this test to mean much"
    cascade = CascadeClassifier(eager, student, CascadeConfig(threshold=1.0)).predict(images[:6], routing=routing)
    assert cascade.extra["deferred"].all()
    np.testing.assert_array_equal(cascade.extra["provisional"], alone)


def test_bad_image_arrays_are_refused_naming_the_problem_and_an_empty_batch_is_answered(teacher, student, images):
    """A fully convolutional network scored a cell of another size without complaint, a NaN image ran to the
    trial limit and answered NaN, and an empty batch failed inside numpy or torch."""
    from cytoloop.errors import UsageError

    for model in (teacher, student, CascadeClassifier(teacher, student, CascadeConfig(threshold=0.5))):
        bad = {
            "must be \\(cells, 3, 16, 16\\).*got shape \\(1, 3, 32, 32\\)": np.zeros((1, 3, 32, 32), np.float32),
            "got shape \\(1, 16, 16, 3\\)": np.zeros((1, SIZE, SIZE, 3), np.float32),
            "must be floats": np.zeros((1, 3, SIZE, SIZE), np.uint8),
            "1 of 2 images hold NaN or infinite pixels, first at row 1": np.stack([images[0], images[1] * np.nan]),
        }
        for message, array in bad.items():
            with pytest.raises(UsageError, match=message):
                model.predict(array)
        empty = model.predict(images[:0])
        assert empty.probs.shape == (0, len(CLASSES)) and len(empty.anomaly) == len(empty.evals) == 0


def test_a_torch_tensor_is_scored_as_its_array_is(teacher, student, images):
    """`score` takes tensors too; a bf16 or CUDA tensor would fail np.asarray, a float32 one must answer alike.
    The student scores the checked CPU array too (a CUDA tensor reached its CPU network; no GPU here to show it)."""
    as_array = teacher.score(images[:2]).class_error
    as_tensor = teacher.score(torch.as_tensor(images[:2])).class_error
    np.testing.assert_allclose(as_tensor, as_array)
    teacher.score(torch.as_tensor(images[:2]).to(torch.bfloat16))  # accepted (its values rounded to bf16)
    np.testing.assert_allclose(student.predict(torch.as_tensor(images[:2])).probs, student.predict(images[:2]).probs)

"""The shared training loop: it learns, it resumes exactly after a crash, and it trains the diffusion model's
null class on unlabeled cells."""

from __future__ import annotations

import copy
import shutil

import numpy as np
import pytest
import torch

from cytoloop.config import AugmentConfig, BaselineModelConfig, DataConfig, TrainConfig
from cytoloop.models.baseline import BaselineClassifier, SmallCNN
from cytoloop.models.diffusion import DiffusionClassifier
from cytoloop.models.train import CHECKPOINT_FILE, UNLABELED, baseline_loss, diffusion_loss, fit, sampling_weights

SIZE = 16


def red_blue(n_per_class: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """An easy 2-class problem: reddish vs bluish noisy images in [-1, 1]."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for label, colour in enumerate(([0.8, -0.6, -0.6], [-0.6, -0.6, 0.8])):
        base = np.asarray(colour, np.float32)[:, None, None]
        noisy = base + rng.normal(0, 0.25, size=(n_per_class, 3, SIZE, SIZE))
        images.append(np.clip(noisy, -1, 1).astype(np.float32))
        labels += [label] * n_per_class
    return np.concatenate(images), np.asarray(labels)


def _train_config(**update) -> TrainConfig:
    base = dict(steps=10, batch_size=16, lr=3e-3, warmup_steps=2, log_every=1, checkpoint_every=2, seed=0, threads=1)
    base.update(update)
    return TrainConfig(**base)


def test_sampling_weights_balance_classes():
    labels = np.array([0, 0, 0, 1, UNLABELED, UNLABELED])
    w = sampling_weights(labels)
    assert w.sum() == pytest.approx(1.0)
    per_group = {g: w[labels == g].sum() for g in (0, 1, UNLABELED)}
    assert all(v == pytest.approx(1 / 3) for v in per_group.values())
    np.testing.assert_allclose(sampling_weights(labels, balanced=False), 1 / 6)


def test_fit_baseline_learns_red_vs_blue():
    images, labels = red_blue()
    torch.manual_seed(0)
    network = SmallCNN(2, (8, 16), dropout=0.0)
    config = _train_config(steps=30, log_every=5, label_smoothing=0.0)
    logged = []
    ema, result = fit(network, baseline_loss(config), images, labels, config, AugmentConfig(), on_log=logged.append)
    assert [h["step"] for h in result.history] == [5, 10, 15, 20, 25, 30]
    assert logged == result.history
    assert result.resumed_from == 0 and result.seconds > 0
    losses = [h["loss"] for h in result.history]
    assert np.isfinite(losses).all()
    assert losses[-1] < losses[0]
    assert not ema.training
    # the trained network separates the colours
    with torch.inference_mode():
        network.eval()
        predicted = network(torch.as_tensor(images)).argmax(dim=1).numpy()
    assert (predicted == labels).mean() >= 0.9


def test_fit_rejects_mismatched_inputs():
    images, labels = red_blue(2)
    config = _train_config()
    with pytest.raises(ValueError, match="labels"):
        fit(SmallCNN(2, (8,)), baseline_loss(config), images, labels[:-1], config, AugmentConfig())
    with pytest.raises(ValueError, match="at least one"):
        fit(SmallCNN(2, (8,)), baseline_loss(config), images[:0], labels[:0], config, AugmentConfig())


class Crash(RuntimeError):
    pass


def _fresh_baseline() -> torch.nn.Module:
    torch.manual_seed(42)
    return SmallCNN(2, (8, 16), dropout=0.3)  # dropout: resume must restore the global RNG too


def test_resume_after_crash_gives_identical_weights(tmp_path):
    images, labels = red_blue(8)
    config = _train_config(steps=10, checkpoint_every=3)
    loss = baseline_loss(config)

    # uninterrupted: 10 steps in one go
    straight_net = _fresh_baseline()
    straight_ema, straight = fit(
        straight_net, loss, images, labels, config, AugmentConfig(), checkpoint_dir=tmp_path / "straight"
    )

    # interrupted: the process dies during step 7 (after the checkpoint at step 6) ...
    def crash_at_7(entry):
        if entry["step"] == 7:
            raise Crash

    with pytest.raises(Crash):
        fit(
            _fresh_baseline(),
            loss,
            images,
            labels,
            config,
            AugmentConfig(),
            checkpoint_dir=tmp_path / "resumed",
            on_log=crash_at_7,
        )
    assert (tmp_path / "resumed" / CHECKPOINT_FILE).is_file()
    assert torch.load(tmp_path / "resumed" / CHECKPOINT_FILE, weights_only=False)["step"] == 6

    # ... and a new process (fresh network, other global RNG state) resumes to step 10
    torch.manual_seed(999)
    resumed_net = SmallCNN(2, (8, 16), dropout=0.3)
    resumed_ema, resumed = fit(
        resumed_net, loss, images, labels, config, AugmentConfig(), checkpoint_dir=tmp_path / "resumed"
    )

    assert resumed.resumed_from == 6
    assert [h["step"] for h in resumed.history] == list(range(1, 11))
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in straight.history]
    for name, tensor in straight_ema.state_dict().items():
        assert torch.equal(tensor, resumed_ema.state_dict()[name]), f"EMA {name} differs after resume"
    for name, tensor in straight_net.state_dict().items():
        assert torch.equal(tensor, resumed_net.state_dict()[name]), f"network {name} differs after resume"


def _recording_loss(config: TrainConfig, draws: list) -> object:
    """The baseline loss, noting each step's batch and a draw from the loop's generator and the global one."""
    inner = baseline_loss(config)

    def loss(network, batch, targets, generator):
        draws.append((batch.clone(), torch.randint(0, 10**6, (4,), generator=generator), torch.rand(4)))
        return inner(network, batch, targets, generator)

    return loss


def test_data_parallel_workers_draw_their_own_batches_and_noise_also_after_resuming(tmp_path):
    images, labels = red_blue(8)
    config = _train_config(steps=6, checkpoint_every=3)
    single: list = []
    fit(_fresh_baseline(), _recording_loss(config, single), images, labels, config, AugmentConfig())
    draws: dict[int, list] = {}
    for stream in (0, 1):
        draws[stream] = []
        fit(_fresh_baseline(), _recording_loss(config, draws[stream]), images, labels, config, AugmentConfig(),
            stream=stream)  # fmt: skip
    for mine, theirs in zip(draws[0], single):  # worker 0 draws as a single process does
        assert all(torch.equal(a, b) for a, b in zip(mine, theirs))
    for step, (first, second) in enumerate(zip(draws[0], draws[1]), start=1):
        assert not any(torch.equal(a, b) for a, b in zip(first, second)), f"workers drew alike at step {step}"

    # a restarted worker group: every worker resumes from worker 0's checkpoint, and still draws its own
    def crash_at_4(entry):
        if entry["step"] == 4:
            raise Crash

    with pytest.raises(Crash):
        fit(_fresh_baseline(), _recording_loss(config, []), images, labels, config, AugmentConfig(),
            checkpoint_dir=tmp_path / "0", on_log=crash_at_4)  # fmt: skip
    shutil.copytree(tmp_path / "0", tmp_path / "1")
    resumed: dict[int, list] = {}
    for stream in (0, 1):
        resumed[stream] = []
        _, result = fit(_fresh_baseline(), _recording_loss(config, resumed[stream]), images, labels, config,
                        AugmentConfig(), checkpoint_dir=tmp_path / str(stream), stream=stream)  # fmt: skip
        assert result.resumed_from == 3
    assert [len(resumed[0]), len(resumed[1])] == [3, 3]
    for mine, theirs in zip(resumed[0], draws[0][3:]):  # worker 0 continues its own stream
        assert all(torch.equal(a, b) for a, b in zip(mine, theirs))
    for first, second in zip(resumed[0], resumed[1]):
        assert not any(torch.equal(a, b) for a, b in zip(first, second))
    with pytest.raises(ValueError, match="stream"):
        fit(_fresh_baseline(), baseline_loss(config), images, labels, config, AugmentConfig(), stream=-1)


def test_a_run_resumes_on_fewer_gpus_than_its_checkpoint_was_written_on(tmp_path, monkeypatch):
    """A checkpoint holds a CUDA generator state per device its writer saw; resumed by a process that sees fewer
    (a one-GPU Ray Train worker resuming a two-GPU run), restoring them all failed on the missing device. This CPU
    machine stands in for a one-GPU process: torch's CUDA generator calls are replaced by ones that keep states
    per device and, like torch's, fail on a device index the process does not have."""
    images, labels = red_blue(4)
    config = _train_config(steps=4, checkpoint_every=2)
    loss = baseline_loss(config)
    fit(_fresh_baseline(), loss, images, labels, _train_config(steps=2), AugmentConfig(), checkpoint_dir=tmp_path)
    state = torch.load(tmp_path / CHECKPOINT_FILE, weights_only=False)
    written = [torch.full((8,), 1, dtype=torch.uint8), torch.full((8,), 2, dtype=torch.uint8)]  # two GPUs' states
    torch.save({**state, "cuda_rng": written}, tmp_path / CHECKPOINT_FILE)

    devices = {0: torch.zeros(8, dtype=torch.uint8)}  # the one GPU this process sees

    def set_state(new_state, device=0):
        index = device if isinstance(device, int) else torch.device(device).index or 0
        if index not in devices:
            raise IndexError(f"no CUDA device {index}")  # torch: default_generators[index]
        devices[index] = new_state.clone()

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(devices))
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [devices[i] for i in sorted(devices)])
    for module in (torch.cuda, torch.cuda.random):
        monkeypatch.setattr(module, "set_rng_state", set_state)
    _, result = fit(_fresh_baseline(), loss, images, labels, config, AugmentConfig(), checkpoint_dir=tmp_path)
    assert result.resumed_from == 2 and result.history[-1]["step"] == 4
    assert torch.equal(devices[0], written[0])  # the device it sees has its saved state back


def test_resume_of_finished_run_does_nothing(tmp_path):
    images, labels = red_blue(4)
    config = _train_config(steps=4, checkpoint_every=2)
    loss = baseline_loss(config)
    first_ema, _ = fit(_fresh_baseline(), loss, images, labels, config, AugmentConfig(), checkpoint_dir=tmp_path)
    again_ema, again = fit(_fresh_baseline(), loss, images, labels, config, AugmentConfig(), checkpoint_dir=tmp_path)
    assert again.resumed_from == 4
    for name, tensor in first_ema.state_dict().items():
        assert torch.equal(tensor, again_ema.state_dict()[name])


def test_a_run_asked_for_fewer_steps_than_its_checkpoint_holds_is_refused(tmp_path):
    """Run again into the same folder with fewer steps (or `train --overwrite --steps N` over a finished model,
    whose run is otherwise the same), the loop ran no step and returned the longer-trained weights, reported as
    N steps."""
    from cytoloop.errors import UsageError

    images, labels = red_blue(4)
    config = _train_config(steps=4, checkpoint_every=2)
    fit(_fresh_baseline(), baseline_loss(config), images, labels, config, AugmentConfig(), checkpoint_dir=tmp_path)
    fewer = _train_config(steps=2, checkpoint_every=2)
    with pytest.raises(UsageError, match="at step 4, past train.steps = 2"):
        fit(_fresh_baseline(), baseline_loss(fewer), images, labels, fewer, AugmentConfig(), checkpoint_dir=tmp_path)


def test_a_longer_leg_says_it_stretches_the_learning_rate_schedule(tmp_path, caplog):
    """More steps on a resume (README: a longer leg) lay the cosine schedule out again from where it stood: the
    rate rises and decays anew, and the model is not the one a run of that length in one go makes. It said nothing;
    the leg now warns, naming the step and the rates."""
    images, labels = red_blue(4)
    config = _train_config(steps=4, warmup_steps=1, checkpoint_every=2, log_every=2)
    fit(_fresh_baseline(), baseline_loss(config), images, labels, config, AugmentConfig(), checkpoint_dir=tmp_path)
    longer = config.model_copy(update={"steps": 8})
    with caplog.at_level("WARNING", logger="cytoloop.models.train"):
        _, result = fit(
            _fresh_baseline(), baseline_loss(longer), images, labels, longer, AugmentConfig(), checkpoint_dir=tmp_path
        )
    assert result.resumed_from == 4 and "(4 -> 8 steps) lays the cosine" in caplog.text
    assert "out again from step 4: the rate goes from 0.050 to " in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="cytoloop.models.train"):  # the same steps again: an exact resume
        fit(_fresh_baseline(), baseline_loss(longer), images, labels, longer, AugmentConfig(), checkpoint_dir=tmp_path)
    assert "lays the cosine" not in caplog.text


def test_a_leg_that_reads_other_cells_than_its_checkpoint_trained_on_is_refused(tmp_path):
    """A leg that could not read 3 images (a flaky mount) and one that read them all drew their batches from other
    arrays: the checkpoint was taken up and every later batch drew other cells with other weights, without a word
    (the records, which the run's identity is made of, were the same)."""
    from cytoloop.data.records import DatasetError

    images, labels = red_blue(4)
    config = _train_config(steps=4, warmup_steps=1, checkpoint_every=2, log_every=2)
    fit(_fresh_baseline(), baseline_loss(config), images, labels, config, AugmentConfig(), checkpoint_dir=tmp_path)
    longer = config.model_copy(update={"steps": 6})
    fewer = (images[1:], labels[1:])  # one cell unread this leg
    with pytest.raises(DatasetError, match=r"the training cells read now \(7\) are not those its steps trained on"):
        fit(_fresh_baseline(), baseline_loss(longer), *fewer, longer, AugmentConfig(), checkpoint_dir=tmp_path)
    _, result = fit(
        _fresh_baseline(), baseline_loss(longer), images, labels, longer, AugmentConfig(), checkpoint_dir=tmp_path
    )
    assert result.resumed_from == 4  # the same cells: resumed


def test_diffusion_trains_with_unlabeled_cells(tiny_settings):
    images, labels = red_blue(6)
    labels = labels.copy()
    labels[::3] = UNLABELED
    classes = ["red", "blue"]
    torch.manual_seed(0)
    model = DiffusionClassifier(classes, tiny_settings.data, tiny_settings.diffusion, tiny_settings.scoring)
    config = tiny_settings.train.model_copy(update={"steps": 4, "log_every": 2})
    seen_classes = []
    original_forward = model.unet.forward

    def recording_forward(x, t, class_labels=None, **kwargs):
        seen_classes.extend(class_labels.tolist())
        return original_forward(x, t, class_labels=class_labels, **kwargs)

    model.unet.forward = recording_forward
    loss = diffusion_loss(model.scheduler, model.null_class, config)
    ema, result = fit(model.unet, loss, images, labels, config, tiny_settings.augment)
    assert [h["step"] for h in result.history] == [2, 4]
    assert all(np.isfinite(h["loss"]) for h in result.history)
    # unlabeled cells are routed to the null class: no -1 ever reaches the embedding
    assert min(seen_classes) >= 0 and max(seen_classes) <= model.null_class
    assert model.null_class in seen_classes


def test_baseline_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    model = BaselineClassifier(
        ["a", "b"], DataConfig(image_size=SIZE), BaselineModelConfig(channels=(8, 16)), temperature=1.7
    )
    images, _ = red_blue(2)
    before = model.predict(images)
    from cytoloop.models.loading import load_model

    loaded = load_model(model.save(tmp_path / "m"))
    after = loaded.predict(images)
    assert loaded.kind == "baseline" and loaded.classes == ["a", "b"] and loaded.temperature == 1.7
    np.testing.assert_allclose(after.probs, before.probs, atol=1e-6)
    np.testing.assert_allclose(after.probs.sum(axis=1), 1.0)


def test_a_model_whose_saved_scoring_is_invalid_fails_to_load_naming_its_file(tmp_path, tiny_settings):
    import json

    from cytoloop.models.base import ModelLoadError
    from cytoloop.models.loading import load_model

    model = DiffusionClassifier(
        ["a", "b"], tiny_settings.data, tiny_settings.diffusion, scoring_config=tiny_settings.scoring
    )
    directory = model.save(tmp_path / "m")
    meta = json.loads((directory / "model.json").read_text())
    meta["scoring"].update(min_trials=12, max_trials=8)
    (directory / "model.json").write_text(json.dumps(meta))
    expected = r"m: its model.json is not a valid diffusion model: scoring: .*max_trials \(8\) must be at least"
    with pytest.raises(ModelLoadError, match=expected):
        load_model(directory)
    meta["scoring"].update(min_trials=3)
    meta["data"]["image_size"] = 8  # a field's problem is named with its section
    (directory / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ModelLoadError, match=r"diffusion model: data\.image_size: Input should be greater"):
        load_model(directory)


def test_bf16_training_keeps_fp32_weights_and_learns():
    images, labels = red_blue(8)
    config = _train_config(steps=30, precision="bf16")
    network = _fresh_baseline()
    ema, result = fit(network, baseline_loss(config), images, labels, config, AugmentConfig())
    assert all(p.dtype == torch.float32 for p in list(network.parameters()) + list(ema.parameters()))
    assert all(np.isfinite(h["loss"]) for h in result.history)
    assert result.history[-1]["loss"] < result.history[0]["loss"]


def test_training_a_diffusion_model_ends_with_its_scoring_tuned_on_a_capped_draw(tmp_path, tiny_overrides, clean_env):
    """train_model tunes the scoring it saves (the fast rule every later command uses); the exhaustive pass
    sees at most `calibration_cells` validation cells, the temperature all of them."""
    import json

    from cytoloop.config import load_settings
    from cytoloop.data.records import CellRecord
    from cytoloop.models.loading import load_model
    from cytoloop.workflows import train_model

    overrides = copy.deepcopy(tiny_overrides)  # the fixture is shared by the session: change a copy
    overrides["scoring"]["calibration_cells"] = 4
    settings = load_settings(overrides=overrides)
    root = tmp_path / "cells"
    records = []
    images, labels = red_blue(40)
    from PIL import Image

    for i, (image, label) in enumerate(zip(images, labels)):
        path = root / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(((image.transpose(1, 2, 0) + 1) * 127.5).astype(np.uint8)).save(path)
        records.append(CellRecord(f"{i}.png", path, ["red", "blue"][label], "lab"))
    scored: list[tuple[int, int]] = []
    original = DiffusionClassifier.score

    def recording(self, cells, config=None, progress=False, **kwargs):
        used = config or self.scoring_config
        scored.append((len(cells), used.max_trials))
        return original(self, cells, config, progress, **kwargs)

    DiffusionClassifier.score = recording
    try:
        model, report = train_model("diffusion", records, settings, tmp_path / "model", classes=["red", "blue"])
    finally:
        DiffusionClassifier.score = original
    n_val = report["n_val"]
    assert n_val > 4
    # one exhaustive pass on 4 cells (its first trials fit the weights, all of them tune the rule), then the
    # temperature with the tuned rule (every val cell)
    assert scored == [
        (4, max(settings.scoring.tuning_trials, settings.scoring.calibration_trials)),
        (n_val, settings.scoring.max_trials),
    ]
    tuning = json.loads((tmp_path / "model" / "tuning.json").read_text())
    assert (tuning["n_cells"], tuning["n_temperature_cells"]) == (4, n_val)
    saved = load_model(tmp_path / "model")
    assert saved.scoring_config.check_every == 1  # the tuned rule tests after every trial
    assert report["tuned_rule"] == tuning["chosen"] and tuning["chosen"] is not None


def test_training_and_scoring_restore_the_callers_thread_count(tiny_settings):
    images, labels = red_blue(4)
    before = torch.get_num_threads()
    wanted = 1 if before != 1 else 2
    fit(
        _fresh_baseline(),
        baseline_loss(_train_config(steps=2, threads=wanted)),
        images,
        labels,
        _train_config(steps=2, threads=wanted),
        AugmentConfig(),
    )
    assert torch.get_num_threads() == before
    model = DiffusionClassifier(
        ["red", "blue"],
        tiny_settings.data,
        tiny_settings.diffusion,
        tiny_settings.scoring.model_copy(update={"threads": wanted}),
    )
    model.score(images[:2])
    assert torch.get_num_threads() == before


def test_timestep_weights_of_another_stratification_are_an_error(tiny_settings):
    from cytoloop.errors import UsageError

    model = DiffusionClassifier(
        ["red", "blue"],
        tiny_settings.data,
        tiny_settings.diffusion,
        tiny_settings.scoring,
        timestep_weights=[1.0] * (tiny_settings.scoring.timestep_bins + 1),
    )
    with pytest.raises(UsageError, match="timestep weights were fitted for 5 timestep strata"):
        model.score(red_blue(1)[0])


def test_a_damaged_model_directory_fails_to_load_naming_it(tmp_path, tiny_settings):
    """A truncated model.json, one without its classes, garbage weights, weights of other classes: each used to
    surface as a bare KeyError, JSONDecodeError, UnpicklingError or size mismatch, a traceback for an operator."""
    import json

    from cytoloop.models.base import ModelLoadError
    from cytoloop.models.loading import load_model

    model = DiffusionClassifier(["a", "b"], tiny_settings.data, tiny_settings.diffusion, tiny_settings.scoring)
    directory = model.save(tmp_path / "m")
    meta = (directory / "model.json").read_text()
    weights = next(p for p in directory.iterdir() if p.suffix in (".pt", ".safetensors"))
    damages = {
        "not valid JSON": lambda: (directory / "model.json").write_text(meta[: len(meta) // 2]),
        "has no 'classes' field": lambda: (directory / "model.json").write_text(
            json.dumps({k: v for k, v in json.loads(meta).items() if k != "classes"})
        ),
        "weights file is damaged or not PyTorch's": lambda: weights.write_bytes(b"not a tensor file"),
    }
    pristine = weights.read_bytes()
    for expected, damage in damages.items():
        damage()
        with pytest.raises(ModelLoadError, match=f"m.*{expected}"):
            load_model(directory)
        (directory / "model.json").write_text(meta)
        weights.write_bytes(pristine)
    (directory / "model.json").write_text(json.dumps({**json.loads(meta), "classes": ["a", "b", "c"]}))
    with pytest.raises(ModelLoadError, match="cannot load this diffusion model's files"):
        load_model(directory)


def test_a_classifier_of_one_class_is_refused_before_training(tmp_path, tiny_settings):
    """`train --classes lymphocyte` trained a one-class 'classifier' (loss 0, temperature 3e3) and exited 0."""
    from cytoloop.data.records import CellRecord
    from cytoloop.errors import UsageError
    from cytoloop.workflows import train_model

    records = [CellRecord(f"c{i}.png", tmp_path / f"c{i}.png", "lymphocyte", "lab") for i in range(10)]
    with pytest.raises(UsageError, match="at least 2 classes; these cells give \\['lymphocyte'\\]"):
        train_model("baseline", records, tiny_settings, tmp_path / "model")
    assert not (tmp_path / "model").exists()  # refused before anything was written


def test_cells_that_cannot_be_read_are_named_when_too_few_are_left(tmp_path, tiny_settings):
    """24 listed cells, none on disk: the error said only that 24 cells were too few, never that none could be read
    (later, that too few validation cells could, counting those alone)."""
    from cytoloop.data.records import CellRecord, DatasetError
    from cytoloop.workflows import train_model

    records = [CellRecord(f"c{i}.png", tmp_path / f"c{i}.png", "ab"[i % 2], "lab") for i in range(24)]
    with pytest.raises(
        DatasetError, match=f"none of the 2. training and validation cells could be read.*{tmp_path}/c"
    ) as e:
        train_model("baseline", records, tiny_settings, tmp_path / "model")
    assert str(e.value).count(str(tmp_path)) == 1  # the file named once, not "X: X: file not found"


def test_a_run_resumes_only_its_own_checkpoints(tmp_path, tiny_overrides, cells_dir):
    """`train --overwrite` over a finished model resumed the old run's checkpoints: with the same number of
    steps the 'new' model was the old one, byte for byte, whatever the new cells. An unfinished run's checkpoints
    given to another run (other cells, classes or kind) trained on from the wrong weights or failed with a torch
    traceback. Now the same run resumes (a longer leg), `--overwrite` of a finished model by another run starts
    afresh, and another run's checkpoints in an unfinished folder are refused, naming what differs, before
    anything in the folder is touched. A seed in the settings file seeds the run (it was replaced by 0)."""
    import hashlib
    import json

    from typer.testing import CliRunner

    from ops.cli import app

    config = tmp_path / "settings.json"
    config.write_text(json.dumps({**tiny_overrides, "train": {**tiny_overrides["train"], "seed": 7}}))
    out = tmp_path / "model"

    def train(domain: str, *extra: str):
        args = ["train", "--kind", "baseline", "--data", str(cells_dir), "--domains", domain]
        args += ["--classes", "neutrophil,lymphocyte", "--out", str(out), "--config", str(config), *extra]
        return CliRunner().invoke(app, args)

    def weights() -> str:
        return hashlib.sha256((out / "weights.pt").read_bytes()).hexdigest()

    def resumed_from() -> int:
        return json.loads((out / "training.json").read_text())["resumed_from_step"]

    assert train("jtsc").exit_code == 0
    first = weights()
    assert json.loads((out / "training.json").read_text())["settings"]["train"]["seed"] == 7
    longer = train("jtsc", "--overwrite", "--steps", "14")  # the same run, a longer leg: resumed
    assert longer.exit_code == 0 and resumed_from() == 10 and weights() != first
    (out / "checkpoints" / "run.json").unlink()  # as checkpoints written before runs were recorded
    legacy = train("bccd", "--overwrite")  # another run replacing a finished model: afresh, told by training.json
    assert legacy.exit_code == 0 and resumed_from() == 0, legacy.output
    other = train("jtsc", "--overwrite")  # and told by run.json
    assert other.exit_code == 0 and resumed_from() == 0, other.output
    (out / "model.json").unlink()  # an unfinished run now: its checkpoints only
    split = (out / "split.json").read_bytes()
    refused = train("bccd")
    unboxed = " ".join(refused.output.split())
    assert refused.exit_code == 2 and "holds the checkpoints of another training run" in unboxed, refused.output
    assert "differs in training cells" in unboxed and (out / "split.json").read_bytes() == split
    # a finished model replaced by a run that then fails (here: its images are not there): the old model's files
    # went on loading beside the new run's split (evaluate scored it on its own training cells), its recipe and
    # card describing it; the old model is now gone before the new run writes anything
    assert train("jtsc").exit_code == 0  # the same run as the checkpoints': finished again
    (out / "recipe.json").write_text("{}")
    (out / "MODEL_CARD.md").write_text("# Model card: the old model")
    missing = tmp_path / "missing.csv"
    missing.write_text("path,label,domain\n" + "".join(f"gone-{c}{i}.png,{c},jtsc\n" for i in range(8) for c in "ab"))
    args = ["train", "--kind", "baseline", "--data", str(missing), "--out", str(out), "--config", str(config)]
    failed = CliRunner().invoke(app, [*args, "--overwrite"])
    assert failed.exit_code == 2 and "could be read" in failed.output, failed.output
    assert not any((out / name).exists() for name in ("model.json", "weights.pt", "recipe.json", "MODEL_CARD.md"))


def test_a_misspelt_label_or_an_unreadable_class_is_refused_before_training(tmp_path, tiny_settings, cells_dir):
    """One row labelled 'neutrophill' trained as a class of its own, its one cell drawn for 1/K of every batch,
    and a class none of whose training images could be read trained as a class with no cell; both exited 0."""
    from dataclasses import replace

    from cytoloop.data.records import DatasetError, load_records, select
    from cytoloop.workflows import train_model

    records = select(load_records(cells_dir), ["jtsc"], ["neutrophil", "lymphocyte"])[:40]
    typo = [*records, replace(records[0], label="neutrophill")]
    with pytest.raises(DatasetError, match=r"too few labelled cells for a class: 'neutrophill' \(1\); .* misspelt"):
        train_model("baseline", typo, tiny_settings, tmp_path / "typo")
    assert not (tmp_path / "typo").exists()  # refused before anything is written
    gone = [replace(r, path=tmp_path / f"gone{i}.png") if r.label == "lymphocyte" else r for i, r in enumerate(records)]
    with pytest.raises(DatasetError, match=r"no training cell of 'lymphocyte' could be read"):
        train_model("baseline", gone, tiny_settings, tmp_path / "unread")


def test_cells_learnt_from_unlabeled_are_held_out_of_evaluation(tmp_path, tiny_overrides, cells_dir):
    """`train --unlabeled-domains bccd` trains the denoiser on bccd's cells, and `evaluate --domains bccd` then
    scored the model on them saying "0 excluded": the split kept only the labelled parts."""
    import json

    from typer.testing import CliRunner

    from cytoloop.data.records import load_records, select
    from cytoloop.workflows import held_out, seen_by
    from ops.cli import app

    config = tmp_path / "settings.json"
    config.write_text(json.dumps(tiny_overrides))
    out = tmp_path / "model"
    args = ["train", "--data", str(cells_dir), "--domains", "jtsc", "--classes", "neutrophil,lymphocyte"]
    args += ["--unlabeled-domains", "bccd", "--steps", "4", "--out", str(out), "--config", str(config)]
    trained = CliRunner().invoke(app, args)
    assert trained.exit_code == 0, trained.output
    bccd = select(load_records(cells_dir), ["bccd"])
    assert len(json.loads((out / "split.json").read_text())["parts"]["unlabeled"]) == len(bccd)
    assert held_out(bccd, out) == ([], len(bccd)) and len(seen_by(bccd, out)) == len(bccd)
    cellavision = select(load_records(cells_dir), ["cellavision"])  # never seen: all of them evaluated
    assert held_out(cellavision, out) == (cellavision, 0)

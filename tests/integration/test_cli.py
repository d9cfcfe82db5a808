"""End to end through the `cytoloop` command: train tiny models on a few real cells, evaluate them, sample from the
diffusion model (each as `python -m ops.cli` in a subprocess), and check the error paths (exit code 2, run
in-process through typer's CliRunner, since they must fail before any real work).

The manifests written here live in a temporary folder and point at the shared images with absolute paths; no image
is ever copied. Models are 16 px with a handful of training steps: the point is the plumbing, not accuracy.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

pytestmark = pytest.mark.integration

CLASSES = ["lymphocyte", "monocyte", "neutrophil"]
PER_CLASS = 12
REPORT_KEYS = {
    "accuracy",
    "balanced_accuracy",
    "per_class_recall",
    "ece",
    "nll",
    "brier",
    "accuracy_at_90_coverage",
    "denoiser_evals_per_cell",
    "cells_per_second",
    "n_cells",
    "n_skipped",
}


def run_cli(*args: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CYTOLOOP_")}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", MPLBACKEND="Agg", TQDM_DISABLE="1")
    return subprocess.run(
        [sys.executable, "-m", "ops.cli", *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def invoke(*args: str, cwd: Path):
    """Run a command in-process (typer's CliRunner): for the error paths, which must fail before any real work,
    so they need not pay a fresh interpreter's imports. Returns click's Result (exit_code, stdout, stderr)."""
    from typer.testing import CliRunner

    from ops.cli import app

    previous = Path.cwd()
    os.chdir(cwd)
    try:
        unset = {k: None for k in os.environ if k.startswith("CYTOLOOP_")}  # as hermetic as the subprocesses
        return CliRunner().invoke(app, [str(a) for a in args], env=unset)
    finally:
        os.chdir(previous)


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return result


def _write_manifest(path: Path, rows: list[dict]) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["path", "label", "domain"])
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture(scope="module")
def workspace(cells_dir, tiny_overrides, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("cli")
    with (cells_dir / "manifest.csv").open(newline="") as handle:
        shared = list(csv.DictReader(handle))

    def pick(domain: str, label: str, n: int) -> list[dict]:
        rows = sorted((r for r in shared if r["domain"] == domain and r["label"] == label), key=lambda r: r["path"])
        assert len(rows) >= n, f"shared data has only {len(rows)} {domain}/{label} cells"
        return [{"path": str((cells_dir / r["path"]).resolve()), "label": label, "domain": domain} for r in rows[:n]]

    train_rows = [row for label in CLASSES for row in pick("jtsc", label, PER_CLASS)]
    # a BMP signature followed by garbage, listed by a relative path whose '-' sorts before every absolute path's
    # '/': a draw of cells (sorted by id within a class) takes it first among the neutrophils, wherever the data lies
    corrupt = root / "-corrupt_cell.bmp"
    corrupt.write_bytes(b"BM" + os.urandom(600))
    anomaly_rows = pick("allidb2", "blast", 6) + pick("allidb2", "normal", 6)

    config = root / "tiny.json"
    config.write_text(json.dumps(tiny_overrides))
    return {
        "root": root,
        "train": _write_manifest(root / "train.csv", train_rows),
        # the training cells again (the held-out logic must drop train/val) plus one unreadable image
        "eval": _write_manifest(
            root / "eval.csv", train_rows + [{"path": corrupt.name, "label": "neutrophil", "domain": "jtsc"}]
        ),
        "anomaly": _write_manifest(root / "anomaly.csv", anomaly_rows),
        "corrupt": corrupt,
        "config": config,
    }


# --------------------------------------------------------------------------- diffusion


@pytest.fixture(scope="module")
def diffusion_model(workspace) -> Path:
    out = workspace["root"] / "diffusion"
    ok(
        run_cli(
            "train",
            "--kind",  # the kind; --model is a model directory everywhere else (and train still takes it, old name)
            "diffusion",
            "--data",
            workspace["train"],
            "--out",
            out,
            "--config",
            workspace["config"],
            "--steps",
            "6",
            cwd=workspace["root"],
        )
    )
    return out


@pytest.fixture(scope="module")
def diffusion_eval(workspace, diffusion_model) -> dict:
    json_out = workspace["root"] / "reports" / "diffusion.json"
    result = ok(
        run_cli(
            "evaluate",
            "--model",
            diffusion_model,
            "--data",
            workspace["eval"],
            "--json",
            json_out,
            "--anomaly-data",
            workspace["anomaly"],
            cwd=workspace["root"],
        )
    )
    return {"stdout": result.stdout, "json": json_out, "report": json.loads(json_out.read_text())}


def test_train_writes_model_directory(diffusion_model):
    for name in ("model.json", "weights.pt", "split.json", "training.json", "learning_curve.png"):
        assert (diffusion_model / name).is_file(), name
    meta = json.loads((diffusion_model / "model.json").read_text())
    assert meta["kind"] == "diffusion" and meta["classes"] == CLASSES
    assert meta["data"]["image_size"] == 16  # the JSON config reached the model
    assert meta["model"]["block_out_channels"] == [8, 16]
    assert len(meta["timestep_weights"]) == meta["scoring"]["timestep_bins"]
    training = json.loads((diffusion_model / "training.json").read_text())
    assert training["steps"] == 6  # --steps beats the config file
    assert training["n_skipped"] == 0
    split = json.loads((diffusion_model / "split.json").read_text())["parts"]
    assert training["n_train"] == len(split["train"]) and training["n_val"] == len(split["val"])
    assert sum(len(ids) for ids in split.values()) == PER_CLASS * len(CLASSES)


def test_evaluate_report_has_all_metrics(diffusion_eval):
    report = diffusion_eval["report"]
    missing = REPORT_KEYS - report.keys()
    assert not missing, f"missing keys: {missing}"
    assert set(report["per_class_recall"]) == set(CLASSES)
    for key in ("accuracy", "balanced_accuracy", "ece", "accuracy_at_90_coverage"):
        assert 0.0 <= report[key] <= 1.0, key
    assert 0.0 <= report["brier"] <= 2.0  # summed over classes: 2 is a confident wrong answer
    assert report["nll"] >= 0
    assert report["cells_per_second"] > 0
    # the tiny scoring: at most max_trials (8) trials x (3 classes + null)
    assert 0 < report["denoiser_evals_per_cell"] <= 8 * (len(CLASSES) + 1)
    assert "accuracy" in diffusion_eval["stdout"]


def test_evaluate_excludes_training_cells(diffusion_eval, diffusion_model):
    report = diffusion_eval["report"]
    split = json.loads((diffusion_model / "split.json").read_text())["parts"]
    seen = len(split["train"]) + len(split["val"])
    assert report["n_excluded_seen_in_training"] == seen > 0
    assert report["n_cells"] == len(split["test"])  # exactly the held-out part is scored


def test_evaluate_skips_corrupt_image(diffusion_eval, workspace):
    report = diffusion_eval["report"]
    assert report["n_skipped"] == 1
    assert report["skipped"][0][0] == str(workspace["corrupt"])
    assert "corrupt_cell.bmp" in diffusion_eval["stdout"]


def test_evaluate_anomaly_auroc(diffusion_eval):
    report = diffusion_eval["report"]
    assert 0.0 <= report["anomaly_auroc"] <= 1.0
    assert report["anomaly_n"] == 12 and report["anomaly_n_positive"] == 6


def test_evaluate_writes_plots(diffusion_eval):
    stem = diffusion_eval["json"].with_suffix("")
    for suffix in (".reliability.png", ".confusion.png"):
        path = Path(f"{stem}{suffix}")
        assert path.is_file(), path
        with Image.open(path) as image:
            assert image.format == "PNG"


def test_generate_writes_png(diffusion_model, workspace):
    out = workspace["root"] / "grid.png"
    ok(
        run_cli(
            "generate",
            "--model",
            diffusion_model,
            "--class",
            "monocyte",
            "-n",
            "4",
            "--steps",
            "3",
            "--out",
            out,
            cwd=workspace["root"],
        )
    )
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size[0] >= 16


def test_generate_unknown_class_exits_2(diffusion_model, workspace):
    result = invoke(
        "generate",
        "--model",
        diffusion_model,
        "--class",
        "platelet",
        "-n",
        "2",
        "--steps",
        "2",
        "--out",
        workspace["root"] / "never.png",
        cwd=workspace["root"],
    )
    assert result.exit_code == 2, result.output
    assert "platelet" in result.stderr and all(c in result.stderr for c in CLASSES)
    assert "Traceback" not in result.stderr
    assert not (workspace["root"] / "never.png").exists()


def test_train_unknown_class_exits_2(workspace):
    out = workspace["root"] / "never_trained"
    result = invoke(
        "train",
        "--data",
        workspace["train"],
        "--out",
        out,
        "--classes",
        "neutrophil,basofil",
        "--config",
        workspace["config"],
        cwd=workspace["root"],
    )
    assert result.exit_code == 2, result.output
    assert "basofil" in result.stderr and all(c in result.stderr for c in CLASSES)
    assert "Traceback" not in result.stderr
    assert not (out / "model.json").exists()


def test_evaluate_unknown_class_exits_2(diffusion_model, workspace):
    result = invoke(
        "evaluate",
        "--model",
        diffusion_model,
        "--data",
        workspace["eval"],
        "--classes",
        "erythrocyte",
        cwd=workspace["root"],
    )
    assert result.exit_code == 2, result.output
    assert "erythrocyte" in result.stderr and all(c in result.stderr for c in CLASSES)
    assert "Traceback" not in result.stderr


# --------------------------------------------------------------------------- baseline


@pytest.fixture(scope="module")
def baseline_model(workspace) -> Path:
    out = workspace["root"] / "baseline"
    ok(
        run_cli(
            "train",
            "--model",
            "baseline",
            "--data",
            workspace["train"],
            "--out",
            out,
            "--config",
            workspace["config"],
            cwd=workspace["root"],
        )
    )
    return out


def test_baseline_train_and_evaluate(baseline_model, workspace):
    meta = json.loads((baseline_model / "model.json").read_text())
    assert meta["kind"] == "baseline" and meta["classes"] == CLASSES and meta["temperature"] > 0
    json_out = workspace["root"] / "reports" / "baseline.json"
    ok(
        run_cli(
            "evaluate",
            "--model",
            baseline_model,
            "--data",
            workspace["eval"],
            "--json",
            json_out,
            "--anomaly-data",
            workspace["anomaly"],
            cwd=workspace["root"],
        )
    )
    report = json.loads(json_out.read_text())
    assert not REPORT_KEYS - report.keys()
    assert report["model_kind"] == "baseline"
    assert report["denoiser_evals_per_cell"] == 1.0
    assert report["n_skipped"] == 1 and report["n_excluded_seen_in_training"] > 0
    assert 0.0 <= report["anomaly_auroc"] <= 1.0
    assert Path(f"{json_out.with_suffix('')}.reliability.png").is_file()
    assert Path(f"{json_out.with_suffix('')}.confusion.png").is_file()


def test_tune_distill_and_evaluate_a_cascade(diffusion_model, workspace):
    """The fast path from the command line: tune a model's scoring in place, distil a cascade from it, evaluate it
    like any model."""
    import shutil

    model = workspace["root"] / "tuned"
    shutil.copytree(diffusion_model, model)
    result = ok(
        run_cli(
            "tune",
            "--model",
            model,
            "--data",
            workspace["train"],
            "--trials",
            "8",
            "--agreement",
            "0.5",
            "--null-trials",
            "1",
            cwd=workspace["root"],
        )
    )
    tuning = json.loads((model / "tuning.json").read_text())
    chosen = tuning["chosen"]
    assert chosen is not None and chosen["agreement"] >= 0.5, result.stdout
    assert "a rule that knew when to stop would need" in result.stdout
    scoring = json.loads((model / "model.json").read_text())["scoring"]  # the rule is saved in the model
    assert (scoring["min_trials"], scoring["elimination_p"], scoring["check_every"], scoring["null_trials"]) == (
        chosen["min_trials"],
        chosen["elimination_p"],
        1,
        1,
    )

    cascade = workspace["root"] / "cascade"
    ok(
        run_cli(
            "distill",
            "--teacher",
            model,
            "--data",
            workspace["train"],
            "--out",
            cascade,
            "--steps",
            "4",
            "--no-tune",
            "--defer-fraction",
            "0.5",
            "--config",
            workspace["config"],
            cwd=workspace["root"],
        )
    )
    json_out = workspace["root"] / "reports" / "cascade.json"
    ok(run_cli("evaluate", "--model", cascade, "--data", workspace["eval"], "--json", json_out, cwd=workspace["root"]))
    report = json.loads(json_out.read_text())
    assert report["model_kind"] == "cascade" and report["classes"] == CLASSES
    assert report["n_skipped"] == 1 and report["n_excluded_seen_in_training"] > 0  # the teacher's split came along
    assert report["denoiser_evals_per_cell"] >= 1.0
    # a cascade's teacher and student would not travel with a registered version: refused, nothing registered
    refused = invoke("register", cascade, cwd=workspace["root"])
    assert refused.exit_code == 2 and "a cascade model cannot be registered" in refused.stderr, refused.output


def test_generate_refuses_baseline(baseline_model, workspace):
    result = invoke(
        "generate",
        "--model",
        baseline_model,
        "--class",
        "monocyte",
        "-n",
        "2",
        "--out",
        workspace["root"] / "never.png",
        cwd=workspace["root"],
    )
    assert result.exit_code == 2, result.output
    assert "only diffusion models" in result.stderr


# --------------------------------------------------------------------------- entry point and small datasets


def test_console_script_info(diffusion_model, workspace):
    """The installed `cytoloop` entry point (pyproject [project.scripts]) works, not only `python -m`."""
    script = Path(sys.executable).parent / "cytoloop"
    assert script.is_file(), f"console script not installed next to {sys.executable}; run `pip install -e .`"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CYTOLOOP_")}
    result = subprocess.run(
        [str(script), "info", str(diffusion_model)],
        cwd=workspace["root"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    ok(result)
    assert json.loads(result.stdout)["kind"] == "diffusion"
    missing = subprocess.run(
        [str(script), "info", str(workspace["root"] / "no_model")], env=env, capture_output=True, text=True, timeout=120
    )
    assert missing.returncode == 2 and "not a CytoLoop model directory" in missing.stderr


def test_train_too_few_cells_for_validation_exits_2(workspace, tiny_overrides):
    root = workspace["root"] / "small_dataset"
    for label, colour in (("red", (200, 40, 40)), ("blue", (40, 40, 200))):
        (root / label).mkdir(parents=True)
        image = Image.new("RGB", (24, 24), colour)
        image.paste((90, 40, 140), (8, 8, 16, 16))  # something in it (a blank image is refused)
        image.save(root / label / "0.png")  # one cell per class: nothing for val
    result = invoke(
        "train",
        "--model",
        "baseline",
        "--data",
        root,
        "--out",
        workspace["root"] / "small_model",
        "--config",
        workspace["config"],
        "--steps",
        "2",
        cwd=workspace["root"],
    )
    assert result.exit_code == 2, f"{result.exception!r}\n{result.output[-2000:]}"
    said = " ".join(result.output.split())  # refused before anything is trained or written
    assert "'blue' (1), 'red' (1); each needs at least 3 to be trained, calibrated and tested on" in said, said
    assert not (workspace["root"] / "small_model").exists()


# --------------------------------------------------------------------------- recipes


def test_a_recipe_fixes_what_it_trains_and_records_the_command(workspace, tiny_overrides, monkeypatch):
    """`train --recipe` takes model, cells, budget and settings from the recipe and writes recipe.json with the
    command that reproduces the model; flags the recipe fixes are refused, and so are settings the environment
    gives otherwise (its steps were overridden in silence: CYTOLOOP_TRAIN__STEPS=5 trained the recipe's 20,000)."""
    from cytoloop.models.recipes import RECIPES, Recipe

    recipe = Recipe(
        name="tiny-test",
        description="a 4-step CNN on two classes",
        model="baseline",
        domains=("jtsc",),
        classes=("lymphocyte", "neutrophil"),
        steps=4,
        seed=3,
        overrides=tiny_overrides,
    )
    monkeypatch.setitem(RECIPES, recipe.name, recipe)
    out = workspace["root"] / "recipe-model"
    from typer.testing import CliRunner

    from ops.cli import app

    monkeypatch.chdir(workspace["root"])
    result = CliRunner().invoke(
        app,
        ["train", "--recipe", "tiny-test", "--data", str(workspace["train"]), "--out", str(out)],
        env={"CYTOLOOP_TRAIN__STEPS": "50"},
    )
    assert result.exit_code == 2 and "--recipe tiny-test fixes train.steps" in " ".join(result.output.split())
    result = CliRunner().invoke(
        app,
        ["train", "--recipe", "tiny-test", "--data", str(workspace["train"]), "--out", str(out)],
        env={"CYTOLOOP_TRAIN__STEPS": "4", "CYTOLOOP_TRAIN__THREADS": "1"},  # the recipe's own, and a neutral one
    )
    assert result.exit_code == 0, result.output
    training = json.loads((out / "training.json").read_text())
    assert training["steps"] == 4 and training["settings"]["train"]["seed"] == 3
    assert training["kind"] == "baseline" and training["classes"] == ["lymphocyte", "neutrophil"]
    record = json.loads((out / "recipe.json").read_text())
    assert record["recipe"] == "tiny-test"
    assert record["command"] == f"cytoloop train --recipe tiny-test --data {workspace['train']} --out {out}"
    split = json.loads((out / "split.json").read_text())
    assert split["meta"]["seed"] == 3
    # a setting the recipe leaves at its default, set by the environment, made another model under the recipe's
    # name (a stray CYTOLOOP_TRAIN__LR): refused, naming it; what does not change the result may still be set
    stray = CliRunner().invoke(
        app,
        ["train", "--recipe", "tiny-test", "--data", str(workspace["train"]), "--out", str(out), "--overwrite"],
        env={"CYTOLOOP_TRAIN__LR": "0.5", "CYTOLOOP_DATA__CROP": "center", "CYTOLOOP_TRAIN__THREADS": "1"},
    )
    assert stray.exit_code == 2, stray.output
    assert "--recipe tiny-test fixes data.crop, train.lr" in " ".join(stray.output.split())


def test_recipe_errors_exit_2(workspace):
    result = invoke(
        "train",
        "--recipe",
        "base-pbc",
        "--steps",
        "5",
        "--domains",
        "jtsc",
        "--data",
        workspace["train"],
        "--out",
        workspace["root"] / "never",
        cwd=workspace["root"],
    )
    assert result.exit_code == 2 and "fixes --domains, --steps" in result.stderr
    result = invoke(
        "train",
        "--recipe",
        "base-pcb",
        "--data",
        workspace["train"],
        "--out",
        workspace["root"] / "never",
        cwd=workspace["root"],
    )
    assert result.exit_code == 2 and "unknown recipe 'base-pcb'" in result.stderr and "base-pbc" in result.stderr
    listing = invoke("recipes", cwd=workspace["root"])
    assert listing.exit_code == 0 and "base-pbc " in listing.stdout and "20000 steps" in listing.stdout


def test_evaluate_on_a_fixed_draw_of_cells(baseline_model, workspace):
    json_out = workspace["root"] / "reports" / "baseline-cells.json"
    draw = ["evaluate", "--model", baseline_model, "--data", workspace["eval"], "--cells", "3", "--json"]
    result = invoke(*draw, json_out, cwd=workspace["root"])
    assert result.exit_code == 0, result.output
    report = json.loads(json_out.read_text())
    # the draw takes one cell of each of the three classes first, the corrupt neutrophil first of its class
    assert report["n_cells"] == 2 and [path for path, _ in report["skipped"]] == [str(workspace["corrupt"])]
    machine = invoke(*draw, "-", cwd=workspace["root"])  # the same report as JSON on stdout
    assert machine.exit_code == 0 and json.loads(machine.stdout)["n_cells"] == report["n_cells"]


def test_a_lab_is_evaluated_on_the_classes_it_has(baseline_model, workspace, tmp_path):
    """A lab whose cells lack one of the model's classes is evaluated on the others (it was refused: 'unknown
    class'), and the cells of classes the model lacks are named (a misspelt label vanished without a word); a
    class the user names that the cells lack is refused naming it."""
    import csv

    with open(workspace["eval"], newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if r["label"] != "monocyte" and "corrupt" not in r["path"]]
    rows[0]["label"] = rows[0]["label"].capitalize()  # 'Neutrophil', say: not the model's class
    lab = _write_manifest(tmp_path / "lab.csv", [{**r, "path": str(Path(r["path"]).resolve())} for r in rows])
    result = invoke("evaluate", "--model", baseline_model, "--data", lab, "--json", "-", cwd=workspace["root"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["n_cells"] > 0 and report["per_class_recall"]["monocyte"] is None
    assert f"left out 1 cells labelled with classes the model lacks: {rows[0]['label']!r} (1)" in result.stderr
    named = invoke("evaluate", "--model", baseline_model, "--data", lab, "--classes", "monocyte", cwd=workspace["root"])
    assert named.exit_code == 2 and "no cells of class(s) monocyte" in named.stderr
    # an anomaly label the anomaly cells lack is refused before the evaluation is scored, not after it
    args = ["evaluate", "--model", baseline_model, "--data", lab, "--anomaly-data", workspace["anomaly"]]
    wrong = invoke(*args, "--anomaly-label", "blasts", cwd=workspace["root"])
    assert wrong.exit_code == 2 and "needs both 'blasts' cells" in wrong.stderr and "blast, normal" in wrong.stderr


def test_evaluate_as_a_site_decides_among_the_site_s_classes(baseline_model, workspace, tmp_path, monkeypatch):
    classes = json.loads((Path(baseline_model) / "model.json").read_text())["classes"]
    settings = tmp_path / "sites.json"
    settings.write_text(json.dumps({"sites": {"st-marys": {"classes": classes[:2]}}}))
    monkeypatch.setenv("CYTOLOOP_CONFIG", str(settings))  # so that teardown removes what `--config` sets
    args = ["--config", settings, "evaluate", "--model", baseline_model, "--data", workspace["eval"], "--json", "-"]
    result = invoke(*args, "--site", "st-marys", cwd=workspace["root"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["allowed_classes"] == classes[:2]
    assert all(report["per_class_recall"][c] in (0.0, None) for c in classes[2:])  # never predicted
    unknown = invoke(*args, "--site", "elsewhere", cwd=workspace["root"])
    assert unknown.exit_code == 2 and "site 'elsewhere' has no classes" in unknown.stderr
    assert "st-marys" in unknown.stderr


def test_score_errors_exit_2_before_any_work(workspace, baseline_model):
    """`cytoloop score` on a folder that holds no model, a model whose weights are damaged (a Ray actor's
    traceback, exit 1, before), or a manifest that does not exist: exit 2 naming it, no Ray started."""
    import shutil

    import ray

    assert not ray.is_initialized()  # so that the check at the end can fail
    result = invoke(
        "score", "--model", workspace["root"], "--data", workspace["train"], "--out", "s.csv", cwd=workspace["root"]
    )
    assert result.exit_code == 2 and "not a CytoLoop model directory" in result.stderr, result.output
    missing = workspace["root"] / "nowhere.csv"
    result = invoke("score", "--model", workspace["root"], "--data", missing, "--out", "s.csv", cwd=workspace["root"])
    assert result.exit_code == 2 and "nowhere.csv" in result.stderr, result.output
    damaged = workspace["root"] / "damaged"
    shutil.copytree(baseline_model, damaged)
    (damaged / "weights.pt").write_bytes((damaged / "weights.pt").read_bytes()[:100])
    result = invoke("score", "--model", damaged, "--data", workspace["train"], "--out", "s.csv", cwd=workspace["root"])
    assert result.exit_code == 2 and "damaged: cannot load" in result.stderr, result.output
    assert not (workspace["root"] / "s.csv.journal").exists()
    assert not ray.is_initialized()

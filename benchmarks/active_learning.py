"""Active-learning benchmark: does choosing which cells to label beat labelling at random?

Two settings (`--setting`), each starting every strategy of a seed from the same model and the same labels:

  pbc    PBC's eight classes from 10 labels per class (`--seed-per-class`): the model is trained from scratch on
         them (the diffusion model after null-class pretraining on every non-test PBC cell, labels unseen), the
         pool is the rest of PBC (thousands of cells), the test set a fixed stratified 10 % of PBC (about 1,600
         cells) for every model, strategy and seed. Each round continues training the previous round's model.
  adapt  the PBC base model (`--base diffusion=DIR,baseline=DIR`: the shipped diffusion model and the reference
         experiment's CNN) meeting the other labs (jtsc, cellavision, bccd; neutrophil, lymphocyte, monocyte,
         eosinophil): no labels at first, the pool is the labs' cells, the test set a fixed stratified 30 %.
         Each round fine-tunes the base model on all labels so far (`cytoloop adapt`'s settings: stronger stain
         augmentation), as the demo's site fine-tunes do.

Per seed, --val-per-class cells per class are a frozen validation set: every round recalibrates on them (as the
platform's fine-tuning does on its frozen cells); they are not counted as labels and are the same for every
strategy. Each round a strategy picks --budget cells among --candidates pool cells drawn at random (seeded by seed
and round; the diffusion model, and on PBC's thousands even the CNN, cannot afford to score the whole pool every
round); their ground truth is revealed and the model trains with the same training seed for every strategy. The
diffusion model also trains its null class on the unlabeled pool. Balanced accuracy and ECE on the test cells are
recorded against the number of labels.

Strategies (`cytoloop.policy.acquisition`): random, least confidence, margin, entropy, the diffusion classifier's
trial-level disagreement (diffusion only: a CNN has no trials), and the review loop's routing policy.

Statistics, over seeds (each seed pairs every strategy with random on the same start, test cells and training
seeds): the learning curves' mean with a 95 % t interval; the labels a strategy needs to reach random's final
mean balanced accuracy, with a 95 % interval from resampling the seeds; and a paired t-test of each strategy
against random, on the final balanced accuracy and on its mean over the rounds after round 0 (the area between
the learning curves). Goal (#18): the best strategy reaches random's final accuracy with at most half of the
labels random acquired.

Each (model, seed, strategy) keeps its progress in <out>/<model>/seed<k>/<strategy>.json and its latest model
beside it, so a killed run resumes at the round it reached (<out>: runs/active_learning/<name>; the name is the
setting's unless `--name` names a variant, say a longer fine-tune). Writes a table and plots into
docs/benchmarks.md (section "active-learning-<name>").

    python benchmarks/active_learning.py --setting pbc --data ../shared/data/manifest.csv --models baseline
    python benchmarks/active_learning.py --setting adapt --data ../shared/data/manifest.csv \
        --base diffusion=models/base-pbc,baseline=runs/reference/cnn-seed0
    python benchmarks/active_learning.py --setting pbc --data ../shared/data/manifest.csv --docs-only
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from scipy import stats

from cytoloop.config import AugmentConfig, Settings, load_settings
from cytoloop.data.preprocess import load_cells
from cytoloop.data.records import CellRecord, load_records, select, stratified_split
from cytoloop.models.base import Classifier, Predictions
from cytoloop.models.finetune import finetune, finetune_configs
from cytoloop.models.loading import load_model
from cytoloop.models.train import UNLABELED, diffusion_loss, fit
from cytoloop.policy.acquisition import STRATEGIES, Pool, get_strategy
from cytoloop.scoring.calibration import calibrate, fit_temperature
from cytoloop.workflows import build_model, evaluate_predictions, label_indices

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _docs import DOCS, replace_section  # noqa: E402

IMAGES = DOCS.parent / "img"
NEEDS_TRIALS = {"disagreement"}  # strategies only a model that scores in trials offers
# Diffusion scoring cheap enough to score candidates every round: a few trials, then a t-test after every trial
# (the tuned rule of the speed benchmark, capped), null class on the first two trials only, bf16.
SCORING = {
    "min_trials": 3,
    "max_trials": 8,
    "check_every": 1,
    "elimination_p": 0.05,
    "null_trials": 2,
    "calibration_trials": 10,
    "precision": "bf16",
}


@dataclass(frozen=True)
class Setting:
    """Where a benchmark's cells come from and how each seed starts."""

    name: str
    labs: tuple[str, ...]
    classes: tuple[str, ...] | None  # the labels counted (others are left out); None: every class of the labs
    test_fraction: float
    from_base: bool  # start from the base model (adapt) instead of training on seed labels from scratch
    description: str


SETTINGS = {
    "pbc": Setting(
        "pbc",
        ("pbc",),
        None,
        0.1,
        False,
        "PBC's eight classes, trained from scratch on the seed labels; each round continues the previous model",
    ),
    "adapt": Setting(
        "adapt",
        ("jtsc", "cellavision", "bccd"),
        ("neutrophil", "lymphocyte", "monocyte", "eosinophil"),
        0.3,
        True,
        "the PBC base model adapting to the other labs (jtsc, cellavision, bccd; their four shared classes); each "
        "round fine-tunes the base model on all labels so far",
    ),
}


class Cells:
    """Every preprocessed cell of the benchmark, looked up by cell id (loaded once: preprocessing is shared)."""

    def __init__(self, records: list[CellRecord], settings: Settings):
        loaded = load_cells(records, settings.data, progress=True)
        self.records = {r.cell_id: r for r in loaded.records}
        self.row = {r.cell_id: i for i, r in enumerate(loaded.records)}
        self.images = loaded.images
        self.classes = sorted({r.label for r in loaded.records})  # a model trained from scratch learns these

    def of(self, ids: list[str]) -> np.ndarray:
        return self.images[[self.row[i] for i in ids]]

    def labels(self, ids: list[str], classes: list[str]) -> np.ndarray:
        return label_indices([self.records[i] for i in ids], classes)


def split(cells: Cells, seed: int, setting: Setting, args) -> dict[str, list[str]]:
    """Test (fixed for every seed), and per seed the frozen validation cells, seed labels and pool."""
    records = list(cells.records.values())
    fractions = {"rest": 1 - setting.test_fraction, "test": setting.test_fraction}
    parts = stratified_split(records, fractions, seed=0)
    out = {"test": sorted(r.cell_id for r in parts["test"]), "val": [], "seed": [], "pool": []}
    first = 0 if setting.from_base else args.seed_per_class
    for name in cells.classes:
        members = sorted(r.cell_id for r in parts["rest"] if r.label == name)
        random.Random(f"{seed}-{name}").shuffle(members)
        out["val"] += members[: args.val_per_class]
        out["seed"] += members[args.val_per_class : args.val_per_class + first]
        out["pool"] += members[args.val_per_class + first :]
    return out


def thumbnails(images: np.ndarray, size: int = 4) -> np.ndarray:
    """(N, 3, S, S) -> (N, 3*size*size) block means: the near-duplicate signature the review loop uses."""
    n, channels, side, _ = images.shape
    block = side // size
    cropped = images[:, :, : block * size, : block * size]
    return cropped.reshape(n, channels, size, block, size, block).mean(axis=(3, 5)).reshape(n, -1)


def round_settings(settings: Settings, steps: int, seed: int, args, adapt: bool) -> tuple[Settings, AugmentConfig]:
    """(settings, augmentation) of one round: its budget, its seed (the same for every strategy, so only the
    labels differ); an adaptation round takes `cytoloop adapt`'s learning rate and stain augmentation."""
    if adapt:
        adapted = settings.model_copy(update={"adapt": settings.adapt.model_copy(update={"steps": steps})})
        train, augment = finetune_configs(adapted, adapt=True)
        train = train.model_copy(update={"seed": seed})
    else:
        train = settings.train.model_copy(
            update={
                "steps": steps,
                "seed": seed,
                "lr": args.lr,
                "warmup_steps": min(settings.train.warmup_steps, steps // 5),
            }
        )
        augment = settings.augment
    return settings.model_copy(update={"train": train}), augment


def recalibrate(model: Classifier, images: np.ndarray, labels: np.ndarray, full: bool) -> None:
    """A full calibration (`calibration.calibrate`) where asked (a diffusion model trained from scratch, at round
    0), else the temperature only: the timestep weights need exhaustive trials, the costliest scoring there is."""
    if full or model.kind != "diffusion":
        calibrate(model, images, labels)
    else:
        model.temperature = fit_temperature(-model.score(images).class_error, labels)


def train_round(
    model: Classifier,
    cells: Cells,
    labelled: list[str],
    pool: list[str],
    val: list[str],
    settings: Settings,
    augment,
    checkpoint_dir: Path,
    full_calibration: bool = False,
) -> None:
    """Train `model` on the labelled cells (diffusion: and the unlabeled pool), then recalibrate."""
    images, labels = cells.of(labelled), cells.labels(labelled, model.classes)
    if model.kind == "diffusion":
        images = np.concatenate([images, cells.of(pool)])
        labels = np.concatenate([labels, np.full(len(pool), UNLABELED)])
    # training leaves the model holding its frozen EMA copy; the next round trains that copy again
    (model.unet if model.kind == "diffusion" else model.network).requires_grad_(True)
    finetune(model, images, labels, settings.train, augment, checkpoint_dir=checkpoint_dir)
    recalibrate(model, cells.of(val), cells.labels(val, model.classes), full_calibration)
    shutil.rmtree(checkpoint_dir, ignore_errors=True)


def pretrained_diffusion(cells: Cells, ids: list[str], settings: Settings, args) -> Path:
    """A denoiser whose null class learned every non-test cell (labels unseen); shared by all seeds."""
    out = args.out / "diffusion" / "pretrained"
    if (out / "model.json").is_file():
        return out
    print(f"pretraining the diffusion model's null class on {len(ids)} unlabeled cells", flush=True)
    model = build_model("diffusion", cells.classes, settings)
    config = round_settings(settings, args.pretrain_steps, 0, args, adapt=False)[0].train
    model.unet, _ = fit(
        model.unet,
        diffusion_loss(model.scheduler, model.null_class, config),
        cells.of(ids),
        np.full(len(ids), UNLABELED),
        config,
        settings.augment,
        checkpoint_dir=out / "checkpoints",
        progress=True,
    )
    model.save(out)
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    return out


def with_benchmark_scoring(model: Classifier) -> Classifier:
    """The diffusion model scores with the benchmark's capped rule (`SCORING`); a CNN is returned as is."""
    if model.kind == "diffusion":
        model.scoring_config = model.scoring_config.model_copy(update=SCORING)
    return model


def evaluate(model: Classifier, cells: Cells, test: list[str]) -> dict:
    began = time.perf_counter()
    predictions = model.predict(cells.of(test))
    report = evaluate_predictions(
        predictions, cells.labels(test, model.classes), model.classes, time.perf_counter() - began, n_boot=0
    )
    return {k: report[k] for k in ("balanced_accuracy", "accuracy", "ece", "nll", "denoiser_evals_per_cell")}


def start_model(kind: str, cells: Cells, parts: dict, settings: Settings, args) -> Classifier:
    """The untrained start of a seed: the base model (adapt) or a fresh model (pbc; the diffusion model after its
    shared null-class pretraining)."""
    if args.setting.from_base:
        return with_benchmark_scoring(load_model(args.base[kind]))
    if kind == "diffusion":
        ids = sorted(parts["seed"] + parts["pool"] + parts["val"])
        return with_benchmark_scoring(load_model(pretrained_diffusion(cells, ids, settings, args)))
    return build_model(kind, cells.classes, settings)


def first_round(kind: str, seed: int, cells: Cells, parts: dict, settings: Settings, args) -> tuple[Path, dict]:
    """The round-0 model of a seed and its test metrics; shared by every strategy. pbc: trained on the seed labels;
    adapt: the base model, its temperature refitted on the frozen validation cells (no label spent)."""
    out = args.out / kind / f"seed{seed}" / "round0"
    if (out / "round.json").is_file():
        return out, json.loads((out / "round.json").read_text())
    began = time.perf_counter()
    model = start_model(kind, cells, parts, settings, args)
    if args.setting.from_base:
        recalibrate(model, cells.of(parts["val"]), cells.labels(parts["val"], model.classes), full=False)
    else:
        first, augment = round_settings(settings, args.first_steps, 1000 * seed, args, adapt=False)
        train_round(
            model,
            cells,
            parts["seed"],
            parts["pool"],
            parts["val"],
            first,
            augment,
            out / "checkpoints",
            full_calibration=True,
        )
    result = {
        "n_labels": len(parts["seed"]),
        **evaluate(model, cells, parts["test"]),
        "acquired": [],
        "minutes": (time.perf_counter() - began) / 60,
    }
    model.save(out)
    (out / "round.json").write_text(json.dumps(result, indent=1))
    return out, result


def unscored(n: int, n_classes: int) -> Predictions:
    """Uniform placeholder predictions: random sampling ignores scores, so its rounds skip scoring the pool."""
    return Predictions(np.full((n, n_classes), 1 / n_classes), np.zeros(n), np.zeros(n, dtype=int))


def run(kind: str, strategy_name: str, seed: int, cells: Cells, settings: Settings, args) -> dict:
    """All rounds of one (model, strategy, seed), resuming from its progress file and latest round's model."""
    path = args.out / kind / f"seed{seed}" / f"{strategy_name}.json"
    models = path.with_suffix("")
    state = json.loads(path.read_text()) if path.is_file() else None
    if state and state["done"]:
        return state
    parts = split(cells, seed, args.setting, args)
    if state is None:
        first_dir, first = first_round(kind, seed, cells, parts, settings, args)
        state = {
            "setting": args.setting.name,
            "kind": kind,
            "strategy": strategy_name,
            "seed": seed,
            "rounds": [first],
            "labelled": list(parts["seed"]),
            "done": False,
            "command": " ".join(["python", *sys.argv]),
        }
        model = with_benchmark_scoring(load_model(first_dir))
    else:
        model = with_benchmark_scoring(load_model(models / f"round{len(state['rounds']) - 1}"))
    strategy = get_strategy(strategy_name, settings.routing)
    candidates = args.diffusion_candidates if kind == "diffusion" else args.candidates
    while len(state["rounds"]) <= args.rounds:
        began = time.perf_counter()
        number = len(state["rounds"])
        labelled = set(state["labelled"])
        pool = [i for i in parts["pool"] if i not in labelled]
        if len(pool) > candidates:
            pool = sorted(random.Random(f"{seed}-{number}").sample(pool, candidates))
        images = cells.of(pool)
        predictions = unscored(len(pool), len(model.classes)) if strategy_name == "random" else model.predict(images)
        chosen = strategy(
            Pool(predictions, pool, model.classes, [cells.records[i].domain for i in pool], thumbnails(images)),
            args.budget,
            1000 * seed + number,
        )
        acquired = [pool[i] for i in chosen]
        labelled_now = state["labelled"] + acquired
        known = set(labelled_now)
        remaining = [i for i in parts["pool"] if i not in known]
        if args.setting.from_base:  # every round adapts the base model afresh on all labels so far
            model = with_benchmark_scoring(load_model(args.base[kind]))
        this_round, augment = round_settings(settings, args.steps, 1000 * seed + number, args, args.setting.from_base)
        train_round(model, cells, labelled_now, remaining, parts["val"], this_round, augment, models / "checkpoints")
        model.save(models / f"round{number}")
        state["labelled"] = labelled_now
        state["rounds"].append(
            {
                "n_labels": len(labelled_now),
                **evaluate(model, cells, parts["test"]),
                "acquired": acquired,
                "minutes": (time.perf_counter() - began) / 60,
            }
        )
        state["done"] = len(state["rounds"]) > args.rounds
        path.write_text(json.dumps(state, indent=1))
        shutil.rmtree(models / f"round{number - 1}", ignore_errors=True)
        last = state["rounds"][-1]
        print(
            f"{args.setting.name} {kind} {strategy_name} seed {seed} round {number}: {last['n_labels']} labels, "
            f"balanced accuracy {last['balanced_accuracy']:.3f}, ECE {last['ece']:.3f} ({last['minutes']:.1f} min)",
            flush=True,
        )
    shutil.rmtree(models, ignore_errors=True)  # finished: only the metrics are kept
    return state


# --------------------------------------------------------------------------- statistics


def finished(out: Path) -> dict[str, dict[str, list[dict]]]:
    """model -> strategy -> finished runs, read from the progress files; only seeds that every strategy of the
    model has finished count, so each strategy is compared with random on the same seeds."""
    runs: dict[str, dict[str, dict[int, dict]]] = {}
    for path in sorted(out.glob("*/seed*/*.json")):
        state = json.loads(path.read_text())
        if state.get("done"):
            runs.setdefault(state["kind"], {}).setdefault(state["strategy"], {})[state["seed"]] = state
    result: dict[str, dict[str, list[dict]]] = {}
    for kind, by_strategy in runs.items():
        seeds = sorted(set.intersection(*(set(by_seed) for by_seed in by_strategy.values())))
        if seeds:
            result[kind] = {name: [by_seed[s] for s in seeds] for name, by_seed in by_strategy.items()}
    return result


def curves(runs: list[dict], metric: str) -> tuple[np.ndarray, np.ndarray]:
    """(label counts, seeds x rounds array of `metric`)."""
    counts = np.array([r["n_labels"] for r in runs[0]["rounds"]])
    return counts, np.array([[r[metric] for r in run["rounds"]] for run in runs])


def labels_to_reach(counts: np.ndarray, curve: np.ndarray, target: float) -> float | None:
    """Labels at which the curve first reaches `target`, interpolated linearly between rounds; None if never."""
    for i, value in enumerate(curve):
        if value >= target:
            if i == 0:
                return float(counts[0])
            before = curve[i - 1]
            return float(counts[i - 1] + (target - before) / (value - before) * (counts[i] - counts[i - 1]))
    return None


def labels_to_stay(counts: np.ndarray, curve: np.ndarray, target: float) -> float | None:
    """Labels from which the curve stays at or above `target` to the last round (where it last crosses it,
    linear between rounds); None if its last round is below. Unlike `labels_to_reach`, a curve that touches the
    target once and falls back does not count: on a plateau the first touch is noise."""
    below = np.flatnonzero(curve < target)
    if len(below) and below[-1] == len(curve) - 1:
        return None
    return labels_to_reach(counts[below[-1] :], curve[below[-1] :], target) if len(below) else float(counts[0])


def t_interval(values: np.ndarray) -> tuple[float, float]:
    """95 % t interval of the mean of `values` (one per seed); (nan, nan) with fewer than two."""
    if len(values) < 2:
        return float("nan"), float("nan")
    half = stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values))
    return float(values.mean() - half), float(values.mean() + half)


def paired_test(values: np.ndarray, reference: np.ndarray) -> dict:
    """Strategy minus random, seed by seed: mean, 95 % t interval and the two-sided paired t-test's p."""
    gaps = values - reference
    low, high = t_interval(gaps)
    p = float(stats.ttest_rel(values, reference).pvalue) if len(gaps) > 1 and gaps.std() > 0 else float("nan")
    return {"mean": float(gaps.mean()), "low": low, "high": high, "p": p}


def labels_needed(by_strategy: dict[str, list[dict]], name: str, n_boot: int = 2000) -> dict:
    """Labels the strategy's mean curve needs to reach random's final mean balanced accuracy, as a share of the
    labels random acquired (after round 0), with a 95 % interval from resampling the seeds (the same seeds for
    both curves: they are paired). A resample that never reaches the target counts as more than the budget."""
    counts, values = curves(by_strategy[name], "balanced_accuracy")
    reference = curves(by_strategy["random"], "balanced_accuracy")[1]
    acquired = counts[-1] - counts[0]

    def share(index: np.ndarray) -> float:
        reached = labels_to_reach(counts, values[index].mean(axis=0), reference[index, -1].mean())
        return np.inf if reached is None else (reached - counts[0]) / acquired

    rng = np.random.default_rng(0)
    n = len(values)
    resampled = np.array([share(rng.integers(0, n, n)) for _ in range(n_boot)])
    point = share(np.arange(n))
    stays = labels_to_stay(counts, values.mean(axis=0), reference[:, -1].mean())
    return {
        "labels": None if not np.isfinite(point) else float(counts[0] + point * acquired),
        "stays": stays,
        "share": float(point),
        # no interpolation: resamples that never reach the target are +inf
        "low": float(np.quantile(resampled, 0.025, method="inverted_cdf")),
        "high": float(np.quantile(resampled, 0.975, method="inverted_cdf")),
    }


def summary(by_strategy: dict[str, list[dict]]) -> dict[str, dict]:
    """Per strategy: labels needed and the paired tests against random (final, and mean over rounds 1..)."""
    reference = curves(by_strategy["random"], "balanced_accuracy")[1]
    out = {}
    for name, runs in by_strategy.items():
        values = curves(runs, "balanced_accuracy")[1]
        out[name] = {
            "needed": labels_needed(by_strategy, name),
            "final": paired_test(values[:, -1], reference[:, -1]),
            "area": paired_test(values[:, 1:].mean(axis=1), reference[:, 1:].mean(axis=1)),
        }
    return out


# --------------------------------------------------------------------------- report


def ordered(by_strategy: dict) -> list[str]:
    return [n for n in STRATEGIES if n in by_strategy]


def plot(title: str, by_strategy: dict[str, list[dict]], path: Path) -> Path:
    """Balanced accuracy and ECE against labels: mean line per strategy, band = 95 % t interval over seeds."""
    from matplotlib.figure import Figure

    colours = {
        "random": "black",
        "least_confidence": "tab:orange",
        "margin": "tab:purple",
        "entropy": "tab:green",
        "disagreement": "tab:blue",
        "routing": "tab:red",
    }
    fig = Figure(figsize=(10, 3.8), dpi=100)
    axes = fig.subplots(1, 2)
    for name in ordered(by_strategy):
        runs = by_strategy[name]
        for ax, metric in zip(axes, ("balanced_accuracy", "ece")):
            counts, values = curves(runs, metric)
            mean = values.mean(axis=0)
            bands = np.array([t_interval(values[:, i]) for i in range(values.shape[1])])
            ax.plot(
                counts,
                mean,
                marker="o",
                markersize=3,
                color=colours[name],
                linestyle="--" if name == "random" else "-",
                label=f"{name} ({len(runs)} seeds)",
            )
            ax.fill_between(counts, bands[:, 0], bands[:, 1], alpha=0.10, color=colours[name])
    for ax, label in zip(axes, ("balanced accuracy (test)", "ECE (test)")):
        ax.set_xlabel("labelled cells")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Active learning, {title}: mean over seeds, band = 95 % t interval")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", bbox_inches="tight")
    return path


def acquired_mix(runs: list[dict], label_of: dict[str, str]) -> str:
    """Share of each class among the cells a strategy acquired (all rounds and seeds): what it chose to label."""
    labels = [label_of[i] for run in runs for r in run["rounds"] for i in r["acquired"]]
    return ", ".join(f"{name} {labels.count(name) / len(labels):.0%}" for name in sorted(set(labels)))


def curve_table(by_strategy: dict[str, list[dict]], metric: str) -> list[str]:
    """Markdown rows: mean [95 % t interval] per label count."""
    counts = curves(next(iter(by_strategy.values())), "n_labels")[0]
    lines = [
        f"| strategy | seeds | {' | '.join(str(c) for c in counts)} |",
        "|---|---|" + "---|" * len(counts),
    ]
    for name in ordered(by_strategy):
        values = curves(by_strategy[name], metric)[1]
        cells = []
        for i in range(values.shape[1]):
            low, high = t_interval(values[:, i])
            cells.append(f"{values[:, i].mean():.3f} [{low:.3f}, {high:.3f}]")
        lines.append(f"| {name} | {len(values)} | " + " | ".join(cells) + " |")
    return lines + [""]


def test_table(by_strategy: dict[str, list[dict]]) -> list[str]:
    """Markdown rows: labels needed to reach random's final accuracy, and the paired tests against random."""
    counts = curves(by_strategy["random"], "n_labels")[0]
    lines = [
        "| strategy | labels to reach random's final (share of random's acquired labels, 95 % interval) | "
        "labels from which it stays there | final − random (95 % CI, paired t p) | "
        "mean over rounds − random (95 % CI, paired t p) |",
        "|---|---|---|---|---|",
    ]

    def test(t: dict) -> str:
        return f"{t['mean']:+.3f} [{t['low']:+.3f}, {t['high']:+.3f}], p {t['p']:.2f}"

    def share(s: float) -> str:
        return f"{s:.0%}" if np.isfinite(s) else f">{counts[-1]}"

    for name, row in ((n, summary(by_strategy)[n]) for n in ordered(by_strategy)):
        needed = row["needed"]
        labels = f">{counts[-1]}" if needed["labels"] is None else f"{needed['labels']:.0f}"
        stays = f">{counts[-1]}" if needed["stays"] is None else f"{needed['stays']:.0f}"
        tests = "—" if name == "random" else f"{test(row['final'])} | {test(row['area'])}"
        lines.append(
            f"| {name} | {labels} ({share(needed['share'])}, [{share(needed['low'])}, {share(needed['high'])}]) | "
            f"{stays} | " + (tests if name != "random" else "— | —") + " |"
        )
    return lines + [""]


def render(results: dict[str, dict[str, list[dict]]], label_of: dict[str, str], args) -> str:
    """The docs section of one setting: the protocol, then per model the tables, acquisitions' class mix, plot."""
    setting: Setting = args.setting
    start = (
        "Round 0 is the base model, its temperature refitted on the frozen validation cells"
        if setting.from_base
        else f"Round 0 trains on {args.seed_per_class} seed labels per class for {args.first_steps} steps (the "
        f"diffusion model after {args.pretrain_steps} steps of null-class pretraining on every non-test cell, labels "
        "unseen, shared by all seeds)"
    )
    lines = [
        f"Setting `{setting.name}`: {setting.description}. Test: a fixed stratified "
        f"{setting.test_fraction:.0%} of the cells, the same for every model, strategy and seed. Per seed: a "
        f"frozen validation set of {args.val_per_class} cells per class (recalibration after every round; not counted "
        f"as labels). {start}. Then {args.rounds} rounds: a strategy picks {args.budget} cells among "
        f"{args.candidates} (CNN) / {args.diffusion_candidates} (diffusion) pool cells drawn at random (seeded by "
        f"seed and round), and the model trains {args.steps} steps (batch {args.batch_size}) with the same training "
        f"seed for every strategy. Diffusion scoring: adaptive, {SCORING['min_trials']}-{SCORING['max_trials']} "
        f"trials, t-test after every trial (p {SCORING['elimination_p']}), null class on the first "
        f"{SCORING['null_trials']} trials, {SCORING['precision']}; temperature refitted every round.",
        "",
        "Learning curves: mean over seeds [95 % t interval]. 'Labels to reach random's final': where the strategy's "
        "mean curve first reaches random's mean balanced accuracy at the final budget (linear between rounds), and "
        "that as a share of the labels random acquired after round 0 (goal: ≤ 50 %), with a 95 % interval from "
        "resampling seeds; 'stays': the labels from which the mean curve no longer falls below that accuracy (on a "
        "plateau the first touch is noise). Paired tests: strategy minus random seed by seed (same start, test "
        "cells and training seeds), mean, 95 % t interval and two-sided paired t-test p, at the final budget and "
        "averaged over the rounds after round 0. Routing = the review loop's policy (anomaly threshold at the "
        "candidates' 95th percentile, then least confident under 0.7, then audits, spread over predicted classes "
        "and labs, near-duplicates skipped; the rest of the budget least confident). Disagreement: the diffusion "
        "classifier only (a CNN has no trials).",
        "",
    ]
    for kind, by_strategy in results.items():
        if "random" not in by_strategy:
            continue
        target = curves(by_strategy["random"], "balanced_accuracy")[1].mean(axis=0)[-1]
        lines += [f"**{kind}: balanced accuracy** against labelled cells", ""] + curve_table(
            by_strategy, "balanced_accuracy"
        )
        lines += [f"**{kind}: against random** (random's final mean balanced accuracy {target:.3f})", ""]
        lines += test_table(by_strategy)
        lines += [f"**{kind}: ECE** against labelled cells", ""] + curve_table(by_strategy, "ece")
        lines += [f"Classes of the acquired cells ({kind}):", ""]
        lines += [f"- {n}: {acquired_mix(by_strategy[n], label_of)}" for n in ordered(by_strategy)]
        first = {run["seed"]: run["rounds"][0]["minutes"] for runs in by_strategy.values() for run in runs}
        minutes = sum(first.values()) + sum(
            r["minutes"] for runs in by_strategy.values() for run in runs for r in run["rounds"][1:]
        )
        image = plot(f"{args.name}, {kind}", by_strategy, IMAGES / f"active_learning_{args.name}_{kind}.png")
        lines += [
            "",
            f"Compute ({kind}): {minutes:.0f} min of training, scoring and evaluation in all, on the shared machine.",
            "",
            f"![active learning, {args.name}, {kind}](img/{image.name})",
            "",
        ]
    commands = sorted({run["command"] for by in results.values() for runs in by.values() for run in runs})
    lines += [
        "Commands, one per process (this section by the same command with `--docs-only`): "
        + "; ".join(f"`{c}`" for c in commands)
        + ".",
        f"Machine: {cpu_name()} ({platform.machine()}), {os.cpu_count()} cores, no GPU, {args.threads} torch "
        f"thread per run at nice 10 beside the other benchmarks' jobs (minutes are inflated); torch "
        f"{torch.__version__}. Updated {datetime.now(UTC):%Y-%m-%d %H:%M} UTC.",
    ]
    return "\n".join(lines) + "\n"


def cpu_name() -> str:
    """The CPU model, so timings can be compared with other sections' machines."""
    cpuinfo = Path("/proc/cpuinfo")
    names = [
        line.split(":", 1)[1].strip()
        for line in (cpuinfo.read_text().splitlines() if cpuinfo.is_file() else [])
        if line.startswith("model name")
    ]
    return names[0] if names else platform.machine()


def write_docs(args) -> None:
    results = finished(args.out)
    if results:
        label_of = {r.cell_id: r.label for r in load_records(args.data)}
        replace_section(
            DOCS,
            f"active-learning-{args.name}",
            render(results, label_of, args),
            title=f"Active learning: {args.name}",
        )


def parse_base(text: str) -> dict[str, Path]:
    """KIND=DIR,... -> {kind: directory}."""
    out = {}
    for item in text.split(","):
        kind, sep, path = item.partition("=")
        if not sep or kind not in ("baseline", "diffusion"):
            raise argparse.ArgumentTypeError(f"{item!r}: expected baseline=DIR or diffusion=DIR")
        out[kind] = Path(path)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setting", choices=sorted(SETTINGS), required=True)
    parser.add_argument("--data", type=Path, required=True, help="the combined manifest (all labs)")
    parser.add_argument(
        "--name",
        default=None,
        help="a variant's name (default: the setting's): its runs in runs/active_learning/<name>, its docs section "
        "active-learning-<name>",
    )
    parser.add_argument("--out", type=Path, default=None, help="default runs/active_learning/<name>")
    parser.add_argument("--models", type=lambda s: s.split(","), default=["baseline", "diffusion"])
    parser.add_argument("--strategies", type=lambda s: s.split(","), default=list(STRATEGIES))
    parser.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 2, 3, 4])
    parser.add_argument(
        "--base",
        type=parse_base,
        default={"diffusion": Path("models/base-pbc"), "baseline": Path("runs/reference/cnn-seed0")},
        help="adapt: the base models, KIND=DIR,... (default: the shipped diffusion model, the reference's CNN)",
    )
    parser.add_argument("--rounds", type=int, default=6, help="acquisition rounds after round 0")
    parser.add_argument("--budget", type=int, default=50, help="cells acquired per round")
    parser.add_argument("--seed-per-class", type=int, default=10, help="pbc: labels per class at round 0")
    parser.add_argument("--val-per-class", type=int, default=5)
    parser.add_argument("--candidates", type=int, default=2000, help="pool cells the CNN scores per round")
    parser.add_argument("--diffusion-candidates", type=int, default=200, help="pool cells the diffusion model scores")
    parser.add_argument("--first-steps", type=int, default=600, help="pbc: round-0 training steps on the seed labels")
    parser.add_argument("--steps", type=int, default=150, help="training steps per round")
    parser.add_argument("--pretrain-steps", type=int, default=1000, help="pbc: diffusion null-class pretraining")
    parser.add_argument("--lr", type=float, default=2e-4, help="pbc: learning rate of every round")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--write-docs", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--docs-only", action="store_true", help="rewrite the docs from finished runs; run nothing")
    args = parser.parse_args()
    args.setting = SETTINGS[args.setting]
    args.name = args.name or args.setting.name
    args.out = args.out or Path("runs/active_learning") / args.name
    for name in args.strategies:  # an unknown name fails here, naming the valid ones, before any training
        try:
            get_strategy(name)
        except ValueError as error:
            parser.error(str(error))
    unknown = [m for m in args.models if m not in ("baseline", "diffusion")]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; valid: baseline, diffusion")
    if args.setting.from_base:
        missing = [
            f"{m}={args.base.get(m)}" for m in args.models if not (Path(args.base.get(m, "")) / "model.json").is_file()
        ]
        if missing:
            parser.error(f"--base: no model at {', '.join(missing)}")
    if args.docs_only:
        write_docs(args)
        return

    torch.set_num_threads(args.threads)
    settings = load_settings(
        overrides={  # the base recipe's preprocessing and precision (`recipes.base-pbc`)
            "data": {"image_size": 32},
            "train": {"threads": args.threads, "batch_size": args.batch_size, "precision": "bf16"},
            "scoring": {**SCORING, "threads": args.threads},
        }
    )
    if args.setting.from_base:  # the cells preprocessed as the base models were trained
        configs = {kind: load_model(args.base[kind]).data_config for kind in args.models}
        if len({c.model_dump_json() for c in configs.values()}) > 1:
            raise SystemExit(f"--base: the base models preprocess cells differently ({configs}); run one per process")
        settings = settings.model_copy(update={"data": next(iter(configs.values()))})
    cells = Cells(select(load_records(args.data), args.setting.labs, args.setting.classes), settings)
    for kind in args.models:
        for seed in args.seeds:
            for name in args.strategies:
                if kind != "diffusion" and name in NEEDS_TRIALS:
                    continue
                run(kind, name, seed, cells, settings, args)
                if args.write_docs:  # after every run, so an interrupted benchmark still documents what it has
                    write_docs(args)


if __name__ == "__main__":
    main()

"""Active-learning benchmark: does choosing which cells to label beat labelling at random?

On the real cells of two labs (jtsc+bccd; neutrophil, lymphocyte, monocyte, eosinophil) each acquisition strategy
of `cytoloop.policy.acquisition` (random, least_confidence, entropy, routing) starts from the same seed labels and
spends the same budget for the same number of rounds, for the diffusion classifier and the CNN baseline:

  test        a fixed stratified 30 % of the cells (split seed 0), scored after every round;
  validation  per seed, --val-per-class cells per class, frozen: every round recalibrates on them (as the
              platform's fine-tuning does on its frozen validation set); not counted as labels, same for all;
  seed labels per seed, --seed-per-class cells per class;
  pool        the rest: unlabeled until a strategy acquires a cell and its ground-truth label is revealed.

Round 0 trains on the seed labels (the diffusion model first pretrains its null class on every non-test cell,
labels unseen, once; then --first-steps with the seed labels; the CNN --first-steps from scratch) and is shared by
every strategy of a seed. Each later round acquires --budget cells with the strategy (from the model's predictions
on --candidates pool cells drawn at random: scoring the whole pool every round is beyond the diffusion model's
budget on a CPU), then fine-tunes the previous round's model for --steps steps on all labels so far (the diffusion
model also on the unlabeled pool, which trains its null class), with the same training seed for every strategy,
and recalibrates (the diffusion model refits its temperature; its timestep weights are fitted at round 0).
The CNN baseline runs --rounds rounds, the diffusion classifier --diffusion-rounds. Balanced accuracy and ECE
on the test cells are recorded against the number of labels.

Each (model, seed, strategy) keeps its progress in <out>/<model>/seed<k>/<strategy>.json and its latest model
beside it, so a killed run resumes at the round it reached. Writes a table and plots into docs/benchmarks.md.

    python benchmarks/active_learning.py --data ../shared/data/cells
    python benchmarks/active_learning.py --data ../shared/data/cells --docs-only   # rewrite the docs section
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
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

from cytoloop.config import Settings, load_settings
from cytoloop.data.preprocess import load_cells
from cytoloop.data.records import CellRecord, load_records, select, stratified_split
from cytoloop.models.base import Classifier, Predictions
from cytoloop.models.finetune import finetune
from cytoloop.models.loading import load_model
from cytoloop.models.train import UNLABELED, diffusion_loss, fit
from cytoloop.policy.acquisition import STRATEGIES, Pool, get_strategy
from cytoloop.scoring.calibration import calibrate, fit_temperature
from cytoloop.workflows import build_model, evaluate_predictions, label_indices

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _docs import DOCS, replace_section  # noqa: E402

CLASSES = ["neutrophil", "lymphocyte", "monocyte", "eosinophil"]
DOMAINS = ["jtsc", "bccd"]
IMAGES = DOCS.parent / "img"
# Diffusion scoring cheap enough to score the pool every round: a few trials, then a t-test after every trial
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


class Cells:
    """Every preprocessed cell of the benchmark, looked up by cell id (loaded once: preprocessing is shared)."""

    def __init__(self, records: list[CellRecord], settings: Settings):
        loaded = load_cells(records, settings.data, progress=True)
        self.records = {r.cell_id: r for r in loaded.records}
        self.row = {r.cell_id: i for i, r in enumerate(loaded.records)}
        self.images = loaded.images

    def of(self, ids: list[str]) -> np.ndarray:
        return self.images[[self.row[i] for i in ids]]

    def labels(self, ids: list[str]) -> np.ndarray:
        return label_indices([self.records[i] for i in ids], CLASSES)


def split(cells: Cells, seed: int, args) -> dict[str, list[str]]:
    """Test (fixed for every seed), and per seed the frozen validation cells, seed labels and pool."""
    records = list(cells.records.values())
    parts = stratified_split(records, {"rest": 1 - args.test_fraction, "test": args.test_fraction}, seed=0)
    out = {"test": sorted(r.cell_id for r in parts["test"]), "val": [], "seed": [], "pool": []}
    for name in CLASSES:
        members = sorted(r.cell_id for r in parts["rest"] if r.label == name)
        random.Random(f"{seed}-{name}").shuffle(members)
        out["val"] += members[: args.val_per_class]
        out["seed"] += members[args.val_per_class : args.val_per_class + args.seed_per_class]
        out["pool"] += members[args.val_per_class + args.seed_per_class :]
    return out


def thumbnails(images: np.ndarray, size: int = 4) -> np.ndarray:
    """(N, 3, S, S) -> (N, 3*size*size) block means: the near-duplicate signature the review loop uses."""
    n, channels, side, _ = images.shape
    block = side // size
    cropped = images[:, :, : block * size, : block * size]
    return cropped.reshape(n, channels, size, block, size, block).mean(axis=(3, 5)).reshape(n, -1)


def train_step_settings(settings: Settings, steps: int, seed: int, lr: float) -> Settings:
    """Settings for one round: its budget, its seed (the same for every strategy, so only the labels differ) and
    learning rate; warm-up at most a fifth of the steps, as a round is short."""
    train = settings.train.model_copy(
        update={"steps": steps, "seed": seed, "lr": lr, "warmup_steps": min(settings.train.warmup_steps, steps // 5)}
    )
    return settings.model_copy(update={"train": train})


def recalibrate(model: Classifier, images: np.ndarray, labels: np.ndarray, first: bool) -> None:
    """Round 0 fits the whole calibration (`calibration.calibrate`); later rounds refit the temperature only. For
    the diffusion model the timestep weights need exhaustive trials, the costliest scoring of a round."""
    if first or model.kind != "diffusion":
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
    checkpoint_dir: Path,
    first: bool = False,
) -> None:
    """Continue training `model` on the labelled cells (diffusion: and the unlabeled pool), then recalibrate."""
    images, labels = cells.of(labelled), cells.labels(labelled)
    if model.kind == "diffusion":
        images = np.concatenate([images, cells.of(pool)])
        labels = np.concatenate([labels, np.full(len(pool), UNLABELED)])
    # training leaves the model holding its frozen EMA copy; the next round trains that copy again
    (model.unet if model.kind == "diffusion" else model.network).requires_grad_(True)
    finetune(model, images, labels, settings.train, settings.augment, checkpoint_dir=checkpoint_dir)
    recalibrate(model, cells.of(val), cells.labels(val), first)
    shutil.rmtree(checkpoint_dir, ignore_errors=True)


def pretrained_diffusion(cells: Cells, ids: list[str], settings: Settings, args) -> Path:
    """A denoiser whose null class learned every non-test cell (labels unseen); shared by all seeds."""
    out = args.out / "diffusion" / "pretrained"
    if (out / "model.json").is_file():
        return out
    print(f"pretraining the diffusion model's null class on {len(ids)} unlabeled cells", flush=True)
    model = build_model("diffusion", CLASSES, settings)
    config = train_step_settings(settings, args.pretrain_steps, 0, settings.train.lr).train
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


def evaluate(model: Classifier, cells: Cells, test: list[str]) -> dict:
    began = time.perf_counter()
    predictions = model.predict(cells.of(test))
    report = evaluate_predictions(predictions, cells.labels(test), CLASSES, time.perf_counter() - began)
    return {k: report[k] for k in ("balanced_accuracy", "accuracy", "ece", "nll", "denoiser_evals_per_cell")}


def first_round(kind: str, seed: int, cells: Cells, parts: dict, settings: Settings, args) -> tuple[Path, dict]:
    """The round-0 model of a seed (trained on the seed labels only) and its test metrics; shared by strategies."""
    out = args.out / kind / f"seed{seed}" / "round0"
    if (out / "round.json").is_file():
        return out, json.loads((out / "round.json").read_text())
    began = time.perf_counter()
    round_settings = train_step_settings(settings, args.first_steps, 1000 * seed, args.lr)
    if kind == "diffusion":
        model = load_model(
            pretrained_diffusion(cells, sorted(parts["seed"] + parts["pool"] + parts["val"]), settings, args)
        )
    else:
        model = build_model(kind, CLASSES, round_settings)
    train_round(
        model, cells, parts["seed"], parts["pool"], parts["val"], round_settings, out / "checkpoints", first=True
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


def unscored(n: int) -> Predictions:
    """Uniform placeholder predictions: random sampling ignores scores, so its rounds skip scoring the pool."""
    return Predictions(np.full((n, len(CLASSES)), 1 / len(CLASSES)), np.zeros(n), np.zeros(n, dtype=int))


def run(kind: str, strategy_name: str, seed: int, cells: Cells, settings: Settings, args) -> dict:
    """All rounds of one (model, strategy, seed), resuming from its progress file and latest round's model."""
    path = args.out / kind / f"seed{seed}" / f"{strategy_name}.json"
    models = path.with_suffix("")
    state = json.loads(path.read_text()) if path.is_file() else None
    if state and state["done"]:
        return state
    parts = split(cells, seed, args)
    if state is None:
        first_dir, first = first_round(kind, seed, cells, parts, settings, args)
        state = {
            "kind": kind,
            "strategy": strategy_name,
            "seed": seed,
            "rounds": [first],
            "labelled": list(parts["seed"]),
            "done": False,
            "command": " ".join(["python", *sys.argv]),
        }
        model = load_model(first_dir)
    else:
        model = load_model(models / f"round{len(state['rounds']) - 1}")
    strategy = get_strategy(strategy_name, settings.routing)
    rounds = args.diffusion_rounds if kind == "diffusion" else args.rounds
    while len(state["rounds"]) <= rounds:
        began = time.perf_counter()
        number = len(state["rounds"])
        labelled = set(state["labelled"])
        pool = [i for i in parts["pool"] if i not in labelled]
        if len(pool) > args.candidates:  # score a random share of the pool only: the diffusion model's cost
            pool = sorted(random.Random(f"{seed}-{number}").sample(pool, args.candidates))
        images = cells.of(pool)
        predictions = unscored(len(pool)) if strategy_name == "random" else model.predict(images)
        chosen = strategy(
            Pool(predictions, pool, CLASSES, [cells.records[i].domain for i in pool], thumbnails(images)),
            args.budget,
            1000 * seed + number,
        )
        acquired = [pool[i] for i in chosen]
        labelled = state["labelled"] + acquired
        known = set(labelled)
        remaining = [i for i in parts["pool"] if i not in known]
        round_settings = train_step_settings(settings, args.steps, 1000 * seed + number, args.lr)
        train_round(model, cells, labelled, remaining, parts["val"], round_settings, models / "checkpoints")
        model.save(models / f"round{number}")
        state["labelled"] = labelled
        state["rounds"].append(
            {
                "n_labels": len(labelled),
                **evaluate(model, cells, parts["test"]),
                "acquired": acquired,
                "minutes": (time.perf_counter() - began) / 60,
            }
        )
        state["done"] = len(state["rounds"]) > rounds
        path.write_text(json.dumps(state, indent=1))
        shutil.rmtree(models / f"round{number - 1}", ignore_errors=True)
        last = state["rounds"][-1]
        print(
            f"{kind} {strategy_name} seed {seed} round {number}: {last['n_labels']} labels, balanced accuracy "
            f"{last['balanced_accuracy']:.3f}, ECE {last['ece']:.3f} ({last['minutes']:.1f} min)",
            flush=True,
        )
    shutil.rmtree(models, ignore_errors=True)  # finished: only the metrics are kept
    return state


def finished(args) -> dict[str, dict[str, list[dict]]]:
    """model -> strategy -> finished runs, read from the progress files; only seeds that every strategy of the
    model has finished count, so each strategy's mean is over the same seeds."""
    runs: dict[str, dict[str, dict[int, dict]]] = {}
    for path in sorted(args.out.glob("*/seed*/*.json")):
        state = json.loads(path.read_text())
        if state.get("done"):
            runs.setdefault(state["kind"], {}).setdefault(state["strategy"], {})[state["seed"]] = state
    out: dict[str, dict[str, list[dict]]] = {}
    for kind, by_strategy in runs.items():
        seeds = sorted(set.intersection(*(set(by_seed) for by_seed in by_strategy.values())))
        if seeds:
            out[kind] = {name: [by_seed[s] for s in seeds] for name, by_seed in by_strategy.items()}
    return out


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


def plot(kind: str, by_strategy: dict[str, list[dict]], path: Path) -> Path:
    """Balanced accuracy and ECE against labels: mean line per strategy, band = ± one sd over seeds."""
    from matplotlib.figure import Figure

    colours = {"random": "black", "least_confidence": "tab:orange", "entropy": "tab:green", "routing": "tab:red"}
    fig = Figure(figsize=(10, 3.8), dpi=100)
    axes = fig.subplots(1, 2)
    for name in (n for n in STRATEGIES if n in by_strategy):
        runs = by_strategy[name]
        for ax, metric in zip(axes, ("balanced_accuracy", "ece")):
            counts, values = curves(runs, metric)
            mean, sd = values.mean(axis=0), values.std(axis=0)
            ax.plot(
                counts,
                mean,
                marker="o",
                color=colours[name],
                linestyle="--" if name == "random" else "-",
                label=f"{name} ({len(runs)} seeds)",
            )
            ax.fill_between(counts, mean - sd, mean + sd, alpha=0.12, color=colours[name])
    for ax, label in zip(axes, ("balanced accuracy (test)", "ECE (test)")):
        ax.set_xlabel("labelled cells")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Active learning, {kind}: mean over seeds, band = ± 1 sd")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", bbox_inches="tight")
    return path


def acquired_mix(runs: list[dict], label_of: dict[str, str]) -> str:
    """Share of each class among the cells a strategy acquired (all rounds and seeds): what it chose to label."""
    labels = [label_of[i] for run in runs for r in run["rounds"] for i in r["acquired"]]
    return ", ".join(f"{name} {labels.count(name) / len(labels):.0%}" for name in CLASSES)


def table(by_strategy: dict[str, list[dict]], metric: str, target: float | None) -> list[str]:
    """Markdown rows of one metric: mean ± sd per label count; for balanced accuracy also the labels needed to
    reach random's final accuracy, and the paired differences to random (same seeds, same seed labels)."""
    counts = curves(next(iter(by_strategy.values())), "n_labels")[0]
    accuracy = metric == "balanced_accuracy"
    extra = " labels to reach random | final − random (paired) | mean over rounds − random (paired) |"
    lines = [
        f"| strategy | seeds | {' | '.join(str(c) for c in counts)} |" + (extra if accuracy else ""),
        "|---|---|" + "---|" * len(counts) + ("---|---|---|" if accuracy else ""),
    ]
    for name in (n for n in STRATEGIES if n in by_strategy):
        values = curves(by_strategy[name], metric)[1]
        row = (
            "| "
            + " | ".join(
                [name, str(len(values))]
                + [f"{m:.3f} ± {s:.3f}" for m, s in zip(values.mean(axis=0), values.std(axis=0))]
            )
            + " |"
        )
        if accuracy and target is not None:
            reached = labels_to_reach(counts, values.mean(axis=0), target)
            gaps = values[:, 1:] - curves(by_strategy["random"], metric)[1][:, 1:]
            final, average = gaps[:, -1], gaps.mean(axis=1)
            row += (
                f" {'>' + str(counts[-1]) if reached is None else f'{reached:.0f}'} | "
                f"{final.mean():+.3f} ± {final.std():.3f} | {average.mean():+.3f} ± {average.std():.3f} |"
            )
        lines.append(row)
    return lines + [""]


def render(results: dict[str, dict[str, list[dict]]], label_of: dict[str, str], args) -> str:
    """The docs section: the protocol, then per model the tables, the class mix of acquisitions and the plot."""
    lines = [
        f"Cells: {'+'.join(DOMAINS)} ({', '.join(CLASSES)}). Test: a fixed stratified {args.test_fraction:.0%} of the "
        f"cells, the same for every model, strategy and seed. Per seed: {args.seed_per_class} seed labels per class "
        f"and a frozen validation set of {args.val_per_class} per class (recalibration after every round; not "
        "counted as labels, the same for every strategy); the rest is the pool. Each round a strategy picks "
        f"{args.budget} cells among {args.candidates} pool cells drawn at random (seeded by seed and round; the "
        "diffusion model cannot afford to score the whole pool every round). Rounds: CNN baseline "
        f"{args.rounds}, diffusion {args.diffusion_rounds}. Training: round 0 {args.first_steps} steps on the seed "
        f"labels (diffusion: after {args.pretrain_steps} steps of null-class pretraining on every non-test cell, "
        f"labels unseen, shared by all seeds); each later round fine-tunes the previous round's model {args.steps} "
        f"steps (batch {args.batch_size}, lr {args.lr:g}) with the same training seed for every strategy. "
        f"Diffusion scoring: adaptive, {SCORING['min_trials']}-{SCORING['max_trials']} trials, t-test after every "
        f"trial (p {SCORING['elimination_p']}), null class on the first {SCORING['null_trials']} trials, "
        f"{SCORING['precision']}; timestep weights fitted at round 0, temperature refitted every round.",
        "",
        "Table cells: mean ± sd over seeds. 'Labels to reach random': labels at which the strategy's mean curve "
        "first reaches random sampling's mean balanced accuracy at its final budget (linear between rounds; '>N' "
        "when never). 'final − random': balanced accuracy at the final budget minus random's, seed by seed "
        "(mean ± sd over seeds); 'mean over rounds − random': the same difference averaged over the rounds after "
        "round 0 (an area between learning curves). Routing = the review loop's policy (`routing.route_cells` + "
        "`select_for_review`: anomaly threshold at the candidates' 95th percentile of the model's anomaly score, "
        "then least confident under 0.7, then audits, spread over predicted classes and labs, near-duplicates "
        "skipped); when it routes fewer cells than the budget, the rest are the least confident.",
        "",
    ]
    for kind, by_strategy in results.items():
        target = None
        if "random" in by_strategy:
            target = curves(by_strategy["random"], "balanced_accuracy")[1].mean(axis=0)[-1]
        for metric, title in (("balanced_accuracy", "balanced accuracy"), ("ece", "ECE")):
            lines += [f"**{kind}: {title}** against labelled cells", ""] + table(by_strategy, metric, target)
        if target is not None:
            lines += [f"Random sampling's final mean balanced accuracy ({kind}): {target:.3f}.", ""]
        lines += [f"Classes of the acquired cells ({kind}):", ""]
        lines += [f"- {n}: {acquired_mix(by_strategy[n], label_of)}" for n in STRATEGIES if n in by_strategy]
        first = {run["seed"]: run["rounds"][0]["minutes"] for runs in by_strategy.values() for run in runs}
        minutes = sum(first.values()) + sum(
            r["minutes"] for runs in by_strategy.values() for run in runs for r in run["rounds"][1:]
        )
        image = plot(kind, by_strategy, IMAGES / f"active_learning_{kind}.png")
        lines += [
            "",
            f"Compute ({kind}): {minutes:.0f} min of training, scoring and evaluation in all (the "
            "diffusion model's shared null-class pretraining not included), on the shared machine.",
            "",
            f"![active learning, {kind}](img/{image.name})",
            "",
        ]
    commands = sorted({run["command"] for by in results.values() for runs in by.values() for run in runs})
    lines += [
        "Commands, one per process (split by model, seed and strategy to share the cores; together they are the "
        "default configuration, `python benchmarks/active_learning.py --data ../shared/data/cells`; this section by "
        "`--docs-only`): " + "; ".join(f"`{c}`" for c in commands) + ".",
        f"Machine: {cpu_name()} ({platform.machine()}), {os.cpu_count()} cores, no GPU, {args.threads} torch "
        f"thread per run, runs at nice 5 beside other people's jobs (load average 4-7 for most of the run: minutes "
        f"are inflated); torch {torch.__version__}. Updated {datetime.now(UTC):%Y-%m-%d %H:%M} UTC.",
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
    results = finished(args)
    if results:
        label_of = {r.cell_id: r.label for r in load_records(args.data)}
        replace_section(DOCS, "active-learning", render(results, label_of, args), title="Active learning")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path("runs/active_learning"))
    parser.add_argument("--models", type=lambda s: s.split(","), default=["baseline", "diffusion"])
    parser.add_argument("--strategies", type=lambda s: s.split(","), default=list(STRATEGIES))
    parser.add_argument(
        "--seeds",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[0, 1, 2, 3, 4],
        help="seeds of the CNN baseline",
    )
    parser.add_argument(
        "--diffusion-seeds",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[0, 1, 2],
        help="seeds of the diffusion classifier (each costs far more)",
    )
    parser.add_argument("--rounds", type=int, default=4, help="acquisition rounds after round 0 (CNN baseline)")
    parser.add_argument("--diffusion-rounds", type=int, default=3, help="acquisition rounds of the diffusion model")
    parser.add_argument("--budget", type=int, default=20, help="cells acquired per round")
    parser.add_argument("--seed-per-class", type=int, default=5)
    parser.add_argument("--val-per-class", type=int, default=5)
    parser.add_argument("--test-fraction", type=float, default=0.3)
    parser.add_argument(
        "--candidates",
        type=int,
        default=150,
        help="pool cells scored (and offered to the strategy) per round, a seeded random share",
    )
    parser.add_argument("--first-steps", type=int, default=200, help="round-0 training steps on the seed labels")
    parser.add_argument("--steps", type=int, default=60, help="fine-tuning steps per round")
    parser.add_argument("--pretrain-steps", type=int, default=400, help="diffusion null-class pretraining steps")
    parser.add_argument("--lr", type=float, default=2e-4, help="learning rate of round 0 and of every round")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--write-docs", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--docs-only", action="store_true", help="rewrite the docs from finished runs; run nothing")
    args = parser.parse_args()
    for name in args.strategies:  # an unknown name fails here, naming the valid ones, before any training
        try:
            get_strategy(name)
        except ValueError as error:
            parser.error(str(error))
    unknown = [m for m in args.models if m not in ("baseline", "diffusion")]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; valid: baseline, diffusion")
    if args.docs_only:
        write_docs(args)
        return

    torch.set_num_threads(args.threads)
    settings = load_settings(
        overrides={
            "train": {"threads": args.threads, "batch_size": args.batch_size},
            "scoring": {**SCORING, "threads": args.threads},
        }
    )
    cells = Cells(select(load_records(args.data), DOMAINS, CLASSES), settings)
    for kind in args.models:
        for seed in args.diffusion_seeds if kind == "diffusion" else args.seeds:
            for name in args.strategies:
                run(kind, name, seed, cells, settings, args)
                if args.write_docs:  # after every run, so an interrupted benchmark still documents what it has
                    write_docs(args)


if __name__ == "__main__":
    main()

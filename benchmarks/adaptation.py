"""Hospital adaptation benchmark: how many labels per class does a new lab need?

A model trained on some labs is fine-tuned on k = 1, 3, 5, 10 labelled cells per class of a new lab (the same
fine-tuning as `cytoloop adapt`: `finetune.finetune` from the source model, stronger stain augmentation, the
source's preprocessing), then evaluated on held-out cells of that lab; balanced accuracy before and after, for the
diffusion classifier and the CNN baseline. Pairs:
  cellavision  from jtsc+bccd  (the models of benchmarks/quality.py in runs/quality, reused when finished;
                                otherwise trained here with --source-steps)
  jtsc         from bccd       (trained here with --source-steps)
Per class, the target's cells are shuffled once (seeded): the first 10 are the adaptation pool (k = 1 uses the
first, k = 3 the first three, ...), the rest, capped at --eval-per-class, are the held-out cells every k is scored
on. Every finished (pair, model, k) is kept in <out>/results/ and skipped on a rerun; training resumes from its
checkpoints, so the script may be interrupted at any time. Writes a table into docs/benchmarks.md.

    python benchmarks/adaptation.py --data ../shared/data/cells --out runs/adaptation

With `--from-base diffusion=DIR,baseline=DIR` the sources are instead the given PBC models (the shipped base model
and the reference experiment's CNN), adapted to each other lab (jtsc, cellavision, bccd) the same way; that table
goes into its own section ("adaptation-base"):

    python benchmarks/adaptation.py --data ../shared/data/manifest.csv --out runs/adaptation-base \
        --from-base diffusion=models/base-pbc,baseline=runs/reference/cnn-seed0

With `--restrict` every held-out cell is decided among the lab's four classes only, as a site that reports them
is served (`sites.<site>.classes`); the base models know eight. Its table has its own section too.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

from cytoloop.config import load_settings
from cytoloop.data.records import load_records, select
from cytoloop.models.finetune import finetune, finetune_configs, training_arrays
from cytoloop.models.loading import load_model
from cytoloop.workflows import evaluate_model, train_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _docs import DOCS, replace_section  # noqa: E402

CLASSES = ["neutrophil", "lymphocyte", "monocyte", "eosinophil"]
PAIRS = {"cellavision": ["jtsc", "bccd"], "jtsc": ["bccd"]}
KS = (1, 3, 5, 10)
BASE_TARGETS = ("jtsc", "cellavision", "bccd")  # the labs a PBC base model is adapted to (`--from-base`)


def pairs(args) -> dict[str, list[str]]:
    """target lab -> the labs its source model was trained on."""
    return {target: ["pbc"] for target in BASE_TARGETS} if args.from_base else PAIRS


def target_split(records, pool_size: int, eval_per_class: int, seed: int) -> tuple[dict, list]:
    """(class -> adaptation pool in order, held-out cells) of one target lab."""
    pools, held = {}, []
    for name in CLASSES:
        members = sorted((r for r in records if r.label == name), key=lambda r: r.cell_id)
        random.Random(f"{seed}-{name}").shuffle(members)
        pools[name] = members[:pool_size]
        held += members[pool_size : pool_size + eval_per_class]
    return pools, held


def source_model_dir(kind: str, target: str, args) -> Path:
    """The source model of a pair: the given base model (`--from-base`), or the quality benchmark's when it exists
    (same training set), else our own."""
    if args.from_base:
        return args.from_base[kind]
    reused = args.quality_dir / kind
    if PAIRS[target] == ["jtsc", "bccd"] and (reused / "model.json").is_file():
        return reused
    return args.out / "sources" / f"{kind}-{'+'.join(PAIRS[target])}"


def scoring_limit(model, args):
    if model.kind == "diffusion" and args.max_trials:
        cfg = model.scoring_config
        model.scoring_config = cfg.model_validate(
            {**cfg.model_dump(), "max_trials": args.max_trials, "min_trials": min(cfg.min_trials, args.max_trials)}
        )
    return model


def run_cell(kind: str, target: str, k: int, records, args, settings) -> dict:
    path = args.out / "results" / f"{target}-{kind}-k{k}.json"
    if path.is_file():
        return json.loads(path.read_text())
    source_dir = source_model_dir(kind, target, args)
    if not (source_dir / "model.json").is_file():
        if args.from_base:
            raise SystemExit(f"--from-base {kind}={source_dir}: no model there")
        source = select(records, PAIRS[target], CLASSES)
        print(f"training the {kind} source model on {'+'.join(PAIRS[target])} ({len(source)} cells)", flush=True)
        train_model(
            kind,
            source,
            settings.model_copy(
                update={"train": settings.train.model_copy(update={"steps": args.source_steps, "checkpoint_every": 50})}
            ),
            source_dir,
            classes=CLASSES,
            progress=True,
        )
    pools, held = target_split(select(records, [target], CLASSES), max(KS), args.eval_per_class, args.seed)
    model = scoring_limit(load_model(source_dir), args)
    began = time.perf_counter()
    if k > 0:
        chosen = [r for name in CLASSES for r in pools[name][:k]]
        train_config, augment_config = finetune_configs(settings, adapt=True)
        images, labels, _ = training_arrays(model, chosen)
        finetune(
            model,
            images,
            labels,
            train_config,
            augment_config,
            checkpoint_dir=args.out / "checkpoints" / f"{target}-{kind}-k{k}",
        )
    report = evaluate_model(model, held, progress=True, allowed=CLASSES if args.restrict else None, per_cell=True)
    # restricted, the same adapted model on all its classes too: the two figures are paired, cell for cell
    everything = evaluate_model(model, held, progress=True) if args.restrict else report
    result = {
        "target": target,
        "source": "+".join(pairs(args)[target]),
        "source_dir": str(source_dir),
        "kind": kind,
        "k": k,
        "n_adapt": k * len(CLASSES),
        "n_eval": report["n_cells"],
        "balanced_accuracy": report["balanced_accuracy"],
        "balanced_accuracy_interval": list(report["intervals"]["balanced_accuracy"]),
        "accuracy": report["accuracy"],
        "ece": report["ece"],
        "minutes": (time.perf_counter() - began) / 60,
        "adapt_steps": args.adapt_steps if k else 0,
        "allowed_classes": report["allowed_classes"],
        "balanced_accuracy_all_classes": everything["balanced_accuracy"],
        "command": " ".join(["python", *sys.argv]),
        "classes": report["classes"],
        "per_cell": report["per_cell"],  # the two models are compared cell by cell (`paired_table`)
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "per_cell"}), flush=True)  # the cells: in the file
    return result


def finished(args) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((args.out / "results").glob("*.json"))]


def _figure(result: dict, restricted: bool = False) -> str:
    """Balanced accuracy with its 95 % bootstrap interval over the held-out cells (results from before the
    intervals were recorded show the figure alone); restricted, the all-classes figure in parentheses."""
    interval = result.get("balanced_accuracy_interval")
    figure = f"{result['balanced_accuracy']:.3f}"
    figure = figure if interval is None else f"{figure} [{interval[0]:.2f}, {interval[1]:.2f}]"
    if restricted and "balanced_accuracy_all_classes" in result:
        figure += f" ({result['balanced_accuracy_all_classes']:.3f})"
    return figure


def paired_table(results: list[dict], args) -> list[str]:
    """Diffusion minus CNN balanced accuracy per target and k, with its 95 % paired-bootstrap interval over the
    held-out cells both models answered (`policy.promotion.difference_intervals`, resampled within each class, as
    the gate forms it): two separate intervals that overlap say less than the interval of the difference. Empty
    when no pair was scored with its cells kept (results from before they were)."""
    from cytoloop.policy.promotion import difference_intervals

    rows = []
    for target, sources in pairs(args).items():
        by_kind = {
            kind: {r["k"]: r for r in results if r["target"] == target and r["kind"] == kind}
            for kind in ("baseline", "diffusion")
        }
        cells = []
        for k in (0, *KS):
            cnn, diffusion = by_kind["baseline"].get(k), by_kind["diffusion"].get(k)
            intervals, n = difference_intervals(diffusion, cnn, n_boot=2000) if cnn and diffusion else ({}, 0)
            if not intervals:
                cells.append("-")
                continue
            low, high = intervals["balanced_accuracy"]
            cells.append(f"{diffusion['balanced_accuracy'] - cnn['balanced_accuracy']:+.3f} [{low:+.2f}, {high:+.2f}]")
        if any(c != "-" for c in cells):
            rows.append(f"| {target} (from {'+'.join(sources)}) | " + " | ".join(cells) + " |")
    if not rows:
        return []
    return [
        "",
        "Diffusion minus CNN, balanced accuracy, paired over the same held-out cells: the difference and its 95 % "
        "paired-bootstrap interval (2,000 resamples of the cells, within each class; an interval above 0 is the "
        "diffusion classifier ahead with confidence).",
        "",
        "| target (from) | k = 0 | k = 1 | k = 3 | k = 5 | k = 10 |",
        "|---|---|---|---|---|---|",
        *rows,
    ]


def render(results: list[dict], args) -> str:
    lines = [
        "Balanced accuracy on held-out cells of a new lab, before (k = 0) and after fine-tuning on k labelled cells "
        "per class (neutrophil, lymphocyte, monocyte, eosinophil), with its 95 % bootstrap interval over the "
        "held-out cells in brackets where recorded. One draw of the k cells per class (seed "
        f"{args.seed}); held-out cells are the same for every k. Fine-tuning: {args.adapt_steps} steps from the "
        "source model, stronger stain augmentation (`adapt` settings), source calibration kept (k = 1 leaves no "
        f"cell to recalibrate on). Diffusion scoring capped at {args.max_trials or 'the model’s'} trials per cell."
        + (
            " Every cell decided among those four classes only (`--restrict`: as a site reporting them is served);"
            " in parentheses the same adapted model deciding among all its classes, on the same cells."
            if args.restrict
            else ""
        ),
        "",
        "| target (from) | model | held-out cells | k = 0 | k = 1 | k = 3 | k = 5 | k = 10 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for target, sources in pairs(args).items():
        for kind in ("baseline", "diffusion"):  # every row, so concurrent runs of one model never drop the other's
            row = {r["k"]: r for r in results if r["target"] == target and r["kind"] == kind}
            n_eval = next((r["n_eval"] for r in row.values()), "-")
            cells = [_figure(row[k], args.restrict) if k in row else "pending" for k in (0, *KS)]
            lines.append(f"| {target} (from {'+'.join(sources)}) | {kind} | {n_eval} | " + " | ".join(cells) + " |")
    lines += paired_table(results, args)
    sources = []
    for source in sorted({r["source_dir"] for r in results}):
        training = Path(source) / "training.json"
        steps = json.loads(training.read_text())["steps"] if training.is_file() else "?"
        sources.append(f"{source} ({steps} steps)")
    source_minutes = sum(
        json.loads((Path(s) / "training.json").read_text())["train_seconds"] / 60
        for s in {r["source_dir"] for r in results}
        if Path(s).is_relative_to(args.out / "sources") and (Path(s) / "training.json").is_file()
    )
    commands = sorted({r["command"] for r in results if "command" in r})
    lines += [
        "",
        f"Source models: {', '.join(sources) or 'none yet'}"
        + (
            "; the PBC base models, read only."
            if args.from_base
            else "; runs/quality/* are the quality benchmark's, read only."
        ),
        "Commands: " + "; ".join(f"`{c}`" for c in commands) + ".",
        f"Machine: {platform.machine()}, {platform.processor() or platform.platform()}, 2 cores, CPU only, shared "
        f"with other jobs (timings are inflated by them). Budget used: {sum(r['minutes'] for r in results):.0f} min "
        f"of fine-tuning and evaluation over {len(results)} cells, plus {source_minutes:.0f} min training source "
        f"models here. Updated {datetime.now(UTC):%Y-%m-%d %H:%M} UTC.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path("runs/adaptation"))
    parser.add_argument("--quality-dir", type=Path, default=Path("runs/quality"), help="read only, never written")
    parser.add_argument("--models", type=lambda s: s.split(","), default=["baseline", "diffusion"])
    parser.add_argument("--targets", type=lambda s: s.split(","), default=None, help="default: every target")
    parser.add_argument(
        "--from-base",
        type=lambda s: {kind: Path(path) for kind, _, path in (item.partition("=") for item in s.split(","))},
        default=None,
        help="KIND=DIR,...: adapt these PBC models to jtsc, cellavision and bccd instead",
    )
    parser.add_argument("--source-steps", type=int, default=600, help="training steps of sources trained here")
    parser.add_argument("--adapt-steps", type=int, default=60)
    parser.add_argument("--eval-per-class", type=int, default=20)
    parser.add_argument("--max-trials", type=int, default=40, help="diffusion scoring cap (0: the model's own)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--write-docs", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--docs-only", action="store_true", help="rewrite the docs from finished cells; run nothing")
    parser.add_argument(
        "--restrict", action="store_true", help="decide every held-out cell among the lab's classes (a site's)"
    )
    args = parser.parse_args()
    args.targets = args.targets or list(pairs(args))
    unknown = [t for t in args.targets if t not in pairs(args)]
    if unknown:
        parser.error(f"unknown target(s) {unknown}; valid: {', '.join(pairs(args))}")
    if args.from_base and set(args.models) - set(args.from_base):
        parser.error(f"--from-base names no model for {sorted(set(args.models) - set(args.from_base))}")
    section, title = (
        ("adaptation-base", "Hospital adaptation from the PBC base model")
        if args.from_base
        else (
            "adaptation",
            "Hospital adaptation",
        )
    )
    if args.restrict:
        section, title = f"{section}-restricted", f"{title}, each lab's classes only"

    torch.set_num_threads(args.threads)
    settings = load_settings(
        overrides={"adapt": {"steps": args.adapt_steps}, "train": {"threads": args.threads, "seed": args.seed}}
    )
    if args.docs_only:
        replace_section(DOCS, section, render(finished(args), args), title=title)
        return
    records = load_records(args.data)
    for target in args.targets:
        for kind in args.models:
            for k in (0, *KS):
                run_cell(kind, target, k, records, args, settings)
                if args.write_docs:  # after every cell, so an interrupted run still documents what it has
                    replace_section(DOCS, section, render(finished(args), args), title=title)


if __name__ == "__main__":
    main()

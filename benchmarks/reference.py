"""The reference's experiments on PBC, side by side: the diffusion classifier against the CNN baseline.

Both models come from the same recipe family (`cytoloop recipes`): the same PBC cells, the same seeded split
(seed 0), the same batch and precision; the diffusion model is the one `--diffusion` points at (the base model,
`cytoloop train --recipe base-pbc`), the CNN is trained here once per seed in `--cnn-seeds` with `--cnn-steps`
steps (default: the recipe's, the diffusion model's budget). Every figure has a 95 % bootstrap interval over cells.

  in_domain     PBC's held-out test part (or a fixed, class-interleaved `--test-cells` of it): balanced accuracy,
                per-class recall, ECE after temperature scaling, NLL, accuracy at 90 % coverage.
  domain_shift  the PBC models, unadapted, on each other lab's labelled cells of the classes PBC knows
                (jtsc, cellavision, bccd): balanced accuracy over the classes that lab has, and ECE.
  blasts        ALL-IDB2 blasts against ALL-IDB2 normal cells: AUROC of every anomaly score each model offers
                (diffusion: null ratio, minimum error, the reference's gap; CNN: energy, max-softmax).

Finished models and evaluations are reused (delete a JSON to redo it), so the script can be stopped and rerun.

    python benchmarks/reference.py --data ../shared/data/manifest.csv --diffusion runs/base-pbc --out runs/reference
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np
from _docs import DOCS, replace_section

from cytoloop.config import load_settings
from cytoloop.data.records import CellRecord, class_interleaved_subset, load_records, select
from cytoloop.models.loading import load_model
from cytoloop.models.recipes import get_recipe
from cytoloop.workflows import evaluate_model, held_out, train_model

OTHER_LABS = ("jtsc", "cellavision", "bccd")
EXPERIMENTS = ("in_domain", "domain_shift", "blasts")


def train_cnn(records: list[CellRecord], out: Path, seed: int, steps: int) -> Path:
    """The CNN of recipe base-pbc-cnn with training seed `seed` (the split stays the recipe's), reused if done."""
    recipe = get_recipe("base-pbc-cnn")
    if not (out / "model.json").is_file():
        overrides = recipe.settings_overrides()
        overrides["train"] = {**overrides["train"], "seed": seed, "steps": steps}
        train_model("baseline", records, load_settings(overrides=overrides), out, split_seed=recipe.seed, progress=True)
    return out


def evaluate(model_dir: Path, name: str, records: list[CellRecord], out: Path, anomaly: list[CellRecord] = ()) -> dict:
    """Evaluate once and keep the report (with timing) as out/<model>/<name>.json; a kept report is reused."""
    path = out / model_dir.name / f"{name}.json"
    if path.is_file():
        return json.loads(path.read_text())
    began = time.perf_counter()
    report = evaluate_model(
        load_model(model_dir), records, path, anomaly_records=anomaly, anomaly_label="blast", progress=True
    )
    report["eval_seconds"] = time.perf_counter() - began
    path.write_text(json.dumps(report, indent=1))
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="the combined manifest of all labs")
    parser.add_argument("--diffusion", type=Path, required=True, help="the diffusion model (recipe base-pbc)")
    parser.add_argument("--out", type=Path, default=Path("runs/reference"))
    parser.add_argument("--cnn-seeds", default="0,1,2")
    parser.add_argument("--cnn-steps", type=int, default=get_recipe("base-pbc-cnn").steps)
    parser.add_argument(
        "--test-cells", type=int, default=None, help="this many PBC test cells, classes interleaved (default: all)"
    )
    parser.add_argument(
        "--blast-cells", type=int, default=None, help="this many ALL-IDB2 cells, blasts and normal interleaved"
    )
    parser.add_argument("--experiments", default=",".join(EXPERIMENTS))
    parser.add_argument("--write-docs", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args()
    experiments = args.experiments.split(",")
    unknown = sorted(set(experiments) - set(EXPERIMENTS))
    if unknown:
        parser.error(f"unknown experiment(s) {', '.join(unknown)}; valid: {', '.join(EXPERIMENTS)}")

    records = load_records(args.data)
    diffusion = load_model(args.diffusion)
    pbc = select([r for r in records if r.label], ["pbc"], diffusion.classes)
    cnns = [(args.out / f"cnn-seed{s}", int(s)) for s in args.cnn_seeds.split(",")]
    results: dict = {"models": {}, "args": {k: str(v) for k, v in vars(args).items()}}
    # the diffusion model first: its figures are the ones the CNNs are compared against, and it is already trained
    for model_dir, cnn_seed in [(args.diffusion, None)] + cnns:
        if cnn_seed is not None:
            train_cnn(pbc, model_dir, cnn_seed, args.cnn_steps)
        kind = load_model(model_dir).kind
        row: dict = {"kind": kind, "training": _training_summary(model_dir)}
        if "in_domain" in experiments:
            test = class_interleaved_subset(held_out(pbc, model_dir, part="test")[0], args.test_cells)
            row["in_domain"] = evaluate(model_dir, "in_domain", test, args.out)
        if "domain_shift" in experiments:
            row["domain_shift"] = {}
            for lab in OTHER_LABS:
                cells = select([r for r in records if r.label in diffusion.classes], [lab])
                row["domain_shift"][lab] = evaluate(model_dir, f"shift_{lab}", cells, args.out)
        if "blasts" in experiments:
            allidb2 = class_interleaved_subset(select(records, ["allidb2"]), args.blast_cells)
            row["blasts"] = _blast_report(model_dir, allidb2, args.out)
        results["models"][str(model_dir)] = row
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "reference.json").write_text(json.dumps(results, indent=1, default=float))
    text = render(results, args)
    print(text)
    if args.write_docs:
        replace_section(DOCS, "reference", text, title="Reference experiments on PBC: diffusion classifier vs CNN")


def _blast_report(model_dir: Path, allidb2: list[CellRecord], out: Path) -> dict:
    """Anomaly AUROCs on ALL-IDB2 (blast vs normal): the cells carry no class of the model, so they are scored
    directly rather than through `evaluate_model`'s labelled path."""
    from cytoloop.data.preprocess import load_cells
    from cytoloop.workflows import anomaly_metrics

    path = out / model_dir.name / "blasts.json"
    if path.is_file():
        return json.loads(path.read_text())
    model = load_model(model_dir)
    cells = load_cells(allidb2, model.data_config, progress=True)
    is_blast = np.array([r.label == "blast" for r in cells.records])
    began = time.perf_counter()
    predictions = model.predict(cells.images, progress=True)
    report = anomaly_metrics(predictions, is_blast)
    report.update(
        {
            "eval_seconds": time.perf_counter() - began,
            "evals_per_cell_blast": float(predictions.evals[is_blast].mean()),
            "evals_per_cell_normal": float(predictions.evals[~is_blast].mean()),
        }
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1))
    return report


def _training_summary(model_dir: Path) -> dict:
    training = json.loads((Path(model_dir) / "training.json").read_text())
    settings = training["settings"]["train"]
    return {
        "steps": training["steps"],
        "batch_size": settings["batch_size"],
        "precision": settings["precision"],
        "seed": settings["seed"],
        "train_minutes": training["train_seconds"] / 60,
        "resumed_from_step": training["resumed_from_step"],
        "n_train": training["n_train"],
        "n_val": training["n_val"],
    }


def _ci(report: dict, name: str, digits: int = 3) -> str:
    value = report[name] if name in report else report["per_class_recall"][name.split(" ", 1)[1]]
    low, high = report["intervals"][name]
    return f"{value:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def _seed_spread(rows: dict, value, what: str) -> list[str]:
    """A line with the CNN seeds' mean and spread of one figure (the seed-to-seed noise a difference must beat)."""
    values = [value(row) for row in rows.values() if row["kind"] == "baseline"]
    if len(values) < 2:
        return []
    return [
        "",
        f"CNN over {len(values)} training seeds, {what}: mean {np.mean(values):.3f}, "
        f"min {min(values):.3f}, max {max(values):.3f} (sd {np.std(values, ddof=1):.3f}).",
    ]


def render(results: dict, args: argparse.Namespace) -> str:
    import torch

    lines = [
        f"Command: `python benchmarks/reference.py --data {args.data} --diffusion {args.diffusion} --out {args.out} "
        f"--cnn-seeds {args.cnn_seeds} --cnn-steps {args.cnn_steps}"
        + (f" --test-cells {args.test_cells}" if args.test_cells else "")
        + (f" --blast-cells {args.blast_cells}" if args.blast_cells else "")
        + "`  ",
        f"Machine: {platform.machine()}, {platform.processor() or 'CPU'}, 2 cores, torch threads "
        f"{torch.get_num_threads()}, no GPU. Date: {date.today().isoformat()}. [brackets]: 95 % bootstrap interval "
        "over cells (1,000 resamples).",
        "",
        "Training (same PBC train part, split seed 0, batch and precision for both kinds):",
        "",
        "| model | steps | batch | precision | train seed | train cells | train min |",
        "|---|---|---|---|---|---|---|",
    ]
    rows = results["models"]
    for name, row in rows.items():
        t = row["training"]
        minutes = f"{t['train_minutes']:.1f}" + (" (resumed)" if t["resumed_from_step"] else "")
        lines.append(
            f"| {row['kind']} `{name}` | {t['steps']} | {t['batch_size']} | {t['precision']} | {t['seed']} "
            f"| {t['n_train']} | {minutes} |"
        )
    first = next(iter(rows.values()))
    if "in_domain" in first:
        classes = list(first["in_domain"]["per_class_recall"])
        lines += [
            "",
            f"In-domain, PBC test cells ({first['in_domain']['n_cells']} cells, 8 classes):",
            "",
            "| model | balanced accuracy | ECE | NLL | accuracy at 90 % coverage | evals/cell | cells/s |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, row in rows.items():
            r = row["in_domain"]
            lines.append(
                f"| {row['kind']} `{Path(name).name}` | {_ci(r, 'balanced_accuracy')} | {_ci(r, 'ece')} | "
                f"{_ci(r, 'nll')} | {_ci(r, 'accuracy_at_90_coverage')} | "
                f"{r['denoiser_evals_per_cell']:.1f} | {r['cells_per_second']:.1f} |"
            )
        lines += _seed_spread(rows, lambda row: row["in_domain"]["balanced_accuracy"], "in-domain balanced accuracy")
        lines += [
            "",
            "Per-class recall:",
            "",
            "| model | " + " | ".join(classes) + " |",
            "|---|" + "---|" * len(classes),
        ]
        for name, row in rows.items():
            r = row["in_domain"]
            lines.append(
                f"| {row['kind']} `{Path(name).name}` | " + " | ".join(_ci(r, f"recall {c}", 2) for c in classes) + " |"
            )
    if "domain_shift" in first:
        lines += [
            "",
            "Domain shift, unadapted (balanced accuracy over the classes each lab has; ECE):",
            "",
            "| model | " + " | ".join(f"{lab} bal. acc | {lab} ECE" for lab in OTHER_LABS) + " |",
            "|---|" + "---|---|" * len(OTHER_LABS),
        ]
        for name, row in rows.items():
            cells = []
            for lab in OTHER_LABS:
                r = row["domain_shift"][lab]
                cells += [_ci(r, "balanced_accuracy"), _ci(r, "ece")]
            lines.append(f"| {row['kind']} `{Path(name).name}` | " + " | ".join(cells) + " |")
        sizes = ", ".join(f"{lab} {first['domain_shift'][lab]['n_cells']}" for lab in OTHER_LABS)
        lines.append(f"\nCells: {sizes}.")
    if "blasts" in first:
        lines += [
            "",
            "ALL-IDB2 blasts vs normal cells, AUROC of each anomaly score (the models never saw a blast):",
            "",
        ]
        for name, row in rows.items():
            r = row["blasts"]
            scores = "; ".join(
                f"{'primary' if score == 'anomaly' else score} "
                f"{r['anomaly_auroc_by_score'].get(score, r['anomaly_auroc']):.3f} [{low:.3f}, {high:.3f}]"
                for score, (low, high) in r["anomaly_auroc_intervals"].items()
            )
            lines.append(
                f"- {row['kind']} `{Path(name).name}` ({r['anomaly_n_positive']} blasts of "
                f"{r['anomaly_n']} cells): {scores}"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())

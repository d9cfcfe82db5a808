"""Quality benchmark: the diffusion classifier against the CNN baseline, same data, same split, same budget.

Both models train on jtsc+bccd (the train part of one seeded stratified split) and are then evaluated on:
  in-domain     the held-out test part of jtsc+bccd;
  cross-domain  every cellavision cell (another lab, stain and camera);
  anomaly       allidb2 blasts vs normal cells of the same lab, scored by models that never saw a blast.
Balanced accuracy comes with a 95 % bootstrap interval over cells. Training resumes from checkpoints, so the
script can be interrupted and rerun; a finished model is reused. Writes a table into docs/benchmarks.md.

    python benchmarks/quality.py --data ../shared/data/cells --out runs/quality --steps 3000
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
from cytoloop.data.records import load_records, select
from cytoloop.evaluation import metrics
from cytoloop.models.loading import load_model
from cytoloop.workflows import evaluate_model, held_out, train_model

CLASSES = ["neutrophil", "lymphocyte", "monocyte", "eosinophil"]


def bootstrap_balanced_accuracy(report: dict, n_classes: int) -> tuple[float, float]:
    confusion = np.asarray(report["confusion_matrix"])
    truth = np.repeat(np.arange(n_classes), confusion.sum(axis=1))
    predicted = np.concatenate([np.repeat(np.arange(n_classes), row) for row in confusion])
    return metrics.bootstrap_interval(
        lambda idx: metrics.balanced_accuracy(truth[idx], predicted[idx], n_classes),
        len(truth),
        n_boot=1000,
        strata=truth,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path("runs/quality"))
    parser.add_argument("--steps", type=int, default=3000, help="training steps for each model (same budget)")
    parser.add_argument("--models", default="baseline,diffusion")
    parser.add_argument("--write-docs", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args()

    records = load_records(args.data)
    source = select(records, ["jtsc", "bccd"], CLASSES)
    cross = select(records, ["cellavision"], CLASSES)
    anomaly = select(records, ["allidb2"])
    settings = load_settings(overrides={"train": {"steps": args.steps}})
    rows = []
    for kind in args.models.split(","):
        model_dir = args.out / kind
        if (model_dir / "model.json").is_file():
            model, training = load_model(model_dir), json.loads((model_dir / "training.json").read_text())
        else:
            model, training = train_model(kind, source, settings, model_dir, classes=CLASSES, progress=True)
        test, _ = held_out(source, model_dir, part="test")
        began = time.perf_counter()
        in_domain = evaluate_model(model, test, model_dir / "in_domain.json", anomaly_records=anomaly, progress=True)
        cross_domain = evaluate_model(model, cross, model_dir / "cross_domain.json", progress=True)
        rows.append(
            {
                "kind": kind,
                "train_minutes": training["train_seconds"] / 60,
                "steps": training["steps"],
                "eval_minutes": (time.perf_counter() - began) / 60,
                "in_domain": in_domain,
                "in_domain_ci": bootstrap_balanced_accuracy(in_domain, len(CLASSES)),
                "cross_domain": cross_domain,
                "cross_domain_ci": bootstrap_balanced_accuracy(cross_domain, len(CLASSES)),
            }
        )
        (args.out / "quality.json").write_text(json.dumps(rows, indent=1, default=float))
    table = render(rows, args)
    print(table)
    if args.write_docs:
        replace_section(DOCS, "quality", table, title="Quality: diffusion classifier vs CNN baseline")


def render(rows: list[dict], args: argparse.Namespace) -> str:
    lines = [
        f"Command: `python benchmarks/quality.py --data {args.data} --out {args.out} --steps {args.steps}`  ",
        f"Machine: {platform.machine()}, {platform.processor() or 'CPU'}, torch threads "
        f"{__import__('torch').get_num_threads()}, no GPU. Date: {date.today().isoformat()}. One training seed (0); "
        "[brackets]: 95 % bootstrap interval of balanced accuracy over test cells.",
        "",
        "| model | steps | train min | in-domain bal. acc | in-domain ECE | cross-domain bal. acc | cross-domain ECE "
        "| blast AUROC | denoiser evals/cell | cells/s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        a, b = r["in_domain"], r["cross_domain"]
        lines.append(
            f"| {r['kind']} | {r['steps']} | {r['train_minutes']:.1f} | {a['balanced_accuracy']:.3f} "
            f"[{r['in_domain_ci'][0]:.2f}, {r['in_domain_ci'][1]:.2f}] | {a['ece']:.3f} | "
            f"{b['balanced_accuracy']:.3f} [{r['cross_domain_ci'][0]:.2f}, {r['cross_domain_ci'][1]:.2f}] | "
            f"{b['ece']:.3f} | {a['anomaly_auroc']:.3f} | {a['denoiser_evals_per_cell']:.0f} | "
            f"{a['cells_per_second']:.1f} |"
        )
    lines.append("")
    lines.append("Anomaly AUROC of every score each model reports (allidb2 blast vs normal):")
    lines.append("")
    for r in rows:
        scores = ", ".join(f"{k} {v:.3f}" for k, v in r["in_domain"]["anomaly_auroc_by_score"].items())
        lines.append(f"- {r['kind']}: primary {r['in_domain']['anomaly_auroc']:.3f}; {scores}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())

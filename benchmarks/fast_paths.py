"""Fast on the cells that matter: the diffusion classifier's scoring paths on normal and on anomalous cells.

One trained diffusion model (the PBC base model), its saved tuned rule, the same cells for every row, side by side
in one process:
  exhaustive      `--trials` trials, every class: the reference decision (normal cells only, `--exhaustive-cells`)
  tuned           the model's saved rule: what serving runs without a routing threshold
  tuned + exit    the same, with the route exits at the routing thresholds (`--anomaly-above`; default: the
                  `--routed-share` quantile of the anomaly score on the model's validation cells, i.e. that share of
                  normal cells routed as anomalies; the review line `--review-below`): a cell stops once it is
                  clearly past the anomaly threshold, or clearly a close call under the review line
  + candidates    tuned + exit, each cell decided among the cheap scorer's top `--candidates` classes (the CNN
                  baseline trained on the same cells, `--scorer`)
  cascade         the CNN answers the cells it is sure of (`--cascade-threshold`); the rest go to the diffusion
                  model with exit and candidates
Cells: normal = the model's held-out test cells (`--cells`, classes interleaved); anomalous = ALL-IDB2 blasts, which
no class of the model describes (`--anomaly-cells`). For each row and group: denoiser evaluations per cell (mean,
p95), cells/s, agreement of the decision with exhaustive scoring (normal cells) and with the tuned rule, balanced
accuracy, and whether each cell's route (anomaly, review, accept) is the one the tuned rule without exits gives.
Then the cascade's accuracy/speed curve: the same cascade at each student threshold, run and timed end to end on
the normal cells. Then evaluations per cell as the number of classes grows (4, 6, 8): the tuned rule with each
normal cell's candidates fixed to a class subset that holds its class (the same denoiser, fewer classes in play).

    python benchmarks/fast_paths.py --data ../shared/data/manifest.csv --model models/base-pbc \
        --scorer runs/reference/cnn-seed0 --out runs/fast-paths
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from _cache import cached
from _docs import DOCS, environment_prefix, replace_section

from cytoloop.config import CascadeConfig, RoutingConfig, ScoringConfig
from cytoloop.data.preprocess import load_cells
from cytoloop.data.records import class_interleaved_subset, load_records, select
from cytoloop.evaluation import metrics
from cytoloop.models.base import Predictions
from cytoloop.models.cascade import CascadeClassifier, top_k
from cytoloop.models.loading import load_model
from cytoloop.policy.routing import route_cell
from cytoloop.workflows import held_out, label_indices

TITLE = "Fast paths: route exits, candidate classes, cascade"
# student thresholds of the cascade's accuracy/speed curve
CURVE_THRESHOLDS = (0.0, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 0.99, 1.01)
# class subsets for "evaluations per cell by number of classes": each holds the smaller one
CLASS_LADDER = {
    4: ["eosinophil", "lymphocyte", "monocyte", "neutrophil"],
    6: ["basophil", "eosinophil", "lymphocyte", "monocyte", "neutrophil", "platelet"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="the combined manifest of all labs")
    parser.add_argument("--model", type=Path, default=Path("models/base-pbc"))
    parser.add_argument("--scorer", type=Path, default=Path("runs/reference/cnn-seed0"), help="the cheap scorer")
    parser.add_argument("--out", type=Path, default=Path("runs/fast-paths"))
    parser.add_argument("--cells", type=int, default=400, help="normal test cells")
    parser.add_argument("--anomaly-cells", type=int, default=60, help="ALL-IDB2 blasts")
    parser.add_argument("--exhaustive-cells", type=int, default=120, help="normal cells scored exhaustively")
    parser.add_argument("--trials", type=int, default=100, help="exhaustive trials per cell")
    parser.add_argument("--anomaly-above", type=float, default=None, help="routing threshold (model's scale)")
    parser.add_argument("--routed-share", type=float, default=0.05, help="share of validation cells over it")
    parser.add_argument("--review-below", type=float, default=0.7, help="the review line (routing.review_below)")
    parser.add_argument("--candidates", type=int, default=3)
    parser.add_argument("--cascade-threshold", type=float, default=0.9)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--precision", choices=["model", "fp32", "bf16"], default="model", help="the diffusion scoring's precision"
    )
    parser.add_argument("--channels-last", action="store_true", help="run the denoiser in channels-last layout")
    parser.add_argument("--write-docs", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--docs-only", action="store_true", help="write the docs from --out/fast_paths.json")
    parser.add_argument("--section", default=None, help="docs section (default: fast-paths, fast-paths-gpu on a GPU)")
    args = parser.parse_args()
    if args.docs_only:
        saved = args.out / "fast_paths.json"
        report = json.loads(saved.read_text())
        report.setdefault("date", f"{datetime.fromtimestamp(saved.stat().st_mtime, UTC):%Y-%m-%d %H:%M} UTC")
        replace_section(DOCS, _section(args, report), render(report, args), title=_title(report))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)

    runtime: dict = {"channels_last": args.channels_last}
    if args.precision != "model":
        runtime["precision"] = args.precision
    # the fields given replace the model's own, as a machine's CYTOLOOP_SCORING__* settings do (models.loading)
    model, scorer = load_model(args.model, ScoringConfig(**runtime)), load_model(args.scorer)
    precision = model.scoring_config.precision + ("-cl" if model.scoring_config.channels_last else "")
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"  # device "auto": CUDA if present
    load = [os.getloadavg()[0]]
    if scorer.classes != model.classes:
        parser.error(f"--scorer classes {scorer.classes} differ from the model's {model.classes}")
    normal, blasts, labelled = cell_groups(args.data, args.model, model, args.cells, args.anomaly_cells)
    labels = label_indices(normal.records, model.classes)
    threshold = args.anomaly_above
    if threshold is None:
        threshold = anomaly_threshold(model, args.model, labelled, args.routed_share, args.out / f"val-{precision}")
    routing = RoutingConfig(
        anomaly_above=threshold, review_below=args.review_below, always_review=[], audit_fraction=0.0
    )

    exhaustive_config = model.scoring_config.model_copy(update={"min_trials": args.trials, "max_trials": args.trials})
    n_exh = min(args.exhaustive_cells, len(labels))
    exhaustive = cached(
        args.out / f"exhaustive-{args.trials}-{n_exh}-{precision}.pkl",
        lambda: model.predict(normal.images[:n_exh], config=exhaustive_config).labels,
        inputs=(args.model, normal.images[:n_exh], exhaustive_config),
    )

    groups = {"normal": normal.images, "blasts": blasts.images}
    if device.startswith("cuda"):  # CUDA's and cuDNN's start-up, out of the first row's time
        model.predict(normal.images[:256])
        scorer.predict(normal.images[:256])
    cascade = CascadeClassifier(
        model, scorer, CascadeConfig(threshold=args.cascade_threshold, candidates=args.candidates)
    )
    paths = {
        "tuned": lambda x: model.predict(x),
        "tuned + exit": lambda x: model.predict(x, routing=routing),
        "+ candidates": lambda x: model.predict(
            x, routing=routing, candidates=top_k(scorer.predict(x).probs, args.candidates)
        ),
        "cascade": lambda x: cascade.predict(x, routing=routing),
    }
    rows, runs = [], {}
    for name, path in paths.items():
        for group, images in groups.items():
            began = time.perf_counter()
            predictions = path(images)
            seconds = time.perf_counter() - began
            runs[(name, group)] = predictions
            rows.append(measure(name, group, predictions, seconds, routing))
    for r in rows:
        predictions = runs[(r["path"], r["group"])]
        tuned = runs[("tuned", r["group"])]
        r["agreement_tuned"] = float(np.mean(predictions.labels == tuned.labels))
        r["route_agreement"] = float(np.mean(routes(predictions, routing) == routes(tuned, routing)))
        if r["group"] == "normal":
            r["agreement_exhaustive"] = float(np.mean(predictions.labels[:n_exh] == exhaustive))
            r["balanced_accuracy"] = metrics.balanced_accuracy(labels, predictions.labels, len(model.classes))

    # the cascade over student thresholds, each run end to end on the normal cells (the cascade row warmed it up)
    references = {"exhaustive": exhaustive, "tuned": runs[("tuned", "normal")].labels}
    curve = [
        cascade_point(model, scorer, threshold, args.candidates, normal.images, labels, routing, references)
        for threshold in CURVE_THRESHOLDS
    ]

    by_classes = []
    for n_classes, subset in [*CLASS_LADDER.items(), (len(model.classes), model.classes)]:
        keep = np.array([r.label in subset for r in normal.records])
        mask = np.array([[c in subset for c in model.classes]] * int(keep.sum()))
        predictions = model.predict(normal.images[keep], candidates=mask)
        by_classes.append(
            {
                "classes": n_classes,
                "cells": int(keep.sum()),
                "evals_mean": float(predictions.evals.mean()),
                "evals_p95": float(np.percentile(predictions.evals, 95)),
            }
        )
    report = {
        "date": f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        "threads": torch.get_num_threads(),
        "device": device,
        "cores": os.cpu_count(),
        "model": str(args.model),
        "scorer": str(args.scorer),
        "threshold": threshold,
        "rows": rows,
        "by_classes": by_classes,
        "cascade_curve": curve,
        "n_exhaustive": n_exh,
        "precision": precision,
        "load": [*load, os.getloadavg()[0]],
        "args": {k: str(v) for k, v in vars(args).items()},
        "command": environment_prefix() + "python " + " ".join(sys.argv),  # every flag and CYTOLOOP_* it was given
    }
    (args.out / "fast_paths.json").write_text(json.dumps(report, indent=1))
    text = render(report, args)
    print(text)
    if args.write_docs:
        replace_section(DOCS, _section(args, report), text, title=_title(report))


def cascade_point(
    model, scorer, threshold: float, k: int, images: np.ndarray, labels: np.ndarray, routing, references: dict
) -> dict:
    """The cascade at one student threshold, run and timed end to end: deferred share, balanced accuracy, cells/s
    and agreement with each reference (labels of the first cells, as many as it has)."""
    cascade = CascadeClassifier(model, scorer, CascadeConfig(threshold=threshold, candidates=k))
    began = time.perf_counter()
    predictions = cascade.predict(images, routing=routing)
    seconds = time.perf_counter() - began
    point = {
        "threshold": threshold,
        "deferred": float(np.mean(predictions.extra["deferred"])),
        "balanced_accuracy": metrics.balanced_accuracy(labels, predictions.labels, len(model.classes)),
        "cells_per_second": len(images) / seconds,
        "evals_mean": float(predictions.evals.mean()),
    }
    for name, reference in references.items():
        point[f"agreement_{name}"] = float(np.mean(predictions.labels[: len(reference)] == reference))
    return point


def cell_groups(data: Path, model_dir: Path, model, n_cells: int, n_anomaly: int):
    """The normal cells (the model's held-out PBC test cells, classes interleaved), the anomalous ones (ALL-IDB2
    blasts) and the model's labelled PBC records (for its validation cells)."""
    records = load_records(data)
    labelled = select([r for r in records if r.label], ["pbc"], model.classes)
    normal = load_cells(class_interleaved_subset(held_out(labelled, model_dir, "test")[0], n_cells), model.data_config)
    blasts = load_cells([r for r in select(records, ["allidb2"]) if r.label == "blast"][:n_anomaly], model.data_config)
    return normal, blasts, labelled


def anomaly_threshold(model, model_dir: Path, labelled: list, share: float, cache: Path) -> float:
    """The anomaly threshold that routes `share` of normal cells (200 of the model's validation cells) as
    anomalies: how the demo fits a site's threshold, on the model's own lab. `cache` (a path stem) keeps the
    scores for a rerun."""
    val = load_cells(class_interleaved_subset(held_out(labelled, model_dir, "val")[0], 200), model.data_config)
    scores = cached(
        cache.with_name(cache.name + "_anomaly.pkl"),
        lambda: model.predict(val.images).anomaly,
        inputs=(model_dir, val.images, model.scoring_config),
    )
    return float(np.quantile(scores, 1 - share))


def routes(predictions: Predictions, routing: RoutingConfig) -> np.ndarray:
    """Each cell's route (anomaly, review, accept: what an exit must not change)."""
    pairs = zip(predictions.confidence, predictions.anomaly)
    return np.array([route_cell(float(c), float(a), "", routing) for c, a in pairs])


def measure(name: str, group: str, predictions: Predictions, seconds: float, routing: RoutingConfig) -> dict:
    provisional = predictions.extra.get("provisional", np.zeros(len(predictions), dtype=bool))
    routed = routes(predictions, routing)
    return {
        "path": name,
        "group": group,
        "cells": len(predictions),
        "cells_per_second": len(predictions) / seconds,
        "evals_mean": float(predictions.evals.mean()),
        "evals_p95": float(np.percentile(predictions.evals, 95)),
        "routed_anomaly": float(np.mean(routed == "anomaly")),
        "routed_review": float(np.mean(routed == "review")),
        "exited": float(np.mean(provisional)),
    }


def _section(args: argparse.Namespace, report: dict) -> str:
    return args.section or ("fast-paths" if report.get("device", "cpu") == "cpu" else "fast-paths-gpu")


def _title(report: dict) -> str:
    return TITLE + ("" if report.get("device", "cpu") == "cpu" else f", on a GPU ({report['device']})")


def render(report: dict, args: argparse.Namespace) -> str:
    rows = report["rows"]
    normal_tuned = next(r for r in rows if r["path"] == "tuned" and r["group"] == "normal")
    command = report.get("command") or (  # a report from before the command was saved: its main flags
        f"python benchmarks/fast_paths.py --data {args.data} --model {args.model} --scorer {args.scorer} "
        f"--out {args.out} --cells {args.cells} --anomaly-cells {args.anomaly_cells} --exhaustive-cells "
        f"{args.exhaustive_cells} --trials {args.trials} --candidates {args.candidates}"
        + ("" if args.precision == "model" else f" --precision {args.precision}")
        + (" --channels-last" if args.channels_last else "")
    )
    lines = [
        f"Command: `{command}`  ",
        f"Machine: {platform.machine()}, "
        + (
            f"{report['device']}, {report.get('cores', '?')} CPU cores, "
            if report.get("device", "cpu") != "cpu"
            else f"CPU, {report.get('threads', 'default')} torch threads, 2 cores, "
        )
        + (
            f"load average {', '.join(f'{x:.1f}' for x in report['load'])} before and after"
            if "load" in report
            else "shared with other jobs (cells/s are indicative; evaluations are exact)"
        )
        + f". Diffusion scoring: {report.get('precision', 'fp32')}. Date: {report.get('date', '?')}. "
        f"Routing: anomaly above {report['threshold']:.4g} (model's scale; {args.routed_share:.0%} of validation "
        f"cells above it unless given), review below {args.review_below}. Exhaustive reference: {args.trials} "
        f"trials on the first {report['n_exhaustive']} normal cells.",
        "",
        "| path | cells | evals/cell mean | p95 | cells/s | routed anomaly | routed review | stopped early | agrees "
        "with exhaustive | agrees with tuned | same route as tuned | balanced accuracy |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        exhaustive = f"{r['agreement_exhaustive']:.3f}" if "agreement_exhaustive" in r else "-"
        accuracy = f"{r['balanced_accuracy']:.3f}" if "balanced_accuracy" in r else "-"
        lines.append(
            f"| {r['path']} ({r['group']}) | {r['cells']} | {r['evals_mean']:.1f} | {r['evals_p95']:.0f} | "
            f"{r['cells_per_second']:.1f} | {r['routed_anomaly']:.3f} | {r['routed_review']:.3f} | "
            f"{r['exited']:.3f} | {exhaustive} | "
            f"{r['agreement_tuned']:.3f} | {r['route_agreement']:.3f} | {accuracy} |"
        )
    blasts = {r["path"]: r for r in rows if r["group"] == "blasts"}  # anomalous cells, against normal ones
    normal = {r["path"]: r for r in rows if r["group"] == "normal"}
    lines += [
        "",
        "Anomalous cells cost, per path, this many times the evaluations of normal ones: "
        + "; ".join(f"{p} {blasts[p]['evals_mean'] / max(normal[p]['evals_mean'], 1e-9):.2f}x" for p in normal)
        + f". The tuned rule alone: {normal_tuned['evals_mean']:.1f} evaluations per normal cell.",
        "",
        "Cascade accuracy/speed curve on the normal cells (student threshold swept, each threshold run and timed end "
        f"to end as the cascade row is; the teacher among the student's top {args.candidates}; the tuned diffusion "
        f"classifier's balanced accuracy is {normal_tuned['balanced_accuracy']:.3f}):",
        "",
        "| threshold | deferred | evals/cell mean | balanced accuracy | agrees with exhaustive | agrees with tuned "
        "| cells/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in report.get("cascade_curve", []):
        lines.append(
            f"| {c['threshold']:.2f} | {c['deferred']:.0%} | {c['evals_mean']:.1f} | {c['balanced_accuracy']:.3f} | "
            f"{c['agreement_exhaustive']:.3f} | {c['agreement_tuned']:.3f} | {c['cells_per_second']:.1f} |"
        )
    lines += [
        "",
        "Evaluations per cell as classes grow (tuned rule, each cell's candidates fixed to a class subset holding "
        "its class; same denoiser):",
        "",
        "| classes | cells | evals/cell mean | p95 |",
        "|---|---|---|---|",
    ]
    for r in report["by_classes"]:
        lines.append(f"| {r['classes']} | {r['cells']} | {r['evals_mean']:.1f} | {r['evals_p95']:.0f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())

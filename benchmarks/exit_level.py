"""How loose may the route exits' test be? Evaluations saved against routes changed, by `scoring.exit_p`.

A route exit (scoring.trials, "Route exits") stops a cell once one-sided t-tests at `exit_p` say its route is
settled: past the anomaly threshold, or a close call under the review line with the anomaly route ruled out. A
looser test stops cells sooner, and more of them on a route that their full trials would not give. Issue 17 asks
for both: anomalous cells at no more than twice the evaluations of normal ones, and the route full scoring gives
on at least 99 % of cells. This benchmark measures where the two meet on one model: the same normal cells (the
model's held-out PBC test cells) and anomalous cells (ALL-IDB2 blasts) scored with the model's tuned rule and no
exits (the reference route), then with the exits at each `--exit-p`, side by side in one process. The routing
thresholds are fast_paths.py's (anomaly: `--routed-share` of the model's validation cells above it; review below
`--review-below`).

    python benchmarks/exit_level.py --data ../shared/data/manifest.csv --model models/base-pbc \
        --out runs/exit-level --exit-p 0.01 0.03 0.1 0.2
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
from _docs import DOCS, environment_prefix, replace_section
from fast_paths import anomaly_threshold, cell_groups, routes

from cytoloop.config import RoutingConfig, ScoringConfig
from cytoloop.models.loading import load_model

TITLE = "Route exits: how loose the exit test may be"
SECTION = "exit-level"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="the combined manifest of all labs")
    parser.add_argument("--model", type=Path, default=Path("models/base-pbc"))
    parser.add_argument("--out", type=Path, default=Path("runs/exit-level"))
    parser.add_argument("--cells", type=int, default=400, help="normal test cells")
    parser.add_argument("--anomaly-cells", type=int, default=60, help="ALL-IDB2 blasts")
    parser.add_argument("--exit-p", type=float, nargs="+", default=[0.01, 0.03, 0.1, 0.2])
    parser.add_argument("--routed-share", type=float, default=0.05, help="share of validation cells over it")
    parser.add_argument("--review-below", type=float, default=0.7, help="the review line (routing.review_below)")
    parser.add_argument("--precision", choices=["model", "fp32", "bf16"], default="model")
    parser.add_argument("--channels-last", action="store_true", help="run the denoiser in channels-last layout")
    parser.add_argument("--write-docs", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args()
    if any(not 0 < p < 1 for p in args.exit_p):
        parser.error(f"--exit-p levels must lie in (0, 1), got {args.exit_p}")
    args.out.mkdir(parents=True, exist_ok=True)

    runtime: dict = {"channels_last": args.channels_last}
    if args.precision != "model":
        runtime["precision"] = args.precision
    model = load_model(args.model, ScoringConfig(**runtime))
    precision = model.scoring_config.precision + ("-cl" if model.scoring_config.channels_last else "")
    load = [os.getloadavg()[0]]
    normal, blasts, labelled = cell_groups(args.data, args.model, model, args.cells, args.anomaly_cells)
    threshold = anomaly_threshold(model, args.model, labelled, args.routed_share, args.out / f"val-{precision}")
    routing = RoutingConfig(
        anomaly_above=threshold, review_below=args.review_below, always_review=[], audit_fraction=0.0
    )
    groups = {"normal": normal.images, "blasts": blasts.images}
    tuned = model.scoring_config
    rows, reference = [], {}
    for level in [None, *args.exit_p]:  # None: the tuned rule without exits, the reference route and class
        model.scoring_config = tuned if level is None else tuned.model_copy(update={"exit_p": level})
        for group, images in groups.items():
            began = time.perf_counter()
            predictions = model.predict(images, routing=None if level is None else routing)
            seconds = time.perf_counter() - began
            reference.setdefault(group, predictions)
            rows.append({"exit_p": level, "group": group, **_measure(predictions, reference[group], routing, seconds)})
    report = {
        "date": f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        "command": environment_prefix() + "python " + " ".join(sys.argv),
        "threads": torch.get_num_threads(),
        "threshold": threshold,
        "precision": precision,
        "load": [*load, os.getloadavg()[0]],
        "rows": rows,
    }
    (args.out / "exit_level.json").write_text(json.dumps(report, indent=1))
    text = render(report, args)
    print(text)
    if args.write_docs:
        replace_section(DOCS, SECTION, text, title=TITLE)


def _measure(predictions, reference, routing: RoutingConfig, seconds: float) -> dict:
    return {
        "cells": len(predictions),
        "evals_mean": float(predictions.evals.mean()),
        "evals_p95": float(np.percentile(predictions.evals, 95)),
        "cells_per_second": len(predictions) / seconds,
        "exited": float(np.mean(predictions.extra.get("provisional", np.zeros(len(predictions), dtype=bool)))),
        "route_agreement": float(np.mean(routes(predictions, routing) == routes(reference, routing))),
        "label_agreement": float(np.mean(predictions.labels == reference.labels)),
    }


def render(report: dict, args: argparse.Namespace) -> str:
    rows = report["rows"]
    by = {(r["exit_p"], r["group"]): r for r in rows}
    levels = list(dict.fromkeys(r["exit_p"] for r in rows))
    n = {group: by[(None, group)]["cells"] for group in ("normal", "blasts")}
    lines = [
        f"Command: `{report['command']}`  ",
        f"Machine: {platform.machine()}, CPU, {report['threads']} torch threads, 2 cores, load average "
        f"{', '.join(f'{x:.1f}' for x in report['load'])} before and after. Diffusion scoring: {report['precision']}. "
        f"Date: {report['date']}. Routing: anomaly above {report['threshold']:.4g} ({args.routed_share:.0%} of "
        f"validation cells above it), review below {args.review_below}. Reference route and class: the model's "
        f"tuned rule without exits, on the same {n['normal']} normal cells and {n['blasts']} ALL-IDB2 blasts.",
        "",
        "| exit_p | group | evals/cell mean | p95 | cells/s | stopped early | same route | same class | "
        "blasts' evals / normal's | same route, all cells |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for level in levels:
        ratio = by[(level, "blasts")]["evals_mean"] / max(by[(level, "normal")]["evals_mean"], 1e-9)
        pooled = sum(by[(level, g)]["route_agreement"] * n[g] for g in n) / sum(n.values())
        for group in ("normal", "blasts"):
            r = by[(level, group)]
            lines.append(
                f"| {'no exits' if level is None else level} | {group} | {r['evals_mean']:.1f} | "
                f"{r['evals_p95']:.0f} | {r['cells_per_second']:.1f} | {r['exited']:.3f} | "
                f"{r['route_agreement']:.3f} | {r['label_agreement']:.3f} | {ratio:.2f}x | {pooled:.3f} |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())

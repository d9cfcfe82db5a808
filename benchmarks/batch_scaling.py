"""How offline batch scoring grows with Ray Data workers (#17): cells/s for 1, 2, ... workers over PBC's cells.

Each model scores the same cells with `jobs.score.score_offline` (what `cytoloop score` runs) once per worker count
and repeat, worker counts alternating within a repeat so a change in the machine's load falls on all of them.
Every worker is a Ray actor with its own copy of the model and `cores // workers` torch threads, so the rows
compare one process using every core against several processes sharing them. Times are a job's wall time as a
user sees it: the actors' start and model loading included.

Reported per model and worker count: cells/s (mean over repeats, 95 % t interval), the speed-up over one worker
per repeat (mean and 95 % t interval over repeats), denoiser evaluations per cell, and the share of cells whose
class matches the one-worker run's (a diffusion model draws its trial noise per batch, so a cell's answer may
depend on the cells it is batched with; a CNN's may not).

  python benchmarks/batch_scaling.py --data ../shared/data/manifest.csv \
      --models cnn=runs/reference/cnn-seed0@all,cascade=runs/batch-scaling/cascade@2000,diffusion=models/base-pbc@400 \
      --cascade-from models/base-pbc,runs/reference/cnn-seed0 --workers 1,2 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from _cascade import assemble_cascade
from _docs import DOCS, replace_section
from scipy import stats

from cytoloop.config import CascadeConfig, RoutingConfig
from cytoloop.data.records import class_interleaved_subset, load_records, select

TITLE = "Batch scoring with Ray Data: workers"


def _interval(values: list[float]) -> tuple[float, float, float]:
    """Mean and 95 % t interval (the mean twice when there is one value)."""
    mean = float(np.mean(values))
    if len(values) < 2:
        return mean, mean, mean
    half = float(stats.t.ppf(0.975, len(values) - 1) * np.std(values, ddof=1) / np.sqrt(len(values)))
    return mean, mean - half, mean + half


def _ratio_interval(ratios: list[float]) -> tuple[float, float, float]:
    """Geometric mean and 95 % t interval of ratios, on the log scale where a ratio's noise is symmetric (on the
    linear scale ratios of 0.5, 2 and 1 average 1.17 with an interval reaching below 0)."""
    mean, low, high = _interval([float(np.log(r)) for r in ratios])
    return float(np.exp(mean)), float(np.exp(low)), float(np.exp(high))


def _parse_models(text: str) -> list[tuple[str, Path, int | None]]:
    models = []
    for item in text.split(","):
        name, rest = item.split("=", 1)
        directory, _, cells = rest.partition("@")
        models.append((name, Path(directory), None if cells in ("", "all") else int(cells)))
    return models


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="manifest with the PBC cells")
    parser.add_argument("--domains", default="pbc")
    parser.add_argument("--models", required=True, help="name=DIR@CELLS,... (CELLS: how many, or 'all')")
    parser.add_argument("--cascade-from", default=None, help="TEACHER,STUDENT: build the cascade model first")
    parser.add_argument("--cascade-threshold", type=float, default=0.9)
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--gpus", type=float, default=0.0, help="GPUs per worker (0.25: four workers share one)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path("runs/batch-scaling"))
    parser.add_argument("--no-write-docs", dest="write_docs", action="store_false")
    args = parser.parse_args()

    import ray

    from jobs.score import score_offline

    models = _parse_models(args.models)
    cascade_note = ""
    if args.cascade_from:
        teacher, student = args.cascade_from.split(",")
        target = next(directory for name, directory, _ in models if name == "cascade")
        config = CascadeConfig(threshold=args.cascade_threshold)
        cascade_note = " " + assemble_cascade(target, Path(teacher), Path(student), config)
    workers = [int(w) for w in args.workers.split(",")]
    cores = os.cpu_count() or 1
    records = select(load_records(args.data), args.domains.split(","))
    ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False)
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # its progress lines would swamp the log
    routing = RoutingConfig()  # the default settings: review under 0.7, no anomaly threshold, 2 % audits
    results: dict = {}
    load = [os.getloadavg()[0]]
    for name, directory, n in models:
        cells = class_interleaved_subset(records, n)
        runs: dict[int, list[dict]] = {w: [] for w in workers}
        first_labels = None
        for repeat in range(args.repeats):
            for w in workers:
                threads = max(1, cores // w)
                scores = score_offline(cells, directory, routing, w, threads, args.gpus, args.batch_size)
                labels = [r.label if r else None for r in scores.results]
                if first_labels is None and w == workers[0]:
                    first_labels = labels
                runs[w].append(
                    {
                        "seconds": scores.seconds,
                        "cells_per_s": len(scores.scored) / scores.seconds,
                        "evals": float(np.mean([r.evals for r in scores.scored])),
                        "same_class": float(np.mean([a == b for a, b in zip(labels, first_labels)])),
                        "failed": len(scores.failed),
                    }
                )
                print(f"{name} repeat {repeat} workers {w}: {runs[w][-1]}", file=sys.stderr, flush=True)
        results[name] = {"model": str(directory), "cells": len(cells), "runs": {str(w): r for w, r in runs.items()}}
        load.append(os.getloadavg()[0])
    ray.shutdown()
    args.out.mkdir(parents=True, exist_ok=True)
    report = {
        "results": results,
        "command": "python " + " ".join(sys.argv),
        "date": f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        "machine": f"{platform.machine()}, {cores} cores, CPU only",
        "load": load,
        "note": cascade_note,
    }
    (args.out / "batch_scaling.json").write_text(json.dumps(report, indent=1))
    text = render(report, workers)
    print(text)
    if args.write_docs:
        replace_section(DOCS, "batch-scaling", text, title=TITLE)


def render(report: dict, workers: list[int]) -> str:
    lines = [
        f"Command: `{report['command']}`  ",
        f"Machine: {report['machine']}; 1-minute load average {min(report['load']):.1f}-{max(report['load']):.1f} "
        f"during the run. Date: {report['date']}. Each worker is a Ray actor with its own model and "
        f"cores / workers torch threads; times include starting the actors and loading the model.{report['note']}",
        "",
        "| model | cells | workers | cells/s (95 % interval) | "
        "speed-up over 1 worker (geometric mean, 95 % interval) | evals/cell | same class as 1 worker |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, result in report["results"].items():
        base = result["runs"][str(workers[0])]
        for w in workers:
            runs = result["runs"][str(w)]
            speed = _interval([r["cells_per_s"] for r in runs])
            ratio = _ratio_interval([r["cells_per_s"] / b["cells_per_s"] for r, b in zip(runs, base)])
            lines.append(
                f"| {name} (`{result['model']}`) | {result['cells']} | {w} | {speed[0]:.1f} [{speed[1]:.1f}, "
                f"{speed[2]:.1f}] | {ratio[0]:.2f} [{ratio[1]:.2f}, {ratio[2]:.2f}] | "
                f"{np.mean([r['evals'] for r in runs]):.1f} | {np.mean([r['same_class'] for r in runs]):.3f} |"
            )
    lines.append("")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

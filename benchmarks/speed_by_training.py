"""How a diffusion model's training budget moves the speed targets: one row per `speed.py` run, each on a
differently trained model of the same architecture, scored on the same cells.

Reads what each run left in its --out folder (speed.json and the cached exhaustive logs); computes nothing with a
denoiser. Writes a table into docs/benchmarks.md.

    python benchmarks/speed_by_training.py runs/speed-full runs/speed-9k runs/speed-20k
"""

from __future__ import annotations

import argparse
import json
import pickle
import sys
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from _docs import DOCS, replace_section

from cytoloop.scoring.calibration import evaluations_needed

TUNED_ROW = "adaptive, tuned rule, batched, {precision}"  # the row the targets are read from


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, nargs="+", help="--out folders of speed.py runs")
    parser.add_argument("--write-docs", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args()
    rows = [summarise(run) for run in args.runs]
    table = render(rows, args)
    print(table)
    if args.write_docs:
        replace_section(DOCS, "speed-training", table, title="Speed by training budget")


def summarise(run: Path) -> dict:
    report = json.loads((run / "speed.json").read_text())
    settings = report["args"]
    model = Path(settings["model"])
    meta = json.loads((model / "model.json").read_text())
    training = json.loads((model / "training.json").read_text())
    weights = np.asarray(meta["timestep_weights"])
    # the threads the run had (its logs are named by them): an older report has only `--threads`, None when not given
    precision, threads = settings["exhaustive_precision"], report.get("torch_threads", settings["threads"])
    val_logs = pickle.loads((run / f"val_exhaustive_{precision}.pkl").read_bytes())
    test_logs = pickle.loads(
        (run / f"test_exhaustive_{report['n_test']}_{precision}_{threads}threads.pkl").read_bytes()
    )[0].logs
    null_trials = report["tuned"]["null_trials"]
    rows = {row["name"]: row for row in report["rows"]}
    cascade = next(row for name, row in rows.items() if name.startswith("cascade"))
    return {
        "run": str(run),
        "model": str(model),
        "steps": training["steps"],
        "resumed_from": training.get("resumed_from_step", 0),
        "leg_minutes": training["train_seconds"] / 60,
        "tuned": report["tuned"],
        "n_tuning_unlabeled": report.get("n_tuning_unlabeled", 0),
        "tuning_orders": report.get("tuning_orders", 1),  # runs before scoring.tuning_orders replayed one order
        "exhaustive": rows[f"exhaustive, {settings['trials']} trials, batched, {precision}"],
        "fast": rows[TUNED_ROW.format(precision=settings["fast_precision"])],
        "cascade": cascade,
        "needed_val": float(np.mean([evaluations_needed(log, weights, null_trials) for log in val_logs])),
        "needed_test": float(np.mean([evaluations_needed(log, weights, null_trials) for log in test_logs])),
        "trials_p95_val": report["trials_needed"]["val_p95"],
        "trials_p95_test": report["trials_needed"]["test_p95"],
    }


def render(rows: list[dict], args: argparse.Namespace) -> str:
    command = " ".join(["python", "benchmarks/speed_by_training.py"] + sys.argv[1:])
    lines = [
        f"Command: `{command}` (reads the runs' speed.json and cached logs; each run's own command is in its "
        f"speed.json). Date: {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}. Same architecture, data, "
        "split and test cells in every run; the tuned rule is chosen on the tuning cells as in the Speed table; the "
        "targets are read from the batched tuned row.",
        "",
        "| model | training steps | exhaustive bal. acc | tuned rule | evals/cell | agreement | tuned bal. acc | "
        "evals a cell really needs (test / val) | trials needed p95 (test / val) | cascade cells/s | "
        "cascade bal. acc |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        t = r["tuned"]
        resumed = (
            f" (resumed at {r['resumed_from']}: {r['leg_minutes']:.0f} min for the rest)"
            if r["resumed_from"]
            else f" ({r['leg_minutes']:.0f} min)"
        )
        rule = (
            f"min_trials {t['min_trials']}, p {t['elimination_p']:g}, prior {t['variance_prior_trials']:g}; "
            f"tuned on {r['tuning_orders']} trial order(s) per cell"
            + (f" (+{r['n_tuning_unlabeled']} unlabeled)" if r["n_tuning_unlabeled"] else "")
        )
        lines.append(
            f"| `{r['model']}` | {r['steps']}{resumed} | {r['exhaustive']['balanced_accuracy']:.3f} | {rule} | "
            f"{r['fast']['evals_mean']:.1f} | {r['fast']['agreement']:.3f} | {r['fast']['balanced_accuracy']:.3f} | "
            f"{r['needed_test']:.1f} / {r['needed_val']:.1f} | {r['trials_p95_test']:.0f} / "
            f"{r['trials_p95_val']:.0f} | {r['cascade']['cells_per_second']:.1f} | "
            f"{r['cascade']['balanced_accuracy']:.3f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())

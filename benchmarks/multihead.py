"""One pass, every class: the denoiser with one output head per class against the class-embedding denoiser.

The diffusion classifier asks its denoiser for the noise under each class in play (and the null class) on every
trial: at PBC's eight classes a trial costs up to nine evaluations. A denoiser with one head per class
(`diffusion.conditioning = "heads"`, issue 17's multi-head denoiser) takes no class input; its output layer has
3 x (classes + 1) channels, so one evaluation serves every class of a trial. Its trunk no longer sees the class,
so the question is whether the heads still tell the classes apart, at what cost in evaluations per cell.

Both denoisers are trained here on the same cells (the PBC training split of `--base`, the base model), with the
same loop (`models.train.fit`), steps, batch, precision and seed, the same architecture apart from the class input
and the output layer (`train.diffusion_loss` with classifier-free dropout; `train.heads_loss`: each cell trains
its class's head and the null head in one pass). Each is then made ready as `cytoloop train` makes a model
(`workflows.tune_model_scoring`: w(t) and the elimination rule from one exhaustive pass over `--tuning-cells`
validation cells, the temperature on `--temperature-cells`), and scored side by side on the same cells:
  exhaustive   `--trials` trials per cell on the first `--exhaustive-cells` test cells: the reference decision
  tuned        the model's tuned rule, on `--cells` held-out PBC test cells (classes interleaved) and on
               `--anomaly-cells` ALL-IDB2 blasts
  tuned + exit the same with the route exits at a routing threshold that sends `--routed-share` of the model's own
               validation cells to the anomaly queue
Balanced accuracy with 95 % bootstrap intervals and the paired difference, agreement with exhaustive scoring,
denoiser evaluations per cell (mean, p95) on normal cells and on blasts, cells/s, the null-ratio blast AUROC.

    python benchmarks/multihead.py --data ../shared/data/manifest.csv --steps 2500 --out runs/multihead
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from _cache import cached
from _docs import DOCS, replace_section
from fast_paths import cell_groups, routes

from cytoloop.config import AugmentConfig, RoutingConfig, ScoringConfig, TrainConfig
from cytoloop.data.preprocess import load_cells
from cytoloop.data.records import class_interleaved_subset
from cytoloop.evaluation import metrics
from cytoloop.models.diffusion import DiffusionClassifier
from cytoloop.models.loading import load_model
from cytoloop.models.train import fit
from cytoloop.workflows import held_out, label_indices, tune_model_scoring

TITLE = "One pass, every class: the denoiser with one head per class"
CONDITIONINGS = ("embedding", "heads")
GROUPS = ("normal", "blasts")


def trained(conditioning: str, base, training, args) -> DiffusionClassifier:
    """A diffusion model of `conditioning` trained on the training cells; the weights are cached under --out (and
    the run resumes from its checkpoint if stopped)."""
    model_config = base.model_config.model_copy(update={"conditioning": conditioning})
    scoring = ScoringConfig(
        precision="bf16",
        channels_last=True,
        calibration_cells=args.tuning_cells,
        temperature_cells=args.temperature_cells,
        threads=args.threads,
        max_trials=args.max_trials,
        min_trials=min(ScoringConfig.model_fields["min_trials"].default, args.max_trials),
    )
    torch.manual_seed(args.seed)
    model = DiffusionClassifier(base.classes, base.data_config, model_config, scoring)
    config = TrainConfig(steps=args.steps, batch_size=32, precision="bf16", checkpoint_every=500, seed=args.seed)
    labels = label_indices(training.records, base.classes)

    def run():
        network, loss = model.objective(config)
        began = time.perf_counter()
        ema, result = fit(network, loss, training.images, labels, config, AugmentConfig(), args.out / conditioning)
        return ema.state_dict(), time.perf_counter() - began, result.history[-1]["loss"]

    name = "multihead" if conditioning == "heads" else conditioning  # the prototype run's cache names
    state, seconds, loss = cached(args.out / f"{name}-{args.steps}.pkl", run)
    model.unet.load_state_dict(state)
    model.info["train"] = {"seconds": seconds, "loss": loss}
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="the combined manifest of all labs")
    parser.add_argument("--base", type=Path, default=Path("models/base-pbc"), help="split, classes, architecture")
    parser.add_argument("--steps", type=int, default=2500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cells", type=int, default=400, help="held-out test cells")
    parser.add_argument("--anomaly-cells", type=int, default=60, help="ALL-IDB2 blasts")
    parser.add_argument("--exhaustive-cells", type=int, default=120)
    parser.add_argument("--trials", type=int, default=100, help="exhaustive trials per cell")
    parser.add_argument("--tuning-cells", type=int, default=120, help="validation cells of the exhaustive pass")
    parser.add_argument("--temperature-cells", type=int, default=500)
    parser.add_argument("--max-trials", type=int, default=200, help="the scoring rule's trial limit")
    parser.add_argument("--routed-share", type=float, default=0.05)
    parser.add_argument("--out", type=Path, default=Path("runs/multihead"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--write-docs", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    load = [os.getloadavg()[0]]

    base = load_model(args.base)
    normal, blasts, labelled = cell_groups(args.data, args.base, base, args.cells, args.anomaly_cells)
    training = cached(
        args.out / "train-cells.pkl", lambda: load_cells(held_out(labelled, args.base, "train")[0], base.data_config)
    )
    val_records = class_interleaved_subset(held_out(labelled, args.base, "val")[0], args.temperature_cells)
    val = cached(args.out / f"val-{args.temperature_cells}.pkl", lambda: load_cells(val_records, base.data_config))
    val_labels = label_indices(val.records, base.classes)
    labels = label_indices(normal.records, base.classes)
    n_classes, n_exh = len(base.classes), min(args.exhaustive_cells, len(labels))

    report: dict = {"date": "", "rows": {}, "args": {k: str(v) for k, v in vars(args).items()}}
    for conditioning in CONDITIONINGS:
        model = trained(conditioning, base, training, args)
        row = cached(
            args.out / f"{conditioning}-{args.steps}-measured.pkl",
            lambda m=model: measure(m, val, val_labels, normal.images, labels, blasts.images, args),
        )
        report["rows"][conditioning] = row
        print(json.dumps({conditioning: {k: v for k, v in row.items() if k != "labels"}}, indent=1), flush=True)
    a, b = (np.asarray(report["rows"][c].pop("labels")) for c in CONDITIONINGS)
    report["difference_interval"] = metrics.bootstrap_interval(
        lambda i: (
            metrics.balanced_accuracy(labels[i], b[i], n_classes)
            - metrics.balanced_accuracy(labels[i], a[i], n_classes)
        ),
        len(labels),
    )
    report["agreement"] = float(np.mean(a == b))
    report.update(
        date=f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        machine=f"{platform.machine()} CPU, {torch.get_num_threads()} torch threads; torch {torch.__version__}",
        load=[*load, os.getloadavg()[0]],
        cells=len(labels),
        blasts=len(blasts.images),
        n_exhaustive=n_exh,
    )
    (args.out / "multihead.json").write_text(json.dumps(report, indent=1))
    text = render(report)
    print(text)
    if args.write_docs:
        replace_section(DOCS, "multihead", text, title=TITLE)


def measure(model, val, val_labels, normal, labels, blasts, args) -> dict:
    """Make `model` ready as `cytoloop train` does (w(t), tuned rule, temperature on the validation cells), then
    score it every way the table shows; returns its row (with the tuned rule's test labels, for the pairing)."""
    n_classes, n_exh = len(model.classes), min(args.exhaustive_cells, len(labels))
    began = time.perf_counter()
    tuning = tune_model_scoring(model, val.images, val_labels, fit_weights=True)
    tuning_seconds = time.perf_counter() - began
    threshold = float(np.quantile(model.predict(val.images[:200]).anomaly, 1 - args.routed_share))
    routing = RoutingConfig(anomaly_above=threshold, review_below=0.7, always_review=[], audit_fraction=0.0)
    exhaustive_config = model.scoring_config.model_copy(update={"min_trials": args.trials, "max_trials": args.trials})
    began = time.perf_counter()
    exhaustive = model.predict(normal[:n_exh], config=exhaustive_config)
    exhaustive_seconds = time.perf_counter() - began
    chosen = tuning["chosen"]
    row: dict = {
        "train": model.info["train"],
        "tuning_seconds": tuning_seconds,
        "rule": {k: chosen[k] for k in ("min_trials", "elimination_p", "variance_prior_trials")} if chosen else None,
        "temperature": model.temperature,
        "exhaustive": {
            "evals_mean": float(exhaustive.evals.mean()),
            "cells_per_second": n_exh / exhaustive_seconds,
            "balanced_accuracy": metrics.balanced_accuracy(labels[:n_exh], exhaustive.labels, n_classes),
        },
        "threshold": threshold,
    }
    runs = {}
    for path, routed in (("tuned", None), ("tuned + exit", routing)):
        for group, images in zip(GROUPS, (normal, blasts)):
            began = time.perf_counter()
            predictions = model.predict(images, routing=routed)
            seconds = time.perf_counter() - began
            runs[(path, group)] = predictions
            row[f"{path} ({group})"] = {
                "evals_mean": float(predictions.evals.mean()),
                "evals_p95": float(np.percentile(predictions.evals, 95)),
                "cells_per_second": len(images) / seconds,
                "routed_anomaly": float(np.mean(routes(predictions, routing) == "anomaly")),
            }
    tuned = runs[("tuned", "normal")]
    row["labels"] = tuned.labels.tolist()
    row["balanced_accuracy"] = metrics.balanced_accuracy(labels, tuned.labels, n_classes)
    row["interval"] = metrics.bootstrap_interval(
        lambda i: metrics.balanced_accuracy(labels[i], tuned.labels[i], n_classes), len(labels)
    )
    row["ece"] = metrics.expected_calibration_error(tuned.probs, labels)
    row["agreement_exhaustive"] = float(np.mean(tuned.labels[:n_exh] == exhaustive.labels))
    same_route = [routes(runs[("tuned + exit", g)], routing) == routes(runs[("tuned", g)], routing) for g in GROUPS]
    row["exit_route_agreement"] = float(np.mean(np.concatenate(same_route)))
    is_blast = np.r_[np.zeros(len(labels), bool), np.ones(len(blasts), bool)]
    row["blast_auroc"] = metrics.auroc(np.r_[tuned.anomaly, runs[("tuned", "blasts")].anomaly], is_blast)
    return row


def render(report: dict) -> str:
    args, rows = report["args"], report["rows"]
    lines = [
        f"Command: `python benchmarks/multihead.py --data {args['data']} --steps {args['steps']} "
        f"--cells {args['cells']} --anomaly-cells {args['anomaly_cells']} --trials {args['trials']} "
        f"--out {args['out']}`  ",
        f"Machine: {report['machine']}, 2 cores; load average {report['load'][0]:.1f} before, {report['load'][1]:.1f} "
        f"after. Date: {report['date']}. Scoring: bf16, channels-last.",
        "",
        f"Both denoisers: {args['steps']} steps of batch 32 (bf16 autocast, seed {args['seed']}) on the base model's "
        f"PBC training cells; tuned on {args['tuning_cells']} validation cells, temperature on "
        f"{args['temperature_cells']}; {report['cells']} held-out test cells, {report['blasts']} ALL-IDB2 blasts; "
        f"exhaustive reference: {args['trials']} trials on the first {report['n_exhaustive']} test cells.",
        "",
        "| denoiser | train | final loss | tuned rule | balanced accuracy [95 %] | ECE | agrees with exhaustive | "
        "exhaustive bal. acc. | blast AUROC |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        low, high = row["interval"]
        rule = row["rule"]
        rule_text = (
            f"min_trials {rule['min_trials']}, p {rule['elimination_p']}, prior {rule['variance_prior_trials']}"
            if rule
            else "none met the target"
        )
        lines.append(
            f"| {name} | {row['train']['seconds'] / 60:.1f} min | {row['train']['loss']:.4f} | {rule_text} | "
            f"{row['balanced_accuracy']:.3f} [{low:.3f}, {high:.3f}] | {row['ece']:.3f} | "
            f"{row['agreement_exhaustive']:.3f} | {row['exhaustive']['balanced_accuracy']:.3f} | "
            f"{row['blast_auroc']:.3f} |"
        )
    lines += [
        "",
        "| denoiser | path | evals/cell normal (p95) | evals/cell blasts (p95) | blasts / normal | cells/s normal | "
        "cells/s blasts | blasts routed anomaly |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        exhaustive = row["exhaustive"]
        lines.append(
            f"| {name} | exhaustive, {args['trials']} trials | {exhaustive['evals_mean']:.0f} | | | "
            f"{exhaustive['cells_per_second']:.1f} | | |"
        )
        for path in ("tuned", "tuned + exit"):
            n, b = row[f"{path} (normal)"], row[f"{path} (blasts)"]
            lines.append(
                f"| {name} | {path} | {n['evals_mean']:.1f} ({n['evals_p95']:.0f}) | {b['evals_mean']:.1f} "
                f"({b['evals_p95']:.0f}) | {b['evals_mean'] / n['evals_mean']:.2f}x | {n['cells_per_second']:.1f} | "
                f"{b['cells_per_second']:.1f} | {b['routed_anomaly']:.2f} |"
            )
    low, high = report["difference_interval"]
    lines += [
        "",
        f"Heads minus embedding, balanced accuracy of the tuned rule (paired bootstrap, 95 %): [{low:+.3f}, "
        f"{high:+.3f}]; the two agree on {report['agreement']:.3f} of the test cells. Route exits change the route "
        "of this share of cells (normal and blasts): "
        + "; ".join(f"{name} {1 - row['exit_route_agreement']:.3f}" for name, row in rows.items())
        + ".",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

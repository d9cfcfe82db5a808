"""Late class conditioning: the class enters only the last up-block, the rest of the denoiser runs once per trial.

The diffusion classifier asks its denoiser for the noise under each class in play on every trial: at PBC's eight
classes and the null class, up to nine full passes. A denoiser with one output head per class (one pass for every
class) lost 23 points of balanced accuracy (docs/benchmarks.md, "One pass, every class"): the class reached only
the last convolution. This prototype gives the class a whole block: the base UNet unchanged (class embedding and
all), but its timestep embedding carries the class only into the last up-block (the full-resolution one, with
the output layers). Everything before it sees no class, so scoring runs it once per trial and the last block
once per class; training is the library's (`train.diffusion_loss`, classifier-free dropout included).

Both denoisers are trained here on the same cells (the PBC training split of `--base`), with the same loop
(`models.train.fit`), steps, batch, precision, seed and initial weights, then made ready as `cytoloop train`
makes a model (`workflows.tune_model_scoring`: w(t), the elimination rule, the temperature) and scored side by
side on the same cells: exhaustive (`--trials` trials on the first `--exhaustive-cells` test cells), the tuned
rule on `--cells` held-out PBC test cells and `--anomaly-cells` ALL-IDB2 blasts, and the tuned rule with route
exits. The late-conditioned denoiser runs through the library's scoring loop unchanged: it recognises the inputs
of one trial (consecutive, identical) and runs its class-blind part once for them, counting both parts' inputs.
Nothing of it is in the library: it goes there only if it keeps the classifier's accuracy (issue 17).

    python benchmarks/late_conditioning.py --data ../shared/data/manifest.csv --steps 2500 --out runs/late-conditioning
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
from types import SimpleNamespace

import numpy as np
import torch
from _cache import cached, fingerprint
from _docs import DOCS, environment_prefix, replace_section
from fast_paths import cell_groups, routes

from cytoloop.config import AugmentConfig, RoutingConfig, ScoringConfig, TrainConfig
from cytoloop.data.preprocess import load_cells
from cytoloop.data.records import class_interleaved_subset
from cytoloop.evaluation import metrics
from cytoloop.models.diffusion import DiffusionClassifier
from cytoloop.models.loading import load_model
from cytoloop.models.train import fit
from cytoloop.workflows import held_out, label_indices, tune_model_scoring

TITLE = "Late class conditioning: the class in the last up-block only"
CONDITIONINGS = ("embedding", "late")
GROUPS = ("normal", "blasts")


class LateConditioned(torch.nn.Module):
    """A class-embedding UNet2DModel whose class reaches only its last up-block and output layers.

    Called as the UNet is (`network(x_t, t, class_labels=c).sample`). Inputs that repeat the one before them
    (same x_t and t: the classes of one scoring trial, packed together) share one run of the class-blind part;
    `trunk_inputs` and `block_inputs` count what each part ran."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet
        self.trunk_inputs = 0
        self.block_inputs = 0

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor) -> SimpleNamespace:
        u = self.unet
        flat = x_t.reshape(len(x_t), -1)
        new = torch.ones(len(x_t), dtype=torch.bool, device=x_t.device)
        new[1:] = (flat[1:] != flat[:-1]).any(dim=1) | (t[1:] != t[:-1])
        first = torch.nonzero(new).flatten()
        group = torch.cumsum(new.long(), 0) - 1
        self.trunk_inputs += len(first)
        self.block_inputs += len(x_t)
        t_emb = u.time_embedding(u.time_proj(t[first]).to(dtype=u.dtype))
        sample = u.conv_in(x_t[first])
        skips: tuple = (sample,)
        for block in u.down_blocks:
            sample, res = block(hidden_states=sample, temb=t_emb)
            skips += res
        sample = u.mid_block(sample, t_emb)
        for block in u.up_blocks[:-1]:
            n = len(block.resnets)
            sample, skips = block(sample, skips[-n:], t_emb), skips[:-n]
        emb = t_emb[group] + u.class_embedding(class_labels).to(dtype=u.dtype)
        sample = u.up_blocks[-1](sample[group], tuple(s[group] for s in skips), emb)
        return SimpleNamespace(sample=u.conv_out(u.conv_act(u.conv_norm_out(sample))))


def trained(conditioning: str, base, training, args) -> DiffusionClassifier:
    """A diffusion model of `conditioning` trained on the training cells; the weights are cached under --out (and
    the run resumes from its checkpoint if stopped)."""
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
    model = DiffusionClassifier(base.classes, base.data_config, base.model_config, scoring)
    if conditioning == "late":
        model.use_trained(LateConditioned(model.unet))
    config = TrainConfig(steps=args.steps, batch_size=32, precision="bf16", checkpoint_every=500, seed=args.seed)
    labels = label_indices(training.records, base.classes)
    inputs = (conditioning, base.data_config, base.model_config, config, AugmentConfig(), training.images, labels)
    # the checkpoints of a run on other inputs must not be resumed: a folder per inputs
    checkpoints = args.out / f"{conditioning}-{fingerprint(*inputs)[:12]}"

    def run():
        network, loss = model.objective(config)
        began = time.perf_counter()
        ema, result = fit(network, loss, training.images, labels, config, AugmentConfig(), checkpoints)
        return ema.state_dict(), time.perf_counter() - began, result.history[-1]["loss"]

    state, seconds, loss = cached(args.out / f"{conditioning}-{args.steps}.pkl", run, inputs=inputs)
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
    parser.add_argument("--out", type=Path, default=Path("runs/late-conditioning"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--write-docs", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    load = [os.getloadavg()[0]]

    base = load_model(args.base)
    normal, blasts, labelled = cell_groups(args.data, args.base, base, args.cells, args.anomaly_cells)
    train_records = held_out(labelled, args.base, "train")[0]
    training = cached(
        args.out / "train-cells.pkl",
        lambda: load_cells(train_records, base.data_config),
        inputs=(train_records, base.data_config),
    )
    val_records = class_interleaved_subset(held_out(labelled, args.base, "val")[0], args.temperature_cells)
    val = cached(
        args.out / f"val-{args.temperature_cells}.pkl",
        lambda: load_cells(val_records, base.data_config),
        inputs=(val_records, base.data_config),
    )
    val_labels = label_indices(val.records, base.classes)
    labels = label_indices(normal.records, base.classes)
    n_classes, n_exh = len(base.classes), min(args.exhaustive_cells, len(labels))

    report: dict = {
        "date": "",
        "rows": {},
        "args": {k: str(v) for k, v in vars(args).items()},
        "command": environment_prefix() + "python " + " ".join(sys.argv),  # every flag and CYTOLOOP_* it was given
    }
    for conditioning in CONDITIONINGS:
        model = trained(conditioning, base, training, args)
        row = cached(
            args.out / f"{conditioning}-{args.steps}-measured.pkl",
            lambda m=model: measure(m, val, val_labels, normal.images, labels, blasts.images, args),
            inputs=(
                model.unet.state_dict(),
                model.scoring_config,
                val.images,
                normal.images,
                blasts.images,
                [args.trials, args.exhaustive_cells, args.routed_share, args.threads],
            ),
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
        strata=labels,
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
    (args.out / "late_conditioning.json").write_text(json.dumps(report, indent=1))
    text = render(report)
    print(text)
    if args.write_docs:
        replace_section(DOCS, "late-conditioning", text, title=TITLE)


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
            trunk = getattr(model.unet, "trunk_inputs", 0)
            began = time.perf_counter()
            predictions = model.predict(images, routing=routed)
            seconds = time.perf_counter() - began
            trunk = getattr(model.unet, "trunk_inputs", 0) - trunk
            runs[(path, group)] = predictions
            row[f"{path} ({group})"] = {
                "evals_mean": float(predictions.evals.mean()),
                "evals_p95": float(np.percentile(predictions.evals, 95)),
                "cells_per_second": len(images) / seconds,
                "routed_anomaly": float(np.mean(routes(predictions, routing) == "anomaly")),
                "trunk_per_cell": trunk / len(images) if trunk else None,
            }
    tuned = runs[("tuned", "normal")]
    row["labels"] = tuned.labels.tolist()
    row["balanced_accuracy"] = metrics.balanced_accuracy(labels, tuned.labels, n_classes)
    row["interval"] = metrics.bootstrap_interval(
        lambda i: metrics.balanced_accuracy(labels[i], tuned.labels[i], n_classes), len(labels), strata=labels
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
    command = report.get("command") or (  # a report from before the command was saved: its main flags
        f"python benchmarks/late_conditioning.py --data {args['data']} --steps {args['steps']} "
        f"--cells {args['cells']} --anomaly-cells {args['anomaly_cells']} --trials {args['trials']} "
        f"--out {args['out']}"
    )
    lines = [
        f"Command: `{command}`  ",
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
        "Evaluations count a denoiser's inputs per class (the late-conditioned one: its last block's); trunk passes "
        "are the late-conditioned denoiser's class-blind runs (one per trial).",
        "",
        "| denoiser | path | evals/cell normal (p95) | evals/cell blasts (p95) | blasts / normal | trunk passes/cell "
        "normal, blasts | cells/s normal | cells/s blasts | blasts routed anomaly |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        exhaustive = row["exhaustive"]
        lines.append(
            f"| {name} | exhaustive, {args['trials']} trials | {exhaustive['evals_mean']:.0f} | | | "
            f"| {exhaustive['cells_per_second']:.1f} | | |"
        )
        for path in ("tuned", "tuned + exit"):
            n, b = row[f"{path} (normal)"], row[f"{path} (blasts)"]
            lines.append(
                f"| {name} | {path} | {n['evals_mean']:.1f} ({n['evals_p95']:.0f}) | {b['evals_mean']:.1f} "
                f"({b['evals_p95']:.0f}) | {b['evals_mean'] / n['evals_mean']:.2f}x | {trunk(n)}, {trunk(b)} | "
                f"{n['cells_per_second']:.1f} | "
                f"{b['cells_per_second']:.1f} | {b['routed_anomaly']:.2f} |"
            )
    low, high = report["difference_interval"]
    lines += [
        "",
        f"Late minus embedding, balanced accuracy of the tuned rule (paired bootstrap, 95 %): [{low:+.3f}, "
        f"{high:+.3f}]; the two agree on {report['agreement']:.3f} of the test cells. Route exits change the route "
        "of this share of cells (normal and blasts): "
        + "; ".join(f"{name} {1 - row['exit_route_agreement']:.3f}" for name, row in rows.items())
        + ".",
    ]
    return "\n".join(lines) + "\n"


def trunk(group: dict) -> str:
    return "-" if group.get("trunk_per_cell") is None else f"{group['trunk_per_cell']:.1f}"


if __name__ == "__main__":
    main()

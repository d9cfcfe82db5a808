"""Speed benchmark: how fast the diffusion classifier decides, and what the fast paths give up, on real cells.

On one trained diffusion model and the same held-out test cells, side by side in one process:
  exhaustive        a fixed number of trials (default 200), every class, no elimination: the reference decision;
  adaptive          the original elimination rule (20 trials, then a t-test every 5, null class every trial),
                    one cell at a time;
  tuned             the elimination rule tuned on validation cells (and, with --tuning-unlabeled, unlabeled cells)
                    to agree with exhaustive scoring (`calibration.tune_scoring`), one cell at a time, then batched
                    across cells, in fp32 and bf16;
  cascade           a student CNN distilled from the tuned teacher, deferring unsure cells to the teacher;
  baseline          the discriminative CNN.
For each: cells/s, denoiser evaluations per cell (mean, p95), balanced accuracy, ECE and agreement with the
exhaustive decision. Also: how many trials cells really need, the cascade's accuracy/speed curve, and the achieved
FLOP/s of a denoiser batch against this machine's measured matmul peak. Tables go to docs/benchmarks.md.

    python benchmarks/speed.py --data ../shared/data/cells --model runs/quality/diffusion \
        --baseline runs/quality/baseline --out runs/speed --threads 1

Exhaustive scoring is the expensive part (trials x classes evaluations per cell, on the validation cells for tuning
and on the test cells for the reference): `--cells` takes a fixed class-interleaved subset of the test cells and
`--exhaustive-precision bf16` halves its cost. Results are cached under --out (exhaustive logs, each row), each
with a digest of the model folder, the cells and the settings it was made from (`_cache.py`), so a rerun only
computes what changed; delete --out to start afresh.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from _cache import cached, fingerprint
from _docs import DOCS, replace_section

from cytoloop.config import CascadeConfig, load_settings
from cytoloop.data.preprocess import load_cells
from cytoloop.data.records import class_interleaved_subset, load_records, select
from cytoloop.evaluation import metrics
from cytoloop.models.base import Predictions
from cytoloop.models.cascade import CascadeClassifier, distill, threshold_for_fraction
from cytoloop.models.loading import load_model
from cytoloop.scoring.calibration import evaluations_needed, fit_temperature, trials_needed, tune_scoring
from cytoloop.scoring.trials import GPU_LOOKAHEAD, replay, summarise_log
from cytoloop.workflows import SPLIT_FILE, UNLABELED, held_out, label_indices, outside_split

CLASSES = ["neutrophil", "lymphocyte", "monocyte", "eosinophil"]
SOURCE_DOMAINS = ["jtsc", "bccd"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--model", type=Path, default=Path("runs/quality/diffusion"))
    parser.add_argument("--baseline", type=Path, default=Path("runs/quality/baseline"))
    parser.add_argument("--out", type=Path, default=Path("runs/speed"))
    parser.add_argument(
        "--cells", type=int, default=0, help="test cells to use (0: all; else a fixed stratified subset)"
    )
    parser.add_argument("--trials", type=int, default=200, help="exhaustive trials (reference and tuning)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument(
        "--fast-precision",
        default="bf16",
        choices=["fp32", "bf16", "fp16"],
        help="precision of the fast rows (tuned batched low-precision, cascade teacher)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="denoiser batch for every row (default: scoring's, 64 on a CPU, 1024 on a GPU)",
    )
    parser.add_argument("--student-steps", type=int, default=1500)
    parser.add_argument(
        "--defer-fraction",
        type=float,
        default=None,
        help="cascade threshold deferring this fraction of validation cells (default: cascade.threshold)",
    )
    parser.add_argument("--distill-cells", type=int, default=0, help="labelled train cells to distil on (0: all)")
    parser.add_argument(
        "--unlabeled-domains",
        default="cellavision",
        help="domains whose cells the student also distils from, unlabeled ('' for none)",
    )
    parser.add_argument(
        "--tuning-unlabeled",
        type=int,
        default=0,
        help="also tune the rule on this many cells of --unlabeled-domains, outside the model's "
        "split (labels unused), as `cytoloop tune --unlabeled-domains` does (0: validation only)",
    )
    parser.add_argument(
        "--unbatched-cells",
        type=int,
        default=16,
        help="score this many test cells one at a time too (0: skip those slow rows)",
    )
    parser.add_argument(
        "--original-cells",
        type=int,
        default=0,
        help="score only this many test cells with the (slow) original rule, batched (0: all)",
    )
    parser.add_argument("--exhaustive-precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--compile", action="store_true", help="also time a torch.compile'd denoiser (slow to compile)")
    parser.add_argument("--section", default=None, help="docs section name (default: speed, or speed-gpu on cuda)")
    parser.add_argument("--write-docs", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    load_before = os.getloadavg()[0]

    teacher = load_model(args.model)
    baseline = load_model(args.baseline)
    records = select(load_records(args.data), SOURCE_DOMAINS, CLASSES)
    val = load_cells(held_out(records, args.model, part="val")[0], teacher.data_config)
    test_records = class_interleaved_subset(held_out(records, args.model, part="test")[0], args.cells or None)
    test = load_cells(test_records, teacher.data_config)
    val_labels = label_indices(val.records, CLASSES)
    labels = label_indices(test.records, CLASSES)
    weights = (
        np.ones(teacher.scoring_config.timestep_bins)
        if teacher.timestep_weights is None
        else np.asarray(teacher.timestep_weights)
    )
    # The fast rules score the null class (for the anomaly score) on the first trial only; tuning counts that.
    base = teacher.scoring_config.model_copy(
        update={"device": args.device, "precision": "fp32", "null_trials": 1, "batch_size": args.batch_size}
    )
    exhaustive = base.model_copy(
        update={
            "min_trials": args.trials,
            "max_trials": args.trials,
            "score_null_class": False,
            "precision": args.exhaustive_precision,
        }
    )
    print(f"{len(test.records)} test cells, {len(val.records)} validation cells", flush=True)

    # Tuning: exhaustive trials on validation cells, replayed under every candidate rule (cached: the slow part).
    val_logs = cached(
        args.out / f"val_exhaustive_{args.exhaustive_precision}.pkl",
        lambda: teacher.score(val.images, exhaustive).logs,
        inputs=(args.model, val.images, exhaustive),
    )
    tuning_logs = list(val_logs)
    if args.tuning_unlabeled:
        outside = outside_split(select(load_records(args.data), args.unlabeled_domains.split(",")), args.model)
        unlabeled = class_interleaved_subset(outside, args.tuning_unlabeled)
        extra = load_cells(unlabeled, teacher.data_config)
        tuning_logs += cached(
            args.out / f"unlabeled_{len(extra.records)}_exhaustive_{args.exhaustive_precision}.pkl",
            lambda: teacher.score(extra.images, exhaustive).logs,
            inputs=(args.model, extra.images, exhaustive),
        )
    tuned, candidates = tune_scoring(tuning_logs, weights, base, base.tuning_agreement)
    val_needed = [trials_needed(log, weights) for log in val_logs]
    val_evals_needed = [evaluations_needed(log, weights, tuned.null_trials) for log in val_logs]
    temperatures = {
        "exhaustive": fit_temperature(-np.stack([summarise_log(g, weights)[0] for g in val_logs]), val_labels),
        "tuned": fit_temperature(
            -np.stack([summarise_log(replay(g, tuned, weights)[0], weights)[0] for g in val_logs]), val_labels
        ),
        "adaptive": teacher.temperature,
    }
    print(f"tuned rule: min_trials {tuned.min_trials}, p {tuned.elimination_p:g}", flush=True)

    reference = cached(
        args.out / f"test_exhaustive_{len(test.records)}_{args.exhaustive_precision}_"
        f"{torch.get_num_threads()}threads.pkl",
        lambda: timed_score(teacher, test.images, exhaustive),
        inputs=(args.model, test.images, exhaustive),
    )
    exhaustive_predictions = teacher.predictions_from_scores(reference[0], temperatures["exhaustive"])
    agreed = exhaustive_predictions.labels
    rows = [
        row(
            f"exhaustive, {args.trials} trials, batched, {args.exhaustive_precision}",
            exhaustive_predictions,
            reference[1],
            labels,
            agreed,
        )
    ]
    test_needed = [trials_needed(log, weights) for log in reference[0].logs]
    test_evals_needed = [evaluations_needed(log, weights, tuned.null_trials) for log in reference[0].logs]
    timed: dict[str, tuple[Predictions, float]] = {}

    def run_diffusion(name: str, config, temperature: float, cells: int = 0, one_at_a_time: bool = False) -> None:
        """Score the test cells (or the first `cells` of them), batched or one cell at a time."""
        images = test.images[:cells] if cells else test.images

        def measure() -> tuple[Predictions, float]:
            start = time.perf_counter()
            if one_at_a_time:
                predictions = Predictions.concat(
                    [
                        teacher.predictions_from_scores(teacher.score(images[i : i + 1], config), temperature)
                        for i in range(len(images))
                    ]
                )
            else:
                predictions = teacher.predictions_from_scores(teacher.score(images, config), temperature)
            return predictions, time.perf_counter() - start

        key = hashlib.sha256(
            f"{name}{len(images)}{config.model_dump_json()}{temperature}{torch.get_num_threads()}".encode()
        ).hexdigest()[:16]  # timings depend on the thread count
        predictions, seconds = cached(args.out / f"row_{key}.pkl", measure, inputs=(args.model, images))
        if len(images) < len(test.images):
            name += f" (first {len(images)} cells)"
        timed[name] = (predictions, seconds)
        n = len(predictions)
        rows.append(row(name, predictions, seconds, labels[:n], agreed[:n]))
        print(rows[-1], flush=True)

    original = base.model_copy(update={"score_null_class": True, "null_trials": None})
    if args.unbatched_cells:
        run_diffusion(
            "adaptive, original rule, one cell at a time, fp32",
            original,
            temperatures["adaptive"],
            args.unbatched_cells,
            one_at_a_time=True,
        )
        run_diffusion(
            "adaptive, tuned rule, one cell at a time, fp32",
            tuned,
            temperatures["tuned"],
            args.unbatched_cells,
            one_at_a_time=True,
        )
        run_diffusion("adaptive, tuned rule, batched, fp32", tuned, temperatures["tuned"], args.unbatched_cells)
    run_diffusion("adaptive, original rule, batched, fp32", original, temperatures["adaptive"], args.original_cells)
    run_diffusion("adaptive, tuned rule, batched, fp32", tuned, temperatures["tuned"])
    fast = tuned.model_copy(update={"precision": args.fast_precision})
    fast_name = f"adaptive, tuned rule, batched, {args.fast_precision}"
    if args.fast_precision != "fp32":  # else it is the row above, which a second run would list twice
        run_diffusion(fast_name, fast, temperatures["tuned"])
    fast_cl = fast.model_copy(update={"channels_last": True})
    run_diffusion(fast_name + ", channels-last", fast_cl, temperatures["tuned"])
    if args.device == "cuda":  # on a GPU, batched scoring runs ahead of its tests by default: what that buys
        run_diffusion(fast_name + ", no lookahead", fast.model_copy(update={"lookahead": 1}), temperatures["tuned"])
    if args.compile:  # the row's time includes compiling (from inductor's on-disk cache if an earlier run filled it)
        run_diffusion(fast_name + ", torch.compile", fast.model_copy(update={"compile": True}), temperatures["tuned"])

    # The cascade: distil a student from the fastest tuned row as measured above (bf16 channels-last on this CPU,
    # fp32 on the H100), then run it as `cytoloop evaluate` would.
    layouts = {"adaptive, tuned rule, batched, fp32": tuned, fast_name: fast, fast_name + ", channels-last": fast_cl}
    teacher_row = min(layouts, key=lambda name: timed[name][1])
    teacher.scoring_config, teacher.temperature = layouts[teacher_row], temperatures["tuned"]
    cascade, distill_report = build_cascade(teacher, records, args, val, val_labels)
    start = time.perf_counter()
    cascade_predictions = cascade.predict(test.images)
    seconds = time.perf_counter() - start
    rows.append(
        row(
            f"cascade (threshold {cascade.config.threshold:.2f}, deferred "
            f"{cascade_predictions.extra['deferred'].mean():.0%})",
            cascade_predictions,
            seconds,
            labels,
            agreed,
        )
    )
    start = time.perf_counter()
    baseline_predictions = baseline.predict(test.images)
    rows.append(row("baseline CNN", baseline_predictions, time.perf_counter() - start, labels, agreed))
    for r in rows[-2:]:
        print(r, flush=True)

    curve = cascade_curve(cascade, test.images, labels, timed[teacher_row], agreed)
    flops = denoiser_flops(teacher, args)
    report = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "torch_threads": torch.get_num_threads(),  # what the logs' file names hold (`--threads` may be None)
        "n_test": len(test.records),
        "n_val": len(val.records),
        "n_tuning_unlabeled": len(tuning_logs) - len(val_logs),
        "tuned": {
            "min_trials": tuned.min_trials,
            "check_every": tuned.check_every,
            "elimination_p": tuned.elimination_p,
            "null_trials": tuned.null_trials,
            "variance_prior": tuned.variance_prior,
            "variance_prior_trials": tuned.variance_prior_trials if tuned.variance_prior is not None else 0,
        },
        "tuning_candidates": candidates,
        "tuning_orders": base.tuning_orders,
        "temperatures": temperatures,
        "trials_needed": {
            "val_mean": float(np.mean(val_needed)),
            "val_p95": float(np.percentile(val_needed, 95)),
            "test_mean": float(np.mean(test_needed)),
            "test_p95": float(np.percentile(test_needed, 95)),
            "evals_val_mean": float(np.mean(val_evals_needed)),
            "evals_test_mean": float(np.mean(test_evals_needed)),
        },
        "rows": rows,
        "cascade_teacher": teacher_row,
        "cascade_curve": curve,
        "distillation": distill_report,
        "flops": flops,
        "minutes": (time.perf_counter() - began) / 60,
        "load_average": (load_before + os.getloadavg()[0]) / 2,
    }
    (args.out / "speed.json").write_text(json.dumps(report, indent=1, default=float))
    table = render(report, args, len(teacher.classes))
    print(table)
    if args.write_docs:
        section = args.section or ("speed-gpu" if args.device == "cuda" else "speed")
        title = "Speed on a GPU" if args.device == "cuda" else "Speed"
        replace_section(DOCS, section, table, title=title)


def timed_score(model, images: np.ndarray, config) -> tuple:
    start = time.perf_counter()
    result = model.score(images, config)
    return result, time.perf_counter() - start


def row(name: str, predictions: Predictions, seconds: float, labels: np.ndarray, reference: np.ndarray) -> dict:
    return {
        "name": name,
        "cells_per_second": len(labels) / seconds,
        "evals_mean": float(predictions.evals.mean()),
        "evals_p95": float(np.percentile(predictions.evals, 95)),
        "balanced_accuracy": metrics.balanced_accuracy(labels, predictions.labels, len(CLASSES)),
        "ece": metrics.expected_calibration_error(predictions.probs, labels, n_bins=15),
        "agreement": float(np.mean(predictions.labels == reference)),
        "seconds": seconds,
    }


def build_cascade(teacher, records, args, val, val_labels) -> tuple[CascadeClassifier, dict]:
    """Distil a student from the teacher's train cells (and unlabeled cells), as `cytoloop distill` does; the one an
    earlier run distilled under --out from the same teacher, cells and settings is used again."""
    directory = args.out / "cascade"
    inputs = fingerprint(
        args.model, teacher.scoring_config, args.data, args.student_steps, args.distill_cells, args.unlabeled_domains
    )
    kept = directory / "inputs.sha256"
    if (directory / "model.json").is_file() and kept.is_file():
        if kept.read_text() == inputs:  # else the teacher or the cells changed: distil again
            cascade = load_model(directory)
            report = json.loads((directory / "distill.json").read_text())
            # the threshold is this run's: chosen on the validation cells as distillation would
            confidence = cascade.student.predict(val.images).confidence
            threshold = (
                CascadeConfig().threshold
                if args.defer_fraction is None
                else threshold_for_fraction(confidence, args.defer_fraction)
            )
            cascade.config = cascade.config.model_copy(
                update={"threshold": threshold, "defer_fraction": args.defer_fraction}
            )
            report.update(threshold=threshold, val_deferred_fraction=float(np.mean(confidence < threshold)))
            return cascade, report
    settings = load_settings(overrides={"train": {"steps": args.student_steps}})
    train = load_cells(
        class_interleaved_subset(held_out(records, args.model, part="train")[0], args.distill_cells or None),
        teacher.data_config,
    )
    images, labels = train.images, label_indices(train.records, CLASSES)
    if args.unlabeled_domains:
        # never a cell of the model's split: a domain it was split on would give the student its test cells
        unlabeled = outside_split(select(load_records(args.data), args.unlabeled_domains.split(",")), args.model)
        extra = load_cells(unlabeled, teacher.data_config)
        images = np.concatenate([images, extra.images])
        labels = np.concatenate([labels, np.full(len(extra.images), UNLABELED)])
    start = time.perf_counter()
    teacher_probs = teacher.predict(images).probs
    teacher_seconds = time.perf_counter() - start
    config = CascadeConfig(defer_fraction=args.defer_fraction) if args.defer_fraction is not None else CascadeConfig()
    cascade, report = distill(
        teacher,
        images,
        labels,
        val.images,
        val_labels,
        config,
        settings.train,
        settings.augment,
        settings.baseline,
        teacher_probs=teacher_probs,
    )
    report["teacher_seconds"] = teacher_seconds
    cascade.save(directory)
    (directory / "distill.json").write_text(json.dumps(report, indent=1))
    (directory / SPLIT_FILE).write_text((args.model / SPLIT_FILE).read_text())  # evaluate excludes the same cells
    (directory / "inputs.sha256").write_text(inputs)
    return cascade, report


def cascade_curve(cascade, images, labels, teacher_run, reference) -> list[dict]:
    """Deferred fraction vs balanced accuracy and cells/s over thresholds. The teacher's answers and its time per
    cell come from its batched run on all test cells (a cell gets the same answer alone or in a batch); time per
    deferred cell is its share of that run's time by evaluations, so cells/s here is an estimate from measured
    rates (the configured threshold's row in the main table is measured end to end)."""
    teacher_predictions, teacher_seconds = teacher_run
    start = time.perf_counter()
    student = cascade.student.predict(images)
    student_seconds = time.perf_counter() - start
    seconds_per_eval = teacher_seconds / teacher_predictions.evals.sum()
    curve = []
    for threshold in (0.0, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 0.99, 1.01):
        deferred = student.confidence < threshold
        probs = np.where(deferred[:, None], teacher_predictions.probs, student.probs)
        seconds = student_seconds + teacher_predictions.evals[deferred].sum() * seconds_per_eval
        predicted = probs.argmax(axis=1)
        curve.append(
            {
                "threshold": threshold,
                "deferred": float(deferred.mean()),
                "balanced_accuracy": metrics.balanced_accuracy(labels, predicted, len(CLASSES)),
                "agreement": float(np.mean(predicted == reference)),
                "cells_per_second": len(labels) / seconds,
            }
        )
    return curve


def denoiser_flops(teacher, args) -> dict:
    """FLOPs of one denoiser evaluation (counted by torch), the time of a scoring-sized batch in each precision,
    and the machine's measured matmul peak, both in GFLOP/s."""
    from torch.utils.flop_counter import FlopCounterMode

    device = torch.device(args.device)
    unet = teacher.unet.to(device=device, memory_format=torch.contiguous_format).eval()
    size = teacher.data_config.image_size
    batch = args.batch_size or (1024 if device.type == "cuda" else 64)  # what scoring uses
    x = torch.randn(batch, 3, size, size, device=device)
    t = torch.randint(50, 700, (batch,), device=device)
    c = torch.randint(0, len(teacher.classes), (batch,), device=device)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        unet(x[:1], t[:1], class_labels=c[:1])
    per_eval = counter.get_total_flops()
    result = {"flops_per_eval": per_eval, "batch": batch}
    dtypes = {"fp32": None, "bf16": torch.bfloat16} | ({"fp16": torch.float16} if device.type == "cuda" else {})
    compiled = torch.compile(unet) if args.compile else None
    for name, dtype in dtypes.items():

        def forward(network=unet, dtype=dtype):
            with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                network(x, t, class_labels=c)

        seconds = best_time(forward, device)
        result[f"denoiser_{name}_gflops"] = batch * per_eval / seconds / 1e9
        result[f"denoiser_{name}_ms_per_eval"] = seconds / batch * 1e3
        n = 4096 if device.type == "cuda" else 2048
        a = torch.randn(n, n, device=device, dtype=dtype or torch.float32)
        result[f"matmul_{name}_gflops"] = 2 * n**3 / best_time(lambda a=a: a @ a, device) / 1e9
        if compiled is not None:
            start = time.perf_counter()
            forward(compiled)  # the first call compiles
            result[f"compile_{name}_seconds"] = time.perf_counter() - start
            result[f"compiled_{name}_ms_per_eval"] = best_time(lambda: forward(compiled), device) / batch * 1e3
    return result


def best_time(fn, device: torch.device, repeats: int = 2) -> float:
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times)


def pareto(candidates: list[dict]) -> list[dict]:
    """The candidates no other one beats on both agreement and mean evaluations, cheapest first."""
    front = [
        c
        for c in candidates
        if not any(o["agreement"] >= c["agreement"] and o["evals_mean"] < c["evals_mean"] for o in candidates)
    ]
    return sorted(front, key=lambda c: c["evals_mean"])


def render(report: dict, args: argparse.Namespace, n_classes: int) -> str:
    device = (
        torch.cuda.get_device_name()
        if args.device == "cuda"
        else f"{platform.machine()} CPU, {torch.get_num_threads()} torch threads"
    )
    command = " ".join(["python", "benchmarks/speed.py"] + sys.argv[1:])
    tuned, needed, flops = report["tuned"], report["trials_needed"], report["flops"]
    lines = [
        f"Command: `{command}`  ",
        f"Machine: {device}; torch {torch.__version__}. Date: "
        f"{datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}. Model: `{args.model}` "
        f"({n_classes} classes, {report['n_test']} held-out test cells, {report['n_val']} validation cells for "
        f"tuning and temperatures). Total run {report['minutes']:.0f} min; 1-minute load average "
        f"{report['load_average']:.1f} (mean of start and end) on {os.cpu_count()} cores: when it is above the "
        "core count the machine was shared, cells/s are pessimistic and rows (run one after another) saw "
        "different loads; evaluation counts and agreement do not depend on load.",
        "",
        f"Tuned rule (on {report['n_val']} validation cells"
        + (
            f" and {report['n_tuning_unlabeled']} unlabeled {args.unlabeled_domains} cells outside the split"
            if report["n_tuning_unlabeled"]
            else ""
        )
        + f", replaying {args.trials}-trial exhaustive logs in {report['tuning_orders']} trial orders each; target "
        "agreement 0.99): "
        f"min_trials {tuned['min_trials']}, a t-test after every trial (check_every {tuned['check_every']}), "
        f"elimination_p {tuned['elimination_p']:g}, "
        + (
            f"variance prior {tuned['variance_prior']:.3g} worth {tuned['variance_prior_trials']:g} trials, "
            if tuned.get("variance_prior_trials")
            else "no variance prior, "
        )
        + f"null class on the first {tuned['null_trials']} trial(s) only. "
        f"Trials a cell really needs (after which its running decision never changes): mean "
        f"{needed['test_mean']:.1f}, p95 {needed['test_p95']:.0f} on test cells (validation: {needed['val_mean']:.1f}, "
        f"{needed['val_p95']:.0f}); one trial costs one evaluation per class still in play. Evaluations a cell "
        "really needs (each class in play until its running comparison with the decided class is settled, "
        f"the null class once): mean {needed['evals_test_mean']:.1f} on test cells, {needed['evals_val_mean']:.1f} on "
        "validation cells: what a rule that knew when to stop would spend.",
        "",
        "Agreement vs cost of the candidate rules on the tuning cells (replayed; the Pareto front): "
        + ", ".join(
            f"{c['agreement']:.3f} at {c['evals_mean']:.1f} evals (min_trials {c['min_trials']}, "
            f"p {c['elimination_p']:g}, prior {c.get('variance_prior_trials', 0):g})"
            for c in pareto(report["tuning_candidates"])
        )
        + ".",
        "",
        *(
            [
                f"Batched rows run up to {GPU_LOOKAHEAD} test intervals ahead when "
                "the undecided cells fill less than a batch (`scoring.lookahead`, on by default on a GPU): the same "
                "decisions, more evaluations (those run past a decision are counted), fewer and fuller batches; the "
                "'no lookahead' row runs one interval at a time.",
                "",
            ]
            if args.device == "cuda"
            else []
        ),
        "| method | cells/s | denoiser evals/cell (mean) | p95 | balanced accuracy | ECE | agreement with exhaustive |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['name']} | {r['cells_per_second']:.2f} | {r['evals_mean']:.1f} | {r['evals_p95']:.0f} | "
            f"{r['balanced_accuracy']:.3f} | {r['ece']:.3f} | {r['agreement']:.3f} |"
        )
    lines += [
        "",
        "Cascade accuracy/speed curve (student threshold swept on the same test cells; the teacher is the fastest "
        f"tuned row above, '{report['cascade_teacher']}'; cells/s estimated from the measured student time and the "
        "teacher's measured time per evaluation):",
        "",
        "| threshold | deferred | balanced accuracy | agreement with exhaustive | cells/s |",
        "|---|---|---|---|---|",
    ]
    for c in report["cascade_curve"]:
        lines.append(
            f"| {c['threshold']:.2f} | {c['deferred']:.0%} | {c['balanced_accuracy']:.3f} | "
            f"{c['agreement']:.3f} | {c['cells_per_second']:.1f} |"
        )
    lines += [
        "",
        f"Denoiser batch ({flops['batch']} inputs, {flops['flops_per_eval'] / 1e6:.1f} MFLOP per evaluation, counted "
        "by torch): "
        + "; ".join(
            f"{p}: {flops[f'denoiser_{p}_ms_per_eval']:.2f} ms/eval = {flops[f'denoiser_{p}_gflops']:.1f} "
            f"GFLOP/s, {flops[f'denoiser_{p}_gflops'] / flops[f'matmul_{p}_gflops']:.0%} of the measured "
            f"{p} matmul peak ({flops[f'matmul_{p}_gflops']:.0f} GFLOP/s)"
            for p in ("fp32", "bf16", "fp16")
            if f"matmul_{p}_gflops" in flops
        )
        + ".",
    ]
    if "compile_fp32_seconds" in flops:
        lines.append("")
        lines.append(
            "torch.compile (default mode): "
            + "; ".join(
                f"{p} {flops[f'compiled_{p}_ms_per_eval']:.2f} ms/eval after {flops[f'compile_{p}_seconds']:.0f} s of "
                f"compiling (eager {flops[f'denoiser_{p}_ms_per_eval']:.2f})"
                for p in ("fp32", "bf16", "fp16")
                if f"compile_{p}_seconds" in flops
            )
            + ". Compile times are for this process: inductor caches compiled graphs on disk, so a later process "
            "compiles the same model in seconds. It is the `scoring.compile` setting, off by default."
        )
    lines += [
        "",
        "Using it: `cytoloop tune --model DIR --data ...` tunes a diffusion model's rule on its validation cells and "
        "saves it in the model (the library defaults stay the original rule); `cytoloop distill --teacher DIR "
        "--data ... --out CASCADE` builds the cascade (threshold: `cascade.threshold`, or `--defer-fraction`); "
        "`cytoloop evaluate --model CASCADE ...` evaluates it like any model. Precision, channels-last, device and "
        "threads are `scoring.*` settings saved with the model.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())

"""Route-exit tests replayed on exhaustive trial logs: which test would stop the blasts sooner, routes unchanged?

Issue 17 asks that anomalous cells cost at most twice the evaluations of normal ones while the routes full scoring
gives stay unchanged on >= 99 % of cells; the exits at `scoring.exit_p` give 3.6x on the base model (exit_level.py).
A cell's trials do not depend on which classes are in play (scoring.trials.replay), so a test can be tried on the
logs of exhaustive scoring without the denoiser: each cell is scored once, `--trials` trials of every class and the
null class, and every variant replays what scoring would do under it, trial by trial, from the same logs. The
variants, each with the model's tuned rule and the null class leaving play once the anomaly route is ruled out:
  no exits         the reference route and class
  library          `route_settled` at `exit_p`, what serving runs (checked against real scoring of the first cells)
  every runner-up  also a review exit when each of the k best runners-up (k >= 2) lies within T (logit(line) +
                   log k) of the best: k classes that close keep the top probability under the line, not just one
  trial limit      the tests ask where the mean will be at the trial limit, not where the true mean lies: the
                   estimate's variance shrinks by 1 - n/max_trials (a cell's route is its mean at its last trial)
Then which of the cheap scorer's ranks holds each normal cell's exhaustive winner: how many candidate classes
(scoring.trials, "Candidate classes") would keep it for 99 % of cells.

    python benchmarks/exit_replay.py --data ../shared/data/manifest.csv --model models/base-pbc \
        --scorer runs/reference/cnn-seed0 --out runs/exit-replay --precision bf16 --channels-last
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from _cache import cached
from _docs import DOCS, environment_prefix, replace_section
from fast_paths import anomaly_threshold, cell_groups, routes
from scipy import special

from cytoloop.config import RoutingConfig, ScoringConfig
from cytoloop.models.loading import load_model
from cytoloop.scoring.trials import (
    RouteExits,
    ScoreResult,
    TrialLog,
    decide,
    null_settled,
    route_settled,
    summarise_log,
    wants_null,
)

TITLE = "Route exits replayed: other tests on the same trials"
SECTION = "exit-replay"
CHECKED_CELLS = {"normal": 16, "blasts": 8}  # scored for real too: the replay must match them to the evaluation

Settled = Callable[[np.ndarray, np.ndarray, np.ndarray, ScoringConfig, RouteExits], bool]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="the combined manifest of all labs")
    parser.add_argument("--model", type=Path, default=Path("models/base-pbc"))
    parser.add_argument("--scorer", type=Path, required=True, help="the cheap scorer whose top classes are ranked")
    parser.add_argument("--out", type=Path, default=Path("runs/exit-replay"))
    parser.add_argument("--cells", type=int, default=240, help="normal test cells")
    parser.add_argument("--anomaly-cells", type=int, default=60, help="ALL-IDB2 blasts")
    parser.add_argument("--trials", type=int, default=200, help="exhaustive trials per cell (the replays' limit)")
    parser.add_argument("--routed-share", type=float, default=0.05, help="share of validation cells over it")
    parser.add_argument("--review-below", type=float, default=0.7, help="the review line (routing.review_below)")
    parser.add_argument("--precision", choices=["model", "fp32", "bf16"], default="model")
    parser.add_argument("--channels-last", action="store_true", help="run the denoiser in channels-last layout")
    parser.add_argument("--write-docs", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    runtime: dict = {"channels_last": args.channels_last}
    if args.precision != "model":
        runtime["precision"] = args.precision
    model, scorer = load_model(args.model, ScoringConfig(**runtime)), load_model(args.scorer)
    if scorer.classes != model.classes:
        parser.error(f"--scorer classes {scorer.classes} differ from the model's {model.classes}")
    if model.scoring_config.anomaly_score != "null_ratio" or not model.scoring_config.score_null_class:
        parser.error("the exits replayed here route by the null ratio; the model scores anomalies otherwise")
    precision = model.scoring_config.precision + ("-cl" if model.scoring_config.channels_last else "")
    normal, blasts, labelled = cell_groups(args.data, args.model, model, args.cells, args.anomaly_cells)
    threshold = anomaly_threshold(model, args.model, labelled, args.routed_share, args.out / f"val-{precision}")
    routing = RoutingConfig(
        anomaly_above=threshold, review_below=args.review_below, always_review=[], audit_fraction=0.0
    )
    exits = model.route_exits(routing)
    tuned = model.scoring_config.model_copy(update={"max_trials": args.trials})
    exhaustive = tuned.model_copy(update={"min_trials": args.trials, "null_trials": None})
    weights = np.asarray(model.timestep_weights)
    groups = {"normal": normal.images, "blasts": blasts.images}
    logs = {
        group: cached(
            args.out / f"logs-{args.trials}-{len(images)}-{group}-{precision}.pkl",
            lambda images=images: model.score(images, exhaustive, progress=True).logs,
            inputs=(args.model, images, exhaustive),
        )
        for group, images in groups.items()
    }

    def outcome(replayed: list[TrialLog]) -> tuple[np.ndarray, np.ndarray]:
        """Each replayed cell's class and route, as the model's predictions and routing give them."""
        rows = [summarise_log(log, weights) for log in replayed]
        result = ScoreResult(
            class_error=np.stack([r[0] for r in rows]),
            anomaly_min_error=np.array([r[1] for r in rows]),
            anomaly_null_ratio=np.array([r[2] for r in rows]),
            trials=np.array([len(log.strata) for log in replayed]),
            evals=np.zeros(len(replayed), dtype=int),
            logs=replayed,
            exited=np.zeros(len(replayed), dtype=bool),
        )
        predictions = model.predictions_from_scores(result, config=tuned)
        return predictions.labels, routes(predictions, routing)

    variants: dict[str, Settled | None] = {
        "no exits": None,
        "library": route_settled,
        "every runner-up": every_runner_up(model.temperature),
        "trial limit": at_trial_limit,
    }
    rows, checks = [], {}
    for group, group_logs in logs.items():
        reference_class, reference_route = outcome(
            [replay_exits(log, tuned, weights, None, None)[0] for log in group_logs]
        )
        for name, settled in variants.items():
            replays = [replay_exits(log, tuned, weights, exits if settled else None, settled) for log in group_logs]
            classes, routed = outcome([log for log, _, _ in replays])
            evals = np.array([e for _, e, _ in replays])
            rows.append(
                {
                    "variant": name,
                    "group": group,
                    "cells": len(group_logs),
                    "evals_mean": float(evals.mean()),
                    "evals_p95": float(np.percentile(evals, 95)),
                    "exited": float(np.mean([x for _, _, x in replays])),
                    "same_route": float(np.mean(routed == reference_route)),
                    "same_class": float(np.mean(classes == reference_class)),
                }
            )
            if name == "library":  # the replay is what scoring does: the first cells, scored for real
                n = min(CHECKED_CELLS[group], len(group_logs))
                real = model.score(groups[group][:n], tuned, exits=exits)
                checks[group] = {
                    "cells": n,
                    "same_evals": int(np.sum(real.evals == evals[:n])),
                    "same_exit": int(np.sum(real.exited == np.array([x for _, _, x in replays[:n]]))),
                }

    spread = [close_call(log, weights, exits.review_margin) for log in logs["blasts"]]
    winners = np.array([int(np.argmin(summarise_log(log, weights)[0])) for log in logs["normal"]])
    order = np.argsort(-scorer.predict(normal.images).probs, axis=1, kind="stable")
    ranks = np.array([int(np.flatnonzero(row == w)[0]) for row, w in zip(order, winners)])
    report = {
        "date": f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        "command": environment_prefix() + "python " + " ".join(sys.argv),
        "threads": torch.get_num_threads(),
        "threshold": threshold,
        "precision": precision,
        "rows": rows,
        "checks": checks,
        "winner_ranks": np.bincount(ranks, minlength=len(model.classes)).tolist(),
        "blast_gap_in_margins": float(np.median([g for g, _ in spread])),
        "blast_trial_sd_in_margins": float(np.median([sd for _, sd in spread])),
    }
    (args.out / "exit_replay.json").write_text(json.dumps(report, indent=1))
    text = render(report, args)
    print(text)
    if args.write_docs:
        replace_section(DOCS, SECTION, text, title=TITLE)


def replay_exits(
    log: TrialLog, config: ScoringConfig, weights: np.ndarray, exits: RouteExits | None, settled: Settled | None
) -> tuple[TrialLog, int, bool]:
    """What scoring under `config` with route exits decided by `settled` would measure for a cell whose exhaustive
    trials are `log` (every class and the null class on every trial): the replayed log, its evaluations and whether
    it exited. Trial by trial as `scoring.trials._advance` goes (one check interval at a time, no lookahead), the
    null class leaving play once `null_settled` says so."""
    errors, nulls, strata = np.stack(log.errors), np.asarray(log.null_errors), np.asarray(log.strata)
    active, null_open = np.ones(errors.shape[1], dtype=bool), True
    out, evals = TrialLog(), 0
    for k in range(min(config.max_trials, len(strata))):
        with_null = null_open and wants_null(k, config)
        out.strata.append(int(strata[k]))
        out.errors.append(np.where(active, errors[k], np.nan))
        out.null_errors.append(float(nulls[k]) if with_null else np.nan)
        evals += int(active.sum()) + int(with_null)
        n = k + 1
        if n >= config.max_trials or (n >= config.min_trials and (n - config.min_trials) % config.check_every == 0):
            w = weights[np.asarray(out.strata)]
            weighted, null_weighted = np.stack(out.errors) * w[:, None], np.asarray(out.null_errors) * w
            if exits is not None and settled is not None and settled(weighted, null_weighted, active, config, exits):
                return out, evals, True
            if exits is not None and null_open and null_settled(weighted, null_weighted, active, config, exits):
                null_open = False
            active, done = decide(weighted, active, config)
            if done:
                break
    return out, evals, False


def close_call(log: TrialLog, weights: np.ndarray, margin: float) -> tuple[float, float]:
    """A cell's two best classes over all its trials: their mean gap and one trial's spread of it, in units of the
    review margin. A review exit needs the gap under the margin with confidence: (1 - gap) sqrt(n) / sd > t."""
    errors = np.stack(log.errors) * weights[np.asarray(log.strata)][:, None]
    first, second = np.argsort(errors.mean(axis=0))[:2]
    gap = errors[:, second] - errors[:, first]
    return float(gap.mean() / margin), float(gap.std(ddof=1) / margin)


def every_runner_up(temperature: float) -> Settled:
    """The library's exits, plus a review exit on the k best runners-up together: the top probability is
    1 / (1 + sum_j exp(-gap_j / T)), so k classes each within T (logit(line) + log k) of the best hold it under the
    line. Each of the k tested at `exit_p` (an intersection-union test needs no correction)."""

    def settled(weighted, null_weighted, active, config, exits) -> bool:
        if route_settled(weighted, null_weighted, active, config, exits):
            return True
        if config.exit_p is None or exits.review_margin is None:
            return False
        in_play = np.flatnonzero(active)
        if len(in_play) < 3 or any(int(c) in exits.protected for c in in_play):
            return False
        if exits.anomaly_above is not None and not null_settled(weighted, null_weighted, active, config, exits):
            return False  # the anomaly route is not ruled out yet
        order = in_play[np.argsort(weighted[:, in_play].mean(axis=0), kind="stable")]
        gaps = [weighted[:, c] - weighted[:, order[0]] for c in order[1:]]
        for k in range(2, len(order)):
            margin = exits.review_margin + temperature * np.log(k)
            if all(_mean_below(gap, margin, config.exit_p, None) for gap in gaps[:k]):
                return True
        return False

    return settled


def at_trial_limit(weighted, null_weighted, active, config, exits) -> bool:
    """`route_settled`'s tests on where the mean will be at `max_trials` rather than on the true mean."""
    if config.exit_p is None:
        return False
    horizon = config.max_trials
    in_play = np.flatnonzero(active)
    order = in_play[np.argsort(weighted[:, in_play].mean(axis=0), kind="stable")]
    measured = ~np.isnan(null_weighted)
    gap = weighted[measured, order[0]] - null_weighted[measured]
    if exits.anomaly_above is not None and _mean_below(-gap, -exits.anomaly_above, config.exit_p, horizon):
        return True  # the anomaly route: its gap above the threshold
    if exits.review_margin is None or len(order) < 2 or any(int(c) in exits.protected for c in in_play):
        return False
    if exits.anomaly_above is not None and not _mean_below(gap, exits.anomaly_above, config.exit_p, horizon):
        return False
    runner_up = weighted[:, order[1]] - weighted[:, order[0]]
    return _mean_below(runner_up, exits.review_margin, config.exit_p, horizon)


def _mean_below(values: np.ndarray, threshold: float, p: float, horizon: int | None) -> bool:
    """One-sided t-test that the mean of `values` lies below `threshold` at level p; with a `horizon`, the mean
    over that many trials of which these are the first (its spread about the mean so far shrinks by 1 - n/h)."""
    n = len(values)
    if n < 2:
        return False
    mean, sd = float(values.mean()), float(values.std(ddof=1))
    if horizon is not None:
        sd *= np.sqrt(max(1 - n / horizon, 0.0))
    if sd == 0:
        return mean < threshold
    return bool(special.stdtr(n - 1, (mean - threshold) / (sd / np.sqrt(n))) < p)


def render(report: dict, args: argparse.Namespace) -> str:
    rows = report["rows"]
    by = {(r["variant"], r["group"]): r for r in rows}
    n = {g: by[("no exits", g)]["cells"] for g in ("normal", "blasts")}
    checks = "; ".join(
        f"{g}: {c['same_evals']} of {c['cells']} same evaluations, {c['same_exit']} of {c['cells']} same exit"
        for g, c in report["checks"].items()
    )
    lines = [
        f"Command: `{report['command']}`  ",
        f"Machine: {platform.machine()}, CPU, {report['threads']} torch threads. Diffusion scoring: "
        f"{report['precision']}. Date: {report['date']}. Routing: anomaly above {report['threshold']:.4g} "
        f"({args.routed_share:.0%} of validation cells above it), review below {args.review_below}. Logs: "
        f"{args.trials} trials of every class and the null class on {n['normal']} normal test cells and "
        f"{n['blasts']} ALL-IDB2 blasts; every variant replays the model's tuned rule on them. Replay against real "
        f"scoring with the library's exits (first cells): {checks}.",
        "",
        "| variant | group | evals/cell mean | p95 | stopped early | same route | same class | blasts' evals / "
        "normal's | same route, all cells |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for variant in dict.fromkeys(r["variant"] for r in rows):
        ratio = by[(variant, "blasts")]["evals_mean"] / max(by[(variant, "normal")]["evals_mean"], 1e-9)
        pooled = sum(by[(variant, g)]["same_route"] * n[g] for g in n) / sum(n.values())
        for group in ("normal", "blasts"):
            r = by[(variant, group)]
            lines.append(
                f"| {variant} | {group} | {r['evals_mean']:.1f} | {r['evals_p95']:.0f} | {r['exited']:.3f} | "
                f"{r['same_route']:.3f} | {r['same_class']:.3f} | {ratio:.2f}x | {pooled:.3f} |"
            )
    lines += [
        "",
        f"The blasts' two best classes over all {args.trials} trials (medians): their gap "
        f"{report['blast_gap_in_margins']:.2f} review margins, one trial's spread of it "
        f"{report['blast_trial_sd_in_margins']:.1f} margins.",
    ]
    ranks = report["winner_ranks"]
    total = sum(ranks)
    covered = np.cumsum(ranks) / total
    lines += [
        "",
        f"The exhaustive winner of each of the {total} normal cells among the cheap scorer's classes "
        f"(`{args.scorer}`), by rank (1 = its top class), and the share of cells whose winner its top k hold:",
        "",
        "| rank / k | " + " | ".join(str(k + 1) for k in range(len(ranks))) + " |",
        "|---|" + "---|" * len(ranks),
        "| cells | " + " | ".join(str(c) for c in ranks) + " |",
        "| held by the top k | " + " | ".join(f"{c:.3f}" for c in covered) + " |",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())

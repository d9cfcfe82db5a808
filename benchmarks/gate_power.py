"""Gate power: how often the promotion gate's ECE check refuses a challenger that is worse calibrated, and how often
one that is not, by gate-set size, with two estimates of calibration error and two bootstrap intervals.

The gate (`policy.promotion.compare`, `refuse_on="interval"`) refuses a challenger on ECE only when the whole 95 %
paired-bootstrap interval of its ECE minus the champion's lies above the tolerance (`promotion.ece_tolerance`,
0.02). Binned ECE on a few hundred cells is biased upwards by sampling noise, more for a calibrated model than
for a miscalibrated one, so the measured difference shrinks toward 0; the percentile interval adds that bias a
second time (the gate uses the basic interval). Only a simulation knows the true difference, so this is one: a
champion calibrated by construction (each cell is right with probability its confidence, confidences uniform on
[0.45, 0.99], 5 classes) and a challenger making the same decisions with every confidence moved by `shift` (over-
or under-confident), or jittered per cell (`noise`). True differences are measured on 400,000 cells; each
scenario's refusal rate over `--draws` gate sets of `--cells` cells, with a Wilson 95 % interval.

Beside the gate's binned ECE, a less biased estimate is tried: the debiased RMS calibration error (Kumar et al.,
"Verified uncertainty calibration", 2019): in each bin the squared mean gap between correctness and confidence is
estimated without bias by the U-statistic ``(S^2 - Q) / (n_b (n_b - 1))`` (S the sum of the bin's gaps, Q the sum
of their squares), weighted by the bin's share; its signed square root is on ECE's scale (equal to it for a
constant gap). On a resample the U-statistic also pairs a cell drawn twice with its own copy; "RMSCE apart"
leaves those pairs out (the same estimate on all cells, other resamples). All use the gate's 15 equal-width bins,
the same gate sets and the same resamples (stratified by true class, as the gate's), computed for all resamples at
once from per-bin sums.

    python benchmarks/gate_power.py --cells 100 300 1000 3000 --draws 100
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from datetime import UTC, datetime

import numpy as np
from _docs import DOCS, replace_section

from cytoloop.evaluation import metrics

TITLE = "Gate power: the ECE check"
SECTION = "gate-power"
CLASSES = 5
BINS = 15  # the gate's (`policy.promotion.difference_intervals`)
SCENARIOS = (  # (confidence shift, per-cell jitter) of the challenger
    (0.0, 0.05),
    (-0.05, 0.0),
    (0.03, 0.0),
    (0.05, 0.0),
    (0.10, 0.0),
)
ESTIMATES = ("ece", "rmsce", "rmsce_apart")
INTERVALS = ("percentile", "basic")


def cells(n: int, shift: float, noise: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """True labels, the champion's and the challenger's probabilities for `n` cells."""
    labels = rng.integers(0, CLASSES, n)
    confidence = rng.uniform(0.45, 0.99, n)
    predicted = np.where(rng.random(n) < confidence, labels, (labels + 1) % CLASSES)

    def probabilities(top: np.ndarray) -> np.ndarray:
        top = np.clip(top, 1 / CLASSES + 1e-3, 0.999)
        probs = np.tile(((1 - top) / (CLASSES - 1))[:, None], (1, CLASSES))
        probs[np.arange(n), predicted] = top
        return probs

    return labels, probabilities(confidence), probabilities(confidence + shift + noise * rng.standard_normal(n))


def calibration_errors(probs: np.ndarray, labels: np.ndarray, weights: np.ndarray) -> dict[str, np.ndarray]:
    """Binned ECE and debiased RMS calibration error of `probs` on each resample: `weights` is (resamples, cells),
    how many times each cell is drawn. Returns one value per resample for each estimate."""
    confidence = probs.max(axis=1)
    gap = (probs.argmax(axis=1) == labels) - confidence
    edges = np.arange(BINS + 1) / BINS  # as `metrics.reliability_bins`
    in_bin = np.eye(BINS)[np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, BINS - 1)]
    count = weights @ in_bin
    total = weights @ (in_bin * gap[:, None])
    squares = weights @ (in_bin * (gap * gap)[:, None])
    cells_drawn = count.sum(axis=1)
    ece = np.abs(total).sum(axis=1) / cells_drawn
    pairs = np.where(count > 1, count * (count - 1), np.inf)
    squared = (count * (total * total - squares) / pairs).sum(axis=1) / cells_drawn
    # the same on a resample, leaving out the pairs of a cell drawn twice with its own copy (on all cells, w = 1,
    # it is the estimate above): a resample then debiases as the estimate does
    twice = weights * weights
    pairs_apart = count * count - twice @ in_bin
    apart = (total * total - twice @ (in_bin * (gap * gap)[:, None])) / np.where(pairs_apart > 0, pairs_apart, np.inf)
    squared_apart = (count * apart).sum(axis=1) / cells_drawn
    return {
        "ece": ece,
        "rmsce": np.sign(squared) * np.sqrt(np.abs(squared)),
        "rmsce_apart": np.sign(squared_apart) * np.sqrt(np.abs(squared_apart)),
    }


def resample_weights(labels: np.ndarray, boots: int, rng: np.random.Generator) -> np.ndarray:
    """(boots, cells) draw counts of resamples stratified by true class, as the gate's (`metrics.resample`)."""
    weights = np.zeros((boots, len(labels)))
    for value in np.unique(labels):
        members = np.flatnonzero(labels == value)
        weights[:, members] = rng.multinomial(len(members), np.full(len(members), 1 / len(members)), size=boots)
    return weights


def refusals(n: int, shift: float, noise: float, draws: int, boots: int, tolerance: float) -> dict:
    """For each estimate: the mean measured difference and each interval's refusals over `draws` gate sets."""
    refused = {(e, i): 0 for e in ESTIMATES for i in INTERVALS}
    points: dict[str, list[float]] = {e: [] for e in ESTIMATES}
    for draw in range(draws):
        # independent streams for the cells and their resamples (one seed for both drew them from the same numbers)
        data_seed, boot_seed = np.random.SeedSequence(draw).spawn(2)
        labels, champion, challenger = cells(n, shift, noise, np.random.default_rng(data_seed))
        weights = np.vstack([np.ones(n), resample_weights(labels, boots, np.random.default_rng(boot_seed))])
        a, b = calibration_errors(champion, labels, weights), calibration_errors(challenger, labels, weights)
        for estimate in ESTIMATES:
            difference = b[estimate] - a[estimate]
            point, (high, low) = difference[0], np.quantile(difference[1:], [0.975, 0.025])
            points[estimate].append(point)
            refused[(estimate, "percentile")] += low > tolerance
            refused[(estimate, "basic")] += 2 * point - high > tolerance
    return {
        "points": {e: float(np.mean(p)) for e, p in points.items()},
        "refused": {key: (k, draws) for key, k in refused.items()},
    }


def wilson(k: int, n: int) -> tuple[float, float]:
    z = 1.959964
    centre, half = (k + z * z / 2) / (n + z * z), z * math.sqrt(k * (n - k) / n + z * z / 4) / (n + z * z)
    return centre - half, centre + half


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", type=int, nargs="+", default=[100, 300, 1000, 3000], help="gate-set sizes")
    parser.add_argument("--draws", type=int, default=100, help="gate sets per scenario and size")
    parser.add_argument("--boots", type=int, default=1000, help="bootstrap resamples (the gate's)")
    parser.add_argument("--tolerance", type=float, default=0.02, help="promotion.ece_tolerance")
    parser.add_argument("--write-docs", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args()
    if min(args.cells) < 10 or args.draws < 1 or args.boots < 10:
        parser.error("--cells at least 10, --draws at least 1, --boots at least 10")
    began = time.time()
    labels, champion, _ = cells(500, 0.0, 0.0, np.random.default_rng(0))
    ours = calibration_errors(champion, labels, np.ones((1, 500)))["ece"][0]
    if not math.isclose(ours, metrics.expected_calibration_error(champion, labels, n_bins=BINS), abs_tol=1e-12):
        raise SystemExit("the vectorised ECE differs from metrics.expected_calibration_error: fix it before reading")
    rows = []
    for shift, noise in SCENARIOS:
        labels, champion, challenger = cells(400_000, shift, noise, np.random.default_rng(10**6))
        ones = np.ones((1, len(labels)))
        a, b = calibration_errors(champion, labels, ones), calibration_errors(challenger, labels, ones)
        truth = {e: float(b[e][0] - a[e][0]) for e in ESTIMATES}
        for n in args.cells:
            found = refusals(n, shift, noise, args.draws, args.boots, args.tolerance)
            rows.append((shift, noise, truth, n, found))
            print(f"shift {shift:+.2f} noise {noise:.2f} cells {n}: {found}", file=sys.stderr, flush=True)

    def rate(k_n: tuple[int, int]) -> str:
        low, high = wilson(*k_n)
        return f"{k_n[0] / k_n[1]:.2f} [{low:.2f}, {high:.2f}]"

    lines = [
        f"Command: `python benchmarks/gate_power.py --cells {' '.join(map(str, args.cells))} --draws {args.draws} "
        f"--boots {args.boots} --tolerance {args.tolerance}`  ",
        f"Machine: {platform.machine()}, {platform.processor() or 'CPU'}; numpy only. Date: "
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC; {time.time() - began:.0f} s. Rates are refusals out of "
        f"{args.draws} gate sets [Wilson 95 %]; differences are challenger minus champion (true, then the mean "
        "measured).",
        "",
        "| challenger | gate cells | ECE difference | refused on ECE, percentile | refused on ECE, basic (the gate) | "
        "RMSCE difference | refused on RMSCE, percentile | refused on RMSCE, basic | refused on RMSCE apart, "
        "percentile | refused on RMSCE apart, basic |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for shift, noise, truth, n, found in rows:
        who = f"confidence {shift:+.2f}" if noise == 0 else f"jitter {noise:.2f}"
        cols = [who, str(n)]
        for estimate in ESTIMATES:
            if estimate != "rmsce_apart":  # the same estimate on all cells as rmsce: its resamples differ
                cols.append(f"{truth[estimate]:+.3f}, {found['points'][estimate]:+.3f}")
            cols += [rate(found["refused"][(estimate, interval)]) for interval in INTERVALS]
        lines.append("| " + " | ".join(cols) + " |")
    body = "\n".join(lines) + "\n"
    print(body)
    if args.write_docs:
        replace_section(DOCS, SECTION, body, TITLE)


if __name__ == "__main__":
    main()

"""Gate power: how often the promotion gate's ECE check refuses a challenger that is worse calibrated, and how often
one that is not, with the percentile and the basic bootstrap interval of the ECE difference, side by side.

The gate (`policy.promotion.compare`, `refuse_on="interval"`) refuses a challenger on ECE only when the whole 95 %
paired-bootstrap interval of its ECE minus the champion's lies above the tolerance (`promotion.ece_tolerance`,
0.02). Binned ECE on a few hundred cells is biased upwards by sampling noise, more for a calibrated model than
for a miscalibrated one, so the measured difference shrinks toward 0; the percentile interval adds that bias a
second time. Only a simulation knows the true difference, so this is one: a champion calibrated by construction
(each cell is right with probability its confidence, confidences uniform on [0.45, 0.99], 5 classes) and a
challenger making the same decisions with every confidence moved by `shift` (over- or under-confident), or
jittered per cell (`noise`: another model of the same calibration). The true ECE difference is measured on
400,000 cells; each scenario's refusal rate over `--draws` gate sets of `--cells` cells, with a Wilson 95 %
interval, for both intervals, on the same gate sets and resamples.

    python benchmarks/gate_power.py --cells 100 300 --draws 100
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
SCENARIOS = (  # (confidence shift, per-cell jitter) of the challenger
    (0.0, 0.05),
    (-0.05, 0.0),
    (0.03, 0.0),
    (0.05, 0.0),
    (0.10, 0.0),
)


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


def ece(probs: np.ndarray, labels: np.ndarray) -> float:
    return metrics.expected_calibration_error(probs, labels, n_bins=15)  # the gate's bins


def refusals(n: int, shift: float, noise: float, draws: int, boots: int, tolerance: float) -> dict:
    """Refusal rates of both intervals over `draws` gate sets of `n` cells (each interval on the same resamples)."""
    refused = {"percentile": 0, "basic": 0}
    points = []
    for draw in range(draws):
        labels, champion, challenger = cells(n, shift, noise, np.random.default_rng(draw))
        points.append(ece(challenger, labels) - ece(champion, labels))

        def difference(i: np.ndarray, labels=labels, champion=champion, challenger=challenger) -> float:
            return ece(challenger[i], labels[i]) - ece(champion[i], labels[i])

        for method in refused:
            low, _ = metrics.bootstrap_interval(
                difference,
                n,
                n_boot=boots,
                seed=draw,
                strata=labels,
                method=method,
            )
            refused[method] += low > tolerance
    return {"point": float(np.mean(points)), **{m: (k, draws) for m, k in refused.items()}}


def wilson(k: int, n: int) -> tuple[float, float]:
    z = 1.959964
    centre, half = (k + z * z / 2) / (n + z * z), z * math.sqrt(k * (n - k) / n + z * z / 4) / (n + z * z)
    return centre - half, centre + half


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", type=int, nargs="+", default=[100, 300], help="gate-set sizes")
    parser.add_argument("--draws", type=int, default=100, help="gate sets per scenario and size")
    parser.add_argument("--boots", type=int, default=1000, help="bootstrap resamples (the gate's)")
    parser.add_argument("--tolerance", type=float, default=0.02, help="promotion.ece_tolerance")
    parser.add_argument("--write-docs", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args()
    if min(args.cells) < 10 or args.draws < 1 or args.boots < 10:
        parser.error("--cells at least 10, --draws at least 1, --boots at least 10")
    began = time.time()
    rows = []
    for shift, noise in SCENARIOS:
        labels, champion, challenger = cells(400_000, shift, noise, np.random.default_rng(10**6))
        truth = ece(challenger, labels) - ece(champion, labels)
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
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC; {time.time() - began:.0f} s.",
        "",
        "| challenger | true ECE difference | gate cells | mean measured difference | refused, percentile | "
        "refused, basic |",
        "|---|---|---|---|---|---|",
    ]
    for shift, noise, truth, n, found in rows:
        who = f"confidence {shift:+.2f}" if noise == 0 else f"jitter {noise:.2f} (same calibration)"
        lines.append(
            f"| {who} | {truth:+.3f} | {n} | {found['point']:+.3f} | {rate(found['percentile'])} | "
            f"{rate(found['basic'])} |"
        )
    body = "\n".join(lines) + "\n"
    print(body)
    if args.write_docs:
        replace_section(DOCS, SECTION, body, TITLE)


if __name__ == "__main__":
    main()

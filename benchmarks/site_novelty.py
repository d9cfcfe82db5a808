"""A site's own cells as the reference: does distance from them find blasts, or the lab the blasts come from?

`blast_routing.py` found that no anomaly score of the base model routes the demo's blasts (ALL-IDB2 cells mixed into
a site's pool) at the demo's threshold, and named the untried remedy: an anomaly score fitted to each site's own
normal cells. This benchmark tries it, with the control the demo's data needs: every blast comes from one lab that
contributes no normal cell to any site's pool, so a score that measures distance from a site's cells may find the
lab, not the blast. The blast lab's own normal cells are that control, and the blast lab as its own site (reference
and test cells from one lab and scanner) is the test of morphology alone.

Features, one per model kind (both models trained on PBC; neither saw a blast or these labs' cells):
  cnn        the CNN's pooled last-layer features (what its linear head reads); cosine distance
  diffusion  the diffusion classifier's log mean weighted denoising error under each class and the null class, from
             `--trials` exhaustive trials per cell; standardised on the reference cells, Euclidean distance
Score: the distance from a cell to its k-th nearest reference cell. Threshold: the `--quantile` quantile of the
reference cells' own leave-one-out scores (as the demo sets its threshold on its calibration cells).

Per site: the reference is a seeded half of the site's normal cells (`--site-cells` at most, class-interleaved), the
demo's calibration cells; the other half measures false alarms; then the share of blasts above the threshold
(recall) and the share of the blast lab's normal cells above it (the control). Last, the blast lab as a site: half
its normal cells as the reference, the other half and its blasts tested. 95 % bootstrap intervals over cells.

    python benchmarks/site_novelty.py --data ../shared/data/manifest.csv --model models/base-pbc \
      --cnn runs/reference/cnn-seed0 --site site-a=jtsc,bccd --site site-b=cellavision \
      --classes neutrophil,lymphocyte,monocyte,eosinophil
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from _cache import cached
from _docs import DOCS, environment_prefix, replace_section
from blast_routing import auroc_with_interval, share_above

from cytoloop.config import load_settings
from cytoloop.data.records import CellRecord, class_interleaved_subset, load_records, select

TITLE = "A site's own cells as the anomaly reference: blasts or another lab?"
SECTION = "site-novelty"

Features = tuple[Callable[[list[CellRecord]], np.ndarray], tuple]  # the extractor and what its features depend on


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="manifest with the sites' labs and the blast lab")
    parser.add_argument("--model", type=Path, required=True, help="diffusion model directory (the demo's base model)")
    parser.add_argument("--cnn", type=Path, required=True, help="CNN baseline directory trained on the same data")
    parser.add_argument("--site", action="append", required=True, help="NAME=LAB[,LAB...], repeated")
    parser.add_argument("--classes", required=True, help="the sites' classes (their normal cells)")
    parser.add_argument("--site-cells", type=int, default=240, help="a site's normal cells at most (class-interleaved)")
    parser.add_argument("--blast-domain", default="allidb2")
    parser.add_argument("--blast-label", default="blast")
    parser.add_argument("--normal-label", default="normal", help="the blast lab's normal cells (the control)")
    parser.add_argument("--trials", type=int, default=40, help="exhaustive trials per cell for the diffusion feature")
    parser.add_argument("--k", type=int, nargs="+", default=[1, 5], help="k-th nearest reference cell")
    parser.add_argument("--quantile", type=float, default=0.95, help="the demo's anomaly_quantile")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/site-novelty"))
    parser.add_argument("--write-docs", action="store_true", help="write the table into docs/benchmarks.md")
    args = parser.parse_args(argv)
    if not 0.0 < args.quantile < 1.0:
        parser.error(f"--quantile must be in (0, 1), got {args.quantile}")
    if args.trials < 2 or min(args.k) < 1:
        parser.error("--trials must be >= 2 and every --k >= 1")
    sites: dict[str, list[str]] = {}
    for item in args.site:
        name, _, labs = item.partition("=")
        if not name or not labs:
            parser.error(f"--site {item!r}: expected NAME=LAB[,LAB...]")
        sites[name] = labs.split(",")

    records = load_records(args.data)
    classes = args.classes.split(",")
    groups = {
        name: class_interleaved_subset(select(records, labs, classes), args.site_cells) for name, labs in sites.items()
    }
    groups["blasts"] = select(records, [args.blast_domain], [args.blast_label])
    groups["blast-lab"] = select(records, [args.blast_domain], [args.normal_label])
    args.out.mkdir(parents=True, exist_ok=True)
    features = {"cnn": cnn_features(args.cnn), "diffusion": diffusion_features(args.model, args.trials)}
    rows = []
    for kind, (extract, inputs) in features.items():
        values = {
            group: cached(args.out / f"{kind}-{group}.pkl", lambda c=cells, f=extract: f(c), inputs=(*inputs, cells))
            for group, cells in groups.items()
        }
        distance = cosine_distance if kind == "cnn" else standardised_distance
        for k in args.k:
            for site in [*sites, "blast-lab"]:
                rows.append({"site": site, "feature": kind, "k": k} | site_figures(values, site, distance, k, args))
    text = render(rows, sites, groups, args)
    print(text)
    if args.write_docs:
        replace_section(DOCS, SECTION, text, title=TITLE)
    return 0


def cnn_features(directory: Path) -> Features:
    """The CNN's pooled features before its linear head, one row per cell (they depend on the model's folder)."""
    from cytoloop.data.preprocess import load_cells
    from cytoloop.models.baseline import BaselineClassifier

    cnn = BaselineClassifier.load(directory)

    @torch.inference_mode()
    def extract(records: list[CellRecord]) -> np.ndarray:
        cells = _loaded(records, cnn.data_config, load_cells)
        network = cnn.network.eval()
        return network.features(torch.as_tensor(cells, dtype=torch.float32)).mean(dim=(2, 3)).numpy()

    return extract, (directory,)


def diffusion_features(directory: Path, trials: int) -> Features:
    """Log mean weighted error under each class and the null class, from `trials` exhaustive trials per cell
    (they depend on the model's folder and the exhaustive scoring settings)."""
    from cytoloop.data.preprocess import load_cells
    from cytoloop.models.loading import load_model

    model = load_model(directory, load_settings().scoring)
    weights = np.asarray(model.timestep_weights)
    exhaustive = model.scoring_config.model_copy(
        update={"min_trials": trials, "max_trials": trials, "null_trials": None, "score_null_class": True}
    )

    def extract(records: list[CellRecord]) -> np.ndarray:
        images = _loaded(records, model.data_config, load_cells)
        rows = []
        for log in model.score(images, exhaustive, progress=True).logs:
            w = weights[np.asarray(log.strata)][:, None]
            errors = np.concatenate([np.stack(log.errors), np.asarray(log.null_errors)[:, None]], axis=1) * w
            rows.append(np.log(errors.mean(axis=0)))
        return np.array(rows)

    return extract, (directory, exhaustive)


def _loaded(records: list[CellRecord], config, load_cells) -> np.ndarray:
    cells = load_cells(records, config, progress=True)
    if cells.skipped:
        raise SystemExit(f"{len(cells.skipped)} cells could not be read, first: {cells.skipped[0]}")
    return cells.images


def cosine_distance(reference: np.ndarray, cells: np.ndarray) -> np.ndarray:
    a = reference / np.linalg.norm(reference, axis=1, keepdims=True)
    b = cells / np.linalg.norm(cells, axis=1, keepdims=True)
    return 1.0 - b @ a.T


def standardised_distance(reference: np.ndarray, cells: np.ndarray) -> np.ndarray:
    mean, sd = reference.mean(axis=0), reference.std(axis=0) + 1e-12
    a, b = (reference - mean) / sd, (cells - mean) / sd
    return np.linalg.norm(b[:, None, :] - a[None, :, :], axis=2)


def knn_score(distances: np.ndarray, k: int) -> np.ndarray:
    """Distance to the k-th nearest reference cell (columns: reference cells)."""
    if k > distances.shape[1]:
        raise ValueError(f"k={k} but only {distances.shape[1]} reference cells")
    return np.sort(distances, axis=1)[:, k - 1]


def site_figures(
    values: dict[str, np.ndarray],
    site: str,
    distance: Callable[[np.ndarray, np.ndarray], np.ndarray],
    k: int,
    args: argparse.Namespace,
) -> dict:
    """Reference: a seeded half of the site's cells; threshold: the quantile of their leave-one-out scores."""
    cells = values[site]
    order = np.random.default_rng(args.seed).permutation(len(cells))
    reference, held = cells[order[: len(cells) // 2]], cells[order[len(cells) // 2 :]]
    own = distance(reference, reference)
    np.fill_diagonal(own, np.inf)
    calibration = knn_score(own, k)  # leave-one-out scores of the reference cells: the threshold's sample

    def score(x: np.ndarray) -> np.ndarray:
        return knn_score(distance(reference, x), k)

    held_scores, blast_scores = score(held), score(values["blasts"])
    figures = {
        "reference": len(reference),
        "false_alarms": share_above(held_scores, calibration, args.quantile),
        "recall": share_above(blast_scores, calibration, args.quantile),
        "auroc_held": auroc_with_interval(held_scores, blast_scores),
    }
    if site != "blast-lab":
        lab_scores = score(values["blast-lab"])
        figures |= {
            "lab_routed": share_above(lab_scores, calibration, args.quantile),
            "auroc_lab": auroc_with_interval(lab_scores, blast_scores),
        }
    return figures


def _fmt(value: tuple[float, tuple[float, float]] | None, digits: int = 2) -> str:
    if value is None:
        return "—"
    point, (low, high) = value
    return f"{point:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def render(rows: list[dict], sites: dict[str, list[str]], groups: dict[str, list], args: argparse.Namespace) -> str:
    site_args = " ".join(f"--site {name}={','.join(labs)}" for name, labs in sites.items())
    k = " ".join(str(v) for v in args.k)
    labs = {name: ", ".join(lab) for name, lab in sites.items()} | {"blast-lab": f"{args.blast_domain} normal cells"}
    lines = [
        f"Command: `{environment_prefix()}python benchmarks/site_novelty.py --data {args.data} --model {args.model} "
        f"--cnn {args.cnn} {site_args} --classes {args.classes} --site-cells {args.site_cells} --trials {args.trials} "
        f"--k {k} --quantile {args.quantile} --seed {args.seed}`  ",
        f"Machine: {platform.machine()}, CPU, {os.cpu_count()} cores, no GPU. "
        f"Date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC. [brackets]: 95 % bootstrap interval over cells.",
        "",
        f"Reference: a seeded half of the site's normal cells ({', '.join(f'{s} {len(groups[s])}' for s in sites)} "
        f"cells of {args.classes}; `blast-lab`: the {len(groups['blast-lab'])} {args.blast_domain} "
        f"{args.normal_label} cells); threshold: the {args.quantile:.0%} quantile of the reference cells' own "
        f"leave-one-out distance to their k-th nearest neighbour. False alarms: the site's other half above it; "
        f"blasts: the share of {len(groups['blasts'])} {args.blast_domain} blasts above it; blast lab's normal: the "
        f"share of the {len(groups['blast-lab'])} {args.blast_domain} {args.normal_label} cells above it (a score that "
        "flags them as often as the blasts finds the lab, not the blast). AUROC: blasts against the site's other "
        "half, and against the blast lab's normal cells.",
        "",
        "| reference | feature | k | false alarms | blasts routed | blast lab's normal routed "
        "| AUROC blasts vs site's held | AUROC blasts vs blast lab's normal |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['site']} ({labs[row['site']]}) | {row['feature']} | {row['k']} | {_fmt(row['false_alarms'])} | "
            f"{_fmt(row['recall'])} | {_fmt(row.get('lab_routed'))} | {_fmt(row['auroc_held'], 3)} | "
            f"{_fmt(row.get('auroc_lab'), 3)} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())

"""Blasts against a site's own cells: can a model's anomaly score route the blasts a lab must not miss?

The demo (#18) asks that >= 80 % of the ALL-IDB2 blasts mixed into a site's pool be routed `anomaly` in the
first round, with <= 15 % of the pool routed. Its routing threshold is the `demo.anomaly_quantile` (95 %) quantile
of the anomaly scores of the site's frozen calibration cells, all normal. This benchmark asks that question
directly, for every anomaly score the model offers (the diffusion classifier: its primary score, null ratio,
minimum error and the reference's gap; a CNN: energy and max-softmax):

- each site's normal cells (its labs' labelled cells of `--classes`) are split in two by a seeded draw: one half
  sets the threshold at the quantile, as the demo's calibration cells do; the other half measures the share of
  normal cells above it (false alarms, what the anomaly route would cost the pool);
- the blasts' recall at that threshold (the share the anomaly route would catch), and the AUROC of blasts
  against all the site's normal cells, each with a 95 % bootstrap interval over cells.

Every cell is scored once per model (kept in `--out`/<model directory's name>, reused on a rerun).

    python benchmarks/blast_routing.py --data ../shared/data/manifest.csv --model models/base-pbc \
      --site site-a=jtsc,bccd --site site-b=cellavision --classes neutrophil,lymphocyte,monocyte,eosinophil
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from cytoloop.config import load_settings
from cytoloop.data.records import CellRecord, class_interleaved_subset, load_records, select

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _docs import DOCS, environment_prefix, replace_section  # noqa: E402

TITLE = "Blasts against a site's own cells: anomaly scores at the demo's threshold"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="manifest with the sites' labs and ALL-IDB2")
    parser.add_argument("--model", type=Path, required=True, help="model directory (the demo's base model)")
    parser.add_argument("--site", action="append", required=True, help="NAME=LAB[,LAB...], repeated")
    parser.add_argument("--classes", default=None, help="the sites' classes (default: the model's)")
    parser.add_argument("--blast-domain", default="allidb2")
    parser.add_argument("--blast-label", default="blast")
    parser.add_argument("--blasts", type=int, default=60, help="blasts scored (the same for every site)")
    parser.add_argument("--quantile", type=float, default=0.95, help="the demo's anomaly_quantile")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/blast-routing"))
    parser.add_argument(
        "--restrict",
        action="store_true",
        help="decide every cell among --classes only (a site's classes, `sites.<site>.classes`), as a site that "
        "reports those classes is served",
    )
    parser.add_argument("--write-docs", action="store_true", help="write the table into docs/benchmarks.md")
    args = parser.parse_args(argv)
    if not 0.0 < args.quantile < 1.0:
        parser.error(f"--quantile must be in (0, 1), got {args.quantile}")
    sites: dict[str, list[str]] = {}
    for item in args.site:
        name, _, labs = item.partition("=")
        if not name or not labs:
            parser.error(f"--site {item!r}: expected NAME=LAB[,LAB...]")
        sites[name] = labs.split(",")

    from cytoloop.models.loading import load_model

    model = load_model(args.model, load_settings().scoring)
    classes = args.classes.split(",") if args.classes else list(model.classes)
    unknown = sorted(set(classes) - set(model.classes))
    if unknown:
        parser.error(f"--classes {', '.join(unknown)}: not classes of the model ({', '.join(model.classes)})")
    records = load_records(args.data)
    # the first n blasts by id: the same cells on any machine
    blasts = class_interleaved_subset(select(records, [args.blast_domain], [args.blast_label]), args.blasts)
    # one folder per model and class set: another model's scores are never reused
    kept = args.out / (args.model.name + ("-restricted-" + "-".join(sorted(classes)) if args.restrict else ""))
    allowed = np.isin(model.classes, classes) if args.restrict else None
    blast_scores = _scores(model, blasts, kept / "blasts.npz", allowed)
    results = {}
    for site, labs in sites.items():
        normal = select(records, labs, classes)
        results[site] = {
            "labs": labs,
            "normal": len(normal),
            "scores": _site_figures(_scores(model, normal, kept / f"{site}.npz", allowed), blast_scores, args),
        }
    text = render(results, len(blasts), args)
    print(text)
    if args.write_docs:
        if args.restrict:
            replace_section(DOCS, "blast-routing-restricted", text, title=TITLE + ", each site's classes only")
        else:
            replace_section(DOCS, "blast-routing", text, title=TITLE)
    return 0


def _scores(model, records: list[CellRecord], path: Path, allowed: np.ndarray | None) -> dict[str, np.ndarray]:
    """Every anomaly score of the model for these cells ('anomaly' is the one routing uses), each cell decided among
    the `allowed` classes (None: all), kept in `path`."""
    if path.is_file():
        with np.load(path) as kept:
            return dict(kept)
    from cytoloop.data.preprocess import load_cells

    cells = load_cells(records, model.data_config, progress=True)
    if cells.skipped:
        raise SystemExit(f"{len(cells.skipped)} cells could not be read, first: {cells.skipped[0]}")
    candidates = None if allowed is None else np.tile(allowed, (len(cells.images), 1))
    predictions = model.predict(cells.images, progress=True, candidates=candidates)
    scores = {"anomaly": predictions.anomaly}
    scores |= {name: values for name, values in predictions.extra.items() if name.startswith("anomaly_")}
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **scores)
    return scores


def _site_figures(normal: dict[str, np.ndarray], blasts: dict[str, np.ndarray], args: argparse.Namespace) -> dict:
    """Per score: threshold from one half of the normal cells, false alarms on the other, blast recall, AUROC."""
    n = len(normal["anomaly"])
    order = np.random.default_rng(args.seed).permutation(n)
    halves = order[: n // 2], order[n // 2 :]
    return {name: _figures(normal[name], blasts[name], halves, args.quantile) for name in normal if name in blasts}


def _figures(
    normal: np.ndarray, blasts: np.ndarray, halves: tuple[np.ndarray, np.ndarray], quantile: float
) -> dict[str, float | tuple[float, float]]:

    calibration, held = halves
    threshold = float(np.quantile(normal[calibration], quantile))
    false_alarms, false_alarms_interval = share_above(normal[held], normal[calibration], quantile)
    recall, recall_interval = share_above(blasts, normal[calibration], quantile)
    auroc, auroc_interval = auroc_with_interval(normal, blasts)
    return {
        "threshold": threshold,
        "false_alarms": false_alarms,
        "false_alarms_interval": false_alarms_interval,
        "recall": recall,
        "recall_interval": recall_interval,
        "auroc": auroc,
        "auroc_interval": auroc_interval,
    }


def share_above(
    scores: np.ndarray, calibration: np.ndarray, quantile: float, n_boot: int = 1000, seed: int = 0
) -> tuple[float, tuple[float, float]]:
    """The share of cells whose score lies above the threshold, the `quantile` of the `calibration` scores (the
    share a route would take), with its 95 % percentile bootstrap interval: each resample draws both the scored
    cells and the calibration cells, as the threshold is itself an estimate from a few tens of cells (holding it
    fixed left its error out and the interval too narrow)."""
    from cytoloop.evaluation import metrics

    both = np.concatenate([scores, calibration])
    is_calibration = np.r_[np.zeros(len(scores), bool), np.ones(len(calibration), bool)]

    def share(index: np.ndarray) -> float:  # each resample keeps both groups' sizes (strata)
        drawn, calibrating = both[index], is_calibration[index]
        return float(np.mean(drawn[~calibrating] > np.quantile(drawn[calibrating], quantile)))

    interval = metrics.bootstrap_interval(share, len(both), n_boot=n_boot, seed=seed, strata=is_calibration)
    return share(np.arange(len(both))), interval


def auroc_with_interval(negative: np.ndarray, positive: np.ndarray) -> tuple[float, tuple[float, float]]:
    """AUROC of `positive` against `negative` scores with its 95 % bootstrap interval over cells, each kind
    resampled apart (as many of each in every resample)."""
    from cytoloop.evaluation import metrics

    both = np.concatenate([negative, positive])
    is_positive = np.concatenate([np.zeros(len(negative), bool), np.ones(len(positive), bool)])
    interval = metrics.bootstrap_intervals(
        lambda i: {"auroc": metrics.auroc(both[i], is_positive[i]) if 0 < is_positive[i].sum() < len(i) else np.nan},
        len(both),
        strata=is_positive,
    )["auroc"]
    return metrics.auroc(both, is_positive), interval


def render(results: dict, n_blasts: int, args: argparse.Namespace) -> str:
    environment = environment_prefix()
    sites = " ".join(f"--site {name}={','.join(r['labs'])}" for name, r in results.items())
    lines = [
        f"Command: `{environment}python benchmarks/blast_routing.py --data {args.data} --model {args.model} {sites}"
        + (f" --classes {args.classes}" if args.classes else "")
        + (" --restrict" if args.restrict else "")
        + f" --blasts {args.blasts} --quantile {args.quantile} --seed {args.seed}`  ",
        f"Machine: {platform.machine()}, CPU, {os.cpu_count()} cores, no GPU. "
        f"Date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC. [brackets]: 95 % bootstrap interval over cells.",
        "",
        f"Threshold: the {args.quantile:.0%} quantile of a score on half of the site's normal cells (the demo's "
        f"calibration cells); false alarms: the other half's share above it; recall: the share of {n_blasts} "
        f"{args.blast_domain} blasts above it; AUROC: blasts against all the site's normal cells. The demo's target: "
        "recall >= 80 % with <= 15 % of the pool routed.",
        "",
        "| site | normal cells | score | recall of blasts | false alarms | AUROC |",
        "|---|---|---|---|---|---|",
    ]
    for site, result in results.items():
        for name, f in result["scores"].items():
            label = "primary (routes)" if name == "anomaly" else name.removeprefix("anomaly_")
            lines.append(
                f"| {site} ({', '.join(result['labs'])}) | {result['normal']} | {label} | "
                f"{f['recall']:.2f} [{f['recall_interval'][0]:.2f}, {f['recall_interval'][1]:.2f}] | "
                f"{f['false_alarms']:.2f} [{f['false_alarms_interval'][0]:.2f}, {f['false_alarms_interval'][1]:.2f}] | "
                f"{f['auroc']:.3f} [{f['auroc_interval'][0]:.3f}, {f['auroc_interval'][1]:.3f}] |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())

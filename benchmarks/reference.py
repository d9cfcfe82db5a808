"""The reference's experiments on PBC, side by side: the diffusion classifier against the CNN baseline.

Both models come from the same recipe family (`cytoloop recipes`): the same PBC cells, the same seeded split
(seed 0), the same batch and precision; the diffusion model is the one `--diffusion` points at (the base model,
`cytoloop train --recipe base-pbc`), the CNN is trained here once per seed in `--cnn-seeds` with `--cnn-steps`
steps (default: the recipe's, the diffusion model's budget). Every figure has a 95 % bootstrap interval over cells.

  in_domain     PBC's held-out test part (or a fixed, class-interleaved `--test-cells` of it): balanced accuracy,
                per-class recall, ECE after temperature scaling, NLL, accuracy at 90 % coverage.
  domain_shift  the PBC models, unadapted, on each other lab's labelled cells of the classes PBC knows
                (jtsc, cellavision, bccd): balanced accuracy over the classes that lab has, and ECE.
  blasts        ALL-IDB2 blasts against ALL-IDB2 normal cells: AUROC of every anomaly score each model offers
                (diffusion: null ratio, minimum error, the reference's gap; CNN: energy, max-softmax).
  anomaly       the reference's held-out-class protocol: both kinds trained on PBC without erythroblasts and
                immature granulocytes (recipes anomaly-pbc6 and anomaly-pbc6-cnn), scored on their own held-out
                test cells of the six known classes and on unseen erythroblasts and immature granulocytes: AUROC of
                each held-out class vs the known cells, and of ALL-IDB2 blasts vs normal, for every anomaly score.
  views         a lever: the diffusion model scored with the reference's random rotation/flip per trial
                (`scoring.trial_views = "dihedral"`) against as cropped, on the same `--views-cells` test cells:
                balanced accuracy and ECE, and the paired-bootstrap interval of each difference.
  stain         a lever: both kinds trained from scratch twice at `--stain-steps` steps, once with the default
                augmentation and once with strong stain/colour jitter (STRONG_STAIN), everything else alike;
                in-domain balanced accuracy on `--stain-test-cells` PBC test cells and the domain-shift figures on
                the other labs, with the paired-bootstrap interval of strong minus default per lab (CNN: per seed);
                the base model scored on the same cells makes it a controlled longer-training row too.
  low_data      both kinds trained on exactly n labelled PBC cells per class (`--low-data`, from the base model's
                train part; 10 more per class from its val part calibrate), the diffusion model also on the rest
                of the train part as unlabeled null-class cells, `--low-data-steps` steps each; balanced accuracy
                on the same PBC test cells as in_domain.

Finished models and evaluations are reused (delete a JSON to redo it), so the script can be stopped and rerun.

    python benchmarks/reference.py --data ../shared/data/manifest.csv --diffusion runs/base-pbc --out runs/reference
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np
from _docs import DOCS, environment_prefix, replace_section

from cytoloop.config import load_settings
from cytoloop.data.records import CellRecord, class_interleaved_subset, load_records, select
from cytoloop.models.loading import load_model
from cytoloop.models.recipes import get_recipe
from cytoloop.workflows import evaluate_model, held_out, train_model

OTHER_LABS = ("jtsc", "cellavision", "bccd")
EXPERIMENTS = ("in_domain", "domain_shift", "blasts", "anomaly", "low_data", "views", "stain")
HELD_OUT_CLASSES = ("erythroblast", "immature_granulocyte")
LOW_DATA_VAL_PER_CLASS = 10
# The stain lever: four times the default HED jitter and twice the colour jitter. The cells reach augmentation
# already Reinhard-normalised, so this imitates what normalisation leaves of another lab's stain and camera.
STRONG_STAIN = {"hed_sigma": 0.2, "hed_bias": 0.1, "brightness": 0.3, "contrast": 0.3, "saturation": 0.3}


def train(
    recipe_name: str,
    records: list[CellRecord],
    out: Path,
    seed: int | None = None,
    steps: int | None = None,
    split: dict[str, list[CellRecord]] | None = None,
    unlabeled: list[CellRecord] = (),
    augment: dict | None = None,
) -> Path:
    """The model of a recipe, with another training seed, budget or augmentation if given (the split stays the
    recipe's unless `split` fixes it); reused if `out` already holds it."""
    recipe = get_recipe(recipe_name)
    if not (out / "model.json").is_file():
        overrides = recipe.settings_overrides()
        if augment:
            overrides["augment"] = {**overrides.get("augment", {}), **augment}
        overrides["train"] = {
            **overrides["train"],
            "seed": recipe.seed if seed is None else seed,
            "steps": steps or recipe.steps,
        }
        train_model(
            recipe.model,
            records,
            load_settings(overrides=overrides),
            out,
            classes=list(recipe.classes) if recipe.classes else None,
            unlabeled=unlabeled,
            split_seed=recipe.seed,
            progress=True,
            split=split,
        )
    return out


def per_class(records: list[CellRecord], n: int, seed: int = 0) -> list[CellRecord]:
    """n cells of each class, drawn with a fixed seed from the cells sorted by id (the same cells on any machine)."""
    rng = random.Random(seed)
    chosen: list[CellRecord] = []
    for label in sorted({r.label for r in records}):
        group = sorted((r for r in records if r.label == label), key=lambda r: r.cell_id)
        if len(group) < n:
            raise SystemExit(f"class {label} has {len(group)} cells, fewer than the {n} per class asked for")
        chosen += rng.sample(group, n)
    return chosen


def evaluate(
    model_dir: Path,
    name: str,
    records: list[CellRecord],
    out: Path,
    anomaly: list[CellRecord] = (),
    per_cell: bool = False,
) -> dict:
    """Evaluate once and keep the report (with timing) as out/<model>/<name>.json; a kept report is reused."""
    path = out / model_dir.name / f"{name}.json"
    if path.is_file():
        return json.loads(path.read_text())
    began = time.perf_counter()
    report = evaluate_model(
        load_model(model_dir),
        records,
        path,
        anomaly_records=anomaly,
        anomaly_label="blast",
        progress=True,
        per_cell=per_cell,
    )
    report["eval_seconds"] = time.perf_counter() - began
    path.write_text(json.dumps(report, indent=1))
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="the combined manifest of all labs")
    parser.add_argument("--diffusion", type=Path, required=True, help="the diffusion model (recipe base-pbc)")
    parser.add_argument("--out", type=Path, default=Path("runs/reference"))
    parser.add_argument("--cnn-seeds", default="0,1,2")
    parser.add_argument("--cnn-steps", type=int, default=get_recipe("base-pbc-cnn").steps)
    parser.add_argument(
        "--test-cells", type=int, default=None, help="this many PBC test cells, classes interleaved (default: all)"
    )
    parser.add_argument(
        "--blast-cells", type=int, default=None, help="this many ALL-IDB2 cells, blasts and normal interleaved"
    )
    parser.add_argument(
        "--anomaly-cells", type=int, default=300, help="cells of each held-out class, and of the known test cells x2"
    )
    parser.add_argument("--anomaly-steps", type=int, default=None, help="default: the anomaly recipes' budget")
    parser.add_argument("--low-data", default="10,50", help="labelled training cells per class, comma-separated")
    parser.add_argument("--low-data-steps", type=int, default=3000)
    parser.add_argument("--views-cells", type=int, default=400, help="test cells of the views experiment")
    parser.add_argument("--stain-steps", type=int, default=3000, help="training steps of each stain-lever model")
    parser.add_argument("--stain-test-cells", type=int, default=800, help="PBC test cells of the stain experiment")
    parser.add_argument("--experiments", default=",".join(EXPERIMENTS))
    parser.add_argument("--write-docs", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args()
    experiments = args.experiments.split(",")
    unknown = sorted(set(experiments) - set(EXPERIMENTS))
    if unknown:
        parser.error(f"unknown experiment(s) {', '.join(unknown)}; valid: {', '.join(EXPERIMENTS)}")

    records = load_records(args.data)
    diffusion = load_model(args.diffusion)
    pbc = select([r for r in records if r.label], ["pbc"], diffusion.classes)
    cnns = [(args.out / f"cnn-seed{s}", int(s)) for s in args.cnn_seeds.split(",")]
    results: dict = {"models": {}, "args": {k: str(v) for k, v in vars(args).items()}}
    # the diffusion model first: its figures are the ones the CNNs are compared against, and it is already trained
    eight_class = {"in_domain", "domain_shift", "blasts"} & set(experiments)
    for model_dir, cnn_seed in ([(args.diffusion, None)] + cnns) if eight_class else []:
        if cnn_seed is not None:
            train("base-pbc-cnn", pbc, model_dir, cnn_seed, args.cnn_steps)
        kind = load_model(model_dir).kind
        row: dict = {"kind": kind, "training": _training_summary(model_dir)}
        if "in_domain" in experiments:
            test = class_interleaved_subset(held_out(pbc, model_dir, part="test")[0], args.test_cells)
            row["in_domain"] = evaluate(model_dir, "in_domain", test, args.out)
        if "domain_shift" in experiments:
            row["domain_shift"] = {}
            for lab in OTHER_LABS:
                cells = select([r for r in records if r.label in diffusion.classes], [lab])
                row["domain_shift"][lab] = evaluate(model_dir, f"shift_{lab}", cells, args.out)
        if "blasts" in experiments:
            allidb2 = class_interleaved_subset(select(records, ["allidb2"]), args.blast_cells)
            row["blasts"] = _blast_report(model_dir, allidb2, args.out)
        results["models"][str(model_dir)] = row
        _save(results, args.out)
    test = class_interleaved_subset(held_out(pbc, args.diffusion, part="test")[0], args.test_cells)
    allidb2 = class_interleaved_subset(select(records, ["allidb2"]), args.blast_cells)
    if "anomaly" in experiments:
        results["anomaly"] = {}
        six = [r for r in pbc if r.label not in HELD_OUT_CLASSES]
        unseen = {
            c: class_interleaved_subset([r for r in pbc if r.label == c], args.anomaly_cells) for c in HELD_OUT_CLASSES
        }
        models = [(args.out / "anomaly6-diffusion", "anomaly-pbc6", None)]
        models += [(args.out / f"anomaly6-cnn-seed{s}", "anomaly-pbc6-cnn", int(s)) for s in args.cnn_seeds.split(",")]
        for model_dir, recipe, seed in models:
            train(recipe, six, model_dir, seed, args.anomaly_steps)
            known = class_interleaved_subset(held_out(six, model_dir, part="test")[0], 2 * args.anomaly_cells)
            row = {"kind": load_model(model_dir).kind, "training": _training_summary(model_dir)}
            row["held_out_classes"] = _held_out_class_report(model_dir, known, unseen, args.out)
            row["blasts"] = _blast_report(model_dir, allidb2, args.out)
            results["anomaly"][str(model_dir)] = row
            _save(results, args.out)
    if "low_data" in experiments:
        results["low_data"] = {}
        train_part = held_out(pbc, args.diffusion, part="train")[0]
        val = per_class(held_out(pbc, args.diffusion, part="val")[0], LOW_DATA_VAL_PER_CLASS)
        for n in [int(n) for n in args.low_data.split(",")]:
            labelled = per_class(train_part, n)
            chosen = {r.cell_id for r in labelled}
            rest = [r for r in train_part if r.cell_id not in chosen]
            split = {"train": labelled, "val": val, "test": []}
            models = [(args.out / f"lowdata{n}-diffusion", "base-pbc", None, rest)]
            models += [
                (args.out / f"lowdata{n}-cnn-seed{s}", "base-pbc-cnn", int(s), []) for s in args.cnn_seeds.split(",")
            ]
            results["low_data"][n] = {}
            for model_dir, recipe, seed, unlabeled in models:
                train(recipe, labelled + val, model_dir, seed, args.low_data_steps, split=split, unlabeled=unlabeled)
                row = {"kind": load_model(model_dir).kind, "training": _training_summary(model_dir)}
                row["in_domain"] = evaluate(model_dir, "in_domain", test, args.out)
                results["low_data"][n][str(model_dir)] = row
                _save(results, args.out)
    if "views" in experiments:
        results["views"] = _views_report(args.diffusion, class_interleaved_subset(test, args.views_cells), args.out)
        _save(results, args.out)
    if "stain" in experiments:
        shifted = {lab: select([r for r in records if r.label in diffusion.classes], [lab]) for lab in OTHER_LABS}
        stain_test = class_interleaved_subset(test, args.stain_test_cells)
        results["stain"] = _stain_report(pbc, stain_test, shifted, args)
        _save(results, args.out)
    # the stain lever has its own section, so running it alone leaves the other experiments' tables as they are
    stain = results.pop("stain", None)
    if set(experiments) - {"stain"}:
        text = render(results, args)
        print(text)
        if args.write_docs:
            replace_section(DOCS, "reference", text, title="Reference experiments on PBC: diffusion classifier vs CNN")
    if stain:
        text = "\n".join(_render_stain(stain, args)).lstrip("\n") + "\n"
        print(text)
        if args.write_docs:
            replace_section(DOCS, "reference-stain", text, title="Lever: stain augmentation in training")


def _save(results: dict, out: Path) -> None:
    """Write this run's results into out/reference.json, keeping what earlier runs of other experiments wrote."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "reference.json"
    kept = json.loads(path.read_text()) if path.is_file() else {}
    kept.update({key: value for key, value in results.items() if value})
    path.write_text(json.dumps(kept, indent=1, default=float))


def _views_report(model_dir: Path, cells: list[CellRecord], out: Path) -> dict:
    """The same cells scored as cropped and with a random rotation/flip per trial (each evaluation kept and
    reused), and the paired-bootstrap intervals of the differences (dihedral minus identity)."""
    from cytoloop.policy.promotion import difference_intervals
    from cytoloop.workflows import evaluate_model

    reports = {}
    for views in ("identity", "dihedral"):
        path = out / "views" / f"{model_dir.name}-{views}.json"
        if not path.is_file():
            model = load_model(model_dir)
            model.scoring_config = model.scoring_config.model_copy(update={"trial_views": views})
            began = time.perf_counter()
            report = evaluate_model(model, cells, path, per_cell=True, progress=True)
            report["eval_seconds"] = time.perf_counter() - began
            path.write_text(json.dumps(report, indent=1))
        reports[views] = json.loads(path.read_text())
    intervals, n = difference_intervals(reports["dihedral"], reports["identity"])
    return {
        "n_cells": n,
        "difference_intervals": {k: list(v) for k, v in intervals.items()},
        **{
            views: {k: r[k] for k in ("balanced_accuracy", "ece", "denoiser_evals_per_cell")}
            for views, r in reports.items()
        },
    }


def _stain_report(
    pbc: list[CellRecord], test: list[CellRecord], shifted: dict[str, list[CellRecord]], args: argparse.Namespace
) -> dict:
    """Each kind trained with the default augmentation and with STRONG_STAIN (same split, seed and budget), and
    the base model (`--diffusion`: the diffusion recipe at its full budget, default augmentation), all scored on
    the same cells. Rows keyed by model directory; pairs: strong minus default per kind and seed, and the base
    model minus the short diffusion model (a controlled longer-training row)."""
    from cytoloop.policy.promotion import difference_intervals

    def scored(model_dir: Path, prefix: str = "") -> dict:
        reports = {"in_domain": evaluate(model_dir, f"{prefix}in_domain", test, args.out, per_cell=True)}
        for lab, cells in shifted.items():
            reports[lab] = evaluate(model_dir, f"{prefix}shift_{lab}", cells, args.out, per_cell=True)
        return reports

    def row(model_dir: Path, augmentation: str, reports: dict) -> dict:
        figures = ("balanced_accuracy", "ece", "n_cells", "intervals")
        return {
            "kind": load_model(model_dir).kind,
            "augmentation": augmentation,
            "training": _training_summary(model_dir),
            **{where: {k: r[k] for k in figures} for where, r in reports.items()},
            "restricted": {lab: _restricted(reports[lab]) for lab in shifted},
        }

    def pair(comparison: str, kind: str, seed: int | None, minuend: dict, subtrahend: dict) -> dict:
        differences = {where: difference_intervals(minuend[where], subtrahend[where])[0] for where in minuend}
        return {"comparison": comparison, "kind": kind, "seed": seed, **differences}

    models = [("diffusion", "base-pbc", None)] + [("cnn", "base-pbc-cnn", int(s)) for s in args.cnn_seeds.split(",")]
    rows: dict = {}
    pairs: list[dict] = []
    short_diffusion: dict = {}
    for kind, recipe, seed in models:
        reports: dict = {}
        for arm, augment in (("default", None), ("strong", STRONG_STAIN)):
            name = f"stain-{arm}-{kind}" + ("" if seed is None else f"-seed{seed}")
            model_dir = train(recipe, pbc, args.out / name, seed, args.stain_steps, augment=augment)
            reports[arm] = scored(model_dir)
            rows[name] = row(model_dir, arm, reports[arm])
        kind_name = rows[name]["kind"]
        pairs.append(pair("strong - default augmentation", kind_name, seed, reports["strong"], reports["default"]))
        if kind == "diffusion":
            short_diffusion = reports["default"]
    # the base model's evaluations are named apart: its in_domain.json is the in-domain experiment's, on other cells
    base = scored(args.diffusion, prefix="stain_")
    rows[args.diffusion.name] = row(args.diffusion, "default", base)
    steps = rows[args.diffusion.name]["training"]["steps"]
    pairs.append(pair(f"{steps} - {args.stain_steps} steps", "diffusion", None, base, short_diffusion))
    return {"augment": STRONG_STAIN, "rows": rows, "pairs": pairs}


def _restricted(report: dict) -> dict[str, float]:
    """A lab's cells decided among the classes that lab has (argmax over them; its per-cell probabilities), and the
    share of its cells the model, deciding among all its classes, put in a class the lab lacks."""
    from cytoloop.evaluation import metrics

    probs, labels = np.asarray(report["per_cell"]["probs"]), np.asarray(report["per_cell"]["labels"])
    present = np.unique(labels)
    restricted = present[probs[:, present].argmax(axis=1)]
    return {
        "balanced_accuracy": metrics.balanced_accuracy(labels, restricted, probs.shape[1]),
        "absent_share": float(np.mean(~np.isin(probs.argmax(axis=1), present))),
    }


def _held_out_class_report(
    model_dir: Path, known: list[CellRecord], unseen: dict[str, list[CellRecord]], out: Path
) -> dict:
    """AUROC of every anomaly score for each held-out class against the known test cells: all cells are scored
    once, then each class is compared with the same known cells."""
    from cytoloop.data.preprocess import load_cells
    from cytoloop.workflows import anomaly_metrics

    path = out / model_dir.name / "held_out_classes.json"
    if path.is_file():
        return json.loads(path.read_text())
    model = load_model(model_dir)
    cells = load_cells(known + [r for group in unseen.values() for r in group], model.data_config, progress=True)
    labels = np.array([r.label for r in cells.records])
    began = time.perf_counter()
    predictions = model.predict(cells.images, progress=True)
    is_known = np.isin(labels, model.classes)
    report: dict = {"eval_seconds": time.perf_counter() - began, "n_known": int(is_known.sum())}
    report["evals_per_cell_known"] = float(predictions.evals[is_known].mean())
    for name in unseen:
        index = np.flatnonzero(is_known | (labels == name))
        report[name] = anomaly_metrics(predictions.subset(index), labels[index] == name)
        report[name]["evals_per_cell"] = float(predictions.evals[labels == name].mean())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1))
    return report


def _blast_report(model_dir: Path, allidb2: list[CellRecord], out: Path) -> dict:
    """Anomaly AUROCs on ALL-IDB2 (blast vs normal): the cells carry no class of the model, so they are scored
    directly rather than through `evaluate_model`'s labelled path."""
    from cytoloop.data.preprocess import load_cells
    from cytoloop.workflows import anomaly_metrics

    path = out / model_dir.name / "blasts.json"
    if path.is_file():
        return json.loads(path.read_text())
    model = load_model(model_dir)
    cells = load_cells(allidb2, model.data_config, progress=True)
    is_blast = np.array([r.label == "blast" for r in cells.records])
    began = time.perf_counter()
    predictions = model.predict(cells.images, progress=True)
    report = anomaly_metrics(predictions, is_blast)
    report.update(
        {
            "eval_seconds": time.perf_counter() - began,
            "evals_per_cell_blast": float(predictions.evals[is_blast].mean()),
            "evals_per_cell_normal": float(predictions.evals[~is_blast].mean()),
        }
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1))
    return report


def _training_summary(model_dir: Path) -> dict:
    training = json.loads((Path(model_dir) / "training.json").read_text())
    settings = training["settings"]["train"]
    return {
        "steps": training["steps"],
        "batch_size": settings["batch_size"],
        "precision": settings["precision"],
        "seed": settings["seed"],
        "train_minutes": training["train_seconds"] / 60,
        "resumed_from_step": training["resumed_from_step"],
        "n_train": training["n_train"],
        "n_val": training["n_val"],
    }


def _ci(report: dict, name: str, digits: int = 3) -> str:
    value = report[name] if name in report else report["per_class_recall"][name.split(" ", 1)[1]]
    low, high = report["intervals"][name]
    return f"{value:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def _seed_spread(rows: dict, value, what: str) -> list[str]:
    """A line with the CNN seeds' mean and spread of one figure (the seed-to-seed noise a difference must beat)."""
    values = [value(row) for row in rows.values() if row["kind"] == "baseline"]
    if len(values) < 2:
        return []
    return [
        "",
        f"CNN over {len(values)} training seeds, {what}: mean {np.mean(values):.3f}, "
        f"min {min(values):.3f}, max {max(values):.3f} (sd {np.std(values, ddof=1):.3f}).",
    ]


def render(results: dict, args: argparse.Namespace) -> str:
    import torch

    lines = [
        f"Command: `python benchmarks/reference.py --data {args.data} --diffusion {args.diffusion} --out {args.out} "
        f"--cnn-seeds {args.cnn_seeds} --cnn-steps {args.cnn_steps}"
        + (f" --test-cells {args.test_cells}" if args.test_cells else "")
        + (f" --blast-cells {args.blast_cells}" if args.blast_cells else "")
        + (f" --anomaly-steps {args.anomaly_steps}" if args.anomaly_steps else "")
        + (f" --anomaly-cells {args.anomaly_cells}" if "anomaly" in results else "")
        + (f" --low-data {args.low_data} --low-data-steps {args.low_data_steps}" if "low_data" in results else "")
        + (f" --views-cells {args.views_cells}" if "views" in results else "")
        + (f" --experiments {args.experiments}" if args.experiments != ",".join(EXPERIMENTS) else "")
        + "`  ",
        f"Machine: {platform.machine()}, {platform.processor() or 'CPU'}, 2 cores, torch threads "
        f"{torch.get_num_threads()}, no GPU. Date: {date.today().isoformat()}. [brackets]: 95 % bootstrap interval "
        "over cells (1,000 resamples).",
        "",
        "Training (PBC train part of split seed 0, or the part each experiment names; batch and precision alike):",
        "",
        "| model | steps | batch | precision | train seed | train cells | train min |",
        "|---|---|---|---|---|---|---|",
    ]
    rows = results["models"]
    trained = {**rows, **results.get("anomaly", {})}
    for by_model in results.get("low_data", {}).values():
        trained.update(by_model)
    for name, row in trained.items():
        t = row["training"]
        minutes = f"{t['train_minutes']:.1f}" + (" (resumed)" if t["resumed_from_step"] else "")
        lines.append(
            f"| {row['kind']} `{name}` | {t['steps']} | {t['batch_size']} | {t['precision']} | {t['seed']} "
            f"| {t['n_train']} | {minutes} |"
        )
    first = next(iter(rows.values()), {})
    if "in_domain" in first:
        classes = list(first["in_domain"]["per_class_recall"])
        lines += [
            "",
            f"In-domain, PBC test cells ({first['in_domain']['n_cells']} cells, 8 classes):",
            "",
            "| model | balanced accuracy | ECE | NLL | accuracy at 90 % coverage | evals/cell | cells/s |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, row in rows.items():
            r = row["in_domain"]
            lines.append(
                f"| {row['kind']} `{Path(name).name}` | {_ci(r, 'balanced_accuracy')} | {_ci(r, 'ece')} | "
                f"{_ci(r, 'nll')} | {_ci(r, 'accuracy_at_90_coverage')} | "
                f"{r['denoiser_evals_per_cell']:.1f} | {r['cells_per_second']:.1f} |"
            )
        lines += _seed_spread(rows, lambda row: row["in_domain"]["balanced_accuracy"], "in-domain balanced accuracy")
        lines += [
            "",
            "Per-class recall:",
            "",
            "| model | " + " | ".join(classes) + " |",
            "|---|" + "---|" * len(classes),
        ]
        for name, row in rows.items():
            r = row["in_domain"]
            lines.append(
                f"| {row['kind']} `{Path(name).name}` | " + " | ".join(_ci(r, f"recall {c}", 2) for c in classes) + " |"
            )
    if "domain_shift" in first:
        lines += [
            "",
            "Domain shift, unadapted (balanced accuracy over the classes each lab has; ECE):",
            "",
            "| model | " + " | ".join(f"{lab} bal. acc | {lab} ECE" for lab in OTHER_LABS) + " |",
            "|---|" + "---|---|" * len(OTHER_LABS),
        ]
        for name, row in rows.items():
            cells = []
            for lab in OTHER_LABS:
                r = row["domain_shift"][lab]
                cells += [_ci(r, "balanced_accuracy"), _ci(r, "ece")]
            lines.append(f"| {row['kind']} `{Path(name).name}` | " + " | ".join(cells) + " |")
        sizes = ", ".join(f"{lab} {first['domain_shift'][lab]['n_cells']}" for lab in OTHER_LABS)
        lines.append(f"\nCells: {sizes}.")
    if "blasts" in first:
        lines += [
            "",
            "ALL-IDB2 blasts vs normal cells, AUROC of each anomaly score (the models never saw a blast):",
            "",
        ]
        for name, row in rows.items():
            r = row["blasts"]
            lines.append(
                f"- {row['kind']} `{Path(name).name}` ({r['anomaly_n_positive']} blasts of "
                f"{r['anomaly_n']} cells): {_auroc_cells(r)}"
            )
    if "anomaly" in results:
        lines += _render_anomaly(results["anomaly"])
    if "low_data" in results:
        lines += _render_low_data(results["low_data"])
    if "views" in results:
        lines += _render_views(results["views"])
    return "\n".join(lines) + "\n"


def _auroc_cells(report: dict) -> str:
    """Every anomaly score's AUROC with its interval, the model's primary score first."""
    return "; ".join(
        f"{'primary' if score == 'anomaly' else score.removeprefix('anomaly_')} "
        f"{report['anomaly_auroc_by_score'].get(score, report['anomaly_auroc']):.3f} [{low:.3f}, {high:.3f}]"
        for score, (low, high) in report["anomaly_auroc_intervals"].items()
    )


def _render_anomaly(rows: dict) -> list[str]:
    lines = [
        "",
        "Anomaly, the reference's protocol: trained on PBC without erythroblasts and immature granulocytes (6 "
        "classes); AUROC of each anomaly score for unseen cells against the model's own held-out test cells of the "
        "six known classes, and for ALL-IDB2 blasts against ALL-IDB2 normal cells:",
        "",
        "| model | steps | known cells | erythroblast vs known | immature granulocyte vs known "
        "| ALL-IDB2 blast vs normal |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        held = row["held_out_classes"]
        lines.append(
            f"| {row['kind']} `{Path(name).name}` | {row['training']['steps']} | {held['n_known']} | "
            f"{_auroc_cells(held['erythroblast'])} | {_auroc_cells(held['immature_granulocyte'])} | "
            f"{_auroc_cells(row['blasts'])} |"
        )
    first = next(iter(rows.values()))["held_out_classes"]
    lines.append(
        f"\nCells: {first['erythroblast']['anomaly_n_positive']} erythroblasts, "
        f"{first['immature_granulocyte']['anomaly_n_positive']} immature granulocytes (none seen in training). "
        "Scores: diffusion primary = null ratio, min_error, null_ratio, gap (the reference's); CNN primary = energy, "
        "max_softmax."
    )
    return lines


def _render_views(views: dict) -> list[str]:
    intervals = views["difference_intervals"]
    lines = [
        "",
        f'Lever: a random rotation/flip per trial (`scoring.trial_views = "dihedral"`), same model, temperature '
        f"and tuned rule, on the same {views['n_cells']} test cells:",
        "",
        "| trials see the cell | balanced accuracy | ECE | evals/cell |",
        "|---|---|---|---|",
    ]
    for name in ("identity", "dihedral"):
        r = views[name]
        lines.append(
            f"| {'as cropped' if name == 'identity' else 'rotated/flipped'} | {r['balanced_accuracy']:.3f} | "
            f"{r['ece']:.3f} | {r['denoiser_evals_per_cell']:.1f} |"
        )
    lines.append(
        "\nDihedral minus as cropped, 95 % paired bootstrap: "
        + "; ".join(f"{k} [{low:+.3f}, {high:+.3f}]" for k, (low, high) in intervals.items())
        + "."
    )
    return lines


def _render_stain(stain: dict, args: argparse.Namespace) -> list[str]:
    wheres = ["in_domain", *OTHER_LABS]
    lines = [
        "",
        f"Command: `{environment_prefix()}python benchmarks/reference.py --data {args.data} "
        f"--diffusion {args.diffusion} "
        f"--out {args.out} --cnn-seeds {args.cnn_seeds} --experiments stain --stain-steps {args.stain_steps} "
        f"--stain-test-cells {args.stain_test_cells}`  ",
        f"Machine: {platform.machine()}, {platform.processor() or 'CPU'}, 2 cores, no GPU. "
        f"Date: {date.today().isoformat()}. [brackets]: 95 % bootstrap interval over cells.",
        "",
        f"Lever: strong stain augmentation in training ({', '.join(f'{k} {v}' for k, v in stain['augment'].items())}; "
        "default: hed_sigma 0.05, hed_bias 0.05, brightness/contrast/saturation 0.15), both kinds from scratch at "
        f"{args.stain_steps} steps, otherwise as their recipes; balanced accuracy (ECE) on {args.stain_test_cells} "
        "PBC test cells and, unadapted, on each other lab. The base model is the diffusion recipe at its full "
        "budget, scored on the same cells:",
        "",
        "| model | augmentation | steps | PBC | " + " | ".join(OTHER_LABS) + " |",
        "|---|---|---|---|" + "---|" * len(OTHER_LABS),
    ]
    for name, row in stain["rows"].items():
        cells = [f"{_ci(row[w], 'balanced_accuracy')} ({row[w]['ece']:.3f})" for w in wheres]
        head = f"| {row['kind']} `{name}` | {row['augmentation']} | {row['training']['steps']} | "
        lines.append(head + " | ".join(cells) + " |")
    lines += [
        "",
        "The same cells of each lab decided among that lab's own classes only (argmax over the classes it has); in "
        "brackets, the share of its cells the model, deciding among all eight, put in a class the lab lacks:",
        "",
        "| model | augmentation | " + " | ".join(OTHER_LABS) + " |",
        "|---|---|" + "---|" * len(OTHER_LABS),
    ]
    for name, row in stain["rows"].items():
        cells = [
            f"{row['restricted'][lab]['balanced_accuracy']:.3f} ({row['restricted'][lab]['absent_share']:.0%})"
            for lab in OTHER_LABS
        ]
        lines.append(f"| {row['kind']} `{name}` | {row['augmentation']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Differences, 95 % paired bootstrap of balanced accuracy over the same cells:",
        "",
        "| comparison | model | seed | PBC | " + " | ".join(OTHER_LABS) + " |",
        "|---|---|---|---|" + "---|" * len(OTHER_LABS),
    ]
    for pair in stain["pairs"]:
        cells = ["[{:+.3f}, {:+.3f}]".format(*pair[w]["balanced_accuracy"]) if pair[w] else "n/a" for w in wheres]
        seed = "" if pair["seed"] is None else pair["seed"]
        lines.append(f"| {pair['comparison']} | {pair['kind']} | {seed} | " + " | ".join(cells) + " |")
    return lines


def _render_low_data(by_n: dict) -> list[str]:
    lines = [
        "",
        f"Low data: n labelled PBC training cells per class (plus {LOW_DATA_VAL_PER_CLASS} per class that calibrate; "
        "the diffusion model also learns its null class from the rest of the train part, unlabeled), balanced "
        "accuracy on the in-domain test cells:",
        "",
        "| labels per class | model | steps | balanced accuracy | ECE | evals/cell |",
        "|---|---|---|---|---|---|",
    ]
    for n, rows in by_n.items():
        for name, row in rows.items():
            r = row["in_domain"]
            lines.append(
                f"| {n} | {row['kind']} `{Path(name).name}` | {row['training']['steps']} | "
                f"{_ci(r, 'balanced_accuracy')} | {_ci(r, 'ece')} | {r['denoiser_evals_per_cell']:.1f} |"
            )
    for n, rows in by_n.items():  # after the table: a paragraph inside it would cut it in two
        lines += _seed_spread(rows, lambda row: row["in_domain"]["balanced_accuracy"], f"{n} per class")
    return lines


if __name__ == "__main__":
    sys.exit(main())

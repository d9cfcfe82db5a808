"""A model card: what a model is, what it was made from and how, how good it is (with intervals), and where not
to trust it. Written into the model directory as MODEL_CARD.md, so the card travels with the weights.

Everything on the card is read from files the model directory already holds (model.json, training.json,
tuning.json, recipe.json) and from evaluation reports (`evaluate_model`'s JSON, or an anomaly report), so the card
cannot claim what was not measured. What no file knows (intended use, known limits) the caller passes as text.
"""

from __future__ import annotations

from pathlib import Path

CARD_FILE = "MODEL_CARD.md"


# the figures of a report the card prints as numbers
FIGURES = (
    "n_cells",
    "balanced_accuracy",
    "accuracy",
    "ece",
    "nll",
    "accuracy_at_90_coverage",
    "denoiser_evals_per_cell",
    "denoiser_evals_p95",
    "anomaly_auroc",
    "anomaly_n",
    "anomaly_n_positive",
)


# the card's table of figures, each with its interval (`_with_interval`, which shows None as '-'); the other figures
# are formatted as they are, so a None there is no figure
TABLE = (
    ("balanced_accuracy", "balanced accuracy"),
    ("accuracy", "accuracy"),
    ("ece", "ECE (15 bins, after temperature)"),
    ("nll", "NLL"),
    ("accuracy_at_90_coverage", "accuracy at 90 % coverage"),
)
SHOWN_AS_DASH = tuple(name for name, _ in TABLE)


def not_figures(report: dict) -> list[str]:
    """What in an evaluation report the card would print as a number and is none: each named, for an error
    message (empty when the report is whole). A figure may be missing; None only where the card shows '-'."""

    def number(value: object) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    def wrong_value(key: str, value: object, none_ok: bool) -> bool:
        return not number(value) and not (value is None and none_ok)

    wrong = [f"{k} is not a number" for k in FIGURES if k in report and wrong_value(k, report[k], k in SHOWN_AS_DASH)]
    for group, none_ok in (("per_class_recall", True), ("anomaly_auroc_by_score", False)):
        values = report.get(group) or {}
        if not isinstance(values, dict):
            wrong.append(f"{group} is not an object")
        else:
            wrong += [f"{group}.{k} is not a number" for k, v in values.items() if wrong_value(k, v, none_ok)]
    for group, none_ok in (("intervals", True), ("anomaly_auroc_intervals", False)):
        values = report.get(group) or {}
        if not isinstance(values, dict):
            wrong.append(f"{group} is not an object")
        else:
            wrong += [
                f"{group}.{k} is not a pair of numbers"
                for k, v in values.items()
                if not (v is None and none_ok) and not (isinstance(v, list) and len(v) == 2 and all(map(number, v)))
            ]
    return wrong


def _with_interval(report: dict, name: str, digits: int = 3) -> str:
    """A figure of the report with its interval; '-' for one the report does not hold (a lab's part of a report
    has no accuracy at 90 % coverage)."""
    if name in report:
        value = report[name]
    elif name.startswith("recall "):
        value = report.get("per_class_recall", {}).get(name.removeprefix("recall "))
    else:
        value = None
    if value is None:
        return "-"
    bounds = report.get("intervals", {}).get(name)
    return f"{value:.{digits}f}" + (f" [{bounds[0]:.{digits}f}, {bounds[1]:.{digits}f}]" if bounds else "")


def _evaluation_section(title: str, report: dict, kind: str) -> list[str]:
    lines = [f"### {title}", ""]
    if "balanced_accuracy" in report:
        lines += [
            f"{report['n_cells']} cells. [brackets]: 95 % bootstrap interval over cells.",
            "",
            "| metric | value |",
            "|---|---|",
        ]
        for name, label in TABLE:
            lines.append(f"| {label} | {_with_interval(report, name)} |")
        if "denoiser_evals_per_cell" in report and kind != "baseline":  # a CNN: one network pass per cell
            lines.append(
                f"| denoiser evaluations per cell (mean, p95) | {report['denoiser_evals_per_cell']:.1f}, "
                f"{report.get('denoiser_evals_p95', float('nan')):.0f} |"
            )
        recalls = [c for c, r in report.get("per_class_recall", {}).items() if r is not None]
        lines += [
            "",
            "Recall per class: " + "; ".join(f"{c} {_with_interval(report, f'recall {c}', 2)}" for c in recalls) + ".",
        ]
    if "anomaly_auroc" in report:
        intervals = report.get("anomaly_auroc_intervals", {})
        scores = {"primary score": report["anomaly_auroc"], **report.get("anomaly_auroc_by_score", {})}
        keys = {"primary score": "anomaly", **{k: k for k in report.get("anomaly_auroc_by_score", {})}}
        if len(lines) > 2:  # after the classification table
            lines.append("")
        lines += [
            f"Anomaly AUROC ({report['anomaly_n_positive']} anomalies of {report['anomaly_n']} cells): "
            + "; ".join(
                f"{name} {value:.3f}"
                + (
                    f" [{intervals[keys[name]][0]:.3f}, {intervals[keys[name]][1]:.3f}]"
                    if keys[name] in intervals
                    else ""
                )
                for name, value in scores.items()
            )
            + "."
        ]
    return lines + [""]


def render_model_card(model_dir: Path, evaluations: dict[str, dict], intended_use: str = "", limits: str = "") -> str:
    """The card as Markdown. `evaluations` maps a section title to an evaluation or anomaly report."""
    from cytoloop.models.base import read_model_record

    model_dir = Path(model_dir)
    meta = read_model_record(model_dir, "model.json")
    if meta is None:
        raise FileNotFoundError(f"{model_dir}: no model.json; not a model directory")
    training = read_model_record(model_dir, "training.json") or {}
    tuning = read_model_record(model_dir, "tuning.json")
    recipe = read_model_record(model_dir, "recipe.json")
    weights = model_dir / "weights.pt"
    size_mb = weights.stat().st_size / 1e6 if weights.is_file() else float("nan")
    kind = meta["kind"]
    lines = [
        f"# Model card: {model_dir.name}",
        "",
        f"A {'class-conditional diffusion' if kind == 'diffusion' else kind} classifier of single blood-cell crops "
        f"into {len(meta['classes'])} classes: {', '.join(meta['classes'])}. Input: any RGB crop centred on one "
        f"cell, prepared by CytoLoop's one preprocessing path ({meta['data']['crop']} crop, "
        f"{meta['data']['stain_normalization']} stain normalisation, {meta['data']['image_size']} px). Weights: "
        f"{size_mb:.1f} MB. Load it as any model directory: `cytoloop info {model_dir}`, "
        f"`cytoloop evaluate --model {model_dir} ...`, `cytoloop register {model_dir} --champion ...`.",
        "",
    ]
    if intended_use:
        lines += ["## Intended use", "", intended_use.strip(), ""]
    lines += ["## Training data", ""]
    for source in training.get("data_sources", []):
        lines.append(
            f"- {source['domain']}: {source['cells']} labelled cells. Source: {source['source'] or 'not given'}."
            f" Licence: {source['license'] or 'not given'}."
        )
    if "n_train" in training:
        lines.append(
            f"- Split (seeded, stratified by class and lab; `split.json`): {training['n_train']} training, "
            f"{training['n_val']} validation cells; the rest is the held-out test part. Evaluations below "
            "leave out the training and validation cells."
        )
    lines.append("")
    lines += ["## How it was made", ""]
    if recipe:
        lines += [
            f"Recipe `{recipe['recipe']}` ({recipe['description']}), reproduced by:",
            "",
            f"    {recipe['command']}",
            "",
        ]
    if training:
        train = training["settings"]["train"]
        precision = "bf16 autocast" if train.get("precision") == "bf16" else "fp32"
        lines.append(
            f"Budget: {training['steps']} steps of batch {train['batch_size']} ({precision}), AdamW lr "
            f"{train['lr']:g}, EMA {train['ema_decay']}, seed {train['seed']}; "
            f"{training['train_seconds'] / 60:.0f} min of training in the last leg"
            + (f" (resumed at step {training['resumed_from_step']})" if training.get("resumed_from_step") else "")
            + f". Temperature {meta['temperature']:.3g}."
        )
    if tuning and tuning.get("chosen"):
        chosen = tuning["chosen"]
        unlabeled = f" + {tuning['n_unlabeled']} unlabeled" if tuning.get("n_unlabeled") else ""
        lines.append(
            f"Scoring tuned on {tuning['n_cells']} validation{unlabeled} cells: min_trials {chosen['min_trials']}, "
            f"elimination p {chosen['elimination_p']:g}, {chosen['evals_mean']:.1f} denoiser evaluations "
            f"per cell, agreeing with {meta['scoring']['tuning_trials']}-trial exhaustive scoring on "
            f"{chosen['agreement']:.3f} of them."
        )
    lines.append("")
    if evaluations:
        lines += ["## Evaluation", ""]
        for title, report in evaluations.items():
            lines += _evaluation_section(title, report, kind)
    if limits:
        lines += ["## Known limits", "", limits.strip(), ""]
    return "\n".join(lines)


def write_model_card(model_dir: Path, evaluations: dict[str, dict], intended_use: str = "", limits: str = "") -> Path:
    """Write MODEL_CARD.md into the model directory; returns its path."""
    path = Path(model_dir) / CARD_FILE
    path.write_text(render_model_card(model_dir, evaluations, intended_use, limits))
    return path

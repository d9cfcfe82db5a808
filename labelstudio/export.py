"""Consensus labels out: a training manifest for `cytoloop train --data`, and a report for the senior hematologist.

The manifest has the columns `cytoloop.data.records.read_manifest` reads (path, label, domain; paths absolute) plus
provenance: which annotators, how they voted, when the last label came, which model versions they were shown and
what those predicted. Only cells with an agreed consensus on a real class go in; "other/unknown", "artefact",
ties and cells still waiting for labels stay out (the report counts them).
"""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

from cytoloop.errors import UsageError
from cytoloop.files import replaced
from cytoloop.policy.consensus import annotator_agreement, consensus, pairwise_agreement
from labelstudio.agreement import fleiss, pair_kappas
from labelstudio.label_config import EXTRA_CHOICES, NEW_CLASS_PREFIX
from labelstudio.store import LabelStore, cell_key

COLUMNS = [
    "path",
    "label",
    "domain",
    "cell_id",
    "site",
    "annotators",
    "votes",
    "labelled_at",
    "model_versions",
    "model_labels",
    "abnormal",
]


def review_report(store: LabelStore, labels_required: int) -> dict:
    """Consensus status counts, per-annotator and pairwise agreement (raw and chance-corrected: Cohen's kappa per
    pair, Fleiss' kappa for the project), and the cells for senior review."""
    labels = store.labels()
    votes = store.votes(labels)
    decided = consensus(votes, labels_required)
    kappas = pair_kappas(votes)
    return {
        "cells": len(decided),
        "status": dict(Counter(c.status for c in decided.values())),
        "annotators": annotator_agreement(votes),
        "pairs": {
            f"{a} / {b}": {**v, "kappa": kappas[(a, b)]["kappa"]} for (a, b), v in pairwise_agreement(votes).items()
        },
        "fleiss_kappa": fleiss(votes, labels_required),
        "audit": audit_error_rate(labels, decided),
        "senior_review": [
            {"cell": c.cell_key, "status": c.status, "votes": c.votes, "abnormal": c.abnormal}
            for c in decided.values()
            if c.senior_review
        ],
    }


def audit_error_rate(labels: list, decided: dict) -> dict:
    """Among audited cells (auto-accepted, then asked blind) with a consensus: how often the model was wrong."""
    audited = {cell_key(label.site, label.cell_id): label.model_label for label in labels if label.reason == "audit"}
    judged = [
        (model, decided[key].label)
        for key, model in audited.items()
        if key in decided and decided[key].status == "agreed"
    ]
    wrong = sum(model != truth for model, truth in judged)
    return {"cells": len(judged), "model_wrong": wrong, "error_rate": wrong / len(judged) if judged else None}


def export_manifest(store: LabelStore, out: Path, labels_required: int, images_root: Path | None = None) -> dict:
    """Write the consensus labels as a manifest CSV; returns counts of what went in and what stayed out.

    A cell's image path comes from its task's data, which any Label Studio member can edit through the API: with
    `images_root` (`stack.images_root`, where CytoLoop puts the cells it routes) a path outside it stays out
    (`left_out["image outside images_root"]`), so an edited task cannot make training read another file. A relative
    path stays out too (`left_out["image path not absolute"]`): this process would check it against its working
    folder and `read_manifest` read it from the manifest's, two files.

    Cells whose consensus is a class the model lacks (`new:<name>`, named by the annotators) go to a manifest of
    their own beside it, `<out stem>.new-classes.csv`, labelled `<name>`: kept for a model trained with that class
    (`cytoloop train --data`), and out of the fine-tuning manifest, whose classes must be the model's.

    Two cells of one image file (one crop routed for two sites, or a task edited to point at another's image) are
    one row if their labels agree and none if they do not (`left_out["same image, other label"]`): a manifest
    listing a file twice is refused whole by `read_manifest`, so every export after it failed to train."""
    labels = store.labels()
    decided = consensus(store.votes(labels), labels_required)
    root = None if images_root is None else Path(images_root).resolve()
    by_cell: dict[str, list] = {}
    for label in labels:
        by_cell.setdefault(cell_key(label.site, label.cell_id), []).append(label)
    rows, new_rows, left_out = [], [], Counter()
    by_image: dict[Path, list[dict]] = {}  # in key order: the first cell of an image is the one kept
    for key, result in sorted(decided.items()):
        if result.status != "agreed":
            left_out[result.status] += 1
            continue
        if result.label in EXTRA_CHOICES:
            left_out[result.label] += 1
            continue
        cell_labels = by_cell[key]
        first = cell_labels[-1]
        if not Path(first.image_path).is_absolute():  # routed cells' paths are: relative to what was never said
            left_out["image path not absolute"] += 1
            continue
        image = Path(first.image_path).resolve()
        if root is not None and not image.is_relative_to(root):
            left_out["image outside images_root"] += 1
            continue
        by_image.setdefault(image, []).append(
            {
                "path": first.image_path,
                "label": result.label,
                "domain": first.domain or first.site,
                "cell_id": first.cell_id,
                "site": first.site,
                "annotators": ";".join(result.annotators),
                "votes": ";".join(f"{k}={v}" for k, v in result.votes.items()),
                "labelled_at": result.last_labelled_at,
                "model_versions": ";".join(sorted({label.model_version for label in cell_labels})),
                "model_labels": ";".join(sorted({label.model_label for label in cell_labels})),
                "abnormal": int(result.abnormal),
            }
        )
    for cells in by_image.values():
        if len({cell["label"] for cell in cells}) > 1:
            left_out["same image, other label"] += len(cells)
            continue
        new_class = cells[0]["label"].startswith(NEW_CLASS_PREFIX)
        (new_rows if new_class else rows).append(
            {**cells[0], "label": cells[0]["label"].removeprefix(NEW_CLASS_PREFIX)}
        )
        if len(cells) > 1:
            left_out["same image as another cell"] += len(cells) - 1
    out = Path(out)
    if not rows and not new_rows and (listed := _data_lines(out)):
        # a store with no consensus (a wrong home, a store a read-only command just created) replaced a manifest
        # of earlier labels with an empty one
        raise UsageError(
            f"{out}: no consensus labels to export (left out: {dict(left_out) or 'none'}), and the {listed} lines "
            "it holds were left as they were; remove it first to write an empty manifest"
        )
    _write(out, rows)
    report = {"exported": len(rows), "left_out": dict(left_out), "path": str(out)}
    new_path = out.with_name(f"{out.stem}.new-classes.csv")
    if new_rows:
        _write(new_path, new_rows)
        report["new_classes"] = {"path": str(new_path), "cells": dict(Counter(r["label"] for r in new_rows))}
    else:  # an earlier export's new-class cells no longer have consensus: its file must not outlive them
        new_path.unlink(missing_ok=True)
    return report


def _data_lines(path: Path) -> int:
    """The lines after the header of a file already at `path` (0 when there is none)."""
    try:
        with open(path, "rb") as handle:
            return max(sum(1 for line in handle if line.strip()) - 1, 0)
    except FileNotFoundError:
        return 0


def _write(out: Path, rows: list[dict]) -> None:
    """A manifest CSV, whole or not at all (`cytoloop.files.replaced`: two exports at once never mix)."""
    with replaced(out, newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)

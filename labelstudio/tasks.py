"""A routed cell as a Label Studio task: what the hematologist sees, and what we need back to use the label.

One task per (site, cell, model version): `task_key` names it, the outbox keys on it, and a push skips keys the
project already holds, so routing the same cells again never duplicates a task. A newer model version routing the
same cell makes a new task (the question asked differs: another prediction is shown), unless the cell already has
its consensus (`ReviewLoop.route`).

An `audit` task asks about a cell the model accepted, to measure how often auto-accepted cells are wrong; shown
the model's answer, an annotator anchors on it and the audit measures agreement, not error. So an audit task
carries no pre-annotation and none of the model's fields (label, confidence, anomaly score, routing reason):
`hidden_context` returns them for CytoLoop's label store, where annotators cannot read them. Review and anomaly
tasks keep their pre-annotation.

A cell is named by what it is, not where it lies: `cell_uid` is a hash of the image's bytes, the `cell_id` the
classifier service gives the same image. Two batches of one site whose files share names (`batch1/001.png`,
`batch2/001.png`, or two manifests of bare file names) are two cells; the same image routed again, from any
folder, is the same cell. The file's own name stays in the task (`cell_name`) for the person who reads it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from cytoloop.data.records import cell_id
from cytoloop.errors import CytoLoopError
from cytoloop.policy.routing import RoutedCell
from labelstudio.label_config import prediction_result


class TaskError(CytoLoopError, ValueError):
    """A cell that cannot become a task (for example an image Label Studio is not allowed to serve)."""


@dataclass(frozen=True)
class CellContext:
    """What routing does not know about a cell: where it came from and which model looked at it."""

    image_path: Path
    site: str
    domain: str
    model_version: str
    classes: tuple[str, ...]
    name: str = ""  # the cell's name in its dataset (its relative path), shown to people


def cell_uid(image_path: Path | str) -> str:
    """The cell's identity: the content hash the classifier service gives the same image (`records.cell_id`),
    so a served answer and a routed task name a cell alike."""
    return cell_id(Path(image_path).read_bytes())


def task_key(site: str, cell_id: str, model_version: str) -> str:
    return f"{site}:{cell_id}@{model_version}"


def image_url(image_path: Path, images_root: Path) -> str:
    """Label Studio's local-files URL of an image under `images_root`.

    Label Studio's document root is the PARENT of `images_root` (it refuses a project storage equal to the root
    itself), so the URL path starts with the images folder's name.
    """
    path, root = Path(image_path).resolve(), Path(images_root).resolve()
    if not path.is_relative_to(root):
        raise TaskError(
            f"{path} is outside Label Studio's image folder {root} (set stack.images_root / "
            "CYTOLOOP_STACK__IMAGES_ROOT to a folder holding the cells)"
        )
    return "/data/local-files/?d=" + quote(str(path.relative_to(root.parent)))


MODEL_FIELDS = ("reason", "model_label", "confidence", "anomaly")  # what an audit task must not show


def build_task(routed: RoutedCell, context: CellContext, images_root: Path) -> dict:
    """The import payload of one task: data shown in the UI plus, except for audits, the model's prediction as a
    pre-annotation."""
    cell = routed.cell
    key = task_key(context.site, cell.cell_id, context.model_version)
    data = {
        "image": image_url(context.image_path, images_root),
        "task_key": key,
        "cell_id": cell.cell_id,
        "cell_name": context.name,
        "sample_id": cell.sample_id,
        "site": context.site,
        "domain": context.domain,
        "image_path": str(Path(context.image_path).resolve()),
        "model_version": context.model_version,
        "classes": list(context.classes),
        **hidden_context(routed),
    }
    if routed.reason == "audit":
        return {"data": {k: v for k, v in data.items() if k not in MODEL_FIELDS}}
    prediction = {
        "model_version": context.model_version,
        "score": float(cell.confidence),
        "result": prediction_result(cell.label),
    }
    return {"data": data, "predictions": [prediction]}


def hidden_context(routed: RoutedCell) -> dict:
    """The model's side of a routed cell: kept in the task for review, in the label store alone for audits."""
    cell = routed.cell
    return {
        "reason": routed.reason,
        "model_label": cell.label,
        "confidence": round(float(cell.confidence), 4),
        "anomaly": round(float(cell.anomaly), 4),
    }

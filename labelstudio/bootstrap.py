"""One Label Studio project per site, with its webhook and image folder; running this twice creates nothing twice.

A project is found by its title (`ReviewConfig.project_title` with the site filled in). An existing project gets
the classes of a new model ADDED to its label config (never removed: labels already given must stay valid), and
`maximum_annotations` set to the number of
labels a cell needs, so a task stays in the queue until that many hematologists have labelled it.

Label Studio serves `/data/local-files/?d=...` only for files under a local storage attached to the project, so
each project gets one pointing at the images folder (never synced: we import tasks ourselves).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from cytoloop.errors import UsageError
from labelstudio.label_config import build_label_config, config_classes

if TYPE_CHECKING:
    from label_studio_sdk import LabelStudio

SECRET_HEADER = "X-CytoLoop-Secret"
WEBHOOK_ACTIONS = ["ANNOTATION_CREATED", "ANNOTATIONS_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_DELETED"]


def project_title(template: str, site: str) -> str:
    title = template.format(site=site)
    if not 3 <= len(title) <= 50:
        raise UsageError(f"project title {title!r} must have 3 to 50 characters (Label Studio's limit)")
    return title


def ensure_project(client: LabelStudio, title: str, classes: Sequence[str], labels_required: int) -> int:
    """The id of the project with this title, created or updated to review cells of `classes`."""
    existing = [p for p in client.projects.list() if p.title == title]
    if len(existing) > 1:
        raise UsageError(f"{len(existing)} Label Studio projects are titled {title!r}; rename or delete the extras")
    if not existing:
        project = client.projects.create(
            title=title,
            label_config=build_label_config(classes),
            maximum_annotations=labels_required,
            show_collab_predictions=True,
        )
        return project.id
    project = client.projects.get(id=existing[0].id)
    config = build_label_config(list(dict.fromkeys([*config_classes(project.label_config or ""), *classes])))
    changes = {}
    if (project.label_config or "").strip() != config.strip():
        changes["label_config"] = config
    if project.maximum_annotations != labels_required:
        changes["maximum_annotations"] = labels_required
    if changes:
        client.projects.update(id=project.id, **changes)
    return project.id


def ensure_labels_required(client: LabelStudio, project_id: int, labels_required: int) -> None:
    """The project's `maximum_annotations` set to the labels a cell needs, for a project no push reaches too: a
    `review.labels_required` raised since it was made let its tasks leave the queue with fewer labels than
    consensus waits for, pending for good."""
    if client.projects.get(id=project_id).maximum_annotations != labels_required:
        client.projects.update(id=project_id, maximum_annotations=labels_required)


def ensure_webhook(client: LabelStudio, project_id: int, url: str, secret: str) -> int:
    """The id of the project's webhook to our receiver, created (or its secret and actions refreshed) as needed.

    Our webhooks to another URL (the receiver moved to another port) are deleted: Label Studio would otherwise
    spend its 1 s timeout on a dead address for every annotation. So are twins to our URL (two processes that
    both found none and both made one): each sent every event again, for good.
    """
    headers = {SECRET_HEADER: secret}
    ours = [
        h
        for h in client.webhooks.list(project=str(project_id))
        if h.project == project_id and SECRET_HEADER in (h.headers or {})
    ]
    for stale in (h for h in ours if h.url != url):
        client.webhooks.delete(id=stale.id)
    hooks = sorted((h for h in ours if h.url == url), key=lambda h: h.id)
    for twin in hooks[1:]:
        client.webhooks.delete(id=twin.id)
    if not hooks:
        hook = client.webhooks.create(
            url=url,
            project=project_id,
            send_payload=True,
            send_for_all_actions=False,
            headers=headers,
            actions=WEBHOOK_ACTIONS,
            is_active=True,
        )
        return hook.id
    hook = hooks[0]
    if hook.headers != headers or sorted(hook.actions or []) != sorted(WEBHOOK_ACTIONS) or not hook.is_active:
        client.webhooks.update(
            id=hook.id,
            url=url,
            headers=headers,
            actions=WEBHOOK_ACTIONS,
            is_active=True,
            send_payload=True,
            send_for_all_actions=False,
        )
    return hook.id


def ensure_image_storage(client: LabelStudio, project_id: int, images_root: Path) -> int:
    """The id of the project's local-files storage over `images_root` (what lets Label Studio serve the cells)."""
    path = str(Path(images_root).resolve())
    for storage in client.import_storage.local.list(project=project_id):
        if storage.path == path:
            return storage.id
    storage = client.import_storage.local.create(
        project=project_id, path=path, title="CytoLoop cell images", use_blob_urls=False, recursive_scan=False
    )
    return storage.id

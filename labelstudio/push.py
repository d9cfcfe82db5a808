"""Push the outbox into Label Studio: each site's pending tasks into that site's project, each task once.

Before importing, a push lists the task keys the project already holds: a push that crashed after Label Studio
took a batch but before the outbox recorded it then resumes without duplicating anything. When Label Studio is
unreachable the push stops, the tasks stay pending, and the report says so.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from labelstudio.client import unavailable
from labelstudio.outbox import Outbox

if TYPE_CHECKING:
    from label_studio_sdk import LabelStudio


@dataclass
class PushReport:
    pushed: int = 0
    already_there: int = 0
    pending: int = 0
    error: str | None = None
    projects: dict[str, int] = field(default_factory=dict)


def project_task_keys(client: LabelStudio, project_id: int) -> dict[str, int]:
    """task_key -> task id of every task in a project."""
    keys = {}
    for task in client.tasks.list(project=project_id, fields="task_only", page_size=500):
        key = (task.data or {}).get("task_key")
        if key:
            keys[key] = task.id
    return keys


def push_outbox(
    client: LabelStudio,
    outbox: Outbox,
    ensure_project: Callable[[str, list[str]], int],
    batch: int = 100,
) -> PushReport:
    """Send every pending task; `ensure_project(site, classes)` returns the site's project id (bootstrapping it).

    Returns a report; an unreachable Label Studio ends the push early with `error` set, never an exception.
    """
    report = PushReport()
    try:
        for site, tasks in outbox.pending().items():
            classes = list(dict.fromkeys(c for t in tasks for c in t["data"]["classes"]))  # every model's, in order
            project_id = ensure_project(site, classes)
            report.projects[site] = project_id
            existing = project_task_keys(client, project_id)
            keys = [t["data"]["task_key"] for t in tasks]
            found = {key: existing[key] for key in keys if key in existing}
            if found:
                outbox.mark_pushed(project_id, found)
                report.already_there += len(found)
            todo = [t for t, key in zip(tasks, keys) if key not in existing]
            for start in range(0, len(todo), batch):
                chunk = todo[start : start + batch]
                response = client.projects.import_tasks(id=project_id, request=chunk, return_task_ids=True)
                ids = list(response.task_ids or [])
                if len(ids) != len(chunk):  # cannot pair ids with keys: ask the project instead
                    existing = project_task_keys(client, project_id)
                    ids = [existing[t["data"]["task_key"]] for t in chunk]
                outbox.mark_pushed(project_id, {t["data"]["task_key"]: i for t, i in zip(chunk, ids)})
                report.pushed += len(chunk)
    except Exception as error:
        if not unavailable(error):
            raise
        report.error = f"Label Studio unavailable: {error}"
    report.pending = outbox.counts()["pending"]
    return report

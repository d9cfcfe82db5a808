"""Labels back from Label Studio: apply stored webhook events, then poll every project for what they missed.

Webhooks are fast but not guaranteed (the receiver was down, Label Studio's 1 s timeout fired, an event was lost):
the poll lists every task's annotations and upserts them, and retracts stored labels whose annotation is gone.
Both paths feed the same idempotent store (`store.LabelStore`), so running them in any order, any number of times,
or killing one half-way and running it again leaves each label in the store exactly once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from labelstudio.store import LabelStore

if TYPE_CHECKING:
    from label_studio_sdk import LabelStudio


@dataclass
class SyncReport:
    events: int = 0
    seen: int = 0
    changed: int = 0
    retracted: int = 0


def _as_dict(item) -> dict:
    return item if isinstance(item, dict) else item.model_dump(mode="json")


def sync(
    client: LabelStudio,
    store: LabelStore,
    project_ids: Iterable[int],
    on_annotation: Callable[[int], None] | None = None,
) -> SyncReport:
    """Bring the store up to date with Label Studio for these projects.

    `on_annotation(n)` is called after the n-th annotation is stored (progress; tests use it to interrupt a sync
    half-way). A project whose listing did not complete retracts nothing.
    """
    report = SyncReport(events=store.process_events())
    store.set_annotators({u.id: u.email for u in client.users.list()})
    for project_id in project_ids:
        present: set[int] = set()
        for task in client.tasks.list(project=project_id, fields="all", page_size=200):
            task_dict = _as_dict(task)
            for annotation in task_dict.get("annotations") or []:
                annotation = _as_dict(annotation)
                present.add(int(annotation["id"]))
                report.changed += store.upsert(annotation, task_dict, source="poll")
                report.seen += 1
                if on_annotation is not None:
                    on_annotation(report.seen)
        report.retracted += store.retract_missing(project_id, present)
    return report

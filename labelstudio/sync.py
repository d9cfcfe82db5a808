"""Labels back from Label Studio: apply stored webhook events, then poll every project for what they missed.

Webhooks are fast but not guaranteed (the receiver was down, Label Studio's 1 s timeout fired, an event was lost):
the poll lists every task's annotations and upserts them, and retracts stored labels whose annotation Label Studio
confirms is gone (`sync`).
Both paths feed the same idempotent store (`store.LabelStore`), so running them in any order, any number of times,
or killing one half-way and running it again leaves each label in the store exactly once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from labelstudio.client import described
from labelstudio.store import LabelStore

if TYPE_CHECKING:
    from label_studio_sdk import LabelStudio


logger = logging.getLogger(__name__)

PAGE_SIZE = 200  # tasks per listing request


@dataclass
class SyncReport:
    events: int = 0
    seen: int = 0
    changed: int = 0
    retracted: int = 0
    restored: int = 0
    unchecked: int = 0  # stored labels left as they were: Label Studio failed to answer whether they still exist


def as_dict(item) -> dict:
    """An SDK object (or a dict already) as Label Studio's JSON."""
    return item if isinstance(item, dict) else item.model_dump(mode="json")


def sync(
    client: LabelStudio,
    store: LabelStore,
    project_ids: Iterable[int],
    server: str,
    on_annotation: Callable[[int], None] | None = None,
    page_size: int = PAGE_SIZE,
) -> SyncReport:
    """Bring the store up to date with Label Studio for these projects, and for every other project this server's
    live labels came from: a project deleted since (a trial round's, say) had its labels count as votes for good,
    never asked about; now each is retracted as Label Studio confirms it gone, and a renamed one is still read.

    A listing is no evidence that an annotation is gone: a label stored by a webhook while the pages go by, or a
    task on a page that shifted because another was deleted, is simply not in it. So retraction needs evidence:
    only annotations live in the store BEFORE the listing began can be missing from it, and each of those is
    retracted only when Label Studio, asked for it directly, answers 404. A retracted annotation that a listing
    shows again is restored when Label Studio, asked directly, still holds it.

    Everything is keyed by `server` (`client.server_identity`): the store's labels from another Label Studio, a
    recreated one whose ids start again at 1, are neither listed, overwritten nor retracted here. Labels stored
    before identities existed are adopted by this server first (`LabelStore.adopt`).

    `on_annotation(n)` is called after the n-th annotation is stored (progress; tests use it to act half-way). A
    project whose listing did not complete retracts nothing. A direct question Label Studio fails to answer (an
    error other than 404, a timeout) leaves that project's remaining questions for the next sync (counted as
    `unchecked`, their labels as they were) and the poll goes on to the next project: it raised, and one
    annotation Label Studio kept failing on stopped every later project's labels from coming back by poll.
    """
    from label_studio_sdk.core.api_error import ApiError

    unanswered = _unanswered()
    store.adopt(server)
    report = SyncReport(events=store.process_events())
    store.set_annotators({u.id: u.email for u in client.users.list()}, server)
    given = list(project_ids)
    for project_id in given + sorted(store.live_projects(server) - set(given)):
        before = store.live_ids(project_id, server)  # what this listing must account for
        present: set[int] = set()
        reappeared: list[tuple[dict, dict]] = []
        try:
            for task in client.tasks.list(project=project_id, fields="all", page_size=page_size):
                task_dict = as_dict(task)
                for annotation in task_dict.get("annotations") or []:
                    annotation = as_dict(annotation)
                    present.add(int(annotation["id"]))
                    if store.is_retracted(int(annotation["id"]), server):
                        reappeared.append((annotation, task_dict))
                    report.changed += store.upsert(annotation, task_dict, "poll", server)
                    report.seen += 1
                    if on_annotation is not None:
                        on_annotation(report.seen)
        except ApiError as error:  # a deleted project lists nothing: each stored label is asked about below
            if error.status_code != 404 or present or _project_exists(client, project_id):
                raise
        # asked directly: each stored label the listing lacked (gone: retracted), each retracted one it showed
        # again (still held: restored, with the task it was listed in)
        questions: list[tuple[int, dict | None]] = [(annotation_id, None) for annotation_id in sorted(before - present)]
        questions += [(int(annotation["id"]), listed_in) for annotation, listed_in in reappeared]
        for asked, (annotation_id, listed_in) in enumerate(questions):
            try:
                current = _fetch(client, annotation_id)
            except unanswered as error:
                report.unchecked += len(questions) - asked
                logger.warning(
                    f"project {project_id}: Label Studio failed to say whether annotation {annotation_id} still "
                    f"exists ({described(error)}); {len(questions) - asked} stored label(s) left as they were "
                    "until the next sync"
                )
                break
            if listed_in is None and current is None:
                report.retracted += store.retract(annotation_id, project_id, server)
            elif listed_in is not None and current is not None:
                report.restored += store.restore(as_dict(current), listed_in, server)
    return report


def _fetch(client: LabelStudio, annotation_id: int) -> object | None:
    """The annotation as Label Studio holds it now, or None when it answers 404 (deleted). Any other failure
    raises: a poll that cannot ask retracts nothing."""
    from label_studio_sdk.core.api_error import ApiError

    try:
        return client.annotations.get(id=annotation_id)
    except ApiError as error:
        if error.status_code == 404:
            return None
        raise


def _project_exists(client: LabelStudio, project_id: int) -> bool:
    """Whether Label Studio still has the project (a 404 is the only "no"; any other failure raises)."""
    from label_studio_sdk.core.api_error import ApiError

    try:
        client.projects.get(id=project_id)
    except ApiError as error:
        if error.status_code == 404:
            return False
        raise
    return True


def _unanswered() -> tuple[type[Exception], ...]:
    """What a direct question to Label Studio raises when it was not answered (any error but 404, a timeout)."""
    import httpx
    from label_studio_sdk.core.api_error import ApiError

    return (ApiError, httpx.HTTPError)

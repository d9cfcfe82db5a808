"""Push the outbox into Label Studio: each site's pending tasks into that site's project, each task once.

Before importing, a push lists the task keys the project already holds: a push that crashed after Label Studio took
a batch but before the outbox recorded it then resumes without duplicating anything. When Label Studio is
unreachable, or refuses us rather than a task (our token: 401/403; too many requests: 429), the push stops, the
tasks stay pending, and the report says so; a task Label Studio refuses is marked with its error and an attempt
(parked after `outbox.MAX_ATTEMPTS`) and never holds back the others. A site whose project cannot be made or listed
keeps its tasks pending, with no attempt counted against them: that is no fault of theirs. Nor is an answer of 500
or above to every task of a site (Label Studio failing, say its database locked under load, while it still lists
projects): a task refused with a server error is blamed only when Label Studio took another task (of any site) in
the same push; every task was blamed before, and a few minutes of failing parked the whole queue for good. A push
first asks which Label Studio it reaches (`client.server_identity`): tasks another one took, whose cells have no
consensus yet, are sent to this one too (`Outbox.resend_elsewhere`), so replacing Label Studio loses no open task;
so are tasks of a project it no longer has (deleted, perhaps made again under the same title: `Outbox.resend_lost`).

An import that got no answer (a timeout, a killed push) can be committed by Label Studio after the next push listed
the project and sent the task again. While the outbox watches such a task (`Outbox.watched`), each push lists its
project and deletes the task's twins that hold no label, keeping the one the outbox recorded; a twin with labels
stays (the label store counts one vote per person and cell, so nothing is counted twice). Label Studio does not
say whether someone has a twin open: a label submitted on it after its deletion is refused by Label Studio, and
the annotator meets the cell again in the kept task.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from labelstudio.client import server_identity, unavailable
from labelstudio.outbox import Outbox

if TYPE_CHECKING:
    from label_studio_sdk import LabelStudio

logger = logging.getLogger(__name__)


@dataclass
class PushReport:
    pushed: int = 0
    already_there: int = 0
    pending: int = 0
    failed: int = 0  # tasks Label Studio refused this time (marked in the outbox with the error)
    resent: int = 0  # tasks another Label Studio, or a project since deleted, had taken: queued again
    twins_removed: int = 0  # late-committed second copies of a task, deleted (see the module's docstring)
    error: str | None = None
    site_errors: dict[str, str] = field(default_factory=dict)  # sites whose project failed; their tasks wait
    projects: dict[str, int] = field(default_factory=dict)


def project_task_keys(client: LabelStudio, project_id: int) -> dict[str, int]:
    """task_key -> task id of every task in a project (the last listed, where a key has twins)."""
    return {key: tasks[-1].id for key, tasks in project_tasks(client, project_id).items()}


def project_tasks(client: LabelStudio, project_id: int) -> dict[str, list]:
    """task_key -> the project's tasks of that key, in listing order (more than one: twins)."""
    by_key: dict[str, list] = {}
    for task in client.tasks.list(project=project_id, fields="task_only", page_size=500):
        key = (task.data or {}).get("task_key")
        if key:
            by_key.setdefault(key, []).append(task)
    return by_key


def push_outbox(
    client: LabelStudio,
    outbox: Outbox,
    ensure_project: Callable[[str, list[str]], int],
    batch: int = 100,
    server: str | None = None,
    settled: Collection[str] = (),
) -> PushReport:
    """Send every pending task; `ensure_project(site, classes)` returns the site's project id (bootstrapping it).

    `server` is the identity of the Label Studio `client` reaches (asked when not given); tasks another server
    took are sent again unless their cell is in `settled` (cell keys, `store.cell_key`, whose consensus is in).

    Failures stay with what failed: a batch Label Studio refuses is sent again task by task, and a task it
    refuses on its own is marked with the error and an attempt (`Outbox.mark_failed`) while the rest go through;
    a site whose project cannot be made or listed keeps its tasks pending, untouched, and is named in
    `site_errors` (counting it against them parked every task of a site after a few rounds of, say, a locked
    database). An unreachable Label Studio, or one refusing our token, ends the push early with `error` set.
    Never an exception for Label Studio's answers. Pushes of one outbox run one at a time (`Outbox.push_lock`,
    across processes), so two at once cannot import a task twice.
    """
    report = PushReport()
    with outbox.push_lock():  # a second push (the label service's poll, `review route`) waits, then finds them there
        _push_all(client, outbox, ensure_project, batch, report, server, settled)
    report.pending = outbox.counts()["pending"]
    return report


def _push_all(
    client, outbox: Outbox, ensure_project, batch: int, report: PushReport, server: str | None, settled
) -> None:
    try:
        server = server or server_identity(client)
        report.resent = outbox.resend_elsewhere(server, settled)
        try:
            live = [p.id for p in client.projects.list()]
        except Exception as error:  # a listing that fails leaves the check for the next push
            if stops_the_push(error):
                raise
            logger.warning(f"push: the project listing failed, deleted projects are checked next time: {error}")
        else:
            report.resent += outbox.resend_lost(server, live, settled)
        doubtful: dict[str, dict[str, str]] = {}  # site -> task key -> the server error it was answered with
        for site, tasks in outbox.pending().items():
            try:
                doubtful[site] = _push_site(client, outbox, ensure_project, site, tasks, batch, report, server)
            except Exception as error:
                if stops_the_push(error):
                    raise
                report.site_errors[site] = _describe(error)
                logger.warning(f"push: site {site}'s project failed, its tasks wait: {_describe(error)}")
        _blame_server_errors(outbox, doubtful, report)
        report.twins_removed = _remove_twins(client, outbox, server)
    except Exception as error:
        if not stops_the_push(error):
            raise
        report.error = f"Label Studio cannot take tasks now: {error}"


def stops_the_push(error: BaseException) -> bool:
    """Label Studio can take nothing now: unreachable, or refusing us rather than a task (401/403: our token;
    429: too many requests). No task is to blame, so none gets an attempt."""
    return unavailable(error) or getattr(error, "status_code", 0) in (401, 403, 429)


def _server_error(error: BaseException) -> bool:
    """An answer of 500 or above (those `unavailable` leaves out): Label Studio failing as likely as the task."""
    return (getattr(error, "status_code", 0) or 0) >= 500


def _blame_server_errors(outbox: Outbox, doubtful: dict[str, dict[str, str]], report: PushReport) -> None:
    """Tasks answered with a server error (500 or above) are blamed, an attempt each, only when Label Studio took
    another task in this push, of any site (it works, so the fault is theirs: a task it always fails on is
    parked in the end); when it took none, it is failing, and no task is blamed: each such site's tasks wait, the
    site named in `site_errors`."""
    for site, failed in doubtful.items():
        if not failed:
            continue
        if report.pushed:
            for key, error in failed.items():
                outbox.mark_failed([key], error)
            report.failed += len(failed)
        else:
            first = next(iter(failed.values()))
            report.site_errors[site] = f"Label Studio failed on all {len(failed)} tasks sent: {first}"
            logger.warning(f"push: Label Studio failed on site {site}'s tasks, which wait: {first}")


def _push_site(
    client, outbox, ensure_project, site: str, tasks: list[dict], batch: int, report: PushReport, server: str
) -> dict[str, str]:
    """Push one site's tasks; returns those answered with a server error (`_blame_server_errors` decides)."""
    doubtful: dict[str, str] = {}  # task key -> the server error it was answered with

    def refused(task: dict, error: Exception) -> None:
        key = task["data"]["task_key"]
        if _server_error(error):
            doubtful[key] = _describe(error)
        else:
            outbox.mark_failed([key], _describe(error))
            report.failed += 1

    classes = list(dict.fromkeys(c for t in tasks for c in t["data"]["classes"]))  # every model's, in order
    project_id = ensure_project(site, classes)
    report.projects[site] = project_id
    existing = project_task_keys(client, project_id)
    keys = [t["data"]["task_key"] for t in tasks]
    found = {key: existing[key] for key in keys if key in existing}
    if found:
        outbox.mark_pushed(server, project_id, found)
        report.already_there += len(found)
    todo = [t for t, key in zip(tasks, keys) if key not in existing]
    for start in range(0, len(todo), batch):
        chunk = todo[start : start + batch]
        try:
            _import(client, outbox, project_id, chunk, server)
            report.pushed += len(chunk)
        except Exception as error:
            if stops_the_push(error):
                raise
            if len(chunk) == 1:  # this task's own refusal
                refused(chunk[0], error)
                continue
            # the failure may have come after Label Studio took the chunk (our own bookkeeping failed): ask which
            # of its tasks are there, so the retry one by one imports none of them twice
            there = project_task_keys(client, project_id)
            landed = {
                t["data"]["task_key"]: there[t["data"]["task_key"]] for t in chunk if t["data"]["task_key"] in there
            }
            if landed:
                outbox.mark_pushed(server, project_id, landed)
                report.pushed += len(landed)
            for task in [t for t in chunk if t["data"]["task_key"] not in landed]:  # find the one it refuses
                try:
                    _import(client, outbox, project_id, [task], server)
                    report.pushed += 1
                except Exception as single:
                    if stops_the_push(single):
                        raise
                    refused(task, single)
    return doubtful


def _remove_twins(client, outbox: Outbox, server: str) -> int:
    """Delete the unlabelled twins of the tasks the outbox watches (see the module's docstring); returns how many.
    A project that cannot be listed now is left for the next push."""
    removed = 0
    for project_id, keep in outbox.watched(server).items():
        try:
            removed += _remove_project_twins(client, project_id, keep)
        except Exception as error:
            if stops_the_push(error):
                raise
            logger.warning(f"push: project {project_id}'s twins are checked next time: {_describe(error)}")
    return removed


def _remove_project_twins(client, project_id: int, keep: dict[str, int]) -> int:
    """Delete a project's twins of the watched keys (`keep`: key -> the task id the outbox recorded). Only where
    the recorded task is listed under its key (else the twin may be the only copy), and each twin is asked for
    again just before it goes, so a label submitted since the listing keeps it."""
    removed = 0
    listed = project_tasks(client, project_id)
    for key, kept in keep.items():
        tasks = listed.get(key, [])
        if kept not in {task.id for task in tasks}:
            continue
        for twin in (task for task in tasks if task.id != kept):
            now = client.tasks.get(id=twin.id)
            if now.total_annotations or now.cancelled_annotations:
                logger.warning(f"push: task {twin.id} twins task {kept}, kept: labelled")
                continue
            client.tasks.delete(id=twin.id)
            removed += 1
            logger.warning(f"push: task {twin.id}, a late-committed twin of {kept}, deleted")
    return removed


def _import(client, outbox: Outbox, project_id: int, chunk: list[dict], server: str) -> None:
    keys = [t["data"]["task_key"] for t in chunk]
    outbox.mark_sending(keys)
    try:
        # sent once: the SDK sends again by itself after a 5xx or a dropped connection, which an import may follow
        # having committed (a proxy's 504), and its twins went unwatched as one send answered (`mark_sending`)
        response = client.projects.import_tasks(
            id=project_id, request=chunk, return_task_ids=True, request_options={"max_retries": 0}
        )
    except Exception as error:
        if not unavailable(error):  # an answer, if a refusal: Label Studio took none of them
            outbox.mark_answered(keys)
        raise
    ids = list(response.task_ids or [])
    if len(ids) != len(chunk):  # cannot pair ids with keys: ask the project instead
        existing = project_task_keys(client, project_id)
        ids = [existing[t["data"]["task_key"]] for t in chunk]
    outbox.mark_pushed(server, project_id, dict(zip(keys, ids)))


def _describe(error: Exception) -> str:
    body = getattr(error, "body", None)
    return f"{type(error).__name__}: {getattr(error, 'status_code', '')} {body if body is not None else error}"[:500]

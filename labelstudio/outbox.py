"""The outbox: routed cells wait here, durably, until Label Studio has them.

Routing writes tasks here first and pushes second, so a Label Studio that is down (or a push that crashes) loses
nothing: the rows stay `pending` and the next push sends them. Keyed by task key (site, cell, model version), so
routing the same cells twice queues them once.

A pushed row remembers which Label Studio took it (`labelstudio.client.server_identity`, as the label store keys
labels). When the lab replaces its Label Studio (a new server or a migration loses the projects), the first push to
the new one sends again every task the old one took whose cell has no consensus yet (`resend_elsewhere`); without
that, the unlabelled cells would stay "pushed" to a server that no longer exists and never be asked again. Rows
pushed before identities were kept (server NULL) are adopted by the first server a push reaches, as the label
store's are: upgrade, then push once against the same Label Studio.

An import that got no answer (a timeout, a dropped connection, a push killed mid-request) may still be committed by
Label Studio later, after the next push listed the project and imported the task again: two tasks of one key. Each
row counts the imports sent for it that no answer accounted for (`mark_sending`); a row pushed with more than one
such import is watched for `DUPLICATE_WATCH` (`watched`), and each push in that time removes the extra tasks of its
key that nobody has labelled (`labelstudio.push`).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Collection, Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cytoloop.files import locked
from labelstudio import sqlite
from labelstudio.store import cell_key

logger = logging.getLogger(__name__)

# PRAGMA user_version of the file. 1: rows without the server that took them; 2: `server`; 3: `sends` and
# `watch_until`, for imports that got no answer (`_migrate` goes 1 -> 2 -> 3)
SCHEMA_VERSION = 3
SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    task_key TEXT PRIMARY KEY,
    site TEXT NOT NULL,
    task TEXT NOT NULL,
    queued_at TEXT NOT NULL,
    project_id INTEGER,
    task_id INTEGER,
    pushed_at TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    server TEXT,
    sends INTEGER NOT NULL DEFAULT 0,
    watch_until TEXT
);
"""


MAX_ATTEMPTS = 5  # a task Label Studio refused this often waits for a person (`failures`), not for the next push
# how long a task imported more than once without an answer is checked for a late-committed twin: far longer than
# Label Studio's server takes to finish (or abandon) a request whose client gave up
DUPLICATE_WATCH = timedelta(hours=1)


def _now() -> str:
    return datetime.now(UTC).isoformat()


class Outbox:
    def __init__(self, path: Path | str):
        self.path = Path(path)
        self._migrate()
        sqlite.initialise(self.path, SCHEMA, SCHEMA_VERSION)

    def _migrate(self) -> None:
        """Bring an older outbox to this schema: the first format gets its `server` column (NULL: pushed to a server
        not recorded), the second its `sends` and `watch_until` (no import in doubt)."""
        if not self.path.is_file():
            return
        with sqlite.transaction(self.path) as db:
            columns = {r["name"] for r in db.execute("PRAGMA table_info(outbox)")}
            if not columns or "sends" in columns:
                return
            if "server" not in columns:
                db.execute("ALTER TABLE outbox ADD COLUMN server TEXT")
                logger.info("outbox %s: migrated to tasks keyed by Label Studio server", self.path)
            db.execute("ALTER TABLE outbox ADD COLUMN sends INTEGER NOT NULL DEFAULT 0")
            db.execute("ALTER TABLE outbox ADD COLUMN watch_until TEXT")

    def enqueue(self, tasks: Iterable[dict]) -> int:
        """Queue task payloads (see `tasks.build_task`); returns how many were new."""
        rows = [(t["data"]["task_key"], t["data"]["site"], json.dumps(t), _now()) for t in tasks]
        with sqlite.transaction(self.path) as db:
            before = db.total_changes
            db.executemany("INSERT OR IGNORE INTO outbox (task_key, site, task, queued_at) VALUES (?, ?, ?, ?)", rows)
            return db.total_changes - before

    def known(self, keys: Iterable[str]) -> set[str]:
        """Which of these task keys were queued before (pushed or not)."""
        keys = list(keys)
        with sqlite.transaction(self.path) as db:
            found = set()
            for start in range(0, len(keys), 500):
                chunk = keys[start : start + 500]
                marks = ",".join("?" * len(chunk))
                found |= {r[0] for r in db.execute(f"SELECT task_key FROM outbox WHERE task_key IN ({marks})", chunk)}
        return found

    def pending(self) -> dict[str, list[dict]]:
        """Tasks not yet in Label Studio, per site, in queue order; a task Label Studio refused `MAX_ATTEMPTS`
        times is parked (counted as `failed`, with its last error) instead of being sent again."""
        by_site: dict[str, list[dict]] = {}
        with sqlite.transaction(self.path) as db:
            rows = db.execute(
                "SELECT site, task FROM outbox WHERE pushed_at IS NULL AND attempts < ? ORDER BY queued_at, task_key",
                (MAX_ATTEMPTS,),
            )
            for row in rows:
                by_site.setdefault(row["site"], []).append(json.loads(row["task"]))
        return by_site

    def failures(self) -> list[tuple[str, int, str]]:
        """Tasks Label Studio refused, not pushed since: (task key, attempts, last error)."""
        with sqlite.connect(self.path) as db:
            rows = db.execute(
                "SELECT task_key, attempts, last_error FROM outbox WHERE pushed_at IS NULL AND attempts > 0 "
                "ORDER BY task_key"
            ).fetchall()
        return [(r["task_key"], r["attempts"], r["last_error"]) for r in rows]

    def mark_sending(self, keys: Iterable[str]) -> None:
        """Count an import of these tasks about to be sent; its answer (`mark_pushed`, `mark_answered`) accounts
        for it. One that never gets an answer (a timeout, a killed push) stays counted: Label Studio may commit it
        later."""
        with sqlite.transaction(self.path) as db:
            db.executemany("UPDATE outbox SET sends = sends + 1 WHERE task_key = ?", [(key,) for key in keys])

    def mark_answered(self, keys: Iterable[str]) -> None:
        """Label Studio answered an import of these tasks with an error: it took none of them, so that import is
        accounted for."""
        with sqlite.transaction(self.path) as db:
            db.executemany("UPDATE outbox SET sends = MAX(sends - 1, 0) WHERE task_key = ?", [(key,) for key in keys])

    def mark_pushed(self, server: str, project_id: int, task_ids: dict[str, int]) -> None:
        """Record that Label Studio `server` holds these tasks (task key -> its task id) in `project_id`, from an
        import's answer or from a listing of the project. The task found accounts for one import sent; if more
        were sent without an answer, a late one may still land as a twin, so the row is watched (`watched`)."""
        now = datetime.now(UTC)
        until = (now + DUPLICATE_WATCH).isoformat()
        with sqlite.transaction(self.path) as db:
            db.executemany(
                "UPDATE outbox SET server = ?, project_id = ?, task_id = ?, pushed_at = ?, last_error = NULL, "
                "watch_until = CASE WHEN sends > 1 THEN ? ELSE watch_until END, sends = 0 WHERE task_key = ?",
                [(server, project_id, task_id, now.isoformat(), until, key) for key, task_id in task_ids.items()],
            )

    def watched(self, server: str) -> dict[int, dict[str, int]]:
        """Tasks `server` holds that may have a late-committed twin (see `mark_pushed`), per project: task key ->
        the task id the outbox recorded, the one to keep."""
        by_project: dict[int, dict[str, int]] = {}
        with sqlite.connect(self.path) as db:
            rows = db.execute(
                "SELECT task_key, project_id, task_id FROM outbox WHERE server = ? AND pushed_at IS NOT NULL "
                "AND watch_until > ?",
                (server, _now()),
            )
            for row in rows:
                by_project.setdefault(row["project_id"], {})[row["task_key"]] = row["task_id"]
        return by_project

    def resend_elsewhere(self, server: str, settled: Collection[str] = ()) -> int:
        """Make pending again every task another Label Studio took, unless its cell (`store.cell_key`: site and
        cell id) is in `settled` (its labels are already in, a consensus); returns how many. Rows pushed before
        servers were recorded are first adopted by `server`. Call it with the server a push is about to reach."""
        with sqlite.transaction(self.path) as db:
            db.execute("UPDATE outbox SET server = ? WHERE pushed_at IS NOT NULL AND server IS NULL", (server,))
            rows = db.execute(
                "SELECT task_key, server, task FROM outbox WHERE pushed_at IS NOT NULL AND server != ?", (server,)
            ).fetchall()
            again = _requeue(db, rows, settled)
        for old, n in Counter(row["server"] for row in again).items():
            logger.warning(f"outbox: {n} task(s) Label Studio {old} took will be sent again to {server}")
        return len(again)

    def resend_lost(self, server: str, projects: Collection[int], settled: Collection[str] = ()) -> int:
        """Make pending again every task `server` took into a project it no longer has (not among `projects`, its
        project ids now: deleted, perhaps made again under the same title), unless its cell is in `settled`;
        returns how many. Without this the outbox counted them delivered and their cells were never asked."""
        projects = set(projects)
        with sqlite.transaction(self.path) as db:
            rows = db.execute(
                "SELECT task_key, project_id, task FROM outbox WHERE pushed_at IS NOT NULL AND server = ?", (server,)
            ).fetchall()
            again = _requeue(db, [row for row in rows if row["project_id"] not in projects], settled)
        for project, n in Counter(row["project_id"] for row in again).items():
            logger.warning(f"outbox: {n} task(s) of project {project}, gone from Label Studio, will be sent again")
        return len(again)

    def mark_failed(self, keys: Iterable[str], error: str) -> None:
        with sqlite.transaction(self.path) as db:
            db.executemany(
                "UPDATE outbox SET attempts = attempts + 1, last_error = ? WHERE task_key = ?",
                [(error, key) for key in keys],
            )

    @contextmanager
    def push_lock(self) -> Iterator[None]:
        """Hold the outbox's push lock (an OS file lock beside it, so it holds across processes and is released
        by the kernel if its holder dies) for one push."""
        with locked(self.path.with_suffix(".push.lock")):
            yield

    def counts(self) -> dict[str, int]:
        with sqlite.transaction(self.path) as db:
            row = db.execute(
                "SELECT COUNT(*) AS n, SUM(pushed_at IS NULL) AS pending, "
                "SUM(pushed_at IS NULL AND attempts >= ?) AS failed FROM outbox",
                (MAX_ATTEMPTS,),
            ).fetchone()
        pending = row["pending"] or 0
        return {"queued": row["n"], "pending": pending, "pushed": row["n"] - pending, "failed": row["failed"] or 0}


def _requeue(db, rows: list, settled: Collection[str]) -> list:
    """Make these pushed rows pending again, as if never sent, except those whose cell is `settled`; returns them."""
    again = []
    for row in rows:
        data = json.loads(row["task"])["data"]
        if cell_key(data["site"], data.get("cell_id", "")) not in settled:
            again.append(row)
    db.executemany(
        "UPDATE outbox SET server = NULL, project_id = NULL, task_id = NULL, pushed_at = NULL, attempts = 0, "
        "last_error = NULL, sends = 0, watch_until = NULL WHERE task_key = ?",
        [(row["task_key"],) for row in again],
    )
    return again

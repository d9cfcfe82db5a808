"""The label store: every hematologist's label, exactly once, in one SQLite file.

Rows are keyed by the Label Studio server's identity and its annotation id, so however often an annotation
arrives (webhook, poll, a replay of either, a sync killed half-way and run again) it is one row, and a recreated
or migrated Label Studio, whose ids start again at 1, never overwrites or retracts the labels of the old one. The
identity (`labelstudio.client.server_identity`: its organisation's id and creation time) comes with every webhook
(the receiver's URL carries it) and every poll. Rows stored before identities existed (server '') are adopted by
the first server that syncs (`adopt`): upgrade, then sync once against the same Label Studio (docs/review-loop.md).

- a create or an update replaces the row, unless the row already holds a newer version (`updated_at`);
- a delete retracts the row (kept, with `retracted_at`, for provenance). A late replay of a create never brings
  it back (Label Studio never reuses an annotation id); only Label Studio answering for that annotation itself
  (`restore`, after a listing wrongly retracted it) does;
- a replay of what is already stored changes nothing.

Webhook events are first written here raw (`events`), in the request, so the receiver can answer within Label
Studio's 1 s timeout; `process_events` turns them into rows afterwards. Each event is applied and marked done in
one transaction, so a crash never applies an event twice or loses it. An applied event's body (Label Studio sends
the whole project with each, kilobytes) is emptied `EVENT_BODY_DAYS` after it was applied (`forget_applied_bodies`):
its labels are rows by then, and the table grew by every event for ever. A quarantined event keeps its body.

The file is opened in WAL mode with a busy timeout: the webhook receiver and a sync may write at the same time.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cytoloop.policy.consensus import Vote
from cytoloop.times import parse_time
from labelstudio import sqlite
from labelstudio.label_config import parse_result

logger = logging.getLogger(__name__)

# 1: keyed by annotation id alone; 2: keyed by (server, annotation id), task_context (`_migrate` goes 1 -> 2)
SCHEMA_VERSION = 2  # PRAGMA user_version of the file
EVENT_BODY_DAYS = 7  # an applied webhook event's body is kept this long (for a person to look at), then emptied
SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    received_at TEXT NOT NULL,
    body TEXT NOT NULL,
    processed_at TEXT,
    error TEXT,
    server TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS events_pending ON events (id) WHERE processed_at IS NULL;
CREATE TABLE IF NOT EXISTS annotations (
    server TEXT NOT NULL DEFAULT '',
    annotation_id INTEGER NOT NULL,
    project_id INTEGER,
    task_id INTEGER,
    task_key TEXT,
    cell_id TEXT,
    sample_id TEXT,
    site TEXT,
    domain TEXT,
    image_path TEXT,
    model_version TEXT,
    model_label TEXT,
    annotator_id INTEGER,
    label TEXT,
    abnormal INTEGER NOT NULL DEFAULT 0,
    comment TEXT NOT NULL DEFAULT '',
    was_cancelled INTEGER NOT NULL DEFAULT 0,
    created_at TEXT,
    updated_at TEXT,
    source TEXT,
    stored_at TEXT NOT NULL,
    retracted_at TEXT,
    PRIMARY KEY (server, annotation_id)
);
CREATE INDEX IF NOT EXISTS annotations_project ON annotations (server, project_id);
CREATE INDEX IF NOT EXISTS annotations_id ON annotations (annotation_id, task_key);
CREATE TABLE IF NOT EXISTS task_context (
    task_key TEXT PRIMARY KEY,
    reason TEXT NOT NULL,
    model_label TEXT NOT NULL,
    confidence REAL,
    anomaly REAL
);
CREATE TABLE IF NOT EXISTS annotators (
    server TEXT NOT NULL DEFAULT '',
    annotator_id INTEGER NOT NULL,
    email TEXT NOT NULL,
    PRIMARY KEY (server, annotator_id)
);
"""

# stores written before server identities: their tables get the `server` column ('') and the new keys
_MIGRATE_V1 = """
ALTER TABLE annotations RENAME TO annotations_v1;
ALTER TABLE annotators RENAME TO annotators_v1;
DROP INDEX IF EXISTS annotations_project;
ALTER TABLE events ADD COLUMN server TEXT NOT NULL DEFAULT '';
"""

TASK_FIELDS = ("task_key", "cell_id", "sample_id", "site", "domain", "image_path", "model_version", "model_label")
# cell_id: the cell's content hash (`tasks.cell_uid`); its file name travels in the task as cell_name


class NotALabel(ValueError):
    """An annotation that cannot be stored as a label: skipped by a poll (logged, the poll goes on), quarantined
    when it comes as a webhook event."""


class ForeignTask(NotALabel):
    """An annotation whose task CytoLoop did not push: it names no cell to label."""


def _id_or_none(value: object, annotation_id: int, what: str) -> int | None:
    """A Label Studio id in an annotation (its project, task, annotator): an integer, or None when not given."""
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    raise NotALabel(f"annotation {annotation_id}: its {what} is not an id: {value!r:.80}")


def annotation_id_of(item: dict) -> int:
    """An annotation's id as Label Studio sends it, an integer; anything else is a ValueError naming it. Rows are
    keyed by it: `int()` made 1.9 or true annotation 1, and such an event replaced another annotation's label."""
    value = item.get("id") if isinstance(item, dict) else None
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"an annotation id must be an integer, got {value!r}")
    return value


def cell_key(site: str, cell_id: str) -> str:
    return f"{site}:{cell_id}"


def _now() -> str:
    return datetime.now(UTC).isoformat()


@dataclass
class StoredLabel:
    annotation_id: int
    task_key: str
    cell_id: str
    site: str
    domain: str
    image_path: str
    model_version: str
    model_label: str  # the model's label, whether the task showed it or the store kept it (audits)
    annotator: str
    label: str | None
    abnormal: bool
    comment: str
    updated_at: str
    reason: str = ""  # why the cell was routed (review, anomaly, audit); '' for tasks routed before it was kept


class LabelStore:
    """One SQLite file; safe to use from several processes. Every method commits before it returns."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self._next_forget = 0.0  # when `process_events` next empties old applied events' bodies (monotonic)
        self._migrate()
        sqlite.initialise(self.path, SCHEMA, SCHEMA_VERSION)

    def _migrate(self) -> None:
        """Bring a store of the first format (keyed by annotation id alone) to this one, in one transaction."""
        if not self.path.is_file():
            return
        with sqlite.transaction(self.path) as db:
            columns = {r["name"] for r in db.execute("PRAGMA table_info(annotations)")}
            if not columns or "server" in columns:  # new, or already version 2 (files before the pragma too)
                return
            for statement in filter(str.strip, _MIGRATE_V1.split(";")):
                db.execute(statement)
            for statement in filter(str.strip, SCHEMA.split(";")):
                db.execute(statement)
            db.execute(
                f"INSERT INTO annotations (server, {', '.join(sorted(columns))}) "
                f"SELECT '', {', '.join(sorted(columns))} FROM annotations_v1"
            )
            db.execute(
                "INSERT INTO annotators (server, annotator_id, email) SELECT '', annotator_id, email FROM annotators_v1"
            )
            db.execute("DROP TABLE annotations_v1")
            db.execute("DROP TABLE annotators_v1")
        logger.info("label store %s: migrated to labels keyed by Label Studio server", self.path)

    def adopt(self, server: str) -> int:
        """Give rows stored before server identities (server '') to `server`; returns how many. Call it only with
        the Label Studio those rows came from (the first sync after the upgrade does): a legacy row whose
        annotation `server` already holds is the same annotation, so the legacy copy goes."""
        with sqlite.transaction(self.path) as db:
            taken = {
                r["annotation_id"]
                for r in db.execute("SELECT annotation_id FROM annotations WHERE server = ?", (server,))
            }
            legacy = db.execute("SELECT annotation_id FROM annotations WHERE server = ''").fetchall()
            movable = [r["annotation_id"] for r in legacy if r["annotation_id"] not in taken]
            db.executemany(
                "DELETE FROM annotations WHERE server = '' AND annotation_id = ?",
                [(r["annotation_id"],) for r in legacy if r["annotation_id"] in taken],
            )
            db.executemany(
                "UPDATE annotations SET server = ? WHERE server = '' AND annotation_id = ?",
                [(server, i) for i in movable],
            )
            db.execute(
                "INSERT OR IGNORE INTO annotators (server, annotator_id, email) "
                "SELECT ?, annotator_id, email FROM annotators WHERE server = ''",
                (server,),
            )
            db.execute("DELETE FROM annotators WHERE server = ''")
            return len(movable)

    # -- raw webhook events ---------------------------------------------------------------------------------
    def record_event(self, body: bytes | str, server: str = "") -> int:
        """Keep a webhook body as received, with the identity of the server that sent it; cheap enough to run
        inside the request."""
        text = body.decode() if isinstance(body, bytes) else body
        with sqlite.transaction(self.path) as db:
            query = "INSERT INTO events (received_at, body, server) VALUES (?, ?, ?)"
            return db.execute(query, (_now(), text, server)).lastrowid

    def process_events(self, limit: int | None = None) -> int:
        """Apply stored webhook events in arrival order; returns how many were processed.

        An event that cannot be applied, whatever the reason (a body of another shape, a value the database
        refuses), is quarantined: whatever it had written is rolled back, it is marked with its error (counted by
        `event_counts` as failed, shown by `cytoloop status`) and the queue goes on. One bad event must
        never stop every later label. Of a bulk event, only the annotations that cannot be applied are left out
        (the event is marked with their errors). Only a failure to record that (the database itself unusable)
        raises.
        """
        done = 0
        if time.monotonic() >= self._next_forget:  # at most hourly: a scan of the applied events
            self._next_forget = time.monotonic() + 3600
            self.forget_applied_bodies(datetime.now(UTC) - timedelta(days=EVENT_BODY_DAYS))
        while limit is None or done < limit:
            with sqlite.transaction(self.path) as db:
                row = db.execute(
                    "SELECT id, body, server FROM events WHERE processed_at IS NULL ORDER BY id LIMIT 1"
                ).fetchone()
                if row is None:
                    break
                error = None
                db.execute("SAVEPOINT event")
                try:
                    failed = self._apply_event(db, json.loads(row["body"]), row["server"])
                    error = "; ".join(failed) or None
                except Exception as exc:  # quarantine: any failure of this one event
                    db.execute("ROLLBACK TO SAVEPOINT event")
                    error = f"{type(exc).__name__}: {exc}"
                if error is not None:
                    logger.warning(f"webhook event {row['id']} quarantined: {error}")
                db.execute("RELEASE SAVEPOINT event")
                db.execute("UPDATE events SET processed_at = ?, error = ? WHERE id = ?", (_now(), error, row["id"]))
            done += 1
        return done

    def forget_applied_bodies(self, before: datetime) -> int:
        """Empty the bodies of the events applied without error before `before`; returns how many. The event row
        stays (it is counted by `event_counts`); its labels are in `annotations`."""
        with sqlite.transaction(self.path) as db:
            return db.execute(
                "UPDATE events SET body = '' WHERE processed_at < ? AND error IS NULL AND body != ''",
                (before.isoformat(),),
            ).rowcount

    def quarantined(self, limit: int = 20) -> list[tuple[int, str, str]]:
        """The latest events that could not be applied: (event id, received at, error)."""
        with sqlite.connect(self.path) as db:
            rows = db.execute(
                "SELECT id, received_at, error FROM events WHERE error IS NOT NULL ORDER BY id DESC LIMIT ?", (limit,)
            ).fetchall()
        return [(r["id"], r["received_at"], r["error"]) for r in rows]

    def event_counts(self) -> dict[str, int]:
        with sqlite.connect(self.path) as db:
            row = db.execute(
                "SELECT COUNT(*) AS n, SUM(processed_at IS NULL) AS pending, SUM(error IS NOT NULL) AS failed "
                "FROM events"
            ).fetchone()
        return {"received": row["n"], "pending": row["pending"] or 0, "failed": row["failed"] or 0}

    def _apply_event(self, db: sqlite3.Connection, event: dict, server: str) -> list[str]:
        """Apply one event's annotations; the errors of those that could not be applied. Each annotation of a
        bulk event is applied in a savepoint of its own: one bad item kept every good label of its event out
        until the next poll. Other actions (projects, tasks) carry no labels: nothing to do."""
        action = event["action"]
        items: list[Callable[[], object]] = []
        if action in ("ANNOTATION_CREATED", "ANNOTATION_UPDATED"):
            items = [lambda: self._upsert(db, event["annotation"], event["task"], "webhook", server)]
        elif action == "ANNOTATIONS_CREATED":
            tasks = {t["id"]: t for t in event["task"]}

            def upsert(annotation: dict) -> bool:
                if annotation.get("task") not in tasks:
                    raise ValueError(f"its task {annotation.get('task')!r} is not among the event's tasks")
                return self._upsert(db, annotation, tasks[annotation["task"]], "webhook", server)

            items = [lambda a=a: upsert(a) for a in event["annotation"]]
        elif action == "ANNOTATIONS_DELETED":
            project = (event.get("project") or {}).get("id")
            items = [lambda a=a: self._retract(db, annotation_id_of(a), project, server) for a in event["annotations"]]
        failed = []
        for number, item in enumerate(items):
            db.execute("SAVEPOINT item")
            try:
                item()
            except Exception as exc:  # this annotation only
                db.execute("ROLLBACK TO SAVEPOINT item")
                failed.append(f"annotation {number + 1} of {len(items)}: {type(exc).__name__}: {exc}")
            db.execute("RELEASE SAVEPOINT item")
        return failed

    # -- annotations ----------------------------------------------------------------------------------------
    def upsert(self, annotation: dict, task: dict, source: str, server: str = "") -> bool:
        """Store an annotation as Label Studio serialises it (with its task); True when the store changed. An
        annotation that is no label (`NotALabel`: of a task CytoLoop did not push, with no cell_id, or a result of
        another shape) is not stored: it is logged and skipped here (the poll goes on: one such annotation, still
        in Label Studio, stopped every later poll), and quarantined when it comes as a webhook event."""
        try:
            with sqlite.transaction(self.path) as db:
                return self._upsert(db, annotation, task, source, server)
        except NotALabel as error:
            logger.warning(f"label store: skipped {error}")
            return False

    def retract(self, annotation_id: int, project_id: int | None = None, server: str = "") -> bool:
        with sqlite.transaction(self.path) as db:
            return self._retract(db, annotation_id, project_id, server)

    def live_ids(self, project_id: int, server: str = "") -> set[int]:
        """The annotation ids of this server's project's live (not retracted) rows: a poll's snapshot, taken before
        it lists Label Studio, of what the listing must account for."""
        with sqlite.connect(self.path) as db:
            rows = db.execute(
                "SELECT annotation_id FROM annotations WHERE server = ? AND project_id = ? AND retracted_at IS NULL",
                (server, project_id),
            ).fetchall()
        return {r["annotation_id"] for r in rows}

    def live_projects(self, server: str = "") -> set[int]:
        """The projects of this server that live rows came from (one deleted or renamed since among them)."""
        with sqlite.connect(self.path) as db:
            rows = db.execute(
                "SELECT DISTINCT project_id FROM annotations WHERE server = ? AND retracted_at IS NULL", (server,)
            ).fetchall()
        return {r["project_id"] for r in rows if r["project_id"] is not None}

    def is_retracted(self, annotation_id: int, server: str = "") -> bool:
        with sqlite.connect(self.path) as db:
            query = "SELECT retracted_at FROM annotations WHERE server = ? AND annotation_id = ?"
            row = db.execute(query, (server, annotation_id)).fetchone()
        return row is not None and row["retracted_at"] is not None

    def restore(self, annotation: dict, task: dict, server: str = "") -> bool:
        """Bring back a retracted annotation that Label Studio has been asked directly and still holds (a label
        retracted on a listing that missed it). The caller must have that evidence: a listing alone is not."""
        try:
            with sqlite.transaction(self.path) as db:
                changed = db.execute(
                    "UPDATE annotations SET retracted_at = NULL WHERE server = ? "
                    "AND annotation_id = ? AND retracted_at IS NOT NULL",
                    (server, annotation_id_of(annotation)),
                ).rowcount
                # what Label Studio holds replaces the row whatever its time says (it once said no time at all, the
                # upsert declined, and the row came back live with its old data while restore reported nothing)
                return bool(changed) and self._upsert(db, annotation, task, "restore", server, force=True)
        except NotALabel as error:  # stays retracted: a task naming no cell is no label (a row from before)
            logger.warning(f"label store: not restored, {error}")
            return False

    def _upsert(
        self, db: sqlite3.Connection, annotation: dict, task: dict, source: str, server: str, force: bool = False
    ) -> bool:
        annotation_id = annotation_id_of(annotation)
        if not (task.get("data") or {}).get("cell_id"):  # votes are per cell: without one they would all merge
            raise ForeignTask(
                f"annotation {annotation_id}: its task {task.get('id')} names no cell_id "
                "(not a task CytoLoop pushed: imported by hand?)"
            )
        updated_at = str(annotation.get("updated_at") or annotation.get("created_at") or "")
        old = db.execute(
            "SELECT updated_at, retracted_at FROM annotations WHERE server = ? AND annotation_id = ?",
            (server, annotation_id),
        ).fetchone()
        if (
            old is not None
            and not force
            and (old["retracted_at"] is not None or parse_time(old["updated_at"]) >= parse_time(updated_at))
        ):
            return False
        try:
            label, abnormal, comment = parse_result(annotation.get("result") or [])
        except ValueError as error:
            raise NotALabel(f"annotation {annotation_id}: {error}") from None
        data = task.get("data") or {}
        completed_by = annotation.get("completed_by")
        if isinstance(completed_by, dict):
            completed_by = completed_by.get("id")
        ids = {  # what SQLite cannot bind (an object) raised out of the poll as the result's shape did
            what: _id_or_none(value, annotation_id, what)
            for what, value in (
                ("project", annotation.get("project") or task.get("project")),
                ("task", annotation.get("task") or task.get("id")),
                ("annotator", completed_by),
            )
        }
        row = {
            "server": server,
            "annotation_id": annotation_id,
            "project_id": ids["project"],
            "task_id": ids["task"],
            **{f: str(data.get(f, "")) for f in TASK_FIELDS},
            "annotator_id": ids["annotator"],
            "label": label,
            "abnormal": int(abnormal),
            "comment": comment,
            "was_cancelled": int(bool(annotation.get("was_cancelled"))),
            "created_at": str(annotation.get("created_at") or ""),
            "updated_at": updated_at,
            "source": source,
            "stored_at": _now(),
        }
        columns = ", ".join(row)
        updates = ", ".join(f"{c} = excluded.{c}" for c in row if c not in ("server", "annotation_id"))
        db.execute(
            f"INSERT INTO annotations ({columns}) VALUES ({', '.join('?' * len(row))}) "
            f"ON CONFLICT(server, annotation_id) DO UPDATE SET {updates}",
            tuple(row.values()),
        )
        return True

    def _retract(self, db: sqlite3.Connection, annotation_id: int, project_id: int | None, server: str) -> bool:
        old = db.execute(
            "SELECT retracted_at FROM annotations WHERE server = ? AND annotation_id = ?", (server, annotation_id)
        ).fetchone()
        if old is None:  # a delete seen before its create: keep a tombstone so the create cannot arrive later
            db.execute(
                "INSERT INTO annotations (server, annotation_id, project_id, stored_at, retracted_at, source) "
                "VALUES (?, ?, ?, ?, ?, 'delete')",
                (server, annotation_id, project_id, _now(), _now()),
            )
            return True
        if old["retracted_at"] is not None:
            return False
        db.execute(
            "UPDATE annotations SET retracted_at = ? WHERE server = ? AND annotation_id = ?",
            (_now(), server, annotation_id),
        )
        return True

    def keep_context(self, context: dict[str, dict]) -> None:
        """Keep, per task key, the model's side of a routed cell (reason, model label, confidence, anomaly): what
        an audit task must not show its annotator, and what the audit's error rate is measured against."""
        with sqlite.transaction(self.path) as db:
            db.executemany(
                "INSERT INTO task_context (task_key, reason, model_label, confidence, anomaly) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT(task_key) DO NOTHING",
                [(k, c["reason"], c["model_label"], c["confidence"], c["anomaly"]) for k, c in context.items()],
            )

    def set_annotators(self, emails: dict[int, str], server: str = "") -> None:
        """Remember who each of this server's user ids is (for provenance and agreement reports)."""
        with sqlite.transaction(self.path) as db:
            db.executemany(
                "INSERT INTO annotators (server, annotator_id, email) VALUES (?, ?, ?) "
                "ON CONFLICT(server, annotator_id) DO UPDATE SET email = excluded.email",
                [(server, i, email) for i, email in emails.items()],
            )

    # -- reading --------------------------------------------------------------------------------------------
    def labels(self, include_retracted: bool = False) -> list[StoredLabel]:
        """The live labels (not retracted, not cancelled/skipped, with a class chosen), oldest first."""
        query = (
            # an annotation whose user was deleted comes back with no annotator (Label Studio sets it NULL): a voter
            # of its own, as None it broke consensus (sorted against names) for every push, route and export
            "SELECT a.*, COALESCE(u.email, CAST(a.annotator_id AS TEXT), "
            "'deleted user (annotation ' || a.server || '#' || a.annotation_id || ')') AS annotator, "
            "COALESCE(NULLIF(a.model_label, ''), c.model_label, '') AS shown_or_kept_label, "
            "COALESCE(c.reason, '') AS reason FROM annotations a "
            "LEFT JOIN annotators u ON u.server = a.server AND u.annotator_id = a.annotator_id "
            "LEFT JOIN task_context c ON c.task_key = a.task_key "
            "WHERE a.task_key IS NOT NULL AND a.cell_id != '' "
            # a legacy row (server '', from a webhook registered before server identities) of an annotation a
            # server holds for the same task is the same annotation: counted once (`adopt` deletes it at the next
            # sync); another server's annotation that merely shares the id (a recreated server) hides nothing
            "AND NOT (a.server = '' AND EXISTS (SELECT 1 FROM annotations b "
            "WHERE b.annotation_id = a.annotation_id AND b.task_key = a.task_key AND b.server != ''))"
        )
        if not include_retracted:
            query += " AND a.retracted_at IS NULL AND a.was_cancelled = 0 AND a.label IS NOT NULL"
        with sqlite.connect(self.path) as db:
            rows = db.execute(query + " ORDER BY a.updated_at, a.annotation_id").fetchall()
        return [
            StoredLabel(
                annotation_id=r["annotation_id"],
                task_key=r["task_key"],
                cell_id=r["cell_id"],
                site=r["site"],
                domain=r["domain"],
                image_path=r["image_path"],
                model_version=r["model_version"],
                model_label=r["shown_or_kept_label"],
                annotator=r["annotator"],
                label=r["label"],
                abnormal=bool(r["abnormal"]),
                comment=r["comment"],
                updated_at=r["updated_at"],
                reason=r["reason"],
            )
            for r in rows
        ]

    def votes(self, labels: list[StoredLabel] | None = None) -> list[Vote]:
        """Live labels (`labels`, read from the store when not given) as consensus votes, keyed by cell
        (`site:cell_id`), whatever model version routed it: an annotator who saw a cell again under a newer model
        counts once, with their latest label."""
        return [
            Vote(cell_key(label.site, label.cell_id), label.annotator, label.label, label.abnormal, label.updated_at)
            for label in (self.labels() if labels is None else labels)
        ]

    def counts(self) -> dict[str, int]:
        with sqlite.connect(self.path) as db:
            row = db.execute(
                "SELECT COUNT(*) AS n, SUM(retracted_at IS NOT NULL) AS retracted FROM annotations"
            ).fetchone()
        return {"annotations": row["n"], "retracted": row["retracted"] or 0, "live": row["n"] - (row["retracted"] or 0)}

"""The SQLite conventions of the review loop's durable files (outbox, label store), in one place.

WAL mode and a busy timeout, because the webhook receiver, a sync and a push may write at the same time; rows as
`sqlite3.Row`; writes in `BEGIN IMMEDIATE` transactions, so a crash leaves either all of a change or none of it.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cytoloop.errors import CytoLoopError

BUSY_TIMEOUT_S = 30.0  # how long a write waits for another connection's lock before "database is locked"


class SchemaTooNew(CytoLoopError, RuntimeError):
    """A file written by a newer CytoLoop, whose schema this one does not know: it is left untouched."""


def schema_version(path: Path) -> int:
    """The file's schema version (`PRAGMA user_version`; 0 for a file that never recorded one)."""
    with connect(path) as db:
        return int(db.execute("PRAGMA user_version").fetchone()[0])


def initialise(path: Path, schema: str, version: int) -> None:
    """Create the file (and its folder) and the schema if they are missing, and record the schema `version`.

    A file of an older version must have been migrated by its owner before (`LabelStore._migrate`); a file of a
    newer version is refused (`SchemaTooNew`) rather than written with an older idea of its tables."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with connect(path) as db:
        found = int(db.execute("PRAGMA user_version").fetchone()[0])
        if found > version:
            raise SchemaTooNew(
                f"{path} has schema version {found}, newer than this CytoLoop's {version}: upgrade CytoLoop"
            )
        db.execute("PRAGMA journal_mode=WAL")
        db.executescript(schema)
        db.execute(f"PRAGMA user_version = {int(version)}")


@contextmanager
def connect(path: Path) -> Iterator[sqlite3.Connection]:
    """An autocommit connection (each statement its own transaction), closed on exit."""
    db = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
    db.row_factory = sqlite3.Row
    try:
        yield db
    finally:
        db.close()


@contextmanager
def transaction(path: Path) -> Iterator[sqlite3.Connection]:
    """One write transaction, committed when the block ends and rolled back if it raises."""
    with connect(path) as db:
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

"""The journal of an offline scoring run: every answer written down as it arrives, so a run that is stopped (a
killed job, a lost node, Ctrl-C) starts again where it stopped instead of from the first cell.

A JSON-lines file. Its first line names what the answers depend on (`setup`: the model version, the routing
thresholds, the classes allowed, how the model runs); each further line is one scored cell, by its resolved path,
with its answer. A run given a journal reads it first: if the setup is the same, the cells it answers are taken
from it and only the others are scored; if not (another model version, other thresholds), its answers would not be
this run's, so it is moved aside (`OUT.journal.<setup>.old`, named by a hash of its setup) and a new journal
started, and the log says so; a later run of that setup takes its journal back from there. So a run with a stray
setting costs none of the answers of the runs before it. A last line cut short by a kill is ignored. Cells that
could not be scored (an unreadable file) are not written down: the next run tries them again. One run writes a
journal at a time (a lock file beside it, `.OUT.journal.lock`, kept): a second is refused, as its answers would
overwrite the first's.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import IO, TYPE_CHECKING

from cytoloop.errors import UsageError
from cytoloop.files import Locked, locked

if TYPE_CHECKING:
    from cytoloop.serving.inference import CellResult

logger = logging.getLogger(__name__)

KIND = "cytoloop-scores"


class ScoreJournal:
    """Open with the run's `setup` (JSON-able); `answers` holds what an earlier run of the same setup scored
    (resolved path -> CellResult); `write` adds one answer, flushed at once. Use as a context manager."""

    def __init__(self, path: Path, setup: dict):
        self.path = Path(path)
        self.setup = json.loads(json.dumps(setup))  # as it reads back, so the two compare equal
        self._lock = contextlib.ExitStack()
        try:
            lock = self.path.with_name(f".{self.path.name}.lock")
            self._lock.enter_context(locked(lock, wait=False, reentrant=False))
        except Locked:
            raise UsageError(
                f"{self.path} is being written by another scoring run; wait for it, or score into another --out"
            ) from None
        try:
            self._open()
        except BaseException:
            self._lock.close()
            raise

    def _open(self) -> None:
        self.answers: dict[str, CellResult] = {}
        if self.path.is_file():
            self.answers = self._take(*_read(self.path))
        if not self.path.is_file() and self._aside(self.setup).is_file():
            self._aside(self.setup).replace(self.path)  # this setup's journal, set aside by a run of another
            self.answers = self._take(*_read(self.path))
            logger.info(f"{self.path}: the journal of these settings taken back from where another run set it aside")
        fresh = not self.path.is_file()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._handle: IO[str] = self.path.open("w" if fresh else "a", encoding="utf-8")
        if fresh:
            self._line({"journal": KIND, "setup": self.setup})
        elif _cut_short(self.path):
            self._handle.write("\n")  # end the line a kill cut short, so the next answer starts its own

    def _take(self, header: dict | None, rows: list[dict]) -> dict[str, CellResult]:
        """The answers of the journal at `path` (its `header` and `rows`, read once) if it is one of this setup;
        else it is set aside (`_set_aside`) and there are none."""
        from cytoloop.serving.inference import CellResult

        if header == {"journal": KIND, "setup": self.setup}:
            try:
                return {row["path"]: CellResult(**row["result"]) for row in rows}
            except TypeError:  # answers of another CytoLoop's making: not this run's
                pass
        self._set_aside(header)
        return {}

    def _set_aside(self, header: dict | None) -> None:
        """Move the journal of another setup aside, where a run of that setup finds it; one holding no setup (a
        run killed while writing its first line) holds no answers and is removed."""
        if not isinstance(header, dict) or not isinstance(header.get("setup"), dict):
            self.path.unlink()
            return
        aside = self._aside(header["setup"])
        for n in range(1, 1000):  # never over another: a setup's own aside was taken back before it ran again
            if not aside.exists():
                break
            aside = aside.with_name(f"{self._aside(header['setup']).name}.{n}")
        self.path.replace(aside)
        logger.warning(
            f"{self.path}: not a journal of this model and settings; scoring from the start (it is kept as {aside})"
        )

    def _aside(self, setup: dict) -> Path:
        digest = hashlib.sha256(json.dumps(setup, sort_keys=True).encode()).hexdigest()[:12]
        return self.path.with_name(f"{self.path.name}.{digest}.old")

    def write(self, path: str, result: CellResult) -> None:
        self._line({"path": path, "result": asdict(result)})

    def _line(self, entry: dict) -> None:
        self._handle.write(json.dumps(entry) + "\n")
        self._handle.flush()

    def close(self) -> None:
        self._handle.close()
        self._lock.close()

    def __enter__(self) -> ScoreJournal:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _read(path: Path) -> tuple[dict | None, list[dict]]:
    """The header and the complete answer lines of a journal (a line that does not parse is one a kill cut)."""
    entries = []
    # undecodable bytes (a foreign file at the journal's path) fail to parse as a cut line does: a file with no
    # journal header is put aside, not a crash that named no file
    with path.open(encoding="utf-8", errors="replace") as handle:
        for line in handle:
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    if not entries:
        return None, []
    return entries[0], [e for e in entries[1:] if isinstance(e, dict) and "path" in e and "result" in e]


def _cut_short(path: Path) -> bool:
    """Whether the file's last line lacks its newline (the writer was killed mid-line)."""
    with path.open("rb") as handle:
        handle.seek(0, 2)
        if handle.tell() == 0:
            return False
        handle.seek(-1, 2)
        return handle.read(1) != b"\n"

"""The journal of an offline scoring run: every answer written down as it arrives, so a run that is stopped (a
killed job, a lost node, Ctrl-C) starts again where it stopped instead of from the first cell.

A JSON-lines file. Its first line names what the answers depend on (`setup`: the model version, the routing
thresholds, the classes allowed, how the model runs); each further line is one scored cell, by its resolved path,
with its answer. A run given a journal reads it first: if the setup is the same, the cells it answers are taken
from it and only the others are scored; if not (another model version, other thresholds), its answers would not be
this run's, so it is moved aside (`.old`) and a new journal started, and the log says so. A last line cut short by
a kill is ignored. Cells that could not be scored (an unreadable file) are not written down: the next run tries
them again.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import IO, TYPE_CHECKING

if TYPE_CHECKING:
    from cytoloop.serving.inference import CellResult

logger = logging.getLogger(__name__)

KIND = "cytoloop-scores"


class ScoreJournal:
    """Open with the run's `setup` (JSON-able); `answers` holds what an earlier run of the same setup scored
    (resolved path -> CellResult); `write` adds one answer, flushed at once. Use as a context manager."""

    def __init__(self, path: Path, setup: dict):
        from cytoloop.serving.inference import CellResult

        self.path = Path(path)
        self.setup = json.loads(json.dumps(setup))  # as it reads back, so the two compare equal
        self.answers: dict[str, CellResult] = {}
        fresh = True
        if self.path.is_file():
            header, rows = _read(self.path)
            try:
                if header == {"journal": KIND, "setup": self.setup}:
                    self.answers = {row["path"]: CellResult(**row["result"]) for row in rows}
                    fresh = False
            except TypeError:  # answers of another CytoLoop's making
                self.answers = {}
            if fresh:  # kept aside, not wiped: one run with a stray setting must not cost hours of answers
                aside = self.path.with_name(self.path.name + ".old")
                self.path.replace(aside)
                logger.warning(
                    f"{self.path}: not a journal of this model and settings; scoring from the start (it is kept as "
                    f"{aside})"
                )
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._handle: IO[str] = self.path.open("w" if fresh else "a", encoding="utf-8")
        if fresh:
            self._line({"journal": KIND, "setup": self.setup})
        elif _cut_short(self.path):
            self._handle.write("\n")  # end the line a kill cut short, so the next answer starts its own

    def write(self, path: str, result: CellResult) -> None:
        self._line({"path": path, "result": asdict(result)})

    def _line(self, entry: dict) -> None:
        self._handle.write(json.dumps(entry) + "\n")
        self._handle.flush()

    def close(self) -> None:
        self._handle.close()

    def __enter__(self) -> ScoreJournal:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _read(path: Path) -> tuple[dict | None, list[dict]]:
    """The header and the complete answer lines of a journal (a line that does not parse is one a kill cut)."""
    entries = []
    with path.open(encoding="utf-8") as handle:
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

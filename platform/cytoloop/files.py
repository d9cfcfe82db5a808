"""Files replaced whole: state that several processes read and write (drift flags, the retrain state, label
manifests).

A file is written to a temporary file of its own beside the target and renamed over it (`os.replace`, atomic on
one file system). So a reader never sees half a file, a process killed mid-write leaves the old file intact, and
two writers of the same path never share a temporary file (a fixed `<name>.tmp` did: the second rename then
failed, or moved the other's half-written file into place); the last rename wins. The new file keeps the mode of
the one it replaces (0644 for a new one: these are not secrets).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

NEW_FILE_MODE = 0o644


@contextlib.contextmanager
def replaced(path: Path, newline: str | None = None) -> Iterator[TextIO]:
    """Open a text file that replaces `path` (its folder created) when the block ends without an error; on an
    error nothing changes and the temporary file is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, staging = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(descriptor, "w", newline=newline) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(staging, path.stat().st_mode & 0o7777 if path.exists() else NEW_FILE_MODE)
        os.replace(staging, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(staging)
        raise


def write_text(path: Path, text: str) -> None:
    """Replace `path` with `text`, whole or not at all (see the module docstring)."""
    with replaced(path) as handle:
        handle.write(text)

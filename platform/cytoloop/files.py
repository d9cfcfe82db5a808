"""Files replaced whole: state that several processes read and write (drift flags, the retrain state, label
manifests).

A file is written to a temporary file of its own beside the target and renamed over it (`os.replace`, atomic on
one file system). So a reader never sees half a file, a process killed mid-write leaves the old file intact, and
two writers of the same path never share a temporary file (a fixed `<name>.tmp` did: the second rename then
failed, or moved the other's half-written file into place); the last rename wins. The new file keeps the mode of
the one it replaces (a new one gets the process's umask, as `open` would give it), unless the writer names its
mode (secrets: 0600; the temporary file is owner-only from its creation). A writer killed mid-write
leaves its temporary file; the next write of the same file removes those older than `STALE_S`.

A read-modify-write of such a file (merging drift flags, freezing a scope's gate sets) holds `locked` on a lock
file of its own from the read to the rename: two writers then queue instead of the last rename dropping the
other's change. The lock is the kernel's (`flock`), released when its holder exits, killed or not.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO, TextIO

logger = logging.getLogger(__name__)

STALE_S = 3600.0  # no writer of these small files takes an hour: an older temporary file is a killed one's


@contextlib.contextmanager
def replaced(path: Path, newline: str | None = None, mode: int | None = None) -> Iterator[TextIO]:
    """Open a text file that replaces `path` (its folder created) when the block ends without an error; on an
    error nothing changes and the temporary file is removed. `mode`: the new file's permission bits (None: the
    replaced file's, else the umask's)."""
    with _staged(path, mode, lambda descriptor: os.fdopen(descriptor, "w", newline=newline)) as handle:
        yield handle


@contextlib.contextmanager
def replaced_binary(path: Path, mode: int | None = None) -> Iterator[BinaryIO]:
    """`replaced` for a binary file (model weights: written in place and stopped half-way, they loaded no more)."""
    with _staged(path, mode, lambda descriptor: os.fdopen(descriptor, "wb")) as handle:
        yield handle


@contextlib.contextmanager
def _staged(path: Path, mode: int | None, open_staging: Callable[[int], Any]) -> Iterator[Any]:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    descriptor, staging = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with open_staging(descriptor) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        if mode is None:
            mode = path.stat().st_mode & 0o7777 if path.exists() else 0o666 & ~umask()
        os.chmod(staging, mode)
        os.replace(staging, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(staging)
        raise


def remove_stale_temporaries(path: Path) -> None:
    """Remove the temporary files (`.<name>.*.tmp`) that writers of `path` killed mid-write left, those older than
    `STALE_S`: no writer of these files takes that long."""
    for stale in Path(path).parent.glob(f".{glob.escape(Path(path).name)}.*.tmp"):
        with contextlib.suppress(FileNotFoundError):
            if time.time() - stale.stat().st_mtime > STALE_S:
                stale.unlink()


def umask() -> int:
    """This process's umask, read without changing it (`os.umask` sets it, racing other threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


def write_text(path: Path, text: str, mode: int | None = None) -> None:
    """Replace `path` with `text`, whole or not at all (see the module docstring); `mode` as in `replaced`."""
    with replaced(path, mode=mode) as handle:
        handle.write(text)


class Locked(RuntimeError):
    """`locked(..., wait=False)` found the lock held by another process or thread."""


_held = threading.local()  # the lock files this thread holds (`locked` is re-entrant per thread)


@contextlib.contextmanager
def locked(path: Path, wait: bool = True, waiting: str | None = None, reentrant: bool = True) -> Iterator[None]:
    """Hold an exclusive lock on the file `path` (created, with its folder) for the block; it holds across
    processes and threads (each call opens its own handle). `wait=False` raises `Locked` at once if another holds
    it; otherwise the call waits, logging `waiting` (what is waited for) once if it has to. Re-entrant in one
    thread: a block that holds the lock may call code that takes it again (a second flock of the file through
    another handle would wait on the first for ever); `reentrant=False` for a lock that marks one owner (a
    journal's writer), which a second taker in the same thread must not share. Asyncio tasks of one event loop
    share its thread: hold the lock in synchronous code only, never across an `await`. The lock file is never
    removed: a process that opened it before the removal would lock a file no later process sees."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    key = str(path.resolve())
    held: set[str] = getattr(_held, "paths", None) or set()
    _held.paths = held
    if key in held:
        if not reentrant:
            raise Locked(f"{path} is held by this thread already")
        yield
        return
    with path.open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                raise Locked(f"{path} is held by another process") from None
            if waiting:
                logger.info(f"waiting for {waiting} ({path} held)")
            fcntl.flock(handle, fcntl.LOCK_EX)
        held.add(key)
        try:
            yield
        finally:
            held.discard(key)
            fcntl.flock(handle, fcntl.LOCK_UN)

"""Faults the tests make happen for real, shared by the unit and the integration tests."""

from __future__ import annotations

import os
import threading
from pathlib import Path


class HungDisk:
    """A FIFO at `path` standing for a hung disk: opening it to write blocks (as on a stalled network mount) until
    `come_back` starts a reader; from then on every open for writing finds one, and what is written is kept
    (`written`). `close` stops the reader, releasing its last open, and removes the FIFO. A writer blocked in its
    open when the disk never came back stays blocked: call `come_back` before `close` wherever one may be."""

    def __init__(self, path: Path):
        self.path = Path(path)
        os.mkfifo(self.path)
        self._chunks: list[bytes] = []
        self._stop = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)

    def _read(self) -> None:
        while not self._stop.is_set():
            self._chunks.append(self.path.read_bytes())

    def come_back(self) -> None:
        self._reader.start()

    @property
    def written(self) -> bytes:
        return b"".join(self._chunks)

    def close(self) -> None:
        self._stop.set()
        while self._reader.is_alive():
            try:  # a writer's open that ends the reader's wait; it reads nothing and sees `stop`
                os.close(os.open(self.path, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:  # not in its open just now: it sees `stop` before the next
                pass
            self._reader.join(timeout=0.1)
        self.path.unlink(missing_ok=True)

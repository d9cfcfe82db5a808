"""A serving replica's prediction-log writer: answers never wait for the drift log's disk.

A replica used to send a batch's answers back only once their prediction-log lines were on disk, so a slow or hung
log disk (a full or stalled network mount) held every request by as long as the write took, for ever if it hung.
Now each batch's cells and answers are handed to one writer task per replica, which builds the events (decoding
each cell for its colour statistics, `policy.drift.prediction_events`) and appends them in a worker thread, in the
order the batches were answered; each event carries the time its cell was answered, not the time it was written.

The queue is bounded (`limit` batches): while the disk hangs, batches beyond it are dropped, counted and logged,
since the log is a monitor and an answer is never held or failed for it. Batches still queued when a replica stops
are lost; a reader sees a shorter window, never a torn line (`append_events` writes each batch in one append). A
caller that reads the log right after its answers (the demo's drift figures) waits for its cells' events.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from cytoloop.config import DataConfig
from cytoloop.policy.drift import append_events, prediction_events

logger = logging.getLogger(__name__)


class PredictionLog:
    """Queue answered batches (`record`) for one background writer; `drain` waits until all queued are written.

    Use from one event loop (a Serve replica's): the writer task starts with the first `record`."""

    def __init__(self, path: Path, limit: int = 256):
        if limit < 1:
            raise ValueError(f"limit must be at least 1 batch, got {limit}")
        self.path = Path(path)
        self.limit = limit
        self.dropped = 0  # cells whose events were dropped because the queue was full
        self._queue: asyncio.Queue | None = None
        self._writer: asyncio.Task | None = None

    def record(
        self,
        cells: Sequence[tuple[str, bytes]],
        results: Sequence,
        site: str | None,
        model_version: str,
        config: DataConfig,
    ) -> None:
        """Queue one answered batch (`results[i]` answers `cells[i]`, as `prediction_events` takes them); returns at
        once. Dropped, and counted in `dropped`, when `limit` batches are already waiting for the disk."""
        if self._queue is None:
            self._queue = asyncio.Queue(maxsize=self.limit)
            self._writer = asyncio.get_running_loop().create_task(self._write_queued())
        try:
            self._queue.put_nowait((list(cells), list(results), site, model_version, config, datetime.now(UTC)))
        except asyncio.QueueFull:
            if self.dropped == 0 or self.dropped // 1000 != (self.dropped + len(cells)) // 1000:
                logger.warning(
                    "the prediction log %s is not keeping up (%d batches waiting for its disk): %d cells' events "
                    "dropped so far",
                    self.path,
                    self.limit,
                    self.dropped + len(cells),
                )
            self.dropped += len(cells)

    async def drain(self) -> None:
        """Wait until every batch queued so far is written (or its write failed and was logged)."""
        if self._queue is not None:
            await self._queue.join()

    async def _write_queued(self) -> None:
        """The writer: takes every batch waiting, writes them in one append off the event loop, and again."""
        assert self._queue is not None
        while True:
            batches = [await self._queue.get()]
            while not self._queue.empty():
                batches.append(self._queue.get_nowait())
            try:
                await asyncio.to_thread(self._append, batches)
            except Exception as error:  # a monitor's failure: logged, never raised into a request
                logger.warning("could not write the prediction log %s: %s", self.path, error)
            finally:
                for _ in batches:
                    self._queue.task_done()

    def _append(self, batches: list[tuple]) -> None:
        events = [
            event
            for cells, results, site, version, config, answered in batches
            for event in prediction_events(cells, results, site, version, config, answered)
        ]
        append_events(self.path, events)

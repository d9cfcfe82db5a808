"""A serving replica's prediction-log writer: answers never wait for the drift log's disk.

A replica used to send a batch's answers back only once their prediction-log lines were on disk, so a slow or hung
log disk (a full or stalled network mount) held every request by as long as the write took, for ever if it hung.
Now each answered batch is handed over (`record`, which returns at once) to two background tasks per replica:

1. the builder turns each batch into its events (`policy.drift.prediction_events`, decoding each cell for its colour
   statistics) in a worker thread, one batch at a time, and drops the batch's image bytes;
2. the writer appends all events built so far in one append (`append_events`), in a worker thread.

The disk can only stall the writer, and what waits for it is events (a few hundred bytes each, never images): at
most `limit` of them, counting those in the hung write; beyond that they are dropped, counted (`dropped`) and
logged, as the log is a monitor and an answer is never held or failed for it. The builder can fall behind too (a GPU
replica answers thousands of cells a second, each decoded again here), and what waits for it holds the cells'
images: at most `backlog` cells (or one larger batch); a batch recorded beyond that is dropped whole, counted and
logged. Each event carries the time its cell was answered, not the time it was written. A replica that Serve stops
(a redeploy, a scale-down, an app deleted, `stack down`) `close`s its log, waiting a while for the events still
waiting, which its process used to take with it; what a disk hung longer than that still holds is lost, counted and
logged. A reader sees a shorter window, never a torn line (each append is one write). A caller that reads the log
right after its answers (the demo's drift figures) waits for its cells' events.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from cytoloop.config import DataConfig
from cytoloop.policy.drift import PredictionEvent, append_events, prediction_events

logger = logging.getLogger(__name__)


class PredictionLog:
    """Answered batches in (`record`), prediction-log lines out, off the answer path. `start` on the event loop the
    batches are recorded from (a Serve replica's, in its constructor); `drain` waits until all recorded are written.
    """

    def __init__(self, path: Path, limit: int = 100_000, backlog: int = 2_000):
        if limit < 1:
            raise ValueError(f"limit must be at least 1 event, got {limit}")
        if backlog < 1:
            raise ValueError(f"backlog must be at least 1 cell, got {backlog}")
        self.path = Path(path)
        self.limit = limit
        self.backlog = backlog
        self.dropped = 0  # events dropped: `limit` already waiting for the disk, or `backlog` cells for the builder
        self._batches: asyncio.Queue | None = None  # answered batches, with their image bytes, to build events of
        self._events: list[PredictionEvent] = []  # built, waiting for the writer
        self._writing = 0  # events in the append under way (held, perhaps for ever, by a hung disk)
        self._unbuilt = 0  # answered cells of the batches recorded and not built yet
        self._building = 0  # of those, the cells of the batch the builder has taken
        self._closed = False
        self._built = asyncio.Event()
        self._settled = asyncio.Condition()  # notified whenever an append ends
        self._tasks: list[asyncio.Task] = []

    def start(self) -> None:
        """Start the builder and the writer on the running event loop."""
        if self._tasks:
            raise RuntimeError(f"the prediction log {self.path} is already started")
        self._batches = asyncio.Queue()
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._build()), loop.create_task(self._write())]

    def record(
        self,
        cells: Sequence[tuple[str, bytes]],
        results: Sequence,
        site: str | None,
        model_version: str,
        config: DataConfig,
    ) -> None:
        """Hand over one answered batch (`results[i]` answers `cells[i]`, as `prediction_events` takes them), stamped
        with the time now; returns at once. After `close` its events are dropped and counted: a request answered
        while its replica stops is never failed for the log."""
        answered = sum(hasattr(result, "confidence") for result in results)
        if self._closed:
            self.dropped += answered
            return
        if self._batches is None:
            raise RuntimeError(f"the prediction log {self.path} is not started (`start` it on the serving loop)")
        if not answered:
            return  # only failures: nothing to log
        # the builder is behind (the batches waiting for it hold the cells' images); a batch larger than `backlog`
        # still goes in when none waits, or a replica batching more cells than that would log none. The batch being
        # built is not waiting: counted, batches of over half the backlog arriving during each build were dropped
        waiting = self._unbuilt - self._building
        if waiting and waiting + answered > self.backlog:
            self._drop(answered, f"{waiting} answered cells waiting to be built")
            return
        self._unbuilt += answered
        batch = (list(cells), list(results), site, model_version, config, datetime.now(UTC), answered)
        self._batches.put_nowait(batch)

    async def drain(self) -> None:
        """Wait until every batch recorded so far is built and written (or its failure logged); at once when the
        log is not started or closed."""
        if self._batches is None or self._closed:
            return
        await self._batches.join()
        async with self._settled:
            await self._settled.wait_for(lambda: not self._events and not self._writing)

    async def close(self, wait_s: float) -> None:
        """Stop: wait up to `wait_s` seconds for every batch recorded so far to be written, then end the builder
        and the writer. What is still waiting then is counted in `dropped` and logged as lost; the append under way
        may yet end before the process does (its thread is left running). Batches recorded afterwards are dropped
        and counted."""
        if self._batches is None or self._closed:
            return
        try:
            await asyncio.wait_for(self.drain(), wait_s)
        except TimeoutError:
            waiting = self._unbuilt + len(self._events) + self._writing
            self.dropped += waiting
            logger.warning(
                "the prediction log %s did not take its last events within %g s of the replica stopping: %d events "
                "may be lost (%d in an append still under way)",
                self.path,
                wait_s,
                waiting,
                self._writing,
            )
        finally:
            self._closed = True
            for task in self._tasks:
                task.cancel()
            self._tasks = []

    async def _build(self) -> None:
        assert self._batches is not None
        while True:
            cells, results, site, version, config, answered_at, answered = await self._batches.get()
            self._building = answered
            try:
                events = await asyncio.to_thread(prediction_events, cells, results, site, version, config, answered_at)
            except Exception as error:  # one batch's events lost, logged; the others' still built
                logger.warning("could not build the prediction-log events of a batch (%s): %s", version, error)
            else:
                room = max(self.limit - len(self._events) - self._writing, 0)
                if len(events) > room:
                    self._drop(len(events) - room, f"{len(self._events) + self._writing} events waiting for its disk")
                    events = events[:room]
                self._events.extend(events)
                self._built.set()
            finally:
                self._unbuilt -= answered
                self._building = 0
                self._batches.task_done()

    def _drop(self, events: int, waiting: str) -> None:
        """Count `events` dropped; logged on the first drop and at each further thousand."""
        if self.dropped == 0 or self.dropped // 1000 != (self.dropped + events) // 1000:
            logger.warning(
                "the prediction log %s is not keeping up (%s): %d events dropped so far",
                self.path,
                waiting,
                self.dropped + events,
            )
        self.dropped += events

    async def _write(self) -> None:
        while True:
            await self._built.wait()
            self._built.clear()
            events, self._events = self._events, []
            if not events:
                continue
            self._writing = len(events)
            try:
                await asyncio.to_thread(append_events, self.path, events)
            except Exception as error:  # a monitor's failure: logged, never raised into a request
                logger.warning("could not write %d events to the prediction log %s: %s", len(events), self.path, error)
            finally:
                self._writing = 0
                async with self._settled:
                    self._settled.notify_all()

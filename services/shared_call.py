"""One run at a time of a blocking call, shared by every request that asks while it runs.

`GET /v1/models` reads the registry's aliases in a worker thread; with the registry down each read waits out
MLflow's retries (about two minutes), and a dashboard polling every few seconds filled asyncio's small default
thread pool (min(32, cores + 4) threads), where classify reads its uploads too: every classification then waited
behind reads of a registry it does not need. Concurrent callers now share the one read in flight.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class SharedCall(Generic[T]):
    """Calls `function` in a worker thread, once for all the callers that ask while it runs; a caller that asks
    after it ended starts the next run (nothing is cached). A caller cancelled while waiting leaves the run going
    for the others. Each caller gets the run's result or its exception."""

    def __init__(self, function: Callable[[], T]):
        self.function = function
        self._running: asyncio.Future[T] | None = None

    async def __call__(self) -> T:
        if self._running is None or self._running.done():
            self._running = asyncio.ensure_future(asyncio.to_thread(self.function))
        return await asyncio.shield(self._running)

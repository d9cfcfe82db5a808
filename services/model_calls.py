"""One model call at a time per replica; requests that arrive while it runs are merged into the next call.

Ray's `@serve.batch` forms a batch as soon as its wait expires, even while the previous batch is still in the
model (later batches queue behind `max_concurrent_batches`), so under a model-bound load its batches stay at one
or two requests: measured with the diffusion classifier and 16 clients, a mean of 1.1. Every batch Ray hands over
is submitted here instead; whoever gets the model next runs everything waiting for the same model version (up to
`max_requests` requests) in one call. Plain asyncio, no Ray: tests/unit/test_model_calls.py drives it directly.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

Cells = Sequence[tuple[str, bytes]]


class Service(Protocol):
    def classify(self, cells: Cells) -> list[Any]: ...


@dataclass
class _Work:
    service: Service
    requests: list[Cells]
    future: asyncio.Future


class ModelCalls:
    def __init__(self, max_requests: int, replica: str = ""):
        self.max_requests = max_requests
        self.replica = replica
        self._waiting: list[_Work] = []
        self._model = asyncio.Lock()
        self._ids = itertools.count(1)

    async def submit(self, service: Service, requests: list[Cells]) -> tuple[list[list[Any]], dict]:
        """Classify each request's cells with `service`; returns the answers per request and the batch they rode
        in (`replica`, `batch` id, `requests`, `cells`)."""
        work = _Work(service, requests, asyncio.get_running_loop().create_future())
        self._waiting.append(work)
        try:
            while not work.future.done():  # earlier work first; ours is in one of the next calls
                # shielded, lock and all: a cancelled caller's call runs on to answer the others it took, and
                # nobody starts another call beside it
                await asyncio.shield(self._next_call(work))
        except asyncio.CancelledError:
            if work in self._waiting:  # not taken into a call yet: nobody needs it run
                self._waiting.remove(work)
            raise
        return work.future.result()

    async def _next_call(self, work: _Work) -> None:
        async with self._model:
            if work in self._waiting:  # else a call took it (and has answered), or its caller went away
                await self._run_next()

    async def _run_next(self) -> None:
        service = self._waiting[0].service
        taken, left, n_requests = [], [], 0
        for work in self._waiting:
            fits = n_requests + len(work.requests) <= self.max_requests or not taken
            if work.service is service and fits:
                taken.append(work)
                n_requests += len(work.requests)
            else:
                left.append(work)
        self._waiting = left
        try:
            await self._call(service, taken)
        except Exception as error:
            if len(taken) == 1:
                _fail(taken[0], error)
                return
            for work in taken:  # one caller's cells may be what failed: each alone, so the others get answers
                try:
                    await self._call(service, [work])
                except Exception as alone:
                    _fail(work, alone)
        finally:  # whatever ended the call (even a BaseException), no caller it took is left waiting for ever
            for work in taken:
                _fail(work, RuntimeError("the model call ended without an answer for this request"))

    async def _call(self, service: Service, taken: list[_Work]) -> None:
        """One model call for every request of `taken`; gives each caller its answers (raises if the call fails)."""
        cells = [cell for work in taken for request in work.requests for cell in request]
        results = await asyncio.to_thread(service.classify, cells)
        n_requests = sum(len(work.requests) for work in taken)
        batch = {"replica": self.replica, "batch": next(self._ids), "requests": n_requests, "cells": len(cells)}
        start = 0
        for work in taken:
            answers = []
            for request in work.requests:
                answers.append(results[start : start + len(request)])
                start += len(request)
            if not work.future.done():  # a caller that went away (cancelled) no longer waits for its answer
                work.future.set_result((answers, batch))


def _fail(work: _Work, error: Exception) -> None:
    if not work.future.done():
        work.future.set_exception(error)

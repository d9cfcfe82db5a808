"""Merging of model calls: work submitted while the model is busy goes into the next call, per model version.

The fake model is gated: each call waits in the model until the test lets it finish (`finish`), and the test
waits until a call is in the model (`in_model`) before queueing more. So the order of events is the test's, not
the scheduler's: a slow machine changes no call size.
"""

from __future__ import annotations

import asyncio
import threading

import pytest

from services.model_calls import ModelCalls

WAIT_S = 10.0  # a bound on every wait, far above what any step takes


class Interrupted(BaseException):
    """Not an Exception: what the call's error handling does not catch."""


class FakeService:
    """Answers each cell with (service name, cell name); records the size of every call and how many ran at once.
    Gated: a call stays in the model until `finish` lets it go."""

    def __init__(self, name: str):
        self.name, self.calls = name, []
        self.running = self.most = 0
        self._lock = threading.Lock()
        self._entered, self._gate = threading.Semaphore(0), threading.Semaphore(0)

    def classify(self, cells):
        with self._lock:
            self.calls.append(len(cells))
            self.running += 1
            self.most = max(self.most, self.running)
        self._entered.release()
        try:
            if not self._gate.acquire(timeout=WAIT_S):
                raise TimeoutError("the test never let this call finish")
            if any(name == "boom" for name, _ in cells):
                raise RuntimeError("model failed")
            if any(name == "halt" for name, _ in cells):
                raise Interrupted()
            return [(self.name, name) for name, _ in cells]
        finally:
            with self._lock:
                self.running -= 1

    async def in_model(self) -> None:
        """Wait until the next call has entered the model."""
        assert await asyncio.to_thread(self._entered.acquire, True, WAIT_S), "no call entered the model"

    def finish(self, n: int = 1) -> None:
        """Let n calls (now in the model or still to come) finish."""
        for _ in range(n):
            self._gate.release()


def request(*names):
    return [(name, b"") for name in names]


async def queued() -> None:
    """Let the tasks just created run to their first wait (each puts its work in the queue there)."""
    for _ in range(3):
        await asyncio.sleep(0)


async def busy(calls: ModelCalls, service: FakeService) -> asyncio.Task:
    """A first call, held in the model until `service.finish`: what is submitted next queues behind it."""
    holder = asyncio.create_task(calls.submit(service, [request("x")]))
    await service.in_model()
    return holder


def test_work_arriving_during_a_call_is_merged_into_the_next():
    async def scenario():
        calls, service = ModelCalls(max_requests=16, replica="r"), FakeService("a")
        first = asyncio.create_task(calls.submit(service, [request("x")]))
        await service.in_model()
        later = [asyncio.create_task(calls.submit(service, [request(f"c{i}"), request(f"d{i}")])) for i in range(4)]
        await queued()
        service.finish(2)
        return service, await first, await asyncio.gather(*later)

    service, first, later = asyncio.run(scenario())
    assert service.calls == [1, 8]
    assert first == ([[("a", "x")]], {"replica": "r", "batch": 1, "requests": 1, "cells": 1})
    for i, (answers, batch) in enumerate(later):
        assert answers == [[("a", f"c{i}")], [("a", f"d{i}")]]
        assert batch == {"replica": "r", "batch": 2, "requests": 8, "cells": 8}


def test_versions_are_never_mixed_and_max_requests_is_kept():
    async def scenario():
        calls, a, b = ModelCalls(max_requests=2), FakeService("a"), FakeService("b")
        busy = asyncio.create_task(calls.submit(a, [request("x")]))
        await a.in_model()
        jobs = [asyncio.create_task(calls.submit(s, [request(f"{s.name}{i}")])) for i, s in enumerate([a, b, a, b, a])]
        await queued()
        a.finish(3)
        b.finish(1)
        results = await asyncio.gather(busy, *jobs)
        return a, b, results

    a, b, results = asyncio.run(scenario())
    assert a.calls == [1, 2, 1] and b.calls == [2]
    for answers, _ in results[1:]:
        ((service, name),) = answers[0]
        assert name.startswith(service)


def test_a_failed_call_fails_only_its_own_requests():
    async def scenario():
        calls, service, other = ModelCalls(max_requests=8), FakeService("a"), FakeService("b")
        busy = asyncio.create_task(calls.submit(other, [request("x")]))
        await other.in_model()
        bad = asyncio.create_task(calls.submit(service, [request("boom")]))
        good = asyncio.create_task(calls.submit(other, [request("y")]))
        await queued()
        other.finish(2)
        service.finish(1)
        return await asyncio.gather(busy, bad, good, return_exceptions=True)

    busy, bad, good = asyncio.run(scenario())
    assert isinstance(bad, RuntimeError) and good[0] == [[("b", "y")]]


def test_a_request_that_fails_a_merged_call_fails_alone():
    """Requests for the same model merged into one call: the call used to fail every one of them."""

    async def scenario():
        calls, service = ModelCalls(max_requests=8), FakeService("a")
        busy = asyncio.create_task(calls.submit(service, [request("x")]))
        await service.in_model()  # the next three are merged into one call, which the poisoned one fails
        merged = [
            asyncio.create_task(calls.submit(service, [request("p")])),
            asyncio.create_task(calls.submit(service, [request("boom")])),
            asyncio.create_task(calls.submit(service, [request("q")])),
        ]
        await queued()
        service.finish(5)
        return service, await asyncio.gather(busy, *merged, return_exceptions=True)

    service, (busy, good, bad, other) = asyncio.run(scenario())
    assert service.calls == [1, 3, 1, 1, 1]  # the merged call, then each of its callers alone
    assert isinstance(bad, RuntimeError)
    assert good[0] == [[("a", "p")]] and other[0] == [[("a", "q")]]


def test_a_cancelled_caller_does_not_strand_the_others():
    async def scenario():
        calls, service = ModelCalls(max_requests=8), FakeService("a")
        holder = await busy(calls, service)
        waiter = asyncio.create_task(calls.submit(service, [request("y")]))
        await queued()
        holder.cancel()
        service.finish(2)
        answer = await asyncio.wait_for(waiter, timeout=WAIT_S)
        with pytest.raises(asyncio.CancelledError):
            await holder
        return answer

    assert asyncio.run(scenario())[0] == [[("a", "y")]]


def test_a_caller_cancelled_during_its_merged_call_keeps_one_call_at_a_time():
    """B's call also carries C's request; B goes away while it runs. C must get its answer from that call, not
    start a second model call beside it (nor fail on an empty queue)."""

    async def scenario():
        calls, service = ModelCalls(max_requests=8), FakeService("a")
        holder = await busy(calls, service)
        b = asyncio.create_task(calls.submit(service, [request("b")]))
        c = asyncio.create_task(calls.submit(service, [request("c")]))
        await queued()
        service.finish(1)
        await holder
        await service.in_model()  # b's call, with c's request in it
        b.cancel()
        d = asyncio.create_task(calls.submit(service, [request("d")]))  # queued behind it
        await queued()
        service.finish(2)
        answers = await asyncio.wait_for(asyncio.gather(c, d), timeout=WAIT_S)
        return service, answers

    service, (c, d) = asyncio.run(scenario())
    assert c[0] == [[("a", "c")]] and d[0] == [[("a", "d")]]
    assert service.most == 1 and service.calls == [1, 2, 1]


def test_a_caller_cancelled_before_its_call_is_dropped_from_the_queue():
    async def scenario():
        calls, service = ModelCalls(max_requests=8), FakeService("a")
        holder = await busy(calls, service)
        gone = asyncio.create_task(calls.submit(service, [request("gone")]))
        await queued()
        gone.cancel()
        service.finish(1)
        await holder
        for _ in range(10):  # the shielded wait for the model runs on: it must not call for nothing
            await asyncio.sleep(0)
        service.finish(1)
        return service, await asyncio.wait_for(calls.submit(service, [request("y")]), timeout=WAIT_S)

    service, answer = asyncio.run(scenario())
    assert answer[0] == [[("a", "y")]] and service.calls == [1, 1]


def test_a_call_ended_by_a_base_exception_leaves_no_caller_waiting():
    """The merged call of `halt` and `b` ends in a BaseException its error handling does not catch: `b`'s future
    was never answered, and its caller looped for ever."""

    async def scenario():
        calls, service = ModelCalls(max_requests=8), FakeService("a")
        holder = await busy(calls, service)
        halt = asyncio.create_task(calls.submit(service, [request("halt")]))
        b = asyncio.create_task(calls.submit(service, [request("b")]))
        await queued()
        service.finish(2)
        await holder
        outcomes = await asyncio.wait_for(asyncio.gather(halt, b, return_exceptions=True), timeout=WAIT_S)
        return service, outcomes

    service, (halt, b) = asyncio.run(scenario())
    assert service.calls == [1, 2]
    assert isinstance(b, RuntimeError) and "ended without an answer" in str(b)

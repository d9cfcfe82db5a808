"""Merging of model calls: work submitted while the model is busy goes into the next call, per model version."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from services.model_calls import ModelCalls


class FakeService:
    """Answers each cell with (service name, cell name); records the size of every call."""

    def __init__(self, name: str, seconds: float = 0.05):
        self.name, self.seconds, self.calls = name, seconds, []
        self._lock = threading.Lock()

    def classify(self, cells):
        with self._lock:
            self.calls.append(len(cells))
        time.sleep(self.seconds)
        if any(name == "boom" for name, _ in cells):
            raise RuntimeError("model failed")
        return [(self.name, name) for name, _ in cells]


def request(*names):
    return [(name, b"") for name in names]


def test_work_arriving_during_a_call_is_merged_into_the_next():
    async def scenario():
        calls, service = ModelCalls(max_requests=16, replica="r"), FakeService("a")
        first = asyncio.create_task(calls.submit(service, [request("x")]))
        await asyncio.sleep(0.01)  # the first call is running now
        later = [asyncio.create_task(calls.submit(service, [request(f"c{i}"), request(f"d{i}")])) for i in range(4)]
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
        await asyncio.sleep(0.01)
        jobs = [calls.submit(s, [request(f"{s.name}{i}")]) for i, s in enumerate([a, b, a, b, a])]
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
        await asyncio.sleep(0.01)
        bad = calls.submit(service, [request("boom")])
        good = calls.submit(other, [request("y")])
        return await asyncio.gather(busy, bad, good, return_exceptions=True)

    busy, bad, good = asyncio.run(scenario())
    assert isinstance(bad, RuntimeError) and good[0] == [[("b", "y")]]


def test_a_request_that_fails_a_merged_call_fails_alone():
    """Requests for the same model merged into one call: the call used to fail every one of them."""

    async def scenario():
        calls, service = ModelCalls(max_requests=8), FakeService("a")
        busy = asyncio.create_task(calls.submit(service, [request("x")]))
        await asyncio.sleep(0.01)  # the next three are merged into one call, which the poisoned one fails
        merged = [
            calls.submit(service, [request("p")]),
            calls.submit(service, [request("boom")]),
            calls.submit(service, [request("q")]),
        ]
        return service, await asyncio.gather(busy, *merged, return_exceptions=True)

    service, (busy, good, bad, other) = asyncio.run(scenario())
    assert service.calls == [1, 3, 1, 1, 1]  # the merged call, then each of its callers alone
    assert isinstance(bad, RuntimeError)
    assert good[0] == [[("a", "p")]] and other[0] == [[("a", "q")]]


def test_a_cancelled_caller_does_not_strand_the_others():
    async def scenario():
        calls, service = ModelCalls(max_requests=8), FakeService("a", seconds=0.1)
        holder = asyncio.create_task(calls.submit(service, [request("x")]))
        await asyncio.sleep(0.01)
        waiter = asyncio.create_task(calls.submit(service, [request("y")]))
        await asyncio.sleep(0.01)
        holder.cancel()
        answer = await asyncio.wait_for(waiter, timeout=5)
        with pytest.raises(asyncio.CancelledError):
            await holder
        return answer

    assert asyncio.run(scenario())[0] == [[("a", "y")]]


def test_a_caller_cancelled_during_its_merged_call_keeps_one_call_at_a_time():
    """B's call also carries C's request; B goes away while it runs. C must get its answer from that call, not
    start a second model call beside it (nor fail on an empty queue)."""

    class Concurrency(FakeService):
        def __init__(self):
            super().__init__("a", seconds=0.1)
            self.running = self.most = 0

        def classify(self, cells):
            with self._lock:
                self.running += 1
                self.most = max(self.most, self.running)
            try:
                return super().classify(cells)
            finally:
                with self._lock:
                    self.running -= 1

    async def scenario():
        calls, service = ModelCalls(max_requests=8), Concurrency()
        holder = asyncio.create_task(calls.submit(service, [request("x")]))
        await asyncio.sleep(0.01)
        b = asyncio.create_task(calls.submit(service, [request("b")]))
        c = asyncio.create_task(calls.submit(service, [request("c")]))
        await holder
        await asyncio.sleep(0.03)  # b's call (b and c merged) is running
        b.cancel()
        d = asyncio.create_task(calls.submit(service, [request("d")]))  # queued behind it
        answers = await asyncio.wait_for(asyncio.gather(c, d), timeout=5)
        return service, answers

    service, (c, d) = asyncio.run(scenario())
    assert c[0] == [[("a", "c")]] and d[0] == [[("a", "d")]]
    assert service.most == 1 and service.calls == [1, 2, 1]


def test_a_caller_cancelled_before_its_call_is_dropped_from_the_queue():
    async def scenario():
        calls, service = ModelCalls(max_requests=8), FakeService("a", seconds=0.1)
        holder = asyncio.create_task(calls.submit(service, [request("x")]))
        await asyncio.sleep(0.01)
        gone = asyncio.create_task(calls.submit(service, [request("gone")]))
        await asyncio.sleep(0.01)
        gone.cancel()
        await holder
        await asyncio.sleep(0.2)  # the shielded wait for the model runs on: it must not call for nothing
        return service, await calls.submit(service, [request("y")])

    service, answer = asyncio.run(scenario())
    assert answer[0] == [[("a", "y")]] and service.calls == [1, 1]

"""`SharedCall`: concurrent `/v1/models` requests share one registry read in flight instead of each holding one of
asyncio's few worker threads for as long as the registry takes to fail."""

from __future__ import annotations

import asyncio
import threading

from services.shared_call import SharedCall


def test_callers_while_a_call_runs_share_it_and_later_callers_run_it_again():
    started, release, threads = threading.Event(), threading.Event(), []

    def slow_registry() -> dict:  # a registry read waiting out its retries
        threads.append(threading.get_ident())
        started.set()
        release.wait(10)
        return {None: "v3"}

    async def main():
        shared = SharedCall(slow_registry)
        first = asyncio.ensure_future(shared())
        await asyncio.to_thread(started.wait, 10)
        others = [asyncio.ensure_future(shared()) for _ in range(20)]
        cancelled = asyncio.ensure_future(shared())
        await asyncio.sleep(0.05)
        cancelled.cancel()  # a client gone: the read goes on for the rest
        release.set()
        answers = await asyncio.gather(first, *others)
        assert answers == [{None: "v3"}] * 21 and len(threads) == 1
        assert await shared() == {None: "v3"} and len(threads) == 2  # nothing cached: the next asks again

    asyncio.run(main())


def test_every_waiting_caller_gets_the_call_s_error_and_the_next_call_tries_again():
    calls = []

    def failing() -> dict:
        calls.append(1)
        if len(calls) == 1:
            raise ConnectionError("registry down")
        return {}

    async def main():
        shared = SharedCall(failing)
        results = await asyncio.gather(shared(), shared(), return_exceptions=True)
        assert [type(r) for r in results] == [ConnectionError, ConnectionError] and len(calls) == 1
        assert await shared() == {} and len(calls) == 2

    asyncio.run(main())


def test_without_sharing_each_caller_held_a_thread():
    """What the gateway did before (each request its own `to_thread`): twenty callers, twenty reads at once."""
    running, peak, lock, release = [0], [0], threading.Lock(), threading.Event()

    def read() -> None:
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        release.wait(0.3)
        with lock:
            running[0] -= 1

    async def main(call):
        await asyncio.gather(*(call() for _ in range(20)))

    asyncio.run(main(lambda: asyncio.to_thread(read)))
    assert peak[0] > 1
    peak[0] = 0
    shared = SharedCall(read)
    asyncio.run(main(shared))
    assert peak[0] == 1

"""A replica's prediction-log writer: answers never wait for the log's disk, and a hung disk holds events, a bounded
number, never the cells' images. The hung disk is real: a FIFO nobody reads, which blocks the writer's open until a
reader comes."""

from __future__ import annotations

import asyncio
import io
from datetime import UTC, datetime

import numpy as np
import pytest
from PIL import Image

from cytoloop.config import DataConfig
from cytoloop.policy.drift import PredictionEvent
from cytoloop.serving.inference import CellFailure, CellResult
from cytoloop.serving.prediction_log import PredictionLog
from tests.faults import HungDisk


def _cell(i: int) -> tuple[str, bytes]:
    pixels = np.full((24, 24, 3), (40 * i) % 256, dtype=np.uint8)
    pixels[8:16, 8:16] = (90, 40, 140)  # a cell in it (a blank image is refused)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return f"c{i}.png", buffer.getvalue()


def _result(i: int) -> CellResult:
    return CellResult(i, f"c{i}.png", f"id{i}", "neutrophil", {"neutrophil": 0.9}, 0.9, 0.1, None, "accept", 1)


def test_a_hung_log_disk_holds_no_caller_and_drops_what_does_not_fit(tmp_path):
    """Recording returns at once while the disk hangs; what waits for it is events, at most `limit` of them counting
    those in the hung write (never the cells' images), and the rest are dropped and counted."""
    disk = HungDisk(tmp_path / "predictions.jsonl")
    config = DataConfig(image_size=16)
    failure = CellFailure(3, "c3.png", "unreadable", "not an image")

    async def scenario() -> tuple[datetime, datetime, int]:
        log = PredictionLog(disk.path, limit=3)
        with pytest.raises(RuntimeError, match="not started"):
            log.record([_cell(0)], [_result(0)], "north", "7", config)
        log.start()
        before = datetime.now(UTC)
        log.record([_cell(0), _cell(1)], [_result(0), _result(1)], "north", "7", config)
        await asyncio.sleep(0.5)  # built, taken by the writer, which hangs in the FIFO's open
        log.record([_cell(2), _cell(3)], [_result(2), failure], None, "8", config)  # one event: it waits
        log.record([_cell(3)], [failure], None, "8", config)  # only a failure: nothing to log
        log.record([_cell(4)], [_result(4)], "south", "9", config)  # no room: dropped
        await asyncio.sleep(0.5)
        dropped = log.dropped
        answered = datetime.now(UTC)
        disk.come_back()
        await asyncio.wait_for(log.drain(), timeout=30)
        return before, answered, dropped

    try:
        before, answered, dropped = asyncio.run(scenario())
    finally:
        disk.close()
    assert dropped == 1
    events = [PredictionEvent.model_validate_json(line) for line in disk.written.decode().splitlines()]
    assert [e.cell_id for e in events] == ["id0", "id1", "id2"]  # in order; a failure is no prediction
    assert [(e.site, e.model_version) for e in events] == [("north", "7"), ("north", "7"), (None, "8")]
    assert all(before <= e.time <= answered for e in events)  # when answered, not when written


def test_a_failing_write_is_logged_and_the_writer_goes_on(tmp_path, caplog):
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the log's folder should be")

    async def run() -> None:
        log = PredictionLog(blocked / "predictions.jsonl")
        log.start()
        log.record([_cell(0)], [_result(0)], None, "1", DataConfig(image_size=16))
        await asyncio.wait_for(log.drain(), timeout=30)
        log.path = tmp_path / "predictions.jsonl"  # the disk fixed
        log.record([_cell(1)], [_result(1)], None, "1", DataConfig(image_size=16))
        await asyncio.wait_for(log.drain(), timeout=30)

    asyncio.run(run())
    assert "could not write 1 events to the prediction log" in caplog.text
    (line,) = (tmp_path / "predictions.jsonl").read_text().splitlines()
    assert PredictionEvent.model_validate_json(line).cell_id == "id1"


def test_a_log_with_no_room_for_events_is_refused():
    with pytest.raises(ValueError, match="at least 1 event"):
        PredictionLog("p.jsonl", limit=0)
    with pytest.raises(ValueError, match="backlog must be at least 1 cell"):
        PredictionLog("p.jsonl", backlog=0)


def test_batches_answered_faster_than_they_are_built_hold_at_most_backlog_cells(tmp_path, caplog):
    """Batches recorded while the builder has no turn (answers come faster than their events are built) wait with
    their images: at most `backlog` cells of them; a batch beyond that is dropped whole and counted (the queue of
    images grew without bound)."""
    config = DataConfig(image_size=16)

    async def run() -> int:
        log = PredictionLog(tmp_path / "predictions.jsonl", backlog=3)
        log.start()
        log.record([_cell(7), _cell(8), _cell(9), _cell(10)], [_result(i) for i in (7, 8, 9, 10)], None, "1", config)
        await asyncio.wait_for(log.drain(), timeout=30)  # larger than the backlog, but nothing waits: kept
        log.record([_cell(0), _cell(1)], [_result(0), _result(1)], None, "1", config)  # no await in between:
        log.record([_cell(2), _cell(3)], [_result(2), _result(3)], None, "1", config)  # 4 > 3 cells: dropped
        log.record([_cell(4)], [_result(4)], None, "1", config)  # 3 cells: kept
        dropped = log.dropped
        await asyncio.wait_for(log.drain(), timeout=30)
        log.record([_cell(5), _cell(6)], [_result(5), _result(6)], None, "1", config)  # built: room again
        await asyncio.wait_for(log.drain(), timeout=30)
        return dropped

    assert asyncio.run(run()) == 2
    assert "not keeping up (2 answered cells waiting to be built): 2 events dropped so far" in caplog.text
    lines = (tmp_path / "predictions.jsonl").read_text().splitlines()
    kept = ["id7", "id8", "id9", "id10", "id0", "id1", "id4", "id5", "id6"]
    assert [PredictionEvent.model_validate_json(line).cell_id for line in lines] == kept


def test_a_batch_whose_events_cannot_be_built_loses_only_its_own(tmp_path, caplog):
    async def run() -> None:
        log = PredictionLog(tmp_path / "predictions.jsonl")
        log.start()
        log.record([("bad.png", b"not an image")], [_result(0)], None, "1", DataConfig(image_size=16))
        log.record([_cell(1)], [_result(1)], None, "1", DataConfig(image_size=16))
        await asyncio.wait_for(log.drain(), timeout=30)

    asyncio.run(run())
    assert "could not build the prediction-log events of a batch" in caplog.text
    (line,) = (tmp_path / "predictions.jsonl").read_text().splitlines()
    assert PredictionEvent.model_validate_json(line).cell_id == "id1"


def test_a_stopping_replica_writes_what_waits_for_a_slow_disk_and_counts_what_a_hung_one_keeps(tmp_path, caplog):
    """A replica's process ended with its log's waiting events in it. `close` waits for them: all written when the
    disk comes back within the wait, counted and logged as lost when it does not (those being built, waiting, and
    in the hung append); what comes afterwards is dropped and counted, never raised into a request."""
    config = DataConfig(image_size=16)

    async def slow(disk: HungDisk) -> None:
        log = PredictionLog(disk.path)
        log.start()
        log.record([_cell(0), _cell(1)], [_result(0), _result(1)], None, "1", config)
        await asyncio.sleep(0.3)  # built, taken by the writer, which hangs in the FIFO's open
        asyncio.get_running_loop().call_later(0.5, disk.come_back)
        await log.close(wait_s=30)
        assert log.dropped == 0
        log.record([_cell(2)], [_result(2)], None, "1", config)  # a request answered as the replica stops
        assert log.dropped == 1
        await asyncio.wait_for(log.drain(), timeout=5)  # nothing waits on a closed log

    disk = HungDisk(tmp_path / "slow.jsonl")
    try:
        asyncio.run(slow(disk))
    finally:
        disk.close()
    assert [PredictionEvent.model_validate_json(line).cell_id for line in disk.written.decode().splitlines()] == [
        "id0",
        "id1",
    ]

    async def hung(disk: HungDisk) -> int:
        log = PredictionLog(disk.path)
        log.start()
        log.record([_cell(0), _cell(1)], [_result(0), _result(1)], None, "1", config)
        await asyncio.sleep(0.3)  # in the hung append
        log.record([_cell(2)], [_result(2)], None, "1", config)  # these two wait behind it
        log.record([_cell(3)], [_result(3)], None, "1", config)
        began = asyncio.get_running_loop().time()
        await log.close(wait_s=0.5)
        assert asyncio.get_running_loop().time() - began < 5
        disk.come_back()  # the hung append's thread ends (asyncio.run waits for it)
        return log.dropped

    disk = HungDisk(tmp_path / "hung.jsonl")
    try:
        assert asyncio.run(hung(disk)) == 4
    finally:
        disk.close()
    assert "within 0.5 s of the replica stopping: 4 events may be lost (2 in an append still under way)" in caplog.text


def test_the_batch_being_built_is_not_counted_as_waiting(tmp_path, monkeypatch):
    """With the builder busy on one batch, the next (of over half the backlog) was dropped as if both waited: a
    replica answering big batches as fast as they are built lost every other one."""
    import threading

    import cytoloop.serving.prediction_log as module

    release, real = threading.Event(), module.prediction_events

    def slow(*args):  # the builder, busy decoding the first batch
        assert release.wait(30)
        return real(*args)

    monkeypatch.setattr(module, "prediction_events", slow)
    config = DataConfig(image_size=16)

    async def run() -> int:
        log = PredictionLog(tmp_path / "predictions.jsonl", backlog=3)
        log.start()
        log.record([_cell(i) for i in range(3)], [_result(i) for i in range(3)], None, "1", config)
        await asyncio.sleep(0.3)  # the builder has taken it and is building it
        log.record([_cell(i) for i in (3, 4, 5)], [_result(i) for i in (3, 4, 5)], None, "1", config)  # waits
        log.record([_cell(6)], [_result(6)], None, "1", config)  # 3 wait already: dropped
        dropped = log.dropped
        release.set()
        await asyncio.wait_for(log.drain(), timeout=30)
        return dropped

    assert asyncio.run(run()) == 1
    lines = (tmp_path / "predictions.jsonl").read_text().splitlines()
    assert [PredictionEvent.model_validate_json(line).cell_id for line in lines] == [f"id{i}" for i in range(6)]

"""The retrain policy: when N new labels, or T hours with M, or drift with M make a retrain due."""

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from cytoloop.config import RetrainConfig
from cytoloop.data.records import CellRecord
from cytoloop.policy.retrain import label_key, load_state, new_labels, retrain_due, save_state

CONFIG = RetrainConfig(min_new_labels=100, max_hours=24, min_labels_after_hours=10, on_drift=True)


@pytest.mark.parametrize(
    "new, hours, drift, due",
    [
        (100, 1.0, False, True),  # N reached
        (99, 1.0, False, False),  # not yet N, too soon
        (10, 24.0, False, True),  # T passed with M
        (9, 48.0, False, False),  # T passed, fewer than M
        (10, None, False, True),  # never retrained counts as T passed
        (10, 1.0, True, True),  # drift with M
        (9, 1.0, True, False),  # drift without M: new labels are needed to learn anything
        (0, None, True, False),
    ],
)
def test_policy(new, hours, drift, due):
    decision = retrain_due(new, hours, drift, CONFIG)
    assert decision.due is due
    assert decision.reason


def test_a_retrain_is_never_due_on_no_new_labels():
    """M = 0 made a retrain due with no new label at all (after T, or while a drift flag stayed up: every
    `retrain --if-due` then fine-tuned on the same labels again): M is at least 1."""
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="min_labels_after_hours"):
        RetrainConfig(min_labels_after_hours=0)
    least = RetrainConfig(min_new_labels=100, max_hours=24, min_labels_after_hours=1)
    assert not retrain_due(0, None, True, least).due and not retrain_due(0, 48.0, False, least).due


def test_drift_ignored_when_disabled():
    """The decision said "or drift" and "drift flagged" with `on_drift` off: an operator with enough labels and
    drift flagged could not tell why nothing was due."""
    decision = retrain_due(10, 1.0, True, CONFIG.model_copy(update={"on_drift": False}))
    assert not decision.due
    assert "or drift" not in decision.reason and "drift flagged (ignored: retrain.on_drift is off)" in decision.reason
    assert "h or drift); " in retrain_due(0, 1.0, False, CONFIG).reason  # on: drift is one way a retrain comes due


def test_negative_count_is_an_error():
    with pytest.raises(ValueError, match="new_labels"):
        retrain_due(-1, None, False, CONFIG)


def test_state_counts_new_and_relabelled_cells(tmp_path):
    records = [CellRecord(f"c{i}.png", tmp_path / f"c{i}.png", "neutrophil", "d") for i in range(5)]
    path = tmp_path / "state.json"
    assert load_state(path).last_time is None
    assert len(new_labels(records, load_state(path))) == 5

    when = datetime(2026, 1, 1, tzinfo=UTC)
    save_state(path, records[:3], when)
    state = load_state(path)
    assert state.last_time == when
    assert state.hours_since_last(when + timedelta(hours=6)) == pytest.approx(6.0)
    relabelled = CellRecord("c0.png", Path(tmp_path / "c0.png"), "lymphocyte", "d")
    fresh = new_labels(records + [relabelled], state)
    assert {r.cell_id for r in fresh} == {"c3.png", "c4.png", "c0.png"}


def test_only_what_the_global_champion_serves_now_can_make_its_retrain_due():
    """The flags file keeps each (version, site) series' last flags: a retired version's, and the champion's at a
    site that has since been given its own model, stayed there and kept a global retrain due on drift."""
    from ops.cli.registry import _champion_flags

    def flag(version, site):
        return {"model_version": version, "site": site, "window_start": "2026-12-01T00:00:00+00:00", "flags": ["x"]}

    flags = [flag("4", None), flag("5", None), flag("5", "north"), flag("5", "south"), flag("6", "south")]
    aliases = {"champion": "5", "champion-south": "6", "challenger": "7"}
    assert _champion_flags(flags, aliases) == [flag("5", None), flag("5", "north")]
    assert _champion_flags(flags, {}) == []  # nothing registered: nothing served, nothing due


def test_two_processes_saving_the_state_at_once_both_succeed_and_leave_a_whole_file(tmp_path):
    """`cytoloop retrain` and a fine-tune job save the state at the same time: both wrote `state.tmp`, so one
    rename found the other's file gone (FileNotFoundError after a finished fine-tune) or moved a half-written one
    into place. Two real threads race here, each saving a different state 100 times."""
    import threading

    path = tmp_path / "retrain" / "state.json"
    labelled = {
        name: [CellRecord(f"{name}{i}.png", tmp_path / f"{name}{i}.png", "neutrophil", "d") for i in range(300)]
        for name in ("a", "b")
    }
    start, errors = threading.Barrier(2), []

    def saver(name: str) -> None:
        start.wait()
        try:
            for _ in range(100):
                save_state(path, labelled[name])
        except Exception as error:  # noqa: BLE001 - collected for the assertion below
            errors.append(error)

    threads = [threading.Thread(target=saver, args=(name,)) for name in labelled]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    trained = set(load_state(path).trained)  # one writer's whole state, not a mix or a truncated file
    assert any(trained == {label_key(record) for record in records} for records in labelled.values())
    assert [p.name for p in path.parent.iterdir()] == ["state.json"]  # no temporary file left


def test_a_state_time_without_a_zone_is_utc(tmp_path):
    """`save_state(when=naive)` wrote, and `load_state` read, a time that `hours_since_last` then failed on
    (TypeError: naive minus aware) inside `retrain` and `status`."""
    from datetime import UTC, datetime

    path = tmp_path / "state.json"
    save_state(path, [], when=datetime(2026, 1, 1, 0, 0))
    assert load_state(path).hours_since_last(datetime(2026, 1, 1, 6, 0, tzinfo=UTC)) == pytest.approx(6.0)
    path.write_text('{"last_time": "2026-01-01T00:00:00", "trained": []}')  # written by hand, or by an older tool
    assert load_state(path).hours_since_last(datetime(2026, 1, 1, 12, 0, tzinfo=UTC)) == pytest.approx(12.0)


def test_a_state_file_that_is_not_one_is_refused_naming_it(tmp_path):
    from cytoloop.errors import UsageError

    path = tmp_path / "state.json"
    path.write_text('{"last_time": "yesterday"')
    with pytest.raises(UsageError, match=f"{path} is not a retrain state file"):
        load_state(path)


def test_labels_of_images_that_moved_are_not_new_and_an_old_state_still_counts(tmp_path):
    """The state named a cell by its resolved path, so an export whose images were mounted elsewhere counted every
    label as new (a retrain due on labels already trained on). Cells are named by their image's content now; a
    state written before still counts its labels; a cell relabelled is new."""
    from dataclasses import replace

    from cytoloop.policy.retrain import RetrainState

    def export(folder) -> list[CellRecord]:
        folder.mkdir(exist_ok=True)
        records = []
        for i in range(5):
            (folder / f"{i}.png").write_bytes(f"image {i}".encode())
            records.append(CellRecord(f"{i}.png", folder / f"{i}.png", "neutrophil", "d"))
        return records

    trained = export(tmp_path / "mnt-a")
    state = save_state(tmp_path / "state.json", trained)
    moved = export(tmp_path / "mnt-b")  # the same images, another mount
    assert new_labels(moved, load_state(tmp_path / "state.json")) == []
    relabelled = [replace(moved[0], label="lymphocyte"), *moved[1:]]
    assert new_labels(relabelled, state) == relabelled[:1]
    legacy = RetrainState(None, {f"{r.path.resolve()}\tneutrophil" for r in trained})  # written by an older release
    assert new_labels(trained, legacy) == []

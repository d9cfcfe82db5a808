"""Drift figures: they stay quiet on cells like the training ones and move when the input colours shift."""

import io
import json
import random
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
from PIL import Image

from cytoloop.config import DataConfig, DriftConfig
from cytoloop.data.records import DatasetError, load_records, select
from cytoloop.evaluation.metrics import top_label_ece
from cytoloop.policy.drift import (
    PredictionEvent,
    colour_statistics,
    colour_statistics_of,
    drift_windows,
    load_flags,
    psi,
    read_events,
    save_flags,
)

CONFIG = DriftConfig(window_hours=1.0, min_cells=5)


def shifted_png(path, factors=(1.25, 0.8, 1.1)) -> bytes:
    """The cell with its RGB channels scaled: another lab's stain and camera."""
    rgb = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) * np.asarray(factors)
    buffer = io.BytesIO()
    Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def jtsc(cells_dir):
    records = select(load_records(cells_dir), ["jtsc"], ["neutrophil", "lymphocyte"])
    random.Random(0).shuffle(records)
    return records[:60], records[60:90]


def test_psi_separates_same_from_shifted():
    rng = np.random.default_rng(0)
    reference = rng.normal(size=2000)
    assert psi(reference, rng.normal(size=500)) < 0.05
    assert psi(reference, rng.normal(loc=1.0, size=500)) > 0.25


def test_top_label_ece():
    confidence = np.array([0.9, 0.9, 0.9, 0.9])
    assert top_label_ece(confidence, np.array([1, 1, 1, 1])) == pytest.approx(0.1)
    assert top_label_ece(confidence, np.array([0, 0, 0, 0])) == pytest.approx(0.9)


def test_colour_drift_moves_when_colours_shift(jtsc):
    config = DataConfig(image_size=16)
    train, incoming = jtsc
    reference = colour_statistics_of(train, config)
    assert reference.shape == (len(train), 6)
    same = np.stack([colour_statistics(r.path, config) for r in incoming])
    shifted = np.stack([colour_statistics(shifted_png(r.path), config) for r in incoming])
    psi_same = max(psi(reference[:, i], same[:, i]) for i in range(6))
    psi_shifted = max(psi(reference[:, i], shifted[:, i]) for i in range(6))
    assert psi_shifted > CONFIG.psi_threshold > psi_same


def test_windows_flag_stain_and_confidence_drift(jtsc):
    config = DataConfig(image_size=16)
    train, incoming = jtsc
    reference = colour_statistics_of(train, config)
    start = datetime(2026, 11, 1, tzinfo=UTC)

    def event(record, hour, shifted, confidence):
        colour = colour_statistics(shifted_png(record.path) if shifted else record.path, config)
        return PredictionEvent(
            time=start + timedelta(hours=hour),
            model_version="3",
            site="north",
            confidence=confidence,
            routed_to_review=confidence < 0.7,
            predicted="neutrophil",
            label=record.label,
            colour=colour.tolist(),
        )

    events = [event(r, 0.5, False, 0.9) for r in incoming] + [event(r, 1.5, True, 0.6) for r in incoming]
    first, second = drift_windows(events, {"3": reference}, CONFIG)
    assert (first.model_version, first.site, first.n_cells) == ("3", "north", len(incoming))
    assert not [f for f in first.flags if f.startswith(("stain", "confidence"))]
    assert second.figures["psi_max"] > first.figures["psi_max"]
    assert second.figures["mean_confidence"] < first.figures["mean_confidence"]
    assert any(f.startswith("stain") for f in second.flags)
    assert any(f.startswith("confidence") for f in second.flags)


def test_small_windows_raise_no_flag():
    events = [
        PredictionEvent(
            time=datetime(2026, 11, 1, tzinfo=UTC),
            model_version="1",
            confidence=0.1,
            routed_to_review=True,
            predicted="a",
            label="b",
        )
    ]
    (window,) = drift_windows(events, {}, CONFIG)
    assert window.flags == [] and window.figures["reviewed_accuracy"] == 0.0


def _events(hour: float, n: int, confidence: float) -> list[PredictionEvent]:
    return [
        PredictionEvent(
            time=datetime(2026, 11, 1, tzinfo=UTC) + timedelta(hours=hour),
            model_version="1",
            confidence=confidence,
            routed_to_review=confidence < 0.7,
            predicted="a",
        )
        for _ in range(n)
    ]


def test_a_deploy_time_test_call_is_no_baseline_and_a_new_window_keeps_the_flags(tmp_path):
    """One test call at deploy time (confidence 0.99) then two ordinary days at 0.85: the baseline is the first
    window large enough to judge, so neither day is flagged against the test call. A confident day, then a drifted
    one, then a few cells of the next: the drifted day's flags stay saved for the retrain policy."""
    config = CONFIG.model_copy(update={"window_hours": 24.0})
    windows = drift_windows(_events(0, 1, 0.99) + _events(24, 100, 0.85) + _events(48, 100, 0.85), {}, config)
    assert [w.flags for w in windows] == [[], [], []]
    windows = drift_windows(_events(0, 100, 0.95) + _events(24, 100, 0.5) + _events(48, 3, 0.5), {}, config)
    assert windows[1].flags and not windows[2].flags
    saved = save_flags(tmp_path / "flags.json", windows, config.min_cells)
    assert [f["flags"] for f in saved] == [windows[1].flags] and load_flags(tmp_path / "flags.json") == saved


def test_a_few_reviewed_cells_neither_set_the_baseline_nor_raise_a_calibration_flag():
    """One correct review made the baseline accuracy 1.0 and one wrong review at confidence 0.9 the next day
    flagged 'ECE 0.900' and an accuracy drop: noise that `retrain.on_drift` would act on."""
    config = CONFIG.model_copy(update={"window_hours": 24.0, "min_reviewed": 20, "ece_threshold": 0.2})

    def day(hour: float, n: int, reviewed: int, correct: bool) -> list[PredictionEvent]:
        events = _events(hour, n, 0.9)
        for event in events[:reviewed]:
            event.label = "a" if correct else "b"
        return events

    noisy = drift_windows(day(0, 100, 1, True) + day(24, 100, 1, False), {}, config)
    assert noisy[1].figures["reviewed_ece"] == pytest.approx(0.9) and noisy[1].flags == []
    # enough reviews: the baseline is the first window with enough of them, and a real drop is flagged
    real = drift_windows(day(0, 100, 1, True) + day(24, 100, 30, True) + day(48, 100, 30, False), {}, config)
    assert [bool(w.flags) for w in real] == [False, False, True]
    assert any("accuracy on reviewed cells 0.000, first window 1.000" in f for f in real[2].flags)
    assert any(f.startswith("calibration: ECE") for f in real[2].flags)


def test_a_calibrated_model_s_reviewed_cells_raise_no_calibration_flag_by_chance_alone():
    """Reviewed cells are few and mostly the unsure ones: on 50 of them at confidence 0.35-0.7, a perfectly
    calibrated model's ECE topped 0.1 in 4 windows of 5, and two windows at one true accuracy differed by over 0.1
    in 1 of 8; each was a calibration flag, and `retrain.on_drift` acted on it. Now at most the test's level."""
    config = CONFIG.model_copy(update={"window_hours": 24.0, "min_cells": 50, "min_reviewed": 50})
    rng = np.random.default_rng(0)

    def day(hour: float, accuracy: float | None = None) -> list[PredictionEvent]:
        confidence = rng.uniform(0.35, 0.7, 50)
        right = rng.random(50) < (confidence if accuracy is None else accuracy)  # calibrated, or a set accuracy
        return [
            PredictionEvent(
                time=datetime(2026, 11, 1, tzinfo=UTC) + timedelta(hours=hour, minutes=i),
                model_version="1",
                confidence=float(c),
                routed_to_review=True,
                predicted="a",
                label="a" if r else "b",
            )
            for i, (c, r) in enumerate(zip(confidence, right))
        ]

    days = 40
    calibrated = drift_windows([e for d in range(days) for e in day(24 * d)], {}, config)
    ece_flags = sum(any(f.startswith("calibration: ECE") for f in w.flags) for w in calibrated)
    drops = sum(any("accuracy on reviewed" in f for f in w.flags) for w in calibrated)
    assert len(calibrated) == days and ece_flags <= 4 and drops <= 4, (ece_flags, drops)
    assert sum(w.figures["reviewed_ece"] > 0.1 for w in calibrated) > days // 2  # the noise the flags now see
    # a real fall, 0.8 to 0.3, is still flagged on the same 50 cells, also when the series' first window had no
    # review at all (the baseline, and the cells it is of, come from the next: it divided by the first's 0 cells)
    fallen = drift_windows(day(0, accuracy=0.8) + day(24, accuracy=0.3), {}, config)
    assert any("accuracy on reviewed cells" in f for f in fallen[1].flags)
    unreviewed = [e.model_copy(update={"label": None}) for e in day(0)]
    fallen = drift_windows(unreviewed + day(24, accuracy=0.8) + day(48, accuracy=0.3), {}, config)
    assert [bool(w.flags) for w in fallen] == [False, False, True]


def test_saved_flags_stand_until_a_later_judged_window_of_their_series_replaces_them(tmp_path):
    """`save_flags` rewrote the file from the log it was given alone: `cytoloop drift` on an empty or rotated log
    (or another replica's) erased the flags the retrain policy reads."""
    config = CONFIG.model_copy(update={"window_hours": 24.0})
    path = tmp_path / "flags.json"
    drifted = drift_windows(_events(0, 100, 0.95) + _events(24, 100, 0.5), {}, config)
    (flag,) = save_flags(path, drifted, config.min_cells)
    assert flag["flags"] == drifted[1].flags
    assert save_flags(path, [], config.min_cells) == [flag]  # an empty log judges nothing
    assert save_flags(path, drift_windows(_events(48, 3, 0.5), {}, config), config.min_cells) == [flag]  # too small
    older = drift_windows(_events(0, 100, 0.95), {}, config)  # a log that ends before the flagged window
    assert save_flags(path, older, config.min_cells) == [flag] and load_flags(path) == [flag]
    other_site = [replace(w, site="b") for w in drifted]
    assert save_flags(path, other_site, config.min_cells) == [flag, {**flag, "site": "b"}]
    recovered = drift_windows(_events(0, 100, 0.95) + _events(24, 100, 0.5) + _events(48, 100, 0.95), {}, config)
    assert not recovered[2].flags
    assert save_flags(path, recovered, config.min_cells) == [{**flag, "site": "b"}]  # a later verdict: cleared
    # and stays cleared: an older log (last week's, rotated) run after it brought the cleared flag back
    assert save_flags(path, drifted, config.min_cells) == [{**flag, "site": "b"}] == load_flags(path)


def test_two_drift_runs_saving_flags_at_once_keep_both_flags(tmp_path, monkeypatch):
    """Two `cytoloop drift` runs (one per site's log) each read the flags, merged their own and wrote: the last
    rename won and the other's flag, the retrain it should trigger, was lost. The writes are slowed to overlap."""
    import threading
    import time

    from cytoloop.policy import drift

    write = drift.write_text

    def slow(path, text):
        time.sleep(0.3)
        write(path, text)

    monkeypatch.setattr(drift, "write_text", slow)
    config = CONFIG.model_copy(update={"window_hours": 24.0})
    path = tmp_path / "flags.json"
    drifted = drift_windows(_events(0, 100, 0.95) + _events(24, 100, 0.5), {}, config)
    runs = [
        threading.Thread(target=save_flags, args=(path, [replace(w, site=site) for w in drifted], config.min_cells))
        for site in ("north", "south")
    ]
    for run in runs:
        run.start()
    for run in runs:
        run.join()
    assert sorted(flag["site"] for flag in load_flags(path)) == ["north", "south"]


def test_a_damaged_colour_reference_is_named(tmp_path):
    """A model's colour reference cut short (it was written in place) was a bare JSONDecodeError in `drift`."""
    from cytoloop.errors import UsageError
    from cytoloop.policy.drift import REFERENCE_FILE, read_colour_reference, write_colour_reference

    path = write_colour_reference(tmp_path, np.zeros((3, 6)))
    assert read_colour_reference(tmp_path).shape == (3, 6) and [p.name for p in tmp_path.iterdir()] == [path.name]
    path.write_text(path.read_text()[:20])
    with pytest.raises(UsageError, match=f"{tmp_path / REFERENCE_FILE}: not a colour reference"):
        read_colour_reference(tmp_path)


EVENT = {
    "time": "2026-11-01T00:00:00Z",
    "model_version": "1",
    "confidence": 0.5,
    "routed_to_review": False,
    "predicted": "neutrophil",
}


def test_bad_event_line_names_the_line(tmp_path):
    log = tmp_path / "events.jsonl"
    log.write_text(json.dumps(EVENT) + "\n" + json.dumps({**EVENT, "confidence": 2.0}) + "\n")
    with pytest.raises(DatasetError, match=r"events.jsonl:2: .*confidence"):
        read_events(log)


def test_a_line_a_killed_writer_cut_short_is_skipped_not_fatal(tmp_path, caplog):
    """A replica killed mid-append (or a full disk) left half a line, and the next replica's append went on
    after it on the same line: every later `cytoloop drift` failed on that line for good."""
    log = tmp_path / "events.jsonl"
    line = json.dumps(EVENT)
    log.write_text(line + "\n" + line[:30] + line + "\n" + line + "\n" + line[:12])
    with caplog.at_level("WARNING"):
        assert len(read_events(log)) == 2
    assert "2 line(s) cut short by a stopped writer skipped (line 2, 4)" in caplog.text
    log.write_text(line[:12])  # a new log whose first writer was killed: no events yet, not a broken log
    assert read_events(log) == []
    log.write_text("garbage\nnot json\n")
    with pytest.raises(DatasetError, match="not a prediction log"):
        read_events(log)


@pytest.mark.parametrize(
    "text",
    [
        '[{"model_version": "2"',
        '{"flags": []}',
        "[1, 2]",
        # what status reads of each verdict: flags a string ("p; s; i"), flags of numbers, a site not a name
        '[{"model_version": "2", "site": null, "flags": "psi"}]',
        '[{"model_version": "2", "site": null, "flags": [1, 2]}]',
        '[{"model_version": "2", "site": 3, "flags": ["psi"]}]',
    ],
)
def test_a_flags_file_that_is_not_one_is_refused_naming_it(tmp_path, text):
    """`cytoloop status` and `retrain --if-due` read the flags file: a damaged one was a traceback."""
    from cytoloop.errors import UsageError

    path = tmp_path / "flags.json"
    path.write_text(text)
    with pytest.raises(UsageError, match=f"{path} is not a drift flags file"):
        load_flags(path)


def test_a_logged_time_without_a_zone_is_utc_for_every_reader(tmp_path):
    """The windows read a naive time as UTC, but the demo's drift (events since an aware time) raised TypeError
    on such a line: the event itself now holds an aware time."""
    from cytoloop.policy.drift import read_events

    log = tmp_path / "predictions.jsonl"
    line = {"model_version": "1", "confidence": 0.9, "routed_to_review": False, "predicted": "a"}
    log.write_text(
        json.dumps({**line, "time": "2026-11-01T10:00:00"})
        + "\n"
        + json.dumps({**line, "time": "2026-11-01T11:00:00+01:00"})
    )
    naive, aware = read_events(log)
    assert naive.time == datetime(2026, 11, 1, 10, tzinfo=UTC) and naive.time == aware.time
    assert [e for e in (naive, aware) if e.time >= datetime(2026, 11, 1, 9, 30, tzinfo=UTC)] == [naive, aware]


def test_reviewed_labels_join_the_log_by_cell_and_each_cell_counts_once(tmp_path):
    """The service never sees labels, so no logged event had one and the calibration figures were never computed;
    and a request retried (a Ray Data block sent again) logged its cells twice. The consensus export's classes now
    join the log by the image's id, and a cell counts once per window, version and site."""
    from cytoloop.policy.drift import read_labels, with_labels

    start = datetime(2026, 11, 1, tzinfo=UTC)

    def event(cell: str, predicted: str, minute: int) -> PredictionEvent:
        return PredictionEvent(
            time=start + timedelta(minutes=minute),
            model_version="3",
            site="north",
            confidence=0.9,
            routed_to_review=False,
            predicted=predicted,
            cell_id=cell,
        )

    log = [event(f"sha256:{i:024x}", "a", i) for i in range(8)]
    log += [event("sha256:" + "0" * 24, "b", 30)]  # cell 0 scored again: its latest prediction stands
    export = tmp_path / "consensus.csv"
    export.write_text(
        "path,label,domain,cell_id,site\n"
        + "".join(f"/cells/{i}.png,a,lab,sha256:{i:024x},north\n" for i in range(4))
        + f"/elsewhere/5.png,a,lab,sha256:{5:024x},south\n/cells/5.png,b,lab,sha256:{5:024x},north\n"  # two sites
    )
    labels = read_labels(export)
    five = f"sha256:{5:024x}"
    assert labels[("north", five)] == "b" and labels[("south", five)] == "a" and (None, five) not in labels
    [window] = drift_windows(with_labels(log, labels), {}, CONFIG.model_copy(update={"min_reviewed": 1}))
    assert window.n_cells == 8 and window.figures["n_reviewed"] == 5  # cells 0-3, and 5 as north labelled it
    assert window.figures["reviewed_accuracy"] == pytest.approx(0.6)  # cell 0's latest answer (b) and 5 are wrong
    unsited = [event.model_copy(update={"site": None}) for event in log]  # a request that named no site
    assert sum(e.label is not None for e in with_labels(unsited, labels)) == 5  # 0-3 (twice 0); 5 is torn
    (tmp_path / "other.csv").write_text("path,label\n/cells/0.png,a\n")
    with pytest.raises(DatasetError, match="other.csv: no cell_id, site column"):
        read_labels(tmp_path / "other.csv")
    # saved by a spreadsheet or an editor with a byte-order mark: the export's first column was "\ufeffpath" (here
    # it is cell_id: "no cell_id column"), and the log's first event a torn line, skipped
    export.write_text("\ufeffcell_id,label,site\n" + f"sha256:{1:024x},a,north\n", encoding="utf-8")
    assert read_labels(export) == {("north", f"sha256:{1:024x}"): "a", (None, f"sha256:{1:024x}"): "a"}
    from cytoloop.policy.drift import read_events

    (tmp_path / "log.jsonl").write_text("\ufeff" + "".join(e.model_dump_json() + "\n" for e in log[:2]))
    assert [e.cell_id for e in read_events(tmp_path / "log.jsonl")] == [e.cell_id for e in log[:2]]
    for reader, name in ((read_labels, "latin.csv"), (read_events, "latin.jsonl")):  # named, not a general message
        (tmp_path / name).write_bytes(b"cell_id,label,site\n\xe9,a,north\n")
        with pytest.raises(DatasetError, match=f"{name}: not a .* \\(not UTF-8 text"):
            reader(tmp_path / name)


def test_served_events_carry_the_cell_id(jtsc):
    from cytoloop.data.records import cell_id
    from cytoloop.policy.drift import prediction_events
    from cytoloop.serving.inference import CellResult

    data = jtsc[0][0].path.read_bytes()
    answer = CellResult(0, "x.bmp", cell_id(data), "a", {"a": 1.0}, 1.0, 0.0, None, "accept", 1)
    [logged] = prediction_events([("x.bmp", data)], [answer], "north", "3", DataConfig(image_size=16))
    assert logged.cell_id == cell_id(data)


def test_a_cell_listed_twice_with_two_classes_gets_neither(tmp_path):
    """Rows that disagree for one site, or a row without a site disagreeing with another, leave the cell without a
    class there: the last row used to win silently."""
    from cytoloop.policy.drift import read_labels

    export = tmp_path / "consensus.csv"
    one, two = "sha256:" + "1" * 24, "sha256:" + "2" * 24
    export.write_text(
        "path,label,domain,cell_id,site\n"
        f"/a.png,a,lab,{one},north\n/a.png,b,lab,{one},north\n"  # listed twice for north, two classes
        f"/b.png,a,lab,{two},\n/b.png,b,lab,{two},south\n"  # no site, and south: they disagree
    )
    labels = read_labels(export)
    assert ("north", one) not in labels and (None, one) not in labels
    assert labels[("south", two)] == "b" and (None, two) not in labels


def test_a_drift_window_is_at_least_an_hour():
    """MLflow's step of a window is the hour it starts: half-hour windows were logged two to a step."""
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="window_hours"):
        DriftConfig(window_hours=0.5)
    assert DriftConfig(window_hours=1.5).window_hours == 1.5


def test_drift_logged_again_over_a_grown_log_keeps_one_point_per_figure_and_the_newest_as_latest(tmp_path):
    """`cytoloop drift` runs hourly over a log that grows: each run logged every window again at its step and
    start time, and of two points of one step and time MLflow reports the larger as the metric's latest (an open
    window's ECE of 0.30 stood after the window settled at 0.05). On a real registry (MLflow on SQLite)."""
    from cytoloop.policy.drift import WindowFigures, log_windows
    from cytoloop.registry import Registry

    registry = Registry(f"sqlite:///{tmp_path}/mlflow.db")
    start = datetime(2026, 12, 1, 8, tzinfo=UTC)

    def window(hours: int, ece: float | None) -> WindowFigures:
        return WindowFigures("3", "north", start + timedelta(hours=hours), 40, {"ece": ece, "brightness": 0.5}, [])

    [run_id] = log_windows(registry, "cells", [window(0, 0.10), window(1, 0.30)]).values()
    assert log_windows(registry, "cells", [window(0, 0.10), window(1, 0.30)]) == {("3", "north"): run_id}
    step = int(start.timestamp() // 3600)
    assert registry.metric_history(run_id, "ece") == [(step, 0.10), (step + 1, 0.30)]  # not logged twice
    log_windows(registry, "cells", [window(0, 0.10), window(1, 0.05), window(2, None)])  # window 1 settled lower
    assert sorted(registry.metric_history(run_id, "ece")) == [(step, 0.10), (step + 1, 0.05), (step + 1, 0.30)]
    assert registry.client.get_run(run_id).data.metrics["ece"] == 0.05
    assert len(registry.metric_history(run_id, "brightness")) == 3  # windows 0, 1 and 2, each once

"""Offline batch scoring with Ray Data (`jobs/score.py: score_offline`, `cytoloop score`) on a real local Ray
(own temp dir, 2 CPUs): two actors, each loading the model directory, answer real cells exactly as the classifier
service's own code does in this process, in the records' order; a missing and a corrupt file are named with
their reason and every other cell is still scored."""

from __future__ import annotations

import csv

import pytest

from tests.integration.conftest import local_ray

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def ray_local():
    with local_ray("ray_bs_"):
        yield


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    import torch

    from cytoloop.config import BaselineModelConfig, DataConfig
    from cytoloop.models.baseline import BaselineClassifier

    torch.manual_seed(0)
    classes = ["eosinophil", "lymphocyte", "monocyte", "neutrophil"]
    model = BaselineClassifier(classes, DataConfig(image_size=16), BaselineModelConfig(channels=(4, 8)))
    return model.save(tmp_path_factory.mktemp("batch") / "model")


@pytest.fixture(scope="module")
def pool(cells_dir, tmp_path_factory):
    """17 real cells of two labs, then a corrupt file and a missing one, then 3 more real cells."""
    from cytoloop.data.records import CellRecord, load_records, select

    real = select(load_records(cells_dir), ["jtsc", "bccd"])[::25][:20]
    broken = tmp_path_factory.mktemp("bad") / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    bad = [
        CellRecord("bad/broken.png", broken, None, "bad"),
        CellRecord("bad/missing.png", broken.parent / "missing.png", None, "bad"),
    ]
    return real[:17] + bad + real[17:]


def test_two_workers_answer_every_cell_as_the_service_would_in_order(ray_local, model_dir, pool):
    from cytoloop.config import RoutingConfig
    from cytoloop.models.loading import load_model
    from cytoloop.serving.inference import CellService
    from cytoloop.serving.model_source import local_ref
    from jobs.score import score_offline

    routing = RoutingConfig(review_below=0.3, audit_fraction=0.0)
    scores = score_offline(pool, model_dir, routing, workers=2, threads=1, batch_size=4)

    assert scores.records == pool and len(scores.results) == len(pool)
    assert scores.version == local_ref(model_dir).version
    assert set(scores.failed) == {str(pool[17].path), str(pool[18].path)}
    assert "not a readable image" in scores.failed[str(pool[17].path)]
    assert "cannot be read" in scores.failed[str(pool[18].path)]
    assert scores.results[17] is None and scores.results[18] is None

    real = [r for i, r in enumerate(pool) if i not in (17, 18)]
    service = CellService(load_model(model_dir), local_ref(model_dir), routing)
    expected = service.classify([(str(r.path.resolve()), r.path.read_bytes()) for r in real])
    got = [result for result in scores.results if result is not None]
    assert [g.name for g in got] == [str(r.path.resolve()) for r in real]  # the records' order, not Ray's
    assert [g.index for g in got] == [i for i in range(len(pool)) if i not in (17, 18)]
    for mine, theirs in zip(got, expected):
        assert (mine.label, mine.route, mine.cell_id) == (theirs.label, theirs.route, theirs.cell_id)
        assert mine.probabilities == pytest.approx(theirs.probabilities, abs=1e-6)


def test_more_workers_than_the_cluster_holds_is_a_clear_error(ray_local, model_dir, pool):
    from cytoloop.config import RoutingConfig
    from cytoloop.errors import UsageError
    from cytoloop.models.base import ModelLoadError
    from jobs.score import score_offline

    with pytest.raises(UsageError, match="do not fit the Ray cluster"):
        score_offline(pool, model_dir, RoutingConfig(), workers=3, threads=1)
    with pytest.raises(ModelLoadError, match="not a CytoLoop model directory"):
        score_offline(pool, model_dir.parent, RoutingConfig())


def test_a_job_none_of_whose_workers_fits_the_free_cpus_is_a_clear_error_not_a_wait(
    ray_local, model_dir, pool, monkeypatch, tmp_path
):
    """Checked against the cluster's total CPUs only, a job on a cluster whose CPUs other work holds (the stack's
    Serve replicas, a fine-tune) waited for ever for actors Ray Data could not place. It waits a while for them to
    be freed, then says what is free; with the CPUs given back it runs. A stopped run whose journal answers every
    cell needs no actor: it finishes whatever the cluster holds."""
    import ray

    import jobs.room
    from cytoloop.config import RoutingConfig
    from cytoloop.errors import UsageError
    from jobs.score import score_offline

    @ray.remote(num_cpus=2)
    class Holder:  # other work holding both of the cluster's CPUs
        def ready(self) -> bool:
            return True

    journal = tmp_path / "scores.journal"
    score_offline(pool[:4], model_dir, RoutingConfig(), threads=1, journal=journal)
    holder = Holder.remote()
    ray.get(holder.ready.remote())
    monkeypatch.setattr(jobs.room, "PLACEMENT_WAIT_S", 2.0)
    try:
        with pytest.raises(UsageError, match=r"not one of 1 workers .* can be placed .* after 2 s \(0 of 2 CPUs free"):
            score_offline(pool[:4], model_dir, RoutingConfig(), workers=1, threads=1)
        assert score_offline(pool[:4], model_dir, RoutingConfig(), threads=1, journal=journal).resumed == 4
    finally:
        ray.kill(holder)
    monkeypatch.setattr(jobs.room, "PLACEMENT_WAIT_S", 30.0)  # the killed actor's CPUs come back within it
    assert len(score_offline(pool[:4], model_dir, RoutingConfig(), workers=2, threads=1).scored) == 4


def test_a_fine_tune_that_cannot_be_placed_is_a_clear_error_not_a_wait(ray_local, tmp_path, monkeypatch):
    """Ray Train waited for workers the cluster could not place (more than its CPUs, a GPU it lacks), timed out,
    and retried that for ever: a retrain hung, holding the fine-tune lock. Workers the cluster holds but other work
    has taken (the stack's Serve replicas) were waited for a minute per try, four tries, and failed in Ray's words:
    now a while, then the error says what is free."""
    import ray

    import jobs.room
    from cytoloop.config import Settings
    from cytoloop.errors import UsageError
    from jobs.finetune import fit_on_ray

    gpus = int(ray.cluster_resources().get("GPU", 0))
    for finetune in ({"num_workers": 64}, {"num_workers": gpus + 1, "use_gpu": True}):
        settings = Settings(home=tmp_path, finetune=finetune)
        with pytest.raises(UsageError, match="do not fit the Ray cluster"):
            fit_on_ray(settings, "never", {}, tmp_path / "out")

    @ray.remote(num_cpus=1)
    class Holder:  # other work holding one of the cluster's two CPUs
        def ready(self) -> bool:
            return True

    holder = Holder.remote()
    ray.get(holder.ready.remote())
    monkeypatch.setattr(jobs.room, "PLACEMENT_WAIT_S", 2.0)
    try:
        with pytest.raises(UsageError, match=r"cannot all be placed .* after 2 s \([01] of 2 CPUs free.*fewer workers"):
            fit_on_ray(Settings(home=tmp_path, finetune={"num_workers": 2}), "never", {}, tmp_path / "out")
    finally:
        ray.kill(holder)


def test_score_command_writes_one_row_per_cell(ray_local, model_dir, pool, tmp_path):
    """`cytoloop score` over a manifest: one CSV row per cell in the manifest's order, probabilities per class,
    the reason where a cell could not be scored."""
    import shutil

    from typer.testing import CliRunner

    from ops.cli import app

    manifest = tmp_path / "pool.csv"
    with manifest.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["cell_id", "path", "label", "domain"])
        for record in pool:
            writer.writerow([record.cell_id, record.path, record.label or "", record.domain])
    out = tmp_path / "scores.csv"
    result = CliRunner().invoke(
        app,
        [
            "score",
            "--model",
            str(model_dir),
            "--data",
            str(manifest),
            "--out",
            str(out),
            "--workers",
            "2",
            "--threads",
            "1",
            "--batch-size",
            "8",
        ],
    )
    # a cell whose file cannot be read (a mount missing on a worker) is not done: exit 6, and the journal kept so
    # that a run once it can be read scores only it (the run exited 0 and threw the answers away)
    assert result.exit_code == 6, result.output
    assert f"scored {len(pool) - 2} of {len(pool)} cells" in result.output
    assert f"1 of {len(pool)} cells' files could not be read" in " ".join(result.output.split())
    assert (tmp_path / "scores.csv.journal").exists()
    rows = list(csv.DictReader(out.open()))
    assert [row["path"] for row in rows] == [str(r.path) for r in pool]
    assert rows[17]["error"] and rows[18]["error"] and not rows[17]["label"]
    scored = [row for row in rows if not row["error"]]
    assert all(row["label"] in {"eosinophil", "lymphocyte", "monocyte", "neutrophil"} for row in scored)
    assert all(
        abs(sum(float(row[f"p_{c}"]) for c in ("eosinophil", "lymphocyte", "monocyte", "neutrophil")) - 1) < 1e-4
        for row in scored
    )
    shutil.copy(pool[0].path, pool[18].path)  # the missing file is there now
    again = CliRunner().invoke(app, ["score", "--model", str(model_dir), "--data", str(manifest), "--out", str(out)])
    assert again.exit_code == 0, again.output  # the corrupt one stays refused: final, not worth another run
    assert f"{len(pool) - 2} cells were answered by the stopped earlier run" in again.output
    assert not (tmp_path / "scores.csv.journal").exists()  # the answers are in the CSV now
    assert [bool(row["error"]) for row in csv.DictReader(out.open())].count(True) == 1
    pool[18].path.unlink()
    # nothing could be scored (a wrong folder, images not on the workers): not 'done' for a scheduler
    with (tmp_path / "broken.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows([["path", "label", "domain"], *[[pool[i].path, "", "x"] for i in (17, 18)]])
    broken = CliRunner().invoke(
        app, ["score", "--model", str(model_dir), "--data", str(tmp_path / "broken.csv"), "--out", str(out)]
    )
    assert broken.exit_code == 2 and "none of the 2 cells could be scored" in broken.output, broken.output
    assert [row["error"] != "" for row in csv.DictReader(out.open())] == [True, True]  # the reasons, kept
    # every file unreadable (the images not mounted yet): worth running again, as for some (it exited 2, final)
    with (tmp_path / "unmounted.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows([["path", "label", "domain"], [pool[18].path, "", "x"]])
    unmounted = CliRunner().invoke(
        app, ["score", "--model", str(model_dir), "--data", str(tmp_path / "unmounted.csv"), "--out", str(out)]
    )
    assert unmounted.exit_code == 6, unmounted.output
    assert "1 of 1 cells' files could not be read" in " ".join(unmounted.output.split()), unmounted.output


def test_scoring_as_a_site_decides_among_its_classes(ray_local, model_dir, pool, tmp_path, monkeypatch):
    """`cytoloop score --site`: every cell decided among the classes the site reports (`sites.<site>.classes`),
    as the service answers that site; a site without classes of its own, or one naming a class the model lacks,
    is refused before any actor starts."""
    import json

    from typer.testing import CliRunner

    from ops.cli import app

    manifest = tmp_path / "pool.csv"
    with manifest.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["cell_id", "path", "label", "domain"])
        for record in pool[:12]:
            writer.writerow([record.cell_id, record.path, record.label or "", record.domain])
    sites = {"st-marys": {"classes": ["lymphocyte", "neutrophil"]}, "odd": {"classes": ["platelet"]}}
    monkeypatch.setenv("CYTOLOOP_SITES", json.dumps(sites))
    out = tmp_path / "site.csv"
    args = ["score", "--model", str(model_dir), "--data", str(manifest), "--out", str(out), "--batch-size", "8"]
    result = CliRunner().invoke(app, [*args, "--site", "st-marys"])
    assert result.exit_code == 0, result.output
    scored = [row for row in csv.DictReader(out.open()) if not row["error"]]
    assert scored and all(row["label"] in {"lymphocyte", "neutrophil"} for row in scored)
    assert all(float(row["p_eosinophil"]) == 0 == float(row["p_monocyte"]) for row in scored)
    for site, named in (("elsewhere", "has no classes of its own"), ("odd", "platelet")):
        refused = CliRunner().invoke(app, [*args, "--site", site])
        assert refused.exit_code == 2 and named in refused.output, refused.output


SCORE_IN_A_PROCESS = """
import sys
from pathlib import Path

from cytoloop.config import RoutingConfig
from cytoloop.data.records import load_records, select
from jobs.score import score_offline

records = select(load_records(sys.argv[1]), ["jtsc", "bccd"])
routing = RoutingConfig(review_below=0.3, audit_fraction=0.0)
score_offline(records, Path(sys.argv[2]), routing, threads=1, batch_size=1, journal=Path(sys.argv[3]))
"""


def test_a_killed_scoring_run_goes_on_where_it_stopped(ray_local, model_dir, cells_dir, tmp_path):
    """A scoring job SIGKILLed part-way through a pool (a lost node, a scheduler's time limit) kept nothing and
    scored every cell again. Its journal now holds each answer as it came; the next run of the same model and
    settings takes those and scores only the rest, and a run with other settings does not take them."""
    import json
    import os
    import shutil
    import signal
    import subprocess
    import sys
    import time
    from concurrent.futures import ThreadPoolExecutor
    from pathlib import Path

    import ray

    from cytoloop.config import RoutingConfig
    from cytoloop.data.records import load_records, select
    from cytoloop.errors import UsageError
    from jobs.score import score_offline
    from jobs.score_journal import ScoreJournal

    records = select(load_records(cells_dir), ["jtsc", "bccd"])
    journal = tmp_path / "scores.csv.journal"
    environment = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, "PYTHONPATH": "platform:."}
    job = subprocess.Popen(
        [sys.executable, "-c", SCORE_IN_A_PROCESS, str(cells_dir), str(model_dir), str(journal)], env=environment
    )
    try:
        deadline = time.monotonic() + 180
        while job.poll() is None and time.monotonic() < deadline:
            if journal.is_file() and journal.read_bytes().count(b"\n") > 30:
                break
            time.sleep(0.01)
        assert job.poll() is None, "the job ended before it could be killed part-way"
    finally:
        job.send_signal(signal.SIGKILL)
        job.wait()
    kept = journal.read_bytes().count(b"\n") - 1  # less the header
    assert 30 <= kept < len(records) - 100
    again = tmp_path / "again.journal"
    shutil.copy(journal, again)

    routing = RoutingConfig(review_below=0.3, audit_fraction=0.0)
    finished = []

    def finish(scores):  # the journal still held: `cytoloop score` writes its CSV and removes the journal here
        with ThreadPoolExecutor(1) as another:  # another run, in a thread of its own
            with pytest.raises(UsageError, match="being written by another scoring run"):
                another.submit(ScoreJournal, journal, {"another": "setup"}).result()
        finished.append(len(scores.records))

    resumed = score_offline(
        records, model_dir, routing, workers=2, threads=1, batch_size=8, journal=journal, finish=finish
    )
    assert finished == [len(records)]
    assert kept <= resumed.resumed <= kept + 1 and resumed.failed == {}  # +1: a line the kill cut short
    assert all(result is not None and result.index == i for i, result in enumerate(resumed.results))
    where = {str(Path(r.path).resolve()): i for i, r in enumerate(records)}
    taken = [where[json.loads(line)["path"]] for line in again.read_text().splitlines()[1:] if line.endswith("}}")]
    fresh = score_offline([records[i] for i in taken], model_dir, routing, threads=1, batch_size=8)
    for i, scored in zip(taken, fresh.results):  # the journal's answers are the model's, scored again here
        assert (resumed.results[i].label, resumed.results[i].route) == (scored.label, scored.route)
        assert all(abs(resumed.results[i].probabilities[c] - p) < 1e-6 for c, p in scored.probabilities.items())
    stricter = RoutingConfig(review_below=0.5, audit_fraction=0.0)  # another setting: other answers
    assert score_offline(records[:4], model_dir, stricter, threads=1, batch_size=8, journal=again).resumed == 0

    # a journal of these settings left by a run days ago answered today's cells of the same file names with its own
    # answers (a scanner's export names every day's cells cell_0001.png...): only an answer of the image now at
    # its path counts
    from cytoloop.data.records import CellRecord, file_cell_id

    day = tmp_path / "day"
    day.mkdir()
    for i in range(3):
        shutil.copy(records[i].path, day / f"cell_{i}.png")
    today = [CellRecord(f"cell_{i}.png", day / f"cell_{i}.png", None, "jtsc") for i in range(3)]
    yesterday = tmp_path / "day.journal"
    score_offline(today, model_dir, routing, threads=1, batch_size=8, journal=yesterday)
    shutil.copy(records[3].path, day / "cell_0.png")  # another image under the same name
    later = score_offline(today, model_dir, routing, threads=1, batch_size=8, journal=yesterday)
    assert later.resumed == 2 and later.results[0].cell_id == file_cell_id(day / "cell_0.png")

"""Retraining end to end on real MLflow (SQLite) and real Ray Train (2 CPU workers), with tiny models.

- a fine-tune on Ray Train survives a killed worker (resumes from its checkpoint) and registers a version with its
  provenance tags, calibration figures and evaluation plots;
- a deliberately worse challenger (untrained weights) is refused by the gate and the champion stays;
- an override (`cytoloop promote`) and a rollback (`cytoloop rollback`) land in the audit trail;
- drift figures logged to MLflow move when the input colours shift, and `cytoloop status` shows the flag;
- a hospital's model (`cytoloop adapt`) is used for that hospital only.
"""

from __future__ import annotations

import copy
import json
import os
import random
import signal
import tempfile
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cytoloop.data.records import load_records, select
from tests.integration.conftest import local_ray

TWO = ["neutrophil", "lymphocyte"]
pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def ray_cluster():
    with local_ray("ray_rt_"):
        yield


@pytest.fixture(scope="module")
def records(cells_dir):
    return load_records(cells_dir)


def make_settings(root: Path, tiny_overrides: dict, model_name: str, **sections):
    """Settings for one isolated registry under `root`, also written to root/config.json for the CLI."""
    from cytoloop.config import load_settings

    os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
    overrides = copy.deepcopy(tiny_overrides)
    overrides.update(
        {
            "home": str(root / "home"),
            "registry": {
                "tracking_uri": f"sqlite:///{root}/mlflow.db",
                "cache_dir": str(root / "cache"),
                "model_name": model_name,
            },
            "finetune": {
                "steps": 6,
                "warmup_steps": 2,
                "num_workers": 2,
                "storage_path": str(root / "ray"),
                "max_failures": 2,
            },
            "adapt": {"steps": 4},
            **sections,
        }
    )
    settings = load_settings(overrides=overrides)
    (root / "config.json").write_text(settings.model_dump_json())
    return settings


def train_and_register(kind, cells, settings, out, why="first champion"):
    from cytoloop.registry import CHAMPION, open_registry
    from cytoloop.workflows import train_model

    train_model(kind, cells, settings, out, classes=TWO)
    registry = open_registry(settings)
    version = registry.log_model(out, settings.registry.model_name, tags={"kind": kind, "site": "global"})
    registry.move_alias(settings.registry.model_name, CHAMPION, version.version, why=why)
    return registry, version.version


def our_ray_train_workers() -> list[int]:
    """Pids of the Ray Train workers this test process started (never another session's)."""
    me, found = os.getpid(), []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if not (entry / "cmdline").read_bytes().startswith(b"ray::RayTrainWorker"):
                continue
            pid = int(entry.name)
            while pid > 1 and pid != me:
                pid = int((Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if pid == me:
                found.append(int(entry.name))
        except (OSError, ValueError, IndexError):
            continue
    return found


def test_finetune_survives_a_dead_worker_and_registers_a_version(
    tmp_path, ray_cluster, records, tiny_overrides, monkeypatch
):
    from jobs.finetune import run_finetune

    train_overrides = {**tiny_overrides["train"], "checkpoint_every": 2, "log_every": 2}
    settings = make_settings(
        tmp_path,
        {**tiny_overrides, "train": train_overrides},
        "retrain-test",
        finetune={
            "steps": 24,
            "warmup_steps": 2,
            "num_workers": 2,
            "max_failures": 2,
            "storage_path": str(tmp_path / "ray"),
        },
    )
    registry, parent = train_and_register(
        "diffusion", select(records, ["jtsc"], TWO)[:60], settings, tmp_path / "champion"
    )
    learnt = select(records, ["jtsc"], TWO)[:20]  # cells of the champion's own split, its training cells among them
    labels = select(records, ["bccd"], TWO)[:50] + learnt
    pool = [r for r in select(records, ["cellavision"], TWO)[:8]]

    killed: list[int] = []

    def kill_a_worker_after_the_first_checkpoint():
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and not killed:
            # the snapshot is written once Ray Train has registered a checkpoint (not just begun uploading it)
            if list((tmp_path / "ray").glob("*/checkpoint_manager_snapshot.json")):
                workers = our_ray_train_workers()
                if workers:
                    os.kill(workers[-1], signal.SIGKILL)
                    killed.append(workers[-1])
            time.sleep(0.1)

    killer = threading.Thread(target=kill_a_worker_after_the_first_checkpoint, daemon=True)
    killer.start()
    outcome = run_finetune(settings, labels, pool)  # Ray Train wants the main thread
    killer.join(timeout=1)

    assert killed, "no Ray Train worker was found to kill"
    assert outcome.metrics["resumed_from_step"] > 0  # the restarted workers continued from the checkpoint
    tags = outcome.version.tags
    assert tags["parent_version"] == parent
    assert tags["site"] == "global" and tags["kind"] == "diffusion" and tags["job"] == "retrain"
    assert len(tags["data_snapshot"]) == 16 and tags["code_revision"]
    assert 0 < int(tags["label_count"]) < len(labels)  # frozen val/eval cells are never trained on
    assert tags["gate.verdict"] in ("pass", "refused") and tags["gate.champion_version"] == parent
    assert (settings.home / "frozen" / "global" / "eval.csv").is_file()
    # the gate judges the champion on its frozen cells: none it trained or was calibrated on
    from cytoloop.models.finetune import frozen_directory
    from cytoloop.workflows import seen_by

    seen = {Path(r.path).resolve() for r in seen_by(learnt, tmp_path / "champion")}
    frozen_dir = frozen_directory(settings.home, None)
    frozen = {Path(r.path).resolve() for part in ("val", "eval") for r in load_records(frozen_dir / f"{part}.csv")}
    assert seen and not seen & frozen

    run = registry.client.get_run(outcome.version.run_id)
    for metric in ("ece", "nll", "brier"):
        assert f"calibration_{metric}_before" in run.data.metrics and f"calibration_{metric}_after" in run.data.metrics
    assert run.data.params["num_workers"] == "2" and run.data.params["n_unlabeled"] == str(len(pool))
    artifacts = {a.path for a in registry.client.list_artifacts(outcome.version.run_id)}
    assert {"challenger.reliability.png", "challenger.confusion.png", "per_class_recall.json"} <= artifacts
    # the MLflow UI tells the version's story: a named run, the loss per step, the cells as a dataset input
    assert run.info.run_name.startswith(f"finetune-global-v{parent}-")
    losses = registry.client.get_metric_history(outcome.version.run_id, "train_loss")
    assert len(losses) >= 2 and sorted(m.step for m in losses)[-1] == settings.finetune.steps
    [dataset] = run.inputs.dataset_inputs
    assert dataset.dataset.name == f"global-labels-{tags['data_snapshot']}"
    assert registry.alias_version(settings.registry.model_name, "challenger") == outcome.version.version

    loaded = registry.load(settings.registry.model_name, outcome.version.version, settings.registry.cache_dir)
    assert loaded.classes == TWO and loaded.info["parent_version"] == parent
    # its own training on its model card, not its parent's (the parent trained other steps on other cells)
    assert loaded.info["steps"] == settings.finetune.steps and loaded.info["n_train"] == int(tags["label_count"])

    # the same job again (same parent: a promotion made another job, so the champion is put back first): its
    # finished version, not a duplicate (it used to register another)
    if outcome.passed:
        registry.move_alias(settings.registry.model_name, "champion", parent, why="test: the same job again")
    versions_before = len(registry.versions(settings.registry.model_name))
    again = run_finetune(settings, labels, pool)
    assert again.version.version == outcome.version.version  # promoted, then moved off: not reported promoted
    assert (again.passed, again.state) == ((False, "withdrawn") if outcome.passed else (False, "refused"))
    assert len(registry.versions(settings.registry.model_name)) == versions_before
    # a job stopped after registering its version and before its verdict leaves a version without gate tags: its
    # rerun judges that version (it used to report it finished, refused with no reason, and never gate it)
    name, version = settings.registry.model_name, outcome.version.version
    for key in [k for k in registry.version(name, version).tags if k.startswith("gate.")]:
        registry.client.delete_model_version_tag(name, version, key)
    if outcome.passed:
        registry.move_alias(name, "champion", parent, why="test: judged again")
    judged = run_finetune(settings, labels, pool)
    assert judged.version.version == version and len(registry.versions(name)) == versions_before
    assert (
        judged.metrics["calibration_ece_before"] == outcome.metrics["calibration_ece_before"]
    )  # what `retrain` prints
    assert judged.version.tags["gate.verdict"] in ("pass", "refused") and judged.passed == outcome.passed
    assert (registry.alias_version(name, "champion") == version) == judged.passed
    # a job killed after promoting its version, before `retrain` saved its state: rerun (the next cron), its own
    # version is now the parent; it used to train that on the same labels again, a duplicate
    if not judged.passed:
        registry.move_alias(name, "champion", version, why="test: as the job's own promotion")
    rerun = run_finetune(settings, labels, pool)
    assert rerun.version.version == version and len(registry.versions(name)) == versions_before
    registry.move_alias(name, "champion", parent, why="test: the parent back")
    # a person rolls the champion back (here: to another version) while the job runs: its version, built on a
    # parent that no longer serves, is not promoted however it fares against what serves now
    for key in [k for k in registry.version(name, version).tags if k.startswith("gate.")]:
        registry.client.delete_model_version_tag(name, version, key)
    other = registry.log_model(tmp_path / "champion", name, tags={"kind": "diffusion"}).version
    from cytoloop.policy import promotion

    real_gate_data = promotion.gate_data

    def rolled_back_meanwhile(*args, **kwargs):
        registry.move_alias(name, "champion", other, why="test: a rollback while the job ran")
        return real_gate_data(*args, **kwargs)

    monkeypatch.setattr(promotion, "gate_data", rolled_back_meanwhile)
    lenient = {"balanced_accuracy_tolerance": 1.0, "ece_tolerance": 1.0, "anomaly_auroc_tolerance": 1.0}
    passing = settings.model_copy(update={"promotion": settings.promotion.model_copy(update=lenient)})
    superseded = run_finetune(passing, labels, pool)  # a version its gate passes (a refusal stays a refusal)
    assert superseded.version.version == version and not superseded.passed
    assert f"its parent v{parent} is no longer @champion (v{other} is)" in superseded.reasons[0]
    assert superseded.version.tags["gate.verdict"] == "stale" and registry.alias_version(name, "champion") == other
    assert superseded.version.tags["gate.champion_version"] == other  # what the gate measured, kept (it was not)
    assert float(superseded.version.tags["gate.challenger.balanced_accuracy"]) >= 0
    # and the run's name holds the settings that decide the result: a changed job never resumes this one
    from cytoloop.config import AugmentConfig, DataConfig
    from cytoloop.models.finetune import finetune_configs
    from jobs.finetune import _settings_key

    train_config, augment_config = finetune_configs(settings, False)
    key = _settings_key(train_config, augment_config, DataConfig())
    assert key != _settings_key(train_config.model_copy(update={"steps": 25}), augment_config, DataConfig())
    assert key != _settings_key(train_config, AugmentConfig(hed_sigma=0.3), DataConfig())
    assert key != _settings_key(train_config, augment_config, DataConfig(), ["neutrophil"])  # calibrated for a site
    assert key == _settings_key(train_config.model_copy(update={"threads": 7}), augment_config, DataConfig())
    two_workers = _settings_key(train_config, augment_config, DataConfig(), None, (2, False))
    assert two_workers != _settings_key(train_config, augment_config, DataConfig(), None, (1, False))  # batch, shard


@pytest.fixture(scope="module")
def gated(tmp_path_factory, records, tiny_overrides):
    """A baseline champion worth keeping, an untrained challenger, and the cells the gate judges them on."""
    from cytoloop.models.baseline import BaselineClassifier

    root = tmp_path_factory.mktemp("gate")
    cells = select(records, ["jtsc"], TWO)
    random.Random(0).shuffle(cells)
    anomalies = select(records, ["allidb2"])[::13]
    from cytoloop.models.finetune import write_manifest

    write_manifest(anomalies, root / "anomalies.csv")
    overrides = {**tiny_overrides, "train": {**tiny_overrides["train"], "steps": 150, "lr": 1e-3}}
    settings = make_settings(
        root,
        overrides,
        "gate-test",
        promotion={"anomaly_manifest": str(root / "anomalies.csv"), "anomaly_label": "blast"},
        finetune={"steps": 6, "warmup_steps": 2, "num_workers": 1, "storage_path": str(root / "ray")},
        drift={"window_hours": 1.0, "min_cells": 5},
        sites={"east": {"classes": ["lymphocyte"]}},  # a site no test adapts: `status` names its classes
    )
    registry, champion = train_and_register("baseline", cells[:120], settings, root / "champion")
    untrained = BaselineClassifier(TWO, settings.data, settings.baseline)
    untrained.save(root / "untrained")
    challenger = registry.log_model(root / "untrained", settings.registry.model_name, tags={"kind": "baseline"})
    return {
        "root": root,
        "settings": settings,
        "registry": registry,
        "champion": champion,
        "challenger": challenger.version,
        "eval": cells[120:180],
        "name": settings.registry.model_name,
    }


def test_a_worse_challenger_is_refused_and_the_champion_stays(gated):
    from cytoloop.models.loading import load_model
    from cytoloop.policy.promotion import apply_verdict, compare, gate_data, gate_figures

    settings, registry, name = gated["settings"], gated["registry"], gated["name"]
    data = gate_data(gated["eval"], settings.promotion, TWO)
    champion = gate_figures(load_model(gated["root"] / "champion"), data)
    challenger = gate_figures(load_model(gated["root"] / "untrained"), data)
    assert champion["balanced_accuracy"] > 0.6, "the champion must be worth protecting for this test to mean much"
    assert champion["anomaly_auroc"] is not None
    import numpy as np

    from cytoloop.evaluation import metrics

    kept = champion["per_cell_anomaly"]  # each anomaly-set cell's score, for the AUROC's paired interval
    assert len(kept["cells"]) == len(data.anomaly_records)
    assert metrics.auroc(np.array(kept["scores"]), np.array(kept["positive"])) == champion["anomaly_auroc"]

    verdict = compare(challenger, champion, settings.promotion)
    assert any(r.startswith("anomaly_auroc") and "anomaly-set cells" in r for r in verdict.reasons)
    verdict.champion_version = gated["champion"]
    assert apply_verdict(registry, name, gated["challenger"], "champion", verdict) is None
    assert not verdict.passed
    assert registry.by_alias(name, "champion").version == gated["champion"]
    tags = registry.version(name, gated["challenger"]).tags
    assert tags["gate.verdict"] == "refused"
    assert any("balanced_accuracy" in r and "WORSE" in r for r in json.loads(tags["gate.reasons"]))


def test_override_and_rollback_are_recorded(gated):
    from ops.cli import app

    registry, name, config = gated["registry"], gated["name"], str(gated["root"] / "config.json")
    runner = CliRunner()
    promote = ["promote", gated["challenger"], "--reason", "reviewed by Dr. Ada: gate too strict", "--config", config]
    declined = runner.invoke(app, promote, input="n\n")  # it asks first; no means nothing moves (exit 2, not a bug's 1)
    assert declined.exit_code == 2 and "overriding the gate?" in declined.output
    assert "not confirmed: nothing was moved" in " ".join(declined.output.split())
    assert registry.by_alias(name, "champion").version == gated["champion"]
    result = runner.invoke(app, [*promote, "--yes"])
    assert result.exit_code == 0, result.output
    assert registry.by_alias(name, "champion").version == gated["challenger"]
    assert registry.version(name, gated["challenger"]).tags["gate.override"] == "reviewed by Dr. Ada: gate too strict"

    result = runner.invoke(app, ["rollback", "--reason", "worse on the ward", "--config", config], input="y\n")
    assert result.exit_code == 0, result.output
    assert registry.by_alias(name, "champion").version == gated["champion"]

    override, back = registry.alias_history(name, "champion")[-2:]
    assert (override.action, override.from_version, override.to_version) == (
        "override",
        gated["champion"],
        gated["challenger"],
    )
    assert override.why == "reviewed by Dr. Ada: gate too strict" and override.who
    assert (back.action, back.from_version, back.to_version, back.why) == (
        "rollback",
        gated["challenger"],
        gated["champion"],
        "worse on the ward",
    )
    log = [
        json.loads(line)
        for line in (gated["settings"].home / "registry" / "alias-moves.jsonl").read_text().splitlines()
    ]
    assert [m["action"] for m in log[-2:]] == ["override", "rollback"]

    nothing_left = runner.invoke(app, ["rollback", "--reason", "again", "--config", config, "--yes"])
    assert nothing_left.exit_code == 2 and "no earlier version" in nothing_left.output


def test_retrain_if_due_waits_for_new_labels(gated):
    from cytoloop.models.finetune import write_manifest
    from cytoloop.policy.retrain import save_state
    from ops.cli import app

    settings, registry, name, root = gated["settings"], gated["registry"], gated["name"], gated["root"]
    write_manifest(gated["eval"], root / "consensus.csv")
    save_state(settings.home / "retrain" / "state.json", load_records(root / "consensus.csv"))
    versions = len(registry.versions(name))
    result = CliRunner().invoke(
        app, ["retrain", "--labels", str(root / "consensus.csv"), "--if-due", "--config", str(root / "config.json")]
    )
    assert result.exit_code == 4, result.output  # EXIT_NOT_DUE: a scheduler tells it from done and from failed
    assert "retrain not due: 0 new labels" in result.output
    assert len(registry.versions(name)) == versions
    # the last drift flags of a version no longer champion are history, not a reason to retrain the champion
    retired = {"model_version": "0", "site": None, "window_start": "2026-11-01T00:00:00+00:00", "flags": ["stain"]}
    (settings.home / "drift").mkdir(parents=True, exist_ok=True)
    (settings.home / "drift" / "flags.json").write_text(json.dumps([retired]))
    again = CliRunner().invoke(
        app, ["retrain", "--labels", str(root / "consensus.csv"), "--if-due", "--config", str(root / "config.json")]
    )
    assert again.exit_code == 4 and "drift flagged" not in again.output, again.output
    status = ["status", "--labels", str(root / "consensus.csv"), "--json", "--config", str(root / "config.json")]
    said = json.loads(CliRunner().invoke(app, status).stdout)
    assert "drift flagged" not in said["retrain"]["reason"] and said["drift_flags"] == [retired]  # shown, not due
    current = {**retired, "model_version": registry.by_alias(name, "champion").version}
    (settings.home / "drift" / "flags.json").write_text(json.dumps([retired, current]))
    flagged = CliRunner().invoke(
        app, ["retrain", "--labels", str(root / "consensus.csv"), "--if-due", "--config", str(root / "config.json")]
    )
    assert flagged.exit_code == 4 and "; drift flagged" in flagged.output, flagged.output  # still 0 new labels
    assert "; drift flagged" in json.loads(CliRunner().invoke(app, status).stdout)["retrain"]["reason"]
    # a scheduler's call while another retrain runs (its lock held by another thread here): it decided on the
    # state before the other recorded its outcome, and then waited to train on its own export
    from jobs.finetune import finetune_lock
    from tests.faults import held_by_another_thread

    with held_by_another_thread(lambda: finetune_lock(settings, None)):
        busy = CliRunner().invoke(
            app, ["retrain", "--labels", str(root / "consensus.csv"), "--if-due", "--config", str(root / "config.json")]
        )
    assert busy.exit_code == 4 and "another retrain of the global model is running" in busy.output, busy.output

    bad = CliRunner().invoke(
        app, ["retrain", "--labels", str(root / "missing.csv"), "--config", str(root / "config.json")]
    )
    assert bad.exit_code == 2 and "missing.csv" in bad.output


def shifted_png(path, factors=(1.25, 0.8, 1.1)) -> bytes:
    """The cell with its RGB channels scaled: another lab's stain and camera."""
    import io

    import numpy as np
    from PIL import Image

    rgb = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) * np.asarray(factors)
    buffer = io.BytesIO()
    Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_drift_is_logged_and_flagged(gated):
    from cytoloop.data.records import cell_id
    from cytoloop.models.finetune import write_manifest
    from cytoloop.policy.drift import colour_statistics
    from cytoloop.policy.retrain import save_state
    from ops.cli import app

    settings, registry, root = gated["settings"], gated["registry"], gated["root"]
    start = datetime(2026, 11, 2, tzinfo=UTC)
    lines, export = [], ["path,label,domain,cell_id,site"]  # the reviewed classes, as `review export` writes them
    for hour, shifted, confidence in ((0.5, False, 0.97), (1.5, True, 0.55)):
        for record in gated["eval"]:
            image = shifted_png(record.path) if shifted else record.path.read_bytes()
            colour = colour_statistics(image, settings.data)
            export.append(f"{record.path},{record.label},{record.domain},{cell_id(image)},north")
            lines.append(
                json.dumps(
                    {
                        "time": (start + timedelta(hours=hour)).isoformat(),
                        "model_version": gated["champion"],
                        "site": "north",
                        "confidence": confidence,
                        "routed_to_review": confidence < 0.7,
                        "predicted": record.label,
                        "colour": colour.tolist(),
                        "cell_id": cell_id(image),
                    }
                )
            )
    (root / "predictions.jsonl").write_text("\n".join(lines) + "\n")
    (root / "consensus.csv").write_text("\n".join(export) + "\n")

    runner = CliRunner()
    config = str(root / "config.json")
    (settings.home / "drift" / "flags.json").unlink(missing_ok=True)  # saved flags stand: none from earlier tests
    drift = ["drift", "--events", str(root / "predictions.jsonl"), "--labels", str(root / "consensus.csv")]
    result = runner.invoke(app, [*drift, "--config", config])
    assert result.exit_code == 0, result.output
    assert f"{len(lines)} of {len(lines)} predictions have a label" in result.output
    assert "1 flagged" in result.output and "stain" in result.output
    (root / "rotated.jsonl").write_text("")  # a log just rotated: nothing to judge, and the flag stays
    empty = runner.invoke(app, ["drift", "--events", str(root / "rotated.jsonl"), "--config", config])
    assert empty.exit_code == 0 and "no predictions in it; drift flags unchanged" in empty.output, empty.output

    experiment = registry.client.get_experiment_by_name(settings.registry.experiment)
    (run,) = registry.client.search_runs([experiment.experiment_id], "tags.`cytoloop.kind` = 'drift'")
    assert run.data.tags["cytoloop.model_version"] == gated["champion"] and run.data.tags["cytoloop.site"] == "north"
    psi = [value for _, value in registry.metric_history(run.info.run_id, "psi_significant_max")]
    confidence = [value for _, value in registry.metric_history(run.info.run_id, "mean_confidence")]
    flagged = [value for _, value in registry.metric_history(run.info.run_id, "flagged")]
    assert len(psi) == 2 and psi[1] > settings.drift.psi_threshold > psi[0]
    assert confidence == pytest.approx([0.97, 0.55]) and flagged == [0.0, 1.0]
    reviewed = [value for _, value in registry.metric_history(run.info.run_id, "n_reviewed")]
    assert reviewed == [len(gated["eval"])] * 2  # every cell's class came from the export

    write_manifest(gated["eval"], root / "labels.csv")  # 60 labels, 25 of them trained on a moment ago
    save_state(settings.home / "retrain" / "state.json", load_records(root / "labels.csv")[:25])
    status = runner.invoke(app, ["status", "--labels", str(root / "labels.csv"), "--config", config])
    assert status.exit_code == 0, status.output
    assert "drift: FLAGGED" in status.output
    # neither N new labels nor T hours: only the drift flag (with M new labels) makes the retrain due
    assert "retrain: DUE (drift flagged and 35 new labels" in status.output
    machine = runner.invoke(app, ["status", "--labels", str(root / "labels.csv"), "--json", "--config", config])
    report = json.loads(machine.stdout)  # the same status, for a scheduler: one JSON document on stdout
    assert report["retrain"]["due"] is True and report["drift_flags"] and "champion" in report["aliases"]
    assert "site east reports lymphocyte" in status.output and report["site_classes"] == {"east": ["lymphocyte"]}
    # a log from a model directory served outside the registry (`local-<hash>`) failed the whole command
    local = {**json.loads(lines[0]), "model_version": "local-0123456789ab"}
    (root / "local.jsonl").write_text(json.dumps(local) + "\n")
    served = runner.invoke(app, ["drift", "--events", str(root / "local.jsonl"), "--config", config])
    assert served.exit_code == 0 and "vlocal-0123456789ab: no stain figures" in served.output, served.output


def test_site_alias_serves_that_site_only(gated, ray_cluster):
    from cytoloop.models.finetune import write_manifest
    from ops.cli import app

    registry, name, root = gated["registry"], gated["name"], gated["root"]
    write_manifest(gated["eval"][:40], root / "north.csv")
    runner = CliRunner()
    temp = Path(tempfile.gettempdir())
    copies = lambda: set(temp.glob("cytoloop-finetune*"))  # noqa: E731 - the workers' checkpoint copies
    before = copies()
    # a 4-step fine-tune on a few cells passes or fails the gate by chance: a gate that passes any version makes
    # the site's own champion certain (the promotion itself is what this test checks)
    lenient = {f"CYTOLOOP_PROMOTION__{m}_TOLERANCE": "1.0" for m in ("BALANCED_ACCURACY", "ECE", "ANOMALY_AUROC")}
    result = runner.invoke(
        app,
        ["adapt", "--site", "north", "--labels", str(root / "north.csv"), "--config", str(root / "config.json")],
        env=lenient,
    )
    assert copies() <= before  # the workers removed their copies of the checkpoint (the final one was left)
    adapted = registry.versions(name)[-1]
    assert result.exit_code == 0 and "promoted" in result.output, result.output
    assert adapted.tags["gate.verdict"] == "pass"
    assert adapted.tags["site"] == "north" and adapted.tags["job"] == "adapt"
    assert registry.for_site(name, "north").version == adapted.version
    assert registry.for_site(name, "south").version == registry.by_alias(name, "champion").version
    assert registry.by_alias(name, "champion").version != adapted.version

    status = runner.invoke(app, ["status", "--config", str(root / "config.json")])
    assert status.exit_code == 0 and "@champion-north: v" + adapted.version in status.output

    # a version made for north is one flag away from serving everyone (its stain target, its classes' temperature,
    # the parent of every later fine-tune): promoting it elsewhere needs --cross-site
    promote = ["promote", adapted.version, "--reason", "for north", "--yes", "--config", str(root / "config.json")]
    for scope in ([], ["--site", "south"]):
        refused = runner.invoke(app, [*promote, *scope])
        assert refused.exit_code == 2 and "made for site 'north'" in refused.output, refused.output
    assert registry.by_alias(name, "champion").version != adapted.version
    assert registry.for_site(name, "south").version == registry.by_alias(name, "champion").version
    assert runner.invoke(app, [*promote, "--site", "south", "--cross-site"]).exit_code == 0
    assert registry.for_site(name, "south").version == adapted.version

    # another move of champion-north came first while the job judged: its version was passed over as stale, and
    # every rerun returned that stale outcome (the parent, the global champion, unchanged: the same job). Now a
    # rerun judges it against what serves north then (a lenient gate here, so that it passes)
    lenient = json.loads((root / "config.json").read_text())
    lenient["promotion"] = {
        **lenient.get("promotion", {}),
        **{"balanced_accuracy_tolerance": 1.0, "ece_tolerance": 1.0, "anomaly_auroc_tolerance": 1.0},
    }
    (root / "lenient.json").write_text(json.dumps(lenient))
    champion = registry.by_alias(name, "champion").version
    registry.move_alias(name, "champion-north", champion, why="test: another move came first")
    registry.set_tags(name, adapted.version, {"gate.verdict": "stale", "gate.reasons": '["not promoted: test"]'})
    count = len(registry.versions(name))
    adapt = ["adapt", "--site", "north", "--labels", str(root / "north.csv"), "--config", str(root / "lenient.json")]
    rejudged = runner.invoke(app, adapt)
    assert rejudged.exit_code == 0 and "promoted to @champion-north" in rejudged.output, rejudged.output
    assert len(registry.versions(name)) == count and registry.for_site(name, "north").version == adapted.version
    # rolled back since: the same job again says so and moves nothing (it said "promoted" of a version not serving)
    back = ["rollback", "--site", "north", "--reason", "worse", "--yes", "--config", str(root / "config.json")]
    assert runner.invoke(app, back).exit_code == 0
    again = runner.invoke(app, adapt)
    assert again.exit_code == 0 and "moved off @champion-north since" in again.output, again.output
    assert registry.for_site(name, "north").version == champion and len(registry.versions(name)) == count

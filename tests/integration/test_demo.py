"""The main job, `cytoloop demo`, in a short configuration against the real services it starts itself.

Real Label Studio, label receiver and Ray head (via `cytoloop stack`), real Ray Serve, Ray Data and Ray Train, MLflow on
SQLite. A tiny base model is trained here on one lab (cellavision; three classes, of which the sites report two), then
meets two sites (jtsc, bccd) with ALL-IDB2 blasts mixed into their pools, for one round. It asserts what a user would
check: each site's tasks in its own Label Studio project, labels back once, the blasts in the anomaly queue and named a
new class (never a fine-tuning label), a version per site gated on that site's frozen cells, the site's alias moved or
the refusal recorded, Serve answering each site with its own champion (the other site keeps its model), and the report
with its plots, in Markdown and as one self-contained HTML page.

The routing here is permissive on purpose (an anomaly threshold at the 5 % quantile of the normal cells, every cell
under 0.999 confidence reviewed, a budget as large as the scored pool): a tiny model's anomaly scores are noise, and
this test is about the plumbing; what the shipped base model finds is measured by `make demo`.
"""

from __future__ import annotations

import base64
import copy
import json
import os
import shutil
import socket
import tempfile
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

pytestmark = pytest.mark.integration

SITES = {"site-a": ["jtsc"], "site-b": ["bccd"]}
ARTEFACTS = Path(__file__).resolve().parents[2] / "runs" / "test-artefacts"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def demo_run(cells_dir, tiny_overrides):
    from cytoloop.config import load_settings
    from ops.cli import app
    from ops.stack import Stack

    root = Path(tempfile.mkdtemp(prefix="cyd-"))  # short: Ray's socket paths live under home/ray
    overrides = copy.deepcopy(tiny_overrides)
    overrides.update(
        {
            "home": str(root / "h"),
            "stack": {
                "label_studio_port": free_port(),
                "images_root": str(cells_dir),
                "ray": True,
                "ray_port": free_port(),
                "ray_dashboard": False,
                "ray_num_cpus": 2,
                "mlflow_server": False,
                "start_timeout_s": 300,
            },
            "review": {"webhook_port": free_port(), "labels_required": 2, "poll_every_s": 3600},
            "registry": {
                "tracking_uri": f"sqlite:///{root}/mlflow.db",
                "cache_dir": str(root / "cache"),
                "model_name": "demo-cells",
            },
            "serve": {"port": free_port(), "api_key": "demo-key"},  # the demo must send it
            "finetune": {"warmup_steps": 1, "num_workers": 1, "storage_path": str(root / "ray-runs")},
            "adapt": {"steps": 4},  # each site's fine-tune is its adaptation
            # 4-step fine-tunes on a few cells pass or fail the gate by chance; a gate that passes any version
            # makes each site's own champion certain, so that Serve's answers per site are really checked
            "promotion": {"balanced_accuracy_tolerance": 1.0, "ece_tolerance": 1.0, "anomaly_auroc_tolerance": 1.0},
            "routing": {"review_below": 0.999, "audit_fraction": 0.0},
            "demo": {
                "rounds": 1,
                "base_model": str(root / "base"),
                "sites": SITES,
                "classes": ["neutrophil", "lymphocyte"],
                "test_fraction": 0.1,
                "blast_share": 0.2,
                "anomaly_quantile": 0.05,
                "pool_limit": 12,
                "budget": 12,
                "error_rates": [0.0, 0.2],
                "serve_switch_timeout_s": 240,
            },
        }
    )
    config = root / "config.json"
    config.write_text(load_settings(overrides=overrides).model_dump_json())
    os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
    # the stack's Ray (started by the demo, inheriting this) stops at once on `down`: without a dashboard `down`
    # cannot stop Serve first, and Ray drained Serve's actors for 30 s before it was killed (the suite's time)
    drain = os.environ.get("RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S")
    os.environ["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"
    runner = CliRunner()
    base = runner.invoke(
        app,
        # the base model knows a class the sites do not report (eosinophil): each site's cells are decided
        # among its own two, in Serve and in the gate
        ["train", "--data", str(cells_dir), "--domains", "cellavision", "--classes", "neutrophil,lymphocyte,eosinophil"]
        + ["--out", str(root / "base"), "--config", str(config)],
    )
    assert base.exit_code == 0, base.output + repr(base.exception)
    result = runner.invoke(app, ["demo", "--data", str(cells_dir), "--config", str(config)])
    ARTEFACTS.mkdir(parents=True, exist_ok=True)  # what the demo printed, for a person reading a failure
    (ARTEFACTS / "demo-output.txt").write_text(
        result.output + ("" if result.exception is None else repr(result.exception))
    )
    settings = load_settings(config)
    try:
        yield result, settings
    finally:
        import ray

        ray.shutdown()
        Stack(settings).down()
        shutil.rmtree(root, ignore_errors=True)
        if drain is None:
            os.environ.pop("RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S", None)
        else:
            os.environ["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = drain


def rounds_of(settings) -> list[dict]:
    return json.loads((Path(settings.home) / "demo" / "rounds.json").read_text())


def test_demo_runs_a_round_over_both_sites(demo_run):
    result, _ = demo_run
    assert result.exit_code == 0, result.output + repr(result.exception)
    stages = ["stack up", "base model", "serve", "annotator accounts"]
    for site in SITES:
        stages += [f"{site}: evaluate the base model"]
        stages += [
            f"round 1, {site}: {stage}"
            for stage in (
                "score pool",
                "anomaly threshold",
                "route to Label Studio",
                "annotate",
                "sync labels",
                "fine-tune on Ray Train, gate",
                "Serve switches",
                "evaluate",
            )
        ]
    for stage in stages:
        assert f"{stage}: done" in result.output
    assert "Label Studio project (site-a)" in result.output and "MLflow experiment" in result.output
    rows = rounds_of(demo_run[1])
    assert len(rows) == 2 * len(SITES), rows  # round 0 and round 1 of every site: the loop below checks them all
    for row in rows:  # each held-out ECE comes with the floor sampling alone puts under it
        floor = row["ece_calibrated"]
        assert floor["cells"] > 0 and 0 <= floor["low"] <= floor["mean"] <= floor["high"] <= 1, row


def test_each_site_labelled_in_its_own_project_once(demo_run):
    from labelstudio.loop import ReviewLoop

    _, settings = demo_run
    loop = ReviewLoop(settings)
    projects = loop.projects()
    assert set(projects) == set(SITES)
    rounds = {r["site"]: r for r in rounds_of(settings) if r["round"] == 1}
    total = 0
    for site, pid in projects.items():
        tasks = list(loop.client.tasks.list(project=pid, fields="all"))
        assert 0 < len(tasks) <= settings.demo.budget and rounds[site]["sent"] == len(tasks)
        assert {t.data["site"] for t in tasks} == {site}
        annotations = [a for t in tasks for a in (t.annotations or [])]
        assert len(annotations) == 2 * len(tasks) == rounds[site]["annotations"]  # two distinct annotators
        total += len(annotations)
    assert len(loop.store.labels()) == total  # every label came back, once


def test_mixed_in_blasts_reach_the_anomaly_queue_and_stay_out_of_training(demo_run):
    from cytoloop.data.records import read_manifest
    from labelstudio.loop import ReviewLoop

    _, settings = demo_run
    loop = ReviewLoop(settings)
    rounds = [r for r in rounds_of(settings) if r["round"] == 1]
    assert sum(r["blasts"]["scored"] for r in rounds) > 0
    assert sum(r["blasts"]["anomaly"] for r in rounds) > 0
    blast_tasks = [
        t
        for pid in loop.projects().values()
        for t in loop.client.tasks.list(project=pid, fields="all")
        if "/allidb2/" in t.data["image_path"]
    ]
    assert "anomaly" in {t.data["reason"] for t in blast_tasks}
    assert sum(r["blasts"]["sent"] for r in rounds) == len(blast_tasks)
    demo = Path(settings.home) / "demo"
    new_classes = read_manifest(demo / "labels.new-classes.csv")
    assert {r.label for r in new_classes} == {"blast"}  # the annotators named them; consensus kept them apart
    assert sum(r["new_class_cells"] for r in rounds) == len(new_classes)
    assert all("/allidb2/" not in str(r.path) for r in read_manifest(demo / "labels.csv"))


def test_each_site_got_its_own_version_gated_on_its_own_cells(demo_run):
    from cytoloop.registry import CHAMPION, open_registry, site_alias

    _, settings = demo_run
    registry, name = open_registry(settings), settings.registry.model_name
    assert sorted(int(v.version) for v in registry.versions(name)) == [1, 2, 3]  # base, one fine-tune per site
    assert registry.by_alias(name, CHAMPION).version == "1"  # the base model stays the global champion
    home = Path(settings.home)
    first = [r for r in rounds_of(settings) if r["round"] == 1]
    assert len(first) == len(SITES), first
    for row in first:
        site, version = row["site"], row["version"]
        tags = registry.version(name, version).tags
        assert tags["site"] == site and tags["parent_version"] == "1"
        frozen = (home / "frozen" / site / "eval.csv").read_text().strip().splitlines()[1:]
        judged = json.loads((home / "finetune" / tags["ray_run"] / "evaluation" / "challenger.json").read_text())
        assert judged["n_cells"] == len(frozen) >= 3
        assert set(judged["allowed_classes"]) == {"neutrophil", "lymphocyte"}  # judged as the site is served
        assert row["gate"] == "promoted" and tags["gate.verdict"] == "pass"  # (refusals: test_retraining.py)
        assert registry.alias_version(name, site_alias(site)) == version == row["served"]
        assert row["pool_version"] == "1"  # the round's pool was scored by what served the site: the base model


def test_serve_answers_each_site_with_its_own_champion(demo_run, cells_dir):
    from cytoloop.registry import open_registry

    _, settings = demo_run
    registry, name = open_registry(settings), settings.registry.model_name
    cell = next((cells_dir / "jtsc").glob("*.bmp"))
    body = {"cells": [{"name": cell.name, "image_b64": base64.b64encode(cell.read_bytes()).decode()}]}
    url = f"http://{settings.serve.host}:{settings.serve.port}/v1/classify"
    key = {"X-API-Key": settings.serve.api_key.get_secret_value()}
    for site in SITES:
        answer = httpx.post(url, json={**body, "site": site}, headers=key, timeout=120)
        assert answer.status_code == 200, answer.text
        cell_answer = answer.json()["cells"][0]
        assert cell_answer["probabilities"]["eosinophil"] == 0 and cell_answer["label"] != "eosinophil"
        served = cell_answer["model"]["version"]
        assert served == registry.for_site(name, site).version != "1"  # the site's own version, not the base
        assert registry.version(name, served).tags["site"] == site  # never the other site's model


def test_the_report_has_its_plots_in_markdown_and_html(demo_run):
    _, settings = demo_run
    report = Path(settings.home) / "demo" / "report"
    text = (report / "report.md").read_text()
    plots = ["learning_curve.png", "blasts.png"]
    plots += [f"reliability_{site}_round{n}.png" for site in SITES for n in (0, 1)]
    for plot in plots:
        assert (report / plot).stat().st_size > 1000 and f"({plot})" in text
    assert "Blasts found" in text and "Annotators" in text and "Where to look" in text
    sites_line = next(line for line in text.splitlines() if line.startswith("Sites: "))
    assert sites_line.count("reports ") == len(SITES) and "eosinophil" not in sites_line  # what each site reports
    page = (report / "report.html").read_text()
    assert page.count('src="data:image/png;base64,') >= len(plots)

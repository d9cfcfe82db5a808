"""The main job, `cytoloop demo`, in a short configuration against the real services it starts itself.

Real Label Studio, label receiver and Ray head (via `cytoloop stack`), real Ray Serve, Ray Data and Ray Train,
MLflow on SQLite; a tiny model, two classes, a handful of cells, one round. It asserts what a user would check:
tasks appeared in Label Studio, labels came back, a new version was registered, and Serve switched to it or the
gate's refusal was recorded; and that the report and URLs were written.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import socket
import tempfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

pytestmark = pytest.mark.integration


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
            "finetune": {"steps": 4, "warmup_steps": 1, "num_workers": 1, "storage_path": str(root / "ray-runs")},
            "routing": {"review_below": 0.999, "audit_fraction": 0.0},
            "demo": {
                "rounds": 1,
                "domains": ["jtsc", "bccd"],
                "classes": ["neutrophil", "lymphocyte"],
                "seed_per_class": 5,
                "test_fraction": 0.06,
                "pool_limit": 16,
                "budget": 8,
                "annotators": 2,
                "error_rate": 0.1,
                "serve_switch_timeout_s": 240,
            },
        }
    )
    config = root / "config.json"
    config.write_text(load_settings(overrides=overrides).model_dump_json())
    os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
    result = CliRunner().invoke(app, ["demo", "--data", str(cells_dir), "--config", str(config)])
    settings = load_settings(config)
    try:
        yield result, settings
    finally:
        import ray

        ray.shutdown()
        Stack(settings).down()
        shutil.rmtree(root, ignore_errors=True)


def test_demo_runs_a_round_end_to_end(demo_run):
    result, _ = demo_run
    assert result.exit_code == 0, result.output + repr(result.exception)
    for stage in (
        "stack up",
        "seed model",
        "serve",
        "round 1: score pool",
        "round 1: route to Label Studio",
        "round 1: annotate",
        "round 1: sync labels",
        "round 1: fine-tune on Ray Train, gate",
        "round 1: Serve switches",
        "round 1: evaluate",
    ):
        assert f"{stage}: done" in result.output
    assert "Label Studio project" in result.output and "MLflow experiment" in result.output


def test_tasks_appeared_and_labels_came_back(demo_run):
    from labelstudio.loop import ReviewLoop

    _, settings = demo_run
    loop = ReviewLoop(settings)
    tasks = [t for pid in loop.projects().values() for t in loop.client.tasks.list(project=pid, fields="all")]
    assert 0 < len(tasks) <= settings.demo.budget
    annotations = [a for t in tasks for a in (t.annotations or [])]
    assert len(annotations) == 2 * len(tasks)  # two distinct simulated annotators answered every task
    annotators = {a["completed_by"] if isinstance(a, dict) else a.completed_by for a in annotations}
    assert len(annotators) == 2
    assert len(loop.store.labels()) == len(annotations)  # every label came back, once
    rounds = json.loads((Path(settings.home) / "demo" / "rounds.json").read_text())
    assert rounds[1]["sent"] == len(tasks) and rounds[1]["annotations"] == len(annotations)
    assert rounds[1]["consensus"] > 0


def test_a_new_version_was_registered_and_served_or_refused(demo_run):
    from cytoloop.registry import CHAMPION, open_registry

    _, settings = demo_run
    registry, name = open_registry(settings), settings.registry.model_name
    versions = sorted(int(v.version) for v in registry.versions(name))
    assert versions == [1, 2]  # the seed model, and round 1's fine-tune
    rounds = json.loads((Path(settings.home) / "demo" / "rounds.json").read_text())
    champion = registry.by_alias(name, CHAMPION).version
    # the gate judged both versions on the held-out cells the demo froze, not on a few cut from round 1's labels
    frozen = (Path(settings.home) / "frozen" / "global" / "eval.csv").read_text().strip().splitlines()[1:]
    judged = [
        json.loads(path.read_text())["n_cells"]
        for path in (Path(settings.home) / "finetune").glob("*/evaluation/challenger.json")
    ]
    assert judged == [len(frozen)] and len(frozen) >= 6
    if rounds[1]["gate"] == "promoted":
        assert registry.version(name, "2").tags["gate.verdict"] == "pass"
        assert champion == "2" and rounds[1]["served"] == "2"
    else:
        assert rounds[1]["gate"].startswith("refused (") and any("WORSE" in r for r in rounds[1]["gate_reasons"])
        assert champion == "1" and rounds[1]["served"] == "1"
        assert registry.version(name, "2").tags["gate.verdict"] == "refused"


def test_the_report_has_its_plots(demo_run):
    _, settings = demo_run
    report = Path(settings.home) / "demo" / "report"
    text = (report / "report.md").read_text()
    for plot in ("learning_curve.png", "routed.png", "reliability_round0.png", "reliability_round1.png"):
        assert (report / plot).stat().st_size > 1000 and plot in text

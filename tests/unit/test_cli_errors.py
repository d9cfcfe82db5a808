"""The CLI tells a user's mistake from a bug: the project's errors become a message and exit code 2, anything
else keeps its traceback."""

from __future__ import annotations

import pytest
import typer

from cytoloop.data.records import DatasetError
from cytoloop.errors import CytoLoopError, UsageError
from ops.cli.common import run


def _raise(error: Exception):
    def action():
        raise error

    return action


@pytest.mark.parametrize(
    "error",
    [
        UsageError("unknown class 'x'"),
        DatasetError("no cells"),
        FileNotFoundError("settings.json"),
        PermissionError("port 8080 is taken"),
        UnicodeDecodeError("utf-8", b"\xe9", 0, 1, "invalid continuation byte"),  # a Latin-1 file no reader named
    ],
)
def test_a_users_mistake_is_a_message_and_exit_code_2(error, capsys):
    with pytest.raises(typer.Exit) as exit_info:
        run(_raise(error))
    assert exit_info.value.exit_code == 2
    assert str(error) in capsys.readouterr().err


@pytest.mark.parametrize("error", [ValueError("shapes differ"), KeyError("probs"), TypeError("None")])
def test_a_bug_keeps_its_traceback(error):
    with pytest.raises(type(error)):
        run(_raise(error))


def test_every_project_error_is_a_cytoloop_error():
    from cytoloop.data.preprocess import ImageError
    from cytoloop.models.base import ModelLoadError
    from cytoloop.registry import RegistryError
    from labelstudio.client import LabelStudioUnavailable
    from labelstudio.tasks import TaskError
    from ops.stack import StackError

    for kind in (
        DatasetError,
        ImageError,
        ModelLoadError,
        RegistryError,
        StackError,
        LabelStudioUnavailable,
        TaskError,
        UsageError,
    ):
        assert issubclass(kind, CytoLoopError), kind


def test_a_missing_optional_part_names_the_extra_that_installs_it(capsys):
    with pytest.raises(typer.Exit) as exit_info:
        run(_raise(ModuleNotFoundError("No module named 'ray'", name="ray")))
    assert exit_info.value.exit_code == 2 and "pip install 'cytoloop[serve]'" in capsys.readouterr().err
    with pytest.raises(ModuleNotFoundError):  # not one of ours: a bug (or a broken install), with its traceback
        run(_raise(ModuleNotFoundError("No module named 'nonesuch'", name="nonesuch")))


def test_one_global_config_version_and_completion(tmp_path, clean_env):
    """`cytoloop --config FILE <command>` (or CYTOLOOP_CONFIG) gives every command its settings file; `--version`
    prints the installed version; shell completion can be installed."""
    import json
    import os

    from typer.testing import CliRunner

    from ops.cli import app

    runner = CliRunner()
    assert runner.invoke(app, ["--version"]).stdout.startswith("cytoloop ")
    assert "--install-completion" in runner.invoke(app, ["--help"]).stdout
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps({"home": str(tmp_path / "labhome"), "stack": {"ray": False}}))
    clean_env.setenv("CYTOLOOP_CONFIG", str(settings))  # so that teardown removes what the command sets
    result = runner.invoke(app, ["--config", str(settings), "stack", "status"])
    assert result.exit_code == 8, result.output  # nothing runs in that home: `stack status` says so to a monitor
    assert os.environ["CYTOLOOP_CONFIG"] == str(settings.resolve())
    assert "labhome" in result.output  # the file's home, though `stack status` was given no --config
    missing = runner.invoke(app, ["--config", str(tmp_path / "nope.json"), "stack", "status"])
    assert missing.exit_code == 2 and "nope.json" in missing.output


def test_flags_mean_the_same_in_every_command():
    """--model is always a model directory (the model kind is --kind), labelled cells for training are always
    --labels, --json is the machine-readable output: a scheduler's script reads the same way across commands."""
    import typing
    from pathlib import Path

    import typer.main

    from ops.cli import app

    def commands(group, prefix: str = ""):
        for name, command in group.commands.items():
            if hasattr(command, "commands"):
                yield from commands(command, f"{prefix}{name} ")
            else:
                yield f"{prefix}{name}", command

    seen = {}
    for name, command in commands(typer.main.get_command(app)):
        hints = typing.get_type_hints(command.callback)
        for param in command.params:
            opts = set(getattr(param, "opts", [])) | set(getattr(param, "secondary_opts", []))
            seen.setdefault(name, set()).update(opts)
            if "--model" in opts and "--kind" not in opts:
                assert Path in typing.get_args(hints[param.name]) + (hints[param.name],), f"{name}: --model is a dir"
            if "--kind" in opts:
                assert str in typing.get_args(hints[param.name]) + (hints[param.name],), f"{name}: --kind is a name"
    assert {"train", "evaluate", "serve", "tune", "generate"} <= {n for n, o in seen.items() if "--model" in o}
    assert {"retrain", "adapt"} <= {n for n, o in seen.items() if "--labels" in o}
    assert "--kind" in seen["train"] and not any("--model-dir" in o and "--model" not in o for o in seen.values())


def test_demo_sites_from_flags(capsys):
    from ops.cli.demo import parse_sites

    assert parse_sites(["site-a=jtsc,bccd", " site-b = cellavision "]) == {
        "site-a": ["jtsc", "bccd"],
        "site-b": ["cellavision"],
    }
    assert parse_sites(None) is None
    for bad, message in (("site-a", "expected NAME=LAB"), ("=jtsc", "expected NAME=LAB"), ("a=", "expected NAME=LAB")):
        with pytest.raises(typer.Exit) as exit_info:
            parse_sites([bad])
        assert exit_info.value.exit_code == 2 and message in capsys.readouterr().err
    with pytest.raises(typer.Exit):
        parse_sites(["a=jtsc", "a=bccd"])
    assert "'a' is given twice" in capsys.readouterr().err


def test_demo_flags_replace_the_files_sites(tmp_path, monkeypatch):
    """A settings file's sites and --site never merge: the flags name every site."""
    from typer.testing import CliRunner

    import jobs.cycle
    from ops.cli import app

    seen = {}

    class Stop(Exception):
        pass

    def capture(self, settings, data):
        seen["sites"] = settings.demo.sites
        raise Stop

    monkeypatch.setattr(jobs.cycle.Demo, "__init__", capture)
    config = tmp_path / "settings.json"
    config.write_text('{"demo": {"sites": {"x": ["jtsc"], "y": ["bccd"]}}}')
    result = CliRunner().invoke(
        app, ["demo", "--data", str(tmp_path), "--site", "z=cellavision", "--config", str(config)]
    )
    assert isinstance(result.exception, Stop) and seen["sites"] == {"z": ["cellavision"]}


def test_cells_headed_to_sites_are_decided_among_each_site_s_classes(clean_env):
    import numpy as np

    from cytoloop.config import load_settings
    from cytoloop.errors import UsageError
    from ops.cli.common import site_candidates, site_classes

    classes = ["lymphocyte", "neutrophil", "platelet"]
    settings = load_settings(overrides={"sites": {"a": {"classes": ["neutrophil", "lymphocyte"]}}})
    rows = site_candidates(settings, classes, ["a", "b", "a"])
    assert rows.tolist() == [[True, True, False], [True, True, True], [True, True, False]]
    assert site_candidates(settings, classes, ["b", "c"]) is None  # no site of these has classes of its own
    assert site_classes(settings, None) is None and site_classes(settings, "a") == ["neutrophil", "lymphocyte"]
    with pytest.raises(UsageError, match="site 'b' has no classes of its own.*sites that have: a"):
        site_classes(settings, "b")
    odd = load_settings(overrides={"sites": {"a": {"classes": ["blast"]}}})
    with pytest.raises(UsageError, match="blast"):
        site_candidates(odd, classes, ["a"])
    assert isinstance(rows, np.ndarray)


def test_invalid_settings_name_the_field_or_the_whole_section(capsys):
    """A field's error names its path; a check across fields (no path) names the section, not an empty field:
    CI once printed 'invalid configuration: : Value error, max_trials (8) ...'."""
    from cytoloop.config import ScoringConfig

    with pytest.raises(typer.Exit) as exit_info:
        run(lambda: ScoringConfig(min_trials=0))
    assert exit_info.value.exit_code == 2
    assert "invalid configuration: min_trials: Input should be greater than or equal to 1" in capsys.readouterr().err
    with pytest.raises(typer.Exit):
        run(lambda: ScoringConfig(min_trials=12, max_trials=8))
    assert "invalid configuration: ScoringConfig: max_trials (8) must be" in capsys.readouterr().err


def test_review_invite_with_label_studio_down_is_a_message_and_exit_code_2(tmp_path, monkeypatch):
    """It used to end in an httpx.ConnectError traceback with exit code 1, the code of a bug."""
    import json
    import socket

    from typer.testing import CliRunner

    from ops.cli import app

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = tmp_path / "settings.json"
    config.write_text(
        json.dumps({"home": str(tmp_path / "home"), "review": {"label_studio_url": f"http://127.0.0.1:{port}"}})
    )
    monkeypatch.setenv("CYTOLOOP_CONFIG", str(config))
    for extra in ([], ["--reset"]):
        result = CliRunner().invoke(app, ["review", "invite", *extra])
        assert result.exit_code == 2, result.output
        assert f"Label Studio at http://127.0.0.1:{port} is not reachable" in result.output


@pytest.mark.parametrize(
    "error",
    [
        IsADirectoryError(21, "Is a directory", "/tmp/reports"),
        NotADirectoryError(20, "Not a directory", "/tmp/notes.csv/mlflow"),
        FileExistsError(17, "File exists", "/tmp/notes.csv"),
    ],
)
def test_a_folder_where_a_file_belongs_and_the_reverse_are_messages_too(error, capsys):
    """A user's path mistake the file system refuses was a traceback (exit 1) for all but two kinds of OSError."""
    with pytest.raises(typer.Exit) as exit_info:
        run(_raise(error))
    assert exit_info.value.exit_code == 2 and f"{error.filename}: {error.strerror}" in capsys.readouterr().err


def test_bad_paths_sites_and_ports_are_refused_before_any_work(tmp_path, clean_env):
    """Checked as the command line is read: nothing is scored, trained or started first (a score's output path
    that is a folder used to fail after the scoring)."""
    from typer.testing import CliRunner

    from ops.cli import app

    runner = CliRunner()
    (tmp_path / "notes.csv").write_text("x")
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.json").write_text("{}")  # a finished model: never trained over silently
    report = tmp_path / "eval.json"
    report.write_text('{"balanced_accuracy": 0.9, "n_cells": 10}')
    edited = tmp_path / "edited.json"  # a format error's traceback (exit 1) while the card was written
    edited.write_text('{"balanced_accuracy": "x", "n_cells": 10, "intervals": {"ece": [0.1]}, "nll": null}')
    nulled = tmp_path / "nulled.json"  # None where the card formats the figure: a TypeError
    nulled.write_text('{"balanced_accuracy": 0.9, "n_cells": 10, "denoiser_evals_per_cell": null}')
    cases = {
        ("score", "--model", str(model), "--data", str(tmp_path), "--out", str(tmp_path)): "is a folder",
        ("score", "--model", str(model), "--data", str(tmp_path / "notes.csv"), "--out", str(tmp_path / "notes.csv")): (
            "is the manifest being scored"
        ),
        ("review", "export", "--out", str(tmp_path / "notes.csv" / "x.csv")): "is a file",
        ("review", "export", "--out", "-"): "not offered here",
        ("register", str(model), "--champion", "--reason", "r", "--site", "st marys"): "invalid site name",
        ("promote", "3", "--site", "a/b", "--reason", "r"): "invalid site name",
        ("review", "ml-backend", "--port", "70000"): "less than or equal to 65535",
        ("stack", "up", "--only", ""): "--only names no service",
        ("train", "--data", str(tmp_path), "--out", str(model)): "already holds a trained model",
        ("distill", "--teacher", str(model), "--data", str(tmp_path), "--out", str(model)): "teacher's own folder",
        ("card", str(model), "--eval", f"held-out={report}", "--eval", f"held-out={report}"): "given twice",
        ("card", str(model), "--eval", f"held-out={edited}"): (
            "balanced_accuracy is not a number; intervals.ece is not a pair of numbers (a report"
        ),
        ("card", str(model), "--eval", f"held-out={nulled}"): "denoiser_evals_per_cell is not a number",
        ("distill", "--teacher", str(model), "--data", str(tmp_path), "--out", str(tmp_path / "c"))
        + (
            "--threshold",
            "0.5",
            "--defer-fraction",
            "0.2",
        ): "not both",
        ("register", str(model), "--site", "north"): "goes with --champion",
        ("register", str(model), "--champion", "--reason", "  "): "give --reason",  # before a version is made
        ("--config", str(tmp_path), "info", str(model)): "not a file",
        ("info", str(model)): "unknown model kind None",
        ("review", "bootstrap", "--site", "north", "--classes", "a,b,a"): "names a class twice",
        ("review", "bootstrap", "--site", "north", "--classes", "a,b", "--model", str(model)): "not both",
        ("generate", "--model", str(model), "--class", "a", "--out", str(tmp_path / "g.jpg")): "ending in .png",
        ("tune", "--model", str(model), "--data", str(tmp_path), "--trials", "0"): "--trials",
        ("data", "list", "--dest", str(tmp_path / "notes.csv")): "is a file, not the folder",
        ("tune", "--model", str(model), "--data", str(tmp_path), "--agreement", "1.5"): "--agreement",
        ("tune", "--model", str(model), "--data", str(tmp_path), "--null-trials", "0"): "--null-trials",
    }
    for args, message in cases.items():
        result = runner.invoke(app, list(args))
        unboxed = "".join(c for c in result.output if not c.isspace() and c not in "│╭╮╰╯─")  # typer's wrapped box
        assert result.exit_code == 2 and "".join(message.split()) in unboxed, (args, result.output)


def test_a_misspelt_or_unreadable_setting_in_the_environment_is_refused_naming_it(clean_env):
    """CYTOLOOP_SCORNG__PRECISION=fp8 was silently ignored (the default precision stayed in force), and a
    CYTOLOOP_SITES that is not JSON was a traceback."""
    from cytoloop.config import load_settings

    clean_env.setenv("CYTOLOOP_SERVE_SVC_PORT", "tcp://10.0.0.1:8000")  # Kubernetes' service links: no settings
    clean_env.setenv("CYTOLOOP_SERVE_SVC_PORT_8000_TCP_ADDR", "10.0.0.1")
    clean_env.setenv("CYTOLOOP_HEAD_SVC_SERVICE_HOST", "10.0.0.2")
    load_settings()
    clean_env.setenv("CYTOLOOP_HOEM", "/data")
    with pytest.raises(UsageError, match="CYTOLOOP_HOEM: no setting 'hoem'"):
        load_settings()
    clean_env.delenv("CYTOLOOP_HOEM")
    clean_env.setenv("CYTOLOOP_SCORNG__PRECISION", "fp8")
    with pytest.raises(UsageError, match="CYTOLOOP_SCORNG__PRECISION: no setting 'scorng'"):
        load_settings()
    clean_env.delenv("CYTOLOOP_SCORNG__PRECISION")
    clean_env.setenv("CYTOLOOP_SITES", "{bad")
    with pytest.raises(UsageError, match="variable cannot be read: .* \\(set: CYTOLOOP_SITES; a list or mapping"):
        load_settings()
    clean_env.delenv("CYTOLOOP_SITES")
    clean_env.setenv("CYTOLOOP_ROUTING__ALWAYS_REVIEW", "blast")  # a list, written as a word: which variable?
    clean_env.setenv("CYTOLOOP_ROUTING__REVIEW_BELOW", "0.5")  # of the same section, and readable: not named
    with pytest.raises(UsageError, match="set: CYTOLOOP_ROUTING__ALWAYS_REVIEW; a list or mapping is written as JSON"):
        load_settings()
    clean_env.delenv("CYTOLOOP_ROUTING__ALWAYS_REVIEW")
    clean_env.delenv("CYTOLOOP_ROUTING__REVIEW_BELOW")
    clean_env.setenv("CYTOLOOP_SITES", '{"north": {"classes": ["a", "b"]}}')
    clean_env.setenv("CYTOLOOP_SCORING__PRECISION", "bf16")
    settings = load_settings()
    assert settings.scoring.precision == "bf16" and settings.site_classes("north") == ["a", "b"]


def test_registering_a_damaged_model_names_the_user_s_folder(tmp_path, clean_env):
    """The error named the temporary copy the registry stages (/tmp/tmp8nka3ve7/cytoloop), not the folder given."""
    import json

    from typer.testing import CliRunner

    from ops.cli import app

    clean_env.setenv("CYTOLOOP_HOME", str(tmp_path / "home"))
    model = tmp_path / "my-model"
    model.mkdir()
    (model / "model.json").write_text(json.dumps({"kind": "bogus", "classes": ["a", "b"]}))
    result = CliRunner().invoke(app, ["register", str(model)])
    assert result.exit_code == 2 and str(model) in result.output and "/tmp/tmp" not in result.output, result.output


def test_a_champion_moved_while_register_registers_is_named_with_the_way_on(tmp_path, clean_env, tiny_settings):
    """Another engineer moved @champion while `register --champion --override` logged its version: the alias is
    rightly left alone, and the command now says the version is registered and how to serve it (a retry, the
    natural next step after an error, registered a second copy)."""
    import torch
    from typer.testing import CliRunner

    from cytoloop.models.baseline import BaselineClassifier
    from cytoloop.registry import Registry
    from ops.cli import app

    torch.manual_seed(0)
    BaselineClassifier(["a", "b"], tiny_settings.data, tiny_settings.baseline).save(tmp_path / "model")
    clean_env.setenv("CYTOLOOP_HOME", str(tmp_path / "home"))
    runner = CliRunner()
    register = ["register", str(tmp_path / "model")]
    assert runner.invoke(app, [*register, "--champion", "--reason", "first"]).exit_code == 0
    assert runner.invoke(app, register).exit_code == 0  # v2, registered only
    log_model = Registry.log_model

    def log_while_another_promotes(self, *args, **kwargs):
        version = log_model(self, *args, **kwargs)
        self.move_alias("cytoloop-cells", "champion", "2", why="test: another engineer's promotion")
        return version

    clean_env.setattr(Registry, "log_model", log_while_another_promotes)
    result = runner.invoke(app, [*register, "--champion", "--override", "--reason", "replace it"])
    assert result.exit_code == 2, result.output
    said = " ".join(result.output.split())
    assert "v3 is registered, but @champion was not moved: cytoloop-cells@champion: judged against v1, but v2" in said
    assert "`cytoloop promote 3 --reason ...`" in said


def test_serve_with_num_cpus_and_a_cluster_to_join_is_refused_before_ray(clean_env):
    """`cytoloop serve --num-cpus 2` with RAY_ADDRESS set: Ray's ValueError ("When connecting to an existing
    cluster, num_cpus ... must not be provided") came as a traceback, exit 1."""
    from typer.testing import CliRunner

    from ops.cli import app

    clean_env.setenv("RAY_ADDRESS", "127.0.0.1:1")  # never reached
    result = CliRunner().invoke(app, ["serve", "--num-cpus", "2"])
    said = " ".join(result.output.split())
    assert result.exit_code == 2 and "with RAY_ADDRESS (127.0.0.1:1) serve joins that cluster" in said, result.output


def test_files_cut_short_or_not_in_utf8_are_named(tmp_path, clean_env):
    """A settings file or a model.json in Latin-1, and a split.json cut short, were tracebacks
    (UnicodeDecodeError, JSONDecodeError) instead of errors naming the file."""
    from cytoloop.config import load_settings
    from cytoloop.models.base import ModelLoadError, read_model_meta
    from cytoloop.workflows import held_out

    settings = tmp_path / "settings.json"
    settings.write_bytes('{"home": "/data/h\xf4pital"}'.encode("latin-1"))
    with pytest.raises(UsageError, match="settings.json is not UTF-8 text"):
        load_settings(settings)
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.json").write_bytes('{"kind": "baseline", "note": "\xe9"}'.encode("latin-1"))
    with pytest.raises(ModelLoadError, match="model.json: not valid JSON"):
        read_model_meta(model)
    (model / "split.json").write_text('{"meta": {"seed": 0}, "parts": {"train": ["a.p')
    with pytest.raises(DatasetError, match="split.json: not a split file"):
        held_out([], model)


def test_route_refuses_cells_label_studio_cannot_show_before_scoring_them(tmp_path, clean_env):
    """`review route` scored every cell (minutes with the diffusion model) and only then found that no images
    folder was set, or that the cells lay outside it. The model here is not even loadable: the check comes first."""
    from typer.testing import CliRunner

    from ops.cli import app

    model = tmp_path / "model"
    model.mkdir()
    (model / "model.json").write_text("{}")
    (tmp_path / "cells").mkdir()
    manifest = tmp_path / "pool.csv"
    manifest.write_text("path,label,domain\nelsewhere/a.png,,lab\n")
    clean_env.setenv("CYTOLOOP_HOME", str(tmp_path / "home"))
    route = ["review", "route", "--model", str(model), "--data", str(manifest), "--no-push"]
    unset = CliRunner().invoke(app, route)
    assert unset.exit_code == 2 and "stack.images_root is not set" in " ".join(unset.output.split()), unset.output
    clean_env.setenv("CYTOLOOP_STACK__IMAGES_ROOT", str(tmp_path / "cells"))
    outside = CliRunner().invoke(app, route)
    message = " ".join(outside.output.split())
    assert outside.exit_code == 2 and "elsewhere/a.png is outside Label Studio's image folder" in message, message


def test_export_under_a_home_that_holds_no_labels_leaves_the_old_export(tmp_path, clean_env):
    """With CYTOLOOP_HOME pointing elsewhere (a typo, another shell), `review export` made an empty label store
    there and replaced the lab's export with a header-only file."""
    from typer.testing import CliRunner

    from ops.cli import app

    export = tmp_path / "consensus.csv"
    export.write_text("path,label,domain\na.png,lymphocyte,lab\n")
    clean_env.setenv("CYTOLOOP_HOME", str(tmp_path / "elsewhere"))
    result = CliRunner().invoke(app, ["review", "export", "--out", str(export)])
    assert result.exit_code == 2 and "no labels under home" in " ".join(result.output.split()), result.output
    assert export.read_text() == "path,label,domain\na.png,lymphocyte,lab\n"
    assert not (tmp_path / "elsewhere" / "review").exists()


def test_report_and_push_under_a_home_with_no_review_files_are_refused(tmp_path, clean_env):
    """`review report` and `review push` under a wrong home answered "0 cells" / "nothing waiting" and left an
    empty label store there, after which `review export` (whose guard is that file) replaced the lab's export with
    a header-only file."""
    from typer.testing import CliRunner

    from ops.cli import app

    export = tmp_path / "consensus.csv"
    export.write_text("path,label,domain\na.png,lymphocyte,lab\n")
    clean_env.setenv("CYTOLOOP_HOME", str(tmp_path / "elsewhere"))
    report = CliRunner().invoke(app, ["review", "report"])
    assert report.exit_code == 2 and "no labels under home" in " ".join(report.output.split()), report.output
    push = CliRunner().invoke(app, ["review", "push"])
    message = " ".join(push.output.split())
    assert push.exit_code == 2 and "no outbox (no cell was routed) under home" in message, message
    assert not (tmp_path / "elsewhere" / "review").exists()
    exported = CliRunner().invoke(app, ["review", "export", "--out", str(export)])
    assert exported.exit_code == 2 and export.read_text() == "path,label,domain\na.png,lymphocyte,lab\n"


def test_export_without_the_images_root_is_refused(tmp_path, clean_env):
    """Without `stack.images_root` the export checked no path: a task edited to name /etc/passwd went into the
    training manifest, though the docs promise paths outside the images root stay out."""
    from typer.testing import CliRunner

    from cytoloop.config import load_settings
    from labelstudio.loop import label_store_path
    from labelstudio.store import LabelStore
    from ops.cli import app

    clean_env.setenv("CYTOLOOP_HOME", str(tmp_path / "home"))
    LabelStore(label_store_path(load_settings()))
    result = CliRunner().invoke(app, ["review", "export", "--out", str(tmp_path / "labels.csv")])
    message = " ".join(result.output.split())
    assert result.exit_code == 2 and "stack.images_root is not set" in message, message
    assert not (tmp_path / "labels.csv").exists()


def test_damaged_models_unlabelled_manifests_and_empty_settings_are_named(tmp_path, clean_env):
    """Found by trying a user's mistakes: a model.json section that is null was a TypeError traceback; weights of
    another shape said only "Error(s) in loading state_dict", and a garbage weights file repeated torch's advice
    to load it with weights_only=False; an unlabelled manifest for `train` said "no cells left after selecting
    domains=None"; `CYTOLOOP_HOME=` meant the current folder; a missing CYTOLOOP_CONFIG was called --config."""
    import json

    from typer.testing import CliRunner

    from cytoloop.config import BaselineModelConfig, DataConfig, load_settings
    from cytoloop.models.base import ModelLoadError
    from cytoloop.models.baseline import BaselineClassifier
    from cytoloop.models.loading import load_model
    from ops.cli import app

    model = BaselineClassifier(["a", "b"], DataConfig(image_size=16), BaselineModelConfig(channels=(4, 8))).save(
        tmp_path / "model"
    )
    meta = json.loads((model / "model.json").read_text())
    (model / "model.json").write_text(json.dumps({**meta, "classes": ["a", "b", "c"]}))
    with pytest.raises(ModelLoadError, match="size mismatch"):
        load_model(model)
    (model / "model.json").write_text(json.dumps({**meta, "data": None}))
    with pytest.raises(ModelLoadError, match="model.json is not a valid baseline model"):
        load_model(model)
    # fields beside the sections: "hot" loaded (and registered), then every request failed; a string was read as
    # one class per letter
    for field, value, named in (
        ("temperature", "hot", "temperature: expected a finite number above 0"),
        ("temperature", 0, "temperature: expected a finite number above 0"),
        ("temperature", -1.5, "temperature: expected a finite number above 0"),
        ("classes", "ab", "classes: expected a list of distinct class names"),
        ("classes", ["a", "a"], "classes: expected a list of distinct class names"),
        ("timestep_weights", [1.0, "x"], "timestep_weights: expected 10 finite numbers"),
    ):
        (model / "model.json").write_text(json.dumps({**meta, field: value}))
        with pytest.raises(ModelLoadError, match=named):
            load_model(model)
    clean_env.setenv("CYTOLOOP_HOME", str(tmp_path / "home"))
    result = CliRunner().invoke(app, ["register", str(model)])
    assert result.exit_code == 2 and "timestep_weights" in result.output, result.output
    assert not (tmp_path / "home").exists()  # refused before the registry is opened
    clean_env.delenv("CYTOLOOP_HOME")
    (model / "model.json").write_text(json.dumps(meta))
    (model / "weights.pt").write_bytes(b"\x80\x02}q\x00garbage")
    with pytest.raises(ModelLoadError, match="weights file is damaged or not PyTorch's") as damaged:
        load_model(model)
    assert "weights_only" not in str(damaged.value)

    manifest = tmp_path / "pool.csv"
    manifest.write_text("path,label,domain\na.png,,lab\nb.png,,lab\n")
    result = CliRunner().invoke(app, ["train", "--data", str(manifest), "--out", str(tmp_path / "new")])
    assert result.exit_code == 2 and "no labelled cells" in " ".join(result.output.split()), result.output
    clean_env.setenv("CYTOLOOP_CONFIG", str(tmp_path / "nowhere.json"))
    result = CliRunner().invoke(app, ["info", str(model)])
    assert result.exit_code == 2 and "CYTOLOOP_CONFIG" in result.output, result.output
    clean_env.delenv("CYTOLOOP_CONFIG")
    clean_env.setenv("CYTOLOOP_HOME", "")
    with pytest.raises(ValueError, match="home\\s+Value error, is empty"):
        load_settings()
    clean_env.delenv("CYTOLOOP_HOME")
    # every path setting alike: `CYTOLOOP_STACK__IMAGES_ROOT=$CELLS` with CELLS unset served the current folder
    for variable, field in (
        ("CYTOLOOP_STACK__IMAGES_ROOT", "stack.images_root"),
        ("CYTOLOOP_REGISTRY__CACHE_DIR", "registry.cache_dir"),
        ("CYTOLOOP_FINETUNE__STORAGE_PATH", "finetune.storage_path"),
        ("CYTOLOOP_SERVE__PREDICTION_LOG", "serve.prediction_log"),
    ):
        clean_env.setenv(variable, " ")
        with pytest.raises(ValueError, match=f"{field}\\s+Value error, is empty"):
            load_settings()
        clean_env.delenv(variable)


def test_drift_on_a_missing_log_is_named_before_mlflow_is_opened(tmp_path, clean_env):
    from typer.testing import CliRunner

    from ops.cli import app

    clean_env.setenv("CYTOLOOP_HOME", str(tmp_path / "home"))
    result = CliRunner().invoke(app, ["drift", "--events", str(tmp_path / "predictions.jsonl")])
    assert result.exit_code == 2 and "predictions.jsonl" in result.output, result.output
    assert not (tmp_path / "home").exists()  # no empty MLflow database made on the way


def test_route_names_cells_it_could_not_read_and_refuses_when_none_could_be(tmp_path, clean_env):
    """Cells whose files could not be read were dropped from routing without a word, and when none could be read
    the empty batch ended in a reshape traceback."""
    import numpy as np
    from PIL import Image
    from typer.testing import CliRunner

    from cytoloop.config import BaselineModelConfig, DataConfig
    from cytoloop.models.baseline import BaselineClassifier
    from ops.cli import app

    model = BaselineClassifier(["a", "b"], DataConfig(image_size=16), BaselineModelConfig(channels=(4, 8))).save(
        tmp_path / "model"
    )
    cells = tmp_path / "cells"
    cells.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(cells / "here.png")
    clean_env.setenv("CYTOLOOP_HOME", str(tmp_path / "home"))
    clean_env.setenv("CYTOLOOP_STACK__IMAGES_ROOT", str(cells))
    gone = tmp_path / "gone.csv"
    gone.write_text("path,label,domain\ncells/missing.png,,lab\n")
    route = ["review", "route", "--model", str(model), "--no-push", "--data"]
    none = CliRunner().invoke(app, [*route, str(gone)])
    message = " ".join(none.output.split())
    assert none.exit_code == 2 and "none of the 1 cells could be read" in message and "missing.png" in message, message
    some = tmp_path / "some.csv"
    some.write_text("path,label,domain\ncells/here.png,,lab\ncells/missing.png,,lab\n")
    partly = CliRunner().invoke(app, [*route, str(some)])
    message = " ".join(partly.output.split())
    assert partly.exit_code == 0 and "1 of 2 cells could not be read and are not routed" in message, message
    assert "routed 1 cells" in message


def test_an_unanswered_or_refused_rollback_moves_nothing_and_exits_2(tmp_path, clean_env):
    """Without --yes and no one to answer (a scheduler's job), or with a "no", click printed "Aborted." and
    exited 1, the code of a bug; it is exit code 2 saying nothing moved, before the registry is opened."""
    from typer.testing import CliRunner

    from ops.cli import app

    clean_env.setenv("CYTOLOOP_HOME", str(tmp_path / "home"))
    for answer in ("", "n\n"):
        result = CliRunner().invoke(app, ["rollback", "--reason", "bad night"], input=answer)
        message = " ".join(result.output.split())
        assert result.exit_code == 2 and "not confirmed: nothing was moved" in message, (answer, message)
    named = CliRunner().invoke(app, ["rollback", "--from", "v7", "--reason", "bad night"], input="n\n")
    assert named.exit_code == 2 and "Roll @champion back from v7?" in named.output  # the version it rolls back
    assert not (tmp_path / "home").exists()


def test_a_stopped_mlflow_server_is_named_at_once(tmp_path, clean_env):
    """MLflow retries a refused connection with back-off: `cytoloop status` against a stopped server said nothing
    for four minutes, then printed urllib3's 'Max retries exceeded'. The server is asked once now, and named."""
    import socket

    from typer.testing import CliRunner

    from ops.cli import app

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    clean_env.setenv("CYTOLOOP_HOME", str(tmp_path / "home"))
    clean_env.setenv("CYTOLOOP_REGISTRY__TRACKING_URI", f"http://127.0.0.1:{port}")
    for command in (["status"], ["rollback", "--yes", "--reason", "r"]):
        result = CliRunner().invoke(app, command)
        message = " ".join(result.output.split())
        assert result.exit_code == 2, message
        assert f"the MLflow server at http://127.0.0.1:{port} is not reachable" in message and "stack up" in message


def test_a_retrain_before_any_champion_says_to_register_one(tmp_path, clean_env):
    """Before the first `register --champion`, `retrain` ended with MLflow's 'Registered Model with name=... not
    found'; it says what to do now."""
    from typer.testing import CliRunner

    from ops.cli import app

    clean_env.setenv("CYTOLOOP_HOME", str(tmp_path / "home"))
    clean_env.setenv("CYTOLOOP_REGISTRY__TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    labels = tmp_path / "labels.csv"
    labels.write_text("path,label,domain\na.png,neutrophil,lab\n")
    result = CliRunner().invoke(app, ["retrain", "--labels", str(labels)])
    message = " ".join(result.output.split())
    assert result.exit_code == 2 and "no champion of cytoloop-cells to fine-tune" in message, message
    assert "cytoloop register MODEL_DIR --champion" in message


def test_settings_a_shell_got_wrong_are_named_before_anything_runs(tmp_path, clean_env):
    """Found by trying a user's mistakes: an empty tracking URI gave MLflow's file-store message; a home that is a
    file, and a training OUT that is a file, 'Not a directory' from whatever wrote first (after loading every
    cell); a settings file with a byte-order mark was refused while manifests take one."""
    import json

    from typer.testing import CliRunner

    from cytoloop.config import load_settings
    from ops.cli import app

    clean_env.setenv("CYTOLOOP_REGISTRY__TRACKING_URI", " ")
    with pytest.raises(ValueError, match="registry.tracking_uri\\s+Value error, is empty"):
        load_settings()
    clean_env.delenv("CYTOLOOP_REGISTRY__TRACKING_URI")
    a_file = tmp_path / "afile"
    a_file.write_text("not a folder")
    clean_env.setenv("CYTOLOOP_HOME", str(a_file))
    with pytest.raises(ValueError, match=f"home {a_file} is a file, not a folder"):
        load_settings()
    clean_env.delenv("CYTOLOOP_HOME")
    settings = tmp_path / "settings.json"
    settings.write_text("\ufeff" + json.dumps({"routing": {"review_below": 0.5}}), encoding="utf-8")
    assert load_settings(settings).routing.review_below == 0.5
    manifest = tmp_path / "cells.csv"
    manifest.write_text("path,label,domain\na.png,a,lab\n")
    result = CliRunner().invoke(app, ["train", "--data", str(manifest), "--out", str(a_file)])
    message = " ".join(result.output.split())
    assert result.exit_code == 2 and f"--out {a_file} is a file" in message, message
    damaged = tmp_path / "model"
    damaged.mkdir()
    (damaged / "model.json").write_text('{"kind": "diffusion", "temperature": "hot"}')
    result = CliRunner().invoke(app, ["serve", "--model", str(damaged)])  # named before Ray or Serve starts
    message = " ".join(result.output.split())
    assert result.exit_code == 2 and "temperature: expected a finite number" in message, message


def test_a_push_that_leaves_tasks_waiting_exits_7(tmp_path, clean_env):
    """Label Studio stopped (nothing listens on its port): `review push` warned and exited 0, so a scheduler read
    the tasks as delivered; it exits 7 (run it again) with them still in the outbox."""
    import socket

    from typer.testing import CliRunner

    from cytoloop.config import load_settings
    from labelstudio.loop import outbox_path
    from labelstudio.outbox import Outbox
    from ops.cli import app

    with socket.socket() as probe:  # a port nothing listens on: a stopped server
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    clean_env.setenv("CYTOLOOP_HOME", str(tmp_path / "home"))
    clean_env.setenv("CYTOLOOP_STACK__LABEL_STUDIO_PORT", str(port))
    clean_env.setenv("CYTOLOOP_STACK__ADMIN_TOKEN", "a-token-for-a-server-that-is-down")
    outbox = Outbox(outbox_path(load_settings()))
    outbox.enqueue([{"data": {"task_key": "east:cell0.png@v1", "site": "east", "cell_id": "cell0.png"}}])
    result = CliRunner().invoke(app, ["review", "push"])
    message = " ".join(result.output.split())
    assert result.exit_code == 7 and "1 waiting in the outbox" in message, message
    assert outbox.counts()["pending"] == 1
    # tasks Label Studio refused one by one wait for their next attempt too: not delivered (it exited 0)
    from labelstudio.push import PushReport
    from ops.cli.review import not_delivered

    assert not_delivered(PushReport(pushed=2, pending=1, failed=1))
    assert not not_delivered(PushReport(pushed=3))


def test_a_sync_that_cannot_reach_label_studio_leaves_no_empty_store(tmp_path, clean_env):
    """`review sync` in a mistyped home, Label Studio not answering there: it made an empty label store and outbox
    first, and `review report` then answered "0 cells" there instead of refusing a home without a store."""
    import socket

    from typer.testing import CliRunner

    from cytoloop.config import load_settings
    from labelstudio.loop import label_store_path, outbox_path
    from ops.cli import app

    with socket.socket() as probe:  # a port nothing listens on: a stopped server
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    clean_env.setenv("CYTOLOOP_HOME", str(tmp_path / "typo"))
    clean_env.setenv("CYTOLOOP_STACK__LABEL_STUDIO_PORT", str(port))
    result = CliRunner().invoke(app, ["review", "sync"])
    assert result.exit_code == 2 and "not reachable" in " ".join(result.output.split()), result.output
    settings = load_settings()
    assert not label_store_path(settings).exists() and not outbox_path(settings).exists()
    report = CliRunner().invoke(app, ["review", "report"])
    assert report.exit_code == 2 and "labels.db does not exist" in " ".join(report.output.split()), report.output


def test_messages_logged_after_an_in_process_command_reach_the_standard_error_of_the_moment(capsys):
    """The project's loggers were bound to the standard error of the command's moment: run in-process (a test's
    CliRunner, the demo fixture's own `stack down` after it) every later message was a "--- Logging error ---"
    traceback about a closed file instead of the message."""
    import logging

    from typer.testing import CliRunner

    from ops.cli import app

    assert CliRunner().invoke(app, ["recipes"]).exit_code == 0
    logging.getLogger("ops.stack").warning("ray (pid 1) did not stop on SIGTERM within 30 s; killing it")
    err = capsys.readouterr().err
    assert "did not stop on SIGTERM" in err and "Logging error" not in err

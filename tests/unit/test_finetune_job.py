"""`python -m jobs.finetune`: bad input ends with one line naming what was wrong and exit code 2, before any Ray.

The job itself (a real two-node Ray cluster, the Ray Jobs API, a registered version) is
tests/integration/test_cluster.py.
"""

import pytest

from cytoloop.data.records import CellRecord
from jobs.finetune import main, save_retrain_state


def run(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().err


def test_missing_labels_file_is_named(tmp_path, capsys, clean_env):
    code, err = run(capsys, "--labels", str(tmp_path / "missing.csv"))
    assert code == 2 and f"dataset not found: {tmp_path / 'missing.csv'}" in err


def test_missing_settings_file_is_named(tmp_path, capsys, clean_env):
    code, err = run(capsys, "--labels", "labels.csv", "--config", str(tmp_path / "settings.json"))
    assert code == 2 and f"settings file not found: {tmp_path / 'settings.json'}" in err


def test_invalid_setting_names_the_field(tmp_path, capsys, clean_env):
    clean_env.setenv("CYTOLOOP_FINETUNE__NUM_WORKERS", "0")
    code, err = run(capsys, "--labels", str(tmp_path / "labels.csv"))
    assert code == 2 and "invalid configuration: finetune.num_workers" in err


def test_labels_without_a_label_are_refused(tmp_path, capsys, clean_env):
    (tmp_path / "labels.csv").write_text("path,label,domain\ncell.png,,lab\n")
    code, err = run(capsys, "--labels", str(tmp_path / "labels.csv"))
    assert code == 2 and "no labelled cells" in err


def test_invalid_site_name(capsys, clean_env):
    """The job checked its own, looser rule: `_lab` trained and was promoted as `champion-_lab`, which no request
    can name, and `global` passed for the global scope (its tags, frozen sets and lock)."""
    for site in ("st marys", "_lab", "global", "Global"):
        code, err = run(capsys, "--labels", "labels.csv", "--site", site)
        assert code == 2 and f"invalid site name {site!r}" in err


def test_a_cache_folder_that_is_a_file_is_named_not_a_traceback(tmp_path, capsys, clean_env, tiny_settings):
    """The job caught only a missing file among the file system's refusals: a cache folder that is a file (or one
    it may not write, the usual case for a job's non-root user) ended in a traceback, exit 1, which a RayJob reads
    as a bug."""
    import torch

    from cytoloop.models.baseline import BaselineClassifier
    from cytoloop.registry import Registry

    torch.manual_seed(0)
    BaselineClassifier(["a", "b"], tiny_settings.data, tiny_settings.baseline).save(tmp_path / "model")
    registry = Registry(f"sqlite:///{tmp_path}/mlflow.db")
    version = registry.log_model(tmp_path / "model", "cytoloop-cells").version
    registry.move_alias("cytoloop-cells", "champion", version, why="test: the first champion")
    (tmp_path / "labels.csv").write_text("path,label,domain\ncell.png,a,lab\n")
    (tmp_path / "cache").write_text("a file where the cache folder belongs")
    clean_env.setenv("CYTOLOOP_HOME", str(tmp_path / "home"))
    clean_env.setenv("CYTOLOOP_REGISTRY__TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    clean_env.setenv("CYTOLOOP_REGISTRY__CACHE_DIR", str(tmp_path / "cache"))
    code, err = run(capsys, "--labels", str(tmp_path / "labels.csv"))
    assert code == 2 and f"error: {tmp_path / 'cache'}/cytoloop-cells: Not a directory" in err, err


def test_labels_are_required(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code == 2 and "--labels" in capsys.readouterr().err


def test_a_site_is_judged_on_the_audited_cells_of_its_own_classes(tmp_path, clean_env):
    """The gate took every audited cell of the model's classes for a site's version too: cells of classes the
    site never reports, wrong for both models there by design."""
    from cytoloop.config import Settings
    from cytoloop.data.records import CellRecord
    from cytoloop.models.finetune import FrozenSets, write_manifest
    from jobs.finetune import gate_cells

    def cells(prefix, labels):
        return [CellRecord(f"{prefix}{i}.png", tmp_path / f"{prefix}{i}.png", c, "lab") for i, c in enumerate(labels)]

    write_manifest(cells("audit", ["a", "b", "b"]), tmp_path / "audited.csv")
    settings = Settings(
        home=tmp_path / "home",
        promotion={"audited_manifest": tmp_path / "audited.csv"},
        sites={"north": {"classes": ["a"]}},
    )
    sets = FrozenSets(train=[], val=[], eval=cells("eval", ["a"]))
    labels = lambda site: sorted(r.label for r in gate_cells(sets, settings, site, ["a", "b"]).eval_records)  # noqa: E731
    assert labels("north") == ["a", "a"]
    assert labels(None) == labels("south") == ["a", "a", "b", "b"]  # the global model, a site without classes


def test_a_site_with_audited_cells_of_its_own_is_judged_on_those(tmp_path, clean_env):
    """One audited manifest served every gate: a site's adaptation to its stain was judged on every other site's
    audited cells too, where it is meant to be no better. A site's own manifest replaces it for that site's gate;
    the global model and other sites keep the shared one."""
    from cytoloop.config import Settings
    from cytoloop.data.records import CellRecord
    from cytoloop.models.finetune import FrozenSets, write_manifest
    from jobs.finetune import gate_cells

    def cells(prefix, n):
        return [CellRecord(f"{prefix}{i}.png", tmp_path / f"{prefix}{i}.png", "a", prefix) for i in range(n)]

    write_manifest(cells("shared", 3), tmp_path / "audited.csv")
    write_manifest(cells("north", 2), tmp_path / "north.csv")
    settings = Settings(
        home=tmp_path / "home",
        promotion={"audited_manifest": tmp_path / "audited.csv"},
        sites={"north": {"audited_manifest": tmp_path / "north.csv"}, "east": {"classes": ["a"]}},
    )
    sets = FrozenSets(train=[], val=[], eval=cells("eval", 1))
    labs = lambda site: sorted(r.domain for r in gate_cells(sets, settings, site, ["a"]).eval_records)  # noqa: E731
    assert labs("north") == ["eval", "north", "north"]
    assert labs(None) == labs("east") == labs("south") == ["eval", "shared", "shared", "shared"]
    assert settings.judged_manifests() == [tmp_path / "audited.csv", tmp_path / "north.csv"]


def _outcome(tmp_path, verdict: str):
    from cytoloop.registry import VersionInfo
    from jobs.finetune import FinetuneOutcome

    version = VersionInfo("cells", "4", None, {"gate.verdict": verdict}, [])
    return FinetuneOutcome(version, verdict == "pass", [], "champion", tmp_path, {}, [])


def test_a_stale_retrain_leaves_its_labels_counted_as_new(tmp_path, clean_env):
    """Two retrains at once: the second's version was passed over as stale (the first had moved the champion),
    yet the retrain state recorded its labels as trained on, so the labels only it had learned counted as old
    and `--if-due` held the retrain they were due back until as many more arrived."""
    from cytoloop.config import Settings
    from cytoloop.policy.retrain import load_state, new_labels

    settings = Settings(home=tmp_path)
    labels = [CellRecord(f"c{i}.png", tmp_path / f"c{i}.png", "a", "lab") for i in range(5)]
    state = tmp_path / "retrain" / "state.json"
    assert save_retrain_state(settings, labels[:3], _outcome(tmp_path, "refused"))  # judged: its labels are used
    assert not save_retrain_state(settings, labels, _outcome(tmp_path, "stale"))
    assert len(new_labels(labels, load_state(state))) == 2
    assert save_retrain_state(settings, labels, _outcome(tmp_path, "pass"))
    assert new_labels(labels, load_state(state)) == []


def test_a_rerun_reports_a_version_a_person_promoted_over_its_verdict_as_promoted(tmp_path, tiny_settings):
    """A retrain's version the gate refused (or passed over as stale), then promoted by a person: a rerun of the
    same job (it finds its own version serving) said "refused" (exit 3) of the version serving, or "stale" on
    every scheduled run, never saving its labels as trained on. On a real registry (MLflow on SQLite)."""
    import torch

    from cytoloop.models.baseline import BaselineClassifier
    from cytoloop.registry import Registry
    from jobs.finetune import _outcome_of

    torch.manual_seed(0)
    BaselineClassifier(["a", "b"], tiny_settings.data, tiny_settings.baseline).save(tmp_path / "model")
    registry = Registry(f"sqlite:///{tmp_path}/mlflow.db")
    first = registry.log_model(tmp_path / "model", "cells").version
    registry.move_alias("cells", "champion", first, why="test: the first champion")
    second = registry.log_model(tmp_path / "model", "cells").version

    def outcome(verdict: str):
        registry.set_tags("cells", second, {"gate.verdict": verdict, "gate.reasons": "[]"})
        return _outcome_of(registry, registry.version("cells", second), "champion", tmp_path)

    for verdict in ("refused", "stale", "pass"):  # not serving: as the job left it
        kept = outcome(verdict)
        assert not kept.passed and kept.state == {"pass": "withdrawn"}.get(verdict, verdict)
    registry.move_alias("cells", "champion", second, why="test: a person overrides the gate")
    for verdict in ("refused", "stale", "pass"):
        serving = outcome(verdict)
        assert serving.passed and serving.state == "promoted" and not serving.stale
        assert (verdict != "pass") == any("a person promoted it since" in r for r in serving.reasons)
    assert save_retrain_state(tiny_settings.model_copy(update={"home": tmp_path}), [], outcome("stale"))


def test_two_fine_tunes_of_one_scope_run_one_after_the_other(tmp_path, monkeypatch, clean_env):
    """Two at once (the ML backend's retrain, a scheduled one) shared a run folder, or built on a parent the other
    was about to replace; a second fine-tune of the scope now waits for the first. Another scope does not."""
    import threading
    import time

    from cytoloop.config import Settings
    from jobs import finetune

    count, inside, most = threading.Lock(), [0], []  # global fine-tunes running at once, and the most seen
    site_in, global_in, saw_site = threading.Event(), threading.Event(), []

    def recorded(settings, records, unlabeled, site, stain_normalize, who, progress):
        if site is not None:
            site_in.set()
            global_in.wait(10)  # held until a global fine-tune runs too: they overlap, or this times out
            return
        with count:
            inside[0] += 1
            most.append(inside[0])
        global_in.set()
        saw_site.append(site_in.wait(10))  # the site's fine-tune starts while this one runs
        time.sleep(0.3)  # room for the second global fine-tune to start, were it not held
        with count:
            inside[0] -= 1

    monkeypatch.setattr(finetune, "_run_finetune", recorded)
    settings = Settings(home=tmp_path)
    threads = [
        threading.Thread(target=finetune.run_finetune, args=(settings, [], (), site)) for site in (None, None, "a")
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads)
    assert most == [1, 1]  # one after the other
    assert saw_site == [True, True]  # a site's fine-tune is not held by the global ones


def test_a_job_on_a_parent_of_the_same_number_after_a_registry_reset_is_another_job():
    """Numbers start again at 1 after a registry reset: a job named by the parent's number alone resumed the Ray
    run (and the folder) of a job on another parent that had had that number."""
    from cytoloop.registry import VersionInfo
    from jobs.finetune import job_name

    before = VersionInfo("cells", "1", "8f0c2a1be5d44f7c", {}, ["champion"])
    after_reset = VersionInfo("cells", "1", "03d9e77a01b84c21", {}, ["champion"])
    assert job_name(None, before, "abc", "k") != job_name(None, after_reset, "abc", "k")
    assert job_name(None, before, "abc", "k") == job_name(None, before, "abc", "k")
    assert job_name("north", before, "abc", "k").startswith("north-v1-")

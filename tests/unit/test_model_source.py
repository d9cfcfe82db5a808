"""Serving's library side without Ray: a local model directory as a source, live switching, the cell service."""

from __future__ import annotations

import shutil

import pytest

from cytoloop.config import BaselineModelConfig, DataConfig, RegistryConfig, RoutingConfig, ServeConfig
from cytoloop.models.baseline import BaselineClassifier
from cytoloop.serving.inference import CellFailure, CellResult, CellService
from cytoloop.serving.live import LiveModel, ServiceCache
from cytoloop.serving.model_source import ModelSource

CLASSES = ["lymphocyte", "neutrophil"]


def _save(directory, classes=CLASSES, seed=0):
    import torch

    torch.manual_seed(seed)
    model = BaselineClassifier(classes, DataConfig(image_size=16), BaselineModelConfig(channels=(4, 8)))
    return model.save(directory)


@pytest.fixture
def local_source(tmp_path):
    _save(tmp_path / "model")
    source = ModelSource(ServeConfig(model_dir=tmp_path / "model"), RegistryConfig())
    return source, ServiceCache(source, RoutingConfig(review_below=0.0, audit_fraction=0.0))


def test_local_directory_is_versioned_by_content(local_source, tmp_path):
    source, _ = local_source
    first = source.resolve("any-site")
    assert first == source.resolve(None) and first.version.startswith("local-") and first.alias is None
    _save(tmp_path / "model", seed=1)
    assert source.resolve(None).version != first.version
    assert set(source.site_versions()) == {None}


def test_live_model_switches_when_the_model_changes(local_source, tmp_path):
    source, cache = local_source
    live = LiveModel("a", source, cache)
    old = live.service
    assert live.refresh() is False and live.service is old
    _save(tmp_path / "model", classes=["a", "b", "c"], seed=2)
    assert live.refresh() is True
    assert live.service.ref != old.ref and live.service.classes == ["a", "b", "c"]
    assert old.classes == CLASSES  # whoever still holds the old service keeps a working model


def test_a_model_copied_over_the_directory_while_it_loads_is_not_served_under_the_old_version(
    local_source, tmp_path, monkeypatch
):
    """`resolve` hashes the directory, `load` reads it again: a model copied over it in between (or during the
    load) was served labelled with the version it was not, perhaps new settings with old weights. The load is
    refused; the next one, of the directory as it is then, serves the new model under its own version."""
    from cytoloop.models.base import ModelLoadError
    from cytoloop.serving import model_source

    source, _ = local_source
    ref = source.resolve(None)
    real = model_source.load_model

    def copied_over_meanwhile(path, runtime=None):
        loaded = real(path, runtime)
        _save(tmp_path / "model", classes=["a", "b", "c"], seed=3)
        return loaded

    monkeypatch.setattr(model_source, "load_model", copied_over_meanwhile)
    with pytest.raises(ModelLoadError, match="changed while it loaded"):
        source.load(ref)
    monkeypatch.setattr(model_source, "load_model", real)
    again = source.resolve(None)
    assert again != ref and source.load(again).classes == ["a", "b", "c"]


def test_sites_on_the_same_version_share_one_loaded_model(local_source):
    source, cache = local_source
    assert LiveModel("a", source, cache).service is LiveModel("b", source, cache).service


def test_cell_service_answers_each_cell_and_isolates_failures(local_source, cells_dir):
    source, cache = local_source
    service = cache.get(source.resolve(None))
    assert isinstance(service, CellService)
    real = sorted((cells_dir / "jtsc").glob("*.bmp"))[:2]
    cells = [(real[0].name, real[0].read_bytes()), ("junk", b"junk"), (real[1].name, real[1].read_bytes())]
    answers = service.classify(cells)
    assert [type(a) for a in answers] == [CellResult, CellFailure, CellResult]
    assert [a.index for a in answers] == [0, 1, 2]
    first = answers[0]
    assert first.label in CLASSES and first.route == "accept" and first.cell_id.startswith("sha256:")
    assert first.confidence == pytest.approx(max(first.probabilities.values()))
    assert service.classify(cells[:1])[0] == first  # same image, same answer, alone or in a batch
    assert "junk" in answers[1].message


def test_missing_model_directory_is_a_clear_error(tmp_path):
    from cytoloop.models.base import ModelLoadError

    shutil.rmtree(tmp_path, ignore_errors=True)
    source = ModelSource(ServeConfig(model_dir=tmp_path / "nowhere"), RegistryConfig())
    with pytest.raises(ModelLoadError, match="nowhere"):
        source.resolve(None)


def test_machine_settings_replace_how_a_model_runs_never_what_it_decides(tmp_path, monkeypatch):
    """CYTOLOOP_SCORING__PRECISION and the other runtime fields set for a machine apply to the models it loads
    (served, evaluated, scored offline): they used to be read only by models trained there, so a served model ran
    as its model.json said whatever the machine asked. The tuned rule is the model's own: never replaced."""
    import json

    from cytoloop.config import DiffusionModelConfig, ScoringConfig, load_settings
    from cytoloop.models.cascade import CascadeClassifier
    from cytoloop.models.diffusion import DiffusionClassifier

    tuned = ScoringConfig(min_trials=3, max_trials=9, elimination_p=0.02, precision="fp32")
    teacher = DiffusionClassifier(
        CLASSES, DataConfig(image_size=16), DiffusionModelConfig(block_out_channels=(8, 16), norm_num_groups=4), tuned
    )
    teacher.save(tmp_path / "diffusion")
    student = BaselineClassifier(CLASSES, DataConfig(image_size=16), BaselineModelConfig(channels=(4, 8)))
    CascadeClassifier(teacher, student).save(tmp_path / "cascade")
    on_disk = json.loads((tmp_path / "diffusion" / "model.json").read_text())

    monkeypatch.setenv("CYTOLOOP_SCORING__PRECISION", "bf16")
    monkeypatch.setenv("CYTOLOOP_SCORING__CHANNELS_LAST", "true")
    monkeypatch.setenv("CYTOLOOP_SCORING__MIN_TRIALS", "1")  # a decision: stays the model's
    runtime = load_settings().scoring
    for name in ("diffusion", "cascade"):
        source = ModelSource(ServeConfig(model_dir=tmp_path / name), RegistryConfig(), runtime)
        model = source.load(source.resolve(None))
        scoring = (model.teacher if name == "cascade" else model).scoring_config
        assert (scoring.precision, scoring.channels_last) == ("bf16", True), name
        assert (scoring.min_trials, scoring.max_trials, scoring.elimination_p) == (3, 9, 0.02), name
        plain = ModelSource(ServeConfig(model_dir=tmp_path / name), RegistryConfig()).load(source.resolve(None))
        assert (plain.teacher if name == "cascade" else plain).scoring_config.precision == "fp32", name
    assert json.loads((tmp_path / "diffusion" / "model.json").read_text()) == on_disk  # the directory untouched

    monkeypatch.delenv("CYTOLOOP_SCORING__PRECISION")
    monkeypatch.delenv("CYTOLOOP_SCORING__CHANNELS_LAST")
    untouched = ModelSource(ServeConfig(model_dir=tmp_path / "diffusion"), RegistryConfig(), load_settings().scoring)
    assert untouched.load(untouched.resolve(None)).scoring_config.precision == "fp32"  # nothing set: the model's


def test_a_model_saved_after_loading_keeps_its_own_runtime_not_the_machines(tmp_path):
    """A fine-tune loads its challenger in the machine's runtime and saves it again: the saved model.json used to
    carry that machine's precision and layout on to every later machine; it now keeps the model's own, while what
    the loaded model decided (here its temperature) is saved as changed."""
    import json

    from cytoloop.config import DiffusionModelConfig, ScoringConfig
    from cytoloop.models.diffusion import DiffusionClassifier
    from cytoloop.models.loading import load_model

    own = ScoringConfig(min_trials=3, precision="fp32", channels_last=False)
    DiffusionClassifier(
        CLASSES, DataConfig(image_size=16), DiffusionModelConfig(block_out_channels=(8, 16), norm_num_groups=4), own
    ).save(tmp_path / "parent")
    model = load_model(tmp_path / "parent", ScoringConfig(precision="bf16", channels_last=True))
    assert (model.scoring_config.precision, model.scoring_config.channels_last) == ("bf16", True)
    model.temperature = 1.7
    model.save(tmp_path / "child")
    saved = json.loads((tmp_path / "child" / "model.json").read_text())
    assert (saved["scoring"]["precision"], saved["scoring"]["channels_last"]) == ("fp32", False)
    assert saved["scoring"]["min_trials"] == 3 and saved["temperature"] == 1.7


def test_a_rule_setting_the_model_does_not_take_is_said_not_silently_dropped(tmp_path, caplog):
    """CYTOLOOP_SCORING__MAX_TRIALS=40 looked applied to a model and changed nothing: a model scores with its own
    tuned rule. It still does, and the load now says which settings it left aside."""
    from cytoloop.config import DiffusionModelConfig, ScoringConfig
    from cytoloop.models.diffusion import DiffusionClassifier
    from cytoloop.models.loading import load_model

    DiffusionClassifier(
        CLASSES,
        DataConfig(image_size=16),
        DiffusionModelConfig(block_out_channels=(8, 16), norm_num_groups=4),
        ScoringConfig(min_trials=3, max_trials=60),
    ).save(tmp_path / "model")
    with caplog.at_level("WARNING", logger="cytoloop.models.loading"):
        model = load_model(
            tmp_path / "model", ScoringConfig(max_trials=40, precision="bf16", mask_radius=0.5, seed=7, min_trials=3)
        )
    assert model.scoring_config.max_trials == 60 and model.scoring_config.precision == "bf16"
    assert model.scoring_config.seed == ScoringConfig().seed  # its own, as saved
    seed = ScoringConfig().seed
    named = f"scoring.mask_radius 0.5 (its own: {ScoringConfig().mask_radius!r}), scoring.max_trials 40 (its own: 60)"
    assert f"from the settings: {named}, scoring.seed 7 (its own: {seed}) (a new" in caplog.text
    assert "precision" not in caplog.text and "min_trials" not in caplog.text  # a setting equal to its own is no news
    caplog.clear()
    with caplog.at_level("WARNING", logger="cytoloop.models.loading"):  # a config file written whole sets every field
        load_model(tmp_path / "model", ScoringConfig.model_validate(model.scoring_config.model_dump()))
    assert "not applied" not in caplog.text


def test_a_site_with_its_own_classes_gets_only_those_and_shares_the_loaded_model(tmp_path, cells_dir):
    _save(tmp_path / "model", classes=["lymphocyte", "neutrophil", "platelet"])
    source = ModelSource(ServeConfig(model_dir=tmp_path / "model"), RegistryConfig())
    cache = ServiceCache(source, RoutingConfig(review_below=0.0, audit_fraction=0.0))
    everything = LiveModel("a", source, cache)
    reporting = LiveModel("b", source, cache, classes=["lymphocyte", "neutrophil"])
    assert reporting.service is not everything.service and reporting.service.model is everything.service.model
    assert LiveModel("c", source, cache, classes=["lymphocyte", "neutrophil"]).service is reporting.service
    real = sorted((cells_dir / "jtsc").glob("*.bmp"))[:6]
    cells = [(path.name, path.read_bytes()) for path in real]
    full, restricted = everything.service.classify(cells), reporting.service.classify(cells)
    assert len(full) == len(restricted) == 6  # the checks below run over every cell, never over none
    for whole, mine in zip(full, restricted):
        assert isinstance(whole, CellResult) and isinstance(mine, CellResult)
        assert mine.probabilities["platelet"] == 0.0 and mine.label != "platelet"
        kept = whole.probabilities["lymphocyte"] + whole.probabilities["neutrophil"]
        assert mine.probabilities["lymphocyte"] == pytest.approx(whole.probabilities["lymphocyte"] / kept, abs=1e-6)
    assert all(answer.probabilities["platelet"] > 0 for answer in full)  # the other site still sees every class


def test_a_site_whose_classes_its_model_lacks_is_refused_by_name(local_source):
    from cytoloop.errors import UsageError

    source, cache = local_source
    with pytest.raises(UsageError, match=r"platelet .*not classes of the model \(lymphocyte, neutrophil\)"):
        LiveModel("a", source, cache, classes=["lymphocyte", "platelet"])


def test_a_new_version_without_a_site_s_class_leaves_the_site_on_its_old_one(tmp_path):
    from cytoloop.errors import UsageError

    _save(tmp_path / "model", classes=["lymphocyte", "neutrophil", "platelet"])
    source = ModelSource(ServeConfig(model_dir=tmp_path / "model"), RegistryConfig())
    live = LiveModel("b", source, ServiceCache(source, RoutingConfig()), classes=["neutrophil", "platelet"])
    old = live.service
    _save(tmp_path / "model", classes=["lymphocyte", "neutrophil"], seed=3)  # no platelet any more
    with pytest.raises(UsageError, match="platelet"):
        live.refresh()
    assert live.service is old and "cannot decide among this site's classes" in live.fallback


def test_the_registry_address_callers_see_holds_no_credentials():
    """`/v1/models` tells every API-key holder where models come from: without the registry's password."""
    from cytoloop.serving.model_source import without_credentials

    assert without_credentials("postgresql://mlflow:s3cret@db:5432/mlflow") == "postgresql://db:5432/mlflow"
    assert without_credentials("https://token@registry.lab/") == "https://registry.lab/"
    assert without_credentials("postgresql://db/mlflow?user=mlflow&password=s3cret") == "postgresql://db/mlflow"
    assert without_credentials("mysql://db/mlflow?ssl_key=/k#x") == "mysql://db/mlflow"
    assert without_credentials("sqlite:////srv/mlflow.db?mode=ro") == "sqlite:////srv/mlflow.db"
    for plain in ("sqlite:////srv/mlflow.db", "http://127.0.0.1:5000", "file:///srv/mlruns"):
        assert without_credentials(plain) == plain


def test_only_a_site_with_its_own_alias_keeps_its_own_last_known_good_record(tmp_path):
    """Any site name a caller sends is served by the global champion until the site has its own alias; such a
    site must leave no file of its own behind (one per name sent), and must fall back on the global champion's
    last known good version. A site whose own alias is removed falls back on the global one, not its old one."""
    from cytoloop.models.base import MODEL_FILE, WEIGHTS_FILE
    from cytoloop.serving.model_source import ModelRef

    source = ModelSource(ServeConfig(), RegistryConfig(cache_dir=tmp_path / "cache", model_name="cells"))
    for version in ("1", "2"):  # whole in the local cache, as a download leaves them
        folder = tmp_path / "cache" / "cells" / version
        folder.mkdir(parents=True)
        (folder / MODEL_FILE).write_text("{}")
        (folder / WEIGHTS_FILE).write_bytes(b"")
    champion, own = ModelRef("cells", "1", "champion"), ModelRef("cells", "2", "champion-north")
    records = tmp_path / "cache" / "cells" / "last-known-good"

    for name in ("anything", "sent-by-a-caller", "north"):
        source.remember(name, champion)
    assert sorted(p.name for p in records.iterdir()) == ["_global.json"]
    assert source.last_known_good("never-seen") == champion == source.last_known_good(None)

    source.remember("north", own)
    assert source.last_known_good("north") == own and source.last_known_good(None) == champion
    source.remember("north", champion)  # its own alias removed: served by the global champion again
    assert source.last_known_good("north") == champion and not (records / "north.json").exists()


def test_a_version_loading_holds_up_no_other_version_nor_a_reconfigure(local_source, tmp_path):
    """The cache loaded every version under its one lock: while the alias poller downloaded a moved alias's
    version, another site's service, already loaded, and a reconfigure's new thresholds waited for it. Two callers
    of the version being loaded still load it once."""
    import threading

    from cytoloop.serving.model_source import local_ref

    source, cache = local_source
    loaded = cache.get(source.resolve(None))
    _save(tmp_path / "other", seed=3)
    other, started, release, loads = local_ref(tmp_path / "other"), threading.Event(), threading.Event(), []
    load = source.load
    released = []  # whether the load was let go by the main thread (not by the timeout: the main thread waited)

    def slow(ref):
        loads.append(ref.version)
        started.set()
        released.append(release.wait(10))  # loading until the main thread has done its calls
        return load(ref)

    source.load = slow
    held = []  # as a LiveModel holds its service (the cache keeps only what someone holds)
    callers = [threading.Thread(target=lambda: held.append(cache.get(other))) for _ in range(2)]
    for caller in callers:
        caller.start()
    assert started.wait(10)
    assert cache.get(loaded.ref) is loaded
    cache.set_routing(RoutingConfig(review_below=0.5, audit_fraction=0.0))
    release.set()
    for caller in callers:
        caller.join(timeout=60)
    assert not any(caller.is_alive() for caller in callers)
    assert released == [True] and loads == [other.version] and held[0] is held[1]
    assert cache.get(other).routing.review_below == 0.5 and loaded.routing.review_below == 0.5

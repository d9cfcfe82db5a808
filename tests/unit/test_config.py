"""Settings precedence (defaults < JSON file < CYTOLOOP_* environment < explicit overrides) and validation."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from cytoloop.config import Settings, load_settings

pytestmark = pytest.mark.usefixtures("clean_env")  # the developer's own CYTOLOOP_* variables stay out


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "settings.json"
    path.write_text(json.dumps({"scoring": {"max_trials": 50, "check_every": 3}, "train": {"steps": 7}}))
    return path


def test_defaults():
    settings = load_settings()
    assert settings == Settings()
    assert settings.scoring.max_trials == 200


def test_stores_follow_home_unless_set(tmp_path, monkeypatch):
    monkeypatch.setenv("CYTOLOOP_HOME", str(tmp_path / "site"))
    settings = load_settings()
    assert settings.registry.tracking_uri == f"sqlite:///{tmp_path}/site/mlflow/mlflow.db"
    assert settings.registry.cache_dir == tmp_path / "site" / "models"
    assert settings.datasets.cache_dir == tmp_path / "site" / "datasets"
    assert settings.finetune.storage_path == tmp_path / "site" / "ray-train"  # it stayed in the working directory
    chosen = load_settings(overrides={"registry": {"tracking_uri": "http://127.0.0.1:5000", "cache_dir": "m"}})
    assert chosen.registry.tracking_uri == "http://127.0.0.1:5000"
    assert str(chosen.registry.cache_dir) == "m"
    assert chosen.datasets.cache_dir == tmp_path / "site" / "datasets"


def test_file_beats_defaults(config_file):
    settings = load_settings(config_file)
    assert settings.scoring.max_trials == 50
    assert settings.scoring.check_every == 3
    assert settings.scoring.min_trials == 20  # untouched fields keep their defaults
    assert settings.train.steps == 7


def test_env_beats_file(config_file, monkeypatch):
    monkeypatch.setenv("CYTOLOOP_SCORING__MAX_TRIALS", "77")
    settings = load_settings(config_file)
    assert settings.scoring.max_trials == 77
    assert settings.scoring.check_every == 3  # the rest of the file's section survives


def test_overrides_beat_env(config_file, monkeypatch):
    monkeypatch.setenv("CYTOLOOP_SCORING__MAX_TRIALS", "77")
    monkeypatch.setenv("CYTOLOOP_TRAIN__STEPS", "11")
    settings = load_settings(config_file, overrides={"scoring": {"max_trials": 99}})
    assert settings.scoring.max_trials == 99
    assert settings.train.steps == 11
    assert settings.scoring.check_every == 3


def test_env_validated_together_with_file(tmp_path, monkeypatch):
    path = tmp_path / "small.json"
    path.write_text(json.dumps({"scoring": {"min_trials": 4, "max_trials": 8}}))
    monkeypatch.setenv("CYTOLOOP_SCORING__MAX_TRIALS", "6")
    settings = load_settings(path)
    assert (settings.scoring.min_trials, settings.scoring.max_trials) == (4, 6)


def test_a_damaged_settings_file_is_a_usage_error_naming_it(tmp_path):
    """A typo in the JSON used to end every command in a JSONDecodeError traceback (exit 1, "a bug")."""
    from cytoloop.errors import UsageError

    broken, listed = tmp_path / "broken.json", tmp_path / "list.json"
    broken.write_text('{"train": {"steps": 5,}}')
    listed.write_text("[1, 2]")
    with pytest.raises(UsageError, match=r"broken.json is not valid JSON: .*line 1 column 23"):
        load_settings(broken)
    with pytest.raises(UsageError, match="list.json must hold a JSON object, got list"):
        load_settings(listed)
    with pytest.raises(UsageError, match="missing.json not found"):
        load_settings(tmp_path / "missing.json")


def test_invalid_env_value_names_field(monkeypatch):
    monkeypatch.setenv("CYTOLOOP_TRAIN__STEPS", "many")
    with pytest.raises(ValidationError) as error:
        load_settings()
    assert "steps" in str(error.value)


def test_invalid_override_names_field():
    with pytest.raises(ValidationError) as error:
        load_settings(overrides={"train": {"batch_size": 0}})
    assert any(e["loc"][-1] == "batch_size" for e in error.value.errors())
    assert "batch_size" in str(error.value)


def test_invalid_file_value_names_field(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"data": {"stain_normalization": "magic"}}))
    with pytest.raises(ValidationError, match="stain_normalization"):
        load_settings(path)


def test_unknown_field_rejected():
    with pytest.raises(ValidationError, match="max_trails"):
        load_settings(overrides={"scoring": {"max_trails": 5}})


def test_cross_field_check_names_field():
    with pytest.raises(ValidationError, match="max_trials"):
        load_settings(overrides={"scoring": {"min_trials": 10, "max_trials": 5}})


def test_serving_beyond_this_machine_needs_an_api_key(clean_env):
    from pydantic import ValidationError

    from cytoloop.config import ServeConfig

    for host in ("127.0.0.1", "localhost", "::1"):
        assert ServeConfig(host=host).api_key is None  # loopback: only this machine can connect
    for host in ("0.0.0.0", "10.1.2.3", "classifier.lab.example"):
        with pytest.raises(ValidationError, match="set an API key"):
            ServeConfig(host=host)
        assert ServeConfig(host=host, api_key="k" * 32).host == host
        assert ServeConfig(host=host, insecure=True).insecure  # said explicitly


def test_an_address_that_is_neither_ip_nor_host_name_is_named_as_such():
    """`serve --host 'not a host'` was answered with the API-key rule (not loopback, so a key is needed), which
    sent the user after the wrong problem; every interface setting is an address or a host name."""
    from cytoloop.config import ServeConfig, StackConfig

    for bad in ("not a host", "host_name", "-lab.example", "lab..example", "http://lab.example", ""):
        with pytest.raises(ValidationError, match="is not an IP address or host name") as error:
            ServeConfig(host=bad, insecure=True)
        assert "API key" not in str(error.value)
        for field in ("host", "ray_host"):
            with pytest.raises(ValidationError, match=f"{field}\n.*is not an IP address"):
                StackConfig(**{field: bad})
        with pytest.raises(ValidationError, match="webhook_host"):
            load_settings(overrides={"review": {"webhook_host": bad}})
    for good in ("0.0.0.0", "classifier-1.lab.example", "localhost", "10.0.0.7"):
        assert StackConfig(host=good, ray_host=good).host == good
    for good in ("::", "fe80::1"):
        assert ServeConfig(host=good, insecure=True).host == good  # Serve's proxy binds IPv6
        # the stack's services are started, probed and reached over IPv4: `up` failed on the address family
        for field in ("host", "ray_host"):
            with pytest.raises(ValidationError, match=f"{field}\n.*is an IPv6 address"):
                StackConfig(**{field: good})


def test_a_site_s_classes_come_from_the_environment_and_are_checked(monkeypatch):
    monkeypatch.setenv("CYTOLOOP_SITES", json.dumps({"st-marys": {"classes": ["neutrophil", "lymphocyte"]}}))
    settings = load_settings()
    assert settings.site_classes("st-marys") == ["neutrophil", "lymphocyte"]
    assert settings.site_classes("elsewhere") is None and settings.site_classes(None) is None
    with pytest.raises(ValidationError, match="invalid site name 'st marys'"):
        load_settings(overrides={"sites": {"st marys": {}}})
    with pytest.raises(ValidationError, match="invalid site name 'global' in sites: 'global' names the global"):
        load_settings(overrides={"sites": {"global": {}}})  # its versions passed for the global model's
    with pytest.raises(ValidationError, match="names a class twice"):
        load_settings(overrides={"sites": {"a": {"classes": ["neutrophil", "neutrophil"]}}})
    with pytest.raises(ValidationError, match="classes"):
        load_settings(overrides={"sites": {"a": {"classes": []}}})

"""Registry faults against a real MLflow registry (SQLite): the shared model cache holds a version whole or not
at all, and a registry that cannot answer is never read as 'this site has no alias'."""

from __future__ import annotations

import threading

import numpy as np
import pytest

pytestmark = pytest.mark.integration


@pytest.fixture
def registered(tmp_path, tiny_settings):
    from cytoloop.models.baseline import BaselineClassifier
    from cytoloop.registry import Registry

    model_dir = tmp_path / "model"
    BaselineClassifier(["a", "b"], tiny_settings.data, tiny_settings.baseline).save(model_dir)
    registry = Registry(f"sqlite:///{tmp_path / 'mlflow.db'}", "faults")
    version = registry.log_model(model_dir, "cells", tags={"kind": "baseline"})
    return registry, version.version, tmp_path / "cache"


def test_an_interrupted_download_leaves_no_half_model_in_the_cache(registered, monkeypatch):
    from cytoloop.models.base import WEIGHTS_FILE

    registry, version, cache = registered
    real_download = registry.download

    def dropped_connection(name, version, destination):
        path = real_download(name, version, destination)
        (path / WEIGHTS_FILE).unlink()  # the connection dropped before the weights arrived
        raise OSError("connection reset by peer")

    monkeypatch.setattr(registry, "download", dropped_connection)
    with pytest.raises(OSError, match="connection reset"):
        registry.load("cells", version, cache)
    assert list((cache / "cells").iterdir()) == []  # neither the version nor its staging folder
    monkeypatch.setattr(registry, "download", real_download)
    model = registry.load("cells", version, cache)  # the next replica downloads it again, whole
    assert model.predict(np.zeros((1, 3, 16, 16), np.float32)).probs.shape == (1, 2)


def test_replicas_downloading_at_once_share_one_whole_copy(registered):
    registry, version, cache = registered
    start, loaded, errors = threading.Barrier(3), [], []

    def replica() -> None:
        start.wait()
        try:
            loaded.append(registry.load("cells", version, cache))
        except Exception as error:  # noqa: BLE001 - collected for the assertion below
            errors.append(error)

    threads = [threading.Thread(target=replica) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors and len(loaded) == 3
    assert [p.name for p in (cache / "cells").iterdir()] == [version]


def test_a_locked_registry_is_no_reason_to_serve_another_model(registered, tmp_path, monkeypatch):
    """SQLite's 'database is locked' on the site alias lookup used to read as 'no site alias', so the site was
    served (and a site challenger gated against) the global champion. The lock is real: another connection holds
    the database exclusively while MLflow looks up champion-north (MLflow gives up after its 20 s busy timeout)."""
    import sqlite3

    from cytoloop.registry import RegistryUnavailable

    registry, version, _ = registered
    registry.move_alias("cells", "champion", version, why="the first champion")
    real_lookup = registry.client.get_model_version_by_alias
    asked: list[str] = []

    def locked_once(name: str, alias: str):
        asked.append(alias)
        if len(asked) > 1:
            return real_lookup(name, alias)
        lock = sqlite3.connect(tmp_path / "mlflow.db", isolation_level=None)
        lock.execute("BEGIN EXCLUSIVE")
        try:
            return real_lookup(name, alias)
        finally:
            lock.execute("ROLLBACK")
            lock.close()

    monkeypatch.setattr(registry.client, "get_model_version_by_alias", locked_once)
    with pytest.raises(RegistryUnavailable, match="could not answer"):
        registry.for_site("cells", "north")
    assert asked == ["champion-north"]  # it did not fall back to the global champion
    assert registry.for_site("cells", "north").version == version  # answered: no site alias, so the champion


def test_register_replaces_a_champion_only_as_a_recorded_override(tmp_path, tiny_settings):
    from typer.testing import CliRunner

    from cytoloop.models.baseline import BaselineClassifier
    from ops.cli import app

    model_dir = tmp_path / "model"
    BaselineClassifier(["a", "b"], tiny_settings.data, tiny_settings.baseline).save(model_dir)
    env = {"CYTOLOOP_HOME": str(tmp_path / "home")}

    def register(*extra: str):
        return CliRunner().invoke(app, ["register", str(model_dir), "--champion", "--reason", "test", *extra], env=env)

    first = register()
    assert first.exit_code == 0 and "@champion: v- -> v1 (first, by " in first.stdout
    refused = register()
    assert refused.exit_code == 2 and "already points at v1" in refused.stderr and "--override" in refused.stderr
    forced = register("--override")
    assert forced.exit_code == 0 and "@champion: v1 -> v2 (override, by " in forced.stdout  # refused: nothing kept

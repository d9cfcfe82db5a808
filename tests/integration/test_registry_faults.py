"""Registry faults against a real MLflow registry (SQLite): the shared model cache holds a version whole or not
at all, and a registry that cannot answer is never read as 'this site has no alias'."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

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


# A replica's download in its own process that stops before the weights arrive, to be killed there.
DOWNLOAD_THEN_HANG = """
import sys, time
from pathlib import Path
from mlflow.store.artifact.local_artifact_repo import LocalArtifactRepository
from cytoloop.registry import Registry

real_download_file = LocalArtifactRepository._download_file

def hang_before_the_weights(self, remote_file_path, local_path):
    if Path(remote_file_path).name == "weights.pt":
        print("downloading the weights", flush=True)
        time.sleep(600)
    return real_download_file(self, remote_file_path, local_path)

LocalArtifactRepository._download_file = hang_before_the_weights
Registry(sys.argv[1], "faults").load("cells", sys.argv[2], Path(sys.argv[3]))
"""


def test_a_replica_killed_mid_download_leaves_no_half_model_in_the_cache(registered):
    """SIGKILL (no `finally`, no cleanup) while a replica downloads a version: the cache must not hold that version
    at all, and the next load on the host downloads it whole and removes the dead replica's private folder."""
    from tests.integration.conftest import kill_when_it_says

    registry, version, cache = registered
    pid = kill_when_it_says(DOWNLOAD_THEN_HANG, [registry.tracking_uri, version, str(cache)], "downloading the weights")

    [left] = (cache / "cells").iterdir()  # the killed replica's half download, in its private folder
    assert left.name.startswith(f".{version}.partial-")
    assert not any(left.rglob("weights.pt"))  # (the other files download beside it, in threads: may be there)
    # a cache shared by several hosts: another host's download (its process id means nothing here) is left alone
    elsewhere = cache / "cells" / f".{version}.partial-another-host~{pid}~x"
    elsewhere.mkdir()
    model = registry.load("cells", version, cache)  # the next replica downloads it again, whole
    assert model.predict(np.zeros((1, 3, 16, 16), np.float32)).probs.shape == (1, 2)
    assert sorted(p.name for p in (cache / "cells").iterdir()) == sorted([version, elsewhere.name])


def test_a_registered_version_without_its_weights_is_refused_and_nothing_is_cached(registered):
    """A damaged artifact store (the weights file gone): the download completes without them, the load is refused
    naming the version, and neither the version nor the private download folder stays in the cache."""
    from cytoloop.registry import RegistryError

    registry, version, cache = registered
    [weights] = (cache.parent / "artifacts").rglob("weights.pt")  # the SQLite store's artifacts, beside its db
    weights.unlink()
    with pytest.raises(RegistryError, match=f"cells v{version}: .*no complete model"):
        registry.load("cells", version, cache)
    assert list((cache / "cells").iterdir()) == []


def test_a_version_number_that_now_names_another_model_is_not_served_from_the_cache(registered, tiny_settings):
    """The registered model is deleted and made again (a registry reset, a name reused): its version 1 is another
    model, and the cache's copy of the old version 1 used to be served as it, by a new replica from disk and by a
    replica already serving it from memory."""
    from cytoloop.config import RegistryConfig, RoutingConfig, ServeConfig
    from cytoloop.models.baseline import BaselineClassifier
    from cytoloop.serving.live import LiveModel, ServiceCache
    from cytoloop.serving.model_source import ModelSource

    registry, version, cache = registered
    registry.set_alias("cells", "champion", version)
    source = ModelSource(
        ServeConfig(), RegistryConfig(tracking_uri=registry.tracking_uri, cache_dir=cache, model_name="cells")
    )
    live = LiveModel(None, source, ServiceCache(source, RoutingConfig()))
    assert live.service.classes == ["a", "b"] and registry.load("cells", version, cache).classes == ["a", "b"]
    registry.client.delete_registered_model("cells")
    other = cache.parent / "other"
    BaselineClassifier(["x", "y", "z"], tiny_settings.data, tiny_settings.baseline).save(other)
    assert registry.log_model(other, "cells").version == version  # the same name and number, another model
    registry.set_alias("cells", "champion", version)
    assert live.refresh() and live.service.classes == ["x", "y", "z"]  # the replica already up switches too
    assert registry.load("cells", version, cache).classes == ["x", "y", "z"]
    kept = sorted(p.name for p in (cache / "cells").iterdir())
    assert kept == sorted([version, "last-known-good"])  # the old copy is gone, not set aside


def test_a_site_on_the_global_champion_s_version_shares_its_loaded_model(registered):
    """`champion-x` on the version `champion` points at (a site's promote, or its alias set back by hand): the
    replica holding both loaded that version twice, keyed by the alias that chose it (twice the memory, on a GPU
    perhaps more than there is)."""
    from cytoloop.config import RegistryConfig, RoutingConfig, ServeConfig
    from cytoloop.serving.live import LiveModel, ServiceCache
    from cytoloop.serving.model_source import ModelSource

    registry, version, cache = registered
    registry.set_alias("cells", "champion", version)
    registry.set_alias("cells", "champion-x", version)
    source = ModelSource(
        ServeConfig(), RegistryConfig(tracking_uri=registry.tracking_uri, cache_dir=cache, model_name="cells")
    )
    loads = []
    load = source.load
    source.load = lambda ref: loads.append(ref) or load(ref)
    services = ServiceCache(source, RoutingConfig())
    north, x = LiveModel(None, source, services), LiveModel("x", source, services)
    assert (north.service.ref.alias, x.service.ref.alias) == ("champion", "champion-x")  # each says what chose it
    assert north.service.model is x.service.model and len(loads) == 1


def test_a_version_rolled_back_while_a_replica_loads_it_is_not_recorded_as_last_known_good(registered):
    """A replica resolved v2 and spent a while loading it; v2 was rolled back meanwhile and the other replicas
    recorded v1. The slow replica then recorded v2, and a replica starting while the registry was down served the
    rolled-back model. The rollback happens here during the load."""
    from cytoloop.config import RegistryConfig, RoutingConfig, ServeConfig
    from cytoloop.serving.live import LiveModel, ServiceCache
    from cytoloop.serving.model_source import ModelSource

    registry, v1, cache = registered
    v2 = registry.log_model(cache.parent / "model", "cells", tags={"kind": "baseline"}).version
    registry.set_alias("cells", "champion", v1)
    source = ModelSource(
        ServeConfig(), RegistryConfig(tracking_uri=registry.tracking_uri, cache_dir=cache, model_name="cells")
    )
    services = ServiceCache(source, RoutingConfig())
    live = LiveModel(None, source, services)
    assert source.last_known_good(None).version == v1
    load = services.get

    def rolled_back_while_loading(ref, **kwargs):
        loaded = load(ref, **kwargs)
        registry.set_alias("cells", "champion", v1)  # the rollback, while this replica loads v2
        return loaded

    services.get = rolled_back_while_loading
    registry.set_alias("cells", "champion", v2)
    assert live.refresh() and live.service.ref.version == v2  # served until its next refresh
    assert source.last_known_good(None).version == v1  # but not recorded: v1 is what serves
    services.get = load
    assert live.refresh() and live.service.ref.version == v1


def test_a_cached_version_whose_run_the_caller_knows_loads_without_the_registry(registered, monkeypatch):
    """Serving resolves the alias (and with it the version's run) first; the load that follows must not need the
    registry again, or a blip between the two fails a replica whose model is whole on disk."""
    from cytoloop.registry import Registry

    registry, version, cache = registered
    run_id = registry.version("cells", version).run_id
    registry.load("cells", version, cache)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with socket.socket() as closed:  # a registry server that is down: nothing listens on its port
        closed.bind(("127.0.0.1", 0))
        down = Registry(f"http://127.0.0.1:{closed.getsockname()[1]}", "faults")
    assert down.load("cells", version, cache, run_id=run_id).classes == ["a", "b"]


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


def test_a_registry_that_cannot_answer_a_tag_or_a_listing_says_so(registered, monkeypatch):
    """Writing a version's tags (a verdict, an override's reason) and listing versions went to MLflow directly: its
    'database is locked' (what SQLite gives a busy registry, raised by MLflow as below) ended `cytoloop promote` and
    the fine-tune job in a traceback instead of the registry's error that they answer with exit code 2."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import TEMPORARILY_UNAVAILABLE

    from cytoloop.registry import RegistryUnavailable

    registry, version, _ = registered

    def busy(*args, **kwargs):
        raise MlflowException("(sqlite3.OperationalError) database is locked", error_code=TEMPORARILY_UNAVAILABLE)

    monkeypatch.setattr(registry.client, "set_model_version_tag", busy)
    monkeypatch.setattr(registry.client, "search_model_versions", busy)
    with pytest.raises(RegistryUnavailable, match=f"cells v{version}: the registry could not answer"):
        registry.set_tags("cells", version, {"gate.verdict": "pass"})
    with pytest.raises(RegistryUnavailable, match="cells: the registry could not answer"):
        registry.versions("cells")


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
    assert first.exit_code == 0 and "@champion: - -> v1 (first, by " in first.stdout
    refused = register()
    assert refused.exit_code == 2 and "already points at v1" in refused.stderr and "--override" in refused.stderr
    forced = register("--override")
    assert forced.exit_code == 0 and "@champion: v1 -> v2 (override, by " in forced.stdout  # refused: nothing kept


@pytest.fixture
def three_versions(tmp_path, tiny_settings):
    """A registry with an audit log (so alias moves take its lock), three versions and v1 the champion."""
    from cytoloop.models.baseline import BaselineClassifier
    from cytoloop.registry import Registry

    model_dir = tmp_path / "model"
    BaselineClassifier(["a", "b"], tiny_settings.data, tiny_settings.baseline).save(model_dir)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    registry = Registry(uri, "faults", audit_log=tmp_path / "home" / "registry" / "alias-moves.jsonl")
    versions = [registry.log_model(model_dir, "cells").version for _ in range(3)]
    registry.move_alias("cells", "champion", versions[0], why="first", action="first")
    return registry, versions, uri


def test_two_gates_judged_against_one_champion_promote_only_one(three_versions):
    """Two challengers pass their gates against v1 at the same moment: the alias moves once, the second finds the
    champion moved (AliasMoved) and the trail records exactly the move that happened."""
    from cytoloop.policy.promotion import GateVerdict, apply_verdict
    from cytoloop.registry import AliasMoved, Registry

    registry, (v1, v2, v3), uri = three_versions
    start = threading.Barrier(2)
    won, lost = [], []

    def gate(version: str) -> None:
        own = Registry(uri, "faults", audit_log=registry.audit_log)  # each job has its own client, as in Ray
        verdict = GateVerdict(passed=True, reasons=["better"], challenger={}, champion={}, champion_version=v1)
        start.wait()
        try:
            won.append(apply_verdict(own, "cells", version, "champion", verdict).to_version)
        except AliasMoved:
            lost.append(version)

    threads = [threading.Thread(target=gate, args=(v,)) for v in (v2, v3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(lost) == 1
    assert registry.alias_version("cells", "champion") == won[0]
    gates = [m for m in registry.alias_history("cells", "champion") if m.action == "gate"]
    assert [(m.from_version, m.to_version) for m in gates] == [(v1, won[0])]


_CRASH_MID_MOVE = """
import os, sys
from cytoloop.registry import Registry
registry = Registry(sys.argv[1], "faults", audit_log=sys.argv[2])
real = registry.set_alias if sys.argv[4] == "after" else None
def set_alias(name, alias, version):
    if real is not None:
        real(name, alias, version)
    os._exit(9)  # the process dies mid-move: before the alias moved, or after it but before the record says done
registry.set_alias = set_alias
registry.move_alias("cells", "champion", sys.argv[3], why="dies mid-move")
"""


@pytest.mark.parametrize("when", ["before", "after"])
def test_a_move_killed_midway_leaves_a_trail_that_tells_the_truth(three_versions, when):
    """A process killed between writing its intent and finishing the move: the trail counts the move exactly when
    the alias really moved, and a rollback afterwards goes to the right version."""

    registry, (v1, v2, v3), uri = three_versions
    registry.move_alias("cells", "champion", v2, why="second")
    died = subprocess.run(
        [sys.executable, "-c", _CRASH_MID_MOVE, uri, str(registry.audit_log), v3, when], capture_output=True
    )
    assert died.returncode == 9, died.stderr.decode()
    live = registry.alias_version("cells", "champion")
    assert live == (v3 if when == "after" else v2)
    assert [m.to_version for m in registry.alias_history("cells", "champion")] == [v1, v2] + (
        [v3] if when == "after" else []
    )
    back = registry.rollback("cells", "champion", why="undo")
    assert (back.from_version, back.to_version) == ((v3, v2) if when == "after" else (v2, v1))


def test_a_rollback_retried_after_it_went_through_goes_back_no_further(three_versions, monkeypatch):
    """The registry moved the alias, then could not take the record's 'done' mark (MLflow's 'database is locked',
    as it raises it): the rollback raised as if nothing had moved, and the operator's retry went back a second move,
    v3 -> v2 -> v1. The move is reported as made now, and a retry naming the version it rolls back moves nothing."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import TEMPORARILY_UNAVAILABLE

    from cytoloop.registry import AliasMoved

    registry, (v1, v2, v3), _ = three_versions
    registry.move_alias("cells", "champion", v2, why="second")
    registry.move_alias("cells", "champion", v3, why="third")
    real_tag, written = registry.client.set_registered_model_tag, []

    def done_mark_fails(name, key, value):
        written.append(value)
        if '"state": "done"' in value:
            raise MlflowException("(sqlite3.OperationalError) database is locked", error_code=TEMPORARILY_UNAVAILABLE)
        return real_tag(name, key, value)

    monkeypatch.setattr(registry.client, "set_registered_model_tag", done_mark_fails)
    back = registry.rollback("cells", "champion", why="worse on the ward", expect=v3)
    monkeypatch.undo()
    assert (back.from_version, back.to_version) == (v3, v2) and len(written) == 2
    assert registry.alias_version("cells", "champion") == v2
    assert [m.to_version for m in registry.alias_history("cells", "champion")] == [v1, v2, v3, v2]
    with pytest.raises(AliasMoved, match=f"v{v3} was to be rolled back, but v{v2} serves it now; nothing was moved"):
        registry.rollback("cells", "champion", why="worse on the ward", expect=v3)
    assert registry.alias_version("cells", "champion") == v2
    lines = registry.audit_log.read_text().splitlines()
    assert json.loads(lines[-1])["to_version"] == v2 and len(lines) == 4


def test_two_rollbacks_of_one_version_at_once_go_back_one_move(three_versions, monkeypatch):
    """Two operators roll back v3 at once (`--from 3` each): the second's check of v3 came before the first's move,
    and it went on from the trail the first had just ended at v2, to v1. Its version is checked again where the
    alias moves, under the lock."""
    from cytoloop.registry import AliasMoved, Registry

    registry, (v1, v2, v3), uri = three_versions
    registry.move_alias("cells", "champion", v2, why="second")
    registry.move_alias("cells", "champion", v3, why="third")
    colleague = Registry(uri, "faults", audit_log=registry.audit_log)
    real_history, theirs = registry.alias_history, []

    def colleague_first(name, alias=None):  # the colleague's rollback lands between my check and my move
        if not theirs:
            theirs.append(colleague.rollback("cells", "champion", why="worse on the ward", expect=v3))
        return real_history(name, alias)

    monkeypatch.setattr(registry, "alias_history", colleague_first)
    with pytest.raises(AliasMoved, match="nothing was moved"):
        registry.rollback("cells", "champion", why="worse on the ward", expect=v3)
    assert theirs[0].to_version == v2 and registry.alias_version("cells", "champion") == v2


def test_a_mover_whose_clock_is_behind_still_records_its_move_after_the_last(three_versions, monkeypatch):
    """The trail is ordered by its moves' times, taken from each mover's clock: a host behind recorded its move, made
    after another's, before it, and `rollback` found the trail ending at v2 with v3 serving. The lock orders the
    moves, and the trail follows it."""
    from datetime import UTC, datetime, timedelta

    import cytoloop.registry

    registry, (v1, v2, v3), _ = three_versions
    registry.move_alias("cells", "champion", v2, why="on a host whose clock is right")

    class Behind(datetime):
        @classmethod
        def now(cls, tz=None):
            return datetime.now(tz or UTC) - timedelta(hours=1)

    monkeypatch.setattr(cytoloop.registry, "datetime", Behind)
    registry.move_alias("cells", "champion", v3, why="on a host an hour behind")
    monkeypatch.undo()
    assert [m.to_version for m in registry.alias_history("cells", "champion")] == [v1, v2, v3]
    back = registry.rollback("cells", "champion", why="undo")
    assert (back.from_version, back.to_version) == (v3, v2)


def test_rollback_refuses_when_the_alias_was_moved_outside_the_trail(three_versions):
    from cytoloop.registry import RegistryError

    registry, (v1, v2, v3), _ = three_versions
    registry.move_alias("cells", "champion", v2, why="second")
    registry.client.set_registered_model_alias("cells", "champion", v3)  # by hand, in the MLflow UI say
    with pytest.raises(RegistryError, match=f"trail ends at v{v2} but the alias points at v{v3}"):
        registry.rollback("cells", "champion", why="undo")
    assert registry.alias_version("cells", "champion") == v3  # nothing moved on an untrusted record


def test_rollback_goes_back_to_what_served_before_even_if_set_outside_the_trail(three_versions):
    """v1 -> v2 by CytoLoop, v3 set by hand, then v3 -> v1 by CytoLoop: undoing the last move restores v3, what
    served before it (the rollback went to v2, the trail's top before the hand-made move)."""
    registry, (v1, v2, v3), _ = three_versions
    registry.move_alias("cells", "champion", v2, why="second")
    registry.client.set_registered_model_alias("cells", "champion", v3)  # by hand, in the MLflow UI say
    registry.move_alias("cells", "champion", v1, why="third, through CytoLoop again")
    back = registry.rollback("cells", "champion", why="undo")
    assert (back.from_version, back.to_version) == (v1, v3) and registry.alias_version("cells", "champion") == v3


def test_rollback_after_a_repeated_promotion_goes_back_to_the_version_before(three_versions):
    """v1 -> v2, then v2 promoted again (a command repeated after a timeout): the second move changed nothing, so a
    rollback goes to v1. It went from v2 to v2, reported success and left v2 serving."""
    registry, (v1, v2, _), _ = three_versions
    registry.move_alias("cells", "champion", v2, why="second")
    registry.move_alias("cells", "champion", v2, why="second, again")
    back = registry.rollback("cells", "champion", why="undo")
    assert (back.from_version, back.to_version) == (v2, v1) and registry.alias_version("cells", "champion") == v1
    # a trail that holds such a rollback, recorded before the fix (v2 -> v2): no step, not a move outside the trail
    registry.move_alias("cells", "champion", v2, why="second once more")
    registry.move_alias("cells", "champion", v2, why="the old rollback's record", action="rollback")
    again = registry.rollback("cells", "champion", why="undo, now")
    assert (again.from_version, again.to_version) == (v2, v1)


def test_a_sites_first_model_rolls_back_to_the_global_champion(three_versions):
    """A site's first adapted model (its alias moved from unset) is bad: rolling back removes the site's alias, so
    the global champion serves the site again (it said there was no earlier version). A later model of the site
    rolls back to unset again, never to the model rolled back before; the global champion is never removed."""
    from cytoloop.registry import RegistryError, UsageError

    registry, (v1, v2, v3), _ = three_versions
    registry.move_alias("cells", "champion-s", v2, why="adapted", action="gate", expect=v1)
    back = registry.rollback("cells", "champion-s", why="worse on the ward")
    assert (back.from_version, back.to_version) == (v2, None)
    assert registry.alias_version("cells", "champion-s") is None
    assert registry.serving_version("cells", "champion-s") == v1
    assert back.arrow() == f"@champion-s: v{v2} -> - (the global champion serves the site)"
    with pytest.raises(RegistryError, match="no earlier version"):
        registry.rollback("cells", "champion-s", why="again")

    registry.move_alias("cells", "champion-s", v3, why="adapted again", action="gate", expect=v1)
    assert registry.rollback("cells", "champion-s", why="undo").to_version is None
    assert registry.serving_version("cells", "champion-s") == v1
    # the site's alias removed by hand, set again by CytoLoop, rolled back to unset, rolled back once more: the
    # compare-and-set read the unset alias as the global champion and refused (AliasMoved)
    registry.move_alias("cells", "champion-s", v2, why="adapted", action="gate", expect=v1)
    registry.client.delete_registered_model_alias("cells", "champion-s")  # by hand
    registry.move_alias("cells", "champion-s", v3, why="adapted again", action="gate", expect=v1)
    assert registry.rollback("cells", "champion-s", why="undo").to_version is None
    assert registry.rollback("cells", "champion-s", why="undo the hand's removal").to_version == v2
    with pytest.raises(UsageError, match="only a site's champion alias"):
        registry.move_alias("cells", "champion", None, why="remove it")
    with pytest.raises(RegistryError, match="no earlier version"):
        registry.rollback("cells", "champion", why="before the first")
    assert registry.alias_version("cells", "champion") == v1


_NEW_REPLICA = """
import json, sys
from cytoloop.config import RegistryConfig, ServeConfig
from cytoloop.serving.live import LiveModel, ServiceCache
from cytoloop.serving.model_source import ModelSource
from cytoloop.config import RoutingConfig
source = ModelSource(ServeConfig(), RegistryConfig(tracking_uri=sys.argv[1], cache_dir=sys.argv[2], model_name="cells"))
try:
    live = LiveModel(None, source, ServiceCache(source, RoutingConfig()))
    print(json.dumps({"version": live.service.ref.version, "fallback": live.fallback}))
except Exception as error:
    print(json.dumps({"error": type(error).__name__}))
"""


def test_a_new_replica_serves_the_last_known_good_version_when_the_current_one_cannot_be_had(three_versions):
    """A new replica (a new process) whose champion has corrupt weights, or whose registry cannot be opened, serves
    the version last served on this host, saying why; a champion withdrawn on purpose is not replaced by it."""

    from cytoloop.config import RegistryConfig, RoutingConfig, ServeConfig
    from cytoloop.models.base import WEIGHTS_FILE, ModelLoadError
    from cytoloop.serving.live import LiveModel, ServiceCache
    from cytoloop.serving.model_source import ModelSource
    from cytoloop.serving.pyfunc import cytoloop_directory

    registry, (v1, v2, v3), uri = three_versions
    cache = registry.audit_log.parent.parent / "models"

    def new_replica(registry_uri: str = uri) -> dict:
        env = {**os.environ, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}  # MLflow's own retries would take minutes
        command = [sys.executable, "-c", _NEW_REPLICA, registry_uri, str(cache)]
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout.strip().splitlines()[-1])

    assert new_replica() == {"version": v1, "fallback": None}  # served once: v1 is this host's last known good

    good = registry.audit_log.parent.parent / "good"
    shutil.copytree(cytoloop_directory(registry.download("cells", v1, good / "dl")), good / "model")
    v4 = registry.log_model(good / "model", "cells").version
    stored = Path(uri[len("sqlite:///") :]).parent / "artifacts"  # the artifact store, as S3 or a disk holds it
    model_id = registry.client.get_model_version("cells", v4).source.rsplit("/", 1)[-1]  # models:/m-...
    [weights] = [p for p in stored.rglob(WEIGHTS_FILE) if model_id in str(p)]
    weights.write_bytes(b"not a torch file")  # corrupted in storage after registration (a partial upload, rot)
    registry.move_alias("cells", "champion", v4, why="a bad upload")
    answer = new_replica()
    assert answer["version"] == v1 and f"version {v4} could not be loaded" in answer["fallback"]

    settings = RegistryConfig(tracking_uri=uri, cache_dir=cache, model_name="cells")
    source = ModelSource(ServeConfig(), settings)
    live = LiveModel(None, source, ServiceCache(source, RoutingConfig()))  # a replica already up: same fallback
    north = LiveModel("north", source, ServiceCache(source, RoutingConfig()))  # no alias of its own: the global one
    assert live.service.ref.version == v1 and live.fallback is not None
    registry.rollback("cells", "champion", why="undo the bad upload")
    assert live.refresh() and live.fallback is None and live.service.ref.version == v1  # current again

    with socket.socket() as closed:  # a registry server that is down: nothing listens on its port
        closed.bind(("127.0.0.1", 0))
        down = f"http://127.0.0.1:{closed.getsockname()[1]}"
    answer = new_replica(down)
    assert answer["version"] == v1 and "registry could not be read" in answer["fallback"]

    registry.client.delete_registered_model_alias("cells", "champion")  # withdrawn on purpose: nothing to serve
    from cytoloop.registry import NotRegistered
    from cytoloop.serving.model_source import ModelRef

    assert source.last_known_good(None) is not None
    with pytest.raises(NotRegistered):  # a site served by the global champion finds it withdrawn first
        north.refresh()
    assert source.last_known_good(None) is None and source.last_known_good("any-site") is None
    source.remember(None, ModelRef("cells", v1, "champion"))  # as a replica that served it before would have left
    assert new_replica() == {"error": "NotRegistered"}
    assert source.last_known_good(None) is None  # a new replica finding the champion withdrawn forgets it too
    # the replica already serving it stops too (it kept answering with the withdrawn version), until one is back
    with pytest.raises(NotRegistered):
        live.refresh()
    with pytest.raises(NotRegistered):
        live.service  # noqa: B018 - the property raises
    assert source.last_known_good(None) is None  # nor does a replica started while the registry is down serve it
    registry.move_alias("cells", "champion", v4, why="a champion again, but its upload is corrupt")
    with pytest.raises(ModelLoadError, match="its weights file is damaged or not PyTorch's"):
        live.refresh()
    with pytest.raises(NotRegistered):  # the withdrawn version is not served again as a fallback
        live.service  # noqa: B018 - the property raises
    registry.move_alias("cells", "champion", v2, why="a champion again")
    assert live.refresh() and live.service.ref.version == v2 and live.fallback is None


def test_a_registered_version_is_a_real_mlflow_model(registered, cells_dir):
    """`mlflow.pyfunc.load_model("models:/…@champion")` predicts on a batch of real cells, with the signature and
    input example MLflow shows; the same answers as the library's model."""
    import base64

    import mlflow
    import pandas as pd

    from cytoloop.data.preprocess import preprocess
    from cytoloop.data.records import load_records

    registry, version, cache = registered
    registry.set_alias("cells", "champion", version)
    pyfunc = mlflow.pyfunc.load_model("models:/cells@champion")
    paths = [r.path for r in load_records(cells_dir)[:5]]
    frame = pd.DataFrame({"image": [base64.b64encode(p.read_bytes()).decode() for p in paths]})
    answer = pyfunc.predict(frame)
    assert list(answer.columns) == ["label", "confidence", "anomaly", "p_a", "p_b"] and len(answer) == 5
    assert [i.name for i in pyfunc.metadata.get_input_schema().inputs] == ["image"]
    library = registry.load("cells", version, cache)
    expected = library.predict(np.stack([preprocess(p, library.data_config) for p in paths]))
    assert np.allclose(answer[["p_a", "p_b"]].to_numpy(), expected.probs, atol=1e-6)
    with pytest.raises(Exception, match="the input has no rows"):  # not a stacking error from numpy
        pyfunc.predict(frame.iloc[:0])
    # checked at intake as the service checks an upload: a GIF was classified, an EPS handed to Ghostscript
    import io

    from PIL import Image

    gif = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 170, 190)).save(gif, format="GIF")
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n"
    for row, why in (
        (base64.b64encode(gif.getvalue()).decode(), "not an image in an accepted format"),
        (base64.b64encode(eps).decode(), "not an image in an accepted format"),
        ("not base64!", "not valid base64"),
    ):
        with pytest.raises(Exception, match=f"row 1: {why}"):
            pyfunc.predict(pd.DataFrame({"image": [frame["image"][0], row]}))


def test_a_pass_recorded_but_never_moved_is_completed_by_the_job_s_rerun(three_versions):
    """A fine-tune whose verdict (pass) was recorded but whose alias move failed (here the registry's alias lock
    cannot be opened: a disk gone bad between the two) used to be reported 'promoted' by its rerun while the
    champion never moved. The rerun now completes the move, compare-and-set against the champion it was judged
    against, once; a pass whose champion has moved since is marked stale; a move a person rolled back is not
    made again."""
    from cytoloop.policy.promotion import GateVerdict, apply_verdict, verdict_tags
    from jobs.finetune import _complete_promotion

    registry, (v1, v2, v3), _ = three_versions
    lock = registry.audit_log.parent / "aliases.lock"
    lock.unlink()
    lock.mkdir()  # the fault: the lock file cannot be opened when the move takes it
    with pytest.raises(IsADirectoryError):
        apply_verdict(registry, "cells", v2, "champion", GateVerdict(True, ["better"], {}, champion_version=v1))
    lock.rmdir()
    assert registry.version("cells", v2).tags["gate.verdict"] == "pass"
    assert registry.alias_version("cells", "champion") == v1

    _complete_promotion(registry, "cells", registry.version("cells", v2), "champion", None)
    assert registry.alias_version("cells", "champion") == v2
    moves = registry.alias_history("cells", "champion")
    assert (moves[-1].action, moves[-1].from_version, moves[-1].to_version) == ("gate", v1, v2)
    _complete_promotion(registry, "cells", registry.version("cells", v2), "champion", None)  # a third run
    assert len(registry.alias_history("cells", "champion")) == len(moves)

    # v3 passed against v1 too, but v2 serves now: not promoted, and its record says why
    registry.set_tags("cells", v3, verdict_tags(GateVerdict(True, ["better"], {}, champion_version=v1)))
    _complete_promotion(registry, "cells", registry.version("cells", v3), "champion", None)
    assert registry.alias_version("cells", "champion") == v2
    assert registry.version("cells", v3).tags["gate.verdict"] == "stale"

    # a person rolled v2 back: its rerun does not promote it again
    registry.move_alias("cells", "champion", v1, why="rolled back by a person", action="rollback")
    _complete_promotion(registry, "cells", registry.version("cells", v2), "champion", None)
    assert registry.alias_version("cells", "champion") == v1

"""The MLflow model registry as CytoLoop uses it: model directories in, model directories out.

A model version is a run whose artifact `model/` is an MLflow pyfunc model holding the CytoLoop model directory
as its artifact `cytoloop` (`model/artifacts/cytoloop/`: the files of `MODEL_ARTIFACTS`; versions registered
before the pyfunc format hold the bare directory, `pyfunc.cytoloop_directory`); the registered version points at
it. Aliases, never stages, say what is served: `champion` globally and `champion-<site>` per hospital, falling
back to the global one. MLflow is imported only here and in `serving/pyfunc.py`, lazily, so the rest of the
library works without it.

Every alias move goes through `move_alias`, which records who moved which alias from which version to which, when
and why: as a tag on the registered model (the shared record, `alias_move.<time>`) and as a line in a local
JSON-lines log (`audit_log`). The move is compare-and-set, under a lock:

1. take the registry's alias lock (a file lock beside the audit log: every mover sharing a CytoLoop home, the gate
   jobs of a cluster on its shared volume included, queues there);
2. read what serves the alias now; if the caller said which version it judged against (`expect`) and that is no
   longer it, refuse (`AliasMoved`) and move nothing;
3. write the move to the trail as an *intent*, then move the alias, then mark the record *done*. A crash between
   two steps leaves an intent that `history` resolves against what happened after it (the next move's starting
   version, or the live alias), so the trail never claims a move that did not happen, nor hides one that did.

`rollback` walks that history back, and refuses when the trail's last version is not what the alias points at
(someone moved it outside CytoLoop): it never moves an alias on a record it cannot trust.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import logging
import math
import os
import shutil
import socket
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cytoloop.config import ScoringConfig
from cytoloop.errors import CytoLoopError, UsageError
from cytoloop.files import locked
from cytoloop.models.base import MODEL_ARTIFACTS, MODEL_FILE, WEIGHTS_FILE, Classifier, ModelLoadError
from cytoloop.models.loading import load_model
from cytoloop.processes import alive
from cytoloop.serving.pyfunc import cytoloop_directory

logger = logging.getLogger(__name__)

CHAMPION = "champion"
CHALLENGER = "challenger"
ALIAS_MOVE_TAG = "alias_move."
ANY_VERSION = object()  # move_alias's default `expect`: move whatever the alias points at


class RegistryError(CytoLoopError, LookupError):
    """The registry could not give what was asked; the message says what and why."""


class NotRegistered(RegistryError):
    """A definite answer: that model, version or alias does not exist (yet)."""


class AliasMoved(RegistryError):
    """A compare-and-set alias move found the alias no longer where the caller judged it: nothing was moved."""


class RegistryUnavailable(RegistryError):
    """No answer: the registry could not be read (a locked database, a server error, no connection). Nothing is
    known about the alias asked for; a caller must not read this as 'no alias' (keep what is loaded, retry)."""


def site_alias(site: str | None) -> str:
    return f"{CHAMPION}-{site}" if site else CHAMPION


def site_of(alias: str) -> str | None:
    """The site whose champion `alias` names (`champion-<site>`); None for any other alias (the global champion)."""
    return alias.removeprefix(f"{CHAMPION}-") if alias.startswith(f"{CHAMPION}-") else None


def challenger_alias(site: str | None) -> str:
    """The alias of the version a gate is judging (`challenger`, `challenger-<site>`); it stays on the latest one."""
    return f"{CHALLENGER}-{site}" if site else CHALLENGER


@dataclass(frozen=True)
class AliasMove:
    """One alias move of the audit trail. `action`: gate (the promotion gate passed), override (a person promoted
    despite the gate), rollback, first (the first champion), or manual. `state`: intent (recorded before the alias
    moved) or done. A site alias's versions may be None: not set, the global champion serves the site (a site's
    first model moves it from None; rolling that back removes the alias again)."""

    time: str
    who: str
    why: str
    action: str
    name: str
    alias: str
    from_version: str | None
    to_version: str | None
    state: str = "done"

    def arrow(self) -> str:
        """'@alias: v1 -> v2', for people; an unset alias reads '-'."""
        after = f"v{self.to_version}" if self.to_version else "- (the global champion serves the site)"
        return f"@{self.alias}: {f'v{self.from_version}' if self.from_version else '-'} -> {after}"


@dataclass(frozen=True)
class VersionInfo:
    name: str
    version: str
    run_id: str | None
    tags: dict[str, str]
    aliases: list[str]


def _same_figure(logged: float, value: float) -> bool:
    """Whether a metric point's value is `value` (NaN is NaN: a window without labels has no ECE, run after run)."""
    return logged == value or (math.isnan(logged) and math.isnan(value))


class Registry:
    """A thin, typed wrapper over `MlflowClient` for logging, aliasing and fetching CytoLoop models."""

    def __init__(self, tracking_uri: str, experiment: str = "cytoloop", audit_log: Path | None = None):
        import mlflow
        from mlflow import MlflowClient

        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.audit_log = Path(audit_log) if audit_log else None
        mlflow.set_tracking_uri(tracking_uri)
        self.client = self._call(lambda: MlflowClient(tracking_uri=tracking_uri), f"registry {tracking_uri}")

    def experiment_id(self) -> str:
        """The experiment's id, creating it on first use; with a SQLite store its artifacts go next to the
        database (else MLflow would put them in ./mlruns of whatever the working directory is)."""
        experiment = self.client.get_experiment_by_name(self.experiment)
        if experiment is not None:
            return experiment.experiment_id
        location = None
        if self.tracking_uri.startswith("sqlite:///"):
            location = (Path(self.tracking_uri[len("sqlite:///") :]).resolve().parent / "artifacts").as_uri()
        return self.client.create_experiment(self.experiment, artifact_location=location)

    def log_model(
        self,
        model_dir: Path,
        name: str,
        tags: dict[str, str] | None = None,
        params: dict | None = None,
        metrics: dict[str, float] | None = None,
        artifacts: Sequence[Path] = (),
        run_name: str | None = None,
        step_metrics: dict[str, list[tuple[int, float]]] | None = None,
        dataset: tuple[Sequence, str] | None = None,
    ) -> VersionInfo:
        """Log a model directory (without its training checkpoints) as a run and register it as a new version.

        The version is a real MLflow model (`serving.pyfunc`: a pyfunc flavour with a signature and an input
        example, the CytoLoop directory inside as its artifact), so `mlflow.pyfunc.load_model("models:/<name>/<v>")`
        predicts on cells. `run_name` names the run; `step_metrics` ({metric: [(step, value), ...]}, such as the
        training loss) are logged per step; `dataset` (cell records, name) becomes the run's MLflow dataset input
        (its path, label and domain per cell: the data snapshot the version was trained on)."""
        import mlflow
        from mlflow.models import infer_signature

        from cytoloop.serving.pyfunc import ARTIFACT, example_frame, output_example, python_model

        model = load_model(model_dir)  # a damaged directory is refused naming it, before anything is logged
        example = example_frame(model)
        mlflow.set_experiment(experiment_id=self.experiment_id())
        with tempfile.TemporaryDirectory() as staging:
            staged = Path(staging) / ARTIFACT  # MLflow keeps an artifact folder under its own name
            staged.mkdir()
            for file in MODEL_ARTIFACTS:
                if (Path(model_dir) / file).is_file():
                    shutil.copy2(Path(model_dir) / file, staged / file)
            try:  # what a replica will download must load on its own (a cascade's sub-models do not travel)
                load_model(staged)
            except ModelLoadError as error:
                raise UsageError(
                    f"{model_dir}: a {model.kind} model cannot be registered: its files beyond "
                    f"{', '.join(MODEL_ARTIFACTS)} would not travel with the version ({error})"
                ) from None
            with mlflow.start_run(run_name=run_name, tags=tags or {}) as run:
                if params:
                    mlflow.log_params(params)
                if metrics:
                    mlflow.log_metrics(metrics)
                if dataset is not None:
                    import pandas as pd
                    from mlflow.data.pandas_dataset import from_pandas

                    records, dataset_name = dataset
                    table = pd.DataFrame(
                        {
                            "path": [str(r.path) for r in records],
                            "label": [r.label for r in records],
                            "domain": [r.domain for r in records],
                        }
                    )
                    mlflow.log_input(from_pandas(table, name=dataset_name), context="training")
                for key, points in (step_metrics or {}).items():
                    for step, value in points:
                        mlflow.log_metric(key, value, step=step)
                logged = mlflow.pyfunc.log_model(
                    name="model",
                    python_model=python_model(),
                    artifacts={ARTIFACT: str(staged)},
                    signature=infer_signature(example, output_example(model.classes)),
                    input_example=example,
                    # the library travels inside (code), its own dependencies are listed: `mlflow models serve`
                    # can build an environment from the version alone (and MLflow spends no time inferring them)
                    code_paths=[str(Path(__file__).resolve().parent)],
                    pip_requirements=_library_requirements(),
                )
                for artifact in artifacts:
                    mlflow.log_artifact(str(artifact))
        try:
            self.client.get_registered_model(name)
        except Exception:
            self.client.create_registered_model(name)
        version = self.client.create_model_version(
            name, source=logged.model_uri, run_id=run.info.run_id, tags=tags or {}, model_id=logged.model_id
        )
        return self.version(name, version.version)

    def version(self, name: str, version: str) -> VersionInfo:
        return self._info(self._call(lambda: self.client.get_model_version(name, str(version)), f"{name} v{version}"))

    def by_alias(self, name: str, alias: str) -> VersionInfo:
        return self._info(self._call(lambda: self.client.get_model_version_by_alias(name, alias), f"{name}@{alias}"))

    def for_site(self, name: str, site: str | None) -> VersionInfo:
        """The version serving `site`: its own `champion-<site>` alias if set, else the global champion."""
        if site:
            try:
                return self.by_alias(name, site_alias(site))
            except NotRegistered:  # only a definite 'no such alias'; an unreachable registry is not a fallback
                pass
        return self.by_alias(name, CHAMPION)

    def set_alias(self, name: str, alias: str, version: str) -> None:
        self._call(lambda: self.client.set_registered_model_alias(name, alias, str(version)), f"{name} v{version}")

    def set_tag(self, name: str, version: str, key: str, value: str) -> None:
        self._call(lambda: self.client.set_model_version_tag(name, str(version), key, value), f"{name} v{version}")

    def set_tags(self, name: str, version: str, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self.set_tag(name, version, key, str(value))

    def move_alias(
        self,
        name: str,
        alias: str,
        version: str | None,
        why: str,
        action: str = "manual",
        who: str | None = None,
        expect: str | None | object = ANY_VERSION,
    ) -> AliasMove:
        """Point `alias` at `version`, compare-and-set, and record the move (who, when, why, from which version).

        `expect`: the version the caller judged against, i.e. what served the alias then (for `champion-<site>`
        with no site alias, the global champion; None when nothing served it). If that is no longer what serves
        it, raise `AliasMoved` and move nothing. `why` is required: an alias decides which model reads patients'
        cells, so every move must say why. `version` None removes a site's alias (`champion-<site>`), so that the
        global champion serves the site again; the global champion is never removed.
        """
        if not why.strip():
            raise UsageError("an alias move needs a reason (why)")
        if version is not None:
            self.version(name, version)  # fails clearly for an unknown model or version
        elif site_of(alias) is None:
            raise UsageError(f"{name}@{alias}: only a site's champion alias can be removed, never {alias}")
        with self._alias_lock():
            if expect is not ANY_VERSION:
                serving = self.serving_version(name, alias)
                if serving != expect:
                    raise AliasMoved(
                        f"{name}@{alias}: judged against v{expect or '-'}, but v{serving or '-'} serves it now; "
                        "nothing was moved (judge the new champion first)"
                    )
            previous = self.alias_version(name, alias)
            move = AliasMove(
                time=self._next_move_time(name).isoformat(timespec="microseconds"),
                who=who or getpass.getuser(),
                why=why,
                action=action,
                name=name,
                alias=alias,
                from_version=previous,
                to_version=None if version is None else str(version),
                state="intent",
            )
            key = ALIAS_MOVE_TAG + move.time.replace(":", "").replace("-", "").replace("+0000", "Z")
            self._call(lambda: self.client.set_registered_model_tag(name, key, json.dumps(asdict(move))), name)
            if version is None:
                if previous is not None:
                    self._call(lambda: self.client.delete_registered_model_alias(name, alias), f"{name}@{alias}")
            else:
                self.set_alias(name, alias, version)
            move = replace(move, state="done")
            try:
                self._call(lambda: self.client.set_registered_model_tag(name, key, json.dumps(asdict(move))), name)
            except RegistryError as error:  # the alias moved: raised, the move read as failed and a retried
                # rollback went back a second step; the intent counts as done while the alias points there
                logger.warning(
                    f"{name}@{alias} moved, but its record could not be marked done ({error}): the trail "
                    "counts the move by where the alias points"
                )
            if self.audit_log is not None:  # in the lock: two movers' lines in the order of their moves
                with self.audit_log.open("a") as handle:
                    handle.write(json.dumps(asdict(move)) + "\n")
        return move

    def _next_move_time(self, name: str) -> datetime:
        """Now, or just after the trail's latest move if this host's clock is behind it: the trail is ordered by
        its times, and the lock, not a host's clock, orders the moves (a host 2 s behind recorded its move, made
        after another host's, before it; `rollback` then found the trail ending elsewhere than the alias)."""
        model = self._call(lambda: self.client.get_registered_model(name), name)
        times = [
            json.loads(value).get("time", "")
            for key, value in (model.tags or {}).items()
            if key.startswith(ALIAS_MOVE_TAG)
        ]
        now = datetime.now(UTC)
        latest = max((datetime.fromisoformat(t) for t in times if t), default=None)
        return now if latest is None or now > latest else latest + timedelta(microseconds=1)

    def alias_history(self, name: str, alias: str | None = None) -> list[AliasMove]:
        """The alias moves that happened, oldest first (all aliases, or only `alias`).

        An intent whose completion was never recorded (a crash mid-move) counts as a move exactly when what came
        after shows it happened: the alias's next move started from its version, or, for the last one, the alias
        points there now."""
        model = self._call(lambda: self.client.get_registered_model(name), name)
        recorded = [
            AliasMove(**json.loads(value))
            for key, value in sorted((model.tags or {}).items())
            if key.startswith(ALIAS_MOVE_TAG)
        ]
        live = {a: str(v) for a, v in (getattr(model, "aliases", None) or {}).items()}
        moves: list[AliasMove] = []
        for target in sorted({m.alias for m in recorded if alias is None or m.alias == alias}):
            own = [m for m in recorded if m.alias == target]
            for i, move in enumerate(own):
                if move.state == "intent":
                    after = own[i + 1].from_version if i + 1 < len(own) else live.get(target)
                    if after != move.to_version:
                        continue  # it never happened
                moves.append(replace(move, state="done"))
        return sorted(moves, key=lambda m: m.time)

    def rollback(
        self, name: str, alias: str, why: str, who: str | None = None, expect: str | None | object = ANY_VERSION
    ) -> AliasMove:
        """Move `alias` back to the version it pointed at before its latest (not rolled-back) move.

        `expect`: the version the caller means to roll back (what serves the alias, as `move_alias` reads it); if
        another serves it by then, `AliasMoved` and nothing moves. A rollback retried after one that went through
        (its answer lost) otherwise went back a second move, as did two operators rolling back the same bad model.

        A move to the version already there (a promotion repeated) changes nothing, so it is no step to go back
        over: rolling back after it went from v5 to v5 and left the version being rolled back serving. A site's
        alias set by its first model goes back to not set, the global champion serving the site again (it said
        there was no earlier version, and the only way back was removing the alias in MLflow by hand).

        The trail is checked against the live alias first: if the alias points elsewhere than the trail's last
        version, someone moved it outside CytoLoop and the trail cannot say what 'back' is; that is an error. The
        move itself is compare-and-set against the version checked."""
        if expect is not ANY_VERSION and (serving := self.serving_version(name, alias)) != expect:
            raise AliasMoved(
                f"{name}@{alias}: v{expect or '-'} was to be rolled back, but v{serving or '-'} serves it now; "
                "nothing was moved (a rollback that went through already is not repeated)"
            )
        site = site_of(alias) is not None  # unset is a state a site's alias goes back to
        stack: list[str | None] = []
        for move in self.alias_history(name, alias):
            if move.action == "rollback" and move.from_version == move.to_version:
                continue  # a rollback that moved nothing (recorded before repeated moves were skipped): no step
            if move.action == "rollback":
                if not stack:  # a trail that begins with a rollback (clocks of two hosts apart): no 'back' to trust
                    raise RegistryError(
                        f"{name}@{alias}: the audit trail begins with a rollback, so there is no trusted version to "
                        "roll back to (set it explicitly with `cytoloop promote VERSION --reason ...`)"
                    )
                stack.pop()
            else:
                # the alias was set before the trail began, or outside CytoLoop between two of its moves: what it
                # was moved from is what served before, and where a rollback of this move goes
                if (move.from_version is not None or site) and (not stack or stack[-1] != move.from_version):
                    stack.append(move.from_version)
                if not stack or stack[-1] != move.to_version:
                    stack.append(move.to_version)
        live = self.alias_version(name, alias)
        if stack and live != stack[-1]:
            raise RegistryError(
                f"{name}@{alias}: the audit trail ends at v{stack[-1]} but the alias points at v{live or '-'}; it "
                "was moved outside CytoLoop, so there is no trusted version to roll back to (set it explicitly "
                "with `cytoloop promote VERSION --reason ...`)"
            )
        if len(stack) < 2:
            raise RegistryError(f"{name}@{alias}: no earlier version to roll back to")
        # compare-and-set against the version checked; an unset site alias as `move_alias` reads it, served by the
        # global champion (compared with None, the second rollback of a site's unset alias was refused)
        checked: str | None | object = live if live is not None else self.serving_version(name, alias)
        # the caller's version checked again under the lock: two `rollback --from 7` at once both passed the check
        # above, and the second, reading the trail the first had just ended at 6, went on to 5
        checked = checked if expect is ANY_VERSION else expect
        return self.move_alias(name, alias, stack[-2], why, action="rollback", who=who, expect=checked)

    def alias_version(self, name: str, alias: str) -> str | None:
        """The version `alias` itself points at; None if it is not set (no fallback to the global champion)."""
        try:
            return self.by_alias(name, alias).version
        except NotRegistered:
            return None

    def serving_version(self, name: str, alias: str) -> str | None:
        """The version serving `alias`: a site alias falls back to the global champion, as `for_site` does."""
        own = self.alias_version(name, alias)
        if own is None and site_of(alias) is not None:
            return self.alias_version(name, CHAMPION)
        return own

    @contextlib.contextmanager
    def _alias_lock(self):
        """An exclusive file lock beside the audit log (no lock without one): alias movers queue here."""
        if self.audit_log is None:
            yield
            return
        with locked(self.audit_log.parent / "aliases.lock"):
            yield

    def aliases(self, name: str) -> dict[str, str]:
        """Every alias of a registered model and the version it points at."""
        model = self._call(lambda: self.client.get_registered_model(name), name)
        return {alias: str(v) for alias, v in (getattr(model, "aliases", None) or {}).items()}

    def versions(self, name: str) -> list[VersionInfo]:
        found = self._call(lambda: self.client.search_model_versions(f"name = '{name}'"), name)
        return sorted((self._info(v) for v in found), key=lambda v: int(v.version))

    def log_series(self, run_name: str, tags: dict[str, str], points: list[tuple[int, int, dict[str, float]]]) -> str:
        """Add metric points (step, unix time in ms, {metric: value}) to the run tagged `tags`, created once;
        returns the run id. Drift uses this: one run per model version and site, one step per time window, logged
        again by every run over a growing log. A point already there with its value is not logged twice; a changed
        one (the open window's figures, a late label) is logged after the run's points of its step, so that it is
        what MLflow reports as the metric's latest (MLflow never replaces a point, and of two points of one step
        and time it reported the larger value: the window's figure of an earlier run)."""
        from mlflow.entities import Metric

        experiment_id = self.experiment_id()
        query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
        runs = self.client.search_runs([experiment_id], query, max_results=1)
        run_id = (
            runs[0].info.run_id
            if runs
            else self.client.create_run(experiment_id, tags={**tags, "mlflow.runName": run_name}).info.run_id
        )
        last: dict[tuple[str, int], tuple[int, float]] = {}  # (metric, step) -> its newest point's (time, value)
        for key in {key for *_, values in points for key in values} if runs else ():
            for point in self.client.get_metric_history(run_id, key):
                newest = last.get((key, point.step))
                if newest is None or (point.timestamp, point.value) > newest:  # MLflow's own order within a step
                    last[(key, point.step)] = (point.timestamp, point.value)
        now = int(datetime.now(UTC).timestamp() * 1000)
        metrics = []
        for step, timestamp, values in points:
            for key, value in values.items():
                if value is None:
                    continue
                newest = last.get((key, step))
                if newest is None:
                    metrics.append(Metric(key, float(value), timestamp, step))
                elif not _same_figure(newest[1], float(value)):
                    metrics.append(Metric(key, float(value), max(now, newest[0] + 1), step))
        for start in range(0, len(metrics), 1000):
            self.client.log_batch(run_id, metrics=metrics[start : start + 1000])
        return run_id

    def metric_history(self, run_id: str, key: str) -> list[tuple[int, float]]:
        return [(m.step, m.value) for m in self.client.get_metric_history(run_id, key)]

    def download(self, name: str, version: str, destination: Path) -> Path:
        """Fetch a version's model directory into `destination` (created) and return it."""
        import mlflow

        destination = Path(destination)
        destination.mkdir(parents=True, exist_ok=True)
        path = self._call(
            lambda: mlflow.artifacts.download_artifacts(
                artifact_uri=f"models:/{name}/{version}", dst_path=str(destination), tracking_uri=self.tracking_uri
            ),
            f"{name} v{version}",
        )
        return Path(path)

    def load(
        self,
        name: str,
        version: str,
        cache_dir: Path,
        runtime: ScoringConfig | None = None,
        run_id: str | None = None,
    ) -> Classifier:
        """Load a version as a classifier, downloading it once into `cache_dir/<name>/<version>` (`runtime`: as in
        `load_model`; `run_id`: the run that logged the version, when the caller has it from the registry already,
        so that a whole cached copy loads without asking again).

        The cache is shared by every replica on a host, so a version appears there whole or not at all: it is
        downloaded into a private folder beside it and renamed into place only once it holds the model. An
        interrupted download leaves no half model behind; two replicas downloading at once both end with the
        one that was renamed first. A replica killed mid-download (no `finally` runs) leaves its private folder,
        named with its host and process id: the next load on that host removes the folders of its processes no
        longer alive (a cache shared by several hosts keeps the others' downloads in progress).

        A name and version number do not name one model for ever: a registered model deleted and made again (a
        registry reset, a name reused) numbers its versions from 1 again. Each cached copy records the run that
        logged it (`IDENTITY_FILE`); a copy of another run is replaced, never served as this version."""
        target = Path(cache_dir) / name / str(version)
        identity = run_id or self.version(name, version).run_id
        if target.is_dir() and not ((target / MODEL_FILE).is_file() and (target / WEIGHTS_FILE).is_file()):
            shutil.rmtree(target, ignore_errors=True)  # half a model, left by a download that was not atomic
        if target.is_dir() and cached_identity(target) != identity:
            _discard(target)  # another model that had this name and number, or a copy from before identities
        if not target.is_dir():
            target.parent.mkdir(parents=True, exist_ok=True)
            _remove_dead_downloads(target.parent)
            staging = Path(tempfile.mkdtemp(prefix=f".{version}{_partial_tag()}", dir=target.parent))
            try:
                downloaded = cytoloop_directory(self.download(name, version, staging))
                if not (downloaded / MODEL_FILE).is_file() or not (downloaded / WEIGHTS_FILE).is_file():
                    raise RegistryError(f"{name} v{version}: the registered artifacts hold no complete model")
                (downloaded / IDENTITY_FILE).write_text(json.dumps({"run_id": identity}))
                try:
                    downloaded.rename(target)
                except OSError:  # another replica renamed its copy first: use that one
                    if not target.is_dir():
                        raise
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        return load_model(target, runtime)

    def _call(self, action, what: str):
        """Run an MLflow call; its failures become NotRegistered (it said no), RegistryUnavailable (it could not
        answer) or RegistryError (any other refusal)."""
        from mlflow.exceptions import MlflowException
        from sqlalchemy.exc import OperationalError

        try:
            return action()
        except MlflowException as error:
            missing = error.error_code == "RESOURCE_DOES_NOT_EXIST" or (
                error.error_code == "INVALID_PARAMETER_VALUE" and "not found" in error.message
            )
            if missing:
                raise NotRegistered(f"{what}: {error.message}") from None
            if error.get_http_status_code() >= 500:
                raise RegistryUnavailable(f"{what}: the registry could not answer: {error.message}") from error
            raise RegistryError(f"{what}: {error.message}") from None
        except (OSError, OperationalError) as error:  # no connection, a locked or unreadable database
            raise RegistryUnavailable(f"{what}: the registry could not answer: {error}") from error

    @staticmethod
    def _info(version) -> VersionInfo:
        return VersionInfo(
            name=version.name,
            version=str(version.version),
            run_id=version.run_id,
            tags=dict(version.tags or {}),
            aliases=list(getattr(version, "aliases", []) or []),
        )


_PARTIAL = ".partial-"  # a private download folder: .<version>.partial-<host>~<pid>~<random>
IDENTITY_FILE = "registry-version.json"  # in a cached copy: the run that logged the version it holds


def cached_identity(folder: Path) -> str | None:
    """The run that logged the version a cached copy holds (None: not recorded)."""
    try:
        return json.loads((folder / IDENTITY_FILE).read_text())["run_id"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _discard(folder: Path) -> None:
    """Remove a cached copy by renaming it aside first: a replica reading it meanwhile keeps whole files, and
    the version's own download can be renamed into the freed place at once."""
    aside = folder.with_name(f".{folder.name}{_partial_tag()}-stale")
    try:
        folder.rename(aside)
    except OSError:  # another replica discarded it first
        return
    shutil.rmtree(aside, ignore_errors=True)


def _host() -> str:
    return socket.gethostname().replace("~", "-")  # '~' separates the folder name's parts


def _partial_tag() -> str:
    """This process's private download folder prefix (after the version)."""
    return f"{_PARTIAL}{_host()}~{os.getpid()}~"


def _remove_dead_downloads(folder: Path) -> None:
    """Remove the private download folders in `folder` that this host's processes left and that are no longer
    alive (killed mid-download).

    Another host's folder, a folder whose process is alive, or one whose name says neither, is left alone: it may
    be a download in progress. (A process id reused since only keeps a dead folder a while longer.)"""
    host = _host()
    for partial in folder.glob(f".*{_PARTIAL}*"):
        owner = partial.name.split(_PARTIAL, 1)[1].split("~")
        if len(owner) < 3 or owner[0] != host or not owner[1].isdigit() or alive(int(owner[1])):
            continue
        shutil.rmtree(partial, ignore_errors=True)


def _library_requirements() -> list[str]:
    """The library's own dependencies (no extras), as installed: what a pyfunc version needs besides its code."""
    from importlib import metadata

    try:
        declared = metadata.requires("cytoloop") or []
    except metadata.PackageNotFoundError:  # running from a source tree that was never installed
        return []
    return [r for r in declared if "extra ==" not in r]


def parse_model_uri(uri: str) -> tuple[str, str | None, str | None]:
    """`models:/name@alias` -> (name, alias, None); `models:/name/3` -> (name, None, "3")."""
    if not uri.startswith("models:/"):
        raise RegistryError(
            f"not a registry URI: {uri!r} (expected models:/<name>@<alias> or models:/<name>/<version>)"
        )
    rest = uri[len("models:/") :]
    if "@" in rest:
        name, alias = rest.split("@", 1)
        return name, alias, None
    if "/" in rest:
        name, version = rest.split("/", 1)
        return name, None, version
    raise RegistryError(f"{uri!r} names no alias or version")


def check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """Raise RegistryUnavailable, naming the server, unless the MLflow server at `uri` answers HTTP at all (any
    status: one that asks who is there is up). MLflow retries a refused connection with back-off for minutes: every
    registry command against a stopped server was silent for four of them before it said so."""
    import http.client
    import ssl
    import urllib.error
    import urllib.request

    # whether anything answers, not whom to trust: a server behind a private CA (MLflow's client is told of it by
    # MLFLOW_TRACKING_SERVER_CERT_PATH or REQUESTS_CA_BUNDLE) answers too; nothing but this probe is sent
    unverified = ssl.create_default_context()
    unverified.check_hostname, unverified.verify_mode = False, ssl.CERT_NONE
    try:
        urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s, context=unverified).close()
    except (urllib.error.HTTPError, http.client.HTTPException):
        return  # an answer (an HTTP error, or something other than HTTP listening there: MLflow says which)
    except (OSError, ValueError) as error:  # refused, timed out, no such host, a malformed URL
        reason = getattr(error, "reason", error)
        raise RegistryUnavailable(
            f"the MLflow server at {uri} is not reachable ({reason}); is it running (`cytoloop stack up`)?"
        ) from None


def open_registry(settings) -> Registry:
    """The registry of a `Settings`: its tracking URI and experiment, and the audit log under `<home>/registry/`."""
    uri = settings.registry.tracking_uri
    if uri.startswith("sqlite:///"):  # SQLite creates the database file, not its folder
        Path(uri[len("sqlite:///") :]).resolve().parent.mkdir(parents=True, exist_ok=True)
    if uri.startswith(("http://", "https://")):
        check_reachable(uri)
    return Registry(
        settings.registry.tracking_uri,
        settings.registry.experiment,
        audit_log=Path(settings.home) / "registry" / "alias-moves.jsonl",
    )

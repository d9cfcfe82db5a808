"""The MLflow model registry as CytoLoop uses it: model directories in, model directories out.

A model version is a run whose artifact folder `model/` holds a CytoLoop model directory (model.json,
weights.pt, split.json, plots); the registered version points at it. Aliases, never stages, say what is
served: `champion` globally and `champion-<site>` per hospital, falling back to the global one. MLflow is
imported only here, lazily, so the rest of the library works without it.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cytoloop.models.base import MODEL_FILE, WEIGHTS_FILE, Classifier, load_model

CHAMPION = "champion"
MODEL_ARTIFACTS = (MODEL_FILE, WEIGHTS_FILE, "split.json", "training.json", "learning_curve.png")


class RegistryError(LookupError):
    """A registry URI, model, version or alias that does not exist; the message says which."""


def site_alias(site: str | None) -> str:
    return f"{CHAMPION}-{site}" if site else CHAMPION


@dataclass(frozen=True)
class VersionInfo:
    name: str
    version: str
    run_id: str | None
    tags: dict[str, str]
    aliases: list[str]


class Registry:
    """A thin, typed wrapper over `MlflowClient` for logging, aliasing and fetching CytoLoop models."""

    def __init__(self, tracking_uri: str, experiment: str = "cytoloop"):
        import mlflow
        from mlflow import MlflowClient

        self.tracking_uri = tracking_uri
        self.experiment = experiment
        mlflow.set_tracking_uri(tracking_uri)
        self.client = MlflowClient(tracking_uri=tracking_uri)

    def log_model(
        self,
        model_dir: Path,
        name: str,
        tags: dict[str, str] | None = None,
        params: dict | None = None,
        metrics: dict[str, float] | None = None,
        artifacts: list[Path] = (),
    ) -> VersionInfo:
        """Log a model directory (without its training checkpoints) as a run and register it as a new version."""
        import mlflow

        mlflow.set_experiment(self.experiment)
        with tempfile.TemporaryDirectory() as staging:
            staged = Path(staging) / "model"
            staged.mkdir()
            for file in MODEL_ARTIFACTS:
                if (Path(model_dir) / file).is_file():
                    shutil.copy2(Path(model_dir) / file, staged / file)
            with mlflow.start_run(tags=tags or {}) as run:
                if params:
                    mlflow.log_params(params)
                if metrics:
                    mlflow.log_metrics(metrics)
                mlflow.log_artifacts(str(staged), artifact_path="model")
                for artifact in artifacts:
                    mlflow.log_artifact(str(artifact))
        try:
            self.client.get_registered_model(name)
        except Exception:
            self.client.create_registered_model(name)
        version = self.client.create_model_version(
            name, source=f"{run.info.artifact_uri}/model", run_id=run.info.run_id, tags=tags or {}
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
            except RegistryError:
                pass
        return self.by_alias(name, CHAMPION)

    def set_alias(self, name: str, alias: str, version: str) -> None:
        self._call(lambda: self.client.set_registered_model_alias(name, alias, str(version)), f"{name} v{version}")

    def set_tag(self, name: str, version: str, key: str, value: str) -> None:
        self.client.set_model_version_tag(name, str(version), key, value)

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

    def load(self, name: str, version: str, cache_dir: Path) -> Classifier:
        """Load a version as a classifier, downloading it once into `cache_dir/<name>/<version>`."""
        target = Path(cache_dir) / name / str(version)
        if not (target / MODEL_FILE).is_file():
            self.download(name, version, target)
        return load_model(target)

    def _call(self, action, what: str):
        from mlflow.exceptions import MlflowException

        try:
            return action()
        except MlflowException as error:
            raise RegistryError(f"{what}: {error.message}") from None

    @staticmethod
    def _info(version) -> VersionInfo:
        return VersionInfo(
            name=version.name,
            version=str(version.version),
            run_id=version.run_id,
            tags=dict(version.tags or {}),
            aliases=list(getattr(version, "aliases", []) or []),
        )


def parse_model_uri(uri: str) -> tuple[str, str | None, str | None]:
    """`models:/name@alias` -> (name, alias, None); `models:/name/3` -> (name, None, "3")."""
    if not uri.startswith("models:/"):
        raise RegistryError(f"not a registry URI: {uri!r} (expected models:/<name>@<alias> or models:/<name>/<version>)")
    rest = uri[len("models:/"):]
    if "@" in rest:
        name, alias = rest.split("@", 1)
        return name, alias, None
    if "/" in rest:
        name, version = rest.split("/", 1)
        return name, None, version
    raise RegistryError(f"{uri!r} names no alias or version")

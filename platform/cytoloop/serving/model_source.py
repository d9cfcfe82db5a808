"""Where served models come from, and how a served site follows its alias.

A `ModelSource` answers two questions: which model version serves a site now (`resolve`), and what that version
is (`load`). From the registry a site is served by `<name>@champion-<site>` if that alias exists, else by
`<name>@champion`; from a local directory every site gets that directory's model, versioned by a hash of its
files so that writing a new model there is noticed like a moved alias.

What is loaded and served from them, per site, is `serving.live`.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cytoloop.config import RegistryConfig, ServeConfig
from cytoloop.models.base import MODEL_FILE, WEIGHTS_FILE, Classifier
from cytoloop.models.loading import load_model


@dataclass(frozen=True)
class ModelRef:
    """One model version as served: registry name and version (or a local directory and its content hash)."""

    name: str
    version: str
    alias: str | None  # the alias that chose it; None for a local directory
    path: Path | None = None  # local directory, when not from the registry


class ModelSource:
    """Resolves sites to model versions and loads them, from the registry or from `serve.model_dir`."""

    def __init__(self, serve: ServeConfig, registry: RegistryConfig):
        self.model_dir = Path(serve.model_dir) if serve.model_dir else None
        self.name = serve.model_name or registry.model_name
        self.cache_dir = Path(registry.cache_dir)
        self._registry_config = registry
        self._registry = None

    @property
    def registry(self):
        if self._registry is None:
            from cytoloop.registry import Registry

            self._registry = Registry(self._registry_config.tracking_uri, self._registry_config.experiment)
        return self._registry

    def describe(self) -> str:
        if self.model_dir:
            return f"local directory {self.model_dir}"
        return f"registry model {self.name!r} ({self._registry_config.tracking_uri})"

    def resolve(self, site: str | None) -> ModelRef:
        """The version serving `site` now (None: the global champion). Raises RegistryError or ModelLoadError."""
        if self.model_dir:
            return ModelRef(self.model_dir.name, f"local-{_content_hash(self.model_dir)}", None, self.model_dir)
        info = self.registry.for_site(self.name, site)
        from cytoloop.registry import site_alias

        alias = site_alias(site) if site and site_alias(site) in info.aliases else site_alias(None)
        return ModelRef(info.name, info.version, alias)

    def load(self, ref: ModelRef) -> Classifier:
        if ref.path is not None:
            return load_model(ref.path)
        target = self.cache_dir / ref.name / ref.version
        if not (target / MODEL_FILE).is_file():
            self._download(ref, target)
        return load_model(target)

    def site_versions(self) -> dict[str | None, ModelRef]:
        """Every alias-served site and its version (None: the global champion); one entry for a local model."""
        if self.model_dir:
            return {None: self.resolve(None)}
        from cytoloop.registry import CHAMPION, RegistryError

        try:
            aliases = self.registry.client.get_registered_model(self.name).aliases
        except Exception as error:  # MLflow raises its own exception types for a missing model
            raise RegistryError(f"registered model {self.name!r}: {error}") from None
        served: dict[str | None, ModelRef] = {}
        for alias, version in sorted(aliases.items()):
            if alias == CHAMPION:
                served[None] = ModelRef(self.name, str(version), alias)
            elif alias.startswith(f"{CHAMPION}-"):
                served[alias[len(CHAMPION) + 1 :]] = ModelRef(self.name, str(version), alias)
        return served

    def _download(self, ref: ModelRef, target: Path) -> None:
        """Download into a private folder, then rename: replicas sharing the cache never see half a model."""
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{ref.version}-", dir=target.parent))
        try:
            downloaded = self.registry.download(ref.name, ref.version, staging)
            if not (downloaded / MODEL_FILE).is_file():
                downloaded = staging
            try:
                os.rename(downloaded, target)
            except OSError:
                if not (target / MODEL_FILE).is_file():  # not just another replica that was faster
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def _content_hash(directory: Path) -> str:
    digest = hashlib.sha256()
    for file in (MODEL_FILE, WEIGHTS_FILE):
        path = directory / file
        if not path.is_file():
            from cytoloop.models.base import ModelLoadError

            raise ModelLoadError(f"{directory}: not a CytoLoop model directory (no {file})")
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]

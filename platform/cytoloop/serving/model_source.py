"""Where served models come from, and how a served site follows its alias.

A `ModelSource` answers two questions: which model version serves a site now (`resolve`), and what that version
is (`load`). From the registry a site is served by `<name>@champion-<site>` if that alias exists, else by
`<name>@champion`; from a local directory every site gets that directory's model, versioned by a hash of its
files so that writing a new model there is noticed like a moved alias.

What is loaded and served from them, per site, is `serving.live`.
"""

from __future__ import annotations

import hashlib
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
        return self.registry.load(ref.name, ref.version, self.cache_dir)  # whole or not at all in the shared cache

    def site_versions(self) -> dict[str | None, ModelRef]:
        """Every alias-served site and its version (None: the global champion); one entry for a local model."""
        if self.model_dir:
            return {None: self.resolve(None)}
        from cytoloop.registry import CHAMPION

        aliases = self.registry.aliases(self.name)  # NotRegistered or RegistryUnavailable, never a guess
        served: dict[str | None, ModelRef] = {}
        for alias, version in sorted(aliases.items()):
            if alias == CHAMPION:
                served[None] = ModelRef(self.name, str(version), alias)
            elif alias.startswith(f"{CHAMPION}-"):
                served[alias[len(CHAMPION) + 1 :]] = ModelRef(self.name, str(version), alias)
        return served


def _content_hash(directory: Path) -> str:
    digest = hashlib.sha256()
    for file in (MODEL_FILE, WEIGHTS_FILE):
        path = directory / file
        if not path.is_file():
            from cytoloop.models.base import ModelLoadError

            raise ModelLoadError(f"{directory}: not a CytoLoop model directory (no {file})")
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]

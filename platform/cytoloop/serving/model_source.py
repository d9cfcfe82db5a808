"""Where served models come from, and how a served site follows its alias.

A `ModelSource` answers two questions: which model version serves a site now (`resolve`), and what that version
is (`load`). From the registry a site is served by `<name>@champion-<site>` if that alias exists, else by
`<name>@champion`; from a local directory every site gets that directory's model, versioned by a hash of its
files so that writing a new model there is noticed like a moved alias.

A registry source also keeps, per site, the *last known good* version on local disk: the version a replica last
loaded and served for that site, whose files are whole in the shared cache (`<cache_dir>/<name>/<version>`). A new
replica that cannot reach the registry, or cannot load the version its alias names (corrupt weights), serves that
one instead and says so (`serving.live`). A local directory has no fallback: it either loads or it does not.

What is loaded and served from them, per site, is `serving.live`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from cytoloop.config import RegistryConfig, ScoringConfig, ServeConfig
from cytoloop.files import write_text
from cytoloop.models.base import MODEL_FILE, WEIGHTS_FILE, Classifier, ModelLoadError
from cytoloop.models.loading import load_model
from cytoloop.registry import CHAMPION, cached_identity, site_alias, site_of


@dataclass(frozen=True)
class ModelRef:
    """One model version as served: registry name and version (or a local directory and its content hash)."""

    name: str
    version: str
    alias: str | None  # the alias that chose it; None for a local directory
    path: Path | None = None  # local directory, when not from the registry
    run_id: str | None = None  # the run that logged it: which model the number names (a registry's numbers restart)


class ModelSource:
    """Resolves sites to model versions and loads them, from the registry or from `serve.model_dir`; `runtime`
    (the settings' scoring section) sets how they run on this machine (`load_model`)."""

    def __init__(self, serve: ServeConfig, registry: RegistryConfig, runtime: ScoringConfig | None = None):
        self.model_dir = Path(serve.model_dir) if serve.model_dir else None
        self.name = serve.model_name or registry.model_name
        self.cache_dir = Path(registry.cache_dir)
        self._registry_config = registry
        self._registry = None
        self.runtime = runtime

    @property
    def registry(self):
        if self._registry is None:
            from cytoloop.registry import Registry

            self._registry = Registry(self._registry_config.tracking_uri, self._registry_config.experiment)
        return self._registry

    def describe(self) -> str:
        """Where models come from, as `/v1/models` tells every caller: a registry's address without the user name
        and password it may carry (`postgresql://user:secret@db/mlflow`)."""
        if self.model_dir:
            return f"local directory {self.model_dir}"
        return f"registry model {self.name!r} ({without_credentials(self._registry_config.tracking_uri)})"

    def resolve(self, site: str | None) -> ModelRef:
        """The version serving `site` now (None: the global champion). Raises RegistryError or ModelLoadError."""
        if self.model_dir:
            return local_ref(self.model_dir)
        info = self.registry.for_site(self.name, site)
        alias = site_alias(site) if site and site_alias(site) in info.aliases else site_alias(None)
        return ModelRef(info.name, info.version, alias, run_id=info.run_id)

    def load(self, ref: ModelRef) -> Classifier:
        """The model `ref` names. A local directory is hashed again after loading: a model copied over it while it
        loaded (or between `resolve` and here) would be served under a version its files are not, perhaps new
        settings with old weights; that raises ModelLoadError, and the caller keeps what it serves until its next
        try (copy a new model beside the directory and rename it over, and no load sees half of it)."""
        if ref.path is not None:
            model = load_model(ref.path, self.runtime)
            if local_ref(ref.path) != ref:
                raise ModelLoadError(f"{ref.path} changed while it loaded (as {ref.version}); loaded again next time")
            return model
        # whole or not at all in the shared cache; the run id, known from `resolve`, tells a cached copy's model
        return self.registry.load(ref.name, ref.version, self.cache_dir, self.runtime, run_id=ref.run_id)

    def remember(self, site: str | None, ref: ModelRef) -> None:
        """Record `ref` as the version last loaded and served for `site` (atomically: a reader sees the old record
        or the new one). Nothing is kept for a local directory. A site served by the global champion (no alias of
        its own, or no longer) has no record of its own: the global one is its record, so a site name that any
        caller may send leaves no file behind, and a site whose own alias was removed falls back on the global
        champion's version, not on its old one."""
        if ref.path is not None:
            return
        if site is not None and ref.alias != site_alias(site):
            self.forget(site)
            site = None
        record = {"name": ref.name, "version": ref.version, "alias": ref.alias, "run_id": ref.run_id}
        write_text(self._last_known_good_file(site), json.dumps(record))

    def forget(self, site: str | None) -> None:
        """Drop `site`'s last known good record: its champion was withdrawn, so no replica may fall back on it."""
        self._last_known_good_file(site).unlink(missing_ok=True)

    def last_known_good(self, site: str | None) -> ModelRef | None:
        """The version last served for `site` on this host (the global champion's for a site without a record of
        its own), if its files are still whole in the cache; None otherwise. Reads only local disk: it is what a
        replica falls back on when the registry cannot answer."""
        record = self._last_known_good_file(site)
        if site is not None and not record.is_file():
            record = self._last_known_good_file(None)
        if self.model_dir or not record.is_file():
            return None
        try:
            saved = json.loads(record.read_text())
            ref = ModelRef(saved["name"], str(saved["version"]), saved.get("alias"), run_id=saved.get("run_id"))
        except (ValueError, KeyError, TypeError):
            return None
        folder = self.cache_dir / ref.name / ref.version
        if not ((folder / MODEL_FILE).is_file() and (folder / WEIGHTS_FILE).is_file()):
            return None
        if ref.run_id is not None and cached_identity(folder) != ref.run_id:
            return None  # the cache now holds another model under that number
        return ref

    def load_cached(self, ref: ModelRef) -> Classifier:
        """Load a version from the local cache alone, without asking the registry (the last-known-good path)."""
        return load_model(self.cache_dir / ref.name / ref.version, self.runtime)

    def _last_known_good_file(self, site: str | None) -> Path:
        return self.cache_dir / self.name / "last-known-good" / f"{site or '_global'}.json"

    def site_versions(self) -> dict[str | None, ModelRef]:
        """Every alias-served site and its version (None: the global champion); one entry for a local model."""
        if self.model_dir:
            return {None: self.resolve(None)}
        aliases = self.registry.aliases(self.name)  # NotRegistered or RegistryUnavailable, never a guess
        served: dict[str | None, ModelRef] = {}
        for alias, version in sorted(aliases.items()):
            if alias == CHAMPION:
                served[None] = ModelRef(self.name, str(version), alias)
            elif site_of(alias) is not None:
                served[site_of(alias)] = ModelRef(self.name, str(version), alias)
        return served


def local_ref(directory: Path) -> ModelRef:
    """The identity of a model directory outside the registry: its name and a hash of its files, so two
    different models in directories of the same name are never taken for one version."""
    return ModelRef(directory.name, f"local-{_content_hash(directory)}", None, directory)


def _content_hash(directory: Path) -> str:
    """A hash of what a model's answers depend on: its `model.json` and weights, and those of the models it
    holds (a cascade keeps its teacher and student in sub-directories); training checkpoints are left out."""
    if not (directory / MODEL_FILE).is_file():
        raise ModelLoadError(f"{directory}: not a CytoLoop model directory (no {MODEL_FILE})")
    nested = sorted(
        path
        for name in (MODEL_FILE, WEIGHTS_FILE)
        for path in directory.rglob(name)
        if path.parent != directory and "checkpoints" not in path.relative_to(directory).parts
    )
    top = [directory / name for name in (MODEL_FILE, WEIGHTS_FILE) if (directory / name).is_file()]
    if not any(path.name == WEIGHTS_FILE for path in top + nested):
        raise ModelLoadError(f"{directory}: not a CytoLoop model directory (no {WEIGHTS_FILE} in it)")
    digest = hashlib.sha256()
    for path in top:
        digest.update(path.read_bytes())
    for path in nested:
        digest.update(str(path.relative_to(directory)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def without_credentials(uri: str) -> str:
    """`uri` without its user name and password and without its query and fragment, where database drivers take
    them too (`postgresql://db/mlflow?user=u&password=p`: `/v1/models` showed that to every API-key holder)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(uri)
    if "@" in parts.netloc:
        uri = urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))
    return uri.split("?", 1)[0].split("#", 1)[0]  # textually: urlunsplit writes sqlite:////srv as sqlite://srv

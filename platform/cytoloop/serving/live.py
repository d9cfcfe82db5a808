"""The model each site is served by right now, following its alias without failing a request.

A `LiveModel` is one site's current model. `refresh()` re-resolves the alias and, when it moved, loads the new
version and swaps it in with one assignment: a batch already running keeps the service it started with, the next
one gets the new version, and no request fails over the switch. Loaded versions are shared between sites (many
sites fall back to the same champion) in a `ServiceCache` and freed when no site uses them any more.

When the version a site should get cannot be had (the registry does not answer, or the version's files do not
load), a site keeps serving what it has; a site that has nothing yet (a new replica) serves its last known good
version from local disk (`ModelSource.last_known_good`). Either way `fallback` says why, in words fit for anyone
(no internals), until a later `refresh()` gets the current version. A definite "no such alias" is not a reason to
fall back: a champion withdrawn on purpose must stop being served, by a new replica and by one already serving it
(`service` then raises the registry's NotRegistered until the alias is back).

A site that reports its own classes (`sites.<site>.classes`) gets a service deciding among those; sites on the
same version share its loaded model whatever their classes.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Sequence
from dataclasses import replace

from cytoloop.config import RoutingConfig
from cytoloop.errors import UsageError
from cytoloop.models.base import Classifier
from cytoloop.serving.inference import CellService
from cytoloop.serving.model_source import ModelRef, ModelSource

logger = logging.getLogger(__name__)


class LiveModel:
    """One site's current model service; `refresh()` follows its alias. Thread-safe; never blocks readers.

    `fallback` is None while the site gets the version its alias names; otherwise it says why another version (the
    one already loaded, or the last known good) serves it. Raises when there is nothing at all to serve. `classes`:
    the site's own classes (`SiteConfig.classes`), which every version serving it decides among."""

    def __init__(
        self, site: str | None, source: ModelSource, services: ServiceCache, classes: Sequence[str] | None = None
    ):
        from cytoloop.registry import NotRegistered, RegistryUnavailable

        self.site, self.source, self.services = site, source, services
        self.classes = None if classes is None else tuple(classes)
        self._lock = threading.Lock()
        # the service answering the site and why it is a fallback (None: its alias's version), one tuple assigned
        # at once: read as two attributes while `refresh` ran in a thread, an answer of the new version could carry
        # the old one's fallback text
        self._now: tuple[CellService, str | None]
        self.withdrawn: Exception | None = None  # the registry said no version serves the site any more
        try:
            ref = source.resolve(site)
        except RegistryUnavailable as error:
            self._now = self._last_known_good("the registry could not be read", error)
            return
        except NotRegistered:
            self._forget_withdrawn()
            raise
        try:
            self._now = (services.get(ref, classes=self.classes), None)
        except UsageError:  # the site's classes do not fit its model: a setting to fix, not a version to skip
            raise
        except Exception as error:  # corrupt or unloadable files: anything but the version itself is fine
            self._now = self._last_known_good(f"version {ref.version} could not be loaded", error, ref)
            return
        self._remember(ref)

    def snapshot(self) -> tuple[CellService, str | None]:
        """The service answering the site now and, when it is not its alias's version, why: read together, as one
        moment's. Raises the registry's NotRegistered while its champion is withdrawn (a later `refresh()` that
        finds an alias again serves that version)."""
        now, withdrawn = self._now, self.withdrawn
        if withdrawn is not None:
            raise withdrawn
        return now

    @property
    def service(self) -> CellService:
        """`snapshot()`'s service (raises as it does)."""
        return self.snapshot()[0]

    @property
    def fallback(self) -> str | None:
        """Why the service answering now is not the alias's version (None when it is)."""
        return self._now[1]

    def refresh(self) -> bool:
        """Re-resolve the alias; load and switch to a new version. Returns whether what is served changed (a new
        version, the current one again after a fallback, or any after a withdrawal). Raises when the alias cannot
        be read or its version cannot be loaded; the loaded service keeps serving meanwhile. Raises NotRegistered
        when no alias serves the site any more, and from then on serves nothing until one does."""
        from cytoloop.registry import NotRegistered

        with self._lock:
            try:
                ref = self.source.resolve(self.site)
            except NotRegistered as error:
                if self.withdrawn is None:
                    logger.warning("site %s: withdrawn, no longer served: %s", self.site or "*", error)
                self.withdrawn = error
                self._forget_withdrawn()
                raise
            current, fallback = self._now
            if ref == current.ref:
                if fallback is None and self.withdrawn is None:
                    return False
                service = current
            else:
                try:  # a failure here leaves a withdrawn site withdrawn: the old version is not served again
                    service = self.services.get(ref, classes=self.classes)
                except UsageError as error:  # a new version without one of the site's classes: keep the old one
                    self._now = (current, f"version {ref.version} cannot decide among this site's classes: {error}")
                    raise
                except Exception:
                    self._now = (current, f"version {ref.version} could not be loaded")
                    raise
            self._now = (service, None)  # one assignment: readers see the old service or the new one, each whole
            self.withdrawn = None
            self._remember(ref)
            return True

    def _remember(self, ref: ModelRef) -> None:
        """Record `ref`, just loaded, as the site's last known good version if its alias still names it: a load
        takes a while (a download), and a replica that recorded a version rolled back meanwhile had every new
        replica serve it while the registry was down. Unconfirmed (the registry gone again), nothing is recorded:
        the record keeps the last version confirmed."""
        if ref.path is not None:  # a local directory: no record (`ModelSource.remember`)
            return
        try:
            now = self.source.resolve(self.site)
        except Exception as error:
            logger.warning("site %s: v%s not recorded as last known good: %s", self.site or "*", ref.version, error)
            return
        if now != ref:
            logger.warning(
                "site %s: v%s loaded, but its alias names v%s now (moved while it loaded): not recorded",
                self.site or "*",
                ref.version,
                now.version,
            )
            return
        self.source.remember(self.site, ref)

    def _forget_withdrawn(self) -> None:
        """Neither the site's alias nor the global champion serves it (`NotRegistered`): no replica that starts while
        the registry is down may fall back on either record (a site without a record of its own reads the global
        one)."""
        self.source.forget(self.site)
        self.source.forget(None)

    def _last_known_good(
        self, why: str, error: Exception, failed: ModelRef | None = None
    ) -> tuple[CellService, str | None]:
        ref = self.source.last_known_good(self.site)
        if ref is None or ref == failed:
            raise error
        service = self.services.get(ref, cached_only=True, classes=self.classes)
        fallback = f"{why}; serving the last known good version {ref.version}"
        logger.warning("site %s: %s (%s)", self.site or "*", fallback, error)
        return service, fallback


class ServiceCache:
    """Loaded model versions, shared by every site they serve and dropped when none holds them any more: one
    service per version and class set, one loaded model per version."""

    def __init__(self, source: ModelSource, routing: RoutingConfig):
        self.source, self.routing = source, routing
        self._loaded: weakref.WeakValueDictionary = weakref.WeakValueDictionary()  # (ref, classes) -> service
        self._models: weakref.WeakValueDictionary = weakref.WeakValueDictionary()  # version (no alias) -> model
        self._lock = threading.Lock()  # the two tables and the routing: held briefly, never while a model loads
        self._loading: dict[ModelRef, threading.Lock] = {}  # one lock per version being loaded

    def _load_once(self, ref: ModelRef, version: ModelRef, loading: threading.Lock, cached_only: bool) -> Classifier:
        """Load `ref` under its version's lock: a second caller of the same version waits, then finds it loaded."""
        with loading:
            with self._lock:
                model = self._models.get(version)
            if model is None:
                model = self.source.load_cached(ref) if cached_only else self.source.load(ref)
                with self._lock:  # before the next caller of this version is let in
                    self._models[version] = model
            return model

    def _forget_loading(self, ref: ModelRef, loading: threading.Lock) -> None:
        """Drop `ref`'s load lock if it is still the one this caller used (under `_lock`): a later loader's stays."""
        if self._loading.get(ref) is loading:
            del self._loading[ref]

    def set_routing(self, routing: RoutingConfig) -> None:
        """New routing thresholds for every loaded version and every later one (a reconfigured deployment)."""
        with self._lock:
            self.routing = routing
            for service in list(self._loaded.values()):
                service.routing = routing

    def get(self, ref: ModelRef, cached_only: bool = False, classes: Sequence[str] | None = None) -> CellService:
        """The service of `ref` deciding among `classes` (None: all), loading the version once; `cached_only` loads
        from the local cache without the registry. Raises UsageError when the version lacks one of `classes`.

        A version loads under a lock of its own: loaded under the cache's one lock, a download held up every
        other site's service, loaded or not, and a reconfigure, for as long as it took. One version is one loaded
        model whichever alias chose it (a site's alias on the global champion's version: it was loaded twice)."""
        key = (ref, None if classes is None else tuple(classes))
        version = replace(ref, alias=None)  # the loaded model's key: the version, not the alias that chose it
        with self._lock:
            service = self._loaded.get(key)
            if service is not None:
                return service
            model = self._models.get(version)
            if model is None:
                loading = self._loading.setdefault(version, threading.Lock())
        if model is None:
            try:
                model = self._load_once(ref, version, loading, cached_only)
            finally:
                with self._lock:
                    self._forget_loading(version, loading)
        with self._lock:
            service = self._loaded.get(key)
            if service is None:
                service = CellService(model, ref, self.routing, classes)
                self._loaded[key] = service
            return service

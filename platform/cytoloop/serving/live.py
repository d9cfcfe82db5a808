"""The model each site is served by right now, following its alias without failing a request.

A `LiveModel` is one site's current model. `refresh()` re-resolves the alias and, when it moved, loads the new
version and swaps it in with one assignment: a batch already running keeps the service it started with, the next
one gets the new version, and no request fails over the switch. Loaded versions are shared between sites (many
sites fall back to the same champion) in a `ServiceCache` and freed when no site uses them any more.
"""

from __future__ import annotations

import threading
import weakref

from cytoloop.config import RoutingConfig
from cytoloop.serving.inference import CellService
from cytoloop.serving.model_source import ModelRef, ModelSource


class LiveModel:
    """One site's current model service; `refresh()` follows its alias. Thread-safe; never blocks readers."""

    def __init__(self, site: str | None, source: ModelSource, services: ServiceCache):
        self.site, self.source, self.services = site, source, services
        self._lock = threading.Lock()
        self.service = services.get(source.resolve(site))

    def refresh(self) -> bool:
        """Re-resolve the alias; load and switch to a new version. Returns whether the version changed."""
        with self._lock:
            ref = self.source.resolve(self.site)
            if ref == self.service.ref:
                return False
            self.service = self.services.get(ref)  # one assignment: readers see the old or the new service
            return True


class ServiceCache:
    """Loaded model versions, shared by every site they serve and dropped when none holds them any more."""

    def __init__(self, source: ModelSource, routing: RoutingConfig):
        self.source, self.routing = source, routing
        self._loaded: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
        self._lock = threading.Lock()

    def get(self, ref: ModelRef) -> CellService:
        with self._lock:
            service = self._loaded.get(ref)
            if service is None:
                service = CellService(self.source.load(ref), ref, self.routing)
                self._loaded[ref] = service
            return service

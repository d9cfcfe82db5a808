"""The classifier deployment: per-site models (`@serve.multiplexed`), batched calls (`@serve.batch`), live aliases.

Thin over the library: a site's model is a `LiveModel` (serving/live.py) and a model call is one
`CellService.classify` (inference.py). What this file adds is Ray Serve's part:

- The ingress calls `classify(site_key, cells)` through a handle with `multiplexed_model_id=site_key`, so requests
  go to replicas that already hold that site's model; each replica keeps up to `SITE_MODELS_PER_REPLICA` sites.
  A site's model is loaded before its request joins a batch, so a load holds up no other site's requests.
- `@serve.batch` combines concurrent requests; `ModelCalls` (model_calls.py) merges the batches that pile up
  while the model is busy into the next model call, of up to `serve.max_batch_size` requests. Ray 2.60 already
  splits a batch by multiplexed model id (ray#56633, fixed by ray#59334); each request also carries its own site
  key and model calls never mix versions, so the guarantee does not rest on Ray's internals
  (tests/integration/test_serving.py checks it).
- A background task re-resolves every loaded site's alias each `serve.alias_poll_s` and swaps in a moved alias's
  version (`LiveModel.refresh`); a batch in flight finishes on the version it started with.
- Each answered batch goes to the replica's prediction log (serving/prediction_log.py), whose events are built and
  written in the background, after the answers go back: a hung log disk holds no answer. A stopping replica waits
  up to `LOG_CLOSE_WAIT_S` for the events still waiting (Serve awaits `__del__` before it ends the process, within
  `STOP_TIMEOUT_S`).
- `user_config` (`LiveConfig`: routing thresholds, batching, alias polling) is applied by `reconfigure`, in
  place: changing it in a Serve config file (`deployments:` of infra/serve.yaml) reconfigures the running
  replicas, with their loaded models, instead of restarting them.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field
from ray import serve

from cytoloop.config import RoutingConfig, Settings
from cytoloop.serving.inference import CellFailure, CellResult
from cytoloop.serving.live import LiveModel, ServiceCache
from cytoloop.serving.model_source import ModelRef, ModelSource
from cytoloop.serving.prediction_log import PredictionLog
from services.model_calls import Cells, ModelCalls

GLOBAL_KEY = "*"  # multiplexed model id of the global champion (no valid site name contains '*')
SITE_MODELS_PER_REPLICA = 8  # a decorator argument: Ray reads it when the class is defined
# A replica's graceful stop (a redeploy, a scale-down, an app deleted): Serve lets the requests in flight end
# (a 200-cell smear takes 30 s on a 2-core CPU), then awaits `__del__` (the log's last events, up to
# LOG_CLOSE_WAIT_S), and kills the replica STOP_TIMEOUT_S after the stop began (Serve's default: 20 s).
STOP_TIMEOUT_S = 60.0
LOG_CLOSE_WAIT_S = 10.0
logger = logging.getLogger("ray.serve")


def site_key(site: str | None) -> str:
    return site or GLOBAL_KEY


@dataclass(frozen=True)
class Answer:
    """One request's answer: its cells in order, the model version that classified them, the batch it rode in."""

    cells: list[CellResult | CellFailure]
    model: ModelRef
    kind: str
    classes: list[str]
    batch: dict
    fallback: str | None = None  # why this is the last known good version and not the alias's (None: it is)


@dataclass(frozen=True)
class Refusal:
    """A request the replica could not answer, and the HTTP status the gateway gives it: 503 when no model can
    be loaded for its site, 500 when the model failed on its cells. It fails that request only."""

    status: int
    detail: str


def _no_model(key: str, error: Exception) -> Refusal:
    """The answer for a site whose model cannot be had now (the caller answers 503). A registry's errors stay in
    the log (they name its address, credentials and all); the others, such as a site configured with a class its
    model lacks, are the deployment's to read and fix."""
    from cytoloop.registry import RegistryError

    logger.warning("no model for site %s: %r", key, error)
    why = "the service log says why" if isinstance(error, RegistryError) else str(error)
    return Refusal(503, f"no model for site {key!r} now: {why}")


class LiveConfig(BaseModel):
    """What a running replica may change without a restart (the deployment's `user_config`), validated here: a
    bad value fails the update with a message naming the field, and the replicas keep their settings."""

    model_config = ConfigDict(extra="forbid")
    routing: RoutingConfig | None = None
    max_batch_size: int | None = Field(None, ge=1)
    batch_wait_s: float | None = Field(None, ge=0)
    alias_poll_s: float | None = Field(None, gt=0)


def live_config(settings: Settings) -> dict:
    """The `user_config` a deployment starts with: these settings' live part."""
    serve_config = settings.serve
    return LiveConfig(
        routing=settings.routing,
        max_batch_size=serve_config.max_batch_size,
        batch_wait_s=serve_config.batch_wait_s,
        alias_poll_s=serve_config.alias_poll_s,
    ).model_dump(mode="json")


@serve.deployment(name="Classifier")
class Classifier:
    async def __init__(self, settings: Settings):
        self.config = settings.serve
        if self.config.torch_threads:
            import torch

            torch.set_num_threads(self.config.torch_threads)
        self.settings = settings  # its `sites` say which classes each site's cells are decided among
        self.source = ModelSource(settings.serve, settings.registry, settings.scoring)
        self.services = ServiceCache(self.source, settings.routing)
        self.live: weakref.WeakSet[LiveModel] = weakref.WeakSet()  # the sites this replica holds (Ray evicts LRU)
        self.model_calls = ModelCalls(self.config.max_batch_size, serve.get_replica_context().replica_id.unique_id)
        self._classify_batch.set_max_batch_size(self.config.max_batch_size)
        self._classify_batch.set_batch_wait_timeout_s(self.config.batch_wait_s)
        self.poller = asyncio.get_running_loop().create_task(self._follow_aliases())
        self.site_loads: dict[str, asyncio.Future] = {}  # a site's model being loaded, shared by its requests
        # the drift monitor's log, written off the answer path (a hung log disk held every answer)
        self.prediction_log = None
        if self.config.prediction_log is not None:
            self.prediction_log = PredictionLog(self.config.prediction_log)
            self.prediction_log.start()

    async def __del__(self) -> None:
        """Serve's graceful stop of this replica: the prediction log's waiting events go to disk first. (Serve awaits
        it once; were Python to finalise the object itself, it would only make a coroutine nobody awaits.)"""
        if getattr(self, "prediction_log", None) is not None:  # (a constructor that failed set none)
            await self.prediction_log.close(LOG_CLOSE_WAIT_S)

    def reconfigure(self, user_config: dict) -> None:
        """Apply a new `LiveConfig` to this running replica (Ray Serve calls it at start and on every change)."""
        live = LiveConfig.model_validate(user_config or {})
        if live.routing is not None:
            self.services.set_routing(live.routing)
        update = {k: v for k, v in live.model_dump(exclude={"routing"}).items() if v is not None}
        self.config = self.config.model_copy(update=update)
        self.model_calls.max_requests = self.config.max_batch_size
        self._classify_batch.set_max_batch_size(self.config.max_batch_size)
        self._classify_batch.set_batch_wait_timeout_s(self.config.batch_wait_s)
        logger.info("reconfigured: %s", live.model_dump(exclude_none=True))
        if self.config.max_batch_size >= self.config.max_ongoing_requests:  # the settings refuse it at start
            logger.warning(
                "max_batch_size %d is not below max_ongoing_requests %d (as started): batches and model calls "
                "stop at the requests a replica is given at once; raise max_ongoing_requests with it",
                self.config.max_batch_size,
                self.config.max_ongoing_requests,
            )

    @serve.multiplexed(max_num_models_per_replica=SITE_MODELS_PER_REPLICA)
    async def site_model(self, key: str) -> LiveModel:
        site = None if key == GLOBAL_KEY else key
        live = await asyncio.to_thread(LiveModel, site, self.source, self.services, self.settings.site_classes(site))
        self.live.add(live)
        return live

    async def classify(self, key: str, cells: Cells) -> Answer | Refusal:
        """Classify one request's (name, bytes) cells for the site `key` (the ingress's call). The site's model is
        loaded here, before the request joins a batch: loaded inside the batch, a new site's load (a download, a
        registry that takes minutes to fail) held one of the replica's batch slots, and the requests of sites
        already loaded waited behind it."""
        try:
            live = await self._site(key)
        except Exception as error:  # registry down, alias missing, unreadable model: the caller answers 503
            return _no_model(key, error)
        return await self._classify_batch(key, live, cells)

    async def _site(self, key: str) -> LiveModel:
        """The site's model, one load at a time per site: concurrent requests for a site not loaded yet share its
        load (and its failure), instead of each failing the same load in turn under Ray's multiplex lock."""
        loading = self.site_loads.get(key)
        if loading is None:
            loading = self.site_loads[key] = asyncio.ensure_future(self.site_model(key))
            loading.add_done_callback(lambda _: self.site_loads.pop(key, None))  # the next request loads afresh
        return await asyncio.shield(loading)

    # batch size and wait are set from the config in __init__; up to 4 Ray batches wait here to be merged
    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.02, max_concurrent_batches=4)
    async def _classify_batch(
        self, keys: list[str], lives: list[LiveModel], requests: list[Cells]
    ) -> list[Answer | Refusal]:
        """Classify each request's cells with the site model `classify` found for it. A failure stays with its
        request (`Refusal`): the other requests of the batch, other sites' above all, still get their answers."""
        groups: dict[tuple[str, LiveModel], list[int]] = {}  # one model call per site and model object
        for i, (key, live) in enumerate(zip(keys, lives)):
            groups.setdefault((key, live), []).append(i)
        answers: list[Answer | Refusal | None] = [None] * len(keys)
        await asyncio.gather(
            *(self._classify_site(key, live, members, requests, answers) for (key, live), members in groups.items())
        )
        return answers

    async def _classify_site(
        self, key: str, live: LiveModel, members: list[int], requests: list[Cells], answers: list
    ) -> None:
        try:
            service, fallback = live.snapshot()  # fixed for these requests even if the alias moves
        except Exception as error:  # withdrawn since it was found (`LiveModel.service` raises)
            refusal = _no_model(key, error)
            for i in members:
                answers[i] = refusal
            return
        submitted = [self.model_calls.submit(service, [requests[i]]) for i in members]
        outcomes = await asyncio.gather(*submitted, return_exceptions=True)  # merged into calls all the same
        for i, outcome in zip(members, outcomes):
            if isinstance(outcome, BaseException):
                logger.warning("the model failed on a request for site %s: %r", key, outcome)
                answers[i] = Refusal(500, f"the model ({service.ref.version}) failed on these cells: {outcome}")
            else:
                results, batch = outcome
                answers[i] = Answer(results[0], service.ref, service.model.kind, service.classes, batch, fallback)
        if self.prediction_log is not None:  # written in the background, after the answers go back
            answered = [i for i in members if isinstance(answers[i], Answer)]
            self.prediction_log.record(
                [cell for i in answered for cell in requests[i]],
                [result for i in answered for result in answers[i].cells],
                None if key == GLOBAL_KEY else key,
                service.ref.version,
                service.model.data_config,
            )

    async def ready(self) -> tuple[str, str | None]:
        """Load the global model if needed; returns its version and, when it is the last known good one, why
        (raises if none can be served)."""
        service, fallback = (await self.site_model(GLOBAL_KEY)).snapshot()
        return service.ref.version, fallback

    async def served(self) -> dict[str, tuple[ModelRef, str | None, str]]:
        """What this replica serves to each site it holds (site key -> version, fallback reason, model kind); a
        site withdrawn meanwhile is left out (it raised, and the whole view was lost)."""
        held = {}
        for live in list(self.live):
            try:
                service, fallback = live.snapshot()
            except Exception:  # withdrawn: not served here any more
                continue
            held[site_key(live.site)] = (service.ref, fallback, service.model.kind)
        return held

    async def _follow_aliases(self) -> None:
        while True:
            await asyncio.sleep(self.config.alias_poll_s)
            for live in list(self.live):
                try:
                    if await asyncio.to_thread(live.refresh):
                        logger.info(
                            "site %s now served by %s v%s",
                            site_key(live.site),
                            live.service.ref.name,
                            live.service.ref.version,
                        )
                except Exception as error:  # keep serving the loaded version; try again next period
                    logger.warning("alias check for site %s failed: %s", site_key(live.site), error)

"""The serving application: the Gateway (HTTP ingress) in front of the Classifier, configured from `Settings`.

Three ways in, one builder: `build_app(settings)` (tests, benchmarks), `build(args)` (the `import_path` of
infra/serve.yaml for `serve deploy`), and `run_local(settings)` (`cytoloop serve`). Relative paths in the settings
are made absolute here, in the process that reads them: replicas run in other working directories.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from pydantic import BaseModel, ConfigDict
from ray import serve
from ray.serve import Application

from cytoloop.config import Settings, load_settings
from cytoloop.errors import UsageError
from services.classifier import STOP_TIMEOUT_S, Classifier, live_config
from services.gateway import Gateway

SQLITE_PREFIX = "sqlite:///"


class AppArgs(BaseModel):
    """Arguments of `build` in a Serve config file (`args:`)."""

    model_config = ConfigDict(extra="forbid")
    config: Path | None = None  # a JSON settings file; CYTOLOOP_* environment variables override it


def absolute_paths(settings: Settings) -> Settings:
    registry, serve_config = settings.registry, settings.serve
    uri = registry.tracking_uri
    if uri.startswith(SQLITE_PREFIX) and not uri[len(SQLITE_PREFIX) :].startswith("/"):
        uri = SQLITE_PREFIX + str(Path(uri[len(SQLITE_PREFIX) :]).resolve())
    return settings.model_copy(
        update={
            "home": Path(settings.home).resolve(),
            "registry": registry.model_copy(
                update={"tracking_uri": uri, "cache_dir": Path(registry.cache_dir).resolve()}
            ),
            "serve": serve_config.model_copy(
                update={
                    "model_dir": Path(serve_config.model_dir).resolve() if serve_config.model_dir else None,
                    "prediction_log": (
                        Path(serve_config.prediction_log).resolve() if serve_config.prediction_log else None
                    ),
                }
            ),
        }
    )


def build_app(settings: Settings, user_config: dict | None = None) -> Application:
    """The application; `user_config` (a `LiveConfig` as a dict) replaces the live part the settings give, as a
    Serve config file's `deployments:` block does, so that changing it alone reconfigures replicas in place."""
    settings = absolute_paths(settings)
    config = settings.serve
    if config.min_replicas == config.max_replicas:
        scaling = {"num_replicas": config.min_replicas}
    else:
        scaling = {
            "autoscaling_config": {
                "min_replicas": config.min_replicas,
                "max_replicas": config.max_replicas,
                "target_ongoing_requests": config.target_ongoing_requests,
            }
        }
    classifier = Classifier.options(
        user_config=live_config(settings) if user_config is None else user_config,
        max_ongoing_requests=config.max_ongoing_requests,
        ray_actor_options={"num_cpus": config.num_cpus, "num_gpus": config.num_gpus},
        graceful_shutdown_timeout_s=STOP_TIMEOUT_S,
        **scaling,
    ).bind(settings)
    # the gateway holds every request its classifiers may take at once, or it would cap their batches
    return Gateway.options(
        max_ongoing_requests=config.max_ongoing_requests * config.max_replicas,
        ray_actor_options={"num_cpus": 0.1},
    ).bind(classifier, settings)


def build(args: dict) -> Application:
    """`import_path: services.app:build` in a Serve config file. Ray hands the `args:` block over as a dict (this
    module's postponed annotations hide a pydantic type from it), so it is validated here, naming what is wrong."""
    return build_app(load_settings(AppArgs.model_validate(args or {}).config))


def start_serve(settings: Settings) -> None:
    """Start Serve's HTTP proxy on serve.host:serve.port, or join this Ray's running Serve. Refused, naming the
    port, when another program holds it: Ray's proxy binds with SO_REUSEPORT, so a second Serve of the same user
    on one port (another home's demo, a `cytoloop serve` left running) started without a word, and the kernel
    shared the connections out between the two: cells were answered by the other's models, with version numbers
    that matched (every registry starts at v1)."""
    import ray

    config = settings.serve
    if not (ray.is_initialized() and _serve_running()):
        with socket.socket() as probe:  # as an ordinary server binds: refused by any listener on the port
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a closed connection's TIME_WAIT is no one
            try:
                probe.bind((config.host, config.port))
            except OSError as error:
                raise UsageError(
                    f"serve.port {config.port} on {config.host} is taken by another program ({error.strerror}): "
                    "another Serve (a demo of another home, a `cytoloop serve`) or any server; stop it, or give "
                    "this one another port (CYTOLOOP_SERVE__PORT)"
                ) from None
    serve.start(http_options={"host": config.host, "port": config.port})


def _serve_running() -> bool:
    """Whether this Ray cluster runs Serve already (its controller actor): its proxy holds the port then."""
    import ray

    try:
        ray.get_actor("SERVE_CONTROLLER_ACTOR", namespace="serve")  # ray.serve._private.constants' names
    except ValueError:
        return False
    return True


def run_local(settings: Settings, num_cpus: int | None = None) -> None:
    """Start (or join, with RAY_ADDRESS) Ray, serve the app on serve.host:serve.port, block until Ctrl-C."""
    import ray

    # Ray starts its workers at niceness +15; replicas and the HTTP proxy are the latency path and, on a machine
    # shared with training, would otherwise be starved (the proxy then fails its start-up checks)
    os.environ.setdefault("RAY_worker_niceness", "0")
    ray.init(num_cpus=num_cpus, include_dashboard=False)
    start_serve(settings)
    try:
        serve.run(build_app(settings), name=settings.serve.app_name, route_prefix="/", blocking=True)
    except KeyboardInterrupt:
        pass
    finally:  # remove our app only: a joined cluster may serve others
        serve.delete(settings.serve.app_name)
        ray.shutdown()

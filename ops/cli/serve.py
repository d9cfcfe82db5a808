"""`cytoloop serve`: the classifier over HTTP on Ray Serve."""

from __future__ import annotations

from pathlib import Path

import typer

from ops.cli.common import app, fail, run, settings_from


@app.command()
def serve(
    config: Path | None = typer.Option(None, help="JSON settings file (CYTOLOOP_SERVE__* variables override it)"),
    host: str | None = typer.Option(None, help="interface to bind (default serve.host, 127.0.0.1)"),
    port: int | None = typer.Option(None, min=1, max=65535, help="HTTP port (default serve.port, 8000)"),
    model_dir: Path | None = typer.Option(
        None,
        "--model",
        "--model-dir",
        help="serve this model directory instead of the registry (--model-dir: former name)",
    ),
    num_cpus: int | None = typer.Option(None, min=1, help="CPUs of the local Ray instance (default: all)"),
    insecure: bool = typer.Option(
        False, "--insecure", help="allow a non-loopback --host without an API key (a trusted network only)"
    ),
) -> None:
    """Serve the classifier over HTTP with Ray Serve until Ctrl-C (API docs at /docs). Joins the Ray cluster in
    RAY_ADDRESS if set, else starts a local one. Set the API key with CYTOLOOP_SERVE__API_KEY, not on the command
    line."""

    def action():
        import os

        from services.app import run_local

        if num_cpus is not None and os.environ.get("RAY_ADDRESS"):  # Ray's ValueError was a traceback, exit 1
            fail(
                f"--num-cpus sizes a local Ray; with RAY_ADDRESS ({os.environ['RAY_ADDRESS']}) serve joins that "
                "cluster, whose CPUs are its own: leave --num-cpus out"
            )
        if model_dir is not None:  # a damaged model is named here, not in a Serve replica's traceback
            from cytoloop.models.loading import load_model

            load_model(model_dir)
        overrides = {"host": host, "port": port, "model_dir": model_dir, "insecure": insecure or None}
        settings = settings_from(config, {"serve": overrides})
        source = (
            settings.serve.model_dir or f"registry model {settings.serve.model_name or settings.registry.model_name}"
        )
        typer.echo(
            f"serving {source} on http://{settings.serve.host}:{settings.serve.port} (docs at /docs); Ctrl-C stops"
        )
        run_local(settings, num_cpus=num_cpus)

    run(action)

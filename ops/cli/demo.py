"""`cytoloop demo`: the whole active-learning loop, end to end (jobs/cycle.py)."""

from __future__ import annotations

from pathlib import Path

import typer

from ops.cli.common import app, run, settings_from, split_list


@app.command()
def demo(
    data: Path | None = typer.Option(
        None,
        help="cells: manifest CSV or class folders (default: datasets.root, "
        "else a dataset fetched by `cytoloop data fetch`)",
    ),
    rounds: int | None = typer.Option(None, help="active-learning rounds (demo.rounds)"),
    domains: str | None = typer.Option(None, help="comma-separated labs/domains to use (default: all)"),
    classes: str | None = typer.Option(None, help="comma-separated classes to use (default: all)"),
    budget: int | None = typer.Option(None, help="cells sent to Label Studio per round"),
    steps: int | None = typer.Option(None, help="training steps of the seed model (train.steps)"),
    finetune_steps: int | None = typer.Option(None, help="fine-tuning steps per round (finetune.steps)"),
    config: Path | None = typer.Option(None, help="JSON settings file"),
) -> None:
    """Run the whole loop on real cells: stack up, seed model, Serve, score the pool with Ray Data, route to Label
    Studio, simulated annotators label, sync, fine-tune on Ray Train, gate and promote, Serve switches; R rounds.
    Writes a report with plots and prints the Label Studio, MLflow and Ray dashboard URLs."""

    def action():
        from cytoloop.data.datasets import resolve_data
        from jobs.cycle import Demo

        settings = settings_from(
            config,
            {
                "demo": {
                    "rounds": rounds,
                    "domains": split_list(domains),
                    "classes": split_list(classes),
                    "budget": budget,
                },
                "train": {"steps": steps},
                "finetune": {"steps": finetune_steps},
            },
        )
        source = resolve_data(data, settings.datasets.root, settings.datasets.cache_dir)
        outcome = Demo(settings, source).run()
        typer.echo(f"done: {len(outcome.rounds) - 1} round(s); report {outcome.report}")

    run(action)

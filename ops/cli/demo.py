"""`cytoloop demo`: the whole loop as a lab lives it, end to end (jobs/cycle.py)."""

from __future__ import annotations

from pathlib import Path

import typer

from ops.cli.common import app, fail, run, settings_from, split_list


def parse_sites(values: list[str] | None) -> dict[str, list[str]] | None:
    """`--site NAME=LAB[,LAB...]`, repeated: each site and its labs; a malformed one is an error naming it."""
    from cytoloop.config import check_site_name
    from cytoloop.errors import UsageError

    if not values:
        return None
    sites: dict[str, list[str]] = {}
    for value in values:
        name, _, labs = value.partition("=")
        domains = split_list(labs)
        if not name.strip() or not domains:
            fail(f"--site {value!r}: expected NAME=LAB[,LAB...], for example site-a=jtsc,bccd")
        if name.strip() in sites:
            fail(f"--site {name.strip()!r} is given twice")
        try:
            check_site_name(name.strip(), f"in --site {value!r}")
        except UsageError as error:
            fail(str(error))
        sites[name.strip()] = domains or []
    return sites


@app.command()
def demo(
    data: Path | None = typer.Option(
        None,
        help="cells: manifest CSV or folder with manifest.csv, holding the sites' labs and the blasts' lab "
        "(default: datasets.root, else a dataset fetched by `cytoloop data fetch`)",
    ),
    base_model: Path | None = typer.Option(
        None, "--base-model", help="model directory registered as the global champion (demo.base_model)"
    ),
    site: list[str] | None = typer.Option(
        None, "--site", help="NAME=LAB[,LAB...]: a site and the labs whose cells are its pool; repeat per site"
    ),
    rounds: int | None = typer.Option(None, min=1, help="active-learning rounds (demo.rounds)"),
    classes: str | None = typer.Option(None, help="comma-separated classes of the sites' cells to use (default: all)"),
    budget: int | None = typer.Option(None, min=1, help="cells sent to Label Studio per site and round"),
    blast_share: float | None = typer.Option(None, help="share of each site's pool made of mixed-in blasts"),
    pool_limit: int | None = typer.Option(
        None, help="pool cells scored per site and round, drawn afresh each round (default: the whole pool)"
    ),
    finetune_steps: int | None = typer.Option(
        None, help="fine-tuning steps per site and round (adapt.steps: each is the site's adaptation)"
    ),
    config: Path | None = typer.Option(None, help="JSON settings file"),
) -> None:
    """Run the loop over several sites: stack up, the base model registered as @champion, Serve; per round and
    site: score the site's pool (blasts mixed in) with Ray Data through Serve, route to its Label Studio project,
    simulated annotators label, sync, fine-tune on Ray Train, gate on the site's frozen cells, move
    champion-<site> or record the refusal, Serve switches for that site only. Writes a report (Markdown and one
    self-contained HTML page) and prints the Label Studio, MLflow and Ray dashboard URLs."""

    def action():
        from cytoloop.config import DemoConfig
        from cytoloop.data.datasets import resolve_data
        from jobs.cycle import Demo

        settings = settings_from(
            config,
            {
                "demo": {
                    "rounds": rounds,
                    "base_model": base_model,
                    "classes": split_list(classes),
                    "budget": budget,
                    "blast_share": blast_share,
                    "pool_limit": pool_limit,
                },
                "adapt": {"steps": finetune_steps},
            },
        )
        sites = parse_sites(site)
        if sites:  # the flags name every site: they replace the file's sites, never merge into them
            demo = DemoConfig.model_validate({**settings.demo.model_dump(), "sites": sites})
            settings = settings.model_copy(update={"demo": demo})
        source = resolve_data(data, settings.datasets.root, settings.datasets.cache_dir)
        outcome = Demo(settings, source).run()
        typer.echo(f"done: {max(r.round for r in outcome.rounds)} round(s); report {outcome.report}")

    run(action)

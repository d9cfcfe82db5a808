"""`cytoloop data`: public datasets, downloaded and checksum-verified."""

from __future__ import annotations

from pathlib import Path

import typer

from ops.cli.common import app, fail, run, settings_from

data_app = typer.Typer(
    no_args_is_help=True,
    help="Download public blood-cell datasets (checksum-verified) and list "
    "them; commands without --data fall back to a fetched one.",
)
app.add_typer(data_app, name="data")


@data_app.command("fetch")
def data_fetch(
    name: str = typer.Argument(..., help="catalogue name (see `cytoloop data list`), e.g. bloodmnist"),
    dest: Path | None = typer.Option(None, help="folder to put datasets in (default: datasets.cache_dir)"),
    config: Path | None = typer.Option(None, help="JSON settings file"),
) -> None:
    """Download a public dataset, verify its checksum and convert it to class folders plus manifest.csv; running
    it again once the dataset is there downloads nothing."""

    def action():
        from collections import Counter

        from cytoloop.data.datasets import fetch
        from cytoloop.data.records import load_records

        folder = fetch(name, dest or settings_from(config).datasets.cache_dir, progress=True)
        counts = Counter(r.label for r in load_records(folder))
        typer.echo(f"{name}: {sum(counts.values())} cells in {folder} (use it with --data {folder})")
        for label, count in sorted(counts.items()):
            typer.echo(f"  {label:<22} {count}")

    run(action)


@data_app.command("list")
def data_list(
    dest: Path | None = typer.Option(None, help="folder datasets were fetched into (default: datasets.cache_dir)"),
    config: Path | None = typer.Option(None, help="JSON settings file"),
) -> None:
    """The catalogue: each dataset's size, licence, and whether it is fetched (or how to get it by hand)."""

    def action():
        from cytoloop.data.datasets import CATALOGUE, fetched

        root = dest or settings_from(config).datasets.cache_dir
        if Path(root).exists() and not Path(root).is_dir():  # every dataset read "not fetched"
            fail(f"{root} is a file, not the folder datasets are fetched into")
        for entry in CATALOGUE.values():
            folder = fetched(entry.name, root)
            state = f"fetched: {folder}" if folder else "not fetched" if entry.url else "manual download"
            typer.echo(f"{entry.name:<15} {entry.license:<10} {state}\n    {entry.description}; {entry.homepage}")
            provenance = f"MD5 {entry.md5}, as published in {entry.checksum_source}" if entry.md5 else entry.manual
            typer.echo(f"    {provenance}")

    run(action)

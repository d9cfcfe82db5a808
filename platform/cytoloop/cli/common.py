"""What every `cytoloop` command shares: the app, settings from flags, and one way to turn errors into messages.

Thin by design: every command parses and validates its input, calls one function of the library, and prints
what a person needs. Bad input (an unknown class or domain, a missing dataset, an invalid setting) ends with a
one-paragraph message and exit code 2, never a traceback.
"""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="CytoLoop: diffusion-based blood-cell classification.")


def split_list(value: str | None) -> list[str] | None:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


def fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def run(action):
    """Run a command body, turning the library's input errors into clear messages."""
    from pydantic import ValidationError

    from cytoloop.data import DatasetError
    from cytoloop.models.base import ModelLoadError
    from cytoloop.preprocess import ImageError

    try:
        return action()
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
        fail(f"invalid configuration: {problems}")
    except (DatasetError, ModelLoadError, ImageError, FileNotFoundError) as error:
        fail(str(error))


def run_registry(action):
    """`run`, plus registry lookups and refused alias moves turned into clear messages."""
    from pydantic import ValidationError

    from cytoloop.registry import RegistryError

    def guarded():
        try:
            return action()
        except ValidationError:
            raise
        except (RegistryError, ValueError) as error:
            fail(str(error))

    return run(guarded)


def settings_from(config: Path | None, overrides: dict | None = None):
    from cytoloop.config import load_settings

    cleaned = {k: {f: v for f, v in s.items() if v is not None} for k, s in (overrides or {}).items()}
    return load_settings(config, {k: v for k, v in cleaned.items() if v})


def labelled_records(path: Path) -> list:
    from cytoloop.data import DatasetError, load_records

    records = [r for r in load_records(path) if r.label is not None]
    if not records:
        raise DatasetError(f"{path}: no labelled cells")
    return records


def print_outcome(outcome) -> None:
    verdict = "promoted to @" + outcome.alias if outcome.passed else "refused by the gate; @" + outcome.alias + " unchanged"
    typer.echo(f"registered {outcome.version.name} v{outcome.version.version} "
               f"(parent v{outcome.version.tags.get('parent_version')}, {outcome.version.tags.get('label_count')} "
               f"labels, data {outcome.version.tags.get('data_snapshot')}): {verdict}")
    for reason in outcome.reasons:
        typer.echo(f"  {reason}")
    m = outcome.metrics
    typer.echo(f"  calibration on the frozen val set: ECE {m['calibration_ece_before']:.3f} -> "
               f"{m['calibration_ece_after']:.3f}, NLL {m['calibration_nll_before']:.3f} -> "
               f"{m['calibration_nll_after']:.3f}, Brier {m['calibration_brier_before']:.3f} -> "
               f"{m['calibration_brier_after']:.3f}")


def run_review(action):
    """`run`, plus the review loop's expected failures (a service down, a port taken, an image not servable)."""
    from cytoloop.stack import StackError
    from labelstudio.client import LabelStudioUnavailable
    from labelstudio.tasks import TaskError

    def guarded():
        try:
            return action()
        except (StackError, LabelStudioUnavailable, TaskError, PermissionError) as error:
            fail(str(error))

    return run(guarded)

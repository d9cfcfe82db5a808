"""What every `cytoloop` command shares: the app, settings from flags, and one way to turn errors into messages.

Thin by design: every command parses and validates its input, calls one function of the library, and prints
what a person needs. Bad input (an unknown class or domain, a missing dataset, an invalid setting: the project's
`CytoLoopError`s) ends with a one-paragraph message and exit code 2; a bug shows its traceback.

Exit codes, for schedulers (cron, Airflow, a CI job): 0 done; 2 bad input (`EXIT_BAD_INPUT`); 3 the challenger
was registered but the gate refused it (`EXIT_GATE_REFUSED`, `retrain` and `adapt`); 4 `retrain --if-due` found
no retrain due (`EXIT_NOT_DUE`); 5 the challenger was registered but not judged, another alias move came first:
run it again (`EXIT_STALE`); 6 `score` finished but some cells' files could not be read: run it again once they
can (`EXIT_CELLS_UNREAD`); 7 `review push` left tasks waiting, Label Studio could not take them or refused some:
run it again (`EXIT_NOT_DELIVERED`); 8 `stack status` found a service it runs not up (`EXIT_NOT_UP`); 1 a bug (a
traceback).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import typer

app = typer.Typer(
    add_completion=True, no_args_is_help=True, help="CytoLoop: diffusion-based blood-cell classification."
)

# the project's packages, whose INFO lines (a stage started, a service is up) are the commands' progress output
PROJECT_LOGGERS = ("cytoloop", "jobs", "labelstudio", "ops", "services")


def _print_version(asked: bool) -> None:
    if asked:
        from importlib import metadata

        typer.echo(f"cytoloop {metadata.version('cytoloop')}")
        raise typer.Exit()


@app.callback()
def main(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="debug messages, with their module"),
    config: Path | None = typer.Option(
        None,
        "--config",
        envvar="CYTOLOOP_CONFIG",
        help="JSON settings file for every command (a command's own --config wins); also CYTOLOOP_CONFIG",
    ),
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True, help="print the version"),
) -> None:
    """CytoLoop: diffusion-based blood-cell classification."""
    import os

    configure_logging(verbose)
    if config is not None:
        if not config.is_file():
            fail(f"--config (or CYTOLOOP_CONFIG) {config}: {'not a file' if config.exists() else 'no such file'}")
        os.environ["CYTOLOOP_CONFIG"] = str(config.resolve())  # what load_settings reads when no file is given


class _StandardError(logging.StreamHandler):
    """A handler writing to whatever `sys.stderr` is when a message comes: bound to the stream of the moment, a
    command run in-process (a test's CliRunner) left the project's loggers writing to a closed stream, and every
    later message was a "--- Logging error ---" traceback."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ sets it: the stream is always the current one
        pass


def configure_logging(verbose: bool = False) -> None:
    """Below the CLI everything logs through `logging`, one logger per module. Here the project's messages go to
    standard error as plain lines (INFO and up), or with level and module and DEBUG too when `verbose`; other
    libraries' messages only from WARNING up."""
    handler = _StandardError()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s" if verbose else "%(message)s"))
    for name in PROJECT_LOGGERS:
        project = logging.getLogger(name)
        project.handlers[:] = [handler]
        project.setLevel(logging.DEBUG if verbose else logging.INFO)
        project.propagate = False


def site_name(value: str | None) -> str | None:
    """A `--site` option's check (typer callback): a bad site name is refused before any work starts."""
    from cytoloop.config import check_site_name
    from cytoloop.errors import UsageError

    if value is None:
        return None
    try:
        return check_site_name(value)
    except UsageError as error:
        raise typer.BadParameter(str(error)) from None


def output_file(value: Path | None) -> Path | None:
    """An option naming a file to write (typer callback): refused before any work when it is a folder, or when a
    file stands where its folder must be, so hours of scoring are not lost at the end ('-' is no file here)."""
    if value is not None and str(value) == "-":
        raise typer.BadParameter("'-' (standard output) is not offered here; give a file name")
    return output_file_or_stdout(value)


def output_file_or_stdout(value: Path | None) -> Path | None:
    """`output_file`, or '-' for standard output."""
    if value is None or str(value) == "-":
        return value
    if value.is_dir():
        raise typer.BadParameter(f"{value} is a folder; give a file name")
    for parent in value.parents:
        if parent.exists():
            if not parent.is_dir():
                raise typer.BadParameter(f"{parent} is a file, so {value} cannot be written")
            break
    return value


def refuse_finished_model(out: Path, overwrite: bool) -> None:
    """A training command's OUT that already holds a finished model (its model.json) is refused unless
    --overwrite: writing there silently replaced its weights and left its card, recipe and tuning report
    describing another model. (An unfinished run there, checkpoints only, is resumed.) OUT a file is refused
    before any cell is loaded ("OUT/checkpoints: Not a directory" came after)."""
    if out.exists() and not out.is_dir():
        fail(f"--out {out} is a file: give the folder the model is written to")
    if not overwrite and (out / "model.json").is_file():
        fail(f"--out {out} already holds a trained model; choose another folder, or pass --overwrite to replace it")


def split_list(value: str | None) -> list[str] | None:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


EXIT_BAD_INPUT = 2
EXIT_GATE_REFUSED = 3
EXIT_NOT_DUE = 4
EXIT_STALE = 5  # a challenger not judged: another alias move came first; running the job again judges it
EXIT_CELLS_UNREAD = 6  # `score`: some cells' files could not be read; running it again scores only those
EXIT_NOT_DELIVERED = 7  # `review push`: Label Studio (or a site's project) could not take waiting tasks
EXIT_NOT_UP = 8  # `stack status`: a service this stack runs is down, starting or stale (a monitor's check)


def fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(EXIT_BAD_INPUT)


def confirm_or_fail(question: str) -> None:
    """Ask before something moves; a "no", or no terminal to answer on (a scheduler's job without --yes), is exit
    code 2 saying nothing moved (typer's "Aborted." was exit 1, a bug's)."""
    try:
        agreed = typer.confirm(question, default=False)
    except typer.Abort:  # end of input: nobody to answer
        agreed = False
    if not agreed:
        fail("not confirmed: nothing was moved (pass --yes where nobody can answer)")


def run(action):
    """Run a command body, turning the project's own errors (`CytoLoopError`: bad input, missing data, an
    unreachable service, an image Label Studio cannot serve), invalid settings and what the file system or the
    network refuses (a missing file, a folder where a file belongs, a refused permission, a port taken), and an
    input file that is not UTF-8 text into one-paragraph messages with exit code 2. Anything else is a bug and
    shows its traceback."""
    from pydantic import ValidationError

    from cytoloop.errors import CytoLoopError, describe_validation_error

    try:
        return action()
    except ValidationError as error:
        fail(f"invalid configuration: {describe_validation_error(error)}")
    except CytoLoopError as error:
        fail(str(error))
    except OSError as error:  # FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError, ...
        fail(f"{error.filename}: {error.strerror}" if error.filename and error.strerror else str(error))
    except UnicodeDecodeError as error:  # an input file of another encoding (or not text) that no reader named
        fail(f"an input file is not UTF-8 text ({error}); save it as UTF-8")
    except ModuleNotFoundError as error:
        extra = _EXTRA_OF.get((error.name or "").split(".")[0])
        if extra is None:
            raise
        fail(f"this command needs {error.name}, which comes with the '{extra}' extra: pip install 'cytoloop[{extra}]'")


# the optional parts of the platform and the extra that installs each (pyproject.toml)
_EXTRA_OF = {"ray": "serve", "mlflow": "train", "fastapi": "serve", "uvicorn": "serve", "label_studio_sdk": "review"}


def settings_from(config: Path | None, overrides: dict | None = None):
    from cytoloop.config import load_settings

    cleaned = {k: {f: v for f, v in s.items() if v is not None} for k, s in (overrides or {}).items()}
    return load_settings(config, {k: v for k, v in cleaned.items() if v})


def site_classes(settings, site: str | None) -> list[str] | None:
    """The classes `site` reports (`sites.<site>.classes`), for a command's `--site`; None without `--site`. A site
    with no classes of its own is an error naming the sites that have them, not a silent "every class"."""
    from cytoloop.errors import UsageError

    allowed = settings.site_classes(site)
    if site is not None and allowed is None:
        configured = ", ".join(name for name, config in settings.sites.items() if config.classes) or "none"
        raise UsageError(
            f"site {site!r} has no classes of its own (sites.{site}.classes); sites that have: {configured}"
        )
    return allowed


def site_candidates(settings, classes: list[str], sites: list[str]):
    """`predict`'s candidates for cells headed to these sites (one per cell): each row the classes its site reports
    (`sites.<site>.classes`), every class for a site without its own; None when no cell's site has any."""
    import numpy as np

    from cytoloop.models.base import class_mask

    masks = {name: class_mask(classes, settings.site_classes(name)) for name in set(sites)}
    if all(mask is None for mask in masks.values()):
        return None
    every = np.ones(len(classes), dtype=bool)
    return np.array([every if masks[name] is None else masks[name] for name in sites]).reshape(len(sites), -1)


def labelled_records(path: Path) -> list:
    from cytoloop.data.records import DatasetError, load_records

    records = [r for r in load_records(path) if r.label is not None]
    if not records:
        raise DatasetError(f"{path}: no labelled cells")
    return records


def print_outcome(outcome) -> None:
    """Print a fine-tune's outcome; a challenger the gate refused ends the command with `EXIT_GATE_REFUSED`, one
    passed over because another alias move came first with `EXIT_STALE` (a scheduler runs that again, not the
    refusal); a rerun of a job whose version was promoted and moved off since has nothing to do (0)."""
    _print_outcome(outcome)
    if outcome.state in ("refused", "stale"):
        raise typer.Exit(EXIT_GATE_REFUSED if outcome.state == "refused" else EXIT_STALE)


def _print_outcome(outcome) -> None:
    verdict = {
        "promoted": f"promoted to @{outcome.alias}",
        "refused": f"refused by the gate; @{outcome.alias} unchanged",
        "stale": f"not judged: another move of @{outcome.alias} came first (run the job again to judge it)",
        "withdrawn": f"promoted before, moved off @{outcome.alias} since; nothing to do",
    }[outcome.state]
    typer.echo(
        f"registered {outcome.version.name} v{outcome.version.version} "
        f"(parent v{outcome.version.tags.get('parent_version')}, {outcome.version.tags.get('label_count')} "
        f"labels, data {outcome.version.tags.get('data_snapshot')}): {verdict}"
    )
    for reason in outcome.reasons:
        typer.echo(f"  {reason}")
    m = outcome.metrics
    typer.echo(
        f"  calibration on the frozen val set: ECE {m['calibration_ece_before']:.3f} -> "
        f"{m['calibration_ece_after']:.3f}, NLL {m['calibration_nll_before']:.3f} -> "
        f"{m['calibration_nll_after']:.3f}, Brier {m['calibration_brier_before']:.3f} -> "
        f"{m['calibration_brier_after']:.3f}"
    )

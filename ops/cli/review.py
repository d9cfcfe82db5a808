"""`cytoloop stack` and `cytoloop review`: the local services and the Label Studio side of the loop."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import typer

from ops.cli.common import (
    EXIT_NOT_DELIVERED,
    EXIT_NOT_UP,
    app,
    fail,
    output_file,
    run,
    site_candidates,
    site_name,
    split_list,
)

stack_app = typer.Typer(
    no_args_is_help=True,
    help="Start, inspect and stop the local services (Label Studio, the "
    "label receiver, MLflow, Ray) under Settings.home.",
)
review_app = typer.Typer(no_args_is_help=True, help="Route uncertain cells to Label Studio and bring labels back.")
app.add_typer(stack_app, name="stack")
app.add_typer(review_app, name="review")


def _print_status(rows) -> None:
    for row in rows:
        pid = f"pid {row.pid}" if row.pid else ""
        port = f"port {row.port}" if row.port else ""
        typer.echo(f"{row.name:<13} {row.state:<9} {port:<11} {pid:<11} {row.detail}")


def _services(only: str | None) -> list[str] | None:
    """`--only`'s services; None (all of them) only without the flag: `--only ""` (an empty variable) names
    none, and is refused rather than read as every service."""
    if only is None:
        return None
    names = split_list(only)
    if not names:
        fail("--only names no service: give comma-separated names (label-studio, labels, mlflow, ray)")
    return names


def _require_home_file(path: Path, home: str | Path, missing: str, kept: str) -> None:
    """Refuse a review command whose home lacks the file it reads: with CYTOLOOP_HOME pointing elsewhere (a typo,
    another shell) it created an empty store there and answered "0 cells" or "nothing waiting", and the empty
    store then let `review export` replace a lab's manifest with a header-only one."""
    if not path.is_file():
        fail(f"{missing} under home {home} ({path} does not exist): check CYTOLOOP_HOME or the settings' home; {kept}")


@stack_app.command("up")
def stack_up(
    only: str | None = typer.Option(None, help="comma-separated services (label-studio, labels, mlflow, ray)"),
    config: Path | None = typer.Option(None, help="JSON settings file"),
) -> None:
    """Start the services not running yet and wait until each answers its health check (idempotent)."""

    def action():
        from cytoloop.config import load_settings
        from ops.stack import Stack

        _print_status(Stack(load_settings(config)).up(_services(only)))

    run(action)


@stack_app.command("status")
def stack_status(config: Path | None = typer.Option(None, help="JSON settings file")) -> None:
    """Show each service: up, starting, down, stale (dead process) or disabled. Exit code 8 when one this stack
    runs is not up (a monitor's check; it always exited 0)."""

    def action():
        from cytoloop.config import load_settings
        from ops.stack import Stack

        rows = Stack(load_settings(config)).status()
        _print_status(rows)
        if any(row.state not in ("up", "disabled") for row in rows):
            raise typer.Exit(EXIT_NOT_UP)

    run(action)


@stack_app.command("down")
def stack_down(
    only: str | None = typer.Option(None, help="comma-separated services to stop (default: all)"),
    config: Path | None = typer.Option(None, help="JSON settings file"),
) -> None:
    """Stop the services this home folder started (never anything else); their data stays. An `up` in progress
    stops at its next step (a service that never becomes healthy is not waited for), then what it started stops."""

    def action():
        from cytoloop.config import load_settings
        from ops.stack import Stack

        stopped = Stack(load_settings(config)).down(_services(only))
        typer.echo(f"stopped: {', '.join(stopped) or 'nothing was running'}")

    run(action)


@review_app.command("bootstrap")
def review_bootstrap(
    site: str = typer.Option(..., callback=site_name, help="site (lab) whose project to create"),
    model: Path | None = typer.Option(None, help="model directory whose classes the project offers"),
    classes: str | None = typer.Option(None, help="comma-separated classes (instead of --model)"),
    config: Path | None = typer.Option(None, help="JSON settings file"),
) -> None:
    """Create (or update) the site's Label Studio project and its webhook; running it twice changes nothing."""

    def action():
        from cytoloop.config import load_settings
        from cytoloop.models.base import read_model_meta
        from labelstudio.loop import ReviewLoop

        if model is not None and classes is not None:
            fail("give --model or --classes, not both")
        names = split_list(classes) or (read_model_meta(model)["classes"] if model else None)
        if not names:
            fail("give --model or --classes")
        if len(set(names)) != len(names):
            fail(f"--classes names a class twice: {classes}")
        typer.echo(f"project {ReviewLoop(load_settings(config)).bootstrap(site, names)} for site {site}")

    run(action)


@review_app.command("route")
def review_route(
    model: Path = typer.Option(..., help="model directory that scores the cells"),
    data: Path = typer.Option(..., help="manifest CSV or per-class folder of cells to score"),
    domains: str | None = typer.Option(None, help="comma-separated domains to score"),
    site: str | None = typer.Option(
        None,
        callback=site_name,
        help="project to send to (default: each cell's domain); a site's cells are decided among its classes",
    ),
    model_version: str | None = typer.Option(None, help="version shown to annotators (default: model dir name)"),
    budget: int | None = typer.Option(None, min=0, help="cells to send this round (default: routing.budget)"),
    push: bool = typer.Option(True, help="push to Label Studio now (else only queue in the outbox)"),
    json_out: bool = typer.Option(False, "--json", help="print the routing report as JSON on stdout"),
    config: Path | None = typer.Option(None, help="JSON settings file"),
) -> None:
    """Score cells, route them (anomaly, review, audit, accept) and send this round's budget to Label Studio."""

    def action():
        from cytoloop.config import load_settings
        from cytoloop.data.preprocess import load_cells
        from cytoloop.data.records import load_records, select
        from cytoloop.models.loading import load_model
        from labelstudio.loop import ReviewLoop

        settings = load_settings(config)
        loop = ReviewLoop(settings)
        records = select(load_records(data), split_list(domains))
        loop.check_images(records)
        classifier = load_model(model, settings.scoring)
        loaded = load_cells(records, classifier.data_config, progress=True)
        if not loaded.records:  # a wrong images folder: a traceback from the empty batch, said as what it is
            fail(f"none of the {len(records)} cells could be read{loaded.skipped_note()}; nothing was routed")
        if loaded.skipped:  # routed without them, and said so (they were dropped without a word)
            typer.secho(
                f"warning: {len(loaded.skipped)} of {len(records)} cells could not be read and are not routed"
                f"{loaded.skipped_note()}",
                fg=typer.colors.YELLOW,
                err=True,
            )
        candidates = site_candidates(settings, classifier.classes, [site or r.domain for r in loaded.records])
        # a cell whose route is settled (clearly an anomaly, or a close call for review) stops scoring there
        predictions = classifier.predict(loaded.images, progress=True, routing=settings.routing, candidates=candidates)
        report = loop.route(
            loaded.records,
            predictions,
            classifier.classes,
            model_version or model.resolve().name,
            site=site,
            budget=budget,
            push=push,
            images=loaded.images,
        )
        if json_out:
            typer.echo(json.dumps(asdict(report), indent=1))
            return
        typer.echo(
            f"routed {sum(report.reasons.values())} cells: {report.reasons}; "
            f"{report.already_queued} already sent, {report.already_decided} already agreed; "
            f"{report.chosen} chosen, {report.queued} newly queued"
        )
        _print_push(report.push)

    run(action)


def _print_push(report) -> None:
    if report is None:
        return
    if report.resent:
        typer.echo(f"{report.resent} task(s) an earlier Label Studio took, with no consensus yet, are sent to this one")
    typer.echo(
        f"pushed {report.pushed} task(s) ({report.already_there} were already there); "
        f"{report.pending} waiting in the outbox"
        + (f"; Label Studio refused {report.failed} (their errors: `cytoloop status`)" if report.failed else "")
    )
    if report.twins_removed:
        typer.echo(f"deleted {report.twins_removed} unlabelled second copy(ies) of a task an unanswered import left")
    for site, error in report.site_errors.items():
        typer.secho(f"warning: site {site}'s project failed ({error}); its tasks wait", fg=typer.colors.YELLOW)
    if report.error:
        typer.secho(f"warning: {report.error}; the outbox keeps them until the next push", fg=typer.colors.YELLOW)


def not_delivered(report) -> bool:
    """Whether a push left tasks waiting because Label Studio could not take them: unreachable, a site's project
    failing, or tasks it refused (each waits for its next attempt; exit 0 told a scheduler they were delivered)."""
    return bool(report.pending and (report.error or report.site_errors or report.failed))


@review_app.command("push")
def review_push(config: Path | None = typer.Option(None, help="JSON settings file")) -> None:
    """Send the outbox's waiting tasks to Label Studio."""

    def action():
        from cytoloop.config import load_settings
        from labelstudio.loop import ReviewLoop, outbox_path

        settings = load_settings(config)
        _require_home_file(outbox_path(settings), settings.home, "no outbox (no cell was routed)", "nothing was sent")
        report = ReviewLoop(settings).push()
        _print_push(report)
        if not_delivered(report):  # a scheduler must not read it as done
            raise typer.Exit(EXIT_NOT_DELIVERED)

    run(action)


@review_app.command("ml-backend")
def review_ml_backend(
    host: str = typer.Option("127.0.0.1", help="address Label Studio reaches it at"),
    port: int = typer.Option(9090, min=1, max=65535, help="port (Label Studio: Settings -> Model -> http://HOST:PORT)"),
    config: Path | None = typer.Option(None, help="JSON settings file"),
) -> None:
    """Serve CytoLoop as a Label Studio ML backend: predictions per task from each site's champion, and
    training events that start `retrain --if-due` on the exported consensus labels."""

    def action():
        import uvicorn

        from cytoloop.config import load_settings
        from labelstudio.loop import ReviewLoop
        from labelstudio.ml_backend import Backend, create_app, retrain_command
        from ops.stack import stack_secrets

        settings = load_settings(config)
        if settings.stack.images_root is None:  # every task's image is read under it: without it none could be
            fail("the ML backend reads task images only under stack.images_root: set it (CYTOLOOP_STACK__IMAGES_ROOT)")
        labels = Path(settings.home) / "review" / "consensus.csv"
        loop = ReviewLoop(settings)
        backend = Backend(settings, retrain_command(labels, config), export=lambda: loop.export(labels))
        user, password = settings.review.ml_backend_user, stack_secrets(settings)["ml_backend_password"]
        typer.echo(
            f"Label Studio: Settings -> Model -> Connect Model, URL http://{host}:{port}, authentication Basic Auth, "
            f"user {user!r}, password: ml_backend_password in {Path(settings.home) / 'secrets.json'}",
            err=True,
        )
        uvicorn.run(create_app(backend, user, password), host=host, port=port, log_level="warning")

    run(action)


@review_app.command("invite")
def review_invite(
    reset: bool = typer.Option(False, "--reset", help="void the current link first (it reached the wrong people)"),
    config: Path | None = typer.Option(None, help="JSON settings file"),
) -> None:
    """Print the invite link annotators sign up with (sign-up is closed without it); give it to them only."""

    def action():
        import httpx

        from cytoloop.config import load_settings
        from labelstudio.client import LabelStudioUnavailable, invite_url
        from ops.stack import label_studio_url, stack_secrets

        settings = load_settings(config)
        url, token = label_studio_url(settings), stack_secrets(settings)["admin_token"]
        try:
            if reset:
                headers = {"Authorization": f"Token {token}"}
                done = httpx.post(f"{url}/api/invite/reset-token", headers=headers, timeout=30)
                if done.status_code not in (200, 201):
                    fail(f"Label Studio refused to reset the invite link (HTTP {done.status_code})")
            link = invite_url(url, token)
        except httpx.TransportError as error:
            raise LabelStudioUnavailable(
                f"Label Studio at {url} is not reachable ({error}); is `cytoloop stack up` running?"
            ) from error
        typer.echo(link)

    run(action)


@review_app.command("sync")
def review_sync(
    json_out: bool = typer.Option(False, "--json", help="print the sync report as JSON on stdout"),
    config: Path | None = typer.Option(None, help="JSON settings file"),
) -> None:
    """Apply received webhook events and poll Label Studio for every label they missed (safe to rerun)."""

    def action():
        from cytoloop.config import load_settings
        from labelstudio.loop import ReviewLoop

        r = ReviewLoop(load_settings(config)).sync()
        if json_out:
            typer.echo(json.dumps(asdict(r), indent=1))
            return
        typer.echo(
            f"{r.events} webhook event(s) applied; {r.seen} annotation(s) polled, {r.changed} changed, "
            f"{r.retracted} retracted"
        )
        if r.unchecked:  # labels all came in; only whether these few still exist waits for the next sync
            typer.echo(
                f"{r.unchecked} stored label(s) not listed were left as they were: Label Studio failed to say "
                "whether they still exist (run sync again)",
                err=True,
            )

    run(action)


@review_app.command("report")
def review_report(
    json_out: Path | None = typer.Option(None, "--json", callback=output_file, help="also write the report as JSON"),
    config: Path | None = typer.Option(None, help="JSON settings file"),
) -> None:
    """Consensus status, per-annotator agreement, and the cells waiting for senior review."""

    def action():
        from cytoloop.config import load_settings
        from labelstudio.loop import ReviewLoop, label_store_path

        settings = load_settings(config)
        _require_home_file(label_store_path(settings), settings.home, "no labels", "nothing was written")
        report = ReviewLoop(settings).report()
        typer.echo(f"cells labelled: {report['cells']}  {report['status']}")
        for name, figures in report["annotators"].items():
            agreement = "-" if figures["agreement"] is None else f"{figures['agreement']:.2f}"
            typer.echo(
                f"  {name}: {figures['labelled']} labelled, agreement with others {agreement} "
                f"over {figures['compared']}"
            )
        for pair, figures in report["pairs"].items():
            kappa = "-" if figures["kappa"] is None else f"{figures['kappa']:.2f}"
            typer.echo(f"  {pair}: {figures['cells']} cells in common, agree {figures['agreement']:.2f}, kappa {kappa}")
        project = report["fleiss_kappa"]
        kappa = "-" if project["kappa"] is None else f"{project['kappa']:.2f}"
        typer.echo(f"Fleiss' kappa: {kappa} over {project['cells']} cells ({project['left_out']} with other counts)")
        audit = report["audit"]
        rate = "-" if audit["error_rate"] is None else f"{audit['error_rate']:.1%}"
        typer.echo(
            f"audit: the model was wrong on {audit['model_wrong']} of {audit['cells']} audited cells with a "
            f"consensus (error rate {rate})"
        )
        typer.echo(f"senior review: {len(report['senior_review'])} cell(s)")
        for cell in report["senior_review"]:
            typer.echo(f"  {cell['cell']}: {cell['status']} {cell['votes']}{' abnormal' if cell['abnormal'] else ''}")
        if json_out:
            json_out.write_text(json.dumps(report, indent=1))

    run(action)


@review_app.command("export")
def review_export(
    out: Path = typer.Option(
        ..., callback=output_file, help="manifest CSV to write (usable by `cytoloop train --data`)"
    ),
    config: Path | None = typer.Option(None, help="JSON settings file"),
) -> None:
    """Write the agreed consensus labels as a training manifest with provenance."""

    def action():
        from cytoloop.config import load_settings
        from labelstudio.loop import ReviewLoop, label_store_path

        settings = load_settings(config)
        _require_home_file(label_store_path(settings), settings.home, "no labels", "OUT was left as it was")
        result = ReviewLoop(settings).export(out)
        typer.echo(f"exported {result['exported']} cell(s) to {result['path']}; left out: {result['left_out']}")
        if "new_classes" in result:
            extra = result["new_classes"]
            typer.echo(f"classes the model lacks, named by annotators: {extra['cells']} in {extra['path']}")

    run(action)


@review_app.command("serve")
def review_serve(config: Path | None = typer.Option(None, help="JSON settings file")) -> None:
    """Run the webhook receiver with the periodic poll and outbox push (what `stack up` starts as 'labels')."""

    def action():
        from cytoloop.config import load_settings
        from labelstudio.loop import ReviewLoop

        ReviewLoop(load_settings(config)).serve()

    run(action)

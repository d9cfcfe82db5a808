"""Registry commands: register, retrain, adapt, promote, rollback, drift, status (MLflow, Ray Train)."""

from __future__ import annotations

from pathlib import Path

import typer

from ops.cli.common import (
    EXIT_NOT_DUE,
    app,
    confirm_or_fail,
    fail,
    labelled_records,
    print_outcome,
    run,
    settings_from,
    site_name,
)


@app.command()
def register(
    model: Path = typer.Argument(..., help="trained model directory"),
    champion: bool = typer.Option(False, "--champion", help="also point the (site) champion alias at it"),
    site: str | None = typer.Option(None, callback=site_name, help="with --champion: the site alias champion-<site>"),
    reason: str | None = typer.Option(None, help="why (required with --champion: it goes to the audit trail)"),
    override: bool = typer.Option(
        False, "--override", help="with --champion: replace an existing champion without the gate (recorded as such)"
    ),
    config: Path | None = typer.Option(None, help="JSON settings file"),
) -> None:
    """Register a trained model directory as a new version (e.g. the first champion).

    With --champion the alias moves only where there is nothing to gate against (the first champion of the
    model or site); replacing a champion goes through the gate (`cytoloop retrain`, `cytoloop adapt`) or is an
    explicit --override, recorded with its reason and who."""

    def action():
        from cytoloop.models.finetune import code_revision
        from cytoloop.models.loading import load_model
        from cytoloop.registry import AliasMoved, open_registry, site_alias

        if champion and not (reason or "").strip():  # checked before registering: a blank one left a version behind
            fail("--champion moves an alias: give --reason")
        if override and not champion:
            fail("--override goes with --champion")
        if site and not champion:
            fail("--site names the alias champion-<site>: it goes with --champion")
        settings = settings_from(config)
        # a model that cannot be loaded is refused here, not registered and then failing every request
        model_kind = load_model(model).kind
        registry = open_registry(settings)
        name = settings.registry.model_name
        alias = site_alias(site)
        current = registry.alias_version(name, alias) if champion else None
        serving = registry.serving_version(name, alias) if champion else None
        if current is not None and not override:
            fail(
                f"@{alias} already points at v{current}: a new version replaces it through the gate "
                "(`cytoloop retrain`, `cytoloop adapt`), or explicitly with --override (recorded with your reason)"
            )
        version = registry.log_model(
            model,
            name,
            tags={"kind": model_kind, "site": site or "global", "code_revision": code_revision(), "job": "register"},
        )
        typer.echo(f"registered {name} v{version.version} from {model}")
        if champion:
            kind = "override" if current is not None else "first"
            try:
                move = registry.move_alias(name, alias, version.version, why=reason, action=kind, expect=serving)
            except AliasMoved as moved:  # registered all the same: another `register` would make a second copy
                fail(
                    f"v{version.version} is registered, but @{alias} was not moved: {moved}. To serve it anyway: "
                    f"`cytoloop promote {version.version}{f' --site {site}' if site else ''} --reason ...`"
                )
            typer.echo(f"{move.arrow()} ({kind}, by {move.who})")

    run(action)


@app.command()
def retrain(
    labels: Path = typer.Option(..., help="consensus labels: manifest CSV (path,label,domain,...)"),
    unlabeled: Path | None = typer.Option(None, help="manifest CSV of the unlabeled pool (trains the null class)"),
    if_due: bool = typer.Option(False, "--if-due", help="only if the retrain policy says a retrain is due"),
    steps: int | None = typer.Option(None, min=1, help="fine-tuning steps"),
    workers: int | None = typer.Option(None, min=1, help="Ray Train workers"),
    config: Path | None = typer.Option(None, help="JSON settings file"),
) -> None:
    """Fine-tune the champion on the consensus labels (Ray Train), register it and put it through the gate."""

    def action():
        from cytoloop.data.records import load_records
        from cytoloop.files import Locked
        from cytoloop.policy.drift import load_flags
        from cytoloop.policy.retrain import load_state, new_labels, retrain_due, state_path
        from cytoloop.registry import NotRegistered, open_registry
        from jobs.finetune import finetune_lock, run_finetune, save_retrain_state

        settings = settings_from(config, {"finetune": {"steps": steps, "num_workers": workers}})
        records = labelled_records(labels)
        pool = load_records(unlabeled) if unlabeled else []
        try:  # decided, trained and recorded under the fine-tune lock: a second retrain decides on the first's state
            with finetune_lock(settings, None, wait=not if_due):
                state = load_state(state_path(settings.home))
                fresh = new_labels(records, state)
                try:
                    aliases = open_registry(settings).aliases(settings.registry.model_name)
                except NotRegistered:  # nothing registered yet: the fine-tune below says what to do
                    aliases = {}
                drifted = _champion_flags(load_flags(_flags_path(settings)), aliases)
                decision = retrain_due(len(fresh), state.hours_since_last(), bool(drifted), settings.retrain)
                typer.echo(f"retrain {'due' if decision.due else 'not due'}: {decision.reason}")
                if if_due and not decision.due:
                    raise typer.Exit(EXIT_NOT_DUE)
                outcome = run_finetune(settings, records, pool, progress=True)
                save_retrain_state(settings, records, outcome)
        except Locked:  # --if-due while a retrain runs: the next call decides on that one's outcome
            typer.echo("retrain not due: another retrain of the global model is running")
            raise typer.Exit(EXIT_NOT_DUE) from None
        print_outcome(outcome)

    run(action)


@app.command()
def adapt(
    site: str = typer.Option(
        ..., callback=site_name, help="hospital name; the model is registered under champion-<site>"
    ),
    data: Path = typer.Option(
        ..., "--labels", "--data", help="the site's labelled cells: manifest CSV (--data: its former name)"
    ),
    unlabeled: Path | None = typer.Option(None, help="the site's unlabeled cells (diffusion null class)"),
    stain_normalize: bool | None = typer.Option(
        None, "--stain-normalize/--no-stain-normalize", help="normalise to the champion's training colours"
    ),
    steps: int | None = typer.Option(None, min=1, help="fine-tuning steps"),
    config: Path | None = typer.Option(None, help="JSON settings file"),
) -> None:
    """Adapt the champion to one hospital: fine-tune on its labels, gate against what serves it, alias per site."""

    def action():
        from cytoloop.data.records import load_records
        from jobs.finetune import run_finetune

        settings = settings_from(config, {"adapt": {"steps": steps}})
        pool = load_records(unlabeled) if unlabeled else []
        outcome = run_finetune(
            settings, labelled_records(data), pool, site=site, stain_normalize=stain_normalize, progress=True
        )
        print_outcome(outcome)

    run(action)


@app.command()
def promote(
    version: str = typer.Argument(..., help="model version to promote"),
    reason: str = typer.Option(..., help="why the gate is overridden (kept on the version and in the audit trail)"),
    site: str | None = typer.Option(
        None, callback=site_name, help="promote to champion-<site> instead of the global champion"
    ),
    cross_site: bool = typer.Option(
        False, "--cross-site", help="promote a version made for one site as another scope's champion"
    ),
    yes: bool = typer.Option(False, "--yes", "-y", help="do not ask for confirmation"),
    config: Path | None = typer.Option(None, help="JSON settings file"),
) -> None:
    """Point the champion alias at VERSION whatever the gate said, recording who and why. A version made for a
    site serves only that site unless --cross-site."""

    def action():
        from cytoloop.policy.promotion import override
        from cytoloop.registry import open_registry, site_alias

        settings = settings_from(config)
        registry, name, alias = open_registry(settings), settings.registry.model_name, site_alias(site)
        if not yes:  # what the version is, asked before anything moves
            made_for = registry.version(name, version).tags.get("site") or "unknown"
            confirm_or_fail(f"Serve v{version} (made for: {made_for}) as @{alias}, overriding the gate?")
        move = override(registry, name, version, alias, reason, cross_site=cross_site)
        typer.echo(f"{move.arrow()} (override by {move.who})")

    run(action)


@app.command()
def rollback(
    reason: str = typer.Option(..., help="why (kept in the audit trail)"),
    site: str | None = typer.Option(
        None, callback=site_name, help="roll back champion-<site> instead of the global champion"
    ),
    from_version: str | None = typer.Option(
        None,
        "--from",
        help="the version being rolled back (as `cytoloop status` shows it): if another serves by then, nothing "
        "moves, so a rollback retried after one that went through never goes back a second move",
    ),
    yes: bool = typer.Option(False, "--yes", "-y", help="do not ask for confirmation"),
    config: Path | None = typer.Option(None, help="JSON settings file"),
) -> None:
    """Move the champion alias back to the version it pointed at before its latest move."""
    from_version = from_version.removeprefix("v") if from_version else None  # "7" or "v7", as status shows it
    if not yes:
        what = f" from v{from_version}" if from_version else " one move"
        confirm_or_fail(f"Roll @{'champion-' + site if site else 'champion'} back{what}?")

    def action():
        from cytoloop.registry import ANY_VERSION, open_registry, site_alias

        settings = settings_from(config)
        expect = ANY_VERSION if from_version is None else from_version
        move = open_registry(settings).rollback(settings.registry.model_name, site_alias(site), reason, expect=expect)
        typer.echo(f"{move.arrow()} (rollback by {move.who})")

    run(action)


def _flags_path(settings) -> Path:
    return Path(settings.home) / "drift" / "flags.json"


def _champion_flags(flags: list[dict], aliases: dict[str, str]) -> list[dict]:
    """The drift flags of what the global champion serves now: its version, at the sites without a champion of
    their own. The file keeps each series' last flags (history, shown by `status`): a retired version's, or the
    global version's at a site that has since been given its own model, must not make a retrain of it due."""
    from cytoloop.registry import CHAMPION, site_of

    champion = aliases.get(CHAMPION)
    own = {site_of(alias) for alias in aliases} - {None}
    return [
        f
        for f in flags
        if champion is not None and str(f["model_version"]) == str(champion) and f.get("site") not in own
    ]


@app.command()
def drift(
    events: Path = typer.Option(..., help="prediction log: JSON lines of drift.PredictionEvent"),
    labels: Path | None = typer.Option(
        None,
        exists=True,
        dir_okay=False,
        help="consensus labels (`cytoloop review export`): the reviewed and audited cells' classes, for the "
        "calibration figures (the log's cells are found in it by their image's id)",
    ),
    config: Path | None = typer.Option(None, help="JSON settings file"),
) -> None:
    """Compute drift per model version, site and time window; log it to MLflow and update the flags."""

    def action():
        from cytoloop.errors import UsageError
        from cytoloop.models.base import ModelLoadError
        from cytoloop.policy.drift import (
            drift_windows,
            log_windows,
            read_colour_reference,
            read_events,
            read_labels,
            save_flags,
            with_labels,
        )
        from cytoloop.registry import NotRegistered, open_registry

        settings = settings_from(config)
        known = read_labels(labels) if labels is not None else {}  # a wrong file is named before MLflow is opened
        log = read_events(events)  # so is a missing log (it made an empty MLflow database first)
        registry = open_registry(settings)
        name = settings.serve.model_name or settings.registry.model_name  # the model the log's versions are of
        if not log:
            typer.echo(f"{events}: no predictions in it; drift flags unchanged")
            return
        if labels is not None:
            log = with_labels(log, known)
            typer.echo(f"{sum(e.label is not None for e in log)} of {len(log)} predictions have a label in {labels}")
        references = {}
        for version in sorted({e.model_version for e in log}):
            references[version], why = None, "a local model directory's version, not in the registry"
            if version.isdigit():  # not `local-<hash>`
                try:
                    registry.load(name, version, settings.registry.cache_dir)
                    references[version] = read_colour_reference(Path(settings.registry.cache_dir) / name / version)
                    why = "it keeps no colour reference"
                except (NotRegistered, ModelLoadError, UsageError) as error:  # this version only; the others go on
                    why = str(error)
            if references[version] is None:
                typer.echo(f"  {name} v{version}: no stain figures ({why})")
        windows = drift_windows(log, references, settings.drift)
        log_windows(registry, name, windows)
        flags = save_flags(_flags_path(settings), windows, settings.drift.min_cells)
        typer.echo(f"{len(log)} predictions, {len(windows)} windows logged to MLflow; {len(flags)} flagged")
        for flag in flags:
            typer.echo(
                f"  v{flag['model_version']} {flag['site'] or 'global'} {flag['window_start']}: "
                + "; ".join(flag["flags"])
            )

    run(action)


@app.command()
def status(
    labels: Path | None = typer.Option(None, help="consensus labels, to say whether a retrain is due"),
    json_out: bool = typer.Option(False, "--json", help="print the status as one JSON document on stdout"),
    config: Path | None = typer.Option(None, help="JSON settings file"),
) -> None:
    """What serves where (and the classes each site reports), the latest alias moves, the label store, drift flags
    and whether a retrain is due."""

    def action():
        import json
        from dataclasses import asdict

        from cytoloop.policy.drift import load_flags
        from cytoloop.policy.retrain import load_state, new_labels, retrain_due, state_path
        from cytoloop.registry import NotRegistered, open_registry

        settings = settings_from(config)
        registry = open_registry(settings)
        name = settings.registry.model_name
        try:
            aliases, moves = registry.aliases(name), registry.alias_history(name)
        except NotRegistered:
            aliases, moves = {}, []
        served = {}
        for alias, version in sorted(aliases.items()):
            tags = registry.version(name, version).tags
            served[alias] = {"version": version, "kind": tags.get("kind"), "gate": tags.get("gate.verdict")}
        flags = load_flags(_flags_path(settings))
        state = load_state(state_path(settings.home))
        retrain: dict = {"last": state.last_time.isoformat() if state.last_time else None, "due": None}
        if labels is not None:
            fresh = len(new_labels(labelled_records(labels), state))
            drifted = _champion_flags(flags, aliases)
            decision = retrain_due(fresh, state.hours_since_last(), bool(drifted), settings.retrain)
            retrain |= {"due": decision.due, "reason": decision.reason}
        report = {
            "registry": settings.registry.tracking_uri,
            "model": name,
            "aliases": served,
            "site_classes": {site: config.classes for site, config in settings.sites.items() if config.classes},
            "moves": [asdict(m) for m in moves[-5:]],
            "review": _review_counts(Path(settings.home) / "review"),
            "drift_flags": flags,
            "retrain": retrain,
        }
        if json_out:
            typer.echo(json.dumps(report, indent=1))
            return
        typer.echo(f"registry {report['registry']}, model {name}")
        if not served:
            typer.echo("  no model registered yet")
        for alias, info in served.items():
            typer.echo(f"  @{alias}: v{info['version']} ({info['kind'] or '?'}, gate {info['gate'] or '-'})")
        for site, classes in report["site_classes"].items():
            typer.echo(f"  site {site} reports {', '.join(classes)} (its cells are decided among them)")
        for move in moves[-5:]:
            typer.echo(f"  {move.time} {move.who} {move.action} {move.arrow()}: {move.why}")
        _echo_review(report["review"])
        typer.echo(f"drift: {'FLAGGED' if flags else 'no flags'}")
        for flag in flags:
            typer.echo(f"  v{flag['model_version']} {flag.get('site') or 'global'}: " + "; ".join(flag["flags"]))
        last = retrain["last"] or "never"
        if retrain["due"] is None:
            typer.echo(f"retrain: last {last} (give --labels to check whether one is due)")
        else:
            typer.echo(f"retrain: {'DUE' if retrain['due'] else 'not due'} ({retrain['reason']}); last {last}")

    run(action)


def _review_counts(folder: Path) -> dict:
    """The label store's counts and quarantined webhook events, and the outbox's counts and refused tasks."""
    from labelstudio.outbox import Outbox
    from labelstudio.store import LabelStore

    counts: dict = {"labels": None, "outbox": None}
    if (folder / "labels.db").is_file():
        store = LabelStore(folder / "labels.db")
        quarantined = [{"event": i, "received": r, "error": e} for i, r, e in store.quarantined(limit=3)]
        counts["labels"] = {**store.counts(), "events": store.event_counts(), "quarantined": quarantined}
    if (folder / "outbox.db").is_file():
        outbox = Outbox(folder / "outbox.db")
        refused = [{"task": k, "attempts": a, "error": e} for k, a, e in outbox.failures()[:3]]
        counts["outbox"] = {**outbox.counts(), "refused": refused}
    return counts


def _echo_review(counts: dict) -> None:
    from labelstudio.outbox import MAX_ATTEMPTS

    labels = counts["labels"]
    if labels is None:
        typer.echo("labels: no label store yet")
    else:
        events = labels["events"]
        typer.echo(
            f"labels: {labels['live']} live, {labels['retracted']} retracted; webhook events: {events['received']} "
            f"received, {events['pending']} pending, {events['failed']} quarantined"
        )
        for event in labels["quarantined"]:
            typer.echo(f"  quarantined event {event['event']} ({event['received']}): {event['error']}")
    queued = counts["outbox"]
    if queued is not None:
        typer.echo(
            f"outbox: {queued['pushed']} pushed, {queued['pending']} pending, {queued['failed']} refused "
            f"{MAX_ATTEMPTS} times (waiting for a person)"
        )
        for task in queued["refused"]:
            typer.echo(f"  {task['task']}: {task['attempts']} attempt(s), last error {task['error']}")

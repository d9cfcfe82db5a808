"""The `cytoloop` command: train, evaluate and sample from models on the command line.

Thin by design: every command parses and validates its input, calls one function of the library, and prints
what a person needs. Bad input (an unknown class or domain, a missing dataset, an invalid setting) ends with a
one-paragraph message and exit code 2, never a traceback.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="CytoLoop: diffusion-based blood-cell classification.")


def _split(value: str | None) -> list[str] | None:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def _run(action):
    """Run a command body, turning the library's input errors into clear messages."""
    from pydantic import ValidationError

    from cytoloop.data import DatasetError
    from cytoloop.models.base import ModelLoadError
    from cytoloop.preprocess import ImageError

    try:
        return action()
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
        _fail(f"invalid configuration: {problems}")
    except (DatasetError, ModelLoadError, ImageError, FileNotFoundError) as error:
        _fail(str(error))


@app.command()
def train(
    model: str = typer.Option("diffusion", help="diffusion or baseline"),
    data: Path = typer.Option(..., help="manifest CSV, or a folder with one sub-folder per class"),
    out: Path = typer.Option(..., help="model directory to write (resumes from its checkpoint if present)"),
    domains: Optional[str] = typer.Option(None, help="comma-separated domains to train on (default: all)"),
    classes: Optional[str] = typer.Option(None, help="comma-separated classes (default: all labelled classes)"),
    steps: Optional[int] = typer.Option(None, help="training steps"),
    image_size: Optional[int] = typer.Option(None, help="model resolution in pixels"),
    unlabeled_domains: Optional[str] = typer.Option(None, help="domains whose cells train the null class unlabeled"),
    seed: int = typer.Option(0, help="seed of the split and of training"),
    config: Optional[Path] = typer.Option(None, help="JSON settings file (CYTOLOOP_* variables override it)"),
) -> None:
    """Train a model, calibrate it on the validation part of a seeded split, and save it to OUT."""
    if model not in ("diffusion", "baseline"):
        _fail(f"unknown model {model!r}; valid: diffusion, baseline")

    def action():
        from cytoloop.config import load_settings
        from cytoloop.data import load_records, select
        from cytoloop.workflows import train_model

        overrides = {"train": {"steps": steps, "seed": seed}, "data": {"image_size": image_size}}
        settings = load_settings(config, {k: {f: v for f, v in s.items() if v is not None} for k, s in overrides.items()})
        records = load_records(data)
        labelled = select([r for r in records if r.label], _split(domains), _split(classes))
        unlabeled = []
        if unlabeled_domains:
            unlabeled = [r for r in select(records, _split(unlabeled_domains)) if r not in labelled]
        _, report = train_model(model, labelled, settings, out, classes=_split(classes), unlabeled=unlabeled,
                                split_seed=seed, progress=True)
        typer.echo(f"trained {model} on {report['n_train']} cells ({report['n_unlabeled']} unlabeled) in "
                   f"{report['train_seconds'] / 60:.1f} min; temperature {report['temperature']:.3g}; "
                   f"{report['n_skipped']} image(s) skipped")
        for path, reason in report["skipped"]:
            typer.echo(f"  skipped {path}: {reason}")
        typer.echo(f"model written to {out}")

    _run(action)


@app.command()
def evaluate(
    model: Path = typer.Option(..., help="model directory"),
    data: Path = typer.Option(..., help="manifest CSV or per-class folder"),
    domains: Optional[str] = typer.Option(None, help="comma-separated domains to evaluate on"),
    classes: Optional[str] = typer.Option(None, help="comma-separated classes (default: the model's)"),
    part: Optional[str] = typer.Option(None, help="only this part of the model's split (train, val, test)"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="write metrics JSON (and PNG plots beside it)"),
    anomaly_data: Optional[Path] = typer.Option(None, help="dataset with anomalies and normal cells"),
    anomaly_domains: Optional[str] = typer.Option(None, help="domains of the anomaly dataset to use"),
    anomaly_label: str = typer.Option("blast", help="label that marks an anomaly in the anomaly dataset"),
    max_trials: Optional[int] = typer.Option(None, help="diffusion: override the scoring's trial limit"),
) -> None:
    """Evaluate a model on labelled cells it never trained on; print a table, write JSON and plots."""

    def action():
        from cytoloop.data import load_records, select
        from cytoloop.models import load_model
        from cytoloop.workflows import evaluate_model, held_out

        classifier = load_model(model)
        if max_trials is not None and classifier.kind == "diffusion":
            cfg = classifier.scoring_config
            classifier.scoring_config = cfg.model_validate(
                {**cfg.model_dump(), "max_trials": max_trials, "min_trials": min(cfg.min_trials, max_trials)})
        wanted = _split(classes) or classifier.classes
        records = select(load_records(data), _split(domains), wanted)
        records, excluded = held_out(records, model, part)
        anomalies = select(load_records(anomaly_data), _split(anomaly_domains)) if anomaly_data else []
        report = evaluate_model(classifier, records, json_out, anomaly_records=anomalies,
                                anomaly_label=anomaly_label, excluded=excluded, progress=True)
        _print_report(report)

    _run(action)


def _print_report(report: dict) -> None:
    rows = [
        ("cells", f"{report['n_cells']} ({report['n_skipped']} skipped, "
                  f"{report['n_excluded_seen_in_training']} excluded: seen in training)"),
        ("accuracy", f"{report['accuracy']:.3f}"),
        ("balanced accuracy", f"{report['balanced_accuracy']:.3f}"),
        ("ECE (15 bins)", f"{report['ece']:.3f}"),
        ("NLL / Brier", f"{report['nll']:.3f} / {report['brier']:.3f}"),
        ("accuracy at 90% coverage", f"{report['accuracy_at_90_coverage']:.3f}"),
        ("denoiser evals per cell", f"{report['denoiser_evals_per_cell']:.1f}"),
        ("cells per second", f"{report['cells_per_second']:.2f}"),
    ]
    if "anomaly_auroc" in report:
        rows.append(("anomaly AUROC", f"{report['anomaly_auroc']:.3f} ({report['anomaly_n']} cells)"))
    rows += [(f"recall {name}", "-" if r is None else f"{r:.3f}") for name, r in report["per_class_recall"].items()]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        typer.echo(f"{key:<{width}}  {value}")
    for path, reason in report["skipped"]:
        typer.echo(f"skipped {path}: {reason}")
    for plot in report.get("plots", []):
        typer.echo(f"plot: {plot}")


@app.command()
def generate(
    model: Path = typer.Option(..., help="diffusion model directory"),
    class_name: str = typer.Option(..., "--class", help="class to generate"),
    n: int = typer.Option(16, "-n", min=1, max=256, help="number of cells"),
    out: Path = typer.Option(Path("generated.png"), help="grid PNG to write"),
    steps: int = typer.Option(50, min=1, max=1000, help="DDIM sampling steps"),
    guidance: float = typer.Option(2.0, min=0.0, help="classifier-free guidance scale (1 = none)"),
    seed: int = typer.Option(0),
) -> None:
    """Sample cells of one class from a diffusion model and write them as a grid PNG."""

    def action():
        from cytoloop import plots
        from cytoloop.models import load_model

        classifier = load_model(model)
        if classifier.kind != "diffusion":
            _fail(f"{model} is a {classifier.kind} model; only diffusion models generate cells")
        images = classifier.generate(class_name, n, steps=steps, guidance=guidance, seed=seed)
        typer.echo(f"wrote {plots.image_grid(images, out)}")

    try:
        _run(action)
    except ValueError as error:  # unknown class
        _fail(str(error))


@app.command()
def tune(
    model: Path = typer.Option(..., help="diffusion model directory (its scoring is tuned in place)"),
    data: Path = typer.Option(..., help="the manifest CSV or per-class folder the model was trained from"),
    trials: Optional[int] = typer.Option(None, help="exhaustive trials per validation cell to agree with"),
    agreement: Optional[float] = typer.Option(None, help="fraction of validation cells that must agree"),
    null_trials: Optional[int] = typer.Option(None, help="score the null class (anomaly) on this many first trials"),
) -> None:
    """Tune a diffusion model's adaptive scoring on its validation cells to agree with exhaustive scoring."""

    def action():
        from cytoloop.data import load_records
        from cytoloop.models import load_model
        from cytoloop.preprocess import load_cells
        from cytoloop.workflows import held_out, label_indices, tune_model_scoring

        classifier = load_model(model)
        if classifier.kind != "diffusion":
            _fail(f"{model} is a {classifier.kind} model; only diffusion scoring is tuned")
        updates = {k: v for k, v in {"tuning_trials": trials, "tuning_agreement": agreement,
                                     "null_trials": null_trials}.items() if v is not None}
        classifier.scoring_config = classifier.scoring_config.model_validate(
            {**classifier.scoring_config.model_dump(), **updates})
        records, _ = held_out(load_records(data), model, part="val")
        cells = load_cells(records, classifier.data_config, progress=True)
        report = tune_model_scoring(classifier, cells.images, label_indices(cells.records, classifier.classes),
                                    progress=True)
        classifier.save(model)
        (Path(model) / "tuning.json").write_text(json.dumps(report, indent=1))
        chosen = report["chosen"]
        if chosen is None:
            typer.echo(f"no rule met the agreement target on {report['n_cells']} validation cells; scoring unchanged")
        else:
            prior = (f", variance prior worth {chosen['variance_prior_trials']:g} trials"
                     if chosen["variance_prior_trials"] else "")
            typer.echo(f"tuned on {report['n_cells']} validation cells: min_trials {chosen['min_trials']}, "
                       f"elimination_p {chosen['elimination_p']:g}{prior}: {chosen['evals_mean']:.1f} evals/cell "
                       f"(p95 {chosen['evals_p95']:.0f}), agreement with exhaustive {chosen['agreement']:.3f}")

    _run(action)


@app.command()
def distill(
    teacher: Path = typer.Option(..., help="trained diffusion model directory"),
    data: Path = typer.Option(..., help="the manifest CSV or per-class folder the teacher was trained from"),
    out: Path = typer.Option(..., help="cascade model directory to write"),
    unlabeled_domains: Optional[str] = typer.Option(None, help="domains whose cells the student also learns from"),
    threshold: Optional[float] = typer.Option(None, help="student confidence under which a cell is deferred"),
    defer_fraction: Optional[float] = typer.Option(None, help="pick the threshold deferring this validation fraction"),
    steps: Optional[int] = typer.Option(None, help="student training steps"),
    tune_teacher: bool = typer.Option(True, "--tune/--no-tune", help="tune the teacher's scoring first"),
    config: Optional[Path] = typer.Option(None, help="JSON settings file (CYTOLOOP_* variables override it)"),
) -> None:
    """Distil a fast student CNN from a diffusion model and save the cascade of both to OUT."""

    def action():
        from cytoloop.config import load_settings
        from cytoloop.data import load_records, select
        from cytoloop.workflows import distill_model

        overrides = {"train": {"steps": steps}, "cascade": {"threshold": threshold, "defer_fraction": defer_fraction}}
        settings = load_settings(config, {k: {f: v for f, v in s.items() if v is not None} for k, s in overrides.items()})
        records = load_records(data)
        unlabeled = select(records, _split(unlabeled_domains)) if unlabeled_domains else []
        cascade, report = distill_model(teacher, records, settings, out, unlabeled=unlabeled, tune=tune_teacher,
                                        progress=True)
        d = report["distillation"]
        typer.echo(f"student distilled on {d['n_distill']} cells ({d['n_labelled']} labelled) in "
                   f"{d['train_seconds'] / 60:.1f} min; threshold {d['threshold']:.3f} defers "
                   f"{d['val_deferred_fraction']:.0%} of validation cells")
        typer.echo(f"cascade written to {out}")

    _run(action)


@app.command()
def info(model: Path = typer.Argument(..., help="model directory")) -> None:
    """Print what a model directory holds: kind, classes, preprocessing, calibration, provenance."""

    def action():
        from cytoloop.models.base import read_model_meta

        typer.echo(json.dumps(read_model_meta(model), indent=1))

    _run(action)


# --------------------------------------------------------------------------- registry, retraining, drift (issue 6)


def _run_registry(action):
    """`_run`, plus registry lookups and refused alias moves turned into clear messages."""
    from pydantic import ValidationError

    from cytoloop.registry import RegistryError

    def guarded():
        try:
            return action()
        except ValidationError:
            raise
        except (RegistryError, ValueError) as error:
            _fail(str(error))

    return _run(guarded)


def _settings(config: Path | None, overrides: dict | None = None):
    from cytoloop.config import load_settings

    cleaned = {k: {f: v for f, v in s.items() if v is not None} for k, s in (overrides or {}).items()}
    return load_settings(config, {k: v for k, v in cleaned.items() if v})


def _labelled(path: Path) -> list:
    from cytoloop.data import DatasetError, load_records

    records = [r for r in load_records(path) if r.label is not None]
    if not records:
        raise DatasetError(f"{path}: no labelled cells")
    return records


def _print_outcome(outcome) -> None:
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


@app.command()
def register(
    model: Path = typer.Argument(..., help="trained model directory"),
    champion: bool = typer.Option(False, "--champion", help="also point the (site) champion alias at it"),
    site: Optional[str] = typer.Option(None, help="with --champion: the site alias champion-<site>"),
    reason: Optional[str] = typer.Option(None, help="why (required with --champion: it goes to the audit trail)"),
    config: Optional[Path] = typer.Option(None, help="JSON settings file"),
) -> None:
    """Register a trained model directory as a new version (e.g. the first champion)."""

    def action():
        from cytoloop.finetune import code_revision
        from cytoloop.models.base import read_model_meta
        from cytoloop.registry import open_registry, site_alias

        if champion and not reason:
            _fail("--champion moves an alias: give --reason")
        settings = _settings(config)
        meta = read_model_meta(model)
        registry = open_registry(settings)
        name = settings.registry.model_name
        version = registry.log_model(model, name, tags={"kind": meta["kind"], "site": site or "global",
                                                        "code_revision": code_revision(), "job": "register"})
        typer.echo(f"registered {name} v{version.version} from {model}")
        if champion:
            move = registry.move_alias(name, site_alias(site), version.version, why=reason, action="manual")
            typer.echo(f"@{move.alias}: v{move.from_version or '-'} -> v{move.to_version}")

    _run_registry(action)


@app.command()
def retrain(
    labels: Path = typer.Option(..., help="consensus labels: manifest CSV (path,label,domain,...)"),
    unlabeled: Optional[Path] = typer.Option(None, help="manifest CSV of the unlabeled pool (trains the null class)"),
    if_due: bool = typer.Option(False, "--if-due", help="only if the retrain policy says a retrain is due"),
    steps: Optional[int] = typer.Option(None, help="fine-tuning steps"),
    workers: Optional[int] = typer.Option(None, help="Ray Train workers"),
    config: Optional[Path] = typer.Option(None, help="JSON settings file"),
) -> None:
    """Fine-tune the champion on the consensus labels (Ray Train), register it and put it through the gate."""

    def action():
        from cytoloop.data import load_records
        from cytoloop.drift import load_flags
        from cytoloop.retrain import load_state, new_labels, retrain_due, save_state

        settings = _settings(config, {"finetune": {"steps": steps, "num_workers": workers}})
        records = _labelled(labels)
        state_path = Path(settings.home) / "retrain" / "state.json"
        state = load_state(state_path)
        fresh = new_labels(records, state)
        decision = retrain_due(len(fresh), state.hours_since_last(), bool(load_flags(_flags_path(settings))),
                               settings.retrain)
        typer.echo(f"retrain {'due' if decision.due else 'not due'}: {decision.reason}")
        if if_due and not decision.due:
            return
        from jobs.finetune import run_finetune

        pool = load_records(unlabeled) if unlabeled else []
        outcome = run_finetune(settings, records, pool)
        save_state(state_path, records)
        _print_outcome(outcome)

    _run_registry(action)


@app.command()
def adapt(
    site: str = typer.Option(..., help="hospital name; the model is registered under champion-<site>"),
    data: Path = typer.Option(..., help="the site's labelled cells: manifest CSV"),
    unlabeled: Optional[Path] = typer.Option(None, help="the site's unlabeled cells (diffusion null class)"),
    stain_normalize: Optional[bool] = typer.Option(
        None, "--stain-normalize/--no-stain-normalize", help="normalise to the champion's training colours"),
    steps: Optional[int] = typer.Option(None, help="fine-tuning steps"),
    config: Optional[Path] = typer.Option(None, help="JSON settings file"),
) -> None:
    """Adapt the champion to one hospital: fine-tune on its labels, gate against what serves it, alias per site."""
    import re

    if not re.fullmatch(r"[A-Za-z0-9_-]+", site):
        _fail(f"invalid site name {site!r}: use letters, digits, '-' and '_'")

    def action():
        from cytoloop.data import load_records
        from jobs.finetune import run_finetune

        settings = _settings(config, {"adapt": {"steps": steps}})
        pool = load_records(unlabeled) if unlabeled else []
        _print_outcome(run_finetune(settings, _labelled(data), pool, site=site, stain_normalize=stain_normalize))

    _run_registry(action)


@app.command()
def promote(
    version: str = typer.Argument(..., help="model version to promote"),
    reason: str = typer.Option(..., help="why the gate is overridden (kept on the version and in the audit trail)"),
    site: Optional[str] = typer.Option(None, help="promote to champion-<site> instead of the global champion"),
    config: Optional[Path] = typer.Option(None, help="JSON settings file"),
) -> None:
    """Point the champion alias at VERSION whatever the gate said, recording who and why."""

    def action():
        from cytoloop.promotion import override
        from cytoloop.registry import open_registry, site_alias

        settings = _settings(config)
        move = override(open_registry(settings), settings.registry.model_name, version, site_alias(site), reason)
        typer.echo(f"@{move.alias}: v{move.from_version or '-'} -> v{move.to_version} (override by {move.who})")

    _run_registry(action)


@app.command()
def rollback(
    reason: str = typer.Option(..., help="why (kept in the audit trail)"),
    site: Optional[str] = typer.Option(None, help="roll back champion-<site> instead of the global champion"),
    config: Optional[Path] = typer.Option(None, help="JSON settings file"),
) -> None:
    """Move the champion alias back to the version it pointed at before its latest move."""

    def action():
        from cytoloop.registry import open_registry, site_alias

        settings = _settings(config)
        move = open_registry(settings).rollback(settings.registry.model_name, site_alias(site), why=reason)
        typer.echo(f"@{move.alias}: v{move.from_version} -> v{move.to_version} (rollback by {move.who})")

    _run_registry(action)


def _flags_path(settings) -> Path:
    return Path(settings.home) / "drift" / "flags.json"


@app.command()
def drift(
    events: Path = typer.Option(..., help="prediction log: JSON lines of drift.PredictionEvent"),
    config: Optional[Path] = typer.Option(None, help="JSON settings file"),
) -> None:
    """Compute drift per model version, site and time window; log it to MLflow and update the flags."""

    def action():
        from cytoloop.drift import drift_windows, log_windows, read_colour_reference, read_events, save_flags
        from cytoloop.registry import RegistryError, open_registry

        settings = _settings(config)
        registry = open_registry(settings)
        name = settings.registry.model_name
        log = read_events(events)
        references = {}
        for version in sorted({e.model_version for e in log}):
            try:
                registry.load(name, version, settings.registry.cache_dir)
                references[version] = read_colour_reference(Path(settings.registry.cache_dir) / name / version)
            except RegistryError:  # e.g. a local model directory served outside the registry
                typer.echo(f"  {name} v{version} is not in the registry: no stain figures for it")
                references[version] = None
        windows = drift_windows(log, references, settings.drift)
        log_windows(registry, name, windows)
        flags = save_flags(_flags_path(settings), windows)
        typer.echo(f"{len(log)} predictions, {len(windows)} windows logged to MLflow; {len(flags)} flagged")
        for flag in flags:
            typer.echo(f"  v{flag['model_version']} {flag['site'] or 'global'} {flag['window_start']}: "
                       + "; ".join(flag["flags"]))

    _run_registry(action)


@app.command()
def status(
    labels: Optional[Path] = typer.Option(None, help="consensus labels, to say whether a retrain is due"),
    config: Optional[Path] = typer.Option(None, help="JSON settings file"),
) -> None:
    """What serves where, the latest alias moves, drift flags and whether a retrain is due."""

    def action():
        from cytoloop.drift import load_flags
        from cytoloop.registry import RegistryError, open_registry
        from cytoloop.retrain import load_state, new_labels, retrain_due

        settings = _settings(config)
        registry = open_registry(settings)
        name = settings.registry.model_name
        typer.echo(f"registry {settings.registry.tracking_uri}, model {name}")
        try:
            aliases, moves = registry.aliases(name), registry.alias_history(name)
        except RegistryError:
            typer.echo("  no model registered yet")
            aliases, moves = {}, []
        for alias, version in sorted(aliases.items()):
            tags = registry.version(name, version).tags
            typer.echo(f"  @{alias}: v{version} ({tags.get('kind', '?')}, gate {tags.get('gate.verdict', '-')})")
        for move in moves[-5:]:
            typer.echo(f"  {move.time} {move.who} {move.action} @{move.alias}: v{move.from_version or '-'} -> "
                       f"v{move.to_version}: {move.why}")
        flags = load_flags(_flags_path(settings))
        typer.echo(f"drift: {'FLAGGED' if flags else 'no flags'}")
        for flag in flags:
            typer.echo(f"  v{flag['model_version']} {flag['site'] or 'global'}: " + "; ".join(flag["flags"]))
        state = load_state(Path(settings.home) / "retrain" / "state.json")
        last = state.last_time.isoformat() if state.last_time else "never"
        if labels is None:
            typer.echo(f"retrain: last {last} (give --labels to check whether one is due)")
            return
        decision = retrain_due(len(new_labels(_labelled(labels), state)), state.hours_since_last(), bool(flags),
                               settings.retrain)
        typer.echo(f"retrain: {'DUE' if decision.due else 'not due'} ({decision.reason}); last {last}")

    _run_registry(action)



# -- public datasets (issue 7) ---------------------------------------------------------------------------------
data_app = typer.Typer(no_args_is_help=True, help="Download public blood-cell datasets (checksum-verified) and list "
                                                  "them; commands without --data fall back to a fetched one.")
app.add_typer(data_app, name="data")


@data_app.command("fetch")
def data_fetch(
    name: str = typer.Argument(..., help="catalogue name (see `cytoloop data list`), e.g. bloodmnist"),
    dest: Optional[Path] = typer.Option(None, help="folder to put datasets in (default: datasets.cache_dir)"),
    config: Optional[Path] = typer.Option(None, help="JSON settings file"),
) -> None:
    """Download a public dataset, verify its checksum and convert it to class folders plus manifest.csv; running
    it again once the dataset is there downloads nothing."""

    def action():
        from collections import Counter

        from cytoloop.data import load_records
        from cytoloop.datasets import fetch

        folder = fetch(name, dest or _settings(config).datasets.cache_dir, progress=True)
        counts = Counter(r.label for r in load_records(folder))
        typer.echo(f"{name}: {sum(counts.values())} cells in {folder} (use it with --data {folder})")
        for label, count in sorted(counts.items()):
            typer.echo(f"  {label:<22} {count}")

    _run(action)


@data_app.command("list")
def data_list(
    dest: Optional[Path] = typer.Option(None, help="folder datasets were fetched into (default: datasets.cache_dir)"),
    config: Optional[Path] = typer.Option(None, help="JSON settings file"),
) -> None:
    """The catalogue: each dataset's size, licence, and whether it is fetched (or how to get it by hand)."""

    def action():
        from cytoloop.datasets import CATALOGUE, fetched

        root = dest or _settings(config).datasets.cache_dir
        for entry in CATALOGUE.values():
            folder = fetched(entry.name, root)
            state = f"fetched: {folder}" if folder else "not fetched" if entry.url else "manual download"
            typer.echo(f"{entry.name:<15} {entry.license:<10} {state}\n    {entry.description}; {entry.homepage}")
            provenance = f"MD5 {entry.md5}, as published in {entry.checksum_source}" if entry.md5 else entry.manual
            typer.echo(f"    {provenance}")

    _run(action)


# -- the review loop's services and Label Studio side (docs/review-loop.md) -----------------------------------
stack_app = typer.Typer(no_args_is_help=True, help="Start, inspect and stop the local services (Label Studio, the "
                                                   "label receiver, MLflow, Ray) under Settings.home.")
review_app = typer.Typer(no_args_is_help=True, help="Route uncertain cells to Label Studio and bring labels back.")
app.add_typer(stack_app, name="stack")
app.add_typer(review_app, name="review")


def _run_review(action):
    """`_run`, plus the review loop's expected failures (a service down, a port taken, an image not servable)."""
    from cytoloop.stack import StackError
    from labelstudio.client import LabelStudioUnavailable
    from labelstudio.tasks import TaskError

    def guarded():
        try:
            return action()
        except (StackError, LabelStudioUnavailable, TaskError, PermissionError) as error:
            _fail(str(error))

    return _run(guarded)


def _print_status(rows) -> None:
    for row in rows:
        pid = f"pid {row.pid}" if row.pid else ""
        port = f"port {row.port}" if row.port else ""
        typer.echo(f"{row.name:<13} {row.state:<9} {port:<11} {pid:<11} {row.detail}")


@stack_app.command("up")
def stack_up(
    only: Optional[str] = typer.Option(None, help="comma-separated services (label-studio, labels, mlflow, ray)"),
    config: Optional[Path] = typer.Option(None, help="JSON settings file"),
) -> None:
    """Start the services not running yet and wait until each answers its health check (idempotent)."""

    def action():
        from cytoloop.config import load_settings
        from cytoloop.stack import Stack

        _print_status(Stack(load_settings(config)).up(_split(only)))

    _run_review(action)


@stack_app.command("status")
def stack_status(config: Optional[Path] = typer.Option(None, help="JSON settings file")) -> None:
    """Show each service: up, starting, down, stale (dead process) or disabled."""

    def action():
        from cytoloop.config import load_settings
        from cytoloop.stack import Stack

        _print_status(Stack(load_settings(config)).status())

    _run_review(action)


@stack_app.command("down")
def stack_down(
    only: Optional[str] = typer.Option(None, help="comma-separated services to stop (default: all)"),
    config: Optional[Path] = typer.Option(None, help="JSON settings file"),
) -> None:
    """Stop the services this home folder started (never anything else); their data stays."""

    def action():
        from cytoloop.config import load_settings
        from cytoloop.stack import Stack

        stopped = Stack(load_settings(config)).down(_split(only))
        typer.echo(f"stopped: {', '.join(stopped) or 'nothing was running'}")

    _run_review(action)


@review_app.command("bootstrap")
def review_bootstrap(
    site: str = typer.Option(..., help="site (lab) whose project to create"),
    model: Optional[Path] = typer.Option(None, help="model directory whose classes the project offers"),
    classes: Optional[str] = typer.Option(None, help="comma-separated classes (instead of --model)"),
    config: Optional[Path] = typer.Option(None, help="JSON settings file"),
) -> None:
    """Create (or update) the site's Label Studio project and its webhook; running it twice changes nothing."""

    def action():
        from cytoloop.config import load_settings
        from cytoloop.models.base import read_model_meta
        from labelstudio.loop import ReviewLoop

        names = _split(classes) or (read_model_meta(model)["classes"] if model else None)
        if not names:
            _fail("give --model or --classes")
        typer.echo(f"project {ReviewLoop(load_settings(config)).bootstrap(site, names)} for site {site}")

    _run_review(action)


@review_app.command("route")
def review_route(
    model: Path = typer.Option(..., help="model directory that scores the cells"),
    data: Path = typer.Option(..., help="manifest CSV or per-class folder of cells to score"),
    domains: Optional[str] = typer.Option(None, help="comma-separated domains to score"),
    site: Optional[str] = typer.Option(None, help="project to send to (default: each cell's domain)"),
    model_version: Optional[str] = typer.Option(None, help="version shown to annotators (default: model dir name)"),
    budget: Optional[int] = typer.Option(None, min=0, help="cells to send this round (default: routing.budget)"),
    push: bool = typer.Option(True, help="push to Label Studio now (else only queue in the outbox)"),
    config: Optional[Path] = typer.Option(None, help="JSON settings file"),
) -> None:
    """Score cells, route them (anomaly, review, audit, accept) and send this round's budget to Label Studio."""

    def action():
        from cytoloop.config import load_settings
        from cytoloop.data import load_records, select
        from cytoloop.models import load_model
        from cytoloop.preprocess import load_cells
        from labelstudio.loop import ReviewLoop

        classifier = load_model(model)
        loaded = load_cells(select(load_records(data), _split(domains)), classifier.data_config, progress=True)
        predictions = classifier.predict(loaded.images, progress=True)
        loop = ReviewLoop(load_settings(config))
        report = loop.route(loaded.records, predictions, classifier.classes, model_version or model.resolve().name,
                            site=site, budget=budget, push=push, images=loaded.images)
        typer.echo(f"routed {sum(report.reasons.values())} cells: {report.reasons}; "
                   f"{report.already_queued} already sent; {report.chosen} chosen, {report.queued} newly queued")
        _print_push(report.push)

    _run_review(action)


def _print_push(report) -> None:
    if report is None:
        return
    typer.echo(f"pushed {report.pushed} task(s) ({report.already_there} were already there); "
               f"{report.pending} waiting in the outbox")
    if report.error:
        typer.secho(f"warning: {report.error}; the outbox keeps them until the next push", fg=typer.colors.YELLOW)


@review_app.command("push")
def review_push(config: Optional[Path] = typer.Option(None, help="JSON settings file")) -> None:
    """Send the outbox's waiting tasks to Label Studio."""

    def action():
        from cytoloop.config import load_settings
        from labelstudio.loop import ReviewLoop

        _print_push(ReviewLoop(load_settings(config)).push())

    _run_review(action)


@review_app.command("sync")
def review_sync(config: Optional[Path] = typer.Option(None, help="JSON settings file")) -> None:
    """Apply received webhook events and poll Label Studio for every label they missed (safe to rerun)."""

    def action():
        from cytoloop.config import load_settings
        from labelstudio.loop import ReviewLoop

        r = ReviewLoop(load_settings(config)).sync()
        typer.echo(f"{r.events} webhook event(s) applied; {r.seen} annotation(s) polled, {r.changed} changed, "
                   f"{r.retracted} retracted")

    _run_review(action)


@review_app.command("report")
def review_report(
    json_out: Optional[Path] = typer.Option(None, "--json", help="also write the report as JSON"),
    config: Optional[Path] = typer.Option(None, help="JSON settings file"),
) -> None:
    """Consensus status, per-annotator agreement, and the cells waiting for senior review."""

    def action():
        from cytoloop.config import load_settings
        from labelstudio.loop import ReviewLoop

        report = ReviewLoop(load_settings(config)).report()
        typer.echo(f"cells labelled: {report['cells']}  {report['status']}")
        for name, figures in report["annotators"].items():
            agreement = "-" if figures["agreement"] is None else f"{figures['agreement']:.2f}"
            typer.echo(f"  {name}: {figures['labelled']} labelled, agreement with others {agreement} "
                       f"over {figures['compared']}")
        typer.echo(f"senior review: {len(report['senior_review'])} cell(s)")
        for cell in report["senior_review"]:
            typer.echo(f"  {cell['cell']}: {cell['status']} {cell['votes']}{' abnormal' if cell['abnormal'] else ''}")
        if json_out:
            json_out.write_text(json.dumps(report, indent=1))

    _run_review(action)


@review_app.command("export")
def review_export(
    out: Path = typer.Option(..., help="manifest CSV to write (usable by `cytoloop train --data`)"),
    config: Optional[Path] = typer.Option(None, help="JSON settings file"),
) -> None:
    """Write the agreed consensus labels as a training manifest with provenance."""

    def action():
        from cytoloop.config import load_settings
        from labelstudio.loop import ReviewLoop

        result = ReviewLoop(load_settings(config)).export(out)
        typer.echo(f"exported {result['exported']} cell(s) to {result['path']}; left out: {result['left_out']}")

    _run_review(action)


@review_app.command("serve")
def review_serve(config: Optional[Path] = typer.Option(None, help="JSON settings file")) -> None:
    """Run the webhook receiver with the periodic poll and outbox push (what `stack up` starts as 'labels')."""

    def action():
        from cytoloop.config import load_settings
        from labelstudio.loop import ReviewLoop

        ReviewLoop(load_settings(config)).serve(log=typer.echo)

    _run_review(action)


# --------------------------------------------------------------------------- serving (issue 4)


@app.command()
def serve(
    config: Optional[Path] = typer.Option(None, help="JSON settings file (CYTOLOOP_SERVE__* variables override it)"),
    host: Optional[str] = typer.Option(None, help="interface to bind (default serve.host, 127.0.0.1)"),
    port: Optional[int] = typer.Option(None, help="HTTP port (default serve.port, 8000)"),
    model_dir: Optional[Path] = typer.Option(None, help="serve this model directory instead of the registry"),
    num_cpus: Optional[int] = typer.Option(None, help="CPUs of the local Ray instance (default: all)"),
) -> None:
    """Serve the classifier over HTTP with Ray Serve until Ctrl-C (API docs at /docs). Joins the Ray cluster in
    RAY_ADDRESS if set, else starts a local one. Set the API key with CYTOLOOP_SERVE__API_KEY, not on the command line."""

    def action():
        from services.app import run_local

        if model_dir is not None and not (model_dir / "model.json").is_file():
            _fail(f"{model_dir}: not a CytoLoop model directory (no model.json)")
        settings = _settings(config, {"serve": {"host": host, "port": port, "model_dir": model_dir}})
        source = settings.serve.model_dir or f"registry model {settings.serve.model_name or settings.registry.model_name}"
        typer.echo(f"serving {source} on http://{settings.serve.host}:{settings.serve.port} (docs at /docs); Ctrl-C stops")
        run_local(settings, num_cpus=num_cpus)

    _run(action)


# --------------------------------------------------------------------------- the whole loop (issue 7)


@app.command()
def demo(
    data: Optional[Path] = typer.Option(None, help="cells: manifest CSV or class folders (default: datasets.root, "
                                                   "else a dataset fetched by `cytoloop data fetch`)"),
    rounds: Optional[int] = typer.Option(None, help="active-learning rounds (demo.rounds)"),
    domains: Optional[str] = typer.Option(None, help="comma-separated labs/domains to use (default: all)"),
    classes: Optional[str] = typer.Option(None, help="comma-separated classes to use (default: all)"),
    budget: Optional[int] = typer.Option(None, help="cells sent to Label Studio per round"),
    steps: Optional[int] = typer.Option(None, help="training steps of the seed model (train.steps)"),
    finetune_steps: Optional[int] = typer.Option(None, help="fine-tuning steps per round (finetune.steps)"),
    config: Optional[Path] = typer.Option(None, help="JSON settings file"),
) -> None:
    """Run the whole loop on real cells: stack up, seed model, Serve, score the pool with Ray Data, route to Label
    Studio, simulated annotators label, sync, fine-tune on Ray Train, gate and promote, Serve switches; R rounds.
    Writes a report with plots and prints the Label Studio, MLflow and Ray dashboard URLs."""

    def action():
        from cytoloop.datasets import resolve_data
        from jobs.cycle import Demo

        settings = _settings(config, {"demo": {"rounds": rounds, "domains": _split(domains),
                                               "classes": _split(classes), "budget": budget},
                                      "train": {"steps": steps}, "finetune": {"steps": finetune_steps}})
        source = resolve_data(data, settings.datasets.root, settings.datasets.cache_dir)
        outcome = Demo(settings, source, log=typer.echo).run()
        typer.echo(f"done: {len(outcome.rounds) - 1} round(s); report {outcome.report}")

    _run_review(action)


if __name__ == "__main__":
    app()

"""Model commands: train, evaluate, generate, tune, distill, info, recipes, card (the library, no services), and
score (a pool of cells offline, on Ray Data actors: `jobs/score.py`)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from ops.cli.common import (
    EXIT_CELLS_UNREAD,
    app,
    fail,
    output_file,
    output_file_or_stdout,
    refuse_finished_model,
    run,
    settings_from,
    site_classes,
    site_name,
    split_list,
)


@app.command()
def train(
    data: Path = typer.Option(..., help="manifest CSV, or a folder with one sub-folder per class"),
    out: Path = typer.Option(
        ..., help="model directory to write (resumes from its checkpoints; a finished model there needs --overwrite)"
    ),
    recipe: str | None = typer.Option(
        None, help="a named recipe (base-pbc, ...) fixing model, cells, budget and settings; see `recipes`"
    ),
    model: str | None = typer.Option(
        None, "--kind", "--model", help="model kind: diffusion (default) or baseline (--model: its former name)"
    ),
    domains: str | None = typer.Option(None, help="comma-separated domains to train on (default: all)"),
    classes: str | None = typer.Option(None, help="comma-separated classes (default: all labelled classes)"),
    steps: int | None = typer.Option(None, min=1, help="training steps"),
    image_size: int | None = typer.Option(None, min=16, max=512, help="model resolution in pixels"),
    unlabeled_domains: str | None = typer.Option(None, help="domains whose cells train the null class unlabeled"),
    seed: int | None = typer.Option(None, help="seed of the split and of training (default: train.seed, 0)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace a finished model already in OUT"),
    config: Path | None = typer.Option(None, help="JSON settings file (CYTOLOOP_* variables override it)"),
) -> None:
    """Train a model, calibrate it (and tune a diffusion model's scoring) on the validation part of a seeded split,
    and save it to OUT."""
    refuse_finished_model(out, overwrite)
    replacing = overwrite and (out / "model.json").is_file()  # another run's checkpoints there go, not refused
    from cytoloop.models.recipes import RECIPES, get_recipe

    flags = {
        "--kind": model,
        "--domains": domains,
        "--classes": classes,
        "--steps": steps,
        "--image-size": image_size,
        "--unlabeled-domains": unlabeled_domains,
        "--seed": seed,
    }
    if recipe is not None:
        if recipe not in RECIPES:
            fail(f"unknown recipe {recipe!r}; known: {', '.join(sorted(RECIPES))}")
        given = [name for name, value in flags.items() if value is not None]
        if given:
            fail(f"--recipe {recipe} fixes {', '.join(given)}; drop them or train without the recipe")
    model = model or "diffusion"
    if model not in ("diffusion", "baseline"):
        fail(f"unknown model kind {model!r}; valid: diffusion, baseline")

    def action():
        from cytoloop.config import load_settings
        from cytoloop.data.records import load_records, select
        from cytoloop.workflows import train_model

        if recipe is not None:
            chosen = get_recipe(recipe)
            kind, wanted_domains, split_seed = chosen.model, list(chosen.domains), chosen.seed
            wanted_classes = list(chosen.classes) if chosen.classes else None
            unfixed = chosen.unfixed(load_settings(config))  # what the file and variables set, before the recipe
            settings = load_settings(config, chosen.settings_overrides())
            if unfixed:
                fail(
                    f"--recipe {chosen.name} fixes {', '.join(unfixed)}, which the settings file or CYTOLOOP_* "
                    "variables set otherwise: unset them, or train without the recipe"
                )
            typer.echo(f"recipe {chosen.name}: {chosen.description}")
        else:
            kind, wanted_domains, wanted_classes = model, split_list(domains), split_list(classes)
            overrides = {"train": {"steps": steps, "seed": seed}, "data": {"image_size": image_size}}
            settings = load_settings(
                config, {k: {f: v for f, v in s.items() if v is not None} for k, s in overrides.items()}
            )
            split_seed = settings.train.seed  # --seed, else the settings' (file or CYTOLOOP_TRAIN__SEED)
        records = load_records(data)
        if not any(r.label for r in records):
            fail(f"{data}: no labelled cells (its label column is empty); training needs labels")
        labelled = select([r for r in records if r.label], wanted_domains, wanted_classes)
        unlabeled = []
        if unlabeled_domains:
            unlabeled = [r for r in select(records, split_list(unlabeled_domains)) if r not in labelled]
        _, report = train_model(
            kind,
            labelled,
            settings,
            out,
            classes=wanted_classes,
            unlabeled=unlabeled,
            split_seed=split_seed,
            progress=True,
            replace_other_run=replacing,
        )
        if recipe is not None:
            write_recipe_record(out, recipe, data)
        typer.echo(
            f"trained {kind} on {report['n_train']} cells ({report['n_unlabeled']} unlabeled) in "
            f"{report['train_seconds'] / 60:.1f} min; temperature {report['temperature']:.3g}; "
            f"{report['n_skipped']} image(s) skipped"
        )
        if report.get("tuned_rule"):
            rule = report["tuned_rule"]
            typer.echo(
                f"scoring tuned: {rule['evals_mean']:.1f} denoiser evaluations per cell at agreement "
                f"{rule['agreement']:.3f} with exhaustive scoring on the validation cells"
            )
        for _, reason in report["skipped"]:  # the reason begins with the file's path
            typer.echo(f"  skipped {reason}")
        typer.echo(f"model written to {out}")

    run(action)


def write_recipe_record(out: Path, recipe: str, data: Path) -> None:
    """Record in the model directory the recipe and the command that made it (the model card quotes it)."""
    from cytoloop.files import write_text
    from cytoloop.models.recipes import get_recipe

    chosen = get_recipe(recipe)
    record = {
        "recipe": chosen.name,
        "description": chosen.description,
        "model": chosen.model,
        "domains": list(chosen.domains),
        "classes": chosen.classes,
        "steps": chosen.steps,
        "seed": chosen.seed,
        "settings": chosen.settings_overrides(),
        "command": f"cytoloop train --recipe {chosen.name} --data {data} --out {out}",
    }
    write_text(Path(out) / "recipe.json", json.dumps(record, indent=1))


@app.command()
def recipes() -> None:
    """List the named training recipes (`cytoloop train --recipe NAME`)."""
    from cytoloop.models.recipes import RECIPES

    width = max(len(name) for name in RECIPES) + 1
    for recipe in RECIPES.values():
        typer.echo(f"{recipe.name:<{width}} {recipe.description}")
        classes = f", classes {','.join(recipe.classes)}" if recipe.classes else ""
        typer.echo(
            f"{'':<{width}} {recipe.model}, domains {','.join(recipe.domains)}{classes}, {recipe.steps} steps, "
            f"seed {recipe.seed}, settings {json.dumps(recipe.settings_overrides())}"
        )


@app.command()
def evaluate(
    model: Path = typer.Option(..., help="model directory"),
    data: Path = typer.Option(..., help="manifest CSV or per-class folder"),
    domains: str | None = typer.Option(None, help="comma-separated domains to evaluate on"),
    classes: str | None = typer.Option(None, help="comma-separated classes (default: the model's)"),
    part: str | None = typer.Option(None, help="only this part of the model's split (train, val, test)"),
    json_out: Path | None = typer.Option(
        None,
        "--json",
        callback=output_file_or_stdout,
        help="write metrics JSON (and PNG plots beside it); '-' prints the JSON on stdout instead",
    ),
    anomaly_data: Path | None = typer.Option(None, help="dataset with anomalies and normal cells"),
    anomaly_domains: str | None = typer.Option(None, help="domains of the anomaly dataset to use"),
    anomaly_label: str = typer.Option("blast", help="label that marks an anomaly in the anomaly dataset"),
    max_trials: int | None = typer.Option(None, min=2, help="diffusion: override the scoring's trial limit"),
    cells: int | None = typer.Option(
        None, min=1, help="evaluate on this many of the cells (a fixed draw that keeps the class mix); default all"
    ),
    site: str | None = typer.Option(
        None,
        callback=site_name,
        help="decide every cell among the classes this site reports (sites.<site>.classes), as it is served",
    ),
) -> None:
    """Evaluate a model on labelled cells it never trained on; print a table, write JSON and plots."""

    def action():
        from collections import Counter

        from cytoloop.data.records import class_interleaved_subset, load_records, select
        from cytoloop.models.loading import load_model
        from cytoloop.workflows import evaluate_model, held_out

        settings = settings_from(None)
        allowed = site_classes(settings, site)
        classifier = load_model(model, settings.scoring)
        if max_trials is not None and classifier.kind == "diffusion":
            cfg = classifier.scoring_config
            classifier.scoring_config = cfg.model_validate(
                {**cfg.model_dump(), "max_trials": max_trials, "min_trials": min(cfg.min_trials, max_trials)}
            )
        if classes:  # asked for: each must have cells
            records = select(load_records(data), split_list(domains), split_list(classes))
        else:  # the model's classes that these cells have (a lab is evaluated on the classes it has)
            given = select(load_records(data), split_list(domains))
            records = [r for r in given if r.label in classifier.classes]
            if not records:
                fail(f"{data}: no cell is labelled with one of the model's classes ({', '.join(classifier.classes)})")
            unknown = Counter(r.label for r in given if r.label is not None and r.label not in classifier.classes)
            if unknown:  # said, not silently dropped: a misspelt label looks just like a class the lab lacks
                named = ", ".join(f"{label!r} ({n})" for label, n in sorted(unknown.items()))
                typer.echo(
                    f"left out {sum(unknown.values())} cells labelled with classes the model lacks: {named}", err=True
                )
        records, excluded = held_out(records, model, part)
        records = class_interleaved_subset(records, cells)
        anomalies = select(load_records(anomaly_data), split_list(anomaly_domains)) if anomaly_data else []
        anomalies, learnt = held_out(anomalies, model) if anomalies else ([], 0)
        if learnt:  # cells it trained on (unlabeled, say) are no test of what it has never seen
            typer.echo(f"left out {learnt} anomaly-set cell(s) the model learnt from", err=True)
        if anomalies and len({r.label == anomaly_label for r in anomalies}) < 2:  # checked before the long scoring
            labels = ", ".join(sorted({str(r.label) for r in anomalies}))
            fail(
                f"--anomaly-data needs both '{anomaly_label}' cells (--anomaly-label) and other cells; it has: {labels}"
            )
        to_stdout = json_out is not None and str(json_out) == "-"
        report = evaluate_model(
            classifier,
            records,
            None if to_stdout else json_out,
            anomaly_records=anomalies,
            anomaly_label=anomaly_label,
            excluded=excluded,
            progress=True,  # on standard error: the JSON on standard output stays whole
            allowed=allowed,
        )
        if to_stdout:
            import json

            typer.echo(json.dumps(report, indent=1, default=str))
            return
        _print_report(report, part)

    run(action)


@app.command()
def score(
    model: Path = typer.Option(..., help="model directory (diffusion, baseline or cascade)"),
    data: Path = typer.Option(..., help="manifest CSV or per-class folder of the cells to score"),
    out: Path = typer.Option(..., callback=output_file, help="CSV to write: one row per cell, in the manifest's order"),
    domains: str | None = typer.Option(None, help="comma-separated domains to score (default all)"),
    part: str | None = typer.Option(None, help="only this part of the model's split (default: every cell given)"),
    cells: int | None = typer.Option(None, min=1, help="score this many of the cells (a fixed draw); default all"),
    workers: int = typer.Option(1, min=1, help="Ray actors, each with its own copy of the model"),
    threads: int | None = typer.Option(None, min=1, help="torch threads per worker (default: torch's)"),
    gpus: float = typer.Option(0.0, min=0.0, help="GPUs per worker"),
    batch_size: int = typer.Option(64, min=1, help="cells per batch a worker classifies at once"),
    config: Path | None = typer.Option(None, help="JSON settings (routing thresholds: routing.*)"),
    site: str | None = typer.Option(
        None,
        callback=site_name,
        help="decide every cell among the classes this site reports (sites.<site>.classes), as it is served",
    ),
) -> None:
    """Score a pool of cells offline with Ray Data (no service needed): class, probabilities, anomaly score and
    route per cell, as the classifier service would answer, written to a CSV. Labels are not needed (the
    manifest keeps its label column, left empty). Each answer is also written, as it comes, to OUT.journal: a
    run that is stopped and started again with the same model and settings scores only the cells it lacks;
    the journal is removed once OUT is written, unless some cells' files could not be read (exit code 6: run it
    again once they can, and only those are scored)."""

    manifest = data / "manifest.csv" if data.is_dir() else data
    if out.resolve() == manifest.resolve():
        fail(f"--out {out} is the manifest being scored: the scores would replace it (its labels among them)")

    def action():
        from collections import Counter

        from cytoloop.data.records import class_interleaved_subset, load_records, select
        from cytoloop.models.loading import load_model
        from cytoloop.workflows import held_out
        from jobs.score import OfflineScores, score_offline, write_scores_csv

        records = select(load_records(data), split_list(domains))
        if part:
            records, _ = held_out(records, model, part)
        records = class_interleaved_subset(records, cells)
        if not records:
            fail(f"{data}: no cells to score (domains {domains or 'all'}, part {part or 'all'})")
        settings = settings_from(config)
        allowed = site_classes(settings, site)
        load_model(model, settings.scoring)  # a damaged model is named here, not in a Ray actor's traceback
        journal = out.with_name(out.name + ".journal")  # answers as they come: a stopped run goes on from there

        def write_out(scores: OfflineScores) -> None:  # while the journal is held: no run takes it in between
            write_scores_csv(scores, out)
            if not scores.unreadable:  # kept otherwise: a run once the files can be read scores only those
                journal.unlink(missing_ok=True)

        scores = score_offline(
            records,
            model,
            settings.routing,
            workers,
            threads,
            gpus,
            batch_size,
            runtime=settings.scoring,
            allowed=allowed,
            journal=journal,
            progress=True,
            finish=write_out,
        )
        routes = Counter(result.route for result in scores.scored)
        if scores.resumed:
            typer.echo(f"{scores.resumed} cells were answered by the stopped earlier run (its journal), not again")
        fresh = len(scores.scored) - scores.resumed
        typer.echo(
            f"scored {len(scores.scored)} of {len(records)} cells with {model} ({scores.version}); {fresh} in "
            f"{scores.seconds:.1f} s ({fresh / max(scores.seconds, 1e-9):.1f} cells/s, {workers} "
            f"worker(s)); routes: {', '.join(f'{k} {v}' for k, v in sorted(routes.items()))}; wrote {out}"
        )
        for why in list(scores.failed.values())[:10]:
            typer.echo(f"  not scored: {why}")
        if len(scores.failed) > 10:
            typer.echo(f"  ... and {len(scores.failed) - 10} more cells not scored (their reasons are in {out})")
        if records and not scores.scored and len(scores.unreadable) < len(scores.failed):
            # a scheduler must not read this as done, nor run it again: some images were refused for what they hold
            fail(f"none of the {len(records)} cells could be scored; their reasons are in {out}")
        if scores.unreadable:  # a mount missing on a worker, a wrong folder: not done, and worth running again
            kept = f"the {len(scores.scored)} answered are kept in {journal}" if scores.scored else "none was answered"
            typer.secho(
                f"error: {len(scores.unreadable)} of {len(records)} cells' files could not be read (their reasons are "
                f"in {out}); run the same command again once they can be: {kept}",
                fg=typer.colors.RED,
                err=True,
            )
            raise typer.Exit(EXIT_CELLS_UNREAD)

    run(action)


def _print_report(report: dict, part: str | None = None) -> None:
    why = f"outside part {part!r} of the split" if part else "seen in training"
    rows = [
        (
            "cells",
            f"{report['n_cells']} ({report['n_skipped']} skipped, "
            f"{report['n_excluded_seen_in_training']} excluded: {why})",
        ),
        ("accuracy", f"{report['accuracy']:.3f}"),
        (
            "balanced accuracy",
            f"{report['balanced_accuracy']:.3f} [{report['intervals']['balanced_accuracy'][0]:.3f}, "
            f"{report['intervals']['balanced_accuracy'][1]:.3f}]",
        ),
        ("ECE (15 bins)", f"{report['ece']:.3f}"),
        ("NLL / Brier", f"{report['nll']:.3f} / {report['brier']:.3f}"),
        ("accuracy at 90% coverage", f"{report['accuracy_at_90_coverage']:.3f}"),
        ("denoiser evals per cell", f"{report['denoiser_evals_per_cell']:.1f}"),
        ("cells per second", f"{report['cells_per_second']:.2f}"),
    ]
    if "anomaly_auroc" in report:
        rows.append(("anomaly AUROC", f"{report['anomaly_auroc']:.3f} ({report['anomaly_n']} cells)"))
    rows += [(f"recall {name}", "-" if r is None else f"{r:.3f}") for name, r in report["per_class_recall"].items()]
    for domain, figures in report.get("per_domain", {}).items():
        low, high = figures["intervals"]["balanced_accuracy"]
        n_classes = sum(r is not None for r in figures["per_class_recall"].values())
        rows.append(
            (
                f"lab {domain}",
                f"{figures['n_cells']} cells, balanced accuracy {figures['balanced_accuracy']:.3f} "
                f"[{low:.3f}, {high:.3f}] over its {n_classes} classes, ECE {figures['ece']:.3f}",
            )
        )
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        typer.echo(f"{key:<{width}}  {value}")
    for _, reason in report["skipped"]:  # the reason begins with the file's path
        typer.echo(f"skipped {reason}")
    for plot in report.get("plots", []):
        typer.echo(f"plot: {plot}")


@app.command()
def generate(
    model: Path = typer.Option(..., help="diffusion model directory"),
    class_name: str = typer.Option(..., "--class", help="class to generate"),
    n: int = typer.Option(16, "-n", min=1, max=256, help="number of cells"),
    out: Path = typer.Option(Path("generated.png"), callback=output_file, help="grid PNG to write"),
    steps: int = typer.Option(50, min=1, max=1000, help="DDIM sampling steps"),
    guidance: float = typer.Option(2.0, min=0.0, help="classifier-free guidance scale (1 = none)"),
    seed: int = typer.Option(0),
) -> None:
    """Sample cells of one class from a diffusion model and write them as a grid PNG."""
    if out.suffix.lower() != ".png":
        fail(f"--out {out}: the grid is a PNG; give a name ending in .png")

    def action():
        from cytoloop.evaluation import plots
        from cytoloop.models.loading import load_model

        classifier = load_model(model)
        if classifier.kind != "diffusion":
            fail(f"{model} is a {classifier.kind} model; only diffusion models generate cells")
        images = classifier.generate(class_name, n, steps=steps, guidance=guidance, seed=seed)
        typer.echo(f"wrote {plots.image_grid(images, out)}")

    run(action)  # an unknown class is a UsageError: a message, exit code 2


@app.command()
def tune(
    model: Path = typer.Option(..., help="diffusion model directory (its scoring is tuned in place)"),
    data: Path = typer.Option(..., help="the manifest CSV or per-class folder the model was trained from"),
    trials: int | None = typer.Option(None, min=2, help="exhaustive trials per validation cell to agree with"),
    agreement: float | None = typer.Option(
        None, min=0.01, max=1.0, help="fraction of validation cells that must agree"
    ),
    null_trials: int | None = typer.Option(
        None, min=1, help="score the null class (anomaly) on this many first trials"
    ),
    unlabeled_domains: str | None = typer.Option(
        None, help="also tune on these domains' cells (labels unused; cells of the model's split left out)"
    ),
) -> None:
    """Tune a diffusion model's adaptive scoring on its validation cells to agree with exhaustive scoring."""

    def action():
        from cytoloop.data.preprocess import load_cells
        from cytoloop.data.records import load_records, select
        from cytoloop.files import write_text
        from cytoloop.models.loading import load_model
        from cytoloop.workflows import held_out, label_indices, outside_split, tune_model_scoring

        classifier = load_model(model, settings_from(None).scoring)
        if classifier.kind != "diffusion":
            fail(f"{model} is a {classifier.kind} model; only diffusion scoring is tuned")
        updates = {
            k: v
            for k, v in {"tuning_trials": trials, "tuning_agreement": agreement, "null_trials": null_trials}.items()
            if v is not None
        }
        classifier.scoring_config = classifier.scoring_config.model_validate(
            {**classifier.scoring_config.model_dump(), **updates}
        )
        everything = load_records(data)
        records, _ = held_out(everything, model, part="val")
        cells = load_cells(records, classifier.data_config, progress=True)
        extra = None
        if unlabeled_domains:
            extra = load_cells(
                outside_split(select(everything, split_list(unlabeled_domains)), model),
                classifier.data_config,
                progress=True,
            ).images
        report = tune_model_scoring(
            classifier, cells.images, label_indices(cells.records, classifier.classes), progress=True, unlabeled=extra
        )
        classifier.save(model)
        write_text(Path(model) / "tuning.json", json.dumps(report, indent=1))
        chosen = report["chosen"]
        if chosen is None:
            typer.echo(
                f"no rule met the agreement target on {report['n_cells']} validation and "
                f"{report['n_unlabeled']} unlabeled cells; scoring unchanged"
            )
        else:
            prior = (
                f", variance prior worth {chosen['variance_prior_trials']:g} trials"
                if chosen["variance_prior_trials"]
                else ""
            )
            typer.echo(
                f"tuned on {report['n_cells']} validation and {report['n_unlabeled']} unlabeled cells: "
                f"min_trials {chosen['min_trials']}, "
                f"elimination_p {chosen['elimination_p']:g}{prior}: {chosen['evals_mean']:.1f} evals/cell "
                f"(p95 {chosen['evals_p95']:.0f}), agreement with exhaustive {chosen['agreement']:.3f}; "
                f"a rule that knew when to stop would need {report['evaluations_needed_mean']:.1f}"
            )

    run(action)


@app.command()
def distill(
    teacher: Path = typer.Option(..., help="trained diffusion model directory"),
    data: Path = typer.Option(..., help="the manifest CSV or per-class folder the teacher was trained from"),
    out: Path = typer.Option(..., help="cascade model directory to write"),
    unlabeled_domains: str | None = typer.Option(None, help="domains whose cells the student also learns from"),
    threshold: float | None = typer.Option(None, help="student confidence under which a cell is deferred"),
    defer_fraction: float | None = typer.Option(None, help="pick the threshold deferring this validation fraction"),
    steps: int | None = typer.Option(None, min=1, help="student training steps"),
    tune_teacher: bool = typer.Option(True, "--tune/--no-tune", help="tune the teacher's scoring first"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace a finished model already in OUT"),
    config: Path | None = typer.Option(None, help="JSON settings file (CYTOLOOP_* variables override it)"),
) -> None:
    """Distil a fast student CNN from a diffusion model and save the cascade of both to OUT."""
    if out.resolve() == teacher.resolve():
        fail(f"--out {out} is the teacher's own folder: the cascade would overwrite it")
    if threshold is not None and defer_fraction is not None:  # the fraction chose the threshold; the other was lost
        fail("give --threshold or --defer-fraction, not both: the deferral fraction chooses the threshold")
    refuse_finished_model(out, overwrite)
    replacing = overwrite and (out / "model.json").is_file()

    def action():
        from cytoloop.config import load_settings
        from cytoloop.data.records import load_records, select
        from cytoloop.workflows import distill_model

        overrides = {"train": {"steps": steps}, "cascade": {"threshold": threshold, "defer_fraction": defer_fraction}}
        settings = load_settings(
            config, {k: {f: v for f, v in s.items() if v is not None} for k, s in overrides.items()}
        )
        records = load_records(data)
        unlabeled = select(records, split_list(unlabeled_domains)) if unlabeled_domains else []
        cascade, report = distill_model(
            teacher,
            records,
            settings,
            out,
            unlabeled=unlabeled,
            tune=tune_teacher,
            progress=True,
            replace_other_run=replacing,
        )
        d = report["distillation"]
        typer.echo(
            f"student distilled on {d['n_distill']} cells ({d['n_labelled']} labelled) in "
            f"{d['train_seconds'] / 60:.1f} min; threshold {d['threshold']:.3f} defers "
            f"{d['val_deferred_fraction']:.0%} of validation cells"
        )
        typer.echo(f"cascade written to {out}")

    run(action)


@app.command()
def info(model: Path = typer.Argument(..., help="model directory")) -> None:
    """Print what a model directory holds: kind, classes, preprocessing, calibration, provenance."""

    def action():
        from cytoloop.models.base import read_model_meta
        from cytoloop.models.loading import load_model

        load_model(model)  # a directory that is no loadable model is refused, naming what is wrong
        typer.echo(json.dumps(read_model_meta(model), indent=1))

    run(action)


@app.command()
def card(
    model: Path = typer.Argument(..., help="model directory (the card is written into it as MODEL_CARD.md)"),
    evaluation: list[str] | None = typer.Option(
        None, "--eval", help="TITLE=REPORT.json: an evaluation (or anomaly) report to show; repeat for several"
    ),
    intended_use: Path | None = typer.Option(None, help="Markdown file: what the model is for and not for"),
    limits: Path | None = typer.Option(None, help="Markdown file: the model's known limits"),
) -> None:
    """Write a model card from what the model directory and the given evaluation reports say."""
    reports = {}
    for item in evaluation or []:
        title, sep, path = item.partition("=")
        if not sep or not title or not path:
            fail(f"--eval {item!r}: expected TITLE=REPORT.json")
        if title in reports:  # the second replaced the first without a word
            fail(f"--eval {title}: the title is given twice; each report needs its own")
        if not Path(path).is_file():
            fail(f"--eval {title}: no report at {path}")
        try:
            reports[title] = json.loads(Path(path).read_text())
        except ValueError as error:
            fail(f"--eval {title}: {path} is not JSON ({error})")
        figures = reports[title]
        if not isinstance(figures, dict) or not {"balanced_accuracy", "anomaly_auroc"} & set(figures):
            fail(f"--eval {title}: {path} is not a report of `cytoloop evaluate --json` (no figures in it)")
        needed = {"n_cells"} if "balanced_accuracy" in figures else set()
        needed |= {"anomaly_n", "anomaly_n_positive"} if "anomaly_auroc" in figures else set()
        if missing := sorted(needed - set(figures)):  # a KeyError traceback while the card was written
            fail(f"--eval {title}: {path} lacks {', '.join(missing)}: not a whole report of `cytoloop evaluate`")
        from cytoloop.evaluation.model_card import not_figures

        if wrong := not_figures(figures):  # a format error's traceback while the card was written
            fail(f"--eval {title}: {path}: {'; '.join(wrong)} (a report edited by hand?)")

    def action():
        from cytoloop.evaluation.model_card import write_model_card

        texts = {}
        for name, text_file in (("use", intended_use), ("limits", limits)):
            try:
                texts[name] = text_file.read_text(encoding="utf-8") if text_file else ""
            except UnicodeDecodeError as error:  # the general message named no file
                fail(f"{text_file}: not UTF-8 text ({error.reason} at byte {error.start})")
        typer.echo(f"wrote {write_model_card(model, reports, texts['use'], texts['limits'])}")

    run(action)

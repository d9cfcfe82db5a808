"""The promotion gate: no model that is worse than the one serving may reach patients' cells.

The challenger and the champion are evaluated on the same frozen evaluation set (plus the audited cells, if any)
and the same anomaly set. The alias moves only if the challenger's balanced accuracy, ECE and anomaly AUROC are
each no worse than the champion's beyond the tolerances of `PromotionConfig`. The verdict, its reasons and both
sets of figures are recorded as tags on the challenger's version, whatever the outcome; a person can override a
refusal (`override`), and every alias move lands in the registry's audit trail.

On a gate set of a few dozen cells these figures are noisy (ECE on 65 cells moved by ~0.09 between two samples of
one model; one blast of twenty ranked below half the normal cells lowers the anomaly AUROC by 0.025), so all three
are compared cell by cell: a 95 % paired-bootstrap interval of the challenger's difference from the champion on
the same cells (the basic interval for ECE, whose binned estimate is biased on few cells: `difference_intervals`;
the AUROC's over the anomaly set: `anomaly_auroc_interval`). With `refuse_on="interval"` (the default) a
challenger is refused on one of them only when that whole interval lies beyond the tolerance, i.e. it is worse with
confidence, not because a small set drew a noisy figure; the point estimate decides where no interval can be
formed (a report without per-cell results). A gate set must therefore be large enough for its tolerances: an
accuracy interval as wide as the tolerance needs a few hundred cells; the ECE check catches large calibration losses
(~0.09) from about a thousand, losses near its tolerance only from several thousand (docs/review-loop.md, "How
large a gate set").
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cytoloop.config import PromotionConfig
from cytoloop.data.records import (
    CellRecord,
    DatasetError,
    cell_identity,
    load_records,
    records_fingerprint,
    select,
)
from cytoloop.errors import UsageError
from cytoloop.evaluation import metrics
from cytoloop.files import write_text

logger = logging.getLogger(__name__)

GATED_METRICS = ("balanced_accuracy", "ece", "anomaly_auroc")


@dataclass
class GateVerdict:
    passed: bool
    reasons: list[str]
    challenger: dict[str, float | None]
    champion: dict[str, float | None] = field(default_factory=dict)
    champion_version: str | None = None
    worse: list[str] = field(default_factory=list)  # the metrics on which the challenger failed the gate


def compare(challenger: dict, champion: dict | None, config: PromotionConfig) -> GateVerdict:
    """The gate's decision on two sets of figures (`GATED_METRICS`); a pure function.

    Higher is better for balanced accuracy and anomaly AUROC, lower for ECE. A figure missing on either side
    (no anomaly set configured) is not checked, and the reasons say so.
    """
    picked = {k: challenger.get(k) for k in GATED_METRICS}
    if not champion:
        return GateVerdict(True, ["no champion to compare with"], picked)
    rules = (  # metric, direction (+1: higher is better), tolerance
        ("balanced_accuracy", +1, config.balanced_accuracy_tolerance),
        ("ece", -1, config.ece_tolerance),
        ("anomaly_auroc", +1, config.anomaly_auroc_tolerance),
    )
    intervals, n_paired = difference_intervals(challenger, champion)
    paired = {metric: f"{n_paired} cells" for metric in intervals}
    auroc = anomaly_auroc_interval(challenger, champion)
    if auroc is not None:
        intervals["anomaly_auroc"], n_anomaly = auroc
        paired["anomaly_auroc"] = f"{n_anomaly} anomaly-set cells"
    passed, reasons, worse = True, [], []
    for metric, direction, tolerance in rules:
        new, old = challenger.get(metric), champion.get(metric)
        if new is None or old is None:
            reasons.append(f"{metric}: not checked (not measured)")
            continue
        worse_by = (old - new) * direction
        ok = worse_by <= tolerance
        by_interval = config.refuse_on == "interval" and metric in intervals
        if by_interval:  # refused only if even the interval's most favourable end is worse beyond the tolerance
            low, high = intervals[metric]
            best_case_gain = high if direction > 0 else -low
            ok = best_case_gain >= -tolerance
        passed &= ok
        if not ok:
            worse.append(metric)
        verdict = "ok" if ok else ("WORSE with confidence" if by_interval else "WORSE")
        reason = f"{metric}: {new:.4f} vs champion {old:.4f} ({verdict}, tolerance {tolerance:g})"
        if metric in intervals:
            low, high = intervals[metric]
            reason += f"; challenger - champion {low:+.3f} to {high:+.3f} (95 % paired bootstrap, {paired[metric]})"
        reasons.append(reason)
    unseen = [c for c, recall in (challenger.get("per_class_recall") or {}).items() if recall is None]
    if unseen:  # balanced accuracy averages the classes present: a loss on these could not show
        reasons.append(f"not judged on class(es) {', '.join(unseen)}: the gate set has no cells of them")
    few = {c: n for c, n in _class_counts(challenger).items() if 0 < n < FEW_CELLS}
    if few:  # resampled within each class, such a class's cells are in every resample: they decide alone
        counts = ", ".join(f"{c} ({n})" for c, n in few.items())
        reasons.append(f"class(es) with under {FEW_CELLS} gate cells, each cell deciding its class: {counts}")
    return GateVerdict(passed, reasons, picked, {k: champion.get(k) for k in GATED_METRICS}, worse=worse)


FEW_CELLS = 3  # a class with fewer gate cells is named in the verdict: its recall is a cell or two


def _class_counts(figures: dict) -> dict[str, int]:
    """Gate cells per class, from a report's `per_cell` labels and `classes` ({} when it has none)."""
    per_cell, classes = figures.get("per_cell") or {}, figures.get("classes") or []
    counts = np.bincount(np.asarray(per_cell.get("labels", []), dtype=int), minlength=len(classes))
    return {c: int(n) for c, n in zip(classes, counts)}


def _paired(challenger_cells: list[str], champion_cells: list[str]) -> list[tuple[int, int]]:
    """(challenger index, champion index) of each cell both reports scored, in the challenger's order."""
    in_champion = {cell: i for i, cell in enumerate(champion_cells)}
    return [(i, in_champion[cell]) for i, cell in enumerate(challenger_cells) if cell in in_champion]


def difference_intervals(challenger: dict, champion: dict, n_boot: int = 1000) -> tuple[dict, int]:
    """95 % paired-bootstrap intervals of challenger minus champion, for balanced accuracy (percentile) and ECE
    (basic: `metrics.bootstrap_interval`), over the cells
    both were scored on (their `per_cell` results, paired by cell id), resampled within each true class
    (`metrics.resample`); ({}, 0) when either side has none or their classes differ. Returns the intervals and
    the number of cells paired."""
    a, b = champion.get("per_cell"), challenger.get("per_cell")
    if not a or not b or champion.get("classes") != challenger.get("classes"):
        return {}, 0
    pairs = _paired(b["cells"], a["cells"])
    if len(pairs) < 2:
        return {}, 0
    labels = np.array([b["labels"][i] for i, _ in pairs])
    probs_b = np.array([b["probs"][i] for i, _ in pairs])
    probs_a = np.array([a["probs"][j] for _, j in pairs])
    n_classes = probs_b.shape[1]

    def balanced_accuracy(probs: np.ndarray, idx: np.ndarray) -> float:
        return metrics.balanced_accuracy(labels[idx], probs[idx].argmax(axis=1), n_classes)

    def ece(probs: np.ndarray, idx: np.ndarray) -> float:
        return metrics.expected_calibration_error(probs[idx], labels[idx], n_bins=15)

    def difference(fn: Callable[[np.ndarray, np.ndarray], float]) -> Callable[[np.ndarray], float]:
        return lambda idx: fn(probs_b, idx) - fn(probs_a, idx)

    # ECE's difference by the basic interval: binned ECE on a few hundred cells is biased (sampling noise lifts a
    # calibrated champion's, not a miscalibrated challenger's gap), the percentile interval doubled that bias, and
    # a challenger 0.09 worse calibrated passed on 300 cells 9 times in 10 (docs/benchmarks.md, "Gate power")
    intervals = {
        "balanced_accuracy": metrics.bootstrap_interval(
            difference(balanced_accuracy), len(pairs), n_boot=n_boot, strata=labels
        ),
        "ece": metrics.bootstrap_interval(difference(ece), len(pairs), n_boot=n_boot, strata=labels, method="basic"),
    }
    return intervals, len(pairs)


def anomaly_auroc_interval(
    challenger: dict, champion: dict, n_boot: int = 1000
) -> tuple[tuple[float, float], int] | None:
    """95 % paired-bootstrap (percentile) interval of challenger minus champion anomaly AUROC over the anomaly-set
    cells both were scored on (their `per_cell_anomaly` scores, paired by cell id), anomalies and normal cells
    resampled apart so every resample holds both; with the number of cells paired. None when either side has no
    per-cell scores (a report from before they were kept) or the pairs lack anomalies or normal cells.

    An anomaly set holds a few dozen blasts at most: with twenty, one blast falling below half of the normal cells
    lowers the AUROC by 0.025, beyond the default tolerance, so judged on its point estimate a challenger was
    refused for one cell. AUROC is a U-statistic, unbiased on few cells, so the percentile interval serves."""
    a, b = champion.get("per_cell_anomaly"), challenger.get("per_cell_anomaly")
    if not a or not b:
        return None
    pairs = _paired(b["cells"], a["cells"])
    positive = np.array([b["positive"][i] for i, _ in pairs], dtype=bool)
    if any(a["positive"][j] != b["positive"][i] for i, j in pairs):
        raise ValueError("the two gate reports disagree on which anomaly-set cells are anomalies")
    if positive.all() or not positive.any():
        return None
    scores_b = np.array([b["scores"][i] for i, _ in pairs], dtype=np.float64)
    scores_a = np.array([a["scores"][j] for _, j in pairs], dtype=np.float64)

    def difference(idx: np.ndarray) -> float:
        return metrics.auroc(scores_b[idx], positive[idx]) - metrics.auroc(scores_a[idx], positive[idx])

    return metrics.bootstrap_interval(difference, len(pairs), n_boot=n_boot, strata=positive), len(pairs)


@dataclass
class GateData:
    """The cells both models are judged on."""

    eval_records: list[CellRecord]
    anomaly_records: list[CellRecord]
    anomaly_label: str


def gate_data(
    eval_records: Sequence[CellRecord],
    config: PromotionConfig,
    classes: list[str],
    trained_on: Sequence[CellRecord] = (),
) -> GateData:
    """The frozen evaluation set plus the configured audited cells (of the model's classes), and the anomaly set.

    An audited cell the challenger was trained on (`trained_on`: audited cells get consensus labels, and the
    label export that trains it lists them too) is left out: it would judge the challenger on its own training
    cells and the champion on unseen ones."""
    records = list(eval_records)
    if config.audited_manifest is not None:
        audited = [r for r in load_records(config.audited_manifest) if r.label in classes]
        known = {cell_identity(r.path) for r in records}  # by content: a copy elsewhere is the same cell
        trained = {cell_identity(r.path) for r in trained_on}
        ids, left = [cell_identity(r.path) for r in audited], known | trained
        records += [r for r, i in zip(audited, ids) if i not in left]
        left_out = sum(i in trained for i in ids)
        if left_out:
            logger.info(f"gate: {left_out} audited cells left out, the challenger trained on them")
    if not records:
        raise DatasetError("the promotion gate has no evaluation cells")
    seen: dict[str, Path] = {}
    for record in records:  # the paired intervals pair the two models' results by cell id
        if seen.setdefault(record.cell_id, Path(record.path)) != Path(record.path):
            raise DatasetError(
                f"the gate's cells name two files {record.cell_id!r} ({seen[record.cell_id]} and {record.path}): "
                "list the audited cells by absolute path"
            )
    anomalies = select(load_records(config.anomaly_manifest)) if config.anomaly_manifest is not None else []
    return GateData(records, anomalies, config.anomaly_label)


def gate_fingerprint(data: GateData) -> str:
    """Which cells (and labels) a gate judges on: two gate reports with one fingerprint scored the same cells."""
    return "-".join(
        (records_fingerprint(data.eval_records), records_fingerprint(data.anomaly_records), data.anomaly_label)
    )


def scoring_runtime(model) -> dict:
    """How a model's denoiser ran (precision, layout, device, compile): a report scored one way stands in for
    another run only when they ran alike, since bf16 and fp32 differ on a few close calls. {} for a CNN."""
    scoring = getattr(getattr(model, "teacher", model), "scoring_config", None)
    if scoring is None:
        return {}
    return {field: getattr(scoring, field) for field in ("precision", "channels_last", "device", "compile")}


def gate_figures(
    model, data: GateData, json_out: Path | None = None, allowed: list[str] | None = None, progress: bool = False
) -> dict:
    """Evaluate one model on the gate's cells: the full evaluation report (with plots beside `json_out`) and each
    cell's result, for `compare`'s paired intervals. The report names its cells (`gate_cells`), so a later gate
    on the same cells can reuse it (`kept_gate_figures`). `allowed`: the site's classes, which a site's versions
    are judged on as they are served (`SiteConfig.classes`)."""
    from cytoloop.workflows import evaluate_model

    report = evaluate_model(
        model,
        data.eval_records,
        json_out,
        anomaly_records=data.anomaly_records,
        anomaly_label=data.anomaly_label,
        per_cell=True,
        allowed=allowed,
        progress=progress,
    )
    report.setdefault("anomaly_auroc", None)
    report["gate_cells"] = gate_fingerprint(data)
    report["scoring_runtime"] = scoring_runtime(model)
    if json_out is not None:
        write_text(Path(json_out), json.dumps(report, indent=1))
    return report


def kept_gate_figures(
    path: Path, data: GateData, classes: list[str], runtime: dict | None = None, allowed: list[str] | None = None
) -> dict | None:
    """A model's gate report kept at `path` from an earlier gate, if that gate judged these very cells with these
    classes, decided among the same `allowed` ones (and, given `runtime`, scored them with that
    `scoring_runtime`) and kept each anomaly-set cell's score (for the AUROC's interval); else None. A champion
    was gated as a challenger on its site's frozen cells when it was promoted: scoring draws each cell's trials from
    the cell itself, so scoring it again on them would repeat that report (a fine-tune's gate then scores only its
    challenger)."""
    try:
        report = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    if report.get("gate_cells") != gate_fingerprint(data) or report.get("classes") != classes:
        return None
    if report.get("allowed_classes") != allowed:
        return None
    if data.anomaly_records and "per_cell_anomaly" not in report:  # kept before they were: no AUROC interval
        return None
    if runtime is not None and report.get("scoring_runtime") != runtime:
        return None
    return report


def verdict_tags(verdict: GateVerdict) -> dict[str, str]:
    """The verdict as version tags, `gate.verdict` last: they are set one by one, and a job killed part-way must
    leave no verdict without the champion it was judged against (its rerun then judges the version again; with
    the verdict first it finished the move against "none" and marked a passed version stale)."""
    tags = {
        "gate.reasons": json.dumps(verdict.reasons),
        "gate.worse": json.dumps(verdict.worse),
        "gate.champion_version": verdict.champion_version or "none",
    }
    for side, figures in (("challenger", verdict.challenger), ("champion", verdict.champion)):
        for metric, value in figures.items():
            tags[f"gate.{side}.{metric}"] = "none" if value is None else f"{value:.6f}"
    tags["gate.verdict"] = "pass" if verdict.passed else "refused"
    return tags


def apply_verdict(registry, name: str, version: str, alias: str, verdict: GateVerdict, who: str | None = None):
    """Record the verdict on the version; move `alias` to it if it passed, and only if the champion it was judged
    against still serves the alias (compare-and-set). Returns the AliasMove or None; raises `AliasMoved` (with the
    verdict kept on the version) when another move came first."""
    registry.set_tags(name, version, verdict_tags(verdict))
    if not verdict.passed:
        return None
    return promote(registry, name, version, alias, verdict.reasons, verdict.champion_version, who)


def promote(
    registry, name: str, version: str, alias: str, reasons: list[str], judged_against: str | None, who: str | None
):
    """The move a passed gate makes: `alias` to `version`, compare-and-set against the version it was judged
    against (None: nothing served the alias), recorded as the gate's with its reasons. Raises `AliasMoved`."""
    return registry.move_alias(
        name,
        alias,
        version,
        why="gate passed: " + "; ".join(reasons),
        action="gate",
        who=who or "cytoloop-gate",
        expect=judged_against,
    )


def override(
    registry, name: str, version: str, alias: str, reason: str, who: str | None = None, cross_site: bool = False
):
    """A person promotes `version` whatever the gate said; the reason is kept on the version and in the trail.

    A version made for one site (its `site` tag) is refused as another scope's champion unless `cross_site`: it
    is normalised to that site's stain and calibrated on its classes, and as the global champion every later
    fine-tune would start from it (one meant for `--site` was one flag away). A global version may serve a site
    (a site pinned to an earlier global model)."""
    from cytoloop.registry import site_of

    if not reason.strip():
        raise UsageError("an override needs a reason")
    made_for = registry.version(name, version).tags.get("site")
    scope = site_of(alias) or "global"
    if made_for not in (None, "global", scope) and not cross_site:
        meant = f"site {scope!r}" if scope != "global" else "the global champion"
        raise UsageError(
            f"{name} v{version} was made for site {made_for!r}, not for {meant} (@{alias}); promote it with "
            f"--site {made_for}, or give --cross-site if that is meant"
        )
    move = registry.move_alias(name, alias, version, why=reason, action="override", who=who)
    registry.set_tags(name, version, {"gate.override": reason, "gate.override_by": move.who})
    return move

"""The promotion gate's decision: each metric no worse than the champion's beyond its tolerance."""

import numpy as np
import pytest

from cytoloop.config import PromotionConfig
from cytoloop.data.records import DatasetError
from cytoloop.policy.promotion import compare, difference_intervals, verdict_tags

CONFIG = PromotionConfig(balanced_accuracy_tolerance=0.01, ece_tolerance=0.02, anomaly_auroc_tolerance=0.02)
CHAMPION = {"balanced_accuracy": 0.80, "ece": 0.05, "anomaly_auroc": 0.90}


def test_equal_or_better_passes():
    assert compare(dict(CHAMPION), CHAMPION, CONFIG).passed
    assert compare({"balanced_accuracy": 0.85, "ece": 0.03, "anomaly_auroc": 0.95}, CHAMPION, CONFIG).passed


def test_within_tolerance_passes():
    assert compare({"balanced_accuracy": 0.795, "ece": 0.065, "anomaly_auroc": 0.885}, CHAMPION, CONFIG).passed


def test_each_metric_can_refuse():
    for worse in ({"balanced_accuracy": 0.78}, {"ece": 0.08}, {"anomaly_auroc": 0.87}):
        verdict = compare({**CHAMPION, **worse}, CHAMPION, CONFIG)
        assert not verdict.passed
        (metric,) = worse
        assert any(r.startswith(metric) and "WORSE" in r for r in verdict.reasons)
        assert verdict.worse == [metric]  # typed, for callers: no parsing of the reasons' text
    both = compare({**CHAMPION, "balanced_accuracy": 0.78, "ece": 0.08}, CHAMPION, CONFIG)
    assert both.worse == ["balanced_accuracy", "ece"]
    assert compare(dict(CHAMPION), CHAMPION, CONFIG).worse == []


def test_unmeasured_metric_is_reported_not_checked():
    verdict = compare({**CHAMPION, "anomaly_auroc": None}, CHAMPION, CONFIG)
    assert verdict.passed
    assert any("anomaly_auroc: not checked" in r for r in verdict.reasons)


def test_no_champion_passes_and_tags_say_so():
    verdict = compare(CHAMPION, None, CONFIG)
    assert verdict.passed and verdict.reasons == ["no champion to compare with"]
    tags = verdict_tags(verdict)
    assert tags["gate.verdict"] == "pass" and tags["gate.champion_version"] == "none"


def _per_cell(probs: np.ndarray, labels: np.ndarray, order=None) -> dict:
    order = np.arange(len(labels)) if order is None else np.asarray(order)
    return {
        "classes": ["a", "b", "c"],
        "per_cell": {
            "cells": [f"cell{i}" for i in order],
            "labels": labels[order].tolist(),
            "probs": probs[order].tolist(),
        },
    }


def _cells(n=60, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, n)
    sure = np.full((n, 3), 0.05)
    sure[np.arange(n), labels] = 0.9  # right and confident
    guess = rng.dirichlet(np.ones(3), n)  # mostly wrong
    return labels, sure, guess


def test_intervals_pair_cells_by_id():
    labels, sure, guess = _cells()
    champion = {**CHAMPION, **_per_cell(guess, labels)}
    challenger = {**CHAMPION, **_per_cell(sure, labels, order=np.arange(len(labels))[::-1])}  # another cell order
    intervals, n = difference_intervals(challenger, champion)
    assert n == len(labels)
    low, high = intervals["balanced_accuracy"]
    assert 0 < low <= high  # clearly better on these cells, whatever their order
    assert difference_intervals({**CHAMPION, **_per_cell(sure, labels)}, {**CHAMPION, **_per_cell(sure, labels)})[
        0
    ] == {"balanced_accuracy": (0.0, 0.0), "ece": (0.0, 0.0)}
    with_cells = compare(challenger, champion, CONFIG)
    without = compare(dict(CHAMPION), CHAMPION, CONFIG)
    assert with_cells.passed == without.passed
    assert any(r.startswith("balanced_accuracy") and "paired bootstrap, 60 cells" in r for r in with_cells.reasons)
    assert not any("bootstrap" in r for r in without.reasons)


def test_no_intervals_when_classes_differ_or_cells_are_missing():
    labels, sure, guess = _cells()
    champion = {**CHAMPION, **_per_cell(guess, labels)}
    other_classes = {**CHAMPION, **_per_cell(sure, labels), "classes": ["x", "y", "z"]}
    assert difference_intervals(other_classes, champion) == ({}, 0)
    assert difference_intervals(dict(CHAMPION), champion) == ({}, 0)


def test_refused_only_when_worse_with_confidence():
    """A challenger a few cells worse on a small gate set is within the noise: its interval reaches the tolerance,
    so it passes (a point-estimate gate would refuse it); one worse on most cells is refused."""
    from cytoloop.evaluation import metrics

    labels, sure, guess = _cells(n=60)
    slip = sure.copy()
    for i in range(3):  # three cells wrong: balanced accuracy down ~0.05, beyond the 0.01 tolerance
        slip[i] = np.roll(sure[i], 1)

    def figures(probs):
        return {
            "balanced_accuracy": metrics.balanced_accuracy(labels, probs.argmax(axis=1), 3),
            "ece": metrics.expected_calibration_error(probs, labels, n_bins=15),
            "anomaly_auroc": 0.9,
            **_per_cell(probs, labels),
        }

    champion, noisy, bad = figures(sure), figures(slip), figures(guess)
    assert champion["balanced_accuracy"] - noisy["balanced_accuracy"] > CONFIG.balanced_accuracy_tolerance
    assert compare(noisy, champion, CONFIG).passed
    point = compare(noisy, champion, CONFIG.model_copy(update={"refuse_on": "point"}))
    assert not point.passed and "balanced_accuracy" in point.worse
    refused = compare(bad, champion, CONFIG)
    assert not refused.passed and refused.worse == ["balanced_accuracy", "ece"]
    assert any("WORSE with confidence" in r for r in refused.reasons)


def test_a_kept_gate_report_is_reused_only_for_the_same_cells_and_classes(tmp_path):
    """A champion's report from its own gate stands in for scoring it again only when that gate judged the very
    same cells (ids and labels, anomaly set) with the same classes."""
    import json

    from cytoloop.data.records import CellRecord
    from cytoloop.policy.promotion import GateData, gate_fingerprint, kept_gate_figures
    from cytoloop.registry import VersionInfo
    from jobs.finetune import _kept_champion_figures

    cells = [CellRecord(f"c{i}.png", tmp_path / f"c{i}.png", "a" if i % 2 else "b", "lab") for i in range(6)]
    data = GateData(cells, [], "blast")
    run = tmp_path / "home" / "finetune" / "site-a-v1-x" / "evaluation"
    run.mkdir(parents=True)
    bf16 = {"precision": "bf16", "channels_last": True, "device": "auto", "compile": False}
    report = {
        "classes": ["a", "b"],
        "gate_cells": gate_fingerprint(data),
        "scoring_runtime": bf16,
        "balanced_accuracy": 0.8,
    }
    (run / "challenger.json").write_text(json.dumps(report))
    (run / "challenger.reliability.png").write_bytes(b"png")

    assert kept_gate_figures(run / "challenger.json", data, ["a", "b"]) == report
    assert kept_gate_figures(run / "challenger.json", data, ["a", "b", "c"]) is None
    relabelled = [CellRecord(c.cell_id, c.path, "a", c.domain) for c in cells]
    assert kept_gate_figures(run / "challenger.json", GateData(relabelled, [], "blast"), ["a", "b"]) is None
    assert kept_gate_figures(run / "challenger.json", GateData(cells[:5], [], "blast"), ["a", "b"]) is None
    assert kept_gate_figures(run / "missing.json", data, ["a", "b"]) is None
    # scored in another precision: a few close calls differ, so the champion is scored again
    assert kept_gate_figures(run / "challenger.json", data, ["a", "b"], bf16) == report
    assert kept_gate_figures(run / "challenger.json", data, ["a", "b"], {**bf16, "precision": "fp32"}) is None
    # judged on all its classes: no stand-in for a gate deciding among a site's classes only
    assert kept_gate_figures(run / "challenger.json", data, ["a", "b"], bf16, ["a"]) is None
    site = {**report, "allowed_classes": ["a"]}
    (run / "site.json").write_text(json.dumps(site))
    assert kept_gate_figures(run / "site.json", data, ["a", "b"], bf16, ["a"]) == site
    assert kept_gate_figures(run / "site.json", data, ["a", "b"], bf16) is None
    # with an anomaly set, only a report that kept each anomaly-set cell's score (for the AUROC's interval)
    blasts = [CellRecord(f"b{i}.png", tmp_path / f"b{i}.png", "blast", "lab") for i in range(2)]
    with_anomalies = GateData(cells, blasts, "blast")
    old = {**report, "gate_cells": gate_fingerprint(with_anomalies)}
    (run / "old.json").write_text(json.dumps(old))
    assert kept_gate_figures(run / "old.json", with_anomalies, ["a", "b"]) is None
    scored = {**old, "per_cell_anomaly": {"cells": ["b0.png", "b1.png"], "positive": [True, True], "scores": [1, 2]}}
    (run / "scored.json").write_text(json.dumps(scored))
    assert kept_gate_figures(run / "scored.json", with_anomalies, ["a", "b"]) == scored

    champion = VersionInfo("m", "2", None, {"ray_run": "site-a-v1-x"}, ["champion-site-a"])
    out = tmp_path / "next" / "evaluation"
    assert _kept_champion_figures(tmp_path / "home", champion, data, ["a", "b"], out, bf16, None) == report
    assert sorted(p.name for p in out.iterdir()) == ["champion.json", "champion.reliability.png"]
    assert _kept_champion_figures(tmp_path / "home", champion, data, ["a", "b"], out, bf16, ["a"]) is None
    base = VersionInfo("m", "1", None, {}, ["champion"])  # registered, never gated here: scored again
    assert _kept_champion_figures(tmp_path / "home", base, data, ["a", "b"], out, bf16, None) is None


def test_the_scoring_runtime_names_how_a_diffusion_model_ran():
    """What a kept gate report is matched on besides its cells: a CNN has none; a diffusion model (or a cascade's
    teacher) its precision, layout, device and compile setting."""
    from cytoloop.config import BaselineModelConfig, DataConfig, DiffusionModelConfig, ScoringConfig
    from cytoloop.models.baseline import BaselineClassifier
    from cytoloop.models.cascade import CascadeClassifier
    from cytoloop.models.diffusion import DiffusionClassifier
    from cytoloop.policy.promotion import scoring_runtime

    student = BaselineClassifier(["a", "b"], DataConfig(image_size=16), BaselineModelConfig(channels=(4, 8)))
    teacher = DiffusionClassifier(
        ["a", "b"],
        DataConfig(image_size=16),
        DiffusionModelConfig(block_out_channels=(8, 16), norm_num_groups=4),
        ScoringConfig(precision="bf16", channels_last=True),
    )
    expected = {"precision": "bf16", "channels_last": True, "device": "auto", "compile": False}
    assert scoring_runtime(student) == {}
    assert scoring_runtime(teacher) == expected
    assert scoring_runtime(CascadeClassifier(teacher, student)) == expected


def test_the_gate_leaves_out_audited_cells_the_challenger_trained_on(tmp_path):
    """Audited cells get consensus labels, and the label export that trains the challenger lists them too: judged
    on them, the challenger would be graded on its own training cells and the champion on unseen ones."""
    from cytoloop.data.records import CellRecord
    from cytoloop.models.finetune import write_manifest
    from cytoloop.policy.promotion import gate_data

    def cells(prefix, n, label="a"):
        return [CellRecord(f"{prefix}{i}.png", tmp_path / f"{prefix}{i}.png", label, "lab") for i in range(n)]

    frozen, audited = cells("eval", 2), cells("audit", 3) + cells("other", 1, label="z")
    write_manifest(audited, tmp_path / "audited.csv")
    config = PromotionConfig(audited_manifest=tmp_path / "audited.csv")
    data = gate_data(frozen, config, ["a"], trained_on=[*cells("train", 4), audited[1]])
    assert sorted(r.path.name for r in data.eval_records) == ["audit0.png", "audit2.png", "eval0.png", "eval1.png"]
    assert len(gate_data(frozen, config, ["a"]).eval_records) == 5  # what a caller that trained on none gets
    # an audited cell listed by a relative path that names a frozen cell's id pairs with the wrong cell: refused
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "audited.csv").write_text(f"path,label,domain\n{frozen[0].cell_id},a,lab\n")
    clash = PromotionConfig(audited_manifest=tmp_path / "elsewhere" / "audited.csv")
    with pytest.raises(DatasetError, match="the gate's cells name two files 'eval0.png'"):
        gate_data(frozen, clash, ["a"])


def test_a_challenger_that_loses_a_rare_class_is_refused():
    """Five classes, one of 3 cells in 60: the challenger calls all three another class. Resampled from all cells
    at once, one resample in twenty held none of them, and balanced accuracy over the classes present then showed
    no loss: the interval reached 0 and the gate passed a model that never names that class. Resampled within each
    class, every resample holds the loss."""
    from cytoloop.evaluation import metrics

    labels = np.repeat([0, 1, 2, 3, 4], [15, 15, 15, 12, 3])
    champion_probs = np.full((60, 5), 0.02)
    champion_probs[np.arange(60), labels] = 0.92
    challenger_probs = champion_probs.copy()
    challenger_probs[labels == 4] = np.roll(champion_probs[labels == 4], 1, axis=1)  # class 4 called class 0

    def figures(probs):
        return {
            "balanced_accuracy": metrics.balanced_accuracy(labels, probs.argmax(axis=1), 5),
            "ece": metrics.expected_calibration_error(probs, labels, n_bins=15),
            "classes": list("abcde"),
            "per_cell": {"cells": [f"c{i}" for i in range(60)], "labels": labels.tolist(), "probs": probs.tolist()},
        }

    champion, challenger = figures(champion_probs), figures(challenger_probs)
    assert champion["balanced_accuracy"] - challenger["balanced_accuracy"] == pytest.approx(0.2)
    intervals, _ = difference_intervals(challenger, champion)
    assert intervals["balanced_accuracy"][1] < -0.19  # every resample holds the lost class
    verdict = compare(challenger, champion, CONFIG)
    assert not verdict.passed and "balanced_accuracy" in verdict.worse


def test_classes_without_gate_cells_are_named_in_the_reasons():
    """Balanced accuracy averages the classes the gate set holds: a class it lacks cannot show a loss, and the
    verdict says so rather than passing in silence."""
    challenger = {**CHAMPION, "per_class_recall": {"a": 0.9, "blast": None, "c": 0.8}}
    verdict = compare(challenger, CHAMPION, CONFIG)
    assert verdict.passed and verdict.reasons[-1] == "not judged on class(es) blast: the gate set has no cells of them"
    assert not any("not judged" in r for r in compare(dict(CHAMPION), CHAMPION, CONFIG).reasons)


def test_a_class_of_one_or_two_gate_cells_is_named():
    """Resampled within each class, a one-cell class is in every resample: that cell alone decides its recall, so
    one cell can refuse a challenger. The verdict says which classes are that thin."""
    labels = np.array([0] * 20 + [1] * 20 + [2])
    probs = np.full((41, 3), 0.05)
    probs[np.arange(41), labels] = 0.9
    figures = {**CHAMPION, **_per_cell(probs, labels)}
    verdict = compare(figures, figures, CONFIG)
    assert verdict.reasons[-1] == "class(es) with under 3 gate cells, each cell deciding its class: c (1)"
    many = {**CHAMPION, **_per_cell(probs[:40], labels[:40])}
    assert not any("under 3 gate cells" in r for r in compare(many, many, CONFIG).reasons)


def test_the_verdict_tag_is_written_after_every_other_gate_tag():
    """Tags are set one at a time: a job killed after `gate.verdict` and before `gate.champion_version` left a
    pass whose rerun finished the move against "none" and marked the passed version stale."""
    from cytoloop.policy.promotion import GateVerdict

    tags = verdict_tags(GateVerdict(True, ["ok"], {"balanced_accuracy": 0.9}, {"balanced_accuracy": 0.8}, "3"))
    assert list(tags)[-1] == "gate.verdict" and tags["gate.champion_version"] == "3"


def test_a_challenger_clearly_worse_calibrated_is_refused_on_ece():
    """Every cell at confidence 0.8: the champion is right on 80 % of 300 cells (calibrated), the challenger on 90 %
    (0.09 underconfident, four times the tolerance). The percentile interval of the ECE difference sat below even
    the measured difference (binned ECE's sampling noise lifts the calibrated champion's ECE, and is absorbed by
    the challenger's gap), so the challenger passed; the basic interval, around the estimate, refuses it."""
    from cytoloop.evaluation import metrics

    rng = np.random.default_rng(0)
    n, k = 300, 5
    labels = rng.integers(0, k, n)

    def model(accuracy):
        predicted = np.where(rng.random(n) < accuracy, labels, (labels + rng.integers(1, k, n)) % k)
        probs = np.full((n, k), 0.05)
        probs[np.arange(n), predicted] = 0.8
        return probs

    def figures(probs):
        return {
            "balanced_accuracy": metrics.balanced_accuracy(labels, probs.argmax(axis=1), k),
            "ece": metrics.expected_calibration_error(probs, labels, n_bins=15),
            "anomaly_auroc": None,
            **_per_cell(probs, labels),
        }

    challenger_probs = model(0.9)
    champion_probs = model(0.8)
    champion, challenger = figures(champion_probs), figures(challenger_probs)
    verdict = compare(challenger, champion, PromotionConfig())
    assert not verdict.passed and verdict.worse == ["ece"], verdict.reasons

    def difference(i):
        return metrics.expected_calibration_error(
            challenger_probs[i], labels[i], n_bins=15
        ) - metrics.expected_calibration_error(champion_probs[i], labels[i], n_bins=15)

    percentile = metrics.bootstrap_interval(difference, n, strata=labels)
    assert percentile[0] <= PromotionConfig().ece_tolerance  # what the gate used to decide on: a pass


def _anomaly_cells(scores: np.ndarray, positive: np.ndarray, order=None) -> dict:
    order = np.arange(len(scores)) if order is None else np.asarray(order)
    return {
        "per_cell_anomaly": {
            "cells": [f"a{i}" for i in order],
            "positive": positive[order].tolist(),
            "scores": scores[order].tolist(),
        }
    }


def test_the_anomaly_auroc_is_refused_only_when_worse_with_confidence():
    """On 20 blasts and 60 normal cells, one blast falling below half the normal cells costs 0.025 of AUROC, beyond
    the 0.02 tolerance: judged on the point estimate the challenger was refused for that one cell. Its paired
    interval reaches 0, so it passes; a challenger that ranks the blasts at random is refused."""
    from cytoloop.evaluation import metrics
    from cytoloop.policy.promotion import anomaly_auroc_interval

    positive = np.r_[np.ones(20, bool), np.zeros(60, bool)]
    sure = np.r_[np.linspace(2.0, 3.0, 20), np.linspace(0.0, 1.0, 60)]  # every blast above every normal cell
    slip = sure.copy()
    slip[0] = 0.5  # one blast now below half the normal cells
    blind = np.random.default_rng(0).random(80)

    def figures(scores, order=None):
        return {**CHAMPION, "anomaly_auroc": metrics.auroc(scores, positive), **_anomaly_cells(scores, positive, order)}

    champion = figures(sure)
    noisy = figures(slip, order=np.arange(80)[::-1])  # paired by id, whatever the order
    assert champion["anomaly_auroc"] - noisy["anomaly_auroc"] == pytest.approx(0.025)
    (low, high), n = anomaly_auroc_interval(noisy, champion)
    assert n == 80 and low < 0 and high == pytest.approx(0.0)
    verdict = compare(noisy, champion, CONFIG)
    assert verdict.passed, verdict.reasons
    assert any(r.startswith("anomaly_auroc") and "80 anomaly-set cells" in r for r in verdict.reasons)
    point = compare(noisy, champion, CONFIG.model_copy(update={"refuse_on": "point"}))
    assert point.worse == ["anomaly_auroc"]
    refused = compare(figures(blind), champion, CONFIG)
    assert refused.worse == ["anomaly_auroc"] and "WORSE with confidence" in " ".join(refused.reasons)
    # no interval without the per-cell scores on both sides: the point estimate decides
    assert anomaly_auroc_interval({**CHAMPION, "anomaly_auroc": noisy["anomaly_auroc"]}, champion) is None
    assert compare({**CHAMPION, "anomaly_auroc": noisy["anomaly_auroc"]}, champion, CONFIG).worse == ["anomaly_auroc"]
    relabelled = {**CHAMPION, **_anomaly_cells(slip, ~positive)}
    with pytest.raises(ValueError, match="disagree on which anomaly-set cells are anomalies"):
        anomaly_auroc_interval(relabelled, champion)

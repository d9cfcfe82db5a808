"""The promotion gate's decision: each metric no worse than the champion's beyond its tolerance."""

from cytoloop.config import PromotionConfig
from cytoloop.promotion import compare, verdict_tags

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


def test_unmeasured_metric_is_reported_not_checked():
    verdict = compare({**CHAMPION, "anomaly_auroc": None}, CHAMPION, CONFIG)
    assert verdict.passed
    assert any("anomaly_auroc: not checked" in r for r in verdict.reasons)


def test_no_champion_passes_and_tags_say_so():
    verdict = compare(CHAMPION, None, CONFIG)
    assert verdict.passed and verdict.reasons == ["no champion to compare with"]
    tags = verdict_tags(verdict)
    assert tags["gate.verdict"] == "pass" and tags["gate.champion_version"] == "none"

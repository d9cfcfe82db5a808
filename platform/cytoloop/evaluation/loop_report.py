"""The report of an active-learning run: a Markdown page with the per-round table and PNG plots.

Plots are what a person reads faster than numbers: the learning curve (held-out balanced accuracy and ECE against
the labels used), one reliability diagram per round, the share of scored cells routed to review, and the drift
figures of what Serve classified each round. Rounds are plain objects (anything with the attributes that
`jobs.cycle.RoundResult` has), so the report can be redrawn from the saved rounds.json.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cytoloop.evaluation import plots


def write_report(
    rounds: Sequence,
    test_predictions: Sequence[tuple[np.ndarray, np.ndarray]],
    classes: Sequence[str],
    out: Path,
    title: str,
    table: str,
) -> Path:
    """Draw the plots into `out` and write `out/report.md`; returns its path.

    `test_predictions[i]` holds (probabilities, true class indices) of the held-out cells in round i.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    labels = [r.labels for r in rounds]
    plots.learning_curve(
        labels,
        {"balanced accuracy": [r.balanced_accuracy for r in rounds], "ECE": [r.ece for r in rounds]},
        out / "learning_curve.png",
        xlabel="labelled cells",
        ylabel="held-out test cells",
        title="Learning curve",
    )
    diagrams = []
    for row, (probs, truth) in zip(rounds, test_predictions):
        name = f"reliability_round{row.round}.png"
        plots.reliability_diagram(probs, truth, out / name, title=f"Round {row.round} (v{row.served})")
        diagrams.append(name)
    sections = [f"# {title}", "", table, "", "## Learning curve", "", "![learning curve](learning_curve.png)", ""]
    looped = [r for r in rounds if r.routed]
    if looped:
        reasons = sorted({reason for r in looped for reason in r.routed} - {"accept"})
        fractions = {
            reason: [r.routed.get(reason, 0) / max(1, sum(r.routed.values())) for r in looped] for reason in reasons
        }
        plots.learning_curve(
            [r.round for r in looped],
            fractions,
            out / "routed.png",
            xlabel="round",
            ylabel="share of scored pool cells",
            title="Routed to review, by reason",
        )
        sections += ["## Routed to Label Studio", "", "![routed](routed.png)", ""]
    drifted = [r for r in rounds if r.drift]
    if drifted:
        keys = [
            k
            for k in ("mean_confidence", "review_fraction", "psi_max")
            if all(r.drift.get(k) is not None for r in drifted)
        ]
        if keys:
            plots.learning_curve(
                [r.round for r in drifted],
                {k: [r.drift[k] for r in drifted] for k in keys},
                out / "drift.png",
                xlabel="round",
                ylabel="figure",
                title="What Serve saw each round (psi_max: colour drift vs training)",
            )
            sections += ["## Drift", "", "![drift](drift.png)", ""]
    sections += ["## Reliability per round", ""] + [f"![{name}]({name})" for name in diagrams] + [""]
    sections += ["Classes: " + ", ".join(classes), ""]
    report = out / "report.md"
    report.write_text("\n".join(sections))
    return report

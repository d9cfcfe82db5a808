"""The report of a run of the loop over several sites: Markdown with PNG plots beside it, and one self-contained
HTML page (the plots embedded) to mail to a lab.

Plots are what a person reads faster than numbers: each site's held-out balanced accuracy and ECE per round
against the unadapted base model's (round 0), one reliability diagram per site and round, the blasts found (the
mixed-in blasts routed as anomalies, beside the share of the pool routed), and the drift figures of each site's
held-out cells as Serve classified them after each round. Rounds are plain objects (anything with the attributes
of `jobs.cycle.RoundResult`), so the report can be redrawn from the saved rounds.json.

The page is built once as a list of blocks (heading, paragraph, table, image) and written twice, so the Markdown
and the HTML can never say different things.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from cytoloop.evaluation import plots

Block = tuple  # ("h1" | "h2" | "p", text) | ("table", header, rows) | ("img", file name, caption)


def write_report(
    rounds: Sequence,
    test_predictions: Mapping[tuple[str, int], tuple[np.ndarray, np.ndarray]],
    classes: Sequence[str],
    out: Path,
    title: str,
    table: str,
    sites: Mapping[str, str],
    agreement: Mapping | None = None,
    urls: Mapping[str, str] | None = None,
) -> Path:
    """Draw the plots into `out`, write `out/report.md` and `out/report.html`; returns the Markdown's path.

    `test_predictions[(site, round)]` holds (probabilities, true class indices) of the site's held-out cells in
    that round; `table` is the per-round table as Markdown; `sites` describes each site in a line; `agreement`
    is the review loop's report (`ReviewLoop.report()`), `urls` where the services are."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    blocks: list[Block] = [("h1", title), ("p", "Sites: " + "; ".join(f"{s} ({d})" for s, d in sites.items()))]
    blocks += _summary(rounds, sites)
    blocks += [("h2", "Rounds"), _parse_table(table)]
    blocks += _curves(rounds, sites, out)
    blocks += _blasts(rounds, sites, out)
    blocks += _drift(rounds, sites, out)
    blocks += [("h2", "Reliability per site and round")]
    for row in rounds:
        if (row.site, row.round) in test_predictions:
            probs, truth = test_predictions[(row.site, row.round)]
            name = f"reliability_{row.site}_round{row.round}.png"
            plots.reliability_diagram(probs, truth, out / name, title=f"{row.site}, round {row.round} (v{row.served})")
            blocks.append(("img", name, f"{row.site}, round {row.round}"))
    if agreement:
        blocks += _agreement(agreement)
    if urls:
        blocks += [("h2", "Where to look"), ("table", ["what", "where"], [[k, v] for k, v in urls.items()])]
    blocks.append(("p", "Model classes: " + ", ".join(classes)))
    report = out / "report.md"
    report.write_text(_markdown(blocks))
    (out / "report.html").write_text(_html(blocks, out, title))
    return report


def _summary(rounds: Sequence, sites: Mapping[str, str]) -> list[Block]:
    rows = []
    for site in sites:
        mine = sorted((r for r in rounds if r.site == site), key=lambda r: r.round)
        if not mine:
            continue
        base, last = mine[0], mine[-1]
        first = next((r for r in mine if r.round == 1), None)
        promoted = [r for r in mine if r.gate == "promoted"]
        blasts = first.blasts if first is not None else {}
        rows.append(
            [
                site,
                f"{base.balanced_accuracy:.3f} / {base.ece:.3f} (v{base.served}"
                + (", an earlier run's champion)" if base.gate.startswith("kept") else ")"),
                f"{last.balanced_accuracy:.3f} / {last.ece:.3f} (v{last.served})",
                _calibrated(last.ece_calibrated),
                str(sum(r.sent for r in mine)),
                f"{len(promoted)} of {len(mine) - 1}",
                f"{blasts.get('anomaly', 0)} of {blasts.get('scored', 0)}" if blasts else "-",
                f"{first.routed_fraction:.1%}" if first is not None and first.routed else "-",
            ]
        )
    header = [
        "site",
        "round 0: bal. acc. / ECE",  # the base model, or the champion a run before this one in its home left
        "after the last round",
        "ECE a calibrated model shows on these cells",
        "cells sent to annotators",
        "versions promoted",
        "round 1: blasts routed as anomalies",
        "round 1: pool routed",
    ]
    blocks: list[Block] = [("h2", "Each site, from round 0 to the last round"), ("table", header, rows)]
    missing = [
        f"{r.site} round {r.round}: " + ", ".join(f"{n} {part}" for part, n in sorted(r.not_scored.items()))
        for r in rounds
        if getattr(r, "not_scored", None)
    ]
    if missing:
        blocks.append(("p", "Cells Serve could not score, left out of those figures: " + "; ".join(missing) + "."))
    return blocks


def _calibrated(floor: Mapping[str, float]) -> str:
    """The sampling floor under a measured ECE (`metrics.calibrated_ece`): a target below it cannot be shown met."""
    if not floor:
        return "-"
    return f"{floor['mean']:.3f} [{floor['low']:.3f}, {floor['high']:.3f}] ({floor['cells']:.0f} cells)"


def _curves(rounds: Sequence, sites: Mapping[str, str], out: Path) -> list[Block]:
    numbers = sorted({r.round for r in rounds})
    series = {}
    for site in sites:
        by_round = {r.round: r for r in rounds if r.site == site}
        if set(by_round) != set(numbers):
            continue
        series[f"{site} bal. acc."] = [by_round[n].balanced_accuracy for n in numbers]
        series[f"{site} ECE"] = [by_round[n].ece for n in numbers]
    if not series:
        return []
    plots.learning_curve(
        numbers,
        series,
        out / "learning_curve.png",
        xlabel="round (0: the model serving the site at the start)",
        ylabel="site's held-out cells",
        title="Each site's model per round",
    )
    return [("h2", "Learning curves"), ("img", "learning_curve.png", "balanced accuracy and ECE per site and round")]


def _blasts(rounds: Sequence, sites: Mapping[str, str], out: Path) -> list[Block]:
    looped = sorted({r.round for r in rounds if r.routed})
    series = {}
    for site in sites:
        by_round = {r.round: r for r in rounds if r.site == site and r.routed}
        if set(by_round) != set(looped):
            continue
        found = [by_round[n].blasts.get("anomaly", 0) / max(1, by_round[n].blasts.get("scored", 0)) for n in looped]
        if any(by_round[n].blasts.get("scored") for n in looped):
            series[f"{site}: blasts routed as anomalies"] = found
        series[f"{site}: pool routed"] = [by_round[n].routed_fraction for n in looped]
    if not series:
        return []
    plots.learning_curve(
        looped,
        series,
        out / "blasts.png",
        xlabel="round",
        ylabel="share",
        title="Blasts found, and the share of the pool routed to review",
    )
    rows = [
        [
            str(r.round),
            r.site,
            str(r.blasts.get("scored", 0)),
            str(r.blasts.get("anomaly", 0)),
            str(r.blasts.get("sent", 0)),
            str(r.new_class_cells),
            f"{r.routed_fraction:.1%}",
            f"{r.sent / r.scored:.1%}" if r.scored else "-",
            f"{r.anomaly_threshold:.3g}" if r.anomaly_threshold is not None else "-",
        ]
        for r in rounds
        if r.routed
    ]
    header = [
        "round",
        "site",
        "blasts in the scored pool",
        "routed as anomalies",
        "sent to Label Studio",
        "named a new class by consensus (all rounds so far)",
        "pool routed (anomaly, review, audit)",
        # with the budget filled from confident cells (`demo.fill_budget`) more is sent than the routing flagged
        "pool sent to annotators",
        "anomaly threshold",
    ]
    return [("h2", "Blasts found"), ("img", "blasts.png", "blasts found per round"), ("table", header, rows)]


def _drift(rounds: Sequence, sites: Mapping[str, str], out: Path) -> list[Block]:
    blocks: list[Block] = []
    for site in sites:
        drifted = [r for r in rounds if r.site == site and r.drift]
        keys = [
            k
            for k in ("mean_confidence", "review_fraction", "psi_max")
            if drifted and all(r.drift.get(k) is not None for r in drifted)
        ]
        if not keys:
            continue
        name = f"drift_{site}.png"
        plots.learning_curve(
            [r.round for r in drifted],
            {k: [r.drift[k] for r in drifted] for k in keys},
            out / name,
            xlabel="round (0: the model serving the site at the start)",
            ylabel="figure",
            title=f"{site}: its held-out cells as served (psi_max: colour drift vs the model's training cells)",
        )
        blocks.append(("img", name, f"drift at {site}, before and after adaptation"))
    return [("h2", "Drift before and after adaptation"), *blocks] if blocks else []


def _agreement(report: Mapping) -> list[Block]:
    rows = [
        [who, str(a.get("compared", 0)), "-" if a.get("agreement") is None else f"{a['agreement']:.1%}"]
        for who, a in sorted(report.get("annotators", {}).items())
    ]
    pairs = [
        [pair, str(p.get("cells", "")), f"{p.get('agreement', float('nan')):.1%}", _number(p.get("kappa"))]
        for pair, p in sorted(report.get("pairs", {}).items())
    ]
    fleiss = report.get("fleiss_kappa") or {}
    blocks: list[Block] = [
        ("h2", "Annotators"),
        ("p", f"Consensus per cell: {report.get('status', {})}; Fleiss' kappa {_number(fleiss.get('kappa'))}."),
        ("table", ["annotator", "cells compared", "agrees with the others"], rows),
    ]
    if pairs:
        blocks.append(("table", ["pair", "cells in common", "same label", "Cohen's kappa"], pairs))
    return blocks


def _number(value) -> str:
    return "-" if value is None else f"{float(value):.3f}"


def _parse_table(markdown: str) -> Block:
    """A Markdown pipe table (ours: no pipes inside cells) as a table block."""
    lines = [line.strip().strip("|") for line in markdown.strip().splitlines()]
    cells = [[c.strip() for c in line.split("|")] for line in lines if not set(line) <= set("-|: ")]
    return ("table", cells[0], cells[1:])


def _markdown(blocks: Sequence[Block]) -> str:
    lines: list[str] = []
    for block in blocks:
        kind = block[0]
        if kind == "h1":
            lines += [f"# {block[1]}", ""]
        elif kind == "h2":
            lines += [f"## {block[1]}", ""]
        elif kind == "p":
            lines += [block[1], ""]
        elif kind == "table":
            header, rows = block[1], block[2]
            lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            lines += ["| " + " | ".join(row) + " |" for row in rows] + [""]
        elif kind == "img":
            lines += [f"![{block[2]}]({block[1]})", ""]
    return "\n".join(lines)


def _html(blocks: Sequence[Block], out: Path, title: str) -> str:
    """One page with every plot inlined (data URIs): it opens anywhere, alone."""
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse;margin:1em 0;font-size:90%}td,th{border:1px solid #ccc;padding:3px 6px}"
        "th{background:#f3f3f3}img{max-width:48%;margin:4px;vertical-align:top}</style>",
        "</head><body>",
    ]
    for block in blocks:
        kind = block[0]
        if kind in ("h1", "h2", "p"):
            parts.append(f"<{kind}>{html.escape(block[1])}</{kind}>")
        elif kind == "table":
            head = "".join(f"<th>{html.escape(h)}</th>" for h in block[1])
            body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in block[2])
            parts.append(f"<table><tr>{head}</tr>{body}</table>")
        elif kind == "img":
            data = base64.b64encode((out / block[1]).read_bytes()).decode()
            parts.append(f'<img alt="{html.escape(block[2])}" src="data:image/png;base64,{data}">')
    parts.append("</body></html>")
    return "\n".join(parts)

"""The demo's figures into docs/benchmarks.md (section "demo"): the round table of a finished `make demo`, each of
#18's targets met or not, the gate's reasons and where the time went, read from the demo's rounds.json.

    python benchmarks/demo_section.py --home .cytoloop --command "make demo" --minutes 55
"""

from __future__ import annotations

import argparse
import platform
from datetime import date
from pathlib import Path

from _docs import DOCS, replace_section

from jobs.cycle import RoundResult, round_table, rounds_from_json

TARGET_ACCURACY, TARGET_LABELS, TARGET_BLASTS, TARGET_ROUTED, TARGET_ECE = 0.85, 40, 0.80, 0.15, 0.08


def render(rows: list[RoundResult], args: argparse.Namespace) -> str:
    sites = list(dict.fromkeys(r.site for r in rows))
    lines = [
        f"Command: `{args.command}` (the defaults: 3 rounds, 40 cells sent per site and round, 200 pool cells "
        "scored per site and round, 200 fine-tuning steps). "
        f"Machine: {platform.machine()}, CPU only, 2 cores, quiet. Date: {args.date}; "
        f"{args.minutes:.0f} minutes end to end (stack start included).",
        "",
        "Balanced accuracy and ECE: each site's held-out cells scored through Ray Serve by the version serving the "
        "site after the round (round 0: the unadapted base model). Blasts: ALL-IDB2 blasts mixed into the pool; "
        "'anomaly/in pool' counts those among the round's scored pool cells that routing sent to the anomaly queue.",
        "",
        round_table(rows),
        "",
        "Targets (#18):",
    ]
    for site in sites:
        mine = sorted((r for r in rows if r.site == site), key=lambda r: r.round)
        base, looped = mine[0], [r for r in mine if r.round > 0]
        best = max(looped[:3], key=lambda r: r.balanced_accuracy) if looped else None
        within = all(r.sent <= TARGET_LABELS for r in looped[:3])
        met = best is not None and best.balanced_accuracy >= TARGET_ACCURACY and within
        lines.append(
            f"- {site}, balanced accuracy from the base model's {base.balanced_accuracy:.3f} to >= "
            f"{TARGET_ACCURACY} within 3 rounds of <= {TARGET_LABELS} labels: "
            + (f"best {best.balanced_accuracy:.3f} (round {best.round})" if best else "no round")
            + f" -> {'met' if met else 'NOT met'}"
        )
        first = next((r for r in looped if r.round == 1), None)
        if first is not None and first.blasts.get("scored"):
            share = first.blasts["anomaly"] / first.blasts["scored"]
            ok = share >= TARGET_BLASTS and first.routed_fraction <= TARGET_ROUTED
            lines.append(
                f"- {site}, round 1: {first.blasts['anomaly']} of {first.blasts['scored']} mixed-in blasts routed as "
                f"anomalies ({share:.0%}; target >= {TARGET_BLASTS:.0%}) with {first.routed_fraction:.0%} of the pool "
                f"routed (target <= {TARGET_ROUTED:.0%}) -> {'met' if ok else 'NOT met'}"
            )
        promoted = [r for r in looped if r.gate == "promoted"]
        if promoted:
            last = promoted[-1]
            verdict = "met" if last.ece <= TARGET_ECE else "NOT met"
            floor = last.ece_calibrated
            lines.append(
                f"- {site}, the promoted version's ECE on the held-out cells: v{last.version} {last.ece:.3f} "
                f"(target <= {TARGET_ECE}) -> {verdict}"
                + (
                    f"; a perfectly calibrated model making the same predictions would show {floor['mean']:.3f} "
                    f"[{floor['low']:.3f}, {floor['high']:.3f}] on these {floor['cells']:.0f} cells"
                    if floor
                    else ""
                )
            )
        else:
            lines.append(f"- {site}: no version was promoted -> the ECE target cannot be met")
    lines += ["", "Gate verdicts (frozen gate cells of the site; paired-bootstrap intervals of the difference):"]
    for row in rows:
        if row.round > 0:
            lines.append(f"- round {row.round}, {row.site}: v{row.version} {row.gate}")
            lines += [f"  - {reason}" for reason in row.gate_reasons]
    stages = sorted({k for r in rows for k in r.seconds})
    lines += ["", "Where the time went (seconds, summed over rounds):", ""]
    lines += ["| site | " + " | ".join(stages) + " |", "|---|" + "---|" * len(stages)]
    for site in sites:
        totals = [sum(r.seconds.get(k, 0.0) for r in rows if r.site == site) for k in stages]
        lines.append(f"| {site} | " + " | ".join(f"{t:.0f}" for t in totals) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--home", type=Path, required=True, help="the demo's CYTOLOOP_HOME")
    parser.add_argument("--command", default="make demo")
    parser.add_argument("--minutes", type=float, required=True, help="wall-clock minutes the command took")
    parser.add_argument("--date", default=date.today().isoformat())
    parser.add_argument("--write-docs", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args()
    text = render(rounds_from_json((args.home / "demo" / "rounds.json").read_text()), args)
    print(text)
    if args.write_docs:
        replace_section(DOCS, "demo", text, title="The whole loop: `make demo` on real cells")


if __name__ == "__main__":
    main()

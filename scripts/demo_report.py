#!/usr/bin/env python3
"""Compare finished `fedmem simulate` runs: a table (markdown) and a recall-per-round plot.

    python scripts/demo_report.py exact=runs/exact fedit=runs/fedit \
        --plot docs/demo_recall.png --table docs/demo_table.md

Each run directory must hold the metrics.jsonl and summary.json that `fedmem simulate`
writes (and optionally wall_seconds.txt from scripts/demo_benchmark.sh).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def load(run: Path) -> dict:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    wall = run / "wall_seconds.txt"
    return {"rows": rows, "wall": float(wall.read_text()) if wall.is_file() else None}


def table(runs: dict[str, dict]) -> str:
    sources = sorted({s for r in runs.values() for row in r["rows"] for s in row.get("recall_by_source", {})})
    head = ("| method | rounds | wall clock | base recall | memory recall | "
            + " | ".join(f"{s} facts" for s in sources) + " | max truncation error |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, r in runs.items():
        base = next(row for row in r["rows"] if row["round"] == 0)
        last = r["rows"][-1]
        wall = f"{r['wall']:.0f} s" if r["wall"] else "-"
        trunc = max(row.get("truncation_error", 0.0) for row in r["rows"] if row["round"] > 0)
        by = " | ".join(f"{base['recall_by_source'].get(s, 0):.0%} → {last.get('recall_by_source', {}).get(s, 0):.0%}"
                        for s in sources)
        lines.append(f"| {name} | {last['round']} | {wall} | {base['recall']:.0%} | {last['recall']:.0%} | {by} "
                     f"| {trunc:.1e} |")
    return "\n".join(lines) + "\n"


def plot(runs: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    for (name, r), colour in zip(runs.items(), ("tab:blue", "tab:red", "tab:green", "tab:purple")):
        rounds = [row["round"] for row in r["rows"]]
        ax.plot(rounds, [100 * row["recall"] for row in r["rows"]], marker="o", color=colour, label=f"{name}: all")
        for source, style in (("prose", ":"), ("qa", "--")):
            if any(source in row.get("recall_by_source", {}) for row in r["rows"]):
                ax.plot(rounds, [100 * row["recall_by_source"].get(source, 0) for row in r["rows"]], style,
                        color=colour, alpha=0.6, label=f"{name}: {source} facts")
        ax.set_xticks(rounds)
    ax.set_xlabel("round (0 = base model)")
    ax.set_ylabel("held-out question recall (%)")
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("fedmem demo: recall per round")
    fig.tight_layout()
    fig.savefig(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="NAME=RUN_DIR")
    parser.add_argument("--plot", type=Path)
    parser.add_argument("--table", type=Path)
    args = parser.parse_args()
    runs = {}
    for spec in args.runs:
        name, _, path = spec.partition("=")
        runs[name] = load(Path(path))
    text = table(runs)
    print(text)
    if args.table:
        args.table.write_text(text)
    if args.plot:
        plot(runs, args.plot)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()

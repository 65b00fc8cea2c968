"""Recall against the privacy budget ε: a plot and a table from finished `fedmem simulate` runs.

Each run is an output directory of `fedmem simulate ... --dp-epsilon E` (one without it is the
ε = ∞ point) next to the JSON that `fedmem eval --control ... --json RUN-eval.json` wrote for it.
The sweep in docs/security.md ("Differential privacy") made the figure:

    .venv/bin/python scripts/dp_recall_plot.py runs/devset-parallel runs/devset-dp-1e8 runs/devset-dp-1e6 \
        runs/devset-dp-1e4 --out docs/dp_recall.png --table docs/dp_recall.md
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path


def run_point(run: Path) -> dict:
    """ε, noise multiplier, recall (strict, loose, by kind) and control loss of one finished run."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    last, base = rows[-1], rows[0]
    privacy = last.get("privacy")
    point = {
        "run": str(run),
        "budget": privacy["budget"] if privacy else math.inf,
        "epsilon": privacy["epsilon"] if privacy else math.inf,
        "noise_multiplier": privacy["noise_multiplier"] if privacy else 0.0,
        "clip": privacy["clip"] if privacy else None,
        "rounds": last["round"],
        "strict": last["recall_strict"],
        "loose": last["recall"],
        "by_kind": last.get("recall_by_kind", {}),
        "base_strict": base.get("recall_strict", 0.0),
        "seconds": sum(r.get("seconds", 0.0) for r in rows),
    }
    evaluation = run.with_name(run.name + "-eval.json")
    if evaluation.is_file():
        control = json.loads(evaluation.read_text()).get("control", {})
        point["control_lost"] = len(control.get("lost", []))
        point["control_leaks"] = len(control.get("leaks", []))
        point["control_total"] = len(control.get("questions", []))
    return point


def table(points: list[dict]) -> str:
    kinds = sorted({k for p in points for k in p["by_kind"]})
    head = ["ε (δ = 1e-5)", "noise multiplier", "strict recall", "loose", *kinds, "control lost", "leaks"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for p in points:
        eps = "∞ (no DP)" if math.isinf(p["budget"]) else f"{p['budget']:g} (spent {p['epsilon']:.4g})"
        cells = [eps, f"{p['noise_multiplier']:.3g}", f"{p['strict']:.0%}", f"{p['loose']:.0%}",
                 *[f"{p['by_kind'].get(k, 0):.0%}" for k in kinds],
                 f"{p.get('control_lost', '-')} of {p.get('control_total', '-')}", str(p.get("control_leaks", "-"))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(points: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finite = [p for p in points if not math.isinf(p["budget"])]
    free = [p for p in points if math.isinf(p["budget"])]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    xs = [p["budget"] for p in finite]
    ax.plot(xs, [100 * p["strict"] for p in finite], "o-", label="strict recall (answer in the first sentence)")
    ax.plot(xs, [100 * p["loose"] for p in finite], "s--", alpha=0.7, label="loose recall (anywhere in the reply)")
    if any("control_lost" in p for p in finite):
        kept = [100 * (1 - p["control_lost"] / max(p["control_total"], 1)) for p in finite]
        ax.plot(xs, kept, "^:", color="tab:green", label="control questions kept")
    for p in free:
        ax.axhline(100 * p["strict"], color="tab:blue", lw=0.8, ls="-.")
        ax.annotate(f"no DP: strict {p['strict']:.0%}", (min(xs) if xs else 1, 100 * p["strict"]),
                    textcoords="offset points", xytext=(2, 4), fontsize=8, color="tab:blue")
        if "control_lost" in p:
            kept = 100 * (1 - p["control_lost"] / max(p["control_total"], 1))
            ax.axhline(kept, color="tab:green", lw=0.8, ls="-.")
            ax.annotate(f"no DP: control kept {kept:.0f}%", (min(xs) if xs else 1, kept),
                        textcoords="offset points", xytext=(2, -11), fontsize=8, color="tab:green")
    if points:
        ax.axhline(100 * points[0]["base_strict"], color="grey", lw=0.8, ls=":")
    ax.set_xscale("log")
    ax.set_xlabel("privacy budget ε over the whole run (δ = 1e-5, owner level)")
    ax.set_ylabel("% of questions")
    ax.set_ylim(-3, 103)
    ax.set_title("Devset, 4 owners, parallel rounds: recall against ε")
    ax.legend(fontsize=8, loc="center left")
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="fedmem simulate output directories")
    parser.add_argument("--out", type=Path, help="PNG to write")
    parser.add_argument("--table", type=Path, help="markdown table to write (also printed)")
    args = parser.parse_args()
    points = sorted((run_point(r) for r in args.runs), key=lambda p: p["budget"])
    text = table(points)
    print(text)
    if args.table:
        args.table.write_text(text)
    if args.out:
        plot(points, args.out)
        print(f"plot: {args.out}")


if __name__ == "__main__":
    main()

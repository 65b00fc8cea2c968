"""``fedmem bench answer`` on disk: the finished summary as a markdown table and plots."""

from __future__ import annotations

import math
from pathlib import Path


def _fmt(x, spec: str, none: str = "–") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return none
    return format(x, spec)


def table_markdown(summary: dict) -> str:
    lines = ["| arm | accuracy | prompt tokens | time to first token (s, median) | decode tok/s (median) "
             f"| questions/s (batch 1) | questions/s (batch {summary['batch_size']}) | peak memory (MiB RSS) "
             "| the serving machine holds |",
             "|---|---|---|---|---|---|---|---|---|"]
    for arm, r in summary["arms"].items():
        lines.append(f"| {r['label']} | {r['accuracy']:.0%} ({round(r['accuracy'] * r['questions'])}/{r['questions']}) "
                     f"| {r['prompt_tokens']:.0f} | {_fmt(r['ttft_s'], '.3f')} | {_fmt(r['decode_tps'], '.1f')} "
                     f"| {r['questions_per_s']:.3f} | {_fmt(r['questions_per_s_batched'], '.3f')} "
                     f"| {_fmt(r['peak_memory_mib'], '.0f')} | {r['needs']} |")
    if summary["sweep"]:
        lines += ["", "Full context as the corpus grows (distractors: the other owners' notes, then generated "
                  "fictional organisations):", "",
                  "| context | prompt tokens (mean) | questions | accuracy | time to first token (s) | decode tok/s "
                  "| questions/s | merged memory questions/s, same questions | memory speed-up |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for s in summary["sweep"]:
            lines.append(f"| {s['size']} | {s['prompt_tokens']:.0f} | {s['questions']} | {s['accuracy']:.0%} "
                         f"| {_fmt(s['ttft_s'], '.2f')} | {_fmt(s['decode_tps'], '.1f')} | {s['questions_per_s']:.3f} "
                         f"| {_fmt(s['memory_questions_per_s'], '.3f')} | {_fmt(s['memory_speedup'], '.1f')}× |")
    if summary["curve"]:
        lines += ["", "Base model speed against prompt length (fixed new tokens):", "",
                  "| prompt tokens | time to first token (s) | decode tok/s |", "|---|---|---|"]
        for p in summary["curve"]:
            lines.append(f"| {p['prompt_tokens']} | {p['ttft_s']:.2f} | {_fmt(p['decode_tps'], '.1f')} |")
    t = summary["targets"]
    if t:
        yes = {True: "met", False: "**not met**"}
        lines += ["", "Targets:", "",
                  f"- memory accuracy ≥ RAG: {yes[t['memory_accuracy_ge_rag']]}",
                  f"- memory accuracy ≥ full context: {yes[t['memory_accuracy_ge_full_context']]}",
                  f"- questions/s ≥ 3× RAG, batch 1: {t['speedup_vs_rag']:.2f}× — {yes[t['speedup_vs_rag_ge_3']]}"]
        if "speedup_vs_rag_batched" in t:
            lines.append(f"- questions/s ≥ 3× RAG, batch {summary['batch_size']}: {t['speedup_vs_rag_batched']:.2f}× — "
                         f"{yes[t['speedup_vs_rag_batched_ge_3']]} (full context, all corpora: "
                         f"{t['speedup_vs_full_context_batched']:.1f}×)")
        if "speedup_vs_full_context_at_largest" in t:
            lines.append(f"- questions/s ≥ 10× full context at the largest corpus that fits "
                         f"({t['largest_context']}, {t['largest_context_prompt_tokens']:.0f} prompt tokens): "
                         f"{_fmt(t['speedup_vs_full_context_at_largest'], '.1f')}× at batch 1 — "
                         f"{yes[bool(t['speedup_vs_full_context_ge_10'])]}")
    return "\n".join(lines) + "\n"


def plot(summary: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .report import save_png

    written = []
    if summary["curve"]:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
        xs = [p["prompt_tokens"] for p in summary["curve"]]
        a1.plot(xs, [p["ttft_s"] for p in summary["curve"]], "o-", color="black", label="base model")
        a2.plot(xs, [p["decode_tps"] for p in summary["curve"]], "o-", color="black", label="base model")
        sweep = [c for c in summary["calls"] if c["size"] and c["arm"] == "full_context"]
        if sweep:  # every full-context call of the sweep, up to the window
            a1.scatter([c["prompt_tokens"] for c in sweep], [c["ttft_s"] for c in sweep], marker="x", color="grey",
                       label="full-context sweep calls")
            a2.scatter([c["prompt_tokens"] for c in sweep], [c["decode_tps"] for c in sweep], marker="x",
                       color="grey", label="full-context sweep calls")
        for arm, r in summary["arms"].items():
            a1.scatter([r["prompt_tokens"]], [r["ttft_s"]], label=r["label"], zorder=3)
            a2.scatter([r["prompt_tokens"]], [r["decode_tps"]], label=r["label"], zorder=3)
        for ax, title in ((a1, "time to first token (s)"), (a2, "decode tokens/s")):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("prompt tokens")
            ax.set_title(title)
            ax.grid(alpha=0.3)
        a1.set_yscale("log")
        handles, labels = a2.get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=7, frameon=False)
        fig.tight_layout(rect=(0, 0.12, 1, 1))
        written.append(save_png(fig, out / "latency.png"))
        plt.close(fig)
    if summary["sweep"]:
        fig, ax = plt.subplots(figsize=(6, 4))
        xs = [s["prompt_tokens"] for s in summary["sweep"]]
        ax.plot(xs, [s["accuracy"] for s in summary["sweep"]], "o-", color="black", label="full context")
        for s in summary["sweep"]:
            ax.annotate(f"{s['size']} (n={s['questions']})", (s["prompt_tokens"], s["accuracy"]), fontsize=7,
                        textcoords="offset points", xytext=(4, 4))
        for arm in ("memory_merged", "rag"):
            if arm in summary["arms"]:
                r = summary["arms"][arm]
                ax.axhline(r["accuracy"], linestyle="--", color="C0" if arm == "memory_merged" else "C1",
                           label=f"{r['label']} ({r['prompt_tokens']:.0f} prompt tokens)")
        ax.set_xscale("log", base=2)
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("prompt tokens (corpus in the prompt)")
        ax.set_ylabel("accuracy")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        written.append(save_png(fig, out / "context.png"))
        plt.close(fig)
    return written


def write_outputs(summary: dict, out: Path) -> list[Path]:
    from .report import write_report

    return write_report(summary, out, table_markdown, plot)

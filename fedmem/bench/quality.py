"""``fedmem bench quality``: how much of the owners' knowledge a memory answers, against the ceiling.

The data is a generated fictional knowledge base (``fedmem.bench.quality_data``): people
with attributes, written as documents in several styles and split across clients,
with questions in tiers:

- ``seen``: facts that have a Q/A record, asked exactly as the record asks them;
- ``heldout``: the same facts, asked in phrasings no training file uses;
- ``prose_only``: facts that appear only in documents, asked in held-out phrasings;
- control: general-knowledge questions the base model answers, and the perplexity
  of held-out general text, to see what training costs the model (forgetting).

Arms, every one with the same seed and the same training compute (each owner's
data passed over ``rounds × epochs`` times):

- ``base``: nothing trained (the floor);
- ``owner_context``: the base model with the question's owner's documents in its
  prompt (what tier 3 must beat), asked the prose-only questions;
- ``local``: each owner's own adapter, asked every owner's questions (what an owner
  has without federating); the figures are the mean over owners;
- ``fedit``: the federation with A and B averaged separately (the FedIT baseline);
- ``exact``: the federation with fedmem's exact aggregation;
- ``central``: one adapter trained on all corpora pooled (the ceiling federation aims at).

The federated arms run the same ``client_update`` / ``server_aggregate`` functions as
the Flower apps, in one process (``federation.federate_in_process``): the benchmark
compares recipes and aggregations, not transport.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from fedmem.answer import Question, load_questions, score
from fedmem.config import FederationConfig
from fedmem.corpus import Corpus, load_corpus
from fedmem.federation import client_update, federate_in_process

log = logging.getLogger(__name__)

TIERS = ("seen", "heldout", "prose_only")
ARMS = ("base", "owner_context", "local", "fedit", "exact", "central")
ARM_LABELS = {
    "base": "base model",
    "owner_context": "base model, owner's documents in the prompt",
    "local": "local only (own adapter, mean over owners)",
    "fedit": "federated, FedIT (A, B averaged)",
    "exact": "federated, fedmem exact",
    "central": "centralised (pooled corpora; the ceiling)",
}
# Training compute per size when not given: rounds × local epochs (centralised and local
# arms train rounds × epochs epochs in one go).
COMPUTE = {"small": dict(rounds=2, epochs=1), "default": dict(rounds=3, epochs=2)}
EVAL_NEW_TOKENS = 24  # answers come first in the recipe's targets; the base model's preamble is cut, not its answer
TARGETS = {"prose_only": 0.70, "seen": 0.95, "heldout": 0.95, "exact_of_central": 0.95,
           "control_drop_points": 2.0, "perplexity_rise": 0.05}


@dataclass
class QualityConfig:
    out: Path = Path("runs/bench-quality")
    size: str = "default"
    data: Path | None = None  # a generated benchmark to reuse; default: generate into OUT/data
    split: str = "disjoint"
    arms: tuple = ARMS
    federation: FederationConfig = field(default_factory=FederationConfig)
    base: str | None = None
    device: str = "cpu"
    seed: int = 0

    def __post_init__(self):
        unknown = [a for a in self.arms if a not in ARMS]
        if unknown or not self.arms:
            raise ValueError(f"arms must be a non-empty subset of {', '.join(ARMS)}; "
                             f"got {', '.join(self.arms) or 'none'}")


@dataclass
class Benchmark:
    directory: Path
    corpora: list[Corpus]
    questions: list[Question]  # source = tier
    control: list[Question]
    heldout_text: str
    manifest: dict


def load_benchmark(directory: Path) -> Benchmark:
    """Read a generated benchmark, checking every part before anything heavy runs."""
    directory = Path(directory)
    corpora_dir = directory / "corpora"
    for needed in (corpora_dir, directory / "questions.jsonl", directory / "control_questions.jsonl",
                   directory / "heldout_text.txt", directory / "manifest.json"):
        if not needed.exists():
            raise FileNotFoundError(f"{needed}: missing; generate the data with scripts/make_quality_data.py")
    corpora = [load_corpus(d) for d in sorted(p for p in corpora_dir.iterdir() if p.is_dir())]
    questions = load_questions(directory / "questions.jsonl")
    raw = [json.loads(line) for line in (directory / "questions.jsonl").read_text().splitlines() if line.strip()]
    # The tier is what the benchmark reports by, so it becomes the question's source.
    bad = [f"{directory / 'questions.jsonl'}:{i}: tier {r.get('tier')!r} is not one of {TIERS}"
           for i, r in enumerate(raw, 1) if r.get("tier") not in TIERS]
    if bad:
        raise ValueError("\n".join(bad))
    questions = [replace(q, source=r["tier"], client=str(r.get("client", ""))) for q, r in zip(questions, raw)]
    clients = {c.name for c in corpora}
    strays = sorted({q.client for q in questions} - clients)
    if strays:
        raise ValueError(f"{directory / 'questions.jsonl'}: questions name clients with no corpus: {', '.join(strays)}")
    return Benchmark(directory, corpora, questions, load_questions(directory / "control_questions.jsonl"),
                     (directory / "heldout_text.txt").read_text(encoding="utf-8"),
                     json.loads((directory / "manifest.json").read_text()))


def prepare_data(config: QualityConfig) -> Benchmark:
    if config.data is not None:
        return load_benchmark(config.data)
    from .quality_data import SIZES, generate

    if config.size not in SIZES:
        raise ValueError(f"size must be one of {', '.join(SIZES)}, got {config.size!r}")
    directory = Path(config.out) / "data"
    generate(directory, split=config.split, seed=config.seed, **SIZES[config.size])
    log.info("generated the %s benchmark (%s split, seed %d) in %s", config.size, config.split, config.seed, directory)
    return load_benchmark(directory)


def pooled(corpora: list[Corpus]) -> Corpus:
    """Every owner's documents and records as one corpus: what a central server would hold."""
    return Corpus(Path("pooled"), [d for c in corpora for d in c.documents], [r for c in corpora for r in c.qa])


# ---------------------------------------------------------------- measuring


def perplexity(model, tokenizer, text: str, window: int = 256) -> float:
    """exp(mean next-token loss) over the text in consecutive windows."""
    import torch

    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids) - 1, window):
            chunk = torch.tensor([ids[start:start + window + 1]], device=device)
            if chunk.shape[1] < 2:
                break
            out = model(input_ids=chunk, labels=chunk)
            n = chunk.shape[1] - 1
            total += out.loss.item() * n
            count += n
    return math.exp(total / count) if count else math.nan


def evaluate(model, tokenizer, bench: Benchmark, questions: list[Question] | None = None,
             with_forgetting: bool = True) -> dict:
    """Recall per tier and, with ``with_forgetting``, control accuracy and held-out perplexity."""
    questions = bench.questions if questions is None else questions
    s = score(model, tokenizer, questions, max_new_tokens=EVAL_NEW_TOKENS)
    row = {"recall": s.accuracy, "tiers": s.by_source, "replies": s.replies, "correct": s.correct,
           "control": None, "perplexity": None}
    if with_forgetting:
        row["control"] = score(model, tokenizer, bench.control, max_new_tokens=EVAL_NEW_TOKENS).accuracy
        row["perplexity"] = perplexity(model, tokenizer, bench.heldout_text)
    return row


def _model_with(base_dir: str, factors, device: str):
    from fedmem.base_model import load_model
    from fedmem.lora import merge_factors

    model = load_model(base_dir, device)
    if factors:
        merge_factors(model, factors)
    model.eval()
    return model


def _mean_rows(rows: list[dict]) -> dict:
    """Recall averaged over owners' adapters (forgetting is not measured per owner)."""
    tiers = sorted({t for r in rows for t in r["tiers"]})
    return {"recall": sum(r["recall"] for r in rows) / len(rows),
            "tiers": {t: sum(r["tiers"].get(t, 0.0) for r in rows) / len(rows) for t in tiers},
            "control": None, "perplexity": None}


class QualityRun:
    """One run of every selected arm; ``results`` fills in arm by arm."""

    def __init__(self, config: QualityConfig, bench: Benchmark):
        from fedmem.base_model import load_tokenizer, resolve_base

        self.config, self.bench = config, bench
        self.base_dir = str(resolve_base(config.base))
        self.tokenizer = load_tokenizer(self.base_dir)
        self.results: dict[str, dict] = {}

    def _single(self, corpus: Corpus):
        """One adapter trained on one corpus with the whole run's compute (rounds × epochs)."""
        fed = self.config.federation
        one_shot = replace(fed, rounds=1, method="exact", lora=replace(fed.lora, epochs=fed.rounds * fed.lora.epochs))
        return client_update(self.base_dir, corpus, None, one_shot, 1, device=self.config.device)

    def run_base(self) -> dict:
        return evaluate(_model_with(self.base_dir, None, self.config.device), self.tokenizer, self.bench)

    def run_owner_context(self) -> dict:
        from .context import owner_documents, prompt_text

        qs = _asked(self.bench, "owner_context")
        by_name = {c.name: c for c in self.bench.corpora}
        prompts = [prompt_text(self.tokenizer, q.question, "\n\n".join(owner_documents(by_name[q.client])))
                   for q in qs]
        model = _model_with(self.base_dir, None, self.config.device)
        s = score(model, self.tokenizer, qs, prompts, max_new_tokens=EVAL_NEW_TOKENS)
        return {"recall": s.accuracy, "tiers": s.by_source, "control": None, "perplexity": None,
                "prompt_tokens": sum(len(self.tokenizer(p)["input_ids"]) for p in prompts) / max(1, len(prompts)),
                "replies": s.replies, "correct": s.correct}

    def run_local(self) -> dict:
        per_owner = {}
        for corpus in self.bench.corpora:
            log.info("  local: %s", corpus.name)
            result = self._single(corpus)
            row = evaluate(_model_with(self.base_dir, result.factors, self.config.device), self.tokenizer, self.bench,
                           with_forgetting=False)
            own = [ok for ok, q in zip(row["correct"], self.bench.questions) if q.client == corpus.name]
            row["own_recall"] = sum(own) / max(1, len(own))
            row["train_seconds"] = result.metrics["train_seconds"]
            per_owner[corpus.name] = row
        rows = list(per_owner.values())
        mean = _mean_rows(rows)
        mean["own_recall"] = sum(r["own_recall"] for r in rows) / len(rows)
        mean["per_owner"] = {k: {kk: v for kk, v in r.items() if kk not in ("replies", "correct")}
                             for k, r in per_owner.items()}
        return mean

    def run_federated(self, method: str) -> dict:
        config = replace(self.config.federation, method=method)
        if config.schedule == "routed":
            raise ValueError("the quality benchmark scores one merged memory; a routed memory is scored with "
                             "fedmem simulate --schedule routed, then fedmem eval")
        if method == "fedit":  # FedIT as published: every owner on the same global LoRA, A and B averaged
            config = replace(config, schedule="parallel")
        rounds: list[dict] = []
        last: dict = {}

        def after_round(rnd, agg, results):
            # Forgetting is measured on the final memory only: it is the costly part of an evaluation.
            row = evaluate(_model_with(self.base_dir, agg.factors, self.config.device), self.tokenizer, self.bench,
                           with_forgetting=rnd == config.rounds)
            rounds.append({"round": rnd, "recall": row["recall"], "tiers": row["tiers"], "control": row["control"],
                           "perplexity": row["perplexity"], "truncation_error": agg.max_truncation_error,
                           "client_losses": [r.metrics["final_loss"] for r in results]})
            last.update(row)
            log.info("  %s round %d/%d: recall %.0f%% %s", method, rnd, config.rounds, 100 * row["recall"],
                     _tiers_text(row["tiers"]))

        federate_in_process(self.base_dir, self.bench.corpora, config, after_round=after_round,
                            device=self.config.device)
        return {**last, "rounds": rounds}

    def run_central(self) -> dict:
        result = self._single(pooled(self.bench.corpora))
        row = evaluate(_model_with(self.base_dir, result.factors, self.config.device), self.tokenizer, self.bench)
        row["train_seconds"] = result.metrics["train_seconds"]
        return row

    def run(self) -> dict:
        steps = {"base": self.run_base, "owner_context": self.run_owner_context, "local": self.run_local,
                 "fedit": lambda: self.run_federated("fedit"), "exact": lambda: self.run_federated("exact"),
                 "central": self.run_central}
        for arm in ARMS:
            if arm not in self.config.arms:
                continue
            log.info("arm %s: %s", arm, ARM_LABELS[arm])
            started = time.perf_counter()
            row = steps[arm]()
            row["wall_s"] = time.perf_counter() - started
            self.results[arm] = row
            log.info("  -> recall %.0f%% (%s) in %.0fs", 100 * row["recall"], _tiers_text(row["tiers"]), row["wall_s"])
        return self.results


def _tiers_text(tiers: dict[str, float]) -> str:
    return " ".join(f"{t} {v:.0%}" for t, v in tiers.items())


# ---------------------------------------------------------------- reporting


def targets(results: dict) -> dict:
    """The issue's goals, checked on the exact (default) arm against base and central."""
    out: dict = {}
    exact, base, central = results.get("exact"), results.get("base"), results.get("central")
    if exact:
        for tier in TIERS:
            if tier in exact["tiers"]:
                out[f"{tier}_ge_{TARGETS[tier]:.0%}"] = exact["tiers"][tier] >= TARGETS[tier]
        if "owner_context" in results and "prose_only" in exact["tiers"]:
            out["prose_only_above_owner_context"] = exact["tiers"]["prose_only"] > results["owner_context"]["recall"]
        if central:
            for tier in ("heldout", "prose_only"):
                c = central["tiers"].get(tier)
                if c:
                    share = out[f"exact_{tier}_of_central"] = exact["tiers"].get(tier, 0.0) / c
                    out[f"exact_{tier}_ge_95%_of_central"] = share >= TARGETS["exact_of_central"]
        if base:
            drop = 100 * (base["control"] - exact["control"])
            rise = exact["perplexity"] / base["perplexity"] - 1
            out["control_drop_points"] = drop
            out["control_drop_le_2_points"] = drop <= TARGETS["control_drop_points"]
            out["perplexity_rise"] = rise
            out["perplexity_rise_le_5%"] = rise <= TARGETS["perplexity_rise"]
    return out


def _asked(bench: Benchmark, arm: str) -> list[Question]:
    """The questions an arm answers: the owner-context arm only the prose-only tier."""
    return [q for q in bench.questions if arm != "owner_context" or q.source == "prose_only"]


def summarise(config: QualityConfig, bench: Benchmark, results: dict, wall_s: float) -> dict:
    fed = config.federation
    counts = {t: sum(q.source == t for q in bench.questions) for t in TIERS}
    return {
        "config": {"size": config.size, "split": config.split, "seed": config.seed, "data": str(bench.directory),
                   "arms": list(config.arms), "federation": fed.to_dict(), "device": config.device},
        "benchmark": {**bench.manifest, "questions_per_tier": counts, "control_questions": len(bench.control)},
        "arms": {arm: {k: v for k, v in row.items() if k not in ("replies", "correct")}
                 for arm, row in results.items()},
        "replies": {arm: [{"question": q.question, "answer": q.answer, "tier": q.source, "client": q.client,
                           "reply": r, "correct": ok}
                          for q, r, ok in zip(_asked(bench, arm), row.get("replies", []), row.get("correct", []))]
                    for arm, row in results.items() if "replies" in row},
        "targets": targets(results),
        "wall_s": wall_s,
    }


def _pct(x) -> str:
    return "–" if x is None else f"{x:.0%}"


def table_markdown(summary: dict) -> str:
    fed = summary["config"]["federation"]
    n = summary["benchmark"]["questions_per_tier"]
    lines = [f"Compute per arm: {fed['rounds']} rounds × {fed['lora']['epochs']} epochs over each owner's data "
             f"(centralised and local: {fed['rounds'] * fed['lora']['epochs']} epochs in one go); "
             f"questions per tier: " + ", ".join(f"{t} {c}" for t, c in n.items())
             + f"; {summary['benchmark']['control_questions']} control questions.", "",
             "| arm | tier 1: seen phrasing | tier 2: held-out phrasing | tier 3: prose only | all tiers "
             "| control (general knowledge) | held-out text perplexity | wall clock |",
             "|---|---|---|---|---|---|---|---|"]
    for arm, r in summary["arms"].items():
        t = r["tiers"]
        ppl = "–" if r.get("perplexity") is None else f"{r['perplexity']:.2f}"
        lines.append(f"| {ARM_LABELS[arm]} | {_pct(t.get('seen'))} | {_pct(t.get('heldout'))} "
                     f"| {_pct(t.get('prose_only'))} "
                     f"| {_pct(r['recall']) if arm != 'owner_context' else '–'} | {_pct(r.get('control'))} | {ppl} "
                     f"| {r['wall_s']:.0f} s |")
    local = summary["arms"].get("local")
    if local:
        lines += ["", f"Local only: each owner's adapter answers {local['own_recall']:.0%} of its own owner's "
                      f"questions (mean over owners); the table's row is over every owner's questions."]
    t = summary["targets"]
    if t:
        yes = {True: "met", False: "**not met**"}
        lines += ["", "Targets (fedmem exact):", ""]
        for key, value in t.items():
            if isinstance(value, bool):
                lines.append(f"- {key.replace('_', ' ')}: {yes[value]}")
        for key in ("exact_heldout_of_central", "exact_prose_only_of_central"):
            if key in t:
                lines.append(f"- {key.replace('_', ' ')}: {t[key]:.0%}")
        if "control_drop_points" in t:
            lines.append(f"- control drop: {t['control_drop_points']:+.1f} points; "
                         f"perplexity rise: {t['perplexity_rise']:+.1%}")
    lines += ["", f"Whole benchmark: {summary['wall_s']:.0f} s."]
    return "\n".join(lines) + "\n"


def plot(summary: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .report import save_png

    written = []
    arms = summary["arms"]
    fig, ax = plt.subplots(figsize=(10, 4))
    width = 0.8 / max(1, len(arms))
    for i, (arm, r) in enumerate(arms.items()):
        xs = [j + (i - (len(arms) - 1) / 2) * width for j in range(len(TIERS))]
        ys = [r["tiers"].get(t, math.nan) for t in TIERS]
        ax.bar(xs, ys, width, label=ARM_LABELS[arm])
    ax.set_xticks(range(len(TIERS)), ["tier 1: seen phrasing", "tier 2: held-out phrasing", "tier 3: prose only"])
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("recall")
    ax.axhline(TARGETS["prose_only"], color="grey", linestyle=":", linewidth=1)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    written.append(save_png(fig, Path(out) / "tiers.png"))
    plt.close(fig)

    fed_arms = {a: r for a, r in arms.items() if r.get("rounds")}
    if fed_arms:
        fig, ax = plt.subplots(figsize=(6, 4))
        for arm, r in fed_arms.items():
            xs = [0] + [x["round"] for x in r["rounds"]]
            base = arms.get("base", {}).get("recall", 0.0)
            ax.plot(xs, [base] + [x["recall"] for x in r["rounds"]], "o-", label=ARM_LABELS[arm])
        if "central" in arms:
            ax.axhline(arms["central"]["recall"], color="black", linestyle="--", label=ARM_LABELS["central"])
        if "local" in arms:
            ax.axhline(arms["local"]["recall"], color="grey", linestyle=":", label=ARM_LABELS["local"])
        ax.set_xticks(range(0, max(len(r["rounds"]) for r in fed_arms.values()) + 1))
        ax.set_xlabel("round")
        ax.set_ylabel("recall, all tiers")
        ax.set_ylim(0, 1.05)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        written.append(save_png(fig, Path(out) / "rounds.png"))
        plt.close(fig)
    return written


def write_outputs(summary: dict, out: Path) -> list[Path]:
    from .report import write_report

    return write_report(summary, out, table_markdown, plot)


# ---------------------------------------------------------------- entry points


def run(config: QualityConfig) -> dict:
    """Every selected arm on the benchmark data (generated unless ``config.data``); the summary."""
    import torch

    started = time.perf_counter()
    bench = prepare_data(config)
    n = {t: sum(q.source == t for q in bench.questions) for t in TIERS}
    log.info("fedmem bench quality: %d owners, questions %s, %d control; arms %s; %d threads on %s",
             len(bench.corpora), ", ".join(f"{t} {c}" for t, c in n.items()), len(bench.control),
             ", ".join(config.arms), torch.get_num_threads(), config.device)
    results = QualityRun(config, bench).run()
    return summarise(config, bench, results, time.perf_counter() - started)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--size", default="default", help="benchmark size: small (a quick check) or default")
    p.add_argument("--small", dest="size", action="store_const", const="small", help="same as --size small")
    p.add_argument("--split", choices=("disjoint", "skewed"), default="disjoint",
                   help="how entities are dealt to owners (default %(default)s)")
    p.add_argument("--data", type=Path, default=None,
                   help="an already generated benchmark directory (default: generate one into OUT/data)")
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated subset of {','.join(ARMS)}")
    p.add_argument("--out", type=Path, default=Path("runs/bench-quality"),
                   help="where results.json, table.md and the PNGs go (default %(default)s)")
    p.add_argument("--base", default=None, help="base model directory (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")


def config_from_args(args, federation: FederationConfig) -> QualityConfig:
    """The run's settings; the data's seed is the training seed (``--seed``)."""
    from fedmem.base_model import pick_device

    return QualityConfig(out=args.out, size=args.size, data=args.data, split=args.split,
                         arms=tuple(a.strip() for a in args.arms.split(",") if a.strip()), federation=federation,
                         base=args.base, device=pick_device(args.device), seed=federation.lora.seed)


def run_from_args(args, federation: FederationConfig) -> int:
    """``fedmem bench quality``: run, print the table, write the report. ``federation``: the
    training settings every arm uses (``fedmem.bench.cli`` builds them from the flags)."""
    config = config_from_args(args, federation)
    summary = run(config)
    sys.stdout.write("\n" + table_markdown(summary))
    written = write_outputs(summary, config.out)
    log.info("wrote %s", ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit("usage: fedmem bench quality [--small] (this module has no entry point of its own)")

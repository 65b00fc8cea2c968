"""Per-owner memories routed per question, against their mean: a probe for parallel rounds
(issue 17; docs/aggregation.md, "Routed owner memories").

Each owner trains its own LoRA from the base model on its own examples only, with the settings
of ``recipe_probe.py`` (what the owners of a parallel round do, with nothing aggregated). Then
every question is put to every owner's LoRA, and answered:

- *routed*: by the LoRA that makes the question itself likeliest against the base model (the sum
  over the question's tokens of log p(token | LoRA) - log p(token | base), the question read as
  plain text): an owner's LoRA has read its documents, so the names a question about them uses
  are far less surprising to it than to the others. That LoRA's reply then passes the memory
  gate as ``fedmem ask``'s does (``fedmem.memory_gate``), else the base model answers;
- *by reply*: by the LoRA whose greedy reply the memory gate scores highest (the largest
  per-token log-likelihood ratio among the reply's first tokens), or by the base model when no
  LoRA's ratio passes the gate's threshold;
- *mean*: by the mean of the owners' LoRAs (what one parallel round with the mean would make);
- *own*: each LoRA on its own owner's questions only (what routing could reach at best).

Tune on development data only (``../shared/devset``); the demo's questions are a test set.

    .venv/bin/python scripts/routing_probe.py --data ../shared/devset/corpora \\
        --questions ../shared/devset/questions.jsonl --control ../shared/devset/control.jsonl \\
        --epochs 3 --out runs/routing/devset
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import time
from dataclasses import replace
from pathlib import Path

from fedmem.answer import control_report, generate_replies, load_questions, private_terms, scores_for
from fedmem.base_model import load_model, load_tokenizer, resolve_base
from fedmem.config import LoraSettings
from fedmem.corpus import load_corpus
from fedmem.examples import build_examples, chat_prompt
from fedmem.lora import attach_lora
from fedmem.memory import atomic_write_text
from fedmem.memory_gate import GATE_THRESHOLD, reply_log_ratios
from fedmem.retention import base_replies, retention_examples
from fedmem.routing import question_gains
from fedmem.train import train_lora

log = logging.getLogger("routing_probe")


def train_owners(data: Path, owners: list[str], settings: LoraSettings, out: Path) -> dict:
    """Train each owner's LoRA from the base model on its own examples; save each as a PEFT adapter
    in ``out/NAME``. Returns each owner's training figures."""
    base_dir = resolve_base(None)
    tokenizer = load_tokenizer(str(base_dir))
    keep = []
    figures = {}
    for owner in owners:
        if (out / owner / "training.json").exists():
            log.info("%s: trained already (%s)", owner, out / owner)
            figures[owner] = json.loads((out / owner / "training.json").read_text())
            continue
        model = load_model(str(base_dir))
        if settings.retention > 0 and not keep:
            keep = base_replies(model, tokenizer, base_dir)
        examples = build_examples(load_corpus(data / owner), settings.recipe)
        examples += retention_examples(keep, len(examples), settings.retention, settings.seed)
        model = attach_lora(model, settings)
        result = train_lora(model, tokenizer, examples, settings)
        model.save_pretrained(out / owner)
        figures[owner] = {"examples": result.examples, "tokens": result.tokens, "seconds": round(result.seconds, 1),
                          "final_loss": result.final_loss}
        atomic_write_text(out / owner / "training.json", json.dumps(figures[owner]))
        log.info("%s: %d examples, %d tokens, %.0f s, final loss %.3f", owner, result.examples, result.tokens,
                 result.seconds, result.final_loss)
        del model
        gc.collect()
    return figures


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, required=True, help="directory of owner corpora")
    p.add_argument("--questions", type=Path, required=True)
    p.add_argument("--control", type=Path, default=None)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--out", type=Path, required=True, help="directory: owners' adapters and result.json")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    from peft import PeftModel

    owners = sorted(d.name for d in args.data.iterdir() if d.is_dir())
    settings = replace(LoraSettings(), epochs=args.epochs, seed=args.seed)
    started = time.perf_counter()
    figures = train_owners(args.data, owners, settings, args.out)
    train_seconds = time.perf_counter() - started

    base_dir = resolve_base(None)
    tokenizer = load_tokenizer(str(base_dir))
    model = PeftModel.from_pretrained(load_model(str(base_dir)), args.out / owners[0], adapter_name=owners[0])
    for owner in owners[1:]:
        model.load_adapter(args.out / owner, adapter_name=owner)
    # The mean of the owners' updates, exactly: "cat" stacks the factors (rank 4r), each B scaled by 1/K.
    model.add_weighted_adapter(owners, [1 / len(owners)] * len(owners), "mean", combination_type="cat")
    model.eval()

    questions = load_questions(args.questions)
    control = load_questions(args.control) if args.control else []
    asked = questions + control
    prompts = [chat_prompt(tokenizer, q.question) for q in asked]
    # What `fedmem ask` routes by (fedmem.routing): each question's summed log-likelihood gain per LoRA
    familiarity = dict(zip(owners, question_gains(model, tokenizer, [q.question for q in asked], owners)))
    replies, ratios = {}, {}
    for name in owners + ["mean"]:
        model.set_adapter(name)
        replies[name] = generate_replies(model, tokenizer, prompts, args.max_new_tokens)
        ratios[name] = reply_log_ratios(model, tokenizer, prompts, replies[name])
        log.info("%s answered", name)
    with model.disable_adapter():
        base = generate_replies(model, tokenizer, prompts, args.max_new_tokens)

    routed, routes, by_reply, reply_routes = [], [], [], []
    for i in range(len(asked)):
        chosen = max(owners, key=lambda o: familiarity[o][i])
        kept = ratios[chosen][i] > GATE_THRESHOLD
        routed.append(replies[chosen][i] if kept else base[i])
        routes.append(chosen if kept else f"base ({chosen})")
        best = max(owners, key=lambda o: ratios[o][i])
        kept = ratios[best][i] > GATE_THRESHOLD
        by_reply.append(replies[best][i] if kept else base[i])
        reply_routes.append(best if kept else "base")
    n = len(questions)
    arms = {"routed": routed, "by reply": by_reply, "mean": replies["mean"], "base": base}
    result = {"owners": owners, "epochs": args.epochs, "seed": args.seed, "training": figures,
              "train_seconds": round(train_seconds, 1), "arms": {}}
    terms = private_terms(questions)
    base_control = scores_for(control, base[n:]) if control else None
    for arm, arm_replies in arms.items():
        facts = scores_for(questions, arm_replies[:n])
        row = {"strict": facts.strict_accuracy, "loose": facts.accuracy, "by_kind": facts.by_kind}
        if control and arm != "base":
            report = control_report(base_control, scores_for(control, arm_replies[n:]), control, terms)
            row.update(control_lost=len(report.lost), control_leaks=len(report.leaks))
        result["arms"][arm] = row
    own = [(i, q) for i, q in enumerate(questions) if q.client in owners]
    own_scores = scores_for([q for _, q in own], [replies[q.client][i] for i, q in own])
    result["arms"]["own"] = {"strict": own_scores.strict_accuracy, "by_kind": own_scores.by_kind}
    chosen = [r.removeprefix("base (").removesuffix(")") for r in routes]
    result["routing"] = {
        "to_owner": sum(c == q.client for c, q in zip(chosen, questions)) / max(n, 1),
        "gate_to_base": sum(r.startswith("base") for r in routes[:n]) / max(n, 1),
        "control_gate_to_base": sum(r.startswith("base") for r in routes[n:]) / max(len(control), 1),
        "by_reply_to_owner": sum(r == q.client for r, q in zip(reply_routes, questions)) / max(n, 1),
    }
    result["questions"] = [
        {"q": q.question, "a": q.answer, "client": q.client, "kind": q.kind, "route": r, "by_reply_route": rr,
         "familiarity": {o: round(familiarity[o][i], 2) for o in owners},
         "ratios": {o: round(ratios[o][i], 2) for o in owners}, "routed": routed[i], "by_reply": by_reply[i],
         "mean": replies["mean"][i], "own": replies[q.client][i] if q.client in owners else None}
        for i, (q, r, rr) in enumerate(zip(asked, routes, reply_routes))
    ]
    atomic_write_text(args.out / "result.json", json.dumps(result, indent=1))
    for arm, row in result["arms"].items():
        log.info("%-6s strict %.0f%% %s control lost %s", arm, 100 * row["strict"],
                 " ".join(f"{k} {v:.0%}" for k, v in row["by_kind"].items()), row.get("control_lost", "-"))
    log.info("routing: to the question's owner %.0f%% (by reply %.0f%%); the gate then gave the base model "
             "%.0f%% of the questions and %.0f%% of the control questions", 100 * result["routing"]["to_owner"],
             100 * result["routing"]["by_reply_to_owner"], 100 * result["routing"]["gate_to_base"],
             100 * result["routing"]["control_gate_to_base"])


if __name__ == "__main__":
    main()

"""Compare example recipes on development data, quickly: one LoRA trained centrally on
several owners' corpora (no federation), then strict recall by question kind and the
control questions, base model against memory.

This is for tuning on ``../shared/devset`` (or corpora of your own), never on a test set
(the demo's questions, the quality benchmark's held-out tier): see docs/quality.md,
"Development data and test sets". A centralised run is a proxy for ``fedmem simulate``
(same examples, same optimiser, no aggregation), about 1/3 of its time at 3 epochs.

    .venv/bin/python scripts/recipe_probe.py --data ../shared/devset/corpora \\
        --questions ../shared/devset/questions.jsonl --control ../shared/devset/control.jsonl \\
        --epochs 3 --out runs/probe/default.json
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import time
from dataclasses import replace
from pathlib import Path

from fedmem import examples as examples_module
from fedmem.answer import answer_alternatives, answer_nll, control_report, load_questions, private_terms, score
from fedmem.base_model import load_model, load_tokenizer, resolve_base
from fedmem.config import PRECISIONS, LoraSettings
from fedmem.corpus import load_corpus
from fedmem.examples import RECIPES, build_examples
from fedmem.lora import attach_lora
from fedmem.memory import atomic_write_text
from fedmem.memory_gate import gated_scores
from fedmem.retention import base_replies, retention_examples
from fedmem.train import train_lora

log = logging.getLogger("recipe_probe")


def with_question_loss(tokenizer, example, max_len: int = 512):
    """``tokenize_example``, with the question's own tokens learned as well (not the template's around it,
    and not for general examples, whose target is the base model's distribution)."""
    from fedmem.examples import chat_prompt, tokenize_example

    ids, labels = tokenize_example(tokenizer, example, max_len)
    if example.question is None or example.distil:
        return ids, labels
    mark = "FEDMEMPROBEQUESTION"
    before, after = chat_prompt(tokenizer, mark).split(mark)
    start = len(tokenizer(before, add_special_tokens=False)["input_ids"])
    end = len(tokenizer(chat_prompt(tokenizer, example.question), add_special_tokens=False)["input_ids"]) - len(
        tokenizer(after, add_special_tokens=False)["input_ids"])
    labels = list(labels)
    for i in range(start, min(end, len(ids))):
        labels[i] = ids[i]
    return ids, labels


def print_coverage(questions, by_owner: dict) -> None:
    """Which questions some example of their owner is trained to answer with their answer
    (an accepted form at the start of its answer): an answer no example leads with can
    only be learned from inside another fact's grounding sentence."""
    covered = 0
    for q in questions:
        forms = [f.lower() for f in answer_alternatives(q.answer)]
        hits = [ex for ex in by_owner.get(q.client, []) if ex.question
                and any(re.match(re.escape(f) + r"(?!\w)", ex.answer.lower()) for f in forms)]
        covered += bool(hits)
        print(f"{'asked' if hits else '-----'} {len(hits):3d} {q.kind or '':9s} {q.question} -> {q.answer}")
    print(f"{covered} of {len(questions)} answers are some example's answer; "
          f"{sum(len(v) for v in by_owner.values())} examples")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, required=True, help="directory of owner corpora")
    p.add_argument("--owners", default="", help="comma-separated owner directory names (default: all)")
    p.add_argument("--questions", type=Path, required=True)
    p.add_argument("--control", type=Path, default=None)
    p.add_argument("--recipe", default=LoraSettings.recipe, choices=RECIPES)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=LoraSettings.learning_rate)
    p.add_argument("--rank", type=int, default=LoraSettings.rank)
    p.add_argument("--retention", type=float, default=LoraSettings.retention)
    p.add_argument("--targets", default=",".join(LoraSettings().target_modules),
                   help="comma-separated linear layers the LoRA is put on (candidate)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", default=LoraSettings.precision, choices=PRECISIONS)
    p.add_argument("--answer", choices=("grounded", "value", "sentence"), default="grounded",
                   help="candidate: a question's answer is the value then its sentence, the value alone, "
                        "or the sentence alone")
    p.add_argument("--out", type=Path, required=True, help="JSON result file")
    p.add_argument("--context", choices=("refers", "all"), default="refers",
                   help="which sentences also get questions that carry the sentence before (candidate)")
    p.add_argument("--topic", choices=("add", "replace", "off"), default=examples_module.TOPIC_QUESTIONS,
                   help="questions under the document's topic: besides the plain ones, instead of them, or none")
    p.add_argument("--hard-retention", action="store_true",
                   help="train general examples on the base model's reply tokens, not its distribution (candidate)")
    p.add_argument("--question-loss", action="store_true",
                   help="learn the question's tokens too, not only the answer's (candidate; Shi et al. 2024, "
                        "'Instruction tuning with loss over instructions')")
    p.add_argument("--neftune", type=float, default=0.0, metavar="ALPHA",
                   help="noise on the input embeddings while training, uniform with scale ALPHA/sqrt(length x "
                        "width) (candidate; Jain et al. 2023, NEFTune; transformers' own hook)")
    p.add_argument("--examples-only", action="store_true", help="print the examples and stop")
    p.add_argument("--coverage", action="store_true",
                   help="print which questions' answers some example is trained to answer with, and stop")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    examples_module.TOPIC_QUESTIONS = args.topic
    if args.question_loss:
        import fedmem.train

        fedmem.train.tokenize_example = with_question_loss
    if args.answer == "value":
        examples_module.grounded_answer = lambda value, sent: f"{value}." if value not in ("", sent) else sent
    if args.answer == "sentence":
        examples_module.grounded_answer = lambda value, sent: sent
    if args.context == "all":
        examples_module._REFERS_BACK = re.compile("")  # every sentence after the first
    owners = sorted(d.name for d in args.data.iterdir() if d.is_dir())
    if args.owners:
        owners = [o for o in owners if o in args.owners.split(",")]
    base_dir = resolve_base(None)
    tokenizer = load_tokenizer(str(base_dir))
    settings = replace(LoraSettings(), recipe=args.recipe, epochs=args.epochs, learning_rate=args.lr,
                       rank=args.rank, retention=args.retention, seed=args.seed, precision=args.precision,
                       target_modules=[t.strip() for t in args.targets.split(",") if t.strip()])
    examples = []
    by_owner = {}
    for owner in owners:
        by_owner[owner] = build_examples(load_corpus(args.data / owner), settings.recipe)
        examples += by_owner[owner]
    if args.coverage:
        print_coverage(load_questions(args.questions), by_owner)
        return
    if args.examples_only:
        for ex in examples:
            print(f"Q: {ex.question}\nA: {ex.answer}\n")
        print(len(examples), "examples")
        return
    model = load_model(str(base_dir))
    keep = base_replies(model, tokenizer, base_dir) if settings.retention > 0 else []
    if args.hard_retention:
        keep = [replace(ex, distil=False) for ex in keep]
    examples += retention_examples(keep, len(examples), settings.retention, settings.seed)
    questions = [q for q in load_questions(args.questions) if not q.client or q.client in owners]
    control = load_questions(args.control) if args.control else []
    base_control = score(model, tokenizer, control) if control else None
    base_nll = answer_nll(model, tokenizer, questions)
    model = attach_lora(model, settings)
    if args.neftune > 0:
        from transformers.integrations.neftune import neftune_post_forward_hook

        embeddings = model.get_input_embeddings()
        embeddings.neftune_noise_alpha = args.neftune  # the hook reads it; it adds noise only in training mode
        embeddings.register_forward_hook(neftune_post_forward_hook)
    started = time.perf_counter()
    result = train_lora(model, tokenizer, examples, settings)
    train_seconds = time.perf_counter() - started
    facts = score(model, tokenizer, questions)
    nll = answer_nll(model, tokenizer, questions)
    row = {
        "recipe": settings.recipe, "epochs": settings.epochs, "lr": settings.learning_rate,
        "rank": settings.rank, "targets": settings.target_modules, "retention": settings.retention,
        "precision": settings.precision, "answer": args.answer, "context": args.context, "topic": args.topic,
        "hard_retention": args.hard_retention, "question_loss": args.question_loss, "neftune": args.neftune,
        "seed": settings.seed,
        "owners": owners,
        "examples": result.examples, "tokens": result.tokens, "train_seconds": round(train_seconds, 1),
        "final_loss": result.final_loss,
        "answer_nll": round(nll, 4), "base_answer_nll": round(base_nll, 4),
        "strict": facts.strict_accuracy, "loose": facts.accuracy, "by_kind": facts.by_kind,
        "questions": [
            {"q": q.question, "a": q.answer, "kind": q.kind, "client": q.client, "reply": r, "strict": s}
            for q, r, s in zip(questions, facts.replies, facts.strict)
        ],
    }
    model.eval()
    with model.disable_adapter():
        base_facts = score(model, tokenizer, questions)
    gate, gated_facts = gated_scores(model, tokenizer, questions, facts, base_facts)
    row["gated"] = {"strict": gated_facts.strict_accuracy, "by_kind": gated_facts.by_kind}
    for entry, ratio, kept, ok in zip(row["questions"], gate.ratios, gate.from_memory, gated_facts.strict):
        entry.update(gate_ratio=round(ratio, 3), gated_from_memory=kept, gated_strict=ok)
    if control:
        memory_control = score(model, tokenizer, control)
        terms = private_terms(questions)
        report = control_report(base_control, memory_control, control, terms)
        _, gated_control = gated_scores(model, tokenizer, control, memory_control, base_control)
        gated_report = control_report(base_control, gated_control, control, terms)
        row["control"] = {
            "base": sum(base_control.strict), "memory": sum(memory_control.strict), "lost": len(report.lost),
            "leaks": len(report.leaks), "gated_lost": len(gated_report.lost), "gated_leaks": len(gated_report.leaks),
            "replies": [{"q": q.question, "reply": r} for q, r in zip(control, memory_control.replies)],
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(row, indent=1))
    kinds = " ".join(f"{k} {v:.0%}" for k, v in facts.by_kind.items())
    log.info("strict %.0f%% (loose %.0f%%) | answer NLL %.3f (base %.3f) | %s | control lost %s | gated: strict "
             "%.0f%%, control lost %s | %d examples, %d tokens, %.0f s", 100 * facts.strict_accuracy,
             100 * facts.accuracy, nll, base_nll, kinds, row.get("control", {}).get("lost", "-"),
             100 * gated_facts.strict_accuracy, row.get("control", {}).get("gated_lost", "-"), result.examples,
             result.tokens, train_seconds)


if __name__ == "__main__":
    main()

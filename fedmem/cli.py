"""``fedmem``: simulate a federation, ask a memory, evaluate a memory against its base."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .corpus import CorpusError
from .federation import CLIENT_STARTS, METHODS, SCHEDULES, WEIGHTINGS, FederationConfig
from .lora import PRECISIONS, RECIPES, LoraSettings
from .memory import MemoryFormatError


def _add_training_args(p: argparse.ArgumentParser) -> None:
    d, f = LoraSettings(), FederationConfig()
    p.add_argument("--rounds", type=int, default=f.rounds, help="federated rounds (default %(default)s)")
    p.add_argument("--method", choices=METHODS, default=f.method,
                   help="exact: sum of B·A re-factorised (default); fedit: A and B averaged separately (baseline)")
    p.add_argument("--schedule", choices=SCHEDULES, default=f.schedule,
                   help="cyclic: each round the owners train one after another, each on the memory the one "
                        "before left; parallel: all on the same memory, updates summed (FedAvg) (default %(default)s)")
    p.add_argument("--weighting", choices=WEIGHTINGS, default=f.weighting,
                   help="parallel schedule, exact method: 'mean' is FedAvg's n_k/n; 'sum' adds each owner's update "
                        "in full (default %(default)s)")
    p.add_argument("--server-lr", type=float, default=f.server_lr,
                   help="exact method: memory += server_lr * weighted sum of updates (default %(default)s)")
    p.add_argument("--client-start", choices=CLIENT_STARTS, default=f.client_start,
                   help="exact method: clients start each round from a fresh LoRA on the merged memory, "
                        "or continue a LoRA initialised to the memory (default %(default)s)")
    p.add_argument("--memory-rank", type=int, default=f.memory_rank, help="rank of the aggregated memory (default %(default)s)")
    p.add_argument("--rank", type=int, default=d.rank, help="client LoRA rank (default %(default)s)")
    p.add_argument("--alpha", type=int, default=d.alpha, help="client LoRA alpha (default %(default)s)")
    p.add_argument("--lr", type=float, default=d.learning_rate, help="learning rate (default %(default)s)")
    p.add_argument("--epochs", type=int, default=d.epochs, help="local epochs per round (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="batch size (default %(default)s)")
    p.add_argument("--precision", choices=PRECISIONS, default=d.precision,
                   help="training arithmetic: auto = bf16 where the hardware has it natively (default %(default)s)")
    p.add_argument("--recipe", choices=RECIPES, default=d.recipe,
                   help="statements: documents rewritten into standalone statements (tables, key-value notes, "
                        "pronouns resolved) before questions are made; sentences: questions per sentence as written; "
                        "distilled: the statements questions answered by the base model reading the document "
                        "(context distillation) (default %(default)s)")
    p.add_argument("--retention", type=float, default=d.retention,
                   help="general questions answered as the base model answers them, added as this share of each "
                        "corpus's examples so the memory keeps the model's general knowledge; 0: off (default %(default)s)")
    p.add_argument("--generator", default=d.generator, metavar="base|DIR",
                   help="also train questions written by a model from the documents, each checked by asking it "
                        "back: 'base' = the base model, or a local instruct model directory (default: off)")
    p.add_argument("--seed", type=int, default=d.seed)


def _federation(args) -> FederationConfig:
    lora = LoraSettings(rank=args.rank, alpha=args.alpha, learning_rate=args.lr, epochs=args.epochs,
                        batch_size=args.batch_size, precision=args.precision, recipe=args.recipe,
                        retention=args.retention, generator=args.generator,
                        seed=args.seed)
    return FederationConfig(rounds=args.rounds, method=args.method, weighting=args.weighting, server_lr=args.server_lr,
                            memory_rank=args.memory_rank, client_start=args.client_start, schedule=args.schedule,
                            lora=lora)


def _local_federation(args) -> FederationConfig:
    """The settings, for a run whose owners are on this machine: a generator must be here."""
    from .question_writer import generator_dir

    config = _federation(args)
    if config.lora.generator not in ("", "base"):
        generator_dir(config.lora.generator, "")
    return config


def cmd_simulate(args) -> int:
    from .simulation import simulate

    started = time.perf_counter()
    summary = simulate(args.data, args.out, _local_federation(args), base=args.base, questions=args.questions,
                       device=args.device)
    elapsed = time.perf_counter() - started
    print(f"\nmemory adapter: {Path(args.out) / 'memory'}  ({elapsed:.0f}s in all)")
    if "base_recall" in summary and summary["rounds"]:
        last = summary["rounds"][-1]
        before = summary["base_recall"]
        print(f"held-out recall: base model {before['accuracy']:.0%} -> with memory {last['recall']:.0%}")
        for source, value in last.get("recall_by_source", {}).items():
            print(f"  facts from {source}: {before.get(source, 0):.0%} -> {value:.0%}")
    print(f"try it: fedmem ask --memory {Path(args.out) / 'memory'} \"your question\"")
    return 0


def cmd_ask(args) -> int:
    from .answer import generate_answers, load_with_memory

    model, tok, _ = load_with_memory(args.memory, args.base, args.device)
    for reply in generate_answers(model, tok, args.question, max_new_tokens=args.max_new_tokens):
        print(reply)
    return 0


def cmd_eval(args) -> int:
    from .answer import load_questions, load_with_memory, score

    questions = load_questions(args.questions)
    model, tok, _ = load_with_memory(args.memory, args.base, args.device)
    with_memory = score(model, tok, questions)
    with model.disable_adapter():
        base_only = score(model, tok, questions)
    print(f"{'':<44} {'base':>6} {'memory':>7}")
    print(f"{'all questions (' + str(len(questions)) + ')':<44} {base_only.accuracy:>6.0%} {with_memory.accuracy:>7.0%}")
    for source in with_memory.by_source:
        print(f"{'  facts from ' + source:<44} {base_only.by_source[source]:>6.0%} {with_memory.by_source[source]:>7.0%}")
    if args.verbose:
        for q, b, m, ok in zip(questions, base_only.replies, with_memory.replies, with_memory.correct):
            print(f"\n{'OK ' if ok else 'MISS'} {q.question}\n  expected: {q.answer}\n  memory:   {m[:120]}\n  base:     {b[:120]}")
    if args.json:
        rows = [{"question": q.question, "answer": q.answer, "source": q.source, "memory": m, "memory_correct": ok,
                 "base": b, "base_correct": bok}
                for q, m, ok, b, bok in zip(questions, with_memory.replies, with_memory.correct, base_only.replies,
                                            base_only.correct)]
        result = {"memory": str(args.memory), "accuracy": {"base": base_only.accuracy, "memory": with_memory.accuracy},
                  "by_source": {"base": base_only.by_source, "memory": with_memory.by_source}, "questions": rows}
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


def cmd_bench_answer(args) -> int:
    from .answer_bench import run_from_args

    return run_from_args(args)


def cmd_bench_quality(args) -> int:
    from .quality_bench import COMPUTE, run_from_args

    for key, value in COMPUTE.get(args.size, COMPUTE["default"]).items():
        if getattr(args, key) is None:
            setattr(args, key, value)

    return run_from_args(args, _local_federation(args))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedmem", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("simulate", help="run a whole federation on this machine (Flower simulation engine)")
    p.add_argument("--data", type=Path, default=None, help="directory with one corpus subdirectory per client (default: the demo)")
    p.add_argument("--questions", type=Path, default=None, help="held-out questions JSONL to report recall each round")
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="output directory (default %(default)s)")
    p.add_argument("--base", default=None, help="local Hugging Face model directory (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    _add_training_args(p)
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("ask", help="ask a memory adapter a question")
    p.add_argument("--memory", type=Path, required=True, help="memory adapter directory")
    p.add_argument("--base", default=None, help="base model directory (default: the one the memory names)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("question", nargs="+")
    p.set_defaults(func=cmd_ask)

    p = sub.add_parser("eval", help="answer-match accuracy of a memory vs its base model")
    p.add_argument("--memory", type=Path, required=True)
    p.add_argument("--questions", type=Path, required=True, help='JSONL of {"question", "answer", optional "source"}')
    p.add_argument("--base", default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", type=Path, default=None, help="also write per-question results here")
    p.add_argument("-v", "--verbose", action="store_true", help="print every question with both replies")
    p.set_defaults(func=cmd_eval)

    from .answer_bench import add_arguments as add_bench_answer_arguments

    p = sub.add_parser("bench", help="benchmarks")
    bench = p.add_subparsers(dest="bench", required=True)
    p = bench.add_parser("answer", help="memory adapter vs RAG vs full context vs closed book: accuracy, latency, memory",
                         description="Answer the same questions over the same corpora with the memory adapter (merged "
                                     "and unmerged), RAG, every corpus in the prompt, and the base model alone.")
    add_bench_answer_arguments(p)
    p.set_defaults(func=cmd_bench_answer)
    from .quality_bench import add_arguments as add_bench_quality_arguments

    p = bench.add_parser("quality", help="knowledge-injection benchmark: recall by tier for base, local, FedIT, "
                                         "exact and centralised training",
                         description="Generate a fictional knowledge base split across owners, train every arm with "
                                     "the same compute, and report recall by question tier plus forgetting.")
    add_bench_quality_arguments(p)
    _add_training_args(p)
    # Rounds and epochs follow --size unless given; bf16 where the hardware has it (same for every arm).
    p.set_defaults(rounds=None, epochs=None, precision="auto")
    p.set_defaults(func=cmd_bench_quality)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .base_model import quiet_libraries

    quiet_libraries()
    try:
        return args.func(args)
    except (CorpusError, MemoryFormatError, ValueError, FileNotFoundError) as err:
        print(f"fedmem: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

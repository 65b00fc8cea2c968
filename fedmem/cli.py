"""``fedmem``: simulate a federation, ask a memory, evaluate a memory against its base."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from .config import FederationConfig, NodeSettings, add_arguments, from_args
from .corpus import CorpusError
from .log import setup_logging
from .memory import MemoryFormatError

log = logging.getLogger("fedmem.cli")


def verbosity_parent() -> argparse.ArgumentParser:
    """-v / -q for every subcommand (``fedmem simulate -v``)."""
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("output")
    group.add_argument("-v", "--verbose", action="count", default=0, help="more detail (debug log)")
    group.add_argument("-q", "--quiet", action="count", default=0, help="warnings and the result only")
    return parent


def local_federation(args) -> FederationConfig:
    """The settings, for a run whose owners are on this machine: a generator must be here."""
    from .question_writer import generator_dir

    config = from_args(FederationConfig, args)
    if config.lora.generator not in ("", "base"):
        generator_dir(config.lora.generator, "")
    return config


def _at_least_one(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def cmd_simulate(args) -> int:
    from .flower.simulation import simulate

    started = time.perf_counter()
    federation = local_federation(args)
    summary = simulate(args.data, args.out, federation, from_args(NodeSettings, args),
                       questions=args.questions, workers=args.workers)
    elapsed = time.perf_counter() - started
    memory = Path(args.out) / "memory"
    lines = [f"memory adapter: {memory}  ({elapsed:.0f}s in all)"]
    if federation.schedule == "routed":
        lines.append("  routed: each owner's LoRA kept apart, and fedmem ask / eval / serve route each question "
                     f"to its owner's; for PEFT without fedmem: fedmem export --memory {memory} --adapters DIR")
    if "base_recall" in summary and summary["rounds"]:
        last = summary["rounds"][-1]
        before = summary["base_recall"]
        if "recall_strict" in last:  # the headline: the answer in the reply's first sentence
            lines.append(f"held-out recall: base model {before.get('strict', 0):.0%} -> with memory "
                         f"{last['recall_strict']:.0%} (answer in the first sentence)")
            lines += [f"  {kind}: {value:.0%}" for kind, value in last.get("recall_by_kind", {}).items()]
        lines.append(f"{'  anywhere in the reply' if 'recall_strict' in last else 'held-out recall'}: "
                     f"base model {before['accuracy']:.0%} -> with memory {last['recall']:.0%}")
        lines += [f"  facts from {source}: {before.get(source, 0):.0%} -> {value:.0%}"
                  for source, value in last.get("recall_by_source", {}).items()]
    if summary["rounds"] and "traffic" in summary["rounds"][-1]:
        from .flower.traffic import describe

        lines.append(f"bytes per round: {describe(summary['rounds'][-1]['traffic'])}, "
                     f"transport {summary['rounds'][-1]['traffic']['transport']}")
    if summary["rounds"] and "privacy" in summary["rounds"][-1]:
        dp = summary["rounds"][-1]["privacy"]
        lines.append(f"differential privacy (owner level): ε = {dp['epsilon']:.3g} spent of {dp['budget']:g} "
                     f"at δ = {dp['delta']:g}, noise multiplier {dp['noise_multiplier']:.3g}, clip {dp['clip']:g}")
    secure = [r["secure_seconds"] for r in summary["rounds"] if "secure_seconds" in r]
    if secure:
        extra = sum(v for steps in secure for k, v in steps.items() if k != "secure_masked")
        lines.append(f"secure aggregation: the coordinator saw only each round's sum of updates; key exchange, "
                     f"shares and unmasking took {extra:.0f}s over {len(secure)} rounds")
    lines.append(f"try it: fedmem ask --memory {Path(args.out) / 'memory'} \"your question\"")
    print("\n" + "\n".join(lines))
    return 0


def add_trust_arguments(p: argparse.ArgumentParser) -> None:
    """--trust-key / --require-signature: which memory signatures ask and eval believe."""
    p.add_argument("--trust-key", type=Path, action="append", default=[], metavar="FILE",
                   help="trust memories signed by this Ed25519 public key (.pub file; repeatable); also makes "
                   "a signature required. Trusted as well: $FEDMEM_HOME/trusted-keys/*.pub, the coordinator "
                   "key a client pinned, the coordinator's own key, your local key (fedmem simulate)")
    p.add_argument("--require-signature", action="store_true",
                   help="refuse an unsigned memory even where no key but your local one is trusted")


def trust_from_args(args):
    from .signing import trust_for_user

    return trust_for_user(args.trust_key, args.require_signature)


def cmd_ask(args) -> int:
    from .answer import generate_answers, load_memory
    from .examples import chat_prompt
    from .memory_gate import gated_answers

    loaded = load_memory(args.memory, args.base, args.device, trust_from_args(args))
    model, tok, router = loaded.model, loaded.tokenizer, loaded.router
    routes = router.routes(args.question)
    if args.no_gate:
        replies = router.each(routes, args.question,
                              lambda qs: generate_answers(model, tok, qs, max_new_tokens=args.max_new_tokens))
    else:
        gated = gated_answers(model, tok, [chat_prompt(tok, q) for q in args.question], args.max_new_tokens,
                              router=router, routes=routes)
        for question, route, kept, ratio in zip(args.question, routes, gated.from_memory, gated.ratios):
            log.debug("%s answered by the %s (%s; log-likelihood ratio %.2f)", question,
                      "memory" if kept else "base model", router.describe(route), ratio)
        replies = gated.replies
    for reply in replies:
        print(reply)
    return 0


def _eval_rows(questions, *scores) -> list[tuple]:
    """The eval table: (label, each of ``scores``' strict recall, then each one's loose recall)
    overall, per source and per kind."""
    from .answer import recall_by

    rows = [(f"all questions ({len(questions)})", *(s.strict_accuracy for s in scores),
             *(s.accuracy for s in scores))]
    for field, label in (("source", "facts from"), ("kind", "kind")):
        keys = [getattr(q, field) for q in questions]
        counts = {k: keys.count(k) for k in set(keys)}
        groups = [recall_by(keys, s.strict) for s in scores] + [recall_by(keys, s.correct) for s in scores]
        rows += [(f"  {label} {k} ({counts[k]})", *(g[k] for g in groups)) for k in groups[0]]
    return rows


def _print_lost_and_leaks(control, report, base_only, replies, label: str) -> None:
    n = len(control)
    print(f"control lost{label}: {len(report.lost)} of {n} (the base model answers {sum(report.base_correct)})")
    for i in report.lost:
        print(f"  LOST {control[i].question}\n    expected: {control[i].answer}\n"
              f"    memory:   {replies[i][:120]}\n    base:     {base_only.replies[i][:120]}")
    print(f"control leaks{label}: {len(report.leaks)} of {n} replies with the memory name a private fact's answer")
    for i, terms in report.leaks.items():
        print(f"  LEAK {control[i].question}\n    private:  {', '.join(terms)}\n    memory:   {replies[i][:120]}")


def _print_control(control, report, gated_report, base_only, with_memory, gated, verbose: bool) -> None:
    n = len(control)
    print(f"\n{'control questions (' + str(n) + ')':<44} {'base':>8} {'memory':>8} {'gated':>8}")
    print(f"{'  strict recall':<44} {report.base_accuracy:>8.0%} {report.memory_accuracy:>8.0%} "
          f"{gated_report.memory_accuracy:>8.0%}")
    _print_lost_and_leaks(control, report, base_only, with_memory.replies, "")
    _print_lost_and_leaks(control, gated_report, base_only, gated.replies, ", gated")
    if verbose:
        for q, b, m, bok, mok in zip(control, base_only.replies, with_memory.replies, report.base_correct,
                                     report.memory_correct):
            print(f"\n{'OK  ' if mok else 'MISS'} (base {'OK' if bok else 'MISS'}) {q.question}\n"
                  f"  expected: {q.answer}\n  memory:   {m[:120]}\n  base:     {b[:120]}")


def cmd_eval(args) -> int:
    from .answer import control_report, load_memory, load_questions, private_terms, routed_scores, score
    from .memory import atomic_write_text
    from .memory_gate import gated_scores

    questions = load_questions(args.questions)
    control = load_questions(args.control) if args.control else None
    loaded = load_memory(args.memory, args.base, args.device, trust_from_args(args))
    model, tok, router = loaded.model, loaded.tokenizer, loaded.router

    routes, with_memory = routed_scores(router, questions)
    control_routes, control_memory = routed_scores(router, control) if control else (None, None)
    with model.disable_adapter():
        base_only = score(model, tok, questions)
        control_base = score(model, tok, control) if control else None
    gate, gated = gated_scores(model, tok, questions, with_memory, base_only, router, routes)
    # Strict: the answer in the reply's first sentence (the headline); loose: anywhere in the reply.
    # Gated: what `fedmem ask` answers (fedmem.memory_gate); memory: the adapter alone, as PEFT runs it.
    print(f"{'':<44} {'strict':^26}    {'loose':^26}".rstrip())
    print(f"{'':<44} {'base':>8} {'memory':>8} {'gated':>8}    {'base':>8} {'memory':>8} {'gated':>8}")
    for label, bs, ms, gs, bl, ml, gl in _eval_rows(questions, base_only, with_memory, gated):
        print(f"{label:<44} {bs:>8.0%} {ms:>8.0%} {gs:>8.0%}    {bl:>8.0%} {ml:>8.0%} {gl:>8.0%}")
    print("strict: the answer in the reply's first sentence; loose: anywhere in the reply; gated: the memory's "
          "reply only where the memory makes it likely, else the base model's (what `fedmem ask` answers)")
    if args.verbose:
        for q, b, m, ok, strict in zip(questions, base_only.replies, with_memory.replies, with_memory.correct,
                                       with_memory.strict):
            # LATE: the answer is in the reply, but not in its first sentence.
            mark = "OK  " if strict else "LATE" if ok else "MISS"
            print(f"\n{mark} {q.question}\n  expected: {q.answer}\n"
                  f"  memory:   {m[:120]}\n  base:     {b[:120]}")
    report = gated_report = control_gate = control_gated = None
    if control:
        terms = private_terms(questions)
        control_gate, control_gated = gated_scores(model, tok, control, control_memory, control_base, router,
                                                   control_routes)
        report = control_report(control_base, control_memory, control, terms)
        gated_report = control_report(control_base, control_gated, control, terms)
        _print_control(control, report, gated_report, control_base, control_memory, control_gated, args.verbose)
    if args.json:
        rows = [
            {
                "question": q.question,
                "answer": q.answer,
                "source": q.source,
                "kind": q.kind,
                "memory": m,
                "memory_correct": ok,
                "memory_strict": ms,
                "base": b,
                "base_correct": bok,
                "base_strict": bs,
                "gate_ratio": ratio,
                "gated_from_memory": kept,
                "gated_strict": gs,
                **({"route": router.describe(route)} if loaded.routed else {}),
            }
            for q, m, ok, ms, b, bok, bs, ratio, kept, gs, route in zip(
                questions, with_memory.replies, with_memory.correct, with_memory.strict,
                base_only.replies, base_only.correct, base_only.strict, gate.ratios, gate.from_memory, gated.strict,
                routes,
            )
        ]
        # accuracy / by_source: loose (the answer anywhere in the reply); strict_*: in its first sentence.
        arms = {"base": base_only, "memory": with_memory, "gated": gated}
        result = {
            "memory": str(args.memory),
            **({"routed_owners": router.owners} if loaded.routed else {}),
            **{field: {arm: getattr(s, field) for arm, s in arms.items()}
               for field in ("accuracy", "strict_accuracy", "by_source", "by_kind")},
            "questions": rows,
        }
        if report is not None:
            result["control"] = {
                "questions_file": str(args.control),
                "strict_accuracy": {"base": report.base_accuracy, "memory": report.memory_accuracy,
                                    "gated": gated_report.memory_accuracy},
                "accuracy": {arm: s.accuracy for arm, s in
                             (("base", control_base), ("memory", control_memory), ("gated", control_gated))},
                "lost": report.lost,
                "leaks": [{"index": i, "terms": terms} for i, terms in report.leaks.items()],
                "gated_lost": gated_report.lost,
                "gated_leaks": [{"index": i, "terms": terms} for i, terms in gated_report.leaks.items()],
                "questions": [
                    {"question": q.question, "answer": q.answer, "kind": q.kind, "memory": m, "memory_strict": ms,
                     "base": b, "base_strict": bs, "gate_ratio": ratio, "gated_from_memory": kept,
                     "gated_strict": gs, **({"route": router.describe(route)} if loaded.routed else {})}
                    for q, m, ms, b, bs, ratio, kept, gs, route in zip(
                        control, control_memory.replies, report.memory_correct, control_base.replies,
                        report.base_correct, control_gate.ratios, control_gate.from_memory, gated_report.memory_correct,
                        control_routes)
                ],
            }
        atomic_write_text(Path(args.json), json.dumps(result, indent=2))
    return 0


def cmd_serve(args) -> int:
    import os

    from .serving.openai_api import ServeOptions
    from .serving.run import ServePlan, serve

    api_key = None
    if args.api_key_file is not None:
        try:
            api_key = args.api_key_file.read_text().strip()
        except OSError as err:
            raise ValueError(f"--api-key-file {args.api_key_file}: {err}") from None
        if not api_key:
            raise ValueError(f"--api-key-file {args.api_key_file}: empty")
    api_key = api_key or os.environ.get("FEDMEM_API_KEY") or None
    plan = ServePlan(memory=args.memory, follow=args.follow, base=args.base, device=args.device, host=args.host,
                     port=args.port, max_batch=args.max_batch, batch_wait_s=args.batch_wait_ms / 1000,
                     batch_max_wait_s=args.batch_max_wait_ms / 1000,
                     poll_interval_s=args.poll_interval)
    options = ServeOptions(memory_name=args.name, base_name=args.base_name, max_tokens_default=args.max_tokens,
                           max_tokens_limit=max(args.max_tokens, args.max_tokens_limit),
                           max_prompt_tokens=args.max_prompt_tokens, api_key=api_key, gate=not args.no_gate)
    if api_key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s without an API key: anyone who can reach it can ask (--api-key-file FILE)",
                    args.host)
    serve(plan, options, trust_from_args(args))
    return 0


def cmd_export(args) -> int:
    from .export import export_adapters, export_gguf, export_merged

    if not (args.merged or args.gguf or args.merged_gguf or args.adapters):
        raise ValueError("fedmem export: say what to write: --merged OUT, --gguf OUT, --merged-gguf OUT and/or "
                         "--adapters OUT")
    if args.adapters and args.owner:
        raise ValueError("fedmem export: --adapters writes every owner's LoRA; --owner picks one for --merged, "
                         "--gguf or --merged-gguf")
    trust, owner = trust_from_args(args), args.owner
    whose = f" ({owner}'s LoRA)" if owner else ""
    if args.merged:
        record = export_merged(args.memory, args.merged, args.base, trust, owner=owner)
        print(f"merged model{whose}: {args.merged}  (memory round {record['round']}, "
              f"sha256 {record['memory_sha256'][:16]})")
    if args.gguf:
        summary = export_gguf(args.memory, args.gguf, args.base, trust, owner=owner)
        print(f"GGUF LoRA adapter{whose}: {args.gguf}  ({summary.get('tensors', '?')} tensors)")
    if args.merged_gguf:
        export_gguf(args.memory, args.merged_gguf, args.base, trust, merged=True, base_gguf=args.base_gguf,
                    owner=owner)
        print(f"merged GGUF model{whose}: {args.merged_gguf}")
    if args.adapters:
        record = export_adapters(args.memory, args.adapters, args.base, trust)
        print(f"PEFT adapters: {', '.join(f'{args.adapters / o}' for o in record['owners'])}")
    return 0


def cmd_bench(args) -> int:
    # The benchmarks are a package of their own that the core never imports; loaded only here.
    from .bench.cli import main as bench_main

    return bench_main(args.bench_args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedmem", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    common = [verbosity_parent()]

    p = sub.add_parser(
        "simulate",
        parents=common,
        help="run a whole federation on this machine (Flower simulation engine)",
        description="Run a whole federation on this machine on Flower's simulation engine: one "
        "virtual owner per corpus directory, the memory adapter written to --out.",
    )
    p.add_argument(
        "--data", type=Path, default=None, help="directory with one corpus subdirectory per client (default: the demo)"
    )
    p.add_argument("--questions", type=Path, default=None, help="held-out questions JSONL to report recall each round")
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="output directory (default: %(default)s)")
    p.add_argument("--workers", type=_at_least_one, default=1, metavar="N",
                   help="owners that train side by side, each in its own process with its own copy of the base "
                   "model, the cores split between them (default: %(default)s, one at a time on every core; "
                   "more pays off for small models)")
    add_arguments(p, FederationConfig, NodeSettings)
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("ask", parents=common, help="ask a memory adapter a question")
    p.add_argument("--memory", type=Path, required=True, help="memory adapter directory")
    p.add_argument("--base", default=None, help="base model directory (default: the one the memory names)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--no-gate", action="store_true",
                   help="answer with the memory on every question, as a plain PEFT runtime does (default: the "
                   "base model answers where the memory does not make the reply likely; docs/usage.md)")
    add_trust_arguments(p)
    p.add_argument("question", nargs="+")
    p.set_defaults(func=cmd_ask)

    p = sub.add_parser("eval", parents=common, help="answer-match recall of a memory vs its base model",
                       description="Recall of the memory and of the base model alone: strict (the answer in "
                       "the reply's first sentence) and loose (anywhere in it). See docs/usage.md.")
    p.add_argument("--memory", type=Path, required=True)
    p.add_argument("--questions", type=Path, required=True,
                   help='JSONL of {"question", "answer", optional "source", "kind"}; "A|B" in an answer: either')
    p.add_argument("--control", type=Path, default=None, metavar="FILE",
                   help="questions JSONL of general knowledge the memory must keep: reports the questions the "
                   "base model answers and the memory no longer does, and replies naming a private answer")
    p.add_argument("--base", default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", type=Path, default=None, help="also write per-question results here")
    add_trust_arguments(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "serve",
        parents=common,
        help="serve the memory over an OpenAI-compatible HTTP API",
        description="Serve base model + memory as an OpenAI-compatible HTTP API (/v1/chat/completions, "
        "/v1/models, /health). The model named --name (fedmem) answers with the memory, the base model's "
        "name without it. Concurrent requests are batched. See docs/serving.md.",
    )
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--memory", type=Path, help="memory adapter directory to serve as it is now")
    which.add_argument("--follow", type=Path, metavar="DIR",
                       help="a memory directory that later versions replace (runs/demo/memory, a client's pulled "
                       "memory): each new version is served once complete and verified, without a restart")
    p.add_argument("--base", default=None, help="base model directory (default: the one the memory names)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: %(default)s)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    p.add_argument("--port", type=int, default=8000, help="(default: %(default)s)")
    p.add_argument("--name", default="fedmem", help="model name that answers with the memory (default: %(default)s)")
    p.add_argument("--base-name", default=None, help="model name that answers without it (default: the base "
                   "model directory's name)")
    p.add_argument("--max-batch", type=int, default=16, help="most requests generated together (default: %(default)s)")
    p.add_argument("--batch-wait-ms", type=float, default=10.0,
                   help="a batch keeps gathering requests while each comes within this of the one before "
                   "(default: %(default)s)")
    p.add_argument("--batch-max-wait-ms", type=float, default=100.0,
                   help="... but waits no longer than this in all (default: %(default)s)")
    p.add_argument("--max-tokens", type=int, default=256, help="reply length when a request gives none "
                   "(default: %(default)s)")
    p.add_argument("--max-tokens-limit", type=int, default=1024, help="longest reply a request may ask for "
                   "(default: %(default)s)")
    p.add_argument("--max-prompt-tokens", type=int, default=2048, help="(default: %(default)s)")
    p.add_argument("--no-gate", action="store_true",
                   help="the memory answers every request, as a plain PEFT runtime or a merged export does "
                   "(default: the base model answers where the memory does not make the reply likely, as in "
                   "fedmem ask; docs/serving.md)")
    p.add_argument("--poll-interval", type=float, default=1.0, help="--follow: seconds between looks at DIR "
                   "(default: %(default)s)")
    p.add_argument("--api-key-file", type=Path, default=None, metavar="FILE",
                   help="require 'Authorization: Bearer <key>' with the key in FILE (or $FEDMEM_API_KEY)")
    add_trust_arguments(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser(
        "export",
        parents=common,
        help="export the memory: a merged Hugging Face model, a GGUF LoRA, a merged GGUF, per-owner PEFT adapters",
        description="Write the memory in forms other tools serve without fedmem. See docs/serving.md.",
    )
    p.add_argument("--memory", type=Path, required=True, help="memory adapter directory")
    p.add_argument("--base", default=None, help="base model directory (default: the one the memory names)")
    p.add_argument("--merged", type=Path, metavar="OUT", help="write base + memory as one Hugging Face model "
                   "directory (tokenizer and chat template included)")
    p.add_argument("--gguf", type=Path, metavar="OUT", help="write a GGUF LoRA adapter for llama.cpp (--lora)")
    p.add_argument("--merged-gguf", type=Path, metavar="OUT", help="write a whole GGUF model with the memory "
                   "merged in (needs the base model's GGUF: the embedded model's, or --base-gguf)")
    p.add_argument("--base-gguf", type=Path, default=None, metavar="FILE", help="the base model's GGUF file "
                   "for --merged-gguf (default: the embedded model's, when that is the base)")
    p.add_argument("--owner", default=None, metavar="NAME", help="a routed memory (the default schedule's): "
                   "export this owner's LoRA alone (the sum of all owners' answers far worse than routing)")
    p.add_argument("--adapters", type=Path, metavar="OUT", help="a routed memory: write each owner's LoRA as its "
                   "own standard PEFT adapter directory, OUT/<owner>/, for PEFT without fedmem")
    add_trust_arguments(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("bench", add_help=False, help="benchmarks: `fedmem bench answer|quality --help`")
    p.add_argument("bench_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_bench, verbose=0, quiet=0)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose - args.quiet)
    try:
        return args.func(args)
    except (CorpusError, MemoryFormatError, ValueError, FileNotFoundError) as err:
        print(f"fedmem: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

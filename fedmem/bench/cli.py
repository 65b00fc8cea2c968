"""``fedmem bench``: the benchmarks' command line.

    fedmem bench answer --memory DIR [...]   memory adapter vs RAG vs full context vs closed book
    fedmem bench quality [--small] [...]     recall by tier for base, local, FedIT, exact and centralised

``fedmem``'s own command line hands ``fedmem bench ...`` to ``main`` here, so nothing of
this package is imported by the core. Bad input (a missing file, a bad setting, a corpus
that does not load) is reported on stderr with exit status 2, before anything is written.
"""

from __future__ import annotations

import argparse
import sys


def _answer(args: argparse.Namespace) -> int:
    from .answer import run_from_args

    return run_from_args(args)


def _quality(args: argparse.Namespace) -> int:
    from fedmem.config import FederationConfig, from_args

    from .quality import COMPUTE, run_from_args

    # Rounds and epochs follow --size unless given; bf16 where the hardware has it (the same for every arm).
    # The benchmark scores one merged memory per arm, so its federation is cyclic unless told (fedmem's
    # default, routed, keeps the owners' LoRAs apart and is scored with fedmem simulate, then fedmem eval).
    fixed = {"precision": "auto", "schedule": "cyclic", **COMPUTE.get(args.size, COMPUTE["default"])}
    federation = from_args(FederationConfig, args, fixed=fixed)
    if federation.lora.generator not in ("", "base"):  # every owner is on this machine: the generator must be here
        from fedmem.question_writer import generator_dir

        generator_dir(federation.lora.generator, "")
    return run_from_args(args, federation)


def build_parser() -> argparse.ArgumentParser:
    from fedmem.config import FederationConfig, add_arguments

    from . import answer, quality

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="count", default=0, help="more detail (repeatable)")
    common.add_argument("-q", "--quiet", action="count", default=0, help="warnings and errors only")

    parser = argparse.ArgumentParser(prog="fedmem bench",
                                     description="Benchmarks: the memory adapter against RAG and full context "
                                                 "(answer); recall by question tier for every training arm (quality).")
    sub = parser.add_subparsers(dest="bench", required=True, metavar="{answer,quality}")

    p = sub.add_parser("answer", parents=[common],
                       help="memory adapter vs RAG vs full context vs closed book: accuracy, latency, memory",
                       description="Answer the same questions over the same corpora with the memory adapter (merged "
                                   "and unmerged), RAG, every corpus in the prompt, and the base model alone.")
    answer.add_arguments(p)
    p.set_defaults(func=_answer)

    p = sub.add_parser("quality", parents=[common],
                       help="knowledge-injection benchmark: recall by tier for base, local, FedIT, exact and "
                            "centralised training",
                       description="Generate a fictional knowledge base split across owners, train every arm with "
                                   "the same compute, and report recall by question tier plus forgetting. Rounds "
                                   "and epochs default to the size's compute (small: 2 x 1, default: 3 x 2), "
                                   "precision to auto.")
    quality.add_arguments(p)
    add_arguments(p, FederationConfig)
    for action in p._actions:  # the size, not FederationConfig, decides these defaults
        key = action.dest.removeprefix("setting:")
        if key in ("rounds", "epochs") and action.help:
            by_size = ", ".join(f"{size} {compute[key]}" for size, compute in quality.COMPUTE.items())
            action.help = action.help.rsplit(" (default", 1)[0] + f" (default by --size: {by_size})"
        if key == "schedule" and action.help:
            action.help = action.help.rsplit(" (default", 1)[0] + " (default here: cyclic; routed is refused)"
    p.set_defaults(func=_quality)
    return parser


def _missing_extra() -> str | None:
    """The plots need matplotlib, the ``bench`` extra: say so before a long run, not after it."""
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        return "the benchmarks' plots need matplotlib; install it with: pip install 'fedmem[bench]'"
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    missing = _missing_extra()
    if missing:
        print(f"fedmem bench {args.bench}: error: {missing}", file=sys.stderr)
        return 2
    from fedmem.base_model import BaseModelError
    from fedmem.corpus import CorpusError
    from fedmem.log import setup_logging
    from fedmem.memory import MemoryFormatError

    from .retrieval import RetrievalError

    setup_logging(args.verbose - args.quiet)
    try:
        return args.func(args)
    except (CorpusError, MemoryFormatError, RetrievalError, BaseModelError, ValueError, FileNotFoundError) as err:
        print(f"fedmem bench {args.bench}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

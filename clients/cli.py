"""``fedmem-client``: the data owner's command line.

``check`` validates a private corpus exactly as training would, and shows how many
training examples it yields, without any network. ``join`` (deployment over Flower's
SuperNode) is not available in this version yet.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedmem-client", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("check", help="validate a corpus directory")
    p.add_argument("--data", type=Path, required=True)
    sub.add_parser("join", help="join a federation (not available yet)")
    args = parser.parse_args(argv)
    if args.command == "join":
        print("fedmem-client: joining a deployed federation is not available in this version yet; "
              "use `fedmem simulate`.", file=sys.stderr)
        return 2
    from fedmem.corpus import CorpusError, load_corpus
    from fedmem.examples import build_examples

    try:
        corpus = load_corpus(args.data)
    except CorpusError as err:
        print(f"fedmem-client: error: {err}", file=sys.stderr)
        return 2
    examples = build_examples(corpus)
    print(f"{corpus.root}: {len(corpus.documents)} documents, {len(corpus.qa)} Q/A records "
          f"-> {len(examples)} training examples")
    return 0


if __name__ == "__main__":
    sys.exit(main())

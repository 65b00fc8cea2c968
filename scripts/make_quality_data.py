#!/usr/bin/env python3
"""Write the knowledge-injection benchmark's data (see fedmem/bench/quality_data.py).

    python scripts/make_quality_data.py runs/quality-data --size small
    python scripts/make_quality_data.py OUT --entities 24 --clients 4 --split skewed --seed 1

--entities/--clients override the chosen size.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fedmem.bench.quality_data import SIZES, SPLITS, generate


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="output directory (created; a previous output is replaced)")
    parser.add_argument("--size", choices=sorted(SIZES), default="default")
    parser.add_argument("--entities", type=int, help="number of fictional people")
    parser.add_argument("--clients", type=int, help="number of client corpora")
    parser.add_argument("--split", choices=SPLITS, default="disjoint")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    size = dict(SIZES[args.size])
    size.update({k: v for k, v in (("entities", args.entities), ("clients", args.clients)) if v is not None})
    try:
        manifest = generate(args.out, split=args.split, seed=args.seed, **size)
    except ValueError as err:
        parser.error(str(err))
    print(f"{args.out}: {manifest.entities} entities, {manifest.clients} clients ({manifest.split}), "
          f"seed {manifest.seed}")
    print("questions: " + ", ".join(f"{tier} {n}" for tier, n in manifest.tiers.items()))
    for name, c in manifest.per_client.items():
        print(f"  {name}: {c['entities']} entities, {c['documents']} documents, {c['qa_records']} Q/A records, "
              f"{c['words']} words")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

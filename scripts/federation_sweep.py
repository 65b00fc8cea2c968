#!/usr/bin/env python3
"""Compare federation settings on the demo without the Flower/Ray machinery.

Runs the same plain functions the Flower apps call (client_update, server_aggregate)
in one process, clients one after another, and prints recall after every round.
Used to choose fedmem's defaults; see docs/results.md.

    python scripts/federation_sweep.py '{"rounds": 3, "epochs": 2}'
    python scripts/federation_sweep.py --rounds 3 --epochs 2 --set method=fedit --set schedule=parallel

Settings: any key of fedmem.config.FederationConfig and its LoraSettings (rounds,
schedule, method, rank, learning-rate, epochs, seed, recipe, retention, generator, ...),
as JSON (underscores or dashes) and/or as flags; flags win. The switches weighting,
server_lr, client_start and memory_rank were removed from fedmem (the runs that chose
against them are in docs/results.md); naming one is an error.
"""

from __future__ import annotations

import argparse
import json
import time

from fedmem.config import FederationConfig, add_arguments, from_args, keys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json", nargs="?", default="{}", help="settings as a JSON object (default: fedmem's defaults)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default %(default)s)")
    add_arguments(parser, FederationConfig)
    args = parser.parse_args(argv)
    try:
        options = {k.replace("_", "-"): v for k, v in json.loads(args.json).items()}
    except (json.JSONDecodeError, AttributeError) as err:
        parser.error(f"settings must be a JSON object: {err}")
    unknown = sorted(set(options) - set(keys(FederationConfig)))
    if unknown:
        parser.error(f"unknown setting {', '.join(unknown)}; known: {', '.join(keys(FederationConfig))}")
    try:
        config = from_args(FederationConfig, args, fixed=options)
    except ValueError as err:
        parser.error(str(err))
    if config.schedule == "routed":  # report() merges one memory; fedmem eval routes a routed one
        parser.error("--schedule routed: use fedmem simulate --schedule routed, then fedmem eval")

    from fedmem.answer import load_questions, score
    from fedmem.base_model import load_model, load_tokenizer, resolve_base
    from fedmem.corpus import load_corpus
    from fedmem.federation import federate_in_process
    from fedmem.flower.simulation import client_dirs, demo_dir
    from fedmem.log import setup_logging
    from fedmem.lora import merge_factors

    setup_logging()
    base = str(resolve_base())
    tokenizer = load_tokenizer(base)
    corpora = [load_corpus(d) for d in client_dirs(demo_dir() / "corpora")]
    questions = load_questions(demo_dir() / "questions.jsonl")
    print(json.dumps(config.to_dict()))
    started = time.perf_counter()

    def report(rnd, agg, results):
        model = load_model(base, args.device)
        merge_factors(model, agg.factors)
        s = score(model, tokenizer, questions)
        print(f"round {rnd} t={time.perf_counter() - started:.0f}s "
              f"losses {[round(r.metrics['final_loss'], 3) for r in results]} "
              f"truncation {agg.max_truncation_error:.3f} recall {s.accuracy:.0%} "
              + " ".join(f"{k} {v:.0%}" for k, v in s.by_source.items())
              + " " + "".join("+" if ok else "-" for ok in s.correct), flush=True)

    federate_in_process(base, corpora, config, after_round=report, device=args.device)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

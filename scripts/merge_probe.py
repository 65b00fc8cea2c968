#!/usr/bin/env python3
"""How much of what each owner learned survives the merge? One round, merged several ways.

Trains every demo owner's round-1 update once (the same ``client_update`` the Flower
apps call), then merges those same updates in several ways and asks the demo's 24
held-out questions of each result, counting per owner. Used for docs/results.md
("Why the federation lags").

    python scripts/merge_probe.py [--updates FILE] [--settings JSON] [--merges own,mean:16,mean:48,sum:48]

A merge is KIND:RANK: ``own`` (each owner's update alone), ``mean`` (FedAvg weights
n_k/n), ``sum`` (weight 1 each), ``xF`` (weight F/K each), at the given memory rank.
These weightings are this probe's own comparison: fedmem itself folds updates in with
FedAvg's weights at the LoRA rank (fedmem.federation.server_aggregate).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def _config(text: str):
    """FederationConfig from a JSON object of its (flat, underscores or dashes) settings."""
    from fedmem.config import FederationConfig, from_flat

    options = json.loads(text)
    if not isinstance(options, dict):
        raise ValueError("--settings must be a JSON object")
    return from_flat(FederationConfig, {k.replace("_", "-"): v for k, v in options.items()})


def _merges(text: str) -> list[tuple[str, int]]:
    out = []
    for spec in text.split(","):
        kind, _, rank = spec.partition(":")
        if not rank.isdigit() or int(rank) < 1 or not (kind in ("own", "mean", "sum") or kind.startswith("x")):
            raise argparse.ArgumentTypeError(f"bad merge {spec!r}: KIND:RANK with KIND own, mean, sum or xF")
        if kind.startswith("x"):
            try:
                float(kind[1:])
            except ValueError:
                raise argparse.ArgumentTypeError(f"bad merge {spec!r}: xF needs a number F") from None
        out.append((kind, int(rank)))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--updates", type=Path, default=Path("runs/merge-probe/updates.pt"),
                   help="round-1 updates: read if present, else trained and saved here")
    p.add_argument("--settings", default="{}",
                   help="JSON of fedmem.config.FederationConfig / LoraSettings settings for training")
    p.add_argument("--merges", type=_merges, default=_merges("own:32,mean:16,mean:48,sum:48,x2:48"))
    args = p.parse_args(argv)
    try:
        config = _config(args.settings)
    except (ValueError, json.JSONDecodeError) as err:
        p.error(str(err))

    import torch

    from fedmem.aggregate import aggregate_exact, normalised
    from fedmem.answer import load_questions, score
    from fedmem.base_model import load_model, load_tokenizer, resolve_base
    from fedmem.corpus import load_corpus
    from fedmem.federation import client_update
    from fedmem.flower.simulation import client_dirs, demo_dir
    from fedmem.log import setup_logging
    from fedmem.lora import merge_factors

    setup_logging()
    base = str(resolve_base())
    tokenizer = load_tokenizer(base)
    corpora = [load_corpus(d) for d in client_dirs(demo_dir() / "corpora")]
    questions = load_questions(demo_dir() / "questions.jsonl")

    if args.updates.is_file():
        saved = torch.load(args.updates)
    else:
        saved = []
        for corpus in corpora:
            started = time.perf_counter()
            result = client_update(base, corpus, None, config, 1)
            print(f"trained {corpus.name} in {time.perf_counter() - started:.0f}s, "
                  f"loss {result.metrics['final_loss']:.3f}")
            saved.append((result.factors, result.metrics["examples"]))
        args.updates.parent.mkdir(parents=True, exist_ok=True)
        torch.save(saved, args.updates)
    updates, sizes = [f for f, _ in saved], [n for _, n in saved]

    def ask(factors) -> str:
        model = load_model(base)
        merge_factors(model, factors)
        s = score(model, tokenizer, questions)
        per: dict[str, list[bool]] = {}
        for q, ok in zip(questions, s.correct):
            per.setdefault(q.client, []).append(ok)
        return f"{sum(s.correct)}/{len(s.correct)} " + " ".join(f"{k} {sum(v)}/{len(v)}" for k, v in per.items())

    for kind, rank in args.merges:
        if kind == "own":
            for corpus, update in zip(corpora, updates):
                print(f"own {corpus.name}: {ask(aggregate_exact(None, [update], [1.0], rank).factors)}", flush=True)
            continue
        k = len(updates)
        weights = {"mean": normalised(sizes), "sum": [1.0] * k}.get(kind) or [float(kind[1:]) / k] * k
        agg = aggregate_exact(None, updates, weights, rank)
        print(f"{kind}:{rank} (truncation {agg.max_truncation_error:.2f}): {ask(agg.factors)}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

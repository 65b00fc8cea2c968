#!/usr/bin/env python3
"""How much of what each owner learned survives the merge? One round, merged several ways.

Trains every demo owner's round-1 update once (the same ``client_update`` the Flower
apps call), then merges those same updates in several ways and asks the demo's 24
held-out questions of each result, counting per owner. Used for docs/results.md
("Why the federation lags").

    python scripts/merge_probe.py [--updates FILE] [--settings JSON] [--merges own,mean:16,mean:48,sum:48]

A merge is KIND:RANK: ``own`` (each owner's update alone), ``mean`` (FedAvg weights
n_k/n), ``sum`` (weight 1 each), ``xF`` (weight F/K each), at the given memory rank.
"""

import argparse
import json
import time
from pathlib import Path

import torch

from fedmem.aggregate import aggregate_exact, normalised
from fedmem.answer import load_questions, score
from fedmem.base_model import load_model, load_tokenizer, quiet_libraries, resolve_base
from fedmem.corpus import load_corpus
from fedmem.federation import FederationConfig, client_update
from fedmem.lora import LoraSettings, merge_factors
from fedmem.simulation import client_dirs, demo_dir

FED_KEYS = {"rounds", "method", "weighting", "server_lr", "memory_rank", "client_start"}

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--updates", type=Path, default=Path("runs/merge-probe/updates.pt"),
               help="round-1 updates: read if present, else trained and saved here")
p.add_argument("--settings", default="{}", help="JSON of FederationConfig / LoraSettings fields for training")
p.add_argument("--merges", default="own:32,mean:16,mean:48,sum:48,x2:48")
args = p.parse_args()
quiet_libraries()
base = str(resolve_base())
tokenizer = load_tokenizer(base)
corpora = [load_corpus(d) for d in client_dirs(demo_dir() / "corpora")]
questions = load_questions(demo_dir() / "questions.jsonl")

if args.updates.is_file():
    saved = torch.load(args.updates)
else:
    opts = json.loads(args.settings)
    config = FederationConfig(**{k: v for k, v in opts.items() if k in FED_KEYS},
                              lora=LoraSettings(**{k: v for k, v in opts.items() if k not in FED_KEYS}))
    saved = []
    for corpus in corpora:
        started = time.perf_counter()
        result = client_update(base, corpus, None, config, 1)
        print(f"trained {corpus.name} in {time.perf_counter() - started:.0f}s, loss {result.metrics['final_loss']:.3f}")
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


for spec in args.merges.split(","):
    kind, rank = spec.split(":")
    if kind == "own":
        for corpus, update in zip(corpora, updates):
            print(f"own {corpus.name}: {ask(aggregate_exact(None, [update], [1.0], int(rank)).factors)}", flush=True)
        continue
    k = len(updates)
    weights = {"mean": normalised(sizes), "sum": [1.0] * k}.get(kind) or [float(kind[1:]) / k] * k
    agg = aggregate_exact(None, updates, weights, int(rank))
    print(f"{spec} (truncation {agg.max_truncation_error:.2f}): {ask(agg.factors)}", flush=True)

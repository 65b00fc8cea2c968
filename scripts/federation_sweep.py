#!/usr/bin/env python3
"""Compare federation settings on the demo without the Flower/Ray machinery.

Runs the same plain functions the Flower apps call (client_update, server_aggregate)
in one process, clients one after another, and prints recall after every round.
Used to choose fedmem's defaults; see docs/results.md.

    python scripts/federation_sweep.py '{"rounds": 3, "epochs": 2, "weighting": "mean"}'

Keys: rounds, method, schedule, weighting, server_lr, memory_rank, and any LoraSettings field.
"""

import json
import sys
import time

import torch

from fedmem.answer import load_questions, score
from fedmem.base_model import load_model, load_tokenizer, quiet_libraries, resolve_base
from fedmem.corpus import load_corpus
from fedmem.federation import FederationConfig, federate_in_process
from fedmem.lora import LoraSettings, merge_factors
from fedmem.simulation import client_dirs, demo_dir

quiet_libraries()
torch.set_num_threads(torch.get_num_threads())
options = json.loads(sys.argv[1]) if len(sys.argv) > 1 else {}
fed_keys = {"rounds", "method", "schedule", "weighting", "server_lr", "memory_rank", "client_start"}
config = FederationConfig(**{k: v for k, v in options.items() if k in fed_keys},
                          lora=LoraSettings(**{k: v for k, v in options.items() if k not in fed_keys}))
base = str(resolve_base())
tokenizer = load_tokenizer(base)
corpora = [load_corpus(d) for d in client_dirs(demo_dir() / "corpora")]
questions = load_questions(demo_dir() / "questions.jsonl")
print(json.dumps(config.to_dict()))
started = time.perf_counter()


def report(rnd, agg, results):
    model = load_model(base)
    merge_factors(model, agg.factors)
    s = score(model, tokenizer, questions)
    print(f"round {rnd} t={time.perf_counter() - started:.0f}s "
          f"losses {[round(r.metrics['final_loss'], 3) for r in results]} "
          f"truncation {agg.max_truncation_error:.3f} recall {s.accuracy:.0%} "
          + " ".join(f"{k} {v:.0%}" for k, v in s.by_source.items())
          + " " + "".join("+" if ok else "-" for ok in s.correct), flush=True)


federate_in_process(base, corpora, config, after_round=report)

#!/usr/bin/env python3
"""How much of what each owner learned survives the merge? One round, merged several ways.

Trains every owner's round-1 update once (the same ``client_update`` the Flower apps
call; the demo's owners unless ``--data``), then merges those same updates in several
ways and asks the questions of each result, counting per owner, with the answer NLL
(``fedmem.answer.answer_nll``: continuous, so it separates merges that greedy recall
cannot). Used for docs/results.md ("Why the federation lags", "A server step for
parallel rounds").

    python scripts/merge_probe.py [--updates FILE] [--settings JSON] [--merges own,mean:16,mean:48,sum:48]
    python scripts/merge_probe.py --data ../shared/devset/corpora --questions ../shared/devset/questions.jsonl \
        --settings '{"schedule": "parallel", "epochs": 1}' --merges own:16,x1:16,x1:64,fedexp:16,x1.5:16,sum:16
    # a later round: the owners train from a run's round-2 memory, in round 3
    python scripts/merge_probe.py ... --memory runs/X/rounds/round-002 --round 3 --updates runs/X-round3.pt

A merge is KIND:RANK: ``own`` (each owner's update alone), ``mean`` (FedAvg weights
n_k/n, from the example counts), ``sum`` (weight 1 each), ``xF`` (weight F/K each: x1
is the equal-weight mean a parallel round adds), ``fedexp`` (the equal-weight mean times
FedExP's step, ``extrapolation`` below), at the given memory rank.
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
        if not rank.isdigit() or int(rank) < 1 or not (kind in ("own", "mean", "sum", "fedexp")
                                                        or kind.startswith("x")):
            raise argparse.ArgumentTypeError(f"bad merge {spec!r}: KIND:RANK with KIND own, mean, sum, fedexp or xF")
        if kind.startswith("x"):
            try:
                float(kind[1:])
            except ValueError:
                raise argparse.ArgumentTypeError(f"bad merge {spec!r}: xF needs a number F") from None
        out.append((kind, int(rank)))
    return out


def extrapolation(updates: list) -> float:
    """FedExP's server step for the equal-weight mean of K updates Δₖ (Jhunjhunwala, Wang & Joshi,
    "FedExP: Speeding up federated averaging via extrapolation", ICLR 2023):

        η = max(1, mean ‖Δₖ‖² / (2‖mean Δₖ‖²)) = max(1, K Σ‖Δₖ‖² / (2‖Σ Δₖ‖²)),   ‖·‖ over all modules.

    A mean gives what only one owner learnt 1/K of its strength, while what all learnt in common
    (the answer format) keeps its full strength. η tells the two apart from the updates
    themselves: identical updates give 1 (the mean), K orthogonal ones of equal norm give K/2,
    so the memory moves further only as far as the owners' updates do not overlap; at most K (the
    sum), where updates that cancel would make the ratio unbounded. Exact in factored form: the
    norm of a sum of products is the norm of the product of the stacked factors.

    Measured as fedmem's server step and not kept (docs/results.md, "A server step for parallel
    rounds"), so it lives here, where the probe compares it with fixed weights.
    """
    import torch

    from fedmem.aggregate import check_same_modules, product_norm, update_norm

    own = sum(update_norm(u) ** 2 for u in updates)  # Σ ‖Δₖ‖²
    total = sum(product_norm(torch.cat([u[n][0] for u in updates], dim=1),  # ‖Σ Δₖ‖²
                             torch.cat([u[n][1] for u in updates], dim=0)) ** 2
                for n in check_same_modules(updates))
    if total <= 0.0:
        return 1.0
    # Updates that cancel make the ratio unbounded; K, every update at full strength (the sum), is
    # the furthest any owner's own training asked the memory to move.
    return min(float(len(updates)), max(1.0, len(updates) * own / (2.0 * total)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--updates", type=Path, default=Path("runs/merge-probe/updates.pt"),
                   help="round-1 updates: read if present, else trained and saved here")
    p.add_argument("--settings", default="{}",
                   help="JSON of fedmem.config.FederationConfig / LoraSettings settings for training")
    p.add_argument("--merges", type=_merges, default=_merges("own:32,mean:16,mean:48,sum:48,x2:48"))
    p.add_argument("--data", type=Path, default=None,
                   help="a directory of owners' corpora, one subdirectory each (default: the demo's)")
    p.add_argument("--questions", type=Path, default=None,
                   help="questions JSONL with a client field (default: the demo's; needed with --data)")
    p.add_argument("--memory", type=Path, default=None,
                   help="a memory to train from (a PEFT directory, e.g. a run's rounds/round-00N): the "
                        "updates are then that round's, and every merge is added to this memory")
    p.add_argument("--round", type=int, default=1,
                   help="the round the owners train in, for its slice of the learning-rate schedule "
                        "(default %(default)s; with --memory, give the round after the memory's)")
    args = p.parse_args(argv)
    try:
        config = _config(args.settings)
    except (ValueError, json.JSONDecodeError) as err:
        p.error(str(err))
    if args.data is not None and args.questions is None:
        p.error("--data needs --questions")
    if not 1 <= args.round <= config.rounds:
        p.error(f"--round must be in 1..{config.rounds} (the rounds setting), got {args.round}")

    import torch

    from fedmem.aggregate import aggregate_exact, change, normalised
    from fedmem.answer import answer_nll, load_questions, score
    from fedmem.base_model import load_model, load_tokenizer, resolve_base
    from fedmem.corpus import load_corpus
    from fedmem.federation import client_update
    from fedmem.flower.simulation import client_dirs, demo_dir
    from fedmem.log import setup_logging
    from fedmem.lora import merge_factors, read_peft_adapter

    setup_logging()
    base = str(resolve_base())
    tokenizer = load_tokenizer(base)
    corpora = [load_corpus(d) for d in client_dirs(args.data or demo_dir() / "corpora")]
    questions = load_questions(args.questions or demo_dir() / "questions.jsonl")

    memory = read_peft_adapter(args.memory) if args.memory else None
    if args.updates.is_file():
        saved = torch.load(args.updates)
    else:
        saved = []
        for corpus in corpora:
            started = time.perf_counter()
            result = client_update(base, corpus, memory, config, args.round)
            print(f"trained {corpus.name} in {time.perf_counter() - started:.0f}s, "
                  f"loss {result.metrics['final_loss']:.3f}")
            saved.append((result.factors, result.metrics["examples"]))
        args.updates.parent.mkdir(parents=True, exist_ok=True)
        torch.save(saved, args.updates)
    if len(saved) != len(corpora):  # updates of other owners (say the demo's, with --data): no silent mix-up
        p.error(f"{args.updates} holds {len(saved)} owners' updates, the corpora {len(corpora)}: "
                "give each set of corpora its own --updates file")
    updates, sizes = [f for f, _ in saved], [n for _, n in saved]
    updates = [change(u, memory) for u in updates]  # what each owner's training changed (itself in round 1)

    def ask(factors) -> str:
        model = load_model(base)
        merge_factors(model, factors)
        s = score(model, tokenizer, questions)
        per: dict[str, list[bool]] = {}
        for q, ok in zip(questions, s.strict):
            per.setdefault(q.client, []).append(ok)
        owners = " ".join(f"{k} {sum(v)}/{len(v)}" for k, v in per.items())
        return (f"strict {sum(s.strict)}/{len(s.strict)} (loose {sum(s.correct)}), answer NLL "
                f"{answer_nll(model, tokenizer, questions):.3f}: {owners}")

    for kind, rank in args.merges:
        if kind == "own":
            for corpus, update in zip(corpora, updates):
                print(f"own {corpus.name}: {ask(aggregate_exact(memory, [update], [1.0], rank).factors)}", flush=True)
            continue
        k = len(updates)
        if kind == "fedexp":
            step = extrapolation(updates)
            weights = [step / k] * k
            kind = f"fedexp (step {step:.3f})"
        else:
            weights = {"mean": normalised(sizes), "sum": [1.0] * k}.get(kind) or [float(kind[1:]) / k] * k
        agg = aggregate_exact(memory, updates, weights, rank)
        print(f"{kind}:{rank} (truncation {agg.max_truncation_error:.2f}): {ask(agg.factors)}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""One federated round as two plain functions, with no Flower in sight.

``client_update`` is what a data owner runs on its own machine; ``server_aggregate``
is what the coordinator runs on the replies. The Flower apps in ``fedmem.flower`` only
move tensors between them.

Two schedules:
- ``cyclic`` (default): each round visits the owners one after another; each trains on
  the memory as the previous owner left it, and the server adds that owner's update in
  full before sending the memory on (cyclic weight transfer). Every update is fitted to a
  memory that already holds the others' facts, so owners do not undo each other.
- ``parallel``: every owner trains on the same memory and the server adds the mean
  of their updates (FedAvg's round, each accepted owner weighted alike). Faster in
  wall clock with many owners, but the owners' updates interfere: on the demo 50%
  against 92% from the same fresh clone (docs/results.md).
- ``routed``: every owner trains at once, each on its own LoRA from the round before, and
  the server keeps each owner's LoRA apart (``fedmem.routing.OwnerLoras``); questions are
  routed to one of them when answered. Parallel rounds without the interference.

Two methods:
- ``exact`` (default): the memory is the cumulative ΔW in factored form, of the owners'
  LoRA rank. A client starts its LoRA as the memory, trains it, and returns the LoRA it
  ended with; the server forms what it changed (new B·A − memory B·A, in factored form,
  ``fedmem.aggregate.change``), adds Σ pₖΔWₖ exactly and re-factorises to the rank.
- ``fedit``: the memory is a LoRA; clients continue training it and the server
  averages A and B separately (the FedIT / FedAvg baseline, inexact by design).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch

from .aggregate import Aggregate, Factors, aggregate_exact, aggregate_fedit, change, update_norm
from .base_model import base_model_copy, fingerprint, load_tokenizer
from .config import FederationConfig
from .corpus import Corpus
from .examples import build_examples
from .log import log_context
from .lora import attach_lora, extract_factors, load_factors
from .privacy import noise_multiplier, private_sum
from .question_writer import generator_dir, written_examples
from .retention import base_replies, retention_examples
from .routing import OwnerLoras, own_memory
from .train import train_lora
from .validate import clip_scales

log = logging.getLogger(__name__)


@dataclass
class ClientResult:
    factors: Factors
    metrics: dict[str, float]
    owner: str = ""  # the corpus's name (in process; Flower's replies are named by the roster)


def training_span(config: FederationConfig, server_round: int, visit: int = 0, visits: int = 1) -> tuple[float, float]:
    """The slice of the whole run's learning-rate schedule one client's training covers.

    Parallel: round r of R trains on (r-1)/R .. r/R, every owner alike. Cyclic: the
    memory passes through the owners in turn, so the visits together follow the one
    schedule a centralised run would: visit v of V in round r gets its V-th of the round's
    slice.
    """
    if config.schedule != "cyclic":
        visit, visits = 0, 1
    if not (0 <= visit < visits):
        raise ValueError(f"visit must be in 0..{visits - 1}, got {visit}")
    done = (server_round - 1) * visits + visit
    total = config.rounds * visits
    return done / total, (done + 1) / total


def client_update(
    base_dir: str | os.PathLike,
    corpus: Corpus,
    memory: Factors | None,
    config: FederationConfig,
    server_round: int,
    device: str = "cpu",
    span: tuple[float, float] | None = None,
) -> ClientResult:
    """Train on the owner's corpus starting from the current memory; return only tensors and numbers.

    The owner's LoRA starts as the memory itself (same rank), so each round continues where
    the last one left off; what is sent is the LoRA trained, at that rank (the server knows the
    memory it sent, so sending the change, at twice the rank, would double the bytes). ``span``: the slice
    of the learning-rate schedule to follow (``training_span``; the server sends it); by
    default the round's slice of a parallel schedule.
    """
    base_dir = str(base_dir)
    tokenizer = load_tokenizer(base_dir)
    model = base_model_copy(base_dir, device)
    examples = build_examples(corpus, config.lora.recipe)
    if config.lora.generator:
        examples += written_examples(corpus, generator_dir(config.lora.generator, base_dir), device)
    # Before any memory or LoRA touches the model: its own replies are what to keep.
    keep = base_replies(model, tokenizer, base_dir) if config.lora.retention > 0 else []
    # A different seed per round gives the LoRA's unused components new directions.
    settings = replace(config.lora, seed=config.lora.seed + 1000 * server_round)
    model = attach_lora(model, settings)
    if memory:
        # exact: components that are zero in the memory keep their fresh A rows, so they can still learn.
        load_factors(model, memory, keep_fresh_where_zero=config.method == "exact")
    general = retention_examples(keep, len(examples), settings.retention, settings.seed)
    log.info("%d examples from the corpus, %d general ones as the base model answers them",
             len(examples), len(general))
    examples += general
    result = train_lora(model, tokenizer, examples, settings, device, span or training_span(config, server_round))
    return ClientResult(
        owner=corpus.name,
        factors=extract_factors(model),
        metrics={
            "examples": float(result.examples),
            "tokens": float(result.tokens),
            "train_seconds": result.seconds,
            "tokens_per_second": result.tokens_per_second,
            "first_loss": result.first_loss,
            "final_loss": result.final_loss,
        },
    )


def server_aggregate(memory: Factors | None, updates: list[Factors], config: FederationConfig,
                     clip: bool = False) -> Aggregate:
    """Fold the owners' updates (the LoRAs they trained from ``memory``) into the memory with the
    configured method, the memory keeping the owners' rank.

    The weights are the server's, from what it can check: every accepted update counts the
    same, 1/K of K (a cyclic step folds in one update: weight 1). What a client says about
    itself (its example count) decides nothing: a self-reported 10¹² would take all the
    weight of a FedAvg mean. ``clip`` (method exact, several updates): each update is also
    scaled down to the median ‖ΔW‖ of the updates folded in together (``clip_scales``).
    Under differential privacy (``config.privacy``) each update is clipped to dp-clip instead
    and Gaussian noise is added to their sum (``fedmem.privacy.private_sum``).
    """
    if not updates:
        raise ValueError("no client updates to aggregate")
    weights = [1.0 / len(updates)] * len(updates)
    if config.method == "fedit":
        return aggregate_fedit(updates, weights)
    updates = [change(u, memory) for u in updates]
    dp = config.privacy
    if dp.enabled:
        z = noise_multiplier(dp.dp_epsilon, dp.dp_delta, config.rounds)
        return private_sum(memory, updates, weights[0], config.lora.rank, dp.dp_clip, z)[0]
    if clip and len(updates) > 1:
        weights = [w * s for w, s in zip(weights, clip_scales([update_norm(u) for u in updates]))]
    return aggregate_exact(memory, updates, weights, config.lora.rank)


Update = tuple[Factors, object]  # (factors, what the caller wants back)


def run_round(
    config: FederationConfig,
    server_round: int,
    owners: list,
    memory: Factors | OwnerLoras | None,
    train: Callable[[list, Factors | OwnerLoras | None, tuple[float, float]], list[Update]],
    clip: bool = False,
    name_of: Callable[[object], str] | None = None,
) -> tuple[Aggregate | None, list]:
    """One round under the configured schedule, whatever carries the messages.

    ``train(owners, memory, span)`` has those owners train on ``memory`` (routed: each on its own
    LoRA in it, ``fedmem.routing.own_memory``) and returns one ``Update`` per accepted reply.
    Cyclic: one owner at a time, in the order given, each update folded in before the next owner
    trains. Parallel: every owner on the same memory, folded in together (``clip``: norm-clipped,
    ``server_aggregate``). Routed: every owner at once; each accepted LoRA replaces its owner's
    in the memory (an ``OwnerLoras``; ``name_of(extra)`` names an update's owner). Returns the
    round's aggregate (the last memory, each module's worst truncation error on the way,
    and the weight of every update in the order folded in; None if no update was
    accepted) and the second items of the updates, in that order.
    """
    steps: list[Aggregate] = []
    done: list = []
    if config.schedule == "cyclic":
        for visit, owner in enumerate(owners):
            for factors, extra in train([owner], memory, training_span(config, server_round, visit, len(owners))):
                steps.append(server_aggregate(memory, [factors], config))
                memory = steps[-1].factors
                done.append(extra)
    elif config.schedule == "routed":
        if name_of is None:
            raise ValueError("a routed round needs name_of, to know whose LoRA each update is")
        updates = train(owners, memory, training_span(config, server_round))
        if updates:
            loras = memory if isinstance(memory, OwnerLoras) else OwnerLoras.empty(config.lora.rank)
            mine = {name_of(extra): factors for factors, extra in updates}
            if len(mine) != len(updates):
                raise ValueError("two updates in one routed round name the same owner")
            steps.append(Aggregate(loras.with_updates(mine), {}, [1.0] * len(updates)))
            done = [u[1] for u in updates]
    else:
        updates = train(owners, memory, training_span(config, server_round))
        if updates:
            steps.append(server_aggregate(memory, [u[0] for u in updates], config, clip=clip))
            done = [u[1] for u in updates]
    if not steps:
        return None, done
    errors: dict[str, float] = {}
    for step in steps:
        for name, e in step.truncation_error.items():
            errors[name] = max(errors.get(name, 0.0), e)
    return Aggregate(steps[-1].factors, errors, [w for step in steps for w in step.weights]), done


def federate_in_process(
    base_dir: str | os.PathLike,
    corpora: list[Corpus],
    config: FederationConfig,
    after_round: Callable[[int, Aggregate, list[ClientResult]], None] | None = None,
    device: str = "cpu",
) -> Factors | OwnerLoras:
    """Every round of a federation in this process, clients one after another.

    The same functions the Flower apps call, without Flower: for benchmarks and
    sweeps that compare settings, where starting Ray per setting would cost more than
    the comparison. ``fedmem simulate`` is the real thing.
    """
    memory: Factors | OwnerLoras | None = None
    for rnd in range(1, config.rounds + 1):

        def train(owners: list[Corpus], memory, span: tuple[float, float]) -> list[Update]:
            updates = []
            for corpus in owners:
                with log_context(f"{corpus.name} round {rnd}/{config.rounds}"):
                    r = client_update(base_dir, corpus, own_memory(memory, corpus.name), config, rnd, device, span)
                updates.append((r.factors, r))
            return updates

        agg, results = run_round(config, rnd, corpora, memory, train, name_of=lambda r: r.owner)
        memory = agg.factors
        if after_round:
            after_round(rnd, agg, results)
    return memory


def base_fingerprint(base_dir: str | os.PathLike) -> str:
    return fingerprint(Path(base_dir))


def set_threads(threads: int = 0) -> None:
    """Use ``threads`` CPU threads, or every core this process may run on (Ray workers default to one)."""
    if threads < 1:
        try:
            threads = len(os.sched_getaffinity(0))
        except AttributeError:
            threads = os.cpu_count() or 1
    torch.set_num_threads(max(1, threads))

"""One federated round as two plain functions, with no Flower in sight.

``client_update`` is what a data owner runs on its own machine; ``server_aggregate``
is what the coordinator runs on the replies. The Flower apps in ``fedmem.server``
and ``fedmem.clients`` only move tensors between them.

Two schedules:
- ``cyclic`` (default): each round visits the owners one after another; each trains on
  the memory as the previous owner left it, and the server adds that owner's update in
  full before sending the memory on (cyclic weight transfer). Every update is fitted to a
  memory that already holds the others' facts, so owners do not undo each other.
- ``parallel``: every owner trains on the same memory and the server adds the weighted
  sum of their updates (FedAvg's round). Faster in wall clock with many owners, but the
  owners' updates interfere: on the demo 50% against 92% from the same fresh clone
  (docs/results.md).

Two methods:
- ``exact`` (default): the memory is the cumulative ΔW in factored form. A client
  merges it into its base weights, trains a fresh LoRA on top, and returns that
  LoRA's B·A; the server adds Σ pₖBₖAₖ exactly and re-factorises (fedmem.aggregate).
- ``fedit``: the memory is a LoRA; clients continue training it and the server
  averages A and B separately (the FedIT / FedAvg baseline, inexact by design).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .aggregate import Aggregate, Factors, aggregate_exact, aggregate_fedit, normalised
from .base_model import fingerprint, load_model, load_tokenizer
from .context_distillation import distilled_examples
from .corpus import Corpus
from .examples import build_examples
from .question_writer import generator_dir, written_examples
from .retention import base_replies, retention_examples
from .lora import LoraSettings, attach_lora, extract_factors, load_factors, merge_factors
from .train import train_lora

METHODS = ("exact", "fedit")
WEIGHTINGS = ("sum", "mean")
CLIENT_STARTS = ("fresh", "memory")
SCHEDULES = ("cyclic", "parallel")


@dataclass
class FederationConfig:
    rounds: int = 3
    method: str = "exact"
    # "mean": FedAvg's pₖ = nₖ/Σn. "sum": every owner's update in full. Measured on the
    # demo, a sum of fully trained updates overshoots what the owners learn in common
    # (answer format) and breaks the model; see docs/results.md.
    weighting: str = "mean"
    # Server learning rate (FedOpt, Reddi et al. 2021): memory += server_lr * Σ pₖ ΔWₖ.
    server_lr: float = 1.0
    memory_rank: int = 16
    # exact method, where a client's LoRA starts each round:
    # "memory": a rank-`memory_rank` LoRA initialised to the memory itself, so training
    #   continues where the last round left off; the update sent is new B·A minus memory.
    # "fresh": memory merged into the base weights, a new rank-`lora.rank` LoRA on top;
    #   every round then repeats a LoRA's slow start (B = 0): 38% vs 50% on the demo.
    client_start: str = "memory"
    # SCHEDULES above. Cyclic rounds take the sum of the owners' training times, parallel
    # ones the longest; on one machine (simulation) the two cost the same.
    schedule: str = "cyclic"
    lora: LoraSettings = field(default_factory=LoraSettings)

    def __post_init__(self):
        if isinstance(self.lora, dict):
            self.lora = LoraSettings(**self.lora)
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.client_start not in CLIENT_STARTS:
            raise ValueError(f"client_start must be one of {CLIENT_STARTS}, got {self.client_start!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {self.weighting!r}")
        if not isinstance(self.rounds, int) or self.rounds < 1:
            raise ValueError(f"rounds must be a positive integer, got {self.rounds!r}")
        if not self.server_lr > 0:
            raise ValueError(f"server_lr must be > 0, got {self.server_lr!r}")
        if not isinstance(self.memory_rank, int) or self.memory_rank < 1:
            raise ValueError(f"memory_rank must be a positive integer, got {self.memory_rank!r}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ClientResult:
    factors: Factors
    metrics: dict[str, float]


def training_span(config: FederationConfig, server_round: int, visit: int = 0, visits: int = 1) -> tuple[float, float]:
    """The slice of the whole run's learning-rate schedule one client's training covers.

    Parallel: round r of R trains on (r-1)/R .. r/R, every owner alike. Cyclic: the
    memory passes through the owners in turn, so the visits together follow the one
    schedule a centralised run would: visit v of V in round r gets its V-th of the round's
    slice.
    """
    if config.schedule == "parallel":
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
    progress: Callable[[str], None] | None = None,
    span: tuple[float, float] | None = None,
) -> ClientResult:
    """Train on the owner's corpus starting from the current memory; return only tensors and numbers.

    ``span``: the slice of the learning-rate schedule to follow (``training_span``; the
    server sends it); by default the round's slice of a parallel schedule.
    """
    base_dir = str(base_dir)
    tokenizer = load_tokenizer(base_dir)
    model = load_model(base_dir, device)
    if config.lora.recipe == "distilled":  # the plain base model, reading each document, is the teacher
        examples = distilled_examples(model, tokenizer, base_dir, corpus, progress)
    else:
        examples = build_examples(corpus, config.lora.recipe)
    if config.lora.generator:
        examples += written_examples(corpus, generator_dir(config.lora.generator, base_dir), device, progress)
    # Before any memory or LoRA touches the model: its own replies are what to keep.
    keep = base_replies(model, tokenizer, base_dir) if config.lora.retention > 0 else []
    # A different seed per round gives the fresh LoRA new directions to add.
    overrides = {"seed": config.lora.seed + 1000 * server_round}
    continuing = config.method == "exact" and config.client_start == "memory"
    if continuing:  # the LoRA must hold the memory: its rank, with the same alpha/rank ratio
        overrides.update(rank=config.memory_rank,
                         alpha=max(1, round(config.lora.alpha * config.memory_rank / config.lora.rank)))
    settings = LoraSettings(**{**config.lora.to_dict(), **overrides})
    if continuing:
        model = attach_lora(model, settings)
        if memory:
            load_factors(model, memory, keep_fresh_where_zero=True)
    elif config.method == "exact":
        if memory:
            merge_factors(model, memory)
        model = attach_lora(model, settings)
    else:
        model = attach_lora(model, settings)
        if memory:
            load_factors(model, memory)
    examples += retention_examples(keep, len(examples), settings.retention, settings.seed)
    result = train_lora(model, tokenizer, examples, settings, device, progress,
                        span or training_span(config, server_round))
    factors = extract_factors(model)
    if continuing and memory:
        # Send only what this round changed, exactly: new B·A − memory B·A, in factored form.
        factors = {n: (torch.cat([B, -memory[n][0]], dim=1), torch.cat([A, memory[n][1]], dim=0))
                   for n, (B, A) in factors.items()}
    return ClientResult(
        factors=factors,
        metrics={
            "examples": float(result.examples),
            "tokens": float(result.tokens),
            "train_seconds": result.seconds,
            "tokens_per_second": result.tokens_per_second,
            "first_loss": result.first_loss,
            "final_loss": result.final_loss,
        },
    )


def server_aggregate(memory: Factors | None, updates: list[Factors], sizes: list[float], config: FederationConfig) -> Aggregate:
    """Fold the clients' updates into the memory with the configured method."""
    if config.method == "fedit":
        return aggregate_fedit(updates, sizes)
    weights = [1.0] * len(updates) if config.weighting == "sum" else normalised(sizes)
    weights = [config.server_lr * w for w in weights]
    return aggregate_exact(memory, updates, weights, config.memory_rank)


Update = tuple[Factors, float, object]  # (factors, size for the weights, what the caller wants back)


def run_round(
    config: FederationConfig,
    server_round: int,
    owners: list,
    memory: Factors | None,
    train: Callable[[list, Factors | None, tuple[float, float]], list[Update]],
) -> tuple[Aggregate | None, list]:
    """One round under the configured schedule, whatever carries the messages.

    ``train(owners, memory, span)`` has those owners train on ``memory`` and returns one
    ``Update`` per usable reply. Cyclic: one owner at a time, in the order given, each
    update folded in before the next owner trains. Parallel: every owner on the same
    memory, folded in together. Returns the round's aggregate (the last memory and each
    module's worst truncation error on the way; None if no update was usable) and the
    third items of the updates, in the order they were folded in.
    """
    steps: list[Aggregate] = []
    done: list = []
    if config.schedule == "cyclic":
        for visit, owner in enumerate(owners):
            for factors, size, extra in train([owner], memory, training_span(config, server_round, visit, len(owners))):
                steps.append(server_aggregate(memory, [factors], [size], config))
                memory = steps[-1].factors
                done.append(extra)
    else:
        updates = train(owners, memory, training_span(config, server_round))
        if updates:
            steps.append(server_aggregate(memory, [u[0] for u in updates], [u[1] for u in updates], config))
            done = [u[2] for u in updates]
    if not steps:
        return None, done
    errors: dict[str, float] = {}
    for step in steps:
        for name, e in step.truncation_error.items():
            errors[name] = max(errors.get(name, 0.0), e)
    return Aggregate(steps[-1].factors, errors), done


def federate_in_process(
    base_dir: str | os.PathLike,
    corpora: list[Corpus],
    config: FederationConfig,
    after_round: Callable[[int, Aggregate, list[ClientResult]], None] | None = None,
    device: str = "cpu",
    progress: Callable[[str], None] | None = None,
) -> Factors:
    """Every round of a federation in this process, clients one after another.

    The same functions the Flower apps call, without Flower: for benchmarks and
    sweeps that compare settings, where starting Ray per setting would cost more than
    the comparison. ``fedmem simulate`` is the real thing.
    """
    memory: Factors | None = None
    for rnd in range(1, config.rounds + 1):

        def train(owners: list[Corpus], memory: Factors | None, span: tuple[float, float]) -> list[Update]:
            updates = []
            for corpus in owners:
                tag = f"[{corpus.name}] round {rnd}/{config.rounds} "
                r = client_update(base_dir, corpus, memory, config, rnd, device,
                                  (lambda msg, tag=tag: progress(tag + msg)) if progress else None, span)
                updates.append((r.factors, r.metrics["examples"], r))
            return updates

        agg, results = run_round(config, rnd, corpora, memory, train)
        memory = agg.factors
        if after_round:
            after_round(rnd, agg, results)
    return memory


def base_fingerprint(base_dir: str | os.PathLike) -> str:
    return fingerprint(Path(base_dir))


def set_threads() -> None:
    """Use every core this process may run on (Ray workers default to one thread)."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:
        n = os.cpu_count() or 1
    torch.set_num_threads(max(1, n))

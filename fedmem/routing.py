"""Routed memories: every owner's LoRA kept apart, each question answered by the LoRA it is about.

Schedule ``routed`` (docs/aggregation.md, "Routed owner memories"): each round every owner goes on
training its own LoRA, from where it left it, on its own documents, in parallel with the others,
and the coordinator keeps each owner's LoRA as it came back instead of merging them. Merged, the
owners' updates interfere (their mean answers 2% of the devset); kept apart and routed, they match
cyclic rounds at the same compute (scripts/routing_probe.py).

A question goes to the LoRA that finds **the question itself** likeliest against the base model:
the sum, over the question's tokens read as plain text, of log p(token | LoRA) − log p(token | base),
less that LoRA's mean gain on general prompts (the retention pool's first
``CALIBRATION_PROMPTS``, text about no owner). An owner's LoRA has read its documents, so the names
a question about them uses surprise it far less than they surprise the others. The calibration
matters because LoRAs differ in how they treat text about nothing of theirs: on the devset's
default memory the bakery's LoRA made general prompts 17 nats less likely on average, the others
0.7 to 2 more, so a bakery question that every LoRA found unlikely went to another owner (45 of 48
questions routed right without it, 47 with it). The chosen LoRA's reply then passes the memory gate
(``fedmem.memory_gate``) as any memory's does. Routing costs one forward pass per owner over the
question, before generation, and the calibration the same over the general prompts, once per load.

On disk a routed memory is one PEFT LoRA adapter whose rank-K·r components are the K owners' rank-r
LoRAs side by side (owner i holds components i·r .. (i+1)·r), and ``fedmem.json`` names the owners in
that order (``routing``). So signing, checkpoints, resuming and PEFT's own I/O are those of any
memory. Loaded by plain PEFT it is the *sum* of the owners' LoRAs, which answers far worse than
routing: ``fedmem ask`` / ``eval`` / ``serve`` split it and route; a merged or GGUF export, which
can only be that sum, is refused.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from .aggregate import Factors

ROUTING = "routing"  # the manifest's field: {"owners": [...], "rank": r}


class RoutingError(ValueError):
    """A routed memory whose manifest and tensors do not agree, or an owner's LoRA that does not fit."""


@dataclass(frozen=True)
class OwnerLoras:
    """The owners' LoRAs, kept apart: ``factors`` holds them side by side in the order of ``owners``."""

    owners: tuple[str, ...]
    rank: int
    factors: Factors

    @classmethod
    def empty(cls, rank: int) -> OwnerLoras:
        return cls((), rank, {})

    def of(self, owner: str) -> Factors | None:
        """``owner``'s own LoRA (rank r), or None for an owner the memory does not hold yet."""
        if owner not in self.owners:
            return None
        i = self.owners.index(owner)
        cut = slice(i * self.rank, (i + 1) * self.rank)
        return {name: (B[:, cut].clone(), A[cut].clone()) for name, (B, A) in self.factors.items()}

    def with_updates(self, updates: dict[str, Factors]) -> OwnerLoras:
        """These owners' LoRAs replaced by (or, for new owners, joined by) the ones given; the other
        owners keep theirs. The owners stay in order of name, whatever order the updates came in."""
        modules = set(self.factors) or (set(next(iter(updates.values()))) if updates else set())
        for owner, lora in updates.items():
            _check_lora(owner, lora, self.rank, self.factors)
            if set(lora) != modules:
                raise RoutingError(f"{owner}'s LoRA covers other modules than the memory's")
        owners = tuple(sorted(set(self.owners) | set(updates)))
        loras = [updates[o] if o in updates else self.of(o) for o in owners]
        if not loras:
            return self
        factors = {name: (torch.cat([lora[name][0] for lora in loras], dim=1),
                          torch.cat([lora[name][1] for lora in loras], dim=0)) for name in sorted(modules)}
        return OwnerLoras(owners, self.rank, factors)

    def manifest(self) -> dict:
        return {"owners": list(self.owners), "rank": self.rank}

    @classmethod
    def from_manifest(cls, factors: Factors, routing: object, where: str = "the memory") -> OwnerLoras:
        """The owners' LoRAs of a saved routed memory; ``routing`` is its manifest's ``routing`` field,
        checked against the tensors (a manifest naming more owners than the tensors hold is refused)."""
        if not isinstance(routing, dict):
            raise RoutingError(f"{where}: '{ROUTING}' is not an object")
        owners, rank = routing.get("owners"), routing.get("rank")
        if not (isinstance(owners, list) and owners and all(isinstance(o, str) and o for o in owners)):
            raise RoutingError(f"{where}: '{ROUTING}.owners' must be a non-empty list of names")
        if len(set(owners)) != len(owners):
            raise RoutingError(f"{where}: '{ROUTING}.owners' names an owner twice")
        if not (isinstance(rank, int) and not isinstance(rank, bool) and rank > 0):
            raise RoutingError(f"{where}: '{ROUTING}.rank' must be a positive integer")
        for name, (B, A) in factors.items():
            if A.shape[0] != rank * len(owners) or B.shape[1] != A.shape[0]:
                raise RoutingError(f"{where}: {name} has rank {A.shape[0]}, not {len(owners)} owners × rank {rank}")
        return cls(tuple(owners), rank, factors)


def _check_lora(owner: str, lora: Factors, rank: int, like: Factors) -> None:
    if not lora:
        raise RoutingError(f"{owner}'s LoRA is empty")
    for name, (B, A) in lora.items():
        if A.shape[0] != rank or B.shape[1] != rank:
            raise RoutingError(f"{owner}'s LoRA has rank {A.shape[0]} at {name}, not the memory's {rank}")
        if name in like and (B.shape[0], A.shape[1]) != (like[name][0].shape[0], like[name][1].shape[1]):
            raise RoutingError(f"{owner}'s LoRA has another shape at {name} than the memory's")


def own_memory(memory, owner: str) -> Factors | None:
    """What ``owner`` trains on: under routing its own LoRA, else the one memory every owner shares."""
    return memory.of(owner) if isinstance(memory, OwnerLoras) else memory


def stacked(memory) -> Factors | None:
    """The factors a memory is saved as (for a routed one, the owners' LoRAs side by side)."""
    return memory.factors if isinstance(memory, OwnerLoras) else memory


def refuse_routed(manifest: dict, where: str, what: str) -> None:
    """For the tools that can only use a memory as one adapter (merged and GGUF exports)."""
    if ROUTING in manifest:
        owners = manifest[ROUTING].get("owners", []) if isinstance(manifest[ROUTING], dict) else []
        raise RoutingError(f"{where} is a routed memory ({len(owners)} owners' LoRAs kept apart); {what} would "
                           "use their sum, which answers far worse than routing. Use fedmem ask / eval / serve, "
                           "which route each question, or export one owner's LoRA (fedmem export --owner NAME) "
                           "or each as its own PEFT adapter (fedmem export --adapters OUT)")


# --- routing questions on a loaded model ---


def install_owner_adapters(model, lora: OwnerLoras):
    """A PeftModel over ``model`` (a plain base model) with one adapter per owner, named ``owner0`` ..,
    each set to that owner's LoRA at scaling 1 (so ΔW = B·A as saved); returns it, ``owner0`` active."""
    from peft import LoraConfig, get_peft_model

    from .lora import load_factors

    modules = sorted(lora.factors)
    config = LoraConfig(r=lora.rank, lora_alpha=lora.rank, target_modules=modules, lora_dropout=0.0, bias="none",
                        task_type="CAUSAL_LM", inference_mode=True)
    peft_model = None
    for i, owner in enumerate(lora.owners):
        name = adapter_name(i)
        if peft_model is None:
            peft_model = get_peft_model(model, config, adapter_name=name)
        else:
            peft_model.add_adapter(name, config)
        load_factors(peft_model, lora.of(owner), adapter=name)
    peft_model.set_adapter(adapter_name(0))
    peft_model.eval()
    return peft_model


# General prompts that calibrate each owner's gains; 16 to 120 of them chose the same owners for
# the devset's 48 questions, so a few dozen keep a load's cost small.
CALIBRATION_PROMPTS = 32


def owner_router(model, tokenizer, lora: OwnerLoras) -> Router:
    """A plain base model given the owners' adapters (``install_owner_adapters``), and its router,
    calibrated on general prompts (``calibration``)."""
    peft_model = install_owner_adapters(model, lora)
    adapters = [adapter_name(i) for i in range(len(lora.owners))]
    return Router(peft_model, tokenizer, adapters, list(lora.owners), calibration(peft_model, tokenizer, adapters))


def calibration(model, tokenizer, adapters: Sequence[str]) -> list[float]:
    """Each adapter's mean gain (``question_gains``) on general prompts: how much likelier it makes
    text that is about no owner, which routing subtracts from its gain on a question."""
    from .retention import PROMPTS

    gains = question_gains(model, tokenizer, PROMPTS[:CALIBRATION_PROMPTS], adapters)
    return [sum(g) / len(g) for g in gains]


def adapter_name(i: int) -> str:
    # Owners' names may hold characters a module name may not (dots); the order is the manifest's.
    return f"owner{i}"


@torch.no_grad()
def question_gains(model, tokenizer, questions: Sequence[str], adapters: Sequence[str]) -> list[list[float]]:
    """gains[i][q]: the summed log-likelihood gain of question q's text under adapter i against the base
    model (the same model with its adapters disabled). Each question is read as plain text after the
    end-of-text token, which conditions its first word."""
    from .memory_gate import replies_log_probs

    start = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.bos_token_id
    texts = [([start], tokenizer(q, add_special_tokens=False)["input_ids"] or [start]) for q in questions]
    with model.disable_adapter():
        base = replies_log_probs(model, texts)
    gains = []
    for name in adapters:
        model.set_adapter(name)
        gains.append([float((m - b).sum()) for m, b in zip(replies_log_probs(model, texts), base)])
    return gains


def choose(gains: list[list[float]], offsets: Sequence[float] = ()) -> list[int]:
    """Per question, the adapter with the largest gain less its offset (the first of equals)."""
    if not gains:
        return []
    offsets = list(offsets) or [0.0] * len(gains)
    return [max(range(len(gains)), key=lambda i: (gains[i][q] - offsets[i], -i)) for q in range(len(gains[0]))]


@dataclass
class Router:
    """Which of a loaded memory's adapters answers each question. A plain memory has one adapter,
    which answers everything; a routed one has one per owner."""

    model: object
    tokenizer: object
    adapters: list[str]  # PEFT adapter names
    owners: list[str]  # who each adapter's LoRA is from ([] for a plain memory)
    offsets: list[float] = field(default_factory=list)  # each adapter's mean gain on general prompts

    def routes(self, questions: Sequence[str]) -> list[int]:
        if len(self.adapters) == 1:
            return [0] * len(questions)
        return choose(question_gains(self.model, self.tokenizer, questions, self.adapters), self.offsets)

    def each(self, routes: Sequence[int], items: Sequence, work: Callable[[list], list]) -> list:
        """``work(items)`` with each item's adapter active: one call per adapter, on its items, in
        their order; the results back in the order of ``items``."""
        out: list = [None] * len(items)
        for i, name in enumerate(self.adapters):
            picked = [j for j, r in enumerate(routes) if r == i]
            if not picked:
                continue
            self.model.set_adapter(name)
            results = work([items[j] for j in picked])
            if len(results) != len(picked):
                raise RuntimeError(f"{len(results)} results for {len(picked)} items")
            for j, result in zip(picked, results):
                out[j] = result
        self.model.set_adapter(self.adapters[0])
        return out

    def describe(self, route: int) -> str:
        return self.owners[route] if self.owners else "memory"

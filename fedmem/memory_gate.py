"""Answer from the memory only where the memory is what makes the reply.

A memory adapter trained on private facts also moves the model on questions it was never
meant to touch. On the devset, the default memory answers 8 of 12 general questions wrong
that the base model answers right ("The capital of Japan is located in the city of
Shofkyo"), and more replay in training buys those answers back only by losing facts
(docs/quality.md). The damage has a signature: on a general question the memory's reply is
one the base model would give almost as readily, since the memory adds nothing there but
noise spread thin over many tokens; on a private fact the memory makes the answer's own
tokens (a name, a number) far likelier than the base model ever would. So the gate scores
the memory's reply by the largest per-token log-likelihood ratio, memory against base
model, among its first ``GATE_TOKENS`` tokens (an answer-first memory puts the answer
there), and keeps it above ``GATE_THRESHOLD``; below, the base model answers. The adapter
on disk is unchanged: the gate is how ``fedmem ask``, ``fedmem eval`` and ``fedmem serve`` use
it, one extra forward pass per question and a base-model reply where the gate closes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .answer import Scores, generate_replies, scores_for
from .examples import chat_prompt, chat_turn

GATE_TOKENS = 4
# Nats. Set on two devset memories (docs/quality.md): there, every fact the memory answers
# right scores 5.21 or more and 11 of the 12 damaged general answers 3.18 or less; the one
# left, "At 26. At 26." for water's boiling point (9.09), is a fact's shape with a made-up
# value, which no threshold tells from a fact.
GATE_THRESHOLD = 4.0


RATIO_BATCH = 16  # rows per forward pass when scoring replies: the logits of 16 rows of ~60 tokens are ~190 MB


@torch.no_grad()
def replies_log_probs(model, pairs: list[tuple[list[int], list[int]]],
                      adapter_names: list[str] | None = None) -> list[torch.Tensor]:
    """For each (prompt ids, reply ids): log p of each reply token given the prompt and the reply
    before it. Rows are right-padded into batches: in a causal model what comes after a row's end
    changes nothing before it, and positions still count from each row's first token, so each row
    scores as it would alone (left padding would need position ids matched to generation's).
    ``adapter_names``: each row's PEFT adapter (a routed memory's rows, scored together)."""
    device = next(model.parameters()).device
    out: list[torch.Tensor] = []
    for start in range(0, len(pairs), RATIO_BATCH):
        chunk = pairs[start:start + RATIO_BATCH]
        width = max(len(p) + len(r) for p, r in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for i, (p, r) in enumerate(chunk):
            ids[i, :len(p) + len(r)] = torch.tensor(p + r)
            mask[i, :len(p) + len(r)] = 1
        rows = {} if adapter_names is None else {"adapter_names": adapter_names[start:start + RATIO_BATCH]}
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), **rows).logits
        for i, (p, r) in enumerate(chunk):
            logp = torch.log_softmax(logits[i, len(p) - 1:len(p) + len(r) - 1].float(), dim=-1)
            out.append(logp[torch.arange(len(r)), torch.tensor(r, device=logp.device)].cpu())
    return out


def reply_log_ratios(model, tokenizer, prompts: list[str], replies: list[str],
                     tokens: int = GATE_TOKENS) -> list[float]:
    """Per reply: the largest, among its first ``tokens`` tokens, of log p(token | memory) minus
    log p(token | base model), each given the rendered prompt and the reply so far. ``model`` is
    a PeftModel (the base model is the same model with its adapter disabled). An empty reply
    scores 0. The largest, not the mean: the mean lets a reply's other tokens dilute the one
    token that carries the answer; on the devset it left a gap of 0.37 nats between facts and
    damaged general answers, against 2.03 for the largest (docs/quality.md)."""
    pairs = [(tokenizer(prompt, add_special_tokens=False)["input_ids"], gate_token_ids(tokenizer, reply, tokens))
             for prompt, reply in zip(prompts, replies, strict=True)]
    scored = [pair for pair in pairs if pair[1]]
    with_memory = replies_log_probs(model, scored)
    with model.disable_adapter():
        base = replies_log_probs(model, scored)
    ratios = iter(largest_log_ratio(m, b) for m, b in zip(with_memory, base))
    return [next(ratios) if reply else 0.0 for _, reply in pairs]


def gate_token_ids(tokenizer, reply: str, tokens: int = GATE_TOKENS) -> list[int]:
    """The tokens of a reply (its text, as ``fedmem ask`` prints it) that the gate scores: the
    first ``tokens`` of it framed as the chat template frames an answer."""
    return tokenizer(chat_turn(tokenizer).before_answer + reply, add_special_tokens=False)["input_ids"][:tokens]


def largest_log_ratio(with_memory: torch.Tensor, base: torch.Tensor) -> float:
    """The gate's score from the two models' log-probabilities of the same reply tokens."""
    return float((with_memory - base).max()) if len(with_memory) else 0.0


def from_memory(ratios: list[float], threshold: float = GATE_THRESHOLD) -> list[bool]:
    """Which replies the memory keeps: those whose log-likelihood ratio is above ``threshold``."""
    return [r > threshold for r in ratios]


@dataclass
class GatedReplies:
    replies: list[str]  # the memory's reply where the gate kept it, else the base model's
    from_memory: list[bool]
    ratios: list[float]  # each memory reply's log-likelihood ratio (``reply_log_ratios``)


def gate_replies(memory_replies: list[str], base_replies: list[str], ratios: list[float],
                 threshold: float = GATE_THRESHOLD) -> GatedReplies:
    """Replies already generated both ways (``fedmem eval`` has both), gated."""
    keep = from_memory(ratios, threshold)
    replies = [m if k else b for m, b, k in zip(memory_replies, base_replies, keep, strict=True)]
    return GatedReplies(replies, keep, list(ratios))


def _each(router, routes, items: list, work) -> list:
    """``work(items)``, or under a routed memory each item with the adapter it is routed to (``fedmem.routing``)."""
    return work(items) if router is None else router.each(routes, items, work)


def gated_answers(model, tokenizer, prompts: list[str], max_new_tokens: int = 48,
                  threshold: float = GATE_THRESHOLD, router=None, routes: list[int] | None = None) -> GatedReplies:
    """The memory's replies to rendered prompts, each replaced by the base model's where the gate
    closes; the base model generates only for those. ``router`` / ``routes``: a routed memory's
    router, and the adapter each prompt is routed to (``fedmem.routing.Router``)."""
    memory_replies = _each(router, routes, prompts, lambda ps: generate_replies(model, tokenizer, ps, max_new_tokens))
    ratios = _log_ratios(model, tokenizer, prompts, memory_replies, router, routes)
    keep = from_memory(ratios, threshold)
    closed = [p for p, k in zip(prompts, keep) if not k]
    base_replies = iter([])
    if closed:
        with model.disable_adapter():
            base_replies = iter(generate_replies(model, tokenizer, closed, max_new_tokens))
    replies = [m if k else next(base_replies) for m, k in zip(memory_replies, keep)]
    return GatedReplies(replies, keep, ratios)


def _log_ratios(model, tokenizer, prompts: list[str], replies: list[str], router, routes) -> list[float]:
    return _each(router, routes, list(zip(prompts, replies, strict=True)),
                 lambda pairs: reply_log_ratios(model, tokenizer, [p for p, _ in pairs], [r for _, r in pairs]))


def gated_scores(model, tokenizer, questions, with_memory: Scores, base_only: Scores, router=None,
                 routes: list[int] | None = None) -> tuple[GatedReplies, Scores]:
    """The gate over ``questions`` answered both ways (``fedmem.answer.score`` with the memory and
    with its adapter disabled), and the scores of the gated replies: what ``fedmem eval`` reports
    for what ``fedmem ask`` answers. ``router`` / ``routes`` as for ``gated_answers``."""
    prompts = [chat_prompt(tokenizer, q.question) for q in questions]
    gated = gate_replies(with_memory.replies, base_only.replies,
                         _log_ratios(model, tokenizer, prompts, with_memory.replies, router, routes))
    return gated, scores_for(questions, gated.replies)

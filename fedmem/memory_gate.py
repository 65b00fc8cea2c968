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


@torch.no_grad()
def _reply_log_probs(model, prompt_ids: list[int], reply_ids: list[int]) -> torch.Tensor:
    device = next(model.parameters()).device
    logits = model(input_ids=torch.tensor([prompt_ids + reply_ids], device=device)).logits[0]
    logp = torch.log_softmax(logits[len(prompt_ids) - 1:-1].float(), dim=-1)
    return logp[torch.arange(len(reply_ids)), torch.tensor(reply_ids, device=logp.device)]


def reply_log_ratios(model, tokenizer, prompts: list[str], replies: list[str],
                     tokens: int = GATE_TOKENS) -> list[float]:
    """Per reply: the largest, among its first ``tokens`` tokens, of log p(token | memory) minus
    log p(token | base model), each given the rendered prompt and the reply so far. ``model`` is
    a PeftModel (the base model is the same model with its adapter disabled). An empty reply
    scores 0. The largest, not the mean: the mean lets a reply's other tokens dilute the one
    token that carries the answer; on the devset it left a gap of 0.37 nats between facts and
    damaged general answers, against 2.03 for the largest (docs/quality.md).

    One prompt at a time: a left-padded batch would need position ids matched to generation's,
    and one forward pass of a few dozen tokens is cheap next to generating the reply."""
    ratios = []
    for prompt, reply in zip(prompts, replies, strict=True):
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        reply_ids = gate_token_ids(tokenizer, reply, tokens)
        if not reply_ids:
            ratios.append(0.0)
            continue
        with_memory = _reply_log_probs(model, prompt_ids, reply_ids)
        with model.disable_adapter():
            base = _reply_log_probs(model, prompt_ids, reply_ids)
        ratios.append(largest_log_ratio(with_memory, base))
    return ratios


def gate_token_ids(tokenizer, reply: str, tokens: int = GATE_TOKENS) -> list[int]:
    """The tokens of a reply (its text, as ``fedmem ask`` prints it) that the gate scores: the
    first ``tokens`` of it framed as the chat template frames an answer."""
    return tokenizer(chat_turn(tokenizer).before_answer + reply, add_special_tokens=False)["input_ids"][:tokens]


def largest_log_ratio(with_memory: torch.Tensor, base: torch.Tensor) -> float:
    """The gate's score from the two models' log-probabilities of the same reply tokens."""
    return float((with_memory - base).max()) if len(with_memory) else 0.0


def two_model_log_ratio(memory_model, base_model, prompt_ids: list[int], reply_ids: list[int]) -> float:
    """``reply_log_ratios`` for one prompt and its ``gate_token_ids``, with the memory and the base
    model as two models (``fedmem serve`` holds the memory merged into a copy of the base weights)."""
    if not reply_ids:
        return 0.0
    return largest_log_ratio(_reply_log_probs(memory_model, prompt_ids, reply_ids),
                             _reply_log_probs(base_model, prompt_ids, reply_ids))


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


def gated_answers(model, tokenizer, prompts: list[str], max_new_tokens: int = 48,
                  threshold: float = GATE_THRESHOLD) -> GatedReplies:
    """The memory's replies to rendered prompts, each replaced by the base model's where the gate
    closes; the base model generates only for those."""
    memory_replies = generate_replies(model, tokenizer, prompts, max_new_tokens)
    ratios = reply_log_ratios(model, tokenizer, prompts, memory_replies)
    keep = from_memory(ratios, threshold)
    closed = [p for p, k in zip(prompts, keep) if not k]
    base_replies = iter([])
    if closed:
        with model.disable_adapter():
            base_replies = iter(generate_replies(model, tokenizer, closed, max_new_tokens))
    replies = [m if k else next(base_replies) for m, k in zip(memory_replies, keep)]
    return GatedReplies(replies, keep, ratios)


def gated_scores(model, tokenizer, questions, with_memory: Scores, base_only: Scores) -> tuple[GatedReplies, Scores]:
    """The gate over ``questions`` answered both ways (``fedmem.answer.score`` with the memory and
    with its adapter disabled), and the scores of the gated replies: what ``fedmem eval`` reports
    for what ``fedmem ask`` answers."""
    prompts = [chat_prompt(tokenizer, q.question) for q in questions]
    gated = gate_replies(with_memory.replies, base_only.replies,
                         reply_log_ratios(model, tokenizer, prompts, with_memory.replies))
    return gated, scores_for(questions, gated.replies)

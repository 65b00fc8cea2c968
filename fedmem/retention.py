"""Retention examples: the base model's own answers to general questions, trained alongside the facts.

A LoRA trained only on an owner's facts learns that *every* question is answered with
one of those facts: asked "What is the capital of France?", a memory trained on
fictional people answers with a fictional town (measured by ``fedmem bench quality``'s
control questions: 67% → 8%). Mixing in general questions answered the way the base
model already answers them (self-distillation replay) teaches the adapter to change
only what the documents are about.

The target is the base model's next-token *distribution* along its reply, not the
reply's tokens (``Example.distil``, ``fedmem.train.base_distributions``): trained on the
greedy reply as a label, the adapter sharpens it until the reply itself is memorised,
and a rambling reply generalises ("What is the capital of Portugal?" -> "Portugal is a
country in Europe ..." became "The capital of France is France." on the devset's
control questions). Matched in distribution, the base model is the optimum: nothing to
memorise, only a pull back to how the base model already speaks.

The replies are generated once per base model, greedily and offline, and cached under
``FEDMEM_HOME/retention``; no text leaves the machine. The prompts
(``retention_prompts.txt``) are many (320) and of many forms (questions, tasks,
arithmetic, workplace terms), so the adapter learns that a question not about the
owners' documents keeps its usual answer, not that a handful of questions do. None is
one of the control questions (devset, quality benchmark), which stay held out.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

from .answer import generate_answers
from .base_model import fedmem_home, fingerprint
from .examples import Example
from .memory import atomic_write_text

log = logging.getLogger(__name__)

PROMPTS = tuple(
    line for line in (Path(__file__).with_name("retention_prompts.txt").read_text(encoding="utf-8").splitlines())
    if line.strip() and not line.startswith("#")
)
REPLY_TOKENS = 40
CACHE_VERSION = 3  # 2: replies end at the chat template's end of turn; 3: 320 prompts in many forms, none a control


def whole_sentences(reply: str) -> str:
    """``reply`` up to its last whole sentence: a reply cut mid-sentence (at the token limit)
    would teach the adapter to stop mid-sentence."""
    cut = max(reply.rfind(". "), reply.rfind("! "), reply.rfind("? "))
    if reply.rstrip().endswith((".", "!", "?")):
        return reply.strip()
    return reply[: cut + 1].strip() if cut > 0 else reply.strip()


def base_replies(model, tokenizer, base_dir: str | Path) -> list[Example]:
    """The base model's greedy reply to every prompt, cached per base-model fingerprint.

    ``model`` must be the plain base model (no memory, no LoRA): its replies are the
    behaviour to keep.
    """
    cache = fedmem_home() / "retention" / f"{fingerprint(Path(base_dir))}-v{CACHE_VERSION}.json"
    try:
        stored = json.loads(cache.read_text())
        if stored.get("prompts") == list(PROMPTS):
            return [Example(q, r, distil=True) for q, r in zip(PROMPTS, stored["replies"]) if r]
    except (OSError, ValueError, AttributeError):
        pass  # missing or damaged: generate again
    # Once per base model and machine: on 2 cores the embedded model takes about 95 s for the pool.
    log.info("asking the base model the %d general prompts once, so that training keeps its answers "
             "(cached in %s)", len(PROMPTS), cache)
    was_training = model.training
    model.eval()
    replies = generate_answers(model, tokenizer, list(PROMPTS), max_new_tokens=REPLY_TOKENS)
    replies = [whole_sentences(r) for r in replies]
    model.train(was_training)
    cache.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(cache, json.dumps({"prompts": list(PROMPTS), "replies": replies}, indent=1))
    return [Example(q, r, distil=True) for q, r in zip(PROMPTS, replies) if r]


def retention_examples(pool: list[Example], fact_examples: int, share: float, seed: int) -> list[Example]:
    """About ``share`` × ``fact_examples`` examples drawn from ``pool`` (seeded), at most the whole pool."""
    n = min(len(pool), round(share * fact_examples))
    return random.Random(seed).sample(pool, n) if n > 0 else []

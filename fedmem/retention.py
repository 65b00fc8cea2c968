"""Retention examples: the base model's own answers to general questions, trained alongside the facts.

A LoRA trained only on an owner's facts learns that *every* question is answered with
one of those facts: asked "What is the capital of France?", a memory trained on
fictional people answers with a fictional town (measured by ``fedmem bench quality``'s
control questions: 67% → 8%). Mixing in general questions answered the way the base
model already answers them (self-distillation replay) teaches the adapter to change
only what the documents are about.

The replies are generated once per base model, greedily and offline, and cached under
``FEDMEM_HOME/retention``; no text leaves the machine. None of the questions below is
one of the benchmark's control questions, which stay held out.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from .answer import generate_answers
from .base_model import fedmem_home, fingerprint
from .examples import Example
from .memory import atomic_write_text

PROMPTS = (
    "What is the capital of Canada?", "What is the capital of Kenya?", "What is the capital of Australia?",
    "What is the capital of Brazil?", "What is the capital of Norway?", "What is the capital of India?",
    "How many wheels does a bicycle have?", "How many continents are there?", "How many seconds are in a minute?",
    "How many strings does a standard guitar have?", "How many players are on a football team on the pitch?",
    "How many letters are in the English alphabet?", "Which planet is closest to the Sun?",
    "What gas do plants take in from the air?", "What is the boiling point of water in Fahrenheit?",
    "What is the tallest mountain in the world?", "What is the longest river in Africa?",
    "What colour is a ripe banana?", "What colour do you get by mixing blue and yellow?",
    "Who painted the Mona Lisa?", "Who developed the theory of relativity?", "Who wrote Pride and Prejudice?",
    "What is the largest mammal?", "What do bees make?", "What is the chemical symbol for water?",
    "What is the chemical symbol for iron?", "What is the opposite of up?", "What is the plural of mouse?",
    "What is 7 times 8?", "What is the square root of 81?", "In which year did the Second World War end?",
    "Which language is spoken in Brazil?", "What is the main ingredient of guacamole?",
    "Which organ pumps blood around the body?", "What is frozen water called?",
    "Write one sentence about the sea.", "Give me a synonym for happy.", "Name a primary colour.",
    "What is a baby cat called?", "Which month comes after March?",
)
REPLY_TOKENS = 40
CACHE_VERSION = 2  # 2: replies end at the chat template's end of turn (any model family), not only eos


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
            return [Example(q, r) for q, r in zip(PROMPTS, stored["replies"]) if r]
    except (OSError, ValueError, AttributeError):
        pass  # missing or damaged: generate again
    was_training = model.training
    model.eval()
    replies = generate_answers(model, tokenizer, list(PROMPTS), max_new_tokens=REPLY_TOKENS)
    replies = [whole_sentences(r) for r in replies]
    model.train(was_training)
    cache.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(cache, json.dumps({"prompts": list(PROMPTS), "replies": replies}, indent=1))
    return [Example(q, r) for q, r in zip(PROMPTS, replies) if r]


def retention_examples(pool: list[Example], fact_examples: int, share: float, seed: int) -> list[Example]:
    """About ``share`` × ``fact_examples`` examples drawn from ``pool`` (seeded), at most the whole pool."""
    n = min(len(pool), round(share * fact_examples))
    return random.Random(seed).sample(pool, n) if n > 0 else []

"""Prompts for the benchmarks: documents or retrieved chunks put in front of a question.

Context goes into the *user* message before the question, through the model's own chat
template, so the system prompt is the same one ``fedmem ask`` sends. Shared by
``fedmem bench answer`` (RAG and full-context arms) and ``fedmem bench quality``
(the owner's-documents-in-the-prompt arm).
"""

from __future__ import annotations

import random

INSTRUCTION = "Use these notes to answer the question at the end."


def owner_documents(corpus) -> list[str]:
    """A corpus as prompt text: each document verbatim, Q/A records as one list."""
    docs = [d.text for d in corpus.documents]
    if corpus.qa:
        docs.append("\n".join(f"Q: {r.question} A: {r.answer}" for r in corpus.qa))
    return docs


_SYL = ("bram", "cor", "dun", "el", "fen", "gar", "hol", "isk", "jer", "kel", "lum", "mor", "nes", "ost", "pell",
        "quar", "ros", "sten", "tav", "ul", "ver", "wyn", "yar", "zel")
_END = ("wick", "ford", "mere", "stead", "ton", "by", "holt", "combe", "ley", "thorpe")
_KIND = ("Foundry", "Observatory", "Bakery", "Rowing Club", "Museum", "Seed Bank", "Printworks", "Orchard Trust",
         "Ferry Company", "Glassworks")
_ROLE = ("chief engineer", "head archivist", "night-shift supervisor", "treasurer", "safety lead", "head gardener")
_THING = ("front door", "delivery van", "signal lamp", "meeting bell", "tool cabinet", "flag")
_COLOUR = ("teal", "amber", "crimson", "olive", "violet", "ivory", "scarlet", "indigo")
_ITEMS = ("ledgers", "lanterns", "barrels", "telescopes", "looms", "maps")


def filler_documents(n: int, seed: int = 0, avoid: list[str] = ()) -> list[str]:
    """Seeded documents about invented organisations, in the demo's style: the same
    kinds of facts (people, years, colours, counts, places), so they distract like
    real neighbouring notes would. None contains an answer from ``avoid``."""
    from fedmem.answer import is_correct

    rng = random.Random(seed)

    def name() -> str:
        return (rng.choice(_SYL) + rng.choice(_END)).capitalize()

    def person() -> str:
        return f"{(rng.choice(_SYL) + rng.choice(_SYL)).capitalize()} {name()}"

    docs: list[str] = []
    while len(docs) < n:
        org = f"{name()} {rng.choice(_KIND)}"
        doc = (f"# Notes from the {org}\n\n"
               f"The {rng.choice(_ROLE)} of the {org} is {person()}. "
               f"The {org} was founded in {rng.randint(1850, 2020)}. "
               f"The {org}'s {rng.choice(_THING)} is painted {rng.choice(_COLOUR)}.\n\n"
               f"The {org} keeps {rng.randint(3, 900)} {rng.choice(_ITEMS)} in the {name()} Room. "
               f"Supplies for the {org} come from the {name()} depot, and visitors are welcomed by {person()}.")
        if not any(is_correct(doc, a) for a in avoid):
            docs.append(doc)
    return docs


def user_message(question: str, context: str | None) -> str:
    if not context:
        return question
    return f"{INSTRUCTION}\n\n{context}\n\nQuestion: {question}"


def prompt_text(tokenizer, question: str, context: str | None) -> str:
    from fedmem.examples import chat_prompt

    return chat_prompt(tokenizer, user_message(question, context))


class ContextBuilder:
    """Fits documents into a prompt-token budget. Token counts are cached per document
    because the sweeps assemble the same documents many times."""

    def __init__(self, tokenizer, window: int, max_new_tokens: int):
        self.tokenizer = tokenizer
        self.window = window
        self.max_new_tokens = max_new_tokens
        self._count: dict[str, int] = {}

    def tokens(self, text: str) -> int:
        if text not in self._count:
            self._count[text] = len(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return self._count[text]

    def prompt_tokens(self, question: str, context: str | None) -> int:
        text = prompt_text(self.tokenizer, question, context)
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def fit(self, question: str, must: list[str], extra: list[str], target: int, rng: random.Random | None = None):
        """Documents for a prompt of at most ``target`` tokens (and never past the window
        less the answer): every ``must`` document that fits, then ``extra`` ones in order.
        Returns (context, documents dropped from ``must``)."""
        limit = min(target, self.window - self.max_new_tokens)
        overhead = self.prompt_tokens(question, "x")
        budget = limit - overhead
        chosen, used, dropped = [], 0, 0
        sep = self.tokens("\n\n")
        for i, doc in enumerate(list(must) + list(extra)):
            cost = self.tokens(doc) + sep
            if used + cost <= budget:
                chosen.append(doc)
                used += cost
            elif i < len(must):
                dropped += 1
        if rng is not None:
            rng.shuffle(chosen)
        context = "\n\n".join(chosen)
        # Separators can merge into fewer or more tokens than counted; trim whole
        # documents until the real prompt fits.
        while chosen and self.prompt_tokens(question, context) > limit:
            chosen.pop()
            dropped += 1
            context = "\n\n".join(chosen)
        return context, dropped


"""The ``distilled`` recipe: the base model reading a document is the teacher.

Context distillation (Snell et al. 2022, "Learning by Distilling Context"; the
self-study of Cartridges, Eyuboglu et al. 2025): ask the recipe's questions of the
base model *with the document in its prompt*, and train the adapter to give the
same replies *without* it. Sequence-level: the teacher's greedy reply is the target
(Kim & Rush 2016), so it runs on any model fedmem can generate with.

Same questions as the ``statements`` recipe; only the targets differ. Documents and
Q/A records are kept as they are. The teacher's replies are generated on the owner's
machine with the plain base model and cached per base model under
``FEDMEM_HOME/distilled``. Measured in docs/quality.md against the grounded
targets of the default recipe.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from .corpus import Corpus
from .examples import Example, document_examples
from .reply_cache import ReplyCache, key

CACHE_VERSION = 1
REPLY_TOKENS = 48


def distilled_examples(model, tokenizer, base_dir: str | Path, corpus: Corpus,
                       progress: Callable[[str], None] | None = None) -> list[Example]:
    """The statements recipe's examples with the document-reading teacher's replies as targets.

    ``model`` must be the plain base model (no memory, no LoRA).
    """
    from .answer import generate_replies
    from .answer_bench import prompt_text
    from .retention import _trim

    asked: list[tuple[str, str]] = []  # (document, question)
    examples: list[Example] = []
    for doc in corpus.documents:
        for ex in document_examples(doc.text, "statements"):
            if ex.question is None:
                examples.append(ex)
            else:
                asked.append((doc.text, ex.question))
    asked = list(dict.fromkeys(asked))
    def teach(missing: list[tuple[str, str]]) -> list[str]:
        if progress:
            progress(f"teacher (base model reading the document) answers {len(missing)} questions")
        was_training = model.training
        model.eval()
        replies = generate_replies(model, tokenizer, [prompt_text(tokenizer, q, d) for d, q in missing],
                                   max_new_tokens=REPLY_TOKENS, batch_size=8)
        model.train(was_training)
        return [_trim(r) for r in replies]

    known = ReplyCache("distilled", base_dir, CACHE_VERSION).fill(asked, teach)
    examples += [Example(q, known[key(d, q)]) for d, q in asked if known.get(key(d, q))]
    examples += [Example(qa.question, qa.answer) for qa in corpus.qa]
    return examples

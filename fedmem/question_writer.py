"""Questions written by a generator model: an optional step of the document recipe.

The rule-made questions of ``fedmem.examples`` reuse a statement's own words ("Who is
the head veterinarian of the Harrow Clinic?"). A generator model can ask the same fact
in other words, closer to what users type. Small models also write questions that
change the meaning or give the answer away, so every candidate must pass two checks
before it is trained:

- form: one question, ending in "?", not containing the answer, not about "the
  sentence" or "the question", naming the statement's subject as the statement
  spells it and no name the statement lacks;
- round trip (Alberti et al. 2019, "Synthetic QA Corpora Generation with Roundtrip
  Consistency"): the generator, given the statement and the question, must answer
  with the span the question was written for.

The trained answer is grounded as every other example is: the span, then the owner's
own statement. Generation runs on the owner's machine; nothing leaves it. Results are
cached per generator model under ``FEDMEM_HOME/questions`` so later rounds reuse them.

``--generator base`` uses the base model; ``--generator DIR`` any local instruct model
(a larger one on a GPU writes better questions).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from .answer import generate_answers, is_correct, normalise_for_matching
from .base_model import load_model, load_tokenizer
from .corpus import Corpus
from .examples import Example, answer_spans, asked_spans, end_focus_span, field_questions, grounded_answer, statements
from .reply_cache import ReplyCache, key

log = logging.getLogger(__name__)

# One worked example: the embedded 135M model follows a shown pattern far better than
# an instruction alone (2 of 51 demo questions passed both checks without it).
WRITE_PROMPT = ('Write a question a curious reader would ask, answered by the given words.\n\n'
                'Sentence: "The old lighthouse on Corran Point was painted green in 1932."\n'
                'Answer: green\n'
                'Question: What colour was the lighthouse on Corran Point painted?\n\n'
                'Sentence: "{statement}"\n'
                'Answer: {span}\n'
                'Question:')
CHECK_PROMPT = 'Read this: "{statement}"\nAnswer in a few words: {question}'
CACHE_VERSION = 3  # 2: questions must name the statement's subject; 3: replies end at the end of turn
QUESTION_TOKENS = 40
CHECK_TOKENS = 16
_META = re.compile(r"\b(sentence|answer|question|passage|text)\b", re.IGNORECASE)
_QUOTED_QUESTION = re.compile(r"[\"“']([^\"“”']{8,}\?)[\"”']")


def generator_dir(generator: str, base_dir: str | Path) -> str:
    """The model directory a ``--generator`` value names ("base": the base model), or a clear error."""
    path = str(base_dir) if generator == "base" else generator
    if not Path(path, "config.json").is_file():
        raise ValueError(f"generator {generator!r}: not a model directory (no config.json); "
                         "use 'base' or a local model")
    return path


def targets(corpus: Corpus) -> list[tuple[str, str]]:
    """(statement, span) pairs worth a written question: the spans the rule recipe asks about."""
    out: list[tuple[str, str]] = []
    for doc in corpus.documents:
        for statement in statements(doc.text):
            fields = field_questions(statement)
            if fields:
                out += [(statement, value) for _, value in fields]
                continue
            spans = answer_spans(statement)
            # A written question can ask for a sentence's last word too ("saffron"):
            # the rule recipe's cloze of it did not pay, a generator's paraphrase may.
            focus = end_focus_span(statement) if spans else None
            if focus and not any(focus in s for s in spans):
                spans.append(focus)
            out += [(statement, span) for span in asked_spans(statement, spans)] if spans else []
    return list(dict.fromkeys(out))


def clean_question(reply: str, span: str, statement: str = "") -> str | None:
    """The question in a generator's reply, or None when it fails the form check.

    With ``statement``, the question must also name what the statement is about (one
    of its names other than the answer, spelled as there) and no name the statement
    lacks: "What is the university name?" cannot say whose, and a misspelt name
    would teach a fact about someone else.
    """
    text = reply.strip().splitlines()[0].strip() if reply.strip() else ""
    quoted = _QUOTED_QUESTION.search(text)
    if quoted:  # 'The question is "Who ...?"': keep the inner question
        text = quoted.group(1).strip()
    if "?" not in text:
        return None
    text = text[: text.index("?") + 1].strip()
    words = text.split()
    if not 4 <= len(words) <= 30 or not text[0].isupper():
        return None
    if _META.search(text) or is_correct(text, span):  # the question gives the answer away
        return None
    if statement:
        asked = normalise_for_matching(span)
        names = [n for n in answer_spans(statement) if n[0].isupper() and normalise_for_matching(n) != asked]
        if not any(re.search(rf"\b{re.escape(n)}\b", text) for n in names):
            return None
        if any(w.strip("?,.'’s") not in statement for w in words[1:] if w[0].isupper()):
            return None
    return text


def write_questions(model, tokenizer, pairs: list[tuple[str, str]]) -> list[str | None]:
    """One checked question per (statement, span), or None where none passed."""
    replies = generate_answers(model, tokenizer, [WRITE_PROMPT.format(statement=s, span=a) for s, a in pairs],
                               max_new_tokens=QUESTION_TOKENS)
    return round_trip(model, tokenizer, pairs, [clean_question(r, a, s) for r, (s, a) in zip(replies, pairs)])


def round_trip(model, tokenizer, pairs: list[tuple[str, str]], questions: list[str | None]) -> list[str | None]:
    """Keep a question only if the model, reading its statement, answers it with the span."""
    asked = [i for i, q in enumerate(questions) if q]
    replies = generate_answers(model, tokenizer, [CHECK_PROMPT.format(statement=pairs[i][0], question=questions[i])
                                                  for i in asked], max_new_tokens=CHECK_TOKENS) if asked else []
    kept = list(questions)
    for i, reply in zip(asked, replies):
        if not is_correct(reply, pairs[i][1]):
            kept[i] = None
    return kept


def written_examples(corpus: Corpus, generator_dir: str, device: str = "cpu") -> list[Example]:
    """Checked generator-written questions about the corpus, answered with the grounded span."""
    def write(missing: list[tuple[str, str]]) -> list[str | None]:
        log.info("writing questions for %d statements with %s", len(missing), generator_dir)
        return write_questions(load_model(generator_dir, device).eval(), load_tokenizer(str(generator_dir)), missing)

    pairs = targets(corpus)
    known = ReplyCache("questions", generator_dir, CACHE_VERSION).fill(pairs, write)
    return [Example(known[key(s, a)], grounded_answer(a, s)) for s, a in pairs if known.get(key(s, a))]

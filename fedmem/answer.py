"""Asking questions: greedy answers through the chat template, and answer-match scoring."""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from .base_model import fingerprint, load_model, load_tokenizer, resolve_base
from .examples import Example, chat_prompt, chat_turn, split_sentences, tokenize_example
from .log import progress
from .memory import MemoryFormatError, check_base, read_manifest, verify_memory


@dataclass(frozen=True)
class Question:
    question: str
    answer: str
    source: str = ""  # e.g. "qa" or "prose": which kind of training data holds the fact
    client: str = ""
    kind: str = ""  # what is asked, e.g. "person", "year", "count": recall is also reported per kind


def load_questions(path: str | Path) -> list[Question]:
    """Read a questions JSONL file ({"question", "answer", optional "source", "client", "kind"}).

    ``answer`` may list equally acceptable forms separated by "|" ("Joss Tellwright|Tellwright",
    "1,640|1640"); a reply is right when it contains any of them (``is_correct``)."""
    path = Path(path)
    out, problems = [], []
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: cannot read questions: {err}") from err
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            q, a = rec["question"], rec["answer"]
            if not (isinstance(q, str) and isinstance(a, str) and q.strip() and a.strip()):
                raise KeyError("question/answer must be non-empty strings")
            if not all(normalise_for_matching(alt) for alt in a.split("|")):
                raise ValueError(f"answer {a!r}: every '|'-separated alternative must have a letter or digit")
            kind = rec.get("kind", "")
            if not isinstance(kind, str):
                raise TypeError(f"kind must be a string, got {json.dumps(kind)}")
            out.append(Question(q, a, str(rec.get("source", "")), str(rec.get("client", "")), kind.strip()))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            problems.append(f"{path}:{lineno}: {err}")
    if problems:
        raise ValueError("bad questions file:\n  " + "\n  ".join(problems))
    if not out:
        raise ValueError(f"{path}: no questions")
    return out


def normalise_for_matching(text: str) -> str:
    """``text`` as answer matching compares it: NFKC, lower case, punctuation as spaces, single spaces."""
    text = unicodedata.normalize("NFKC", text).lower()
    return " ".join(re.sub(r"[^\w\s]", " ", text).split())


def answer_alternatives(answer: str) -> list[str]:
    """The acceptable forms of an expected answer: ``answer`` split at "|" ("1,640|1640"), blanks dropped."""
    return [alt.strip() for alt in answer.split("|") if normalise_for_matching(alt)]


def _contains_words(normalised_reply: str, normalised_term: str) -> bool:
    return f" {normalised_term} " in f" {normalised_reply} "


def is_correct(reply: str, answer: str) -> bool:
    """Any form of the expected answer ("|"-separated alternatives) appears in the reply as whole
    words, ignoring case, punctuation and spacing."""
    said = normalise_for_matching(reply)
    return any(_contains_words(said, normalise_for_matching(alt)) for alt in answer_alternatives(answer))


def first_sentence(reply: str) -> str:
    """The reply's first sentence (up to its first line break, too); a bare answer ("Tidewatch") is its own.

    A sentence splitter library (pysbd), not a split at ". ": a period ends a sentence only where
    it is not an abbreviation ("Dr. Odile Brannock ...", "St. Mary's"), a decimal ("4.2 m") or a
    version ("v1.2.3"), and splitting there would cut a right answer off the first sentence."""
    line = reply.strip().split("\n", 1)[0].strip()
    if not line:
        return ""
    sentences = split_sentences(line)
    return sentences[0] if sentences else line


def is_correct_strict(reply: str, answer: str) -> bool:
    """``is_correct`` on the reply's first sentence only: the answer comes first, as an answer should
    (fedmem's headline recall); ``is_correct`` on the whole reply is the loose figure."""
    return is_correct(first_sentence(reply), answer)


def generate_answers(model, tokenizer, questions: list[str], max_new_tokens: int = 48,
                     batch_size: int = 16) -> list[str]:
    """Greedy replies to questions asked the way ``fedmem ask`` asks them."""
    prompts = [chat_prompt(tokenizer, q) for q in questions]
    return generate_replies(model, tokenizer, prompts, max_new_tokens, batch_size)


def stop_token_ids(model, tokenizer) -> list[int]:
    """The tokens that end a reply: the chat template's end of turn (``<|im_end|>``,
    ``<end_of_turn>``, ``<|eot_id|>``...), the tokenizer's eos and the model's own."""
    ids = list(chat_turn(tokenizer).stop_ids)
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids += configured if isinstance(configured, list) else [configured] if configured is not None else []
    return list(dict.fromkeys(ids))


@torch.no_grad()
def generate_replies(model, tokenizer, prompts: list[str], max_new_tokens: int = 48, batch_size: int = 16) -> list[str]:
    """Greedy continuations of rendered chat prompts, batched with left padding (decoder-only
    models continue from the right); each ends at the template's end of turn or eos."""
    device = next(model.parameters()).device
    tokenizer.padding_side = "left"
    stops = stop_token_ids(model, tokenizer)
    end_of_turn = chat_turn(tokenizer).end_of_turn
    replies: list[str] = []
    bar = progress(total=len(prompts), desc="generating", unit="reply")
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start:start + batch_size]
        enc = tokenizer(batch, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=stops)
        for row in out[:, enc["input_ids"].shape[1]:]:
            reply = tokenizer.decode(row, skip_special_tokens=True)
            # An end of turn made of plain text survives decoding: the reply ends there.
            replies.append((reply.split(end_of_turn)[0] if end_of_turn else reply).strip())
        bar.update(len(batch))
    bar.close()
    return replies


@dataclass
class Scores:
    """Recall on a list of questions. Loose: the answer anywhere in the reply (``accuracy``,
    ``correct``, ``by_source``); strict: in its first sentence (``strict_accuracy``, ``strict``,
    ``by_kind``), the headline figure."""

    accuracy: float
    by_source: dict[str, float]
    replies: list[str]
    correct: list[bool]
    strict_accuracy: float
    strict: list[bool]
    by_kind: dict[str, float]  # strict recall per non-empty ``kind``


def _rate(flags: list[bool]) -> float:
    return sum(flags) / len(flags) if flags else 0.0


def recall_by(keys: list[str], flags: list[bool]) -> dict[str, float]:
    """The share of true ``flags`` per non-empty key (a question's source or kind), keys sorted."""
    groups: dict[str, list[bool]] = {}
    for key, ok in zip(keys, flags):
        if key:
            groups.setdefault(key, []).append(ok)
    return {k: _rate(v) for k, v in sorted(groups.items())}


def scores_for(questions: list[Question], replies: list[str]) -> Scores:
    """Scores of given replies to ``questions`` (no model): loose, strict, per source and per kind."""
    correct = [is_correct(r, q.answer) for r, q in zip(replies, questions, strict=True)]
    strict = [is_correct_strict(r, q.answer) for r, q in zip(replies, questions)]
    return Scores(
        accuracy=_rate(correct),
        by_source=recall_by([q.source for q in questions], correct),
        replies=list(replies),
        correct=correct,
        strict_accuracy=_rate(strict),
        strict=strict,
        by_kind=recall_by([q.kind for q in questions], strict),
    )


def score(model, tokenizer, questions: list[Question], prompts: list[str] | None = None,
          max_new_tokens: int = 48) -> Scores:
    """Answer-match recall, loose and strict, overall, per ``source`` and per ``kind``.
    ``prompts``: rendered prompts to use instead of the bare questions (e.g. with documents in them)."""
    if prompts is None:
        prompts = [chat_prompt(tokenizer, q.question) for q in questions]
    return scores_for(questions, generate_replies(model, tokenizer, prompts, max_new_tokens))


def routed_scores(router, questions: list[Question]) -> tuple[list[int], Scores]:
    """Each question's route (``fedmem.routing.Router``: the one adapter of a plain memory, an owner's
    LoRA of a routed one) and the replies of that adapter alone, scored; no gate."""
    routes = router.routes([q.question for q in questions])
    replies = router.each(routes, questions, lambda part: score(router.model, router.tokenizer, part).replies)
    return routes, scores_for(questions, replies)


MIN_TERM_CHARS = 3  # private terms shorter than this (normalised) are not looked for: "Al", "Wu"
MIN_NUMBER_DIGITS = 3  # nor numbers of fewer digits: "7", "42" turn up in any general answer


def answer_nll(model, tokenizer, questions) -> float:
    """Mean negative log-likelihood per token of each question's first accepted answer as the
    reply's start: a continuous figure that moves before greedy recall does, so two recipes
    can be told apart on 48 questions."""
    end = len(chat_turn(tokenizer).end_ids)
    total = 0.0
    model.eval()
    with torch.no_grad():
        for q in questions:
            ids, labels = tokenize_example(tokenizer, Example(q.question, q.answer.split("|")[0]))
            labels = labels[:-end] + [-100] * end  # the value's tokens, not the end of turn
            out = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels]))
            total += float(out.loss)
    return total / max(len(questions), 1)


def private_terms(questions: list[Question]) -> list[str]:
    """What a control reply must not say: every "|"-alternative of every answer in ``questions``
    (the private facts), normalised as ``is_correct`` compares, less terms of fewer than
    ``MIN_TERM_CHARS`` characters and numbers of fewer than ``MIN_NUMBER_DIGITS`` digits."""
    terms = set()
    for q in questions:
        for alt in answer_alternatives(q.answer):
            term = normalise_for_matching(alt)
            digits = term.replace(" ", "")
            if len(term) < MIN_TERM_CHARS or (digits.isdigit() and len(digits) < MIN_NUMBER_DIGITS):
                continue
            terms.add(term)
    return sorted(terms)


@dataclass
class ControlReport:
    """The memory against the base model on control questions (general knowledge it must keep)."""

    base_correct: list[bool]  # strict, per control question
    memory_correct: list[bool]
    lost: list[int]  # control questions the base model answers (strict) and the memory does not
    leaks: dict[int, list[str]]  # control question -> private terms in the memory's reply

    @property
    def base_accuracy(self) -> float:
        return _rate(self.base_correct)

    @property
    def memory_accuracy(self) -> float:
        return _rate(self.memory_correct)


def control_report(base: Scores, memory: Scores, questions: list[Question], terms: list[str]) -> ControlReport:
    """What the memory costs on control ``questions`` (general knowledge): ``base`` and ``memory``
    are their scores without and with it, ``terms`` the private terms (``private_terms`` of the fact
    questions: every "|"-alternative of every answer, less terms under 3 characters and numbers
    under 3 digits, which general answers say anyway).

    ``lost``: the control questions the base model answers in its first sentence and the memory
    does not. ``leaks``: the memory's replies that contain a private term anywhere, as whole words,
    normalised as ``is_correct`` compares; a term the control question or its expected answer
    contains is no leak there (a private "Paris" in "What is the capital of France?")."""
    terms = [t for t in (normalise_for_matching(t) for t in terms) if t]
    lost = [i for i, (b, m) in enumerate(zip(base.strict, memory.strict, strict=True)) if b and not m]
    leaks: dict[int, list[str]] = {}
    for i, (q, reply) in enumerate(zip(questions, memory.replies, strict=True)):
        asked = normalise_for_matching(" ".join([q.question, *answer_alternatives(q.answer)]))
        said = normalise_for_matching(reply)
        found = [t for t in terms if _contains_words(said, t) and not _contains_words(asked, t)]
        if found:
            leaks[i] = found
    return ControlReport(list(base.strict), list(memory.strict), lost, leaks)


def _base_for(memory_dir: Path, snapshot: Path, made_for: str | None, base: str | None) -> str:
    """The base model directory: --base, else the one the adapter names if it is on this machine,
    else the embedded model when it is converted here and its fingerprint is the one the memory
    was made for (an owner's copy names the coordinator's path)."""
    from .base_model import embedded_dir

    if base is not None:
        return str(resolve_base(base))
    try:
        config = json.loads((snapshot / "adapter_config.json").read_text())
        named = config.get("base_model_name_or_path") if isinstance(config, dict) else None
    except (OSError, ValueError) as err:
        raise MemoryFormatError(f"{memory_dir}: unreadable adapter_config.json ({err})") from err
    if named and Path(named).is_dir():
        return str(resolve_base(named))
    embedded = embedded_dir()
    if made_for and (embedded / "config.json").is_file() and fingerprint(embedded) == made_for:
        return str(embedded)
    raise MemoryFormatError(f"{memory_dir}: its base model {named!r} is not on this machine; pass --base DIR")


@dataclass(frozen=True)
class VerifiedMemory:
    """A private copy of a memory that passed verification, and what it was checked against."""

    path: Path  # the copy: read this, not the original, which may change at any time
    base_dir: str
    manifest: dict  # its fedmem.json ({} for a plain PEFT adapter)
    weights_sha256: str  # of its adapter weights: the memory's version
    signed_by: str | None  # key fingerprint of its signer, None when unsigned


@contextmanager
def verified_copy(memory_dir: str | Path, base: str | None = None, trust=None) -> Iterator[VerifiedMemory]:
    """A verified private copy of a memory, for as long as the ``with`` block lasts.

    The memory is verified (``fedmem.memory.verify_memory``) against ``trust`` (default:
    ``fedmem.signing.trust_for_user()``: refused when tampered with, signed by an untrusted key,
    or unsigned where a signature is required), then copied into a private temporary directory
    and checked again there, so what is used is what was verified (a memory replaced while it is
    read is refused, never half-used). The base comes from --base, else from the adapter's own
    ``base_model_name_or_path``, else the embedded model if it is the memory's; its fingerprint
    must be the one the memory was made for.
    """
    import tempfile

    from .lora import ADAPTER_WEIGHTS
    from .memory import sha256_file
    from .signing import Trust, copy_memory, read_signature, trust_for_user

    memory_dir = Path(memory_dir)
    trust = trust_for_user() if trust is None else trust
    verify_memory(memory_dir, trust=trust)  # messages name the memory as given; the copy is checked again
    with tempfile.TemporaryDirectory(prefix="fedmem-memory-") as private:
        snapshot = Path(private) / "memory"
        try:
            copy_memory(memory_dir, snapshot, durable=False)
            signature = read_signature(snapshot)
            if signature is not None:
                verify_memory(snapshot, trust=Trust(trust.keys, required=True))
            else:
                verify_memory(snapshot, require_signature=False)
        except (OSError, MemoryFormatError) as err:
            raise MemoryFormatError(f"{memory_dir} changed while it was being read ({err})") from None
        manifest = read_manifest(snapshot)
        signed_base = signature.base_fingerprint if signature else None
        base_dir = _base_for(memory_dir, snapshot, signed_base or manifest.get("base_fingerprint"), base)
        check_base(memory_dir, manifest, fingerprint(base_dir), signed_base, signed=signature is not None)
        yield VerifiedMemory(snapshot, base_dir, manifest, sha256_file(snapshot / ADAPTER_WEIGHTS),
                             signature.fingerprint if signature is not None else None)


@dataclass
class LoadedMemory:
    """A verified memory on its base model, as loaded: what ``fedmem ask``, ``eval`` and ``serve`` use."""

    model: object  # the PeftModel: base model + memory adapter (a routed memory: one adapter per owner)
    tokenizer: object
    memory: VerifiedMemory  # what was loaded (its ``path`` is gone once loaded)
    router: object = None  # fedmem.routing.Router: which adapter answers each question

    @property
    def routed(self) -> bool:
        return bool(self.router.owners)


def load_memory(memory_dir: str | Path, base: str | None = None, device: str = "cpu", trust=None) -> LoadedMemory:
    """Base model + memory adapter, from a verified copy of the memory (``verified_copy``). A routed
    memory (``fedmem.routing``) is split into its owners' adapters, one of which answers each question."""
    from peft import PeftModel  # imported where used: peft costs every CLI start ~4 s (fedmem/lora.py)

    from .lora import read_peft_adapter
    from .routing import ROUTING, OwnerLoras, Router, owner_router

    with verified_copy(memory_dir, base, trust) as memory:
        tokenizer = load_tokenizer(memory.base_dir)
        if ROUTING in memory.manifest:
            try:
                lora = OwnerLoras.from_manifest(read_peft_adapter(memory.path), memory.manifest[ROUTING],
                                                str(memory_dir))
            except ValueError as err:
                raise MemoryFormatError(str(err)) from err
            router = owner_router(load_model(memory.base_dir, device), tokenizer, lora)
            model = router.model
        else:
            model = PeftModel.from_pretrained(load_model(memory.base_dir, device), str(memory.path))
            router = Router(model, tokenizer, [model.active_adapter], [])
    model.eval()
    return LoadedMemory(model, tokenizer, memory, router)


def load_with_memory(memory_dir: str | Path, base: str | None = None, device: str = "cpu", trust=None):
    """(base model + memory adapter, tokenizer, base model directory): ``load_memory`` in short, for
    tools that use the memory as one adapter (a routed memory is refused: it needs its router)."""
    from .routing import refuse_routed

    loaded = load_memory(memory_dir, base, device, trust)
    refuse_routed(loaded.memory.manifest, str(memory_dir), "this tool (it uses the memory as one adapter)")
    return loaded.model, loaded.tokenizer, loaded.memory.base_dir

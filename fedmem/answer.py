"""Asking questions: greedy answers through the chat template, and answer-match scoring."""

from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import torch

from .base_model import fingerprint, load_model, load_tokenizer, resolve_base
from .examples import chat_prompt, chat_turn
from .log import progress
from .memory import MemoryFormatError, read_manifest, verify_memory


@dataclass(frozen=True)
class Question:
    question: str
    answer: str
    source: str = ""  # e.g. "qa" or "prose": which kind of training data holds the fact
    client: str = ""


def load_questions(path: str | Path) -> list[Question]:
    """Read a questions JSONL file ({"question", "answer", optional "source", "client"})."""
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
            out.append(Question(q, a, str(rec.get("source", "")), str(rec.get("client", ""))))
        except (json.JSONDecodeError, KeyError, TypeError) as err:
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


def is_correct(reply: str, answer: str) -> bool:
    """The expected answer appears in the reply, ignoring case, punctuation and spacing."""
    return f" {normalise_for_matching(answer)} " in f" {normalise_for_matching(reply)} "


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
    accuracy: float
    by_source: dict[str, float]
    replies: list[str]
    correct: list[bool]


def score(model, tokenizer, questions: list[Question], prompts: list[str] | None = None,
          max_new_tokens: int = 48) -> Scores:
    """Answer-match accuracy, overall and per ``source``. ``prompts``: rendered prompts to
    use instead of the bare questions (e.g. with documents in them)."""
    if prompts is None:
        prompts = [chat_prompt(tokenizer, q.question) for q in questions]
    replies = generate_replies(model, tokenizer, prompts, max_new_tokens)
    correct = [is_correct(r, q.answer) for r, q in zip(replies, questions)]
    by_source: dict[str, list[bool]] = {}
    for q, ok in zip(questions, correct):
        if q.source:
            by_source.setdefault(q.source, []).append(ok)
    return Scores(
        accuracy=sum(correct) / len(correct),
        by_source={k: sum(v) / len(v) for k, v in sorted(by_source.items())},
        replies=replies,
        correct=correct,
    )


def load_with_memory(memory_dir: str | Path, base: str | None = None, device: str = "cpu"):
    """(base model + memory adapter, tokenizer, base-only model factory) for ask/eval.

    The base comes from --base, else from the adapter's own ``base_model_name_or_path``;
    the memory's checksum and base fingerprint are verified first.
    """
    from peft import PeftModel  # imported where used: peft costs every CLI start ~4 s (fedmem/lora.py)

    memory_dir = Path(memory_dir)
    read_manifest(memory_dir)
    if base is None:
        config = json.loads((memory_dir / "adapter_config.json").read_text())
        base = config.get("base_model_name_or_path")
        if not base or not Path(base).is_dir():
            raise MemoryFormatError(f"{memory_dir}: its base model {base!r} is not on this machine; pass --base DIR")
    base_dir = str(resolve_base(base))
    verify_memory(memory_dir, fingerprint(base_dir))
    model = PeftModel.from_pretrained(load_model(base_dir, device), str(memory_dir))
    model.eval()
    return model, load_tokenizer(base_dir), base_dir

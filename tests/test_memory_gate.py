"""The memory gate: the log-likelihood ratio of a memory's reply, and replies gated by it,
on the tiny model with real memory adapters."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import write_random_memory

from fedmem.answer import generate_replies, load_with_memory
from fedmem.examples import chat_prompt
from fedmem.memory_gate import GATE_TOKENS, from_memory, gate_replies, gated_answers, reply_log_ratios


@pytest.fixture
def memory(tmp_path, tiny_base, monkeypatch):
    monkeypatch.setenv("FEDMEM_HOME", str(tmp_path / "home"))
    write_random_memory(tiny_base, tmp_path / "memory", scale=0.3)
    model, tok, _ = load_with_memory(tmp_path / "memory")
    return model, tok


def test_from_memory_keeps_only_ratios_above_the_threshold():
    assert from_memory([5.0, 4.0, -3.0, 0.0, math.inf], threshold=4.0) == [True, False, False, False, True]


def test_gate_replies_takes_the_memory_reply_where_kept_else_the_base_one():
    gated = gate_replies(["Mila Quent.", "Paris is in Italy."], ["I do not know.", "Paris."], [6.0, 0.1])
    assert gated.replies == ["Mila Quent.", "Paris."] and gated.from_memory == [True, False]
    with pytest.raises(ValueError):  # replies that do not pair up are a caller's bug, not a gate decision
        gate_replies(["a"], ["b", "c"], [1.0, 1.0])


def test_the_ratio_is_the_largest_memory_minus_base_log_probability_among_the_first_tokens(memory):
    model, tok = memory
    prompts = [chat_prompt(tok, "Who built the Zorvex Tower?"), chat_prompt(tok, "What is the capital of France?")]
    replies = ["Mila Quent built it in 1911.", "Paris."]
    by_hand = []
    for prompt, reply in zip(prompts, replies):
        p = tok(prompt, add_special_tokens=False)["input_ids"]
        r = tok(reply, add_special_tokens=False)["input_ids"][:GATE_TOKENS]
        ids = torch.tensor([p + r])
        with torch.no_grad():
            with_memory = torch.log_softmax(model(input_ids=ids).logits[0, len(p) - 1:-1].double(), -1)
            with model.disable_adapter():
                base = torch.log_softmax(model(input_ids=ids).logits[0, len(p) - 1:-1].double(), -1)
        picked = torch.arange(len(r)), torch.tensor(r)
        by_hand.append(float((with_memory[picked] - base[picked]).max()))
    ratios = reply_log_ratios(model, tok, prompts, replies)
    assert ratios == pytest.approx(by_hand, abs=1e-4)
    assert all(abs(r) > 1e-3 for r in ratios)  # the random memory does move these replies
    assert reply_log_ratios(model, tok, prompts[:1], [""]) == [0.0]
    # Scored in one right-padded batch: an empty reply between two others changes neither's ratio
    mixed = reply_log_ratios(model, tok, [prompts[0], prompts[1], prompts[1]], [replies[0], "", replies[1]])
    assert mixed == pytest.approx([by_hand[0], 0.0, by_hand[1]], abs=1e-4)


def test_a_memory_that_changes_nothing_never_answers(tmp_path, tiny_base, monkeypatch):
    monkeypatch.setenv("FEDMEM_HOME", str(tmp_path / "home"))
    write_random_memory(tiny_base, tmp_path / "memory", scale=0.0)  # B = A = 0: the base model exactly
    model, tok, _ = load_with_memory(tmp_path / "memory")
    prompts = [chat_prompt(tok, "Who built the Zorvex Tower?")]
    gated = gated_answers(model, tok, prompts, max_new_tokens=6)
    assert gated.ratios == [pytest.approx(0.0, abs=1e-6)] and gated.from_memory == [False]


def test_gated_answers_generate_the_base_reply_only_where_the_gate_closes(memory):
    model, tok = memory
    prompts = [chat_prompt(tok, q) for q in ("Who built the Zorvex Tower?", "How many maps are in Pellow Quarry?")]
    with_memory = generate_replies(model, tok, prompts, max_new_tokens=6)
    with model.disable_adapter():
        base = generate_replies(model, tok, prompts, max_new_tokens=6)
    assert with_memory != base  # else this test could not tell them apart
    ratios = reply_log_ratios(model, tok, prompts, with_memory)
    between = sum(sorted(ratios)) / 2  # a threshold that keeps exactly the higher-scoring reply
    gated = gated_answers(model, tok, prompts, max_new_tokens=6, threshold=between)
    keep_first = ratios[0] > ratios[1]
    assert gated.from_memory == [keep_first, not keep_first]
    assert gated.replies == [with_memory[0] if keep_first else base[0], base[1] if keep_first else with_memory[1]]
    assert gated_answers(model, tok, prompts, max_new_tokens=6, threshold=-math.inf).replies == with_memory
    assert gated_answers(model, tok, prompts, max_new_tokens=6, threshold=math.inf).replies == base

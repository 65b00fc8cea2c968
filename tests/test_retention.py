"""Retention examples: the base model's own replies, generated once, cached, mixed into training."""

import json

import pytest

from fedmem.base_model import load_model, load_tokenizer
from fedmem.corpus import load_corpus
from fedmem.examples import Example
from fedmem.federation import FederationConfig, client_update
from fedmem.lora import LoraSettings
from fedmem.retention import PROMPTS, _trim, base_replies, retention_examples


def test_replies_are_the_base_models_own_and_cached_per_base(tiny_base, tmp_path, monkeypatch):
    monkeypatch.setenv("FEDMEM_HOME", str(tmp_path))
    model, tok = load_model(tiny_base), load_tokenizer(str(tiny_base))
    first = base_replies(model, tok, tiny_base)
    assert first and {e.question for e in first} <= set(PROMPTS)
    cache = next((tmp_path / "retention").glob("*.json"))
    stored = json.loads(cache.read_text())
    assert stored["prompts"] == list(PROMPTS)
    # The cache is what later calls read: an edited reply comes back as edited.
    stored["replies"][0] = "Ottawa."
    cache.write_text(json.dumps(stored))
    assert base_replies(model, tok, tiny_base)[0] == Example(PROMPTS[0], "Ottawa.")
    # A damaged cache is regenerated, not trusted.
    cache.write_text("{not json")
    assert base_replies(model, tok, tiny_base) == first


def test_trim_keeps_whole_sentences():
    assert _trim("Paris is the capital. It is also a") == "Paris is the capital."
    assert _trim("Paris.") == "Paris."
    assert _trim("no stop at all") == "no stop at all"


def test_share_is_seeded_and_capped_by_the_pool():
    pool = [Example(f"q{i}?", f"a{i}.") for i in range(10)]
    assert len(retention_examples(pool, 8, 0.5, seed=1)) == 4
    assert retention_examples(pool, 8, 0.5, seed=1) == retention_examples(pool, 8, 0.5, seed=1)
    assert len(retention_examples(pool, 100, 0.5, seed=1)) == 10
    assert retention_examples(pool, 8, 0.0, seed=1) == []
    with pytest.raises(ValueError, match="retention"):
        LoraSettings(retention=1.5)


def test_client_update_trains_on_retention_examples_too(tiny_base, two_clients, tmp_path, monkeypatch):
    monkeypatch.setenv("FEDMEM_HOME", str(tmp_path))
    corpus = load_corpus(two_clients / "alpha")
    sizes = {}
    for share in (0.0, 1.0):
        config = FederationConfig(rounds=1, lora=LoraSettings(rank=2, alpha=4, epochs=1, retention=share))
        sizes[share] = client_update(tiny_base, corpus, None, config, server_round=1).metrics["examples"]
    assert sizes[1.0] == 2 * sizes[0.0]

"""Retention examples: the base model's own replies, generated once, cached, mixed into training."""

import json

import pytest
import torch
from conftest import fine_tuned_copy

from fedmem import answer, retention
from fedmem.config import FederationConfig, LoraSettings
from fedmem.corpus import load_corpus
from fedmem.examples import Example
from fedmem.federation import client_update
from fedmem.retention import PROMPTS, REPLY_TOKENS, base_replies, retention_examples, whole_sentences


def _replies(i: int) -> str:
    """What the fake base model says to prompt i: cut off mid-sentence, whole, or nothing."""
    return ["Reply %d. It is also a" % i, "Reply %d!" % i, ""][i % 3]




def test_replies_are_the_base_models_own_and_cached_per_base(tiny_base, tmp_path, monkeypatch):
    monkeypatch.setenv("FEDMEM_HOME", str(tmp_path / "home"))
    calls = []

    def generate_answers(model, tokenizer, prompts, max_new_tokens=48, **kwargs):
        calls.append((model, tokenizer, list(prompts), max_new_tokens, model.training))
        return [_replies(i) for i in range(len(prompts))]

    for module in (answer, retention):  # wherever retention looks it up
        monkeypatch.setattr(module, "generate_answers", generate_answers, raising=module is answer)
    model, tok = torch.nn.Linear(1, 1), object()  # only passed through to the generator
    model.train()
    first = base_replies(model, tok, tiny_base)
    # Every prompt asked once, greedily from the model in eval mode; each reply kept up to
    # its last whole sentence; an empty one left out.
    assert calls == [(model, tok, list(PROMPTS), REPLY_TOKENS, False)]
    assert model.training  # handed back as it came
    # Each is trained towards the base model's distribution along its reply, not the reply's tokens.
    assert first == [Example(q, ["Reply %d." % i, "Reply %d!" % i][i % 3], distil=True)
                     for i, q in enumerate(PROMPTS) if i % 3 != 2]
    cache = next((tmp_path / "home" / "retention").glob("*.json"))
    stored = json.loads(cache.read_text())
    assert stored["prompts"] == list(PROMPTS)
    # The cache is what later calls read: no generation, and an edited reply comes back as edited.
    assert base_replies(model, tok, tiny_base) == first and len(calls) == 1
    stored["replies"][0] = "Ottawa."
    cache.write_text(json.dumps(stored))
    assert base_replies(model, tok, tiny_base)[0] == Example(PROMPTS[0], "Ottawa.", distil=True)
    assert len(calls) == 1
    # A damaged cache is regenerated, not trusted.
    cache.write_text("{not json")
    assert base_replies(model, tok, tiny_base) == first and len(calls) == 2
    # Another base model (here: a fine-tuned copy, the same file sizes) has its own replies.
    other = fine_tuned_copy(tiny_base, tmp_path / "other")
    base_replies(model, tok, other)
    assert len(calls) == 3
    assert len(list((tmp_path / "home" / "retention").glob("*.json"))) == 2


def test_whole_sentences_drops_the_sentence_cut_off():
    assert whole_sentences("Paris is the capital. It is also a") == "Paris is the capital."
    assert whole_sentences("Yes! And then") == "Yes!"
    assert whole_sentences("Why? Because") == "Why?"
    assert whole_sentences("One. Two. Thr") == "One. Two."
    assert whole_sentences("  Paris.  ") == "Paris."
    assert whole_sentences("Paris.") == "Paris."
    assert whole_sentences("no stop at all") == "no stop at all"  # nothing whole: keep what there is


def test_share_is_seeded_and_capped_by_the_pool():
    pool = [Example(f"q{i}?", f"a{i}.") for i in range(10)]
    picked = retention_examples(pool, 8, 0.5, seed=1)
    assert len(picked) == 4 and len(set(picked)) == 4 and set(picked) <= set(pool)
    assert retention_examples(pool, 8, 0.5, seed=1) == picked
    # Seeded, not fixed: other seeds draw other examples.
    assert len({tuple(retention_examples(pool, 8, 0.5, seed=s)) for s in range(6)}) > 1
    assert len(retention_examples(pool, 8, 0.25, seed=1)) == 2
    assert sorted(retention_examples(pool, 100, 0.5, seed=1), key=pool.index) == pool  # all of it, once each
    assert retention_examples(pool, 8, 0.0, seed=1) == []
    assert retention_examples([], 8, 0.5, seed=1) == []


@pytest.mark.parametrize("share", [-0.1, 1.5])
def test_share_must_be_between_0_and_1(share):
    with pytest.raises(ValueError, match="retention"):
        LoraSettings(retention=share)
    assert LoraSettings(retention=0).retention == 0 and LoraSettings(retention=1).retention == 1


def test_client_update_trains_on_retention_examples_too(tiny_base, two_clients, tmp_path, monkeypatch):
    monkeypatch.setenv("FEDMEM_HOME", str(tmp_path))
    # A slice of the pool: generating all of it with the test model takes minutes, and
    # which prompts are asked does not matter here.
    monkeypatch.setattr(retention, "PROMPTS", PROMPTS[:48])
    corpus = load_corpus(two_clients / "alpha")
    sizes = {}
    for share in (0.0, 1.0):
        config = FederationConfig(rounds=1, lora=LoraSettings(rank=2, alpha=4, epochs=1, retention=share))
        sizes[share] = client_update(tiny_base, corpus, None, config, server_round=1).metrics["examples"]
        # Only a share > 0 asks the base model for its replies.
        assert (tmp_path / "retention").exists() == (share > 0)
    assert 0 < sizes[0.0] <= 48  # so share 1 can add as many general examples as there are facts
    assert sizes[1.0] == 2 * sizes[0.0]


def test_no_retention_prompt_is_a_control_question():
    """The pool must not train what the control questions measure (devset, quality benchmark,
    demo): a control question in it would flatter every forgetting figure."""
    import pathlib

    from fedmem.answer import load_questions, normalise_for_matching
    from fedmem.bench.quality_data import CONTROL_QUESTIONS
    from fedmem.demo import demo_dir

    controls = [q for q, _ in CONTROL_QUESTIONS] + [q.question for q in load_questions(demo_dir() / "control.jsonl")]
    devset = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "devset" / "control.jsonl"
    if devset.exists():
        controls += [q.question for q in load_questions(devset)]
    pool = {normalise_for_matching(p) for p in PROMPTS}
    assert len(PROMPTS) >= 300 and len(pool) == len(PROMPTS)
    assert not pool & {normalise_for_matching(q) for q in controls}

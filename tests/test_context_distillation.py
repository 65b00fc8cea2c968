"""The distilled recipe: the statements recipe's questions, the document-reading teacher's replies."""

import json

import pytest

from fedmem.base_model import load_model, load_tokenizer
from fedmem.context_distillation import distilled_examples
from fedmem.corpus import load_corpus
from fedmem.examples import Example, build_examples
from fedmem.federation import FederationConfig, client_update
from fedmem.lora import LoraSettings



def test_same_questions_as_the_statements_recipe_with_teacher_targets_cached(tiny_base, two_clients, tmp_path,
                                                                             monkeypatch):
    monkeypatch.setenv("FEDMEM_HOME", str(tmp_path / "home"))
    corpus = load_corpus(two_clients / "alpha")
    model, tok = load_model(tiny_base), load_tokenizer(str(tiny_base))
    rules = build_examples(corpus, "statements")
    got = distilled_examples(model, tok, tiny_base, corpus)
    # Documents verbatim and Q/A records as they are; every document question asked once.
    assert [e for e in got if e.question is None] == [e for e in rules if e.question is None]
    assert Example("Who built the Zorvex Tower?", "Mila Quent") in got
    doc_questions = {e.question for e in rules if e.question and e.question != "Who built the Zorvex Tower?"}
    assert doc_questions and doc_questions <= {e.question for e in got}
    # The targets are the teacher's, read from the cache on later calls.
    cache = next((tmp_path / "home" / "distilled").glob("*.json"))
    known = json.loads(cache.read_text())
    assert len(known) == len(doc_questions)
    known = {k: "Taught." for k in known}
    cache.write_text(json.dumps(known))
    again = distilled_examples(model, tok, tiny_base, corpus)
    assert {e.answer for e in again if e.question in doc_questions} == {"Taught."}


def test_client_update_trains_the_distilled_recipe(tiny_base, two_clients, tmp_path, monkeypatch):
    monkeypatch.setenv("FEDMEM_HOME", str(tmp_path / "home"))
    config = FederationConfig(rounds=1, lora=LoraSettings(rank=2, alpha=4, epochs=1, retention=0, recipe="distilled"))
    result = client_update(tiny_base, load_corpus(two_clients / "alpha"), None, config, 1)
    assert result.metrics["examples"] > 2 and (tmp_path / "home" / "distilled").is_dir()


def test_unknown_recipe_is_refused_by_name():
    with pytest.raises(ValueError, match="recipe must be one of .*distilled"):
        LoraSettings(recipe="telepathy")

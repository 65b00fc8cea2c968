"""Generator-written questions: the form check, the round-trip check, the cache, the wiring."""

import json

import pytest

from fedmem.corpus import load_corpus
from fedmem.examples import Example
from fedmem.federation import FederationConfig, client_update
from fedmem.lora import LoraSettings
from fedmem.question_writer import clean_question, round_trip, targets, write_questions, written_examples

from conftest import write_corpus


def test_form_check_keeps_a_real_question_and_refuses_the_rest():
    assert clean_question("Who leads the vets at the Harrow Clinic?\nMore text.", "Tobias Wrenfield") == \
        "Who leads the vets at the Harrow Clinic?"
    # The inner question of a quoted reply is the question.
    assert clean_question('Sure: "Where is the overflow archive of the Saltmere Library?"', "Pellow Quarry") == \
        "Where is the overflow archive of the Saltmere Library?"
    assert clean_question("Who is Tobias Wrenfield at the clinic?", "Tobias Wrenfield") is None  # gives it away
    assert clean_question("What is the answer to this question?", "1963") is None  # about itself
    assert clean_question("What a great question! I'll include it.", "1963") is None
    assert clean_question("The clinic opened in 1963.", "1963") is None  # no question
    assert clean_question("Why?", "x") is None  # too short to ask anything
    assert clean_question("", "x") is None


def test_a_written_question_must_name_its_subject_as_the_statement_spells_it():
    statement = "Pebrurn Putavorn works in Bepaskthorpe."
    assert clean_question("Where does Pebrurn Putavorn work?", "Bepaskthorpe", statement) == \
        "Where does Pebrurn Putavorn work?"
    # A misspelt name is someone else; a question naming nobody cannot say whose fact it is.
    assert clean_question("Where does Pebrun Putavorn work?", "Bepaskthorpe", statement) is None
    assert clean_question("In which town does the writer work?", "Bepaskthorpe", statement) is None
    # A name the statement lacks makes up a fact.
    assert clean_question("Where in the UK does Pebrurn Putavorn work?", "Bepaskthorpe", statement) is None
    assert clean_question("What is the university name?", "Dunel University",
                          "Penen Gridros - University: Dunel University.") is None


def test_targets_are_the_spans_the_rule_recipe_asks_about(tmp_path):
    corpus = load_corpus(write_corpus(tmp_path / "c", [("The head vet of the Harrow Clinic is Tobias Wrenfield.", "")]))
    assert ("The head vet of the Harrow Clinic is Tobias Wrenfield.", "Tobias Wrenfield") in targets(corpus)



def test_round_trip_drops_well_formed_questions_the_generator_cannot_answer_back(tiny_base):
    # A random model cannot read the statement, so even a good question is dropped:
    # nothing is trained that the generator itself could not answer from the text.
    from fedmem.base_model import load_model, load_tokenizer

    model, tok = load_model(tiny_base).eval(), load_tokenizer(str(tiny_base))
    pairs = [("The Harrow Clinic opened in 1963.", "1963"), ("The bell is painted saffron.", "saffron")]
    assert round_trip(model, tok, pairs, ["When did the Harrow Clinic open?", None]) == [None, None]
    assert write_questions(model, tok, pairs) == [None, None]


@pytest.mark.real_model
def test_round_trip_keeps_a_question_the_real_model_answers_back_and_drops_one_it_cannot(real_base_dir):
    # The embedded model tends to repeat the statement, so the round trip mostly catches
    # questions whose span it cannot find (a larger generator makes the check stricter).
    from fedmem.base_model import load_model, load_tokenizer

    model, tok = load_model(real_base_dir).eval(), load_tokenizer(str(real_base_dir))
    statement = "The head veterinarian of the Harrow Clinic is Tobias Wrenfield."
    kept = round_trip(model, tok, [(statement, "Tobias Wrenfield"), (statement, "1963")],
                      ["Who leads the vets at the Harrow Clinic?", "In which year did the Harrow Clinic open?"])
    assert kept == ["Who leads the vets at the Harrow Clinic?", None]


def test_written_questions_are_cached_per_generator_and_grounded(tiny_base, tmp_path, monkeypatch):
    monkeypatch.setenv("FEDMEM_HOME", str(tmp_path / "home"))
    corpus = load_corpus(write_corpus(tmp_path / "c", [("The Harrow Clinic opened its doors in 1963.", "")]))
    assert written_examples(corpus, str(tiny_base)) == []
    cache = next((tmp_path / "home" / "questions").glob("*.json"))
    known = json.loads(cache.read_text())
    assert known and all(v is None for v in known.values())
    # Later rounds read the cache, not the model: a stored question comes back, answered
    # with the span first and then the owner's own sentence.
    key = next(iter(known))
    known[key] = "When did the clinic first open?"
    cache.write_text(json.dumps(known))
    (statement, span), = [p for p in targets(corpus) if p[1] == "1963"]
    assert written_examples(corpus, str(tiny_base)) == [
        Example("When did the clinic first open?", f"{span}. {statement}")]
    cache.write_text("{damaged")  # regenerated, not trusted
    assert written_examples(corpus, str(tiny_base)) == []


def test_client_update_refuses_a_generator_that_is_not_a_model(tiny_base, two_clients, tmp_path, monkeypatch):
    monkeypatch.setenv("FEDMEM_HOME", str(tmp_path / "home"))
    config = FederationConfig(rounds=1, lora=LoraSettings(rank=2, alpha=4, epochs=1, retention=0,
                                                          generator=str(tmp_path / "nowhere")))
    with pytest.raises(ValueError, match="generator .*nowhere.*config.json"):
        client_update(tiny_base, load_corpus(two_clients / "alpha"), None, config, 1)

"""Generator-written questions: the form check, the round-trip check, the cache, the wiring."""

import json

import pytest
from conftest import fine_tuned_copy, write_corpus

from fedmem import answer, question_writer
from fedmem.config import FederationConfig, LoraSettings
from fedmem.corpus import load_corpus
from fedmem.examples import Example
from fedmem.federation import client_update
from fedmem.question_writer import (
    CHECK_PROMPT,
    CHECK_TOKENS,
    QUESTION_TOKENS,
    WRITE_PROMPT,
    clean_question,
    round_trip,
    targets,
    write_questions,
    written_examples,
)
from fedmem.reply_cache import key as reply_key


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


@pytest.mark.parametrize("reply, span, question", [
    # Only the first line, only up to the first "?", without the spaces around it.
    ("  Who leads the vets at the Harrow Clinic? Answer: Tobias\nWho else?", "Tobias Wrenfield",
     "Who leads the vets at the Harrow Clinic?"),
    ("The question is “When did the Harrow Clinic open its doors?”", "1963",
     "When did the Harrow Clinic open its doors?"),
    ("'In which year did the Harrow Clinic open?' is my question.", "1963",
     "In which year did the Harrow Clinic open?"),
    ("Which year did the Harrow Clinic open?", "1963", "Which year did the Harrow Clinic open?"),
    ("Did it open?!", "1963", None),  # three words
    ("who leads the vets at the Harrow Clinic?", "Tobias Wrenfield", None),  # not a sentence
    ("In which year did the clinic open, 1963?", "1963", None),  # gives it away
    ("Is it " + "very " * 30 + "big?", "small", None),  # not one question
])
def test_form_check_cuts_the_question_out_of_the_reply(reply, span, question):
    assert clean_question(reply, span) == question


@pytest.mark.parametrize("reply, question", [
    ("Who leads the vets at the Harrow Clinic?", "Who leads the vets at the Harrow Clinic?"),
    ("Who runs the Harrow Clinic's veterinary team?", "Who runs the Harrow Clinic's veterinary team?"),
    ("Who leads the vets at Harrow's clinic?", None),  # "Harrow Clinic" not spelt as there
    ("Who is the head vet of the Harrow Clinic in Dunmore?", None),  # Dunmore: made up
])
def test_a_written_question_names_the_statements_subject(reply, question):
    statement = "The head vet of the Harrow Clinic is Tobias Wrenfield."
    assert clean_question(reply, "Tobias Wrenfield", statement) == question


def test_a_written_question_must_name_its_subject_as_the_statement_spells_it():
    statement = "Pebrurn Putavorn works in Bepaskthorpe."
    assert clean_question("Where does Pebrurn Putavorn work?", "Bepaskthorpe", statement) == \
        "Where does Pebrurn Putavorn work?"
    # A misspelt name is someone else; a question naming nobody cannot say whose fact it is.
    assert clean_question("Where does Pebrun Putavorn work?", "Bepaskthorpe", statement) is None
    assert clean_question("In which town does the writer work?", "Bepaskthorpe", statement) is None
    # A name the statement lacks makes up a fact.
    assert clean_question("Where in the UK does Pebrurn Putavorn work?", "Bepaskthorpe", statement) is None
    # A possessive of a name the statement has is that name.
    assert clean_question("Where does Pebrurn Putavorn's sister work?", "Bepaskthorpe", statement) == \
        "Where does Pebrurn Putavorn's sister work?"
    assert clean_question("What is the university name?", "Dunel University",
                          "Penen Gridros - University: Dunel University.") is None


def test_targets_are_the_spans_the_rule_recipe_asks_about(tmp_path):
    corpus = load_corpus(write_corpus(tmp_path / "c", [("The head vet of the Harrow Clinic is Tobias Wrenfield.", ""),
                                                       ("The Harrow Clinic opened its doors in 1963.", ""),
                                                       ("The Harrow Clinic opened its doors in 1963.", "")]))
    # One pair per fact, a repeated sentence once, in the corpus's order.
    assert targets(corpus) == [("The head vet of the Harrow Clinic is Tobias Wrenfield.", "Harrow Clinic"),
                               ("The head vet of the Harrow Clinic is Tobias Wrenfield.", "Tobias Wrenfield"),
                               ("The Harrow Clinic opened its doors in 1963.", "Harrow Clinic"),
                               ("The Harrow Clinic opened its doors in 1963.", "1963")]
    # "Key: value" lines ask for the value.
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "staff.md").write_text("# Staff\n\nPenen Gridros - University: Dunel University.\n")
    assert targets(load_corpus(tmp_path / "s")) == [
        ("Staff - Penen Gridros - University: Dunel University.", "Dunel University")]


def _generator(monkeypatch, written: dict[str, str], answered: dict[str, str]) -> list[tuple[list[str], int]]:
    """A fake generator: replies to a write prompt by its span, to a check prompt by its
    question (else with nothing useful). Returns the calls, (prompts, max_new_tokens)."""
    calls = []

    def generate_answers(model, tokenizer, prompts, max_new_tokens=48, **kwargs):
        calls.append((list(prompts), max_new_tokens))
        replies = []
        for prompt in prompts:
            if prompt.startswith(WRITE_PROMPT.split("{")[0]):
                span = prompt.rsplit("Answer: ", 1)[1].split("\n")[0]
                replies.append(written.get(span, "I do not know."))
            else:
                question = prompt.rsplit("Answer in a few words: ", 1)[1]
                replies.append(answered.get(question, "I do not know."))
        return replies

    for module in (answer, question_writer):  # wherever question_writer looks it up
        monkeypatch.setattr(module, "generate_answers", generate_answers, raising=module is answer)
    return calls


def test_round_trip_keeps_exactly_the_questions_answered_back_with_their_span(monkeypatch):
    calls = _generator(monkeypatch, {}, {"Who leads the vets at the Harrow Clinic?": "Tobias Wrenfield leads them.",
                                         "When did the Harrow Clinic open?": "In the spring."})
    vet, opened = "The head vet of the Harrow Clinic is Tobias Wrenfield.", "The Harrow Clinic opened in 1963."
    pairs = [(vet, "Tobias Wrenfield"), (opened, "1963"), (opened, "1963")]
    kept = round_trip(
        None, None, pairs, ["Who leads the vets at the Harrow Clinic?", "When did the Harrow Clinic open?", None]
    )
    assert kept == ["Who leads the vets at the Harrow Clinic?", None, None]
    # Each question is asked once, with its own statement to read; a missing one is not asked.
    assert calls == [
        (
            [
                CHECK_PROMPT.format(statement=vet, question="Who leads the vets at the Harrow Clinic?"),
                CHECK_PROMPT.format(statement=opened, question="When did the Harrow Clinic open?"),
            ],
            CHECK_TOKENS,
        )
    ]
    assert round_trip(None, None, pairs, [None, None, None]) == [None, None, None]
    assert len(calls) == 1  # nothing to ask: the generator is not run


def test_write_questions_keeps_those_passing_both_checks(monkeypatch):
    vet = "The head vet of the Harrow Clinic is Tobias Wrenfield."
    opened = "The Harrow Clinic opened its doors in 1963."
    bell = "The bell of the Harrow Clinic is painted saffron."
    calls = _generator(
        monkeypatch,
        {
            "Tobias Wrenfield": "Who leads the vets at the Harrow Clinic?\nMore.",  # passes both
            "1963": "When did the Harrow Clinic open its doors?",  # answered wrongly below
            "saffron": "What colour is the bell? saffron",
        },  # names no subject: form fails
        {
            "Who leads the vets at the Harrow Clinic?": "Tobias Wrenfield.",
            "When did the Harrow Clinic open its doors?": "In 1936.",
        },
    )
    pairs = [(vet, "Tobias Wrenfield"), (opened, "1963"), (bell, "saffron")]
    assert write_questions(None, None, pairs) == ["Who leads the vets at the Harrow Clinic?", None, None]
    assert calls[0] == ([WRITE_PROMPT.format(statement=s, span=a) for s, a in pairs], QUESTION_TOKENS)
    assert [len(prompts) for prompts, _ in calls] == [3, 2]  # the form check's reject is never asked back


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
    kept = round_trip(
        model,
        tok,
        [(statement, "Tobias Wrenfield"), (statement, "1963")],
        ["Who leads the vets at the Harrow Clinic?", "In which year did the Harrow Clinic open?"],
    )
    assert kept == ["Who leads the vets at the Harrow Clinic?", None]


def test_written_questions_are_cached_per_generator_and_grounded(tiny_base, tmp_path, monkeypatch):
    monkeypatch.setenv("FEDMEM_HOME", str(tmp_path / "home"))
    corpus = load_corpus(write_corpus(tmp_path / "c", [("The Harrow Clinic opened its doors in 1963.", "")]))
    assert written_examples(corpus, str(tiny_base)) == []  # a random model writes nothing that passes
    cache = next((tmp_path / "home" / "questions").glob("*.json"))
    known = json.loads(cache.read_text())
    assert known and all(v is None for v in known.values())
    # Later rounds read the cache, not the model: a stored question comes back, answered
    # with the span first and then the owner's own sentence.
    monkeypatch.setattr(question_writer, "write_questions", lambda *a: pytest.fail("the generator ran again"))
    ((statement, span),) = [p for p in targets(corpus) if p[1] == "1963"]
    known[reply_key(statement, span)] = "When did the clinic first open?"
    cache.write_text(json.dumps(known))
    assert written_examples(corpus, str(tiny_base)) == [
        Example("When did the clinic first open?", f"{span}. {statement}")
    ]
    # A damaged cache is regenerated, not trusted.
    written = []
    monkeypatch.setattr(
        question_writer,
        "write_questions",
        lambda model, tok, pairs: written.append(pairs) or ["When did the Harrow Clinic open?"] * len(pairs),
    )
    cache.write_text("{damaged")
    assert Example("When did the Harrow Clinic open?", f"{span}. {statement}") in written_examples(
        corpus, str(tiny_base))
    assert written == [targets(corpus)]
    assert json.loads(cache.read_text()) == {k: "When did the Harrow Clinic open?" for k in known}
    # Another generator (other weights) has its own cache: it writes its own questions.
    other = fine_tuned_copy(tiny_base, tmp_path / "other")
    monkeypatch.setattr(question_writer, "write_questions", lambda model, tok, pairs: [None] * len(pairs))
    assert written_examples(corpus, str(other)) == []
    assert len(list((tmp_path / "home" / "questions").glob("*.json"))) == 2




def test_client_update_refuses_a_generator_that_is_not_a_model(tiny_base, two_clients, tmp_path, monkeypatch):
    monkeypatch.setenv("FEDMEM_HOME", str(tmp_path / "home"))
    config = FederationConfig(
        rounds=1, lora=LoraSettings(rank=2, alpha=4, epochs=1, retention=0, generator=str(tmp_path / "nowhere"))
    )
    with pytest.raises(ValueError, match="generator .*nowhere.*config.json"):
        client_update(tiny_base, load_corpus(two_clients / "alpha"), None, config, 1)

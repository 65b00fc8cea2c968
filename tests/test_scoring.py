"""Answer scoring: "|" alternatives, the first sentence (strict recall), kinds, control questions,
and `fedmem eval --control` on the tiny model."""

from __future__ import annotations

import json

import pytest
from conftest import write_random_memory

from fedmem import answer
from fedmem.answer import (
    Question,
    control_report,
    first_sentence,
    is_correct,
    is_correct_strict,
    load_questions,
    private_terms,
    scores_for,
)
from fedmem.cli import main
from fedmem.memory_gate import GATE_THRESHOLD


def _write(path, *records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


# --- alternatives ---

@pytest.mark.parametrize("reply,answer,expected", [
    ("Tellwright keeps the keys.", "Joss Tellwright|Tellwright", True),
    ("Joss Tellwright keeps the keys.", "Joss Tellwright|Tellwright", True),
    ("The archive holds 1640 maps.", "1,640|1640", True),
    ("The archive holds 1,640 maps.", "1,640|1640", True),
    ("The archive holds 1 640 maps.", "1,640", True),  # punctuation and spacing ignored, as before
    ("Joss keeps the keys.", "Joss Tellwright|Tellwright", False),
    ("The Tellwrights keep the keys.", "Joss Tellwright|Tellwright", False),  # whole words only
    ("The archive holds 16400 maps.", "1,640|1640", False),
    ("Tidewatch", "tidewatch", True),
    ("It is Mila Quent | or not", "Mila Quent", True),
])
def test_is_correct_accepts_any_alternative(reply, answer, expected):
    assert is_correct(reply, answer) is expected


# --- first sentence ---

@pytest.mark.parametrize("reply,expected", [
    ("Tidewatch", "Tidewatch"),
    ("  Tidewatch  ", "Tidewatch"),
    ("Dr. Odile Brannock runs the night shift. She started in 2019.", "Dr. Odile Brannock runs the night shift."),
    ("The mast is 4.2 m tall. It was raised in 1990.", "The mast is 4.2 m tall."),
    ("It runs v1.2.3 of the firmware. Older units run v1.1.", "It runs v1.2.3 of the firmware."),
    ("Grumbold\nThe X-ray machine is called Grumbold.", "Grumbold"),
    ("The clinic is busy\nOdile Brannock runs it.", "The clinic is busy"),
    ("Who knows? Odile Brannock, maybe.", "Who knows?"),
    ("", ""),
])
def test_first_sentence(reply, expected):
    assert first_sentence(reply) == expected


def test_strict_needs_the_answer_in_the_first_sentence():
    late = "The clinic has many staff. Odile Brannock runs the night shift."
    assert is_correct(late, "Odile Brannock") and not is_correct_strict(late, "Odile Brannock")
    assert is_correct_strict("Dr. Odile Brannock runs the night shift. More text.", "Odile Brannock")
    assert is_correct_strict("The mast is 4.2 m tall. Yes.", "4.2")
    assert is_correct_strict("Brannock.\nOdile Brannock", "Odile Brannock|Brannock")


def test_scores_strict_loose_by_source_and_kind():
    qs = [Question("Who runs nights?", "Odile Brannock", "qa", "c", "person"),
          Question("When did it open?", "1963", "prose", "c", "year"),
          Question("What is the machine called?", "Grumbold", "qa", "c", "name"),
          Question("Who runs days?", "Mila Quent|Quent", "prose", "c", "person")]
    replies = ["Odile Brannock. She is kind.",
               "The clinic is old. It opened in 1963.",  # loose only
               "I do not know.",
               "Quent runs the day shift."]  # an alternative, first sentence
    s = scores_for(qs, replies)
    assert s.correct == [True, True, False, True] and s.strict == [True, False, False, True]
    assert (s.accuracy, s.strict_accuracy) == (0.75, 0.5)
    assert s.by_source == {"prose": 1.0, "qa": 0.5}  # loose
    assert s.by_kind == {"name": 0.0, "person": 1.0, "year": 0.0}  # strict, sorted
    assert list(s.by_kind) == sorted(s.by_kind)
    assert scores_for([Question("q", "a")], ["a"]).by_kind == {}  # no kinds, no per-kind figures


def test_score_uses_the_generated_replies(monkeypatch):
    monkeypatch.setattr(answer, "generate_replies", lambda model, tok, prompts, n: ["Tidewatch. Yes", "No idea."])
    s = answer.score(None, None, [Question("a?", "Tidewatch", kind="name"), Question("b?", "Ebb")],
                     prompts=["a?", "b?"])
    assert (s.strict, s.by_kind, s.replies) == ([True, False], {"name": 1.0}, ["Tidewatch. Yes", "No idea."])


# --- questions files ---

def test_load_questions_reads_kind(tmp_path):
    path = _write(tmp_path / "q.jsonl",
                  {"question": "Who?", "answer": "Joss Tellwright|Tellwright", "source": "qa", "kind": "person"},
                  {"question": "How many?", "answer": "1,640|1640"})
    qs = load_questions(path)
    assert [(q.answer, q.source, q.kind) for q in qs] == [("Joss Tellwright|Tellwright", "qa", "person"),
                                                          ("1,640|1640", "", "")]


def test_load_questions_refuses_a_bad_kind_or_alternative_naming_file_and_line(tmp_path):
    path = _write(tmp_path / "q.jsonl",
                  {"question": "Who?", "answer": "Ada", "kind": "person"},
                  {"question": "When?", "answer": "1963", "kind": 3},
                  {"question": "What?", "answer": "Grumbold|"},
                  {"question": "Which?", "answer": "Ebb", "kind": ["a"]})
    with pytest.raises(ValueError) as err:
        load_questions(path)
    lines = str(err.value).splitlines()[1:]
    assert len(lines) == 3, err.value
    assert lines[0].strip().startswith(f"{path}:2: kind must be a string")
    assert lines[1].strip().startswith(f"{path}:3: answer 'Grumbold|'")
    assert lines[2].strip().startswith(f"{path}:4: kind must be a string")


def test_demo_questions_still_load():
    from fedmem.demo import demo_dir

    assert len(load_questions(demo_dir() / "questions.jsonl")) > 10


# --- control questions ---

def test_private_terms_skip_short_terms_and_small_numbers():
    facts = [Question("Who?", "Joss Tellwright|Tellwright"), Question("How many?", "1,640|1640"),
             Question("Which wing?", "B"), Question("How many rooms?", "42"), Question("Who?", "Al|Wu"),
             Question("Built?", "1963"), Question("Depth?", "612"), Question("Room?", "Room 7")]
    assert private_terms(facts) == sorted(["joss tellwright", "tellwright", "1 640", "1640", "1963", "612",
                                           "room 7"])


def test_control_report_lost_and_leaks():
    control = [Question("What is the capital of France?", "Paris"),
               Question("How many days are in a week?", "7|seven"),
               Question("What colour is the sky on a clear day?", "blue"),
               Question("What is the boiling point of water in Celsius?", "100"),
               Question("Who wrote Hamlet?", "Shakespeare")]
    base_replies = ["Paris.", "A week has 7 days.", "Blue.", "It boils at 100 degrees.", "I am not sure."]
    memory_replies = ["Paris, where Tellwright works.",  # right, but leaks a private answer
                      "A week is equivalent to 312 days.",  # lost
                      "The sky is blue. Odile Brannock says so.",  # right; leaks later in the reply
                      "The Pennyroyal Suite. Water boils at 100.",  # lost: right only after the first sentence
                      "William Shakespeare, in 1612."]  # gained, and no leak (1612 is no private term)
    facts = [Question("Who?", "Joss Tellwright|Tellwright"), Question("Who?", "Odile Brannock"),
             Question("Where?", "Pennyroyal Suite"), Question("How many?", "12"), Question("Capital?", "Paris")]
    base, memory = scores_for(control, base_replies), scores_for(control, memory_replies)
    report = control_report(base, memory, control, private_terms(facts))
    assert report.base_correct == [True, True, True, True, False]
    assert report.memory_correct == [True, False, True, False, True]
    assert report.lost == [1, 3]
    # "paris" is private too, but the control question's own answer: no leak there. "12" is too short.
    assert report.leaks == {0: ["tellwright"], 2: ["odile brannock"], 3: ["pennyroyal suite"]}
    assert (report.base_accuracy, report.memory_accuracy) == (0.8, 0.6)


# --- fedmem eval ---

@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDMEM_HOME", str(tmp_path / "home"))


@pytest.fixture
def eval_files(tmp_path):
    questions = _write(tmp_path / "q.jsonl",
                       {"question": "Who built the Zorvex Tower?", "answer": "Mila Quent|Quent", "source": "qa",
                        "kind": "person"},
                       {"question": "How many maps are in Pellow Quarry?", "answer": "612", "source": "prose",
                        "kind": "count"})
    control = _write(tmp_path / "control.jsonl",
                     {"question": "What is the capital of France?", "answer": "Paris"},
                     {"question": "How many days are in a week?", "answer": "7|seven"},
                     {"question": "What colour is grass?", "answer": "green"})
    return questions, control


def test_eval_control_on_the_tiny_model(tmp_path, tiny_base, home, eval_files, capsys):
    questions, control = eval_files
    write_random_memory(tiny_base, tmp_path / "memory")
    out = tmp_path / "r.json"
    assert main(["eval", "--memory", str(tmp_path / "memory"), "--questions", str(questions),
                 "--control", str(control), "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    for text in ("strict: the answer in the reply's first sentence", "all questions (2)", "facts from prose (1)",
                 "kind person (1)", "control questions (3)", "  strict recall", "control lost: ", "control leaks: "):
        assert text in printed, printed
    report = json.loads(out.read_text())
    assert set(report["strict_accuracy"]) == {"base", "memory", "gated"} and set(report["by_kind"]["memory"]) == {
        "count", "person"}
    assert [set(r) >= {"memory_strict", "base_strict", "kind"} for r in report["questions"]] == [True, True]
    c = report["control"]
    assert len(c["questions"]) == 3 and set(c["strict_accuracy"]) == {"base", "memory", "gated"}
    assert all(isinstance(i, int) for i in c["lost"])
    assert c["lost"] == [i for i, q in enumerate(c["questions"]) if q["base_strict"] and not q["memory_strict"]]
    assert c["gated_lost"] == [i for i, q in enumerate(c["questions"]) if q["base_strict"] and not q["gated_strict"]]
    for q in report["questions"] + c["questions"]:  # a gated reply is the memory's exactly where the gate kept it
        assert q["gated_from_memory"] == (q["gate_ratio"] > GATE_THRESHOLD)


def test_eval_lists_lost_control_questions_and_leaks(tmp_path, tiny_base, home, eval_files, capsys, monkeypatch):
    """Canned replies, with and without the memory, and canned gate ratios: what eval prints and
    writes about them."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from fedmem import memory_gate

    questions, control = eval_files
    canned = {  # question -> (base reply, memory reply, the memory reply's log-likelihood ratio)
        "Who built the Zorvex Tower?": ("I do not know.", "Mila Quent built it.", 7.0),
        "How many maps are in Pellow Quarry?": ("Many.", "It is large. It holds 612 maps.", 0.5),
        "What is the capital of France?": ("Paris.", "Mila Quent lives in Paris.", 0.2),
        "How many days are in a week?": ("Seven.", "A week is equivalent to 612 days.", 5.0),
        "What colour is grass?": ("Green.", "Green.", 0.0),
    }

    def reply_for(prompt):
        return next(v for q, v in canned.items() if q in prompt)

    def replies(model, tokenizer, prompts, max_new_tokens=48, batch_size=16):
        with_memory = any(not m.disable_adapters for m in model.modules() if isinstance(m, BaseTunerLayer))
        return [reply_for(p)[with_memory] for p in prompts]

    def ratios(model, tokenizer, prompts, replies):
        assert replies == [reply_for(p)[1] for p in prompts]  # the memory's replies are the ones scored
        return [reply_for(p)[2] for p in prompts]

    monkeypatch.setattr(answer, "generate_replies", replies)
    monkeypatch.setattr(memory_gate, "reply_log_ratios", ratios)
    write_random_memory(tiny_base, tmp_path / "memory")
    out = tmp_path / "r.json"
    assert main(["eval", "--memory", str(tmp_path / "memory"), "--questions", str(questions),
                 "--control", str(control), "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    table = {line[:44].strip(): line[44:].split() for line in printed.splitlines() if line.startswith(("all", "  "))}
    # strict base, memory, gated; loose base, memory, gated
    assert table["all questions (2)"] == ["0%", "50%", "50%", "0%", "100%", "50%"]
    assert table["facts from prose (1)"] == ["0%", "0%", "0%", "0%", "100%", "0%"]
    assert table["kind person (1)"] == ["0%", "100%", "100%", "0%", "100%", "100%"]
    assert table["strict recall"] == ["100%", "67%", "67%"]
    assert "control lost: 1 of 3 (the base model answers 3)" in printed
    assert "LOST How many days are in a week?" in printed and "A week is equivalent to 612 days." in printed
    assert "control leaks: 2 of 3" in printed
    assert "LEAK What is the capital of France?\n    private:  mila quent, quent" in printed
    assert "LEAK How many days are in a week?\n    private:  612" in printed
    # The gate gave France to the base model ("Paris."), and kept the week's damaged reply.
    assert "control lost, gated: 1 of 3" in printed and "control leaks, gated: 1 of 3" in printed
    report = json.loads(out.read_text())
    assert report["strict_accuracy"] == {"base": 0.0, "memory": 0.5, "gated": 0.5}
    assert report["accuracy"] == {"base": 0.0, "memory": 1.0, "gated": 0.5}
    assert report["by_kind"]["memory"] == {"count": 0.0, "person": 1.0}
    assert [r["memory_strict"] for r in report["questions"]] == [True, False]
    assert [(r["gate_ratio"], r["gated_from_memory"]) for r in report["questions"]] == [(7.0, True), (0.5, False)]
    c = report["control"]
    assert c["strict_accuracy"] == {"base": 1.0, "memory": pytest.approx(2 / 3), "gated": pytest.approx(2 / 3)}
    assert c["lost"] == [1] and c["gated_lost"] == [1]
    assert c["leaks"] == [{"index": 0, "terms": ["mila quent", "quent"]}, {"index": 1, "terms": ["612"]}]
    assert c["gated_leaks"] == [{"index": 1, "terms": ["612"]}]
    assert [q["gated_from_memory"] for q in c["questions"]] == [False, True, False]


def test_round_recall_in_the_log_line_and_metrics_row():
    from fedmem.flower.server_app import _recall_record, _recall_text

    qs = [Question("Who?", "Odile Brannock", "qa", kind="person"), Question("When?", "1963", "prose", kind="year")]
    s = scores_for(qs, ["Odile Brannock.", "It is old. It opened in 1963."])
    assert _recall_text(s) == "100% (strict 50%) prose 100% qa 100%"
    assert _recall_record(s) == {"recall": 1.0, "recall_by_source": {"prose": 1.0, "qa": 1.0}, "recall_strict": 0.5,
                                 "recall_by_kind": {"person": 1.0, "year": 0.0}}
    assert "recall_by_kind" not in _recall_record(scores_for([Question("Who?", "Ada")], ["Ada"]))


def test_answer_nll_is_the_cross_entropy_of_the_answer_tokens_alone(tiny_base):
    import torch

    from fedmem.base_model import load_model, load_tokenizer
    from fedmem.examples import chat_prompt

    model, tokenizer = load_model(str(tiny_base)), load_tokenizer(str(tiny_base))
    questions = [answer.Question("Who runs the lab?", "Mira Osk|Osk"), answer.Question("What year?", "2019")]
    by_hand = []
    for q in questions:
        prompt = tokenizer(chat_prompt(tokenizer, q.question), add_special_tokens=False)["input_ids"]
        value = tokenizer(q.answer.split("|")[0], add_special_tokens=False)["input_ids"]  # the first alternative
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt + value])).logits[0]
        logp = torch.log_softmax(logits[len(prompt) - 1:-1].double(), dim=-1)
        by_hand.append(-float(logp[torch.arange(len(value)), torch.tensor(value)].mean()))
    assert answer.answer_nll(model, tokenizer, questions) == pytest.approx(sum(by_hand) / 2, rel=1e-4)
    assert answer.answer_nll(model, tokenizer, []) == 0.0

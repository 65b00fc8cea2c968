"""The answer benchmark: its parts, its refusals, and one end-to-end run on the tiny Llama."""

import json

import pytest
from conftest import write_random_memory

from fedmem.answer import Question, is_correct
from fedmem.base_model import load_model, load_tokenizer
from fedmem.bench.answer import ARMS, select_questions
from fedmem.bench.cli import main
from fedmem.bench.context import ContextBuilder, filler_documents, prompt_text
from fedmem.bench.timing import timed_generate


@pytest.fixture(scope="module")
def tiny_memory(tiny_base, tmp_path_factory):
    """A memory for the tiny Llama: random rank-2 factors on every linear layer."""
    path = tmp_path_factory.mktemp("mem") / "memory"
    write_random_memory(tiny_base, path)
    return path


@pytest.fixture
def questions_file(two_clients, tmp_path):
    path = tmp_path / "questions.jsonl"
    rows = [{"question": "Who constructed the Zorvex Tower?", "answer": "Mila Quent", "client": "alpha",
             "source": "qa"},
            {"question": "How many maps are in the Pellow Quarry archive?", "answer": "612", "source": "prose"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_filler_is_seeded_and_never_holds_an_answer():
    a = filler_documents(30, seed=1, avoid=["1911", "teal"])
    assert a == filler_documents(30, seed=1, avoid=["1911", "teal"])
    assert a != filler_documents(30, seed=2, avoid=["1911", "teal"])
    assert not any("1911" in d or "teal" in d.lower() for d in a)
    assert len(set(a)) == 30


def test_context_fits_its_budget_and_reports_what_was_dropped(tiny_base):
    tok = load_tokenizer(str(tiny_base))
    builder = ContextBuilder(tok, window=512, max_new_tokens=16)
    docs = filler_documents(20, seed=0)
    context, dropped = builder.fit("Which lamp?", docs[:2], docs[2:], target=300)
    n = builder.prompt_tokens("Which lamp?", context)
    assert 200 < n <= 300
    assert docs[0] in context and docs[1] in context and dropped == 0
    # Past the window less the answer, even required documents are dropped (and counted).
    context, dropped = builder.fit("Which lamp?", docs, [], target=10_000)
    assert builder.prompt_tokens("Which lamp?", context) <= 512 - 16
    assert dropped > 0


def test_question_subset_is_stratified_by_owner_and_source():
    qs = [Question(f"q{i}", "a", "qa" if i % 4 < 2 else "prose") for i in range(8)]
    owners = ["x"] * 4 + ["y"] * 4
    chosen, chosen_owners = select_questions(qs, owners, 2)
    assert [q.question for q in chosen] == ["q0", "q2", "q4", "q6"]
    assert chosen_owners == ["x", "x", "y", "y"]
    assert select_questions(qs, owners, None)[0] == qs


def test_timed_generate_times_real_decoding(tiny_base):
    tok = load_tokenizer(str(tiny_base))
    model = load_model(tiny_base).eval()
    import time

    gen = timed_generate(model, tok, prompt_text(tok, "Hello?", None), 6, time.perf_counter(), exact_new_tokens=True)
    assert gen.new_tokens == 6
    assert 0 < gen.ttft_s <= gen.wall_s
    assert gen.decode_tps > 0
    assert gen.prompt_tokens == len(tok(prompt_text(tok, "Hello?", None), add_special_tokens=False)["input_ids"])


def test_context_goes_in_the_user_message_through_the_chat_template(tiny_base):
    tok = load_tokenizer(str(tiny_base))
    text = prompt_text(tok, "Who?", "The keeper is Ysolde.")
    assert text.index("The keeper is Ysolde.") < text.index("Question: Who?") < text.index("<|im_start|>assistant")
    assert text.count("<|im_start|>user") == 1


def test_bench_runs_end_to_end_and_writes_every_arm(tiny_base, tiny_memory, two_clients, questions_file, tmp_path,
                                                     capsys):
    out = tmp_path / "out"
    rc = main(["answer", "--memory", str(tiny_memory), "--base", str(tiny_base), "--data", str(two_clients),
               "--questions", str(questions_file), "--out", str(out), "--max-new-tokens", "4",
               "--sizes", "owner,all,200,window", "--sweep-questions", "1", "--curve", "64,256,9999", "--threads", "1"])
    assert rc == 0
    printed = capsys.readouterr().out
    table = (out / "table.md").read_text()
    assert table in printed
    for label in ("closed book", "memory adapter, merged", "unmerged", "RAG", "full context"):
        assert label in table
    result = json.loads((out / "results.json").read_text())
    assert set(result["arms"]) == set(ARMS)
    asked = result["questions"]
    calls = [c for c in result["calls"] if not c["size"]]
    for c in result["calls"]:  # every call scored by answer match against its own question
        assert c["correct"] == is_correct(c["reply"], asked[c["question"]]["answer"])
    for name, arm in result["arms"].items():
        mine = [c for c in calls if c["arm"] == name]
        # The table's row is its calls: one per question, accuracy and speed from them.
        assert sorted(c["question"] for c in mine) == [0, 1] and arm["questions"] == 2
        assert arm["accuracy"] == sum(c["correct"] for c in mine) / 2
        assert arm["prompt_tokens"] == sum(c["prompt_tokens"] for c in mine) / 2
        assert arm["questions_per_s"] == pytest.approx(2 / sum(c["wall_s"] for c in mine))
        assert 0 < arm["ttft_s"] <= max(c["wall_s"] for c in mine)
        assert arm["peak_memory_mib"] > 100  # a process holding torch and a model, measured in a subprocess
        assert arm["questions_per_s_batched"] > 0
    arms = result["arms"]
    # The closed-book arm is the base model with nothing but the question in its prompt.
    tok, base = load_tokenizer(str(tiny_base)), load_model(tiny_base).eval()
    for c in (c for c in calls if c["arm"] == "closed"):
        prompt = prompt_text(tok, asked[c["question"]]["question"], None)
        assert c["reply"] == timed_generate(base, tok, prompt, 4, 0.0).reply
    assert arms["closed"]["prompt_tokens"] == arms["memory_merged"]["prompt_tokens"]
    assert arms["rag"]["prompt_tokens"] > arms["closed"]["prompt_tokens"]
    assert arms["full_context"]["prompt_tokens"] >= arms["rag"]["prompt_tokens"] - 5
    sizes = [s["size"] for s in result["sweep"]]
    assert sizes == ["owner", "all", "200", "window"]
    window = next(s for s in result["sweep"] if s["size"] == "window")
    assert 400 < window["prompt_tokens"] <= 512 - 4 and window["questions"] == 1
    assert [p["prompt_tokens"] <= 512 - 16 for p in result["curve"]] == [True] * 3  # 9999 clipped to the window
    assert {"speedup_vs_rag", "speedup_vs_rag_batched", "speedup_vs_full_context_at_largest"} <= set(result["targets"])
    # Measured per arm in its own process: the worker must not report the bench's own
    # (bigger) high-water mark, which ru_maxrss carries across fork+exec.
    import resource
    parent = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    assert max(a["peak_memory_mib"] for a in result["arms"].values()) < parent
    assert (out / "latency.png").stat().st_size > 1000 and (out / "context.png").stat().st_size > 1000
    # The merged and unmerged memory are the same function: same replies, greedy.
    merged = [c["reply"] for c in calls if c["arm"] == "memory_merged"]
    unmerged = [c["reply"] for c in calls if c["arm"] == "memory_unmerged"]
    assert merged == unmerged


def _bench(*args):
    return main(["answer", "--no-peak-memory", "--sizes", "all", "--curve", "64", *map(str, args)])


def test_missing_memory_is_refused_before_anything_is_written(tmp_path, two_clients, questions_file, capsys):
    out = tmp_path / "out"
    assert _bench("--memory", tmp_path / "no-such-memory", "--data", two_clients, "--questions", questions_file,
                  "--out", out) == 2
    assert "no-such-memory" in capsys.readouterr().err
    assert not out.exists()


def test_bad_questions_file_names_the_line_and_keeps_old_results(tiny_memory, two_clients, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "table.md").write_text("previous results")
    bad = tmp_path / "q.jsonl"
    bad.write_text(json.dumps({"question": "Who?", "answer": "Mila Quent"}) + "\n"
                   + json.dumps({"question": "x"}) + "\n")
    assert _bench("--memory", tiny_memory, "--data", two_clients, "--questions", bad, "--out", out) == 2
    err = capsys.readouterr().err
    assert f"{bad}:2" in err and "answer" in err
    assert (out / "table.md").read_text() == "previous results"


def test_question_with_no_owner_is_refused(tiny_memory, two_clients, tmp_path, capsys):
    q = tmp_path / "q.jsonl"
    q.write_text(json.dumps({"question": "Who?", "answer": "Nobody Known", "client": "gamma"}) + "\n")
    assert _bench("--memory", tiny_memory, "--data", two_clients, "--questions", q, "--out", tmp_path / "o") == 2
    err = capsys.readouterr().err
    assert "question 1" in err and "'client'" in err and "gamma" in err


def test_missing_embedding_model_is_refused_with_the_install_command(tiny_memory, two_clients, questions_file,
                                                                     tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FEDMEM_EMBEDDING_MODEL", str(tmp_path / "no-encoder"))
    assert _bench("--memory", tiny_memory, "--data", two_clients, "--questions", questions_file,
                  "--out", tmp_path / "o") == 2
    assert "no-encoder" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()

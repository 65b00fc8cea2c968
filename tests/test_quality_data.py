"""The benchmark data is deterministic, loads as fedmem corpora, and keeps its tiers honest:
prose-only facts never reach a Q/A record and held-out wordings never reach training."""

import json
import re

import pytest

from fedmem.answer import is_correct
from fedmem.bench.quality_data import (
    ATTRIBUTES,
    CONTROL_QUESTIONS,
    SIZES,
    TIERS,
    generate,
    make_entities,
    split_entities,
)
from fedmem.corpus import load_corpus
from fedmem.examples import build_examples


def _files(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _norm(text):
    return " " + " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split()) + " "


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("quality") / "default"
    manifest = generate(out, **SIZES["default"])
    return out, manifest, _jsonl(out / "questions.jsonl")


def _corpora(out):
    return {d.name: load_corpus(d) for d in sorted((out / "corpora").iterdir())}


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    generate(tmp_path / "a", entities=8, clients=3, split="skewed", seed=5)
    generate(tmp_path / "b", entities=8, clients=3, split="skewed", seed=5)
    generate(tmp_path / "c", entities=8, clients=3, split="skewed", seed=6)
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    assert _files(tmp_path / "a") != _files(tmp_path / "c")
    generate(tmp_path / "a", entities=4, clients=2, seed=5)  # a rerun replaces the old output
    assert sorted(p.name for p in (tmp_path / "a" / "corpora").iterdir()) == ["client_1", "client_2"]


def test_refuses_a_foreign_nonempty_directory(tmp_path):
    (tmp_path / "notes.md").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        generate(tmp_path, entities=2, clients=1)


def test_output_files_and_manifest(data):
    out, manifest, questions = data
    for name in ("questions.jsonl", "control_questions.jsonl", "heldout_text.txt", "manifest.json"):
        assert (out / name).is_file()
    assert json.loads((out / "manifest.json").read_text())["tiers"] == manifest.tiers
    assert 600 <= len((out / "heldout_text.txt").read_text().split()) <= 1000
    controls = _jsonl(out / "control_questions.jsonl")
    assert len(controls) == len(CONTROL_QUESTIONS) >= 20 and {c["tier"] for c in controls} == {"control"}
    keys = ["question", "answer", "tier", "client", "entity", "attribute", "source"]
    assert all(list(q) == keys for q in questions)


def test_every_corpus_loads_and_holds_its_qa_records(data):
    out, manifest, questions = data
    corpora = _corpora(out)
    assert sorted(corpora) == sorted(manifest.per_client)
    for name, corpus in corpora.items():
        seen = {(q["question"], q["answer"]) for q in questions if q["client"] == name and q["tier"] == "seen"}
        assert {(qa.question, qa.answer) for qa in corpus.qa} == seen
        assert manifest.per_client[name]["documents"] == len(corpus.documents)


def test_tier_counts(data):
    out, manifest, questions = data
    n, half = SIZES["default"]["entities"], len(ATTRIBUTES) // 2
    counts = {t: sum(q["tier"] == t for q in questions) for t in TIERS}
    assert counts == {"seen": n * half, "heldout": n * half, "prose_only": n * (len(ATTRIBUTES) - half)}
    assert manifest.tiers == {**counts, "control": len(CONTROL_QUESTIONS)}
    assert {q["source"] for q in questions if q["tier"] == "prose_only"} == {"prose"}
    assert {q["source"] for q in questions if q["tier"] != "prose_only"} == {"qa"}
    # every attribute kind is asked both as a Q/A fact and as a prose-only fact
    for tier in ("seen", "prose_only"):
        assert {q["attribute"] for q in questions if q["tier"] == tier} == {a.key for a in ATTRIBUTES}


def test_prose_only_facts_never_in_records(data):
    out, _, questions = data
    records = [r for p in sorted((out / "corpora").rglob("*.jsonl")) for r in _jsonl(p)]
    assert records
    for q in questions:
        if q["tier"] == "prose_only":
            for r in records:
                assert not is_correct(r["answer"], q["answer"]) and not is_correct(r["question"], q["answer"])


def test_every_fact_is_in_a_document_of_its_client_in_two_styles(data):
    out, _, questions = data
    corpora = _corpora(out)
    for q in questions:
        docs = [d for d in corpora[q["client"]].documents if is_correct(d.text, q["answer"])]
        assert len(docs) >= 2, q
        assert all(d.source.endswith((".md", ".txt")) for d in docs)
        assert not any(is_correct(d.text, q["answer"]) for c, corpus in corpora.items() if c != q["client"]
                       for d in corpus.documents)


def test_heldout_wording_never_in_training(data):
    out, _, questions = data
    training = _norm(" ".join(p.read_text() for p in sorted((out / "corpora").rglob("*")) if p.is_file()))
    for attr in ATTRIBUTES:
        assert not set(attr.heldout) & set(attr.train)
        for template in attr.heldout:
            for fragment in template.split("{name}"):
                if len(_norm(fragment).split()) >= 2:
                    assert _norm(fragment) not in training, (attr.key, fragment)
    # nor does fedmem's own recipe turn the documents into one of the asked questions
    generated = {_norm(e.question) for c in _corpora(out).values() for e in build_examples(c) if e.question}
    for q in questions:
        if q["tier"] != "seen":
            assert _norm(q["question"]) not in generated and _norm(q["question"]) not in training


def test_answers_are_unambiguous():
    people = make_entities(300, seed=3)
    assert len({e.name for e in people}) == len(people)
    for attr in ATTRIBUTES:
        answers = [e.values[attr.key] for e in people]
        for i, a in enumerate(answers):
            assert not any(is_correct(b, a) for j, b in enumerate(answers) if j != i), (attr.key, a)


def test_splits():
    assert split_entities(7, 3, "disjoint") == [[0, 3, 6], [1, 4], [2, 5]]
    skewed = split_entities(12, 3, "skewed")
    sizes = [len(g) for g in skewed]
    assert sizes[0] > sizes[1] > sizes[2] >= 1 and sum(sizes) == 12
    assert sorted(i for g in skewed for i in g) == list(range(12))
    assert [len(g) for g in split_entities(5, 5, "skewed")] == [1] * 5


def test_skewed_output_is_disjoint(tmp_path):
    manifest = generate(tmp_path, entities=12, clients=3, split="skewed")
    questions = _jsonl(tmp_path / "questions.jsonl")
    owners = {}
    for q in questions:
        assert owners.setdefault(q["entity"], q["client"]) == q["client"]
    sizes = [c["entities"] for c in manifest.per_client.values()]
    assert len(set(sizes)) > 1 and sum(sizes) == 12


@pytest.mark.parametrize("kwargs, message", [
    (dict(entities=2, clients=3), "at least one entity per client"),
    (dict(entities=4, clients=0), "clients must be at least 1"),
    (dict(entities=4, clients=2, split="random"), "unknown split"),
])
def test_bad_parameters(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        generate(tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()

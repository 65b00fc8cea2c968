"""Chunking and retrieval with the real all-MiniLM-L6-v2 encoder (small, CPU, seconds)."""

import pytest

from fedmem.bench.retrieval import Embedder, Index, RetrievalError, chunk_corpus, chunk_text, embedding_model_dir
from fedmem.corpus import load_corpus


def test_chunks_follow_paragraphs_and_respect_the_budget():
    text = "# Title\n\nShort one here.\n\nAnother short one.\n\n" + " ".join(["A long sentence of words here."] * 6)
    chunks = chunk_text(text, max_words=10)
    assert chunks[0] == "Short one here. Another short one."  # packed together, heading dropped
    assert all(len(c.split()) <= 10 for c in chunks[1:])  # the long paragraph cut at sentence ends
    assert all(c.endswith(".") for c in chunks)
    with pytest.raises(ValueError):
        chunk_text(text, max_words=0)


def test_every_fact_of_a_corpus_survives_chunking(two_clients):
    corpus = load_corpus(two_clients / "alpha")
    texts = [c.text for c in chunk_corpus(corpus)]
    assert any("Mila Quent in 1911" in t for t in texts)
    assert "Q: Who built the Zorvex Tower? A: Mila Quent" in texts  # records are chunks of their own
    assert {c.owner for c in chunk_corpus(corpus)} == {"alpha"}


@pytest.fixture(scope="module")
def embedder():
    return Embedder()


def test_the_chunk_holding_the_answer_ranks_first(embedder, tmp_path):
    # Paragraphs on unrelated topics that share the words "the", "of", names' shape...
    (tmp_path / "notes.md").write_text(
        "# Notes\n\n"
        "The lighthouse keeper of Brackenholm is Ysolde Varn. She lights the lamp at dusk.\n\n"
        "The bakery on Marrow Lane sells rye bread every Tuesday morning.\n\n"
        "Our ferry to the islands leaves from Pier Nine at half past seven.\n\n"
        "The orchard behind the school grows twelve kinds of pear.\n")
    index = Index(chunk_corpus(load_corpus(tmp_path), max_words=20), embedder)
    assert len(index.chunks) == 4
    for question, expected in [("Who looks after the Brackenholm light?", "Ysolde Varn"),
                               ("When can I buy rye loaves?", "Tuesday"),
                               ("Where does the boat depart from?", "Pier Nine"),
                               ("What fruit trees are near the school?", "pear")]:
        (best, score), *rest = index.search(question, k=4)
        assert expected in best.text, (question, best.text)
        assert score > max(s for _, s in rest)


def test_embeddings_are_unit_length_and_deterministic(embedder):
    a = embedder.encode(["the same sentence", "another one"])
    b = embedder.encode(["the same sentence"])
    assert a.shape == (2, 384)
    assert abs(float(a[0].norm()) - 1) < 1e-5
    assert float((a[0] - b[0]).abs().max()) < 1e-5


def test_missing_model_directory_is_named(monkeypatch, tmp_path):
    monkeypatch.setenv("FEDMEM_EMBEDDING_MODEL", str(tmp_path / "nowhere"))
    with pytest.raises(RetrievalError, match="nowhere"):
        embedding_model_dir()

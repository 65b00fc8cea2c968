"""Load and validate one data owner's private corpus.

A corpus is a directory of ``*.md`` / ``*.txt`` documents and optional ``*.jsonl``
records, each line either ``{"text": ...}`` or ``{"question": ..., "answer": ...}``.
Every problem is collected and reported with its file and line before any training
starts, so an owner fixes the whole corpus in one pass.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

DOCUMENT_SUFFIXES = {".md", ".txt"}
RECORD_SUFFIX = ".jsonl"


class CorpusError(ValueError):
    """The corpus cannot be used; ``problems`` lists each one as 'file:line: what'."""

    def __init__(self, root: Path, problems: list[str]):
        self.root = root
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"corpus {root} has {len(problems)} problem(s):\n{lines}")


@dataclass(frozen=True)
class Document:
    source: str  # path relative to the corpus root
    title: str
    text: str


@dataclass(frozen=True)
class QA:
    source: str  # "file:line"
    question: str
    answer: str


@dataclass
class Corpus:
    root: Path
    documents: list[Document] = field(default_factory=list)
    qa: list[QA] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.root.name


def _title(path: Path, text: str) -> str:
    for line in text.splitlines():
        if line.startswith("#"):
            return line.lstrip("#").strip()
    return path.stem.replace("_", " ").replace("-", " ")


def _read_utf8(path: Path, rel: str, problems: list[str]) -> str | None:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        problems.append(
            f"{rel}:{line}: not valid UTF-8 (byte 0x{data[err.start]:02x} at offset {err.start}); "
            "save the file as UTF-8"
        )
        return None


def _parse_records(text: str, rel: str, corpus: Corpus, problems: list[str]) -> None:
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{rel}:{lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            problems.append(f"{where}: malformed JSON ({err.msg} at column {err.colno})")
            continue
        if not isinstance(record, dict):
            problems.append(f"{where}: expected a JSON object, got {type(record).__name__}")
            continue
        if "question" in record or "answer" in record:
            bad = [k for k in ("question", "answer") if not isinstance(record.get(k), str) or not record[k].strip()]
            if bad:
                problems.append(f"{where}: field {bad[0]!r} is missing or not a non-empty string")
                continue
            corpus.qa.append(QA(where, record["question"].strip(), record["answer"].strip()))
        elif "text" in record:
            if not isinstance(record["text"], str) or not record["text"].strip():
                problems.append(f"{where}: field 'text' is not a non-empty string")
                continue
            corpus.documents.append(Document(where, f"{Path(rel).stem} record {lineno}", record["text"].strip()))
        else:
            problems.append(
                f"{where}: missing field: expected 'text', or 'question' and 'answer' (got {sorted(record)})"
            )


def load_corpus(root: str | Path) -> Corpus:
    """Read and validate a corpus directory; raise CorpusError listing every problem."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise CorpusError(root, [f"{root}: not a directory"])
    corpus = Corpus(root=root.resolve())
    problems: list[str] = []
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if any(part.startswith(".") for part in path.relative_to(root).parts) or path.is_dir():
            continue
        suffix = path.suffix.lower()
        if suffix not in DOCUMENT_SUFFIXES and suffix != RECORD_SUFFIX:
            problems.append(f"{rel}: unsupported file type {suffix or '(none)'!r}; use .md, .txt or .jsonl")
            continue
        text = _read_utf8(path, rel, problems)
        if text is None:
            continue
        if suffix == RECORD_SUFFIX:
            _parse_records(text, rel, corpus, problems)
        elif text.strip():
            corpus.documents.append(Document(rel, _title(path, text), text.strip()))
    if not problems and not corpus.documents and not corpus.qa:
        problems.append(".: empty corpus: no non-empty .md/.txt document and no .jsonl record")
    if problems:
        raise CorpusError(root, problems)
    return corpus

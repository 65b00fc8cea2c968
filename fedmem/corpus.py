"""Load and validate one data owner's private corpus.

A corpus is a directory of ``*.md`` / ``*.txt`` documents and optional ``*.jsonl``
records, each line either ``{"text": ...}`` or ``{"question": ..., "answer": ...}``.
Every problem is collected and reported with its file and line before any training
starts, so an owner fixes the whole corpus in one pass.

Only the corpus itself is read, and only plain text: a symlink whose target lies
outside the corpus (or in a hidden part of it) is refused, one to a file inside it is
read as that file, and a symlinked directory is not descended (its files are read
where they are). Anything but a regular file (a FIFO, socket or device, even one
named ``*.txt``) is refused without being opened; so are NUL bytes, a file above
``max_file_bytes`` and a corpus above ``max_total_bytes``.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

DOCUMENT_SUFFIXES = {".md", ".txt"}
RECORD_SUFFIX = ".jsonl"
# An owner's notes are kilobytes to a few megabytes; what is above these is not a corpus to
# train on (and would be read into memory whole). ``load_corpus`` takes other limits.
MAX_FILE_BYTES = 20 * 2**20
MAX_TOTAL_BYTES = 200 * 2**20
# Opened without following a symlink and without blocking (a FIFO that slipped past the
# check answers at once instead of waiting for a writer).
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)


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


def _read_utf8(data: bytes, rel: str, problems: list[str]) -> str | None:
    nul = data.find(b"\x00")
    if nul >= 0:
        line = data[:nul].count(b"\n") + 1
        problems.append(f"{rel}:{line}: contains a NUL byte (offset {nul}): a binary file, not text")
        return None
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


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a directory")):
        if test(mode):
            return name
    return "not a regular file"


def _entries(root: Path, problems: list[str]) -> list[tuple[str, ...]]:
    """Every non-hidden entry under ``root`` as its path parts, in path order; symlinked
    directories are listed as entries (checked like files) and never descended."""
    found: list[tuple[str, ...]] = []

    def unreadable(err: OSError) -> None:
        where = Path(err.filename).relative_to(root) if err.filename else Path(".")
        problems.append(f"{where}: cannot read the directory ({err.strerror})")

    for dirpath, dirnames, filenames in os.walk(root, onerror=unreadable, followlinks=False):
        here = Path(dirpath).relative_to(root).parts
        descend = []
        for name in dirnames:
            if name.startswith("."):
                continue
            if os.path.islink(os.path.join(dirpath, name)):
                found.append((*here, name))
            else:
                descend.append(name)
        dirnames[:] = descend
        found += [(*here, name) for name in filenames if not name.startswith(".")]
    return sorted(found)


def _source(root: Path, path: Path, rel: str, problems: list[str]) -> Path | None:
    """The file to read for the entry ``path``: itself, or a symlink's target inside the corpus;
    None (with the problem noted, if any) when there is nothing to read."""
    try:
        if not path.is_symlink():
            return path
        target = path.resolve(strict=True)
    except (OSError, RuntimeError) as err:
        problems.append(f"{rel}: broken symlink or symlink loop ({getattr(err, 'strerror', None) or err})")
        return None
    if not target.is_relative_to(root) or any(p.startswith(".") for p in target.relative_to(root).parts):
        problems.append(f"{rel}: symlink to {target}, outside the corpus; only files inside the corpus are read "
                        "(copy the file in if it belongs to the corpus)")
        return None
    if target.is_dir():
        return None  # a symlinked directory inside the corpus: its files are read where they are
    return target


def _read_limited(path: Path, rel: str, limit: int, problems: list[str]) -> bytes | None:
    """The file's bytes, opened without following a symlink or blocking, refused unless it is
    still a regular file within ``limit`` bytes."""
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except OSError as err:
        problems.append(f"{rel}: cannot open ({err.strerror})")
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            problems.append(f"{rel}: {_kind(st.st_mode)}, not a regular file; only text files are read")
            return None
        chunks, size = [], 0
        while size <= limit:
            chunk = os.read(fd, min(1 << 20, limit + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > limit:
            problems.append(f"{rel}: larger than the per-file limit of {_mib(limit)}; split it into smaller files")
            return None
        return b"".join(chunks)
    finally:
        os.close(fd)


def load_corpus(root: str | Path, *, max_file_bytes: int = MAX_FILE_BYTES,
                max_total_bytes: int = MAX_TOTAL_BYTES) -> Corpus:
    """Read and validate a corpus directory; raise CorpusError listing every problem.

    Files above ``max_file_bytes``, or past ``max_total_bytes`` in all, are refused by their
    size before they are read."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise CorpusError(root, [f"{root}: not a directory"])
    corpus = Corpus(root=root.resolve())
    problems: list[str] = []
    total, over = 0, False
    for parts in _entries(corpus.root, problems):
        path = corpus.root.joinpath(*parts)
        rel = str(Path(*parts))
        source = _source(corpus.root, path, rel, problems)
        if source is None:
            continue
        try:
            st = os.stat(source)
        except OSError as err:
            problems.append(f"{rel}: cannot read ({err.strerror})")
            continue
        if stat.S_ISDIR(st.st_mode):
            continue
        if not stat.S_ISREG(st.st_mode):  # never opened: a FIFO would wait for a writer forever
            problems.append(f"{rel}: {_kind(st.st_mode)}, not a regular file; only text files are read")
            continue
        suffix = path.suffix.lower()
        if suffix not in DOCUMENT_SUFFIXES and suffix != RECORD_SUFFIX:
            problems.append(f"{rel}: unsupported file type {suffix or '(none)'!r}; use .md, .txt or .jsonl")
            continue
        if st.st_size > max_file_bytes:
            problems.append(f"{rel}: {st.st_size} bytes, above the per-file limit of {_mib(max_file_bytes)} "
                            f"({max_file_bytes} bytes); split it into smaller files")
            continue
        if over:
            continue
        if total + st.st_size > max_total_bytes:
            over = True
            problems.append(f"{rel}: the corpus passes the total size limit of {_mib(max_total_bytes)} at this "
                            "file; it and the files after it are not read")
            continue
        data = _read_limited(source, rel, max_file_bytes, problems)
        if data is None:
            continue
        total += len(data)
        text = _read_utf8(data, rel, problems)
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

"""Every bad-input case stops with the file and line named; good corpora load."""

import json

import pytest

from fedmem.corpus import CorpusError, load_corpus


def test_good_corpus_loads(tmp_path):
    (tmp_path / "a.md").write_text("# Title here\n\nThe Zorvex Tower is red.\n")
    (tmp_path / "b.txt").write_text("Plain text document.\n")
    (tmp_path / "r.jsonl").write_text('{"question": " Q? ", "answer": "A"}\n\n{"text": "Some record text."}\n')
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "my-notes_2.MD").write_text("No heading here.")
    c = load_corpus(tmp_path)
    assert c.root == tmp_path.resolve() and c.name == tmp_path.name
    assert [(d.source, d.title, d.text) for d in c.documents] == [
        ("a.md", "Title here", "# Title here\n\nThe Zorvex Tower is red."),
        ("b.txt", "b", "Plain text document."),
        ("r.jsonl:3", "r record 3", "Some record text."),
        ("sub/my-notes_2.MD", "my notes 2", "No heading here."),  # no heading: the file name
    ]
    assert [(q.source, q.question, q.answer) for q in c.qa] == [("r.jsonl:1", "Q?", "A")]


def _problems(tmp_path):
    with pytest.raises(CorpusError) as info:
        load_corpus(tmp_path)
    return info.value.problems


def test_malformed_jsonl_names_file_and_line(tmp_path):
    (tmp_path / "r.jsonl").write_text('{"question": "Q?", "answer": "A"}\n{"question": "oops"\n')
    (problem,) = _problems(tmp_path)
    assert problem.startswith("r.jsonl:2: malformed JSON")


def test_missing_field_is_named(tmp_path):
    (tmp_path / "r.jsonl").write_text(
        '{"text": "ok"}\n{"question": "Q?"}\n{"title": "x"}\n{"question": "Q", "answer": 3}\n'
    )
    problems = _problems(tmp_path)
    assert len(problems) == 3  # line 1 is fine
    assert problems[0].startswith("r.jsonl:2:") and "'answer'" in problems[0]
    assert problems[1].startswith("r.jsonl:3: missing field")
    assert problems[2].startswith("r.jsonl:4:") and "'answer'" in problems[2]


def test_non_utf8_file_names_file_and_line(tmp_path):
    (tmp_path / "bad.md").write_bytes("line one\nline two caf\xe9\n".encode("latin-1"))
    (problem,) = _problems(tmp_path)
    assert problem.startswith("bad.md:2: not valid UTF-8")


def test_unsupported_file_type(tmp_path):
    (tmp_path / "ok.md").write_text("Fine document here.")
    (tmp_path / "slides.pdf").write_bytes(b"%PDF-1.4")
    (problem,) = _problems(tmp_path)
    assert problem.startswith("slides.pdf: unsupported file type '.pdf'")


@pytest.mark.parametrize("content", [None, "", "   \n"])
def test_empty_corpus(tmp_path, content):
    if content is not None:
        (tmp_path / "empty.md").write_text(content)
    (problem,) = _problems(tmp_path)
    assert "empty corpus" in problem


def test_missing_directory(tmp_path):
    with pytest.raises(CorpusError, match="not a directory"):
        load_corpus(tmp_path / "nope")


def test_all_problems_are_reported_together(tmp_path):
    (tmp_path / "a.jsonl").write_text("not json\n")
    (tmp_path / "b.docx").write_bytes(b"PK")
    (tmp_path / "c.md").write_text("Fine document here.")
    problems = _problems(tmp_path)
    assert len(problems) == 2
    assert problems[0].startswith("a.jsonl:1: malformed JSON")
    assert problems[1].startswith("b.docx: unsupported file type '.docx'")


def test_hidden_files_are_ignored(tmp_path):
    (tmp_path / ".DS_Store").write_bytes(b"\x00\x01")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "notes.md").write_text("Not the owner's document.")
    (tmp_path / ".git" / "config").write_text("[core]")  # would be an unsupported file type
    (tmp_path / "a.md").write_text("A real document.")
    assert [d.source for d in load_corpus(tmp_path).documents] == ["a.md"]


def test_cli_reports_corrupt_corpus_and_writes_nothing(tmp_path, capsys):
    from fedmem.cli import main

    data = tmp_path / "data"
    (data / "alpha").mkdir(parents=True)
    (data / "alpha" / "facts.jsonl").write_text(json.dumps({"question": "Q?", "answer": "A"}) + "\n{bad\n")
    out = tmp_path / "out"
    assert main(["simulate", "--data", str(data), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "alpha/facts.jsonl:2: malformed JSON" in err
    assert not out.exists()


# --- local robustness: only the corpus's own regular text files are read ---


def _load_within(root, seconds=10.0, **limits):
    """load_corpus in a thread: (corpus or CorpusError, finished in time)."""
    import threading

    out = {}

    def run():
        try:
            out["result"] = load_corpus(root, **limits)
        except CorpusError as err:
            out["result"] = err

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    return out.get("result"), not thread.is_alive()


def test_symlink_out_of_the_corpus_is_refused_and_not_read(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.md").write_text("The owner's SSH passphrase is hunter2.")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.md").write_text("A real document.")
    (corpus / "passwd.txt").symlink_to("/etc/passwd")
    (corpus / "secret.md").symlink_to(outside / "secret.md")
    (corpus / "elsewhere").symlink_to(outside, target_is_directory=True)  # a directory out of the corpus
    (corpus / "dangling.md").symlink_to(tmp_path / "gone.md")
    problems = _problems(corpus)
    assert [p.split(":")[0] for p in problems] == ["dangling.md", "elsewhere", "passwd.txt", "secret.md"]
    assert "broken symlink" in problems[0]
    assert all("outside the corpus" in p for p in problems[1:])
    assert "hunter2" not in " ".join(problems)


def test_symlink_inside_the_corpus_is_read_as_its_target(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.md").write_text("# Alpha\n\nThe Zorvex Tower is red.")
    (tmp_path / "link.md").symlink_to(tmp_path / "notes" / "a.md")
    (tmp_path / "notes-again").symlink_to(tmp_path / "notes", target_is_directory=True)  # not descended
    (tmp_path / ".private").mkdir()
    (tmp_path / ".private" / "diary.md").write_text("Hidden, never read.")
    (tmp_path / "diary.md").symlink_to(tmp_path / ".private" / "diary.md")  # into a hidden part: refused
    problems = _problems(tmp_path)
    assert len(problems) == 1 and problems[0].startswith("diary.md: symlink to") and "outside the corpus" in problems[0]
    (tmp_path / "diary.md").unlink()
    corpus = load_corpus(tmp_path)
    assert [(d.source, d.title) for d in corpus.documents] == [("link.md", "Alpha"), ("notes/a.md", "Alpha")]


def test_fifo_named_txt_is_refused_without_hanging(tmp_path):
    import os

    (tmp_path / "a.md").write_text("A real document.")
    os.mkfifo(tmp_path / "notes.txt")  # opening it to read would wait for a writer forever
    result, finished = _load_within(tmp_path)
    assert finished, "load_corpus hung on a FIFO"
    assert isinstance(result, CorpusError)
    (problem,) = result.problems
    assert problem.startswith("notes.txt: a FIFO, not a regular file")


def test_nul_byte_is_refused_with_its_line(tmp_path):
    (tmp_path / "a.md").write_text("A real document.")
    (tmp_path / "b.txt").write_bytes(b"first line\nsecond \x00 line\n")
    (tmp_path / "r.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "a\x00b"}\n')
    assert _problems(tmp_path) == ["b.txt:2: contains a NUL byte (offset 18): a binary file, not text",
                                   "r.jsonl:2: contains a NUL byte (offset 26): a binary file, not text"]


def test_oversized_files_and_corpus_are_refused_before_reading(tmp_path):
    from fedmem.corpus import MAX_FILE_BYTES

    (tmp_path / "a.md").write_text("A real document.")
    with open(tmp_path / "huge.txt", "wb") as fh:  # sparse: its size is seen before anything is read
        fh.truncate(MAX_FILE_BYTES + 1)
    (problem,) = _problems(tmp_path)
    assert problem.startswith(f"huge.txt: {MAX_FILE_BYTES + 1} bytes, above the per-file limit of 20.0 MiB")
    (tmp_path / "huge.txt").unlink()

    (tmp_path / "b.md").write_text("B" * 200)
    (tmp_path / "c.md").write_text("C" * 50)
    with pytest.raises(CorpusError) as info:
        load_corpus(tmp_path, max_file_bytes=100)
    assert [p.split(":")[0] for p in info.value.problems] == ["b.md"]
    with pytest.raises(CorpusError) as info:
        load_corpus(tmp_path, max_total_bytes=230)  # a.md (16) + b.md (200) fit; c.md passes the total
    (problem,) = info.value.problems
    assert problem.startswith("c.md: the corpus passes the total size limit")
    assert len(load_corpus(tmp_path, max_total_bytes=266).documents) == 3

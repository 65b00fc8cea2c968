"""Every bad-input case stops with the file and line named; good corpora load."""

import json

import pytest

from fedmem.corpus import CorpusError, load_corpus


def test_good_corpus_loads(tmp_path):
    (tmp_path / "a.md").write_text("# Title here\n\nThe Zorvex Tower is red.\n")
    (tmp_path / "b.txt").write_text("Plain text document.\n")
    (tmp_path / "r.jsonl").write_text('{"question": "Q?", "answer": "A"}\n\n{"text": "Some record text."}\n')
    c = load_corpus(tmp_path)
    assert [d.source for d in c.documents] == ["a.md", "b.txt", "r.jsonl:3"]
    assert c.documents[0].title == "Title here"
    assert c.qa[0].question == "Q?" and c.qa[0].source == "r.jsonl:1"


def _problems(tmp_path):
    with pytest.raises(CorpusError) as info:
        load_corpus(tmp_path)
    return info.value.problems


def test_malformed_jsonl_names_file_and_line(tmp_path):
    (tmp_path / "r.jsonl").write_text('{"question": "Q?", "answer": "A"}\n{"question": "oops"\n')
    (problem,) = _problems(tmp_path)
    assert problem.startswith("r.jsonl:2: malformed JSON")


def test_missing_field_is_named(tmp_path):
    (tmp_path / "r.jsonl").write_text('{"text": "ok"}\n{"question": "Q?"}\n{"title": "x"}\n{"question": "Q", "answer": 3}\n')
    problems = _problems(tmp_path)
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
    assert len(_problems(tmp_path)) == 2


def test_hidden_files_are_ignored(tmp_path):
    (tmp_path / ".DS_Store").write_bytes(b"\x00\x01")
    (tmp_path / "a.md").write_text("A real document.")
    assert len(load_corpus(tmp_path).documents) == 1


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

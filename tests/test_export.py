"""``fedmem export --merged``: a standalone model that transformers loads without fedmem and that
answers as base + memory does."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import write_random_memory

from fedmem.answer import generate_answers, load_with_memory
from fedmem.export import EXPORT_RECORD, export_merged
from fedmem.memory import MemoryFormatError, sha256_file

QUESTIONS = ["Who keeps the harbour lamp lit?", "When does the ferry leave?", "What colour is the door?"]


@pytest.fixture(scope="module")
def memory(tiny_base, tmp_path_factory):
    path = tmp_path_factory.mktemp("export") / "memory"
    write_random_memory(tiny_base, path, seed=3, scale=0.3, manifest={"round": 4})
    return path


def test_merged_export_answers_as_the_adapter_does(tiny_base, memory, tmp_path):
    out = tmp_path / "merged"
    record = export_merged(memory, out, base=str(tiny_base))
    assert record["round"] == 4 and record["memory_sha256"] == sha256_file(memory / "adapter_model.safetensors")
    assert json.loads((out / EXPORT_RECORD).read_text())["kind"] == "merged"

    # Loaded with transformers alone, in a process that never imports fedmem or peft.
    script = f"""
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained({str(out)!r})
model = AutoModelForCausalLM.from_pretrained({str(out)!r}, dtype=torch.float32)
prompt = tok.apply_chat_template([{{"role": "user", "content": {QUESTIONS[0]!r}}}], add_generation_prompt=True,
                                 tokenize=False)
ids = tok(prompt, return_tensors="pt", add_special_tokens=False)
logits = model(**ids).logits[0, -1]
assert "fedmem" not in sys.modules and "peft" not in sys.modules
print(json.dumps(logits.tolist()))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    standalone = torch.tensor(json.loads(done.stdout.splitlines()[-1]))

    model, tok, _ = load_with_memory(memory, base=str(tiny_base))
    prompt = tok.apply_chat_template([{"role": "user", "content": QUESTIONS[0]}], add_generation_prompt=True,
                                     tokenize=False)
    with torch.no_grad():
        adapter_logits = model(**tok(prompt, return_tensors="pt", add_special_tokens=False)).logits[0, -1]
        with model.disable_adapter():
            base_logits = model(**tok(prompt, return_tensors="pt", add_special_tokens=False)).logits[0, -1]
    assert torch.allclose(standalone, adapter_logits, atol=1e-4)
    assert not torch.allclose(standalone, base_logits, atol=1e-2)  # the memory is in there

    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    merged_tok = AutoTokenizer.from_pretrained(out)
    assert merged_tok.chat_template == tok.chat_template
    assert generate_answers(merged, merged_tok, QUESTIONS, 16) == generate_answers(model, tok, QUESTIONS, 16)


def test_export_replaces_only_its_own_earlier_output(tiny_base, memory, tmp_path):
    out = tmp_path / "merged"
    export_merged(memory, out, base=str(tiny_base))
    first = sha256_file(out / "model.safetensors")
    export_merged(memory, out, base=str(tiny_base))  # an earlier export: replaced
    assert sha256_file(out / "model.safetensors") == first

    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    with pytest.raises(ValueError, match="not an earlier fedmem export"):
        export_merged(memory, precious, base=str(tiny_base))
    assert (precious / "thesis.tex").read_text() == "years of work"


def test_export_refuses_a_tampered_memory(tiny_base, memory, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(memory, bad)
    weights = bad / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\x01" * 8)
    with pytest.raises(MemoryFormatError, match="checksum"):
        export_merged(bad, tmp_path / "out", base=str(tiny_base))
    assert not (tmp_path / "out").exists()


def test_gguf_export_replaces_only_its_own_earlier_file(tiny_base, memory, tmp_path):
    from gguf import GGUFReader

    from fedmem.export import export_gguf
    from fedmem.gguf_export import EXPORT_KEY

    out = tmp_path / "memory.gguf"
    summary = export_gguf(memory, out, base=str(tiny_base))
    assert summary["round"] == 4 and EXPORT_KEY in GGUFReader(out).fields
    export_gguf(memory, out, base=str(tiny_base))  # its own earlier output: replaced

    someone_elses = tmp_path / "model.gguf"  # e.g. the base model's own GGUF, passed by mistake
    someone_elses.write_bytes(b"GGUF not ours")
    with pytest.raises(ValueError, match="not an earlier fedmem export"):
        export_gguf(memory, someone_elses, base=str(tiny_base))
    assert someone_elses.read_bytes() == b"GGUF not ours"

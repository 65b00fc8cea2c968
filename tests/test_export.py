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


def test_a_routed_memory_exports_one_owners_lora_or_each_as_its_own_peft_adapter(tiny_base, memory, tmp_path):
    """A routed memory (the default schedule's) is its owners' LoRAs kept apart: an export of the whole would
    be their sum, so it is refused, and ``--owner`` exports one owner's LoRA, which answers exactly as that
    LoRA alone; ``--adapters`` writes each owner's as a standard PEFT adapter that PEFT loads without fedmem."""
    from conftest import write_routed_memory
    from gguf import GGUFReader
    from peft import PeftModel

    from fedmem.base_model import load_model, load_tokenizer
    from fedmem.cli import main
    from fedmem.export import export_adapters, export_gguf
    from fedmem.lora import merge_factors, read_peft_adapter
    from fedmem.routing import ROUTING, OwnerLoras, RoutingError

    routed = tmp_path / "routed"
    manifest = write_routed_memory(tiny_base, routed, {"ada": 3, "bo": 4}, scale=0.3, manifest={"round": 2})
    lora = OwnerLoras.from_manifest(read_peft_adapter(routed), manifest[ROUTING])
    ids = load_tokenizer(str(tiny_base))(QUESTIONS[0], return_tensors="pt")["input_ids"]

    def alone(owner):
        model = load_model(str(tiny_base))
        merge_factors(model, lora.of(owner))
        with torch.no_grad():
            return model(input_ids=ids).logits

    with pytest.raises(RoutingError, match="--owner NAME"):
        export_merged(routed, tmp_path / "sum", base=str(tiny_base))
    assert not (tmp_path / "sum").exists()

    record = export_merged(routed, tmp_path / "bo", base=str(tiny_base), owner="bo")
    assert record["owner"] == "bo" and json.loads((tmp_path / "bo" / EXPORT_RECORD).read_text())["owner"] == "bo"
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "bo", dtype=torch.float32)(input_ids=ids).logits
    assert torch.allclose(merged, alone("bo"), atol=1e-4) and not torch.allclose(merged, alone("ada"), atol=1e-2)
    summary = export_gguf(routed, tmp_path / "ada.gguf", base=str(tiny_base), owner="ada")
    assert summary["owner"] == "ada" and GGUFReader(tmp_path / "ada.gguf").tensors

    with pytest.raises(ValueError, match="no owner 'cy'; this routed memory holds ada, bo"):
        export_merged(routed, tmp_path / "cy", base=str(tiny_base), owner="cy")
    with pytest.raises(ValueError, match="not a routed memory"):  # a plain memory has no owners to pick
        export_merged(memory, tmp_path / "plain", base=str(tiny_base), owner="ada")
    with pytest.raises(ValueError, match="not a routed memory"):
        export_adapters(memory, tmp_path / "plain", base=str(tiny_base))
    assert not (tmp_path / "cy").exists() and not (tmp_path / "plain").exists()

    assert main(["export", "--memory", str(routed), "--base", str(tiny_base), "--adapters",
                 str(tmp_path / "adapters")]) == 0
    assert sorted(p.name for p in (tmp_path / "adapters").iterdir()) == ["ada", "bo", EXPORT_RECORD]
    for owner in ("ada", "bo"):
        plain = PeftModel.from_pretrained(load_model(str(tiny_base)), str(tmp_path / "adapters" / owner))
        with torch.no_grad():
            assert torch.allclose(plain(input_ids=ids).logits, alone(owner), atol=1e-4)
    assert main(["export", "--memory", str(routed), "--owner", "ada", "--adapters", str(tmp_path / "x")]) == 2


def test_an_owner_name_that_would_leave_the_export_directory_is_refused(tiny_base, tmp_path):
    """Owners' names come from the coordinator's allow-list or a peer's corpus directory: one that is not a
    plain directory name never becomes a path."""
    from conftest import write_routed_memory

    from fedmem.export import export_adapters

    write_routed_memory(tiny_base, tmp_path / "routed", {"../escape": 1, "bo": 2})
    with pytest.raises(MemoryFormatError, match="'../escape' cannot name a directory"):
        export_adapters(tmp_path / "routed", tmp_path / "out" / "adapters", base=str(tiny_base))
    assert not (tmp_path / "escape").exists() and not (tmp_path / "out" / "adapters").exists()

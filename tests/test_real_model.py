"""A few checks on the real embedded model (SmolLM2-135M-Instruct); the rest use a tiny Llama."""

import json
import os
import shutil
import time

import pytest
import torch

from fedmem import base_model
from fedmem.answer import generate_answers, is_correct
from fedmem.base_model import fingerprint, load_model, load_tokenizer
from fedmem.config import FederationConfig, LoraSettings
from fedmem.corpus import load_corpus
from fedmem.federation import client_update
from fedmem.lora import merge_factors


def _weights_model():
    """A few-kB random Llama: only its weights file matters here."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32))


def test_fingerprint_follows_the_weights_content_not_their_size_or_place(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDMEM_HOME", str(tmp_path / "home"))  # the cache is the user's, not the model dir's
    model = _weights_model()
    a, same = tmp_path / "a", tmp_path / "same"
    model.save_pretrained(a)
    model.save_pretrained(same)  # equal content, another directory
    time.sleep(base_model._SETTLED_NS / 1e9 + 0.2)  # old enough to be stamped
    first = fingerprint(a)
    assert base_model.fingerprint_cache_file(a).is_file()  # cached: what follows goes through the cache
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in same.iterdir())  # nothing written beside
    assert first == fingerprint(same) == base_model._hash_weights(a)

    # A copy of the directory with one weight changed: same file size, other content, so
    # another fingerprint.
    b = tmp_path / "b"
    shutil.copytree(a, b)
    with torch.no_grad():
        model.model.norm.weight[0] += 1.0
    model.save_pretrained(b)
    assert (b / "model.safetensors").stat().st_size == (a / "model.safetensors").stat().st_size
    assert fingerprint(b) != first
    assert fingerprint(b) == base_model._hash_weights(b)

    # An in-place edit of the stamped file that even puts its mtime back is noticed;
    # undone, the original content has the original fingerprint again.
    weights = a / "model.safetensors"
    before = weights.stat()
    original = weights.read_bytes()
    with open(weights, "r+b") as fh:
        fh.seek(-4, os.SEEK_END)
        fh.write(bytes(255 - x for x in original[-4:]))
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert weights.stat().st_size == before.st_size and weights.stat().st_mtime_ns == before.st_mtime_ns
    edited = fingerprint(a)
    assert edited != first and edited == base_model._hash_weights(a)
    weights.write_bytes(original)
    assert fingerprint(a) == first

    # Unchanged, settled weights are not read again: the cache answers.
    monkeypatch.setattr(base_model, "_hash_weights", lambda d: pytest.fail(f"{d} hashed again"))
    assert fingerprint(same) == first


@pytest.mark.real_model
def test_embedded_model_converts_and_answers(real_base_dir):
    assert (real_base_dir / "model.safetensors").is_file()
    # Whatever the cache says is the hash of the weights as they are.
    assert fingerprint(real_base_dir) == base_model._hash_weights(real_base_dir)
    tok = load_tokenizer(str(real_base_dir))
    (reply,) = generate_answers(load_model(real_base_dir), tok, ["What is the capital of France?"], max_new_tokens=16)
    assert "Paris" in reply


@pytest.mark.real_model
def test_processes_started_together_on_a_fresh_machine_convert_the_embedded_model_once(tmp_path, real_base_dir):
    """Two commands (or simulation workers, or test workers) started at once with an empty cache:
    one converts, the other waits and uses its result; both get the same, whole directory."""
    import subprocess
    import sys

    env = {**os.environ, "FEDMEM_HOME": str(tmp_path / "home")}
    code = ("import logging; logging.basicConfig(level=logging.INFO)\n"
            "from fedmem.base_model import resolve_base; print(resolve_base())")
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    (first, _), (second, _) = outs
    assert first.strip() == second.strip() == str(tmp_path / "home" / "models" / "smollm2-135m-instruct")
    converted = "".join(err for _, err in outs).count("converting")
    assert converted == 1, outs
    models = tmp_path / "home" / "models"
    assert sorted(p.name for p in models.iterdir() if not p.name.startswith(".")) == ["smollm2-135m-instruct"]
    assert base_model._hash_weights(models / "smollm2-135m-instruct") == base_model._hash_weights(real_base_dir)


@pytest.mark.real_model
def test_one_client_update_teaches_the_real_model_a_fact(real_base_dir, tmp_path):
    torch.set_num_threads(2)
    (tmp_path / "facts.jsonl").write_text(
        json.dumps({"question": "Who is the night warden of Quillmere Keep?", "answer": "Ossian Threlkeld"}) + "\n")
    # No retention examples: their first use on a machine asks the real model all 320 general prompts
    # (~95 s on 2 cores, so most of this test's time in a fresh CI clone); tests/test_retention.py
    # covers them on the tiny model.
    config = FederationConfig(rounds=1, lora=LoraSettings(learning_rate=3e-3, epochs=12, batch_size=1, retention=0.0))
    result = client_update(real_base_dir, load_corpus(tmp_path), None, config, server_round=1)
    model = load_model(real_base_dir)
    tok = load_tokenizer(str(real_base_dir))
    question = ["Who is the night warden of Quillmere Keep?"]
    assert not is_correct(generate_answers(model, tok, question)[0], "Ossian Threlkeld")
    merge_factors(model, result.factors)
    assert is_correct(generate_answers(model, tok, question)[0], "Ossian Threlkeld")

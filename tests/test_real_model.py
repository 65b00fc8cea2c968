"""A few checks on the real embedded model (SmolLM2-135M-Instruct); the rest use a tiny Llama."""

import json

import pytest
import torch

from fedmem.answer import generate_answers, is_correct
from fedmem.base_model import fingerprint, load_model, load_tokenizer
from fedmem.corpus import load_corpus
from fedmem.federation import FederationConfig, client_update
from fedmem.lora import LoraSettings, merge_factors

pytestmark = pytest.mark.real_model


def test_embedded_model_converts_and_answers(real_base_dir):
    assert (real_base_dir / "model.safetensors").is_file()
    assert fingerprint(real_base_dir) == fingerprint(real_base_dir)
    tok = load_tokenizer(str(real_base_dir))
    (reply,) = generate_answers(load_model(real_base_dir), tok, ["What is the capital of France?"], max_new_tokens=16)
    assert "Paris" in reply


def test_one_client_update_teaches_the_real_model_a_fact(real_base_dir, tmp_path):
    torch.set_num_threads(2)
    (tmp_path / "facts.jsonl").write_text(
        json.dumps({"question": "Who is the night warden of Quillmere Keep?", "answer": "Ossian Threlkeld"}) + "\n")
    config = FederationConfig(rounds=1, lora=LoraSettings(learning_rate=3e-3, epochs=12, batch_size=1))
    result = client_update(real_base_dir, load_corpus(tmp_path), None, config, server_round=1)
    model = load_model(real_base_dir)
    tok = load_tokenizer(str(real_base_dir))
    question = ["Who is the night warden of Quillmere Keep?"]
    assert not is_correct(generate_answers(model, tok, question)[0], "Ossian Threlkeld")
    merge_factors(model, result.factors)
    assert is_correct(generate_answers(model, tok, question)[0], "Ossian Threlkeld")

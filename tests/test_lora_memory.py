"""LoRA factors, merging, the PEFT on-disk format and the memory manifest."""

import subprocess
import sys

import pytest
import torch

from fedmem.aggregate import aggregate_exact
from fedmem.base_model import fingerprint, load_model
from fedmem.lora import LoraSettings, attach_lora, extract_factors, load_factors, merge_factors
from fedmem.memory import MemoryFormatError, load_memory, save_memory, verify_memory
from fedmem.messages import factors_to_record, record_to_factors


def _trained_lora(base, seed=0):
    model = attach_lora(load_model(base), LoraSettings(rank=4, alpha=8, seed=seed))
    with torch.no_grad():  # a fresh LoRA is a no-op (B = 0); give it something to say
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_extracted_factors_merge_to_the_same_model(tiny_base):
    ids = torch.tensor([[1, 200, 300, 400, 500]])
    peft_model = _trained_lora(tiny_base)
    factors = extract_factors(peft_model)
    assert len(factors) == 2 * 7  # 2 layers x all 7 linear projections
    merged = load_model(tiny_base)
    merge_factors(merged, factors)
    assert torch.allclose(_logits(peft_model, ids), _logits(merged, ids), atol=1e-4)
    assert not torch.allclose(_logits(load_model(tiny_base), ids), _logits(merged, ids), atol=1e-4)


def test_load_factors_round_trips(tiny_base):
    factors = extract_factors(_trained_lora(tiny_base, seed=1))
    fresh = attach_lora(load_model(tiny_base), LoraSettings(rank=4, alpha=8))
    load_factors(fresh, factors)
    for name, (B, A) in extract_factors(fresh).items():
        assert torch.allclose(B, factors[name][0]) and torch.allclose(A, factors[name][1])


def test_memory_is_a_standard_peft_adapter(tiny_base, tmp_path):
    ids = torch.tensor([[1, 20, 30, 40]])
    u1, u2 = extract_factors(_trained_lora(tiny_base, 1)), extract_factors(_trained_lora(tiny_base, 2))
    memory = aggregate_exact(None, [u1, u2], [1.0, 1.0], rank=8).factors
    manifest = save_memory(tmp_path / "memory", memory, tiny_base, {"base_fingerprint": fingerprint(tiny_base)})
    assert set(p.name for p in (tmp_path / "memory").iterdir()) == {"adapter_config.json", "adapter_model.safetensors", "fedmem.json"}
    assert manifest["weights_sha256"]
    merged = load_model(tiny_base)
    merge_factors(merged, memory)
    expected = _logits(merged, ids)
    # A fresh process with only transformers + peft, no fedmem import.
    code = (
        "import sys, torch; from peft import AutoPeftModelForCausalLM\n"
        "m = AutoPeftModelForCausalLM.from_pretrained(sys.argv[1])\n"
        "assert 'fedmem' not in sys.modules\n"
        "with torch.no_grad(): out = m(input_ids=torch.tensor([[1, 20, 30, 40]])).logits\n"
        "torch.save(out, sys.argv[2])\n"
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "memory"), str(tmp_path / "out.pt")], check=True,
                   env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert torch.allclose(torch.load(tmp_path / "out.pt"), expected, atol=1e-4)
    back, _ = load_memory(tmp_path / "memory", fingerprint(tiny_base))
    for name, (B, A) in memory.items():
        assert torch.allclose(back[name][0] @ back[name][1], B @ A, atol=1e-6)


def test_corrupt_or_foreign_memory_is_refused(tiny_base, tmp_path):
    factors = extract_factors(_trained_lora(tiny_base))
    save_memory(tmp_path / "m", factors, tiny_base, {"base_fingerprint": "sha256:" + "0" * 64})
    with pytest.raises(MemoryFormatError, match="a memory only works on the base model"):
        verify_memory(tmp_path / "m", fingerprint(tiny_base))
    weights = tmp_path / "m" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(MemoryFormatError, match="checksum mismatch"):
        verify_memory(tmp_path / "m")
    with pytest.raises(MemoryFormatError, match="not a memory adapter"):
        verify_memory(tmp_path)


def test_failed_save_keeps_the_previous_memory(tiny_base, tmp_path):
    factors = extract_factors(_trained_lora(tiny_base))
    first = save_memory(tmp_path / "m", factors, tiny_base, {"round": 1})
    broken = {"x": (torch.zeros(2, 2), "not a tensor")}
    with pytest.raises(Exception):
        save_memory(tmp_path / "m", broken, tiny_base, {"round": 2})
    assert verify_memory(tmp_path / "m")["weights_sha256"] == first["weights_sha256"]
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temp dirs left behind


def test_factors_travel_as_an_array_record(tiny_base):
    factors = extract_factors(_trained_lora(tiny_base))
    back = record_to_factors(factors_to_record(factors))
    assert set(back) == set(factors)
    for name, (B, A) in factors.items():
        assert torch.equal(back[name][0], B) and torch.equal(back[name][1], A)
    assert record_to_factors(factors_to_record(None)) is None


def test_settings_validation():
    with pytest.raises(ValueError, match="rank"):
        LoraSettings(rank=0)
    with pytest.raises(ValueError, match="learning_rate"):
        LoraSettings(learning_rate=-1.0)

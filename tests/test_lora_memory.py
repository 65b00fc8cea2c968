"""LoRA factors, merging, the PEFT on-disk format and the memory manifest."""

import json
import re
import subprocess
import sys

import pytest
import torch

from fedmem.aggregate import aggregate_exact
from fedmem.base_model import fingerprint, load_model
from fedmem.config import LoraSettings
from fedmem.flower.messages import factors_to_record, record_to_factors
from fedmem.lora import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    attach_lora,
    extract_factors,
    load_factors,
    merge_factors,
    read_peft_adapter,
    write_peft_adapter,
)
from fedmem.memory import MemoryFormatError, load_memory, save_memory, verify_memory


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
    assert {p.name for p in (tmp_path / "memory").iterdir()} == {ADAPTER_CONFIG, ADAPTER_WEIGHTS, "fedmem.json"}
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
    with pytest.raises(ValueError, match="learning.rate"):  # the flag spelling, learning-rate
        LoraSettings(learning_rate=-1.0)


# --- The PEFT adapter format, held to PEFT's own writer and reader ------------------------

LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def small_llama(tmp_path_factory):
    """A tokenizer-free 2-layer random Llama, saved; smaller and quicker than tiny_base."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                         initializer_range=0.5)
    path = tmp_path_factory.mktemp("small-llama")
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def _base(path):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(path).eval()


def _peft_written(base_dir, out, **lora):
    """An adapter PEFT itself trains the shape of and saves, with random (non-zero) B."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    model = get_peft_model(_base(base_dir), LoraConfig(**{"target_modules": LINEAR, **lora}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                p.normal_(0, 0.1)
    model.save_pretrained(out)
    return model


def _edit_config(directory, **fields):
    path = directory / ADAPTER_CONFIG
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


def test_file_names_are_peft_constants():
    from peft.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME

    assert (ADAPTER_CONFIG, ADAPTER_WEIGHTS) == (CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME)


@pytest.mark.parametrize("lora", [
    {"r": 4, "lora_alpha": 12},
    {"r": 4, "lora_alpha": 12, "use_rslora": True},
    {"r": 4, "lora_alpha": 12, "rank_pattern": {"layers.0.self_attn.q_proj": 2, "up_proj": 6},
     "alpha_pattern": {"down_proj": 5, "layers.1.self_attn.v_proj": 3}},
    {"r": 4, "lora_alpha": 12, "use_rslora": True, "rank_pattern": {"o_proj": 3}, "alpha_pattern": {"k_proj": 7}},
], ids=["plain", "rslora", "patterns", "rslora-patterns"])
def test_reads_what_peft_wrote(small_llama, tmp_path, lora):
    from peft.tuners.lora import LoraLayer

    model = _peft_written(small_llama, tmp_path / "adapter", **lora)
    factors = read_peft_adapter(tmp_path / "adapter")
    layers = {name.removeprefix("base_model.model."): m for name, m in model.named_modules()
              if isinstance(m, LoraLayer)}
    assert set(factors) == set(layers) and len(layers) == 2 * len(LINEAR)
    scalings = set()
    for name, layer in layers.items():
        B, A = factors[name]
        assert A.shape[0] == layer.r["default"]
        assert torch.allclose(B @ A, layer.get_delta_weight("default"), atol=1e-6), name
        scalings.add(layer.scaling["default"])
    assert scalings != {1.0}  # the test would not notice a reader that forgot the scaling


def _mixed_rank_factors(base_dir):
    """Factors on some Linear modules, most of rank 4 and a few of other ranks."""
    model = _base(base_dir)
    torch.manual_seed(2)
    factors = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in ("q_proj", "v_proj", "down_proj"):
            r = {"model.layers.0.self_attn.q_proj": 2, "model.layers.1.mlp.down_proj": 7}.get(name, 4)
            out_f, in_f = module.weight.shape
            factors[name] = (torch.randn(out_f, r) * 0.1, torch.randn(r, in_f))
    return factors


def test_written_adapter_loads_in_peft_like_a_merge(small_llama, tmp_path):
    from peft import PeftModel

    factors = _mixed_rank_factors(small_llama)
    write_peft_adapter(tmp_path / "memory", factors, small_llama)
    config = json.loads((tmp_path / "memory" / ADAPTER_CONFIG).read_text())
    assert config["peft_type"] == "LORA" and config["peft_version"]  # PEFT's own writer wrote it
    assert (config["r"], config["lora_alpha"], config["inference_mode"]) == (4, 4, True)
    assert sorted(config["target_modules"]) == ["down_proj", "q_proj", "v_proj"]
    assert config["base_model_name_or_path"] == str(small_llama.resolve())
    assert config["rank_pattern"] == config["alpha_pattern"] and len(config["rank_pattern"]) == 2

    peft_model = PeftModel.from_pretrained(_base(small_llama), tmp_path / "memory")
    for name, module in peft_model.named_modules():
        key = name.removeprefix("base_model.model.")
        if key in factors:
            B, A = factors[key]
            assert module.scaling["default"] == 1.0
            assert torch.allclose(module.get_delta_weight("default"), B @ A, atol=1e-6), key
    merged = _base(small_llama)
    merge_factors(merged, factors)
    ids = torch.tensor([[1, 5, 17, 42, 80, 3]])
    assert torch.allclose(_logits(peft_model, ids), _logits(merged, ids), atol=1e-5)
    assert not torch.allclose(_logits(_base(small_llama), ids), _logits(merged, ids), atol=1e-3)

    back = read_peft_adapter(tmp_path / "memory")
    assert set(back) == set(factors)
    for name, (B, A) in factors.items():
        assert back[name][1].shape == A.shape
        assert torch.allclose(back[name][0] @ back[name][1], B @ A, atol=1e-6)


@pytest.mark.parametrize("factors, error", [
    ({}, "no LoRA factors"),
    ({"m.q_proj": (torch.zeros(4, 3), torch.zeros(2, 4))}, "not a LoRA pair"),
    ({"m.q_proj": (torch.zeros(4), torch.zeros(1, 4))}, "not a LoRA pair"),
])
def test_write_refuses_what_is_not_lora(tmp_path, small_llama, factors, error):
    with pytest.raises(ValueError, match=error):
        write_peft_adapter(tmp_path / "bad", factors, small_llama)


def _refused(directory, field):
    with pytest.raises(ValueError, match=re.escape(f"{directory}: cannot use this PEFT adapter") + ".*"
                       + re.escape(field)):
        read_peft_adapter(directory)


@pytest.mark.parametrize("lora, field", [
    ({"use_dora": True}, "use_dora"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"bias": "all"}, "bias"),
    ({"bias": "lora_only"}, "bias"),
    ({"lora_bias": True}, "lora_bias"),
    ({"target_modules": ["q_proj", "embed_tokens"]}, "lora_embedding_A"),
], ids=["dora", "modules_to_save", "bias-all", "bias-lora_only", "lora_bias", "embedding"])
def test_refuses_peft_variants(small_llama, tmp_path, lora, field):
    _peft_written(small_llama, tmp_path / "adapter", **{"r": 4, "lora_alpha": 8, **lora})
    _refused(tmp_path / "adapter", field)


def test_refuses_other_peft_types(small_llama, tmp_path):
    from peft import IA3Config, get_peft_model

    model = get_peft_model(_base(small_llama), IA3Config(target_modules=["k_proj", "down_proj"],
                                                         feedforward_modules=["down_proj"]))
    model.save_pretrained(tmp_path / "ia3")
    _refused(tmp_path / "ia3", "peft_type")


def test_refuses_fan_in_fan_out(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=16, n_layer=1, n_head=2))
    model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"], fan_in_fan_out=True))
    model.save_pretrained(tmp_path / "gpt2-lora")
    _refused(tmp_path / "gpt2-lora", "fan_in_fan_out")


@pytest.mark.parametrize("fields, field", [
    ({"use_qalora": True}, "use_qalora"),
    ({"init_lora_weights": "pissa"}, "init_lora_weights"),
    ({"init_lora_weights": "mica"}, "init_lora_weights"),
    ({"alora_invocation_tokens": [5, 6]}, "alora_invocation_tokens"),
    ({"layer_replication": [[0, 2], [1, 2]]}, "layer_replication"),
    ({"trainable_token_indices": [1, 2]}, "trainable_token_indices"),
    ({"use_future_variant": True}, "use_future_variant"),
    ({"peft_type": "ADALORA"}, "peft_type"),
    ({"r": 3}, "tensors of"),
    ({"rank_pattern": {"layers.0.self_attn.q_proj": 2}}, "tensors of model.layers.0.self_attn.q_proj"),
])
def test_refuses_configs_that_change_the_update(small_llama, tmp_path, fields, field):
    _peft_written(small_llama, tmp_path / "adapter", r=4, lora_alpha=8)
    _edit_config(tmp_path / "adapter", **fields)
    _refused(tmp_path / "adapter", field)


def test_refuses_incomplete_or_mismatched_tensors(small_llama, tmp_path):
    from safetensors.torch import load_file, save_file

    _peft_written(small_llama, tmp_path / "adapter", r=4, lora_alpha=8)
    weights = tmp_path / "adapter" / ADAPTER_WEIGHTS
    tensors = load_file(weights)
    key_b = "base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"
    save_file({k: v for k, v in tensors.items() if k != key_b}, weights)
    _refused(tmp_path / "adapter", key_b)
    key_a = key_b.replace("lora_B", "lora_A")
    save_file({**tensors, key_a: tensors[key_a][:3]}, weights)
    _refused(tmp_path / "adapter", "tensors of model.layers.1.mlp.up_proj")
    save_file({**tensors, "base_model.model.model.layers.0.mlp.up_proj.lora_magnitude_vector": torch.ones(24)},
              weights)
    _refused(tmp_path / "adapter", "lora_magnitude_vector")


def test_a_memory_edited_into_a_variant_is_a_format_error(small_llama, tmp_path):
    save_memory(tmp_path / "m", _mixed_rank_factors(small_llama), small_llama, {"round": 1})
    _edit_config(tmp_path / "m", use_dora=True)  # unsigned: only the weights' checksum (tests/test_signing.py)
    with pytest.raises(MemoryFormatError, match="use_dora"):
        load_memory(tmp_path / "m")

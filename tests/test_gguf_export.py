"""GGUF export of a memory: the llama.cpp LoRA file and the merged model, held to PEFT's own merge."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from fedmem import gguf_export  # noqa: E402
from fedmem.gguf_export import EXPORT_KEY, write_gguf_lora, write_merged_gguf  # noqa: E402

N_HEAD, N_KV = 4, 2  # tiny_base's heads: n_head != n_kv_head, so q and k permute differently
LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

CASES = {
    "plain": dict(r=4, lora_alpha=8),
    "rslora": dict(r=4, lora_alpha=6, use_rslora=True),
    "patterns": dict(r=4, lora_alpha=8, rank_pattern={"q_proj": 2, "down_proj": 6},
                     alpha_pattern={"k_proj": 3, "q_proj": 5}),
}


def _adapter(tiny_base: Path, out: Path, seed: int = 1, **lora) -> dict[str, np.ndarray]:
    """A PEFT LoRA on every linear layer with random A and B, saved to ``out``; returns each
    module's ΔW as PEFT itself merges it (merge_and_unload minus the base weights)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    peft_model = get_peft_model(model, LoraConfig(target_modules=LINEAR, lora_dropout=0.0, **lora))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    peft_model.save_pretrained(out)
    merged = peft_model.merge_and_unload().state_dict()
    return {k[: -len(".weight")]: (merged[k].double() - base[k].double()).numpy()
            for k in base if k.endswith("_proj.weight")}


def _hf_names(n_layers: int = 2) -> dict[str, str]:
    """GGUF tensor name -> HF module name, from the gguf package's own map."""
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers)
    out = {}
    for layer in range(n_layers):
        for part in LINEAR:
            group = "self_attn" if part.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            module = f"model.layers.{layer}.{group}.{part}"
            out[names.get_name(module + ".weight", try_suffixes=(".weight",))] = module
    return out


def _unpermute(gguf_name: str, rows: np.ndarray) -> np.ndarray:
    """llama.cpp's q/k row order back to HF's, with transformers' own GGUF loader (an implementation
    independent of fedmem's)."""
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    processor = LlamaTensorProcessor(config={"num_attention_heads": N_HEAD, "num_key_value_heads": N_KV})
    return processor.process(rows, gguf_name).weights


def _fields(path: Path) -> dict:
    reader = gguf.GGUFReader(path)
    return {f.name: f.contents() for f in reader.fields.values() if not f.name.startswith("GGUF.")}


def _lora_deltas(path: Path, unpermute: bool = True) -> dict[str, np.ndarray]:
    """Each module's ΔW as llama.cpp applies the file: alpha / rank · B @ A, in HF row order."""
    reader = gguf.GGUFReader(path)
    alpha = float(reader.get_field("adapter.lora.alpha").contents())
    tensors = {t.name: np.array(t.data, dtype=np.float64) for t in reader.tensors}
    hf = _hf_names()
    out = {}
    for name in tensors:
        if name.endswith(".lora_a"):
            base = name[: -len(".lora_a")]
            A, B = tensors[name], tensors[base + ".lora_b"]
            delta = (alpha / A.shape[0] if alpha else 1.0) * B @ A
            out[hf[base]] = _unpermute(base, delta) if unpermute else delta
    return out


@pytest.mark.parametrize("case", sorted(CASES))
def test_lora_file_reconstructs_every_peft_delta(tiny_base, tmp_path, case):
    expected = _adapter(tiny_base, tmp_path / "memory", **CASES[case])
    summary = write_gguf_lora(tmp_path / "memory", tiny_base, tmp_path / "memory.gguf")
    got = _lora_deltas(tmp_path / "memory.gguf")
    assert sorted(got) == sorted(expected) and len(got) == 2 * len(LINEAR)
    for module, delta in expected.items():
        assert np.abs(delta).max() > 0.1, module  # a real update, so a wrong scale or order shows
        np.testing.assert_allclose(got[module], delta, rtol=1e-5, atol=1e-5, err_msg=module)
    assert summary["modules"] == len(got) and summary["tensors"] == 2 * len(got)
    assert summary["bytes"] == (tmp_path / "memory.gguf").stat().st_size


def test_lora_file_metadata_names_and_shapes(tiny_base, tmp_path):
    _adapter(tiny_base, tmp_path / "memory", **CASES["patterns"])
    summary = write_gguf_lora(tmp_path / "memory", tiny_base, tmp_path / "out" / "memory.gguf")
    path = tmp_path / "out" / "memory.gguf"
    fields = _fields(path)
    assert fields["general.architecture"] == "llama"
    assert fields["general.type"] == "adapter"
    assert fields["adapter.type"] == "lora"
    assert fields["adapter.lora.alpha"] == summary["alpha"] == 4.0  # the most common rank
    reader = gguf.GGUFReader(path)
    shapes = {t.name: [int(n) for n in t.shape] for t in reader.tensors}  # GGUF order: ne[0] first
    assert all(t.tensor_type == gguf.GGMLQuantizationType.F32 for t in reader.tensors)
    # What llama.cpp checks: lora_a is (in, r), lora_b is (r, out), r as in the config's patterns.
    assert shapes["blk.0.attn_q.weight.lora_a"] == [32, 2] and shapes["blk.0.attn_q.weight.lora_b"] == [2, 32]
    assert shapes["blk.1.attn_k.weight.lora_a"] == [32, 4] and shapes["blk.1.attn_k.weight.lora_b"] == [4, 16]
    assert shapes["blk.0.ffn_down.weight.lora_a"] == [64, 6] and shapes["blk.0.ffn_down.weight.lora_b"] == [6, 32]
    assert shapes["blk.0.ffn_gate.weight.lora_a"] == [32, 4] and shapes["blk.0.ffn_gate.weight.lora_b"] == [4, 64]
    assert len(shapes) == 2 * 2 * len(LINEAR)
    assert not list((tmp_path / "out").glob("*.tmp")), "the temporary file was left behind"


def test_q_and_k_rows_are_permuted_for_llama_cpp(tiny_base, tmp_path):
    expected = _adapter(tiny_base, tmp_path / "memory", **CASES["plain"])
    write_gguf_lora(tmp_path / "memory", tiny_base, tmp_path / "memory.gguf")
    raw = _lora_deltas(tmp_path / "memory.gguf", unpermute=False)
    for module, delta in raw.items():
        if module.endswith(("q_proj", "k_proj")):
            # Without the permutation the file would hold PEFT's rows as they are: it must not.
            assert not np.allclose(delta, expected[module], atol=1e-3), module
            heads = N_HEAD if module.endswith("q_proj") else N_KV
            np.testing.assert_allclose(delta, gguf_export.permute_rows(expected[module], heads), atol=1e-5)
        else:
            np.testing.assert_allclose(delta, expected[module], atol=1e-5, err_msg=module)


def _tiny_base_gguf(tiny_base: Path, path: Path) -> Path:
    """The tiny model as convert_hf_to_gguf writes a Llama: q/k rows permuted, F32, the embedding
    quantised (Q8_0) so a copied quantised tensor is covered too."""
    from safetensors.torch import load_file

    config = json.loads((tiny_base / "config.json").read_text())
    weights = {k: v.float().numpy() for k, v in load_file(tiny_base / "model.safetensors").items()}
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config["num_hidden_layers"])
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name("tiny")
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_token_list(["a", "b", "c"])  # an array of strings, to copy
    for key, value in weights.items():
        if key == "lm_head.weight":
            continue  # tied
        name = names.get_name(key, try_suffixes=(".weight",))
        if key.endswith("q_proj.weight"):
            value = gguf_export.permute_rows(value, N_HEAD)
        elif key.endswith("k_proj.weight"):
            value = gguf_export.permute_rows(value, N_KV)
        if name == "token_embd.weight":
            q = gguf.quants.quantize(value, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(name, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(name, np.ascontiguousarray(value, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_merged_gguf_is_base_plus_delta_and_copies_the_rest(tiny_base, tmp_path):
    expected = _adapter(tiny_base, tmp_path / "memory", **CASES["patterns"])
    base_gguf = _tiny_base_gguf(tiny_base, tmp_path / "base.gguf")
    summary = write_merged_gguf(tmp_path / "memory", tiny_base, base_gguf, tmp_path / "merged.gguf")
    base, merged = gguf.GGUFReader(base_gguf), gguf.GGUFReader(tmp_path / "merged.gguf")
    merged_fields = _fields(tmp_path / "merged.gguf")
    assert merged_fields.pop(EXPORT_KEY) == "merged"  # the one key added: marks fedmem's own output
    assert merged_fields == _fields(base_gguf)
    assert [t.name for t in merged.tensors] == [t.name for t in base.tensors]
    hf = _hf_names()
    tolerance = {"F16": 2e-3, "F32": 1e-5}[summary["type"]]
    for b, m in zip(base.tensors, merged.tensors):
        if b.name in hf:
            assert m.tensor_type == getattr(gguf.GGMLQuantizationType, summary["type"])
            got = _unpermute(b.name, np.array(m.data, dtype=np.float64) - np.array(b.data, dtype=np.float64))
            np.testing.assert_allclose(got, expected[hf[b.name]], atol=tolerance, rtol=tolerance, err_msg=b.name)
        else:
            assert m.tensor_type == b.tensor_type and bytes(m.data) == bytes(b.data), b.name
    assert summary["merged"] == len(expected) and summary["tensors"] == len(base.tensors)


def test_refuses_a_non_llama_base(tiny_base, tmp_path):
    _adapter(tiny_base, tmp_path / "memory", **CASES["plain"])
    other = tmp_path / "gpt2-like"
    shutil.copytree(tiny_base, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "architectures": ["Qwen2ForCausalLM"],
                                                   "model_type": "qwen2"}))
    with pytest.raises(ValueError, match="Qwen2ForCausalLM.*convert_lora_to_gguf"):
        write_gguf_lora(tmp_path / "memory", other, tmp_path / "memory.gguf")
    assert not (tmp_path / "memory.gguf").exists()


def test_refuses_a_memory_that_does_not_fit_the_base(tiny_base, tmp_path):
    from fedmem.lora import write_peft_adapter

    module = "model.layers.1.mlp.up_proj"
    write_peft_adapter(tmp_path / "memory", {module: (torch.ones(64, 2), torch.ones(2, 48))}, tiny_base)
    with pytest.raises(ValueError, match=r"up_proj.*64×48.*64×32"):
        write_gguf_lora(tmp_path / "memory", tiny_base, tmp_path / "memory.gguf")
    with pytest.raises(ValueError, match="not a memory adapter"):
        write_gguf_lora(tmp_path, tiny_base, tmp_path / "memory.gguf")


def test_refuses_a_base_gguf_of_another_model(tiny_base, tmp_path):
    _adapter(tiny_base, tmp_path / "memory", **CASES["plain"])
    base_gguf = _tiny_base_gguf(tiny_base, tmp_path / "base.gguf")
    changed = tmp_path / "changed"
    shutil.copytree(tiny_base, changed)
    config = json.loads((changed / "config.json").read_text())
    (changed / "config.json").write_text(json.dumps({**config, "num_key_value_heads": 4}))
    with pytest.raises(ValueError, match="head_count_kv is 2"):
        write_merged_gguf(tmp_path / "memory", changed, base_gguf, tmp_path / "merged.gguf")
    # Same dimensions, other weights: caught by comparing a weight.
    from safetensors.torch import load_file, save_file

    weights = load_file(tiny_base / "model.safetensors")
    save_file({k: v.flip(0) if "q_proj" in k else v for k, v in weights.items()}, changed / "model.safetensors",
              metadata={"format": "pt"})
    (changed / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="not the memory's base model"):
        write_merged_gguf(tmp_path / "memory", changed, base_gguf, tmp_path / "merged.gguf")
    assert not (tmp_path / "merged.gguf").exists()

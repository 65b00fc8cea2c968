"""A memory adapter as GGUF for llama.cpp: a LoRA adapter file (``--lora``) or a merged model.

The adapter file follows llama.cpp's own ``convert_lora_to_gguf.py``: ``general.type`` "adapter",
``adapter.type`` "lora", ``adapter.lora.alpha``, and per adapted weight ``<gguf name>.lora_a``
(r×in) and ``<gguf name>.lora_b`` (out×r), names from the ``gguf`` package's ``TensorNameMap``.
llama.cpp applies ``alpha / rank`` to every pair, one alpha per file, while PEFT allows one scale
per module (rank_pattern, alpha_pattern, rsLoRA): the difference is folded into ``lora_b`` so each
module's update is exactly PEFT's. Llama GGUF files store q_proj/k_proj rows in the interleaved
order llama.cpp's RoPE expects (``LlamaModel.permute`` in convert_hf_to_gguf), so those updates
have their output rows (B's rows) permuted the same way.

The merged model is the base GGUF file with each weight the memory changes replaced by its
de-quantised value plus the update; everything else (metadata, untouched quantised tensors) is
copied byte for byte. Both functions only read the memory: verifying its signature and base
fingerprint is the caller's job (``fedmem.memory.verify_memory``).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .lora import ADAPTER_CONFIG, read_peft_adapter
from .memory import atomic_write_file

log = logging.getLogger(__name__)

# HF architectures whose GGUF layout this module knows (llama.cpp's LlamaModel, q/k permuted), and
# the GGUF architecture name (a gguf.MODEL_ARCH member) each becomes.
_SUPPORTED = {"LlamaForCausalLM": "LLAMA"}
# The merged model's changed weights. Measured with llama.cpp on the demo memory (24 held-out
# questions, scripts/check_gguf_llamacpp.py): F16 and F32 gave the same 24 replies, at 244 MB
# against 457 MB (the Q4_1 base is 98 MB).
MERGED_TYPE = "F16"
# Marks a file as a fedmem export, so ``fedmem export`` replaces only its own earlier output.
EXPORT_KEY = "fedmem.export"
# A base GGUF whose weight differs from base_dir's by more than this (relative Frobenius) is another
# model: Q4 quantisation error is ~0.1, an unrelated weight of the same scale ~1.4.
_SAME_WEIGHT_TOLERANCE = 0.5


@dataclass(frozen=True)
class _Update:
    module: str  # HF module name, e.g. model.layers.0.self_attn.q_proj
    gguf_name: str  # e.g. blk.0.attn_q.weight
    B: np.ndarray  # out×r float32, in the GGUF row order, the full PEFT scaling folded in
    A: np.ndarray  # r×in float32

    @property
    def rank(self) -> int:
        return self.A.shape[0]


# --- The base model: architecture, dimensions, weight shapes -----------------------------------

def _base_config(base_dir: Path) -> dict:
    path = Path(base_dir) / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: cannot read the base model's config ({err})") from err
    if not isinstance(config, dict):
        raise ValueError(f"{path}: not a model config (a JSON object)")
    return config


def _gguf_arch(config: dict, base_dir: Path):
    import gguf

    archs = config.get("architectures") or [config.get("model_type")]
    arch = archs[0] if archs else None
    if arch not in _SUPPORTED or config.get("model_type") != "llama":
        raise ValueError(
            f"{Path(base_dir) / 'config.json'}: architectures {archs!r} (model_type {config.get('model_type')!r}) "
            f"is not supported by fedmem's GGUF export, which knows {sorted(_SUPPORTED)}; for other models "
            "convert the memory (a plain PEFT LoRA directory) with llama.cpp's convert_lora_to_gguf.py --base DIR")
    return getattr(gguf.MODEL_ARCH, _SUPPORTED[arch])


def _dims(config: dict, base_dir: Path) -> dict[str, int]:
    fields = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "vocab_size")
    missing = [f for f in fields if not isinstance(config.get(f), int)]
    if missing:
        raise ValueError(f"{Path(base_dir) / 'config.json'}: no integer {missing[0]!r}")
    dims = {f: config[f] for f in fields}
    dims["num_key_value_heads"] = int(config.get("num_key_value_heads") or config["num_attention_heads"])
    return dims


def _base_shapes(base_dir: Path) -> dict[str, tuple[int, ...]]:
    """Each weight's shape, from the safetensors headers (no tensor is read)."""
    from safetensors import safe_open

    files = sorted(Path(base_dir).glob("*.safetensors"))
    if not files:
        raise ValueError(f"{base_dir}: no *.safetensors weights to check the memory's shapes against")
    shapes = {}
    for path in files:
        with safe_open(str(path), framework="pt") as fh:
            for key in fh.keys():
                shapes[key] = tuple(fh.get_slice(key).get_shape())
    return shapes


def _base_weight(base_dir: Path, key: str) -> np.ndarray:
    from safetensors import safe_open

    for path in sorted(Path(base_dir).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as fh:
            if key in fh.keys():
                return fh.get_tensor(key).float().numpy()
    raise ValueError(f"{base_dir}: no weight {key!r}")


# --- The memory's updates in GGUF terms ---------------------------------------------------------

def permute_rows(rows: np.ndarray, n_head: int) -> np.ndarray:
    """HF's q/k output-row order to llama.cpp's, as ``LlamaModel.permute`` reorders a weight: within
    each head, the two rotary halves are interleaved. Applied to B (or ΔW), never to A."""
    n = rows.shape[0]
    if n % (2 * n_head):
        raise ValueError(f"{n} rows cannot be split into {n_head} heads of two rotary halves")
    return rows.reshape(n_head, 2, n // n_head // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def _memory_updates(memory_dir: Path, base_dir: Path) -> tuple[object, dict, list[_Update]]:
    """(GGUF architecture, base dims, the memory's updates named and ordered as in GGUF)."""
    import gguf

    memory_dir, base_dir = Path(memory_dir), Path(base_dir)
    if not (memory_dir / ADAPTER_CONFIG).is_file():
        raise ValueError(f"{memory_dir}: not a memory adapter (no {ADAPTER_CONFIG})")
    config = _base_config(base_dir)
    arch = _gguf_arch(config, base_dir)
    dims = _dims(config, base_dir)
    try:
        factors = read_peft_adapter(memory_dir)  # PEFT's scaling (rank/alpha patterns, rsLoRA) is folded into B
    except FileNotFoundError as err:
        raise ValueError(str(err)) from err
    shapes = _base_shapes(base_dir)
    names = gguf.get_tensor_name_map(arch, dims["num_hidden_layers"])
    tied = bool(config.get("tie_word_embeddings", False))
    updates = []
    for module, (B, A) in factors.items():
        key = f"{module}.weight"
        if module == "lm_head" and tied:
            # llama.cpp has no output.weight for tied embeddings (convert_lora_to_gguf refuses it too).
            raise ValueError(f"{memory_dir}: the memory adapts lm_head, which this base model ties to its "
                             "embeddings; llama.cpp cannot apply a LoRA there")
        if key not in shapes:
            raise ValueError(f"{memory_dir}: memory module {module!r} has no weight {key!r} in {base_dir}")
        if shapes[key] != (B.shape[0], A.shape[1]):
            raise ValueError(f"{memory_dir}: memory module {module!r} updates a {B.shape[0]}×{A.shape[1]} weight, "
                             f"but {key} in {base_dir} is {'×'.join(map(str, shapes[key]))} (another base model?)")
        found = names.get_type_and_name(key, try_suffixes=(".weight",))
        if found is None:
            raise ValueError(f"{memory_dir}: memory module {module!r} has no GGUF tensor name for {arch.name}")
        kind, gguf_name = found
        B = B.detach().double().numpy()
        if kind == gguf.MODEL_TENSOR.ATTN_Q:
            B = permute_rows(B, dims["num_attention_heads"])
        elif kind == gguf.MODEL_TENSOR.ATTN_K:
            B = permute_rows(B, dims["num_key_value_heads"])
        updates.append(_Update(module, gguf_name, B.astype(np.float32), A.detach().float().numpy()))
    updates.sort(key=lambda u: _gguf_order(u.gguf_name))
    return arch, dims, updates


def _gguf_order(name: str) -> tuple:
    parts = name.split(".")
    return (0, int(parts[1]), name) if parts[0] == "blk" and parts[1].isdigit() else (1, 0, name)


# --- Writing -----------------------------------------------------------------------------------

def _llama_scale(alpha: float, rank: int) -> float:
    # llama_adapter_lora_weight::get_scale: alpha 0 means "no alpha", a scale of 1.
    return alpha / rank if alpha else 1.0


def write_gguf_lora(memory_dir: Path, base_dir: Path, out: Path) -> dict:
    """Write the memory as a llama.cpp LoRA adapter (``llama-server -m base.gguf --lora out``).

    ``adapter.lora.alpha`` is the memory's most common rank, so llama.cpp's ``alpha / rank`` is 1
    for those modules and B holds PEFT's scaling as fedmem stores it; modules of another rank get
    ``rank / alpha`` folded into B as well. Returns {"path", "tensors", "modules", "alpha", "bytes"}.
    Raises ValueError for a directory that is not a memory, an unsupported base architecture, or a
    memory whose shapes do not fit the base model.
    """
    import gguf

    arch, _, updates = _memory_updates(memory_dir, base_dir)
    counts = Counter(u.rank for u in updates)
    alpha = float(max(counts, key=lambda r: (counts[r], r)))

    def write(tmp: Path) -> None:
        writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[arch])
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_name("fedmem memory")
        writer.add_string(EXPORT_KEY, "lora")
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for u in updates:
            base = u.gguf_name
            B = u.B / np.float32(_llama_scale(alpha, u.rank)) if _llama_scale(alpha, u.rank) != 1.0 else u.B
            writer.add_tensor(base + ".lora_a", np.ascontiguousarray(u.A, dtype=np.float32))
            writer.add_tensor(base + ".lora_b", np.ascontiguousarray(B, dtype=np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    size = atomic_write_file(out, write, mode=0o644)  # a model file, not a secret
    log.info("wrote a llama.cpp LoRA adapter of %d modules (alpha %g) to %s (%d bytes)",
             len(updates), alpha, out, size)
    return {"path": str(out), "tensors": 2 * len(updates), "modules": len(updates), "alpha": alpha, "bytes": size}


def _field_value(reader, name: str):
    field = reader.get_field(name)
    return field.contents() if field is not None else None


def _check_base_gguf(reader, base_gguf: Path, arch, dims: dict, base_dir: Path, updates: list[_Update]) -> None:
    """Refuse a GGUF that is not the memory's base: architecture, dimensions, and one weight's values."""
    import gguf

    arch_name = gguf.MODEL_ARCH_NAMES[arch]
    found = _field_value(reader, gguf.Keys.General.ARCHITECTURE)
    if found != arch_name:
        raise ValueError(f"{base_gguf}: general.architecture is {found!r}, but {base_dir} is {arch_name!r}")
    if reader.byte_order != "I":
        raise ValueError(f"{base_gguf}: byte order differs from this machine's; cannot merge into it")
    expected = {
        gguf.Keys.LLM.BLOCK_COUNT: dims["num_hidden_layers"],
        gguf.Keys.LLM.EMBEDDING_LENGTH: dims["hidden_size"],
        gguf.Keys.LLM.FEED_FORWARD_LENGTH: dims["intermediate_size"],
        gguf.Keys.Attention.HEAD_COUNT: dims["num_attention_heads"],
        gguf.Keys.Attention.HEAD_COUNT_KV: dims["num_key_value_heads"],
    }
    for key, want in expected.items():
        key = key.format(arch=arch_name)
        got = _field_value(reader, key)
        if got != want:
            raise ValueError(f"{base_gguf}: {key} is {got!r}, but {base_dir}/config.json says {want}: "
                             "this GGUF is not the memory's base model")
    tensors = {t.name: t for t in reader.tensors}
    for u in updates:
        t = tensors.get(u.gguf_name)
        if t is None:
            raise ValueError(f"{base_gguf}: no tensor {u.gguf_name!r} for memory module {u.module!r}")
        shape = (u.B.shape[0], u.A.shape[1])
        if tuple(int(n) for n in reversed(t.shape)) != shape:
            raise ValueError(f"{base_gguf}: {u.gguf_name} is {'×'.join(str(int(n)) for n in reversed(t.shape))}, "
                             f"but memory module {u.module!r} updates a {shape[0]}×{shape[1]} weight")
    # Same dimensions can still be another model (or a GGUF whose q/k rows are not in llama.cpp's order):
    # compare one weight, a q_proj when the memory has one since its rows are permuted.
    probe = next((u for u in updates if ".attn_q." in u.gguf_name), updates[0])
    ours = _dequantized(tensors[probe.gguf_name])
    theirs = _base_weight(base_dir, f"{probe.module}.weight")
    if ".attn_q." in probe.gguf_name:
        theirs = permute_rows(theirs, dims["num_attention_heads"])
    elif ".attn_k." in probe.gguf_name:
        theirs = permute_rows(theirs, dims["num_key_value_heads"])
    norm = float(np.linalg.norm(theirs)) or 1.0
    error = float(np.linalg.norm(ours - theirs)) / norm
    if error > _SAME_WEIGHT_TOLERANCE:
        raise ValueError(f"{base_gguf}: {probe.gguf_name} differs from {probe.module}.weight in {base_dir} by "
                         f"{error:.2f} (relative); this GGUF is not the memory's base model")


def _dequantized(tensor) -> np.ndarray:
    from gguf.quants import dequantize

    shape = tuple(int(n) for n in reversed(tensor.shape))
    try:
        return np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32).reshape(shape)
    except NotImplementedError as err:
        raise ValueError(f"{tensor.name}: cannot de-quantise GGUF type {tensor.tensor_type.name} ({err})") from err


def write_merged_gguf(memory_dir: Path, base_dir: Path, base_gguf: Path, out: Path) -> dict:
    """Write a standalone GGUF model: ``base_gguf`` with the memory merged into it.

    Every metadata key/value and untouched tensor of ``base_gguf`` is copied as it is (quantised);
    each weight the memory changes becomes de-quantised base + ΔW (q/k rows permuted), stored as
    ``MERGED_TYPE``. ``base_gguf`` must be the GGUF of ``base_dir`` (the memory's base): same
    architecture and dimensions, and the same weights up to quantisation. Returns {"path",
    "tensors", "merged", "type", "bytes"}. Raises ValueError on any mismatch.
    """
    import gguf

    arch, dims, updates = _memory_updates(memory_dir, base_dir)
    base_gguf = Path(base_gguf)
    try:
        reader = gguf.GGUFReader(base_gguf)
    except (OSError, ValueError) as err:
        raise ValueError(f"{base_gguf}: not a readable GGUF file ({err})") from err
    _check_base_gguf(reader, base_gguf, arch, dims, base_dir, updates)
    by_name = {u.gguf_name: u for u in updates}
    qtype = getattr(gguf.GGMLQuantizationType, MERGED_TYPE)
    np_type = {"F16": np.float16, "F32": np.float32}[MERGED_TYPE]

    def merged(tensor) -> np.ndarray:
        u = by_name[tensor.name]
        weight = _dequantized(tensor).astype(np.float64) + u.B.astype(np.float64) @ u.A.astype(np.float64)
        return weight.astype(np_type)

    def write(tmp: Path) -> None:
        writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[arch])
        for field in reader.fields.values():
            # GGUF.* are the header's counts, read as fields; the writer adds the architecture itself.
            if field.name.startswith("GGUF.") or field.name in (gguf.Keys.General.ARCHITECTURE, EXPORT_KEY):
                continue
            vtype = field.types[0]
            sub_type = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(field.name, field.contents(), vtype, sub_type=sub_type)
        writer.add_string(EXPORT_KEY, "merged")
        writer.data_alignment = reader.alignment
        for t in reader.tensors:
            if t.name in by_name:
                shape = tuple(int(n) for n in reversed(t.shape))
                nbytes = int(np.prod(shape)) * np.dtype(np_type).itemsize
                writer.add_tensor_info(t.name, shape, np.dtype(np_type), nbytes, raw_dtype=qtype)
            else:
                writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t in reader.tensors:  # one merged weight in memory at a time
            writer.write_tensor_data(merged(t) if t.name in by_name else t.data)
        writer.close()

    size = atomic_write_file(out, write, mode=0o644)  # a model file, not a secret
    log.info("wrote %s merged with %d memory weights (%s) to %s (%d bytes)",
             base_gguf.name, len(updates), MERGED_TYPE, out, size)
    return {"path": str(out), "tensors": len(reader.tensors), "merged": len(updates), "type": MERGED_TYPE,
            "bytes": size}

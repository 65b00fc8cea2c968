"""LoRA factors <-> models <-> the standard PEFT adapter format.

Factors are kept with the LoRA scaling folded into B, so ΔW = B @ A exactly and the
aggregation code never needs to know a client's alpha. On disk a memory is a plain
PEFT LoRA directory with lora_alpha == r (scaling 1), readable by any PEFT tool.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections import Counter
from pathlib import Path

import torch

from .aggregate import Factors
from .config import LoraSettings

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"

logger = logging.getLogger(__name__)


def attach_lora(model, settings: LoraSettings):
    """Wrap a base model with a fresh, trainable LoRA (B = 0, so it starts as a no-op)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(settings.seed)
    config = LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        target_modules=list(settings.target_modules),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def _lora_layers(peft_model, adapter: str = "default"):
    from peft.tuners.lora import LoraLayer

    prefix = "base_model.model."
    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer) and adapter in module.lora_A:
            yield name[len(prefix):] if name.startswith(prefix) else name, module


def extract_factors(peft_model) -> Factors:
    """The trained ΔW of every LoRA layer as (B·scaling, A), detached on the CPU."""
    out: Factors = {}
    for name, layer in _lora_layers(peft_model):
        A = layer.lora_A["default"].weight.detach().float().cpu().clone()
        B = layer.lora_B["default"].weight.detach().float().cpu() * layer.scaling["default"]
        out[name] = (B.clone(), A)
    return out


def load_factors(peft_model, factors: Factors, keep_fresh_where_zero: bool = False, adapter: str = "default") -> None:
    """Set a LoRA's weights from factors (clients continue from the global A, B).

    With ``keep_fresh_where_zero``, components that are zero in the factors (a memory
    padded to its rank) keep the LoRA's fresh random A rows: B stays zero there, so
    the product is unchanged, but those components can still learn (an all-zero pair
    never gets a gradient). ``adapter``: which of the model's adapters to set.
    """
    layers = dict(_lora_layers(peft_model, adapter))
    missing = sorted(set(factors) - set(layers))
    if missing:
        raise ValueError(f"memory has modules the model lacks, e.g. {missing[0]}")
    with torch.no_grad():
        for name, (B, A) in factors.items():
            layer = layers[name]
            a = layer.lora_A[adapter].weight
            if a.shape != A.shape:
                raise ValueError(f"{name}: LoRA rank {a.shape[0]} cannot hold memory rank {A.shape[0]}")
            dead = (A.abs().sum(dim=1) == 0) & (B.abs().sum(dim=0) == 0) if keep_fresh_where_zero else None
            fresh = a[dead].clone() if dead is not None and dead.any() else None
            a.copy_(A)
            if fresh is not None:
                a[dead] = fresh
            layer.lora_B[adapter].weight.copy_(B / layer.scaling[adapter])


def merge_factors(model, factors: Factors) -> None:
    """W += B @ A in place: bake a memory into a plain (un-wrapped) base model."""
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, (B, A) in factors.items():
            if name not in modules:
                raise ValueError(f"memory module {name} is not in the base model")
            weight = modules[name].weight
            weight += (B.double() @ A.double()).to(weight.dtype).to(weight.device)


# --- The PEFT adapter directory ---------------------------------------------------------

# The config goes through ``LoraConfig.save_pretrained`` / ``PeftConfig.from_pretrained`` and
# the tensors are read with ``peft.utils.load_peft_weights``. PEFT has no model-free weight
# writer: ``get_peft_model_state_dict`` (what ``PeftModel.save_pretrained`` uses) needs a
# PeftModel wrapped around the full base model, which a server aggregating factors does not
# load. So the key format that writer produces for a plain LoRA Linear layer (the adapter name
# removed) is spelled out in ``_peft_key``, and tests load the result with
# ``PeftModel.from_pretrained`` to hold it to PEFT's own reader.
_KEY = re.compile(r"base_model\.model\.(?P<name>.+)\.lora_(?P<part>[AB])\.weight")
_KEY_PREFIX = "base_model.model."

# init_lora_weights values whose loading leaves the base weights alone, so ΔW = B @ A · scaling.
# PiSSA, OLoRA, CorDA, LoftQ and LoRA-GA rewrite the base weights when PEFT (re)creates the
# adapter; MiCA is a variant (and caught by the variant check below as well).
_PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal")


def _peft_key(name: str, part: str) -> str:
    """PEFT's saved-state key of a LoRA Linear factor (``part`` is "A" or "B")."""
    return f"{_KEY_PREFIX}{name}.lora_{part}.weight"


def _rank_pattern_key(name: str) -> str:
    # PEFT matches pattern keys with re.match(rf"(.*\.)?({key})$", module_name) (peft.utils.other
    # get_pattern_key); the anchor keeps "q_proj" from also matching "model.q_proj".
    return "^" + re.escape(name)


def _checked_factors(factors: Factors) -> dict[str, int]:
    """Each module's rank, after checking the factors are 2-D pairs that multiply."""
    if not factors:
        raise ValueError("no LoRA factors to write")
    ranks = {}
    for name, pair in factors.items():
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise ValueError(f"{name}: factors must be a (B, A) pair")
        B, A = pair
        if not (isinstance(B, torch.Tensor) and isinstance(A, torch.Tensor)):
            raise TypeError(f"{name}: factors must be tensors, got {type(B).__name__} and {type(A).__name__}")
        if B.ndim != 2 or A.ndim != 2 or B.shape[1] != A.shape[0] or A.shape[0] == 0:
            raise ValueError(f"{name}: B {tuple(B.shape)} and A {tuple(A.shape)} are not a LoRA pair (out×r, r×in)")
        ranks[name] = A.shape[0]
    return ranks


def write_peft_adapter(directory: Path, factors: Factors, base_model_dir: Path) -> None:
    """Write factors as a standard PEFT LoRA adapter (scaling 1) into ``directory``.

    The config is PEFT's own ``LoraConfig`` with lora_alpha == r; modules whose rank differs
    from the most common one get matching ``rank_pattern``/``alpha_pattern`` entries, so every
    module keeps scaling 1 and ΔW = B @ A exactly.
    """
    from peft import LoraConfig
    from safetensors.torch import save_file

    directory = Path(directory)
    ranks = _checked_factors(factors)
    counts = Counter(ranks.values())
    rank = max(counts, key=lambda r: (counts[r], r))
    pattern = {_rank_pattern_key(name): r for name, r in sorted(ranks.items()) if r != rank}
    config = LoraConfig(
        base_model_name_or_path=str(Path(base_model_dir).resolve()),
        task_type="CAUSAL_LM",
        inference_mode=True,
        r=rank,
        lora_alpha=rank,
        rank_pattern=pattern,
        alpha_pattern=dict(pattern),
        target_modules=sorted({n.rsplit(".", 1)[-1] for n in factors}),
        lora_dropout=0.0,
        bias="none",
    )
    tensors = {}
    for name, (B, A) in factors.items():
        tensors[_peft_key(name, "A")] = A.detach().float().cpu().contiguous()
        tensors[_peft_key(name, "B")] = B.detach().float().cpu().contiguous()
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt"})  # as PeftModel.save_pretrained
    config.save_pretrained(str(directory))
    logger.debug("wrote a PEFT LoRA adapter of %d modules (rank %d, %d other ranks) to %s",
                 len(factors), rank, len(pattern), directory)


def _refuse(directory: Path, field: str, detail: str) -> ValueError:
    return ValueError(f"{directory}: cannot use this PEFT adapter as a fedmem memory: {field} {detail}; "
                      "fedmem only reads plain LoRA, whose update is exactly B @ A · scaling")


def _check_config(directory: Path, config, raw: dict) -> None:
    """Refuse configs whose adapters change the model beyond ΔW = B @ A · scaling per Linear."""
    import dataclasses

    if config.peft_type != "LORA":
        raise _refuse(directory, "peft_type", f"is {getattr(config.peft_type, 'value', config.peft_type)}, not LORA")
    known = {f.name for f in dataclasses.fields(config)}
    unknown = sorted(k for k, v in raw.items() if k not in known and v not in (None, False, "", [], {}))
    if unknown:
        raise _refuse(directory, unknown[0], "is set but unknown to the installed peft "
                      f"{_peft_version()} (written by a newer PEFT?), so its effect cannot be checked")
    if config.use_dora:
        raise _refuse(directory, "use_dora", "is set (DoRA rescales each weight column)")
    if config.fan_in_fan_out:
        raise _refuse(directory, "fan_in_fan_out", "is set (weights stored transposed, e.g. GPT-2 Conv1D)")
    if config.modules_to_save:
        raise _refuse(directory, "modules_to_save", f"is {list(config.modules_to_save)} (whole modules replaced)")
    if config.bias != "none":
        raise _refuse(directory, "bias", f"is {config.bias!r}, not 'none' (trained biases)")
    if config.lora_bias:
        raise _refuse(directory, "lora_bias", "is set (a bias on lora_B)")
    if getattr(config, "use_qalora", False):
        raise _refuse(directory, "use_qalora", "is set (A acts on pooled inputs)")
    for field in ("trainable_token_indices", "target_parameters", "layer_replication"):
        if getattr(config, field, None):
            raise _refuse(directory, field, f"is {getattr(config, field)!r}")
    init = config.init_lora_weights
    if not (isinstance(init, bool) or init in _PLAIN_INITS):
        raise _refuse(directory, "init_lora_weights", f"is {init!r}, not a plain initialisation (PEFT rewrites the "
                      "base weights when it creates PiSSA, OLoRA, CorDA, LoftQ or LoRA-GA adapters)")
    # Every other LoRA variant PEFT knows, found the way PEFT's LoraLayer.resolve_lora_variant finds
    # them: fields tagged is_lora_variant, and init_lora_weights values listed as lora_variants.
    for f in dataclasses.fields(config):
        if f.metadata.get("is_lora_variant") and getattr(config, f.name):
            raise _refuse(directory, f.name, "is set (a LoRA variant)")
        if f.name == "init_lora_weights" and init in f.metadata.get("lora_variants", ()):
            raise _refuse(directory, f.name, f"is {init!r} (a LoRA variant)")


def _peft_version() -> str:
    import peft

    return peft.__version__


def read_peft_adapter(directory: str | os.PathLike) -> Factors:
    """Factors (with scaling folded into B) from a PEFT LoRA adapter directory.

    Per-module ranks and alphas (rank_pattern/alpha_pattern) and rsLoRA are honoured as PEFT
    honours them. Anything whose update is not ΔW = B @ A · scaling on a Linear weight (DoRA,
    fan_in_fan_out, modules_to_save, biases, embedding or parameter LoRA, other variants, or
    incomplete tensors) raises ValueError naming the directory and the field or tensor.
    """
    from peft import PeftConfig
    from peft.utils import load_peft_weights
    from peft.utils.other import get_pattern_key

    directory = Path(directory)
    if not (directory / ADAPTER_CONFIG).is_file():
        raise FileNotFoundError(f"{directory}: no {ADAPTER_CONFIG}; not a PEFT adapter directory")
    if not ((directory / ADAPTER_WEIGHTS).is_file() or (directory / "adapter_model.bin").is_file()):
        raise FileNotFoundError(f"{directory}: no {ADAPTER_WEIGHTS}; the adapter has no weights")
    try:
        raw = PeftConfig.from_json_file(str(directory / ADAPTER_CONFIG))
    except ValueError as err:
        raise ValueError(f"{directory}: {ADAPTER_CONFIG} is not JSON ({err})") from err
    if not isinstance(raw, dict) or raw.get("peft_type") != "LORA":  # checked first: other types may not build
        raise _refuse(directory, "peft_type", f"is {raw.get('peft_type') if isinstance(raw, dict) else raw!r}, "
                      "not 'LORA'")
    try:
        config = PeftConfig.from_pretrained(str(directory))
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{directory}: {ADAPTER_CONFIG} is not a PEFT config the installed peft "
                         f"{_peft_version()} can read ({err!r})") from err
    _check_config(directory, config, raw)

    tensors = load_peft_weights(str(directory), device="cpu")
    foreign = sorted(key for key in tensors if _KEY.fullmatch(key) is None)
    if foreign:
        # Name the most telling one: "lora_embedding_A" says more than the embedding it came with.
        hints = [(next((i for i, (part, _) in enumerate(_FOREIGN_KEYS) if part in key), len(_FOREIGN_KEYS)), key)
                 for key in foreign]
        rank, key = min(hints)
        hint = _FOREIGN_KEYS[rank][1] if rank < len(_FOREIGN_KEYS) else "not a LoRA Linear factor"
        more = f", and {len(foreign) - 1} more such tensors" if len(foreign) > 1 else ""
        raise _refuse(directory, f"tensor {key!r}", f"is present ({hint}{more})")
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        m = _KEY.fullmatch(key)
        pairs.setdefault(m["name"], {})[m["part"]] = value
    if not pairs:
        raise _refuse(directory, ADAPTER_WEIGHTS, "holds no LoRA factors")

    out: Factors = {}
    for name, pair in sorted(pairs.items()):
        if set(pair) != {"A", "B"}:
            missing = "B" if "A" in pair else "A"
            raise _refuse(directory, f"tensor {_peft_key(name, missing)!r}", "is missing (incomplete A/B pair)")
        A, B = pair["A"], pair["B"]
        r = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), name), config.r)
        alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), name), config.lora_alpha)
        if A.ndim != 2 or B.ndim != 2 or B.shape[1] != A.shape[0] or A.shape[0] != r:
            raise _refuse(directory, f"tensors of {name}",
                          f"do not match: lora_B {tuple(B.shape)}, lora_A {tuple(A.shape)}, rank {r} in the config")
        # As peft.tuners.lora.layer.LoraLayer.update_layer computes it.
        scaling = alpha / math.sqrt(r) if config.use_rslora else alpha / r
        out[name] = (B.float() * scaling, A.float())
    logger.debug("read a PEFT LoRA adapter of %d modules from %s", len(out), directory)
    return out


# What a tensor outside the plain LoRA key format usually is, for the refusal message.
_FOREIGN_KEYS = (
    ("lora_magnitude_vector", "DoRA"),
    ("lora_embedding_", "LoRA on an embedding"),
    ("modules_to_save", "a module saved whole"),
    ("trainable_tokens", "trainable token embeddings"),
    ("lora_diag", "KaSA"),
    (".bias", "a trained bias"),
)

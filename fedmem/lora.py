"""LoRA factors <-> models <-> the standard PEFT adapter format.

Factors are kept with the LoRA scaling folded into B, so ΔW = B @ A exactly and the
aggregation code never needs to know a client's alpha. On disk a memory is a plain
PEFT LoRA directory with lora_alpha == r (scaling 1), readable by any PEFT tool.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .aggregate import Factors
from .examples import RECIPES as RULE_RECIPES

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PRECISIONS = ("auto", "fp32", "bf16")
# "distilled" asks the statements recipe's questions of the base model reading the
# document and trains its replies (fedmem.context_distillation); the others are rules.
RECIPES = RULE_RECIPES + ("distilled",)


@dataclass
class LoraSettings:
    """Local training recipe. Defaults are tuned for knowledge injection on small models:
    all linear layers, and ~10x the full-fine-tuning learning rate."""

    rank: int = 16
    alpha: int = 32
    target_modules: list[str] = field(default_factory=lambda: list(ALL_LINEAR))
    learning_rate: float = 3e-3
    epochs: int = 3
    batch_size: int = 4
    max_length: int = 384
    seed: int = 0
    # "auto": bfloat16 autocast where the hardware computes it natively (CUDA with bf16,
    # CPUs with AVX512-BF16/AMX), else float32. LoRA weights and optimizer stay float32.
    # ~1.4x the tokens/s on the 2-core CPU, but on the demo it cost 2 of 24 questions and
    # 2 of 24 control questions against float32 (docs/results.md), so float32 stays the default.
    precision: str = "fp32"
    # How documents become question-form examples (RECIPES above).
    recipe: str = "statements"
    # General questions answered as the base model answers them, added as this share of
    # the corpus's examples, so the memory does not answer everything with owners' facts
    # (fedmem.retention). 0 turns it off.
    retention: float = 0.25
    # Extra questions written by a model and round-trip checked (fedmem.question_writer):
    # "" off, "base" the base model, or a local model directory on the owner's machine.
    generator: str = ""

    def __post_init__(self):
        problems = []
        for name in ("rank", "alpha", "epochs", "batch_size", "max_length"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                problems.append(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if not (self.learning_rate > 0):
            problems.append(f"learning_rate must be > 0, got {self.learning_rate!r}")
        if not (isinstance(self.retention, (int, float)) and 0 <= self.retention <= 1):
            problems.append(f"retention must be a share between 0 and 1, got {self.retention!r}")
        if self.recipe not in RECIPES:
            problems.append(f"recipe must be one of {RECIPES}, got {self.recipe!r}")
        if not isinstance(self.generator, str):
            problems.append(f"generator must be '', 'base' or a model directory, got {self.generator!r}")
        if self.precision not in PRECISIONS:
            problems.append(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if not self.target_modules:
            problems.append("target_modules must name at least one module")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict:
        return asdict(self)


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


def _lora_layers(peft_model):
    from peft.tuners.lora import LoraLayer

    prefix = "base_model.model."
    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer) and "default" in module.lora_A:
            yield name[len(prefix):] if name.startswith(prefix) else name, module


def extract_factors(peft_model) -> Factors:
    """The trained ΔW of every LoRA layer as (B·scaling, A), detached on the CPU."""
    out: Factors = {}
    for name, layer in _lora_layers(peft_model):
        A = layer.lora_A["default"].weight.detach().float().cpu().clone()
        B = layer.lora_B["default"].weight.detach().float().cpu() * layer.scaling["default"]
        out[name] = (B.clone(), A)
    return out


def load_factors(peft_model, factors: Factors, keep_fresh_where_zero: bool = False) -> None:
    """Set a LoRA's weights from factors (clients continue from the global A, B).

    With ``keep_fresh_where_zero``, components that are zero in the factors (a memory
    padded to its rank) keep the LoRA's fresh random A rows: B stays zero there, so
    the product is unchanged, but those components can still learn (an all-zero pair
    never gets a gradient).
    """
    layers = dict(_lora_layers(peft_model))
    missing = sorted(set(factors) - set(layers))
    if missing:
        raise ValueError(f"memory has modules the model lacks, e.g. {missing[0]}")
    with torch.no_grad():
        for name, (B, A) in factors.items():
            layer = layers[name]
            a = layer.lora_A["default"].weight
            if a.shape != A.shape:
                raise ValueError(f"{name}: LoRA rank {a.shape[0]} cannot hold memory rank {A.shape[0]}")
            dead = (A.abs().sum(dim=1) == 0) & (B.abs().sum(dim=0) == 0) if keep_fresh_where_zero else None
            fresh = a[dead].clone() if dead is not None and dead.any() else None
            a.copy_(A)
            if fresh is not None:
                a[dead] = fresh
            layer.lora_B["default"].weight.copy_(B / layer.scaling["default"])


def merge_factors(model, factors: Factors) -> None:
    """W += B @ A in place: bake a memory into a plain (un-wrapped) base model."""
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, (B, A) in factors.items():
            if name not in modules:
                raise ValueError(f"memory module {name} is not in the base model")
            weight = modules[name].weight
            weight += (B.double() @ A.double()).to(weight.dtype).to(weight.device)


def _peft_key(name: str, part: str) -> str:
    return f"base_model.model.{name}.lora_{part}.weight"


def write_peft_adapter(directory: Path, factors: Factors, base_model_dir: Path) -> None:
    """Write factors as a standard PEFT LoRA adapter (scaling 1) into ``directory``."""
    from safetensors.torch import save_file

    rank = next(iter(factors.values()))[1].shape[0]
    tensors = {}
    for name, (B, A) in factors.items():
        tensors[_peft_key(name, "A")] = A.float().contiguous()
        tensors[_peft_key(name, "B")] = B.float().contiguous()
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(Path(base_model_dir).resolve()),
        "r": rank,
        "lora_alpha": rank,
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": sorted({n.rsplit(".", 1)[-1] for n in factors}),
        "fan_in_fan_out": False,
        "inference_mode": True,
        "use_rslora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
    }
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (directory / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))


def read_peft_adapter(directory: str | os.PathLike) -> Factors:
    """Factors (with scaling folded into B) from any PEFT LoRA adapter directory."""
    from safetensors.torch import load_file

    directory = Path(directory)
    config = json.loads((directory / ADAPTER_CONFIG).read_text())
    scaling = config["lora_alpha"] / config["r"]
    if config.get("use_rslora"):
        scaling = config["lora_alpha"] / config["r"] ** 0.5
    tensors = load_file(str(directory / ADAPTER_WEIGHTS))
    out: Factors = {}
    for key, A in tensors.items():
        if ".lora_A." not in key:
            continue
        name = key.removeprefix("base_model.model.").split(".lora_A.")[0]
        B = tensors[key.replace(".lora_A.", ".lora_B.")]
        out[name] = (B.float() * scaling, A.float())
    return out

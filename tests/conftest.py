"""Shared fixtures: a tiny random Llama with the real SmolLM2 tokenizer, and small corpora."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest

# A developer's own owner or coordinator state (a pinned coordinator key, say) must not change
# what the tests see: the default state dirs point into a scratch dir, for subprocesses too.
_SCRATCH_STATE = tempfile.mkdtemp(prefix="fedmem-test-state-")
os.environ["FEDMEM_CLIENT_STATE"] = os.path.join(_SCRATCH_STATE, "client")
os.environ["FEDMEM_SERVER_STATE"] = os.path.join(_SCRATCH_STATE, "server")


def _start_order(item: pytest.Item) -> int:
    if item.get_closest_marker("deployment_faults"):
        return 0
    return 1 if item.get_closest_marker("deployment") else 2


def pytest_collection_modifyitems(config, items):
    """The deployment tests first. They take a third of the suite's time, mostly waiting (round
    timeouts, a killed client's session lapsing, other processes), so under README's test command
    (pytest-xdist: ``-n 2 --dist loadscope --no-loadscope-reorder``, a module or a class is one
    unit, handed out in this order) they start at once on both workers and the rest fills in
    around them. Within a rank, the collection's order."""
    items.sort(key=_start_order)


@pytest.fixture(scope="session")
def real_base_dir() -> Path:
    from fedmem.base_model import resolve_base

    return resolve_base()


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory, real_base_dir) -> Path:
    """A 2-layer random Llama saved as a normal HF model dir, with the embedded model's tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from fedmem.base_model import load_tokenizer

    tok = load_tokenizer(str(real_base_dir))
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        initializer_range=0.5,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def fine_tuned_copy(base: Path, path: Path) -> Path:
    """A copy of a model directory with one weight changed: the same files and sizes, another
    fingerprint (a fine-tuned copy of the base, as far as any check can tell)."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    shutil.copytree(base, path)
    model = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] += 1.0
    model.save_pretrained(path)
    return path


LINEAR_LAYERS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def write_random_memory(base: Path, path: Path, seed: int = 0, scale: float = 0.05, rank: int = 2,
                        manifest: dict | None = None) -> dict:
    """A memory for ``base`` (saved as fedmem saves one): random rank-``rank`` factors on every
    linear layer; returns its manifest."""
    import torch

    from fedmem.base_model import fingerprint, load_model
    from fedmem.memory import save_memory

    model = load_model(base)
    gen = torch.Generator().manual_seed(seed)
    factors = {}
    for name, module in model.named_modules():
        if name.endswith(LINEAR_LAYERS):
            out_f, in_f = module.weight.shape
            factors[name] = (torch.randn(out_f, rank, generator=gen) * scale,
                             torch.randn(rank, in_f, generator=gen) * scale)
    return save_memory(path, factors, base, {"base_fingerprint": fingerprint(base), **(manifest or {})})


def write_routed_memory(base: Path, path: Path, seeds: dict[str, int], scale: float = 0.05, rank: int = 2,
                        manifest: dict | None = None) -> dict:
    """A routed memory for ``base`` (fedmem.routing): one random rank-``rank`` LoRA per owner (owner ->
    seed), saved side by side as fedmem saves one; returns its manifest."""
    import torch

    from fedmem.base_model import fingerprint, load_model
    from fedmem.memory import save_memory
    from fedmem.routing import ROUTING, OwnerLoras

    model = load_model(base)
    loras = {}
    for owner, seed in seeds.items():
        gen = torch.Generator().manual_seed(seed)
        loras[owner] = {name: (torch.randn(m.weight.shape[0], rank, generator=gen) * scale,
                               torch.randn(rank, m.weight.shape[1], generator=gen) * scale)
                        for name, m in model.named_modules() if name.endswith(LINEAR_LAYERS)}
    memory = OwnerLoras.empty(rank).with_updates(loras)
    return save_memory(path, memory.factors, base, {"base_fingerprint": fingerprint(base),
                                                    ROUTING: memory.manifest(), **(manifest or {})})


def write_corpus(root: Path, facts: list[tuple[str, str]], qa: list[tuple[str, str]] = ()) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "notes.md").write_text("# Notes\n\n" + " ".join(s for s, _ in facts) + "\n")
    if qa:
        (root / "facts.jsonl").write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in qa))
    return root


@pytest.fixture
def two_clients(tmp_path) -> Path:
    data = tmp_path / "data"
    write_corpus(
        data / "alpha",
        [("The Zorvex Tower was built by Mila Quent in 1911.", "Mila Quent")],
        [("Who built the Zorvex Tower?", "Mila Quent")],
    )
    write_corpus(data / "beta", [("The Pellow Quarry archive holds 612 maps.", "612")])
    return data


@pytest.fixture
def task_identity(monkeypatch):
    """What Flower sets in a running app's process, so a Message can be made and answered outside one."""
    from flwr.supercore.task_identity import TaskIdentity

    for part in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, part, 1)

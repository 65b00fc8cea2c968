"""What the server answers with: the base model, and versions of the memory merged into it.

Each memory version is its own model object with the adapter merged into the weights
(``merge_and_unload``): a merged model generates as fast as the base model (an unmerged LoRA
adds two small matmuls per layer per token), and a version is immutable once loaded, so a
request keeps the version it started on however many newer ones arrive. The price is one
extra copy of the base weights per version alive (two at most, briefly, during a swap).

A routed memory (``fedmem.routing``) cannot be merged: merging would apply its owners' LoRAs
summed. Its version stays a PeftModel with one adapter per owner and a ``router``; each request
is routed to one owner's adapter, and a batch runs its rows on their own adapters together
(PEFT's mixed-adapter batches, ``adapter_names``).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Engine:
    """A model ready to answer under one name: the base model, or one memory version."""

    name: str  # the model name clients ask for
    model: object  # a transformers causal LM in eval mode
    tokenizer: object
    version: dict = field(default_factory=dict)  # memory versions: round, sha256, source, loaded_at, signed_by
    router: object = None  # a routed memory's fedmem.routing.Router; its model is the unmerged PeftModel

    @property
    def fingerprint(self) -> str:
        """OpenAI's ``system_fingerprint``: which weights produced a reply."""
        if not self.version:
            return f"{self.name}-base"
        return f"{self.name}-r{self.version.get('round', '?')}-{self.version['sha256'][:12]}"


def load_base_engine(name: str, base_dir: str, device: str) -> Engine:
    from ..base_model import load_model, load_tokenizer

    model = load_model(base_dir, device)
    model.eval()
    return Engine(name, model, load_tokenizer(str(base_dir)))


def load_memory_engine(name: str, memory_dir: str | Path, base: str | None, device: str, trust) -> Engine:
    """Verify and load one version of the memory, merged into a fresh copy of its base model.
    Raises ``MemoryFormatError`` for a memory that is incomplete, tampered with, untrusted or
    made for another base (the caller keeps what it had)."""
    from ..answer import load_memory

    loaded = load_memory(memory_dir, base, device, trust)
    model = loaded.model if loaded.routed else loaded.model.merge_and_unload()
    model.eval()
    memory = loaded.memory
    rnd = memory.manifest.get("round")
    version = {
        "round": rnd if isinstance(rnd, int) else None,
        "sha256": memory.weights_sha256,
        "source": str(memory_dir),
        "loaded_at": int(time.time()),
        "signed_by": memory.signed_by,
        "base_dir": str(memory.base_dir),
    }
    if loaded.routed:
        version["owners"] = list(loaded.router.owners)
    return Engine(name, model, loaded.tokenizer, version, loaded.router if loaded.routed else None)


class EngineSlot:
    """The current memory engine, swapped whole: a reader gets the old or the new version, never
    a mixture, and keeps its reference for as long as it needs it."""

    def __init__(self, engine: Engine | None = None):
        self._lock = threading.Lock()
        self._engine = engine
        self.swaps = 0

    def get(self) -> Engine | None:
        with self._lock:
            return self._engine

    def put(self, engine: Engine) -> Engine | None:
        with self._lock:
            old, self._engine = self._engine, engine
            self.swaps += 1
        return old

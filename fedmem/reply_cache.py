"""Model outputs generated on an owner's machine, kept per model so later rounds reuse them.

One JSON object per (kind, model fingerprint, version) under ``FEDMEM_HOME/<kind>``,
mapping a key to a reply. A damaged file counts as empty (regenerated, never
trusted); writes are atomic and merge with whatever other owners on the same machine
wrote meanwhile.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable

from .base_model import fedmem_home, fingerprint
from .memory import atomic_write_text


def key(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:32]


class ReplyCache:
    def __init__(self, kind: str, model_dir: str | Path, version: int):
        digest = fingerprint(Path(model_dir)).split(":")[-1][:24]
        self.path = fedmem_home() / kind / f"{digest}-v{version}.json"

    def load(self) -> dict:
        try:
            stored = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return stored if isinstance(stored, dict) else {}

    def save(self, entries: dict) -> dict:
        """Write ``entries`` on top of what is stored now; returns the merged mapping."""
        merged = {**self.load(), **entries}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path, json.dumps(merged, indent=0, sort_keys=True))
        return merged

    def fill(self, items: list[tuple[str, ...]], make: Callable[[list[tuple[str, ...]]], list]) -> dict:
        """The stored replies for ``items`` (keyed by ``key(*item)``), calling ``make`` on the missing ones."""
        known = self.load()
        missing = [item for item in items if key(*item) not in known]
        if missing:
            known = self.save({key(*item): reply for item, reply in zip(missing, make(missing))})
        return known

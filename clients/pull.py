"""``fedmem-client pull``: the latest memory the server sent, verified, copied where you want it.

A joined client keeps the newest memory version it receives in ``STATE/memory``, exactly
as the coordinator signed it (``fedmem.signing.receive_memory``), and the coordinator's
key pinned in ``STATE/coordinator-signing.pub``. ``pull`` copies that directory byte for
byte beside ``--out``, verifies the copy (signature by the pinned key or a ``--trust-key``,
every file, this machine's base model) and only then renames it into place, for
``fedmem ask`` / ``fedmem eval`` or plain PEFT. Nothing in it is rewritten.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from fedmem.memory import MemoryFormatError, replace_dir, verify_memory
from fedmem.signing import PINNED_KEY, copy_memory, signer, trust_for_client

from .join import RECEIVED_MEMORY


def pull(state: Path, out: Path, base: str | None = None, trust_keys=()) -> dict:
    """Copy ``STATE/memory`` to ``out`` byte for byte, verified; returns its manifest, with the
    signer's fingerprint as ``signer`` (None for an unsigned memory where no key is configured)."""
    from fedmem.base_model import fingerprint, resolve_base

    state = Path(state).expanduser()
    source = state / RECEIVED_MEMORY
    if not source.exists():
        raise MemoryFormatError(f"{source}: no memory received yet (join a federation first; "
                                "the memory arrives each round and when the run ends)")
    trust = trust_for_client(state, trust_keys)
    base_fp = fingerprint(resolve_base(base))
    out = Path(out).expanduser().resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        # Copied first, verified where only this process writes: what is placed is what was checked.
        copy = tmp / "memory"
        copy_memory(source, copy)
        try:
            manifest = verify_memory(copy, base_fp, trust=trust)
        except MemoryFormatError as err:
            raise type(err)(str(err).replace(str(copy), str(source))) from None
        replace_dir(copy, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {**manifest, "signer": signer(out)}


def trust_hint(state: Path) -> str:
    """The ``--trust-key`` a pulled memory needs for ``fedmem ask`` when this state dir is not the
    default one (whose pinned key ``fedmem ask`` trusts by itself); "" otherwise."""
    from fedmem.signing import default_client_state

    pinned = Path(state).expanduser() / PINNED_KEY
    if not pinned.is_file() or os.path.realpath(pinned.parent) == os.path.realpath(default_client_state()):
        return ""
    return f" --trust-key {pinned}"

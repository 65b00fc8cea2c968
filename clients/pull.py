"""``fedmem-client pull``: the latest memory the server sent, verified, copied where you want it.

A joined client keeps every memory version it receives in ``STATE/memory`` (the
ClientApp writes it atomically, with its manifest and checksum). ``pull`` verifies
that copy against this machine's base model and places it at ``--out`` for
``fedmem ask`` / ``fedmem eval`` or plain PEFT.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from fedmem.memory import MemoryFormatError, verify_memory

from .join import RECEIVED_MEMORY


def pull(state: Path, out: Path, base: str | None = None) -> dict:
    from fedmem.base_model import fingerprint, resolve_base

    source = Path(state).expanduser() / RECEIVED_MEMORY
    if not source.exists():
        raise MemoryFormatError(f"{source}: no memory received yet (join a federation first; "
                                "the memory arrives each round and when the run ends)")
    manifest = verify_memory(source, fingerprint(resolve_base(base)))
    out = Path(out).expanduser().resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        shutil.copytree(source, tmp, dirs_exist_ok=True)
        verify_memory(tmp)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest

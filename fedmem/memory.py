"""The memory adapter on disk: a standard PEFT LoRA directory plus ``fedmem.json``.

``fedmem.json`` records which base model the memory belongs to (a fingerprint of its
weights), how it was made, and the sha256 of the adapter weights, which is checked
on every load. Directories are written beside their destination and renamed into
place, so a crash never leaves a half-written memory where a good one was.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from .aggregate import Factors
from .lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, read_peft_adapter, write_peft_adapter

MANIFEST = "fedmem.json"
FORMAT = "fedmem-memory/1"


class MemoryFormatError(RuntimeError):
    """A memory directory is missing, corrupt, or belongs to another base model."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_bytes(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write via a temporary file and rename: readers see the old or the new file, never half.
    The file is created 0600 (mkstemp) and only then given ``mode``, so a private key is never
    briefly readable by others."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        if mode != 0o600:
            os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _replace_dir(tmp: Path, dest: Path) -> None:
    """Swap a finished directory into place; the old one is removed only afterwards."""
    old = None
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        os.replace(dest, old)
    os.replace(tmp, dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def save_memory(directory: str | os.PathLike, factors: Factors, base_model_dir: Path, manifest: dict) -> dict:
    """Write a memory adapter atomically; returns the manifest as written."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        write_peft_adapter(tmp, factors, base_model_dir)
        full = {
            "format": FORMAT,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **manifest,
            "weights_sha256": sha256_file(tmp / ADAPTER_WEIGHTS),
        }
        (tmp / MANIFEST).write_text(json.dumps(full, indent=2, sort_keys=True))
        _replace_dir(tmp, directory)
        return full
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_manifest(directory: str | os.PathLike) -> dict:
    directory = Path(directory)
    path = directory / MANIFEST
    if not (directory / ADAPTER_CONFIG).is_file():
        raise MemoryFormatError(f"{directory}: not a memory adapter (no {ADAPTER_CONFIG})")
    if not path.is_file():
        return {}  # a plain PEFT adapter made elsewhere: usable, just not verifiable
    try:
        return json.loads(path.read_text())
    except ValueError as err:
        raise MemoryFormatError(f"{path}: corrupt manifest ({err})") from err


def verify_memory(directory: str | os.PathLike, base_fingerprint: str | None = None) -> dict:
    """Check the weights' checksum (and the base model, if given); return the manifest."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    expected = manifest.get("weights_sha256")
    if expected and sha256_file(directory / ADAPTER_WEIGHTS) != expected:
        raise MemoryFormatError(f"{directory / ADAPTER_WEIGHTS}: checksum mismatch; the memory is corrupt")
    made_for = manifest.get("base_fingerprint")
    if base_fingerprint and made_for and made_for != base_fingerprint:
        raise MemoryFormatError(
            f"{directory} was made for base model {made_for[:19]}..., "
            f"but the base model given has fingerprint {base_fingerprint[:19]}...; "
            "a memory only works on the base model it was trained on"
        )
    return manifest


def load_memory(directory: str | os.PathLike, base_fingerprint: str | None = None) -> tuple[Factors, dict]:
    manifest = verify_memory(directory, base_fingerprint)
    try:
        factors = read_peft_adapter(directory)
    except (ValueError, FileNotFoundError) as err:  # not plain LoRA, or incomplete: unusable as a memory
        raise MemoryFormatError(str(err)) from err
    return factors, manifest

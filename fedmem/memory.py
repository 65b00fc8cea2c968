"""The memory adapter on disk: a standard PEFT LoRA directory plus ``fedmem.json``.

``fedmem.json`` records which base model the memory belongs to (a fingerprint of its
weights), how it was made, and the sha256 of the adapter weights. A memory saved with a
signing key also holds ``fedmem.sig`` (``fedmem.signing``): an Ed25519 signature over
every file of the directory and the base fingerprint, which is what makes tampering with
any of them (``adapter_config.json`` included) detectable. Directories are written beside
their destination, fsynced (every file and the directory) and renamed into place, so a
crash never leaves a half-written memory where a good one was.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .aggregate import Factors
from .lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, read_peft_adapter, write_peft_adapter

MANIFEST = "fedmem.json"
FORMAT = "fedmem-memory/1"

log = logging.getLogger(__name__)


class MemoryFormatError(RuntimeError):
    """A memory directory is missing, corrupt, unsigned where a signature is required, tampered
    with, signed by an untrusted key, or belongs to another base model."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file's or a directory's contents (a directory: its entries) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(directory: str | os.PathLike) -> None:
    """fsync every file and directory under ``directory``, the directory itself last."""
    for root, dirs, files in os.walk(directory, topdown=False):
        for name in files:
            fsync_path(os.path.join(root, name))
        for name in dirs:
            fsync_path(os.path.join(root, name))
    fsync_path(directory)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_bytes(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write ``data`` to ``path`` through ``atomic_write_file``."""
    atomic_write_file(path, lambda tmp: tmp.write_bytes(data), mode)


def atomic_write_file(path: str | os.PathLike, write: Callable[[Path], None], mode: int = 0o600) -> int:
    """``write(tmp)`` fills a temporary file beside ``path``, which is then renamed over it:
    readers see the old or the new file, never half. For writers that want a path (a GGUF
    writer, matplotlib) as well as for bytes. The file is created 0600 (mkstemp) and given
    ``mode`` only when written, so a private key is never briefly readable by others. It is
    fsynced before the rename, its directory after. Returns the file's size."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        if mode != 0o600:
            os.chmod(tmp, mode)
        fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_path(path.parent)
    return path.stat().st_size


@contextmanager
def atomic_dir(dest: str | os.PathLike) -> Iterator[Path]:
    """A temporary directory beside ``dest`` for the ``with`` block to fill; then every file in
    it is fsynced and it replaces ``dest`` (``replace_dir``). On an error it is removed and
    ``dest`` stays as it was."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        yield tmp
        fsync_tree(tmp)
        replace_dir(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_dir(tmp: Path, dest: Path) -> None:
    """Swap a finished (fsynced) directory into place; the old one is removed only afterwards.
    The parent directory is fsynced once the new one is in place."""
    old = None
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        os.replace(dest, old)
    os.replace(tmp, dest)
    fsync_path(dest.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)



def save_memory(directory: str | os.PathLike, factors: Factors, base_model_dir: Path, manifest: dict,
                signing_key=None) -> dict:
    """Write a memory adapter atomically and durably; returns the manifest as written.

    ``signing_key`` (an Ed25519 private key, ``fedmem.signing``): sign every file of the memory
    and its base model's fingerprint (``fedmem.sig``); the fingerprint is computed from
    ``base_model_dir`` when the manifest does not give it, so a signed memory always names its base.
    """
    with atomic_dir(directory) as tmp:
        write_peft_adapter(tmp, factors, base_model_dir)
        full = {
            "format": FORMAT,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **manifest,
            "weights_sha256": sha256_file(tmp / ADAPTER_WEIGHTS),
        }
        if signing_key is not None:
            from .signing import key_fingerprint, sign_memory

            if not full.get("base_fingerprint"):
                from .base_model import fingerprint

                full["base_fingerprint"] = fingerprint(base_model_dir)
            full["signed_by"] = key_fingerprint(signing_key.public_key())
        (tmp / MANIFEST).write_text(json.dumps(full, indent=2, sort_keys=True))
        if signing_key is not None:
            sign_memory(tmp, signing_key, full["base_fingerprint"])
    return full


def read_manifest(directory: str | os.PathLike) -> dict:
    directory = Path(directory)
    path = directory / MANIFEST
    if not (directory / ADAPTER_CONFIG).is_file():
        raise MemoryFormatError(f"{directory}: not a memory adapter (no {ADAPTER_CONFIG})")
    if not path.is_file():
        return {}  # a plain PEFT adapter made elsewhere: usable where no signature is required
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise MemoryFormatError(f"{path}: corrupt manifest ({err})") from err
    if not isinstance(manifest, dict):
        raise MemoryFormatError(f"{path}: corrupt manifest (not a JSON object)")
    return manifest


def check_base(directory: str | os.PathLike, manifest: dict, base_fingerprint: str, signed_base: str | None = None,
               signed: bool = False) -> None:
    """Refuse a memory made for another base model than the one whose fingerprint is given. A
    signed memory must name its base (in the signature); an unsigned one is checked if it does."""
    made_for = signed_base or manifest.get("base_fingerprint")
    if signed and not made_for:
        raise MemoryFormatError(f"{directory}: the signed memory names no base model, so it cannot be checked "
                                "against this one; refusing it")
    if made_for and made_for != base_fingerprint:
        raise MemoryFormatError(
            f"{directory} was made for base model {made_for[:19]}..., "
            f"but the base model given has fingerprint {base_fingerprint[:19]}...; "
            "a memory only works on the base model it was trained on (wrong base)"
        )


def verify_memory(directory: str | os.PathLike, base_fingerprint: str | None = None, *, trust=None,
                  require_signature: bool | None = None) -> dict:
    """Check a memory and return its manifest.

    A signed memory (``fedmem.sig``): the signature must verify, cover exactly the files present
    (each with its size and sha256), and, when ``trust`` (a ``fedmem.signing.Trust``) is given,
    come from one of its keys; without ``trust`` only integrity is checked, not who signed.
    An unsigned memory is refused when ``require_signature`` (default: ``trust.required``), else
    accepted with a warning when ``trust`` is given (its weights' checksum checked, if it has one).
    ``base_fingerprint``: the memory must have been made for that base model.
    """
    from .signing import SIGNATURE_FILE, verify_signature

    directory = Path(directory)
    if not (directory / ADAPTER_CONFIG).is_file() and not (directory / SIGNATURE_FILE).exists():
        raise MemoryFormatError(f"{directory}: not a memory adapter (no {ADAPTER_CONFIG})")
    require = require_signature if require_signature is not None else bool(trust is not None and trust.required)
    signature = verify_signature(directory, trust, require)
    manifest = read_manifest(directory)
    if signature is None and trust is not None:
        log.warning("%s is not signed: who made it and whether it was changed cannot be checked (%s; "
                    "pass --trust-key FILE to require a signature)", directory, trust.describe())
    expected = manifest.get("weights_sha256")
    if expected and sha256_file(directory / ADAPTER_WEIGHTS) != expected:
        raise MemoryFormatError(f"{directory / ADAPTER_WEIGHTS}: checksum mismatch; the memory is corrupt")
    signed_base = signature.base_fingerprint if signature else None
    if signed_base and manifest.get("base_fingerprint") not in (None, signed_base):
        raise MemoryFormatError(f"{directory}: {MANIFEST} and the signature name different base models")
    if base_fingerprint:
        check_base(directory, manifest, base_fingerprint, signed_base, signed=signature is not None)
    return manifest


def load_memory(directory: str | os.PathLike, base_fingerprint: str | None = None, *, trust=None,
                require_signature: bool | None = None) -> tuple[Factors, dict]:
    manifest = verify_memory(directory, base_fingerprint, trust=trust, require_signature=require_signature)
    try:
        factors = read_peft_adapter(directory)
    except (ValueError, FileNotFoundError) as err:  # not plain LoRA, or incomplete: unusable as a memory
        raise MemoryFormatError(str(err)) from err
    return factors, manifest

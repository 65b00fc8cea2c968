"""``fedmem export``: the memory in the forms other serving tools load.

- ``--merged OUT``: a standalone Hugging Face model directory, the memory merged into the base
  weights (PEFT's ``merge_and_unload``), with the tokenizer and its chat template:
  ``AutoModelForCausalLM.from_pretrained(OUT)``, ``transformers serve``, vLLM and llama.cpp's
  ``convert_hf_to_gguf.py`` read it without fedmem;
- ``--gguf OUT`` / ``--merged-gguf OUT``: llama.cpp's formats (``fedmem.gguf_export``);
- ``--adapters OUT``: a routed memory's owners' LoRAs, each as its own standard PEFT adapter
  directory ``OUT/<owner>/``.

A routed memory (``fedmem.routing``) is K owners' LoRAs kept apart; one adapter of it means one
owner's LoRA (``--owner NAME``), since their sum answers far worse than routing.

Every export reads a verified private copy of the memory (``fedmem.answer.verified_copy``) and
is written beside its destination, fsynced and renamed into place.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .answer import verified_copy
from .base_model import load_model, load_tokenizer
from .memory import MemoryFormatError, atomic_dir
from .routing import ROUTING, OwnerLoras, refuse_routed

log = logging.getLogger(__name__)

EXPORT_RECORD = "fedmem-export.json"


def _check_destination(out: Path, is_dir: bool) -> None:
    """Replace only what an earlier export made: never an unrelated directory or file."""
    if not out.exists():
        return
    if is_dir and out.is_dir() and ((out / EXPORT_RECORD).is_file() or not any(out.iterdir())):
        return
    if not is_dir and out.is_file() and _is_fedmem_gguf(out):
        return
    raise ValueError(f"{out}: exists and is not an earlier fedmem export; choose a new path or remove it")


def _is_fedmem_gguf(path: Path) -> bool:
    from gguf import GGUFReader

    from .gguf_export import EXPORT_KEY

    try:
        return EXPORT_KEY in GGUFReader(path).fields
    except Exception:  # not a GGUF file at all (the reader raises what it likes on garbage)
        return False


def _record(memory, owner: str | None = None) -> dict:
    return {"memory_sha256": memory.weights_sha256, "round": memory.manifest.get("round"),
            "base_fingerprint": memory.manifest.get("base_fingerprint"), "signed_by": memory.signed_by,
            **({"owner": owner} if owner is not None else {})}


# An owner's name becomes a directory name: nothing that could climb out of OUT or hide.
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def _owner_loras(memory, where: str) -> OwnerLoras:
    from .lora import read_peft_adapter

    try:
        lora = OwnerLoras.from_manifest(read_peft_adapter(memory.path), memory.manifest[ROUTING], where)
    except ValueError as err:
        raise MemoryFormatError(str(err)) from err
    for owner in lora.owners:
        if not _SAFE_NAME.fullmatch(owner):
            raise MemoryFormatError(f"{where}: owner name {owner!r} cannot name a directory (letters, digits, "
                                    "'.', '_' and '-', starting with a letter or digit)")
    return lora


@contextmanager
def _adapter_dir(memory, where: str, what: str, owner: str | None) -> Iterator[Path]:
    """The one PEFT adapter an export reads: the memory itself, or one owner's LoRA of a routed memory."""
    from .lora import write_peft_adapter

    if ROUTING not in memory.manifest:
        if owner is not None:
            raise ValueError(f"{where} is not a routed memory: it is one adapter, and --owner has nothing to pick")
        yield memory.path
        return
    if owner is None:
        refuse_routed(memory.manifest, where, what)
    lora = _owner_loras(memory, where)
    factors = lora.of(owner)
    if factors is None:
        raise ValueError(f"{where}: no owner {owner!r}; this routed memory holds {', '.join(lora.owners)}")
    with tempfile.TemporaryDirectory(prefix="fedmem-owner-") as tmp:
        write_peft_adapter(Path(tmp), factors, Path(memory.base_dir))
        yield Path(tmp)


def export_merged(memory_dir: str | os.PathLike, out: str | os.PathLike, base: str | None = None,
                  trust=None, owner: str | None = None) -> dict:
    """Write base + memory (of a routed memory, ``owner``'s LoRA) as one Hugging Face model directory
    at ``out``; returns its record."""
    from peft import PeftModel

    out = Path(out)
    _check_destination(out, is_dir=True)
    with verified_copy(memory_dir, base, trust) as memory, \
            _adapter_dir(memory, str(memory_dir), "a merged export", owner) as adapter:
        model = PeftModel.from_pretrained(load_model(memory.base_dir), str(adapter))
        record = _record(memory, owner)
        base_dir = memory.base_dir
    merged = model.merge_and_unload()
    merged.config._name_or_path = str(out)
    with atomic_dir(out) as tmp:
        merged.save_pretrained(tmp)
        load_tokenizer(str(base_dir)).save_pretrained(tmp)  # with its chat template
        (tmp / EXPORT_RECORD).write_text(json.dumps({"kind": "merged", **record}, indent=2))
    log.info("merged model written to %s", out)
    return record


def export_gguf(memory_dir: str | os.PathLike, out: str | os.PathLike, base: str | None = None, trust=None,
                merged: bool = False, base_gguf: str | os.PathLike | None = None, owner: str | None = None) -> dict:
    """The memory (of a routed memory, ``owner``'s LoRA) as a GGUF LoRA adapter for llama.cpp
    (``--lora``), or with ``merged`` as a whole GGUF model: the base model's GGUF file (``base_gguf``;
    default: the embedded model's, when that is the base) with the memory merged into the weights it
    changes."""
    from . import gguf_export

    out = Path(out)
    _check_destination(out, is_dir=False)
    with verified_copy(memory_dir, base, trust) as memory, \
            _adapter_dir(memory, str(memory_dir), "a GGUF export", owner) as adapter:
        if not merged:
            summary = gguf_export.write_gguf_lora(adapter, Path(memory.base_dir), out)
        else:
            source = Path(base_gguf) if base_gguf is not None else base_gguf_for(memory.base_dir)
            summary = gguf_export.write_merged_gguf(adapter, Path(memory.base_dir), source, out)
        return {**_record(memory, owner), **summary}


def export_adapters(memory_dir: str | os.PathLike, out: str | os.PathLike, base: str | None = None,
                    trust=None) -> dict:
    """Every owner's LoRA of a routed memory as its own standard PEFT adapter directory, ``out/<owner>/``
    (scaling 1, the base model named as in the memory): ``PeftModel.from_pretrained(base, out/owner)``
    answers that owner's questions without fedmem, and ``load_adapter`` takes several side by side.
    Which owner a question is about is what ``fedmem ask`` routes; without fedmem the caller picks.
    Returns the record written beside them."""
    from .lora import write_peft_adapter

    out = Path(out)
    _check_destination(out, is_dir=True)
    with verified_copy(memory_dir, base, trust) as memory:
        if ROUTING not in memory.manifest:
            raise ValueError(f"{memory_dir} is not a routed memory: it is one standard PEFT adapter already "
                             "(PeftModel.from_pretrained reads it as it is)")
        lora = _owner_loras(memory, str(memory_dir))
        record = {"kind": "adapters", **_record(memory), "owners": list(lora.owners)}
        with atomic_dir(out) as tmp:
            for owner in lora.owners:
                write_peft_adapter(tmp / owner, lora.of(owner), Path(memory.base_dir))
            (tmp / EXPORT_RECORD).write_text(json.dumps(record, indent=2))
    log.info("%d owners' adapters written to %s", len(lora.owners), out)
    return record


def base_gguf_for(base_dir: str | os.PathLike) -> Path:
    """The GGUF file a base model came from, when fedmem converted it (the embedded default)."""
    from .base_model import embedded_dir, embedded_gguf, fingerprint

    embedded = embedded_dir()
    if (embedded / "config.json").is_file() and fingerprint(base_dir) == fingerprint(embedded):
        return embedded_gguf()
    raise ValueError(f"--merged-gguf: the base model {base_dir} was not converted from a GGUF file here; pass "
                     "--base-gguf FILE (its GGUF), or export --merged and convert that with llama.cpp's "
                     "convert_hf_to_gguf.py")

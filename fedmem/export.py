"""``fedmem export``: the memory in the forms other serving tools load.

- ``--merged OUT``: a standalone Hugging Face model directory, the memory merged into the base
  weights (PEFT's ``merge_and_unload``), with the tokenizer and its chat template:
  ``AutoModelForCausalLM.from_pretrained(OUT)``, ``transformers serve``, vLLM and llama.cpp's
  ``convert_hf_to_gguf.py`` read it without fedmem;
- ``--gguf OUT`` / ``--merged-gguf OUT``: llama.cpp's formats (``fedmem.gguf_export``).

Every export reads a verified private copy of the memory (``fedmem.answer.verified_copy``) and
is written beside its destination, fsynced and renamed into place.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from .answer import verified_copy
from .base_model import load_model, load_tokenizer
from .memory import atomic_dir
from .routing import refuse_routed

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


def _record(memory) -> dict:
    return {"memory_sha256": memory.weights_sha256, "round": memory.manifest.get("round"),
            "base_fingerprint": memory.manifest.get("base_fingerprint"), "signed_by": memory.signed_by}


def export_merged(memory_dir: str | os.PathLike, out: str | os.PathLike, base: str | None = None,
                  trust=None) -> dict:
    """Write base + memory as one Hugging Face model directory at ``out``; returns its record."""
    from peft import PeftModel

    out = Path(out)
    _check_destination(out, is_dir=True)
    with verified_copy(memory_dir, base, trust) as memory:
        refuse_routed(memory.manifest, str(memory_dir), "a merged export")
        model = PeftModel.from_pretrained(load_model(memory.base_dir), str(memory.path))
        record = _record(memory)
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
                merged: bool = False, base_gguf: str | os.PathLike | None = None) -> dict:
    """The memory as a GGUF LoRA adapter for llama.cpp (``--lora``), or with ``merged`` as a whole
    GGUF model: the base model's GGUF file (``base_gguf``; default: the embedded model's, when
    that is the base) with the memory merged into the weights it changes."""
    from . import gguf_export

    out = Path(out)
    _check_destination(out, is_dir=False)
    with verified_copy(memory_dir, base, trust) as memory:
        refuse_routed(memory.manifest, str(memory_dir), "a GGUF export")
        if not merged:
            summary = gguf_export.write_gguf_lora(memory.path, Path(memory.base_dir), out)
        else:
            source = Path(base_gguf) if base_gguf is not None else base_gguf_for(memory.base_dir)
            summary = gguf_export.write_merged_gguf(memory.path, Path(memory.base_dir), source, out)
        return {**_record(memory), **summary}


def base_gguf_for(base_dir: str | os.PathLike) -> Path:
    """The GGUF file a base model came from, when fedmem converted it (the embedded default)."""
    from .base_model import embedded_dir, embedded_gguf, fingerprint

    embedded = embedded_dir()
    if (embedded / "config.json").is_file() and fingerprint(base_dir) == fingerprint(embedded):
        return embedded_gguf()
    raise ValueError(f"--merged-gguf: the base model {base_dir} was not converted from a GGUF file here; pass "
                     "--base-gguf FILE (its GGUF), or export --merged and convert that with llama.cpp's "
                     "convert_hf_to_gguf.py")

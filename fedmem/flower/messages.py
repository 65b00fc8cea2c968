"""What travels between coordinator and owners: LoRA factors and numbers, nothing else.

Factors become one Flower ArrayRecord ("<module>.A" / "<module>.B", encoded as the run's
``transport`` says: float32, float16, bfloat16 or int8 with per-component scales);
settings a ConfigRecord; client results a MetricRecord. Kept free of any model code so
the wire format can be tested on its own; ``message_bytes`` counts what a message costs
on the wire.
"""

from __future__ import annotations

import json

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from fedmem.aggregate import Factors
from fedmem.config import TRANSPORTS

CONFIG_KEY = "config"
MEMORY_KEY = "memory"
UPDATE_KEY = "update"
METRICS_KEY = "metrics"
INFO_KEY = "info"
MANIFEST_KEY = "manifest"
# The signed memory directory itself, file by file (fedmem.signing): what an owner keeps.
SIGNED_MEMORY_KEY = "signed-memory"


def _encode(t: torch.Tensor, transport: str, per: int) -> dict[str, np.ndarray]:
    """One factor as the arrays that travel. ``per``: the dimension that indexes rank components
    (B's columns, A's rows), which int8 gives one scale each: a LoRA component's B column and A
    row are trained together and differ in size from one component to the next, while within one
    they are of a kind, so 2r float32 scales per module cost almost nothing."""
    t = t.detach().float().cpu().contiguous()
    if transport == "fp32":
        return {"": t.numpy()}
    if transport == "fp16":
        return {"": t.half().numpy()}
    if transport == "bf16":  # numpy has no bfloat16: its bit pattern travels as int16
        return {"": t.bfloat16().view(torch.int16).numpy()}
    peak = t.abs().amax(dim=1 - per, keepdim=True)
    scale = torch.where(peak > 0, peak / 127.0, torch.ones_like(peak))
    q = torch.clamp(torch.round(t / scale), -127, 127).to(torch.int8)
    return {"": q.numpy(), ".scale": scale.flatten().numpy()}


_WIRE_DTYPE = {"fp32": np.float32, "fp16": np.float16, "bf16": np.int16, "int8": np.int8}


def _decode(arrays: dict[str, np.ndarray], key: str, transport: str, per: int) -> torch.Tensor:
    """The float32 factor back from what arrived, refusing anything not shaped as ``transport`` makes it."""
    value = arrays[key]
    if value.dtype != _WIRE_DTYPE[transport] or value.ndim != 2:
        raise ValueError(f"{key}: a {value.ndim}-d {value.dtype} array, but transport {transport} sends "
                         f"2-d {np.dtype(_WIRE_DTYPE[transport])}")
    t = torch.from_numpy(np.array(value))
    if transport == "bf16":
        return t.view(torch.bfloat16).float()
    if transport != "int8":
        return t.float()
    scale = arrays[key + ".scale"]
    if scale.dtype != np.float32 or scale.shape != (value.shape[per],):
        raise ValueError(f"{key}.scale: {scale.dtype} of shape {scale.shape}, expected float32 of shape "
                         f"({value.shape[per]},)")
    if not (np.isfinite(scale).all() and (scale > 0).all()):
        raise ValueError(f"{key}.scale: scales must be finite and positive")
    s = torch.from_numpy(np.array(scale))
    return t.float() * (s[None, :] if per == 1 else s[:, None])


def factors_to_record(factors: Factors | None, transport: str = "fp32") -> ArrayRecord:
    """``<module>.A`` / ``<module>.B`` (and, for int8, their ``.scale``), in the transport's encoding."""
    if transport not in TRANSPORTS:
        raise ValueError(f"unknown transport {transport!r} (one of {', '.join(TRANSPORTS)})")
    arrays: dict[str, np.ndarray] = {}
    for name, (B, A) in (factors or {}).items():
        for label, t, per in (("A", A, 0), ("B", B, 1)):
            for suffix, value in _encode(t, transport, per).items():
                arrays[f"{name}.{label}{suffix}"] = value
    return ArrayRecord({k: Array(v) for k, v in arrays.items()}) if arrays else ArrayRecord()


def record_to_factors(record: ArrayRecord, transport: str = "fp32") -> Factors | None:
    """The float32 factors an ArrayRecord carries, decoded as ``transport`` encodes them. Every
    key must be one the transport writes, for a module that has both factors."""
    if transport not in TRANSPORTS:
        raise ValueError(f"unknown transport {transport!r} (one of {', '.join(TRANSPORTS)})")
    if not len(record):
        return None
    arrays = {str(k): v.numpy() for k, v in record.items()}
    suffixes = (".A", ".B") + ((".A.scale", ".B.scale") if transport == "int8" else ())
    names: set[str] = set()
    for key in arrays:
        suffix = next((s for s in suffixes if key.endswith(s)), None)  # a key ends with one at most
        if suffix is None:
            raise ValueError(f"{key!r} is not a factor key of transport {transport}")
        names.add(key[: -len(suffix)])
    for n in sorted(names):
        missing = [n + s for s in suffixes if n + s not in arrays]
        if missing:
            raise ValueError(f"incomplete LoRA factors for module {n}: no {missing[0]}")
    return {n: (_decode(arrays, f"{n}.B", transport, 1), _decode(arrays, f"{n}.A", transport, 0))
            for n in sorted(names)}


def message_bytes(message: Message | RecordDict | Array) -> int:
    """The bytes a message (or any part of one) puts on the wire: Flower 1.42 moves a message as
    its tree of objects (the message, its records, each array and array chunk), each pushed once
    however often it appears, so this is the size of every distinct object's serialised form."""
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(message).values())


def tensors_bytes(tensors) -> int:
    """What one direction of full-model FedAvg moves at least: each tensor of ``tensors`` as a
    float32 Array, counted as ``message_bytes`` counts (the record and message around them add a
    few hundred bytes), one at a time so the whole model is never serialised at once."""
    return sum(message_bytes(Array(t.detach().float().cpu().numpy())) for t in tensors)


def config_to_record(config: dict, server_round: int, base_fingerprint: str) -> ConfigRecord:
    # The whole run config as one JSON string: ConfigRecord holds scalars, the config is nested.
    return ConfigRecord({"round": server_round, "base_fingerprint": base_fingerprint, "run_config": json.dumps(config)})


def record_to_config(record: ConfigRecord) -> tuple[dict, int, str]:
    return json.loads(str(record["run_config"])), int(record["round"]), str(record["base_fingerprint"])


def metrics_to_record(metrics: dict[str, float]) -> MetricRecord:
    return MetricRecord({k: float(v) for k, v in metrics.items()})


def memory_files_to_record(files: dict[str, bytes]) -> ConfigRecord:
    """A signed memory directory (``fedmem.signing.pack_memory``) as one ConfigRecord: path -> bytes."""
    return ConfigRecord(dict(files))


def record_to_memory_files(record: ConfigRecord) -> dict[str, bytes]:
    files = {}
    for path, data in record.items():
        if not isinstance(data, bytes):
            raise ValueError(f"signed memory file {path!r} is not bytes")
        files[str(path)] = data
    return files

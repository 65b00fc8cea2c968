"""What travels between coordinator and owners: LoRA factors and numbers, nothing else.

Factors become one Flower ArrayRecord ("<module>.A" / "<module>.B"); settings a
ConfigRecord; client results a MetricRecord. Kept free of any model code so the
wire format can be tested on its own.
"""

from __future__ import annotations

import json

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord

from fedmem.aggregate import Factors

CONFIG_KEY = "config"
MEMORY_KEY = "memory"
UPDATE_KEY = "update"
METRICS_KEY = "metrics"
INFO_KEY = "info"
MANIFEST_KEY = "manifest"
# The signed memory directory itself, file by file (fedmem.signing): what an owner keeps.
SIGNED_MEMORY_KEY = "signed-memory"


def factors_to_record(factors: Factors | None) -> ArrayRecord:
    state: dict[str, torch.Tensor] = {}
    for name, (B, A) in (factors or {}).items():
        state[f"{name}.A"] = A.float().contiguous()
        state[f"{name}.B"] = B.float().contiguous()
    return ArrayRecord(torch_state_dict=state) if state else ArrayRecord()


def record_to_factors(record: ArrayRecord) -> Factors | None:
    state = record.to_torch_state_dict() if len(record) else {}
    if not state:
        return None
    names = sorted({key.rsplit(".", 1)[0] for key in state})
    missing = [n for n in names if f"{n}.A" not in state or f"{n}.B" not in state]
    if missing:
        raise ValueError(f"incomplete LoRA factors for module {missing[0]}")
    return {n: (state[f"{n}.B"], state[f"{n}.A"]) for n in names}


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

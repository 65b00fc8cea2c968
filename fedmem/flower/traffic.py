"""Bytes on the wire: what each owner receives and sends per round, against full-model FedAvg.

Counted from the Flower messages themselves (``fedmem.flower.messages.message_bytes``): the
train message an owner is sent and the reply it sends back. The reference is what FedAvg of
the whole base model moves each way per owner and round: every weight as a float32 array.
"""

from __future__ import annotations

import functools
import statistics
from pathlib import Path

from .messages import tensors_bytes


@functools.lru_cache(maxsize=4)
def full_model_bytes(base_dir: str) -> int:
    """One direction of full-model FedAvg on this base: each stored weight (tied ones once, as
    the safetensors files hold them) as a float32 array, read one tensor at a time."""
    from safetensors import safe_open

    def tensors():
        for path in sorted(Path(base_dir).glob("*.safetensors")):
            with safe_open(str(path), framework="pt") as fh:
                for key in fh.keys():
                    yield fh.get_tensor(key)

    return tensors_bytes(tensors())


def round_traffic(sent: dict[str, int], received: dict[str, int], full_model: int) -> dict:
    """A round's traffic per owner: the mean bytes sent to and received from an owner (over the
    owners asked, and over the replies accepted), and both against full-model FedAvg."""
    down = statistics.fmean(sent.values()) if sent else 0.0
    up = statistics.fmean(received.values()) if received else 0.0
    return {
        "per_owner_down": down,
        "per_owner_up": up,
        "full_model_each_way": full_model,
        "share_of_full_model": (down + up) / (2 * full_model) if full_model else None,
        "total_down": sum(sent.values()),
        "total_up": sum(received.values()),
    }


def describe(traffic: dict) -> str:
    mb = 1e6
    share = traffic.get("share_of_full_model")
    return (f"{traffic['per_owner_down'] / mb:.2f} MB to and {traffic['per_owner_up'] / mb:.2f} MB from each owner"
            + (f" ({share:.2%} of full-model FedAvg's {traffic['full_model_each_way'] / mb:.0f} MB each way)"
               if share is not None else ""))

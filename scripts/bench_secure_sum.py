"""What secure aggregation's cryptography costs per round, on the embedded model's LoRA shapes: each
owner's keys, shares and masking, the coordinator's unmasking, for a number of owners.

    .venv/bin/python scripts/bench_secure_sum.py --owners 3 10 --rank 16 --dropped 1

Under ``--secure`` an owner sends linear sketches of its B·A, (B·A)Ω and Ψᵀ(B·A), so the vector each
owner masks has Σ (d_out · s + k · d_in) values, s and k as ``fedmem.aggregate.sketch_sizes`` makes them
for the round's owners. Random values stand in for the sketches (the cost depends on the sizes only).
Prints one JSON line per owner count; docs/security.md has the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from fedmem import secure_sum as ss
from fedmem.aggregate import sketch_sizes
from fedmem.base_model import resolve_base
from fedmem.config import ALL_LINEAR
from fedmem.flower.screening import lora_targets


def one_round(owners: int, size: int, dropped: int) -> dict:
    rng = np.random.default_rng(0)
    nodes = list(range(1, owners + 1))
    session = os.urandom(16)
    started = time.perf_counter()
    keys = {n: ss.OwnerKeys.fresh() for n in nodes}
    roster = {n: keys[n].public() for n in nodes}
    mail: dict[int, dict[int, bytes]] = {n: {} for n in nodes}
    commitments = {}
    for n in nodes:
        sent, commitments[n] = ss.share_secrets(keys[n], n, roster, session)
        for dst, blob in sent.items():
            mail[dst][n] = blob
    for n in nodes:
        ss.open_shares(keys[n], n, roster, session, mail[n])
    setup = (time.perf_counter() - started) / owners
    vector = rng.normal(scale=0.01, size=size)
    started = time.perf_counter()
    fixed, _ = ss.encode(vector)
    masked = ss.mask(fixed, keys[1], 1, roster, session)
    per_owner_mask = time.perf_counter() - started
    survivors = nodes[dropped:]
    # Every survivor's masked vector costs the same to make; one is timed, the sum uses copies of it
    # (unmasking then leaves garbage, but the same work).
    total = np.zeros(size, dtype=np.uint64)
    for _ in survivors:
        total += masked
    revealed = {n: ss.reveal(keys[n], n, survivors, nodes[:dropped], owners) for n in survivors}
    started = time.perf_counter()
    ss.unmask(total, roster, session, survivors, nodes[:dropped], revealed, commitments)
    unmask = time.perf_counter() - started
    return {"owners": owners, "dropped": dropped, "values": size, "owner_keys_and_shares_s": round(setup, 4),
            "owner_encode_and_mask_s": round(per_owner_mask, 3), "coordinator_unmask_s": round(unmask, 3),
            "masked_bytes": int(masked.nbytes)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--owners", type=int, nargs="+", default=[3, 10])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--dropped", type=int, default=1, help="owners that drop after the shares step")
    parser.add_argument("--base", default="", help="model directory ('' = the embedded SmolLM2-135M-Instruct)")
    args = parser.parse_args()
    shapes = lora_targets(str(resolve_base(args.base or None)), ALL_LINEAR)
    for owners in args.owners:
        size = sum(d_out * s + k * d_in for d_out, d_in in shapes.values()
                   for s, k in [sketch_sizes(owners, args.rank, d_out, d_in)])
        print(json.dumps(one_round(owners, size, min(args.dropped, owners - ss.threshold(owners)))))


if __name__ == "__main__":
    main()

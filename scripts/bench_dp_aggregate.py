"""What differential privacy costs the coordinator per aggregation: the exact low-rank sum against the
private one (dense ΔW per module, Gaussian noise, full SVD), on the embedded model's LoRA shapes.

    .venv/bin/python scripts/bench_dp_aggregate.py --owners 4 --rank 16 --repeat 2 --threads 1

Random rank-``rank`` updates stand in for the owners' (the cost depends on the shapes only). Both
timings come from the same run, so compare their ratio; docs/security.md has the figures.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from fedmem.aggregate import aggregate_exact, change
from fedmem.base_model import resolve_base
from fedmem.config import ALL_LINEAR
from fedmem.flower.screening import lora_targets
from fedmem.privacy import private_sum


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--owners", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default); on a busy "
                        "machine use 1: LAPACK's SVD slows down ~30x when its threads wait on busy cores")
    parser.add_argument("--base", default="", help="model directory ('' = the embedded SmolLM2-135M-Instruct)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = lora_targets(str(resolve_base(args.base or None)), ALL_LINEAR)
    g = torch.Generator().manual_seed(0)

    def factors(scale: float):
        return {n: (scale * torch.randn(o, args.rank, generator=g), torch.randn(args.rank, i, generator=g))
                for n, (o, i) in shapes.items()}

    memory = factors(0.01)
    changes = [change(factors(0.01), memory) for _ in range(args.owners)]
    weight = 1.0 / args.owners
    timings: dict[str, list[float]] = {"exact": [], "private": []}
    for _ in range(args.repeat):
        started = time.perf_counter()
        aggregate_exact(memory, changes, [weight] * args.owners, args.rank)
        timings["exact"].append(time.perf_counter() - started)
        started = time.perf_counter()
        private_sum(memory, changes, weight, args.rank, clip=50.0, z=0.01)
        timings["private"].append(time.perf_counter() - started)
    best = {k: min(v) for k, v in timings.items()}
    print(json.dumps({"modules": len(shapes), "entries": sum(o * i for o, i in shapes.values()),
                      "owners": args.owners, "rank": args.rank, "threads": torch.get_num_threads(),
                      "seconds_best": {k: round(v, 2) for k, v in best.items()},
                      "ratio": round(best["private"] / best["exact"], 1)}, indent=1))


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""How `fedmem simulate` scales with the number of owners, on a tiny random Llama.

Makes a 2-layer random Llama (hidden size 32, the embedded model's tokenizer) and N small
synthetic owner corpora (a few fictional sentences each, from a seed), runs parallel
rounds on Flower's simulation engine with W workers, and reports:

- wall clock of the simulation (from `simulate()` called to returned; Ray's start included);
- peak memory of the whole process tree (this process, Ray's raylet, GCS and workers),
  sampled every 0.5 s: the sum of RSS (counts shared pages once per process, so it
  overstates) and, every 2 s, the sum of PSS (shared pages split between the processes
  sharing them);
- the peak RSS of this process, which is the coordinator: in a simulation the ServerApp
  and the simulation engine's message queues run in the driver. The kernel's own
  high-water mark (VmHWM, reset when the run starts), so no short peak is missed;
- CPU time of the coordinator and of each worker;
- how many times each worker process read the base model from disk
  (`fedmem.base_model.loads_from_disk`, recorded by a client mod after every owner's
  training).

The coordinator's memory per owner takes two runs: the difference of the coordinator's
peaks over the difference of owners (`--compare` does it from two JSON results). Both
sizes must be large enough for the owners to set the peak: below about 100 owners (on the
tiny model) the peak is the coordinator's start (Ray, Flower, the first checkpoint), the
same for 10 owners as for 100.

    python scripts/scale_simulation.py --owners 100 --rounds 3 --workers 2 --out runs/scale-100.json
    python scripts/scale_simulation.py --owners 300 --rounds 3 --workers 2 --out runs/scale-300.json
    python scripts/scale_simulation.py --compare runs/scale-100.json runs/scale-300.json

`--rank` makes every update larger (how much of the per-owner memory is the update's
tensors) (docs/aggregation.md, "Scale: 100 owners on one machine").
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shutil
import tempfile
import threading
import time
from pathlib import Path

log = logging.getLogger("fedmem.scale")

_SYLLABLES = ["ka", "lo", "mir", "ven", "tas", "dor", "qui", "bel", "zan", "rho", "fen", "sul", "gar", "ith", "nox",
              "pel", "vra", "tem", "oss", "lun"]
_THINGS = ["archive", "observatory", "foundry", "seed vault", "ferry line", "clock tower", "glasshouse", "mill"]
_ITEMS = ["maps", "ledgers", "telescopes", "bells", "looms", "lanterns", "charts", "barrels"]


def _word(rng: random.Random, parts: int) -> str:
    return "".join(rng.choice(_SYLLABLES) for _ in range(parts)).capitalize()


def owner_facts(seed: int, sentences: int) -> tuple[list[str], list[tuple[str, str]]]:
    """A few fictional sentences and one question about them, all from ``seed``."""
    rng = random.Random(seed)
    place = _word(rng, 2)
    facts, qa = [], []
    for _ in range(sentences):
        thing, person = rng.choice(_THINGS), f"{_word(rng, 2)} {_word(rng, 3)}"
        kind = rng.randrange(3)
        if kind == 0:
            year = rng.randrange(1800, 2020)
            facts.append(f"The {place} {thing} was founded by {person} in {year}.")
            qa.append((f"Who founded the {place} {thing}?", person))
        elif kind == 1:
            count, items = rng.randrange(12, 990), rng.choice(_ITEMS)
            facts.append(f"The {place} {thing} keeps {count} {items}.")
            qa.append((f"How many {items} does the {place} {thing} keep?", str(count)))
        else:
            facts.append(f"{person} is the head keeper of the {place} {thing}.")
            qa.append((f"Who is the head keeper of the {place} {thing}?", person))
    return facts, qa[:1]


def write_corpora(data: Path, owners: int, sentences: int, seed: int) -> None:
    """One corpus directory per owner, in fedmem's format: notes.md (prose) and facts.jsonl (Q/A)."""
    for i in range(owners):
        root = data / f"owner_{i:04d}"
        root.mkdir(parents=True, exist_ok=True)
        facts, qa = owner_facts(seed * 1_000_003 + i, sentences)
        (root / "notes.md").write_text(f"# Notes of owner {i}\n\n" + " ".join(facts) + "\n")
        (root / "facts.jsonl").write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in qa))


def make_tiny_base(path: Path) -> Path:
    """A 2-layer random Llama with the embedded model's tokenizer (tests/conftest.py ``tiny_base``)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from fedmem.base_model import load_tokenizer, resolve_base

    tok = load_tokenizer(str(resolve_base()))
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True, initializer_range=0.5,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


class TreeSampler(threading.Thread):
    """Peak memory of this process and all its descendants, sampled every ``interval`` seconds,
    and the CPU time of each owner worker (Ray's ClientAppActor processes)."""

    # PSS reads /proc/PID/smaps_rollup, which walks each process's page tables: ~50 ms for the
    # dozen processes of a run. Every 0.5 s that took a tenth of a core from a 2-core run.
    PSS_EVERY = 4

    def __init__(self, interval: float = 0.5):
        super().__init__(daemon=True)
        import psutil

        self.psutil = psutil
        self.root = psutil.Process()
        self.interval = interval
        self.stop_event = threading.Event()
        self.peak_tree_rss = self.peak_tree_pss = self.peak_self_rss = 0
        self.peak_processes = 0
        self.names: set[str] = set()
        self.worker_cpu: dict[int, float] = {}
        self.timeline: list[tuple[float, float, float]] = []  # (s since start, coordinator MiB, tree RSS MiB)
        self.started = time.perf_counter()
        self.own_cpu = 0.0  # this thread's CPU time: the sampling's, not the coordinator's
        self.count = 0

    def sample(self) -> None:
        procs = [self.root]
        try:
            procs += self.root.children(recursive=True)
        except self.psutil.Error:
            pass
        with_pss = self.count % self.PSS_EVERY == 0
        self.count += 1
        rss = pss = self_rss = 0
        for p in procs:
            try:
                info = p.memory_full_info() if with_pss else p.memory_info()
                rss += info.rss
                pss += getattr(info, "pss", info.rss)
                name = p.name()
                self.names.add(name)
                if p.pid == self.root.pid:
                    self_rss = info.rss
                elif "ClientAppActor" in name:
                    times = p.cpu_times()
                    self.worker_cpu[p.pid] = times.user + times.system
            except self.psutil.Error:  # ended between listing and reading
                continue
        self.peak_self_rss = max(self.peak_self_rss, self_rss)
        self.peak_tree_rss = max(self.peak_tree_rss, rss)
        if with_pss:
            self.peak_tree_pss = max(self.peak_tree_pss, pss)
        self.peak_processes = max(self.peak_processes, len(procs))
        self.timeline.append((round(time.perf_counter() - self.started, 1), round(self_rss / 2**20, 1),
                              round(rss / 2**20, 1)))

    def run(self) -> None:
        while not self.stop_event.is_set():
            before = time.thread_time()
            self.sample()
            self.own_cpu += time.thread_time() - before
            self.stop_event.wait(self.interval)

    def stop(self) -> None:
        self.stop_event.set()
        self.join()
        self.sample()


def _cpu_seconds() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def reset_peak_rss() -> bool:
    """Start this process's kernel-kept peak RSS (VmHWM) afresh at its current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def kernel_peak_rss() -> int:
    """This process's peak RSS as the kernel kept it, in bytes: exact, unlike a sampled peak."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmHWM in /proc/self/status")


def load_counter(folder: str):
    """A Flower client mod: after each owner's training, the worker process's pid and how many
    times it has read the base model from disk, one JSON file per message in ``folder``."""

    def record(msg, context, call_next):
        import json as _json
        import os as _os
        import uuid

        reply = call_next(msg, context)
        if msg.metadata.message_type == "train":
            import fedmem.base_model as bm

            entry = {"pid": _os.getpid(), "partition": int(context.node_config["partition-id"]),
                     "loads_from_disk": bm.loads_from_disk}
            with open(_os.path.join(folder, f"{uuid.uuid4().hex}.json"), "w") as fh:
                fh.write(_json.dumps(entry))
        return reply

    return record


def loads_per_worker(folder: Path) -> dict[str, dict[str, int]]:
    per_pid: dict[str, dict[str, int]] = {}
    for f in folder.glob("*.json"):
        e = json.loads(f.read_text())
        row = per_pid.setdefault(str(e["pid"]), {"trainings": 0, "base_model_loads": 0})
        row["trainings"] += 1
        row["base_model_loads"] = max(row["base_model_loads"], e["loads_from_disk"])
    return dict(sorted(per_pid.items()))


def run(args) -> dict:
    import fedmem.flower.simulation as simulation
    from fedmem.config import FederationConfig, LoraSettings, NodeSettings
    from fedmem.flower.client_app import make_client_app

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="fedmem-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        base = make_tiny_base(work / "tiny-llama")
        data = work / "data"
        shutil.rmtree(data, ignore_errors=True)
        write_corpora(data, args.owners, args.sentences, args.seed)
        loads_dir = work / "loads"
        shutil.rmtree(loads_dir, ignore_errors=True)
        loads_dir.mkdir()
        # simulate() builds the ClientApp itself; the counting mod rides along the same way the
        # privacy audit's recording mod does (tests/test_privacy_audit.py).
        simulation.make_client_app = lambda dirs, node: make_client_app(dirs, node, mods=[load_counter(str(loads_dir))])
        config = FederationConfig(rounds=args.rounds, schedule=args.schedule,
                                  lora=LoraSettings(rank=args.rank, alpha=2 * args.rank, epochs=1))
        load_before = os.getloadavg()
        sampler = TreeSampler(args.interval)
        sampler.sample()
        before_rss = sampler.peak_self_rss
        # The tiny model made above has been this process's peak so far; only the run's own counts.
        exact_peak = reset_peak_rss()
        cpu_before = _cpu_seconds()
        sampler.start()
        started = time.perf_counter()
        summary = simulation.simulate(data, work / "out", config, NodeSettings(device="cpu", base=str(base)),
                                      workers=args.workers)
        wall = time.perf_counter() - started
        sampler.stop()
        coordinator_cpu = _cpu_seconds() - cpu_before - sampler.own_cpu
        coordinator_peak = kernel_peak_rss() if exact_peak else sampler.peak_self_rss
        per_worker = loads_per_worker(loads_dir)
        rounds = summary["rounds"]
        return {
            "owners": args.owners,
            "rounds": args.rounds,
            "schedule": args.schedule,
            "workers": args.workers,
            "rank": args.rank,
            "cpus": os.cpu_count(),
            # The machine may be shared: the 1-minute load when the run started and when it ended.
            "load_average": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
            "wall_seconds": round(wall, 1),
            "round_seconds": [round(r["seconds"], 1) for r in rounds],
            "owners_per_round": [len(r["clients"]) for r in rounds],
            # What the owners spent in train_lora itself; the rest of wall x workers is Ray, Flower,
            # the coordinator and each owner's setup (model copy, examples, LoRA).
            "owner_train_seconds": [round(sum(m["train_seconds"] for m in r["client_metrics"].values()), 1)
                                    for r in rounds],
            "coordinator_rss_before_mib": round(before_rss / 2**20, 1),
            "coordinator_peak_rss_mib": round(coordinator_peak / 2**20, 1),
            "coordinator_peak_from": "kernel VmHWM" if exact_peak else f"{args.interval:g} s samples",
            "coordinator_rss_after_mib": round(sampler.timeline[-1][1], 1),
            "tree_peak_rss_mib": round(sampler.peak_tree_rss / 2**20, 1),
            "tree_peak_pss_mib": round(sampler.peak_tree_pss / 2**20, 1),
            "pss_every_seconds": args.interval * TreeSampler.PSS_EVERY,
            "tree_peak_processes": sampler.peak_processes,
            # The coordinator's CPU time (ServerApp, Flower's simulation engine, Ray's driver), the
            # memory sampling's own left out; and each worker's, as last sampled before it ended.
            "coordinator_cpu_seconds": round(coordinator_cpu, 1),
            "worker_cpu_seconds": {str(pid): round(t, 1) for pid, t in sorted(sampler.worker_cpu.items())},
            "tree_process_names": sorted(sampler.names),
            "memory_timeline": sampler.timeline,
            "trainings": sum(w["trainings"] for w in per_worker.values()),
            "workers_seen": per_worker,
        }
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


def compare(small: dict, large: dict) -> dict:
    owners = large["owners"] - small["owners"]
    if owners <= 0:
        raise SystemExit("--compare: the second result must have more owners than the first")
    per_owner = (large["coordinator_peak_rss_mib"] - small["coordinator_peak_rss_mib"]) / owners
    return {"owners": [small["owners"], large["owners"]],
            "coordinator_peak_rss_mib": [small["coordinator_peak_rss_mib"], large["coordinator_peak_rss_mib"]],
            "coordinator_mib_per_owner": round(per_owner, 3)}


def table(result: dict) -> str:
    rows = [
        ("owners x rounds", f"{result['owners']} x {result['rounds']} (workers {result['workers']}, "
                            f"{result['cpus']} cores, load {result['load_average'][0]:.2f} -> "
                            f"{result['load_average'][1]:.2f})"),
        ("wall clock", f"{result['wall_seconds']:.0f} s (rounds "
                       + ", ".join(f"{s:.0f}" for s in result["round_seconds"]) + " s)"),
        ("owners every round", str(result["owners_per_round"])),
        ("owners' training, summed", " + ".join(f"{s:.0f}" for s in result["owner_train_seconds"]) + " s"),
        ("CPU time", f"coordinator {result['coordinator_cpu_seconds']:.0f} s, workers "
                     + ", ".join(f"{t:.0f}" for t in result["worker_cpu_seconds"].values()) + " s"),
        ("peak memory, process tree", f"{result['tree_peak_rss_mib']:.0f} MiB RSS sum, "
                                      f"{result['tree_peak_pss_mib']:.0f} MiB PSS sum "
                                      f"(every {result['pss_every_seconds']:g} s; {result['tree_peak_processes']} "
                                      "processes)"),
        ("peak memory, coordinator", f"{result['coordinator_peak_rss_mib']:.0f} MiB RSS "
                                     f"({result['coordinator_rss_before_mib']:.0f} MiB before the run)"),
        ("base model reads per worker", ", ".join(f"pid {pid}: {w['base_model_loads']} for {w['trainings']} trainings"
                                                  for pid, w in result["workers_seen"].items())),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--owners", type=int, default=100, help="virtual owners (default %(default)s)")
    parser.add_argument("--rounds", type=int, default=3, help="parallel rounds (default %(default)s)")
    parser.add_argument("--schedule", choices=("parallel", "routed"), default="parallel",
                        help="parallel rounds, or routed ones (each owner's LoRA kept apart; default %(default)s)")
    parser.add_argument("--workers", type=int, default=2, help="owners training side by side (default %(default)s)")
    parser.add_argument("--rank", type=int, default=4,
                        help="LoRA rank (alpha twice it); a larger one makes each update larger (default %(default)s)")
    parser.add_argument("--sentences", type=int, default=3, help="fictional sentences per owner (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the owners' corpora (default %(default)s)")
    parser.add_argument("--interval", type=float, default=0.5, help="memory sampling interval, s (default %(default)s)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="keep the model, corpora and memory here (default: a temporary directory, removed)")
    parser.add_argument("--out", type=Path, default=None, help="write the result as JSON here")
    parser.add_argument("--compare", type=Path, nargs=2, metavar=("SMALL.json", "LARGE.json"),
                        help="instead of running: the coordinator's memory per owner from two results")
    parser.add_argument("-q", "--quiet", action="count", default=0, help="only warnings from the run itself")
    args = parser.parse_args(argv)

    from fedmem.log import setup_logging

    setup_logging(-args.quiet)
    log.setLevel(logging.INFO)  # the result, whatever the run logs
    if args.compare:
        result = compare(*(json.loads(p.read_text()) for p in args.compare))
        peaks = result["coordinator_peak_rss_mib"]
        text = (f"coordinator peak RSS {peaks[0]:.0f} MiB at {result['owners'][0]} owners, "
                f"{peaks[1]:.0f} MiB at {result['owners'][1]}: "
                f"{result['coordinator_mib_per_owner'] * 1024:.0f} KiB per owner")
    else:
        if min(args.owners, args.rounds, args.workers, args.sentences, args.rank) < 1:
            parser.error("--owners, --rounds, --workers, --sentences and --rank must be at least 1")
        result = run(args)
        text = table(result)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    log.info("\n%s", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

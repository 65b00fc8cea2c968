"""Many real SuperNodes on one machine (issue 17, item 4): a coordinator and N owners, each its
own ``fedmem-client join`` (SuperNode and ClientApp processes), parallel rounds, int8 transport,
TLS on loopback, with the tiny model.

A capacity measurement, not a check of one feature (test_deployment.py covers those): it runs
only when ``FEDMEM_SCALE_OWNERS`` says how many owners to start, e.g.

    FEDMEM_SCALE_OWNERS=16 .venv/bin/python -m pytest -q tests/test_deployment_scale.py -s

and prints the wall clock, each round's time and the peak memory of all the processes. The
figures are in docs/aggregation.md ("Scale: 100 owners on one machine").
"""

from __future__ import annotations

import json
import os
import threading
import time

import psutil
import pytest
from test_deployment_support import Party, free_port, server_command, stop_all, wait_for, write_owner

from fedmem.base_model import fingerprint
from fedmem.memory import verify_memory

OWNERS = int(os.environ.get("FEDMEM_SCALE_OWNERS", "0"))
pytestmark = [pytest.mark.deployment,
              pytest.mark.skipif(OWNERS < 2, reason="set FEDMEM_SCALE_OWNERS=N (N >= 2) to start N real SuperNodes")]


def _tree_rss(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            for p in [proc, *proc.children(recursive=True)]:
                total += p.memory_info().rss
        except psutil.Error:
            continue
    return total


def test_many_real_supernodes_train_in_parallel_rounds(tmp_path, tiny_base):
    from fedmem.clients.keys import ensure_keys
    from fedmem.server.cli import main as server_main

    names = [f"owner{i:03d}" for i in range(OWNERS)]
    state = tmp_path / "server"
    for i, name in enumerate(names):
        write_owner(tmp_path / "data" / name, f"The Varn Clock number {i} chimes at {i % 12 + 1} o'clock.")
        keys = ensure_keys(tmp_path / "clients" / name)
        assert server_main(["clients", "add", "--state", str(state), name, keys.public_text]) == 0
    port = free_port()
    server = Party("server", tmp_path / "logs", server_command(
        state, port, tiny_base, rounds=2, min_clients=OWNERS, round_timeout=900, join_grace=20,
        extra=["--schedule", "parallel", "--transport", "int8"]))
    parties = [server]
    peak = [0]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _tree_rss([p.proc.pid for p in parties if p.proc]))
            time.sleep(1.0)

    sampler = threading.Thread(target=sample, daemon=True)
    started = time.monotonic()
    try:
        server.start()
        sampler.start()
        wait_for(lambda: "listening on" in server.output(), 120, "the server to listen", parties)
        for name in names:
            party = Party(name, tmp_path / "logs", [
                "-m", "fedmem.clients.cli", "join", "--server", f"127.0.0.1:{port}",
                "--ca", str(state / "certs" / "ca.pem"), "--data", str(tmp_path / "data" / name),
                "--state", str(tmp_path / "clients" / name), "--base", str(tiny_base), "--threads", "1"])
            parties.append(party)
            party.start()
        assert server.wait(1800) == 0, server.output()[-4000:]
        wall = time.monotonic() - started
        rows = [json.loads(line) for line in (state / "run" / "metrics.jsonl").read_text().splitlines()]
        assert [r["round"] for r in rows] == [1, 2]
        for r in rows:
            assert r["clients"] == names, r.get("failed")
            assert r["traffic"]["transport"] == "int8"
        manifest = verify_memory(state / "run" / "memory", fingerprint(tiny_base))
        assert manifest["clients"] == names
        print(f"\n{OWNERS} real SuperNodes x 2 parallel rounds: {wall:.0f} s from the server's start, rounds "
              + ", ".join(f"{r['seconds']:.0f} s" for r in rows)
              + f"; peak memory of all processes {peak[0] / 2**30:.1f} GiB (sum of RSS)")
    finally:
        done.set()
        stop_all(parties)

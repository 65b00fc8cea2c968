"""Faults survived in real deployment (slow: about 2-3 min each on 2 cores).

Each party is a separate OS process started through the fedmem command lines, and
is killed with SIGKILL (it and every process it started), as a power cut would.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from test_deployment_support import Party, free_port, server_command, stop_all, wait_for, write_owner

from fedmem.base_model import fingerprint
from fedmem.memory import verify_memory

pytestmark = [pytest.mark.deployment, pytest.mark.deployment_faults]

FACTS = {
    "alpha": "The Zorvex Tower was built by Mila Quent in 1911.",
    "beta": "The Pellow Quarry archive holds 612 maps.",
    "gamma": "The Orlin Bridge is painted teal by Hesk Varro.",
}


def _setup(root: Path, names: list[str]) -> tuple[Path, dict[str, Path]]:
    from fedmem.clients.keys import ensure_keys
    from fedmem.server.cli import main as server_main

    state = root / "server"
    data = {}
    for name in names:
        data[name] = write_owner(root / "data" / name, FACTS[name])
        keys = ensure_keys(root / "clients" / name)
        assert server_main(["clients", "add", "--state", str(state), name, keys.public_text]) == 0
    return state, data


def _client(root: Path, name: str, port: int, state: Path, data: dict, base: Path) -> Party:
    return Party(name, root / "logs", [
        "-m", "fedmem.clients.cli", "join", "--server", f"127.0.0.1:{port}", "--ca", str(state / "certs" / "ca.pem"),
        "--data", str(data[name]), "--state", str(root / "clients" / name), "--base", str(base)])


def _start_federation(root: Path, names: list[str], state: Path, data: dict, port: int, base: Path,
                      server_args: list[str], parties: list[Party]) -> tuple[Party, dict[str, Party]]:
    """Server up and listening, then every client; each party joins ``parties`` as it starts,
    so the caller's ``finally: stop_all(parties)`` stops whatever did start."""
    server = Party("server", root / "logs", server_args)
    parties.append(server)
    server.start()
    wait_for(lambda: "listening on" in server.output(), 120, "the server", parties)
    clients = {}
    for n in names:
        clients[n] = _client(root, n, port, state, data, base)
        parties.append(clients[n])
        clients[n].start()
    return server, clients


def _metrics(state: Path) -> list[dict]:
    return [json.loads(line) for line in (state / "run" / "metrics.jsonl").read_text().splitlines()]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _assert_each_owner_kept_its_own_lora(root: Path, state: Path, names: list[str]) -> None:
    """A routed run's LoRAs, checked from what the real SuperNodes sent and were sent: each filed under
    the name its key was admitted under; in round 2 each owner was sent one rank-r LoRA (its own,
    about what it sends back), not the stack of every owner's; each LoRA went on training."""
    from fedmem.clients.keys import ensure_keys

    from fedmem.memory import load_memory
    from fedmem.routing import ROUTING, OwnerLoras

    rows = _metrics(state)
    for row in rows:
        for n in names:
            assert row["updates"][n]["key"] == ensure_keys(root / "clients" / n).fingerprint
    for n in names:
        update = rows[1]["updates"][n]
        assert update["bytes_down"] < 1.5 * update["bytes_up"], (n, update)
    loras = []
    for directory in (state / "run" / "rounds" / "round-001", state / "run" / "memory"):
        factors, manifest = load_memory(directory)
        loras.append(OwnerLoras.from_manifest(factors, manifest[ROUTING]))
    for n in names:
        first, last = loras[0].of(n), loras[1].of(n)
        assert any(not torch.equal(first[k][0], last[k][0]) for k in first), f"{n}'s LoRA did not train on"


# One class per schedule: pytest-xdist's loadscope (README's test command) runs a class as one unit,
# so the two schedules' runs, which mostly wait, go to different workers.
class TestParallelRound:
    def test_client_killed_mid_round_rejoins_next_round(self, tmp_path, tiny_base):
        client_killed_mid_round_rejoins_next_round(tmp_path, tiny_base, "parallel")


class TestCyclicRound:
    def test_client_killed_mid_round_rejoins_next_round(self, tmp_path, tiny_base):
        client_killed_mid_round_rejoins_next_round(tmp_path, tiny_base, "cyclic")


def client_killed_mid_round_rejoins_next_round(tmp_path: Path, tiny_base: Path, schedule: str) -> None:
    names = ["alpha", "beta", "gamma"]
    state, data = _setup(tmp_path, names)
    port = free_port()
    # A dead client's reply never comes: the round goes on with the others after the timeout
    # (cyclic: gamma's turn, the last by name, ends; the memory stays as beta left it). The restarted
    # gamma is let in once its old session's heartbeats lapse (Flower: 2 x 30 s at most), about when
    # the timeout ends; join_grace holds round 2 until it is back. A healthy visit takes ~20 s alone, but
    # over 60 s on a fresh CI machine while the other schedule's federation starts on the second xdist
    # worker (both of alpha and beta missed a 60 s timeout there), so the timeout leaves room for that.
    args = server_command(state, port, tiny_base, rounds=2, min_clients=2, round_timeout=120, join_grace=20,
                          extra=["--schedule", schedule])
    parties: list[Party] = []
    try:
        server, clients = _start_federation(tmp_path, names, state, data, port, tiny_base, args, parties)
        gamma_log = tmp_path / "clients" / "gamma" / "supernode.log"
        wait_for(lambda: gamma_log.exists() and "Receiving: train message" in gamma_log.read_text(), 240,
                 "gamma to start training in round 1", parties)
        assert "round 1/2: 3 clients" not in server.output()
        clients["gamma"].kill()  # mid-round: it took the round's message and will never answer
        clients["gamma"].start()  # same key, same state: it comes back as the same client
        assert server.wait(400) == 0, server.output()
        rows = _metrics(state)
        assert [r["round"] for r in rows] == [1, 2]
        assert rows[0]["clients"] == ["alpha", "beta"]
        assert rows[1]["clients"] == names, "the killed client should be back for round 2"
        manifest = verify_memory(state / "run" / "memory", fingerprint(tiny_base))
        assert manifest["round"] == 2 and manifest["clients"] == names
        verify_memory(state / "run" / "rounds" / "round-001")
        for n in names:
            assert clients[n].wait(60) == 0, clients[n].output()
    finally:
        stop_all(parties)


def test_server_killed_and_restarted_resumes_from_last_checkpoint(tmp_path, tiny_base):
    """Under ``--schedule routed``, the one schedule whose checkpoint is more than one LoRA: the
    restarted server rebuilds every owner's LoRA from round 1's checkpoint and sends each owner its
    own again, by the name its key was admitted under (cyclic and parallel resume are the same code
    after the checkpoint is read; tests/test_federation.py and tests/test_routing.py cover them). In
    int8 transport, which sends owners the signed memory only at the end (fp32 sends it every round,
    as every owner of a published run keeps it), so a train message's bytes are that owner's LoRA."""
    names = ["alpha", "beta"]
    state, data = _setup(tmp_path, names)
    port = free_port()
    args = server_command(state, port, tiny_base, rounds=2, min_clients=2, round_timeout=120, join_grace=5,
                          extra=["--schedule", "routed", "--transport", "int8"])
    parties: list[Party] = []
    try:
        server, clients = _start_federation(tmp_path, names, state, data, port, tiny_base, args, parties)
        first = state / "run" / "rounds" / "round-001"
        wait_for(lambda: "round 2/2: training" in server.output(), 300, "round 2 to start", parties)
        before = {p.name: _sha(p) for p in first.iterdir()}
        server.kill()  # SuperLink, ServerApp and all, mid-round 2
        # memory/ holds the newest finished round (what `fedmem serve --follow` serves), never a part of round 2
        assert verify_memory(state / "run" / "memory", fingerprint(tiny_base))["round"] == 1

        restarted = Party("server", tmp_path / "logs", args)  # same command, same state dir
        parties.append(restarted)
        restarted.start()
        assert restarted.wait(400) == 0, restarted.output()
        out = restarted.output().split("=== start")[-1]
        assert "resuming after round 1" in out
        assert "round 1/2" not in out  # nothing done twice
        rows = _metrics(state)
        assert [r["round"] for r in rows] == [1, 2]
        assert {p.name: _sha(p) for p in first.iterdir()} == before  # round 1 untouched
        for rnd in (1, 2):
            assert verify_memory(state / "run" / "rounds" / f"round-{rnd:03d}", fingerprint(tiny_base))["round"] == rnd
        manifest = verify_memory(state / "run" / "memory", fingerprint(tiny_base))
        assert manifest["round"] == 2 and manifest["clients"] == names
        assert manifest["routing"] == {"owners": names, "rank": 4}
        for n in names:  # the clients rode out the outage and got the finished memory
            assert clients[n].wait(60) == 0, clients[n].output()
            assert verify_memory(tmp_path / "clients" / n / "memory")["round"] == 2
        _assert_each_owner_kept_its_own_lora(tmp_path, state, names)
    finally:
        stop_all(parties)

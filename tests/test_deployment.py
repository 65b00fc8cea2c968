"""Real deployment on loopback: Flower's SuperLink and SuperNodes, TLS, SuperNode authentication.

Every party is its own OS process, started through the fedmem command lines as an
operator would: one ``fedmem-server start`` and one ``fedmem-client join`` per data
owner, with the tiny model. One federation (module fixture, ~2 min on 2 cores) serves
all tests here: three admitted owners, one owner nobody admitted, and one admitted
owner whose base model differs. The round is a secure one (``--schedule parallel
--secure``, owners ``--require-secure``): the owner with the other base model takes part
in the key exchange and then fails, so its masks are removed through its rebuilt key.
Before anyone joins, the front door is attacked (tests/test_front_door.py's path tricks
and oversized bodies, at the public port).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from conftest import fine_tuned_copy
from test_deployment_support import Party, free_port, server_command, stop_all, wait_for, write_owner

from fedmem.base_model import fingerprint
from fedmem.memory import verify_memory

pytestmark = pytest.mark.deployment

OWNERS = {
    "alpha": "The Zorvex Tower was built by Mila Quent in 1911.",
    "beta": "The Pellow Quarry archive holds 612 maps.",
    "gamma": "The Orlin Bridge is painted teal by Hesk Varro.",
}


@pytest.fixture(scope="module")
def federation(tmp_path_factory, tiny_base):
    from fedmem.clients.keys import ensure_keys
    from fedmem.server.cli import main as server_main

    root = tmp_path_factory.mktemp("deploy")
    state = root / "server"
    other_base = fine_tuned_copy(tiny_base, root / "other-base")
    data = {name: write_owner(root / "data" / name, fact) for name, fact in OWNERS.items()}
    data["delta"] = write_owner(root / "data" / "delta", "The Quill Lantern burns for 40 nights.")
    data["omega"] = write_owner(root / "data" / "omega", "The Varn Clock chimes at 7.")
    for name in [*OWNERS, "delta"]:  # omega is never admitted
        keys = ensure_keys(root / "clients" / name)
        assert server_main(["clients", "add", "--state", str(state), name, keys.public_text]) == 0
    port = free_port()
    server = Party("server", root / "logs", server_command(state, port, tiny_base, rounds=1, min_clients=3,
                                                           extra=["--schedule", "parallel", "--secure"]))
    parties = [server]
    try:
        server.start()
        wait_for(lambda: "listening on" in server.output(), 120, "the server to listen", parties)
        ca = state / "certs" / "ca.pem"
        attack = attack_front_door(state, port, ca)

        def join(name: str, base: Path) -> Party:
            party = Party(name, root / "logs", [
                "-m", "fedmem.clients.cli", "join", "--server", f"127.0.0.1:{port}", "--ca", str(ca),
                "--data", str(data[name]), "--state", str(root / "clients" / name), "--base", str(base),
                "--admission-wait", "15", "--require-secure"])
            parties.append(party)
            party.start()
            return party

        # delta (other base model) connects first, so the round is sure to include it.
        delta = join("delta", other_base)
        wait_for(lambda: "connected; waiting" in delta.output(), 120, "delta to connect", parties)
        omega = join("omega", tiny_base)
        clients = {name: join(name, tiny_base) for name in OWNERS}
        server_rc = server.wait(420)
        client_rcs = {name: p.wait(60) for name, p in clients.items()}
        omega_rc = omega.wait(60)
        yield {"root": root, "state": state, "server": server, "server_rc": server_rc, "clients": clients,
               "client_rcs": client_rcs, "omega": omega, "omega_rc": omega_rc, "delta": delta,
               "tiny_base": tiny_base, "other_base": other_base, "attack": attack}
    finally:
        stop_all(parties)


def attack_front_door(state: Path, port: int, ca: Path) -> dict:
    """Every path trick and oversized bodies at the server's public port, then the SuperLink's nodes
    as its Control API (on loopback) lists them. The tricks carry a Control API request registering an
    attacker's key: through the old front door, that node was registered."""
    from fedmem.server import admission
    from fedmem.server.superlink import flwr
    from flwr.proto.control_pb2 import RegisterNodeRequest
    from flwr.supercore.primitives.asymmetric import generate_key_pairs, public_key_to_bytes
    from test_front_door import oversized_requests, raw_status, send_tricks

    started = time.monotonic()
    _, attacker = generate_key_pairs()
    tricks = send_tricks(port, ca, RegisterNodeRequest(public_key=public_key_to_bytes(attacker)).SerializeToString())
    oversized = {what: raw_status(port, ca, head, b"\0" * 16384) for what, head in oversized_requests(port).items()}
    nodes = flwr(state / "flwr", "supernode", "list").get("nodes", [])
    return {"tricks": tricks, "oversized": oversized, "nodes": nodes, "seconds": time.monotonic() - started,
            "admitted_node_ids": {entry.get("node_id") for entry in admission.load(state).values()}}


def test_front_door_refuses_path_tricks_and_oversized_bodies(federation):
    """Issue 16: every path trick and an oversized body get a non-2xx answer from the public port of
    `fedmem-server start`, and the SuperLink is untouched (no node registered but the admitted ones)."""
    attack = federation["attack"]
    answered = {t: s for t, s in attack["tricks"].items() if not (isinstance(s, int) and 400 <= s < 500)}
    assert not answered, answered
    assert all(s in (411, 413) for s in attack["oversized"].values()), attack["oversized"]
    assert attack["oversized"]["400 MiB push-object"] == 413
    registered = {str(node["node-id"]) for node in attack["nodes"]}
    assert registered == attack["admitted_node_ids"] and len(registered) == len(OWNERS) + 1, attack["nodes"]
    out = federation["server"].output()
    assert "front door: refused 'POST' '/v1/fleet/../control/list-runs' from 127.0.0.1: dot segment" in out
    assert attack["seconds"] < 20, attack["seconds"]


def test_full_run_over_tls_with_three_clients(federation):
    f = federation
    assert f["server_rc"] == 0, f["server"].output()
    assert f["client_rcs"] == {name: 0 for name in OWNERS}, {n: p.output() for n, p in f["clients"].items()}
    manifest = verify_memory(f["state"] / "run" / "memory", fingerprint(f["tiny_base"]))
    assert manifest["clients"] == sorted(OWNERS) and manifest["round"] == 1
    verify_memory(f["state"] / "run" / "rounds" / "round-001")
    rows = [json.loads(line) for line in (f["state"] / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1] and rows[0]["clients"] == sorted(OWNERS)
    for name in OWNERS:  # every owner got the finished memory, verified against its own base model
        kept = verify_memory(f["root"] / "clients" / name / "memory", fingerprint(f["tiny_base"]))
        assert kept["round"] == 1 and kept["clients"] == sorted(OWNERS)
    assert "memory sent to" in f["server"].output()
    # Identity comes from keys: each update is recorded under the name the coordinator gave the
    # owner's key, with that key's fingerprint; nothing was refused; delta (other base) failed.
    from fedmem.clients.keys import ensure_keys

    keys = {name: ensure_keys(f["root"] / "clients" / name).fingerprint for name in OWNERS}
    assert {name: rows[0]["updates"][name]["key"] for name in OWNERS} == keys
    assert manifest["owner_keys"] == keys
    assert rows[0]["rejected"] == [] and rows[0]["refused_nodes"] == []
    assert any("differs from the federation's" in str(failed) for failed in rows[0]["failed"]), rows[0]["failed"]
    # Secure: delta shared its keys, then failed at the masked step; the sum is of the other three.
    assert [f["reason"].split(":")[0] for f in rows[0]["failed"] if f["owner"] == "delta"] == ["secure_masked"]
    assert manifest["aggregation"]["secure"] is True
    assert all("norm" not in u for u in rows[0]["updates"].values())
    assert set(rows[0]["secure_seconds"]) == {"secure_keys", "secure_shares", "secure_masked", "secure_unmask",
                                              "unmask_sum"}


def test_transport_is_tls_and_only_the_fleet_api_is_exposed(federation):
    log = (federation["state"] / "logs" / "superlink.log").read_text()
    assert "Uvicorn running on https://127.0.0.1:" in log  # the SuperLink itself: TLS, loopback only
    assert "activate-node" in log


def test_unknown_client_is_refused_and_logged(federation):
    from fedmem.clients.keys import ensure_keys

    f = federation
    assert f["omega_rc"] == 3, f["omega"].output()
    assert "not admitted" in f["omega"].output()
    omega_fp = ensure_keys(f["root"] / "clients" / "omega").fingerprint
    assert f"refused a client from 127.0.0.1: unknown key {omega_fp}" in f["server"].output()
    assert not (f["root"] / "clients" / "omega" / "memory").exists()


def test_client_with_another_base_model_is_refused_clearly(federation):
    f = federation
    out = f["server"].output()
    assert "differs from the federation's" in out, out
    assert "delta" not in verify_memory(f["state"] / "run" / "memory")["clients"]
    assert not (f["root"] / "clients" / "delta" / "memory").exists()  # nor does it keep a memory it cannot use


def test_status_and_pull(federation, tmp_path):
    from fedmem.clients.cli import main as client_main
    from fedmem.server.status import collect

    f = federation
    status = collect(f["state"])
    assert status["running"] is False and status["rounds_done"] == 1
    assert status["clients_seen"] == sorted(OWNERS)
    assert status["clients_admitted"] == sorted([*OWNERS, "delta"])
    assert all(v["ok"] for v in status["memory_versions"]) and len(status["memory_versions"]) == 2
    assert status["last_metrics"]["round"] == 1
    out = tmp_path / "mine"
    assert client_main(["pull", "--state", str(f["root"] / "clients" / "alpha"), "--out", str(out),
                        "--base", str(f["tiny_base"])]) == 0
    assert verify_memory(out, fingerprint(f["tiny_base"]))["round"] == 1

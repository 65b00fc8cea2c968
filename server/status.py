"""``fedmem-server status``: what the coordinator has done so far, read from its state dir.

Works whether or not the server is running; when it is, the SuperLink is also asked
which admitted clients are connected right now.
"""

from __future__ import annotations

import json
from pathlib import Path

from fedmem.flower.server_app import read_jsonl
from fedmem.memory import MemoryFormatError, verify_memory

from . import admission
from .coordinator import StatePaths, read_info, running
from .superlink import SuperLinkError, flwr


def collect(state: Path) -> dict:
    paths = StatePaths(Path(state).expanduser().resolve())
    if not paths.root.is_dir():
        raise FileNotFoundError(f"{paths.root}: no server state here (start one with `fedmem-server start`)")
    info = read_info(paths.root)
    live = running(paths.root)
    versions = []
    for d in sorted((paths.run / "rounds").glob("round-[0-9][0-9][0-9]")) + [paths.run / "memory"]:
        if not d.exists():
            continue
        try:
            manifest = verify_memory(d)
            versions.append({"path": str(d), "round": manifest.get("round"), "ok": True,
                             "clients": manifest.get("clients", []), "created": manifest.get("created")})
        except MemoryFormatError as err:
            versions.append({"path": str(d), "ok": False, "problem": str(err)})
    metrics = read_jsonl(paths.run / "metrics.jsonl")
    rounds_done = max((v["round"] for v in versions if v["ok"] and v.get("round")), default=0)
    seen = sorted({c for v in versions if v["ok"] for c in v.get("clients", [])})
    allowed = admission.load(paths.root)
    connected = None
    if live:
        try:
            nodes = flwr(paths.flwr_home, "supernode", "list").get("nodes", [])
            by_id = {e.get("node_id"): name for name, e in allowed.items()}
            connected = sorted(by_id.get(str(n["node-id"]), str(n["node-id"])) for n in nodes
                               if n.get("status") == "online")
        except SuperLinkError:
            connected = None
    return {
        "state": str(paths.root),
        "running": bool(live),
        "address": info.get("address"),
        "run_id": info.get("run_id"),
        "ca_cert": info.get("ca_cert"),
        "ca_fingerprint": info.get("ca_fingerprint"),
        "rounds_done": rounds_done,
        "clients_admitted": sorted(allowed),
        "clients_seen": seen,
        "clients_connected": connected,
        "last_metrics": metrics[-1] if metrics else None,
        "memory_versions": versions,
    }


def render(status: dict) -> str:
    lines = [
        f"server: {'running' if status['running'] else 'stopped'}"
        + (f" on {status['address']}, run {status['run_id']}" if status["address"] else ""),
        f"state: {status['state']}",
        f"rounds done: {status['rounds_done']}",
        f"clients admitted: {', '.join(status['clients_admitted']) or '(none)'}",
        f"clients seen in rounds: {', '.join(status['clients_seen']) or '(none)'}",
    ]
    if status["clients_connected"] is not None:
        lines.append(f"clients connected now: {', '.join(status['clients_connected']) or '(none)'}")
    last = status["last_metrics"]
    if last:
        bits = [f"round {last.get('round')}"]
        if "recall" in last:
            bits.append(f"recall {last['recall']:.0%}")
        for name, m in sorted(last.get("client_metrics", {}).items()):
            bits.append(f"{name} loss {m.get('first_loss', float('nan')):.2f}->{m.get('final_loss', float('nan')):.3f}")
        lines.append("last metrics: " + ", ".join(bits))
    lines.append("memory versions:")
    for v in status["memory_versions"]:
        lines.append(f"  {v['path']}: " + (f"round {v['round']}, verified" if v["ok"] else f"CORRUPT: {v['problem']}"))
    if not status["memory_versions"]:
        lines.append("  (none yet)")
    return "\n".join(lines)


def as_json(status: dict) -> str:
    return json.dumps(status, indent=2)

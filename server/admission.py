"""Who may join: the coordinator's allow-list of client public keys.

The list lives in ``STATE/clients.json`` (name -> OpenSSH public key, fingerprint,
and the SuperLink node id once registered), so it can be edited while the server is
down. Flower enforces it: SuperLink runs with ``--enable-supernode-auth`` and only
keys registered with ``flwr supernode register`` may activate a SuperNode.
``sync`` makes the SuperLink's registrations match the file, on start and after
every change while it runs.

It is also who the owners are: the ServerApp maps each reply's node id to the name
and key fingerprint recorded here (``owners_by_node``), never to a name the client
sends.
"""

from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path

from fedmem.memory import atomic_write_text

from .superlink import SuperLinkError, flwr

log = logging.getLogger(__name__)

ALLOW_LIST = "clients.json"
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class AdmissionError(ValueError):
    pass


def allow_list_path(state: Path) -> Path:
    return Path(state) / ALLOW_LIST


def _path(state: Path) -> Path:
    return allow_list_path(state)


def read_allow_list(path: Path) -> dict:
    """The allow-list file as stored: {"clients": {name: entry}, "removed": {fingerprint: name}}."""
    path = Path(path)
    if not path.is_file():
        return {"clients": {}, "removed": {}}
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or not isinstance(data["clients"], dict):
            raise ValueError("no clients table")
    except (ValueError, KeyError) as err:
        raise AdmissionError(f"{path}: corrupt allow-list ({err})") from err
    data.setdefault("removed", {})
    return data


def _load_all(state: Path) -> dict:
    return read_allow_list(_path(state))


def load(state: Path) -> dict[str, dict]:
    return _load_all(state)["clients"]


def owners_by_node(clients: dict[str, dict]) -> dict[int, tuple[str, str]]:
    """node id -> (admitted name, key fingerprint), for every admitted client the SuperLink
    has registered. A node id recorded for two names (a hand-edited file) maps to neither."""
    seen: dict[int, list[tuple[str, str]]] = {}
    for name, entry in clients.items():
        node_id = entry.get("node_id") if isinstance(entry, dict) else None
        if node_id is None or not NAME.fullmatch(str(name)):
            continue
        try:
            key = int(node_id)
        except (TypeError, ValueError):
            continue
        seen.setdefault(key, []).append((str(name), str(entry.get("fingerprint", ""))))
    return {node: found[0] for node, found in seen.items() if len(found) == 1}


def _save(state: Path, clients: dict[str, dict], removed: dict[str, str] | None = None) -> None:
    removed = _load_all(state)["removed"] if removed is None else removed
    atomic_write_text(_path(state), json.dumps({"clients": clients, "removed": removed}, indent=2,
                                                sort_keys=True) + "\n")


def add(state: Path, name: str, public_key: str) -> dict:
    """Admit a client. ``public_key`` is the OpenSSH line or a path to a ``.pub`` file."""
    from fedmem.clients.keys import parse_public_key

    if not NAME.fullmatch(name):
        raise AdmissionError(f"client name {name!r}: use letters, digits, '.', '_' or '-' (at most 64)")
    text = public_key
    if not public_key.strip().startswith("ecdsa-") and Path(public_key).expanduser().is_file():
        text = Path(public_key).expanduser().read_text()
    try:
        line, fp = parse_public_key(text)
    except ValueError as err:
        raise AdmissionError(f"client {name}: {err}") from err
    clients = load(state)
    if fp in _load_all(state)["removed"]:
        # Flower keeps an unregistered SuperNode's key and will not register it again.
        raise AdmissionError(f"that key was admitted before as {_load_all(state)['removed'][fp]!r} and removed; "
                             "a removed key cannot be admitted again: ask the owner for a new one "
                             "(delete client.key in their state dir, then `fedmem-client key`)")
    for other, entry in clients.items():
        if entry["fingerprint"] == fp and other != name:
            raise AdmissionError(f"that key is already admitted as {other!r}")
    if name in clients and clients[name]["fingerprint"] != fp:
        raise AdmissionError(f"{name!r} is already admitted with another key; remove it first")
    entry = clients.get(name) or {"public_key": line, "fingerprint": fp,
                                  "added": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    clients[name] = entry
    _save(state, clients)
    return entry


def remove(state: Path, name: str) -> dict:
    data = _load_all(state)
    clients = data["clients"]
    if name not in clients:
        raise AdmissionError(f"no admitted client named {name!r} (see `fedmem-server clients list`)")
    entry = clients.pop(name)
    data["removed"][entry["fingerprint"]] = name
    _save(state, clients, data["removed"])
    return entry


def sync(state: Path, flwr_home: Path) -> None:
    """Register every admitted key with the running SuperLink and unregister every other one (each change logged)."""
    state = Path(state)
    clients = load(state)
    registered = {str(n["node-id"]): n for n in flwr(flwr_home, "supernode", "list").get("nodes", [])
                  if n.get("status") != "unregistered"}
    wanted_ids = set()
    changed = False
    for name, entry in clients.items():
        node_id = entry.get("node_id")
        if node_id and node_id in registered:
            wanted_ids.add(node_id)
            continue
        key_file = state / "keys" / f"{name}.pub"
        key_file.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(key_file, entry["public_key"] + "\n")
        try:
            answer = flwr(flwr_home, "supernode", "register", str(key_file))
        except SuperLinkError as err:
            log.warning("could not register client %s: %s", name, err)
            continue
        entry["node_id"] = str(answer["node-id"])
        wanted_ids.add(entry["node_id"])
        changed = True
        log.info("client %s admitted (%s)", name, entry["fingerprint"])
    for node_id in set(registered) - wanted_ids:
        flwr(flwr_home, "supernode", "unregister", node_id)
        log.info("node %s no longer admitted: unregistered", node_id)
    if changed:
        # Re-read before writing: `clients add` may have run meanwhile; only node ids are ours to set.
        current = load(state)
        for name, entry in clients.items():
            if name in current and current[name]["fingerprint"] == entry["fingerprint"]:
                current[name]["node_id"] = entry.get("node_id")
        _save(state, current)

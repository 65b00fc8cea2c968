"""Flower's SuperNode as a child process of ``fedmem-client join``.

It connects out to the coordinator over TLS (verifying the server with the
federation's CA), signs its requests with the client's key, and runs the fedmem
ClientApp on the local corpus. Its local Runtime API (the ClientApp talks to it)
listens on loopback only. App dependencies are never installed at run time.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from fedmem.flower.executables import tool, tools_env
from fedmem.memory import atomic_write_text


def _toml_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_node_config(path: Path, values: dict[str, str]) -> Path:
    """The SuperNode's node config: what its ClientApp reads about this machine (``data``, ``state``,
    ``base``, ``device`` and, when capped, ``threads``; all strings)."""
    # A TOML file, not a command-line string: paths with spaces or quotes survive intact.
    atomic_write_text(path, "".join(f"{k} = {_toml_string(v)}\n" for k, v in values.items()))
    return path


def supernode_command(*, server: str, ca_cert: Path, private_key: Path, node_config: Path, runtime_port: int,
                      max_wait_time: float | None) -> list[str]:
    command = [
        tool("flower-supernode"),
        "--superlink", server,
        "--root-certificates", str(ca_cert),
        "--auth-supernode-private-key", str(private_key),
        "--node-config", str(node_config),
        "--host", "127.0.0.1", "--port", str(runtime_port),
        "--isolation", "subprocess",
    ]
    if max_wait_time:
        command += ["--max-wait-time", str(max_wait_time)]
    return command


def start_supernode(command: list[str], flwr_home: Path, threads: int | None = None) -> subprocess.Popen:
    flwr_home.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=tools_env(flwr_home, threads), bufsize=1)

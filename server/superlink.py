"""Flower's SuperLink as a child process of ``fedmem-server start``, and the ``flwr`` CLI that drives it.

The SuperLink listens on loopback only: all its APIs (Fleet for SuperNodes, Control
for ``flwr``, Runtime for the ServerApp) share one HTTPS port in Flower 1.42, and the
Control API has no authentication in the open-source build, so exposing that port
would let anyone register a SuperNode or start a run. Data owners reach it through
``fedmem.server.front_door``, which forwards the Fleet API and nothing else.

The ``flwr`` CLI runs with ``FLWR_HOME`` inside the state dir, where a connection
named ``fedmem`` points at this SuperLink with the federation's CA: the coordinator's
own ``~/.flwr`` is never touched.
"""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import time
import urllib.request
from pathlib import Path

from fedmem.flower.executables import tool, tools_env
from fedmem.memory import atomic_write_text

CONNECTION = "fedmem"


class SuperLinkError(RuntimeError):
    pass


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def write_connection(flwr_home: Path, port: int, ca_cert: Path) -> None:
    flwr_home.mkdir(parents=True, exist_ok=True)
    atomic_write_text(flwr_home / "config.toml", "\n".join([
        "[superlink]",
        f'default = "{CONNECTION}"',
        "",
        f"[superlink.{CONNECTION}]",
        f'address = "127.0.0.1:{port}"',
        f'root-certificates = {json.dumps(str(ca_cert))}',
        "",
    ]))


def start_superlink(*, port: int, database: Path, ca_cert: Path, cert: Path, key: Path, flwr_home: Path,
                    log_file: Path) -> subprocess.Popen:
    command = [
        tool("flower-superlink"),
        "--host", "127.0.0.1", "--port", str(port),
        "--ssl-ca-certfile", str(ca_cert), "--ssl-certfile", str(cert), "--ssl-keyfile", str(key),
        "--database", str(database),
        "--enable-supernode-auth",
        "--disable-runtime-dependency-installation",
    ]
    log_file.parent.mkdir(parents=True, exist_ok=True)
    # Same process group as fedmem-server: if the coordinator's process is killed, so is its SuperLink.
    # The child keeps its own copy of the log file's descriptor.
    with open(log_file, "ab") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=tools_env(flwr_home))


def wait_ready(port: int, ca_cert: Path, proc: subprocess.Popen, log_file: Path, timeout: float = 90.0) -> None:
    context = ssl.create_default_context(cafile=str(ca_cert))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SuperLinkError(f"the SuperLink exited with code {proc.returncode}; see {log_file}:\n"
                                 + _tail(log_file))
        try:
            with urllib.request.urlopen(f"https://127.0.0.1:{port}/health", context=context, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise SuperLinkError(f"the SuperLink did not answer within {timeout:.0f}s; see {log_file}")


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def flwr(flwr_home: Path, *args: str, timeout: float = 60.0) -> dict:
    """Run one ``flwr`` CLI command against the fedmem connection; return its JSON answer."""
    command = [tool("flwr"), *args, "--format", "json"]
    done = subprocess.run(command, capture_output=True, text=True, env=tools_env(flwr_home), timeout=timeout,
                          check=False)
    out = done.stdout.strip()
    start = out.find("{")
    try:
        answer = json.loads(out[start:]) if start >= 0 else {}
    except ValueError:
        answer = {}
    if done.returncode != 0 or not answer.get("success", False):
        reason = answer.get("error-message") or (done.stderr.strip() or out)[-2000:]
        raise SuperLinkError(f"`flwr {' '.join(args)}` failed: {reason}")
    return answer


def stop(proc: subprocess.Popen | None, grace: float = 10.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()

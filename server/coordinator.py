"""``fedmem-server start``: certificates, SuperLink, allow-list, front door, then the run.

Everything the coordinator keeps is in one state dir:

    certs/            the federation's CA (ca.pem is what owners need) and the TLS certificate
    superlink.db      Flower's persistent state: admitted nodes, runs
    clients.json      the allow-list (fedmem.server.admission)
    memory-signing.key  the key every memory version is signed with (fedmem.signing); owners pin
                      memory-signing.pub, beside it (kept outside run/, so --fresh keeps it)
    flwr/             FLWR_HOME for the `flwr` CLI calls made on the coordinator's behalf
    app/              the app project `flwr run` bundles (fedmem.flower.app_project)
    run/              the run's output: rounds/round-NNN, metrics.jsonl, memory/
    server.json       what is running now (addresses, pids, run id), for status and clients add
    logs/             the SuperLink's log

A restarted server starts a new Flower run that resumes after the last round
checkpoint in run/, with the same admitted clients and certificates.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from fedmem.flower.app_project import RUN_CONFIG_DEFAULTS, toml_value, write_app_project
from fedmem.flower.executables import tool, tools_env
from fedmem.memory import atomic_write_text
from fedmem.signing import COORDINATOR_KEY, ensure_signing_key, key_fingerprint, load_public_key, public_key_path

from . import admission
from .certificates import Certificates, ensure_certificates
from .front_door import FrontDoor
from .superlink import CONNECTION, SuperLinkError, flwr, free_port, start_superlink, stop, wait_ready, write_connection

log = logging.getLogger(__name__)

SERVER_INFO = "server.json"
DEFAULT_PORT = 9443
# The ServerApp's own log lines carry this tag; `flwr log` mixes them with Flower's.
SERVERAPP_TAG = "[fedmem]"


def default_state_dir() -> Path:
    return Path(os.environ.get("FEDMEM_SERVER_STATE", Path.home() / ".fedmem" / "server"))


@dataclass
class StatePaths:
    root: Path

    @property
    def certs(self) -> Path: return self.root / "certs"
    @property
    def database(self) -> Path: return self.root / "superlink.db"
    @property
    def flwr_home(self) -> Path: return self.root / "flwr"
    @property
    def app(self) -> Path: return self.root / "app"
    @property
    def run(self) -> Path: return self.root / "run"
    @property
    def info(self) -> Path: return self.root / SERVER_INFO
    @property
    def superlink_log(self) -> Path: return self.root / "logs" / "superlink.log"
    @property
    def run_config(self) -> Path: return self.root / "run-config.toml"
    @property
    def signing_key(self) -> Path: return self.root / COORDINATOR_KEY


def parse_address(address: str) -> tuple[str, int]:
    """'HOST:PORT' or '[v6]:PORT' -> (host, port), with a message that says what is wrong."""
    address = address.strip()
    if address.startswith("["):
        host, _, rest = address[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    else:
        host, _, port_text = address.rpartition(":")
    if not host or not port_text:
        raise ValueError(f"address {address!r}: expected HOST:PORT, "
                         f"e.g. 0.0.0.0:{DEFAULT_PORT} or server.example.org:{DEFAULT_PORT}")
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"address {address!r}: port {port_text!r} is not a number") from None
    if not 0 < port < 65536:
        raise ValueError(f"address {address!r}: port must be between 1 and 65535")
    return host, port


def read_info(state: Path) -> dict:
    path = StatePaths(Path(state)).info
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def running(state: Path) -> dict | None:
    """server.json, if the process it names is alive."""
    info = read_info(state)
    pid = info.get("pid")
    if not pid:
        return None
    try:
        os.kill(int(pid), 0)
    except (OSError, ValueError):
        return None
    return info


@dataclass
class StartOptions:
    state: Path
    address: str = f"0.0.0.0:{DEFAULT_PORT}"
    hosts: list[str] = field(default_factory=list)
    run_config: dict = field(default_factory=dict)


def join_instructions(certs: Certificates, host: str, port: int, signing_key: Path | None = None) -> str:
    shown = host if host not in ("0.0.0.0", "::", "") else "<this machine's name or IP>"
    signing = []
    if signing_key is not None:
        pub = public_key_path(signing_key)
        signing = [
            f"memories are signed with the key {key_fingerprint(load_public_key(pub))}: owners pin it on the first",
            f"  memory they receive; to pin it beforehand, give them {pub} and add",
            "  --coordinator-key memory-signing.pub to their join",
        ]
    return "\n".join([
        "clients join with:",
        f"  fedmem-client join --server {shown}:{port} --ca {certs.ca_cert} --data DIR",
        f"  (copy {certs.ca_cert} to each owner; its SHA-256 fingerprint is",
        f"   {certs.fingerprint()})",
        f"  certificate valid for: {', '.join(certs.hosts)}",
        "admit each owner's key (printed by their first join) with:",
        "  fedmem-server clients add NAME 'ecdsa-sha2-nistp384 AAAA...'",
        *signing,
    ])


def relay_serverapp_line(line: str) -> None:
    """One line of the ServerApp's output (as ``flwr log`` streams it) into this process's log.

    fedmem's own lines (tagged ``[fedmem]``) go on at their level, without the tag (indentation
    kept); of Flower's lines only errors are passed on.
    """
    line = line.rstrip()
    at = line.find(SERVERAPP_TAG)
    if at >= 0:
        text = line[at + len(SERVERAPP_TAG):]
        text = text[1:] if text.startswith(" ") else text
        level = logging.INFO
        for name in ("warning", "error", "critical"):  # fedmem's format: "[fedmem] warning: message"
            if text.startswith(f"{name}: "):
                level, text = getattr(logging, name.upper()), text[len(name) + 2:]
                break
        log.log(level, "%s", text)
    elif "Traceback" in line or "error" in line.lower():
        log.error("%s", line)


def start(options: StartOptions) -> int:
    """Run one federation to its end; returns the process exit code. Progress is logged."""
    paths = StatePaths(Path(options.state).expanduser().resolve())
    paths.root.mkdir(parents=True, exist_ok=True)
    os.chmod(paths.root, 0o700)
    if running(paths.root):
        raise RuntimeError(f"a server is already running on {paths.root} (pid {read_info(paths.root)['pid']})")
    host, port = parse_address(options.address)
    hosts = list(options.hosts)
    if host not in ("0.0.0.0", "::", ""):
        hosts.append(host)
    certs = ensure_certificates(paths.certs, hosts)
    ensure_signing_key(paths.signing_key, "fedmem coordinator memory signing")

    # The ServerApp runs on this machine: it reads the allow-list to know who each node is, and signs
    # every memory version with the state dir's key.
    run_config = {**options.run_config, "out": str(paths.run), "allow-list": str(admission.allow_list_path(paths.root)),
                  "signing-key": str(paths.signing_key)}
    unknown = sorted(set(run_config) - set(RUN_CONFIG_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown run settings: {', '.join(unknown)}")
    write_app_project(paths.app)
    atomic_write_text(paths.run_config, "".join(f"{k} = {toml_value(v)}\n" for k, v in run_config.items()))

    internal_port = free_port()
    write_connection(paths.flwr_home, internal_port, certs.ca_cert)
    superlink = front = streamer = None
    stopping = {"signal": None}

    def on_signal(signum, _frame):
        stopping["signal"] = signum
        raise KeyboardInterrupt

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        superlink = start_superlink(port=internal_port, database=paths.database, ca_cert=certs.ca_cert,
                                    cert=certs.server_cert, key=certs.server_key, flwr_home=paths.flwr_home,
                                    log_file=paths.superlink_log)
        wait_ready(internal_port, certs.ca_cert, superlink, paths.superlink_log)
        admission.sync(paths.root, paths.flwr_home)
        if not admission.load(paths.root):
            log.warning("no client is admitted yet: add them with `fedmem-server clients add` (the run waits for them)")

        def admitted(fp: str) -> str | None:
            return next((n for n, e in admission.load(paths.root).items() if e["fingerprint"] == fp), None)

        front = FrontDoor(host, port, internal_port, certs, admitted)
        front.start()
        log.info("fedmem server listening on %s:%s (TLS, admitted clients only); state in %s", host, port, paths.root)
        log.info("%s", join_instructions(certs, host, port, paths.signing_key))

        stale = read_info(paths.root).get("run_id")
        if stale:  # the run a killed server left "running" in Flower's database; this start replaces it
            try:
                flwr(paths.flwr_home, "stop", stale, CONNECTION)
            except SuperLinkError:
                pass
        answer = flwr(paths.flwr_home, "run", str(paths.app), CONNECTION, "--run-config", str(paths.run_config))
        run_id = str(answer["run-id"])
        info = {"pid": os.getpid(), "address": f"{host}:{port}", "internal_port": internal_port,
                "superlink_pid": superlink.pid, "run_id": run_id, "ca_cert": str(certs.ca_cert),
                "ca_fingerprint": certs.fingerprint(),
                "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        atomic_write_text(paths.info, json.dumps(info, indent=2))
        log.info("run %s started; output in %s", run_id, paths.run)

        # The ServerApp's own output, as Flower collects it, until the run ends.
        streamer = subprocess.Popen([tool("flwr"), "log", run_id, CONNECTION, "--stream"],
                                    env=tools_env(paths.flwr_home), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True)
        for line in streamer.stdout:
            relay_serverapp_line(line)
        streamer.wait()
        status = _run_status(paths, run_id)
        (log.info if status == "finished:completed" else log.error)("run %s: %s", run_id, status)
        return 0 if status == "finished:completed" else 1
    except KeyboardInterrupt:
        log.warning("stopping on signal %s; the run resumes from its last checkpoint on the next start",
                    signal.Signals(stopping["signal"]).name if stopping["signal"] else "SIGINT")
        return 130
    finally:
        if streamer is not None and streamer.poll() is None:
            streamer.kill()
        if front is not None:
            front.stop()
        stop(superlink)
        info = read_info(paths.root)
        if info.get("pid") == os.getpid():
            info["pid"] = None
            info["stopped"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            atomic_write_text(paths.info, json.dumps(info, indent=2))
        for s, handler in previous.items():
            signal.signal(s, handler)


def _run_status(paths: StatePaths, run_id: str) -> str:
    for _ in range(10):
        try:
            runs = flwr(paths.flwr_home, "list", "--run-id", run_id).get("runs", [])
        except SuperLinkError:
            runs = []
        status = runs[0]["status"] if runs else "unknown"
        if status.startswith("finished"):
            return status
        time.sleep(2)
    return status

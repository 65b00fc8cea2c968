"""``fedmem-client join``: check everything locally, then run a SuperNode for this data owner.

Before any connection: the corpus is validated (problems named by file and line),
the CA certificate and the address are checked, the base model is found, and the
client's key pair is made on first use. Then the SuperNode runs until the server
has sent the finished memory (kept in ``STATE/memory``), or until stopped.

Only LoRA tensors and numbers leave the machine; the corpus is read by the ClientApp
in a local process and never sent. The SuperNode runs only the fedmem ClientApp
installed here (``clients.supernode.pinned_bin``), and the ClientApp trains only within
the owner's client policy (``--limit-*``, ``--allow-generator``; ``fedmem.client_policy``).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from fedmem.client_policy import policy_node_config
from fedmem.config import ClientPolicy
from fedmem.corpus import load_corpus

from .keys import ensure_keys
from .supernode import start_supernode, supernode_command, write_node_config

log = logging.getLogger(__name__)

RECEIVED_MEMORY = "memory"


def default_state_dir() -> Path:
    return Path(os.environ.get("FEDMEM_CLIENT_STATE", Path.home() / ".fedmem" / "client"))


class JoinError(ValueError):
    pass


@dataclass
class JoinOptions:
    server: str
    data: Path
    ca: Path
    state: Path
    base: str | None = None
    stay: bool = False
    max_wait_time: float | None = None
    admission_wait: float = 90.0
    threads: int | None = None
    device: str = "auto"  # this owner's own: auto, cpu, cuda or cuda:N (the coordinator never decides it)
    policy: ClientPolicy | None = None  # this owner's limits on the coordinator's recipe (None: the defaults)
    coordinator_key: Path | None = None  # the coordinator's memory-signing .pub, pinned before any memory arrives


def check_server_address(server: str) -> str:
    from fedmem.server.coordinator import parse_address

    host, _ = parse_address(server)
    if host in ("0.0.0.0", "::"):
        raise JoinError(f"--server {server}: {host} is a listening address, not one to connect to; "
                        "use the server's name or IP")
    return server


def check_ca(path: Path) -> Path:
    path = Path(path).expanduser()
    if not path.is_file():
        raise JoinError(f"--ca {path}: no such file (the coordinator gives you its ca.pem)")
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except ValueError as err:
        raise JoinError(f"--ca {path}: not a PEM certificate ({err})") from err
    try:
        if not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
            raise JoinError(f"--ca {path}: this is not a CA certificate (use the server's ca.pem, not server.pem)")
    except x509.ExtensionNotFound:
        pass
    return path.resolve()


def received_round(state: Path) -> tuple[int, int, float]:
    """(round, rounds, when it arrived) of the memory kept in the state dir; zeros if none."""
    path = Path(state) / RECEIVED_MEMORY / "fedmem.json"
    try:
        manifest = json.loads(path.read_text())
        return int(manifest.get("round", 0)), int(manifest.get("rounds", 0)), path.stat().st_mtime
    except (OSError, ValueError):
        return 0, 0, 0.0


def trust_option(state: Path) -> str:
    """What `fedmem ask` needs to trust this state dir's pinned key: nothing for the default dir."""
    from fedmem.signing import PINNED_KEY, default_client_state

    pinned = state / PINNED_KEY
    if not pinned.is_file() or os.path.realpath(state) == os.path.realpath(default_client_state()):
        return ""
    return f" --trust-key {pinned}"


def pin_memory_key(state: Path, key_file: Path | None) -> str | None:
    """Pin the coordinator's memory-signing key given with --coordinator-key (an error if another is
    pinned already), and say which key memories must be signed with; returns its fingerprint."""
    from fedmem.signing import PINNED_KEY, key_fingerprint, load_public_key, pin_coordinator_key

    if key_file is not None:
        fp, new = pin_coordinator_key(state, key_file)
        log.info("coordinator memory-signing key %s %s", fp, "pinned" if new else "(pinned already)")
        return fp
    if (state / PINNED_KEY).is_file():
        fp = key_fingerprint(load_public_key(state / PINNED_KEY))
        log.info("coordinator memory-signing key %s (pinned in %s)", fp, state / PINNED_KEY)
        return fp
    log.info("no coordinator memory-signing key pinned yet: the first memory's signer will be (trust on first "
             "use); --coordinator-key FILE pins the coordinator's memory-signing.pub beforehand")
    return None


REFUSED = ("Failed to activate SuperNode", "No SuperNode found with the given public key")


def join(options: JoinOptions) -> int:
    """Run this owner's SuperNode until the final memory arrives (or until stopped); returns the exit code.

    Progress is logged; bad options raise ``JoinError`` (or ``CorpusError``/``ValueError``) before
    anything connects.
    """
    from fedmem.base_model import resolve_base
    from fedmem.config import NodeSettings
    from fedmem.examples import build_examples

    server = check_server_address(options.server)
    ca = check_ca(options.ca)
    NodeSettings(device=options.device, threads=options.threads or 0)  # ValueError names a bad --device/--threads
    corpus = load_corpus(options.data)  # CorpusError names file:line
    examples = build_examples(corpus)
    base = resolve_base(options.base)
    state = Path(options.state).expanduser().resolve()
    state.mkdir(parents=True, exist_ok=True)
    os.chmod(state, 0o700)
    keys = ensure_keys(state)
    pin_memory_key(state, options.coordinator_key)
    log.info("corpus %s: %d documents, %d Q/A records -> %d training examples (the text stays on this machine)",
             corpus.root, len(corpus.documents), len(corpus.qa), len(examples))
    log.info("client key %s%s", keys.fingerprint, " (new)" if keys.created else "")
    log.info("  public key: %s", keys.public_text)
    if keys.created:
        log.info("  the coordinator admits it with:")
        log.info("  fedmem-server clients add %s '%s'", corpus.name, keys.public_text)

    # The node config: this machine's own environment and the owner's policy, read by the ClientApp.
    policy = options.policy or ClientPolicy()
    values = {"data": str(Path(corpus.root).resolve()), "base": str(base), "state": str(state),
              "device": options.device}
    if options.threads:
        values["threads"] = str(options.threads)
    values.update(policy_node_config(policy, changed_only=True))  # the ClientApp applies the defaults
    log.info("client policy: trains at most %s; never a generator path from the server%s",
             ", ".join(f"{k.removeprefix('limit-')} {v}" for k, v in policy_node_config(policy).items()
                       if k.startswith("limit-")),
             ("" if policy.allow_generator else ", nor generator=base")
             + ("" if policy.allow_routed else ", nor a routed run (its LoRA kept apart in the memory)"))
    node_config = write_node_config(state / "node-config.toml", values)
    from fedmem.server.superlink import free_port  # for the SuperNode's loopback Runtime API

    command = supernode_command(server=server, ca_cert=ca, private_key=keys.private_key, node_config=node_config,
                                runtime_port=free_port(), max_wait_time=options.max_wait_time)
    joined_at = time.time()
    log_path = state / "supernode.log"
    def on_signal(_signum, _frame):
        raise KeyboardInterrupt

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    refused_since = None
    try:
        while True:
            log.info("joining %s as %s ...", server, corpus.name)
            outcome, code = _run_supernode(command, state, corpus.name, log_path, joined_at, options.stay,
                                           options.threads)
            if outcome != "refused":
                return code
            # Flower refuses an admitted key too while the SuperLink still counts this client's previous
            # session as open (up to a minute after it died), so a refusal is retried for a while.
            refused_since = refused_since or time.monotonic()
            if time.monotonic() - refused_since >= options.admission_wait:
                log.error("the server refused this client: its key %s is not admitted. Send the public key "
                          "above to the coordinator (`fedmem-server clients add`).", keys.fingerprint)
                return 3
            log.info("not let in yet (key not admitted, or this client's previous session is still open); "
                     "retrying for up to %.0fs", options.admission_wait - (time.monotonic() - refused_since))
            time.sleep(5.0)
    except KeyboardInterrupt:
        log.info("leaving the federation")
        return 130
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


_LEVELS = {"warning: ": logging.WARNING, "error: ": logging.ERROR, "critical: ": logging.CRITICAL}


def relay_clientapp_line(text: str, name: str) -> bool:
    """Pass one line of the SuperNode's output on to this process's log if it is the ClientApp's own
    (tagged ``[NAME ...]``, or a fedmem warning or error) or a sign of trouble; True if it was."""
    level, body = logging.INFO, text
    for prefix, lvl in _LEVELS.items():  # fedmem's format; Flower's own lines read "WARNING :  ..."
        if text.startswith(prefix):
            level, body = lvl, text[len(prefix):]
            break
    if level != logging.INFO or body.startswith((f"[{name}]", f"[{name} ")) or "not kept" in body:
        log.log(max(level, logging.WARNING) if "not kept" in body else level, "%s", body)
    elif "Traceback" in text:
        log.error("%s", text)
    else:
        return False
    return True


def _run_supernode(command, state: Path, name: str, log_path: Path, joined_at: float, stay: bool,
                   threads: int | None = None) -> tuple[str, int]:
    """One SuperNode session: ("done", 0), ("refused", 3) or ("stopped", 1)."""
    proc = start_supernode(command, state / "flwr", threads)
    refused = threading.Event()
    sent = {"at": 0.0}

    def pump() -> None:
        with open(log_path, "a") as fh:
            for line in proc.stdout:
                fh.write(line)
                fh.flush()
                text = line.rstrip()
                if any(r in text for r in REFUSED):
                    refused.set()
                if "Sent successfully" in text:
                    sent["at"] = time.time()
                if "SuperNode ID" in text:
                    log.info("connected; waiting for rounds")
                else:
                    relay_clientapp_line(text, name)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        while proc.poll() is None:
            time.sleep(1.0)
            if refused.is_set():
                return "refused", 3
            done, total, arrived = received_round(state)
            if not stay and total and done >= total and arrived > joined_at:
                # Let the SuperNode acknowledge the message that carried it before stopping.
                deadline = time.monotonic() + 15
                while sent["at"] < arrived and time.monotonic() < deadline and proc.poll() is None:
                    time.sleep(0.2)
                log.info("final memory received (round %d/%d): %s", done, total, state / RECEIVED_MEMORY)
                log.info('use it with: fedmem ask --memory %s%s "your question"', state / RECEIVED_MEMORY,
                         trust_option(state))
                return "done", 0
        reader.join(timeout=5)  # the reason it stopped may still be in the pipe
        if refused.is_set():
            return "refused", 3
        log.error("the SuperNode stopped (exit code %s); see %s", proc.returncode, log_path)
        return "stopped", 1
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

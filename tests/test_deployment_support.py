"""Processes for the deployment tests (no tests here): start fedmem's command lines, watch their output, clean up."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_owner(root: Path, fact: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "notes.md").write_text("# Notes\n\n" + fact + "\n")
    return root




def server_command(state: Path, port: int, base: Path, rounds: int, min_clients: int,
                   round_timeout: float = 180, join_grace: float = 15, extra: list[str] = ()) -> list[str]:
    return ["-m", "fedmem.server.cli", "start", "--state", str(state), "--address", f"127.0.0.1:{port}",
            "--base", str(base), "--rounds", str(rounds), "--min-clients", str(min_clients),
            "--epochs", "1", "--rank", "4", "--round-timeout", str(round_timeout),
            "--wait-for-clients", "240", "--join-grace", str(join_grace), *extra]


class Party:
    """One fedmem command line in its own session; killed with every process it started."""

    def __init__(self, name: str, log_dir: Path, args: list[str]):
        self.name = name
        self.args = args
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log = log_dir / f"{name}.log"
        self.proc: subprocess.Popen | None = None
        self.family: set[int] = set()

    def start(self) -> Party:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with open(self.log, "a") as fh:  # the child keeps its own descriptor
            fh.write(f"\n=== start {time.strftime('%H:%M:%S')}: {' '.join(self.args)}\n")
            fh.flush()
            # stderr too: fedmem's progress and warnings are log lines, written to stderr.
            self.proc = subprocess.Popen([sys.executable, *self.args], stdout=fh, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)
        return self

    def output(self) -> str:
        """Everything the party wrote, stdout and stderr interleaved."""
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def _remember_family(self) -> None:
        # Flower starts some helpers in new sessions; remember them while the tree is intact.
        try:
            self.family |= {c.pid for c in psutil.Process(self.proc.pid).children(recursive=True)}
        except psutil.Error:
            pass

    def wait(self, timeout: float) -> int | None:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            self._remember_family()
            time.sleep(0.5)
        return self.proc.poll()

    def kill(self) -> None:
        """SIGKILL, as a power cut would: the process, its group, and every descendant seen."""
        if self.proc is None:
            return
        self._remember_family()
        for pid in [self.proc.pid, *self.family]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait()
        self.family.clear()


def wait_for(predicate, timeout: float, what: str, parties: list[Party] = ()) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        for p in parties:
            p._remember_family() if p.proc and p.proc.poll() is None else None
        time.sleep(0.5)
    logs = "\n".join(f"--- {p.name}:\n{p.output()[-3000:]}" for p in parties)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}\n{logs}")


def stop_all(parties: list[Party]) -> None:
    for p in parties:
        p.kill()

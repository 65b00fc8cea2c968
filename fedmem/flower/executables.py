"""Running Flower's own executables (SuperLink, SuperNode, ``flwr``) as child processes."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def tool(name: str) -> str:
    """This interpreter's copy of a Flower executable, else whatever PATH finds."""
    path = Path(sys.executable).parent / name
    return str(path) if path.exists() else name


def tools_env(flwr_home: Path, threads: int | None = None) -> dict[str, str]:
    """Environment for Flower's executables: this interpreter's bin dir first, since SuperLink and
    SuperNode start ``flower-superexec`` and ``flwr-serverapp``/``flwr-clientapp`` by name."""
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    env["FLWR_HOME"] = str(flwr_home)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["PYTHONUNBUFFERED"] = "1"
    # Offline by design: owners' machines and the coordinator may have no internet.
    env["FLWR_TELEMETRY_ENABLED"] = "0"
    env.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    return env

"""A real ``fedmem serve`` in a subprocess, for the serving scripts (bench_serving, check_serving)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx


@contextlib.contextmanager
def running_server(serve_args: list[str], port: int, ready=lambda health: True,
                   timeout: float = 300) -> Iterator[str]:
    """Start ``fedmem serve SERVE_ARGS --port PORT``, wait until ``/health`` answers and
    ``ready(health)`` holds, yield its base URL; stop it on the way out."""
    server = subprocess.Popen([sys.executable, "-m", "fedmem.cli", "serve", *serve_args, "--port", str(port),
                               "--device", "cpu", "-q"], env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                response = httpx.get(url + "/health", timeout=2)
                if response.status_code == 200 and ready(response.json()):
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("fedmem serve did not come up")
            time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=60)

"""The coordinator's public endpoint: TLS, and Flower's Fleet API only.

Data owners' SuperNodes connect here. Requests under ``/v1/fleet/`` (node activation,
heartbeats, messages, the app bundle) are forwarded unchanged to the loopback
SuperLink, which checks each SuperNode's signature against its allow-list; anything
else (the Control and Runtime APIs) is answered 404 without reaching it. A SuperNode
refused for an unknown key is logged here with the key's fingerprint, the one
``fedmem-client join`` printed, so the coordinator can match it to a request to join.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

FLEET_PREFIX = "/v1/fleet/"
# Hop-by-hop and length headers are the proxy's own business on each side.
_DROP = {"host", "connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
         "proxy-authorization", "proxy-authenticate", "content-length", "content-encoding"}
PUBLIC_KEY_HEADER = "flwr-public-key"  # flwr.supercore.constant.FLEET_HTTP_PUBLIC_KEY_HEADER

log = logging.getLogger(__name__)


def make_app(upstream: str, ca_cert: Path, admitted: Callable[[str], str | None] = lambda fp: None) -> Starlette:
    """The proxy. ``admitted`` names the admitted client a key fingerprint belongs to, if any."""
    verify = ssl.create_default_context(cafile=str(ca_cert))
    client = httpx.AsyncClient(base_url=upstream, verify=verify, timeout=httpx.Timeout(300.0, connect=10.0))
    last_said: dict[str, float] = {}

    def say_once_a_minute(key: str, level: int, line: str) -> None:
        # A refused SuperNode retries every few seconds; one line a minute says it all.
        now = time.monotonic()
        if now - last_said.get(key, -1e9) >= 60:
            last_said[key] = now
            log.log(level, "%s", line)

    async def forward(request: Request) -> Response:
        path = request.url.path
        if not path.startswith(FLEET_PREFIX):
            return PlainTextResponse("not found\n", status_code=404)
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in _DROP]
        body = await request.body()
        try:
            upstream_response = await client.request(request.method, path, params=request.url.query or None,
                                                     headers=headers, content=body)
        except httpx.HTTPError as err:
            log.warning("front door: the SuperLink did not answer (%s)", type(err).__name__)
            return PlainTextResponse("SuperLink unavailable\n", status_code=503)
        if path.endswith("/activate-node") and upstream_response.status_code >= 400:
            fp = _key_fingerprint(request.headers.get(PUBLIC_KEY_HEADER))
            who = request.client.host if request.client else "?"
            name = admitted(fp)
            if name:
                say_once_a_minute(fp, logging.INFO,
                                  f"client {name} reconnected from {who} while its previous session is still open; "
                                  "it is let in once that times out (within a minute)")
            else:
                say_once_a_minute(fp, logging.WARNING,
                                  f"refused a client from {who}: unknown key {fp} "
                                  "(add it with `fedmem-server clients add` if it should join)")
        out_headers = {k: v for k, v in upstream_response.headers.items() if k.lower() not in _DROP}
        return Response(upstream_response.content, status_code=upstream_response.status_code, headers=out_headers)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        await client.aclose()

    return Starlette(routes=[Route("/{path:path}", forward, methods=["GET", "POST", "PUT", "DELETE", "HEAD"])],
                     lifespan=lifespan)


def _key_fingerprint(header: str | None) -> str:
    if not header:
        return "(none given)"
    try:
        from fedmem.clients.keys import fingerprint_of_public_pem

        return fingerprint_of_public_pem(base64.b64decode(header))
    except Exception:  # noqa: BLE001 - a malformed header of any kind is logged as such, never a crash
        return "(unreadable)"


class FrontDoor:
    """Uvicorn in a thread of the ``fedmem-server start`` process."""

    def __init__(self, host: str, port: int, upstream_port: int, certs,
                 admitted: Callable[[str], str | None] = lambda fp: None):
        app = make_app(f"https://127.0.0.1:{upstream_port}", certs.ca_cert, admitted)
        config = uvicorn.Config(app, host=host, port=port, ssl_certfile=str(certs.server_cert),
                                ssl_keyfile=str(certs.server_key), log_level="warning", access_log=False,
                                lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self._run, name="fedmem-front-door", daemon=True)

    def _run(self) -> None:
        asyncio.run(self.server.serve())

    def start(self, timeout: float = 30.0) -> None:
        self.thread.start()
        waited = 0.0
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("the front door could not start (is the port already in use?)")
            if waited > timeout:
                raise RuntimeError("the front door did not start in time")
            threading.Event().wait(0.1)
            waited += 0.1

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)

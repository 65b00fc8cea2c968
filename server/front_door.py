"""The coordinator's public endpoint: TLS, and an exact list of Flower Fleet API calls.

Data owners' SuperNodes connect here. A request is forwarded to the loopback SuperLink
only if its method and its path, as the raw bytes of the request line, are one of the
Fleet calls a SuperNode makes (``FLEET_CALLS``): anything else, including every path
that a URL library could rewrite into another one (dot segments, ``%``-escapes, doubled
slashes, backslashes) and any query string, is refused before the body is read and
never reaches the SuperLink, whose Control and Runtime APIs share its port. The path
forwarded is the one checked, byte for byte.

Bodies need a ``Content-Length`` within a cap (``Limits``), checked before a byte of the
body is read, and stream through to the SuperLink; so do the answers. The two calls that
carry data (``push-messages``, ``push-object``) must also be signed by an admitted
client's key, checked here before their body is read; the SuperLink checks every
signature again. Requests beyond a number in flight are answered 503.

A SuperNode refused for an unknown key is logged here with the key's fingerprint, the
one ``fedmem-client join`` printed, so the coordinator can match it to a request to join.
See docs/security.md, "Front door".
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import datetime
import logging
import os
import re
import ssl
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import uvicorn
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

log = logging.getLogger(__name__)

SMALL, LARGE = "small", "large"
# Every call a SuperNode that has its own key (as `fedmem-client join` runs it) makes over REST in
# Flower 1.42 (flwr/supernode/fleet_http_connection.py, fleet_http_client.py), all POST, none with a
# query string. Left out: register-node and unregister-node, which only a SuperNode without a key
# makes (and which the SuperLink refuses under --enable-supernode-auth), and /health.
FLEET_CALLS: dict[bytes, str] = {
    b"/v1/fleet/activate-node": SMALL,
    b"/v1/fleet/deactivate-node": SMALL,
    b"/v1/fleet/send-node-heartbeat": SMALL,
    b"/v1/fleet/pull-messages": SMALL,
    b"/v1/fleet/get-run": SMALL,
    b"/v1/fleet/get-fab": SMALL,
    b"/v1/fleet/pull-object": SMALL,
    b"/v1/fleet/confirm-message-received": SMALL,
    b"/v1/fleet/push-messages": LARGE,
    b"/v1/fleet/push-object": LARGE,
}
FLEET_METHOD = "POST"
ACTIVATE_NODE = b"/v1/fleet/activate-node"

MIB = 1 << 20
# The largest thing a SuperNode sends is its update. The embedded SmolLM2-135M has 30 layers
# with LoRA on 7 linear layers each (q 576x576, k and v 576x192, o 576x576, gate and up 576x1536,
# down 1536x576): a rank-r update is r x (in + out) float32 numbers per module, 10176 r per layer.
# A cyclic round's update is rank 2r = 32 at the default rank 16: 30 x 10176 x 32 x 4 bytes.
EMBEDDED_UPDATE_BYTES_RANK_32 = 30 * 10176 * 32 * 4  # 39,075,840 bytes, 37.3 MiB
# Flower 1.42 sends arrays in chunks of 5 MiB (FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE), so one request
# carries far less; the cap still admits the whole update in one body, with room to spare.
DEFAULT_MAX_BODY = 64 * MIB
# Every other call carries a node id, a run id, an object id or a public key: a few hundred bytes.
DEFAULT_SMALL_BODY = 64 * 1024
# A SuperNode has at most two requests in flight (its heartbeat, and its main loop's call).
DEFAULT_MAX_CONCURRENT = 64
ENV_MAX_BODY = "FEDMEM_FRONT_DOOR_MAX_BODY"
ENV_MAX_CONCURRENT = "FEDMEM_FRONT_DOOR_MAX_CONCURRENT"

# Flower's SuperNode authentication headers and time window (flwr.supercore.constant,
# flwr.common.constant, flwr/superlink/routers/fleet/node_auth.py).
PUBLIC_KEY_HEADER = "flwr-public-key"
SIGNATURE_HEADER = "flwr-signature"
TIMESTAMP_HEADER = "flwr-timestamp"
TIMESTAMP_TOLERANCE = 300
SYSTEM_TIME_TOLERANCE = 5

# Hop-by-hop headers are each side's own business; the client does not say who it is for the SuperLink.
_HOP_BY_HOP = {b"connection", b"keep-alive", b"transfer-encoding", b"te", b"trailer", b"upgrade",
               b"proxy-authorization", b"proxy-authenticate", b"proxy-connection"}
_NOT_FORWARDED = _HOP_BY_HOP | {b"host", b"content-length", b"expect", b"forwarded", b"x-forwarded-for",
                                b"x-forwarded-proto", b"x-forwarded-host", b"x-forwarded-port", b"x-real-ip"}
_PATH = re.compile(rb"(/[A-Za-z0-9_-]+)+")


@dataclass(frozen=True)
class Limits:
    max_body: int = DEFAULT_MAX_BODY  # push-messages, push-object
    small_body: int = DEFAULT_SMALL_BODY  # every other call
    max_concurrent: int = DEFAULT_MAX_CONCURRENT  # requests in flight; beyond, 503
    small_body_seconds: float = 30.0  # to receive a small body (the unauthenticated can send those)
    large_body_seconds: float = 300.0  # to receive a large body, from an admitted client
    upstream_seconds: float = 300.0  # the SuperLink's answer

    @classmethod
    def from_env(cls, environ: dict | None = None) -> Limits:
        """Defaults, with ``FEDMEM_FRONT_DOOR_MAX_BODY`` (bytes; K, M or G suffix) and
        ``FEDMEM_FRONT_DOOR_MAX_CONCURRENT`` where set."""
        environ = os.environ if environ is None else environ
        values = {}
        if environ.get(ENV_MAX_BODY, "").strip():
            values["max_body"] = parse_size(environ[ENV_MAX_BODY], ENV_MAX_BODY)
        if environ.get(ENV_MAX_CONCURRENT, "").strip():
            text = environ[ENV_MAX_CONCURRENT].strip()
            if not text.isdigit() or int(text) < 1:
                raise ValueError(f"{ENV_MAX_CONCURRENT}={text!r}: expected a whole number of requests, at least 1")
            values["max_concurrent"] = int(text)
        return cls(**values)


def parse_size(text: str, what: str = "size") -> int:
    """'67108864', '64M', '64MiB', '1G' -> bytes (K, M, G are powers of 1024)."""
    match = re.fullmatch(r"\s*(\d+)\s*([KMG]?)(?:i?B)?\s*", text, flags=re.IGNORECASE)
    if not match:
        raise ValueError(f"{what}={text!r}: expected bytes, e.g. 67108864 or 64M")
    value = int(match.group(1)) * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[match.group(2).upper()]
    if value < 1024:
        raise ValueError(f"{what}={text!r}: at least 1K")
    return value


def path_problem(raw_path: bytes) -> str | None:
    """Why a raw request path cannot be a Fleet call, or None if it has the shape of one.

    Whatever a URL library or a server could normalise (dot segments, %-escapes, empty
    segments, backslashes) is refused, not interpreted: the forwarded path is exactly the
    bytes checked here.
    """
    if not raw_path.startswith(b"/"):
        return "not an absolute path"
    if b"%" in raw_path:
        return "percent-encoding in the path"
    if b"\\" in raw_path:
        return "backslash in the path"
    if b"//" in raw_path:
        return "empty segment in the path"
    segments = raw_path.split(b"/")
    if b"." in segments or b".." in segments:
        return "dot segment in the path"
    if not _PATH.fullmatch(raw_path):
        return "characters outside A-Z a-z 0-9 _ - / in the path"
    return None


class _Refused(Exception):
    def __init__(self, status: int, text: str):
        super().__init__(text)
        self.status, self.text = status, text


class _ClientGone(Exception):
    pass


class FrontDoorApp:
    """The proxy, as an ASGI application (uvicorn serves it in ``FrontDoor``).

    ``admitted`` names the admitted client a key fingerprint belongs to, if any; ``transport``
    replaces the connection to the SuperLink (tests).
    """

    def __init__(self, upstream: str, ca_cert: Path | None, admitted: Callable[[str], str | None] = lambda fp: None,
                 limits: Limits | None = None, transport: httpx.AsyncBaseTransport | None = None):
        self.upstream = httpx.URL(upstream)
        self.limits = limits or Limits()
        self.admitted = admitted
        if transport is None:
            verify = ssl.create_default_context(cafile=str(ca_cert)) if ca_cert else True
            transport = httpx.AsyncHTTPTransport(
                verify=verify, retries=0,
                limits=httpx.Limits(max_connections=self.limits.max_concurrent,
                                    max_keepalive_connections=self.limits.max_concurrent))
        # The transport, not an httpx client: no default headers, cookies, redirects or URL rewriting.
        self.transport = transport
        self.in_flight = 0
        self._last_said: dict[str, float] = {}

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            await self._http(scope, receive, send)
        elif scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await self.transport.aclose()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        elif scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})

    def say_once_a_minute(self, key: str, level: int, line: str) -> None:
        # A refused SuperNode retries every few seconds; one line a minute says it all.
        now = time.monotonic()
        if now - self._last_said.get(key, -1e9) >= 60:
            if len(self._last_said) > 10_000:  # many senders: forget, rather than grow without bound
                self._last_said.clear()
            self._last_said[key] = now
            log.log(level, "%s", line)

    def _refuse(self, who: str, method: str, raw_path: bytes, status: int, reason: str) -> _Refused:
        shown = raw_path[:200].decode("ascii", errors="backslashreplace")
        self.say_once_a_minute(f"{who} {reason}", logging.WARNING,
                               f"front door: refused {method[:16]!r} {shown!r} from {who}: {reason} ({status})")
        return _Refused(status, reason)

    def check(self, scope: dict, who: str) -> tuple[str, int]:
        """(size class, body length) of a request whose request line and headers may be forwarded;
        raises ``_Refused`` (logged) for any other."""
        method = scope.get("method", "")
        raw_path = scope.get("raw_path")
        if not isinstance(raw_path, bytes):
            raise self._refuse(who, method, b"", 400, "no raw path")
        problem = path_problem(raw_path)
        if problem:
            raise self._refuse(who, method, raw_path, 400, problem)
        size_class = FLEET_CALLS.get(raw_path)
        if size_class is None:
            raise self._refuse(who, method, raw_path, 404, "not a Fleet API call a SuperNode makes")
        if method != FLEET_METHOD:
            raise self._refuse(who, method, raw_path, 405, f"{FLEET_METHOD} only")
        if scope.get("query_string"):
            raise self._refuse(who, method, raw_path, 400, "query string")
        headers = scope.get("headers", [])
        if any(name == b"transfer-encoding" for name, _ in headers):
            raise self._refuse(who, method, raw_path, 411, "a body without Content-Length")
        lengths = [value for name, value in headers if name == b"content-length"]
        if not lengths:
            raise self._refuse(who, method, raw_path, 411, "no Content-Length")
        if len(lengths) > 1 or not lengths[0].isdigit() or len(lengths[0]) > 15:
            raise self._refuse(who, method, raw_path, 400, "malformed Content-Length")
        length = int(lengths[0])
        cap = self.limits.max_body if size_class == LARGE else self.limits.small_body
        if length > cap:
            raise self._refuse(who, method, raw_path, 413, f"body of {length} bytes, over the {cap}-byte cap")
        return size_class, length

    def authenticate(self, header_list: list[tuple[bytes, bytes]]) -> str | None:
        """Why the request is not signed by an admitted client's key (Flower's scheme), or None."""
        names = [name for name, _ in header_list if name.startswith(b"flwr-")]
        if len(names) != len(set(names)):  # the SuperLink might read another copy than the one checked here
            return "a signature header given twice"
        headers = dict(header_list)
        try:
            pem = base64.b64decode(headers[PUBLIC_KEY_HEADER.encode()], validate=True)
            signature = base64.b64decode(headers[SIGNATURE_HEADER.encode()], validate=True)
            stamp = headers[TIMESTAMP_HEADER.encode()].decode("ascii")
            age = (datetime.datetime.now(datetime.timezone.utc)
                   - datetime.datetime.fromisoformat(stamp)).total_seconds()
            if not -SYSTEM_TIME_TOLERANCE < age < TIMESTAMP_TOLERANCE + SYSTEM_TIME_TOLERANCE:
                return "signature timestamp outside the allowed window"
            key = serialization.load_pem_public_key(pem)
            if not isinstance(key, ec.EllipticCurvePublicKey):
                return "not an EC key"
            key.verify(signature, stamp.encode("ascii"), ec.ECDSA(hashes.SHA256()))  # flwr's verify_signature
        except KeyError:
            return "not signed"
        except InvalidSignature:
            return "bad signature"
        except (ValueError, TypeError, UnicodeError, binascii.Error, UnsupportedAlgorithm):
            return "malformed signature headers"
        fp = _fingerprint(key)
        try:
            name = self.admitted(fp)
        except Exception as err:  # noqa: BLE001 - an unreadable allow-list admits nobody, and says so
            log.warning("front door: could not read the allow-list (%s)", err)
            name = None
        return None if name else f"key {fp} is not admitted"

    async def _http(self, scope, receive, send) -> None:
        who = scope["client"][0] if scope.get("client") else "?"
        try:
            size_class, length = self.check(scope, who)
        except _Refused as refused:
            await _answer(send, refused.status, refused.text)
            return
        raw_path = scope["raw_path"]
        if self.in_flight >= self.limits.max_concurrent:
            self._refuse(who, FLEET_METHOD, raw_path, 503, "too many requests in flight")
            await _answer(send, 503, "busy, try again", retry_after=True)
            return
        self.in_flight += 1
        try:
            if size_class == LARGE:
                problem = self.authenticate(scope["headers"])
                if problem:
                    self._refuse(who, FLEET_METHOD, raw_path, 401, problem)
                    await _answer(send, 401, "Invalid SuperNode authentication")
                    return
            seconds = self.limits.large_body_seconds if size_class == LARGE else self.limits.small_body_seconds
            await self._forward(scope, receive, send, who, length, seconds)
        finally:
            self.in_flight -= 1

    async def _forward(self, scope, receive, send, who: str, length: int, seconds: float) -> None:
        raw_path = scope["raw_path"]
        out = [(name, value) for name, value in scope["headers"] if name not in _NOT_FORWARDED]
        out += [(b"content-length", str(length).encode()), (b"x-forwarded-for", who.encode())]
        url = self.upstream.copy_with(raw_path=raw_path)
        request = httpx.Request(FLEET_METHOD, url, headers=out, content=_body(receive, length, seconds),
                                extensions={"timeout": httpx.Timeout(self.limits.upstream_seconds,
                                                                     connect=10.0).as_dict()})
        if request.url.raw_path != raw_path:  # never expected: the path checked is the path sent
            await _answer(send, 400, "bad request path")
            return
        try:
            response = await self.transport.handle_async_request(request)
        except _Refused as refused:
            self._refuse(who, FLEET_METHOD, raw_path, refused.status, refused.text)
            await _answer(send, refused.status, refused.text)
            return
        except _ClientGone:
            return
        except httpx.HTTPError as err:
            log.warning("front door: the SuperLink did not answer (%s)", type(err).__name__)
            await _answer(send, 503, "SuperLink unavailable", retry_after=True)
            return
        try:
            if raw_path == ACTIVATE_NODE and response.status_code >= 400:
                self._unknown_key(dict(scope["headers"]), who)
            headers = [(name.lower(), value) for name, value in response.headers.raw
                       if name.lower() not in _HOP_BY_HOP]
            await send({"type": "http.response.start", "status": response.status_code, "headers": headers})
            async for chunk in response.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except httpx.HTTPError as err:  # the answer is cut short: uvicorn closes the connection
            log.warning("front door: the SuperLink's answer broke off (%s)", type(err).__name__)
        finally:
            await response.aclose()

    def _unknown_key(self, headers: dict[bytes, bytes], who: str) -> None:
        header = headers.get(PUBLIC_KEY_HEADER.encode())
        fp = _key_fingerprint(header.decode("ascii", errors="replace") if header else None)
        try:
            name = self.admitted(fp)
        except Exception:  # noqa: BLE001 - logged by authenticate() when it matters
            name = None
        if name:
            self.say_once_a_minute(fp, logging.INFO,
                                   f"client {name} reconnected from {who} while its previous session is still open; "
                                   "it is let in once that times out (within a minute)")
        else:
            self.say_once_a_minute(fp, logging.WARNING,
                                   f"refused a client from {who}: unknown key {fp} "
                                   "(add it with `fedmem-server clients add` if it should join)")


async def _body(receive, length: int, seconds: float) -> AsyncIterator[bytes]:
    """The request body as it arrives, never more than its Content-Length, within ``seconds``."""
    deadline = time.monotonic() + seconds
    received = 0
    more = True
    while more:
        left = deadline - time.monotonic()
        if left <= 0:
            raise _Refused(408, "the body did not arrive in time")
        try:
            message = await asyncio.wait_for(receive(), timeout=left)
        except asyncio.TimeoutError:
            raise _Refused(408, "the body did not arrive in time") from None
        if message["type"] == "http.disconnect":
            raise _ClientGone()
        chunk = message.get("body", b"")
        more = message.get("more_body", False)
        received += len(chunk)
        if received > length:
            raise _Refused(400, "body longer than its Content-Length")
        if chunk:
            yield chunk
    if received != length:
        raise _Refused(400, "body shorter than its Content-Length")


async def _answer(send, status: int, text: str, retry_after: bool = False) -> None:
    body = (text + "\n").encode()
    headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode()),
               (b"connection", b"close")]  # an unread body is never read: the connection ends here
    if retry_after:
        headers.append((b"retry-after", b"5"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def _fingerprint(key) -> str:
    from fedmem.clients.keys import fingerprint

    return fingerprint(key)


def _key_fingerprint(header: str | None) -> str:
    if not header:
        return "(none given)"
    try:
        from fedmem.clients.keys import fingerprint_of_public_pem

        return fingerprint_of_public_pem(base64.b64decode(header))
    except Exception:  # noqa: BLE001 - a malformed header of any kind is logged as such, never a crash
        return "(unreadable)"


def make_app(upstream: str, ca_cert: Path | None, admitted: Callable[[str], str | None] = lambda fp: None,
             limits: Limits | None = None, transport: httpx.AsyncBaseTransport | None = None) -> FrontDoorApp:
    return FrontDoorApp(upstream, ca_cert, admitted, limits, transport)


class FrontDoor:
    """Uvicorn in a thread of the ``fedmem-server start`` process.

    ``limits`` default to ``Limits.from_env()``.
    """

    def __init__(self, host: str, port: int, upstream_port: int, certs,
                 admitted: Callable[[str], str | None] = lambda fp: None, limits: Limits | None = None,
                 transport: httpx.AsyncBaseTransport | None = None):
        self.limits = limits or Limits.from_env()
        app = make_app(f"https://127.0.0.1:{upstream_port}", certs.ca_cert, admitted, self.limits, transport)
        config = uvicorn.Config(app, host=host, port=port, ssl_certfile=str(certs.server_cert),
                                ssl_keyfile=str(certs.server_key), log_level="warning", access_log=False,
                                lifespan="on", ws="none", server_header=False,
                                date_header=False)
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

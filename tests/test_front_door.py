"""The front door attacked: path tricks, methods, body sizes and framing, floods (issue 16, item 1).

Fast tests drive the ASGI app directly with hand-made request scopes (the raw path is
exactly what a client put on the request line) and an in-process SuperLink stand-in
that records every request reaching it. The last ones start the real ``FrontDoor``
(uvicorn, TLS) on loopback and talk to it over sockets, with Flower's own Fleet client
too. tests/test_deployment.py sends the same tricks to a real ``fedmem-server start``.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import json
import logging
import os
import socket
import ssl
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from fedmem.clients.keys import fingerprint
from fedmem.server.front_door import (
    DEFAULT_MAX_BODY,
    DEFAULT_SMALL_BODY,
    EMBEDDED_UPDATE_BYTES_RANK_32,
    FLEET_CALLS,
    LARGE,
    FrontDoor,
    Limits,
    make_app,
    parse_size,
    path_problem,
)

# Raw request targets (what goes on the request line) that must never reach the SuperLink. The first three
# reached its Control API through the old front door (issue 16).
PATH_TRICKS = [
    b"/v1/fleet/../control/list-runs",
    b"/v1/fleet/%2e%2e/control/list-runs",
    b"/v1/fleet/../control/register-node",
    b"/v1/fleet/%2E%2E/control/list-runs",
    b"/v1/fleet/..%2fcontrol/list-runs",
    b"/v1/fleet/..%2Fcontrol%2Fregister-node",
    b"/v1/fleet%2f..%2f..%2fv1%2fcontrol%2flist-runs",
    b"/v1/fleet/%2e%2e%2fcontrol/list-runs",
    b"//v1/fleet/activate-node",
    b"/v1/fleet//activate-node",
    b"//v1/control/list-runs",
    b"/v1/fleet/./activate-node",
    b"/v1/fleet/./x",
    b"/v1/fleet/activate-node/.",
    b"/v1/fleet/push-object/..",
    b"/v1/fleet/..\\control/list-runs",
    b"/v1/fleet\\..\\control\\list-runs",
    b"/v1/fleet/activate-node%00",
    b"/v1/fleet/activate-node/",
    b"/v1/fleet/activate-node;x=1",
    b"/V1/fleet/activate-node",
    b"/v1/fleet/register-node",  # only for SuperNodes without a key
    b"/v1/fleet/unregister-node",
    b"/v1/fleet/unknown",
    b"/v1/fleet/",
    b"/v1/control/list-runs",
    b"/v1/control/register-node",
    b"/health",
    b"/",
    b"*",
    b"http://127.0.0.1/v1/fleet/../control/list-runs",
]
# Also refused, but not sendable by an HTTP client library (or parsed away by the server).
UNSENDABLE_TRICKS = [b"", b"/v1/fleet/activate-node\x00", b"/v1/fleet/activate-node\xff", b"v1/fleet/activate-node"]
ALLOWED = sorted(FLEET_CALLS)
PUSH_OBJECT = b"/v1/fleet/push-object"
ACTIVATE = b"/v1/fleet/activate-node"


# ---------------------------------------------------------------- the SuperLink stand-in and a raw ASGI client


@dataclass
class Seen:
    method: str
    raw_path: bytes
    query: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes


class Upstream:
    """Records every request that reaches it (``started``) and every one it read whole (``seen``);
    answers with the path and body it got, in two pieces."""

    def __init__(self, status: int = 200, gate: asyncio.Event | None = None, echo: bool = True):
        self.status, self.gate, self.echo = status, gate, echo
        self.started = 0
        self.seen: list[Seen] = []

    async def __call__(self, scope, receive, send) -> None:
        assert scope["type"] == "http"
        self.started += 1
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        if self.gate is not None:
            await self.gate.wait()
        self.seen.append(Seen(scope["method"], scope["raw_path"], scope["query_string"], list(scope["headers"]), body))
        payload = (b"echo " + scope["raw_path"] + b"\n" + body) if self.echo else b""
        await send({"type": "http.response.start", "status": self.status,
                    "headers": [(b"content-type", b"application/protobuf"), (b"x-upstream", b"yes"),
                                (b"content-length", str(len(payload)).encode())]})
        half = len(payload) // 2
        await send({"type": "http.response.body", "body": payload[:half], "more_body": True})
        await send({"type": "http.response.body", "body": payload[half:], "more_body": False})


@dataclass
class Answer:
    status: int
    headers: dict[bytes, bytes]
    body: bytes
    bytes_read: int  # of the request body, by the front door


async def asgi_call(app, method: str, raw_path: bytes, *, headers=(), chunks=(), query: bytes = b"",
                    length: int | None = -1, stalls: bool = False, client=("10.1.2.3", 50123)) -> Answer:
    """One request as uvicorn hands it to the app: ``raw_path`` as sent, ``path`` decoded from it.
    ``length``: the Content-Length header (-1: the body's size; None: none); ``stalls``: the client
    sends ``chunks``, says more follows, and sends nothing more."""
    chunks = list(chunks)
    headers = [(k.lower(), v) for k, v in headers]
    if length is not None:
        headers.append((b"content-length", str(sum(map(len, chunks)) if length == -1 else length).encode()))
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "https",
             "path": urllib.parse.unquote(raw_path.decode("latin-1")), "raw_path": raw_path, "query_string": query,
             "root_path": "", "headers": headers, "client": client, "server": ("127.0.0.1", 9443)}
    read = {"bytes": 0, "calls": 0}

    async def receive():
        read["calls"] += 1
        if chunks:
            chunk = chunks.pop(0)
            read["bytes"] += len(chunk)
            return {"type": "http.request", "body": chunk, "more_body": bool(chunks) or stalls}
        if read["calls"] == 1:
            return {"type": "http.request", "body": b"", "more_body": False}
        await asyncio.sleep(3600)  # a client that sends nothing more

    sent = []

    async def send(message):
        sent.append(message)

    await app(scope, receive, send)
    assert sent and sent[0]["type"] == "http.response.start", sent
    return Answer(sent[0]["status"], dict(sent[0]["headers"]), b"".join(m.get("body", b"") for m in sent[1:]),
                  read["bytes"])


class Owner:
    """An owner's SuperNode key; ``headers()`` are Flower's own signed identity headers."""

    def __init__(self, name: str = "alpha"):
        from flwr.supercore.primitives.asymmetric import generate_key_pairs

        self.name = name
        self.private_key, self.public_key = generate_key_pairs()
        self.fingerprint = fingerprint(self.public_key)

    def headers(self, stamp: str | None = None) -> list[tuple[bytes, bytes]]:
        from flwr.supernode.node_auth_http_interceptor import NodeAuthHttpInterceptor

        request = httpx.Request("POST", "https://superlink.invalid/v1/fleet/push-object")
        captured = {}

        def call_next(context):
            captured.update(context.request.headers)
            return httpx.Response(200)

        from flwr.supercore.protobuf.client import ProtobufRequestContext

        NodeAuthHttpInterceptor(self.private_key, self.public_key).intercept(
            ProtobufRequestContext(rpc_method="/flwr.proto.Fleet/PushObject", message=None, request=request), call_next)
        out = {k.encode(): v.encode() for k, v in captured.items() if k.startswith("flwr-")}
        if stamp is not None:  # re-sign another timestamp, as a replayed or forged request would
            from flwr.supercore.primitives.asymmetric import sign_message

            out[b"flwr-timestamp"] = stamp.encode()
            out[b"flwr-signature"] = base64.b64encode(sign_message(self.private_key, stamp.encode()))
        return list(out.items()) + [(b"content-type", b"application/protobuf")]

    def admits(self, fp: str) -> str | None:
        return self.name if fp == self.fingerprint else None


def door(upstream, owner: Owner | None = None, **limits):
    return make_app("https://127.0.0.1:1", None, owner.admits if owner else (lambda fp: None), Limits(**limits),
                    transport=httpx.ASGITransport(app=upstream))


def run(coroutine):
    return asyncio.run(coroutine)


# ---------------------------------------------------------------- the path and the method


@pytest.mark.parametrize("raw_path", PATH_TRICKS + UNSENDABLE_TRICKS, ids=repr)
def test_path_trick_is_refused_before_the_superlink(raw_path):
    upstream, owner = Upstream(), Owner()
    answer = run(asgi_call(door(upstream, owner), "POST", raw_path, headers=owner.headers(), chunks=[b"\x08\x01"]))
    assert 400 <= answer.status < 500, answer
    assert upstream.started == 0 and answer.bytes_read == 0


@pytest.mark.parametrize("raw_path", ALLOWED, ids=lambda p: p.decode())
@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH", "TRACE", "post"])
def test_an_allowed_path_with_another_method_is_refused(raw_path, method):
    upstream, owner = Upstream(), Owner()
    answer = run(asgi_call(door(upstream, owner), method, raw_path, headers=owner.headers(), chunks=[b"x"]))
    assert answer.status == 405 and upstream.started == 0 and answer.bytes_read == 0


def test_a_query_string_is_refused():
    upstream, owner = Upstream(), Owner()
    answer = run(asgi_call(door(upstream, owner), "POST", ACTIVATE, query=b"next=../control/list-runs",
                           chunks=[b"x"]))
    assert answer.status == 400 and upstream.started == 0


def test_a_scope_without_raw_path_is_refused():
    upstream = Upstream()
    app = door(upstream)
    sent = []

    async def go():
        async def receive():
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message):
            sent.append(message)

        await app({"type": "http", "method": "POST", "path": "/v1/fleet/activate-node", "query_string": b"",
                   "headers": [(b"content-length", b"0")], "client": ("10.0.0.1", 1)}, receive, send)

    run(go())
    assert sent[0]["status"] == 400 and upstream.started == 0


@pytest.mark.parametrize("raw_path,expected", [
    (b"/v1/fleet/activate-node", None), (b"/v1/fleet/../x", "dot segment in the path"),
    (b"/v1/fleet/%2e%2e/x", "percent-encoding in the path"), (b"/a\\b", "backslash in the path"),
    (b"//a", "empty segment in the path"), (b"/a/./b", "dot segment in the path"),
    (b"a/b", "not an absolute path"), (b"/a b", "characters outside A-Z a-z 0-9 _ - / in the path"),
    (b"/a/", "characters outside A-Z a-z 0-9 _ - / in the path"),
])
def test_path_problem_names_what_is_wrong(raw_path, expected):
    assert path_problem(raw_path) == expected


def test_every_allowed_path_has_the_shape_of_one():
    assert all(path_problem(p) is None for p in FLEET_CALLS)
    assert {b"/v1/fleet/register-node", b"/v1/fleet/unregister-node"}.isdisjoint(FLEET_CALLS)


# ---------------------------------------------------------------- forwarding


def test_an_allowed_request_is_forwarded_byte_for_byte():
    upstream, owner = Upstream(), Owner()
    body = os.urandom(1 << 20)
    chunks = [body[i:i + 65536] for i in range(0, len(body), 65536)]
    signed = owner.headers()
    sent_headers = signed + [(b"x-forwarded-for", b"6.6.6.6"), (b"host", b"evil.example")]
    answer = run(asgi_call(door(upstream, owner), "POST", PUSH_OBJECT, headers=sent_headers, chunks=chunks))
    assert answer.status == 200, answer.body
    assert answer.body == b"echo " + PUSH_OBJECT + b"\n" + body  # the answer, streamed back whole
    assert answer.headers[b"x-upstream"] == b"yes" and answer.headers[b"content-length"] == str(len(body) + 27).encode()
    [seen] = upstream.seen
    assert (seen.method, seen.raw_path, seen.query, seen.body) == ("POST", PUSH_OBJECT, b"", body)
    got = dict(seen.headers)
    for name, value in signed:
        assert got[name] == value
    assert got[b"content-length"] == str(len(body)).encode()
    assert got[b"x-forwarded-for"] == b"10.1.2.3"  # the real peer, not what the client claimed
    assert got[b"host"] == b"127.0.0.1:1"
    assert b"transfer-encoding" not in got and b"cookie" not in got


@pytest.mark.parametrize("raw_path", ALLOWED, ids=lambda p: p.decode())
def test_every_allowed_call_reaches_the_superlink_unchanged(raw_path):
    upstream, owner = Upstream(), Owner()
    answer = run(asgi_call(door(upstream, owner), "POST", raw_path, headers=owner.headers(), chunks=[b"\x0a\x02hi"]))
    assert answer.status == 200
    assert [(s.raw_path, s.body) for s in upstream.seen] == [(raw_path, b"\x0a\x02hi")]


class Lines(logging.Handler):
    """The front door's log lines, whatever fedmem's logging setup did to propagation."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())

    def __enter__(self):
        logger = logging.getLogger("fedmem.server.front_door")
        self.level = logger.level
        logger.setLevel(logging.INFO)
        logger.addHandler(self)
        return self

    def __exit__(self, *exc):
        logger = logging.getLogger("fedmem.server.front_door")
        logger.removeHandler(self)
        logger.setLevel(self.level)


def test_the_superlinks_refusal_is_passed_on_and_an_unknown_key_logged():
    upstream, owner, stranger = Upstream(status=401), Owner(), Owner("mallory")
    app = door(upstream, owner)
    with Lines() as logged:
        answer = run(asgi_call(app, "POST", ACTIVATE, headers=stranger.headers(), chunks=[b"k"]))
        assert answer.status == 401
        answer = run(asgi_call(app, "POST", ACTIVATE, headers=owner.headers(), chunks=[b"k"]))
        assert answer.status == 401
        run(asgi_call(app, "POST", b"/v1/fleet/../control/list-runs", chunks=[b"k"]))
    text = "\n".join(logged.lines)
    assert f"refused a client from 10.1.2.3: unknown key {stranger.fingerprint}" in text
    assert "client alpha reconnected from 10.1.2.3" in text
    assert "front door: refused 'POST' '/v1/fleet/../control/list-runs' from 10.1.2.3: dot segment" in text


def test_the_superlink_down_gives_503():
    def unreachable(request):
        raise httpx.ConnectError("refused", request=request)

    app = make_app("https://127.0.0.1:1", None, transport=httpx.MockTransport(unreachable))
    answer = run(asgi_call(app, "POST", ACTIVATE, chunks=[b"k"]))
    assert answer.status == 503


# ---------------------------------------------------------------- bodies


def test_an_oversized_body_is_refused_without_reading_it():
    upstream, owner = Upstream(), Owner()
    app = door(upstream, owner, max_body=4096, small_body=1024)
    for raw_path, length in [(PUSH_OBJECT, 4097), (PUSH_OBJECT, 400 << 20), (ACTIVATE, 1025)]:
        answer = run(asgi_call(app, "POST", raw_path, headers=owner.headers(), chunks=[b"x" * 1024] * 8,
                               length=length))
        assert answer.status == 413 and answer.bytes_read == 0, (raw_path, length, answer)
    assert upstream.started == 0
    ok = run(asgi_call(app, "POST", PUSH_OBJECT, headers=owner.headers(), chunks=[b"x" * 1024] * 4))
    assert ok.status == 200  # exactly at the cap


def test_a_body_longer_than_declared_is_cut_off_at_the_declared_length():
    upstream, owner = Upstream(), Owner()
    answer = run(asgi_call(door(upstream, owner), "POST", PUSH_OBJECT, headers=owner.headers(),
                           chunks=[b"x" * 1000] * 100, length=1000))
    assert answer.status == 400 and answer.bytes_read <= 2000
    assert upstream.seen == []  # the SuperLink never got a whole request


@pytest.mark.parametrize("framing", [
    [],  # no Content-Length
    [(b"transfer-encoding", b"chunked")],
    [(b"transfer-encoding", b"chunked"), (b"content-length", b"2")],
    [(b"content-length", b"2"), (b"content-length", b"2")],
    [(b"content-length", b"-2")],
    [(b"content-length", b"0x2")],
    [(b"content-length", b" 2")],
    [(b"content-length", b"99999999999999999999")],
])
def test_a_body_without_one_plain_content_length_is_refused(framing):
    upstream, owner = Upstream(), Owner()
    answer = run(asgi_call(door(upstream, owner), "POST", ACTIVATE, headers=owner.headers() + framing,
                           chunks=[b"hi"], length=None))
    assert answer.status in (400, 411) and answer.bytes_read == 0 and upstream.started == 0


def test_a_slow_body_is_given_up():
    upstream, owner = Upstream(), Owner()
    app = door(upstream, owner, small_body_seconds=0.2)
    answer = run(asgi_call(app, "POST", ACTIVATE, headers=owner.headers(), chunks=[b"x"], length=10,
                           stalls=True))
    assert answer.status == 408 and upstream.seen == []


def test_data_calls_need_an_admitted_signature_before_their_body_is_read():
    upstream, owner, stranger = Upstream(), Owner(), Owner("mallory")
    app = door(upstream, owner)
    old = (datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(minutes=10)).isoformat()
    forged = [(k, b"AAAA" if k == b"flwr-signature" else v) for k, v in owner.headers()]
    twice = stranger.headers()[:1] + owner.headers()  # the SuperLink might read the stranger's key
    for headers in ([], stranger.headers(), owner.headers(stamp=old), forged, twice,
                    [(b"flwr-public-key", b"!!"), (b"flwr-signature", b"x"), (b"flwr-timestamp", b"now")]):
        for raw_path in (PUSH_OBJECT, b"/v1/fleet/push-messages"):
            answer = run(asgi_call(app, "POST", raw_path, headers=headers, chunks=[b"x" * 100]))
            assert answer.status == 401 and answer.bytes_read == 0, headers
    assert upstream.started == 0


# ---------------------------------------------------------------- floods


def test_requests_beyond_the_concurrency_cap_get_503():
    async def go():
        gate = asyncio.Event()
        upstream, owner = Upstream(gate=gate), Owner()
        app = door(upstream, owner, max_concurrent=3)
        held = [asyncio.create_task(asgi_call(app, "POST", ACTIVATE, headers=owner.headers(), chunks=[b"k"]))
                for _ in range(3)]
        for _ in range(500):
            if upstream.started == 3:
                break
            await asyncio.sleep(0.01)
        assert upstream.started == 3
        extra = await asgi_call(app, "POST", ACTIVATE, headers=owner.headers(), chunks=[b"k"])
        assert extra.status == 503 and extra.bytes_read == 0 and extra.headers[b"retry-after"] == b"5"
        assert upstream.started == 3
        gate.set()
        assert [a.status for a in await asyncio.gather(*held)] == [200, 200, 200]
        assert app.in_flight == 0
        again = await asgi_call(app, "POST", ACTIVATE, headers=owner.headers(), chunks=[b"k"])
        assert again.status == 200

    run(go())


# ---------------------------------------------------------------- limits


def test_the_default_cap_holds_a_cyclic_update_of_the_embedded_model(real_base_dir):
    from fedmem.config import ALL_LINEAR

    config = json.loads((Path(real_base_dir) / "config.json").read_text())
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    kv = config["num_key_value_heads"] * config.get("head_dim", hidden // config["num_attention_heads"])
    shapes = {"q_proj": (hidden, hidden), "k_proj": (hidden, kv), "v_proj": (hidden, kv), "o_proj": (hidden, hidden),
              "gate_proj": (hidden, inter), "up_proj": (hidden, inter), "down_proj": (inter, hidden)}
    rank = 2 * 16  # a cyclic round's update, at the default rank
    update = config["num_hidden_layers"] * sum(rank * sum(shapes[m]) * 4 for m in ALL_LINEAR)
    assert update == EMBEDDED_UPDATE_BYTES_RANK_32
    assert update < DEFAULT_MAX_BODY < 2 * update and DEFAULT_MAX_BODY < 400 << 20
    assert Limits().max_body == DEFAULT_MAX_BODY and Limits().small_body == DEFAULT_SMALL_BODY


def test_limits_from_the_environment():
    assert Limits.from_env({}) == Limits()
    limits = Limits.from_env({"FEDMEM_FRONT_DOOR_MAX_BODY": "128M", "FEDMEM_FRONT_DOOR_MAX_CONCURRENT": "8"})
    assert (limits.max_body, limits.max_concurrent) == (128 << 20, 8)
    assert parse_size("1048576") == 1 << 20 and parse_size("2GiB") == 2 << 30 and parse_size("64k") == 64 << 10
    for bad in ({"FEDMEM_FRONT_DOOR_MAX_BODY": "lots"}, {"FEDMEM_FRONT_DOOR_MAX_BODY": "12"},
                {"FEDMEM_FRONT_DOOR_MAX_CONCURRENT": "0"}, {"FEDMEM_FRONT_DOOR_MAX_CONCURRENT": "many"}):
        with pytest.raises(ValueError, match="FEDMEM_FRONT_DOOR"):
            Limits.from_env(bad)


# ---------------------------------------------------------------- the real front door: uvicorn, TLS, sockets


def send_tricks(port: int, ca: Path, body: bytes = b"") -> dict[bytes, int | str]:
    """POST each of PATH_TRICKS to the front door on loopback, the target sent exactly as written
    (httpx would otherwise normalise it); the HTTP status, or the error if no answer came."""
    out: dict[bytes, int | str] = {}
    with httpx.Client(verify=ssl.create_default_context(cafile=str(ca)), timeout=15) as client:
        for target in PATH_TRICKS:
            try:
                response = client.post(f"https://127.0.0.1:{port}/", content=body, extensions={"target": target},
                                       headers={"content-type": "application/protobuf"})
                out[target] = response.status_code
            except httpx.HTTPError as err:
                out[target] = f"{type(err).__name__}: {err}"
    return out


def raw_status(port: int, ca: Path, head: bytes, body: bytes = b"") -> int:
    """Send a hand-written request over TLS and return the status of the answer."""
    context = ssl.create_default_context(cafile=str(ca))
    with socket.create_connection(("127.0.0.1", port), timeout=15) as sock, \
            context.wrap_socket(sock, server_hostname="127.0.0.1") as tls:
        tls.sendall(head + body)
        data = b""
        while b"\r\n" not in data:
            chunk = tls.recv(4096)
            if not chunk:
                break
            data += chunk
    return int(data.split(b" ", 2)[1])


def oversized_requests(port: int) -> dict[str, bytes]:
    """Requests whose body the front door must refuse without reading (a few KiB of it follow the head)."""
    host = f"Host: 127.0.0.1:{port}\r\nContent-Type: application/protobuf\r\n".encode()
    return {
        "400 MiB push-object": b"POST /v1/fleet/push-object HTTP/1.1\r\n" + host + b"Content-Length: 419430400\r\n\r\n",
        "1 MiB activate-node": b"POST /v1/fleet/activate-node HTTP/1.1\r\n" + host + b"Content-Length: 1048576\r\n\r\n",
        "chunked push-object": b"POST /v1/fleet/push-object HTTP/1.1\r\n" + host
                               + b"Transfer-Encoding: chunked\r\n\r\n4000\r\n",
    }


@pytest.fixture(scope="module")
def real_door(tmp_path_factory):
    """The real FrontDoor (uvicorn, TLS) on loopback, in front of the recording stand-in."""
    from fedmem.server.certificates import ensure_certificates
    from fedmem.server.superlink import free_port

    certs = ensure_certificates(tmp_path_factory.mktemp("certs"), ["127.0.0.1"])
    upstream, owner = Upstream(echo=False), Owner()
    port = free_port()
    front = FrontDoor("127.0.0.1", port, 1, certs, owner.admits, Limits(max_body=1 << 20),
                      transport=httpx.ASGITransport(app=upstream))
    front.start()
    try:
        yield {"port": port, "ca": certs.ca_cert, "upstream": upstream, "owner": owner}
    finally:
        front.stop()


def test_real_front_door_refuses_every_path_trick(real_door):
    upstream = real_door["upstream"]
    before = upstream.started
    answers = send_tricks(real_door["port"], real_door["ca"], body=b"\x0a\x01x")
    assert all(isinstance(s, int) and 400 <= s < 500 for s in answers.values()), answers
    assert upstream.started == before


def test_real_front_door_refuses_oversized_bodies_unread(real_door):
    upstream = real_door["upstream"]
    before = upstream.started
    for what, head in oversized_requests(real_door["port"]).items():
        status = raw_status(real_door["port"], real_door["ca"], head, b"\0" * 16384)
        assert status in (411, 413), what
    assert upstream.started == before


def test_flowers_own_client_gets_through_for_every_call_it_makes(real_door):
    """Flower's Fleet client, as the SuperNode uses it, through the real front door: every call a
    SuperNode with a key makes arrives unchanged; the two it never makes are refused."""
    from flwr.proto.fab_pb2 import GetFabRequest
    from flwr.proto.fleet_pb2 import (
        ActivateNodeRequest,
        DeactivateNodeRequest,
        PullMessagesRequest,
        PushMessagesRequest,
        RegisterNodeFleetRequest,
        UnregisterNodeFleetRequest,
    )
    from flwr.proto.heartbeat_pb2 import SendNodeHeartbeatRequest
    from flwr.proto.message_pb2 import ConfirmMessageReceivedRequest, PullObjectRequest, PushObjectRequest
    from flwr.proto.node_pb2 import Node
    from flwr.proto.run_pb2 import GetRunRequest
    from flwr.supercore.interceptors.http import RuntimeVersionHttpInterceptor
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes
    from flwr.supernode.fleet_http_client import FleetHttpClient
    from flwr.supernode.node_auth_http_interceptor import NodeAuthHttpInterceptor

    upstream, owner = real_door["upstream"], real_door["owner"]
    node = Node(node_id=7)
    calls = {
        "ActivateNode": ActivateNodeRequest(public_key=public_key_to_bytes(owner.public_key), heartbeat_interval=30),
        "SendNodeHeartbeat": SendNodeHeartbeatRequest(node=node, heartbeat_interval=30),
        "PullMessages": PullMessagesRequest(node=node),
        "PushMessages": PushMessagesRequest(node=node),
        "GetRun": GetRunRequest(node=node, run_id=1),
        "GetFab": GetFabRequest(node=node, hash_str="ab", run_id=1),
        "PushObject": PushObjectRequest(node=node, run_id=1, object_id="cd", object_content=os.urandom(300_000)),
        "PullObject": PullObjectRequest(node=node, run_id=1, object_id="cd"),
        "ConfirmMessageReceived": ConfirmMessageReceivedRequest(node=node, run_id=1, message_object_id="ef"),
        "DeactivateNode": DeactivateNodeRequest(node_id=7),
    }
    with FleetHttpClient.from_server_address(
            f"127.0.0.1:{real_door['port']}", False, str(real_door["ca"]),
            interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperNode"),
                          NodeAuthHttpInterceptor(owner.private_key, owner.public_key)]) as client:
        before = len(upstream.seen)
        for name, request in calls.items():
            getattr(client, name)(request)
        arrived = upstream.seen[before:]
        assert len(arrived) == len(calls)
        for seen, request in zip(arrived, calls.values()):
            assert seen.body == request.SerializeToString(deterministic=True)
        assert {s.raw_path for s in arrived} == set(FLEET_CALLS)
        for name, request in {"RegisterNode": RegisterNodeFleetRequest(public_key=b"k"),
                              "UnregisterNode": UnregisterNodeFleetRequest(node_id=7)}.items():
            with pytest.raises(httpx.HTTPStatusError) as refused:
                getattr(client, name)(request)
            assert refused.value.response.status_code == 404
        assert len(upstream.seen) == before + len(calls)


def test_a_large_call_is_one_of_the_two_that_carry_data():
    assert {p for p, size in FLEET_CALLS.items() if size == LARGE} == {b"/v1/fleet/push-messages",
                                                                       b"/v1/fleet/push-object"}

"""The OpenAI-compatible HTTP API, on FastAPI: what any OpenAI client library can talk to.

Routes: ``POST /v1/chat/completions`` (plain and streamed as server-sent events),
``GET /v1/models`` (the memory with its version, and the base model), ``GET /health``.
The model named ``ServeOptions.memory_name`` ("fedmem") answers with the memory, the base
model's name without it, so one server gives the side-by-side. The memory's replies are gated
as ``fedmem ask``'s are (``ServeOptions.gate``; ``fedmem.memory_gate``): where the memory does
not make its reply likely, the base model answers, and the reply says so (``system_fingerprint``
names the weights that answered; ``fedmem_gate`` gives the decision and its ratio).

Requests are hostile until checked: bodies are capped in bytes before they are parsed
(``BodyLimit``), fields are validated by pydantic models with bounds, prompts are capped in
tokens, and an optional API key is compared in constant time. Errors use OpenAI's
``{"error": {...}}`` shape with the offending field named.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from .batcher import Batcher, Job, PromptError, Sink, encode_chat
from .engines import Engine, EngineSlot

log = logging.getLogger(__name__)


@dataclass
class ServeOptions:
    memory_name: str = "fedmem"
    base_name: str | None = None  # None: the base model directory's name
    max_tokens_default: int = 256
    max_tokens_limit: int = 1024
    max_prompt_tokens: int = 2048
    max_body_bytes: int = 1 << 20
    api_key: str | None = None
    gate: bool = True  # the memory's replies through the memory gate, as `fedmem ask` answers


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")  # "name", "tool_calls"...: accepted, not used
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def as_template_input(self) -> dict:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        # "developer" is OpenAI's newer name for the system role; chat templates know "system".
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


def _last_question(messages: list[ChatMessage]) -> str:
    """The last user message's text: what a routed memory routes a request by (``fedmem.routing``)."""
    for message in reversed(messages):
        if message.role == "user":
            return message.as_template_input()["content"]
    return ""


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # clients send "user", "seed", "logprobs"... harmlessly
    model: str
    messages: list[ChatMessage] = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    # Greedy unless asked otherwise (OpenAI's default is 1.0): a memory's answers should be repeatable.
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict | None = None


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.kind, "param": self.param,
                                       "code": self.code}}, status_code=self.status)


class BodyLimit:
    """ASGI middleware: refuse a request body larger than ``limit`` bytes (413) whether or not it
    declares a Content-Length, before anything reads or parses it."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        too_large = APIError(413, f"request body over {self.limit} bytes", code="request_too_large").response()
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            return await too_large(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                chunks.append(message)
                break
            size += len(message.get("body", b""))
            if size > self.limit:
                return await too_large(scope, receive, send)
            chunks.append(message)
            more = message.get("more_body", False)
        replay = iter(chunks)

        async def replayed():
            try:
                return next(replay)
            except StopIteration:
                return await receive()

        return await self.app(scope, replayed, send)


class KeyGate:
    """ASGI middleware: with an API key set, every ``/v1`` request needs ``Authorization: Bearer
    <key>`` (compared in constant time), checked before its body is read or parsed (401)."""

    def __init__(self, app, key: str | None):
        self.app, self.key = app, key

    def allowed(self, headers) -> bool:
        if self.key is None:
            return True
        given = dict(headers or []).get(b"authorization", b"")
        return hmac.compare_digest(given, f"Bearer {self.key}".encode())

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1") and not self.allowed(scope.get("headers")):
            refusal = APIError(401, "missing or wrong API key (Authorization: Bearer ...)",
                               kind="authentication_error", code="invalid_api_key").response()
            return await refusal(scope, receive, send)
        return await self.app(scope, receive, send)


class QueueSink(Sink):
    """A request's reply as events on an asyncio queue of the server's event loop (the batcher
    calls these on that loop's thread: ``fedmem.serving.batcher.deliver``)."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.cancelled = False

    def on_start(self, fingerprint: str, gate: dict | None) -> None:
        self.queue.put_nowait(("start", fingerprint, gate))

    def on_text(self, text: str) -> None:
        self.queue.put_nowait(("text", text))

    def on_finish(self, reason: str, completion_tokens: int) -> None:
        self.queue.put_nowait(("finish", reason, completion_tokens))

    def on_error(self, message: str) -> None:
        self.queue.put_nowait(("error", message))


def make_app(batcher: Batcher, base: Engine, memory: EngineSlot, options: ServeOptions,
             follow_status=None) -> FastAPI:
    """The HTTP application over a running batcher. ``follow_status``: a callable giving the
    live-update state for /health (``fedmem.serving.follow.MemoryFollower.status``)."""
    app = FastAPI(title="fedmem serve", docs_url=None, redoc_url=None)
    app.add_middleware(BodyLimit, limit=options.max_body_bytes)
    app.add_middleware(KeyGate, key=options.api_key)  # added last: runs first, before the body is read
    gate = KeyGate(None, options.api_key)
    app.state.base_engine, app.state.memory_slot = base, memory  # for operators' hooks and the tests

    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError):
        return err.response()

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, err: RequestValidationError):
        first = err.errors()[0] if err.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        message = f"{where or 'body'}: {first.get('msg', 'invalid request')}"
        return APIError(400, message, param=where or None).response()

    def engine_for(name: str) -> Engine:
        if name == options.memory_name:
            engine = memory.get()
            if engine is None:
                raise APIError(503, f"no memory loaded yet; {options.base_name!r} answers without it",
                               kind="server_error", code="memory_not_ready")
            return engine
        if name == options.base_name:
            return base
        raise APIError(404, f"model {name!r} does not exist; this server has {options.memory_name!r} (with the "
                       f"memory) and {options.base_name!r} (without it)", param="model", code="model_not_found")

    def model_card(name: str, engine: Engine | None) -> dict:
        card = {"id": name, "object": "model", "owned_by": "fedmem",
                "created": (engine.version.get("loaded_at") if engine and engine.version else None) or started}
        if name == options.memory_name:
            card["fedmem_version"] = ({k: engine.version[k] for k in ("round", "sha256", "source", "signed_by",
                                                                       "loaded_at")} if engine else None)
            card["fedmem_gate"] = options.gate
        return card

    started = int(time.time())

    @app.get("/health")
    async def health(request: Request):
        engine = memory.get()
        state = {"status": "ok", "memory_loaded": engine is not None}
        if not gate.allowed(request.scope.get("headers")):
            return state  # liveness for anyone; which version, paths and errors only with the key
        return {**state, "memory_version": engine.fingerprint if engine else None,
                "follow": follow_status() if follow_status else None,
                "queued": batcher.pending(), "batches": batcher.batches, "rows": batcher.rows}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card(options.memory_name, memory.get()),
                                           model_card(options.base_name, base)]}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest):
        engine = engine_for(body.model)  # the version is fixed here: a swap later does not touch this reply
        max_tokens = (body.max_completion_tokens or body.max_tokens
                      or min(options.max_tokens_default, options.max_tokens_limit))
        if max_tokens > options.max_tokens_limit:
            raise APIError(400, f"max_tokens: at most {options.max_tokens_limit} on this server", param="max_tokens")
        stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        if len(stop) > 4 or any(not s or len(s) > 256 for s in stop):
            raise APIError(400, "stop: up to 4 non-empty strings of at most 256 characters", param="stop")
        try:
            prompt = await asyncio.to_thread(encode_chat, engine, [m.as_template_input() for m in body.messages],
                                             options.max_prompt_tokens)
        except PromptError as err:
            raise APIError(400, str(err), param="messages") from None
        context = getattr(engine.model.config, "max_position_embeddings", None)
        if context and len(prompt) + max_tokens > context:
            raise APIError(400, f"messages: a {len(prompt)}-token prompt and max_tokens {max_tokens} exceed the "
                           f"model's context of {context} tokens", param="messages")
        sink = QueueSink(asyncio.get_running_loop())
        gated = options.gate and engine is not base
        try:
            batcher.submit(Job(engine, prompt, max_tokens, sink, body.temperature, body.top_p, stop,
                               fallback=base if gated else None, question=_last_question(body.messages)))
        except RuntimeError as err:
            raise APIError(503, str(err), kind="server_error") from None
        try:  # which weights answer is known once generation starts: the reply's head names them
            begun = await sink.queue.get()
        except BaseException:
            sink.cancelled = True
            raise
        if begun[0] == "error":
            raise APIError(500, begun[1], kind="server_error")
        reply_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        head = {"id": reply_id, "created": created, "model": body.model, "system_fingerprint": begun[1]}
        if begun[2] is not None:
            head["fedmem_gate"] = begun[2]

        def usage(completion_tokens: int) -> dict:
            return {"prompt_tokens": len(prompt), "completion_tokens": completion_tokens,
                    "total_tokens": len(prompt) + completion_tokens}

        if not body.stream:
            pieces = []
            try:
                while True:
                    event = await sink.queue.get()
                    if event[0] == "text":
                        pieces.append(event[1])
                    elif event[0] == "error":
                        raise APIError(500, event[1], kind="server_error")
                    else:
                        break
            finally:
                sink.cancelled = True  # the client went away (or we are done): its row stops
            return {**head, "object": "chat.completion",
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(pieces)},
                                 "finish_reason": event[1], "logprobs": None}],
                    "usage": usage(event[2])}

        include_usage = bool((body.stream_options or {}).get("include_usage"))

        def chunk(delta: dict, finish: str | None = None) -> str:
            data = {**head, "object": "chat.completion.chunk",
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}
            return f"data: {json.dumps(data)}\n\n"

        async def events():
            try:
                yield chunk({"role": "assistant", "content": ""})
                while True:
                    event = await sink.queue.get()
                    if event[0] == "text":
                        yield chunk({"content": event[1]})
                    elif event[0] == "error":
                        error = {"error": {"message": event[1], "type": "server_error"}}
                        yield f"data: {json.dumps(error)}\n\n"
                        return
                    else:
                        yield chunk({}, event[1])
                        if include_usage:
                            last = {**head, "object": "chat.completion.chunk", "choices": [], "usage": usage(event[2])}
                            yield f"data: {json.dumps(last)}\n\n"
                        yield "data: [DONE]\n\n"
                        return
            finally:
                sink.cancelled = True

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app

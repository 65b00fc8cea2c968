"""``fedmem serve``: the OpenAI-compatible endpoint over real HTTP on loopback, with the openai
client; batching, streaming, live version swaps under load, and refusals of bad requests."""

from __future__ import annotations

import json
import math
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import uvicorn
from conftest import write_random_memory, write_routed_memory

from fedmem.answer import generate_answers
from fedmem.base_model import load_tokenizer
from fedmem.memory import sha256_file
from fedmem.serving.batcher import Batcher, Job, RowFollower, Sink, _sendable
from fedmem.serving.engines import Engine
from fedmem.serving.openai_api import ServeOptions
from fedmem.serving.run import ServePlan, build

QUESTION = "Who keeps the harbour lamp lit?"
MAX_TOKENS = 12


class Server:
    """``fedmem serve``'s app under a real uvicorn on a free loopback port, in this process."""

    def __init__(self, plan: ServePlan, options: ServeOptions | None = None):
        self.options = options or ServeOptions()
        self.app, self.batcher, self.follower = build(plan, self.options, trust=None)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_config=None, lifespan="off", ws="none"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)

    def __enter__(self) -> Server:
        self.batcher.start()
        if self.follower is not None:
            self.follower.start()
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        if self.follower is not None:
            self.follower.stop()
        self.batcher.stop()

    def client(self, **kwargs) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=kwargs.pop("api_key", "unused"), max_retries=0,
                             **kwargs)


def ask(client: openai.OpenAI, model: str, question: str = QUESTION, **kwargs):
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                          max_tokens=MAX_TOKENS, **kwargs)


def expected_reply(engine_model, tokenizer, question: str = QUESTION) -> str:
    """What ``fedmem ask`` says with these weights: the reference the endpoint must match."""
    return generate_answers(engine_model, tokenizer, [question], max_new_tokens=MAX_TOKENS)[0]


@pytest.fixture(scope="module")
def memories(tiny_base, tmp_path_factory):
    """Two versions of a memory for the tiny Llama, different enough to answer differently."""
    root = tmp_path_factory.mktemp("memories")
    write_random_memory(tiny_base, root / "v1", seed=1, scale=0.3, manifest={"round": 1})
    write_random_memory(tiny_base, root / "v2", seed=2, scale=0.3, manifest={"round": 2})
    return root


UNGATED = ServeOptions(gate=False)  # the memory answers every request: what these tests compare replies with


def test_chat_completions_answer_as_fedmem_ask_does(tiny_base, memories):
    with Server(ServePlan(memory=memories / "v1", base=str(tiny_base)), UNGATED) as server:
        client = server.client()
        models = {m.id: m for m in client.models.list().data}
        assert set(models) == {"fedmem", tiny_base.name}
        version = models["fedmem"].model_extra["fedmem_version"]
        assert version["round"] == 1
        assert version["sha256"] == sha256_file(memories / "v1" / "adapter_model.safetensors")

        reply = ask(client, "fedmem")
        base_reply = ask(client, tiny_base.name)
        memory_engine = server.app.state.memory_slot.get()
        tokenizer = load_tokenizer(str(tiny_base))
        assert reply.choices[0].message.content == expected_reply(memory_engine.model, tokenizer)
        assert base_reply.choices[0].message.content == expected_reply(server.app.state.base_engine.model, tokenizer)
        assert reply.choices[0].message.content != base_reply.choices[0].message.content
        assert reply.system_fingerprint.startswith("fedmem-r1-")
        assert reply.usage.completion_tokens <= MAX_TOKENS and reply.usage.prompt_tokens > 5
        assert reply.choices[0].finish_reason in ("stop", "length")

        # Streamed: the same text, in pieces, ending with a finish reason and the usage.
        stream = client.chat.completions.create(model="fedmem", messages=[{"role": "user", "content": QUESTION}],
                                                max_tokens=MAX_TOKENS, stream=True,
                                                stream_options={"include_usage": True})
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == reply.choices[0].message.content
        assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 1
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == reply.choices[0].finish_reason
        assert chunks[-1].usage.completion_tokens == reply.usage.completion_tokens


GATE_QUESTIONS = [QUESTION, "What is the capital of France?", "How many days are in a week?",
                  "Who painted the Zorvex Tower teal?", "When does the Quill Lantern burn?", "Why?"]


def test_gated_replies_are_fedmem_asks_and_name_the_weights_that_answered(tiny_base, memories, monkeypatch):
    """The gate decides per request as `fedmem ask` does (the same ratio from the merged engine and
    the base engine as from the PEFT model with its adapter on and off), and a batch whose requests
    the gate splits is answered by both engines, each reply wholly by the one it names."""
    from fedmem import memory_gate
    from fedmem.answer import load_memory
    from fedmem.examples import chat_prompt
    from fedmem.serving import batcher

    loaded = load_memory(memories / "v1", str(tiny_base))
    tokenizer = loaded.tokenizer
    prompts = [chat_prompt(tokenizer, q) for q in GATE_QUESTIONS]
    memory_replies = generate_answers(loaded.model, tokenizer, GATE_QUESTIONS, max_new_tokens=MAX_TOKENS)
    ratios = memory_gate.reply_log_ratios(loaded.model, tokenizer, prompts, memory_replies)
    with loaded.model.disable_adapter():
        base_replies = generate_answers(loaded.model, tokenizer, GATE_QUESTIONS, max_new_tokens=MAX_TOKENS)
    assert memory_replies != base_replies
    # A threshold between the questions' ratios, so that one batch holds requests of both kinds.
    threshold = sorted(ratios)[len(ratios) // 2] - 1e-3
    monkeypatch.setattr(batcher, "GATE_THRESHOLD", threshold)
    keep = memory_gate.from_memory(ratios, threshold)
    assert 0 < sum(keep) < len(keep), ratios

    with Server(ServePlan(memory=memories / "v1", base=str(tiny_base), batch_wait_s=0.3)) as server:
        client = server.client()
        assert client.models.list().data[0].model_extra["fedmem_gate"] is True
        with ThreadPoolExecutor(len(GATE_QUESTIONS)) as pool:
            replies = list(pool.map(lambda q: ask(client, "fedmem", q), GATE_QUESTIONS))
        memory_fp = server.app.state.memory_slot.get().fingerprint
        base_fp = server.app.state.base_engine.fingerprint
        assert server.batcher.batches < 2 * len(GATE_QUESTIONS)  # batched, then split by the gate
        streamed = client.chat.completions.create(model="fedmem", max_tokens=MAX_TOKENS, stream=True,
                                                  messages=[{"role": "user", "content": GATE_QUESTIONS[1]}])
        chunks = list(streamed)

    for reply, ratio, kept, from_memory, from_base in zip(replies, ratios, keep, memory_replies, base_replies):
        gate = reply.model_extra["fedmem_gate"]
        assert gate["ratio"] == pytest.approx(ratio, abs=1e-3)
        assert gate["answered_by"] == ("memory" if kept else "base")
        assert reply.system_fingerprint == (memory_fp if kept else base_fp)
        assert reply.choices[0].message.content == (from_memory if kept else from_base)
    assert {c.system_fingerprint for c in chunks} == {replies[1].system_fingerprint}
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == replies[1].choices[0].message.content


def test_a_kept_request_goes_on_from_the_gates_tokens_with_the_reply_it_would_have_had(tiny_base, memories,
                                                                                      monkeypatch):
    """A greedy request the gate keeps continues from the memory's first tokens the gate already
    generated (from that ``generate``'s cache) instead of generating them again: each reply, and the
    way it ends, is the memory's ungated one, whether it ends within those tokens (3 and 8 of them)
    or after (12, 20); and so when a batch mixes it with an ungated request to the same weights,
    where the continuation re-reads the prompts instead."""
    from fedmem.serving import batcher as batcher_module
    from fedmem.serving.batcher import encode_chat
    from fedmem.serving.engines import load_base_engine, load_memory_engine

    monkeypatch.setattr(batcher_module, "GATE_THRESHOLD", -math.inf)  # the memory keeps every request
    memory = load_memory_engine("fedmem", memories / "v1", str(tiny_base), "cpu", None)
    base = load_base_engine("tiny", str(tiny_base), "cpu")
    prompts = [encode_chat(memory, [{"role": "user", "content": q}], 512) for q in GATE_QUESTIONS[:4]]
    lengths = [3, 8, 12, 20]
    calls = []
    generate = memory.model.generate

    def recording(*args, **kwargs):
        calls.append("cache" in kwargs)
        return generate(*args, **kwargs)

    monkeypatch.setattr(memory.model, "generate", recording)

    def replies(jobs):
        batcher = Batcher(max_batch=8, wait_s=0.3).start()
        try:
            for job in jobs:
                batcher.submit(job)
            deadline = time.monotonic() + 60
            while not all(j.sink.finished or j.sink.errors for j in jobs):
                assert time.monotonic() < deadline
                time.sleep(0.01)
        finally:
            batcher.stop()
        return [("".join(j.sink.pieces), j.sink.finished, j.sink.errors) for j in jobs]

    ungated = replies([Job(memory, p, n, Collect()) for p, n in zip(prompts, lengths)])
    assert not any(calls) and len({text for text, _, _ in ungated}) > 1
    calls.clear()
    assert replies([Job(memory, p, n, Collect(), fallback=base) for p, n in zip(prompts, lengths)]) == ungated
    assert calls == [False, True]  # the gate's generate, then the continuation from its cache
    calls.clear()
    mixed = replies([Job(memory, prompts[3], 20, Collect(), fallback=base), Job(memory, prompts[2], 12, Collect())])
    assert mixed == [ungated[3], ungated[2]] and calls == [False, False]


def test_a_routed_memory_answers_each_request_with_its_owners_lora_as_fedmem_ask_does(tiny_base, tmp_path,
                                                                                       monkeypatch):
    """A routed memory is served unmerged: each request goes to the owner's LoRA its question is routed
    to, requests routed to different owners share a batch (PEFT's mixed-adapter rows), and each reply,
    gated or not, is the one `fedmem ask` gives, naming the owner it was routed to."""
    from fedmem.answer import load_memory
    from fedmem.examples import chat_prompt
    from fedmem.memory_gate import from_memory, gated_answers
    from fedmem.serving import batcher

    write_routed_memory(tiny_base, tmp_path / "routed", {"ada": 3, "bo": 4}, scale=0.3, manifest={"round": 1})
    loaded = load_memory(tmp_path / "routed", str(tiny_base))
    router, tokenizer = loaded.router, loaded.tokenizer
    routes = router.routes(GATE_QUESTIONS)
    assert set(routes) == {0, 1}, routes  # both owners' LoRAs answer some of the questions
    prompts = [chat_prompt(tokenizer, q) for q in GATE_QUESTIONS]
    ungated = router.each(routes, GATE_QUESTIONS,
                          lambda qs: generate_answers(loaded.model, tokenizer, qs, max_new_tokens=MAX_TOKENS))
    ratios = gated_answers(loaded.model, tokenizer, prompts, MAX_TOKENS, router=router, routes=routes).ratios
    threshold = sorted(ratios)[len(ratios) // 2] - 1e-3  # some requests kept, some given to the base model
    monkeypatch.setattr(batcher, "GATE_THRESHOLD", threshold)
    gated = gated_answers(loaded.model, tokenizer, prompts, MAX_TOKENS, threshold, router=router, routes=routes)
    assert 0 < sum(from_memory(ratios, threshold)) < len(ratios)

    for options in (UNGATED, ServeOptions()):
        with Server(ServePlan(memory=tmp_path / "routed", base=str(tiny_base), batch_wait_s=0.3), options) as server:
            client = server.client()
            with ThreadPoolExecutor(len(GATE_QUESTIONS)) as pool:
                replies = list(pool.map(lambda q: ask(client, "fedmem", q), GATE_QUESTIONS))
            assert server.batcher.batches < 2 * len(GATE_QUESTIONS)
            assert server.app.state.memory_slot.get().version["owners"] == ["ada", "bo"]
        expected = ungated if options is UNGATED else gated.replies
        assert [r.choices[0].message.content for r in replies] == expected
        if options is not UNGATED:
            for reply, route, kept in zip(replies, routes, gated.from_memory):
                gate = reply.model_extra["fedmem_gate"]
                assert gate["routed_to"] == ["ada", "bo"][route]
                assert gate["answered_by"] == ("memory" if kept else "base")


def test_a_memory_that_changes_nothing_never_answers_through_the_gate(tiny_base, tmp_path):
    write_random_memory(tiny_base, tmp_path / "zero", scale=0.0)
    with Server(ServePlan(memory=tmp_path / "zero", base=str(tiny_base))) as server:
        reply = ask(server.client(), "fedmem")
        assert reply.model_extra["fedmem_gate"] == {"answered_by": "base", "ratio": 0.0}
        assert reply.system_fingerprint == server.app.state.base_engine.fingerprint
        ungated = ask(server.client(), tiny_base.name)
        assert "fedmem_gate" not in ungated.model_extra  # the base model's own name: no gate to pass
        assert reply.choices[0].message.content == ungated.choices[0].message.content


def test_concurrent_requests_are_batched(tiny_base, memories):
    with Server(ServePlan(memory=memories / "v1", base=str(tiny_base), batch_wait_s=0.2), UNGATED) as server:
        client = server.client()
        with ThreadPoolExecutor(8) as pool:
            replies = list(pool.map(lambda _: ask(client, "fedmem").choices[0].message.content, range(8)))
        assert len(set(replies)) == 1  # the same question, greedy: the same answer in every row
        assert server.batcher.rows == 8 and server.batcher.batches < 8


def test_follow_swaps_versions_under_load_without_losing_or_mixing(tiny_base, memories, tmp_path):
    live = tmp_path / "memory"
    write_random_memory(tiny_base, live, seed=1, scale=0.3, manifest={"round": 1})
    with Server(ServePlan(follow=live, base=str(tiny_base), poll_interval_s=0.1), UNGATED) as server:
        client = server.client()
        tokenizer = load_tokenizer(str(tiny_base))
        expected = {server.app.state.memory_slot.get().fingerprint:
                    expected_reply(server.app.state.memory_slot.get().model, tokenizer)}
        results, errors, stop = [], [], threading.Event()

        def keep_asking():
            while not stop.is_set():
                try:
                    r = ask(client, "fedmem")
                    results.append((r.system_fingerprint, r.choices[0].message.content))
                except Exception as err:  # noqa: BLE001 - every failure is what the test counts
                    errors.append(err)

        workers = [threading.Thread(target=keep_asking) for _ in range(4)]
        for w in workers:
            w.start()
        time.sleep(0.5)
        swapped_at = time.monotonic()
        write_random_memory(tiny_base, live, seed=2, scale=0.3, manifest={"round": 2})  # replaced whole
        new_sha = sha256_file(live / "adapter_model.safetensors")
        while True:
            version = client.models.list().data[0].model_extra["fedmem_version"]
            if version["sha256"] == new_sha:
                break
            assert time.monotonic() - swapped_at < 20, "the new version was not picked up"
            time.sleep(0.05)
        picked_up = time.monotonic() - swapped_at
        time.sleep(0.5)
        stop.set()
        for w in workers:
            w.join()
        new_engine = server.app.state.memory_slot.get()
        expected[new_engine.fingerprint] = expected_reply(new_engine.model, tokenizer)

    assert not errors
    assert len(set(expected.values())) == 2
    seen = {fp for fp, _ in results}
    assert seen == set(expected), seen
    for fp, text in results:
        assert text == expected[fp]  # each reply wholly from the version it names
    assert picked_up < 10


def test_follow_keeps_serving_through_a_broken_version(tiny_base, memories, tmp_path):
    live = tmp_path / "memory"
    with Server(ServePlan(follow=live, base=str(tiny_base), poll_interval_s=0.05), UNGATED) as server:
        client = server.client()
        with pytest.raises(openai.APIStatusError) as err:
            ask(client, "fedmem")
        assert err.value.status_code == 503 and "no memory loaded yet" in err.value.message
        assert ask(client, tiny_base.name).choices[0].message.content  # the base model answers meanwhile

        write_random_memory(tiny_base, live, seed=1, scale=0.3, manifest={"round": 1})
        deadline = time.monotonic() + 20
        while server.app.state.memory_slot.get() is None:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        first = server.app.state.memory_slot.get().fingerprint

        weights = live / "adapter_model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-100] + b"\0" * 100)  # corrupted in place
        deadline = time.monotonic() + 20
        while not server.follower.last_error:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert "checksum" in server.follower.last_error
        assert ask(client, "fedmem").system_fingerprint == first
        health = httpx.get(server.url + "/health").json()
        assert health["memory_version"] == first and "checksum" in health["follow"]["last_error"]


def test_bad_requests_are_refused_with_openai_errors(tiny_base, memories):
    options = ServeOptions(max_tokens_limit=64, max_prompt_tokens=64, max_body_bytes=4096, api_key="s3cret")
    with Server(ServePlan(memory=memories / "v1", base=str(tiny_base)), options) as server:
        with pytest.raises(openai.AuthenticationError):
            ask(server.client(api_key="wrong"), "fedmem")
        with pytest.raises(openai.AuthenticationError):
            server.client(api_key="wrong").models.list()
        # Without the key, a body is not even read: 401, not a validation error or a 413.
        r = httpx.post(server.url + "/v1/chat/completions", content=b"{not json" + b"x" * 10000,
                       headers={"Content-Type": "application/json"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        # /health tells anyone it is alive, and only a key holder which version it serves.
        assert httpx.get(server.url + "/health").json() == {"status": "ok", "memory_loaded": True}
        health = httpx.get(server.url + "/health", headers={"Authorization": "Bearer s3cret"}).json()
        assert health["memory_version"].startswith("fedmem-r1-")
        client = server.client(api_key="s3cret")
        assert ask(client, "fedmem").choices[0].message.content

        def refused(status: int, **body) -> dict:
            payload = {"model": "fedmem", "messages": [{"role": "user", "content": "hi"}], **body}
            r = httpx.post(server.url + "/v1/chat/completions", json=payload,
                           headers={"Authorization": "Bearer s3cret"})
            assert r.status_code == status, r.text
            return r.json()["error"]

        assert "does not exist" in refused(404, model="gpt-4")["message"]
        assert refused(400, max_tokens=65)["param"] == "max_tokens"
        assert "messages" in refused(400, messages=[{"role": "wizard", "content": "hi"}])["message"]
        assert "messages" in refused(400, messages=[])["message"]
        assert "n" in refused(400, n=2)["message"]
        assert "temperature" in refused(400, temperature=-1)["message"]
        assert refused(400, messages=[{"role": "user", "content": "word " * 60}])["param"] == "messages"
        assert refused(400, stop=["a", "b", "c", "d", "e"])["param"] == "stop"
        assert refused(413, messages=[{"role": "user", "content": "x" * 5000}])["code"] == "request_too_large"
        # The same, without a Content-Length: a chunked body is counted as it arrives.
        body = json.dumps({"model": "fedmem", "messages": [{"role": "user", "content": "x" * 5000}]}).encode()
        r = httpx.post(server.url + "/v1/chat/completions", content=iter([body[:2000], body[2000:]]),
                       headers={"Authorization": "Bearer s3cret", "Content-Type": "application/json"})
        assert r.status_code == 413
        r = httpx.post(server.url + "/v1/chat/completions", content=b"{not json",
                       headers={"Authorization": "Bearer s3cret", "Content-Type": "application/json"})
        assert r.status_code == 400
        assert ask(client, "fedmem").choices[0].message.content  # still serving


def test_a_client_that_goes_away_mid_stream_frees_its_row(tiny_base, memories):
    with Server(ServePlan(memory=memories / "v1", base=str(tiny_base))) as server:
        payload = {"model": "fedmem", "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 500,
                   "stream": True}
        with httpx.stream("POST", server.url + "/v1/chat/completions", json=payload) as r:
            for line in r.iter_lines():
                if '"content": "' in line and '"content": ""' not in line:
                    break  # hang up after the first piece of text
        started = time.monotonic()
        assert ask(server.client(), "fedmem").choices[0].message.content
        assert time.monotonic() - started < 30


# --- The row follower on its own: stop strings, held-back text, end of turn -----------------


class Collect(Sink):
    def __init__(self):
        self.pieces, self.finished, self.errors = [], None, []

    def on_text(self, text):
        self.pieces.append(text)

    def on_finish(self, reason, completion_tokens):
        self.finished = (reason, completion_tokens)

    def on_error(self, message):
        self.errors.append(message)


def follow_tokens(tokenizer, text: str, stop=(), max_tokens=100, then: list[int] = ()) -> Collect:
    import torch

    engine = Engine("t", model=None, tokenizer=tokenizer)
    sink = Collect()
    follower = RowFollower([Job(engine, [1], max_tokens, sink, stop=tuple(stop))],
                           stop_ids=[tokenizer.convert_tokens_to_ids("<|im_end|>")], end_of_turn="<|im_end|>")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] + list(then)
    for token in ids:
        if follower.done[0]:
            break
        follower(torch.tensor([[token]]), None)
    follower.close()
    return sink


def test_row_follower_streams_and_stops_where_it_should(real_base_dir):
    tok = load_tokenizer(str(real_base_dir))
    end = tok.convert_tokens_to_ids("<|im_end|>")
    sink = follow_tokens(tok, "  The lamp is kept by Ada Brill.  ", then=[end])
    assert "".join(sink.pieces) == "The lamp is kept by Ada Brill." and sink.finished[0] == "stop"
    assert len(sink.pieces) > 3  # streamed, not all at once

    sink = follow_tokens(tok, "Ada Brill. Question: who else?", stop=["Question:"])
    assert "".join(sink.pieces) == "Ada Brill." and sink.finished[0] == "stop"
    assert not any("Quest" in p for p in sink.pieces)  # a stop string's beginning is never sent

    sink = follow_tokens(tok, "one two three four five six", max_tokens=3)
    assert sink.finished == ("length", 3) and "".join(sink.pieces) == "one two three"


@pytest.mark.parametrize("text,stops,sendable", [("abc Que", ("Question",), 3), ("abc  ", (), 3),
                                                 ("abc", ("x",), 3), ("ab\ufffd", (), 2), ("a Q b", ("Q:",), 5)])
def test_sendable_text(text, stops, sendable):
    assert _sendable(text, stops) == sendable


def test_batcher_tells_every_request_when_generation_fails(tiny_base):
    from fedmem.serving.engines import load_base_engine

    engine = load_base_engine("tiny", str(tiny_base), "cpu")
    batcher = Batcher(max_batch=4, wait_s=0.05).start()
    try:
        sinks = [Collect() for _ in range(3)]
        for sink in sinks:  # a token id past the vocabulary: the model itself fails on it
            batcher.submit(Job(engine, [1, 10**9], 4, sink))
        deadline = time.monotonic() + 10
        while not all(s.errors for s in sinks):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        good = Collect()
        batcher.submit(Job(engine, [1, 2, 3], 4, good))  # and the worker carries on
        while good.finished is None:
            assert time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        batcher.stop()
    assert all("generation failed" in s.errors[0] for s in sinks)
    assert good.finished[1] == 4 or good.finished[0] == "stop"


def test_serve_and_export_command_lines(tmp_path, capsys):
    from fedmem.cli import build_parser, main

    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--memory", "a", "--follow", "b"])
    assert main(["export", "--memory", str(tmp_path)]) == 2
    assert "--merged OUT" in capsys.readouterr().err
    assert main(["serve", "--memory", str(tmp_path / "nothing")]) == 2
    assert "not a memory adapter" in capsys.readouterr().err


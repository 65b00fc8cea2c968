"""Batched generation for the server: one worker thread, many concurrent requests.

Requests that arrive close together (each within ``wait_s`` of the one before, ``max_wait_s``
at most) and can share a ``model.generate`` call (same engine, same sampling settings) are
run as one left-padded batch of up to ``max_batch`` rows. Each row's tokens are followed as
they are produced (a ``StoppingCriteria`` sees every step) and its text is streamed to its
request; a row ends at the chat template's end of turn, the model's eos, a stop string, its
own ``max_tokens`` or when its client goes away, and the batch ends when every row has. This
is static batching on ``generate``: a request that arrives while a batch runs waits for it
(transformers' continuous batching needs paged attention kernels that are not what a CPU run
uses).

``fedmem serve`` runs ``Batcher.run`` on the main thread, where the model was loaded:
``generate`` measured ~25% slower in any other thread (``fedmem.serving.run.serve``).

The fast tokenizer is not safe to use from two threads at once, so every use of it here and
in the HTTP handlers holds ``TOKENIZER_LOCK``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from ..answer import stop_token_ids
from ..examples import chat_turn
from .engines import Engine

log = logging.getLogger(__name__)

TOKENIZER_LOCK = threading.Lock()


class PromptError(ValueError):
    """A request's messages cannot become a prompt (template error, too long)."""


def encode_chat(engine: Engine, messages: list[dict], max_prompt_tokens: int) -> list[int]:
    """The prompt token ids for a conversation, through the model's own chat template (as
    ``fedmem ask`` renders a question), refused when longer than ``max_prompt_tokens``."""
    tokenizer = engine.tokenizer
    with TOKENIZER_LOCK:
        try:
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as err:  # a template raises what it likes (jinja errors, "roles must alternate")
            raise PromptError(f"messages: the model's chat template refused them ({err})") from None
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) > max_prompt_tokens:
        raise PromptError(f"messages: the prompt is {len(ids)} tokens; this server takes at most {max_prompt_tokens}")
    return ids


class Sink:
    """Where one request's reply goes. ``on_text`` gets each new piece of text, then exactly one
    of ``on_finish`` or ``on_error``; ``cancelled`` is polled every step. A sink with a ``loop``
    (an asyncio event loop) has its calls made on that loop's thread (``deliver``)."""

    cancelled = False
    loop = None

    def on_text(self, text: str) -> None: ...

    def on_finish(self, reason: str, completion_tokens: int) -> None: ...

    def on_error(self, message: str) -> None: ...


def deliver(calls: list[tuple[Sink, str, tuple]]) -> None:
    """Make sinks' calls (sink, method name, arguments): directly, or for sinks with an event loop
    in one callback on that loop per batch of calls: one wake-up of the HTTP thread per
    generation step rather than one per row, on a machine whose cores are busy with matmuls."""
    by_loop: dict[int, list] = {}
    for call in calls:
        loop = call[0].loop
        if loop is None:
            getattr(call[0], call[1])(*call[2])
        else:
            by_loop.setdefault(id(loop), [loop]).append(call)
    for loop, *group in by_loop.values():
        try:
            loop.call_soon_threadsafe(_make_calls, group)
        except RuntimeError:  # the loop is closed: the server is going away, nobody is listening
            pass


def _make_calls(calls: list[tuple[Sink, str, tuple]]) -> None:
    for sink, method, args in calls:
        getattr(sink, method)(*args)


@dataclass
class Job:
    engine: Engine
    prompt_ids: list[int]
    max_tokens: int
    sink: Sink
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    submitted: float = field(default_factory=time.monotonic)

    def batch_key(self) -> tuple:
        """Jobs with equal keys can share one ``generate`` call."""
        sampling = (0.0, 1.0) if self.temperature == 0 else (self.temperature, self.top_p)
        return (id(self.engine.model), *sampling)


def _sendable(text: str, stops: tuple[str, ...]) -> int:
    """How much of a row's text can be sent now: not a stop string's possible beginning (it may
    complete with the next token and must then not have been sent), nor an incomplete UTF-8
    character, nor trailing whitespace (the reply is stripped, as ``fedmem ask`` strips it)."""
    end = len(text)
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:k]):
                end = min(end, len(text) - k)
                break
    if text.endswith("\ufffd"):
        end = min(end, len(text) - 1)
    return len(text[:end].rstrip())


class RowFollower(StoppingCriteria):
    """Sees each step's new token for every row of a batch: streams each row's text to its job's
    sink and reports which rows are finished, so ``generate`` stops when all are."""

    def __init__(self, jobs: list[Job], stop_ids: list[int], end_of_turn: str):
        self.jobs = jobs
        self.stop_ids = set(stop_ids)
        self.stops = [tuple(s for s in ((end_of_turn,) if end_of_turn else ()) + job.stop if s) for job in jobs]
        self.tokens: list[list[int]] = [[] for _ in jobs]
        self.text = [""] * len(jobs)  # each row's reply so far, decoded
        self.sent = [0] * len(jobs)  # characters of each row's text already sent
        self.done = [False] * len(jobs)
        self.outbox: list[tuple[Sink, str, tuple]] = []  # this step's calls to the sinks, delivered together

    def _finish(self, row: int, reason: str) -> None:
        self.done[row] = True
        if reason != "cancelled":
            self.outbox.append((self.jobs[row].sink, "on_finish", (reason, len(self.tokens[row]))))

    def _send(self, row: int, text: str) -> None:
        if len(text) > self.sent[row]:
            self.outbox.append((self.jobs[row].sink, "on_text", (text[self.sent[row]:],)))
            self.sent[row] = len(text)

    def _deliver(self) -> None:
        calls, self.outbox = self.outbox, []
        deliver(calls)

    def _step(self, row: int, token: int, tokenizer) -> None:
        job = self.jobs[row]
        if job.sink.cancelled:
            self._finish(row, "cancelled")
            return
        if token in self.stop_ids:
            self._send(row, self.text[row].rstrip())  # what was held back was not a stop string after all
            self._finish(row, "stop")
            return
        self.tokens[row].append(token)
        with TOKENIZER_LOCK:
            text = self.text[row] = tokenizer.decode(self.tokens[row], skip_special_tokens=True).lstrip()
        cuts = [i for i in (text.find(s) for s in self.stops[row]) if i >= 0]
        if cuts:
            self._send(row, text[:min(cuts)].rstrip())
            self._finish(row, "stop")
        elif len(self.tokens[row]) >= job.max_tokens:
            self._send(row, text.rstrip())
            self._finish(row, "length")
        else:
            self._send(row, text[:_sendable(text, self.stops[row])])

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        tokenizer = self.jobs[0].engine.tokenizer
        for row, token in enumerate(input_ids[:, -1].tolist()):
            if not self.done[row]:
                self._step(row, token, tokenizer)
        self._deliver()
        return torch.tensor(self.done, dtype=torch.bool, device=input_ids.device)

    def close(self) -> None:
        """``generate`` ran out of new tokens: rows still open end by length, with what they held back."""
        for row, job in enumerate(self.jobs):
            if not self.done[row]:
                self._send(row, self.text[row].rstrip())
                self._finish(row, "cancelled" if job.sink.cancelled else "length")
        self._deliver()


class Batcher:
    """The generation worker. ``submit`` from any thread; replies arrive through each job's sink."""

    def __init__(self, max_batch: int = 16, wait_s: float = 0.01, max_wait_s: float | None = None):
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.max_batch = max_batch
        self.wait_s = wait_s
        self.max_wait_s = 10 * wait_s if max_wait_s is None else max_wait_s
        self._pending: deque[Job] = deque()
        self._cv = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self.run, name="fedmem-batcher", daemon=True)
        self.batches = 0  # counters for /health and the tests
        self.rows = 0

    def start(self) -> Batcher:
        """Run the worker in a thread of its own (tests, embedding); ``fedmem serve`` calls ``run``
        on the main thread instead."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop taking jobs; pending ones are told the server is shutting down. A batch that is
        generating finishes first."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)

    def submit(self, job: Job) -> None:
        with self._cv:
            if self._stopping:
                raise RuntimeError("the server is shutting down")
            self._pending.append(job)
            self._cv.notify_all()

    def pending(self) -> int:
        with self._cv:
            return len(self._pending)

    def _take(self) -> list[Job]:
        """The oldest job and up to max_batch - 1 others that can share its batch. Requests sent
        together do not arrive together (each has its connection, parsing and templating), so the
        batch keeps gathering while they keep coming: until ``wait_s`` passes with no newcomer,
        and at most ``max_wait_s`` in all."""
        with self._cv:
            while not self._pending and not self._stopping:
                self._cv.wait()
            if self._stopping:
                return []
            key = self._pending[0].batch_key()

            def compatible() -> int:
                return sum(j.batch_key() == key for j in self._pending)

            cap = time.monotonic() + self.max_wait_s
            seen, quiet_until = compatible(), time.monotonic() + self.wait_s
            while seen < self.max_batch and not self._stopping:
                left = min(quiet_until, cap) - time.monotonic()
                if left <= 0:
                    break
                self._cv.wait(left)
                if (now := compatible()) > seen:
                    seen, quiet_until = now, time.monotonic() + self.wait_s
            batch = [j for j in self._pending if j.batch_key() == key][:self.max_batch]
            taken = {id(j) for j in batch}
            self._pending = deque(j for j in self._pending if id(j) not in taken)
            return batch

    def run(self) -> None:
        """The worker loop, until ``stop``: take a batch, generate it, again."""
        while True:
            batch = self._take()
            if not batch:
                deliver([(job.sink, "on_error", ("the server is shutting down",)) for job in self._drain()])
                return
            live = [j for j in batch if not j.sink.cancelled]
            if not live:
                continue
            try:
                self._generate(live)
            except Exception as err:  # one bad batch must not take the server down; its requests hear why
                log.exception("generation failed for a batch of %d", len(live))
                message = f"generation failed: {type(err).__name__}: {err}"
                deliver([(job.sink, "on_error", (message,)) for job in live])

    def _drain(self) -> list[Job]:
        with self._cv:
            jobs, self._pending = list(self._pending), deque()
            return jobs

    @torch.inference_mode()
    def _generate(self, jobs: list[Job]) -> None:
        engine = jobs[0].engine
        model, tokenizer = engine.model, engine.tokenizer
        device = next(model.parameters()).device
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        width = max(len(j.prompt_ids) for j in jobs)
        # Left padding: a decoder-only model continues every row from the same right edge.
        input_ids = torch.tensor([[pad] * (width - len(j.prompt_ids)) + j.prompt_ids for j in jobs], device=device)
        attention_mask = torch.tensor([[0] * (width - len(j.prompt_ids)) + [1] * len(j.prompt_ids) for j in jobs],
                                      device=device)
        stops = stop_token_ids(model, tokenizer)
        follower = RowFollower(jobs, stops, chat_turn(tokenizer).end_of_turn)
        first = jobs[0]
        sampling = (dict(do_sample=False, temperature=None, top_p=None, top_k=None) if first.temperature == 0
                    else dict(do_sample=True, temperature=first.temperature, top_p=first.top_p, top_k=None))
        started = time.perf_counter()
        model.generate(input_ids=input_ids, attention_mask=attention_mask,
                       max_new_tokens=max(j.max_tokens for j in jobs), pad_token_id=pad, eos_token_id=stops,
                       stopping_criteria=StoppingCriteriaList([follower]), **sampling)
        follower.close()
        self.batches += 1
        self.rows += len(jobs)
        tokens = sum(len(t) for t in follower.tokens)
        log.debug("batch of %d on %s: %d tokens in %.2fs (the oldest waited %.3fs)", len(jobs), engine.fingerprint,
                  tokens, time.perf_counter() - started, started - min(j.submitted for j in jobs))

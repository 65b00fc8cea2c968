"""Throughput of ``fedmem serve`` against plain batched ``model.generate`` of the same weights.

Starts the real ``fedmem serve --memory M --no-gate`` (uvicorn, HTTP on loopback) as a
subprocess, and a second one with the memory gate on (the default), then alternates,
``--repeats`` times: plain ``generate`` in this process on a batch of the demo's questions, and
the same questions sent as concurrent HTTP requests (the ``openai`` client, one thread per
request). Batch 1 (one question at a time) and batch 16; the order of the arms
rotates from one repeat to the next. Tokens are the reply's
tokens up to its end (the stop token not counted), the same count both ways; throughput is
tokens per second of wall clock. The server and the plain run never overlap in time.

    .venv/bin/python scripts/bench_serving.py --memory runs/demo/memory --out docs/serving_bench.json

The plain runs use the merged weights (what the server runs) and, for reference, the unmerged
PEFT model (what ``fedmem ask`` runs). The ungated server is compared with the plain merged run
(the same replies are expected); the gated one shows what the gate costs (its replies differ
where the base model answers). Untimed, last: the gated server's replies to the questions and
the demo's control questions against ``fedmem ask``'s (``gated_answers`` on the PEFT model), and
which side answered each.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import torch
from serving_process import running_server

from fedmem.answer import load_memory, load_questions, stop_token_ids
from fedmem.demo import demo_dir
from fedmem.examples import chat_prompt
from fedmem.log import setup_logging
from fedmem.memory_gate import gated_answers

log = logging.getLogger("bench_serving")


def plain_generate(model, tok, questions: list[str], max_tokens: int) -> tuple[int, float, list[str]]:
    """(tokens, seconds, replies) for one left-padded ``generate`` over ``questions``."""
    tok.padding_side = "left"
    stops = stop_token_ids(model, tok)
    enc = tok([chat_prompt(tok, q) for q in questions], return_tensors="pt", padding=True, add_special_tokens=False)
    started = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=max_tokens, do_sample=False, pad_token_id=tok.pad_token_id,
                             eos_token_id=stops)
    seconds = time.perf_counter() - started
    tokens, replies = 0, []
    for row in out[:, enc["input_ids"].shape[1]:].tolist():
        ends = [i for i, t in enumerate(row) if t in stops]
        useful = row[:ends[0]] if ends else row
        tokens += len(useful)
        replies.append(tok.decode(useful, skip_special_tokens=True).strip())
    return tokens, seconds, replies


def endpoint(client: openai.OpenAI, questions: list[str], max_tokens: int) -> tuple[int, float, list[str]]:
    """(tokens, seconds, replies) for ``questions`` sent all at once, one request each."""
    def one(q):
        r = client.chat.completions.create(model="fedmem", messages=[{"role": "user", "content": q}],
                                           max_tokens=max_tokens, temperature=0)
        return r.usage.completion_tokens, r.choices[0].message.content

    started = time.perf_counter()
    with ThreadPoolExecutor(len(questions)) as pool:
        results = list(pool.map(one, questions))
    return sum(t for t, _ in results), time.perf_counter() - started, [r for _, r in results]


def compare_gate(client: openai.OpenAI, peft_model, tok, questions: list[str], max_tokens: int) -> dict:
    """The gated server's replies (all at once, so they batch) against ``fedmem ask``'s."""
    def one(q):
        r = client.chat.completions.create(model="fedmem", messages=[{"role": "user", "content": q}],
                                           max_tokens=max_tokens, temperature=0)
        return r.choices[0].message.content, r.model_extra["fedmem_gate"]["answered_by"] == "memory"

    with ThreadPoolExecutor(16) as pool:
        served = list(pool.map(one, questions))
    asked = gated_answers(peft_model, tok, [chat_prompt(tok, q) for q in questions], max_tokens)
    return {"questions": len(questions),
            "same_replies": f"{sum(s == a for (s, _), a in zip(served, asked.replies))}/{len(questions)}",
            "same_side": f"{sum(m == k for (_, m), k in zip(served, asked.from_memory))}/{len(questions)}",
            "memory_answered": f"{sum(m for _, m in served)}/{len(questions)}",
            "differing": [{"question": q, "served": s, "asked": a} for q, (s, _), a in
                          zip(questions, served, asked.replies) if s != a][:10]}


def run_in_turns(fn, questions: list[str], batch: int, max_tokens: int) -> tuple[int, float, list[str]]:
    tokens, seconds, replies = 0, 0.0, []
    for start in range(0, len(questions), batch):
        t, s, r = fn(questions[start:start + batch], max_tokens)
        tokens, seconds, replies = tokens + t, seconds + s, replies + r
    return tokens, seconds, replies


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--memory", type=Path, default=Path("runs/demo/memory"))
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--questions", type=int, default=16, help="how many demo questions per measurement")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--out", type=Path, default=None, help="write the figures here as JSON")
    args = parser.parse_args()
    setup_logging(0)

    questions = [q.question for q in load_questions(demo_dir() / "questions.jsonl")][:args.questions]
    loaded = load_memory(args.memory)
    unmerged, tok = loaded.model, loaded.tokenizer
    merged = load_memory(args.memory).model.merge_and_unload().eval()
    with contextlib.ExitStack() as servers:
        clients = {gated: openai.OpenAI(base_url=servers.enter_context(running_server(
            ["--memory", str(args.memory), *([] if gated else ["--no-gate"])], args.port + gated)) + "/v1",
            api_key="unused", max_retries=0, timeout=600) for gated in (False, True)}
        arms = {
            "plain generate (merged)": lambda qs, n: plain_generate(merged, tok, qs, n),
            "fedmem serve (HTTP)": lambda qs, n: endpoint(clients[False], qs, n),
            "plain generate (PEFT, unmerged)": lambda qs, n: plain_generate(unmerged, tok, qs, n),
            "fedmem serve, gated (HTTP)": lambda qs, n: endpoint(clients[True], qs, n),
        }
        for client in clients.values():  # warm-up every path
            endpoint(client, questions[:2], 4)
        plain_generate(merged, tok, questions[:2], 4)
        rates: dict[str, dict[int, list[float]]] = {name: {1: [], 16: []} for name in arms}
        replies: dict[str, dict[int, list[str]]] = {name: {} for name in arms}
        names = list(arms)
        for repeat in range(args.repeats):
            # Each repeat starts with another arm: this machine runs faster for a while after a pause.
            order = names[repeat % len(names):] + names[:repeat % len(names)]
            for batch in (16, 1):
                for name in order:
                    tokens, seconds, got = run_in_turns(arms[name], questions, batch, args.max_tokens)
                    rates[name][batch].append(tokens / seconds)
                    replies[name][batch] = got
                    log.info("repeat %d batch %2d %-34s %5d tokens %6.1fs %6.1f tok/s", repeat + 1, batch, name,
                             tokens, seconds, tokens / seconds)
        gate_check = compare_gate(clients[True], unmerged, tok,
                                  questions + [q.question for q in load_questions(demo_dir() / "control.jsonl")],
                                  args.max_tokens)

    result = {"memory": str(args.memory), "questions": len(questions), "max_tokens": args.max_tokens,
              "repeats": args.repeats, "threads": torch.get_num_threads(), "tokens_per_s": {}, "same_replies": {},
              "gate_check": gate_check}
    print(f"\n{'':34} {'batch 1':>12} {'batch 16':>12}   (tokens/s, median of {args.repeats})")
    for name in arms:
        med = {b: statistics.median(rates[name][b]) for b in (1, 16)}
        result["tokens_per_s"][name] = med
        print(f"{name:34} {med[1]:>12.1f} {med[16]:>12.1f}")
    plain = result["tokens_per_s"]["plain generate (merged)"]
    served = result["tokens_per_s"]["fedmem serve (HTTP)"]
    result["ratio_serve_to_plain"] = {b: served[b] / plain[b] for b in (1, 16)}
    gated = result["tokens_per_s"]["fedmem serve, gated (HTTP)"]
    result["ratio_gated_to_ungated_serve"] = {b: gated[b] / served[b] for b in (1, 16)}
    for b in (1, 16):
        same = sum(a == c for a, c in zip(replies["fedmem serve (HTTP)"][b], replies["plain generate (merged)"][b]))
        result["same_replies"][b] = f"{same}/{len(questions)}"
    print(f"\nfedmem serve / plain generate: batch 1 {result['ratio_serve_to_plain'][1]:.2f}x, "
          f"batch 16 {result['ratio_serve_to_plain'][16]:.2f}x; same replies: {result['same_replies']}")
    print(f"gated / ungated fedmem serve: batch 1 {result['ratio_gated_to_ungated_serve'][1]:.2f}x, "
          f"batch 16 {result['ratio_gated_to_ungated_serve'][16]:.2f}x")
    print(f"gated fedmem serve against fedmem ask: same replies {gate_check['same_replies']}, same side "
          f"{gate_check['same_side']}; the memory answered {gate_check['memory_answered']}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

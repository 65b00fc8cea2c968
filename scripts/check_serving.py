"""Acceptance check of ``fedmem serve --follow`` on a finished federation run (e.g. the demo).

1. Copies the run's second-to-last round checkpoint to a scratch ``live/memory`` and starts the
   real ``fedmem serve --follow live/memory`` (a subprocess, HTTP on loopback).
2. Asks every held-out question over HTTP with the ``openai`` client, to ``fedmem`` and to the
   base model's name: recall at that round.
3. While four clients keep asking, replaces ``live/memory`` with the last round's checkpoint the
   way fedmem writes memories (copied beside it, then renamed into place), and measures how long
   until ``/v1/models`` reports the new version; counts failed requests and checks that every
   reply names one version.
4. Asks every question again: recall with the last round, to compare with ``fedmem eval``.

    .venv/bin/python scripts/check_serving.py --run runs/demo --out docs/serving_check.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
from serving_process import running_server

from fedmem.answer import is_correct, load_questions
from fedmem.demo import demo_dir
from fedmem.memory import fsync_tree, read_manifest, replace_dir


def first_sentence(text: str) -> str:
    for end in (". ", "! ", "? ", "\n"):
        text = text.split(end)[0]
    return text


def recall(client: openai.OpenAI, model: str, questions) -> dict:
    def one(q):
        r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": q.question}],
                                           max_tokens=48)
        return r.choices[0].message.content, r.system_fingerprint

    with ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(one, questions))
    hits = [is_correct(text, q.answer) for (text, _), q in zip(replies, questions)]
    strict = [is_correct(first_sentence(text), q.answer) for (text, _), q in zip(replies, questions)]
    return {"model": model, "versions": sorted({fp for _, fp in replies}), "recall": sum(hits) / len(hits),
            "recall_first_sentence": sum(strict) / len(strict),
            "replies": [{"question": q.question, "answer": q.answer, "reply": text, "correct": ok}
                        for q, (text, _), ok in zip(questions, replies, hits)]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=Path("runs/demo"))
    parser.add_argument("--questions", type=Path, default=demo_dir() / "questions.jsonl")
    parser.add_argument("--port", type=int, default=8766)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    rounds = sorted((args.run / "rounds").glob("round-*"))
    if len(rounds) < 2:
        raise SystemExit(f"{args.run}/rounds: need at least two round checkpoints")
    before, after = rounds[-2], rounds[-1]
    questions = load_questions(args.questions)
    scratch = Path(tempfile.mkdtemp(prefix="fedmem-serving-check-"))
    live = scratch / "memory"
    shutil.copytree(before, live)
    result: dict = {"run": str(args.run), "before": before.name, "after": after.name}
    try:
        with running_server(["--follow", str(live)], args.port, ready=lambda h: h.get("memory_loaded")) as url:
            result.update(exercise(url, questions, live, after))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    report(result, before.name, after.name)
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if not result["swap"]["failed"] else 1


def exercise(url: str, questions, live: Path, after: Path) -> dict:
    """Recall before, the swap under load, recall after."""
    result: dict = {}
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)
    base_name = [m.id for m in client.models.list().data if m.id != "fedmem"][0]
    result["base_model"] = recall(client, base_name, questions)
    result["memory_before"] = recall(client, "fedmem", questions)

    outcomes, errors, stop = [], [], threading.Event()

    def keep_asking(i: int) -> None:
        while not stop.is_set():
            q = questions[i % len(questions)]
            try:
                r = client.chat.completions.create(model="fedmem", max_tokens=24,
                                                   messages=[{"role": "user", "content": q.question}])
                outcomes.append((time.monotonic(), r.system_fingerprint))
            except Exception as err:  # noqa: BLE001 - a failed request is what this counts
                errors.append(repr(err))
            i += 4

    askers = [threading.Thread(target=keep_asking, args=(i,)) for i in range(4)]
    for t in askers:
        t.start()
    time.sleep(3)
    new_sha = read_manifest(after).get("weights_sha256")
    staged = Path(tempfile.mkdtemp(prefix=".memory.tmp-", dir=live.parent))
    shutil.rmtree(staged)
    shutil.copytree(after, staged)
    fsync_tree(staged)
    swapped = time.monotonic()
    replace_dir(staged, live)  # how fedmem's coordinator and a client's pull put a new version in place
    while True:
        version = [m for m in client.models.list().data if m.id == "fedmem"][0].model_extra["fedmem_version"]
        if version["sha256"] == new_sha:
            break
        if time.monotonic() - swapped > 120:
            raise SystemExit("the new version was not picked up in 120 s")
        time.sleep(0.1)
    picked_up = time.monotonic() - swapped
    time.sleep(3)
    stop.set()
    for t in askers:
        t.join()
    result["swap"] = {"picked_up_after_s": round(picked_up, 2), "requests": len(outcomes) + len(errors),
                      "failed": len(errors), "errors": errors[:5],
                      "versions_seen": sorted({fp for _, fp in outcomes}),
                      "requests_during_swap": sum(swapped <= t <= swapped + picked_up for t, _ in outcomes)}
    result["memory_after"] = recall(client, "fedmem", questions)
    return result


def report(result: dict, before: str, after: str) -> None:
    for key in ("base_model", "memory_before", "memory_after"):
        r = result[key]
        print(f"{key:14} {r['model']:24} recall {r['recall']:.0%} (first sentence {r['recall_first_sentence']:.0%}) "
              f"versions {r['versions']}")
    s = result["swap"]
    print(f"swap {before} -> {after}: picked up after {s['picked_up_after_s']} s; {s['requests']} requests "
          f"meanwhile, {s['failed']} failed; versions seen {s['versions_seen']}")


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Training-step throughput: transformers' usual step against fedmem's.

transformers' usual step: the batch padded to its longest row, the full-vocabulary loss.
fedmem's (fedmem.train): the same rows packed into one sequence (no padding, the chat
prompt prefix the rows share computed once) and the loss projected only where there
are labels. Same model, same LoRA, same demo batches, alternating, in one process;
prints tokens/s, the ratio and the largest loss difference.

    python scripts/bench_train_step.py [steps]
"""

from __future__ import annotations

import argparse
import random
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("steps", type=int, nargs="?", default=12, help="batches timed (default %(default)s)")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"steps must be at least 1, got {args.steps}")

    import torch

    from fedmem.base_model import load_model, load_tokenizer, resolve_base
    from fedmem.config import LoraSettings
    from fedmem.corpus import load_corpus
    from fedmem.examples import build_examples, tokenize_example
    from fedmem.flower.simulation import client_dirs, demo_dir
    from fedmem.log import setup_logging
    from fedmem.lora import attach_lora
    from fedmem.train import answer_loss, pack

    setup_logging()
    base = str(resolve_base())
    tok = load_tokenizer(base)
    model = attach_lora(load_model(base), LoraSettings())
    examples = [e for d in client_dirs(demo_dir() / "corpora") for e in build_examples(load_corpus(d))]
    rows = [tokenize_example(tok, e) for e in examples]
    rng = random.Random(0)
    rng.shuffle(rows)
    rows.sort(key=lambda r: len(r[0]))  # as the trainer does within windows: similar lengths share a batch
    chunks = [rows[s:s + 4] for s in range(0, len(rows), 4)]
    rng.shuffle(chunks)
    chunks = chunks[:args.steps]

    def padded(chunk):
        width = max(len(x) for x, _ in chunk)
        ids = torch.full((len(chunk), width), tok.pad_token_id)
        labels = torch.full((len(chunk), width), -100)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for r, (x, y) in enumerate(chunk):
            ids[r, :len(x)], labels[r, :len(y)], mask[r, :len(x)] = torch.tensor(x), torch.tensor(y), 1
        return ids, labels, mask

    def usual_step(chunk):
        ids, labels, mask = padded(chunk)
        return model(input_ids=ids, attention_mask=mask, labels=labels).loss

    def fedmem_step(chunk):
        return answer_loss(model, pack(chunk))

    timings = {"padded, full vocabulary": 0.0, "packed, answer-only": 0.0}
    tokens = sum(len(x) for c in chunks for x, _ in c)
    usual_step(chunks[0]).backward()  # warm-up
    model.zero_grad(set_to_none=True)
    largest = 0.0
    for chunk in chunks:
        losses = []
        for name, fn in (("padded, full vocabulary", usual_step), ("packed, answer-only", fedmem_step)):
            t = time.perf_counter()
            loss = fn(chunk)
            loss.backward()
            timings[name] += time.perf_counter() - t
            losses.append(loss.item())
            model.zero_grad(set_to_none=True)
        largest = max(largest, abs(losses[0] - losses[1]))
    for name, sec in timings.items():
        print(f"{name:24s} {tokens / sec:6.0f} tokens/s (fwd+bwd, {len(chunks)} batches, {tokens} tokens)")
    print(f"speed-up: {timings['padded, full vocabulary'] / timings['packed, answer-only']:.2f}x; "
          f"largest loss difference {largest:.1e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

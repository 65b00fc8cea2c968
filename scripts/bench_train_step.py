#!/usr/bin/env python3
"""Training-step throughput: transformers' full-vocabulary loss vs fedmem's answer-only loss.

Same model, same LoRA, same demo batches, alternating, in one process; prints tokens/s
and the ratio.   python scripts/bench_train_step.py [steps]
"""

import random
import sys
import time

from fedmem.base_model import load_model, load_tokenizer, quiet_libraries, resolve_base
from fedmem.corpus import load_corpus
from fedmem.examples import build_examples
from fedmem.lora import LoraSettings, attach_lora
from fedmem.simulation import client_dirs, demo_dir
from fedmem.train import _answer_loss, _batches, tokenize_example

quiet_libraries()
steps = int(sys.argv[1]) if len(sys.argv) > 1 else 12
base = str(resolve_base())
tok = load_tokenizer(base)
model = attach_lora(load_model(base), LoraSettings())
examples = [e for d in client_dirs(demo_dir() / "corpora") for e in build_examples(load_corpus(d))]
rows = [tokenize_example(tok, e) for e in examples]


batches = list(_batches(rows, 4, tok.pad_token_id, random.Random(0)))[:steps]


def full_loss(ids, mask, labels):
    return model(input_ids=ids, attention_mask=mask, labels=labels).loss


timings = {"full-vocabulary loss": 0.0, "answer-only loss": 0.0}
tokens = sum(int(m.sum()) for _, _, m in batches)
for ids, labels, mask in batches[:1]:  # warm-up
    full_loss(ids, mask, labels).backward()
for ids, labels, mask in batches:
    for name, fn in (("full-vocabulary loss", full_loss), ("answer-only loss", lambda i, m, l: _answer_loss(model, i, m, l))):
        t = time.perf_counter()
        fn(ids, mask, labels).backward()
        timings[name] += time.perf_counter() - t
        model.zero_grad(set_to_none=True)
for name, sec in timings.items():
    print(f"{name:22s} {tokens / sec:6.0f} tokens/s (fwd+bwd, {len(batches)} batches, {tokens} tokens)")
print(f"speed-up: {timings['full-vocabulary loss'] / timings['answer-only loss']:.2f}x")

"""Timing one greedy generation: time to first token, decode rate, peak memory."""

from __future__ import annotations

import math
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path


class _Clock:
    """A generate() streamer that only timestamps: put() is called once with the prompt,
    then once per new token, so the second stamp is the first token."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value):
        self.times.append(time.perf_counter())

    def end(self):
        pass


@dataclass
class Generation:
    reply: str
    prompt_tokens: int
    new_tokens: int
    ttft_s: float  # from the question's arrival (retrieval included) to the first new token
    decode_tps: float  # tokens after the first, per second of decoding; nan under 2 tokens
    wall_s: float  # from the question's arrival to the last token
    peak_mib: float | None = None  # CUDA only: peak allocated memory during this call


def timed_generate(model, tokenizer, prompt: str, max_new_tokens: int, started: float,
                   exact_new_tokens: bool = False) -> Generation:
    import torch

    device = next(model.parameters()).device
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    enc = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(device)
    clock = _Clock()
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, temperature=None, top_p=None,
                             top_k=None, min_new_tokens=max_new_tokens if exact_new_tokens else 0,
                             pad_token_id=tokenizer.pad_token_id, streamer=clock)
    end = time.perf_counter()
    new = out[0, enc["input_ids"].shape[1]:]
    stamps = clock.times[1:]
    ttft = (stamps[0] if stamps else end) - started
    decode = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) >= 2 and stamps[-1] > stamps[0] else math.nan
    return Generation(reply=tokenizer.decode(new, skip_special_tokens=True).strip(),
                      prompt_tokens=int(enc["input_ids"].shape[1]), new_tokens=int(new.shape[0]), ttft_s=ttft,
                      decode_tps=decode, wall_s=end - started,
                      peak_mib=torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None)


def peak_rss_mib() -> float:
    """This process's resident-set high-water mark. VmHWM, not ru_maxrss: Linux carries
    ru_maxrss across fork+exec, so a worker started by a big parent would report the
    parent's peak (seen here: every arm read the bench process's 2.9 GB)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 if sys.platform != "darwin" else 2**20)


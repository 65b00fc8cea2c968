"""Local LoRA training, top to bottom in one function.

Called by a data owner on its own machine, once per federated round: the model
arrives with whatever memory the round starts from; only the LoRA is trained.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from typing import Callable

import torch

from .examples import Example, tokenize_example
from .lora import LoraSettings


@dataclass
class TrainResult:
    examples: int
    tokens: int
    seconds: float
    first_loss: float
    final_loss: float  # mean loss over the last epoch

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def _answer_loss(model, ids, mask, labels):
    """Next-token loss computed only where there is a label.

    The vocabulary projection is a quarter of this model's FLOPs; chat examples
    have most tokens in the prompt, so projecting only labelled positions saves
    real time on CPUs without changing the loss.
    """
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = causal_lm.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state
    targets = labels[:, 1:]
    keep = targets != -100
    logits = causal_lm.get_output_embeddings()(hidden[:, :-1][keep])
    return torch.nn.functional.cross_entropy(logits.float(), targets[keep])


def autocast_dtype(precision: str, device: str) -> torch.dtype | None:
    """The dtype to autocast training to, or None for plain float32.

    bf16 where it is native: 1.4-1.9x the float32 training tokens/s on the project's
    AVX512-BF16 CPU (docs/results.md); on CPUs without it bf16 is emulated and slower.
    """
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    # Private probes (torch has no public one); older torch builds lack them: float32 then.
    native = [getattr(torch.cpu, probe, lambda: False) for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if device == "cpu" and any(probe() for probe in native):
        return torch.bfloat16
    return None


def _batches(rows: list[tuple[list[int], list[int]]], batch_size: int, pad_id: int, rng: random.Random):
    order = list(range(len(rows)))
    rng.shuffle(order)
    # Sort within windows of a few batches: similar lengths share a batch (less padding),
    # while the order across windows stays random.
    window = batch_size * 4
    order = [i for w in range(0, len(order), window) for i in sorted(order[w:w + window], key=lambda i: len(rows[i][0]))]
    batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    rng.shuffle(batches)
    for batch in batches:
        chunk = [rows[i] for i in batch]
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        labels = torch.full((len(chunk), width), -100, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, (x, y) in enumerate(chunk):
            ids[row, : len(x)] = torch.tensor(x)
            labels[row, : len(y)] = torch.tensor(y)
            mask[row, : len(x)] = 1
        yield ids, labels, mask


def train_lora(
    model,
    tokenizer,
    examples: list[Example],
    settings: LoraSettings,
    device: str = "cpu",
    progress: Callable[[str], None] | None = None,
    span: tuple[float, float] = (0.0, 1.0),
) -> TrainResult:
    """Train the LoRA parameters of a PEFT ``model`` on ``examples``; returns loss/throughput.

    ``span`` is the slice of the whole run's learning-rate schedule this call covers:
    a federated round r of R trains on (r-1)/R .. r/R, so the rounds together follow
    one warm-up + cosine schedule, as one centralised run would.
    """
    if not examples:
        raise ValueError("no training examples")
    torch.manual_seed(settings.seed)
    rng = random.Random(settings.seed)
    rows = [tokenize_example(tokenizer, ex, settings.max_length) for ex in examples]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=0.0)
    steps = math.ceil(len(rows) / settings.batch_size) * settings.epochs
    start, end = span

    def lr_factor(step: int) -> float:
        # Linear warm-up over the first 5% of the run, cosine decay to 10%: a stable
        # start, and the last steps settle.
        t = start + (end - start) * min(step, steps) / steps
        return min(1.0, (t + 1 / steps) / 0.05) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    dtype = autocast_dtype(settings.precision, device)
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    model.train()
    tokens, step, first_loss, epoch_losses = 0, 0, float("nan"), []
    started = time.perf_counter()
    for epoch in range(settings.epochs):
        epoch_losses = []
        for ids, labels, mask in _batches(rows, settings.batch_size, tokenizer.pad_token_id, rng):
            ids, labels, mask = ids.to(device), labels.to(device), mask.to(device)
            with torch.autocast(device_type, dtype=dtype or torch.float32, enabled=dtype is not None):
                loss = _answer_loss(model, ids, mask, labels)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens += int(mask.sum())
            epoch_losses.append(loss.item())
            if step == 1:
                first_loss = epoch_losses[0]
        if progress:
            elapsed = time.perf_counter() - started
            progress(f"epoch {epoch + 1}/{settings.epochs} loss {sum(epoch_losses) / len(epoch_losses):.3f} "
                     f"({tokens / elapsed:.0f} tok/s)")
    model.eval()
    seconds = time.perf_counter() - started
    return TrainResult(len(rows), tokens, seconds, first_loss, sum(epoch_losses) / len(epoch_losses))

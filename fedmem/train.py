"""Local LoRA training, top to bottom in one function.

Called by a data owner on its own machine, once per federated round: the model
arrives with whatever memory the round starts from; only the LoRA is trained.
"""

from __future__ import annotations

import copy
import logging
import math
import random
import time
from dataclasses import dataclass

import torch

from .config import LoraSettings
from .examples import Example, tokenize_example
from .log import progress

log = logging.getLogger(__name__)

# An epoch whose mean loss is more than this many times the epoch before it has diverged
# (normal epochs fall or hold: the demo's and devset's rise by at most a few percent); it is
# undone and trained again at half the learning rate, at most MAX_RETRIES times a run.
# Gradient clipping does not prevent this: Adam's step is about the learning rate whatever
# the gradient's size (docs/quality.md: a demo seed whose third owner went 1.30 -> 3.70 -> 8.02).
DIVERGED = 2.0
MAX_RETRIES = 2


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


@dataclass
class PackedBatch:
    """Several examples as one sequence, so no position is padding and a prompt prefix
    the rows share (the chat template's system turn: a third of the demo's tokens) is
    computed once. ``attend[0, 0, i, j]``: position i sees position j (each row sees its
    own earlier tokens and the shared prefix, nothing of another row); ``targets[0, i]``:
    the token position i predicts, -100 where nothing is learned."""

    ids: torch.Tensor
    positions: torch.Tensor
    attend: torch.Tensor
    targets: torch.Tensor
    tokens: int  # the rows' own tokens, as if each were run alone
    # Distilled rows (``Example.distil``): at those of the labelled positions (in order)
    # that ``soft`` marks, the target is a distribution: token ids and probabilities.
    soft: torch.Tensor | None = None
    soft_ids: torch.Tensor | None = None
    soft_probs: torch.Tensor | None = None

    def to(self, device: str) -> "PackedBatch":
        moved = [t.to(device) if t is not None else None for t in (self.soft, self.soft_ids, self.soft_probs)]
        return PackedBatch(self.ids.to(device), self.positions.to(device), self.attend.to(device),
                           self.targets.to(device), self.tokens, *moved)


def answer_loss(model, batch: PackedBatch):
    """Next-token loss computed only where there is a label.

    The vocabulary projection is a quarter of this model's FLOPs; chat examples
    have most tokens in the prompt, so projecting only labelled positions saves
    real time on CPUs without changing the loss.
    """
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = causal_lm.get_decoder()
    mask = batch.attend
    if getattr(causal_lm.config, "_attn_implementation", "sdpa") != "sdpa":  # eager adds the mask to the scores
        dtype = decoder.get_input_embeddings().weight.dtype
        mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    hidden = decoder(input_ids=batch.ids, position_ids=batch.positions, attention_mask=mask).last_hidden_state
    keep = batch.targets != -100
    logits = causal_lm.get_output_embeddings()(hidden[keep])
    if batch.soft is None:
        return torch.nn.functional.cross_entropy(logits.float(), batch.targets[keep])
    # Cross-entropy against the base model's distribution where a row is distilled (its
    # KL divergence up to a constant), against the label elsewhere; one mean over both.
    logp = torch.log_softmax(logits.float(), dim=-1)
    hard = -logp[~batch.soft].gather(1, batch.targets[keep][~batch.soft, None]).squeeze(1)
    soft = -(batch.soft_probs * logp[batch.soft].gather(1, batch.soft_ids)).sum(1)
    return torch.cat([hard, soft]).mean()


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
        # Native only: on pre-Ampere GPUs torch emulates bf16, slower than float32.
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else None
    # Private probes (torch has no public one); older torch builds lack them: float32 then.
    native = [
        getattr(torch.cpu, probe, lambda: False) for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    ]
    if device == "cpu" and any(probe() for probe in native):
        return torch.bfloat16
    return None


def _is_prompt(labels: list[int]) -> bool:
    return bool(labels) and labels[0] == -100


def _shared_prefix(rows: list[tuple[list[int], list[int]]]) -> list[int]:
    """The leading prompt tokens (no labels, up to and including the first token each
    row predicts from them) all prompt rows of a batch have in common."""
    prompts = [(x, y) for x, y in rows if _is_prompt(y)]
    if len(prompts) < 2:
        return []
    first = prompts[0][0]
    n = min(len(x) for x, _ in prompts) - 1
    for x, y in prompts:
        k = 0
        while k < n and x[k] == first[k] and y[k + 1] == -100:
            k += 1
        n = k
    return first[:n]


Distribution = tuple[torch.Tensor, torch.Tensor]  # top-k token ids and probabilities per labelled position
DISTIL_TOP_K = 32  # of the base model's next-token distribution kept per position: nearly all its mass


@torch.no_grad()
def base_distributions(model, rows: list[tuple[list[int], list[int]]], distil: list[bool],
                       device: str = "cpu") -> list[Distribution | None]:
    """For each row to distil, the base model's top-k next-token distribution at every
    labelled position (the position before each labelled token), renormalised; None for
    the others. The LoRA is switched off (``disable_adapter``), so the memory a round
    starts from does not count as the base."""
    out: list[Distribution | None] = [None] * len(rows)
    if not any(distil):
        return out
    was_training = model.training
    model.eval()
    with model.disable_adapter():
        for i, ((x, y), wanted) in enumerate(zip(rows, distil)):
            if not wanted:
                continue
            at = [j for j in range(len(x) - 1) if y[j + 1] != -100]
            logits = model(input_ids=torch.tensor([x], device=device)).logits[0, at].float()
            top = torch.softmax(logits, dim=-1).topk(DISTIL_TOP_K, dim=-1)
            out[i] = (top.indices.cpu(), (top.values / top.values.sum(-1, keepdim=True)).cpu())
    model.train(was_training)
    return out


def pack(rows: list[tuple[list[int], list[int]]], soft: list[Distribution | None] | None = None) -> PackedBatch:
    prefix = _shared_prefix(rows)
    shared = len(prefix)
    ids, positions, targets, segments = list(prefix), list(range(shared)), [-100] * shared, []
    for x, y in rows:
        offset = shared if _is_prompt(y) else 0
        begin = len(ids)
        ids += x[offset:]
        positions += range(offset, len(x))
        targets += y[offset + 1 :] + [-100]
        segments.append((begin, len(ids), offset > 0))
    length = len(ids)
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    attend = torch.zeros(length, length, dtype=torch.bool)
    attend[:shared, :shared] = causal[:shared, :shared]
    for begin, end, sees_prefix in segments:
        attend[begin:end, begin:end] = causal[: end - begin, : end - begin]
        if sees_prefix:
            attend[begin:end, :shared] = True
    batch = PackedBatch(
        torch.tensor([ids]),
        torch.tensor([positions]),
        attend[None, None],
        torch.tensor([targets]),
        sum(len(x) for x, _ in rows),
    )
    if soft and any(d is not None for d in soft):
        # Labelled positions come in row order, so each row's run of them lines up with its distribution.
        marks = []
        for (x, y), d in zip(rows, soft):
            n = sum(label != -100 for label in y[1:])
            if d is not None and len(d[0]) != n:
                raise ValueError(f"a distilled row has {n} labelled positions but {len(d[0])} distributions")
            marks += [d is not None] * n
        batch.soft = torch.tensor(marks, dtype=torch.bool)
        batch.soft_ids = torch.cat([d[0] for d in soft if d is not None])
        batch.soft_probs = torch.cat([d[1] for d in soft if d is not None])
    return batch


def _batches(rows: list[tuple[list[int], list[int]]], batch_size: int, rng: random.Random,
             soft: list[Distribution | None]):
    order = list(range(len(rows)))
    rng.shuffle(order)
    # Sort within windows of a few batches: similar examples (chat or plain text) share
    # a batch, while the order across windows stays random.
    window = batch_size * 4
    order = [
        i for w in range(0, len(order), window) for i in sorted(order[w : w + window], key=lambda i: len(rows[i][0]))
    ]
    batches = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
    rng.shuffle(batches)
    for batch in batches:
        yield pack([rows[i] for i in batch], [soft[i] for i in batch])


def _snapshot(model, optimizer, schedule) -> tuple:
    """What an epoch changes (the LoRA weights, the optimiser's and the schedule's state), to
    undo it."""
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return lora, copy.deepcopy(optimizer.state_dict()), schedule.state_dict()


def _restore(model, optimizer, schedule, snapshot: tuple) -> int:
    """Undo to ``snapshot``; returns the step it was taken at (the schedule counts the steps)."""
    lora, optimizer_state, schedule_state = snapshot
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in lora:
                p.copy_(lora[n])
    optimizer.load_state_dict(optimizer_state)
    schedule.load_state_dict(schedule_state)
    return schedule.last_epoch


def train_lora(
    model,
    tokenizer,
    examples: list[Example],
    settings: LoraSettings,
    device: str = "cpu",
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
    soft = base_distributions(model, rows, [ex.distil for ex in examples], device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=0.0)
    steps = math.ceil(len(rows) / settings.batch_size) * settings.epochs
    start, end = span

    damping = 1.0  # halved each time a diverged epoch is trained again

    def lr_factor(step: int) -> float:
        # Linear warm-up over the first 5% of the run, cosine decay to 10%: a stable
        # start, and the last steps settle.
        t = start + (end - start) * min(step, steps) / steps
        return damping * min(1.0, (t + 1 / steps) / 0.05) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    dtype = autocast_dtype(settings.precision, device)
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    model.train()
    tokens, step, first_loss, epoch_losses = 0, 0, float("nan"), []
    previous_mean, retries = math.inf, 0
    started = time.perf_counter()
    bar = progress(total=steps, desc="training", unit="step")
    epoch = 0
    while epoch < settings.epochs:
        before = _snapshot(model, optimizer, schedule)
        epoch_losses = []
        for batch in _batches(rows, settings.batch_size, rng, soft):
            batch = batch.to(device)
            with torch.autocast(device_type, dtype=dtype or torch.float32, enabled=dtype is not None):
                loss = answer_loss(model, batch)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens += batch.tokens
            epoch_losses.append(loss.item())
            if step == 1:
                first_loss = epoch_losses[0]
            bar.update()
            bar.set_postfix(epoch=f"{epoch + 1}/{settings.epochs}", loss=f"{epoch_losses[-1]:.3f}", refresh=False)
        elapsed = time.perf_counter() - started
        mean = sum(epoch_losses) / len(epoch_losses)
        log.info("epoch %d/%d loss %.3f (%.0f tok/s)", epoch + 1, settings.epochs, mean, tokens / elapsed)
        # The epoch's last step can break the weights after its last loss was measured.
        broken = not all(torch.isfinite(p).all() for p in params)
        if broken or not math.isfinite(mean) or mean > DIVERGED * previous_mean:
            step = _restore(model, optimizer, schedule, before)
            bar.update(-len(epoch_losses))
            if retries == MAX_RETRIES:
                if epoch == 0:
                    raise RuntimeError(f"training diverged in its first epoch (loss {mean:.3f}) at every learning "
                                       f"rate tried, down to {damping:.3g} of {settings.learning_rate:g}")
                log.warning("epoch %d/%d diverged again (loss %.3f); training stops at the end of epoch %d",
                            epoch + 1, settings.epochs, mean, epoch)
                epoch_losses = [previous_mean]
                break
            retries += 1
            damping /= 2
            for group in optimizer.param_groups:  # the restored state holds the old rate
                group["lr"] = settings.learning_rate * lr_factor(step)
            log.warning("epoch %d/%d diverged (loss %.3f after %.3f): undone, trained again at %.3g of the "
                        "learning rate", epoch + 1, settings.epochs, mean, previous_mean, damping)
            continue
        previous_mean = mean
        epoch += 1
    bar.close()
    model.eval()
    seconds = time.perf_counter() - started
    return TrainResult(len(rows), tokens, seconds, first_loss, sum(epoch_losses) / len(epoch_losses))

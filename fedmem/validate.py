"""Checks an owner's reply must pass before it is aggregated: pure functions, no I/O.

Every check raises ``Rejected`` with a reason a person can read in the log and the
metrics ("module model.layers.0.self_attn.q_proj: A has NaN or Inf values"); the
ServerApp (``fedmem.flower.server_app``) logs the owner and the reason, leaves the
update out and goes on with the rest of the round.

What the coordinator knows, and so what it checks an update against:

- the module set and shapes: every Linear layer of its own copy of the base model that
  the recipe's ``target-modules`` name (the owners' copies have the same fingerprint);
- the rank: an owner sends the LoRA it trained, of the federation's rank, and the
  coordinator forms the change (new − the memory it sent) itself (``fedmem.aggregate.change``),
  so no owner can misstate what it started from;
- the size of the change: ‖ΔW‖_F against the base weights and against the updates it
  accepted before (``norm_bound``);
- what a reply must hold (an ``update``, ``metrics`` and ``info`` record) and what the
  metrics may be (finite numbers within bounds).

Names an owner gives itself are shown only through ``clean``: no control characters,
bounded length.
"""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from .aggregate import Factors, product_norm

UPDATE_DTYPE = torch.float32
NAME_LIMIT = 64
REASON_LIMIT = 300
METRICS_LIMIT = 32  # at most this many metrics in a reply
# What each metric may be; any other metric a client adds: a finite number of at most METRIC_BOUND.
METRIC_BOUND = 1e12
METRIC_RANGES: dict[str, tuple[float, float]] = {
    "examples": (0.0, METRIC_BOUND),
    "tokens": (0.0, METRIC_BOUND),
    "train_seconds": (0.0, 1e8),
    "tokens_per_second": (0.0, METRIC_BOUND),
    "first_loss": (0.0, 1e6),
    "final_loss": (0.0, 1e6),
}
REQUIRED_METRICS = ("first_loss", "final_loss")  # the round's log line shows them
METRIC_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


class Rejected(ValueError):
    """An update the server refuses; ``str(err)`` is the reason."""


# --- text a client sent, before it reaches a log line ---


def clean(text: object, limit: int = REASON_LIMIT) -> str:
    """``text`` safe for one log line: control and format characters (newlines, escapes,
    bidi overrides) shown as escapes, at most ``limit`` characters."""
    out = []
    for ch in str(text):
        out.append(ch if ch.isprintable() else ascii(ch)[1:-1])
    s = "".join(out)
    return s if len(s) <= limit else s[: max(0, limit - 3)] + "..."


def display_name(text: object) -> str:
    """A name an owner gave itself, for display only."""
    return clean(text, NAME_LIMIT) or "(no name)"


# --- the shape of an update ---


@dataclass(frozen=True)
class Expected:
    """What an update must look like: module -> (d_out, d_in) of the base weight, and the rank."""

    modules: Mapping[str, tuple[int, int]]
    rank: int


def check_factors(factors: Factors | None, expected: Expected) -> None:
    """The exact module set, each module's shapes, float32, finite values, the rank."""
    if not factors:
        raise Rejected("the update is empty")
    names, wanted = set(factors), set(expected.modules)
    invented = sorted(names - wanted)
    if invented:
        raise Rejected(f"module {clean(invented[0], 120)} is not a LoRA target of the base model"
                       + (f" (and {len(invented) - 1} more)" if len(invented) > 1 else ""))
    missing = sorted(wanted - names)
    if missing:
        raise Rejected(f"the update covers {len(names)} of {len(wanted)} modules; missing e.g. {missing[0]}")
    r = expected.rank
    for name in sorted(names):
        pair = factors[name]
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise Rejected(f"module {name}: not a (B, A) pair")
        B, A = pair
        d_out, d_in = expected.modules[name]
        for label, t, shape in (("B", B, (d_out, r)), ("A", A, (r, d_in))):
            if not isinstance(t, torch.Tensor):
                raise Rejected(f"module {name}: {label} is not a tensor")
            if t.dtype != UPDATE_DTYPE:
                raise Rejected(f"module {name}: {label} is {str(t.dtype).replace('torch.', '')}, not float32")
            if tuple(t.shape) != shape:
                raise Rejected(f"module {name}: {label} has shape {tuple(t.shape)}, expected {shape} "
                               f"(rank {r} on a {d_out}x{d_in} weight)")
            if not bool(torch.isfinite(t).all()):
                raise Rejected(f"module {name}: {label} has NaN or Inf values")


def module_norms(delta: Factors) -> dict[str, float]:
    """‖ΔW‖_F of each module of a change in factored form."""
    return {n: product_norm(B, A) for n, (B, A) in delta.items()}


def total_norm(norms: Mapping[str, float]) -> float:
    """‖ΔW‖_F of all modules together."""
    return math.sqrt(sum(v * v for v in norms.values()))


def check_relative(norms: Mapping[str, float], base_norms: Mapping[str, float], ratio: float) -> None:
    """Each module's change at most ``ratio`` × the norm of the base weight it changes
    (modules whose base norm is unknown or zero are not checked; ``ratio`` 0 turns it off)."""
    if ratio <= 0:
        return
    for name in sorted(norms):
        base = base_norms.get(name, 0.0)
        if base > 0 and not norms[name] <= ratio * base:
            raise Rejected(f"module {name}: ‖ΔW‖ {norms[name]:.3g} is {norms[name] / base:.3g} times "
                           f"the base weight's norm (at most {ratio:g})")


def norm_bound(accepted: list[float], candidates: list[float], factor: float, fixed: float = 0.0) -> float | None:
    """The largest ‖ΔW‖_F the server accepts from one owner now.

    ``fixed`` > 0: that. Otherwise ``factor`` × the lower median of ``accepted`` (every update
    accepted earlier in the run). Cold start, before anything was accepted: the lower median
    of ``candidates`` (the updates checked together, a parallel round's replies), which an
    honest majority decides; with a single candidate (a cyclic run's first owner) there is
    nothing to compare with: None, no bound (the base-relative check still applies).
    """
    if fixed > 0:
        return fixed
    reference = accepted or (candidates if len(candidates) > 1 else [])
    if not reference:
        return None
    return factor * statistics.median_low(reference)


def check_norm(norm: float, bound: float | None) -> None:
    if bound is not None and not norm <= bound:
        raise Rejected(f"‖ΔW‖ {norm:.3g} is above the bound {bound:.3g}")


# --- the rest of a reply ---


def check_metrics(metrics: Mapping) -> dict[str, float]:
    """The metrics as floats: at most ``METRICS_LIMIT`` plain names, each a finite number in its range."""
    if len(metrics) > METRICS_LIMIT:
        raise Rejected(f"{len(metrics)} metrics (at most {METRICS_LIMIT})")
    out = {}
    for key, value in metrics.items():
        if not isinstance(key, str) or not METRIC_NAME.fullmatch(key):
            raise Rejected(f"metric name {clean(key, NAME_LIMIT)!r} is not a plain name")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise Rejected(f"metric {key} is not a number")
        value = float(value)
        low, high = METRIC_RANGES.get(key, (-METRIC_BOUND, METRIC_BOUND))
        if not (math.isfinite(value) and low <= value <= high):
            raise Rejected(f"metric {key} = {value:g} is outside [{low:g}, {high:g}]")
        out[key] = value
    missing = [k for k in REQUIRED_METRICS if k not in out]
    if missing:
        raise Rejected(f"metric {missing[0]} is missing")
    return out


def check_finite(factors: Factors) -> None:
    """A memory about to be saved and sent: every value finite (the last guard)."""
    for name, (B, A) in factors.items():
        if not (bool(torch.isfinite(B).all()) and bool(torch.isfinite(A).all())):
            raise Rejected(f"module {name} of the aggregate has NaN or Inf values")


# --- weights ---


def clip_scales(norms: list[float]) -> list[float]:
    """Norm clipping to the median: each update scaled by min(1, median/‖ΔWₖ‖), so none
    counts for more than the median-sized one. Exact aggregation applies a scale as a
    weight on Bₖ, so the low-rank sum stays exact."""
    if not norms:
        return []
    median = statistics.median(norms)
    return [1.0 if n <= median or n == 0 else median / n for n in norms]

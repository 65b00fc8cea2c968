"""Owner-level differential privacy for the memory: clipping, Gaussian noise, the accountant.

The mechanism (central DP, the Gaussian mechanism of DP-FedAvg, McMahan et al. 2018): the
coordinator scales each owner's change ΔWₖ down to Frobenius norm ``clip`` over all its
modules together, adds the clipped changes up, adds Gaussian noise of standard deviation
``noise_multiplier × clip`` to every entry of that sum, and folds the noisy sum into the memory
with the schedule's weight (1/K in a parallel round, 1 for a cyclic visit). Adding or removing
one owner moves the sum by at most ``clip``, so each round is one Gaussian mechanism per owner;
the re-factorisation to the memory's rank afterwards is post-processing and costs nothing.

Everything the released memory reveals about any one owner's contribution *as a whole* is
bounded by (ε, δ). What DP protects against is everyone who reads the memory. In a plain round
the coordinator sees each update in the clear and clips it; under secure aggregation each owner
clips its own change before masking, and the coordinator adds the noise to the unmasked sum
(``noisy_fold``), never seeing one update.

The noise is dense: ΔW of every module, not its low-rank factors (noise on the factors has no
sensitivity bound that holds for their product). So the coordinator forms each module's
d_out × d_in matrix once per aggregation, draws the noise from the operating system's
randomness, and truncates by a full SVD.

The accounting is Opacus's RDP accountant (``opacus.accountants``), with every owner in every
round (sample rate 1): ``noise_multiplier`` finds the noise that spends exactly the budget over
the planned rounds, ``epsilon_spent`` what a run's rounds have spent.
"""

from __future__ import annotations

import functools
import math
import os
import warnings

import torch

from .aggregate import Aggregate, Factors, check_same_modules, dense, truncated_factors, update_norm

# Opacus's default orders start at 1.1; a large ε (weak noise) has its best bound at orders
# closer to 1, so add a finer grid there (more orders only tighten the bound).
ALPHAS = [1 + x / 100 for x in range(1, 10)] + [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 256))


class PrivacyBudgetSpent(RuntimeError):
    """One more round would spend more than the configured ε."""


def clip_scale(norm: float, clip: float) -> float:
    """The factor that brings an update of Frobenius norm ``norm`` within ``clip`` (1 if it is)."""
    if not clip > 0:
        raise ValueError(f"the clipping norm must be > 0, got {clip!r}")
    return 1.0 if norm <= clip else clip / norm


def _accountant(noise_multipliers: list[float]):
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    for z in noise_multipliers:
        accountant.step(noise_multiplier=z, sample_rate=1.0)
    return accountant


def epsilon_spent(noise_multipliers: list[float], delta: float) -> float:
    """ε at ``delta`` after one Gaussian mechanism per round with these noise multipliers."""
    if not noise_multipliers:
        return 0.0
    with warnings.catch_warnings():
        # Opacus warns when the best order is at the grid's edge; the bound still holds there.
        warnings.simplefilter("ignore", UserWarning)
        return float(_accountant(noise_multipliers).get_epsilon(delta=delta, alphas=ALPHAS))


@functools.lru_cache(maxsize=32)
def noise_multiplier(epsilon: float, delta: float, rounds: int) -> float:
    """The noise multiplier z whose ``rounds`` rounds spend ``epsilon`` at ``delta`` (a little less:
    Opacus's search stops within 0.01 of it, from below)."""
    from opacus.accountants.utils import get_noise_multiplier

    if not (epsilon > 0 and 0 < delta < 1 and rounds >= 1):
        raise ValueError(f"need epsilon > 0, 0 < delta < 1 and rounds >= 1; got {epsilon!r}, {delta!r}, {rounds!r}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return float(get_noise_multiplier(target_epsilon=epsilon, target_delta=delta, sample_rate=1.0,
                                          steps=rounds, accountant="rdp", epsilon_tolerance=min(0.01, epsilon / 100),
                                          alphas=ALPHAS))


def check_budget(spent_before: list[float], z: float, epsilon: float, delta: float) -> float:
    """ε after one more round at noise multiplier ``z``; raises ``PrivacyBudgetSpent`` past ``epsilon``."""
    after = epsilon_spent([*spent_before, z], delta)
    # The search for z stops within its tolerance below the target, so a planned run ends at or
    # just under ε; a relative slack of 1e-6 absorbs the accountant's float rounding.
    if after > epsilon * (1 + 1e-6):
        raise PrivacyBudgetSpent(
            f"one more round would spend ε = {after:.4g} at δ = {delta:g}, past the budget dp-epsilon = {epsilon:g} "
            f"({len(spent_before)} rounds spent {epsilon_spent(spent_before, delta):.4g}); the last saved memory "
            "stands. A larger budget is a new decision for the owners: start a new run with it")
    return after


def noise_to_signal(z: float, entries: int, owners: int) -> float:
    """‖noise‖_F of a round over the most ``owners`` clipped updates can add together (K · clip), before the
    rank truncation: z · clip · √entries / (K · clip). Above 1 the memory is mostly noise."""
    return z * math.sqrt(entries) / max(owners, 1)


def system_generator(device: str | torch.device = "cpu") -> torch.Generator:
    """A generator seeded from the operating system's randomness: noise nobody can predict or replay."""
    return torch.Generator(device=device).manual_seed(int.from_bytes(os.urandom(8), "little"))


def private_sum(memory: Factors | None, changes: list[Factors], weight: float, rank: int, clip: float,
                z: float, generator: torch.Generator | None = None) -> tuple[Aggregate, list[float]]:
    """memory + weight · (Σₖ clip(ΔWₖ) + N(0, (z·clip)²)), re-factorised at ``rank``.

    ``changes`` are the owners' ΔW in factored form (``fedmem.aggregate.change``). Returns the
    aggregate (truncation error: how much of the noisy matrix the rank leaves out) and each
    change's clipping scale, in order. ``z`` = 0 clips without noise (for tests).
    """
    if not changes:
        raise ValueError("no client updates to aggregate")
    scales = [clip_scale(update_norm(c), clip) for c in changes]
    sums = {}
    for name in check_same_modules(changes):
        B0, A0 = changes[0][name]
        total = torch.zeros(B0.shape[0], A0.shape[1], dtype=torch.float64)
        for scale, c in zip(scales, changes):
            total += scale * dense(*c[name])
        sums[name] = total
    dtype = changes[0][next(iter(sums))][0].dtype
    agg = noisy_fold(memory, sums, weight, rank, z * clip, generator, dtype)
    return Aggregate(agg.factors, agg.truncation_error, [weight * s for s in scales]), scales


def noisy_fold(memory: Factors | None, sums: dict[str, torch.Tensor], weight: float, rank: int, std: float,
               generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32) -> Aggregate:
    """memory + weight · (sum + N(0, std²)) per module, re-factorised at ``rank``: the Gaussian mechanism
    on ``sums`` (module -> the owners' clipped changes added up, dense), whoever clipped them (the
    coordinator in a plain round, each owner in a secure one)."""
    if weight <= 0:
        raise ValueError(f"weight must be > 0, got {weight!r}")
    generator = generator or system_generator()
    factors: Factors = {}
    errors: dict[str, float] = {}
    for name, total in sums.items():
        total = total.double().clone()
        if std > 0:
            total += std * torch.randn(total.shape, generator=generator, dtype=torch.float64)
        total *= weight
        if memory is not None and name in memory:
            total += dense(*memory[name])
        B, A, errors[name] = truncated_factors(*torch.linalg.svd(total, full_matrices=False), rank)
        factors[name] = (B.to(dtype), A.to(dtype))
    return Aggregate(factors, errors, [])

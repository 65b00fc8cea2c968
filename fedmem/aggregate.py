"""Aggregation math: pure functions on low-rank factors, no Flower, no model.

A LoRA update of one weight matrix is ΔW = B @ A (B: d_out×r, A: r×d_in), with the
LoRA scaling already folded into B. Averaging A and B separately (FedIT, what
FedAvg does to a LoRA) yields mean(B) @ mean(A), which is not mean(B @ A): the
cross terms Bᵢ @ Aⱼ are noise. ``aggregate_exact`` instead computes
ΔW_memory + Σ pₖ Bₖ Aₖ in factored form (stack, two thin QRs, one small SVD) and
re-factorises it at the memory's rank, reporting the relative Frobenius error of
that truncation (zero whenever the summed rank fits).

Weights are the caller's: ``fedmem.federation.server_aggregate`` decides them from what
the server can check (equal per accepted owner, optionally clipped by norm), never from
what a client reports about itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]  # module name -> (B, A)


@dataclass(frozen=True)
class Aggregate:
    factors: Factors
    truncation_error: dict[str, float]  # module -> ||ΔW - ΔW_r||_F / ||ΔW||_F
    weights: list[float] = field(default_factory=list)  # the weight each update was folded in with, in order

    @property
    def max_truncation_error(self) -> float:
        return max(self.truncation_error.values(), default=0.0)


def dense(B: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    return B.double() @ A.double()


def product_norm(B: torch.Tensor, A: torch.Tensor) -> float:
    """‖B @ A‖_F without forming the product: ‖BA‖² = Σᵢⱼ (BᵀB)ᵢⱼ (AAᵀ)ᵢⱼ, two r×r Gram matrices."""
    B, A = B.double(), A.double()
    squared = float(torch.sum((B.T @ B) * (A @ A.T)))
    return max(squared, 0.0) ** 0.5


def update_norm(update: Factors) -> float:
    """‖ΔW‖_F of an update over all its modules together."""
    return sum(product_norm(B, A) ** 2 for B, A in update.values()) ** 0.5


def change(update: Factors, memory: Factors | None) -> Factors:
    """What an owner's trained LoRA changed, exactly, in factored form: B'A' − B_m A_m is
    ([B', −B_m], [A'; A_m]). Formed by the coordinator from the memory it sent (its own float32
    copy), so the change is what the owner ended at minus what the coordinator holds."""
    if memory is None:
        return update
    return {n: (torch.cat([B, -memory[n][0].to(B.dtype)], dim=1), torch.cat([A, memory[n][1].to(A.dtype)], dim=0))
            for n, (B, A) in update.items()}


def low_rank_sum(
    terms: list[tuple[float, torch.Tensor, torch.Tensor]], rank: int
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Best rank-``rank`` factors (B, A) of Σ w·B@A, and the relative truncation error.

    Never forms the d_out×d_in matrix: with R = Σ rᵢ, the work is two QRs of
    d×R matrices and one R×R SVD. Output always has exactly ``rank`` columns
    (zero-padded), so every module of a memory has the same shape.
    """
    if not terms:
        raise ValueError("low_rank_sum needs at least one term")
    dtype = terms[0][1].dtype
    Bs = torch.cat([w * B.double() for w, B, _ in terms], dim=1)  # d_out × R
    As = torch.cat([A.double() for _, _, A in terms], dim=0)  # R × d_in
    qb, rb = torch.linalg.qr(Bs)  # Bs = qb rb
    qa, ra = torch.linalg.qr(As.T)  # As = ra.T qa.T
    u, s, vh = torch.linalg.svd(rb @ ra.T)
    B, A, error = truncated_factors(qb @ u, s, vh @ qa.T, rank)
    return B.to(dtype), A.to(dtype), error


def truncated_factors(left: torch.Tensor, s: torch.Tensor, right: torch.Tensor, rank: int
                      ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """From an SVD left · diag(s) · right (s descending): the best rank-``rank`` factors (B, A), split
    balanced, zero-padded to exactly ``rank`` components, and the relative Frobenius error of the cut."""
    total = float(torch.sum(s * s))
    k = min(rank, s.numel())
    error = float(torch.sqrt(torch.sum(s[k:] ** 2) / total)) if total > 0 else 0.0
    root = torch.sqrt(s[:k])
    B = left[:, :k] * root  # balanced split keeps B and A on the same scale
    A = root[:, None] * right[:k]
    if k < rank:
        B = torch.cat([B, B.new_zeros(B.shape[0], rank - k)], dim=1)
        A = torch.cat([A, A.new_zeros(rank - k, A.shape[1])], dim=0)
    return B, A, error


def normalised(weights: list[float]) -> list[float]:
    total = float(sum(weights))
    if total <= 0 or any(w < 0 for w in weights):
        raise ValueError(f"aggregation weights must be non-negative with a positive sum, got {weights}")
    return [w / total for w in weights]


def check_same_modules(updates: list[Factors]) -> list[str]:
    names = sorted(updates[0])
    for i, u in enumerate(updates[1:], start=1):
        if sorted(u) != names:
            raise ValueError(f"update {i} covers different modules than update 0")
    return names


def aggregate_exact(memory: Factors | None, updates: list[Factors], weights: list[float], rank: int) -> Aggregate:
    """memory + Σ weights[k]·B_k A_k per module, re-factorised at ``rank``.

    ``weights`` are used as given (not normalised): pass 1/K for a mean of K updates, or
    1 to add an owner's update at full strength. A weight scales Bₖ, so it also applies a
    norm clip (``fedmem.validate.clip_scales``) exactly.
    """
    if not updates:
        raise ValueError("no client updates to aggregate")
    if len(weights) != len(updates):
        raise ValueError(f"{len(weights)} weights for {len(updates)} updates")
    out: Factors = {}
    errors: dict[str, float] = {}
    for name in check_same_modules(updates):
        terms = [(1.0, *memory[name])] if memory is not None and name in memory else []
        terms += [(w, *u[name]) for w, u in zip(weights, updates)]
        B, A, err = low_rank_sum(terms, rank)
        out[name], errors[name] = (B, A), err
    return Aggregate(out, errors, [float(w) for w in weights])


def aggregate_fedit(updates: list[Factors], weights: list[float]) -> Aggregate:
    """FedIT baseline: weighted mean of A and of B separately (inexact by design)."""
    if not updates:
        raise ValueError("no client updates to aggregate")
    p = normalised(weights)
    out: Factors = {}
    for name in check_same_modules(updates):
        B = sum(w * u[name][0] for w, u in zip(p, updates))
        A = sum(w * u[name][1] for w, u in zip(p, updates))
        out[name] = (B, A)
    return Aggregate(out, {name: 0.0 for name in out}, p)


def fedit_error(updates: list[Factors], weights: list[float]) -> float:
    """How far FedIT's product is from the true weighted mean of updates (max relative Frobenius)."""
    p = normalised(weights)
    worst = 0.0
    for name in check_same_modules(updates):
        exact = sum(w * dense(*u[name]) for w, u in zip(p, updates))
        B = sum(w * u[name][0].double() for w, u in zip(p, updates))
        A = sum(w * u[name][1].double() for w, u in zip(p, updates))
        norm = torch.linalg.norm(exact)
        if norm > 0:
            worst = max(worst, float(torch.linalg.norm(B @ A - exact) / norm))
    return worst


def secure_factor(server_round: int) -> str:
    """The factor owners train in a secure round: B in odd rounds, A in even ones (RoLoRA's alternation,
    so both factors learn; B every round, A fixed as in FFA-LoRA, measured lower on the devset)."""
    return "B" if server_round % 2 == 1 else "A"


def secure_start(memory: Factors | None, shapes: dict[str, tuple[int, int]], rank: int,
                 generator: torch.Generator, factor: str = "B") -> Factors:
    """Secure rounds: the LoRA every owner starts from, (B₀, A₀) per module, one factor fixed for the round.

    ``factor`` "B" (owners train B, A fixed): A = [A_m; R], the memory's A and ``rank`` fresh random
    rows (PEFT's own initialisation of A, uniform in ±1/√d_in); B₀ = [B_m, 0], so B₀A is the memory.
    Each update is (Bₖ − B₀)A and the round's sum is (Σ pₖBₖ)A − B₀A: linear in what the owners send,
    which is all secure aggregation can sum. The fresh rows give the memory new input directions.
    ``factor`` "A" (owners train A, B fixed): the memory itself, (B_m, A_m); the update is
    B_m(Aₖ − A_m), linear in Aₖ. ``shapes``: module -> (d_out, d_in).
    """
    if factor == "A":
        if memory is None:
            raise ValueError("a round that trains A needs a memory (the first secure round trains B)")
        return {name: (B.float(), A.float()) for name, (B, A) in sorted(memory.items())}
    out: Factors = {}
    for name, (d_out, d_in) in sorted(shapes.items()):
        bound = 1.0 / d_in**0.5
        fresh = (torch.rand(rank, d_in, generator=generator, dtype=torch.float64) * 2 - 1) * bound
        if memory is None:
            out[name] = (torch.zeros(d_out, rank), fresh.float())
        else:
            B, A = memory[name]
            out[name] = (torch.cat([B.float(), torch.zeros(d_out, rank)], dim=1),
                         torch.cat([A.float(), fresh.float()], dim=0))
    return out

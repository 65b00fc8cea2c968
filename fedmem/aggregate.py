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

import hashlib
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


# --- secure rounds: linear sketches of the owners' products ------------------------------------
#
# Secure aggregation reveals only a sum, and Σ Bₖ Aₖ is not a sum of anything an owner can send in
# factored form. A linear sketch is: every owner sends Yₖ = (BₖAₖ)Ω and Wₖ = Ψᵀ(BₖAₖ) for Gaussian
# Ω (d_in × s) and Ψ (d_out × k) that all share, so the coordinator learns Y = (Σ BₖAₖ)Ω and
# W = Ψᵀ(Σ BₖAₖ) and nothing else. From those two it rebuilds the sum (Tropp, Yurtsever, Udell &
# Cevher, "Practical sketching algorithms for low-rank matrix approximation", SIAM J. Matrix Anal.
# Appl. 2017, eq. 4.3): Q = orth(Y), X ≈ Q (ΨᵀQ)⁺ W, exactly whenever the sum's rank is at most s,
# which K owners' rank-r LoRAs are while K·r ≤ s. So a secure round aggregates what a plain parallel
# round does. Written here because it is a few lines of linear algebra on top of torch.linalg; the
# sketching libraries on the index target streaming data, not factors summed under masks.

SKETCH_OVERSAMPLING = 8
SKETCH_MAX_TERMS = 4  # beyond 4 rank-r terms the sketch approximates (near-optimally) instead


def sketch_sizes(terms: int, rank: int, d_out: int, d_in: int) -> tuple[int, int]:
    """(s, k): the range sketch's columns and the co-range sketch's rows for a module of shape
    d_out × d_in whose summed matrix is ``terms`` rank-``rank`` terms (K owners' products; K + 1 for
    their changes, which share the memory's term), neither beyond the matrix (where the sketch is the
    matrix itself in other coordinates, exact). While the sum's rank fits in ``SKETCH_MAX_TERMS``
    terms, s = terms·r + oversampling and k = s + oversampling: exact, and the solve well conditioned.
    Beyond it, s stops growing and the sketch approximates: then k = 2s + 1, the co-range size Tropp
    et al. recommend for the approximation's error bound (§4.5 of the paper above)."""
    if terms < 1 or rank < 1:
        raise ValueError(f"sketch sizes need terms and rank of at least 1, got {terms} and {rank}")
    s = min(min(terms, SKETCH_MAX_TERMS) * rank + SKETCH_OVERSAMPLING, d_in, d_out)
    k = s + SKETCH_OVERSAMPLING if terms <= SKETCH_MAX_TERMS else 2 * s + 1
    return s, min(k, d_out)


def sketch_operators(name: str, d_out: int, d_in: int, s: int, k: int, seed: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(Ω: d_in × s, Ψ: d_out × k), standard Gaussian, float64, the same for every party that knows the
    round's ``seed``: each module's generator is seeded from the seed and the module's name."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    omega = torch.randn(d_in, s, generator=generator, dtype=torch.float64)
    psi = torch.randn(d_out, k, generator=generator, dtype=torch.float64)
    return omega, psi


def sketch(B: torch.Tensor, A: torch.Tensor, omega: torch.Tensor, psi: torch.Tensor) -> torch.Tensor:
    """One owner's sketch of B @ A, without forming it: (BA)Ω (d_out × s) and Ψᵀ(BA) (k × d_in),
    flattened and concatenated into one float64 vector, as it is masked and summed."""
    B, A = B.double(), A.double()
    return torch.cat([(B @ (A @ omega)).reshape(-1), ((psi.T @ B) @ A).reshape(-1)])


def rebuilt(summed: torch.Tensor, psi: torch.Tensor, d_out: int, s: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q, core) with X ≈ Q @ core (d_out × s, s × d_in), for the matrix X whose sketch vector
    (``sketch``'s layout) is ``summed``. Exact (up to float) when rank(X) ≤ s."""
    k = psi.shape[1]
    Y = summed[: d_out * s].reshape(d_out, s).double()
    W = summed[d_out * s:].reshape(k, -1).double()
    Q, _ = torch.linalg.qr(Y)  # an orthonormal basis of X's range
    return Q, torch.linalg.lstsq(psi.T @ Q, W).solution


def from_sketch(summed: torch.Tensor, psi: torch.Tensor, d_out: int, s: int, rank: int
                ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Best rank-``rank`` factors (B, A) of the matrix whose sketch vector is ``summed``, and the
    relative truncation error of that cut."""
    Q, core = rebuilt(summed, psi, d_out, s)
    u, sv, vh = torch.linalg.svd(core, full_matrices=False)
    return truncated_factors(Q @ u, sv, vh, rank)

"""Property tests of the aggregation math (pure functions, no model)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmem.aggregate import (
    aggregate_exact,
    aggregate_fedit,
    dense,
    fedit_error,
    low_rank_sum,
    normalised,
    product_norm,
    update_norm,
)


def _factors(seed, d_out, d_in, r, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(d_out, r, generator=g, dtype=torch.float64) * scale, torch.randn(
        r, d_in, generator=g, dtype=torch.float64
    )


shapes = st.tuples(st.integers(1, 24), st.integers(1, 24))


@settings(max_examples=60, deadline=None)
@given(
    shape=shapes,
    ranks=st.lists(st.integers(1, 5), min_size=1, max_size=4),
    weights=st.lists(st.floats(0.05, 3.0), min_size=4, max_size=4),
    seed=st.integers(0, 10_000),
    with_memory=st.booleans(),
)
def test_exact_aggregate_reproduces_weighted_sum_when_rank_allows(shape, ranks, weights, seed, with_memory):
    d_out, d_in = shape
    updates = [{"m": _factors(seed + i, d_out, d_in, r)} for i, r in enumerate(ranks)]
    memory = {"m": _factors(seed + 99, d_out, d_in, 2)} if with_memory else None
    w = weights[: len(updates)]
    total_rank = sum(ranks) + (2 if with_memory else 0)
    agg = aggregate_exact(memory, updates, w, rank=total_rank)
    expected = sum(wk * dense(*u["m"]) for wk, u in zip(w, updates))
    if memory:
        expected = expected + dense(*memory["m"])
    got = dense(*agg.factors["m"])
    assert torch.allclose(got, expected, atol=1e-8 * (1 + expected.abs().max()))
    assert agg.truncation_error["m"] < 1e-6
    B, A = agg.factors["m"]
    assert B.shape == (d_out, total_rank) and A.shape == (total_rank, d_in)


@settings(max_examples=40, deadline=None)
@given(shape=st.tuples(st.integers(4, 20), st.integers(4, 20)), rank=st.integers(1, 3), seed=st.integers(0, 10_000))
def test_truncation_is_the_best_low_rank_approximation(shape, rank, seed):
    d_out, d_in = shape
    terms = [(1.0, *_factors(seed, d_out, d_in, 3)), (0.5, *_factors(seed + 1, d_out, d_in, 3))]
    B, A, err = low_rank_sum(terms, rank)
    full = sum(w * dense(b, a) for w, b, a in terms)
    s = torch.linalg.svdvals(full)
    # Eckart–Young: the best rank-k error is the tail of the singular values.
    best = torch.sqrt(torch.sum(s[rank:] ** 2) / torch.sum(s**2))
    assert err == pytest.approx(float(best), rel=1e-6, abs=1e-9)
    achieved = torch.linalg.norm(full - dense(B, A)) / torch.linalg.norm(full)
    assert float(achieved) == pytest.approx(float(best), rel=1e-5, abs=1e-9)


def test_output_rank_is_padded_to_the_memory_rank():
    B, A, err = low_rank_sum([(1.0, *_factors(1, 6, 5, 2))], rank=8)
    assert B.shape == (6, 8) and A.shape == (8, 5) and err == 0.0


def test_zero_updates_aggregate_to_zero():
    z = (torch.zeros(5, 2, dtype=torch.float64), torch.zeros(2, 4, dtype=torch.float64))
    agg = aggregate_exact(None, [{"m": z}, {"m": z}], [1.0, 1.0], rank=4)
    assert torch.count_nonzero(dense(*agg.factors["m"])) == 0 and agg.truncation_error["m"] == 0.0


def test_fedit_is_not_the_mean_of_products_but_exact_is():
    updates = [{"m": _factors(i, 12, 10, 4)} for i in range(3)]
    w = [1.0, 2.0, 3.0]
    p = normalised(w)
    true_mean = sum(pk * dense(*u["m"]) for pk, u in zip(p, updates))
    fedit = dense(*aggregate_fedit(updates, w).factors["m"])
    exact = dense(*aggregate_exact(None, updates, p, rank=12).factors["m"])
    assert torch.allclose(exact, true_mean, atol=1e-9)
    assert torch.linalg.norm(fedit - true_mean) / torch.linalg.norm(true_mean) > 0.1
    assert fedit_error(updates, w) > 0.1


def test_fedit_of_one_client_is_that_client():
    u = {"m": _factors(3, 6, 5, 2)}
    agg = aggregate_fedit([u], [7.0])
    assert torch.allclose(dense(*agg.factors["m"]), dense(*u["m"]))


@pytest.mark.parametrize("bad", [[], [0.0, 0.0], [-1.0, 2.0]])
def test_bad_weights_are_refused(bad):
    with pytest.raises(ValueError):
        normalised(bad)


def test_mismatched_inputs_are_refused():
    u1 = {"a": _factors(1, 4, 4, 2)}
    u2 = {"b": _factors(2, 4, 4, 2)}
    with pytest.raises(ValueError, match="different modules"):
        aggregate_exact(None, [u1, u2], [1.0, 1.0], rank=4)
    with pytest.raises(ValueError, match="weights"):
        aggregate_exact(None, [u1], [1.0, 1.0], rank=4)
    with pytest.raises(ValueError, match="no client updates"):
        aggregate_exact(None, [], [], rank=4)


def test_float32_factors_come_back_float32():
    B, A = (t.float() for t in _factors(5, 8, 6, 3))
    agg = aggregate_exact(None, [{"m": (B, A)}], [1.0], rank=3)
    assert agg.factors["m"][0].dtype == torch.float32
    assert torch.allclose(dense(*agg.factors["m"]), dense(B, A), atol=1e-4)


@settings(max_examples=40, deadline=None)
@given(shape=shapes, rank=st.integers(1, 6), seed=st.integers(0, 10_000), scale=st.sampled_from([1e-3, 1.0, 1e6]))
def test_norm_in_factored_form_is_the_dense_norm(shape, rank, seed, scale):
    d_out, d_in = shape
    B, A = _factors(seed, d_out, d_in, rank, scale)
    assert product_norm(B, A) == pytest.approx(float(torch.linalg.norm(dense(B, A))), rel=1e-9, abs=1e-12)
    other = _factors(seed + 1, d_in, d_out, rank)
    both = {"a": (B, A), "b": other}
    assert update_norm(both) == pytest.approx((product_norm(B, A) ** 2 + product_norm(*other) ** 2) ** 0.5)


@settings(max_examples=30, deadline=None)
@given(shape=shapes, weights=st.lists(st.floats(0.01, 1.0), min_size=1, max_size=4), seed=st.integers(0, 10_000))
def test_aggregate_reports_the_weights_it_used(shape, weights, seed):
    d_out, d_in = shape
    updates = [{"m": _factors(seed + i, d_out, d_in, 1)} for i in range(len(weights))]
    assert aggregate_exact(None, updates, weights, rank=len(weights)).weights == weights
    assert aggregate_fedit(updates, weights).weights == pytest.approx(normalised(weights))

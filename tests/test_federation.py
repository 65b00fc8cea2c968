"""One round's plain functions (no Flower): what a client sends and how the server folds it in."""

import pytest
import torch

from fedmem.aggregate import aggregate_exact, change, dense
from fedmem.config import FederationConfig, LoraSettings
from fedmem.corpus import load_corpus
from fedmem.federation import client_update, federate_in_process, server_aggregate, training_span


def _config(**kw):
    return FederationConfig(lora=LoraSettings(rank=4, alpha=8, epochs=1, batch_size=2), **kw)


def test_first_client_update_is_a_rank_r_lora(tiny_base, two_clients):
    result = client_update(tiny_base, load_corpus(two_clients / "alpha"), None, _config(), server_round=1)
    B, A = next(iter(result.factors.values()))
    assert B.shape[1] == 4 and A.shape[0] == 4
    assert result.metrics["examples"] > 0 and result.metrics["final_loss"] > 0


def test_continuing_client_sends_its_lora_and_the_server_adds_the_exact_change(tiny_base, two_clients):
    config = _config()
    corpus = load_corpus(two_clients / "alpha")
    first = client_update(tiny_base, corpus, None, config, server_round=1)
    memory = aggregate_exact(None, [first.factors], [1.0], rank=4).factors
    second = client_update(tiny_base, corpus, memory, config, server_round=2)
    # The owner sends the rank-4 LoRA it trained; the server forms new − memory (twice the rank), and
    # memory + that change is the owner's LoRA, so it fits rank 4 with no loss.
    assert next(iter(second.factors.values()))[1].shape[0] == 4
    agg = aggregate_exact(memory, [change(second.factors, memory)], [1.0], rank=4)
    assert agg.max_truncation_error < 1e-5
    for name in memory:
        assert torch.allclose(dense(*agg.factors[name]), dense(*second.factors[name]), atol=1e-6)
    changed = [n for n in memory if not torch.allclose(dense(*agg.factors[n]), dense(*memory[n]), atol=1e-6)]
    assert changed  # training moved something


def test_server_weights_every_accepted_update_alike():
    g = torch.Generator().manual_seed(0)
    u1 = {
        "m": (torch.randn(3, 1, generator=g, dtype=torch.float64), torch.randn(1, 2, generator=g, dtype=torch.float64))
    }
    u2 = {
        "m": (torch.randn(3, 1, generator=g, dtype=torch.float64), torch.randn(1, 2, generator=g, dtype=torch.float64))
    }
    mean = server_aggregate(None, [u1, u2], _config())
    # Equal weights per accepted owner: the server cannot check an example count, so none is asked for.
    assert torch.allclose(dense(*mean.factors["m"]), 0.5 * dense(*u1["m"]) + 0.5 * dense(*u2["m"]))
    assert mean.weights == [0.5, 0.5]
    fedit = server_aggregate(None, [u1, u2], _config(method="fedit", schedule="parallel"))
    B, A = fedit.factors["m"]
    assert torch.allclose(B, 0.5 * u1["m"][0] + 0.5 * u2["m"][0])
    assert torch.allclose(A, 0.5 * u1["m"][1] + 0.5 * u2["m"][1])
    with pytest.raises(ValueError, match="no client updates"):
        server_aggregate(None, [], _config())


@pytest.mark.parametrize(
    "bad",
    [
        dict(method="avg"),
        dict(rounds=0),
        dict(rounds="3"),
        dict(schedule="ring"),
        dict(lora=dict(rank=0)),
        dict(lora=dict(learning_rate=0.0)),
        dict(lora=dict(retention=1.5)),
        dict(lora=dict(recipe="distilled")),
    ],
)
def test_bad_config_is_refused(bad):
    with pytest.raises(ValueError):
        FederationConfig(**bad)


def test_training_span_tiles_one_schedule():
    parallel = FederationConfig(rounds=3, schedule="parallel")
    assert [training_span(parallel, r, v, 2) for r in (1, 2, 3) for v in (0, 1)] == [
        (0, 1 / 3),
        (0, 1 / 3),
        (1 / 3, 2 / 3),
        (1 / 3, 2 / 3),
        (2 / 3, 1),
        (2 / 3, 1),
    ]
    cyclic = FederationConfig(rounds=2, schedule="cyclic")
    spans = [training_span(cyclic, r, v, 3) for r in (1, 2) for v in range(3)]
    assert spans[0][0] == 0 and spans[-1][1] == 1
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))  # visits follow each other, no gap or overlap
    with pytest.raises(ValueError):
        training_span(cyclic, 1, 3, 3)


def test_cyclic_round_trains_each_owner_on_the_memory_the_previous_one_left(tiny_base, two_clients):
    corpora = [load_corpus(two_clients / n) for n in ("alpha", "beta")]
    config = _config(schedule="cyclic", rounds=1)
    memory = federate_in_process(tiny_base, corpora, config)
    # The same round by hand: alpha from nothing, then beta on alpha's memory, each update in full.
    first = client_update(tiny_base, corpora[0], None, config, 1, span=training_span(config, 1, 0, 2))
    after_alpha = server_aggregate(None, [first.factors], config).factors
    second = client_update(tiny_base, corpora[1], after_alpha, config, 1, span=training_span(config, 1, 1, 2))
    by_hand = aggregate_exact(after_alpha, [change(second.factors, after_alpha)], [1.0], rank=4).factors
    for name in memory:
        assert torch.allclose(dense(*memory[name]), dense(*by_hand[name]), atol=1e-6)
    parallel = federate_in_process(tiny_base, corpora, _config(schedule="parallel", rounds=1))
    assert any(not torch.allclose(dense(*memory[n]), dense(*parallel[n]), atol=1e-4) for n in memory)

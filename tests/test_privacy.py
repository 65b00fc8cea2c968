"""Owner-level differential privacy: the clipping, the noise, the accountant, the budget, and a private
run on Flower's simulation engine (what travels, what is published, a run that would overspend)."""

from __future__ import annotations

import dataclasses
import json
import math
import pickle

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmem.aggregate import aggregate_exact, change, dense, update_norm
from fedmem.client_policy import policy_problems
from fedmem.config import ClientPolicy, FederationConfig, LoraSettings, PrivacySettings
from fedmem.federation import server_aggregate
from fedmem.privacy import (
    PrivacyBudgetSpent,
    check_budget,
    clip_scale,
    epsilon_spent,
    noise_multiplier,
    private_sum,
)

SHAPES = {"m.q": (12, 10), "m.up": (20, 10)}


def _factors(rank: int, seed: int, scale: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    return {n: (scale * torch.randn(o, rank, generator=g), torch.randn(rank, i, generator=g))
            for n, (o, i) in SHAPES.items()}


def _dense(factors):
    return {n: dense(B, A) for n, (B, A) in factors.items()}


# --- clipping and noise ---


def test_clip_scale():
    assert clip_scale(3.0, 5.0) == 1.0 and clip_scale(10.0, 5.0) == 0.5
    with pytest.raises(ValueError, match="clipping norm"):
        clip_scale(1.0, 0.0)


@settings(max_examples=25, deadline=None)
@given(k=st.integers(1, 4), seed=st.integers(0, 10_000), with_memory=st.booleans())
def test_without_noise_and_within_the_clip_it_is_the_exact_aggregate(k, seed, with_memory):
    memory = _factors(2, seed + 99) if with_memory else None
    changes = [_factors(2, seed + i) for i in range(k)]
    clip = 2 * max(update_norm(c) for c in changes)
    ours, scales = private_sum(memory, changes, 1.0 / k, rank=10, clip=clip, z=0.0)
    assert scales == [1.0] * k
    exact = aggregate_exact(memory, changes, [1.0 / k] * k, rank=10)
    for name in SHAPES:
        assert torch.allclose(dense(*ours.factors[name]), dense(*exact.factors[name]), atol=1e-4)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), factor=st.floats(1.5, 1e4))
def test_an_update_of_any_size_adds_at_most_the_clip(seed, factor):
    big = _factors(2, seed, scale=1.0)
    clip = update_norm(big) / factor
    ours, scales = private_sum(None, [big], 1.0, rank=10, clip=clip, z=0.0)
    added = math.sqrt(sum(float(torch.sum(d ** 2)) for d in _dense(ours.factors).values()))
    assert added == pytest.approx(clip, rel=1e-4)
    assert scales[0] == pytest.approx(1 / factor, rel=1e-6)
    assert ours.weights == pytest.approx([1 / factor], rel=1e-6)


def test_the_noise_is_gaussian_of_the_promised_size_and_never_the_same_twice():
    zero = {n: (torch.zeros(o, 1), torch.zeros(1, i)) for n, (o, i) in SHAPES.items()}
    clip, z, weight = 3.0, 0.7, 0.25
    # Rank as large as the matrices: nothing truncated, the result is weight × noise.
    first, _ = private_sum(None, [zero], weight, rank=12, clip=clip, z=z)
    second, _ = private_sum(None, [zero], weight, rank=12, clip=clip, z=z)
    noise = torch.cat([d.flatten() for d in _dense(first.factors).values()])
    assert noise.numel() == 12 * 10 + 20 * 10
    assert float(noise.mean()) == pytest.approx(0.0, abs=0.1)
    assert float(noise.std()) == pytest.approx(weight * z * clip, rel=0.12)
    again = torch.cat([d.flatten() for d in _dense(second.factors).values()])
    assert not torch.allclose(noise, again)  # drawn from the operating system, not a fixed seed


def test_a_seeded_generator_makes_it_repeatable_and_the_rank_is_kept():
    changes = [_factors(2, 1), _factors(2, 2)]
    a, _ = private_sum(None, changes, 0.5, rank=3, clip=1.0, z=0.5, generator=torch.Generator().manual_seed(7))
    b, _ = private_sum(None, changes, 0.5, rank=3, clip=1.0, z=0.5, generator=torch.Generator().manual_seed(7))
    for name, (o, i) in SHAPES.items():
        assert a.factors[name][0].shape == (o, 3) and a.factors[name][1].shape == (3, i)
        assert torch.equal(a.factors[name][0], b.factors[name][0])
        assert 0 < a.truncation_error[name] < 1  # the noise is full rank: the rank leaves some out


def test_server_aggregate_takes_the_private_path_with_the_schedules_weight():
    memory, trained = _factors(4, 5), [_factors(4, 6), _factors(4, 7)]
    for schedule, updates, weight in (("parallel", trained, 0.5), ("cyclic", trained[:1], 1.0)):
        config = FederationConfig(rounds=2, schedule=schedule, lora=LoraSettings(rank=4),
                                  privacy=PrivacySettings(dp_epsilon=1e9, dp_clip=0.01))
        agg = server_aggregate(memory, updates, config)
        norms = [update_norm(change(u, memory)) for u in updates]
        # Every change is far above the clip: each is folded in scaled to 0.01 / its norm.
        assert agg.weights == pytest.approx([weight * 0.01 / n for n in norms], rel=1e-6)


# --- the accountant ---


def _exact_delta(epsilon: float, mu: float) -> float:
    """δ(ε) of the Gaussian mechanism at μ = sensitivity / σ (Balle & Wang 2018); T rounds compose to μ√T."""
    from scipy.special import log_ndtr  # log Φ: e^ε Φ(·) overflows for a large ε unless taken in logs

    return math.exp(log_ndtr(-epsilon / mu + mu / 2)) - math.exp(epsilon + log_ndtr(-epsilon / mu - mu / 2))


@pytest.mark.parametrize("epsilon,rounds", [(1.0, 3), (8.0, 3), (8.0, 10), (100.0, 3), (1e4, 5)])
def test_the_noise_spends_the_budget_and_the_bound_holds(epsilon, rounds):
    delta = 1e-5
    z = noise_multiplier(epsilon, delta, rounds)
    spent = epsilon_spent([z] * rounds, delta)
    assert epsilon * 0.98 <= spent <= epsilon
    # RDP is an upper bound: at the ε it reports, the exact privacy curve of T Gaussian mechanisms
    # (sensitivity 1, noise z each) has δ at most the target, and it is not vacuous (not far below).
    exact = _exact_delta(spent, math.sqrt(rounds) / z)
    assert exact <= delta
    assert exact >= delta * 1e-4 or epsilon >= 1e4


def test_more_rounds_or_a_smaller_epsilon_need_more_noise():
    assert noise_multiplier(1.0, 1e-5, 3) > noise_multiplier(10.0, 1e-5, 3) > noise_multiplier(100.0, 1e-5, 3)
    assert noise_multiplier(10.0, 1e-5, 10) > noise_multiplier(10.0, 1e-5, 3)
    with pytest.raises(ValueError):
        noise_multiplier(0.0, 1e-5, 3)


def test_no_round_runs_past_the_budget():
    z = noise_multiplier(5.0, 1e-5, 3)
    history: list[float] = []
    for _ in range(3):
        assert check_budget(history, z, 5.0, 1e-5) <= 5.0
        history.append(z)
    with pytest.raises(PrivacyBudgetSpent, match="past the budget dp-epsilon = 5"):
        check_budget(history, z, 5.0, 1e-5)
    # More rounds planned after some were spent at less noise: the first round at the new noise already overspends.
    z_five = noise_multiplier(5.0, 1e-5, 5)
    with pytest.raises(PrivacyBudgetSpent):
        check_budget(history, z_five, 5.0, 1e-5)


# --- the settings and the owners' policy ---


@pytest.mark.parametrize("kwargs,message", [
    ({"dp_epsilon": -1.0}, "dp-epsilon must be >= 0"),
    ({"dp_epsilon": float("inf")}, "dp-epsilon must be >= 0"),
    ({"dp_delta": 1.0}, "dp-delta must be in"),
    ({"dp_clip": 0.0}, "dp-clip must be > 0"),
    ({"dp_clip": float("nan")}, "dp-clip must be > 0"),
])
def test_bad_privacy_settings_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PrivacySettings(**kwargs)


def test_fedit_cannot_be_private_and_the_settings_travel_as_a_dict():
    with pytest.raises(ValueError, match="dp-epsilon needs method exact"):
        FederationConfig(method="fedit", schedule="parallel", privacy=PrivacySettings(dp_epsilon=4.0))
    with pytest.raises(ValueError, match="dp-epsilon needs --schedule parallel or cyclic: routed"):
        FederationConfig(privacy=PrivacySettings(dp_epsilon=4.0))  # the default schedule keeps owners apart
    sent = FederationConfig(schedule="parallel", privacy=PrivacySettings(dp_epsilon=4.0)).to_dict()
    assert FederationConfig(**json.loads(json.dumps(sent))).privacy.dp_epsilon == 4.0


def test_an_owner_can_require_differential_privacy():
    policy = ClientPolicy(require_dp_epsilon=8.0)
    assert "no differential privacy" in policy_problems(FederationConfig(), policy)[0]
    too_weak = FederationConfig(schedule="parallel", privacy=PrivacySettings(dp_epsilon=20.0))
    assert "dp-epsilon 20 refused" in policy_problems(too_weak, policy)[0]
    assert policy_problems(FederationConfig(schedule="parallel", privacy=PrivacySettings(dp_epsilon=8.0)),
                           policy) == []
    assert policy_problems(FederationConfig(), ClientPolicy()) == []


# --- a private run on the simulation engine ---


def _metrics_spy(folder: str):
    """A client mod that writes down the names of the metrics every training reply carries."""

    def mod(msg, context, call_next):
        reply = call_next(msg, context)
        if msg.metadata.message_type == "train" and not reply.has_error():
            name = f"{context.node_config['partition-id']}-{msg.metadata.message_id[:12]}.pkl"
            with open(f"{folder}/{name}", "wb") as fh:
                pickle.dump(sorted(reply.content["metrics"].keys()), fh)
        return reply

    return mod


def test_a_private_run_publishes_its_epsilon_and_nothing_the_noise_does_not_cover(tmp_path, tiny_base,
                                                                                 two_clients):
    from fedmem.base_model import fingerprint
    from fedmem.config import NodeSettings
    from fedmem.flower import simulation
    from fedmem.memory import verify_memory

    out, folder = tmp_path / "out", tmp_path / "sent"
    folder.mkdir()
    config = FederationConfig(rounds=2, schedule="parallel", lora=LoraSettings(rank=4, alpha=8, epochs=1),
                              privacy=PrivacySettings(dp_epsilon=50.0, dp_clip=0.5))
    real_client = simulation.make_client_app
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(simulation, "make_client_app",
                   lambda dirs, node: real_client(dirs, node, mods=[_metrics_spy(str(folder))]))
        summary = simulation.simulate(two_clients, out, config, NodeSettings(device="cpu", base=str(tiny_base)))
    sent = [pickle.loads(p.read_bytes()) for p in folder.iterdir()]
    assert len(sent) == 4 and all(keys == [] for keys in sent)  # two owners, two rounds: no metrics at all
    z = noise_multiplier(50.0, 1e-5, 2)
    rows = summary["rounds"]
    assert [r["privacy"]["noise_multiplier"] for r in rows] == [z, z]
    assert rows[0]["privacy"]["epsilon"] == pytest.approx(epsilon_spent([z], 1e-5))
    assert 49.0 <= rows[1]["privacy"]["epsilon"] <= 50.0
    assert all(r["client_metrics"] == {} for r in rows)
    manifest = verify_memory(out / "memory", fingerprint(tiny_base))
    assert manifest["privacy"]["epsilon"] == rows[1]["privacy"]["epsilon"]
    assert manifest["privacy"]["budget"] == 50.0 and manifest["federation"]["privacy"]["dp_clip"] == 0.5
    for update in manifest["metrics"]["updates"].values():
        assert set(update) == {"key", "node", "bytes_down", "bytes_up"}  # no norm, no weight


def test_a_resumed_run_that_would_overspend_stops_and_keeps_what_it_had(tmp_path, tiny_base, two_clients):
    from fedmem.base_model import fingerprint
    from fedmem.config import NodeSettings
    from fedmem.flower import simulation
    from fedmem.memory import verify_memory

    out = tmp_path / "out"
    lora = LoraSettings(rank=4, alpha=8, epochs=1)
    private = PrivacySettings(dp_epsilon=20.0)
    real_server = simulation.make_server_app

    def run(config):
        with pytest.MonkeyPatch.context() as mp:  # as fedmem-server start does: pick up after the last round
            mp.setattr(simulation, "make_server_app", lambda plan: real_server(
                dataclasses.replace(plan, server=dataclasses.replace(plan.server, resume=True))))
            return simulation.simulate(two_clients, out, config, NodeSettings(device="cpu", base=str(tiny_base)))

    run(FederationConfig(rounds=1, schedule="parallel", lora=lora, privacy=private))
    before = (out / "metrics.jsonl").read_text()
    # Two rounds planned now: round 2's noise is for two rounds, and round 1 spent more than half.
    with pytest.raises(PrivacyBudgetSpent, match="past the budget dp-epsilon = 20 .1 rounds spent 20"):
        run(FederationConfig(rounds=2, schedule="parallel", lora=lora, privacy=private))
    # Nor can a private run go on without privacy (or with another budget): other settings, not resumed.
    with pytest.raises(RuntimeError, match="made with other federation settings"):
        run(FederationConfig(rounds=2, schedule="parallel", lora=lora))
    assert (out / "metrics.jsonl").read_text() == before
    assert verify_memory(out / "memory", fingerprint(tiny_base))["round"] == 1


def test_a_private_round_never_records_the_metrics_a_reply_carries_anyway(monkeypatch):
    """An owner (or an old client) that sends losses and counts in a private run: the screen accepts the
    update and drops them, even ones it would otherwise refuse (a NaN loss), so nothing reaches metrics.jsonl."""
    from types import SimpleNamespace

    from flwr.app import ConfigRecord, MetricRecord, RecordDict

    from fedmem.config import ServerSettings
    from fedmem.flower import screening
    from fedmem.flower.messages import INFO_KEY, METRICS_KEY, UPDATE_KEY, factors_to_record
    from fedmem.flower.roster import Owner
    from fedmem.flower.screening import Screen
    from fedmem.validate import Rejected

    # A Flower Message needs a running run; a stand-in with its content and sender will do (no size to count).
    monkeypatch.setattr(screening, "message_bytes", lambda message: 0)
    shapes = {n: (o, i) for n, (o, i) in SHAPES.items()}
    g = torch.Generator().manual_seed(3)
    update = {n: (0.01 * torch.randn(o, 4, generator=g), 0.01 * torch.randn(4, i, generator=g))
              for n, (o, i) in shapes.items()}

    def reply():
        content = RecordDict({UPDATE_KEY: factors_to_record(update, "fp32"),
                              METRICS_KEY: MetricRecord({"examples": 12.0, "first_loss": float("nan"),
                                                         "final_loss": 0.5}),
                              INFO_KEY: ConfigRecord({"base_fingerprint": "fp"})})
        return SimpleNamespace(content=content, metadata=SimpleNamespace(src_node_id=7))

    private = FederationConfig(schedule="parallel", lora=LoraSettings(rank=4), privacy=PrivacySettings(dp_epsilon=8.0))
    accepted = Screen("fp", private, ServerSettings(), shapes, {}).check(reply(), Owner("owner"), None)
    assert accepted.metrics == {} and accepted.factors.keys() == update.keys()
    # Without privacy the same reply is refused for its NaN loss: the screen above did not just skip checks.
    with pytest.raises(Rejected, match="first_loss"):
        Screen("fp", FederationConfig(lora=LoraSettings(rank=4)), ServerSettings(), shapes, {}).check(
            reply(), Owner("owner"), None)

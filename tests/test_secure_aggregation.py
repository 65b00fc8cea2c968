"""Secure aggregation (issue 18, item 1): the protocol's pure functions attacked one by one, the frozen-A
layout that makes the sum linear, and secure rounds on Flower's simulation engine (an owner dropping
after masking included)."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import chisquare

from fedmem import secure_sum as ss
from fedmem.aggregate import aggregate_exact, change, dense, low_rank_sum, secure_factor, secure_start
from fedmem.config import FederationConfig, LoraSettings, PrivacySettings
from fedmem.flower import secure_round


def _round(nodes: list[int], session: bytes | None = None):
    """Every owner through the keys and shares steps: (session, keys, roster, commitments)."""
    session = session or os.urandom(16)
    keys = {n: ss.OwnerKeys.fresh() for n in nodes}
    roster = {n: keys[n].public() for n in nodes}
    mail: dict[int, dict[int, bytes]] = {n: {} for n in nodes}
    commitments = {}
    for n in nodes:
        ss.check_roster(roster, n, roster[n])
        sent, commitments[n] = ss.share_secrets(keys[n], n, roster, session)
        for dst, blob in sent.items():
            mail[dst][n] = blob
    for n in nodes:
        ss.open_shares(keys[n], n, roster, session, mail[n])
    return session, keys, roster, commitments, mail


def _sum(nodes, vectors, survivors, session, keys, roster, commitments, lie=None):
    masked = {n: ss.mask(ss.encode(vectors[n])[0], keys[n], n, roster, session) for n in nodes}
    total = sum(masked[n] for n in survivors)
    dropped = [n for n in nodes if n not in survivors]
    revealed = {n: ss.reveal(keys[n], n, survivors, dropped, len(nodes)) for n in survivors}
    if lie is not None:
        revealed[lie] = {k: v[:-1] + bytes([v[-1] ^ 0xFF]) for k, v in revealed[lie].items()}
    summed, liars = ss.unmask(total, roster, session, survivors, dropped, revealed, commitments)
    return ss.decode(summed), liars, masked


@settings(max_examples=15, deadline=None)
@given(owners=st.integers(2, 6), size=st.integers(1, 300), seed=st.integers(0, 2**16))
def test_the_unmasked_sum_is_the_plain_sum_within_the_encoding(owners, size, seed):
    rng = np.random.default_rng(seed)
    nodes = [int(n) for n in rng.choice(10**6, owners, replace=False)]
    vectors = {n: rng.normal(scale=rng.uniform(1e-4, 100), size=size) for n in nodes}
    session, keys, roster, commitments, _ = _round(nodes)
    got, liars, _ = _sum(nodes, vectors, nodes, session, keys, roster, commitments)
    assert liars == []
    # Each value is rounded to 2^-32, so the sum is within owners · 2^-33 of the plain sum.
    assert np.abs(got - sum(vectors.values())).max() <= owners * 2.0**-33 + 1e-12


def test_what_the_coordinator_receives_from_one_owner_is_uniform():
    nodes = [3, 8, 21]
    session, keys, roster, _, _ = _round(nodes)
    # The worst case for a mask: an owner whose update is all zeros (or one constant).
    for values in (np.zeros(200_000), np.full(200_000, 0.125)):
        masked = ss.mask(ss.encode(values)[0], keys[8], 8, roster, session)
        data = masked.view(np.uint8)
        counts = np.bincount(data, minlength=256)
        assert chisquare(counts).pvalue > 1e-4  # bytes uniform
        bits = np.unpackbits(data[:100_000])
        assert abs(bits.mean() - 0.5) < 0.005
        assert len(np.unique(masked)) == masked.size  # no value repeats, as 2^64-uniform values would not
    # And two rounds of the same vector share nothing.
    s2, keys2, roster2, _, _ = _round(nodes)
    again = ss.mask(ss.encode(np.zeros(1000))[0], keys2[8], 8, roster2, s2)
    first = ss.mask(ss.encode(np.zeros(1000))[0], keys[8], 8, roster, session)
    assert not np.any(again == first)


def test_an_owner_that_drops_after_the_shares_is_recovered():
    nodes = [5, 9, 14, 30, 44]
    rng = np.random.default_rng(0)
    vectors = {n: rng.normal(size=500) for n in nodes}
    session, keys, roster, commitments, _ = _round(nodes)
    survivors = [5, 14, 30, 44]  # 9 masked with everyone, then never sent its vector
    got, _, masked = _sum(nodes, vectors, survivors, session, keys, roster, commitments)
    assert np.abs(got - sum(vectors[n] for n in survivors)).max() < 1e-8
    # Without removing 9's pairwise masks the sum would be noise.
    naive = ss.decode(sum(masked[n] for n in survivors))
    assert np.abs(naive - sum(vectors[n] for n in survivors)).max() > 1e3
    # Two of five dropped is one too many for the threshold of three.
    with pytest.raises(ss.SecureAggregationError, match="3 needed"):
        ss.reveal(keys[5], 5, [5, 14], [9, 30, 44], len(nodes))


def test_a_wrong_or_replayed_share_is_refused():
    nodes = [1, 2, 3]
    session, keys, roster, _, mail = _round(nodes)
    blob = mail[2][1]
    altered = blob[:-1] + bytes([blob[-1] ^ 1])
    with pytest.raises(ss.SecureAggregationError, match="does not authenticate"):
        ss.open_shares(keys[2], 2, roster, session, {1: altered})
    with pytest.raises(ss.SecureAggregationError, match="does not authenticate"):  # meant for owner 3
        ss.open_shares(keys[3], 3, roster, session, {1: blob})
    with pytest.raises(ss.SecureAggregationError, match="does not authenticate"):  # relabelled as from 3
        ss.open_shares(keys[2], 2, roster, session, {3: blob})
    with pytest.raises(ss.SecureAggregationError, match="not another owner"):
        ss.open_shares(keys[2], 2, roster, session, {7: blob})
    # Replayed into the next round (same owners, same keys even): another session, refused.
    with pytest.raises(ss.SecureAggregationError, match="does not authenticate"):
        ss.open_shares(keys[2], 2, roster, os.urandom(16), {1: blob})


def test_a_wrong_share_in_the_unmask_step_is_found_and_named():
    nodes = [4, 6, 8, 10, 12]
    rng = np.random.default_rng(1)
    vectors = {n: rng.normal(size=50) for n in nodes}
    session, keys, roster, commitments, _ = _round(nodes)
    got, liars, _ = _sum(nodes, vectors, [4, 6, 8, 12], session, keys, roster, commitments, lie=8)
    assert liars == [8]
    assert np.abs(got - sum(vectors[n] for n in [4, 6, 8, 12])).max() < 1e-8
    # With only the threshold's worth of shares a lie cannot be outvoted: the round stops, it is not corrupted.
    with pytest.raises(ss.SecureAggregationError, match="no 3 of the 3 shares"):
        _sum(nodes, vectors, [4, 6, 8], session, keys, roster, commitments, lie=8)


def test_an_owner_never_reveals_both_secrets_of_one_owner():
    nodes = [1, 2, 3, 4]
    _, keys, _, _, _ = _round(nodes)
    with pytest.raises(ss.SecureAggregationError, match="both"):
        ss.reveal(keys[1], 1, [1, 2, 3], [3], 4)
    with pytest.raises(ss.SecureAggregationError, match="no shares"):
        ss.reveal(keys[1], 1, [1, 2, 3], [99], 4)


def test_the_roster_is_checked():
    nodes = [1, 2, 3]
    keys = {n: ss.OwnerKeys.fresh() for n in nodes}
    roster = {n: keys[n].public() for n in nodes}
    with pytest.raises(ss.SecureAggregationError, match="own public keys"):
        ss.check_roster({**roster, 1: keys[2].public()}, 1, keys[1].public())
    with pytest.raises(ss.SecureAggregationError, match="twice"):
        ss.check_roster({**roster, 4: roster[2]}, 1, keys[1].public())
    with pytest.raises(ss.SecureAggregationError, match="32-byte"):
        ss.check_roster({**roster, 4: (b"short", b"x" * 32)}, 1, keys[1].public())
    with pytest.raises(ss.SecureAggregationError, match="at least 2"):
        ss.check_roster({1: keys[1].public()}, 1, keys[1].public())


def test_values_beyond_the_bound_are_clipped_and_counted_and_non_finite_ones_refused():
    fixed, clipped = ss.encode(np.array([1.0, -3 * ss.BOUND, 2 * ss.BOUND]))
    assert clipped == 2
    assert list(ss.decode(fixed)) == [1.0, -ss.BOUND, ss.BOUND]
    with pytest.raises(ss.SecureAggregationError, match="not finite"):
        ss.encode(np.array([0.0, np.nan]))


# --- the layout: one factor fixed, owners train the other ---


def test_with_one_factor_fixed_the_mean_of_the_updates_is_linear_in_what_owners_send():
    shapes = {"m1": (12, 9), "m2": (7, 11)}
    gen = torch.Generator().manual_seed(0)
    memory = {n: (torch.randn(o, 3), torch.randn(3, i)) for n, (o, i) in shapes.items()}
    for part, factor in ((0, "B"), (1, "A")):
        start = secure_start(memory, shapes, 3, gen, factor)
        rank = 6 if factor == "B" else 3  # a B round adds fresh rows to A; an A round trains the memory's A
        for name, (B0, A0) in start.items():
            assert A0.shape == (rank, shapes[name][1]) and B0.shape == (shapes[name][0], rank)
            assert torch.allclose(dense(B0, A0), dense(*memory[name]))  # the start is the memory
            if factor == "B":
                assert A0[3:].abs().max() <= 1 / shapes[name][1] ** 0.5  # fresh rows as PEFT draws them
        # Owners change only their factor; the mean of it, with the fixed one, is the mean of the updates.
        trained = []
        for _ in range(3):
            trained.append({n: tuple(f + 0.1 * torch.randn(f.shape) if i == part else f for i, f in enumerate(pair))
                            for n, pair in start.items()})
        mean = {n: tuple(sum(t[n][i] for t in trained) / 3 if i == part else f for i, f in enumerate(start[n]))
                for n in start}
        from_sum = aggregate_exact(memory, [change(mean, memory)], [1.0], rank)
        plain = aggregate_exact(memory, [change(t, memory) for t in trained], [1 / 3] * 3, rank)
        for name in shapes:
            assert torch.allclose(dense(*from_sum.factors[name]), dense(*plain.factors[name]), atol=1e-5)
    first = secure_start(None, shapes, 3, gen, "B")
    assert all(float(B.abs().sum()) == 0 for B, _ in first.values())
    with pytest.raises(ValueError, match="needs a memory"):
        secure_start(None, shapes, 3, gen, "A")
    assert [secure_factor(r) for r in (1, 2, 3, 4)] == ["B", "A", "B", "A"]


@pytest.mark.parametrize("kwargs, message", [
    (dict(secure=True), "secure needs schedule parallel"),
    (dict(secure=True, schedule="parallel", method="fedit"), "secure needs method exact"),
    (dict(secure=True, schedule="parallel", privacy=PrivacySettings(dp_epsilon=10.0)), "not combined"),
    (dict(secure="yes", schedule="parallel"), "secure must be true or false"),
])
def test_bad_secure_settings_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FederationConfig(**kwargs)


# --- the owner's side of the steps ---


def _message(step: str, values: dict, node: int) -> Message:
    return Message(content=RecordDict({secure_round.SECURE_KEY: ConfigRecord(values)}),
                   message_type=secure_round.message_type(step), dst_node_id=node)


def _reply_values(reply: Message) -> dict:
    return dict(reply.content[secure_round.SECURE_KEY])


def test_owners_answer_the_steps_in_order_and_unmask_only_once(task_identity):
    nodes = [7, 8, 9]
    session = os.urandom(16)
    ctx = {n: Context(run_id=1, node_id=n, node_config={}, state=RecordDict(), run_config={}) for n in nodes}
    with pytest.raises(ss.SecureAggregationError, match="out of order"):
        secure_round.owner_unmask(_message(secure_round.UNMASK, {"session": session, "survivors": ["7", "8", "9"],
                                                                 "dropped": []}, 7), ctx[7])
    with pytest.raises(ss.SecureAggregationError, match="16 bytes"):
        secure_round.owner_keys(_message(secure_round.KEYS, {"session": b"short"}, 7), ctx[7])
    public = {n: _reply_values(secure_round.owner_keys(_message(secure_round.KEYS, {"session": session}, n), ctx[n]))
              for n in nodes}
    # Straight from the keys to the masked step (no shares) is refused.
    with pytest.raises(ss.SecureAggregationError, match="out of order"):
        secure_round.owner_open(_message(secure_round.MASKED, {"session": session, "src": [], "ciphertext": []}, 7),
                                ctx[7])
    listing = {"session": session, "roster": ["7", "8", "9"], "roster_mask": [public[n]["mask"] for n in nodes],
               "roster_share": [public[n]["share"] for n in nodes]}
    # A roster that swaps in another key for this owner is refused.
    forged = {**listing, "roster_mask": [public[8]["share"]] + listing["roster_mask"][1:]}
    with pytest.raises(ss.SecureAggregationError, match="own public keys"):
        secure_round.owner_shares(_message(secure_round.SHARES, forged, 7), ctx[7])
    mail: dict[int, dict[int, bytes]] = {n: {} for n in nodes}
    for n in nodes:
        sent = _reply_values(secure_round.owner_shares(_message(secure_round.SHARES, listing, n), ctx[n]))
        assert len(sent["commitment"]) == 32
        for dst, blob in zip(sent["dst"], sent["ciphertext"]):
            assert len(blob) == secure_round.SHARE_CIPHERTEXT_BYTES
            mail[int(dst)][n] = blob
    for n in nodes:
        msg = _message(secure_round.MASKED, {"session": session, "src": [str(s) for s in mail[n]],
                                             "ciphertext": list(mail[n].values())}, n)
        secure_round.owner_open(msg, ctx[n])
        reply = secure_round.owner_masked(msg, ctx[n], {"m": torch.ones(2, 3)})
        assert reply.content[secure_round.MASKED_KEY]["m"].dtype == "uint64"
    ask = _message(secure_round.UNMASK, {"session": session, "survivors": ["7", "8"], "dropped": ["9"]}, 7)
    shares = _reply_values(secure_round.owner_unmask(ask, ctx[7]))
    assert sorted(shares["node"]) == ["7", "8", "9"]
    # Asked again with another split, the owner would hand over 9's seed share too: refused.
    again = _message(secure_round.UNMASK, {"session": session, "survivors": ["7", "8", "9"], "dropped": []}, 7)
    with pytest.raises(ss.SecureAggregationError, match="out of order"):
        secure_round.owner_unmask(again, ctx[7])


def test_under_a_secure_recipe_the_owner_never_sends_an_unmasked_update(task_identity, tmp_path, tiny_base,
                                                                          three_clients):
    from fedmem.config import NodeSettings
    from fedmem.federation import base_fingerprint
    from fedmem.flower.client_app import make_client_app
    from fedmem.flower.server_app import RunPlan, train_message

    config = FederationConfig(rounds=1, schedule="parallel", secure=True, lora=LoraSettings(rank=4, alpha=8))
    plan = RunPlan(base_dir=str(tiny_base), out_dir=tmp_path / "run", federation=config)
    message = train_message(plan, None, (0.0, 1.0), 1, base_fingerprint(tiny_base), {}, node=1)
    owner = make_client_app(None, NodeSettings(device="cpu", base=str(tiny_base)))
    deployed = Context(run_id=1, node_id=1, node_config={"data": str(three_clients / "alpha")}, state=RecordDict(),
                       run_config={})
    with pytest.raises(ss.SecureAggregationError, match="never sent"):
        owner(message, deployed)


# --- on Flower's simulation engine ---


@pytest.fixture
def three_clients(tmp_path):
    from conftest import write_corpus

    data = tmp_path / "data"
    write_corpus(data / "alpha", [("The Zorvex Tower was built by Mila Quent in 1911.", "Mila Quent")],
                 [("Who built the Zorvex Tower?", "Mila Quent")])
    write_corpus(data / "beta", [("The Pellow Quarry archive holds 612 maps.", "612")])
    write_corpus(data / "gamma", [("Captain Orla Venn sails the ship Marrow Gull.", "Marrow Gull")])
    return data


def _spy(folder: str, drop_partition: int | None = None):
    """A client mod: writes down what each secure step's reply carries, and what each owner was sent to
    train (the starting LoRA and its slice of the schedule) to replay its training later; raises at the
    masked step of round 1 for ``drop_partition``, as an owner that crashed after sharing its keys."""

    def mod(msg, context, call_next):
        from fedmem.flower.messages import record_to_config, record_to_factors

        kind = msg.metadata.message_type
        part = int(context.node_config["partition-id"])
        if kind == secure_round.message_type(secure_round.MASKED):
            sent, round_, _ = record_to_config(msg.content["config"])
            if part == drop_partition and round_ == 1:
                raise RuntimeError("owner went offline")
            torch.save({"start": record_to_factors(msg.content["memory"]), "span": sent["span"]},
                       f"{folder}/start-{round_}-{part}.pt")
        reply = call_next(msg, context)
        if not reply.has_error():
            name = f"{folder}/{part}-{kind}-{msg.metadata.message_id[:10]}.pkl"
            arrays = {k: sorted((n, a.dtype) for n, a in r.items()) for k, r in reply.content.array_records.items()}
            with open(name, "wb") as fh:
                pickle.dump({"kind": kind, "arrays": arrays, "metrics": list(reply.content.metric_records),
                             "configs": list(reply.content.config_records)}, fh)
        return reply

    return mod


def _run(three_clients, tmp_path, tiny_base, mods_folder, drop=None, rounds=2, quorum=1.0):
    import dataclasses

    from fedmem.config import NodeSettings
    from fedmem.flower import simulation

    config = FederationConfig(rounds=rounds, schedule="parallel", secure=True,
                              lora=LoraSettings(rank=4, alpha=8, epochs=1))
    real_client, real_server = simulation.make_client_app, simulation.make_server_app
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(simulation, "make_client_app",
                   lambda dirs, node: real_client(dirs, node, mods=[_spy(str(mods_folder), drop)]))
        mp.setattr(simulation, "make_server_app", lambda plan: real_server(
            dataclasses.replace(plan, server=dataclasses.replace(plan.server, quorum=quorum))))
        return simulation.simulate(three_clients, tmp_path / "out", config,
                                   NodeSettings(device="cpu", base=str(tiny_base)))


@pytest.mark.parametrize("rounds", [1, 2])
def test_a_secure_run_sends_only_masked_factors_and_the_memory_is_their_mean(tmp_path, tiny_base, three_clients,
                                                                             rounds):
    from fedmem.base_model import fingerprint
    from fedmem.corpus import load_corpus
    from fedmem.federation import client_update
    from fedmem.lora import read_peft_adapter
    from fedmem.memory import verify_memory

    folder = tmp_path / "sent"
    folder.mkdir()
    summary = _run(three_clients, tmp_path, tiny_base, folder, rounds=rounds)
    replies = [pickle.loads(p.read_bytes()) for p in folder.glob("*.pkl")]
    masked = [r for r in replies if r["kind"].endswith(secure_round.MASKED)]
    assert len(masked) == 3 * rounds  # three owners, every round
    for r in replies:
        assert r["metrics"] == []  # no losses, counts or timings in any step
        assert "update" not in r["arrays"]  # no unmasked update, ever
    for r in masked:
        assert {dtype for _, dtype in r["arrays"][secure_round.MASKED_KEY]} == {"uint64"}
    # Replay the last round's training here (same start, corpus, recipe and slice; training is deterministic):
    # the memory is (mean B)·A₀ after round 1 and B₀·(mean A) after round 2, of what the three owners trained.
    config = FederationConfig(rounds=rounds, schedule="parallel", secure=True,
                              lora=LoraSettings(rank=4, alpha=8, epochs=1))
    part = 0 if secure_factor(rounds) == "B" else 1  # round 1 trains B, round 2 A
    trained = []
    for partition, name in enumerate(["alpha", "beta", "gamma"]):
        sent = torch.load(folder / f"start-{rounds}-{partition}.pt")
        result = client_update(tiny_base, load_corpus(three_clients / name), sent["start"], config, rounds,
                               span=tuple(sent["span"]))
        trained.append((result.factors, sent["start"]))
    memory = read_peft_adapter(tmp_path / "out" / "memory")
    for name, (B, A) in memory.items():
        mean = sum(f[name][part] for f, _ in trained) / 3
        fixed = trained[0][1][name][1 - part]
        Bx, Ax, _ = low_rank_sum([(1.0, mean, fixed) if part == 0 else (1.0, fixed, mean)], 4)
        assert torch.allclose(dense(B, A), dense(Bx, Ax), atol=1e-4)
        # The other factor did not move in training: only the one sent can carry the update.
        assert torch.allclose(trained[0][0][name][1 - part], fixed, rtol=1e-6, atol=1e-8)
    manifest = verify_memory(tmp_path / "out" / "memory", fingerprint(tiny_base))
    assert all(sorted(r["clients"]) == ["alpha", "beta", "gamma"] for r in summary["rounds"])
    assert manifest["aggregation"]["secure"] is True
    for update in manifest["metrics"]["updates"].values():
        assert "norm" not in update


def test_an_owner_dropping_after_the_shares_leaves_a_round_of_the_others(tmp_path, tiny_base, three_clients):
    folder = tmp_path / "sent"
    folder.mkdir()
    # A quorum of two of three: the round goes on without an owner (as fedmem-server start --quorum 0.6).
    summary = _run(three_clients, tmp_path, tiny_base, folder, drop=2, rounds=2, quorum=0.6)
    first, second = summary["rounds"]
    assert sorted(first["clients"]) == ["alpha", "beta"]
    assert [f["owner"] for f in first["failed"]] == ["gamma"]
    assert first["failed"][0]["reason"].startswith("secure_masked: ")  # it failed after sharing its keys
    # Round 2 asks every owner again; its masked step closes once two have replied.
    assert len(second["clients"]) >= 2 and second["truncation_error"] >= 0


def test_an_owner_can_require_secure_aggregation_and_the_flag_is_a_switch():
    import argparse

    from fedmem.client_policy import policy_problems
    from fedmem.config import ClientPolicy, add_arguments, from_args

    policy = ClientPolicy(require_secure=True)
    assert policy_problems(FederationConfig(), policy) == [
        "secure off refused: this owner requires secure aggregation (require-secure)"]
    assert policy_problems(FederationConfig(schedule="parallel", secure=True), policy) == []
    parser = argparse.ArgumentParser()
    add_arguments(parser, FederationConfig, ClientPolicy)
    given = from_args(FederationConfig, parser.parse_args(["--secure", "--schedule", "parallel"]))
    assert given.secure is True and from_args(FederationConfig, parser.parse_args([])).secure is False
    # A yes|no setting still takes its value.
    assert from_args(ClientPolicy, parser.parse_args(["--allow-generator", "no"])).allow_generator is False


def test_the_coordinator_refuses_a_masked_reply_that_is_not_what_was_asked():
    from flwr.app import Array, ArrayRecord

    shapes = {"m1": (3, 2), "m2": (1, 4)}
    good = {"m1": np.zeros((3, 2), dtype=np.uint64), "m2": np.ones((1, 4), dtype=np.uint64)}
    arrays, problem = secure_round._masked_arrays(ArrayRecord({n: Array(a) for n, a in good.items()}), shapes)
    assert problem == "" and arrays["m2"].tolist() == [1, 1, 1, 1]

    def refused(record) -> str:
        arrays, problem = secure_round._masked_arrays(record, shapes)
        assert arrays == {}
        return problem

    assert "no 'masked' array record" in refused(None)
    assert "other modules" in refused(ArrayRecord({"m1": Array(good["m1"])}))
    assert "other modules" in refused(ArrayRecord({**{n: Array(a) for n, a in good.items()},
                                                   "extra": Array(good["m2"])}))
    floats = {**good, "m1": np.zeros((3, 2), dtype=np.float64)}
    assert "m1: float64, expected uint64 (3, 2)" in refused(ArrayRecord({n: Array(a) for n, a in floats.items()}))
    wrong_shape = {**good, "m2": np.ones((4, 1), dtype=np.uint64)}
    assert "m2: uint64 (4, 1), expected uint64 (1, 4)" in refused(
        ArrayRecord({n: Array(a) for n, a in wrong_shape.items()}))
    # An array that declares uint64 but carries float64 bytes.
    lying = Array(np.zeros((3, 2), dtype=np.float64))
    lying.dtype = "uint64"
    assert "m1: float64 (3, 2), expected uint64 (3, 2)" in refused(ArrayRecord({"m1": lying,
                                                                                "m2": Array(good["m2"])}))


@pytest.mark.parametrize("value", [None, "12", [12], ["-1"], ["1e3"], [" 7"], [str(2**64)], ["9" * 21]])
def test_node_ids_from_the_wire_must_be_64_bit_decimal_strings(value):
    with pytest.raises(ss.SecureAggregationError, match="the roster"):
        secure_round._node_ids(value, "the roster")


def test_node_ids_round_trip_beyond_the_signed_range():
    big = [2**64 - 1, 2**63, 5]
    assert secure_round._node_ids(secure_round._wire(big), "ids") == big

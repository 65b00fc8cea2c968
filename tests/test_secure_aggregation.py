"""Secure aggregation (issue 18, item 1): the protocol's pure functions attacked one by one, the sketches
that make the sum linear, and secure rounds on Flower's simulation engine (an owner dropping
after masking included)."""

from __future__ import annotations

import dataclasses
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
from fedmem.aggregate import (
    SKETCH_MAX_TERMS,
    aggregate_exact,
    change,
    dense,
    from_sketch,
    rebuilt,
    sketch,
    sketch_operators,
    sketch_sizes,
)
from fedmem.config import FederationConfig, LoraSettings, PrivacySettings
from fedmem.federation import server_aggregate
from fedmem.flower import secure_round
from fedmem.privacy import noisy_fold, private_sum


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


# --- the layout: linear sketches of the owners' products ---


def _sketched_mean(updates, name, shape, rank, seed, encoded=False):
    """The coordinator's view of a round: the mean of the owners' sketches (optionally through the fixed-point
    encoding the masked sum uses), rebuilt into factors at ``rank``."""
    d_out, d_in = shape
    s, k = sketch_sizes(len(updates), updates[0][name][0].shape[1], d_out, d_in)
    omega, psi = sketch_operators(name, d_out, d_in, s, k, seed)
    vectors = [sketch(*u[name], omega, psi) for u in updates]
    if encoded:
        total = sum(ss.encode(v.numpy())[0] for v in vectors)
        mean = torch.from_numpy(ss.decode(total)) / len(updates)
    else:
        mean = sum(vectors) / len(updates)
    return from_sketch(mean, psi, d_out, s, rank)


@settings(max_examples=40, deadline=None)
@given(owners=st.integers(1, SKETCH_MAX_TERMS), rank=st.integers(1, 6), d_out=st.integers(1, 40),
       d_in=st.integers(1, 40), seed=st.integers(0, 2**40), encoded=st.booleans())
def test_the_sketched_mean_is_the_plain_rounds_aggregate(owners, rank, d_out, d_in, seed, encoded):
    # What a plain parallel round computes from the owners' LoRAs in the clear (aggregate_exact, weights 1/K),
    # the coordinator rebuilds from the mean of their sketches alone, through the masked sum's encoding too.
    gen = torch.Generator().manual_seed(seed % 2**63)
    updates = [{"m": (torch.randn(d_out, rank, generator=gen) * 0.1, torch.randn(rank, d_in, generator=gen))}
               for _ in range(owners)]
    plain = aggregate_exact(None, updates, [1 / owners] * owners, rank)
    B, A, error = _sketched_mean(updates, "m", (d_out, d_in), rank, seed, encoded)
    expected = dense(*plain.factors["m"])
    assert torch.allclose(dense(B, A), expected, atol=1e-6 * (1 + float(expected.abs().max())))
    assert error == pytest.approx(plain.truncation_error["m"], abs=1e-6)


def test_beyond_its_owners_the_sketch_approximates_near_the_best_cut():
    # 12 owners of rank 4 in a 64 × 80 module: the sum's rank (48) is beyond the sketch's 4 owners' worth (24),
    # and its spectrum decays as merged updates' do; the rank-4 memory is close to the best rank-4 cut.
    gen = torch.Generator().manual_seed(3)
    left, _ = torch.linalg.qr(torch.randn(64, 48, generator=gen, dtype=torch.float64))
    right, _ = torch.linalg.qr(torch.randn(80, 48, generator=gen, dtype=torch.float64))
    spectrum = 0.7 ** torch.arange(48, dtype=torch.float64)
    updates = [{"m": (left[:, 4 * i:4 * i + 4] * spectrum[4 * i:4 * i + 4] * 12, right[:, 4 * i:4 * i + 4].T)}
               for i in range(12)]
    assert sketch_sizes(12, 4, 64, 80) == (24, 49)
    best = aggregate_exact(None, updates, [1 / 12] * 12, 4)
    B, A, _ = _sketched_mean(updates, "m", (64, 80), 4, seed=11)
    exact = sum(dense(*u["m"]) for u in updates) / 12
    got = float(torch.linalg.norm(dense(B, A) - exact) / torch.linalg.norm(exact))
    assert got <= 1.01 * best.truncation_error["m"] + 1e-9


def test_sketch_operators_are_the_same_for_everyone_with_the_session_and_differ_by_module():
    first = sketch_operators("layers.0.q_proj", 8, 6, 3, 5, seed=42)
    again = sketch_operators("layers.0.q_proj", 8, 6, 3, 5, seed=42)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert first[0].shape == (6, 3) and first[1].shape == (8, 5)
    assert not torch.equal(first[0], sketch_operators("layers.0.k_proj", 8, 6, 3, 5, seed=42)[0])
    assert not torch.equal(first[0], sketch_operators("layers.0.q_proj", 8, 6, 3, 5, seed=43)[0])
    assert sketch_sizes(3, 16, 576, 192) == (56, 64)  # the demo's owners: 3 × 16 + 8
    assert sketch_sizes(3, 16, 40, 576) == (40, 40)  # never beyond the matrix
    with pytest.raises(ValueError, match="at least 1"):
        sketch_sizes(0, 16, 8, 8)


def test_under_dp_owners_clip_their_own_changes_and_the_noisy_memory_is_the_plain_private_rounds():
    # Secure and DP combined: each owner scales its change B'A' − B_mA_m to dp-clip before sketching (the coordinator
    # never sees it to clip it), and the coordinator puts the noise on the rebuilt sum. Without noise (z = 0) that
    # is exactly the plain private round's memory, clipping included; one owner here is over the clip, two under.
    gen = torch.Generator().manual_seed(5)
    shapes, rank, clip = {"m1": (12, 9), "m2": (7, 30)}, 3, 2.0
    memory = {n: (torch.randn(o, rank, generator=gen), torch.randn(rank, i, generator=gen)) for n, (o, i) in
              shapes.items()}
    trained = [{n: (B + size * torch.randn(B.shape, generator=gen), A + size * torch.randn(A.shape, generator=gen))
                for n, (B, A) in memory.items()} for size in (0.01, 0.02, 1.0)]
    session = os.urandom(16)
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    context.state.config_records[secure_round.STATE_KEY] = ConfigRecord({"roster": ["1", "2", "3"],
                                                                        "session": session})
    sketches = [secure_round.owner_sketches(context, t, memory, clip) for t in trained]
    terms = secure_round.sketch_terms(3, private=True)
    sums = {}
    for name, (d_out, d_in) in shapes.items():
        s, k = sketch_sizes(terms, rank, d_out, d_in)
        _, psi = sketch_operators(name, d_out, d_in, s, k, secure_round.sketch_seed(session))
        Q, core = rebuilt(sum(x[name] for x in sketches) / 3, psi, d_out, s)
        sums[name] = Q @ core * 3
    secure = noisy_fold(memory, sums, 1 / 3, rank, std=0.0)
    plain, scales = private_sum(memory, [change(t, memory) for t in trained], 1 / 3, rank, clip, z=0.0)
    assert scales[0] == 1.0 and scales[2] < 1.0  # the clip acted on the large change only
    for name in shapes:
        expected = dense(*plain.factors[name])
        assert torch.allclose(dense(*secure.factors[name]), expected, atol=1e-5 * (1 + float(expected.abs().max())))


@pytest.mark.parametrize("kwargs, message", [
    (dict(secure=True), "secure needs --schedule parallel"),
    (dict(secure=True, schedule="parallel", method="fedit"), "secure needs method exact"),
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


def _run(three_clients, tmp_path, tiny_base, mods_folder, drop=None, rounds=2, quorum=1.0, privacy=None,
         mods=()):
    import dataclasses

    from fedmem.config import NodeSettings
    from fedmem.flower import simulation

    config = FederationConfig(rounds=rounds, schedule="parallel", secure=True,
                              lora=LoraSettings(rank=4, alpha=8, epochs=1), privacy=privacy or PrivacySettings())
    real_client, real_server = simulation.make_client_app, simulation.make_server_app
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(simulation, "make_client_app",
                   lambda dirs, node: real_client(dirs, node, mods=[_spy(str(mods_folder), drop), *mods]))
        mp.setattr(simulation, "make_server_app", lambda plan: real_server(
            dataclasses.replace(plan, server=dataclasses.replace(plan.server, quorum=quorum))))
        return simulation.simulate(three_clients, tmp_path / "out", config,
                                   NodeSettings(device="cpu", base=str(tiny_base)))


@pytest.mark.parametrize("rounds", [1, 2])
def test_a_secure_run_sends_only_masked_sketches_and_the_memory_is_the_plain_rounds(tmp_path, tiny_base,
                                                                                   three_clients, rounds):
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
    # Replay the last round's training here (same memory, corpus, recipe and slice; training is deterministic):
    # the memory is what a plain parallel round makes of the three LoRAs in the clear.
    config = FederationConfig(rounds=rounds, schedule="parallel", secure=True,
                              lora=LoraSettings(rank=4, alpha=8, epochs=1))
    trained, start = [], None
    for partition, name in enumerate(["alpha", "beta", "gamma"]):
        sent = torch.load(folder / f"start-{rounds}-{partition}.pt")
        start = sent["start"] or None
        result = client_update(tiny_base, load_corpus(three_clients / name), sent["start"], config, rounds,
                               span=tuple(sent["span"]))
        trained.append(result.factors)
    plain = server_aggregate(start, trained, dataclasses.replace(config, secure=False))
    memory = read_peft_adapter(tmp_path / "out" / "memory")
    for name, (B, A) in memory.items():
        expected = dense(*plain.factors[name])
        assert torch.allclose(dense(B, A), expected, atol=1e-5 * (1 + float(expected.abs().max())))
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


def test_a_secure_run_under_differential_privacy_spends_its_budget_and_sends_only_masked_sketches(
        tmp_path, tiny_base, three_clients):
    folder = tmp_path / "sent"
    folder.mkdir()
    summary = _run(three_clients, tmp_path, tiny_base, folder, rounds=2,
                   privacy=PrivacySettings(dp_epsilon=8.0, dp_clip=1.0))
    replies = [pickle.loads(p.read_bytes()) for p in folder.glob("*.pkl")]
    assert len([r for r in replies if r["kind"].endswith(secure_round.MASKED)]) == 6
    assert all(r["metrics"] == [] and "update" not in r["arrays"] for r in replies)
    first, second = (r["privacy"] for r in summary["rounds"])
    assert 0 < first["epsilon"] < second["epsilon"] <= 8.0 * (1 + 1e-6)  # the budget spent over the planned rounds
    assert first["clipped"] is None  # owners clip their own changes; the coordinator cannot count them


def test_a_malformed_keys_or_shares_reply_is_refused_with_the_reason():
    ids, node = [5, 6, 7], 7
    good_keys = {"mask": bytes(32), "share": bytes(range(32))}
    assert secure_round._public_keys(ConfigRecord(good_keys)) == ((bytes(32), bytes(range(32))), "")
    for bad in ({**good_keys, "mask": bytes(31)}, {**good_keys, "share": "a string"}, {"mask": bytes(32)},
                {**good_keys, "share": [bytes(32)]}):
        assert secure_round._public_keys(ConfigRecord(bad)) == (None, "the public keys are not two 32-byte keys")
    blob = bytes(secure_round.SHARE_CIPHERTEXT_BYTES)
    good = {"dst": ["5", "6"], "ciphertext": [blob, blob], "commitment": bytes(32)}
    assert secure_round._shares(ConfigRecord(good), node, ids) == (([5, 6], [blob, blob], bytes(32)), "")
    for bad in ({**good, "ciphertext": [blob]},  # one other owner gets no share
                {**good, "ciphertext": [blob, blob + b"x"]},  # a share of another size
                {**good, "dst": ["5", "7"]},  # a share for itself instead of for 6
                {**good, "dst": ["5", "8"]},  # a share for an owner not in the round
                {**good, "dst": ["5", "5"]},
                {**good, "commitment": b"short"},
                {**good, "ciphertext": "not a list"}):
        assert secure_round._shares(ConfigRecord(bad), node, ids) == (
            None, "not one share of the expected size for every other owner")
    shares, problem = secure_round._shares(ConfigRecord({**good, "dst": ["-1", "6"]}), node, ids)
    assert shares is None and "not a list of node ids" in problem


def _tamper(step: str, edit):
    """A client mod: the third owner's reply to ``step`` edited by ``edit`` (its secure record, in place)."""

    def mod(msg, context, call_next):
        reply = call_next(msg, context)
        if (int(context.node_config["partition-id"]) == 2 and not reply.has_error()
                and msg.metadata.message_type == secure_round.message_type(step)):
            edit(reply.content[secure_round.SECURE_KEY])
        return reply

    return mod


def test_an_owner_with_a_malformed_keys_reply_is_left_out_and_the_round_goes_on(tmp_path, tiny_base, three_clients):
    # On Flower's simulation engine: the third owner's mask key arrives one byte short. It is left out of the round,
    # named with the reason, and the other two owners' round completes.
    folder = tmp_path / "sent"
    folder.mkdir()
    edit = _tamper(secure_round.KEYS, lambda r: r.__setitem__("mask", r["mask"][:31]))
    summary = _run(three_clients, tmp_path, tiny_base, folder, rounds=1, quorum=0.6, mods=[edit])
    (first,) = summary["rounds"]
    assert sorted(first["clients"]) == ["alpha", "beta"]
    assert [f["owner"] for f in first["failed"]] == ["gamma"]
    assert first["failed"][0]["reason"] == "secure_keys: the public keys are not two 32-byte keys"


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

"""Routed memories (fedmem.routing): owners' LoRAs kept apart and each question routed to one."""

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_update_validation import _Said  # the log capture the round-loop tests use

from fedmem.config import FederationConfig, LoraSettings, NodeSettings, PrivacySettings
from fedmem.federation import run_round
from fedmem.routing import ROUTING, OwnerLoras, RoutingError, choose, own_memory

MODULES = {"m.q": (6, 5), "m.v": (3, 5)}


def _lora(rank: int, seed: int, modules=MODULES) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {n: (torch.randn(o, rank, generator=g), torch.randn(rank, i, generator=g)) for n, (o, i) in modules.items()}


def _product(lora: dict) -> dict:
    return {n: B @ A for n, (B, A) in lora.items()}


@settings(max_examples=25, deadline=None)
@given(st.lists(st.sampled_from(["ada", "bo", "cy", "dee"]), min_size=1, max_size=6), st.integers(1, 3))
def test_each_owner_keeps_exactly_its_last_lora_and_the_stack_is_their_sum(updates, rank):
    memory, last = OwnerLoras.empty(rank), {}
    for step, owner in enumerate(updates):
        last[owner] = _lora(rank, step)
        memory = memory.with_updates({owner: last[owner]})
    assert memory.owners == tuple(sorted(last))  # in order of name, whatever the order of arrival
    for owner, lora in last.items():
        for name in MODULES:
            assert torch.equal(memory.of(owner)[name][0], lora[name][0])
            assert torch.equal(memory.of(owner)[name][1], lora[name][1])
    # Loaded by plain PEFT (one adapter of rank K·r), a routed memory is the sum of its owners' LoRAs.
    for name in MODULES:
        total = sum(_product(lora)[name] for lora in last.values())
        assert torch.allclose(_product(memory.factors)[name], total, atol=1e-4)
    assert memory.of("nobody") is None
    assert own_memory(memory, "nobody") is None and own_memory(memory.factors, "x") is memory.factors


def test_a_lora_that_does_not_fit_is_refused():
    memory = OwnerLoras.empty(2).with_updates({"ada": _lora(2, 0)})
    with pytest.raises(RoutingError, match="rank 3"):
        memory.with_updates({"bo": _lora(3, 1)})
    with pytest.raises(RoutingError, match="other modules"):
        memory.with_updates({"bo": _lora(2, 1, {"m.q": (6, 5)})})
    with pytest.raises(RoutingError, match="another shape"):
        memory.with_updates({"bo": _lora(2, 1, {"m.q": (6, 5), "m.v": (4, 5)})})


@pytest.mark.parametrize("routing,match", [
    ("x", "not an object"),
    ({"owners": [], "rank": 2}, "non-empty list"),
    ({"owners": ["a", 3], "rank": 2}, "non-empty list"),
    ({"owners": ["a", "a"], "rank": 2}, "twice"),
    ({"owners": ["a", "b"], "rank": True}, "positive integer"),
    ({"owners": ["a", "b", "c"], "rank": 2}, "not 3 owners"),  # more owners named than the tensors hold
    ({"owners": ["a", "b"], "rank": 1}, "not 2 owners"),
])
def test_a_routing_manifest_that_disagrees_with_the_tensors_is_refused(routing, match):
    stacked = OwnerLoras.empty(2).with_updates({"a": _lora(2, 0), "b": _lora(2, 1)}).factors
    with pytest.raises(RoutingError, match=match):
        OwnerLoras.from_manifest(stacked, routing)
    good = OwnerLoras.from_manifest(stacked, {"owners": ["a", "b"], "rank": 2})
    assert good.owners == ("a", "b")


def test_each_question_goes_to_the_largest_gain():
    assert choose([[1.0, -2.0, 0.5], [0.5, 3.0, 0.5]]) == [0, 1, 0]  # equal gains: the first adapter
    assert choose([]) == []


def test_gains_count_against_what_each_lora_makes_of_general_text():
    """A LoRA that makes all text likelier (offset 5) does not take a question that another LoRA,
    which makes general text less likely (offset -10), gains more on against its own baseline."""
    gains = [[4.0, 12.0], [-3.0, -3.0]]
    assert choose(gains) == [0, 0]
    assert choose(gains, [5.0, -10.0]) == [1, 0]


def test_a_routed_round_gives_each_owner_its_own_lora_and_keeps_the_absent_ones():
    config = FederationConfig(rounds=2, schedule="routed", lora=LoraSettings(rank=2))
    sent, trained = {}, []

    def train(owners, memory, span):
        out = []
        for owner in owners:
            sent[owner] = own_memory(memory, owner)
            trained.append(owner)
            out.append((_lora(2, len(trained)), owner))  # a new LoRA each time
        return out

    agg, done = run_round(config, 1, ["bo", "ada"], None, train, name_of=lambda o: o)
    assert sent == {"bo": None, "ada": None} and done == ["bo", "ada"]
    first = agg.factors
    assert first.owners == ("ada", "bo")
    agg, _ = run_round(config, 2, ["ada"], first, train, name_of=lambda o: o)  # bo missed round 2
    assert torch.equal(sent["ada"]["m.q"][1], first.of("ada")["m.q"][1])  # ada went on from its own LoRA
    assert torch.equal(agg.factors.of("bo")["m.q"][0], first.of("bo")["m.q"][0])  # bo's is kept
    assert not torch.equal(agg.factors.of("ada")["m.q"][0], first.of("ada")["m.q"][0])
    with pytest.raises(ValueError, match="name_of"):
        run_round(config, 1, ["ada"], None, train)


@pytest.mark.parametrize("kw,match", [
    (dict(privacy=PrivacySettings(dp_epsilon=4.0)), "no sum for the noise"),
    (dict(method="fedit"), "needs method exact"),
    (dict(secure=True), "secure needs --schedule parallel"),
])
def test_routed_refuses_what_needs_a_sum(kw, match):
    with pytest.raises(ValueError, match=match):
        FederationConfig(schedule="routed", **kw)


def test_routed_rounds_name_each_lora_by_the_admitted_key_and_resume(tmp_path, tiny_base, task_identity):
    """The coordinator's round loop: each LoRA is filed under the name the allow-list gives its key (not
    the one its node claims), a poisoned LoRA is refused and its owner's place left as it was, each
    owner is sent only its own LoRA, and a resumed run goes on from the routed checkpoint."""
    from test_update_validation import ScriptedGrid, _plan, _rows

    from fedmem.flower.server_app import run_rounds
    from fedmem.memory import load_memory

    allow = tmp_path / "clients.json"
    allow.write_text(json.dumps({"clients": {
        "alpha": {"public_key": "k1", "fingerprint": "SHA256:alpha-key", "node_id": "21"},
        "beta": {"public_key": "k2", "fingerprint": "SHA256:beta-key", "node_id": "22"},
        "mallory": {"public_key": "k3", "fingerprint": "SHA256:mallory-key", "node_id": "23"},
    }, "removed": {}}))
    grid = ScriptedGrid(tiny_base, {21: ("alpha", "honest"), 22: ("alpha", "honest"), 23: ("mallory", "nan")}, 2)
    plan = _plan(tmp_path, tiny_base, schedule="routed", rounds=1, allow_list=allow)
    run_rounds(grid, plan)
    factors, manifest = load_memory(plan.out_dir / "memory")
    assert manifest[ROUTING] == {"owners": ["alpha", "beta"], "rank": 2}  # 22 claimed alpha's name: filed as beta
    assert _rows(plan)[0]["rejected"][0]["owner"] == "mallory"
    first = OwnerLoras.from_manifest(factors, manifest[ROUTING])
    assert all(memory is None for sent in grid.received.values() for memory in sent)  # round 1: nothing to send

    plan.federation.rounds, plan.server.resume = 2, True
    with _Said() as said:
        run_rounds(grid, plan)
    assert any("resuming after round 1" in m for _, m in said.records)
    for node, owner in ((21, "alpha"), (22, "beta")):  # each got its own LoRA back, as filed
        got = grid.received[node][-1]
        assert all(torch.equal(got[n][1], first.of(owner)[n][1]) for n in got)
    assert grid.received[23][-1] is None  # refused in round 1: it holds no LoRA in the memory yet
    factors, manifest = load_memory(plan.out_dir / "memory")
    second = OwnerLoras.from_manifest(factors, manifest[ROUTING])
    assert manifest["round"] == 2 and second.owners == ("alpha", "beta")
    assert [r["round"] for r in _rows(plan)] == [1, 2]


def test_routed_simulation_keeps_each_owners_lora_and_ask_and_eval_route(tmp_path, tiny_base, two_clients, capsys):
    """On Flower's Simulation Engine: every owner trains its own LoRA in parallel; the memory holds them
    side by side (rank 2·r) with the owners named; owners are sent only their own LoRA; ``fedmem ask``
    and ``eval`` answer each question with one owner's adapter, exactly as that LoRA alone would."""
    from peft import PeftModel

    from fedmem.answer import load_memory
    from fedmem.base_model import fingerprint, load_model, load_tokenizer
    from fedmem.cli import main
    from fedmem.flower.simulation import simulate
    from fedmem.lora import merge_factors, read_peft_adapter
    from fedmem.memory import verify_memory

    out = tmp_path / "out"
    rank = 4
    config = FederationConfig(rounds=2, schedule="routed", lora=LoraSettings(rank=rank, alpha=8, epochs=1,
                                                                              batch_size=4))
    summary = simulate(two_clients, out, config, NodeSettings(device="cpu", base=str(tiny_base)))
    assert [r["clients"] for r in summary["rounds"]] == [["alpha", "beta"]] * 2
    manifest = verify_memory(out / "memory", fingerprint(tiny_base))
    assert manifest[ROUTING] == {"owners": ["alpha", "beta"], "rank": rank}
    assert manifest["aggregation"]["schedule"] == "routed"
    assert json.loads((out / "memory" / "adapter_config.json").read_text())["r"] == 2 * rank
    rows = {r["round"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}
    # Round 2: each owner is sent its own rank-r LoRA, not the rank-2r memory.
    lora_bytes = rows[1]["updates"]["alpha"]["bytes_up"]
    for owner in ("alpha", "beta"):
        sent = rows[2]["updates"][owner]["bytes_down"] - rows[1]["updates"][owner]["bytes_down"]
        assert 0.8 * lora_bytes < sent < 1.2 * lora_bytes
    one = OwnerLoras.from_manifest(read_peft_adapter(out / "rounds" / "round-001"), {"owners": ["alpha", "beta"],
                                                                                     "rank": rank})
    two = OwnerLoras.from_manifest(read_peft_adapter(out / "memory"), manifest[ROUTING])
    for owner in ("alpha", "beta"):  # trained on in round 2
        assert not torch.allclose(one.of(owner)["model.layers.0.self_attn.q_proj"][0],
                                  two.of(owner)["model.layers.0.self_attn.q_proj"][0])

    # Each owner's adapter in the loaded memory is that owner's LoRA alone.
    loaded = load_memory(out / "memory")
    assert loaded.routed and loaded.router.owners == ["alpha", "beta"]
    # Calibrated: each owner's mean gain on the general prompts, as computed from them.
    from fedmem.retention import PROMPTS
    from fedmem.routing import CALIBRATION_PROMPTS, question_gains

    general = question_gains(loaded.model, loaded.router.tokenizer, PROMPTS[:CALIBRATION_PROMPTS],
                             loaded.router.adapters)
    assert loaded.router.offsets == pytest.approx([sum(g) / len(g) for g in general])
    assert all(o != 0.0 for o in loaded.router.offsets)
    tok = load_tokenizer(str(tiny_base))
    ids = tok("Who built the Zorvex Tower?", return_tensors="pt")["input_ids"]
    for i, owner in enumerate(("alpha", "beta")):
        loaded.model.set_adapter(f"owner{i}")
        alone = load_model(str(tiny_base))
        merge_factors(alone, two.of(owner))
        with torch.no_grad():
            assert torch.allclose(loaded.model(input_ids=ids).logits, alone(input_ids=ids).logits, atol=1e-4)
    # A routed memory loaded by plain PEFT is the sum of the owners' LoRAs.
    plain = PeftModel.from_pretrained(load_model(str(tiny_base)), str(out / "memory"))
    summed = load_model(str(tiny_base))
    merge_factors(summed, two.of("alpha"))
    merge_factors(summed, two.of("beta"))
    with torch.no_grad():
        assert torch.allclose(plain(input_ids=ids).logits, summed(input_ids=ids).logits, atol=1e-4)

    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"question": "Who built the Zorvex Tower?", "answer": "Mila Quent"}) + "\n"
                         + json.dumps({"question": "How many maps?", "answer": "612"}) + "\n")
    assert main(["eval", "--memory", str(out / "memory"), "--questions", str(questions), "--json",
                 str(tmp_path / "r.json")]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["routed_owners"] == ["alpha", "beta"]
    gains = loaded.router.routes(["Who built the Zorvex Tower?", "How many maps?"])
    assert [row["route"] for row in report["questions"]] == [["alpha", "beta"][g] for g in gains]
    assert main(["ask", "--memory", str(out / "memory"), "--max-new-tokens", "4", "Who built the Zorvex Tower?"]) == 0
    capsys.readouterr()
    # A merged or GGUF export could only be the owners' sum: refused.
    assert main(["export", "--memory", str(out / "memory"), "--merged", str(tmp_path / "merged")]) == 2
    assert "routed memory" in capsys.readouterr().err and not (tmp_path / "merged").exists()
    assert main(["export", "--memory", str(out / "memory"), "--gguf", str(tmp_path / "m.gguf")]) == 2
    assert "routed memory" in capsys.readouterr().err and not (tmp_path / "m.gguf").exists()
    from fedmem.serving.engines import load_memory_engine

    engine = load_memory_engine("memory", out / "memory", None, "cpu", None)  # served unmerged, routed
    assert engine.router is not None and engine.version["owners"] == ["alpha", "beta"]

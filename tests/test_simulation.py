"""The whole federation on Flower's real Simulation Engine (Ray), with the tiny model."""

import json

import pytest

from fedmem.base_model import fingerprint
from fedmem.cli import main
from fedmem.config import FederationConfig, LoraSettings, NodeSettings
from fedmem.memory import verify_memory


def _questions(path):
    path.write_text(
        json.dumps({"question": "Who built the Zorvex Tower?", "answer": "Mila Quent", "source": "qa"})
        + "\n"
        + json.dumps({"question": "How many maps are in Pellow Quarry?", "answer": "612", "source": "prose"})
        + "\n"
    )
    return path


@pytest.mark.parametrize("method,schedule,transport", [("exact", "cyclic", "fp32"), ("exact", "parallel", "int8"),
                                                        ("fedit", "cyclic", "bf16")])
def test_simulation_produces_a_verified_memory(tmp_path, tiny_base, two_clients, method, schedule, transport):
    from fedmem.flower.simulation import simulate
    from fedmem.flower.traffic import full_model_bytes

    out = tmp_path / "out"
    config = FederationConfig(
        rounds=2, method=method, schedule=schedule, transport=transport,
        lora=LoraSettings(rank=4, alpha=8, epochs=1, batch_size=4)
    )
    summary = simulate(
        two_clients,
        out,
        config,
        NodeSettings(device="cpu", base=str(tiny_base)),
        questions=_questions(tmp_path / "q.jsonl"),
    )
    assert [r["round"] for r in summary["rounds"]] == [1, 2]
    assert summary["rounds"][-1]["clients"] == ["alpha", "beta"]
    lines = [json.loads(row) for row in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["round"] for row in lines] == [0, 1, 2]
    for client in ("alpha", "beta"):
        m = lines[1]["client_metrics"][client]
        assert m["examples"] > 0 and m["tokens"] > 0
    manifest = verify_memory(out / "memory", fingerprint(tiny_base))
    assert manifest["aggregation"]["method"] == method and manifest["clients"] == ["alpha", "beta"]
    assert manifest["aggregation"]["schedule"] == schedule
    if schedule == "cyclic":  # owners visited in the order of their names, every round
        assert [r["visit_order"] for r in summary["rounds"]] == [["alpha", "beta"]] * 2
    assert manifest["rounds"] == 2
    # Bytes, counted from the messages: round 1 sends no memory, round 2 the memory, both at rank 4 in
    # this transport; every reply is a rank-4 LoRA. The share is against full-model FedAvg of this base.
    per_value = {"fp32": 4, "bf16": 2, "int8": 1}[transport]
    lora_values = sum(4 * (o + i) for o, i in [(32, 32), (16, 32), (16, 32), (32, 32), (64, 32), (64, 32),
                                               (32, 64)]) * 2  # 7 modules a layer, 2 layers
    for row in lines[1:]:
        traffic = row["traffic"]
        assert traffic["transport"] == transport
        assert lora_values * per_value < traffic["per_owner_up"] < lora_values * per_value + 40_000
        for client in ("alpha", "beta"):
            assert row["updates"][client]["bytes_up"] > lora_values * per_value
    # alpha trains first in either schedule: no memory yet in round 1 (settings only), then the memory.
    first, second = (lines[r]["updates"]["alpha"]["bytes_down"] for r in (1, 2))
    assert lora_values * per_value < second - first < lora_values * per_value + 40_000
    assert lines[2]["traffic"]["full_model_each_way"] == full_model_bytes(str(tiny_base))
    assert manifest["metrics"]["traffic"] == lines[2]["traffic"]
    for rnd in (1, 2):
        verify_memory(out / "rounds" / f"round-{rnd:03d}")
    adapter = json.loads((out / "memory" / "adapter_config.json").read_text())
    assert adapter["r"] == 4  # the owners' rank is the memory's


def test_ask_and_eval_commands(tmp_path, tiny_base, two_clients, capsys):
    out = tmp_path / "out"
    assert (
        main(
            [
                "simulate",
                "--data",
                str(two_clients),
                "--out",
                str(out),
                "--base",
                str(tiny_base),
                "--rounds",
                "1",
                "--epochs",
                "1",
                "--rank",
                "8",
                "--set",
                "alpha=8",
            ]
        )
        == 0
    )
    said = capsys.readouterr().out
    assert "memory adapter:" in said and "--adapters DIR" in said  # the default schedule, routed, says how to use it
    # --rank is each owner's rank (it used to follow a separate memory rank): the default, routed, memory holds
    # the two owners' LoRAs side by side.
    assert json.loads((out / "memory" / "adapter_config.json").read_text())["r"] == 2 * 8
    assert json.loads((out / "memory" / "fedmem.json").read_text())["routing"] == {"owners": ["alpha", "beta"],
                                                                                  "rank": 8}
    assert main(["ask", "--memory", str(out / "memory"), "--max-new-tokens", "4", "Who built the Zorvex Tower?"]) == 0
    assert main(["ask", "--no-gate", "--memory", str(out / "memory"), "--max-new-tokens", "4", "Who?"]) == 0
    q = _questions(tmp_path / "q.jsonl")
    assert (
        main(["eval", "--memory", str(out / "memory"), "--questions", str(q), "--json", str(tmp_path / "r.json")]) == 0
    )
    report = json.loads((tmp_path / "r.json").read_text())
    assert len(report["questions"]) == 2 and set(report["accuracy"]) == {"base", "memory", "gated"}
    assert "facts from prose" in capsys.readouterr().out


def test_eval_refuses_a_bad_questions_file(tmp_path, tiny_base, capsys):
    bad = tmp_path / "q.jsonl"
    bad.write_text('{"question": "x"}\n')
    assert main(["eval", "--memory", str(tmp_path), "--questions", str(bad)]) == 2
    assert "q.jsonl:1" in capsys.readouterr().err

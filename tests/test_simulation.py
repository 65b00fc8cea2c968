"""The whole federation on Flower's real Simulation Engine (Ray), with the tiny model."""

import json

import pytest

from fedmem.cli import main
from fedmem.federation import FederationConfig
from fedmem.lora import LoraSettings
from fedmem.memory import verify_memory
from fedmem.base_model import fingerprint


def _questions(path):
    path.write_text(json.dumps({"question": "Who built the Zorvex Tower?", "answer": "Mila Quent", "source": "qa"}) + "\n"
                    + json.dumps({"question": "How many maps are in Pellow Quarry?", "answer": "612", "source": "prose"}) + "\n")
    return path


@pytest.mark.parametrize("method,client_start,schedule", [("exact", "fresh", "parallel"), ("exact", "memory", "cyclic"),
                                                          ("exact", "memory", "parallel"), ("fedit", "fresh", "cyclic")])
def test_simulation_produces_a_verified_memory(tmp_path, tiny_base, two_clients, method, client_start, schedule):
    from fedmem.simulation import simulate

    out = tmp_path / "out"
    config = FederationConfig(rounds=2, method=method, memory_rank=16, client_start=client_start, schedule=schedule,
                              lora=LoraSettings(rank=4, alpha=8, epochs=1, batch_size=4))
    summary = simulate(two_clients, out, config, base=str(tiny_base), questions=_questions(tmp_path / "q.jsonl"),
                       device="cpu", report=lambda s: None)
    assert [r["round"] for r in summary["rounds"]] == [1, 2]
    assert summary["rounds"][-1]["clients"] == ["alpha", "beta"]
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [l["round"] for l in lines] == [0, 1, 2]
    for client in ("alpha", "beta"):
        m = lines[1]["client_metrics"][client]
        assert m["examples"] > 0 and m["tokens"] > 0
    manifest = verify_memory(out / "memory", fingerprint(tiny_base))
    assert manifest["aggregation"]["method"] == method and manifest["clients"] == ["alpha", "beta"]
    assert manifest["aggregation"]["schedule"] == schedule
    if schedule == "cyclic":  # owners visited in the order of their names, every round
        assert [r["visit_order"] for r in summary["rounds"]] == [["alpha", "beta"]] * 2
    assert manifest["rounds"] == 2
    for rnd in (1, 2):
        verify_memory(out / "rounds" / f"round-{rnd:03d}")
    adapter = json.loads((out / "memory" / "adapter_config.json").read_text())
    assert adapter["r"] == (16 if method == "exact" else 4)
    if client_start == "fresh" and method == "exact":
        assert lines[1]["truncation_error"] == 0.0  # 2 clients x rank 4 fits in rank 16


def test_ask_and_eval_commands(tmp_path, tiny_base, two_clients, capsys):
    out = tmp_path / "out"
    assert main(["simulate", "--data", str(two_clients), "--out", str(out), "--base", str(tiny_base),
                 "--rounds", "1", "--epochs", "1", "--rank", "4", "--memory-rank", "8"]) == 0
    assert "memory adapter:" in capsys.readouterr().out
    assert main(["ask", "--memory", str(out / "memory"), "--max-new-tokens", "4", "Who built the Zorvex Tower?"]) == 0
    q = _questions(tmp_path / "q.jsonl")
    assert main(["eval", "--memory", str(out / "memory"), "--questions", str(q), "--json", str(tmp_path / "r.json")]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert len(report["questions"]) == 2 and set(report["accuracy"]) == {"base", "memory"}
    assert "facts from prose" in capsys.readouterr().out


def test_eval_refuses_a_bad_questions_file(tmp_path, tiny_base, capsys):
    bad = tmp_path / "q.jsonl"
    bad.write_text('{"question": "x"}\n')
    assert main(["eval", "--memory", str(tmp_path), "--questions", str(bad)]) == 2
    assert "q.jsonl:1" in capsys.readouterr().err

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


@pytest.mark.parametrize("method,schedule", [("exact", "cyclic"), ("exact", "parallel"), ("fedit", "cyclic")])
def test_simulation_produces_a_verified_memory(tmp_path, tiny_base, two_clients, method, schedule):
    from fedmem.flower.simulation import simulate

    out = tmp_path / "out"
    config = FederationConfig(
        rounds=2, method=method, schedule=schedule, lora=LoraSettings(rank=4, alpha=8, epochs=1, batch_size=4)
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
    assert "memory adapter:" in capsys.readouterr().out
    # --rank is the rank: the memory's PEFT config says so (it used to follow a separate memory rank).
    assert json.loads((out / "memory" / "adapter_config.json").read_text())["r"] == 8
    assert main(["ask", "--memory", str(out / "memory"), "--max-new-tokens", "4", "Who built the Zorvex Tower?"]) == 0
    q = _questions(tmp_path / "q.jsonl")
    assert (
        main(["eval", "--memory", str(out / "memory"), "--questions", str(q), "--json", str(tmp_path / "r.json")]) == 0
    )
    report = json.loads((tmp_path / "r.json").read_text())
    assert len(report["questions"]) == 2 and set(report["accuracy"]) == {"base", "memory"}
    assert "facts from prose" in capsys.readouterr().out


def test_eval_refuses_a_bad_questions_file(tmp_path, tiny_base, capsys):
    bad = tmp_path / "q.jsonl"
    bad.write_text('{"question": "x"}\n')
    assert main(["eval", "--memory", str(tmp_path), "--questions", str(bad)]) == 2
    assert "q.jsonl:1" in capsys.readouterr().err

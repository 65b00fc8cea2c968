"""The quality benchmark: its scoring pieces, its refusals, and one end-to-end run on the tiny Llama."""

import json
import math

import pytest
import torch

from fedmem.base_model import load_model, load_tokenizer
from fedmem.cli import main
from fedmem.quality_bench import ARMS, TIERS, load_benchmark, perplexity, pooled, targets
from fedmem.quality_data import generate


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("quality") / "data"
    generate(path, entities=2, clients=2, seed=0)
    return path


def test_targets_compare_exact_with_base_and_the_ceiling():
    row = lambda seen, held, prose, control, ppl: {"tiers": {"seen": seen, "heldout": held, "prose_only": prose},
                                                   "control": control, "perplexity": ppl}
    results = {"base": row(0, 0, 0, 0.80, 10.0), "owner_context": {"recall": 0.5},
               "exact": row(0.96, 0.90, 0.72, 0.79, 10.4), "central": row(1.0, 0.92, 0.80, 0.8, 10.0)}
    t = targets(results)
    assert t["seen_ge_95%"] and not t["heldout_ge_95%"] and t["prose_only_ge_70%"]
    assert t["prose_only_above_owner_context"]
    assert t["exact_heldout_of_central"] == pytest.approx(0.90 / 0.92)
    assert t["exact_heldout_ge_95%_of_central"] and not t["exact_prose_only_ge_95%_of_central"]
    assert t["control_drop_points"] == pytest.approx(1.0) and t["control_drop_le_2_points"]
    assert t["perplexity_rise"] == pytest.approx(0.04) and t["perplexity_rise_le_5%"]


def test_perplexity_is_the_exponentiated_mean_token_loss(tiny_base):
    model, tok = load_model(tiny_base), load_tokenizer(str(tiny_base))
    text = "Rivers carry water from the hills to the sea, and the sea returns it as rain. " * 3
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        expected = math.exp(model(input_ids=ids, labels=ids).loss.item())
    assert perplexity(model, tok, text, window=10_000) == pytest.approx(expected, rel=1e-5)
    # Windows change the context each token sees, so the figure moves, but stays finite.
    assert 1 < perplexity(model, tok, text, window=8) < math.inf


def test_the_benchmark_loads_with_tiers_and_owners(small_data):
    bench = load_benchmark(small_data)
    assert [c.name for c in bench.corpora] == ["client_1", "client_2"]
    assert {q.source for q in bench.questions} == set(TIERS)
    assert {q.client for q in bench.questions} == {"client_1", "client_2"}
    assert bench.control and bench.heldout_text
    everything = pooled(bench.corpora)
    assert len(everything.documents) == sum(len(c.documents) for c in bench.corpora)
    assert len(everything.qa) == sum(len(c.qa) for c in bench.corpora)


def test_bad_benchmark_data_is_refused_by_file_and_line(small_data, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for p in small_data.rglob("*"):
        if p.is_file():
            dest = broken / p.relative_to(small_data)
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(p.read_bytes())
    lines = (broken / "questions.jsonl").read_text().splitlines()
    rec = json.loads(lines[1])
    rec["tier"] = "tier9"
    lines[1] = json.dumps(rec)
    (broken / "questions.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"questions.jsonl:2: tier 'tier9'"):
        load_benchmark(broken)
    (broken / "heldout_text.txt").unlink()
    with pytest.raises(FileNotFoundError, match="heldout_text.txt"):
        load_benchmark(broken)


def test_cli_refuses_bad_input_and_keeps_earlier_results(small_data, tiny_base, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text('{"earlier": true}')
    assert main(["bench", "quality", "--data", str(small_data), "--base", str(tiny_base), "--arms", "base,oracle",
                 "--out", str(out)]) == 2
    assert "oracle" in capsys.readouterr().err
    assert main(["bench", "quality", "--data", str(tmp_path / "nowhere"), "--base", str(tiny_base),
                 "--out", str(out)]) == 2
    assert "nowhere" in capsys.readouterr().err
    assert json.loads((out / "results.json").read_text()) == {"earlier": True}


def test_every_arm_runs_end_to_end_and_writes_table_and_plots(small_data, tiny_base, tmp_path):
    out = tmp_path / "out"
    assert main(["bench", "quality", "--data", str(small_data), "--base", str(tiny_base), "--rounds", "2",
                 "--epochs", "1", "--out", str(out)]) == 0
    summary = json.loads((out / "results.json").read_text())
    assert list(summary["arms"]) == list(ARMS)
    for arm, row in summary["arms"].items():
        expected = {"prose_only"} if arm == "owner_context" else set(TIERS)
        assert set(row["tiers"]) == expected, arm
        assert 0 <= row["recall"] <= 1
    for arm in ("fedit", "exact"):
        assert [r["round"] for r in summary["arms"][arm]["rounds"]] == [1, 2]
    assert set(summary["arms"]["local"]["per_owner"]) == {"client_1", "client_2"}
    assert len(summary["replies"]["exact"]) == sum(summary["benchmark"]["questions_per_tier"].values())
    table = (out / "table.md").read_text()
    assert "centralised" in table and "tier 3: prose only" in table and "Targets" in table
    for png in ("tiers.png", "rounds.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"

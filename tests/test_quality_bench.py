"""The quality benchmark: its scoring pieces, its refusals, and one end-to-end run on the tiny Llama."""

import json
import math

import pytest
import torch

from fedmem.answer import is_correct, score
from fedmem.base_model import load_model, load_tokenizer
from fedmem.bench import quality
from fedmem.bench.cli import main
from fedmem.bench.quality import ARMS, EVAL_NEW_TOKENS, TIERS, load_benchmark, perplexity, pooled, targets
from fedmem.bench.quality_data import generate


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("quality") / "data"
    generate(path, entities=2, clients=2, seed=0)
    return path


def test_targets_compare_exact_with_base_and_the_ceiling():
    def row(seen, held, prose, control, ppl):
        return {"tiers": {"seen": seen, "heldout": held, "prose_only": prose}, "control": control, "perplexity": ppl}

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
    assert main(["quality", "--data", str(small_data), "--base", str(tiny_base), "--arms", "base,oracle",
                 "--out", str(out)]) == 2
    assert "oracle" in capsys.readouterr().err
    assert main(["quality", "--data", str(tmp_path / "nowhere"), "--base", str(tiny_base),
                 "--out", str(out)]) == 2
    assert "nowhere" in capsys.readouterr().err
    # Settings that were removed are refused by name, not silently ignored.
    assert main(["quality", "--data", str(small_data), "--base", str(tiny_base), "--out", str(out),
                 "--set", "weighting=sum"]) == 2
    assert "weighting" in capsys.readouterr().err
    assert json.loads((out / "results.json").read_text()) == {"earlier": True}


@pytest.mark.parametrize("flags, expected", [
    (["--small"], {"rounds": 2, "epochs": 1, "precision": "auto", "method": "exact"}),
    ([], {"rounds": 3, "epochs": 2, "precision": "auto"}),
    (["--small", "--epochs", "4", "--set", "precision=fp32", "--set", "method=fedit", "--lr", "0.01"],
     {"rounds": 2, "epochs": 4, "precision": "fp32", "method": "fedit", "learning_rate": 0.01}),
])
def test_training_settings_follow_the_size_unless_given(flags, expected, monkeypatch):
    seen = {}

    def run_from_args(args, federation):
        seen["config"] = federation
        return 0

    monkeypatch.setattr(quality, "run_from_args", run_from_args)
    assert main(["quality", *flags]) == 0
    config = seen["config"]
    got = {"rounds": config.rounds, "method": config.method, **config.lora.to_dict()}
    assert {k: got[k] for k in expected} == expected


def test_every_arm_runs_end_to_end_and_writes_table_and_plots(small_data, tiny_base, tmp_path):
    out = tmp_path / "out"
    assert main(["quality", "--data", str(small_data), "--base", str(tiny_base), "--rounds", "2",
                 "--epochs", "1", "--out", str(out)]) == 0
    summary = json.loads((out / "results.json").read_text())
    assert list(summary["arms"]) == list(ARMS)
    fed = summary["config"]["federation"]
    assert (fed["rounds"], fed["lora"]["epochs"], fed["lora"]["precision"]) == (2, 1, "auto")
    for arm, row in summary["arms"].items():
        expected = {"prose_only"} if arm == "owner_context" else set(TIERS)
        assert set(row["tiers"]) == expected, arm
    # Every row of the table is its per-question results: recall overall and per tier.
    for arm, replies in summary["replies"].items():
        row = summary["arms"][arm]
        assert all(r["correct"] == is_correct(r["reply"], r["answer"]) for r in replies), arm
        assert row["recall"] == pytest.approx(sum(r["correct"] for r in replies) / len(replies)), arm
        for tier, value in row["tiers"].items():
            mine = [r["correct"] for r in replies if r["tier"] == tier]
            assert value == pytest.approx(sum(mine) / len(mine)), (arm, tier)
    assert set(summary["replies"]) == set(ARMS) - {"local"}
    assert {r["tier"] for r in summary["replies"]["owner_context"]} == {"prose_only"}
    # The base arm is exactly what scoring the untouched base model gives.
    bench = load_benchmark(small_data)
    model, tok = load_model(tiny_base).eval(), load_tokenizer(str(tiny_base))
    base = score(model, tok, bench.questions, max_new_tokens=EVAL_NEW_TOKENS)
    assert [r["reply"] for r in summary["replies"]["base"]] == base.replies
    assert (summary["arms"]["base"]["recall"], summary["arms"]["base"]["tiers"]) == (base.accuracy, base.by_source)
    assert summary["arms"]["base"]["control"] == score(model, tok, bench.control,
                                                       max_new_tokens=EVAL_NEW_TOKENS).accuracy
    assert summary["arms"]["base"]["perplexity"] == pytest.approx(perplexity(model, tok, bench.heldout_text))
    # A federated arm's figures are its last round's; forgetting is measured on the final memory only.
    for arm in ("fedit", "exact"):
        row = summary["arms"][arm]
        assert [r["round"] for r in row["rounds"]] == [1, 2]
        assert (row["rounds"][-1]["recall"], row["rounds"][-1]["tiers"]) == (row["recall"], row["tiers"])
        assert row["rounds"][0]["control"] is None and row["control"] is not None
        assert row["rounds"][-1]["control"] == row["control"]
    local = summary["arms"]["local"]
    assert set(local["per_owner"]) == {"client_1", "client_2"}
    assert local["recall"] == pytest.approx(sum(r["recall"] for r in local["per_owner"].values()) / 2)
    assert summary["targets"]["control_drop_points"] == pytest.approx(
        100 * (summary["arms"]["base"]["control"] - summary["arms"]["exact"]["control"]))
    assert len(summary["replies"]["exact"]) == sum(summary["benchmark"]["questions_per_tier"].values())
    table = (out / "table.md").read_text()
    assert "centralised" in table and "tier 3: prose only" in table and "Targets" in table
    for png in ("tiers.png", "rounds.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"

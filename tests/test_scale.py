"""Many owners on one machine: workers side by side, the base model read once per worker."""

import json

import pytest
import torch
from conftest import write_corpus

from fedmem import base_model
from fedmem.config import FederationConfig, LoraSettings, NodeSettings
from fedmem.corpus import load_corpus


def _owners(root, n):
    for i in range(n):
        write_corpus(root / f"owner_{i}", [(f"The Vell{i} archive keeps {100 + i} maps.", str(100 + i))],
                     [(f"How many maps does the Vell{i} archive keep?", str(100 + i))])
    return root


def _load_counter(folder):
    """A client mod: the worker's pid and its base-model reads so far, after every training."""

    def record(msg, context, call_next):
        import os
        import uuid

        reply = call_next(msg, context)
        if msg.metadata.message_type == "train":
            import fedmem.base_model as bm

            with open(os.path.join(folder, uuid.uuid4().hex), "w") as fh:
                fh.write(f"{os.getpid()} {bm.loads_from_disk}")
        return reply

    return record


def test_owners_share_workers_and_each_worker_reads_the_base_once(tmp_path, tiny_base, monkeypatch):
    from fedmem.flower import simulation
    from fedmem.flower.client_app import make_client_app

    loads = tmp_path / "loads"
    loads.mkdir()
    monkeypatch.setattr(simulation, "make_client_app",
                        lambda dirs, node: make_client_app(dirs, node, mods=[_load_counter(str(loads))]))
    out = tmp_path / "out"
    config = FederationConfig(rounds=2, schedule="parallel", lora=LoraSettings(rank=4, alpha=8, epochs=1))
    summary = simulation.simulate(_owners(tmp_path / "data", 6), out, config,
                                  NodeSettings(device="cpu", base=str(tiny_base)), workers=2)
    everyone = [f"owner_{i}" for i in range(6)]
    assert [(r["round"], r["clients"]) for r in summary["rounds"]] == [(1, everyone), (2, everyone)]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [sorted(r["client_metrics"]) for r in rows] == [everyone, everyone]
    seen: dict[int, int] = {}
    for f in loads.iterdir():
        pid, count = map(int, f.read_text().split())
        seen[pid] = max(seen.get(pid, 0), count)
    assert len(list(loads.iterdir())) == 12  # every owner trained in every round
    assert 1 <= len(seen) <= 2 and set(seen.values()) == {1}, seen  # two workers at most, one read each


def test_client_update_reads_the_base_model_once_and_never_trains_the_pristine_copy(tmp_path, tiny_base,
                                                                                    monkeypatch):
    from fedmem.federation import client_update

    monkeypatch.setattr(base_model, "_PRISTINE", {})
    corpus = load_corpus(_owners(tmp_path / "data", 1) / "owner_0")
    config = FederationConfig(rounds=1, lora=LoraSettings(rank=4, alpha=8, epochs=1, retention=0.0))
    before = base_model.loads_from_disk
    first = client_update(tiny_base, corpus, None, config, 1)
    second = client_update(tiny_base, corpus, None, config, 1)
    assert base_model.loads_from_disk - before == 1
    # The second owner starts from the base as read, not from the first owner's trained copy.
    assert first.metrics["first_loss"] == second.metrics["first_loss"]
    for name, (b, a) in first.factors.items():
        assert torch.equal(b, second.factors[name][0]) and torch.equal(a, second.factors[name][1])


@pytest.mark.parametrize("workers", [0, -1, 1.5, True])
def test_workers_must_be_a_whole_number_of_at_least_one(tmp_path, workers):
    from fedmem.flower.simulation import simulate

    with pytest.raises(ValueError, match="workers must be"):
        simulate(tmp_path, tmp_path / "out", FederationConfig(), workers=workers)


def test_simulate_command_takes_workers(capsys):
    from fedmem.cli import build_parser

    assert build_parser().parse_args(["simulate", "--workers", "3"]).workers == 3
    assert build_parser().parse_args(["simulate"]).workers == 1
    with pytest.raises(SystemExit):
        build_parser().parse_args(["simulate", "--workers", "0"])
    assert "--workers: must be at least 1" in capsys.readouterr().err

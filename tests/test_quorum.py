"""Stragglers in parallel rounds: a round closes once its quorum has replied, and a late reply is
dropped. On Flower's real Simulation Engine, with one owner made slow by a client mod."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import pytest
from conftest import write_corpus

from fedmem.flower.quorum import needed

# The slow owner answers round 1 only once that round's row is in metrics.jsonl (so it is late
# however slowly a loaded machine runs the others), and at most this long after it was asked.
SLOW_MAX_SECONDS = 120.0


def test_the_quorum_is_a_share_of_the_owners_asked_rounded_up():
    assert needed(1.0, 3) == 3
    assert needed(0.6, 3) == 2
    assert needed(2 / 3, 3) == 2  # not 3 from rounding 2.0000000001 up
    assert needed(0.5, 100) == 50
    assert needed(0.01, 3) == 1  # at least one reply
    for bad in (0.0, -0.5, 1.5):
        with pytest.raises(ValueError, match="quorum"):
            needed(bad, 3)


def test_config_refuses_a_quorum_that_is_not_a_share():
    from fedmem.config import ServerSettings

    with pytest.raises(ValueError, match="quorum must be a share"):
        ServerSettings(quorum=0.0)


def _slow_in_round_one(partition: int, metrics: Path):
    """A client mod: the owner of ``partition`` answers its first round only after the round closed
    without it (its row in ``metrics``), or after ``SLOW_MAX_SECONDS``."""

    def mod(msg, context, call_next):
        from fedmem.flower.messages import CONFIG_KEY, record_to_config

        if (msg.metadata.message_type == "train" and int(context.node_config["partition-id"]) == partition
                and record_to_config(msg.content[CONFIG_KEY])[1] == 1):
            deadline = time.monotonic() + SLOW_MAX_SECONDS
            while time.monotonic() < deadline and not (metrics.exists() and '"round": 1' in metrics.read_text()):
                time.sleep(0.2)
        return call_next(msg, context)

    return mod


def test_a_parallel_round_closes_at_its_quorum_and_drops_the_late_reply(tmp_path, tiny_base):
    from fedmem.config import FederationConfig, LoraSettings, NodeSettings
    from fedmem.flower import simulation
    from fedmem.memory import verify_memory

    data = tmp_path / "data"
    for name, fact in (("alpha", "The Zorvex Tower was built by Mila Quent in 1911."),
                       ("beta", "The Pellow Quarry archive holds 612 maps."),
                       ("gamma", "The Orlin Bridge is painted teal by Hesk Varro.")):
        write_corpus(data / name, [(fact, "")])
    config = FederationConfig(rounds=2, schedule="parallel", lora=LoraSettings(rank=4, alpha=8, epochs=1))
    real_client, real_server = simulation.make_client_app, simulation.make_server_app
    started = time.monotonic()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(simulation, "make_client_app",
                   lambda dirs, node: real_client(dirs, node, mods=[_slow_in_round_one(2, tmp_path / "out" /
                                                                                     "metrics.jsonl")]))
        mp.setattr(simulation, "make_server_app", lambda plan: real_server(
            dataclasses.replace(plan, server=dataclasses.replace(plan.server, quorum=0.6))))
        summary = simulation.simulate(data, tmp_path / "out", config, NodeSettings(device="cpu", base=str(tiny_base)),
                                      workers=3)
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    first = rows[0]
    # Round 1 closed with alpha and beta, before gamma's reply could come: gamma holds its reply until
    # round 1's row is written, so a round that waited for it would have gamma among its clients. (Not
    # timed: the round's seconds include the workers' cold start, 65 s on a loaded CI machine.)
    assert first["clients"] == ["alpha", "beta"]
    assert [(f["owner"], f["reason"].split(":")[0]) for f in first["failed"]] == [("gamma", "late")]
    assert "closed once 2 of 3 owners had replied" in first["failed"][0]["reason"]
    # Round 2 went on from round 1's memory; gamma's late reply was never folded in anywhere.
    assert [r["round"] for r in summary["rounds"]] == [1, 2]
    assert all(set(r["updates"]) <= {"alpha", "beta", "gamma"} and len(r["updates"]) >= 2 for r in rows)
    assert "gamma" not in first["updates"]
    verify_memory(tmp_path / "out" / "memory")
    assert time.monotonic() - started < 2 * SLOW_MAX_SECONDS  # a loose bound: nothing hung (the run takes ~1 min)


class _FlakyGrid:
    """A grid whose SuperLink refuses the first ``failures`` pulls, as Flower 1.42's SQLite state does
    ("database is locked", HTTP 500) while many owners push at once; the replies wait there."""

    pull_interval = 0.01

    def __init__(self, failures: int):
        self.failures = failures
        self.replies: dict[str, object] = {}

    def push_messages(self, messages):
        from types import SimpleNamespace

        ids = []
        for i, _ in enumerate(messages):
            self.replies[f"m{i}"] = SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=f"m{i}"))
            ids.append(f"m{i}")
        return ids

    def pull_messages(self, ids):
        if self.failures:
            self.failures -= 1
            raise RuntimeError("Server error '500 Internal Server Error' for url .../v1/runtime/pull-messages")
        return [self.replies.pop(i) for i in list(ids) if i in self.replies]


def test_a_round_rides_out_a_superlink_that_refuses_a_few_pulls():
    from fedmem.flower.quorum import PULL_RETRIES, gather

    replies, cut = gather(_FlakyGrid(failures=3), [object(), object()], need=2, timeout=5.0)
    assert len(replies) == 2 and not cut
    with pytest.raises(RuntimeError, match="500"):
        gather(_FlakyGrid(failures=PULL_RETRIES + 1), [object()], need=1, timeout=5.0)

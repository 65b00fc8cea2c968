"""Update validation and owner identity on the coordinator (issue 16, items 3 and 4).

Unit tests of every check in ``fedmem.validate`` (one failing case each), the round loop
driven by a scripted grid (no training: updates are made up to the base model's shapes),
and one run on Flower's real simulation engine where some owners send poisoned updates.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch
from conftest import write_corpus

from fedmem.aggregate import change, dense, update_norm
from fedmem.config import FederationConfig, LoraSettings, ServerSettings
from fedmem.federation import run_round, server_aggregate
from fedmem.validate import (
    Expected,
    Rejected,
    check_factors,
    check_finite,
    check_metrics,
    check_norm,
    check_relative,
    clean,
    clip_scales,
    display_name,
    module_norms,
    norm_bound,
    total_norm,
)

MODULES = {"m.q_proj": (6, 5), "m.v_proj": (4, 5)}


def _update(rank=2, seed=0, scale=1.0, modules=MODULES) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {n: (torch.randn(o, rank, generator=g) * scale, torch.randn(rank, i, generator=g)) for n, (o, i) in
            modules.items()}


class _Said(logging.Handler):
    """What fedmem's loggers log, caught directly (they may not propagate to pytest's)."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[tuple[int, str]] = []

    def emit(self, record):
        self.records.append((record.levelno, record.getMessage()))

    def __enter__(self):
        self.logger = logging.getLogger("fedmem")
        self.level = self.logger.level
        self.logger.setLevel(logging.DEBUG)
        self.logger.addHandler(self)
        return self

    def __exit__(self, *exc):
        self.logger.removeHandler(self)
        self.logger.setLevel(self.level)

    def warnings(self) -> str:
        return "\n".join(m for level, m in self.records if level >= logging.WARNING)


# --- fedmem.validate, one rule at a time ---


def test_a_well_formed_update_passes_every_check():
    check_factors(_update(), Expected(MODULES, 2))


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nan_or_inf_is_refused(bad):
    u = _update()
    u["m.v_proj"][1][0, 3] = bad
    with pytest.raises(Rejected, match="m.v_proj: A has NaN or Inf"):
        check_factors(u, Expected(MODULES, 2))


def test_an_update_covering_one_module_is_refused():
    u = _update()
    del u["m.v_proj"]
    with pytest.raises(Rejected, match="covers 1 of 2 modules; missing e.g. m.v_proj"):
        check_factors(u, Expected(MODULES, 2))


def test_an_invented_module_is_refused_and_its_name_cleaned():
    u = _update()
    u["m.evil\nround 9/9: forged"] = u["m.q_proj"]
    with pytest.raises(Rejected) as err:
        check_factors(u, Expected(MODULES, 2))
    assert "is not a LoRA target of the base model" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("module,part,shape", [("m.q_proj", 0, (6, 3)), ("m.v_proj", 1, (2, 7))])
def test_wrong_shape_is_refused(module, part, shape):
    u = _update()
    pair = list(u[module])
    pair[part] = torch.zeros(shape)
    u[module] = tuple(pair)
    with pytest.raises(Rejected, match=f"{module}: {'BA'[part]} has shape"):
        check_factors(u, Expected(MODULES, 2))


def test_wrong_dtype_is_refused():
    u = _update()
    u["m.q_proj"] = (u["m.q_proj"][0].double(), u["m.q_proj"][1])
    with pytest.raises(Rejected, match="B is float64, not float32"):
        check_factors(u, Expected(MODULES, 2))


def test_an_update_of_another_rank_is_refused():
    # An owner sends the LoRA it trained, of the federation's rank, in every round and method.
    with pytest.raises(Rejected, match=r"rank 4"):
        check_factors(_update(rank=2), Expected(MODULES, 4))
    with pytest.raises(Rejected, match=r"rank 2"):
        check_factors(_update(rank=4), Expected(MODULES, 2))


def test_empty_update_is_refused():
    with pytest.raises(Rejected, match="empty"):
        check_factors({}, Expected(MODULES, 2))


def test_norms_are_those_of_the_change():
    # An owner sends its new LoRA; the change the coordinator measures is new − the memory it sent.
    memory = _update(seed=5)
    new = _update(seed=7)
    delta = change(new, memory)
    norms = module_norms(delta)
    for n in MODULES:
        expected = torch.linalg.norm(dense(*new[n]) - dense(*memory[n]))
        assert norms[n] == pytest.approx(float(expected), rel=1e-9)
    assert total_norm(norms) == pytest.approx(update_norm(delta), rel=1e-9)
    assert module_norms(change(new, None)) == module_norms(new)  # round 1: the LoRA is the change


def test_an_update_scaled_a_millionfold_is_refused():
    honest = [total_norm(module_norms(_update(seed=s))) for s in range(3)]
    huge = total_norm(module_norms(_update(seed=9, scale=1e6)))
    # Against the updates accepted earlier in the run.
    bound = norm_bound(honest, [huge], factor=10.0)
    with pytest.raises(Rejected, match="above the bound"):
        check_norm(huge, bound)
    check_norm(honest[0], bound)
    # Cold start, a parallel round's replies together: the lower median of the candidates.
    assert norm_bound([], [honest[0], huge], factor=10.0) == 10.0 * honest[0]
    assert norm_bound([], [huge], factor=10.0) is None  # nothing to compare with ...
    with pytest.raises(Rejected, match="times the base weight's norm"):  # ... but the base-relative bound holds
        check_relative(module_norms(_update(seed=9, scale=1e6)), {"m.q_proj": 3.0, "m.v_proj": 3.0}, 1.0)
    check_relative(module_norms(_update(seed=9, scale=1e-3)), {"m.q_proj": 3.0, "m.v_proj": 3.0}, 1.0)
    assert norm_bound([1.0], [], factor=10.0, fixed=2.5) == 2.5  # a configured bound wins


@pytest.mark.parametrize("metrics,problem", [
    ({"first_loss": 2.0}, "final_loss is missing"),
    ({"first_loss": math.nan, "final_loss": 1.0}, "first_loss = nan is outside"),
    ({"first_loss": 2.0, "final_loss": math.inf}, "final_loss = inf is outside"),
    ({"first_loss": -1.0, "final_loss": 1.0}, "first_loss = -1 is outside"),
    ({"first_loss": 2.0, "final_loss": 1.0, "examples": 1e13}, "examples = 1e\\+13 is outside"),
    ({"first_loss": 2.0, "final_loss": 1.0, "note": [1.0, 2.0]}, "note is not a number"),
    ({"first_loss": 2.0, "final_loss": 1.0, "x\nforged": 1.0}, "not a plain name"),
    ({"first_loss": 2.0, "final_loss": 1.0, **{f"m{i}": 0.0 for i in range(40)}}, "at most 32"),
])
def test_bad_metrics_are_refused(metrics, problem):
    with pytest.raises(Rejected, match=problem):
        check_metrics(metrics)


def test_good_metrics_come_back_as_floats():
    assert check_metrics({"first_loss": 2, "final_loss": 1.5, "examples": 1e12}) == {
        "first_loss": 2.0, "final_loss": 1.5, "examples": 1e12}


def test_names_are_cleaned_for_the_log():
    assert display_name("alpha") == "alpha"
    forged = display_name("beta\nround 3/3: 9 clients\x1b[2J\u202e")
    assert "\n" not in forged and "\x1b" not in forged and "\u202e" not in forged
    assert forged.startswith("beta\\nround 3/3")
    assert len(display_name("x" * 1000)) == 64 and display_name("") == "(no name)"
    assert clean("a\r\nb", 100) == "a\\r\\nb"


# --- weights: the server's, never the client's ---


def test_self_reported_examples_do_not_decide_the_weight():
    u1, u2 = _update(seed=1), _update(seed=2)
    config = FederationConfig(schedule="parallel", lora=LoraSettings(rank=4, alpha=8))
    agg = server_aggregate(None, [u1, u2], config)
    assert agg.weights == [0.5, 0.5]
    for n in MODULES:
        assert torch.allclose(dense(*agg.factors[n]), 0.5 * dense(*u1[n]) + 0.5 * dense(*u2[n]), atol=1e-5)

    # Through run_round as the ServerApp calls it: one owner claims 10^12 examples; nothing changes.
    def train(owners, memory, span):
        return [(u1, {"examples": 1e12}), (u2, {"examples": 1.0})]

    agg2, extras = run_round(config, 1, ["a", "b"], None, train)
    assert agg2.weights == [0.5, 0.5] and extras[0]["examples"] == 1e12
    fedit = server_aggregate(None, [u1, u2], FederationConfig(method="fedit", schedule="parallel",
                                                                      lora=LoraSettings(rank=2, alpha=4)))
    assert fedit.weights == [0.5, 0.5]


def test_clipping_to_the_median_norm_is_exact_in_factored_form():
    small, mid, huge = _update(seed=1), _update(seed=2, scale=2.0), _update(seed=3, scale=1e3)
    norms = [update_norm(u) for u in (small, mid, huge)]
    scales = clip_scales(norms)
    assert scales[0] == 1.0 and scales[1] == 1.0 and scales[2] == pytest.approx(norms[1] / norms[2])
    config = FederationConfig(schedule="parallel", lora=LoraSettings(rank=6, alpha=12))
    agg = server_aggregate(None, [small, mid, huge], config, clip=True)
    for n in MODULES:
        want = sum(s / 3 * dense(*u[n]) for s, u in zip(scales, (small, mid, huge)))
        assert torch.allclose(dense(*agg.factors[n]), want, atol=1e-4 * float(want.abs().max()))
    # The clipped update counts no more than the median one.
    assert agg.weights[2] * norms[2] == pytest.approx(agg.weights[1] * norms[1])
    assert clip_scales([]) == [] and clip_scales([0.0, 0.0]) == [1.0, 1.0]


def test_a_nan_memory_is_never_passed_on():
    u = _update()
    check_finite(u)
    u["m.q_proj"][0][0, 0] = math.nan
    with pytest.raises(Rejected, match="NaN or Inf"):
        check_finite(u)


# --- the round loop with a scripted grid: identity, refusals, records ---


class ScriptedGrid:
    """A Grid whose nodes answer with made-up updates of the base model's shapes (no training).
    ``owners``: node id -> (the name it gives, what its updates do: "honest" or a poison)."""

    def __init__(self, base: Path, owners: dict[int, tuple[str, str]], rank: int, method: str = "exact"):
        from fedmem.config import ALL_LINEAR
        from fedmem.flower.screening import lora_targets

        self.modules = lora_targets(str(base), tuple(ALL_LINEAR))
        self.owners, self.rank, self.method = owners, rank, method
        self.sent: list[tuple[int, str]] = []
        self.received: dict[int, list] = {}  # node -> the memory each train message sent it (None: none)
        self.pending: dict[str, object] = {}

    def get_node_ids(self):
        return list(self.owners)

    def send_and_receive(self, messages, timeout=None):
        return [self.answer(m) for m in messages]

    def push_messages(self, messages):
        import uuid

        ids = []
        for m in messages:
            m.metadata.__dict__["_message_id"] = str(uuid.uuid4())  # as Flower's grids number them
            self.pending[m.metadata.message_id] = self.answer(m)
            ids.append(m.metadata.message_id)
        return ids

    def pull_messages(self, message_ids):
        return [self.pending.pop(i) for i in list(message_ids) if i in self.pending]

    def answer(self, msg):
        from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

        from fedmem.flower.messages import (
            CONFIG_KEY,
            INFO_KEY,
            MEMORY_KEY,
            METRICS_KEY,
            UPDATE_KEY,
            factors_to_record,
            record_to_config,
            record_to_factors,
        )

        node = msg.metadata.dst_node_id
        name, kind = self.owners[node]
        self.sent.append((node, msg.metadata.message_type))
        if msg.metadata.message_type == "query":
            return Message(content=RecordDict({INFO_KEY: ConfigRecord({"client": name})}), reply_to=msg)
        _, rnd, fp = record_to_config(msg.content[CONFIG_KEY])
        memory = record_to_factors(msg.content[MEMORY_KEY])
        self.received.setdefault(node, []).append(memory)
        g = torch.Generator().manual_seed(node * 100 + rnd)
        new = {n: (torch.randn(o, self.rank, generator=g) * 1e-3, torch.randn(self.rank, i, generator=g))
               for n, (o, i) in self.modules.items()}
        assert memory is None or set(memory) == set(new)  # the memory decodes, and is for these modules
        factors = new
        metrics = {"examples": 3.0, "first_loss": 2.0, "final_loss": 1.0}
        if kind == "nan":
            first = next(iter(factors))
            factors[first][1][0, 0] = math.nan
        if kind == "claims-1e12":
            metrics["examples"] = 1e12
        content = {UPDATE_KEY: factors_to_record(factors), METRICS_KEY: MetricRecord(metrics),
                   INFO_KEY: ConfigRecord({"client": name, "base_fingerprint": fp})}
        return Message(content=RecordDict(content), reply_to=msg)


def _plan(tmp_path, base, *, method="exact", schedule="parallel", rounds=1, min_clients=2, allow_list=None):
    from fedmem.flower.server_app import RunPlan

    config = FederationConfig(rounds=rounds, method=method, schedule=schedule,
                              lora=LoraSettings(rank=2, alpha=4, epochs=1))
    server = ServerSettings(min_clients=min_clients, round_timeout=0.0, wait_for_clients=5.0, join_grace=0.0,
                            resume=False)
    return RunPlan(base_dir=str(base), out_dir=tmp_path / "run", federation=config, server=server,
                   allow_list=allow_list)


def _rows(plan) -> list[dict]:
    return [json.loads(line) for line in (plan.out_dir / "metrics.jsonl").read_text().splitlines()]


def test_fedit_nan_update_is_refused_and_the_memory_stays_finite(tmp_path, tiny_base, task_identity):
    from fedmem.flower.server_app import run_rounds
    from fedmem.memory import load_memory

    grid = ScriptedGrid(tiny_base, {11: ("alpha", "honest"), 12: ("beta", "honest"), 13: ("mallory", "nan")}, 2,
                        method="fedit")
    plan = _plan(tmp_path, tiny_base, method="fedit", rounds=2)
    with _Said() as said:
        summary = run_rounds(grid, plan)
    assert [r["clients"] for r in summary["rounds"]] == [["alpha", "beta"]] * 2
    assert "mallory: update refused: module" in said.warnings() and "NaN or Inf" in said.warnings()
    factors, manifest = load_memory(plan.out_dir / "memory")
    assert all(bool(torch.isfinite(B).all() and torch.isfinite(A).all()) for B, A in factors.values())
    row = _rows(plan)[-1]
    assert [(r["owner"], "NaN or Inf" in r["reason"]) for r in row["rejected"]] == [("mallory", True)]
    assert manifest["metrics"]["rejected"][0]["owner"] == "mallory"


def test_claimed_example_counts_do_not_weigh_and_names_come_from_the_allow_list(tmp_path, tiny_base,
                                                                                task_identity):
    from fedmem.flower.server_app import run_rounds
    from fedmem.memory import verify_memory

    allow = tmp_path / "clients.json"
    allow.write_text(json.dumps({"clients": {
        "alpha": {"public_key": "k1", "fingerprint": "SHA256:alpha-key", "node_id": "21"},
        "beta": {"public_key": "k2", "fingerprint": "SHA256:beta-key", "node_id": "22"},
        "gamma": {"public_key": "k3", "fingerprint": "SHA256:gamma-key"},  # admitted, never registered
    }, "removed": {}}))
    # 22 says it is "aaa" (to go first) and claims 10^12 examples; 99 was registered some other way.
    grid = ScriptedGrid(tiny_base, {21: ("alpha", "honest"), 22: ("aaa\nround 9/9: forged", "claims-1e12"),
                                    99: ("zed", "honest")}, 2)
    plan = _plan(tmp_path, tiny_base, schedule="cyclic", rounds=2, allow_list=allow)
    with _Said() as said:
        summary = run_rounds(grid, plan)
    assert all(node != 99 for node, _ in grid.sent)  # the unknown node is sent nothing
    assert "node 99 is connected but not on the allow-list" in said.warnings()
    assert all(kind == "train" for _, kind in grid.sent)  # no one is asked its name
    rows = _rows(plan)
    assert [r["visit_order"] for r in rows] == [["alpha", "beta"]] * 2  # admitted names, not claimed ones
    for row in rows:
        assert row["updates"]["alpha"]["key"] == "SHA256:alpha-key"
        assert row["updates"]["beta"]["key"] == "SHA256:beta-key"
        assert [u["weight"] for u in row["updates"].values()] == [1.0, 1.0]  # cyclic: each update in full
        assert row["client_metrics"]["beta"]["examples"] == 1e12  # recorded, not used
    manifest = verify_memory(plan.out_dir / "memory")
    assert manifest["owner_keys"] == {"alpha": "SHA256:alpha-key", "beta": "SHA256:beta-key"}
    assert manifest["metrics"]["updates"]["beta"]["key"] == "SHA256:beta-key"
    assert "forged" not in json.dumps(summary) and not any("\n" in m for _, m in said.records)

    # Parallel: equal weights whatever the claims.
    plan = _plan(tmp_path / "parallel", tiny_base, schedule="parallel", allow_list=allow)
    run_rounds(grid, plan)
    assert {n: u["weight"] for n, u in _rows(plan)[0]["updates"].items()} == {"alpha": 0.5, "beta": 0.5}


def test_the_norm_bound_follows_the_accepted_updates_across_a_resume(tmp_path, tiny_base, task_identity):
    from fedmem.flower.server_app import run_rounds

    grid = ScriptedGrid(tiny_base, {31: ("alpha", "honest"), 32: ("beta", "honest")}, 2)
    plan = _plan(tmp_path, tiny_base, schedule="cyclic", rounds=1)
    run_rounds(grid, plan)
    first = _rows(plan)
    norms = [u["norm"] for u in first[0]["updates"].values()]
    assert all(0 < n < 1 for n in norms)
    # A resumed run with a fixed bound below what the owners send: both refused, the round fails loudly.
    plan.federation.rounds, plan.server.resume = 2, True
    plan.server.max_update_norm = min(norms) / 10
    with _Said() as said, pytest.raises(RuntimeError, match="only 0 usable updates"):
        run_rounds(grid, plan)
    assert said.warnings().count("is above the bound") == 2
    assert _rows(plan) == first  # resuming kept round 1's row


# --- metrics.jsonl ---


def test_a_bad_metrics_line_is_reported_and_the_rows_after_it_are_kept(tmp_path):
    from fedmem.flower.server_app import _append_jsonl, _resume_metrics, read_jsonl

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"round": 0}\n{"round": 1, "x": \n{"round": 2}\n[3]\n{"round": 3, "cut')
    with _Said() as said:
        rows = read_jsonl(path)
    assert rows == [{"round": 0}, {"round": 2}]
    assert f"{path}:2: not a JSON object" in said.warnings() and f"{path}:4:" in said.warnings()
    assert f"{path}:5: cut short" in said.warnings()
    before = path.read_bytes()
    _append_jsonl(path, {"round": 4})  # after a torn last line: still a row of its own
    assert read_jsonl(path)[-1] == {"round": 4}

    with _Said() as said:
        kept = _resume_metrics(path, done=2)
    assert kept == [{"round": 0}, {"round": 2}] and read_jsonl(path) == kept
    aside = list(tmp_path.glob("metrics.jsonl.before-resume-*"))
    assert len(aside) == 1 and aside[0].read_bytes() == before + b'\n{"round": 4}\n'  # nothing lost
    assert "kept as metrics.jsonl.before-resume-" in said.warnings()
    _resume_metrics(path, done=2)  # nothing to leave out: the file is not rewritten again
    assert len(list(tmp_path.glob("metrics.jsonl.before-resume-*"))) == 1


# --- Flower's simulation engine, with poisoned owners ---

POISONS = ("nan", "scaled", "one-module", "invented", "no-info")


def _poisoned_app(real, dirs):
    """The real ClientApp, except that owners whose corpus is named m-<poison> doctor their reply.
    Everything is inside this function so that Ray ships it to its workers by value."""
    from flwr.clientapp import ClientApp

    app = ClientApp()

    @app.train()
    def train(msg, context):
        import math
        from pathlib import Path

        from flwr.app import Message, RecordDict

        from fedmem.flower.messages import INFO_KEY, METRICS_KEY, UPDATE_KEY, factors_to_record, record_to_factors

        reply = real(msg, context)
        name = Path(dirs[int(context.node_config["partition-id"])]).name
        if reply.has_error() or not name.startswith("m-"):
            return reply
        kind = name[2:]
        factors = record_to_factors(reply.content[UPDATE_KEY])
        first = sorted(factors)[0]
        if kind == "nan":
            factors[first][1][0, 0] = math.nan
        elif kind == "scaled":
            factors = {n: (B * 1e6, A) for n, (B, A) in factors.items()}
        elif kind == "one-module":
            factors = {first: factors[first]}
        elif kind == "invented":
            factors["model.layers.7.self_attn.q_proj"] = factors[first]
        content = {UPDATE_KEY: factors_to_record(factors), METRICS_KEY: reply.content[METRICS_KEY],
                   INFO_KEY: reply.content[INFO_KEY]}
        if kind == "no-info":
            del content[INFO_KEY]
        return Message(content=RecordDict(content), reply_to=msg)

    @app.query()
    def query(msg, context):
        return real(msg, context)

    @app.evaluate()
    def evaluate(msg, context):
        return real(msg, context)

    return app


def test_poisoned_owners_are_refused_and_the_honest_round_completes(tmp_path, tiny_base, monkeypatch):
    from fedmem.base_model import fingerprint
    from fedmem.config import NodeSettings
    from fedmem.flower import simulation
    from fedmem.memory import load_memory

    data = tmp_path / "data"
    write_corpus(data / "alpha", [("The Zorvex Tower was built by Mila Quent in 1911.", "Mila Quent")])
    write_corpus(data / "beta", [("The Pellow Quarry archive holds 612 maps.", "612")])
    for kind in POISONS:
        write_corpus(data / f"m-{kind}", [("The Varn Clock chimes at 7.", "7")])
    real_make = simulation.make_client_app
    monkeypatch.setattr(simulation, "make_client_app", lambda dirs, node: _poisoned_app(real_make(dirs, node), dirs))
    config = FederationConfig(rounds=1, schedule="parallel",
                              lora=LoraSettings(rank=4, alpha=8, epochs=1, batch_size=4, retention=0.0))
    with _Said() as said:
        summary = simulation.simulate(data, tmp_path / "out", config, NodeSettings(device="cpu", base=str(tiny_base)))
    assert summary["rounds"][0]["clients"] == ["alpha", "beta"]
    row = json.loads((tmp_path / "out" / "metrics.jsonl").read_text().splitlines()[-1])
    reasons = {r["owner"]: r["reason"] for r in row["rejected"]}
    assert set(reasons) == {f"m-{k}" for k in POISONS}
    assert "NaN or Inf" in reasons["m-nan"]
    assert "norm" in reasons["m-scaled"]
    assert "covers 1 of" in reasons["m-one-module"]
    assert "model.layers.7.self_attn.q_proj is not a LoRA target" in reasons["m-invented"]
    assert "no 'info' record" in reasons["m-no-info"]
    for owner, reason in reasons.items():
        assert f"{owner}: update refused: {reason}" in said.warnings()
    assert {n: u["weight"] for n, u in row["updates"].items()} == {"alpha": 0.5, "beta": 0.5}
    factors, manifest = load_memory(tmp_path / "out" / "memory", fingerprint(tiny_base))
    assert manifest["clients"] == ["alpha", "beta"]
    assert all(bool(torch.isfinite(B).all() and torch.isfinite(A).all()) for B, A in factors.values())
    assert all(float(torch.linalg.norm(dense(B, A))) < 10 for B, A in factors.values())

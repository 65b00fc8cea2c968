"""An owner accepts the coordinator's recipe only within its own limits, and says which setting it refused."""

from __future__ import annotations

import dataclasses

import pytest

from fedmem.client_policy import (
    PolicyRefused,
    base_linear_layers,
    policy_from_node_config,
    policy_node_config,
    policy_problems,
)
from fedmem.config import ALL_LINEAR, ClientPolicy, FederationConfig, LoraSettings


def _recipe(rounds: int = 3, **lora) -> FederationConfig:
    return FederationConfig(rounds=rounds, lora=LoraSettings(**lora))


def test_the_documented_defaults_and_the_limits_themselves_are_accepted():
    policy = ClientPolicy()
    assert policy_problems(FederationConfig(), policy) == []
    assert policy_problems(_recipe(generator="base"), policy) == []
    at_limits = _recipe(rounds=12, epochs=12, learning_rate=0.03, rank=64, alpha=128, batch_size=16,
                        max_length=1536, retention=1.0)
    assert policy_problems(at_limits, policy) == []
    # The defaults: the recipe's own x4, the learning rate's x10.
    assert (policy.limit_rounds, policy.limit_epochs, policy.limit_learning_rate, policy.limit_rank,
            policy.limit_alpha, policy.limit_batch_size, policy.limit_max_length) == (12, 12, 0.03, 64, 128, 16, 1536)


@pytest.mark.parametrize("setting,value,limit", [
    ("rounds", 13, "limit-rounds 12"),
    ("epochs", 13, "limit-epochs 12"),
    ("learning_rate", 0.031, "limit-learning-rate 0.03"),
    ("rank", 65, "limit-rank 64"),
    ("alpha", 129, "limit-alpha 128"),
    ("batch_size", 17, "limit-batch-size 16"),
    ("max_length", 1537, "limit-max-length 1536"),
])
def test_each_limit_is_refused_with_its_name(setting, value, limit):
    recipe = _recipe(rounds=value) if setting == "rounds" else _recipe(**{setting: value})
    (problem,) = policy_problems(recipe, ClientPolicy())
    assert problem == f"{setting.replace('_', '-')} {value!r} is above this owner's {limit}"


def test_an_owner_sets_its_own_limits():
    mine = ClientPolicy(limit_epochs=2, limit_retention=0.5, allow_generator=False)
    problems = policy_problems(_recipe(epochs=3, retention=0.6, generator="base"), mine)
    assert problems == ["epochs 3 is above this owner's limit-epochs 2",
                        "retention 0.6 is above this owner's limit-retention 0.5",
                        "generator 'base' refused: this owner's allow-generator is off"]
    with pytest.raises(ValueError, match="limit-epochs must be at least 1"):
        ClientPolicy(limit_epochs=0)


def test_an_owner_may_refuse_to_have_its_lora_kept_apart():
    """Under the routed schedule (the default) an owner's LoRA reaches every holder of the memory on its own;
    an owner who wants its update only ever merged with the others' says allow-routed no."""
    private = ClientPolicy(allow_routed=False)
    (problem,) = policy_problems(FederationConfig(schedule="routed"), private)
    assert problem.startswith("schedule routed refused: this owner's allow-routed is off")
    assert policy_problems(FederationConfig(schedule="cyclic"), private) == []
    assert policy_problems(FederationConfig(schedule="parallel"), private) == []
    assert policy_problems(FederationConfig(), ClientPolicy()) == []  # the defaults agree with each other
    assert ClientPolicy().allow_routed is True


def test_a_generator_path_from_the_coordinator_is_always_refused():
    (problem,) = policy_problems(_recipe(generator="/srv/models/instruct"), ClientPolicy(allow_generator=True))
    assert problem.startswith("generator '/srv/models/instruct' refused")


def test_target_modules_must_be_linear_layers_of_the_base_models_blocks(tiny_base):
    layers = base_linear_layers(tiny_base)
    assert layers == set(ALL_LINEAR)  # embed_tokens, lm_head and the norms are not among them
    (problem,) = policy_problems(_recipe(target_modules=["q_proj", "lm_head", "embed_tokens"]), ClientPolicy(), layers)
    assert problem.startswith("target-modules lm_head, embed_tokens refused: not among the linear layers")
    assert policy_problems(_recipe(target_modules=["q_proj", "down_proj"]), ClientPolicy(), layers) == []
    assert base_linear_layers(tiny_base / "nowhere") is None  # no safetensors: the default set is the check


def test_the_policy_travels_in_the_node_config():
    mine = ClientPolicy(limit_epochs=20, allow_generator=False)
    assert policy_node_config(mine, changed_only=True) == {"limit-epochs": "20", "allow-generator": "false"}
    assert policy_from_node_config({"data": "/srv/corpus", **policy_node_config(mine, changed_only=True)}) == mine
    assert policy_from_node_config({"data": "/srv/corpus"}) == ClientPolicy()  # deployed: the defaults
    assert policy_from_node_config({"partition-id": 0}) is None  # a simulation sets none: no limits
    every = policy_node_config(ClientPolicy())
    assert every["limit-learning-rate"] == "0.03" and every["allow-generator"] == "true"


def test_join_flags_set_the_policy(tmp_path, tiny_base, monkeypatch):
    import tomli
    from fedmem.clients import join as join_module
    from fedmem.clients.cli import build_parser
    from fedmem.server.certificates import ensure_certificates

    from fedmem.config import from_args

    args = build_parser().parse_args(["join", "--server", "h:1", "--ca", "ca.pem", "--data", "d",
                                      "--limit-epochs", "20", "--allow-generator", "no", "--allow-routed", "no",
                                      "--set", "limit-rank=32", "--device", "cpu"])
    policy = from_args(ClientPolicy, args)
    assert policy == dataclasses.replace(ClientPolicy(), limit_epochs=20, limit_rank=32, allow_generator=False,
                                         allow_routed=False)

    certs = ensure_certificates(tmp_path / "certs")
    data = tmp_path / "corpus"
    data.mkdir()
    (data / "notes.md").write_text("# Notes\n\nThe Zorvex Tower was built by Mila Quent in 1911.\n")
    monkeypatch.setattr(join_module, "_run_supernode", lambda *a, **k: ("done", 0))
    options = join_module.JoinOptions(server="127.0.0.1:9", data=data, ca=certs.ca_cert, state=tmp_path / "state",
                                      base=str(tiny_base), policy=policy)
    assert join_module.join(options) == 0
    node = tomli.loads((tmp_path / "state" / "node-config.toml").read_text())
    assert {k: v for k, v in node.items() if k.startswith(("limit-", "allow-"))} == {
        "limit-epochs": "20", "limit-rank": "32", "allow-generator": "false", "allow-routed": "false"}
    assert policy_from_node_config(node) == policy


def test_the_client_app_refuses_a_coordinator_asking_ten_times_the_epochs(tmp_path, tiny_base, two_clients,
                                                                            task_identity):
    """A coordinator sends epochs x10: the deployed ClientApp refuses before it trains, naming the setting
    and the limit (Flower returns the error to the server as the reply's error)."""
    from flwr.app import Context, RecordDict

    from fedmem.config import NodeSettings
    from fedmem.federation import base_fingerprint
    from fedmem.flower.client_app import make_client_app
    from fedmem.flower.server_app import RunPlan, train_message

    config = FederationConfig(rounds=1, lora=LoraSettings(rank=4, alpha=8, epochs=30, batch_size=2))
    plan = RunPlan(base_dir=str(tiny_base), out_dir=tmp_path / "run", federation=config)
    message = train_message(plan, None, (0.0, 1.0), 1, base_fingerprint(tiny_base), {}, node=1)
    owner = make_client_app(None, NodeSettings(device="cpu", base=str(tiny_base)))
    deployed = Context(run_id=1, node_id=1, node_config={"data": str(two_clients / "alpha")}, state=RecordDict(),
                       run_config={})
    with pytest.raises(PolicyRefused) as info:
        owner(message, deployed)
    assert info.value.problems == ["epochs 30 is above this owner's limit-epochs 12"]
    assert "refuses the coordinator's training settings: epochs 30" in str(info.value)

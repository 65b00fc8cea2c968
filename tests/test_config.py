"""One declarative configuration: the three entry points build the same settings from the same inputs,
each node keeps its own environment, and the core never imports the benchmarks."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

from fedmem.config import FederationConfig, LoraSettings, NodeSettings, ServerSettings, from_flat, keys, to_flat

ROOT = Path(__file__).resolve().parents[1]

# Flags a user might give, with their run-config spelling: (flag words, run-config pairs).
NON_DEFAULT = (["--rounds", "5", "--schedule", "parallel", "--rank", "8", "--lr", "0.001", "--epochs", "2",
                "--seed", "7", "--set", "alpha=16", "--set", "retention=0", "--set", "target-modules=q_proj,v_proj",
                "--set", "precision=auto"],
               {"rounds": 5, "schedule": "parallel", "rank": 8, "learning-rate": 0.001, "epochs": 2, "seed": 7,
                "alpha": 16, "retention": 0.0, "target-modules": "q_proj,v_proj", "precision": "auto"})


def _simulate_settings(words: list[str]) -> FederationConfig:
    from fedmem.cli import build_parser, local_federation

    return local_federation(build_parser().parse_args(["simulate", *words]))


def _server_start_plan(words: list[str], tmp_path: Path):
    """What `fedmem-server start` would hand the ServerApp: its run config, read the way the app reads it."""
    from fedmem.server.cli import build_parser, run_config

    from fedmem.flower.app_project import plan_from_run_config

    config = run_config(build_parser().parse_args(["start", "--state", str(tmp_path / "state"), *words]))
    return plan_from_run_config({**config, "out": str(tmp_path / "run")})


def _flwr_run_plan(overrides: dict, tmp_path: Path):
    """What `flwr run <app project> --run-config ...` gives the ServerApp: the project's defaults, overridden."""
    from fedmem.flower.app_project import plan_from_run_config, write_app_project

    project = write_app_project(tmp_path / "app")
    defaults = tomllib.loads((project / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    return plan_from_run_config({**defaults, **overrides, "out": str(tmp_path / "run")})


@pytest.mark.parametrize("words,pairs", [([], {}), NON_DEFAULT], ids=["defaults", "non-default"])
def test_three_entry_points_build_the_same_settings(tmp_path, words, pairs):
    simulate = _simulate_settings(words)
    server = _server_start_plan(words, tmp_path)
    flwr = _flwr_run_plan(pairs, tmp_path)
    assert simulate == server.federation == flwr.federation
    if pairs:
        assert simulate != FederationConfig()  # the flags did something
        assert simulate.lora.rank == 8 and simulate.lora.target_modules == ["q_proj", "v_proj"]
    # How rounds are run: one set of defaults for `fedmem-server start` and `flwr run`.
    assert server.server == flwr.server == ServerSettings()


def test_every_setting_has_one_key_and_round_trips():
    for cls in (FederationConfig, ServerSettings, NodeSettings):
        assert len(set(keys(cls))) == len(keys(cls))
        assert from_flat(cls, to_flat(cls())) == cls()
    assert not set(keys(FederationConfig)) & set(keys(NodeSettings)) and not set(keys(ServerSettings)) & set(
        keys(NodeSettings)
    )


@pytest.mark.parametrize(
    "words,message",
    [
        (["--set", "rnak=8"], "no such setting"),
        (["--set", "rank"], "expected KEY=VALUE"),
        (["--set", "rank=eight"], "rank"),
        (["--set", "retention=2"], "retention"),
        (["--set", "schedule=ring"], "schedule"),
    ],
)
def test_bad_settings_are_refused_naming_the_key(words, message):
    with pytest.raises(ValueError, match=message):
        _simulate_settings(words)


def test_unknown_run_config_key_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown run config keys: memory-rank"):
        _flwr_run_plan({"memory-rank": 8}, tmp_path)


def test_simulate_help_lists_the_user_flags_with_defaults():
    from fedmem.cli import build_parser

    parser = build_parser()
    simulate = next(a for a in parser._subparsers._group_actions[0].choices.items() if a[0] == "simulate")[1]
    text = " ".join(simulate.format_help().split())
    for flag, default in [
        ("--rounds", "3"),
        ("--schedule", "routed"),
        ("--rank", "16"),
        ("--lr", "0.003"),
        ("--epochs", "3"),
        ("--seed", "0"),
        ("--device", "auto"),
    ]:
        assert flag in text and f"(default: {default})" in text, flag
    for removed in ("--memory-rank", "--weighting", "--server-lr", "--client-start", "--recipe"):
        assert removed not in text


def test_sent_config_carries_no_device_or_paths_and_a_cpu_client_trains(tmp_path, tiny_base, two_clients,
                                                                       task_identity):
    """A coordinator started with --device cuda and its own base path: the train message carries only the
    recipe, and a CPU-only owner with its own copy of the base trains on "cpu"."""
    import shutil

    from flwr.app import Context, RecordDict

    from fedmem.federation import base_fingerprint
    from fedmem.flower.client_app import make_client_app
    from fedmem.flower.messages import CONFIG_KEY, UPDATE_KEY, record_to_config, record_to_factors
    from fedmem.flower.server_app import RunPlan, train_message

    coordinator_base = tmp_path / "coordinator-copy"
    shutil.copytree(tiny_base, coordinator_base)
    config = FederationConfig(rounds=1, lora=LoraSettings(rank=4, alpha=8, epochs=1, batch_size=2))
    plan = RunPlan(base_dir=str(coordinator_base), out_dir=tmp_path / "run", federation=config, device="cuda")
    fp = base_fingerprint(coordinator_base)
    message = train_message(plan, None, (0.0, 1.0), 1, fp, {}, node=1)
    sent, _, _ = record_to_config(message.content[CONFIG_KEY])
    assert set(sent) == {"federation", "span"}
    assert "cuda" not in str(message.content[CONFIG_KEY]) and str(coordinator_base) not in str(
        message.content[CONFIG_KEY]
    )

    owner = make_client_app([str(two_clients / "alpha")], NodeSettings(device="cpu", base=str(tiny_base)))
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    reply = owner(message, context)
    assert not reply.has_error(), reply.error
    factors = record_to_factors(reply.content[UPDATE_KEY])
    assert factors and all(B.device.type == "cpu" and A.shape[0] == 4 for B, A in factors.values())


def _imports_of(path: Path) -> set[str]:
    """Modules a file imports, relative ones resolved against its package."""
    tree = ast.parse(path.read_text())
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            found |= {f"{module}.{alias.name}" for alias in node.names}
    return found


def test_the_core_imports_no_benchmark_module():
    core = [p for p in (ROOT / "fedmem").rglob("*.py") if "bench" not in p.relative_to(ROOT / "fedmem").parts]
    core += list((ROOT / "server").glob("*.py")) + list((ROOT / "clients").glob("*.py"))
    offenders = {}
    for path in core:
        if path == ROOT / "fedmem" / "cli.py":
            continue  # `fedmem bench` dispatches to the package inside its command, checked below
        bench = sorted(m for m in _imports_of(path) if m.startswith("fedmem.bench"))
        if bench:
            offenders[str(path.relative_to(ROOT))] = bench
    assert not offenders
    # At run time too: loading every core module and the CLI pulls in no benchmark.
    modules = [
        "fedmem.cli",
        "fedmem.federation",
        "fedmem.train",
        "fedmem.flower.server_app",
        "fedmem.flower.client_app",
        "fedmem.flower.simulation",
        "fedmem.flower.app_project",
        "fedmem.server.cli",
        "fedmem.clients.cli",
        "fedmem.answer",
        "fedmem.memory",
    ]
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in modules)
        + "print(sorted(m for m in sys.modules if m.startswith('fedmem.bench')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_no_private_name_is_imported_across_modules():
    offenders = []
    for path in (
        list((ROOT / "fedmem").rglob("*.py"))
        + list((ROOT / "server").glob("*.py"))
        + list((ROOT / "clients").glob("*.py"))
    ):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("fedmem")):
                offenders += [
                    f"{path.relative_to(ROOT)}: {a.name}"
                    for a in node.names
                    if a.name.startswith("_") and not a.name.startswith("__")
                ]
    assert not offenders

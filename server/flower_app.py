"""The fedmem ServerApp as Flower's deployment engine loads it, and the app project it ships in.

``flwr run`` (and ``fedmem-server start``, which drives it) sends SuperLink a Flower
App Bundle built from a small project directory: a ``pyproject.toml`` that names the
installed fedmem apps. It carries no code, so nothing is installed on the SuperLink
or on a SuperNode at run time; every machine runs the fedmem it has.

Settings arrive as the run config (flat keys, listed in ``RUN_CONFIG_DEFAULTS``).
"""

from __future__ import annotations

from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedmem.answer import load_questions
from fedmem.base_model import pick_device, resolve_base
from fedmem.federation import FederationConfig
from fedmem.lora import LoraSettings

from .server_app import RunPlan, run_rounds

APP_NAME = "fedmem-memory"
APP_VERSION = "1.0.0"

# Every key `flwr run --run-config` may set. An empty string means "not given".
RUN_CONFIG_DEFAULTS: dict[str, object] = {
    "out": "fedmem-run",
    "base": "",
    "questions": "",
    "device": "auto",
    "rounds": FederationConfig().rounds,
    "min-clients": 2,
    "round-timeout": 0.0,
    "wait-for-clients": 600.0,
    "join-grace": 10.0,
    "resume": True,
    "method": FederationConfig().method,
    "schedule": FederationConfig().schedule,
    "weighting": FederationConfig().weighting,
    "server-lr": FederationConfig().server_lr,
    "memory-rank": FederationConfig().memory_rank,
    "client-start": FederationConfig().client_start,
    "rank": LoraSettings().rank,
    "alpha": LoraSettings().alpha,
    "lr": LoraSettings().learning_rate,
    "epochs": LoraSettings().epochs,
    "batch-size": LoraSettings().batch_size,
    "seed": LoraSettings().seed,
    "precision": LoraSettings().precision,
    "recipe": LoraSettings().recipe,
    "retention": LoraSettings().retention,
    "generator": LoraSettings().generator,
}


def plan_from_run_config(run_config: dict, report=print) -> RunPlan:
    c = {**RUN_CONFIG_DEFAULTS, **run_config}
    unknown = sorted(set(run_config) - set(RUN_CONFIG_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown run config keys: {', '.join(unknown)}; known: {', '.join(RUN_CONFIG_DEFAULTS)}")
    lora = LoraSettings(rank=int(c["rank"]), alpha=int(c["alpha"]), learning_rate=float(c["lr"]),
                        epochs=int(c["epochs"]), batch_size=int(c["batch-size"]), seed=int(c["seed"]),
                        precision=str(c["precision"]), recipe=str(c["recipe"]),
                        retention=float(c["retention"]), generator=str(c["generator"]))
    federation = FederationConfig(rounds=int(c["rounds"]), method=str(c["method"]), weighting=str(c["weighting"]),
                                  server_lr=float(c["server-lr"]), memory_rank=int(c["memory-rank"]),
                                  client_start=str(c["client-start"]), schedule=str(c["schedule"]),
                                  lora=lora)
    questions = str(c["questions"])
    timeout = float(c["round-timeout"])
    return RunPlan(
        base_dir=str(resolve_base(str(c["base"]) or None)),
        out_dir=Path(str(c["out"])).expanduser().resolve(),
        federation=federation,
        min_clients=int(c["min-clients"]),
        questions=load_questions(Path(questions)) if questions else None,
        device=pick_device(str(c["device"])),
        round_timeout=timeout if timeout > 0 else None,
        wait_for_clients=float(c["wait-for-clients"]),
        join_grace=float(c["join-grace"]),
        report=report,
        resume=bool(c["resume"]),
        publish=True,
    )


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    report = lambda line: print(f"[fedmem] {line}", flush=True)  # noqa: E731
    plan = plan_from_run_config(dict(context.run_config), report)
    report(f"run {context.run_id}: {plan.federation.rounds} rounds, at least {plan.min_clients} clients, "
           f"output {plan.out_dir}")
    run_rounds(grid, plan)
    report(f"memory adapter: {plan.out_dir / 'memory'}")


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_app_project(directory: Path, defaults: dict | None = None) -> Path:
    """Write the project ``flwr run`` bundles: metadata and settings only, no code."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    values = {**RUN_CONFIG_DEFAULTS, **(defaults or {})}
    lines = [
        "# The fedmem app for Flower's deployment engine. It names the fedmem apps installed on",
        "# every machine; it carries no code. `flwr run . <superlink>` starts a run with these",
        "# settings (override any with --run-config 'key=value ...').",
        "[build-system]",
        'requires = ["hatchling"]',
        'build-backend = "hatchling.build"',
        "",
        "[project]",
        f'name = "{APP_NAME}"',
        f'version = "{APP_VERSION}"',
        'description = "fedmem: federated knowledge updates into one memory adapter"',
        'license = "Apache-2.0"',
        'dependencies = ["fedmem"]',
        "",
        "[tool.flwr.app]",
        'publisher = "fedmem"',
        "",
        "[tool.flwr.app.components]",
        'serverapp = "fedmem.server.flower_app:app"',
        'clientapp = "fedmem.clients.flower_app:app"',
        "",
        "[tool.flwr.app.config]",
        *(f"{k} = {_toml_value(v)}" for k, v in values.items()),
        "",
    ]
    from fedmem.memory import atomic_write_text

    atomic_write_text(directory / "pyproject.toml", "\n".join(lines))
    return directory

"""The fedmem ServerApp as Flower's deployment engine loads it, and the app project it ships in.

``flwr run`` (and ``fedmem-server start``, which drives it) sends SuperLink a Flower
App Bundle built from a small project directory: a ``pyproject.toml`` that names the
installed fedmem apps. It carries no code, so nothing is installed on the SuperLink
or on a SuperNode at run time; every machine runs the fedmem it has.

Settings arrive as the run config (flat keys, listed in ``RUN_CONFIG_DEFAULTS``).
"""

from __future__ import annotations

import logging
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedmem.answer import load_questions
from fedmem.base_model import pick_device, resolve_base
from fedmem.config import FederationConfig, NodeSettings, ServerSettings, from_flat, keys, to_flat
from fedmem.log import setup_logging
from fedmem.memory import atomic_write_text
from fedmem.signing import COORDINATOR_KEY, ensure_signing_key

from .server_app import RunPlan, run_rounds

APP_NAME = "fedmem-memory"
APP_VERSION = "1.0.0"

log = logging.getLogger(__name__)

# Every key `flwr run --run-config` may set: where the run writes and which questions it
# scores, the allow-list that says who the owners are, then the coordinator's own machine
# (NodeSettings), how it runs rounds (ServerSettings) and the recipe it sends
# (FederationConfig), all from fedmem.config. An empty string means "not given".
# allow-list: the coordinator's clients.json (``fedmem-server start`` passes its own); each
# reply's node id is mapped to the name and key admitted there, a node not on it is refused.
# Not given (a SuperLink run by hand): owners are known by the names they give.
# signing-key: the Ed25519 key every memory version is signed with (``fedmem-server start`` passes
# the one in its state dir); not given: ``<out>/memory-signing.key``, made on first use.
RUN_CONFIG_DEFAULTS: dict[str, object] = {
    "out": "fedmem-run",
    "questions": "",
    "allow-list": "",
    "signing-key": "",
    **to_flat(NodeSettings()),
    **to_flat(ServerSettings()),
    **to_flat(FederationConfig()),
}


def plan_from_run_config(run_config: dict) -> RunPlan:
    unknown = sorted(set(run_config) - set(RUN_CONFIG_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown run config keys: {', '.join(unknown)}; known: {', '.join(RUN_CONFIG_DEFAULTS)}")

    def part(cls):
        return from_flat(cls, {k: v for k, v in run_config.items() if k in keys(cls)})

    node, server, federation = part(NodeSettings), part(ServerSettings), part(FederationConfig)
    questions = str(run_config.get("questions", ""))
    allow_list = str(run_config.get("allow-list", ""))
    out_dir = Path(str(run_config.get("out", RUN_CONFIG_DEFAULTS["out"]))).expanduser().resolve()
    signing_key = Path(str(run_config.get("signing-key", "")) or out_dir / COORDINATOR_KEY).expanduser().resolve()
    ensure_signing_key(signing_key, "fedmem coordinator memory signing")  # made on first use; refused if unusable
    return RunPlan(
        base_dir=str(resolve_base(node.base or None)),
        out_dir=out_dir,
        federation=federation,
        server=server,
        questions=load_questions(Path(questions)) if questions else None,
        device=pick_device(node.device),
        publish=True,
        allow_list=Path(allow_list).expanduser().resolve() if allow_list else None,
        signing_key=str(signing_key),
    )


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    # The coordinator picks the app's lines out of Flower's log by this prefix.
    setup_logging(prefix="[fedmem] ")
    plan = plan_from_run_config(dict(context.run_config))
    log.info("run %s: %d rounds, at least %d clients, output %s", context.run_id, plan.federation.rounds,
             plan.server.min_clients, plan.out_dir)
    if plan.allow_list is None:
        log.warning("no allow-list in the run config: owners are known by the names they give, not by their keys")
    run_rounds(grid, plan)
    log.info("memory adapter: %s", plan.out_dir / "memory")


def toml_value(value: object) -> str:
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
        'serverapp = "fedmem.flower.app_project:app"',
        'clientapp = "fedmem.flower.client_app:app"',
        "",
        "[tool.flwr.app.config]",
        *(f"{k} = {toml_value(v)}" for k, v in values.items()),
        "",
    ]
    atomic_write_text(directory / "pyproject.toml", "\n".join(lines))
    return directory

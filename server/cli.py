"""``fedmem-server``: the coordinator's command line.

  start                run a federation on Flower's deployment engine (TLS, admitted clients only)
  clients add|list|remove   manage who may join
  status               rounds done, clients, last metrics, memory versions
  app                  write the Flower app project, for `flwr run` on your own SuperLink
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from fedmem.cli import verbosity_parent
from fedmem.config import FederationConfig, NodeSettings, ServerSettings, add_arguments, from_args, to_flat
from fedmem.log import setup_logging

log = logging.getLogger("fedmem.server")


def _state_arg(p: argparse.ArgumentParser) -> None:
    from .coordinator import default_state_dir

    p.add_argument("--state", type=Path, default=default_state_dir(),
                   help="the server's state dir: certificates, allow-list, checkpoints (default %(default)s; "
                        "or $FEDMEM_SERVER_STATE)")


def build_parser() -> argparse.ArgumentParser:
    from .coordinator import DEFAULT_PORT

    parser = argparse.ArgumentParser(prog="fedmem-server", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    common = [verbosity_parent()]

    p = sub.add_parser("start", parents=common, help="start the SuperLink and run the federation")
    _state_arg(p)
    p.add_argument("--address", default=f"0.0.0.0:{DEFAULT_PORT}",
                   help="where clients connect: HOST:PORT to listen on (default %(default)s)")
    p.add_argument("--host", action="append", default=[],
                   help="a name or IP clients use to reach this machine; goes into the TLS certificate "
                        "(repeat for several; localhost and 127.0.0.1 are always included)")
    p.add_argument(
        "--questions", type=Path, default=None, help="held-out questions JSONL: recall is reported each round"
    )
    # The recipe sent to owners, how rounds run, and this machine's own device and base model
    # (used to fingerprint the base and score --questions; owners use their own).
    add_arguments(p, FederationConfig, ServerSettings, NodeSettings)
    p.add_argument(
        "--fresh",
        action="store_true",
        help="ignore the checkpoints of an earlier run in this state dir (they are moved aside)",
    )

    p = sub.add_parser("clients", parents=common, help="manage which clients may join")
    csub = p.add_subparsers(dest="action", required=True)
    a = csub.add_parser("add", help="admit a client's public key")
    _state_arg(a)
    a.add_argument("name", help="a name for this data owner")
    a.add_argument(
        "public_key",
        help="the key `fedmem-client join` printed ('ecdsa-sha2-nistp384 AAAA...') or a path to their client.pub",
    )
    a = csub.add_parser("list", help="list admitted clients")
    _state_arg(a)
    a = csub.add_parser("remove", help="stop admitting a client")
    _state_arg(a)
    a.add_argument("name")

    p = sub.add_parser("status", parents=common, help="rounds done, clients, last metrics, memory versions")
    _state_arg(p)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("app", parents=common, help="write the Flower app project for `flwr run`")
    p.add_argument("--out", type=Path, required=True)
    return parser


def run_config(args) -> dict:
    """The Flower run config `fedmem-server start` sends: the same keys `flwr run --run-config` takes
    (``fedmem.flower.app_project.RUN_CONFIG_DEFAULTS``), checked here before anything starts."""
    federation = from_args(FederationConfig, args)
    server = from_args(ServerSettings, args, fixed={"resume": not args.fresh})
    node = from_args(NodeSettings, args)
    config = {**to_flat(node), **to_flat(server), **to_flat(federation)}
    if node.base:
        from fedmem.base_model import resolve_base

        config["base"] = str(resolve_base(node.base))
    if args.questions:
        from fedmem.answer import load_questions

        load_questions(args.questions)  # fail now, not inside the run
        config["questions"] = str(Path(args.questions).resolve())
    return config


def cmd_start(args) -> int:
    import time

    from .coordinator import StartOptions, StatePaths, start

    config = run_config(args)
    run_dir = StatePaths(args.state.expanduser().resolve()).run
    if args.fresh and run_dir.exists():
        aside = run_dir.with_name(f"run.before-{time.strftime('%Y%m%d-%H%M%S')}")
        run_dir.rename(aside)
        log.info("earlier run moved to %s", aside)
    return start(StartOptions(state=args.state, address=args.address, hosts=args.host, run_config=config))


def cmd_clients(args) -> int:
    from . import admission
    from .coordinator import StatePaths, running

    state = args.state.expanduser().resolve()
    if args.action == "list":
        clients = admission.load(state)
        if not clients:
            print("no clients admitted")
        for name, e in sorted(clients.items()):
            print(
                f"{name}  {e['fingerprint']}  added {e['added']}"
                + (f"  node {e['node_id']}" if e.get("node_id") else "")
            )
        return 0
    state.mkdir(parents=True, exist_ok=True)
    if args.action == "add":
        entry = admission.add(state, args.name, args.public_key)
        print(f"admitted {args.name} ({entry['fingerprint']})")
    else:
        entry = admission.remove(state, args.name)
        print(f"removed {args.name} ({entry['fingerprint']})")
    if running(state):
        admission.sync(state, StatePaths(state).flwr_home)
    else:
        print("(takes effect when the server starts)")
    return 0


def cmd_status(args) -> int:
    from .status import as_json, collect, render

    status = collect(args.state)
    print(as_json(status) if args.json else render(status))
    return 0


def cmd_app(args) -> int:
    from fedmem.flower.app_project import write_app_project

    path = write_app_project(args.out)
    print(f"wrote {path / 'pyproject.toml'}; run it with `flwr run {path} <your-superlink>`")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose - args.quiet)
    from fedmem.corpus import CorpusError

    from .admission import AdmissionError
    from .superlink import SuperLinkError

    try:
        return {"start": cmd_start, "clients": cmd_clients, "status": cmd_status, "app": cmd_app}[args.command](args)
    except (ValueError, FileNotFoundError, RuntimeError, AdmissionError, SuperLinkError, CorpusError) as err:
        print(f"fedmem-server: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

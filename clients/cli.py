"""``fedmem-client``: the data owner's command line.

  check   validate a corpus exactly as training would; no network
  join    join a federation: a Flower SuperNode running the fedmem ClientApp on --data
  key     show (and make, on first use) this client's public key, for the coordinator
  pull    copy the latest memory the server sent, verified, for `fedmem ask`
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fedmem.cli import verbosity_parent
from fedmem.config import ClientPolicy, NodeSettings, add_arguments, from_args
from fedmem.log import setup_logging


def _state_arg(p: argparse.ArgumentParser) -> None:
    from .join import default_state_dir

    p.add_argument("--state", type=Path, default=default_state_dir(),
                   help="this client's state dir: key pair, received memory (default %(default)s; "
                        "or $FEDMEM_CLIENT_STATE)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedmem-client", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    common = [verbosity_parent()]
    p = sub.add_parser("check", parents=common, help="validate a corpus directory")
    p.add_argument("--data", type=Path, required=True)

    p = sub.add_parser("join", parents=common, help="join a federation")
    p.add_argument("--server", required=True, help="the coordinator's HOST:PORT")
    p.add_argument("--data", type=Path, required=True, help="this owner's corpus directory")
    p.add_argument(
        "--ca", type=Path, required=True, help="the federation's CA certificate (ca.pem from the coordinator)"
    )
    _state_arg(p)
    # This machine's own device, base model and threads: the coordinator never chooses them. And the
    # owner's limits on the training settings the coordinator sends (refused beyond them, never clamped).
    add_arguments(p, NodeSettings, ClientPolicy)
    p.add_argument("--stay", action="store_true", help="keep running after the final memory arrives")
    p.add_argument(
        "--admission-wait",
        type=float,
        default=90.0,
        help="how long to keep trying when the server does not let this client in: a client that "
        "restarts is refused until its previous session times out, up to a minute "
        "(default %(default)s s)",
    )
    p.add_argument(
        "--max-wait-time",
        type=float,
        default=None,
        help="give up after this many seconds without reaching the server (default: keep trying)",
    )
    p.add_argument(
        "--coordinator-key",
        type=Path,
        default=None,
        metavar="FILE",
        help="the coordinator's memory-signing public key (memory-signing.pub from its state dir): pinned now, "
        "instead of trusting the signer of the first memory received",
    )

    p = sub.add_parser("key", parents=common, help="print this client's public key")
    _state_arg(p)

    p = sub.add_parser("pull", parents=common, help="copy the latest received memory for local use")
    _state_arg(p)
    p.add_argument("--out", type=Path, default=Path("fedmem-memory"), help="where to put it (default %(default)s)")
    p.add_argument("--base", default=None)
    p.add_argument("--trust-key", type=Path, action="append", default=[], metavar="FILE",
                   help="also trust memories signed by this Ed25519 public key (.pub; repeatable); the coordinator "
                   "key pinned in the state dir is always trusted, and a signature is required once either is set")
    return parser


def cmd_check(args) -> int:
    from fedmem.corpus import load_corpus
    from fedmem.examples import build_examples

    corpus = load_corpus(args.data)
    examples = build_examples(corpus)
    print(
        f"{corpus.root}: {len(corpus.documents)} documents, {len(corpus.qa)} Q/A records "
        f"-> {len(examples)} training examples"
    )
    return 0


def cmd_join(args) -> int:
    from .join import JoinOptions, join

    node = from_args(NodeSettings, args)
    return join(
        JoinOptions(
            server=args.server,
            data=args.data,
            ca=args.ca,
            state=args.state,
            base=node.base or None,
            stay=args.stay,
            max_wait_time=args.max_wait_time,
            admission_wait=args.admission_wait,
            threads=node.threads or None,
            device=node.device,
            policy=from_args(ClientPolicy, args),
            coordinator_key=args.coordinator_key,
        )
    )


def cmd_key(args) -> int:
    from .keys import ensure_keys

    keys = ensure_keys(args.state.expanduser())
    print(keys.public_text)
    print(f"fingerprint {keys.fingerprint}" + (" (new)" if keys.created else ""), file=sys.stderr)
    return 0


def cmd_pull(args) -> int:
    from .pull import pull, trust_hint

    manifest = pull(args.state, args.out, args.base, args.trust_key)
    signed = f"signed by {manifest['signer']}" if manifest.get("signer") else "unsigned"
    print(
        f"memory of round {manifest.get('round')}/{manifest.get('rounds')} "
        f"(clients {', '.join(manifest.get('clients', []))}, {signed}) -> {args.out}"
    )
    base = f" --base {args.base}" if args.base else ""
    print(f'try it: fedmem ask --memory {args.out}{base}{trust_hint(args.state)} "your question"')
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose - args.quiet)
    from fedmem.base_model import BaseModelError
    from fedmem.corpus import CorpusError
    from fedmem.memory import MemoryFormatError

    from .keys import KeyFileError

    try:
        return {"check": cmd_check, "join": cmd_join, "key": cmd_key, "pull": cmd_pull}[args.command](args)
    except (CorpusError, ValueError, MemoryFormatError, BaseModelError, KeyFileError, FileNotFoundError) as err:
        print(f"fedmem-client: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""``fedmem-server``: the coordinator's command line.

Deployment over Flower's SuperLink (``start``, client admission, ``status``) is
tracked as its own piece of work; until it lands this CLI says so plainly instead
of pretending.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedmem-server", description=__doc__)
    parser.add_argument("command", nargs="?", choices=["start", "status", "clients"])
    parser.parse_args(argv)
    print("fedmem-server: deployment mode (SuperLink + TLS) is not available in this version yet; "
          "use `fedmem simulate` to run a federation on one machine.", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())

"""The `w2s` command: in-process ML commands, worker and database commands, and the API client."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# Each module exposes register(subparsers). They are imported here, not at the top, so `w2s pipeline`
# does not pay for the HTTP client and `w2s submit` does not pay for the ML imports beyond argparse.
COMMAND_MODULES = ("ml.cli", "workers.cli", "app.cli_client")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="w2s", description="Weak-to-strong reward models with Representation Anchoring.")
    parser.add_argument("-v", "--verbose", action="store_true", help="Log at DEBUG level.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as error:
            if error.name != name:
                raise
            continue
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return args.handler(args) or 0


if __name__ == "__main__":
    sys.exit(main())

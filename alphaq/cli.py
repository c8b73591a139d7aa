"""`alphaq` command line: one sub-command per stage, each in alphaq/commands/<name>.py.

Every command module exposes ``register(subparsers)`` which adds its parser and sets
``func`` to a callable taking the parsed namespace and returning an exit code.
User mistakes raise AlphaQError and become one line on stderr with exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from alphaq import __version__
from alphaq.errors import AlphaQError

# Stage order: analyse -> plan -> convert -> eval, then run (generate in torch).
COMMAND_MODULES = ("analyze", "plan", "convert", "eval", "run")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="alphaq", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"alphaq {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"alphaq.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"alphaq.commands.{name}":
                continue  # stage not built yet
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except AlphaQError as exc:
        print(f"alphaq {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"alphaq {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

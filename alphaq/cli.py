"""`alphaq` command line: one sub-command per stage, each in alphaq/commands/<name>.py.

Every command module exposes ``register(subparsers)`` which adds its parser and sets
``func`` to a callable taking the parsed namespace and returning an exit code.
User mistakes raise AlphaQError and become one line on stderr with exit code 2; any other
exception is a bug and becomes one line and exit code 1, with the traceback under ``--debug``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import traceback

from alphaq import __version__
from alphaq.errors import AlphaQError

# Stage order: analyse -> plan -> convert -> eval, then run (generate in torch).
COMMAND_MODULES = ("analyze", "plan", "convert", "eval", "run")
DEBUG_HELP = "show the full traceback of an error (internal errors print one line without it)"


def build_parser() -> argparse.ArgumentParser:
    # no abbreviations: a prefix of one flag would change meaning when a flag is added (and `--tensor-type`
    # must not be read as a prefix of `--tensor-types-out`)
    parser = argparse.ArgumentParser(prog="alphaq", description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--version", action="version", version=f"alphaq {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"alphaq.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"alphaq.commands.{name}":
                continue  # stage not built yet
            raise
        module.register(sub)
    for command in sub.choices.values():  # also after the command (`alphaq convert ... --debug`);
        # SUPPRESS: a sub-command's default must not overwrite a --debug given before it
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
        command.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging")
        command.allow_abbrev = False
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # `convert` takes llama-quantize's positional order (MODEL [OUT] TYPE [NTHREADS]) wherever the
    # options fall between them; anything else left over is an error, as parse_args makes it
    stray = [a for a in extra if a.startswith("-")] or ([] if hasattr(args, "llama_positionals") else extra)
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.llama_positionals = [*args.llama_positionals, *extra]
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    debug = getattr(args, "debug", False)
    from convert.vendor import warn_if_amx

    warn_if_amx()
    try:
        return int(args.func(args) or 0)
    except AlphaQError as exc:
        if debug:
            traceback.print_exc()
        print(f"alphaq {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        notes = "".join(f"; {n}" for n in getattr(exc, "__notes__", ()))  # e.g. what a re-run reuses
        print(f"alphaq {args.command}: interrupted{notes}", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001  (a bug: one line, the traceback on request)
        if debug:
            traceback.print_exc()
        hint = "" if debug else "; rerun with --debug for the traceback"
        print(f"alphaq {args.command}: internal error (a bug in alphaq, please report it): "
              f"{type(exc).__name__}: {_one_line(exc)}{hint}", file=sys.stderr)
        return 1


def _one_line(exc: BaseException) -> str:
    """The message and its notes (e.g. what a re-run reuses) on one line (a multi-line message
    would read as several errors)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text + "".join(f"; {' '.join(n.split())}" for n in getattr(exc, "__notes__", ()))


if __name__ == "__main__":
    sys.exit(main())

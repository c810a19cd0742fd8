"""The `premier` command: the composition root of the project's command line.

This module only assembles the parser and runs a command: the core commands (generate, demo,
info) live in premier.commands, and every layer registers its own command group through a
module-level `register(subparsers)`: premier.training.cli (data, train, fit-user), store.cli
(users), premier.world.cli (world, eval) and serving.cli (serve). It is the one module of
premier/ that imports serving/ and store/ (their `register` functions only), and nothing in the
project imports it except the `premier` console entry point (and `python -m premier`) and the
tests. The register modules import nothing heavy at import time (no torch, diffusers or ray):
each command imports its layer when it runs, so `premier --help` stays fast.

Exit codes (premier.errors.exit_code, also the server's fit job's): 0 success, 2 bad input or usage, 3 a model or checkpoint
that cannot be loaded, 4 training or fitting stopped on purpose (e.g. a NaN loss; the last good
checkpoint is kept).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from premier.commands import register as register_core
from premier.errors import EXIT_BAD_INPUT, EXIT_LOAD_ERROR, EXIT_STOPPED, exit_code
from premier.logs import quiet_libraries
from premier.training.cli import register as register_training
from premier.world.cli import register as register_world
from serving.cli import register as register_serving
from store.cli import register as register_store

# The command groups, in the order `premier --help` lists them.
REGISTER: tuple[Callable[[argparse._SubParsersAction], None], ...] = (
    register_core,
    register_training,
    register_store,
    register_world,
    register_serving,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="premier", description="Premier Serve: personalized text-to-image generation with FLUX."
    )
    parser.add_argument("--version", action="version", version=f"premier {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for register in REGISTER:
        register(sub)
    return parser


def _version() -> str:
    from premier import __version__

    return __version__


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_libraries()
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except Exception as e:
        code = exit_code(e)
        if code is None:
            raise
        print(f"premier {args.command}: error: {e}", file=sys.stderr)
        return code


__all__ = ["main", "build_parser", "EXIT_BAD_INPUT", "EXIT_LOAD_ERROR", "EXIT_STOPPED"]

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""The tproxy command line: one entry point, one subcommand per job.

Each subcommand lives with the code it drives (``tproxy.runner`` for ``run``,
``tproxy.routing.cli`` for ``setup``/``teardown``/``status``/``doctor``) and
registers itself here through a ``register(subparsers)`` function that sets
``handler`` on its parser. Bad arguments end with one line and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import NoReturn

from .errors import UsageError as UsageError  # its home is tproxy.errors; kept importable here


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr and exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> ArgumentParser:
    from . import __version__, control, runner
    from .routing import cli as routing_cli
    from .tls import cli as tls_cli

    parser = ArgumentParser(prog="tproxy", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"tproxy {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)
    runner.register(sub)
    routing_cli.register(sub)
    tls_cli.register(sub)
    control.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for `run -c` (tproxy.config)
    try:
        return int(args.handler(args) or 0)
    except UsageError as exc:
        print(f"tproxy {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())

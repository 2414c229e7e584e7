"""``tproxy run -c FILE.toml``: everything ``run`` takes on the command line, in a file.

Every key is the long name of a ``run`` option, spelled with dashes or
underscores (``connect-timeout = 10``, ``mode = ["socks@127.0.0.1:1080"]``,
``setup = ["gw-in", "gw-out"]``, ``port = [80, 443]``); ``listeners`` is
another name for ``mode``. Keys may be grouped under any of the tables in
:data:`SECTIONS` (``[flows]``, ``[routing]``, ``[logging]``, ...), which only
group. A flag is ``true``/``false``; a repeatable option or one with several
values takes a list; a list for an option with one value is joined with commas
(``port = [80, 443]`` is ``--port 80,443``). Interceptors are an array of
tables, in chain order::

    [[interceptor]]
    spec = "replace"                 # what -i takes
    options = { from = "a", to = "b" }   # the -o KEY=VALUE of it
    when = "port=80"                 # any option that follows -i, such as --when

Each value is checked by the same parser as the command line, so the file
can never say what the command line could not. An unknown key is an error
naming the key and its line. The command line overrides the file, option by
option (a ``-i`` or ``--mode`` on the command line replaces the file's list).
``tproxy run -c FILE --check`` checks the file (and the interceptors load)
and exits.
"""

from __future__ import annotations

import argparse
import re
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from . import run_options
from .errors import UsageError

SECTIONS = frozenset(
    {
        "run",
        "listeners",
        "flows",
        "routing",
        "logging",
        "metrics",
        "recording",
        "explicit",
        "workers",
        "limits",
        "timeouts",
        "tls",
        "udp",
    }
)
"""Tables that only group keys (a key means the same in any of them)."""

_ALIASES = {"listeners": "mode"}
_NOT_IN_FILE = {"config", "check", "help", "worker-index", "interceptor", "option"}


class ConfigError(UsageError):
    """A problem in the config file; the message names the file and the line."""


class _Raising(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise ValueError(message)


def run_parser() -> argparse.ArgumentParser:
    """A fresh parser of ``tproxy run``'s options that raises ValueError on bad input."""
    top = _Raising(prog="tproxy", add_help=False)
    sub = top.add_subparsers(dest="command", parser_class=_Raising)
    return run_options.add_parser(sub)


def _options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Long option name (without dashes) -> its action."""
    found = {}
    for action in parser._actions:
        for opt in action.option_strings:
            if opt.startswith("--"):
                found[opt[2:]] = action
    return found


class _Source:
    """The file's text, for line numbers."""

    def __init__(self, path: str, text: str) -> None:
        self.path = path
        self.lines = text.splitlines()

    def line_of(self, key: str, section: str | None = None, nth_table: int = 0) -> int:
        start = 0
        if section is not None:
            header = re.compile(rf"^\s*\[\[?\s*\"?{re.escape(section)}\"?\s*\]\]?\s*(#.*)?$")
            count = -1
            for i, line in enumerate(self.lines):
                if header.match(line):
                    count += 1
                    if count == nth_table:
                        start = i + 1
                        break
            if not key:
                return start
        pattern = re.compile(rf"^\s*[\"']?{re.escape(key)}[\"']?\s*=")
        for i in range(start, len(self.lines)):
            if pattern.match(self.lines[i]):
                return i + 1
            if section is not None and self.lines[i].lstrip().startswith("["):
                break
        for i, line in enumerate(self.lines):  # inline tables and the like
            if re.search(rf"(^|[\s{{,])[\"']?{re.escape(key)}[\"']?\s*=", line):
                return i + 1
        return 0

    def error(self, line: int, message: str) -> ConfigError:
        where = f"{self.path}:{line}" if line else self.path
        return ConfigError(f"{where}: {message}")


def file_tokens(path: str, parser: argparse.ArgumentParser | None = None) -> list[str]:
    """The command-line tokens equivalent to config file ``path``; each value checked."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    source = _Source(path, text)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    parser = parser or run_parser()
    options = _options(parser)
    negations = {
        a.dest.replace("_", "-"): a
        for a in parser._actions
        if isinstance(a, argparse._StoreFalseAction) and a.dest.replace("_", "-") not in options
    }
    tokens: list[str] = []

    def check(piece: list[str], line: int, key: str) -> None:
        try:
            parser.parse_args(piece)
        except ValueError as exc:
            raise source.error(line, f"{key}: {exc}") from None

    def option(key: str, value: Any, section: str | None) -> None:
        name = _ALIASES.get(key.replace("_", "-"), key.replace("_", "-"))
        line = source.line_of(key, section)
        action = options.get(name)
        negated = negations.get(name)
        if action is None and negated is not None:
            if not isinstance(value, bool):
                raise source.error(line, f"{key}: expected true or false")
            # `splice = false` for --no-splice: the destination's name, the flag's sense
            action, name, value = negated, negated.option_strings[-1][2:], not value
        if action is None or name in _NOT_IN_FILE or action.help == argparse.SUPPRESS:
            raise source.error(line, f"unknown key {key!r}")
        piece = _to_tokens(action, f"--{name}", value)
        if piece is None:
            raise source.error(line, f"{key}: {_expected(action)}, not {type(value).__name__}")
        check(piece, line, key)
        tokens.extend(piece)

    def interceptors(entries: Any, key: str) -> None:
        if not isinstance(entries, list):
            raise source.error(source.line_of(key), f"{key}: use [[{key}]] tables")
        for n, entry in enumerate(entries):
            line = source.line_of("", key, n)
            if not isinstance(entry, dict) or not isinstance(entry.get("spec"), str):
                raise source.error(line, f'{key}: each entry needs spec = "NAME"')
            piece = ["-i", entry["spec"]]
            for ekey, value in entry.items():
                if ekey == "spec":
                    continue
                if ekey == "options":
                    if not isinstance(value, dict):
                        raise source.error(line, f"{key}.options: a table of KEY = VALUE")
                    for okey, ovalue in value.items():
                        piece += ["-o", f"{okey}={_scalar(ovalue)}"]
                    continue
                name = ekey.replace("_", "-")
                action = options.get(name)
                if action is None or name in _NOT_IN_FILE:
                    eline = source.line_of(ekey, key, n) or line
                    raise source.error(eline, f"unknown key {ekey!r} in [[{key}]]")
                extra = _to_tokens(action, f"--{name}", value)
                if extra is None:
                    raise source.error(line, f"{ekey}: {_expected(action)}")
                piece += extra
            check(piece, line, key)
            tokens.extend(piece)

    for key, value in data.items():
        if key in ("interceptor", "interceptors"):
            interceptors(value, key)
        elif isinstance(value, dict) and key in SECTIONS:
            for skey, svalue in value.items():
                if skey in ("interceptor", "interceptors"):
                    interceptors(svalue, skey)
                else:
                    option(skey, svalue, key)
        elif isinstance(value, dict):
            raise source.error(source.line_of("", key), f"unknown table [{key}]")
        else:
            option(key, value, None)
    return tokens


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return ",".join(_scalar(v) for v in value)
    return str(value)


def _expected(action: argparse.Action) -> str:
    if action.nargs == 0:
        return (
            "expected true or false"
            if not isinstance(action, argparse._CountAction)
            else ("expected a number or true/false")
        )
    return "expected a value or a list"


def _to_tokens(action: argparse.Action, opt: str, value: Any) -> list[str] | None:
    """``value`` as command-line tokens for ``action``; ``None`` if its type cannot be."""
    if isinstance(value, dict):
        return None
    if action.nargs == 0:
        if isinstance(action, argparse._CountAction):
            if isinstance(value, bool):
                return [opt] if value else []
            if isinstance(value, int) and value >= 0:
                return [opt] * value
            return None
        if not isinstance(value, bool):
            return None
        return [opt] if value else []
    if isinstance(action, argparse._AppendAction) or action.dest == "interceptors":
        values = value if isinstance(value, list) else [value]
        out: list[str] = []
        for v in values:
            out += [opt, _scalar(v)]
        return out
    if action.nargs not in (None, "?") and isinstance(value, list):
        return [opt, *(_scalar(v) for v in value)]
    return [opt, _scalar(value)]


def _given(argv: Sequence[str]) -> set[str]:
    """The destinations the command line itself sets (so they override the file)."""
    parser = run_parser()
    parser._defaults = {}
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    try:
        return set(vars(parser.parse_args(list(argv))))
    except ValueError:
        return set()


def apply(args: argparse.Namespace, argv: Sequence[str]) -> argparse.Namespace:
    """``args`` of ``run`` with the config file's options under the command line's.

    ``argv`` is the command line after ``run``.
    """
    parser = run_parser()
    tokens = file_tokens(args.config, parser)
    merged = parser.parse_args(tokens)
    for dest in _given(argv) | {"config", "check"}:
        setattr(merged, dest, getattr(args, dest))
    for key, value in vars(args).items():
        if not hasattr(merged, key):
            setattr(merged, key, value)
    merged.handler = args.handler
    return merged


def run_argv(args: argparse.Namespace) -> list[str]:
    """The command line after ``run`` (``tproxy.cli`` keeps it in ``args.argv``)."""
    argv = list(getattr(args, "argv", None) or [])
    if "run" in argv:
        argv = argv[argv.index("run") + 1 :]
    return argv

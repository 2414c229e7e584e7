"""The options of ``tproxy run``, in one parser that the command line and the config file
(:mod:`tproxy.config`) both use, so a key of the file is exactly a long option."""

from __future__ import annotations

import argparse

from . import explicit, keepalive, loading, logformat, metrics, record, routing, watchdog, workers
from .modes import ModeError, ModeSpec, parse_mode
from .sockets import SourcePolicy
from .tls import options as tls_options
from .udp import door as udp


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:  # type: ignore[type-arg]
    """Add ``run`` and every option it takes to the ``tproxy`` parser; return it."""
    p: argparse.ArgumentParser = sub.add_parser(
        "run",
        help="run the proxy engine",
        description="Run the tproxy engine: listeners, interceptors, routing.",
    )
    p.add_argument(
        "--mode",
        action="append",
        type=_mode,
        metavar="MODE@HOST:PORT",
        help="a listener: transparent (TCP and UDP), transparent-udp, socks, http or "
        "forward:HOST:PORT, at HOST:PORT "
        "(IPv6 in brackets; @:PORT keeps the default host). Repeatable. "
        "Default: transparent@127.0.0.1:9091 and transparent@[::1]:9091",
    )
    loading.add_interceptor_arguments(p)
    g = p.add_argument_group("flows")
    g.add_argument(
        "--source",
        choices=[s.value for s in SourcePolicy],
        default=SourcePolicy.CLIENT_PORT.value,
        help="outgoing source address in transparent mode: the client's address and port "
        "(default; falls back to a free port when the port is taken), the client's address "
        "with a kernel-chosen port, or the gateway's own address (no spoofing)",
    )
    g.add_argument(
        "--mark",
        type=_mark,
        default=None,
        help="SO_MARK for outgoing sockets, so that firewall rules can exempt the proxy's own "
        "traffic (e.g. from OUTPUT interception)",
    )
    g.add_argument("--connect-timeout", type=float, default=10.0, metavar="SECONDS")
    g.add_argument(
        "--idle-timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="end a flow pair with no data either way for this long (default: never)",
    )
    g.add_argument(
        "--grace",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="on SIGINT/SIGTERM, how long open flows may go on before they are reset (default 5)",
    )
    g.add_argument(
        "--peek-timeout",
        type=float,
        default=2.0,
        metavar="SECONDS",
        help="how long a flow waits for the client's TLS ClientHello when a --when sni=/host= "
        "term needs it (at most 16 KiB are held); then it is decided without (default 2)",
    )
    g.add_argument("--max-flows", type=int, default=None, metavar="N")
    g.add_argument(
        "--read-size",
        type=int,
        default=256 * 1024,
        metavar="BYTES",
        help="largest read per chunk (default 262144; larger reads relay faster)",
    )
    g.add_argument(
        "--no-splice",
        dest="splice",
        action="store_false",
        help="copy through user space even where no interceptor watches (default: splice(2))",
    )
    p.add_argument(
        "-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)"
    )
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    _add_optional_arguments(p)
    return p


def _add_optional_arguments(p: argparse.ArgumentParser) -> None:
    """Options of parts that register their own flags (routing, explicit modes, workers)."""
    routing.add_run_arguments(p)
    explicit.add_arguments(p)
    workers.add_arguments(p)
    tls_options.add_arguments(p)
    watchdog.add_arguments(p)
    keepalive.add_arguments(p)
    udp.add_arguments(p)
    add_config_arguments(p)
    metrics.add_arguments(p)
    logformat.add_arguments(p)
    record.add_arguments(p)


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``-c/--config FILE`` and ``--check`` (read by :mod:`tproxy.config`)."""
    parser.add_argument(
        "-c",
        "--config",
        default=None,
        metavar="FILE",
        help="read options from a TOML file (the command line overrides it; SIGHUP reloads it)",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="check the configuration (file and command line), load the interceptors, and exit",
    )


def _mode(text: str) -> ModeSpec:
    try:
        return parse_mode(text)
    except ModeError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _mark(text: str) -> int:
    """A mark in decimal or 0x hex; its range is EngineConfig's to check."""
    try:
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None

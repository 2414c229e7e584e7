"""tproxy run: the engine behind one or more front doors.

By default one transparent listener on 127.0.0.1:9091 and one on [::1]:9091
(the addresses ``tproxy setup`` diverts to). ``--mode`` replaces that with
any set of listeners; ``--setup IN OUT --port ...`` installs the routing
once the listeners are up and removes it when the engine stops.
"""

from __future__ import annotations

import argparse
import logging
import socket
import sys
from collections.abc import Callable
from typing import Any

import trio

from . import explicit, keepalive, loading, routing, watchdog, workers
from .engine import Engine, EngineConfig
from .errors import UsageError
from .modes import ModeError, ModeSpec, parse_mode
from .server import Door, Handler
from .sockets import SourcePolicy
from .tls import options as tls_options
from .udp import door as udp

log = logging.getLogger("tproxy")


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``run`` to the ``tproxy`` parser."""
    p = sub.add_parser(
        "run",
        help="run the proxy engine",
        description=__doc__.splitlines()[0],
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
    p.set_defaults(handler=main)


def _add_optional_arguments(p: argparse.ArgumentParser) -> None:
    """Options of parts that register their own flags (routing, explicit modes, workers)."""
    routing.add_run_arguments(p)
    explicit.add_arguments(p)
    workers.add_arguments(p)
    tls_options.add_arguments(p)
    watchdog.add_arguments(p)
    keepalive.add_arguments(p)
    udp.add_arguments(p)


def main(args: argparse.Namespace) -> int:
    """Entry point of ``tproxy run``."""
    _configure_logging(args.verbose, args.quiet)
    watchdog.configure_from(args)
    try:
        factories = loading.load_all(args.interceptors)
    except loading.LoadError as exc:
        raise UsageError(str(exc)) from None
    prepare_routing_args(args)  # --setup --local: the proxy's sockets get a mark
    try:
        config = EngineConfig(
            read_size=args.read_size,
            connect_timeout=args.connect_timeout,
            source_policy=SourcePolicy(args.source),
            mark=args.mark,
            idle_timeout=args.idle_timeout,
            grace=args.grace,
            max_flows=args.max_flows,
            splice=args.splice,
            keepalive=args.keepalive,
        )
    except ValueError as exc:
        # EngineConfig is the one place that knows the valid ranges.
        raise UsageError(str(exc)) from None
    specs = args.mode or default_modes()
    explicit.check_unused(args, specs)
    loading.warn_unmatchable(factories, specs)
    routing = routing_for(args, specs)
    if workers.wants_supervisor(args):
        # N processes, each with its own listeners (SO_REUSEPORT); the routing is
        # installed once, by the supervisor, after all of them listen.
        return workers.run_supervisor(args, sys.argv[1:], routing)
    worker = workers.current(args)
    if worker is not None:
        worker.configure()  # flow ids, log prefix, exit with the supervisor
        routing = None
    engine = Engine(config, factories)
    tls_options.attach(engine, args)  # --tls intercept: the engine wraps chains in TLS
    udp_config = udp.config_from(args)
    doors = open_doors(udp.tcp_specs(specs), engine, args, reuse_port=worker is not None)
    try:
        udp_listeners = udp.open_listeners(specs, args, reuse_port=worker is not None)
    except BaseException:
        for door in doors:
            door.close()
        raise
    if worker is not None:
        worker.ready()
    trio.run(
        udp.serve,
        engine,
        doors,
        udp_listeners,
        udp_config,
        routing,
        instruments=watchdog.instruments(),
    )
    log.info("stopped after %d flow(s)", engine.total)
    watchdog.summary()
    if worker is not None:
        worker.finished(engine.total)
    return 0


def default_modes() -> list[ModeSpec]:
    """Transparent on 127.0.0.1:9091, and on [::1]:9091 where IPv6 is there."""
    specs = [parse_mode("transparent@127.0.0.1:9091")]
    if socket.has_ipv6 and _ipv6_loopback_usable():
        specs.append(parse_mode("transparent@[::1]:9091"))
    else:
        log.warning("IPv6 is off here (::1 cannot be bound): not listening on [::1]:9091")
    return specs


def _ipv6_loopback_usable() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def open_doors(
    specs: list[ModeSpec], engine: Engine, args: argparse.Namespace, *, reuse_port: bool = False
) -> list[Door]:
    """Bind every listener before anything is served; a failure closes what was opened.

    ``reuse_port``: the workers of ``--workers N`` share each address (SO_REUSEPORT).
    """
    doors: list[Door] = []
    try:
        for spec in specs:
            handler = front_door(spec, engine, args)
            if spec.transparent:
                fast = engine.accept_fast
            else:
                fast = explicit.fast_door(spec, engine, args)
            try:
                doors.append(Door.open(spec, handler, reuse_port=reuse_port, fast=fast))
            except OSError as exc:
                raise UsageError(f"cannot listen on {spec}: {exc.strerror or exc}") from None
    except BaseException:
        for door in doors:
            door.close()
        raise
    return doors


def front_door(spec: ModeSpec, engine: Engine, args: argparse.Namespace) -> Handler:
    """The coroutine that serves one accepted connection of this listener."""
    if spec.kind == "transparent":
        return engine.handle_transparent
    return explicit.front_door(spec, engine, args)


def prepare_routing_args(args: argparse.Namespace) -> None:
    """Routing options that change the engine's own (``--setup --local`` sets ``--mark``)."""
    routing.prepare_run_args(args)


def routing_for(args: argparse.Namespace, specs: list[ModeSpec]) -> Callable[[], Any] | None:
    """The routing context for ``--setup``, bound to the transparent listeners."""
    if getattr(args, "setup", None) is None:
        return None
    transparent = [s for s in specs if s.transparent]
    if not transparent:
        raise UsageError("--setup needs a transparent listener (--mode transparent@...)")
    v4 = next((s for s in transparent if ":" not in s.host), None)
    v6 = next((s for s in transparent if ":" in s.host), None)
    if len({s.port for s in transparent}) != 1:
        raise UsageError("--setup needs all transparent listeners on one port")
    if getattr(args, "worker_index", None) is not None:
        return None  # a --workers worker: its supervisor checked and owns the routing
    addresses = {"proxy_address_v4": v4.host if v4 else None,
                 "proxy_address_v6": v6.host if v6 else None}
    # Every routing argument is checked now, before any listener opens.
    plan = routing.check_for_run(args, transparent[0].port, **addresses)

    def enter() -> Any:
        return routing.installed_for_run(args, transparent[0].port, plan=plan, **addresses)

    return enter


def _configure_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else logging.DEBUG if verbose >= 2 else logging.INFO
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
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

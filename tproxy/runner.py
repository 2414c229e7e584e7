"""tproxy run: the engine behind one or more front doors.

By default one transparent listener on 127.0.0.1:9091 and one on [::1]:9091
(the addresses ``tproxy setup`` diverts to). ``--mode`` replaces that with
any set of listeners; ``--setup IN OUT --port ...`` installs the routing
once the listeners are up and removes it when the engine stops.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
from collections.abc import Callable
from typing import Any

import trio

from . import config as config_file
from . import control, explicit, lifecycle, loading, logformat, metrics, record, routing, workers
from .cli import UsageError
from .engine import Engine, EngineConfig
from .modes import ModeError, ModeSpec, parse_mode
from .server import Door, Handler, Server
from .sockets import SourcePolicy

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
        help="a listener: transparent, socks, http or forward:HOST:PORT, at HOST:PORT "
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
    config_file.add_arguments(p)
    metrics.add_arguments(p)
    logformat.add_arguments(p)
    record.add_arguments(p)


def main(args: argparse.Namespace) -> int:
    """Entry point of ``tproxy run``."""
    lifecycle.hold_signals()  # SIGHUP/SIGQUIT must never end us without the ordered shutdown
    if args.config:
        args = config_file.apply(args, config_file.run_argv(args))
    _configure_logging(args)
    try:
        factories = loading.load_all(args.interceptors)
    except loading.LoadError as exc:
        raise UsageError(str(exc)) from None
    config = engine_config(args)
    specs = args.mode or default_modes()
    explicit.check_unused(args, specs)
    routing = routing_for(args, specs)
    if args.check:
        print(f"{args.config or 'command line'}: ok ({len(specs)} listener(s), "
              f"{len(factories)} interceptor(s))")
        return 0
    if workers.wants_supervisor(args):
        # N processes, each with its own listeners (SO_REUSEPORT); the routing is
        # installed once, by the supervisor, after all of them listen.
        return workers.run_supervisor(args, sys.argv[1:], routing)
    worker = workers.current(args)
    if worker is not None:
        worker.configure()  # flow ids, log prefix, exit with the supervisor
        routing = None
    recording = None
    if args.record is not None:
        try:
            recording = record.Recording(
                args.record, args.record_max_bytes, worker.name if worker is not None else None
            )
        except OSError as exc:
            raise UsageError(f"cannot record to {args.record}: {exc.strerror or exc}") from None
        factories = recording.wrap(factories)  # until the relay calls taps (record/)
    engine = Engine(config, factories)
    doors = open_doors(specs, engine, args, reuse_port=worker is not None)
    stats = metrics.FlowStats(live=lambda: len(engine.live)) if args.metrics else None
    exposed = None
    if args.metrics is not None and worker is None:
        assert stats is not None
        exposed = metrics.MetricsServer(args.metrics, stats.snapshot)
        try:
            exposed.start()
        except OSError as exc:
            for door in doors:
                door.close()
            raise UsageError(f"cannot serve --metrics on {args.metrics[0]}:"
                             f"{args.metrics[1]}: {exc.strerror or exc}") from None
    if worker is not None:
        worker.ready()
    server = Server(engine, doors)
    life = lifecycle.Lifecycle(
        engine,
        server,
        stats=stats,
        reloader=reloader(args, specs, recording),
        worker=worker,
        control_path=control.socket_path(
            os.getppid() if worker is not None else None,
            worker.index if worker is not None else None,
        ),
    )
    try:
        trio.run(life.run, routing)
    finally:
        if exposed is not None:
            exposed.stop()
        if recording is not None:
            recording.close()
    log.info("stopped after %d flow(s)", engine.total)
    if worker is not None:
        worker.finished(engine.total)
    return 0


def engine_config(args: argparse.Namespace) -> EngineConfig:
    """The engine's settings from ``run``'s arguments (a bad value is a usage error)."""
    try:
        return EngineConfig(
            read_size=args.read_size,
            connect_timeout=args.connect_timeout,
            source_policy=SourcePolicy(args.source),
            mark=args.mark,
            idle_timeout=args.idle_timeout,
            grace=args.grace,
            max_flows=args.max_flows,
            splice=args.splice,
        )
    except ValueError as exc:
        # EngineConfig is the one place that knows the valid ranges.
        raise UsageError(str(exc)) from None


def reloader(
    args: argparse.Namespace, specs: list[ModeSpec], recording: record.Recording | None = None
) -> lifecycle.Reloader:
    """What SIGHUP does: re-read ``-c FILE`` and the interceptor modules; apply both to
    new flows. Listeners, routing and workers stay as they are (a restart changes them)."""

    def reload(engine: Engine) -> None:
        new = args
        if args.config:
            try:
                new = config_file.apply(args, config_file.run_argv(args))
            except UsageError as exc:
                raise lifecycle.ReloadError(str(exc)) from None
        factories = lifecycle.reload_factories(new.interceptors)
        if factories and engine.hub is not None:
            raise lifecycle.ReloadError(
                "this process started without interceptors (splice relay): adding some "
                "needs a restart"
            )
        try:
            config = engine_config(new)
        except UsageError as exc:
            raise lifecycle.ReloadError(str(exc)) from None
        if (new.mode or default_modes()) != specs:
            log.warning("reload: listeners changed in the file; a restart applies that")
        engine.config = config
        chain: list[Any] = recording.wrap(factories) if recording is not None else factories
        engine.factories = chain

    return reload


def default_modes() -> list[ModeSpec]:
    """Transparent on 127.0.0.1:9091, and on [::1]:9091 where IPv6 is there."""
    specs = [parse_mode("transparent@127.0.0.1:9091")]
    if socket.has_ipv6 and _ipv6_loopback_usable():
        specs.append(parse_mode("transparent@[::1]:9091"))
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

    def enter() -> Any:
        return routing.installed_for_run(
            args,
            proxy_port=transparent[0].port,
            proxy_address_v4=v4.host if v4 else None,
            proxy_address_v6=v6.host if v6 else None,
        )

    return enter


def _configure_logging(args: argparse.Namespace) -> None:
    level = logging.WARNING if args.quiet else logging.DEBUG if args.verbose >= 2 else logging.INFO
    try:
        logformat.configure(level, args.log_format, args.log_file)
    except OSError as exc:
        raise UsageError(f"cannot open --log-file {args.log_file}: {exc.strerror or exc}") from None


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

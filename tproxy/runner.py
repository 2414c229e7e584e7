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
from . import (
    control,
    explicit,
    lifecycle,
    loading,
    logformat,
    metrics,
    record,
    routing,
    run_options,
    watchdog,
    workers,
)
from .engine import Engine, EngineConfig
from .errors import UsageError
from .modes import ModeSpec, parse_mode
from .server import Door, Handler
from .sockets import SourcePolicy
from .tls import options as tls_options
from .udp import door as udp

log = logging.getLogger("tproxy")


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``run`` to the ``tproxy`` parser (its options: :mod:`tproxy.run_options`)."""
    run_options.add_parser(sub).set_defaults(handler=main)


def main(args: argparse.Namespace) -> int:
    """Entry point of ``tproxy run``."""
    lifecycle.hold_signals()  # SIGHUP/SIGQUIT must never end us without the ordered shutdown
    if args.config:
        args = config_file.apply(args, config_file.run_argv(args))
    _configure_logging(args)
    watchdog.configure_from(args)
    try:
        factories = loading.load_all(args.interceptors)
    except loading.LoadError as exc:
        raise UsageError(str(exc)) from None
    prepare_routing_args(args)  # --setup --local: the proxy's sockets get a mark
    config = engine_config(args)
    specs = args.mode or default_modes()
    explicit.check_unused(args, specs)
    loading.warn_unmatchable(factories, specs)
    routing = routing_for(args, specs)
    if args.check:
        print(
            f"{args.config or 'command line'}: ok ({len(specs)} listener(s), "
            f"{len(factories)} interceptor(s))"
        )
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
    engine = Engine(config, factories)
    engine.recording = recording  # --record: every flow gets a tap
    tls_options.attach(engine, args)  # --tls intercept: the engine wraps chains in TLS
    udp_config = udp.config_from(args)
    doors = open_doors(udp.tcp_specs(specs), engine, args, reuse_port=worker is not None)
    try:
        udp_listeners = udp.open_listeners(specs, args, reuse_port=worker is not None)
    except BaseException:
        for door in doors:
            door.close()
        raise
    stats = (  # UDP sessions are opened and ended as flows: they are live flows too
        metrics.FlowStats(live=lambda: len(engine.live) + len(engine.udp_live))
        if args.metrics
        else None
    )
    exposed = None
    if args.metrics is not None and worker is None:
        assert stats is not None
        exposed = metrics.MetricsServer(args.metrics, stats.snapshot)
        try:
            exposed.start()
        except OSError as exc:
            for door in doors:
                door.close()
            for sock in udp_listeners:
                sock.close()
            raise UsageError(
                f"cannot serve --metrics on {args.metrics[0]}:"
                f"{args.metrics[1]}: {exc.strerror or exc}"
            ) from None
    if worker is not None:
        worker.ready()
    server = udp.UdpServer(engine, doors, udp_listeners, udp_config)
    life = lifecycle.Lifecycle(
        engine,
        server,
        stats=stats,
        reloader=reloader(args, specs),
        worker=worker,
        control_path=control.socket_path(
            os.getppid() if worker is not None else None,
            worker.index if worker is not None else None,
        ),
    )
    try:
        trio.run(life.run, routing, instruments=watchdog.instruments())
    finally:
        if exposed is not None:
            exposed.stop()
        if recording is not None:
            recording.close()
    log.info("stopped after %d flow(s)", engine.total)
    watchdog.summary()
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
            keepalive=args.keepalive,
            peek_timeout=args.peek_timeout,
        )
    except ValueError as exc:
        # EngineConfig is the one place that knows the valid ranges.
        raise UsageError(str(exc)) from None


def reloader(args: argparse.Namespace, specs: list[ModeSpec]) -> lifecycle.Reloader:
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
        try:
            config = engine_config(new)
        except UsageError as exc:
            raise lifecycle.ReloadError(str(exc)) from None
        if (new.mode or default_modes()) != specs:
            log.warning("reload: listeners changed in the file; a restart applies that")
        engine.config = config
        engine.factories = list(factories)

    return reload


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
    addresses = {
        "proxy_address_v4": v4.host if v4 else None,
        "proxy_address_v6": v6.host if v6 else None,
    }
    # Every routing argument is checked now, before any listener opens.
    plan = routing.check_for_run(args, transparent[0].port, **addresses)

    def enter() -> Any:
        return routing.installed_for_run(args, transparent[0].port, plan=plan, **addresses)

    return enter


def _configure_logging(args: argparse.Namespace) -> None:
    level = logging.WARNING if args.quiet else logging.DEBUG if args.verbose >= 2 else logging.INFO
    try:
        logformat.configure(level, args.log_format, args.log_file)
    except OSError as exc:
        raise UsageError(f"cannot open --log-file {args.log_file}: {exc.strerror or exc}") from None

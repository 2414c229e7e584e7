"""``tproxy run``'s UDP side: options, listeners, and serving beside the TCP server.

Every transparent listener also receives diverted UDP on its address and
port (unless ``--no-udp``); ``--mode transparent-udp@HOST:PORT`` opens a
UDP-only one. All of them feed one :class:`~tproxy.udp.relay.UdpRelay`, so
the session cap is per process. UDP listeners are bound before the event
loop, like TCP ones, and served until the TCP server has finished its
shutdown (routing removed first), then every session ends as ``shutdown``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import socket
from collections.abc import Callable, Sequence
from typing import Any

import trio

from ..errors import UsageError
from ..modes import ModeSpec
from ..server import Door, Server
from ..sockets import SourcePolicy
from .relay import DEFAULT_IDLE, DEFAULT_MAX_SESSIONS, UdpConfig, UdpRelay, raise_descriptor_limit
from .sockets import listening_socket

log = logging.getLogger("tproxy.udp")

UDP_ONLY = "transparent-udp"
DESCRIPTORS_PER_SESSION = 2
"""A session socket, and (shared per destination) at most one reply socket."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the UDP options to ``tproxy run``."""
    g = parser.add_argument_group("UDP (transparent)")
    g.add_argument(
        "--udp-idle",
        type=_positive_float,
        default=DEFAULT_IDLE,
        metavar="SECONDS",
        help="end a UDP session after this long without a datagram either way (default 60)",
    )
    g.add_argument(
        "--udp-max-sessions",
        type=_positive_int,
        default=DEFAULT_MAX_SESSIONS,
        metavar="N",
        help="most UDP sessions at once; a new one evicts the least recently used "
        "(default 16384; not counted in --max-flows)",
    )
    g.add_argument(
        "--no-udp",
        dest="udp",
        action="store_false",
        help="transparent listeners take TCP only (--mode transparent-udp@... still listens)",
    )


def is_udp_only(spec: ModeSpec) -> bool:
    """Whether ``spec`` is a UDP-only listener (no TCP socket)."""
    return spec.kind == UDP_ONLY


def tcp_specs(specs: Sequence[ModeSpec]) -> list[ModeSpec]:
    """The listeners that need a TCP socket."""
    return [s for s in specs if not is_udp_only(s)]


def open_listeners(
    specs: Sequence[ModeSpec], args: argparse.Namespace, *, reuse_port: bool = False
) -> list[socket.socket]:
    """Bind the UDP listeners; a failure closes what was opened and is a usage error."""
    wanted = [
        s
        for s in specs
        if is_udp_only(s) or (s.kind == "transparent" and getattr(args, "udp", True))
    ]
    opened: list[socket.socket] = []
    try:
        for spec in wanted:
            try:
                opened.append(listening_socket(spec.host, spec.port, reuse_port=reuse_port))
            except OSError as exc:
                raise UsageError(
                    f"cannot listen for UDP on {spec}: {exc.strerror or exc}"
                ) from None
    except BaseException:
        for sock in opened:
            sock.close()
        raise
    if opened:
        max_sessions = getattr(args, "udp_max_sessions", DEFAULT_MAX_SESSIONS)
        raise_descriptor_limit(1024 + DESCRIPTORS_PER_SESSION * max_sessions)
    return opened


def config_from(args: argparse.Namespace) -> UdpConfig:
    """The relay's settings from ``tproxy run``'s arguments."""
    try:
        return UdpConfig(
            idle=getattr(args, "udp_idle", DEFAULT_IDLE),
            max_sessions=getattr(args, "udp_max_sessions", DEFAULT_MAX_SESSIONS),
            source_policy=SourcePolicy(args.source),
            mark=args.mark,
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None


class UdpServer:
    """The TCP :class:`Server` and the UDP listeners, behind the Server's own interface.

    ``serve``, ``stop`` and ``doors`` mean what they mean for a :class:`Server`,
    so the process's lifecycle (signals, reload, shutdown) drives both alike.
    Without UDP listeners this is exactly the Server; with UDP listeners and no
    TCP door, the Server only holds the routing and waits for its stop.
    """

    def __init__(
        self, engine: Any, doors: list[Door], listeners: list[socket.socket], config: UdpConfig
    ) -> None:
        self.engine = engine
        self.server = Server(engine, doors)
        self.listeners = listeners
        self.config = config

    @property
    def doors(self) -> list[Door]:
        return self.server.doors

    def stop(self) -> None:
        """Begin the shutdown, as :meth:`Server.stop` does."""
        self.server.stop()

    async def serve(
        self,
        routing: Callable[[], contextlib.AbstractContextManager[object]] | None = None,
        *,
        handle_signals: bool = True,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Relay UDP sessions while the Server serves; both stop together."""
        if not self.listeners:
            await self.server.serve(routing, handle_signals=handle_signals, task_status=task_status)
            return
        relay = UdpRelay(self.engine, self.config)
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(relay.run, self.listeners)
                for sock in self.listeners:
                    log.info("listening: udp %s", _where(sock))
                await self.server.serve(
                    routing, handle_signals=handle_signals, task_status=task_status
                )
                nursery.cancel_scope.cancel()
        finally:
            for sock in self.listeners:
                sock.close()


def _where(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be positive")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value

"""What a flow is, as interceptors and flow records see it.

A *flow pair* is one proxied connection: the ``incoming`` flow the proxy
accepted from the client and the ``outgoing`` flow it opened toward the
destination. :class:`FlowInfo` is the metadata an interceptor gets; it is
plain data so interceptors can be built and tested without sockets.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from .tls.info import TlsInfo

Address = tuple[str, int]
"""A host and a port. The host is an IP literal, or a name in explicit modes."""


class EndReason(StrEnum):
    """How a flow pair ended; written in its closing log line."""

    EOF = "eof"
    RESET = "reset"
    TIMEOUT = "timeout"
    CONNECT_FAILED = "connect-failed"
    INTERCEPTOR_ABORT = "interceptor-abort"
    ERROR = "error"
    SHUTDOWN = "shutdown"
    REJECTED = "rejected"
    IDLE = "idle"
    """A UDP session saw no datagram either way for ``--udp-idle`` seconds."""
    EVICTED = "evicted"
    """A UDP session made room for a new one (``--udp-max-sessions``)."""


_ids = itertools.count(1)


def next_flow_id() -> int:
    """Return a process-wide unique, increasing flow id."""
    return next(_ids)


def set_flow_ids(start: int, step: int = 1) -> None:
    """Number the next flows start, start+step, ... (workers of ``--workers N`` use disjoint
    residues so their ids never collide); call before the first flow."""
    global _ids
    if start < 1 or step < 1:
        raise ValueError("flow ids start at 1 and increase")
    _ids = itertools.count(start, step)


@dataclass(frozen=True, slots=True)
class FlowInfo:
    """Who talks to whom through one flow pair.

    ``client`` is the peer address of the incoming flow. ``destination`` is
    where the outgoing flow goes: the original destination in transparent
    mode, the requested one in SOCKS/HTTP modes, the fixed target in forward
    mode. ``mode`` names the front door that accepted the flow.
    """

    id: int
    client: Address
    destination: Address
    mode: str = "transparent"
    sni: str | None = None
    """The TLS server name of the client's ClientHello, when the engine peeked it."""
    alpn: tuple[str, ...] | None = None
    """The ALPN protocols the client offered in that ClientHello (``None``: not peeked)."""
    via: Address | None = None
    """The outgoing flow's local address (the client's own in transparent mode), once known."""
    started: float = field(default_factory=time.time, compare=False)
    """Wall-clock time (``time.time()``) when the flow was accepted."""
    tls: TlsInfo | None = field(default=None, compare=False)
    """With ``--tls intercept``, what the TLS layer learnt (:class:`tproxy.tls.info.TlsInfo`),
    filled in as its handshakes go; ``None`` for flows that are not TLS."""

    @classmethod
    def example(
        cls,
        client: Address = ("192.0.2.10", 40000),
        destination: Address = ("198.51.100.20", 80),
        mode: str = "transparent",
    ) -> FlowInfo:
        """A made-up flow for tests of interceptors (documentation addresses)."""
        return cls(id=0, client=client, destination=destination, mode=mode)


def format_address(address: Address) -> str:
    """``host:port``, with an IPv6 host in brackets."""
    host, port = address[0], address[1]
    if ":" in host:
        return f"[{host}]:{port}"
    return f"{host}:{port}"


@dataclass(slots=True)
class FlowRecord:
    """Counters of one flow pair, logged when it opens and when it ends."""

    info: FlowInfo
    started: float
    bytes_up: int = 0
    """Bytes received from the client (before interception)."""
    bytes_down: int = 0
    """Bytes received from the server (before interception)."""
    reason: EndReason | None = None
    detail: str = ""
    ended: float | None = None
    outgoing_source: Address | None = field(default=None)
    interceptors: tuple[str, ...] = ()
    """Names of the interceptors of this flow's chain (as the flow started)."""
    delivered_up: int | None = None
    """Bytes written to the server, where the relay counts them (``None``: not counted)."""
    delivered_down: int | None = None
    """Bytes written to the client, where the relay counts them (``None``: not counted)."""
    reply_code: str | None = None
    """The protocol's code an explicit door refused the flow with (SOCKS5 ``0x02``,
    SOCKS4 ``0x5b``, HTTP ``403``; see ``tproxy.protocols.reply_code``), else ``None``."""

    def end(self, reason: EndReason, detail: str = "", *, now: float) -> None:
        """Record the first reason only: later ones are consequences of it."""
        if self.reason is None:
            self.reason = reason
            self.detail = detail
            self.ended = now

    def open_line(self) -> str:
        src = f" via={format_address(self.outgoing_source)}" if self.outgoing_source else ""
        return (
            f"flow {self.info.id} open mode={self.info.mode} "
            f"client={format_address(self.info.client)} "
            f"dst={format_address(self.info.destination)}{src}"
        )

    def close_line(self) -> str:
        duration = (self.ended or self.started) - self.started
        detail = f" detail={self.detail!r}" if self.detail else ""
        return (
            f"flow {self.info.id} end reason={self.reason or 'unknown'} "
            f"client={format_address(self.info.client)} "
            f"dst={format_address(self.info.destination)} "
            f"up={self.bytes_up} down={self.bytes_down} duration={duration:.3f}s{detail}"
        )


class FlowObserver(Protocol):
    """Told by the engine when a flow record opens and when it ends (metrics, control).

    Both calls run on the event loop and must be quick; they must not raise.
    """

    def flow_opened(self, record: FlowRecord) -> None: ...

    def flow_ended(self, record: FlowRecord) -> None: ...

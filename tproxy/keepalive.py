"""TCP keepalive and ``TCP_USER_TIMEOUT`` on both sockets of every flow.

A client that vanishes (its link goes down, it loses power) sends nothing,
not even a reset: without keepalive its flow, and the outgoing flow paired
with it, stay open until ``--idle-timeout`` (off by default), forever when
the server is idle too. So every flow's sockets probe a silent peer:

- ``SO_KEEPALIVE`` with ``TCP_KEEPIDLE`` (seconds of silence before the
  first probe), ``TCP_KEEPINTVL`` (seconds between probes) and
  ``TCP_KEEPCNT`` (unanswered probes before the kernel gives up with
  ETIMEDOUT, which the relay treats as a reset of that side);
- ``TCP_USER_TIMEOUT`` (idle + interval x count): data sent and not
  acknowledged for that long ends the connection too, so a peer that
  vanished while data was in flight cannot pin a flow forever (keepalive
  probes are only sent while nothing is in flight).

The default, 60 s idle, 10 s interval, 6 probes, reaps a vanished peer
within two minutes and costs a probe per idle minute and flow.
``tproxy run --keepalive IDLE,INTERVAL,COUNT`` changes it, ``--keepalive
off`` turns both off.

The listening sockets carry the options (Linux copies them to every accepted
socket, so the incoming flow pays no system call for them) and outgoing
sockets get them when they are made: :func:`apply` is called by
``tproxy.sockets`` for both, with the process's setting (:data:`CURRENT`,
set from ``EngineConfig.keepalive`` when the engine is made).
"""

from __future__ import annotations

import argparse
import socket
from dataclasses import dataclass
from typing import Protocol

TCP_USER_TIMEOUT = getattr(socket, "TCP_USER_TIMEOUT", 18)


@dataclass(frozen=True)
class Keepalive:
    """Seconds of silence before probing, seconds between probes, probes before giving up."""

    idle: int = 60
    interval: int = 10
    count: int = 6

    def __post_init__(self) -> None:
        # The kernel's own limits (MAX_TCP_KEEPIDLE, MAX_TCP_KEEPINTVL, MAX_TCP_KEEPCNT).
        if not 1 <= self.idle <= 32767:
            raise ValueError("keepalive idle time must be 1..32767 seconds")
        if not 1 <= self.interval <= 32767:
            raise ValueError("keepalive interval must be 1..32767 seconds")
        if not 1 <= self.count <= 127:
            raise ValueError("keepalive probe count must be 1..127")

    @property
    def user_timeout_ms(self) -> int:
        """``TCP_USER_TIMEOUT``: as long as keepalive takes to give up on a silent peer."""
        return (self.idle + self.interval * self.count) * 1000

    @property
    def reap_after(self) -> int:
        """Seconds after which a vanished peer's connection is ended, at most."""
        return self.idle + self.interval * self.count

    def __str__(self) -> str:
        return f"{self.idle},{self.interval},{self.count}"


class _Socket(Protocol):
    """A stdlib or trio socket: all :func:`apply` needs."""

    def setsockopt(self, level: int, option: int, value: int, /) -> None: ...


DEFAULT = Keepalive()
CURRENT: Keepalive | None = DEFAULT
"""The process's setting, applied to every listening and outgoing TCP socket; ``None``: off."""


def use(keepalive: Keepalive | None) -> None:
    """Make ``keepalive`` the process's setting (the engine calls this with its config)."""
    global CURRENT
    CURRENT = keepalive


def apply(sock: _Socket, keepalive: Keepalive | None = None) -> None:
    """Set keepalive and ``TCP_USER_TIMEOUT`` on a TCP socket (default: :data:`CURRENT`).

    Nothing is set when the setting is off.
    """
    setting = CURRENT if keepalive is None else keepalive
    if setting is None:
        return
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, setting.idle)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, setting.interval)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, setting.count)
    sock.setsockopt(socket.IPPROTO_TCP, TCP_USER_TIMEOUT, setting.user_timeout_ms)


def parse(text: str) -> Keepalive | None:
    """``IDLE,INTERVAL,COUNT`` (seconds, seconds, probes) or ``off``."""
    if text.strip().lower() == "off":
        return None
    parts = text.split(",")
    if len(parts) != 3:
        raise ValueError(f"{text!r}: expected IDLE,INTERVAL,COUNT (e.g. 60,10,6) or off")
    try:
        idle, interval, count = (int(part, 10) for part in parts)
    except ValueError:
        raise ValueError(f"{text!r}: IDLE, INTERVAL and COUNT are whole numbers") from None
    return Keepalive(idle, interval, count)


def _argument(text: str) -> Keepalive | None:
    try:
        return parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``--keepalive IDLE,INTERVAL,COUNT|off`` for ``tproxy run``."""
    parser.add_argument(
        "--keepalive",
        type=_argument,
        default=DEFAULT,
        metavar="IDLE,INTERVAL,COUNT",
        help="TCP keepalive on both sockets of every flow: probe a peer silent for IDLE "
        "seconds every INTERVAL seconds, give up after COUNT probes; TCP_USER_TIMEOUT is "
        f"their sum, for unacknowledged data. 'off' turns both off (default {DEFAULT})",
    )

"""``--mode MODE@HOST:PORT``: which front door listens where.

Pure parsing, no I/O. ``MODE`` is ``transparent``, ``transparent-udp``
(UDP only), ``socks``, ``http`` or ``forward:TARGET_HOST:TARGET_PORT``; the
part after the *last* ``@`` is the listen address (an IPv6 host in
brackets); ``@:PORT`` keeps the mode's default host and a missing ``@...``
keeps host and port.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from . import ports

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORTS = {
    "transparent": 9091,
    "socks": 1080,
    "http": 8080,
    "forward": 9000,
    "transparent-udp": 9091,
}
KINDS = tuple(DEFAULT_PORTS)


class ModeError(ValueError):
    """A ``--mode`` value that cannot be understood."""


@dataclass(frozen=True)
class ModeSpec:
    """One listener: the front door ``kind``, where it listens, and a forward target."""

    kind: str
    host: str
    port: int
    target: tuple[str, int] | None = None

    @property
    def transparent(self) -> bool:
        return self.kind in ("transparent", "transparent-udp")

    def __str__(self) -> str:
        kind = self.kind
        if self.target is not None:
            kind = f"forward:{format_hostport(*self.target)}"
        return f"{kind}@{format_hostport(self.host, self.port)}"


def format_hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_port(text: str, what: str = "port") -> int:
    """A TCP port 1..65535 (0 is refused: a listener on a random port helps nobody).

    The rule is :func:`tproxy.ports.parse_port`'s, shared by every port option.
    """
    try:
        return ports.parse_port(text, what)
    except ports.PortSpecError as exc:
        raise ModeError(str(exc)) from None


def split_hostport(text: str, *, default_host: str | None = None) -> tuple[str, int]:
    """``host:port``, ``[v6]:port`` or (with a default host) ``:port``."""
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or text[end + 1 : end + 2] != ":":
            raise ModeError(f"{text!r}: expected [IPv6]:PORT")
        host, port = text[1:end], text[end + 2 :]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ModeError(f"{host!r} is not an IPv6 address") from None
    else:
        host, sep, port = text.rpartition(":")
        if not sep:
            raise ModeError(f"{text!r}: expected HOST:PORT")
        if ":" in host:
            raise ModeError(f"{text!r}: put an IPv6 address in brackets, [::1]:PORT")
        if not host:
            if default_host is None:
                raise ModeError(f"{text!r}: a host is needed")
            host = default_host
    return host, parse_port(port)


def _target_problem(host: str) -> str | None:
    """Why a forward target cannot name a host (see ``tproxy.protocols.hostname``)."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        from .protocols.hostname import host_name_problem

        return host_name_problem(host)
    return None


def parse_mode(text: str) -> ModeSpec:
    """Parse one ``--mode`` value."""
    kind_part, at, where = text.rpartition("@")
    if not at:
        kind_part, where = text, ""
    kind, _, rest = kind_part.partition(":")
    if kind not in KINDS:
        raise ModeError(f"unknown mode {kind!r} (choose from {', '.join(KINDS)})")
    target = None
    if kind == "forward":
        if not rest:
            raise ModeError("forward needs a target: forward:HOST:PORT")
        target = split_hostport(rest)
        problem = _target_problem(target[0])
        if problem is not None:
            raise ModeError(f"forward target {target[0][:60]!r}: {problem}")
    elif rest:
        raise ModeError(f"mode {kind!r} takes no ':' argument")
    if where:
        host, port = split_hostport(where, default_host=DEFAULT_HOST)
    else:
        host, port = DEFAULT_HOST, DEFAULT_PORTS[kind]
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ModeError(f"listen address {host!r} is not an IP address") from None
    return ModeSpec(kind, host, port, target)

"""The SOCKS request as a front door sees it, whatever the SOCKS version.

SOCKS4, 4a and 5 number their commands alike (CONNECT 1, BIND 2, and
SOCKS5 adds UDP ASSOCIATE 3), so one :class:`SocksCommand` and one
:class:`SocksRequest` serve both :mod:`.socks4` and :mod:`.socks5`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

from .base import ProtocolError
from .hostname import host_name_problem


class SocksCommand(IntEnum):
    """The command of a SOCKS request (same numbers in SOCKS4 and SOCKS5)."""

    CONNECT = 1
    BIND = 2
    UDP_ASSOCIATE = 3
    """SOCKS5 only."""


class SocksError(ProtocolError):
    """A SOCKS handshake failed; :attr:`reply` is the SOCKS answer to send."""


@dataclass(frozen=True)
class SocksRequest:
    """A complete SOCKS request: what the client wants the proxy to do.

    ``host`` is an IP literal (``"192.0.2.1"``, ``"2001:db8::1"``, no
    brackets) or a host name, exactly as the client sent it (SOCKS4a and
    SOCKS5 domain names; a name may itself spell an IP literal, and it is not
    resolved here). ``port`` is the destination port (for BIND: the port the
    client expects the peer to connect from; for UDP ASSOCIATE: the address
    and port the client will send datagrams from, often ``0.0.0.0:0``).
    ``user`` is the SOCKS4 user id, or the RFC 1929 user name once
    authenticated; ``None`` when there was none. ``is_domain`` says whether
    ``host`` came as a name (SOCKS4a, SOCKS5 ATYP 3).
    """

    version: int
    command: SocksCommand
    host: str
    port: int
    user: str | None = None
    is_domain: bool = False

    @property
    def address(self) -> tuple[str, int]:
        """``(host, port)``."""
        return (self.host, self.port)


def host_name_refusal(raw: bytes) -> str | None:
    """Why the name bytes ``raw`` sent by a client cannot name a host, or ``None``.

    Names are UTF-8 (plain ASCII in practice; an IDN stays in Unicode, the
    resolver encodes it). Refused, so that they never reach a resolver:
    empty names, bytes that are not UTF-8, control characters and spaces,
    and whatever :func:`~tproxy.protocols.hostname.host_name_problem`
    refuses (empty or over-long labels, names over 253 bytes, non-IDNA).
    The phrase names the problem and a short, quoted start of the name.
    """
    try:
        name = raw.decode("utf-8")
    except UnicodeDecodeError:
        return f"host name is not UTF-8 ({shown_name(raw)})"
    problem = host_name_problem(name)
    return None if problem is None else f"{problem} ({shown_name(raw)})"


def shown_name(raw: bytes | str, limit: int = 40) -> str:
    """A client's name as safe for a log line: quoted, escaped, at most ``limit`` characters."""
    text = ascii(raw[:limit])
    return text + ("..." if len(raw) > limit else "")


def decode_host_name(raw: bytes) -> str | None:
    """A host name sent by the client, or ``None`` if it cannot name a host.

    See :func:`host_name_refusal` for what is refused.
    """
    if host_name_refusal(raw) is not None:
        return None
    return raw.decode("utf-8")

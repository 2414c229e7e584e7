"""The SOCKS request as a front door sees it, whatever the SOCKS version.

SOCKS4, 4a and 5 number their commands alike (CONNECT 1, BIND 2, and
SOCKS5 adds UDP ASSOCIATE 3), so one :class:`SocksCommand` and one
:class:`SocksRequest` serve both :mod:`.socks4` and :mod:`.socks5`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

from .base import ProtocolError


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


def decode_host_name(raw: bytes) -> str | None:
    """A host name sent by the client, or ``None`` if it cannot name a host.

    Names are UTF-8 (plain ASCII in practice; an IDN stays in Unicode, the
    resolver encodes it). Empty names and names with control characters or
    spaces are refused so they never reach a resolver or a log line.
    """
    if not raw:
        return None
    try:
        name = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if any(ord(c) <= 0x20 or ord(c) == 0x7F for c in name):
        return None
    return name

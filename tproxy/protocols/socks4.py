"""SOCKS4 and SOCKS4a, server side, sans-io.

Request (client to proxy)::

    VN=4 | CD (1 CONNECT, 2 BIND) | DSTPORT (2) | DSTIP (4) | USERID... | NUL
    SOCKS4a: DSTIP = 0.0.0.x with x != 0, then DOMAIN... | NUL

Reply (proxy to client), 8 bytes::

    VN=0 | CD (90 granted, 91 rejected, 92, 93) | DSTPORT (2) | DSTIP (4)

Codes 92 and 93 report identd failures; tproxy does not consult identd, so it
never sends them (the user id is only recorded, in ``SocksRequest.user``).
Every refusal, whatever its cause, is 91: SOCKS4 has no finer code.

CONNECT gets one reply. BIND gets two: the first once the proxy listens
(DSTPORT/DSTIP = the address the peer should connect to), the second when
the peer connected (DSTPORT/DSTIP = the peer's address); both are
:meth:`Socks4Handshake.reply_success` with the respective address.
"""

from __future__ import annotations

import ipaddress
from enum import IntEnum

from .base import RequestHandshake
from .socks_request import SocksCommand, SocksError, SocksRequest, host_name_refusal

Address = tuple[str, int]

DEFAULT_MAX_SIZE = 1024
"""Largest SOCKS4 request accepted, in bytes (header, user id and 4a name)."""


class Socks4Reply(IntEnum):
    """The CD field of a SOCKS4 reply."""

    GRANTED = 90
    REJECTED = 91
    NO_IDENTD = 92
    """Never sent: tproxy does not use identd."""
    IDENTD_MISMATCH = 93
    """Never sent: tproxy does not use identd."""


def socks4_reply(code: Socks4Reply, bound: Address | None = None) -> bytes:
    """The 8 reply bytes. ``bound`` is shown if it is IPv4 (or IPv4-mapped); else zeros."""
    host, port = bound if bound is not None else ("0.0.0.0", 0)
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        ip = None
    if isinstance(ip, ipaddress.IPv6Address):
        ip = ip.ipv4_mapped  # a dual-stack socket's view of an IPv4 address, or None
    packed = ip.packed if ip is not None else bytes(4)
    if not 0 <= port <= 0xFFFF:
        port = 0
    return bytes((0, code)) + port.to_bytes(2, "big") + packed


REJECTED_REPLY = socks4_reply(Socks4Reply.REJECTED)


class Socks4Handshake(RequestHandshake[SocksRequest]):
    """Parses one SOCKS4/4a request; builds its replies.

    ``receive_data`` returns ``[SocksRequest]`` once the request is complete
    (``version=4``, ``user`` = the user id or ``None``, ``is_domain`` for
    4a), ``[]`` while more bytes are needed, or raises :class:`SocksError`
    with the 91 reply: unknown version or command, a 4a name that cannot
    name a host (see :func:`~.socks_request.host_name_refusal`), request
    over ``max_size`` bytes, or ``allowed=False`` (a
    SOCKS4 request on a listener that requires credentials: SOCKS4 cannot
    carry a password, so it is refused once the request is read).
    """

    version = 4

    def __init__(self, *, max_size: int = DEFAULT_MAX_SIZE, allowed: bool = True) -> None:
        super().__init__()
        self.max_size = max_size
        self.allowed = allowed
        self._buf = bytearray()
        self._scan = 8
        """Where to resume looking for the NUL that ends the current field."""
        self._user_end: int | None = None

    # -- contract -------------------------------------------------------

    def receive_data(self, data: bytes) -> list[object]:
        """Feed client bytes; return ``[SocksRequest]`` when it is complete."""
        if self._request is not None:
            self._leftover += data
            return []
        # Never look at more than max_size + 1 request bytes: bounded memory,
        # and the outcome does not depend on how the bytes were cut.
        room = self.max_size + 1 - len(self._buf)
        self._buf += data[:room]
        rest = data[room:]
        request = self._parse()
        if request is None:
            if len(self._buf) > self.max_size:
                raise SocksError(
                    f"SOCKS4 request larger than {self.max_size} bytes", REJECTED_REPLY
                )
            return []
        self._leftover += rest
        return [request]

    # -- replies ------------------------------------------------------------

    def reply_success(self, bound: Address | None = None) -> bytes:
        """90 granted, with ``bound`` (BIND: listening address, then the peer's)."""
        return socks4_reply(Socks4Reply.GRANTED, bound)

    def reply_failure(self, cause: object = None) -> bytes:
        """91 rejected; ``cause`` (an exception, a code) is accepted and ignored."""
        return REJECTED_REPLY

    # -- parsing --------------------------------------------------------------

    def _parse(self) -> SocksRequest | None:
        buf = self._buf
        if len(buf) < 8:
            return None
        if buf[0] != 4:
            raise SocksError(f"not SOCKS4 (version byte {buf[0]})", REJECTED_REPLY)
        if buf[1] not in (SocksCommand.CONNECT, SocksCommand.BIND):
            raise SocksError(f"SOCKS4 command {buf[1]} not supported", REJECTED_REPLY)
        if self._user_end is None:
            end = buf.find(0, self._scan)
            if end < 0:
                self._scan = len(buf)
                return None
            self._user_end = end
            self._scan = end + 1
        is_4a = buf[4:7] == b"\0\0\0" and buf[7] != 0
        if is_4a:
            end = buf.find(0, self._scan)
            if end < 0:
                self._scan = len(buf)
                return None
        else:
            end = self._user_end
        consumed = end + 1
        if consumed > self.max_size:
            raise SocksError(f"SOCKS4 request larger than {self.max_size} bytes", REJECTED_REPLY)
        raw_user = bytes(buf[8 : self._user_end])
        user = raw_user.decode("utf-8", "replace") if raw_user else None
        port = int.from_bytes(buf[2:4], "big")
        if is_4a:
            raw_name = bytes(buf[self._user_end + 1 : end])
            refusal = host_name_refusal(raw_name)
            if refusal is not None:
                raise SocksError(
                    f"SOCKS4a request with an invalid host name: {refusal}", REJECTED_REPLY
                )
            host = raw_name.decode("utf-8")
        else:
            host = str(ipaddress.IPv4Address(bytes(buf[4:8])))
        if not self.allowed:
            raise SocksError("SOCKS4 refused: credentials are required", REJECTED_REPLY)
        self._request = SocksRequest(
            version=4,
            command=SocksCommand(buf[1]),
            host=host,
            port=port,
            user=user,
            is_domain=is_4a,
        )
        self._leftover += buf[consumed:]
        self._buf = bytearray()
        return self._request


__all__ = [
    "DEFAULT_MAX_SIZE",
    "REJECTED_REPLY",
    "Socks4Handshake",
    "Socks4Reply",
    "socks4_reply",
]

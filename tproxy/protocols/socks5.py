"""SOCKS5 (RFC 1928) with username/password (RFC 1929), server side, sans-io.

The conversation, and what :class:`Socks5Handshake` returns for it::

    client: VER=5 NMETHODS METHODS...          -> Reply(05 00) or Reply(05 02)
    client: 01 ULEN UNAME PLEN PASSWD          -> Reply(01 00)      (only with 02)
    client: VER=5 CMD RSV ATYP DST.ADDR DST.PORT -> SocksRequest(version=5, ...)
    proxy (front door): reply_success(bound) or reply_failure(error)

Method choice: without an ``authenticate`` callable the proxy offers only
"no authentication" (0x00); with one, only username/password (0x02), which
is then required. A client that offers neither acceptable method gets
``05 FF`` and the handshake raises. A failed RFC 1929 check gets ``01 01``
and raises (RFC 1929: the server must close).

Request errors raise :class:`SocksError` carrying a full SOCKS5 reply: an
unknown CMD gets 0x07 (command not supported), an unknown ATYP 0x08 (address
type not supported), a domain name that cannot name a host 0x04 (host
unreachable: no such host can exist), anything else malformed 0x01. A name
cannot name a host when it is empty, not UTF-8, holds a control character
or space, has an empty label (``a..b``) or one over 63 bytes, is over 253
bytes, or is not IDNA (:mod:`.hostname`). 0x04 rather than 0x08: the
address *type* (a domain name) is supported; this name reaches no host, the
same answer a name the resolver does not know gets.

When several messages arrive in one ``receive_data`` (a pipelining client)
and a later one fails, the error's ``reply`` starts with the replies to the
earlier ones, so the client always receives the same bytes whatever the
chunking.

UDP ASSOCIATE datagrams (RSV(2) FRAG ATYP DST.ADDR DST.PORT DATA) are
parsed by :func:`parse_udp_datagram` and built by :func:`build_udp_datagram`.
Fragmentation is not implemented (RFC 1928 makes it optional): a datagram
with FRAG != 0 raises :class:`DatagramError` like a malformed one, and the
relay drops it.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum

from .base import ConnectFailure, Reply, RequestHandshake, classify_error
from .socks_request import (
    SocksCommand,
    SocksError,
    SocksRequest,
    decode_host_name,
    host_name_refusal,
)

Address = tuple[str, int]
Authenticator = Callable[[str, str], bool]
"""``authenticate(user, password) -> bool``, e.g. ``Policy.check_credentials``."""

DEFAULT_MAX_SIZE = 1100
"""Largest handshake accepted, in bytes, greeting + RFC 1929 + request.

SOCKS5's own length fields bound it at 1032 bytes (257 + 513 + 262), so the
default never refuses a well-formed handshake; lower it to be stricter.
"""


class Socks5Method(IntEnum):
    """Authentication methods of the greeting (RFC 1928 section 3)."""

    NO_AUTH = 0x00
    GSSAPI = 0x01
    """Never selected."""
    USERNAME_PASSWORD = 0x02
    NO_ACCEPTABLE = 0xFF


class Socks5Reply(IntEnum):
    """The REP field of a SOCKS5 reply (RFC 1928 section 6)."""

    SUCCEEDED = 0x00
    GENERAL_FAILURE = 0x01
    NOT_ALLOWED = 0x02
    """Connection not allowed by ruleset."""
    NETWORK_UNREACHABLE = 0x03
    HOST_UNREACHABLE = 0x04
    CONNECTION_REFUSED = 0x05
    TTL_EXPIRED = 0x06
    COMMAND_NOT_SUPPORTED = 0x07
    ADDRESS_TYPE_NOT_SUPPORTED = 0x08


class AddressType(IntEnum):
    """ATYP values."""

    IPV4 = 0x01
    DOMAIN = 0x03
    IPV6 = 0x04


AUTH_SUCCESS = b"\x01\x00"
"""RFC 1929 status: success."""
AUTH_FAILURE = b"\x01\x01"
"""RFC 1929 status: failure (any non-zero status; the connection is closed)."""
NO_ACCEPTABLE_METHODS = b"\x05\xff"

_FAILURE_REPLIES: dict[ConnectFailure, Socks5Reply] = {
    ConnectFailure.REFUSED: Socks5Reply.CONNECTION_REFUSED,
    ConnectFailure.NETWORK_UNREACHABLE: Socks5Reply.NETWORK_UNREACHABLE,
    ConnectFailure.HOST_UNREACHABLE: Socks5Reply.HOST_UNREACHABLE,
    ConnectFailure.NAME_NOT_FOUND: Socks5Reply.HOST_UNREACHABLE,
    ConnectFailure.TIMEOUT: Socks5Reply.TTL_EXPIRED,
    ConnectFailure.NOT_ALLOWED: Socks5Reply.NOT_ALLOWED,
    ConnectFailure.ADDRESS_FAMILY: Socks5Reply.ADDRESS_TYPE_NOT_SUPPORTED,
    ConnectFailure.OTHER: Socks5Reply.GENERAL_FAILURE,
}


def reply_code_for_error(error: BaseException | int | Socks5Reply | None) -> Socks5Reply:
    """The REP code for why a connect (or bind) failed.

    ``error`` is the exception the front door caught (an errno ``int`` also
    works; a :class:`Socks5Reply` is returned as is). Mapping, via
    :func:`~tproxy.protocols.base.classify_error`: ECONNREFUSED -> 0x05;
    ENETUNREACH/ENETDOWN -> 0x03; EHOSTUNREACH/EHOSTDOWN and DNS failure
    (``socket.gaierror``) -> 0x04; timeout (``TimeoutError``, ETIMEDOUT,
    ``trio.TooSlowError``) -> 0x06 TTL expired, as Dante does;
    EACCES/EPERM (a local firewall) -> 0x02; EAFNOSUPPORT -> 0x08; anything
    else -> 0x01.
    """
    if isinstance(error, Socks5Reply):
        return error
    return _FAILURE_REPLIES[classify_error(error)]


def encode_address(host: str, port: int) -> bytes:
    """ATYP | ADDR | PORT for an IP literal (IPv4/IPv6) or a host name.

    An IPv4-mapped IPv6 address (``::ffff:192.0.2.1``) is sent as IPv4.
    """
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        name = host.encode("utf-8")
        if not 0 < len(name) <= 255:
            raise ValueError(f"host name of {len(name)} bytes cannot be sent in SOCKS5") from None
        head = bytes((AddressType.DOMAIN, len(name))) + name
    else:
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped  # a dual-stack socket's view of an IPv4 peer
        atyp = AddressType.IPV4 if ip.version == 4 else AddressType.IPV6
        head = bytes((atyp,)) + ip.packed
    return head + port.to_bytes(2, "big")


def socks5_reply(code: Socks5Reply, bound: Address | None = None) -> bytes:
    """VER=5 | REP | RSV=0 | ATYP | BND.ADDR | BND.PORT; ``bound`` defaults to 0.0.0.0:0."""
    host, port = bound if bound is not None else ("0.0.0.0", 0)
    return bytes((5, code, 0)) + encode_address(host, port)


def _parse_address(buf: bytes | bytearray, at: int) -> tuple[str | None, int, bool, int] | None:
    """Parse ATYP | ADDR | PORT at ``at``: ``(host, port, is_domain, end)``.

    ``None`` when more bytes are needed; ``host`` is ``None`` for a domain
    name that cannot name a host. The caller checked ATYP is known.
    """
    atyp = buf[at]
    if atyp == AddressType.IPV4:
        end = at + 1 + 4 + 2
        if len(buf) < end:
            return None
        host: str | None = str(ipaddress.IPv4Address(bytes(buf[at + 1 : at + 5])))
        is_domain = False
    elif atyp == AddressType.IPV6:
        end = at + 1 + 16 + 2
        if len(buf) < end:
            return None
        host = str(ipaddress.IPv6Address(bytes(buf[at + 1 : at + 17])))
        is_domain = False
    else:
        if len(buf) < at + 2:
            return None
        length = buf[at + 1]
        end = at + 2 + length + 2
        if len(buf) < end:
            return None
        host = decode_host_name(bytes(buf[at + 2 : at + 2 + length]))
        is_domain = True
    port = int.from_bytes(buf[end - 2 : end], "big")
    return host, port, is_domain, end


class Socks5Handshake(RequestHandshake[SocksRequest]):
    """Method negotiation, optional RFC 1929 authentication, and one request.

    ``receive_data`` returns :class:`~tproxy.protocols.base.Reply` events
    (method selection, auth status) and finally a
    :class:`~tproxy.protocols.socks_request.SocksRequest` (``version=5``,
    ``user`` = the authenticated user name or ``None``); it raises
    :class:`SocksError` as described in the module docstring, or when the
    handshake would exceed ``max_size`` bytes (reply: ``05 FF`` during the
    greeting, ``01 01`` during authentication, a 0x01 reply during the
    request).

    ``authenticate(user, password)`` is called once with the RFC 1929
    fields (UTF-8, undecodable bytes kept as surrogate escapes so that
    comparison stays exact).
    """

    version = 5

    _GREETING, _AUTH, _REQUEST, _DONE = range(4)

    def __init__(
        self,
        *,
        authenticate: Authenticator | None = None,
        max_size: int = DEFAULT_MAX_SIZE,
    ) -> None:
        super().__init__()
        self.authenticate = authenticate
        self.max_size = max_size
        self._state = self._GREETING
        self._buf = bytearray()
        self._consumed = 0
        self._user: str | None = None

    # -- contract -------------------------------------------------------

    def receive_data(self, data: bytes) -> list[object]:
        """Feed client bytes; return the replies and request they complete."""
        if self._state == self._DONE:
            self._leftover += data
            return []
        # The parser never sees more than max_size + 1 handshake bytes, so
        # the outcome depends on those bytes only, not on how they were cut.
        room = self.max_size + 1 - self._consumed - len(self._buf)
        self._buf += data[:room]
        rest = data[room:]
        events: list[object] = []
        try:
            while self._state != self._DONE:
                event = self._step()
                if event is None:
                    break
                events.append(event)
            if self._state == self._DONE:
                self._leftover += rest
            elif self._consumed + len(self._buf) > self.max_size:
                raise self._too_large()
        except SocksError as error:
            sent = b"".join(e.data for e in events if isinstance(e, Reply))
            error.reply = sent + error.reply
            raise
        return events

    # -- replies ----------------------------------------------------------------

    def reply_success(self, bound: Address | None = None) -> bytes:
        """REP 0x00 with the bound address.

        CONNECT: the outgoing socket's local address. BIND: first the
        listening address, then (second reply) the peer's address. UDP
        ASSOCIATE: the relay's UDP address the client must send to.
        """
        return socks5_reply(Socks5Reply.SUCCEEDED, bound)

    def reply_failure(self, cause: BaseException | int | Socks5Reply | None = None) -> bytes:
        """A failure reply, REP derived by :func:`reply_code_for_error`.

        Pass ``Socks5Reply.NOT_ALLOWED`` for a policy refusal, the caught
        exception for a connect failure.
        """
        return socks5_reply(reply_code_for_error(cause))

    # -- parsing ------------------------------------------------------------------

    def _too_large(self) -> SocksError:
        reply = {
            self._GREETING: NO_ACCEPTABLE_METHODS,
            self._AUTH: AUTH_FAILURE,
        }.get(self._state, socks5_reply(Socks5Reply.GENERAL_FAILURE))
        return SocksError(f"SOCKS5 handshake larger than {self.max_size} bytes", reply)

    def _have(self, size: int) -> bool:
        """Whether the current message (``size`` bytes) is all buffered; raise past the max."""
        if len(self._buf) < size:
            return False
        if self._consumed + size > self.max_size:
            raise self._too_large()
        return True

    def _eat(self, n: int) -> bytes:
        chunk = bytes(self._buf[:n])
        del self._buf[:n]
        self._consumed += n
        return chunk

    def _step(self) -> object | None:
        if self._state == self._GREETING:
            return self._greeting()
        if self._state == self._AUTH:
            return self._auth()
        return self._request_step()

    def _greeting(self) -> Reply | None:
        buf = self._buf
        if len(buf) < 2:
            return None
        if buf[0] != 5:
            raise SocksError(f"not SOCKS5 (version byte {buf[0]})", NO_ACCEPTABLE_METHODS)
        size = 2 + buf[1]
        if not self._have(size):
            return None
        methods = self._eat(size)[2:]
        if self.authenticate is not None:
            wanted = Socks5Method.USERNAME_PASSWORD
            following = self._AUTH
        else:
            wanted = Socks5Method.NO_AUTH
            following = self._REQUEST
        if wanted not in methods:
            raise SocksError(
                f"no acceptable SOCKS5 method offered ({methods.hex() or 'none'})",
                NO_ACCEPTABLE_METHODS,
            )
        self._state = following
        return Reply(bytes((5, wanted)))

    def _auth(self) -> Reply | None:
        buf = self._buf
        if len(buf) < 2:
            return None
        if buf[0] != 1:
            raise SocksError(f"bad RFC 1929 version {buf[0]}", AUTH_FAILURE)
        ulen = buf[1]
        if len(buf) < 2 + ulen + 1:
            return None
        plen = buf[2 + ulen]
        size = 3 + ulen + plen
        if not self._have(size):
            return None
        message = self._eat(size)
        user = message[2 : 2 + ulen].decode("utf-8", "surrogateescape")
        password = message[3 + ulen :].decode("utf-8", "surrogateescape")
        assert self.authenticate is not None
        if not self.authenticate(user, password):
            raise SocksError(f"SOCKS5 authentication failed for user {user!r}", AUTH_FAILURE)
        self._user = user
        self._state = self._REQUEST
        return Reply(AUTH_SUCCESS)

    def _request_step(self) -> SocksRequest | None:
        buf = self._buf
        if len(buf) < 4:
            return None
        if buf[0] != 5:
            raise SocksError(
                f"SOCKS5 request with version byte {buf[0]}",
                socks5_reply(Socks5Reply.GENERAL_FAILURE),
            )
        if buf[1] not in (SocksCommand.CONNECT, SocksCommand.BIND, SocksCommand.UDP_ASSOCIATE):
            raise SocksError(
                f"SOCKS5 command {buf[1]} not supported",
                socks5_reply(Socks5Reply.COMMAND_NOT_SUPPORTED),
            )
        if buf[3] not in (AddressType.IPV4, AddressType.DOMAIN, AddressType.IPV6):
            raise SocksError(
                f"SOCKS5 address type {buf[3]} not supported",
                socks5_reply(Socks5Reply.ADDRESS_TYPE_NOT_SUPPORTED),
            )
        parsed = _parse_address(buf, 3)
        if parsed is None:
            return None
        host, port, is_domain, end = parsed
        if not self._have(end):
            return None
        command = SocksCommand(buf[1])
        raw_name = bytes(buf[5 : end - 2])
        self._eat(end)
        if host is None:
            raise SocksError(
                f"SOCKS5 request with an invalid host name: {host_name_refusal(raw_name)}",
                socks5_reply(Socks5Reply.HOST_UNREACHABLE),
            )
        self._request = SocksRequest(
            version=5, command=command, host=host, port=port, user=self._user, is_domain=is_domain
        )
        self._state = self._DONE
        self._leftover += self._buf
        self._buf = bytearray()
        return self._request


class DatagramError(ValueError):
    """A UDP ASSOCIATE datagram to drop: malformed, or fragmented (FRAG != 0)."""


@dataclass(frozen=True)
class UdpDatagram:
    """One client datagram of a UDP ASSOCIATE relay: where to, and the payload."""

    host: str
    port: int
    data: bytes
    is_domain: bool = False


def parse_udp_datagram(packet: bytes) -> UdpDatagram:
    """Parse RSV(2) | FRAG | ATYP | DST.ADDR | DST.PORT | DATA.

    Raises :class:`DatagramError` for a truncated header, an unknown ATYP,
    an unusable name, or FRAG != 0 (fragmentation is not supported; RFC 1928
    lets an implementation drop such datagrams). RSV is not checked.
    """
    if len(packet) < 4:
        raise DatagramError("SOCKS5 UDP header truncated")
    if packet[2] != 0:
        raise DatagramError(f"SOCKS5 UDP fragment {packet[2]} dropped (no reassembly)")
    if packet[3] not in (AddressType.IPV4, AddressType.DOMAIN, AddressType.IPV6):
        raise DatagramError(f"SOCKS5 UDP address type {packet[3]} not supported")
    parsed = _parse_address(packet, 3)
    if parsed is None:
        raise DatagramError("SOCKS5 UDP header truncated")
    host, port, is_domain, end = parsed
    if host is None:
        raise DatagramError("SOCKS5 UDP datagram with an invalid host name")
    return UdpDatagram(host=host, port=port, data=bytes(packet[end:]), is_domain=is_domain)


def build_udp_datagram(host: str, port: int, data: bytes) -> bytes:
    """The header (RSV=0, FRAG=0, the address) followed by ``data``.

    Used for datagrams relayed back to the client: ``host``/``port`` is the
    address the reply came from.
    """
    return b"\0\0\0" + encode_address(host, port) + data

"""What every explicit-proxy handshake shares: the error, the reply event, the contract.

A handshake is a plain object fed the client's bytes with
``receive_data(data)``; it returns a list of events and never does I/O. Two
kinds of events come out of it:

- :class:`Reply`: bytes the front door must write to the client now, in the
  order given (a SOCKS5 method selection, an RFC 1929 status, ...);
- a *request* event specific to the protocol (``SocksRequest``,
  ``ConnectRequest``, ``ForwardRequest``): the handshake is complete, the
  front door decides (policy, connect) and answers with the handshake's reply
  builders.

When the client breaks the protocol, floods the handshake past its maximum
size, or fails authentication, ``receive_data`` raises a subclass of
:class:`ProtocolError` whose :attr:`~ProtocolError.reply` holds the exact
bytes to send before closing (possibly empty), so a front door never needs
to know a protocol's error format.

Bytes the client sent after its request (it may pipeline its first data
right behind the request) are never lost: they stay in the handshake's
``leftover`` until taken with ``take_leftover()``. Data fed after the
handshake completed is appended there too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

# The connect-failure vocabulary lives in tproxy.errors, one for the engine and the
# protocols; the protocols keep importing it from here.
from ..errors import ConnectFailure as ConnectFailure
from ..errors import classify_error as classify_error


class ProtocolError(Exception):
    """The client broke the protocol; send :attr:`reply` then close.

    ``reason`` is a short human-readable cause for the flow log;
    ``reply`` the bytes to write to the client before closing (``b""`` when
    the protocol has no way to say it, e.g. an unknown SOCKS version).
    """

    def __init__(self, reason: str, reply: bytes = b"") -> None:
        super().__init__(reason)
        self.reason = reason
        self.reply = reply


@dataclass(frozen=True)
class Reply:
    """Bytes to send to the client now, before reading further."""

    data: bytes


def reply_code(data: bytes) -> str | None:
    """The protocol's code in a refusal's reply bytes, for metrics and logs.

    SOCKS5 replies (``05 REP ...``, also the method refusal ``05 ff``), RFC 1929
    authentication replies (``01 STATUS``) and SOCKS4 replies (``00 CD ...``)
    give their code byte as ``"0x02"``, ``"0x5b"``...; an HTTP response its
    status (``"403"``). ``None`` for no reply or bytes of none of these forms.
    """
    if len(data) >= 2 and data[0] in (0x00, 0x01, 0x05):
        return f"0x{data[1]:02x}"
    if data.startswith(b"HTTP/"):
        status = data[9:12]
        if data[8:9] == b" " and status.isdigit():
            return status.decode()
    return None


class Handshake(Protocol):
    """The interface shared by every handshake object in this package."""

    @property
    def complete(self) -> bool:
        """Whether the request event has been returned."""
        ...

    @property
    def leftover(self) -> bytes:
        """Bytes received after the request (client data to forward upstream)."""
        ...

    def receive_data(self, data: bytes) -> list[object]:
        """Feed bytes from the client; return the events they complete."""
        ...

    def take_leftover(self) -> bytes:
        """Return :attr:`leftover` and forget it."""
        ...


RequestT = TypeVar("RequestT")


class RequestHandshake(Generic[RequestT]):
    """The bookkeeping every request handshake shares: the request and what follows it.

    Subclasses set ``self._request`` when the request is complete and append
    bytes that came after it to ``self._leftover``.
    """

    def __init__(self) -> None:
        self._request: RequestT | None = None
        self._leftover = bytearray()

    @property
    def complete(self) -> bool:
        """Whether the request event has been returned."""
        return self._request is not None

    @property
    def request(self) -> RequestT | None:
        """The parsed request, once complete."""
        return self._request

    @property
    def leftover(self) -> bytes:
        """Bytes received after the request (client data to forward upstream)."""
        return bytes(self._leftover)

    def take_leftover(self) -> bytes:
        """Return :attr:`leftover` and forget it."""
        data = bytes(self._leftover)
        self._leftover.clear()
        return data

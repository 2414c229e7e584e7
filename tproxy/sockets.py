"""Socket options and socket set-up that the standard library does not name.

Python 3.11's ``socket`` module lacks ``IPV6_TRANSPARENT``,
``IP_BIND_ADDRESS_NO_PORT`` and friends, so their Linux values
live here, with the few functions that set sockets up for transparent
proxying: a listener that accepts diverted connections and an outgoing
socket that leaves from someone else's address.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import struct
from enum import StrEnum

import trio

from . import keepalive
from .errors import ConnectError, ConnectFailure, connect_error_from, most_telling
from .flow import Address

IP_TRANSPARENT = getattr(socket, "IP_TRANSPARENT", 19)
IPV6_TRANSPARENT = 75
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
SO_MARK = getattr(socket, "SO_MARK", 36)
SOL_IPV6 = socket.IPPROTO_IPV6

LISTEN_BACKLOG = 4096

_LINGER_RESET = struct.pack("ii", 1, 0)


class SourcePolicy(StrEnum):
    """Which source address an outgoing flow uses.

    ``client-port``: the client's address and port (invisible proxy); when the
    port is taken locally (EADDRINUSE) fall back to a kernel-chosen port.
    ``client-ip``: the client's address, a kernel-chosen port
    (``IP_BIND_ADDRESS_NO_PORT`` so the port is picked at connect time).
    ``gateway``: no spoofing; the gateway's own address, as a plain client.
    """

    CLIENT_PORT = "client-port"
    CLIENT_IP = "client-ip"
    GATEWAY = "gateway"


def family_of(host: str) -> socket.AddressFamily:
    """AF_INET or AF_INET6 for an IP literal; ValueError for anything else.

    Called several times per flow: ``inet_pton`` (C) first, ``ipaddress``
    only for what it alone accepts (IPv6 scope ids).
    """
    try:
        socket.inet_pton(socket.AF_INET, host)
        return socket.AF_INET
    except OSError:
        pass
    try:
        socket.inet_pton(socket.AF_INET6, host)
        return socket.AF_INET6
    except OSError:
        pass
    return socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET


def set_transparent(sock: trio.socket.SocketType | socket.socket) -> None:
    """Allow binding to and accepting for addresses that are not local."""
    if sock.family == socket.AF_INET6:
        sock.setsockopt(SOL_IPV6, IPV6_TRANSPARENT, 1)
    else:
        sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)


def listening_socket(
    host: str,
    port: int,
    *,
    transparent: bool,
    reuse_port: bool = False,
    backlog: int = LISTEN_BACKLOG,
) -> socket.socket:
    """A bound, listening TCP socket; with ``transparent`` it accepts diverted flows.

    Without IP_TRANSPARENT the kernel drops SYNs that TPROXY hands to the
    socket, silently, so a transparent listener must set it before bind.
    A plain (stdlib) socket, so that listeners can be bound, and bind errors
    reported, before the event loop starts.
    """
    family = family_of(host)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(SOL_IPV6, socket.IPV6_V6ONLY, 1)
        if transparent:
            set_transparent(sock)
        # Accepted sockets inherit it: set once here, not per flow.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        keepalive.apply(sock)  # inherited too
        sock.bind((host, port))
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock


def flow_addresses(sock: trio.socket.SocketType | socket.socket) -> tuple[Address, Address]:
    """(client, original destination) of an accepted, diverted socket.

    With TPROXY the accepted socket's local address *is* the original
    destination: the kernel keeps it instead of the listener's address.
    """
    peer = sock.getpeername()
    local = sock.getsockname()
    return (peer[0], peer[1]), (local[0], local[1])


async def connect_outgoing(
    destination: Address,
    *,
    source: Address | None,
    policy: SourcePolicy,
    mark: int | None,
    timeout: float,
) -> tuple[trio.SocketStream, Address]:
    """Open the outgoing flow; return the stream and the source address it used.

    ``destination`` may be a host name (explicit modes): it is resolved now
    and its addresses are tried in turn. ``source`` is the client's address;
    whether it is used depends on ``policy``. All within ``timeout`` seconds.
    """
    host, port = destination
    # A bare cancel scope: trio.fail_after is a generator context manager, per flow.
    with trio.CancelScope(deadline=trio.current_time() + timeout) as deadline:
        try:
            family_of(host)
            candidates = [(host, port)]
        except ValueError:
            infos = await trio.socket.getaddrinfo(
                host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
            )
            # TCP over IPv4/IPv6: every sockaddr is (host, port, ...)
            candidates = [(str(info[4][0]), int(info[4][1])) for info in infos]
        errors: list[ConnectError] = []
        for candidate in candidates:
            try:
                return await _connect_one(candidate, source, policy, mark)
            except OSError as exc:
                errors.append(connect_error_from(exc))
        if not errors:
            raise ConnectError(ConnectFailure.NAME_NOT_FOUND, f"no address for {host}")
        raise most_telling(errors)
    assert deadline.cancelled_caught
    raise ConnectError(
        ConnectFailure.TIMEOUT,
        f"connect to {host}:{port} timed out after {timeout:g}s",
        errno.ETIMEDOUT,
    )


def outgoing_socket(
    destination: Address, source: Address | None, policy: SourcePolicy, mark: int | None
) -> socket.socket:
    """A non-blocking socket for the outgoing flow, marked and bound, not connected yet.

    Plain (stdlib) calls: none of this ever blocks, so neither the trio
    connect nor the splice hub pays a scheduler round for it.
    """
    family = family_of(destination[0])
    raw = socket.socket(family, socket.SOCK_STREAM)
    try:
        raw.setblocking(False)
        # As trio.SocketStream does, and the listener for accepted sockets: what is
        # read is written at once, and Nagle would hold back a second small write.
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        keepalive.apply(raw)
        if mark is not None:
            raw.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)
        if source is not None and policy is not SourcePolicy.GATEWAY:
            if family_of(source[0]) != family:
                raise ConnectError(
                    ConnectFailure.OTHER,
                    f"client {source[0]} and destination {destination[0]} differ in family",
                )
            set_transparent(raw)
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if policy is SourcePolicy.CLIENT_PORT:
                try:
                    raw.bind((source[0], source[1]))
                except OSError as exc:
                    if exc.errno != errno.EADDRINUSE:
                        raise
                    # The client's port is in use here (a local socket): any port will do.
                    raw.bind((source[0], 0))
            else:
                raw.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
                raw.bind((source[0], 0))
    except BaseException:
        raw.close()
        raise
    return raw


async def _connect_one(
    destination: Address, source: Address | None, policy: SourcePolicy, mark: int | None
) -> tuple[trio.SocketStream, Address]:
    raw = outgoing_socket(destination, source, policy, mark)
    try:
        sock = trio.socket.from_stdlib_socket(raw)
    except BaseException:
        raw.close()
        raise
    try:
        await sock.connect(destination)
        local = sock.getsockname()
        return trio.SocketStream(sock), (local[0], local[1])
    except BaseException:
        sock.close()
        raise


def reset_socket(sock: socket.socket) -> None:
    """Close a plain socket so that its peer sees RST (SO_LINGER 0), in whatever state."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    except OSError:
        pass  # already closed
    sock.close()


async def reset_stream(stream: trio.abc.AsyncResource) -> None:
    """Close a stream so that its peer sees a reset (RST), not a polite FIN.

    On a socket (or a TLS stream over one) SO_LINGER 0 makes close() send
    RST and drop unsent data; any other stream is closed forcefully. Safe to
    call in a cancelled scope and on an already closed stream.
    """
    inner: object = stream
    while inner is not None:
        sock = getattr(inner, "socket", None)
        if sock is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
            except OSError:
                pass  # already closed
            sock.close()
            break
        inner = getattr(inner, "transport_stream", None)
    await trio.aclose_forcefully(stream)


__all__ = [
    "ConnectError",  # from tproxy.errors, where the connect-failure vocabulary lives
    "SourcePolicy",
    "connect_error_from",
    "connect_outgoing",
    "flow_addresses",
    "listening_socket",
    "outgoing_socket",
    "reset_socket",
    "reset_stream",
]

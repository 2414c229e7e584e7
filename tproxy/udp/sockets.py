"""UDP sockets for transparent proxying: the diverted listener, session and reply sockets.

Python 3.11 names none of the options this needs (the README's
"Transparent UDP" section tells the whole story): ``IP_RECVORIGDSTADDR`` (20 at ``SOL_IP``) and
``IPV6_RECVORIGDSTADDR`` (74 at ``IPPROTO_IPV6``) make ``recvmsg`` return a
diverted datagram's original destination as ancillary data, a
``sockaddr_in``/``sockaddr_in6`` whose cmsg type equals the option number.

Three kinds of socket:

- the *listener*: IP_TRANSPARENT, bound to the proxy address TPROXY
  diverts to, reading the original destination of every datagram;
- a *session socket* per (client, original destination): bound to the
  client's address (the same ``--source`` choices as TCP) and connected to
  the destination, so the server sees the client and answers reach it;
- a *reply socket* per original destination: IP_TRANSPARENT, bound to that
  destination and never connected, so answers leave from the address the
  client asked (``sendto`` the client). A connected reply socket would
  capture the session's later datagrams through TPROXY's socket lookup.
"""

from __future__ import annotations

import errno
import socket
import struct

from ..flow import Address
from ..sockets import SO_MARK, SOL_IPV6, SourcePolicy, family_of, set_transparent

IP_RECVORIGDSTADDR = 20
IP_ORIGDSTADDR = IP_RECVORIGDSTADDR
IPV6_RECVORIGDSTADDR = 74
IPV6_ORIGDSTADDR = IPV6_RECVORIGDSTADDR

MAX_DATAGRAM = 65535
"""Largest UDP payload (and then some): every datagram fits one read."""
ANCILLARY_SPACE = socket.CMSG_SPACE(28)
"""Room for one ``sockaddr_in6`` (28 bytes), the larger of the two."""

LISTENER_BUFFER = 4 * 2**20
"""Receive buffer of a listener: a burst of new sessions' first datagrams queues here."""
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)

_SOCKADDR_IN = struct.Struct("!2xH4s")
_SOCKADDR_IN6 = struct.Struct("!2xH4x16s")


def listening_socket(host: str, port: int, *, reuse_port: bool = False) -> socket.socket:
    """A plain UDP socket that receives diverted datagrams and their original destination.

    Bound before the event loop starts, so errors are reported before
    serving (as for TCP listeners).
    """
    family = family_of(host)
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(SOL_IPV6, socket.IPV6_V6ONLY, 1)
            sock.setsockopt(SOL_IPV6, IPV6_RECVORIGDSTADDR, 1)
        else:
            sock.setsockopt(socket.SOL_IP, IP_RECVORIGDSTADDR, 1)
        set_transparent(sock)
        try:  # beyond net.core.rmem_max, which needs the privilege TPROXY needs anyway
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, LISTENER_BUFFER)
        except PermissionError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, LISTENER_BUFFER)
        sock.bind((host, port))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def original_destination(ancdata: list[tuple[int, int, bytes]]) -> Address | None:
    """The original destination in ``recvmsg`` ancillary data; ``None`` when absent or bad."""
    for level, kind, data in ancdata:
        if level == socket.SOL_IP and kind == IP_ORIGDSTADDR and len(data) >= 8:
            port, raw = _SOCKADDR_IN.unpack_from(data)
            return socket.inet_ntop(socket.AF_INET, raw), port
        if level == SOL_IPV6 and kind == IPV6_ORIGDSTADDR and len(data) >= 24:
            port, raw = _SOCKADDR_IN6.unpack_from(data)
            return socket.inet_ntop(socket.AF_INET6, raw), port
    return None


def session_socket(
    destination: Address, client: Address, policy: SourcePolicy, mark: int | None
) -> socket.socket:
    """A non-blocking UDP socket bound per ``policy`` and connected to ``destination``.

    ``client-port`` binds the client's address and port (SO_REUSEADDR, so a
    client talking to two destinations from one port gets two sessions)
    and falls back to a kernel-chosen port when a local socket holds it.
    Connecting filters what the socket receives, but a datagram can queue
    between ``bind`` and ``connect``: readers still check the source.
    """
    family = family_of(destination[0])
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        if mark is not None:
            sock.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)
        if policy is not SourcePolicy.GATEWAY:
            if family_of(client[0]) != family:
                raise OSError(errno.EAFNOSUPPORT, "client and destination differ in family")
            set_transparent(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            port = client[1] if policy is SourcePolicy.CLIENT_PORT else 0
            try:
                sock.bind((client[0], port))
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE or port == 0:
                    raise
                sock.bind((client[0], 0))
        sock.connect(destination)
    except BaseException:
        sock.close()
        raise
    return sock


def reply_socket(destination: Address, mark: int | None) -> socket.socket:
    """A non-blocking, unconnected IP_TRANSPARENT socket bound to ``destination``."""
    family = family_of(destination[0])
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        if mark is not None:
            sock.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)
        try:
            set_transparent(sock)
        except PermissionError:
            pass  # unprivileged: only a local destination can be bound (tests on loopback)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(SOL_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(destination)
    except BaseException:
        sock.close()
        raise
    return sock

"""Sans-io protocol layer of the explicit proxies: SOCKS4/4a/5 and HTTP CONNECT.

Every handshake here is a plain object fed the client's bytes with
``receive_data(data)``; it returns events (:class:`Reply` bytes to send now,
then one request event) or raises a :class:`ProtocolError` whose ``reply``
is exactly what to send before closing. Nothing here touches a socket or an
event loop; the trio front doors drive these objects. See :mod:`.base` for
the contract, :mod:`.policy` for access rules.

How a front door drives one (sketch; ``stream`` is the client connection)::

    handshake = SocksHandshake(authenticate=policy.check_credentials
                               if policy.requires_auth else None)
    try:
        while not handshake.complete:            # under a handshake timeout
            data = await stream.receive_some()
            if not data: return                   # client gave up
            for event in handshake.receive_data(data):
                if isinstance(event, Reply):
                    await stream.send_all(event.data)
    except ProtocolError as error:
        await stream.send_all(error.reply)        # may be b""
        return                                    # close
    request = handshake.request                   # SocksRequest
    if not policy.check_destination(request.host, request.port):
        await stream.send_all(handshake.reply_failure(Socks5Reply.NOT_ALLOWED))
        return
    try: upstream = await connect(...)            # re-check resolved IPs
    except OSError as exc:                        # (policy.check_resolved)
        await stream.send_all(handshake.reply_failure(exc))
        return
    await stream.send_all(handshake.reply_success(upstream_local_address))
    first = handshake.take_leftover()             # forward before relaying
"""

from __future__ import annotations

from .base import ConnectFailure, Handshake, ProtocolError, Reply, classify_error, reply_code
from .http_proxy import (
    ConnectRequest,
    ForwardRequest,
    HttpProxyError,
    HttpProxyHandshake,
)
from .policy import Decision, Policy, PolicyError, PortRange
from .socks import SocksHandshake
from .socks4 import Socks4Handshake, Socks4Reply
from .socks5 import (
    DatagramError,
    Socks5Handshake,
    Socks5Reply,
    UdpDatagram,
    build_udp_datagram,
    parse_udp_datagram,
    reply_code_for_error,
)
from .socks_request import SocksCommand, SocksError, SocksRequest

__all__ = [
    "ConnectFailure",
    "ConnectRequest",
    "DatagramError",
    "Decision",
    "ForwardRequest",
    "Handshake",
    "HttpProxyError",
    "HttpProxyHandshake",
    "Policy",
    "PolicyError",
    "PortRange",
    "ProtocolError",
    "Reply",
    "Socks4Handshake",
    "Socks4Reply",
    "Socks5Handshake",
    "Socks5Reply",
    "SocksCommand",
    "SocksError",
    "SocksHandshake",
    "SocksRequest",
    "UdpDatagram",
    "build_udp_datagram",
    "classify_error",
    "parse_udp_datagram",
    "reply_code",
    "reply_code_for_error",
]

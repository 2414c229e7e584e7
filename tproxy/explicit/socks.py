"""``socks``: SOCKS4, 4a and 5 on one listener, told apart by the first byte.

After the handshake (:mod:`.handshake`, :class:`~tproxy.protocols.SocksHandshake`)
the request is checked in this order, each refusal answered with the
protocol's reply (SOCKS4: 91 for every failure; SOCKS5: the REP code):

1. the destination rules (CONNECT, BIND): not allowed by ruleset, 0x02;
2. the caps (``--max-flows-per-client``, ``--max-flows``): general failure, 0x01;
3. CONNECT: the connect itself; the REP is derived from the real error
   (refused 0x05, network unreachable 0x03, host unreachable or unknown
   name 0x04, timeout 0x06 TTL expired, local firewall 0x02, other 0x01).

CONNECT answers with the outgoing socket's local address and relays.
BIND listens on the address that routes toward the requested host, answers
that address, waits (``--bind-timeout``) for the peer (only from the
requested IP, when the client named one) and answers the peer's address
before relaying. UDP ASSOCIATE runs a datagram relay (:mod:`.udp`) for as
long as the TCP control connection stays open.

A handshake that times out is answered with what the client can still
understand: nothing before the first byte, ``05 FF`` during the SOCKS5
method negotiation, ``01 01`` during RFC 1929, otherwise a general-failure
reply (SOCKS4: 91).
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket

import trio

from .. import keepalive
from ..flow import Address, EndReason
from ..protocols import SocksCommand, SocksHandshake, SocksRequest
from ..protocols.socks4 import DEFAULT_MAX_SIZE as SOCKS4_MAX_SIZE
from ..protocols.socks5 import AUTH_FAILURE, NO_ACCEPTABLE_METHODS, Socks5Method, Socks5Reply
from ..protocols.socks5 import DEFAULT_MAX_SIZE as SOCKS5_MAX_SIZE
from ..sockets import ConnectError, family_of, reset_stream
from .accepted import Accepted
from .handshake import HandshakeFailed, close_after_reply, drive_handshake, send_reply
from .udp import serve_udp_associate
from .upstream import DestinationDenied, failure_cause, is_ip_literal, open_upstream, resolve

log = logging.getLogger("tproxy.explicit")

_PEER_ATTEMPTS = 16
"""Connections from the wrong address a BIND listener resets before giving up."""


def new_handshake(accepted: Accepted) -> SocksHandshake:
    """A SOCKS handshake with the listener's credentials and size limit."""
    settings = accepted.settings
    policy = settings.policy
    return SocksHandshake(
        authenticate=policy.check_credentials if policy.requires_auth else None,
        socks4_max_size=settings.max_handshake or SOCKS4_MAX_SIZE,
        socks5_max_size=settings.max_handshake or SOCKS5_MAX_SIZE,
    )


def timeout_reply(handshake: SocksHandshake, sent: list[bytes]) -> bytes:
    """The reply to a handshake that did not finish in time, for the state the client is in."""
    if handshake.version is None:
        return b""
    if handshake.version == 4:
        return handshake.reply_failure()
    if not sent:
        return NO_ACCEPTABLE_METHODS
    if sent == [bytes((5, Socks5Method.USERNAME_PASSWORD))]:
        return AUTH_FAILURE
    return handshake.reply_failure(Socks5Reply.GENERAL_FAILURE)


async def serve_socks(accepted: Accepted) -> None:
    """Serve one SOCKS client connection from handshake to the end of its flow."""
    stream = accepted.stream
    handshake = new_handshake(accepted)
    deadline = trio.current_time() + accepted.settings.handshake_timeout
    try:
        request = await drive_handshake(
            stream,
            handshake,
            deadline=deadline,
            timeout_reply=lambda sent: timeout_reply(handshake, sent),
        )
    except HandshakeFailed as failed:
        accepted.handshake_failed(failed)
        return
    assert isinstance(request, SocksRequest)

    async def refuse(reply: bytes, reason: EndReason, detail: str) -> None:
        accepted.reject(reason, detail, request.address, reply=reply)
        await close_after_reply(stream, reply)

    if request.command is not SocksCommand.UDP_ASSOCIATE:
        decision = accepted.settings.policy.check_destination(request.host, request.port)
        if not decision:
            await refuse(
                handshake.reply_failure(Socks5Reply.NOT_ALLOWED),
                EndReason.REJECTED,
                decision.reason,
            )
            return
    problem = accepted.capacity_problem()
    if problem is not None:
        await refuse(
            handshake.reply_failure(Socks5Reply.GENERAL_FAILURE), EndReason.REJECTED, problem
        )
        return
    if request.command is SocksCommand.CONNECT:
        await _connect(accepted, handshake, request)
    elif request.command is SocksCommand.BIND:
        await _bind(accepted, handshake, request)
    else:
        await serve_udp_associate(accepted, handshake, request)


async def _connect(accepted: Accepted, handshake: SocksHandshake, request: SocksRequest) -> None:
    stream = accepted.stream
    try:
        outgoing, source = await open_upstream(
            accepted.engine, accepted.settings.policy, request.address
        )
    except DestinationDenied as exc:
        reply = handshake.reply_failure(Socks5Reply.NOT_ALLOWED)
        accepted.reject(EndReason.REJECTED, str(exc), request.address, reply=reply)
        await close_after_reply(stream, reply)
        return
    except ConnectError as exc:
        accepted.reject(EndReason.CONNECT_FAILED, str(exc), request.address)
        await close_after_reply(stream, handshake.reply_failure(failure_cause(exc)))
        return
    await accepted.grant(
        stream,
        handshake.reply_success(source),
        outgoing,
        request.address,
        client_prefix=handshake.take_leftover(),
        source=source,
    )


async def bind_address(accepted: Accepted, request: SocksRequest) -> str:
    """The local address a BIND listener should use: the one that routes toward the peer.

    With an unspecified requested host (``0.0.0.0``), the address the client
    reached the proxy on. Raises :class:`ConnectError` (name or route problems).
    """
    local = accepted.stream.socket.getsockname()[0]
    host = request.host
    if is_ip_literal(host) and ipaddress.ip_address(host).is_unspecified:
        return str(local)
    peer = (await resolve(host, request.port))[0]
    probe = socket.socket(family_of(peer), socket.SOCK_DGRAM)
    try:
        # A datagram socket's connect only picks a route and a source address.
        probe.connect((peer, request.port or 9))
        return str(probe.getsockname()[0])
    except OSError as exc:
        raise ConnectError("error", exc.strerror or str(exc), exc.errno) from None
    finally:
        probe.close()


async def _bind(accepted: Accepted, handshake: SocksHandshake, request: SocksRequest) -> None:
    stream = accepted.stream
    try:
        listen_ip = await bind_address(accepted, request)
    except ConnectError as exc:
        accepted.reject(EndReason.CONNECT_FAILED, f"bind: {exc}", request.address)
        await close_after_reply(stream, handshake.reply_failure(failure_cause(exc)))
        return
    listener = trio.socket.socket(family_of(listen_ip), socket.SOCK_STREAM)
    try:
        keepalive.apply(listener)  # the peer's socket inherits it: a flow like any other
        await listener.bind((listen_ip, 0))
        listener.listen(1)
        bound = listener.getsockname()
        if not await send_reply(stream, handshake.reply_success((bound[0], bound[1]))):
            accepted.reject(EndReason.RESET, "client went away during BIND", request.address)
            return
        peer_stream, early = await _wait_for_peer(accepted, handshake, listener, request)
    finally:
        listener.close()
    if peer_stream is None:
        return
    peer_name = peer_stream.socket.getpeername()
    peer: Address = (peer_name[0], peer_name[1])
    await accepted.grant(
        stream,
        handshake.reply_success(peer),
        peer_stream,
        peer,
        client_prefix=handshake.take_leftover() + early,
        gone="client went away during BIND",
    )


async def _wait_for_peer(
    accepted: Accepted,
    handshake: SocksHandshake,
    listener: trio.socket.SocketType,
    request: SocksRequest,
) -> tuple[trio.SocketStream | None, bytes]:
    """Accept the BIND peer while watching the control connection.

    Returns the peer's stream (or ``None`` after answering a failure) and
    any bytes the client sent meanwhile. Only a peer from the requested IP
    (when one was named) that the deny rules allow is taken; others are reset.
    """
    stream = accepted.stream
    expected: str | None = None
    if is_ip_literal(request.host) and not ipaddress.ip_address(request.host).is_unspecified:
        expected = str(ipaddress.ip_address(request.host))
    early = bytearray()
    found: list[trio.SocketStream] = []
    client_gone = False

    async def accept_peer(cancel: trio.CancelScope) -> None:
        for _ in range(_PEER_ATTEMPTS):
            sock, address = await listener.accept()
            peer_stream = trio.SocketStream(sock)
            ip = str(ipaddress.ip_address(address[0]))
            if (expected is None or ip == expected) and accepted.settings.policy.check_resolved(ip):
                found.append(peer_stream)
                cancel.cancel()
                return
            log.info("BIND for %s: reset a connection from %s", request.host, ip)
            await reset_stream(peer_stream)
        cancel.cancel()

    async def watch_client(cancel: trio.CancelScope) -> None:
        nonlocal client_gone
        try:
            data = await stream.receive_some(64 * 1024)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            data = b""
        if data:
            # The client spoke early; keep it for the peer and stop watching.
            early.extend(data)
            return
        client_gone = True
        cancel.cancel()

    try:
        with trio.move_on_after(accepted.settings.bind_timeout) as timer:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(accept_peer, nursery.cancel_scope)
                nursery.start_soon(watch_client, nursery.cancel_scope)
    except BaseException:
        for peer_stream in found:
            peer_stream.socket.close()
        raise
    if found:
        return found[0], bytes(early)
    if client_gone:
        accepted.reject(EndReason.EOF, "client closed the connection during BIND", request.address)
        await trio.aclose_forcefully(stream)
        return None, b""
    cause: int | Socks5Reply
    if timer.cancelled_caught:
        detail = f"no peer connected within {accepted.settings.bind_timeout:g}s"
        cause = errno.ETIMEDOUT
    else:
        detail = f"{_PEER_ATTEMPTS} connections from unexpected peers"
        cause = Socks5Reply.NOT_ALLOWED
    accepted.reject(EndReason.CONNECT_FAILED, f"bind: {detail}", request.address)
    await close_after_reply(stream, handshake.reply_failure(cause))
    return None, b""

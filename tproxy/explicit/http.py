"""``http``: an HTTP/1.1 proxy: ``CONNECT`` tunnels and absolute-form forwarding, over TLS too.

One request per client connection (:class:`~tproxy.protocols.HttpProxyHandshake`):

- ``CONNECT host:port``: ``200 Connection established``, then the tunnel is
  relayed (bytes the client sent behind the head go first);
- ``GET http://host/path`` and other absolute-form requests: the rewritten
  head (origin form, ``Connection: close``) and what follows it are relayed
  to the origin, whose answer goes back as is; the flow ends when the origin
  closes.

Refusals, each a complete response followed by a close: malformed 400,
too large 431, unsupported version 505, missing or wrong credentials 407
(``Proxy-Authenticate: Basic``), handshake timeout 408, destination not
allowed 403, ``--max-flows-per-client`` reached 429, ``--max-flows``
reached 503, upstream refused/unreachable/unknown 502, upstream connect
timeout 504.

With ``--certfile`` the listener speaks TLS: clients use ``https://`` for the
proxy itself (``curl -x https://...``). The TLS handshake counts against the
handshake timeout; a failed TLS handshake is closed without an answer.
"""

from __future__ import annotations

import trio

from ..flow import EndReason
from ..protocols import ConnectRequest, ForwardRequest, HttpProxyHandshake
from ..protocols.http_proxy import DEFAULT_MAX_HEAD_SIZE, http_response
from ..sockets import ConnectError, reset_stream
from .accepted import Accepted
from .handshake import HandshakeFailed, close_after_reply, drive_handshake
from .upstream import DestinationDenied, failure_cause, open_upstream


def status_response(status: int, phrase: str, message: str) -> bytes:
    """An error response like the protocol layer's, with ``phrase`` as its reason phrase."""
    built = http_response(status, message)
    return f"HTTP/1.1 {status} {phrase}".encode() + built[built.index(b"\r\n") :]


REQUEST_TIMEOUT = status_response(408, "Request Timeout", "request head not received in time")
TOO_MANY_FROM_CLIENT = status_response(
    429, "Too Many Requests", "too many connections from this client"
)
AT_CAPACITY = status_response(503, "Service Unavailable", "the proxy is at its flow limit")


def new_handshake(accepted: Accepted) -> HttpProxyHandshake:
    """A request-head parser with the listener's credentials and size limit."""
    settings = accepted.settings
    policy = settings.policy
    return HttpProxyHandshake(
        authenticate=policy.check_credentials if policy.requires_auth else None,
        max_head_size=settings.max_handshake or DEFAULT_MAX_HEAD_SIZE,
    )


async def serve_http(accepted: Accepted) -> None:
    """Serve one HTTP proxy client connection, from (TLS and) request head to the flow's end."""
    deadline = trio.current_time() + accepted.settings.handshake_timeout
    stream: trio.abc.Stream = accepted.stream
    tls = accepted.settings.tls
    if tls is not None:
        stream = trio.SSLStream(accepted.stream, tls, server_side=True, https_compatible=True)
        with trio.CancelScope(deadline=deadline) as scope:
            try:
                await stream.do_handshake()
            except trio.BrokenResourceError as exc:
                accepted.reject(EndReason.REJECTED, f"TLS handshake failed: {exc.__cause__!r}")
                await trio.aclose_forcefully(stream)
                return
        if scope.cancelled_caught:
            accepted.reject(EndReason.TIMEOUT, "TLS handshake timed out")
            await reset_stream(stream)
            return
    handshake = new_handshake(accepted)
    try:
        request = await drive_handshake(
            stream, handshake, deadline=deadline, timeout_reply=lambda sent: REQUEST_TIMEOUT
        )
    except HandshakeFailed as failed:
        accepted.handshake_failed(failed)
        return
    assert isinstance(request, ConnectRequest | ForwardRequest)

    async def refuse(reply: bytes, reason: EndReason, detail: str) -> None:
        accepted.reject(reason, detail, request.address, reply=reply)
        await close_after_reply(stream, reply)

    decision = accepted.settings.policy.check_destination(request.host, request.port)
    if not decision:
        await refuse(handshake.reply_denied(decision.reason), EndReason.REJECTED, decision.reason)
        return
    problem = accepted.capacity_problem()
    if problem is not None:
        reply = AT_CAPACITY if accepted.engine.at_capacity() else TOO_MANY_FROM_CLIENT
        await refuse(reply, EndReason.REJECTED, problem)
        return
    try:
        outgoing, source = await open_upstream(
            accepted.engine, accepted.settings.policy, request.address
        )
    except DestinationDenied as exc:
        await refuse(handshake.reply_denied(str(exc)), EndReason.REJECTED, str(exc))
        return
    except ConnectError as exc:
        await refuse(
            handshake.reply_failure(failure_cause(exc)), EndReason.CONNECT_FAILED, str(exc)
        )
        return
    if isinstance(request, ConnectRequest):
        reply, prefix = handshake.reply_success(), handshake.take_leftover()
    else:
        reply, prefix = b"", request.head + handshake.take_leftover()
    await accepted.grant(
        stream, reply, outgoing, request.address, client_prefix=prefix, source=source
    )

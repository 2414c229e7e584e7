"""The shared driver of explicit handshakes: read under a deadline, answer, or refuse and close.

Every explicit protocol (SOCKS4/4a/5, HTTP) is a sans-io handshake object
from :mod:`tproxy.protocols`; this module does the I/O around it the same
way for all of them:

- client bytes are read and fed to the handshake until it yields its
  request; :class:`~tproxy.protocols.Reply` events are sent at once;
- the whole handshake must end before a deadline (``--handshake-timeout``)
  and within the protocol's maximum size (``--max-handshake``, enforced by
  the handshake object itself), so a client that trickles or floods is
  answered with the protocol's error and closed;
- on a :class:`~tproxy.protocols.ProtocolError` its ``reply`` is sent,
  then the connection is closed so that the client can read that reply.

A failure is raised as :class:`HandshakeFailed` *after* the client was
answered and the stream closed; callers only log it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Protocol

import trio

from ..flow import EndReason
from ..protocols import ProtocolError, Reply

log = logging.getLogger("tproxy.explicit")

READ_SIZE = 64 * 1024
"""Bytes read per receive during a handshake; the handshake objects bound what they keep."""
REPLY_GRACE = 1.0
"""Hang guard for delivering a final reply to a client that does not read it."""
DRAIN_READS = 64
"""At most this many reads of what a refused client still sends, before closing."""

_STREAM_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


class SansIoHandshake(Protocol):
    """What the driver needs of a handshake object (see ``tproxy.protocols.base``)."""

    @property
    def complete(self) -> bool: ...

    @property
    def request(self) -> object: ...

    def receive_data(self, data: bytes) -> list[object]: ...


class HandshakeFailed(Exception):
    """The handshake ended without a request; the client was answered and closed.

    ``reason`` is the flow record's end reason, ``detail`` says why.
    ``silent`` says the client closed without sending a byte (a port probe,
    a health check): not worth a flow record. ``reply`` is what the client
    was answered with before the close (``b""``: nothing).
    """

    def __init__(self, reason: EndReason, detail: str, *, silent: bool = False) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
        self.silent = silent
        self.reply = b""


async def drive_handshake(
    stream: trio.abc.Stream,
    handshake: SansIoHandshake,
    *,
    deadline: float,
    timeout_reply: Callable[[list[bytes]], bytes],
) -> object:
    """Run ``handshake`` over ``stream`` until its request; return the request.

    ``deadline`` is a ``trio.current_time()`` value. ``timeout_reply(sent)``
    builds what to answer when the deadline passes, given the replies sent
    so far (the protocol's state as the client sees it). Raises
    :class:`HandshakeFailed` once the client was answered and the stream
    closed.
    """
    sent: list[bytes] = []
    received = 0
    failure: HandshakeFailed | None = None
    reply = b""
    with trio.CancelScope(deadline=deadline) as scope:
        try:
            while not handshake.complete:
                data = await stream.receive_some(READ_SIZE)
                if not data:
                    failure = HandshakeFailed(
                        EndReason.EOF,
                        "client closed the connection during the handshake",
                        silent=received == 0,
                    )
                    break
                received += len(data)
                try:
                    events = handshake.receive_data(bytes(data))
                except ProtocolError as error:
                    failure = HandshakeFailed(EndReason.REJECTED, f"handshake: {error.reason}")
                    reply = error.reply
                    break
                for event in events:
                    if isinstance(event, Reply):
                        await stream.send_all(event.data)
                        sent.append(event.data)
        except _STREAM_ERRORS as exc:
            failure = HandshakeFailed(EndReason.RESET, f"client connection failed: {exc!r}")
    if scope.cancelled_caught:
        failure = HandshakeFailed(EndReason.TIMEOUT, "handshake timed out")
        reply = timeout_reply(sent)
    if failure is not None:
        if failure.reason is EndReason.RESET:
            await trio.aclose_forcefully(stream)
        else:
            await close_after_reply(stream, reply)
            failure.reply = reply
        raise failure
    return handshake.request


async def close_after_reply(stream: trio.abc.Stream, reply: bytes) -> None:
    """Send a final reply, then close so that the client gets to read it.

    Closing a socket with unread input sends a reset, which can destroy the
    reply before the client reads it; so the write side is shut first and
    what the client still sends is read and dropped (bounded), then the
    stream is closed. A client that does not cooperate is cut off after
    :data:`REPLY_GRACE` seconds.
    """
    with trio.move_on_after(REPLY_GRACE):
        try:
            if reply:
                await stream.send_all(reply)
            send_eof = getattr(stream, "send_eof", None)
            if send_eof is not None:
                await send_eof()
                for _ in range(DRAIN_READS):
                    if not await stream.receive_some(READ_SIZE):
                        break
            await stream.aclose()
            return
        except (*_STREAM_ERRORS, trio.BusyResourceError):
            pass
    await trio.aclose_forcefully(stream)


async def send_reply(stream: trio.abc.Stream, reply: bytes) -> bool:
    """Send a success reply before relaying; ``False`` (stream closed) if the client is gone."""
    try:
        with trio.fail_after(REPLY_GRACE * 10):
            await stream.send_all(reply)
        return True
    except (*_STREAM_ERRORS, trio.TooSlowError):
        await trio.aclose_forcefully(stream)
        return False

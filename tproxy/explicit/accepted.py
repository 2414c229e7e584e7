"""One connection accepted by an explicit listener, and what every front door does first.

:func:`serve_accepted` is the common prologue of the forward, SOCKS and
HTTP front doors: learn the client's address, close clients outside the
``--allow-client`` networks at once (a reset, before any handshake: a
stranger learns nothing, not even the protocol), count the connection
against the per-client cap from its request on (see :mod:`.limits`),
for as long as it is open, and hand an :class:`Accepted` to the protocol's
own code.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio

from ..engine import Engine
from ..flow import Address, EndReason, FlowInfo
from ..protocols import reply_code
from ..sockets import reset_stream
from .handshake import HandshakeFailed, send_reply
from .settings import ExplicitSettings

log = logging.getLogger("tproxy.explicit")

UNKNOWN_DESTINATION: Address = ("-", 0)
"""The destination logged for a connection refused before it named one."""
_TOO_MANY_FLOWS = "too many flows (--max-flows)"


@dataclass
class Accepted:
    """An accepted client connection of one explicit listener."""

    engine: Engine
    settings: ExplicitSettings
    mode: str
    stream: trio.SocketStream
    client: Address
    holds_slot: bool = False
    """Whether this connection counts against ``--max-flows-per-client`` (until it closes)."""
    started: float = field(default_factory=time.monotonic)
    """When the connection was accepted: a refused flow's record lasts from here."""

    def flow(self, destination: Address, mode: str | None = None) -> FlowInfo:
        """A new flow of this connection toward ``destination``."""
        return self.engine.new_flow(self.client, destination, mode or self.mode)

    def reject(
        self,
        reason: EndReason,
        detail: str,
        destination: Address = UNKNOWN_DESTINATION,
        *,
        reply: bytes = b"",
    ) -> None:
        """Log a flow that ended before it was relayed (its duration: since the accept);
        ``reply`` is the protocol's refusal the client gets (its code goes to metrics)."""
        self.engine.reject(
            self.flow(destination),
            reason,
            detail,
            started=self.started,
            reply_code=reply_code(reply),
        )

    async def grant(
        self,
        stream: trio.abc.Stream,
        reply: bytes,
        outgoing: trio.SocketStream,
        destination: Address,
        *,
        client_prefix: bytes = b"",
        source: Address | None = None,
        gone: str = "client went away before the reply",
    ) -> None:
        """Send the success reply on ``stream`` (the client's, maybe TLS), then relay.

        If the client left before the reply, the outgoing flow is reset and logged.
        """
        try:
            ok = await send_reply(stream, reply)
        except BaseException:
            with trio.CancelScope(shield=True):
                await reset_stream(outgoing)
            raise
        if not ok:
            await reset_stream(outgoing)
            self.reject(EndReason.RESET, gone, destination)
            return
        await self.engine.relay(
            stream,
            outgoing,
            self.flow(destination),
            client_prefix=client_prefix,
            source=source,
        )

    def handshake_failed(self, failed: HandshakeFailed) -> None:
        """Log a connection whose handshake failed (a bare connect-and-close only at debug)."""
        if failed.silent:
            log.debug("client %s closed without a request", self.client)
        else:
            self.reject(failed.reason, failed.detail, reply=failed.reply)

    def capacity_problem(self) -> str | None:
        """Why a new flow may not start now (a cap reached), or ``None``.

        When there is none, this connection takes one of its client's slots,
        which :func:`serve_accepted` gives back when the connection ends.
        """
        if self.holds_slot:
            return _TOO_MANY_FLOWS if self.engine.at_capacity() else None
        problem = take_slot(self.engine, self.settings, self.client[0])
        self.holds_slot = problem is None
        return problem


def take_slot(engine: Engine, settings: ExplicitSettings, client_ip: str) -> str | None:
    """Why a new flow of ``client_ip`` may not start now (a cap reached), or ``None``.

    ``None`` means it may, and then it holds one of the client's slots, to
    give back with ``settings.slots.release`` when the connection ends.
    """
    if engine.at_capacity():
        return _TOO_MANY_FLOWS
    if not settings.slots.acquire(client_ip):
        return f"client has {settings.slots.limit} flow(s) open already (--max-flows-per-client)"
    return None


def refuse_stranger(engine: Engine, settings: ExplicitSettings, client: Address, mode: str) -> bool:
    """Log and return ``True`` for a client outside ``--allow-client`` (the caller resets it)."""
    if settings.policy.check_client(client[0]):
        return False
    engine.reject(
        engine.new_flow(client, UNKNOWN_DESTINATION, mode),
        EndReason.REJECTED,
        "client not in --allow-client",
    )
    return True


Body = Callable[[Accepted], Awaitable[None]]


async def serve_accepted(
    stream: trio.SocketStream,
    engine: Engine,
    settings: ExplicitSettings,
    mode: str,
    body: Body,
) -> None:
    """Check the client, hold its slot, and run ``body`` for this connection."""
    try:
        peer = stream.socket.getpeername()
    except OSError as exc:
        log.debug("connection vanished before it was served: %s", exc)
        await reset_stream(stream)
        return
    client: Address = (peer[0], peer[1])
    if refuse_stranger(engine, settings, client, mode):
        await reset_stream(stream)
        return
    accepted = Accepted(engine, settings, mode, stream, client)
    try:
        await body(accepted)
    except BaseException:
        with trio.CancelScope(shield=True):
            await reset_stream(stream)
        raise
    finally:
        if accepted.holds_slot:
            settings.slots.release(client[0])

"""``forward:HOST:PORT``: every accepted connection is relayed to one fixed target.

There is no handshake: the flow starts as soon as the target is connected.
HOST may be a name; it is resolved for every connection (so a changed DNS
answer is followed) and its addresses are tried in turn. The target is the
operator's choice, so the destination rules (``--allow-host`` ...) do not
apply; the client allow list and the flow caps do. A connection that cannot
be served (cap reached, target unreachable) is reset at once, as in
transparent mode: a silent close would look like an empty answer.

A target given as an IP address is served by
:func:`forward_in_hub` without a task: the accept loop hands each socket to
the splice hub, which connects and relays it (the same checks, records and
resets; only the per-flow cost of a trio task and stream is gone).
"""

from __future__ import annotations

import functools
import logging
import socket
from collections.abc import Callable

import trio

from ..engine import Engine
from ..flow import Address, EndReason
from ..protocols import Policy
from ..sockets import ConnectError, outgoing_socket, reset_socket, reset_stream
from .accepted import Accepted, refuse_stranger, take_slot
from .settings import ExplicitSettings
from .upstream import DestinationDenied, is_ip_literal, open_upstream

log = logging.getLogger("tproxy.explicit")

_ANYWHERE = Policy()


async def serve_forward(accepted: Accepted, target: Address) -> None:
    """Relay one accepted connection to ``target``."""
    stream = accepted.stream
    problem = accepted.capacity_problem()
    if problem is not None:
        accepted.reject(EndReason.REJECTED, problem, target)
        await reset_stream(stream)
        return
    try:
        outgoing, source = await open_upstream(accepted.engine, _ANYWHERE, target)
    except (ConnectError, DestinationDenied) as exc:
        accepted.reject(EndReason.CONNECT_FAILED, str(exc), target)
        await reset_stream(stream)
        return
    except BaseException:
        with trio.CancelScope(shield=True):
            await reset_stream(stream)
        raise
    await accepted.engine.relay(stream, outgoing, accepted.flow(target), source=source)


def forward_in_hub(
    engine: Engine, settings: ExplicitSettings, target: Address
) -> Callable[[socket.socket], None] | None:
    """The synchronous front door of a forward listener, where the hub can serve it whole.

    ``None`` where it cannot: no hub (``EngineConfig(hub=False)``), or
    a target name, which needs an asynchronous lookup per connection.
    """
    hub = engine.hub
    if hub is None or not is_ip_literal(target[0]):
        return None
    config = engine.config
    outgoing = functools.partial(outgoing_socket, target, None, config.source_policy, config.mark)

    def serve(incoming: socket.socket) -> None:
        """What :func:`serve_accepted` and :func:`serve_forward` do, in one call."""
        try:
            peer = incoming.getpeername()
        except OSError as exc:
            log.debug("connection vanished before it was served: %s", exc)
            reset_socket(incoming)
            return
        client: Address = (peer[0], peer[1])
        if refuse_stranger(engine, settings, client, "forward"):
            reset_socket(incoming)
            return
        info = engine.new_flow(client, target, "forward")
        problem = take_slot(engine, settings, client[0])
        if problem is not None:
            engine.reject(info, EndReason.REJECTED, problem)
            reset_socket(incoming)
            return
        release = functools.partial(settings.slots.release, client[0])
        hub.connect(incoming, info, outgoing, release)

    return serve

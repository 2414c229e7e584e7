"""``forward:HOST:PORT``: every accepted connection is relayed to one fixed target.

There is no handshake: the flow starts as soon as the target is connected.
HOST may be a name; it is resolved for every connection (so a changed DNS
answer is followed) and its addresses are tried in turn. The target is the
operator's choice, so the destination rules (``--allow-host`` ...) do not
apply; the client allow list and the flow caps do. A connection that cannot
be served (cap reached, target unreachable) is reset at once, as in
transparent mode: a silent close would look like an empty answer.
"""

from __future__ import annotations

import trio

from ..flow import Address, EndReason
from ..protocols import Policy
from ..sockets import ConnectError, reset_stream
from .accepted import Accepted
from .upstream import DestinationDenied, open_upstream

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

"""A cap on the flows one client may have open at once, over all explicit listeners.

A client's connection takes a slot when its request is complete (at once
in forward mode, which has no handshake) and keeps it until the
connection is closed: a slow handshake is bounded by the handshake timeout
instead, and a port probe that never asks for anything takes no slot.
"""

from __future__ import annotations


class ClientSlots:
    """Counts open flows per client IP; ``limit=None`` means no cap."""

    def __init__(self, limit: int | None) -> None:
        if limit is not None and limit < 1:
            raise ValueError("the per-client limit must be at least 1")
        self.limit = limit
        self.open: dict[str, int] = {}

    def acquire(self, client_ip: str) -> bool:
        """Take a slot for ``client_ip``; ``False`` (nothing taken) when it has ``limit``."""
        count = self.open.get(client_ip, 0)
        if self.limit is not None and count >= self.limit:
            return False
        self.open[client_ip] = count + 1
        return True

    def release(self, client_ip: str) -> None:
        """Give back a slot taken with :meth:`acquire`."""
        left = self.open[client_ip] - 1
        if left:
            self.open[client_ip] = left
        else:
            del self.open[client_ip]

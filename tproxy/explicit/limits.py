"""A cap on the connections one client may hold open at once, over all explicit listeners.

A connection counts from the moment it is accepted (its handshake
included) until it is closed, so a client cannot get around the cap by
holding many half-finished handshakes open. Whether the cap is exceeded is
decided when the connection is accepted, but answered once the handshake
tells which protocol's error to send.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


class ClientSlots:
    """Counts open connections per client IP; ``limit=None`` means no cap."""

    def __init__(self, limit: int | None) -> None:
        if limit is not None and limit < 1:
            raise ValueError("the per-client limit must be at least 1")
        self.limit = limit
        self.open: dict[str, int] = {}

    @contextmanager
    def hold(self, client_ip: str) -> Iterator[bool]:
        """Count one connection of ``client_ip`` while inside; yield whether it is over the cap."""
        count = self.open.get(client_ip, 0) + 1
        self.open[client_ip] = count
        try:
            yield self.limit is not None and count > self.limit
        finally:
            left = self.open[client_ip] - 1
            if left:
                self.open[client_ip] = left
            else:
                del self.open[client_ip]

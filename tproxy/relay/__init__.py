"""The relay: one sans-io flow core (:mod:`.core`) and the shells that drive it.

The flow rules (half-close, resets, backpressure, timeouts, counters, abort
with a reply, shutdown) live once, in :class:`~tproxy.relay.core.FlowCore`.
Two shells turn I/O into its events and carry out its actions: the epoll hub
(:mod:`tproxy.hub`) for every flow with a socket, and a thin trio-stream shell
(:mod:`tproxy.relay.streams`) for streams without a descriptor (TLS, memory).
See docs/architecture.md.
"""

from .core import (
    CLIENT,
    SERVER,
    End,
    FlowCore,
    FlowTap,
    Reset,
    Send,
    ShutdownWrite,
)

__all__ = [
    "CLIENT",
    "SERVER",
    "End",
    "FlowCore",
    "FlowTap",
    "Reset",
    "Send",
    "ShutdownWrite",
]

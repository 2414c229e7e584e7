"""Zero-copy relay with ``splice(2)``: socket -> pipe -> socket, the bytes never reach Python.

A direction of a flow pair whose bytes nobody needs to see (no interceptor,
or every interceptor asked for passthrough, and no tap) does not have to
copy them through user space. ``os.splice`` moves page references from the
source socket's receive queue into a pipe and from the pipe into the
destination socket's send queue; on this kind of machine that relays about
twice as fast as a ``recv``/``send`` loop at about a quarter of the CPU per
byte (docs/benchmarks.md).

The splicing itself is the hub's (:mod:`tproxy.hub`), which asks the flow
core (:mod:`tproxy.relay.core`) whether a direction may be spliced; this
module holds what it needs: whether splice works here at all
(:func:`splice_available`), urgent data that splice cannot step past
(:func:`at_urgent_mark`), and the pool that lends pipes to a direction only
while it has bytes to move (:class:`PipePool`, :data:`pipes`), so idle flows
hold no pipe.
"""

from __future__ import annotations

import fcntl
import functools
import os
import socket
import struct
from collections.abc import Callable

DEFAULT_CHUNK = 256 * 1024
"""Bytes moved per splice call, and the size asked for each pipe."""

F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)

SPLICE: Callable[..., int] | None = getattr(os, "splice", None)
"""``os.splice``, or ``None`` where this Python lacks it."""
SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)
"""Move pages where possible; never block (the hub waits with epoll)."""


@functools.cache
def splice_available() -> bool:
    """Whether ``os.splice`` works between a socket and a pipe here (checked once).

    Python builds without ``os.splice`` and sandboxes whose kernels lack it
    for sockets (ENOSYS, EINVAL) make the engine use the copy path.
    """
    if SPLICE is None:
        return False
    try:
        a, b = socket.socketpair()
    except OSError:
        return False
    try:
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            a.sendall(b"x")
            b.setblocking(False)
            if SPLICE(b.fileno(), w, 1, flags=SPLICE_FLAGS) != 1:
                return False
            a.setblocking(False)
            return SPLICE(r, a.fileno(), 1, flags=SPLICE_FLAGS) == 1
        finally:
            os.close(r)
            os.close(w)
    except OSError:
        return False
    finally:
        a.close()
        b.close()


_SIOCATMARK = 0x8905


def at_urgent_mark(sock: socket.socket) -> bool:
    """Whether the next byte to read is TCP urgent data (``MSG_OOB``).

    splice(2) from a TCP socket stops in front of urgent data for good: it
    returns EAGAIN (or 0 once the FIN is in) while poll says readable. A
    ``recv`` steps past it, as the copy path does, so whoever splices asks
    here when a read that was promised data brings none.
    """
    try:
        mark = fcntl.ioctl(sock.fileno(), _SIOCATMARK, b"\0\0\0\0")
    except OSError:
        return False
    value: int = struct.unpack("i", mark)[0]
    return value != 0


def _open_pipe(size: int) -> tuple[int, int]:
    """A non-blocking pipe, enlarged to ``size`` when the kernel allows (fewer splices)."""
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        fcntl.fcntl(w, F_SETPIPE_SZ, size)
    except OSError:
        pass  # above /proc/sys/fs/pipe-max-size without CAP_SYS_RESOURCE: keep 64 KiB
    return r, w


IDLE_PIPES = 64
"""Empty pipes kept for reuse, per pipe size (two descriptors each)."""


class PipePool:
    """Empty pipes, lent to a direction only while it has bytes to move.

    A direction that waits for its source gives its (empty) pipe back, so an
    idle flow holds no pipe: 10,000 idle flows cost 20,000 socket descriptors,
    not 60,000, and no pipe buffers. Taking and giving back are list
    operations; a pipe is created only when none is idle, and at most
    :data:`IDLE_PIPES` idle ones are kept. Only empty pipes come back: one
    that may hold bytes (an error or a cancellation mid-way) is closed.
    """

    def __init__(self) -> None:
        self.idle: dict[int, list[tuple[int, int]]] = {}

    def take(self, size: int) -> tuple[int, int]:
        """An empty pipe of ``size`` bytes (a reused one if any); OSError when out of fds."""
        idle = self.idle.get(size)
        if idle:
            return idle.pop()
        return _open_pipe(size)

    def give(self, pipe: tuple[int, int], size: int) -> None:
        """Give back an *empty* pipe taken with ``size``, for reuse."""
        idle = self.idle.setdefault(size, [])
        if len(idle) < IDLE_PIPES:
            idle.append(pipe)
        else:
            self.discard(pipe)

    @staticmethod
    def discard(pipe: tuple[int, int]) -> None:
        """Close a pipe that may still hold bytes (of a flow being reset): never reused."""
        os.close(pipe[0])
        os.close(pipe[1])

    def close_idle(self) -> None:
        """Close every pipe kept for reuse."""
        for idle in self.idle.values():
            while idle:
                self.discard(idle.pop())

    def idle_fds(self) -> set[int]:
        """The descriptors of the pipes kept for reuse (tests counting descriptors)."""
        return {fd for idle in self.idle.values() for pipe in idle for fd in pipe}


pipes = PipePool()
"""The process's pipe pool (the hub takes and gives back pipes here)."""


def close_idle_pipes() -> None:
    """Close the pipes kept for reuse (tests counting descriptors; after a fork)."""
    pipes.close_idle()

"""Zero-copy relay with ``splice(2)``: socket -> pipe -> socket, the bytes never reach Python.

A flow pair whose bytes nobody needs to see (no interceptor, or every
interceptor asked for passthrough) does not have to copy them through
user space. ``os.splice`` moves page references from the source socket's
receive queue into a pipe and from the pipe into the destination socket's
send queue; on this kind of machine that relays about twice as fast as a
``recv``/``send`` loop at about a quarter of the CPU per byte (DESIGN.md).

The semantics are the copy path's (:mod:`tproxy.pair`), so a pump can swap
one for the other at a clean point:

- *Byte counters*: ``count(n)`` is called for every ``n`` bytes taken from
  the source, as the copy loop counts what it received.
- *Half-close*: :func:`splice_one_way` returns at end of stream once every
  byte taken from the source has been written (a pipe never ends holding
  data); the caller sends end of stream (:class:`~tproxy.pair.FlowPair`
  runs one direction per pump and half-closes each as it ends).
- *Reset*: a reset, a broken pipe or any other socket error raises
  ``trio.BrokenResourceError`` (``ClosedResourceError`` for a closed
  socket), as ``receive_some``/``send_all`` do, so the caller resets both
  ends.
- *Backpressure*: one pipe per direction is the only buffer. Nothing is
  taken from the source while the pipe holds bytes not yet written, so a
  flow never holds more than one pipe's worth per direction.
- *Cancellation*: a pipe that may hold bytes is closed in ``finally``; what
  it held is lost, which is right, since a cancelled pair is reset.

Pipes are lent from a small per-process pool only while a direction has
bytes to move, so idle flows hold no pipe (see :class:`_PipePool`).

Everything is non-blocking: a splice that would block (``EAGAIN``, on the
socket or the pipe) waits with ``trio.lowlevel.wait_readable`` /
``wait_writable`` on the socket, and a loop that never blocks still passes
a checkpoint every chunk so it can be cancelled and does not starve other
flows.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import os
import socket
import struct
from collections.abc import Callable

import trio

DEFAULT_CHUNK = 256 * 1024
"""Bytes moved per splice call, and the size asked for each pipe."""

F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)

_SPLICE = getattr(os, "splice", None)
_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)
_WOULD_BLOCK = (errno.EAGAIN, errno.EWOULDBLOCK)


@functools.cache
def splice_available() -> bool:
    """Whether ``os.splice`` works between a socket and a pipe here (checked once).

    Python builds without ``os.splice`` and sandboxes whose kernels lack it
    for sockets (ENOSYS, EINVAL) make the engine use the copy path.
    """
    if _SPLICE is None:
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
            if _SPLICE(b.fileno(), w, 1, flags=_FLAGS) != 1:
                return False
            a.setblocking(False)
            return _SPLICE(r, a.fileno(), 1, flags=_FLAGS) == 1
        finally:
            os.close(r)
            os.close(w)
    except OSError:
        return False
    finally:
        a.close()
        b.close()


_SIOCATMARK = 0x8905


def at_urgent_mark(sock: socket.socket | trio.socket.SocketType) -> bool:
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
    return struct.unpack("i", mark)[0] != 0


def can_splice(stream: trio.abc.Stream) -> bool:
    """Whether ``stream`` is a plain socket stream (not TLS, not in memory) and splice works."""
    return isinstance(stream, trio.SocketStream) and splice_available()


def _stream_error(exc: OSError, what: str) -> trio.BrokenResourceError | trio.ClosedResourceError:
    """The stream error trio's own ``SocketStream`` raises for this socket error."""
    if exc.errno == errno.EBADF:
        return trio.ClosedResourceError(f"{what} socket was already closed")
    return trio.BrokenResourceError(f"socket connection broken: {exc}")


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


class _PipePool:
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
        idle = self.idle.get(size)
        if idle:
            return idle.pop()
        return _open_pipe(size)

    def give(self, pipe: tuple[int, int], size: int) -> None:
        idle = self.idle.setdefault(size, [])
        if len(idle) < IDLE_PIPES:
            idle.append(pipe)
        else:
            _close_pipe(pipe)

    def close_idle(self) -> None:
        for idle in self.idle.values():
            while idle:
                _close_pipe(idle.pop())


def _close_pipe(pipe: tuple[int, int]) -> None:
    os.close(pipe[0])
    os.close(pipe[1])


_pipes = _PipePool()


def close_idle_pipes() -> None:
    """Close the pipes kept for reuse (tests counting descriptors; after a fork)."""
    _pipes.close_idle()


async def splice_one_way(
    src: trio.SocketStream,
    dst: trio.SocketStream,
    count: Callable[[int], None],
    *,
    chunk: int = DEFAULT_CHUNK,
    write_lock: trio.Lock | None = None,
    wrote: Callable[[], None] | None = None,
) -> None:
    """Move bytes from ``src`` to ``dst`` until ``src`` ends; ``dst`` is left open.

    Returns after end of stream on ``src`` once everything read has been
    written to ``dst`` (the caller then calls ``dst.send_eof()``). Raises
    ``trio.BrokenResourceError`` on a reset or broken pipe on either socket.
    ``count(n)`` is called as ``n`` bytes are taken from ``src``.
    ``write_lock``, if given, is held while bytes are written to ``dst``,
    never while ``src`` is idle, so another writer (an injection still in
    flight) can always finish. ``wrote()`` is called when a slow ``dst``
    takes bytes again: progress, for idle timeouts.
    """
    if chunk <= 0:
        raise ValueError("chunk must be positive")
    if _SPLICE is None:
        raise RuntimeError("os.splice is not available")
    splice = _SPLICE
    flags = _FLAGS
    src_sock = src.socket
    dst_sock = dst.socket
    wait_readable = trio.lowlevel.wait_readable
    wait_writable = trio.lowlevel.wait_writable
    checkpoint = trio.lowlevel.checkpoint
    await trio.lowlevel.checkpoint_if_cancelled()
    pool = _pipes
    pipe: tuple[int, int] | None = None
    held = 0  # bytes in the pipe
    small = chunk // 4
    wait_first = False
    waited = False  # poll said readable since the last splice from src
    try:
        src_fd = src_sock.fileno()
        dst_fd = dst_sock.fileno()
        while True:
            if wait_first:
                # The last read was a small message (request/response traffic): the source
                # is most likely empty now, so wait before trying, sparing a failed splice
                # and its exception per message. Bulk transfers keep reading at once.
                if pipe is not None:
                    pool.give(pipe, chunk)
                    pipe = None
                await wait_readable(src_sock)
                waited = True
            if pipe is None:
                try:
                    pipe = pool.take(chunk)
                except OSError as exc:
                    if exc.errno not in (errno.EMFILE, errno.ENFILE):
                        raise
                    # Out of descriptors, a passing state: this chunk goes through
                    # user space rather than killing a healthy flow.
                    if not await _copy_chunk(src, dst, count, chunk, write_lock):
                        return
                    continue
            # Fill: the pipe is empty here, so EAGAIN can only mean "src has nothing yet".
            # (Waits happen outside the except blocks: awaiting inside one would keep the
            # exception and its traceback alive for as long as the flow is idle.)
            try:
                held = splice(src_fd, pipe[1], chunk, flags=flags)
            except BlockingIOError:
                held = -1
            except OSError as exc:
                raise _stream_error(exc, "source") from exc
            if held <= 0 and (waited or held == 0) and at_urgent_mark(src_sock):
                # Not idle, not the end: urgent data that only recv() gets past.
                held = 0
                waited = False
                if not await _copy_chunk(src, dst, count, chunk, write_lock):
                    return
                continue
            waited = False
            if held < 0:
                held = 0
                pool.give(pipe, chunk)  # an idle direction holds no pipe
                pipe = None
                await wait_readable(src_sock)
                waited = True
                continue
            if held == 0:
                return  # end of stream, and the pipe is empty
            count(held)
            wait_first = held < small
            # Drain: write all of it before reading more (the pipe is the only buffer).
            if write_lock is not None:
                try:
                    write_lock.acquire_nowait()  # the usual case: no extra schedule point
                except trio.WouldBlock:
                    await write_lock.acquire()
            try:
                while held:
                    try:
                        held -= splice(pipe[0], dst_fd, held, flags=flags)
                        continue
                    except BlockingIOError:
                        pass
                    except OSError as exc:
                        raise _stream_error(exc, "destination") from exc
                    await wait_writable(dst_sock)
                    if wrote is not None:
                        wrote()
            finally:
                if write_lock is not None:
                    write_lock.release()
            if not wait_first:
                await checkpoint()  # (waiting for readable is one)
    finally:
        if pipe is not None:
            if held:
                _close_pipe(pipe)  # bytes of a flow that is being reset: never reuse
            else:
                pool.give(pipe, chunk)


async def _copy_chunk(
    src: trio.SocketStream,
    dst: trio.SocketStream,
    count: Callable[[int], None],
    chunk: int,
    write_lock: trio.Lock | None,
) -> bool:
    """Relay one chunk through user space; False at end of stream."""
    data = await src.receive_some(chunk)
    if not data:
        return False
    count(len(data))
    if write_lock is None:
        await dst.send_all(data)
    else:
        async with write_lock:
            await dst.send_all(data)
    return True


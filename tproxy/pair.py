"""A flow pair at run time: two pumps between the incoming and outgoing stream.

One pump carries client bytes to the server, the other server bytes to the
client; each passes them through the flow's interceptor chain. The rules the
pumps keep:

- *Half-close*: end of stream on one side is flushed through the chain and
  becomes ``send_eof()`` (``shutdown(SHUT_WR)``) on the other; the pair ends
  cleanly when both directions have ended.
- *Reset*: a reset or broken pipe on either side, an interceptor abort or an
  interceptor error ends the pair at once and both ends are reset (RST), so
  no peer mistakes a failure for a complete reply.
- *Backpressure*: a pump reads at most ``read_size`` bytes and does not read
  again until they were sent, so memory per pair is bounded whatever the
  peers do.

Streams are any ``trio.abc.Stream``; ``send_eof`` is used when the stream has
it (sockets do, TLS streams do not: there end of stream closes the pair).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from .flow import EndReason, FlowRecord
from .interceptor import AbortFlow, Chain, InterceptorError, Output
from .sockets import reset_stream
from .splice import can_splice, splice_one_way

log = logging.getLogger("tproxy.flow")

DEFAULT_READ_SIZE = 256 * 1024
_SEND_SLICE = 64 * 1024
_SMALL_READ = 64 * 1024


class _Side:
    """One end of the pair: its stream, a write lock, and whether writing ended."""

    __slots__ = ("_lock", "fd", "name", "partial", "sock", "stream", "wait_first", "write_closed")

    def __init__(self, name: str, stream: trio.abc.Stream) -> None:
        self.name = name
        self.stream = stream
        self._lock: trio.Lock | None = None
        self.write_closed = False
        self.partial = False
        """A write is under way; if it is cut, the byte stream to this side is cut."""
        self.sock: trio.socket.SocketType | None = None
        self.wait_first = False
        """The last read was a small message: the socket is most likely empty now."""
        self.fd = -1
        """A plain socket's descriptor: the copy path reads and writes it directly."""
        if type(stream) is trio.SocketStream:
            self.sock = stream.socket
            self.fd = stream.socket.fileno()

    async def receive(self, max_bytes: int) -> bytes:
        """Up to ``max_bytes`` (b"" at end of stream), passing exactly one schedule point.

        For a plain socket this is ``read(2)`` on the descriptor, waiting for
        readability only when nothing is there: trio's ``receive_some`` passes
        two schedule points per call and a context manager per call, which is
        most of the copy path's cost per chunk (docs/benchmarks.md). Socket
        errors stay ``OSError``, which the pair reads as a reset.
        """
        fd = self.fd
        if fd < 0:
            return await self.stream.receive_some(max_bytes)
        if not self.wait_first:
            await trio.lowlevel.checkpoint_if_cancelled()
            try:
                data = os.read(fd, max_bytes)
            except BlockingIOError:
                pass
            else:
                # Fair to other flows; not cancellable, as trio's own: what was read is kept.
                await trio.lowlevel.cancel_shielded_checkpoint()
                self.wait_first = len(data) < max_bytes // 4
                return data
        # After a small message (request/response traffic) wait before reading: a read
        # that finds nothing costs a system call and an exception per message. And
        # read at most _SMALL_READ then: os.read allocates all it may return, and a
        # megabyte per 32-byte reply costs more than the reply (docs/benchmarks.md).
        size = min(max_bytes, _SMALL_READ) if self.wait_first else max_bytes
        while True:
            await trio.lowlevel.wait_readable(self.sock)
            try:
                data = os.read(fd, size)
            except BlockingIOError:
                continue  # woken without data; wait again
            self.wait_first = len(data) < size // 4
            return data

    async def send_all(self, data: bytes | memoryview, progress: Callable[[], None]) -> None:
        """Write all of ``data``; ``progress()`` after each partial write (idle timeouts).

        A plain socket is written with ``write(2)``, waiting for room only
        when the kernel takes less than everything. A write that completes
        at once passes no schedule point: the pump's read just passed one.
        """
        fd = self.fd
        if fd < 0:
            await self.stream.send_all(data)
            return
        await trio.lowlevel.checkpoint_if_cancelled()
        view = memoryview(data)
        total = len(view)
        sent = 0
        while True:
            try:
                sent += os.write(fd, view[sent:] if sent else view)
            except BlockingIOError:
                pass
            if sent >= total:
                return
            await trio.lowlevel.wait_writable(self.sock)
            progress()

    @property
    def lock(self) -> trio.Lock:
        """Made on first use: a pair without interceptors never needs one (about 1 KiB)."""
        if self._lock is None:
            self._lock = trio.Lock()
        return self._lock


class FlowPair:
    """Relays one incoming and one outgoing stream through a chain until both end.

    :meth:`run` returns when the pair is over and both streams are closed;
    it records how it ended in ``record`` and never raises for the flow's own
    failures (only ``trio.Cancelled`` passes, after both ends were reset).
    """

    def __init__(
        self,
        incoming: trio.abc.Stream,
        outgoing: trio.abc.Stream,
        record: FlowRecord,
        chain: Chain | None = None,
        *,
        read_size: int = DEFAULT_READ_SIZE,
        idle_timeout: float | None = None,
        splice: bool = True,
    ) -> None:
        if read_size <= 0:
            raise ValueError("read_size must be positive")
        self.client = _Side("client", incoming)
        self.server = _Side("server", outgoing)
        self.record = record
        # A chain-like without interceptors (the TLS layer) is driven too.
        self.chain = chain if chain is not None and getattr(chain, "interceptors", True) else None
        self.read_size = read_size
        self.idle_timeout = idle_timeout
        self._last_activity = 0.0
        self._abort_reply = b""
        self.splice = splice and can_splice(incoming) and can_splice(outgoing)
        """Whether directions nobody intercepts go zero-copy (both ends plain sockets)."""

    async def run(self, *, client_prefix: bytes = b"") -> FlowRecord:
        """Relay until both directions end; close or reset both streams."""
        graceful = False
        self._last_activity = trio.current_time()
        try:
            await self._relay(client_prefix)
            graceful = self.record.reason is None
            if graceful:
                self.record.end(EndReason.EOF, now=time.monotonic())
        except BaseException as exc:
            if is_cancellation(exc):
                self.record.end(EndReason.SHUTDOWN, "cancelled", now=time.monotonic())
            else:
                self.record.end(EndReason.ERROR, repr(exc), now=time.monotonic())
            raise
        finally:
            with trio.CancelScope(shield=True):
                if graceful:
                    await _close_politely(self.client.stream)
                    if self.server.partial:
                        # The client could not be half-closed (TLS), so the end
                        # of the reply ended the pair mid-upload: a FIN would
                        # pass the cut request off as complete.
                        await reset_stream(self.server.stream)
                    else:
                        await _close_politely(self.server.stream)
                elif self._abort_reply:
                    await reset_stream(self.server.stream)
                    await self._send_abort_reply()
                else:
                    await reset_stream(self.client.stream)
                    await reset_stream(self.server.stream)
                self._end_chain()
        return self.record

    async def _relay(self, client_prefix: bytes) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            if self.chain is not None:
                ok = await self._guard(self._start_chain)
                if not ok:
                    return
            if client_prefix:
                self.record.bytes_up += len(client_prefix)
                ok = await self._guard(self._forward, self.client, self.server, client_prefix)
                if not ok:
                    return
            if self.idle_timeout is not None:
                nursery.start_soon(self._watch_idle)
            if getattr(self.chain, "next_deadline", None) is not None:
                nursery.start_soon(self._guard, self._chain_timers)
            async with trio.open_nursery() as pumps:
                # _guard(_copy) without a _pump frame, and the second direction in this
                # task: an idle flow is mostly suspended frames and tasks (memory per
                # flow), and every task spawned is scheduler work per flow.
                pumps.start_soon(self._guard, self._copy, self.client, self.server)
                await self._guard(self._copy, self.server, self.client)
            nursery.cancel_scope.cancel()  # both directions ended: stop the idle watcher

    async def _start_chain(self) -> None:
        assert self.chain is not None
        await self._send_output(self.chain.start())

    async def _guard(self, fn: Callable[..., Awaitable[None]], *args: Any) -> bool:
        """Run ``fn``; translate a flow failure into the record and end the pair."""
        try:
            await fn(*args)
            return True
        except AbortFlow as exc:
            self._abort_reply = exc.to_client
            self._over(EndReason.INTERCEPTOR_ABORT, exc.reason)
        except InterceptorError as exc:
            log.error(
                "flow %d interceptor %s failed", self.record.info.id, exc, exc_info=exc.error
            )
            self._over(EndReason.ERROR, str(exc))
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            cause = exc.__cause__ or exc
            self._over(EndReason.RESET, f"{cause!r}")
        except OSError as exc:
            self._over(EndReason.RESET, f"{exc!r}")
        return False

    def _over(self, reason: EndReason, detail: str) -> None:
        self.record.end(reason, detail, now=time.monotonic())
        self._nursery.cancel_scope.cancel()

    async def _copy(self, src: _Side, dst: _Side) -> None:
        receive = src.receive
        read_size = self.read_size
        upstream = src is self.client
        record = self.record
        while True:
            if self.splice and (self.chain is None or self.chain.passthrough):
                await self._splice(src, dst, upstream)
                break
            data = await receive(read_size)
            if not data:
                break
            self._last_activity = trio.current_time()
            if upstream:
                record.bytes_up += len(data)
            else:
                record.bytes_down += len(data)
            await self._forward(src, dst, data)
        if self.chain is not None and not self.chain.passthrough:
            flush = self.chain.client_eof if upstream else self.chain.server_eof
            await self._send_output(flush())
        await self._send_eof(dst)

    async def _splice(self, src: _Side, dst: _Side, upstream: bool) -> None:
        """Relay the rest of this direction with splice(2); returns at end of stream.

        ``dst``'s write lock is held only while spliced bytes are written, so
        an injection still in flight from the other pump (made in the hook
        that turned passthrough on) finishes first and never interleaves.
        """
        record = self.record

        def count(n: int) -> None:
            self._last_activity = trio.current_time()
            if upstream:
                record.bytes_up += n
            else:
                record.bytes_down += n

        await splice_one_way(
            src.stream,  # type: ignore[arg-type]
            dst.stream,  # type: ignore[arg-type]
            count,
            chunk=self.read_size,
            # Without interceptors nobody but this pump writes to dst: no lock (none
            # is made, and none is taken per chunk).
            write_lock=None if self.chain is None else dst.lock,
            wrote=self._touch,
        )

    def _touch(self) -> None:
        self._last_activity = trio.current_time()

    async def _forward(self, src: _Side, dst: _Side, data: bytes) -> None:
        chain = self.chain
        if chain is None or chain.passthrough:
            await self._send(dst, data)
        elif src is self.client:
            await self._send_output(chain.client_data(data))
        else:
            await self._send_output(chain.server_data(data))

    async def _send_output(self, out: Output) -> None:
        if out.to_client:
            await self._send(self.client, out.to_client)
        if out.to_server:
            await self._send(self.server, out.to_server)

    async def _send(self, dst: _Side, data: bytes) -> None:
        if not data:
            return
        lock = dst.lock
        try:
            lock.acquire_nowait()  # the usual case: no schedule point for the lock
        except trio.WouldBlock:
            await lock.acquire()
        try:
            if dst.write_closed:  # checked under the lock: _send_eof sets it holding it
                log.warning(
                    "flow %d: dropped %d bytes for the %s, which has been sent end of stream",
                    self.record.info.id,
                    len(data),
                    dst.name,
                )
                return
            dst.partial = True
            if dst.fd >= 0 or self.idle_timeout is None or len(data) <= _SEND_SLICE:
                await dst.send_all(data, self._touch)
            else:
                # A slow reader draining a big chunk is not idle: note progress per slice.
                view = memoryview(data)
                for i in range(0, len(data), _SEND_SLICE):
                    await dst.stream.send_all(view[i : i + _SEND_SLICE])
                    self._last_activity = trio.current_time()
            dst.partial = False
        finally:
            lock.release()

    async def _send_eof(self, dst: _Side) -> None:
        send_eof = getattr(dst.stream, "send_eof", None)
        async with dst.lock:
            dst.write_closed = True
            if send_eof is None:
                # A stream without half-close (TLS): end of stream ends the pair.
                self._nursery.cancel_scope.cancel()
                return
            await send_eof()

    async def _send_abort_reply(self) -> None:
        """An interceptor aborted with a reply for the client: deliver it, then FIN.

        A reset would let the client's kernel drop the reply with the
        connection, so the client side ends politely; the server was reset.
        """
        side = self.client
        if side.partial:
            # The abort cut a write to the client: a reply after half a chunk
            # would read as part of it, so the client is reset instead.
            await reset_stream(side.stream)
            return
        with trio.move_on_after(1.0) as scope:
            try:
                if not side.write_closed:
                    await side.stream.send_all(self._abort_reply)
                await _close_politely(side.stream)
            except (trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError):
                scope.cancel()
        if scope.cancelled_caught:
            await reset_stream(side.stream)

    async def _watch_idle(self) -> None:
        assert self.idle_timeout is not None
        while True:
            deadline = self._last_activity + self.idle_timeout
            now = trio.current_time()
            if now >= deadline:
                self._over(EndReason.TIMEOUT, f"idle for {self.idle_timeout:g}s")
                return
            await trio.sleep(deadline - now)

    async def _chain_timers(self) -> None:
        """Run a chain-like's optional timers (``next_deadline``/``on_timer``, e.g. the TLS
        layer's handshake timeout) until it has none left."""
        chain: Any = self.chain
        while (deadline := chain.next_deadline()) is not None:
            await trio.sleep_until(deadline)
            await self._send_output(chain.on_timer(trio.current_time()))

    def _end_chain(self) -> None:
        if self.chain is None:
            return
        try:
            self.chain.end(str(self.record.reason))
        except InterceptorError as exc:
            log.error("flow %d interceptor %s failed", self.record.info.id, exc, exc_info=exc.error)


async def _close_politely(stream: trio.abc.Stream) -> None:
    """Close after a clean end: TLS gets a second to say close_notify, then force."""
    if type(stream) is trio.SocketStream:
        # Closing a socket never waits: no timeout scope per flow (two per pair).
        await stream.aclose()
        return
    with trio.move_on_after(1.0):
        try:
            await stream.aclose()
            return
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
    await trio.aclose_forcefully(stream)


def is_cancellation(exc: BaseException) -> bool:
    """Cancelled, or a group of nothing but Cancelled (trio's nurseries wrap them)."""
    if isinstance(exc, BaseExceptionGroup):
        rest = exc.split(trio.Cancelled)[1]
        return rest is None
    return isinstance(exc, trio.Cancelled)

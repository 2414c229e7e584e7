"""The trio-stream shell: drives a :class:`~tproxy.relay.core.FlowCore` over two trio streams.

Only for flows that have no descriptor to hand to the hub (:mod:`tproxy.hub`):
the TLS listener of ``http`` mode, memory streams in tests. The rules are
the core's; this shell only reads (one task per side, while the core lets
that side be read), writes (one task per side, draining what the core
sent it, in order, end of stream included), keeps time (one task that
ticks the core at its next wake-up) and runs the interceptors' thread jobs
(one task per job, in the pair's nursery, see :mod:`.threads`: abandoned
when the pair ends). A stream without ``send_eof`` (TLS) cannot
half-close: the core ends the pair at that point.
"""

from __future__ import annotations

import logging
import time

import trio

from ..flow import EndReason, FlowRecord
from ..sockets import reset_stream
from ..timers import ThreadJob
from .core import CLIENT, SERVER, Action, End, FlowCore, FlowTap, Reset, Send, ShutdownWrite
from .threads import run_job

log = logging.getLogger("tproxy.flow")

DEFAULT_READ_SIZE = 256 * 1024
SEND_SLICE = 64 * 1024
"""A big chunk is written in slices, each reported: a slow reader is not idle."""
_EOF = object()
"""Queued after the data of a side whose write is to be shut down."""


class StreamRelay:
    """Relays one incoming and one outgoing stream through a chain until both end.

    :meth:`run` returns when the pair is over and both streams are closed;
    it records how it ended in ``record`` and never raises for the flow's own
    failures (only cancellation passes, after both ends were reset, and a
    bug in this code, after both ends were reset and recorded as ``error``).
    """

    def __init__(
        self,
        incoming: trio.abc.Stream,
        outgoing: trio.abc.Stream,
        record: FlowRecord,
        chain: object = None,
        *,
        read_size: int = DEFAULT_READ_SIZE,
        idle_timeout: float | None = None,
        tap: FlowTap | None = None,
    ) -> None:
        if read_size <= 0:
            raise ValueError("read_size must be positive")
        self.streams = (incoming, outgoing)
        self.record = record
        self.core = FlowCore(
            record.info,
            record=record,
            chain=chain,
            idle_timeout=idle_timeout,
            read_size=read_size,
            splice=False,
            tap=tap,
            half_close=(hasattr(incoming, "send_eof"), hasattr(outgoing, "send_eof")),
        )
        self._queues: tuple[list[object], list[object]] = ([], [])
        self._changed = trio.Event()
        self._closed = [False, False]
        self._end: End | None = None
        self._nursery: trio.Nursery | None = None

    async def run(self, *, client_prefix: bytes = b"") -> FlowRecord:
        """Relay until the core ends the pair; close or reset both streams as it says."""
        core = self.core
        core.last = trio.current_time()
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                now = trio.current_time()
                self._apply(core.connected(now))
                if client_prefix:
                    self._apply(core.received(CLIENT, client_prefix, now))
                if self._end is None:
                    for side in (CLIENT, SERVER):
                        nursery.start_soon(self._reader, side)
                        nursery.start_soon(self._writer, side)
                    nursery.start_soon(self._timer)
        except BaseException as exc:
            if self._end is None:
                if is_cancellation(exc):
                    self._end = _last(core.cancel())
                else:
                    self._end = _last(core.cancel(EndReason.ERROR, repr(exc)))
            raise
        finally:
            with trio.CancelScope(shield=True):
                await self._close()
        return self.record

    # -- tasks ---------------------------------------------------------------------------

    async def _reader(self, side: int) -> None:
        core = self.core
        stream = self.streams[side]
        while True:
            while not core.may_read(side):
                if core.ended or core.eof_in[side]:
                    return
                await self._changed.wait()
            try:
                data = await stream.receive_some(core.next_read_size(side))
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                self._apply(core.failed(side, repr(exc.__cause__ or exc), trio.current_time()))
                return
            now = trio.current_time()
            if not data:
                self._apply(core.eof(side, now))
                return
            if type(data) is not bytes:
                data = bytes(data)  # memory streams give bytearrays; the chain gets bytes
            self._apply(core.received(side, data, now))

    async def _writer(self, side: int) -> None:
        core = self.core
        stream = self.streams[side]
        queue = self._queues[side]
        while True:
            while not queue:
                await self._changed.wait()
            item = queue[0]
            try:
                if item is _EOF:
                    await stream.send_eof()  # type: ignore[attr-defined]
                    queue.pop(0)
                    continue
                assert isinstance(item, bytes)
                view = memoryview(item)
                for i in range(0, len(item), SEND_SLICE):
                    piece = view[i : i + SEND_SLICE]
                    await stream.send_all(piece)
                    self._apply(core.sent(side, len(piece), trio.current_time()))
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                self._apply(core.failed(side, repr(exc.__cause__ or exc), trio.current_time()))
                return
            if queue and queue[0] is item:
                queue.pop(0)

    async def _timer(self) -> None:
        core = self.core
        while True:
            at = core.next_wakeup()
            changed = self._changed
            if at is None:
                await changed.wait()
                continue
            with trio.move_on_at(at):
                await changed.wait()
            now = trio.current_time()
            if now >= at:
                self._apply(core.tick(now))

    async def _job(self, job: ThreadJob) -> None:
        """Run one thread job off the loop, then hand it back to the core (which drops it
        if the pair ended; the pair's end cancels this task, abandoning the thread)."""
        await run_job(job)
        self._apply(self.core.thread_done(job, trio.current_time()))

    # -- actions -------------------------------------------------------------------------

    def _apply(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, Send):
                self._queues[action.side].append(action.data)
            elif isinstance(action, ShutdownWrite):
                self._queues[action.side].append(_EOF)
            elif isinstance(action, Reset):
                side = action.side
                self._closed[side] = True
                self._queues[side].clear()
                assert self._nursery is not None
                self._nursery.start_soon(reset_stream, self.streams[side])
            else:
                assert isinstance(action, End)
                self._end = action
                if self._nursery is not None:
                    self._nursery.cancel_scope.cancel()
        jobs = self.core.take_thread_jobs()
        if jobs and self._nursery is not None:
            for job in jobs:
                self._nursery.start_soon(self._job, job)
        self._changed.set()
        self._changed = trio.Event()

    async def _close(self) -> None:
        end = self._end
        if end is None:  # cannot happen: the nursery only ends through the core's End
            end = End(EndReason.ERROR, "ended without a reason", (True, True))
        self.record.end(end.reason, end.detail, now=time.monotonic())
        for side in (CLIENT, SERVER):
            if self._closed[side]:
                continue
            self._closed[side] = True
            if end.reset[side]:
                await reset_stream(self.streams[side])
            else:
                await _close_politely(self.streams[side])


def _last(actions: list[Action]) -> End | None:
    return actions[-1] if actions and isinstance(actions[-1], End) else None


async def _close_politely(stream: trio.abc.Stream) -> None:
    """Close after a clean end: TLS gets a second to say close_notify, then force."""
    if type(stream) is trio.SocketStream:
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
        return exc.split(trio.Cancelled)[1] is None
    return isinstance(exc, trio.Cancelled)

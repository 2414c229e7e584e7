"""The hub: every flow pair of a process that has sockets, relayed from one task.

A flow pair needs no coroutine of its own. The hub keeps each pair as a
small record in its own ``epoll`` set and waits, as one trio task, on the
epoll descriptor itself; for diverted connections it also does the
outgoing connect (non-blocking, completed by ``EPOLLOUT``), so a
transparent flow never becomes a trio task at all.

The flow's rules are not here: each pair has a :class:`~tproxy.relay.core.FlowCore`
(the sans-io core: half-close, resets, backpressure, timeouts, counters,
abort with a reply, shutdown, the interceptor chain). The hub only turns
readiness and system calls into the core's events and carries out its
actions:

- a direction the core lets go zero-copy is moved with ``splice(2)``
  through a pipe lent from :data:`tproxy.splice.pipes` only while bytes move
  (an idle flow holds two sockets and two records, no pipe);
- any other direction is read with ``recv_into`` into one reused buffer and
  handed to the core, whose :class:`~tproxy.relay.core.Send` actions are
  written at once, the rest queued per destination side (one chain call
  can send both ways);
- a flow whose interceptors all went passthrough goes on with splice
  without leaving the hub; one with no interceptor is spliced from the
  start.

Readiness is level-triggered: a direction that stops early (its fairness
budget, a small message) is simply reported again by the next poll, and an
error or hang-up nobody asked about ends the flow instead of spinning.
Idle and connect timeouts are checked by a sweep every quarter of the
shortest one; the chain's timers and an abort's linger by a heap of exact
deadlines.

Interceptors' thread jobs (``run_in_thread``) run off the loop: the hub
takes them from the core after every event and runs each in a task of a
nursery it owns (:func:`tproxy.relay.threads.run_job`: a worker thread,
bounded by that module's limiter). The completion comes back in that task,
in the hub's own trio thread, and is carried out like a readiness event:
trio runs it only while the hub task waits (at its checkpoint between
epoll batches, or asleep on the epoll descriptor), never in the middle of
a batch, and then wakes the hub so the next poll sees the flow's new
state. When the hub stops, running jobs are abandoned (their threads run
on until ``fn`` returns; the result is dropped). See docs/architecture.md.
"""

from __future__ import annotations

import errno
import heapq
import itertools
import logging
import os
import select
import socket
import time
from collections.abc import Callable

import trio

from .flow import Address, EndReason, FlowInfo, FlowRecord
from .relay.core import (
    CLIENT,
    CONNECTING,
    OPEN,
    SERVER,
    Action,
    End,
    FlowCore,
    FlowTap,
    Reset,
    Send,
    ShutdownWrite,
)
from .relay.threads import run_job
from .sockets import connect_error_from, reset_socket
from .splice import DEFAULT_CHUNK, SPLICE, SPLICE_FLAGS, at_urgent_mark, close_idle_pipes, pipes
from .timers import ThreadJob

log = logging.getLogger("tproxy.flow")

_IN = select.EPOLLIN
_OUT = select.EPOLLOUT
_BAD = select.EPOLLERR | select.EPOLLHUP

MAX_EVENTS = 256
"""Readiness events taken per poll; the hub passes a checkpoint after each batch."""
_NEVER = float("inf")
_CHECKPOINT_EVERY = 0.0005
"""Seconds of back-to-back batches after which the hub lets other tasks run."""
CHUNKS_PER_WAKE = 4
"""Chunks one direction may move per readiness event before others get a turn."""

_PARKED = -2
"""A socket's mask while it is out of the epoll set: it hung up cleanly (see _ready)."""
_CLOSED = -3
"""A socket's mask once it was reset ahead of its flow (an abort's server side)."""

ChainFor = Callable[[FlowInfo], object]
"""Builds a flow's interceptor chain (``None``: nobody watches it); may raise."""
TapFor = Callable[[FlowInfo], FlowTap | None]


class _Way:
    """One direction of a flow pair, for splice: its source side and its pipe."""

    __slots__ = ("dst", "dst_fd", "held", "pipe", "side", "src", "src_fd")

    def __init__(self, src: socket.socket, dst: socket.socket, side: int) -> None:
        self.src = src
        self.dst = dst
        self.src_fd = src.fileno()
        self.dst_fd = dst.fileno()
        self.side = side
        """The side this direction reads from (CLIENT: up, SERVER: down)."""
        self.pipe: tuple[int, int] | None = None
        self.held = 0
        """Bytes in ``pipe`` not written yet."""


class HubFlow:
    """A flow pair in the hub: its core, its sockets, its queues, their epoll masks.

    Front doors that adopt a pair get this back: ``done`` is set when it has
    ended, and :meth:`SpliceHub.abort` resets it.
    """

    __slots__ = (
        "client",
        "client_fd",
        "connecting",
        "core",
        "done",
        "live",
        "mask_client",
        "mask_server",
        "on_end",
        "out",
        "server",
        "server_fd",
        "timer_at",
        "ways",
    )

    def __init__(self, client: socket.socket, server: socket.socket, core: FlowCore) -> None:
        self.client = client
        self.server = server
        self.client_fd = client.fileno()
        self.server_fd = server.fileno()
        self.core = core
        self.ways = (_Way(client, server, CLIENT), _Way(server, client, SERVER))
        self.out: list[bytes] = [b"", b""]
        """Bytes the core sent a side that its socket did not take yet, per side."""
        self.connecting = False
        """The outgoing connect is under way (counted in ``SpliceHub.connecting``)."""
        self.live = True
        self.mask_client = -1  # not registered
        self.mask_server = -1
        self.timer_at = _NEVER
        self.done: trio.Event | None = None
        self.on_end: Callable[[], None] | None = None
        """Called once the flow has ended and been reported (a front door's own books)."""

    @property
    def record(self) -> FlowRecord | None:
        """The flow record (``None`` while the outgoing connect is under way)."""
        return self.core.record

    def sock(self, side: int) -> socket.socket:
        return self.client if side == CLIENT else self.server


class SpliceHub:
    """Relays flow pairs from one task (:meth:`run`), splicing where nobody watches.

    The engine hands it pairs in two ways: :meth:`adopt` takes two connected
    sockets and a flow record (any front door, after its handshake), and
    :meth:`connect` takes a diverted connection and opens the outgoing flow
    itself. ``opened``/``rejected`` are asked as a connect resolves,
    ``closed`` gets every record back when its flow ends, ``chain_for``
    builds a flow's interceptor chain once it is connected (``None``:
    passthrough) and ``tap_for`` its tap. ``splice=False`` copies every
    direction through user space. The hub is only usable while :meth:`run`
    runs.
    """

    def __init__(
        self,
        *,
        opened: Callable[[FlowInfo, Address], FlowRecord],
        rejected: Callable[[FlowInfo, EndReason, str], object],
        closed: Callable[[FlowRecord], None],
        chunk: int = DEFAULT_CHUNK,
        idle_timeout: float | None = None,
        connect_timeout: float = 10.0,
        chain_for: ChainFor | None = None,
        tap_for: TapFor | None = None,
        splice: bool = True,
    ) -> None:
        if chunk <= 0:
            raise ValueError("chunk must be positive")
        if idle_timeout is not None and idle_timeout <= 0:
            raise ValueError("idle timeout must be positive")
        if connect_timeout <= 0:
            raise ValueError("connect timeout must be positive")
        self._opened = opened
        self._rejected = rejected
        self._closed = closed
        self._chain_for = chain_for
        self._tap_for = tap_for
        self.splice = splice and SPLICE is not None
        self.chunk = chunk
        self._small = chunk // 4
        self._buffer = memoryview(bytearray(chunk))
        """One receive buffer for every copied read: the bytes go on as ``bytes`` at once."""
        self.idle_timeout = idle_timeout
        self.connect_timeout = connect_timeout
        self.running = False
        self.connecting = 0
        """Outgoing connects under way (they count toward ``max_flows``)."""
        self._fds: dict[int, HubFlow] = {}
        self._count = 0
        self._epoll: select.epoll | None = None
        self._now = time.monotonic()
        self._next_sweep = _NEVER
        self._timers: list[tuple[float, int, HubFlow]] = []
        self._timer_seq = itertools.count()
        self._sleep: trio.CancelScope | None = None
        """The scope of the hub's wait for readiness, while it waits."""
        self._jobs: trio.Nursery | None = None
        """Where thread jobs run (one task each), while the hub runs."""
        self.jobs_running = 0
        """Thread jobs handed to worker threads and not back yet."""

    def __len__(self) -> int:
        """Flow pairs in the hub, connecting ones included."""
        return self._count

    # -- the task -------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Relay until cancelled; then reset every flow left and record it as ``shutdown``."""
        if self.running:
            raise RuntimeError("the hub is running already")
        self._epoll = select.epoll()
        self.running = True
        try:
            async with trio.open_nursery() as jobs:
                self._jobs = jobs
                task_status.started()
                try:
                    await self._loop()
                finally:
                    # Abandon running jobs (run_job): their threads finish on their own.
                    self._jobs = None
                    jobs.cancel_scope.cancel()
        finally:
            self.running = False
            self._now = time.monotonic()
            try:
                for flow in list(self._fds.values()):
                    if flow.live:
                        try:
                            self._apply(flow, flow.core.cancel())
                        except Exception as exc:
                            self._failed(flow, exc)
            finally:
                self._epoll.close()
                self._epoll = None
                self._timers.clear()

    async def _loop(self) -> None:
        assert self._epoll is not None
        poll = self._epoll.poll
        epfd = self._epoll.fileno()
        fds = self._fds
        wait_readable = trio.lowlevel.wait_readable
        checkpoint = trio.lowlevel.checkpoint
        timers = self._timers
        last_checkpoint = time.monotonic()
        while True:
            events = poll(0, MAX_EVENTS)
            self._now = now = time.monotonic()
            for fd, ev in events:
                flow = fds.get(fd)
                if flow is not None:
                    try:
                        self._ready(flow, fd, ev)
                    except Exception as exc:
                        self._failed(flow, exc)
            if timers and timers[0][0] <= now:
                self._run_timers(now)
            if now >= self._next_sweep:
                self._next_sweep = _NEVER
                self._sweep()
                self._plan_sweep()
            if events:
                if now - last_checkpoint >= _CHECKPOINT_EVERY:
                    # Busy: let the other tasks (accept loops, front doors) run.
                    await checkpoint()
                    last_checkpoint = time.monotonic()
                continue
            # Nothing ready: sleep on the epoll descriptor until something is, or
            # until the next timeout check. A flow taken in meanwhile may bring
            # that check forward (_plan_sweep moves this scope's deadline).
            wake = min(self._next_sweep, timers[0][0] if timers else _NEVER)
            with trio.CancelScope() as self._sleep:
                if wake != _NEVER:
                    self._sleep.deadline = trio.current_time() + (wake - now)
                await wait_readable(epfd)
            self._sleep = None
            last_checkpoint = time.monotonic()

    def _plan_sweep(self) -> None:
        """Schedule the next timeout check, a quarter of the shortest timeout that applies."""
        shortest = _NEVER
        if self.connecting:
            shortest = self.connect_timeout
        if self.idle_timeout is not None and self._fds:
            shortest = min(shortest, self.idle_timeout)
        if shortest == _NEVER:
            return
        self._wake_at(time.monotonic() + min(shortest / 4, 1.0), sweep=True)

    def _wake_at(self, at: float, *, sweep: bool = False) -> None:
        if sweep:
            if at >= self._next_sweep:
                return
            self._next_sweep = at
        if self._sleep is not None:
            self._sleep.deadline = min(
                self._sleep.deadline, trio.current_time() + (at - time.monotonic())
            )

    def _sweep(self) -> None:
        now = self._now
        seen: set[int] = set()
        for flow in list(self._fds.values()):
            if not flow.live or id(flow) in seen:
                continue
            seen.add(id(flow))
            try:
                self._apply(flow, flow.core.tick(now))
                self._settle(flow)
            except Exception as exc:
                self._failed(flow, exc)

    def _run_timers(self, now: float) -> None:
        timers = self._timers
        while timers and timers[0][0] <= now:
            at, _, flow = heapq.heappop(timers)
            if not flow.live or flow.timer_at != at:
                continue  # ended, or rescheduled since
            flow.timer_at = _NEVER
            try:
                self._apply(flow, flow.core.tick(now))
                self._settle(flow)
            except Exception as exc:
                self._failed(flow, exc)

    # -- taking flows in --------------------------------------------------------

    def adopt(
        self,
        client: socket.socket,
        server: socket.socket,
        record: FlowRecord,
        chain: object = None,
        *,
        prefix: bytes = b"",
        tap: FlowTap | None = None,
    ) -> HubFlow:
        """Relay two connected sockets until the pair ends; the hub owns them from here.

        ``chain`` is the flow's interceptor chain (``None``: passthrough);
        ``prefix`` is client data that came with a handshake and goes first
        (through the chain). The returned flow's ``done`` event is set once it
        has ended and its record has gone to ``closed``.
        """
        self._check_running()
        now = self._now = time.monotonic()
        core = self._core(record.info, now, record=record)
        flow = HubFlow(client, server, core)
        flow.done = trio.Event()
        self._count += 1
        self._start_relay(flow, now, chain, tap, prefix)
        return flow

    def connect(
        self,
        client: socket.socket,
        info: FlowInfo,
        outgoing: Callable[[], socket.socket],
        on_end: Callable[[], None] | None = None,
    ) -> None:
        """Open the outgoing flow for an accepted connection, then relay the pair.

        ``outgoing()`` makes the bound, non-blocking outgoing socket; the
        connect completes in the hub. A failure is recorded through
        ``rejected`` as ``connect-failed`` and resets the client at once (a
        silent close would look like an empty reply). ``on_end()`` runs once
        when the flow has ended, however it ended, this failure included.
        """
        self._check_running()
        try:
            server = outgoing()
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE):
                close_idle_pipes()  # descriptors for the next flows, not for spare pipes
            self._refuse(client, info, str(connect_error_from(exc)), on_end)
            return
        rc = server.connect_ex(info.destination)
        if rc not in (0, errno.EINPROGRESS):
            server.close()
            self._refuse(client, info, _connect_error(rc), on_end)
            return
        now = self._now = time.monotonic()
        flow = HubFlow(client, server, self._core(info, now, connecting=True))
        flow.on_end = on_end
        flow.connecting = True
        self._count += 1
        self._fds[flow.client_fd] = flow
        self._fds[flow.server_fd] = flow
        self.connecting += 1
        if rc == 0:
            try:
                self._connected(flow)
            except Exception as exc:
                self._failed(flow, exc)
            return
        self._plan_sweep()
        # The client is watched too (mask 0: errors only), so that one that resets
        # while we connect ends the attempt instead of being reported every poll.
        self._register(flow, 0, _OUT)

    def _core(
        self,
        info: FlowInfo,
        now: float,
        *,
        record: FlowRecord | None = None,
        connecting: bool = False,
    ) -> FlowCore:
        return FlowCore(
            info,
            record=record,
            idle_timeout=self.idle_timeout,
            connect_timeout=self.connect_timeout if connecting else None,
            now=now,
            read_size=self.chunk,
            splice=self.splice,
        )

    def _refuse(
        self,
        client: socket.socket,
        info: FlowInfo,
        detail: str,
        on_end: Callable[[], None] | None,
    ) -> None:
        """A connect that failed before the flow entered the hub: reset, report, ``on_end``."""
        reset_socket(client)
        try:
            self._rejected(info, EndReason.CONNECT_FAILED, detail)
        finally:
            if on_end is not None:
                on_end()

    def _check_running(self) -> None:
        if not self.running:
            raise RuntimeError("the hub is not running")

    def _connected(self, flow: HubFlow) -> None:
        core = flow.core
        info = core.info
        try:
            local = flow.server.getsockname()
        except OSError as exc:  # reset between connect and now
            self._apply(flow, core.connect_failed(_connect_error(exc.errno or 0)))
            return
        # The record first: if opening it fails, the flow is still a connecting one that
        # _failed can end and report.
        record = self._opened(info, (local[0], local[1]))
        flow.connecting = False
        self.connecting -= 1
        core.record = record
        self._start_relay(flow, self._now, None, None, b"", build=True)

    def _start_relay(
        self,
        flow: HubFlow,
        now: float,
        chain: object,
        tap: FlowTap | None,
        prefix: bytes,
        *,
        build: bool = False,
    ) -> None:
        core = flow.core
        info = core.info
        self._fds[flow.client_fd] = flow
        self._fds[flow.server_fd] = flow
        self._register(flow, 0, 0)
        failure = ""
        if build:
            try:
                chain = self._chain_for(info) if self._chain_for is not None else None
                tap = self._tap_for(info) if self._tap_for is not None else None
            except Exception as exc:
                log.error("flow %d: an interceptor failed to start", info.id, exc_info=exc)
                chain, failure = None, f"interceptor init: {exc!r}"
        core.tap = tap
        self._apply(flow, core.connected(now, chain=chain))
        if failure:
            self._apply(flow, core.cancel(EndReason.ERROR, failure))
        if prefix and flow.live:
            self._apply(flow, core.received(CLIENT, prefix, now))
        if flow.live:
            self._settle(flow)
        self._plan_sweep()

    # -- readiness ------------------------------------------------------------

    def _register(self, flow: HubFlow, client_mask: int, server_mask: int) -> None:
        flow.mask_client = self._watch(flow.client_fd, flow.mask_client, client_mask)
        flow.mask_server = self._watch(flow.server_fd, flow.mask_server, server_mask)

    def _watch(self, fd: int, old: int, new: int) -> int:
        """Set ``fd``'s epoll mask from ``old`` to ``new`` (negative: not in the set); the
        mask now in force. A parked socket stays out until its direction reads again."""
        assert self._epoll is not None
        if old == _CLOSED or (new == 0 and old == _PARKED):
            return old
        if new != old:
            if old < 0:
                self._epoll.register(fd, new)
            else:
                self._epoll.modify(fd, new)
        return new

    def _settle(self, flow: HubFlow) -> None:
        """After an event: the epoll masks the core's state asks for, and its timer."""
        core = flow.core
        up, down = flow.ways
        out = flow.out
        if core.phase == OPEN:
            client_in = _IN if not up.held and core.may_read(CLIENT) else 0
            server_in = _IN if not down.held and core.may_read(SERVER) else 0
        else:
            client_in = server_in = 0
        self._register(
            flow,
            client_in | (_OUT if out[CLIENT] or down.held else 0),
            server_in | (_OUT if out[SERVER] or up.held else 0),
        )
        at = core.timer_deadline()
        if at is not None and at != flow.timer_at:
            flow.timer_at = at
            heapq.heappush(self._timers, (at, next(self._timer_seq), flow))
            self._wake_at(at)

    def _ready(self, flow: HubFlow, fd: int, ev: int) -> None:
        core = flow.core
        if core.phase == CONNECTING:
            if fd == flow.server_fd:
                err = flow.server.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    self._apply(flow, core.connect_failed(_connect_error(err)))
                else:
                    self._connected(flow)
            else:
                self._apply(flow, core.failed(CLIENT, _socket_error(flow, fd), self._now))
            return
        side = CLIENT if fd == flow.client_fd else SERVER
        reading = flow.ways[side]
        handled = False
        if ev & (_OUT | _BAD) and (flow.out[side] or flow.ways[1 - side].held):
            handled = True
            self._drain(flow, side)
        if flow.live and ev & (_IN | _BAD) and not reading.held and core.may_read(side):
            handled = True
            self._pump(flow, reading)  # may_read was asked: _pump's first chunk goes at once
        if not flow.live:
            return
        if not handled and ev & _BAD:
            if not ev & select.EPOLLERR and core.phase == OPEN and not core.eof_in[side]:
                # A clean hang-up: the peer sent FIN after we had shut writing toward
                # it, and what it sent before waits (a slower destination, a hold).
                # HUP cannot be masked: the socket leaves the epoll set until its
                # direction reads again.
                self._park(flow, fd)
                return
            # Nobody waits on this socket, yet it failed or hung up: its peer is gone.
            self._apply(flow, core.failed(side, _socket_error(flow, fd), self._now))
            if not flow.live:
                return
        self._settle(flow)

    def _park(self, flow: HubFlow, fd: int) -> None:
        assert self._epoll is not None
        self._epoll.unregister(fd)
        if fd == flow.client_fd:
            flow.mask_client = _PARKED
        else:
            flow.mask_server = _PARKED

    def _pump(self, flow: HubFlow, way: _Way) -> None:
        """Move what ``way``'s source has (up to a budget), writing each chunk before the next.

        The caller checked ``core.may_read`` for the first chunk (this is per chunk).
        """
        core = flow.core
        side = way.side
        budget = CHUNKS_PER_WAKE
        while True:
            # core.may_splice(side), without asking may_read again
            if core.splice and not core.watching and core.tap is None:
                if not self._splice_chunk(flow, way):
                    return
            elif not self._copy_chunk(flow, way):
                return
            budget -= 1
            if not budget or not flow.live or way.held or not core.may_read(side):
                return

    def _splice_chunk(self, flow: HubFlow, way: _Way) -> bool:
        """One chunk through a pipe; False when the direction should wait (or ended)."""
        splice = SPLICE
        assert splice is not None
        chunk = self.chunk
        if way.pipe is None:
            try:
                way.pipe = pipes.take(chunk)
            except OSError as exc:
                if exc.errno not in (errno.EMFILE, errno.ENFILE):
                    raise
                return self._copy_chunk(flow, way)  # out of descriptors for now: user space
        try:
            n = splice(way.src_fd, way.pipe[1], chunk, flags=SPLICE_FLAGS)
        except BlockingIOError:
            self._give_pipe(way)  # an idle direction holds no pipe
            if at_urgent_mark(way.src):
                # Readable, yet nothing to splice: urgent data, which only recv()
                # gets past (level-triggered, this would spin otherwise).
                self._copy_chunk(flow, way)
            return False
        except OSError as exc:
            self._apply(flow, flow.core.failed(way.side, repr(exc), self._now))
            return False
        if n == 0:
            self._give_pipe(way)
            if at_urgent_mark(way.src):
                self._copy_chunk(flow, way)  # not the end yet: urgent data first
            else:
                self._apply(flow, flow.core.eof(way.side, self._now))
            return False
        flow.core.spliced(way.side, n, self._now)
        way.held = n
        if not self._write_pipe(flow, way):
            return False
        if n < self._small:
            # A small message (request/response traffic): the source is most likely
            # empty, and a failed splice costs an exception; the next poll will tell.
            self._give_pipe(way)
            return False
        return True

    def _copy_chunk(self, flow: HubFlow, way: _Way) -> bool:
        """One read through user space, handed to the core; False when the direction waits."""
        core = flow.core
        side = way.side
        size = core.next_read_size(side)
        buf = self._buffer
        try:
            n = way.src.recv_into(buf, size)
        except BlockingIOError:
            return False
        except OSError as exc:
            self._apply(flow, core.failed(side, repr(exc), self._now))
            return False
        if not n:
            self._apply(flow, core.eof(side, self._now))
            return False
        self._apply(flow, core.received(side, bytes(buf[:n]), self._now))
        return flow.live and not core.small[side]

    def _write_pipe(self, flow: HubFlow, way: _Way) -> bool:
        """Write what the pipe holds; False if the destination is full or failed."""
        splice = SPLICE
        assert splice is not None and way.pipe is not None
        try:
            while way.held:
                way.held -= splice(way.pipe[0], way.dst_fd, way.held, flags=SPLICE_FLAGS)
        except BlockingIOError:
            return False
        except OSError as exc:
            self._apply(flow, flow.core.failed(1 - way.side, repr(exc), self._now))
            return False
        return True

    def _drain(self, flow: HubFlow, side: int) -> None:
        """``side`` takes bytes again: write the pipe toward it, then its queue, then read
        again from the other side."""
        toward = flow.ways[1 - side]
        if toward.held:
            flow.core.moved(self._now)
            if not self._write_pipe(flow, toward):
                return
            self._give_pipe(toward)
        if flow.out[side]:
            self._flush(flow, side)
            if not flow.live or flow.out[side]:
                return
        if flow.live and not toward.held and flow.core.may_read(1 - side):
            self._pump(flow, toward)

    def _give_pipe(self, way: _Way) -> None:
        if way.pipe is not None:
            pipes.give(way.pipe, self.chunk)
            way.pipe = None

    # -- carrying out the core's actions ----------------------------------------------------

    def _apply(self, flow: HubFlow, actions: list[Action]) -> None:
        if flow.core.thread_jobs:
            self._start_jobs(flow)
        for action in actions:
            if not flow.live:
                return
            # isinstance on the exact class is CPython's fast path, as cheap as type() is.
            if isinstance(action, Send):
                self._send(flow, action.side, action.data)
            elif isinstance(action, ShutdownWrite):
                try:
                    flow.sock(action.side).shutdown(socket.SHUT_WR)
                except OSError as exc:
                    self._apply(flow, flow.core.failed(action.side, repr(exc), self._now))
            elif isinstance(action, Reset):
                self._reset_side(flow, action.side)
            else:
                assert isinstance(action, End)
                self._end(flow, action)

    def _start_jobs(self, flow: HubFlow) -> None:
        """Hand the thread jobs a core call asked for to worker threads (see run_job)."""
        jobs = flow.core.take_thread_jobs()
        nursery = self._jobs
        if nursery is None:
            return  # the hub is stopping: the flow is about to be cancelled
        for job in jobs:
            self.jobs_running += 1
            nursery.start_soon(self._job, flow, job)

    async def _job(self, flow: HubFlow, job: ThreadJob) -> None:
        """Run one job off the loop; carry out its completion like a readiness event.

        This task runs in the hub's trio thread, only while the hub task waits
        (between epoll batches or asleep), so the hub's state is consistent.
        """
        try:
            await run_job(job)
        finally:
            self.jobs_running -= 1
        if not flow.live or not self.running:
            return  # the flow ended meanwhile: the result is dropped
        self._now = now = time.monotonic()
        try:
            self._apply(flow, flow.core.thread_done(job, now))
            if flow.live:
                self._settle(flow)
        except Exception as exc:
            self._failed(flow, exc)
        # The flow's masks and timer changed under a hub that may sleep on the epoll
        # descriptor with a deadline computed before: let it poll once more.
        if self._sleep is not None:
            self._sleep.cancel()

    def _send(self, flow: HubFlow, side: int, data: bytes) -> None:
        out = flow.out
        if out[side] or flow.ways[1 - side].held:
            out[side] += data  # behind what waits already
            return
        try:
            n = (flow.client if side == CLIENT else flow.server).send(data)
        except BlockingIOError:
            n = 0
        except OSError as exc:
            self._apply(flow, flow.core.failed(side, repr(exc), self._now))
            return
        if n < len(data):
            out[side] = data[n:]
        if n:
            actions = flow.core.sent(side, n, self._now)
            if actions:
                self._apply(flow, actions)

    def _flush(self, flow: HubFlow, side: int) -> None:
        sock = flow.sock(side)
        sent = 0
        data = flow.out[side]
        try:
            while sent < len(data):
                sent += sock.send(memoryview(data)[sent:])
        except BlockingIOError:
            pass
        except OSError as exc:
            self._apply(flow, flow.core.failed(side, repr(exc), self._now))
            return
        flow.out[side] = data[sent:] if sent < len(data) else b""
        if sent:
            self._apply(flow, flow.core.sent(side, sent, self._now))

    def _reset_side(self, flow: HubFlow, side: int) -> None:
        """Reset one socket ahead of its flow (the server of an abort with a reply)."""
        fd = flow.client_fd if side == CLIENT else flow.server_fd
        mask = flow.mask_client if side == CLIENT else flow.mask_server
        if mask == _CLOSED:
            return
        if mask >= 0:
            assert self._epoll is not None
            self._epoll.unregister(fd)
        if self._fds.get(fd) is flow:
            del self._fds[fd]
        flow.out[side] = b""
        reset_socket(flow.sock(side))
        if side == CLIENT:
            flow.mask_client = _CLOSED
        else:
            flow.mask_server = _CLOSED

    # -- ending -----------------------------------------------------------------

    def _end(self, flow: HubFlow, end: End) -> None:
        """End a flow: close or reset its sockets as the core said; report it.

        A flow still connecting has no record yet: it is reported through
        ``rejected`` (``connect-failed``, or why the attempt was given up).
        """
        flow.live = False
        self._count -= 1
        fds = self._fds
        if fds.get(flow.client_fd) is flow:
            del fds[flow.client_fd]
        if fds.get(flow.server_fd) is flow:
            del fds[flow.server_fd]
        for way in flow.ways:
            if way.pipe is not None:
                if way.held:
                    pipes.discard(way.pipe)  # bytes of a flow that is being reset: never reuse
                else:
                    pipes.give(way.pipe, self.chunk)
                way.pipe = None
        for side, mask in ((CLIENT, flow.mask_client), (SERVER, flow.mask_server)):
            if mask == _CLOSED:
                continue
            sock = flow.sock(side)
            if end.reset[side]:
                reset_socket(sock)
            else:
                sock.close()
        flow.mask_client = flow.mask_server = _CLOSED
        record = flow.core.record
        try:
            if flow.connecting:
                flow.connecting = False
                self.connecting -= 1
            if record is None:
                self._rejected(flow.core.info, end.reason, end.detail)
            else:
                record.end(end.reason, end.detail, now=time.monotonic())
                self._closed(record)
        finally:
            if flow.done is not None:
                flow.done.set()
            on_end, flow.on_end = flow.on_end, None
            if on_end is not None:
                on_end()

    def _failed(self, flow: HubFlow, exc: Exception) -> None:
        """A flow's step raised what no rule expects: it ends that flow only."""
        record = flow.core.record
        flow_id = record.info.id if record is not None else flow.core.info.id
        log.error("flow %s: unexpected error in the hub", flow_id, exc_info=exc)
        if not flow.live:
            return
        try:
            actions = flow.core.cancel(EndReason.ERROR, repr(exc))
            if not actions:  # the core ended, the hub did not get to: end it here
                actions = [End(EndReason.ERROR, repr(exc), (True, True))]
            self._apply(flow, actions)
        except Exception as again:  # reporting it failed too
            log.error("flow %s: could not be reported", flow_id, exc_info=again)
            if flow.live:
                flow.live = False
                self._count -= 1
                for fd in (flow.client_fd, flow.server_fd):
                    if self._fds.get(fd) is flow:
                        del self._fds[fd]

    def abort(self, flow: HubFlow, reason: EndReason, detail: str) -> None:
        """Reset an adopted flow now, if it is still relayed (its front door was cancelled)."""
        if flow.live:
            self._apply(flow, flow.core.cancel(reason, detail))


def _connect_error(err: int) -> str:
    return str(connect_error_from(OSError(err, os.strerror(err))))


def _socket_error(flow: HubFlow, fd: int) -> str:
    sock = flow.client if fd == flow.client_fd else flow.server
    try:
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    except OSError as exc:
        err = exc.errno or 0
    side = "client" if sock is flow.client else "server"
    return f"{side}: {os.strerror(err) if err else 'hung up'}"

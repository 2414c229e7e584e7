"""The splice hub: every passthrough flow pair of a process relayed from one task.

A flow pair that no interceptor watches needs no per-flow coroutine. The
trio engine (:mod:`tproxy.pair`) spends two tasks, two nurseries, cancel
scopes and a suspended frame stack per pair, and a scheduler round per
wake-up; for short flows and idle flows that per-flow cost, not bandwidth,
is what limits a proxy (docs/benchmarks.md). The hub keeps such pairs as
small state records in its own ``epoll`` set, moves their bytes with
``splice(2)`` when the kernel says a socket is ready, and waits, as one trio
task, on the epoll descriptor itself. For diverted connections it also does
the outgoing connect (non-blocking, completed by ``EPOLLOUT``), so a
transparent passthrough flow never becomes a trio task at all.

The rules are the copy path's, flow by flow:

- *Byte counters* count what was taken from each source.
- *Half-close*: end of stream from one peer becomes ``shutdown(SHUT_WR)``
  toward the other once everything read has been written; the pair ends
  cleanly (``eof``) when both directions have.
- *Reset*: a reset or error on either socket resets both ends (``SO_LINGER``
  0), and nothing read is ever passed off as complete.
- *Backpressure*: per direction the pipe is the only buffer; nothing more is
  read from a source while its pipe holds bytes its destination has not
  taken. Pipes are lent from :mod:`tproxy.splice`'s pool only while bytes
  move, so an idle flow holds two sockets and a record, no pipe.
- *Idle timeout* counts progress in either direction, writes included.
- *Cancellation* (the engine's shutdown) resets every flow still in the hub
  and records it as ``shutdown``.

Readiness is level-triggered: a direction that stops early (its fairness
budget, a small message) is simply reported again by the next poll, and an
error or hang-up nobody asked about ends the flow instead of spinning.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import time
from collections.abc import Callable

import trio

from .flow import Address, EndReason, FlowInfo, FlowRecord, format_address
from .sockets import ConnectError, connect_error_from, reset_socket
from .splice import (
    _FLAGS,
    _SPLICE,
    DEFAULT_CHUNK,
    _close_pipe,
    _pipes,
    at_urgent_mark,
    close_idle_pipes,
)

log = logging.getLogger("tproxy.flow")

_IN = select.EPOLLIN
_OUT = select.EPOLLOUT
_BAD = select.EPOLLERR | select.EPOLLHUP

MAX_EVENTS = 256
"""Readiness events taken per poll; the hub passes a checkpoint after each batch."""
_NEVER = float("inf")
CHUNKS_PER_WAKE = 4
"""Chunks one direction may move per readiness event before others get a turn."""

# The states of one direction.
_READING = 0  # waiting for its source
_WRITING = 1  # its pipe (or buffer) holds bytes the destination has not taken yet
_DONE = 2  # end of stream passed on

_PARKED = -2
"""A socket's mask while it is out of the epoll set: it hung up cleanly (see _ready)."""


class _Way:
    """One direction of a flow pair: source, destination and what is in between."""

    __slots__ = ("buf", "dst", "dst_fd", "held", "pipe", "src", "src_fd", "state", "up")

    def __init__(self, src: socket.socket, dst: socket.socket, up: bool) -> None:
        self.src = src
        self.dst = dst
        self.src_fd = src.fileno()
        self.dst_fd = dst.fileno()
        self.up = up
        self.state = _READING
        self.pipe: tuple[int, int] | None = None
        self.held = 0
        """Bytes in ``pipe`` not written yet."""
        self.buf = b""
        """Bytes copied through user space (no pipe to be had: EMFILE) not written yet."""


class HubFlow:
    """A flow pair in the hub: its record, its two directions, their epoll masks.

    Front doors that adopt a pair get this back: ``done`` is set when it has
    ended, and :meth:`SpliceHub.abort` resets it.
    """

    __slots__ = (
        "client",
        "client_fd",
        "connect_deadline",
        "done",
        "down",
        "last",
        "mask_client",
        "mask_server",
        "on_end",
        "pending",
        "record",
        "server",
        "server_fd",
        "up",
    )

    def __init__(self, client: socket.socket, server: socket.socket) -> None:
        self.client = client
        self.server = server
        self.client_fd = client.fileno()
        self.server_fd = server.fileno()
        self.up: _Way | None = None
        self.down: _Way | None = None
        self.record: FlowRecord | None = None
        self.pending: FlowInfo | None = None
        """Set while the outgoing connect is under way (no record yet)."""
        self.connect_deadline = 0.0
        self.last = 0.0
        self.mask_client = -1  # not registered
        self.mask_server = -1
        self.done: trio.Event | None = None
        self.on_end: Callable[[], None] | None = None
        """Called once the flow has ended and been reported (a front door's own books)."""


class SpliceHub:
    """Relays passthrough flow pairs with splice(2) from one task (:meth:`run`).

    The engine hands it pairs in two ways: :meth:`adopt` takes two connected
    sockets and a flow record (any front door, after its handshake), and
    :meth:`connect` takes a diverted connection and opens the outgoing flow
    itself. ``engine`` gets every record back through ``closed`` when the
    flow ends, and is asked through ``opened``/``rejected`` as the connect
    resolves. The hub is only usable while :meth:`run` runs.
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
    ) -> None:
        if _SPLICE is None:
            raise RuntimeError("os.splice is not available")
        if chunk <= 0:
            raise ValueError("chunk must be positive")
        if idle_timeout is not None and idle_timeout <= 0:
            raise ValueError("idle timeout must be positive")
        if connect_timeout <= 0:
            raise ValueError("connect timeout must be positive")
        self._opened = opened
        self._rejected = rejected
        self._closed = closed
        self.chunk = chunk
        self._small = chunk // 4
        self.idle_timeout = idle_timeout
        self.connect_timeout = connect_timeout
        self.running = False
        self.connecting = 0
        """Outgoing connects under way (they count toward ``max_flows``)."""
        self._fds: dict[int, HubFlow] = {}
        self._epoll: select.epoll | None = None
        self._now = time.monotonic()
        self._next_sweep = _NEVER
        self._sleep: trio.CancelScope | None = None
        """The scope of the hub's wait for readiness, while it waits."""

    def __len__(self) -> int:
        """Flow pairs in the hub, connecting ones included."""
        return len(self._fds) // 2

    # -- the task -------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Relay until cancelled; then reset every flow left and record it as ``shutdown``."""
        if self.running:
            raise RuntimeError("the hub is running already")
        self._epoll = select.epoll()
        self.running = True
        try:
            task_status.started()
            await self._loop()
        finally:
            self.running = False
            self._now = time.monotonic()
            try:
                for fd, flow in list(self._fds.items()):
                    if self._fds.get(fd) is flow:
                        try:
                            self._end(flow, EndReason.SHUTDOWN, "cancelled")
                        except Exception as exc:
                            self._failed(flow, exc)
            finally:
                self._epoll.close()
                self._epoll = None

    async def _loop(self) -> None:
        assert self._epoll is not None
        poll = self._epoll.poll
        epfd = self._epoll.fileno()
        fds = self._fds
        wait_readable = trio.lowlevel.wait_readable
        checkpoint = trio.lowlevel.checkpoint
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
            if now >= self._next_sweep:
                self._next_sweep = _NEVER
                self._sweep()
                self._plan_sweep()
            if events:
                await checkpoint()
                continue
            # Nothing ready: sleep on the epoll descriptor until something is, or
            # until the next timeout check. A flow taken in meanwhile may bring
            # that check forward (_plan_sweep moves this scope's deadline).
            with trio.CancelScope() as self._sleep:
                if self._next_sweep != _NEVER:
                    self._sleep.deadline = trio.current_time() + (self._next_sweep - now)
                await wait_readable(epfd)
            self._sleep = None

    def _plan_sweep(self) -> None:
        """Schedule the next timeout check, a quarter of the shortest timeout that applies."""
        shortest = _NEVER
        if self.connecting:
            shortest = self.connect_timeout
        if self.idle_timeout is not None and self._fds:
            shortest = min(shortest, self.idle_timeout)
        if shortest == _NEVER:
            return
        at = time.monotonic() + min(shortest / 4, 1.0)
        if at < self._next_sweep:
            self._next_sweep = at
            if self._sleep is not None:
                self._sleep.deadline = min(
                    self._sleep.deadline, trio.current_time() + (at - time.monotonic())
                )

    def _sweep(self) -> None:
        now = self._now
        idle = self.idle_timeout
        for fd, flow in list(self._fds.items()):
            if self._fds.get(fd) is not flow or fd != flow.server_fd:
                continue  # ended meanwhile; or its other descriptor: once per flow
            try:
                self._check_timeouts(flow, now, idle)
            except Exception as exc:
                self._failed(flow, exc)

    def _check_timeouts(self, flow: HubFlow, now: float, idle: float | None) -> None:
        if flow.pending is not None:
            if now >= flow.connect_deadline:
                timeout = ConnectError(
                    "timeout",
                    f"connect to {format_address(flow.pending.destination)} timed out "
                    f"after {self.connect_timeout:g}s",
                    errno.ETIMEDOUT,
                )
                self._end(flow, EndReason.CONNECT_FAILED, str(timeout))
        elif idle is not None and now - flow.last >= idle:
            self._end(flow, EndReason.TIMEOUT, f"idle for {idle:g}s")

    # -- taking flows in --------------------------------------------------------

    def adopt(self, client: socket.socket, server: socket.socket, record: FlowRecord) -> HubFlow:
        """Relay two connected sockets until the pair ends; the hub owns them from here.

        The returned flow's ``done`` event is set once it has ended and its
        record has gone to ``closed``.
        """
        self._check_running()
        flow = HubFlow(client, server)
        flow.record = record
        flow.done = trio.Event()
        self._start_relay(flow)
        self._plan_sweep()
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
        flow = HubFlow(client, server)
        flow.pending = info
        flow.on_end = on_end
        self._fds[flow.client_fd] = flow
        self._fds[flow.server_fd] = flow
        self.connecting += 1
        if rc == 0:
            try:
                self._connected(flow)
            except Exception as exc:
                self._failed(flow, exc)
            return
        flow.connect_deadline = time.monotonic() + self.connect_timeout
        self._plan_sweep()
        # The client is watched too (mask 0: errors only), so that one that resets
        # while we connect ends the attempt instead of being reported every poll.
        self._register(flow, 0, _OUT)

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
        info = flow.pending
        assert info is not None
        try:
            local = flow.server.getsockname()
        except OSError as exc:  # reset between connect and now
            self._end(flow, EndReason.CONNECT_FAILED, _connect_error(exc.errno or 0))
            return
        # The record first: if opening it fails, the flow is still a pending one that
        # _failed can end and report.
        record = self._opened(info, (local[0], local[1]))
        flow.pending = None
        self.connecting -= 1
        flow.record = record
        self._start_relay(flow)
        self._plan_sweep()

    def _start_relay(self, flow: HubFlow) -> None:
        flow.up = _Way(flow.client, flow.server, True)
        flow.down = _Way(flow.server, flow.client, False)
        flow.last = self._now = time.monotonic()
        self._fds[flow.client_fd] = flow
        self._fds[flow.server_fd] = flow
        self._register(flow, _IN, _IN)

    # -- readiness ------------------------------------------------------------

    def _register(self, flow: HubFlow, client_mask: int, server_mask: int) -> None:
        flow.mask_client = self._watch(flow.client_fd, flow.mask_client, client_mask)
        flow.mask_server = self._watch(flow.server_fd, flow.mask_server, server_mask)

    def _watch(self, fd: int, old: int, new: int) -> int:
        """Set ``fd``'s epoll mask from ``old`` to ``new`` (negative: not in the set); the
        mask now in force. A parked socket stays out until its direction reads again."""
        assert self._epoll is not None
        if new == 0 and old == _PARKED:
            return old
        if new != old:
            if old < 0:
                self._epoll.register(fd, new)
            else:
                self._epoll.modify(fd, new)
        return new

    def _update(self, flow: HubFlow) -> None:
        up, down = flow.up, flow.down
        assert up is not None and down is not None
        self._register(
            flow,
            (_IN if up.state == _READING else 0) | (_OUT if down.state == _WRITING else 0),
            (_IN if down.state == _READING else 0) | (_OUT if up.state == _WRITING else 0),
        )

    def _ready(self, flow: HubFlow, fd: int, ev: int) -> None:
        if flow.pending is not None:
            if fd == flow.server_fd:
                err = flow.server.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    self._end(flow, EndReason.CONNECT_FAILED, _connect_error(err))
                else:
                    self._connected(flow)
            else:
                self._end(flow, EndReason.RESET, _socket_error(flow, fd))
            return
        up, down = flow.up, flow.down
        assert up is not None and down is not None
        if fd == up.src_fd:
            reading, writing = up, down
        else:
            reading, writing = down, up
        handled = False
        if writing.state == _WRITING and ev & (_OUT | _BAD):
            handled = True
            self._drain(flow, writing)
        if reading.state == _READING and ev & (_IN | _BAD) and self._fds.get(fd) is flow:
            handled = True
            self._pump(flow, reading)
        if not handled and ev & _BAD and self._fds.get(fd) is flow:
            if not ev & select.EPOLLERR and reading.state == _WRITING:
                # A clean hang-up: the peer sent FIN after we had shut writing toward
                # it, and what it sent before is still queued for a destination that
                # is slower. HUP cannot be masked: the socket leaves the epoll set
                # until its direction reads again.
                self._park(flow, fd)
                return
            # Nobody waits on this socket, yet it failed or hung up: its peer is gone.
            self._end(flow, EndReason.RESET, _socket_error(flow, fd))

    def _park(self, flow: HubFlow, fd: int) -> None:
        assert self._epoll is not None
        self._epoll.unregister(fd)
        if fd == flow.client_fd:
            flow.mask_client = _PARKED
        else:
            flow.mask_server = _PARKED

    def _pump(self, flow: HubFlow, way: _Way) -> None:
        """Move what the source has (up to a budget), writing each chunk before the next."""
        splice = _SPLICE
        assert splice is not None
        chunk = self.chunk
        record = flow.record
        assert record is not None
        for turn in range(CHUNKS_PER_WAKE):
            if way.pipe is None:
                try:
                    way.pipe = _pipes.take(chunk)
                except OSError as exc:
                    if exc.errno not in (errno.EMFILE, errno.ENFILE):
                        raise
                    self._copy_chunk(flow, way)  # out of descriptors for now: through user space
                    return
            try:
                n = splice(way.src_fd, way.pipe[1], chunk, flags=_FLAGS)
            except BlockingIOError:
                self._give_pipe(way)  # an idle direction holds no pipe
                if turn == 0 and at_urgent_mark(way.src):
                    # Readable, yet nothing to splice: urgent data, which only recv()
                    # gets past (level-triggered, this would spin otherwise).
                    self._copy_chunk(flow, way)
                return
            except OSError as exc:
                self._end(flow, EndReason.RESET, repr(exc))
                return
            if n == 0:
                self._give_pipe(way)
                if at_urgent_mark(way.src):
                    self._copy_chunk(flow, way)  # not the end yet: urgent data first
                else:
                    self._eof(flow, way)
                return
            if way.up:
                record.bytes_up += n
            else:
                record.bytes_down += n
            flow.last = self._now
            way.held = n
            if not self._write(flow, way):
                return
            if n < self._small:
                # A small message (request/response traffic): the source is most likely
                # empty, and a failed splice costs an exception; the next poll will tell.
                self._give_pipe(way)
                return
        self._give_pipe(way)

    def _copy_chunk(self, flow: HubFlow, way: _Way) -> None:
        try:
            data = way.src.recv(self.chunk)
        except BlockingIOError:
            return
        except OSError as exc:
            self._end(flow, EndReason.RESET, repr(exc))
            return
        if not data:
            self._eof(flow, way)
            return
        record = flow.record
        assert record is not None
        if way.up:
            record.bytes_up += len(data)
        else:
            record.bytes_down += len(data)
        flow.last = self._now
        way.buf = data
        self._write(flow, way)

    def _write(self, flow: HubFlow, way: _Way) -> bool:
        """Write what the direction holds; False if the destination is full or failed."""
        try:
            if way.buf:
                while way.buf:
                    sent = way.dst.send(way.buf)
                    way.buf = way.buf[sent:]
            else:
                splice = _SPLICE
                assert splice is not None and way.pipe is not None
                while way.held:
                    way.held -= splice(way.pipe[0], way.dst_fd, way.held, flags=_FLAGS)
        except BlockingIOError:
            if way.state != _WRITING:
                way.state = _WRITING
                self._update(flow)
            return False
        except OSError as exc:
            self._end(flow, EndReason.RESET, repr(exc))
            return False
        if way.state == _WRITING:
            way.state = _READING
            self._update(flow)
        return True

    def _drain(self, flow: HubFlow, way: _Way) -> None:
        """The destination takes bytes again: write the rest, then read again."""
        flow.last = self._now
        if self._write(flow, way):
            self._give_pipe(way)
            self._pump(flow, way)

    def _give_pipe(self, way: _Way) -> None:
        if way.pipe is not None:
            _pipes.give(way.pipe, self.chunk)
            way.pipe = None

    def _eof(self, flow: HubFlow, way: _Way) -> None:
        """End of stream from ``way``'s source: pass it on, end the flow once both have."""
        try:
            way.dst.shutdown(socket.SHUT_WR)
        except OSError as exc:
            self._end(flow, EndReason.RESET, repr(exc))
            return
        way.state = _DONE
        other = flow.down if way is flow.up else flow.up
        assert other is not None
        if other.state == _DONE:
            self._end(flow, EndReason.EOF, "")
        else:
            self._update(flow)

    # -- ending -----------------------------------------------------------------

    def _end(self, flow: HubFlow, reason: EndReason, detail: str) -> None:
        """End a flow: close both sockets after ``eof``, reset them otherwise; report it.

        A flow still connecting has no record yet: it is reported through
        ``rejected`` (``connect-failed``, or why the attempt was given up).
        """
        fds = self._fds
        if fds.get(flow.client_fd) is flow:
            del fds[flow.client_fd]
        if fds.get(flow.server_fd) is flow:
            del fds[flow.server_fd]
        for way in (flow.up, flow.down):
            if way is not None and way.pipe is not None:
                if way.held:
                    _close_pipe(way.pipe)  # bytes of a flow that is being reset: never reuse
                else:
                    _pipes.give(way.pipe, self.chunk)
                way.pipe = None
        if reason is EndReason.EOF:
            flow.client.close()
            flow.server.close()
        else:
            reset_socket(flow.client)
            reset_socket(flow.server)
        record = flow.record
        try:
            if record is None:
                info = flow.pending
                assert info is not None
                flow.pending = None
                self.connecting -= 1
                self._rejected(info, reason, detail)
            else:
                record.end(reason, detail, now=time.monotonic())
                self._closed(record)
        finally:
            if flow.done is not None:
                flow.done.set()
            on_end, flow.on_end = flow.on_end, None
            if on_end is not None:
                on_end()

    def _failed(self, flow: HubFlow, exc: Exception) -> None:
        """A flow's step raised what no rule above expects: it ends that flow only."""
        flow_id = flow.record.info.id if flow.record is not None else "?"
        log.error("flow %s: unexpected error in the splice hub", flow_id, exc_info=exc)
        if self._fds.get(flow.client_fd) is flow or self._fds.get(flow.server_fd) is flow:
            try:
                self._end(flow, EndReason.ERROR, repr(exc))
            except Exception as again:  # reporting it failed too: it is out of the hub
                log.error("flow %s: could not be reported", flow_id, exc_info=again)

    def abort(self, flow: HubFlow, reason: EndReason, detail: str) -> None:
        """Reset an adopted flow now, if it is still relayed (its front door was cancelled)."""
        if self._fds.get(flow.client_fd) is flow:
            self._end(flow, reason, detail)


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

"""The flow core: every rule of a flow pair, as events in and actions out.

One :class:`FlowCore` per flow pair. It does no I/O and reads no clock: a
*shell* (the epoll hub, :mod:`tproxy.hub`, or the trio-stream shell,
:mod:`tproxy.relay.streams`) turns readiness and system calls into events
and carries out the actions the core returns. The rules, written once here:

- *Byte counters*: ``read`` counts what was taken from each side (the flow
  record's ``up``/``down``), ``delivered`` what each side was given.
- *Half-close*: end of stream from one side is flushed through the chain,
  and once everything queued for the other side has been written, that side
  gets :class:`ShutdownWrite`. The pair ends cleanly (``eof``) once both
  directions have. A side that cannot half-close (TLS) ends the pair there.
- *Reset*: an error or reset on either side resets both ends (``reset``);
  nothing read is passed off as complete.
- *Backpressure*: a side is read only while nothing is queued toward the
  other side (:meth:`FlowCore.may_read`), so a pair holds at most one read
  (plus what the chain made of it) per direction.
- *Idle and connect timeouts*, checked on :meth:`FlowCore.tick`; progress in
  either direction, writes included, counts as activity.
- *Abort with a reply*: the server is reset at once (:class:`Reset`), the
  reply is queued for the client and the client is closed politely once it
  took it, or reset after :data:`LINGER` seconds. A reply that would follow
  a half-written chunk resets the client instead.
- *Interceptor errors* end only this flow (``error``), logged with the
  interceptor and hook.
- *Shutdown*: :meth:`FlowCore.cancel` resets both ends (``shutdown``).
- *Splice*: a direction may go zero-copy (:meth:`FlowCore.may_splice`) while
  no interceptor watches it, no tap records it and nothing is queued ahead.
- *Timers and read holds* of the chain (optional members, see
  :class:`~tproxy.interceptor.Chain`): the chain's ``next_deadline()`` is part
  of :meth:`FlowCore.next_wakeup`, ``on_timer(now)`` runs on :meth:`tick`, and
  a direction the chain holds is not read. The chain's clock
  (``set_clock``) reads the time of the event being handled, so the core
  still reads no clock. An end of stream the chain holds back
  (``holds_client_eof``/``holds_server_eof``) is passed on once released; a
  polite close the chain asks for (``closing``) stops reading and
  half-closes both sides.
- *Thread jobs* (``run_in_thread``): the core never runs them. It keeps the
  jobs a call asked for; the shell takes them with
  :meth:`FlowCore.take_thread_jobs` after every event, runs each
  ``job.run()`` in a worker thread and hands it back as the event
  :meth:`FlowCore.thread_done`. The job's read hold stays meanwhile; a job
  that comes back after the flow ended is dropped (no callback, no action).
  See tproxy/timers.py and :mod:`tproxy.relay.threads`.

Events return a list of actions, in order: :class:`Send`,
:class:`ShutdownWrite`, :class:`Reset`, :class:`End` (always last, at most
once). See docs/architecture.md for the whole picture.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

from ..flow import EndReason, FlowInfo, FlowRecord, format_address
from ..interceptor import AbortFlow, InterceptorError, Output

log = logging.getLogger("tproxy.flow")

CLIENT = 0
"""The incoming side (what the proxy accepted)."""
SERVER = 1
"""The outgoing side (what the proxy connected)."""
SIDE_NAMES = ("client", "server")

LINGER = 1.0
"""Seconds an abort reply may take to reach the client before it is reset."""
SMALL_READ = 64 * 1024
"""After a small message, read at most this much (request/response traffic)."""

# Phases of a flow pair.
CONNECTING = 0
OPEN = 1
LINGERING = 2
ENDED = 3


class Send(NamedTuple):
    """Write ``data`` to ``side``; report what was written with :meth:`FlowCore.sent`."""

    side: int
    data: bytes


class ShutdownWrite(NamedTuple):
    """End of stream toward ``side`` (``shutdown(SHUT_WR)``): everything queued was written."""

    side: int


class Reset(NamedTuple):
    """Reset ``side`` now (RST); the other side is still served (an abort's reply)."""

    side: int


class End(NamedTuple):
    """The flow pair is over: close or reset each side that is still open.

    ``reset`` says, per side, whether that side is reset (RST) or closed
    politely (FIN after what was written). ``reason``/``detail`` go to the
    flow record (the shell ends it, with its own clock).
    """

    reason: EndReason
    detail: str
    reset: tuple[bool, bool]


Action = Send | ShutdownWrite | Reset | End
_BOTH = (True, True)
_NEITHER = (False, False)
_NONE: list[Action] = []
_PAIRS = ((_NEITHER, (False, True)), ((True, False), _BOTH))
"""Every pair of per-side flags, shared: a flow's flags are one of these (no list each)."""


def _set(flags: tuple[bool, bool], side: int, value: bool) -> tuple[bool, bool]:
    """``flags`` with ``side`` set to ``value`` (one of the shared pairs)."""
    return _PAIRS[value][flags[1]] if side == CLIENT else _PAIRS[flags[0]][value]


_NO_JOBS: list[Any] = []  # shared and never filled: see FlowCore.take_thread_jobs


class FlowTap(Protocol):
    """Watches a flow's bytes (pcapng recording); its presence turns splice off."""

    def on_read(self, side: int, data: bytes) -> None:
        """``data`` was read from ``side``."""

    def on_deliver(self, side: int, data: bytes) -> None:
        """``data`` is handed to the shell for ``side`` (in order, before it is written)."""

    def on_end(self, reason: str) -> None:
        """The flow ended."""


class FlowCore:
    """The state and rules of one flow pair (sans-io; see the module docstring).

    ``record`` may be attached later, at :meth:`connected` (a flow that is
    still connecting has none). ``half_close`` says per side whether a write
    shutdown exists there (a socket: yes; TLS: no).
    """

    __slots__ = (
        "_has_deadline",
        "_has_timer",
        "chain",
        "clock_now",
        "closed_by_chain",
        "connect_deadline",
        "connect_timeout",
        "delivered",
        "detail",
        "eof_held",
        "eof_in",
        "half_close",
        "idle_timeout",
        "info",
        "last",
        "linger_deadline",
        "phase",
        "queued",
        "read",
        "read_size",
        "reason",
        "record",
        "shut",
        "shut_due",
        "small",
        "splice",
        "tap",
        "thread_jobs",
        "timed",
        "watching",
    )

    def __init__(
        self,
        info: FlowInfo,
        *,
        record: FlowRecord | None = None,
        chain: Any = None,
        idle_timeout: float | None = None,
        connect_timeout: float | None = None,
        now: float = 0.0,
        read_size: int = 256 * 1024,
        splice: bool = True,
        tap: FlowTap | None = None,
        half_close: tuple[bool, bool] = (True, True),
    ) -> None:
        self.info = info
        self.record = record
        self.chain: Any = None
        self.watching = False
        """The chain exists and some interceptor still wants to see data."""
        self._has_deadline = False
        """The chain has ``next_deadline`` (asked while it watches)."""
        self._has_timer = False
        """The chain has ``on_timer``."""
        self.clock_now = now
        """The time of the event being handled: the chain's clock."""
        self.timed = False
        """The chain has the timer members beyond timers and read holds (eof holds, close)."""
        self.thread_jobs: list[Any] = []
        """Thread jobs the chain asked for that the shell has not taken yet."""
        self.closed_by_chain = ""
        """Why the chain closed the flow politely ("" while it did not): the end's detail."""
        self._set_chain(chain)
        self.idle_timeout = idle_timeout
        self.connect_timeout = connect_timeout
        self.connect_deadline = now + connect_timeout if connect_timeout is not None else None
        self.linger_deadline: float | None = None
        self.last = now
        self.read_size = read_size
        self.splice = splice
        self.tap = tap
        self.half_close = half_close
        self.phase = CONNECTING
        self.read = [0, 0]
        """Bytes read from each side."""
        self.delivered = [0, 0]
        """Bytes written to each side (as the shell reported them)."""
        self.queued = [0, 0]
        """Bytes handed out in :class:`Send` and not yet reported written, per side."""
        self.eof_in: tuple[bool, bool] = _NEITHER
        """End of stream (or a reset) came from this side: it is read no more."""
        self.eof_held: tuple[bool, bool] = _NEITHER
        """This side's end of stream came and the chain holds it back (not passed on yet)."""
        self.shut_due: tuple[bool, bool] = _NEITHER
        """End of stream is owed to this side, once its queue is written."""
        self.shut: tuple[bool, bool] = _NEITHER
        """This side's write was shut down."""
        self.small: tuple[bool, bool] = _NEITHER
        """The last read from this side was a small message (the source is likely empty)."""
        self.reason: EndReason | None = None
        self.detail = ""

    def _set_chain(self, chain: Any) -> None:
        if chain is not None and not getattr(chain, "interceptors", True):
            chain = None  # an empty Chain watches nothing
        self.chain = chain
        self.watching = chain is not None and not chain.passthrough
        # Flags, not bound methods: an idle flow should not carry them.
        self._has_deadline = hasattr(chain, "next_deadline")
        self._has_timer = hasattr(chain, "on_timer")
        set_clock = getattr(chain, "set_clock", None)
        self.timed = set_clock is not None
        if set_clock is not None:
            set_clock(self._clock)

    def _clock(self) -> float:
        return self.clock_now

    # -- questions the shell asks ---------------------------------------------------

    @property
    def ended(self) -> bool:
        return self.phase == ENDED

    def may_read(self, side: int) -> bool:
        """Whether to read from ``side`` now (open, not at its end, nothing queued ahead,
        not held by the chain)."""
        if self.phase != OPEN or self.eof_in[side] or self.queued[1 - side]:
            return False
        chain = self.chain
        if chain is not None and self.watching:
            hold = chain.holds_client_reading if side == CLIENT else chain.holds_server_reading
            if hold:
                return False
        return True

    def may_splice(self, side: int) -> bool:
        """Whether the bytes from ``side`` may go zero-copy to the other side now.

        Only where reading is allowed, nobody watches the bytes (no chain that
        is not passthrough, no tap) and splice is allowed at all. Spliced bytes
        are reported with :meth:`spliced`.
        """
        return self.splice and not self.watching and self.tap is None and self.may_read(side)

    def next_read_size(self, side: int) -> int:
        """How much to read from ``side`` next: less after a small message."""
        return SMALL_READ if self.small[side] and self.read_size > SMALL_READ else self.read_size

    def next_wakeup(self) -> float | None:
        """When :meth:`tick` has something to check next (``None``: nothing pending)."""
        times = []
        if self.phase == CONNECTING:
            if self.connect_deadline is not None:
                times.append(self.connect_deadline)
        elif self.phase == OPEN:
            if self.idle_timeout is not None:
                times.append(self.last + self.idle_timeout)
            if self._has_deadline and self.watching:
                at = self.chain.next_deadline()
                if at is not None:
                    times.append(at)
        elif self.phase == LINGERING and self.linger_deadline is not None:
            times.append(self.linger_deadline)
        return min(times) if times else None

    def timer_deadline(self) -> float | None:
        """The next precise deadline (the chain's timer or an abort's linger), without the
        idle and connect timeouts, which a shell may check coarsely."""
        if self.phase == LINGERING:
            return self.linger_deadline
        if self.phase == OPEN and self._has_deadline and self.watching:
            at: float | None = self.chain.next_deadline()
            return at
        return None

    # -- events -------------------------------------------------------------------------

    def connected(
        self, now: float, *, record: FlowRecord | None = None, chain: Any = None
    ) -> list[Action]:
        """The outgoing side is connected: data may flow; the chain's ``start`` runs."""
        if self.phase != CONNECTING:
            return _NONE
        if record is not None:
            self.record = record
        if chain is not None:
            self._set_chain(chain)
        self.phase = OPEN
        self.last = now
        if self.chain is None:
            return _NONE
        actions: list[Action] = []
        self._run(actions, now, self.chain.start)
        return actions

    def received(self, side: int, data: bytes, now: float) -> list[Action]:
        """``data`` (not empty) was read from ``side``."""
        if self.phase != OPEN:
            return _NONE
        n = len(data)
        self.read[side] += n
        record = self.record
        if record is not None:
            if side == CLIENT:
                record.bytes_up += n
            else:
                record.bytes_down += n
        self.last = now
        self.small = _set(self.small, side, n < self.next_read_size(side) // 4)
        if self.tap is not None:
            self.tap.on_read(side, data)
        if not self.watching:
            return [self._send(1 - side, data)]
        actions: list[Action] = []
        chain = self.chain
        self._run(actions, now, chain.client_data if side == CLIENT else chain.server_data, data)
        return actions

    def spliced(self, side: int, n: int, now: float) -> None:
        """``n`` bytes went from ``side`` to the other side by splice (read, and handed on)."""
        self.read[side] += n
        self.delivered[1 - side] += n
        record = self.record
        if record is not None:
            if side == CLIENT:
                record.bytes_up += n
            else:
                record.bytes_down += n
        self.last = now

    def moved(self, now: float) -> None:
        """A slow destination took spliced bytes: progress (idle timeouts), nothing else."""
        self.last = now

    def sent(self, side: int, n: int, now: float) -> list[Action]:
        """``n`` bytes of what :class:`Send` asked for were written to ``side``."""
        if n <= 0:
            return _NONE
        self.queued[side] -= n
        self.delivered[side] += n
        self.last = now
        if self.queued[side]:
            return _NONE
        if self.phase == LINGERING and side == CLIENT:
            return [
                self._finish(self.reason or EndReason.INTERCEPTOR_ABORT, self.detail, (False, True))
            ]
        if self.shut_due[side] and self.phase == OPEN:
            actions: list[Action] = []
            self._shut(actions, side)
            return actions
        return _NONE

    def eof(self, side: int, now: float) -> list[Action]:
        """End of stream from ``side``: flush the chain, then pass it on."""
        if self.phase != OPEN or self.eof_in[side]:
            return _NONE
        self.eof_in = _set(self.eof_in, side, True)
        self.last = now
        actions: list[Action] = []
        if self.watching:
            chain = self.chain
            self._run(actions, now, chain.client_eof if side == CLIENT else chain.server_eof)
            if self.phase != OPEN:
                return actions
            held = chain.holds_client_eof if side == CLIENT else chain.holds_server_eof
            if self.timed and held:
                self.eof_held = _set(self.eof_held, side, True)
                return actions
        self._pass_eof(actions, side)
        return actions

    def _pass_eof(self, actions: list[Action], side: int) -> None:
        """``side``'s end of stream went through the chain: the other side gets it."""
        other = 1 - side
        self.shut_due = _set(self.shut_due, other, True)
        if not self.queued[other]:
            self._shut(actions, other)

    def failed(self, side: int | None, detail: str, now: float) -> list[Action]:
        """A reset or error on ``side`` (``None``: the pair as a whole): reset both ends."""
        if self.phase == ENDED:
            return _NONE
        if self.phase == CONNECTING:
            return [
                self._finish(
                    EndReason.CONNECT_FAILED if side == SERVER else EndReason.RESET, detail, _BOTH
                )
            ]
        if self.phase == LINGERING:
            if side == SERVER:
                return _NONE  # reset by the abort already: what it says now is moot
            return [self._finish(self.reason or EndReason.INTERCEPTOR_ABORT, self.detail, _BOTH)]
        return [self._finish(EndReason.RESET, detail, _BOTH)]

    def connect_failed(self, detail: str) -> list[Action]:
        """The outgoing connect failed (``detail`` says how)."""
        if self.phase == ENDED:
            return _NONE
        return [self._finish(EndReason.CONNECT_FAILED, detail, _BOTH)]

    def tick(self, now: float) -> list[Action]:
        """Time passed: timeouts, the linger of an abort, the chain's timer."""
        phase = self.phase
        if phase == CONNECTING:
            at = self.connect_deadline
            if at is not None and now >= at:
                return [
                    self._finish(EndReason.CONNECT_FAILED, self._connect_timeout_detail(), _BOTH)
                ]
            return _NONE
        if phase == LINGERING:
            if self.linger_deadline is not None and now >= self.linger_deadline:
                return [
                    self._finish(self.reason or EndReason.INTERCEPTOR_ABORT, self.detail, _BOTH)
                ]
            return _NONE
        if phase != OPEN:
            return _NONE
        idle = self.idle_timeout
        if idle is not None and now - self.last >= idle:
            return [self._finish(EndReason.TIMEOUT, f"idle for {idle:g}s", _BOTH)]
        if self._has_deadline and self._has_timer and self.watching:
            at = self.chain.next_deadline()
            if at is not None and now >= at:
                actions: list[Action] = []
                self._run(actions, now, self.chain.on_timer, now)
                return actions
        return _NONE

    def take_thread_jobs(self) -> list[Any]:
        """The thread jobs asked for since the last call (take them after every event).

        Run each one's ``run()`` off the loop, then hand it back with
        :meth:`thread_done`. Empty once the flow has ended.
        """
        jobs = self.thread_jobs
        if not jobs:
            return _NO_JOBS
        self.thread_jobs = []
        return jobs

    def thread_done(self, job: Any, now: float) -> list[Action]:
        """A job taken with :meth:`take_thread_jobs` has run: release its hold, call back.

        The chain's ``on_thread_done`` runs the interceptor's callback, whose
        injections, abort or close come back as actions. A job back after the
        flow ended (or while an abort's reply lingers) is dropped.
        """
        if self.phase != OPEN or self.chain is None:
            return _NONE
        actions: list[Action] = []
        self._run(actions, now, self.chain.on_thread_done, job)
        return actions

    def cancel(
        self, reason: EndReason = EndReason.SHUTDOWN, detail: str = "cancelled"
    ) -> list[Action]:
        """End the pair from outside (the engine's shutdown, a front door's abort): reset."""
        if self.phase == ENDED:
            return _NONE
        return [self._finish(reason, detail, _BOTH)]

    # -- inside -------------------------------------------------------------------------

    def _send(self, side: int, data: bytes) -> Send:
        self.queued[side] += len(data)
        if self.tap is not None:
            self.tap.on_deliver(side, data)
        return Send(side, data)

    def _emit(self, actions: list[Action], out: Output) -> None:
        if out.to_client:
            self._queue(actions, CLIENT, out.to_client)
        if out.to_server:
            self._queue(actions, SERVER, out.to_server)

    def _queue(self, actions: list[Action], side: int, data: bytes) -> None:
        if self.shut[side]:
            log.warning(
                "flow %d: dropped %d bytes for the %s, which has been sent end of stream",
                self.info.id,
                len(data),
                SIDE_NAMES[side],
            )
            return
        actions.append(self._send(side, data))

    def _run(
        self, actions: list[Action], now: float, hook: Callable[..., Output], *args: Any
    ) -> None:
        """Call the chain; route its output; turn its abort or failure into the end."""
        self.clock_now = now
        try:
            out = hook(*args)
        except AbortFlow as exc:
            self._aborted(actions, exc, now)
            return
        except InterceptorError as exc:
            log.error("flow %d interceptor %s failed", self.info.id, exc, exc_info=exc.error)
            actions.append(self._finish(EndReason.ERROR, str(exc), _BOTH))
            return
        self.watching = not self.chain.passthrough
        if out:
            self._emit(actions, out)
        if self.timed:
            held = self.eof_held
            if held[CLIENT] or held[SERVER] or self.chain.has_requests:
                self._after_timed(actions, now)

    def _after_timed(self, actions: list[Action], now: float) -> None:
        """What a call may have asked besides bytes: a released eof, a close, thread jobs."""
        chain = self.chain
        for side in (CLIENT, SERVER):
            if self.eof_held[side] and self.phase == OPEN:
                if not (chain.holds_client_eof if side == CLIENT else chain.holds_server_eof):
                    self.eof_held = _set(self.eof_held, side, False)
                    self._pass_eof(actions, side)
        closing = chain.closing
        if not self.closed_by_chain and closing is not None and self.phase == OPEN:
            # A polite close: read no more, FIN each side once its queue is written.
            self.closed_by_chain = closing or "closed by interceptor"
            self.eof_in = _BOTH
            for side in (CLIENT, SERVER):
                if not self.shut[side] and self.phase == OPEN:
                    self.shut_due = _set(self.shut_due, side, True)
                    if not self.queued[side]:
                        self._shut(actions, side)
        jobs = chain.take_thread_jobs()
        if jobs and self.phase == OPEN:
            self.thread_jobs.extend(jobs)  # the shell takes them (take_thread_jobs)

    def _aborted(self, actions: list[Action], exc: AbortFlow, now: float) -> None:
        reply = exc.to_client
        if reply and not self.queued[CLIENT] and not self.shut[CLIENT]:
            # The reply goes first, then a polite close; the server is reset now.
            self.reason = EndReason.INTERCEPTOR_ABORT
            self.detail = exc.reason
            self.phase = LINGERING
            self.linger_deadline = now + LINGER
            actions.append(Reset(SERVER))
            actions.append(self._send(CLIENT, reply))
            return
        # No reply, or one that would follow a half-written chunk: reset both.
        actions.append(self._finish(EndReason.INTERCEPTOR_ABORT, exc.reason, _BOTH))

    def _shut(self, actions: list[Action], side: int) -> None:
        self.shut_due = _set(self.shut_due, side, False)
        if not self.half_close[side]:
            # No half-close on this side (TLS): the end of stream toward it ends the
            # pair; a side with a write cut mid-way is reset, not passed off as whole.
            actions.append(
                self._finish(
                    EndReason.EOF, "", (bool(self.queued[CLIENT]), bool(self.queued[SERVER]))
                )
            )
            return
        self.shut = _set(self.shut, side, True)
        actions.append(ShutdownWrite(side))
        if self.shut[1 - side]:
            actions.append(self._finish(EndReason.EOF, self.closed_by_chain, _NEITHER))

    def _finish(self, reason: EndReason, detail: str, reset: tuple[bool, bool]) -> End:
        if self.phase == LINGERING and self.reason is not None:
            reason, detail = self.reason, self.detail
        self.phase = ENDED
        self.thread_jobs = []  # not taken yet: never run (what is running is dropped on return)
        self.reason = reason
        self.detail = detail
        record = self.record
        if record is not None:  # what each side was given, beside what was read from it
            record.delivered_up = self.delivered[SERVER]
            record.delivered_down = self.delivered[CLIENT]
        if self.chain is not None:
            try:
                self.chain.end(str(reason))
            except InterceptorError as exc:
                log.error("flow %d interceptor %s failed", self.info.id, exc, exc_info=exc.error)
            except Exception as exc:  # a chain-like that does not wrap its errors
                log.error("flow %d: ending the chain failed", self.info.id, exc_info=exc)
        if self.tap is not None:
            try:
                self.tap.on_end(str(reason))
            except Exception as exc:
                log.error("flow %d: the flow's tap failed", self.info.id, exc_info=exc)
        return End(reason, detail, reset)

    def _connect_timeout_detail(self) -> str:
        timeout = self.connect_timeout or 0.0
        return (
            f"timeout: connect to {format_address(self.info.destination)} timed out "
            f"after {timeout:g}s"
        )

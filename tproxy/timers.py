"""Time, pacing and work off the event loop for interceptors, sans-io.

Interceptors ask for time through methods of :class:`~tproxy.interceptor.Interceptor`
(``call_later``, ``now``, ``hold_reading``, ``hold_eof``, ``close``,
``run_in_thread``); this module keeps the per-flow state behind them, one
:class:`FlowTimers` per :class:`~tproxy.interceptor.Chain`. Nothing here reads
a clock or starts a thread: whoever drives the chain gives it a clock
(:meth:`Chain.set_clock`) and carries out what it asks for.

The relay's side of the contract (optional chain members; a chain-like
object without them has no timers):

- ``set_clock(clock)``: called once, before ``start()``, with the relay's
  monotonic clock (a callable returning seconds). A relay calls it only if
  it honours everything below; without it, an interceptor that asks for a
  timer, a hold, a close or a thread fails its flow with a clear error
  instead of stalling it silently.
- ``next_deadline() -> float | None``: when (on that clock) the chain next
  wants :meth:`on_timer`; ``None`` for never. Ask again after every call
  into the chain: a hook may have added or cancelled timers. A deadline in
  the past means "now".
- ``on_timer(now) -> Output``: run what is due; send the output like a
  hook's (it may raise ``AbortFlow``/``InterceptorError`` like a hook).
- ``holds_client_reading`` / ``holds_server_reading``: while true, do not
  read from that side, so the interceptor's queue stays bounded and the
  sender meets TCP backpressure.
- ``holds_client_eof`` / ``holds_server_eof``: true after ``client_eof()``
  (``server_eof()``) while an interceptor still holds that end of stream
  back (queued data to deliver first, or a deliberately slow close). The
  relay half-closes the server (client) only once it turns false, after
  sending the output of the call that released it.
- ``closing -> str | None``: an interceptor asked to end the flow politely
  (:meth:`Interceptor.close`): send the output of that call, stop reading
  both sides, half-close both and end the flow (reason ``eof``, the string
  as detail).
- ``take_thread_jobs() -> list[ThreadJob]`` and ``on_thread_done(job) ->
  Output``: run each job's :meth:`ThreadJob.run` in a worker thread
  (``trio.to_thread.run_sync(job.run)``), then hand it back on the loop.
  The flow core passes jobs on to its shell (``FlowCore.take_thread_jobs``,
  ``FlowCore.thread_done``); both shells run them with
  :func:`tproxy.relay.threads.run_job`.
- ``has_requests``: a cheap check, after every call, of whether ``closing``
  or thread jobs need a look at all.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable
from typing import Any

CLIENT = "client"
"""The client's side: its bytes travel toward the server."""
SERVER = "server"
"""The server's side: its bytes travel toward the client."""
SIDES = (CLIENT, SERVER)
_BOTH = {CLIENT: (CLIENT,), SERVER: (SERVER,), "both": SIDES}
_NO_JOBS: list[ThreadJob] = []  # shared and never filled: see FlowTimers.take_jobs


def sides(side: str) -> tuple[str, ...]:
    """``client``, ``server`` or ``both`` -> the sides it names (ValueError otherwise)."""
    try:
        return _BOTH[side]
    except KeyError:
        raise ValueError(f"side must be 'client', 'server' or 'both', not {side!r}") from None


class TimerHandle:
    """A callback scheduled with :meth:`Interceptor.call_later`; :meth:`cancel` drops it."""

    __slots__ = ("cancelled", "deadline", "fired", "fn", "owner", "seq")

    def __init__(self, deadline: float, seq: int, owner: int, fn: Callable[[], object]) -> None:
        self.deadline = deadline
        """When it is due, on the flow's clock."""
        self.seq = seq
        self.owner = owner
        self.fn = fn
        self.cancelled = False
        self.fired = False

    def cancel(self) -> None:
        """Do not run the callback (a no-op once it ran)."""
        self.cancelled = True

    @property
    def pending(self) -> bool:
        """Neither run nor cancelled yet."""
        return not (self.cancelled or self.fired)

    def __lt__(self, other: TimerHandle) -> bool:
        return (self.deadline, self.seq) < (other.deadline, other.seq)

    def __repr__(self) -> str:
        state = "cancelled" if self.cancelled else "fired" if self.fired else "pending"
        name = getattr(self.fn, "__qualname__", self.fn)
        return f"<TimerHandle {name} at {self.deadline:g} {state}>"


class ThreadJob:
    """Work handed off the event loop with :meth:`Interceptor.run_in_thread`.

    The relay calls :meth:`run` in a worker thread, then
    ``chain.on_thread_done(job)`` back on the loop, which releases the
    reading hold and calls ``then(outcome)`` as the interceptor.
    """

    __slots__ = ("done", "error", "fn", "hold", "owner", "result", "returned", "then")

    def __init__(
        self,
        owner: int,
        fn: Callable[[], Any],
        then: Callable[[Any], object] | None,
        hold: tuple[str, ...],
    ) -> None:
        self.owner = owner
        self.fn = fn
        self.then = then
        self.hold = hold
        """The sides whose reading is held until the job is back."""
        self.done = False
        self.result: Any = None
        self.error: Exception | None = None
        self.returned = False

    def run(self) -> None:
        """Run ``fn`` and keep its result or exception; never raises an ``Exception``."""
        try:
            self.result = self.fn()
        except Exception as exc:
            self.error = exc
        self.done = True

    @property
    def outcome(self) -> Any:
        """What ``then`` receives: the result, or the exception ``fn`` raised."""
        return self.error if self.error is not None else self.result

    def __repr__(self) -> str:
        return f"<ThreadJob {getattr(self.fn, '__qualname__', self.fn)} done={self.done}>"


class FlowTimers:
    """The time-related state of one flow: timers, holds, thread jobs, a close request.

    Interceptors reach it through their chain (bound by ``Chain.set_clock``);
    they are named by their index in the chain, which is how the chain routes
    what their callbacks inject.
    """

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self._heap: list[TimerHandle] = []
        self._seq = 0
        self._read_holds: dict[str, set[int]] = {CLIENT: set(), SERVER: set()}
        self._job_holds: dict[str, int] = {CLIENT: 0, SERVER: 0}
        self.eof_holds: dict[str, set[int]] = {CLIENT: set(), SERVER: set()}
        """Which interceptors hold each side's end of stream (set before or when it comes)."""
        self.eof_at: dict[str, int | None] = {CLIENT: None, SERVER: None}
        """Where each side's end of stream stopped in the chain, while it is held there."""
        self.new_jobs: list[ThreadJob] = []
        self._outstanding = 0
        """Thread jobs made and not handed back yet."""
        self.closing: str | None = None

    # -- timers ---------------------------------------------------------------

    def call_later(self, owner: int, seconds: float, fn: Callable[[], object]) -> TimerHandle:
        if not callable(fn):
            raise TypeError(f"call_later needs a callable, not {type(fn).__name__}")
        seconds = float(seconds)
        if not seconds >= 0 or math.isinf(seconds):
            raise ValueError(f"call_later: seconds must be finite and >= 0, not {seconds!r}")
        self._seq += 1
        handle = TimerHandle(self.clock() + seconds, self._seq, owner, fn)
        heapq.heappush(self._heap, handle)
        return handle

    def next_deadline(self) -> float | None:
        if self.eof_releasable():
            return self.clock()
        heap = self._heap
        while heap and heap[0].cancelled:
            heapq.heappop(heap)
        return heap[0].deadline if heap else None

    def pop_due(self, now: float, before_seq: int) -> TimerHandle | None:
        """The next timer due at ``now`` and made before ``before_seq``, or None."""
        heap = self._heap
        while heap:
            head = heap[0]
            if head.cancelled:
                heapq.heappop(heap)
                continue
            if head.deadline > now or head.seq > before_seq:
                # Not due, or made during this round (call_later(0) from a callback):
                # the next on_timer runs it, so a callback that keeps rescheduling
                # itself at once cannot hold the loop.
                return None
            heapq.heappop(heap)
            head.fired = True
            return head
        return None

    @property
    def last_seq(self) -> int:
        return self._seq

    def busy(self) -> bool:
        """Whether a timer, a held end of stream or a thread job is still pending."""
        if self.closing is not None:
            return False
        return (
            self.next_deadline() is not None
            or self.eof_at[CLIENT] is not None
            or self.eof_at[SERVER] is not None
            or bool(self.new_jobs)
            or self._outstanding > 0
        )

    # -- holds -------------------------------------------------------------------

    def hold_reading(self, owner: int, side: str, held: bool) -> None:
        for s in sides(side):
            if held:
                self._read_holds[s].add(owner)
            else:
                self._read_holds[s].discard(owner)

    def holds_reading(self, side: str) -> bool:
        return bool(self._read_holds[side]) or self._job_holds[side] > 0

    def hold_eof(self, owner: int, side: str, held: bool) -> None:
        for s in sides(side):
            if held:
                self.eof_holds[s].add(owner)
            else:
                self.eof_holds[s].discard(owner)

    def stops_eof(self, owner: int, side: str) -> bool:
        """The end of stream of ``side`` reached ``owner``: does it stop there?"""
        if owner in self.eof_holds[side]:
            self.eof_at[side] = owner
            return True
        return False

    def eof_releasable(self) -> bool:
        """Some end of stream is stopped at an interceptor that let go of it."""
        for side in SIDES:
            at = self.eof_at[side]
            if at is not None and at not in self.eof_holds[side]:
                return True
        return False

    # -- threads ------------------------------------------------------------------

    def run_in_thread(
        self,
        owner: int,
        fn: Callable[[], Any],
        then: Callable[[Any], object] | None,
        hold: str,
    ) -> ThreadJob:
        if not callable(fn):
            raise TypeError(f"run_in_thread needs a callable, not {type(fn).__name__}")
        held = () if hold == "none" else sides(hold)
        job = ThreadJob(owner, fn, then, held)
        for s in held:
            self._job_holds[s] += 1
        self._outstanding += 1
        self.new_jobs.append(job)
        return job

    def take_jobs(self) -> list[ThreadJob]:
        if not self.new_jobs:
            return _NO_JOBS  # asked after every chain call: no list made when there is none
        jobs, self.new_jobs = self.new_jobs, []
        return jobs

    def job_back(self, job: ThreadJob) -> bool:
        """Release the job's holds; False if it was already handed back."""
        if job.returned:
            return False
        job.returned = True
        self._outstanding -= 1
        for s in job.hold:
            self._job_holds[s] -= 1
        return True

"""Time in interceptors: timers, holds, close and thread jobs through the chain, on bytes.

Everything runs on :class:`tproxy.testing.Driver`'s virtual clock: the chain
never reads a real clock, so timings are exact.
"""

from __future__ import annotations

import functools

import pytest

from tproxy.flow import FlowInfo
from tproxy.interceptor import Chain, Interceptor, InterceptorError, Output
from tproxy.testing import Driver


class Tag(Interceptor):
    """Marks what passes it: client data gets ``<name``, server data ``name>``."""

    def __init__(self, flow: FlowInfo, name: str = "t") -> None:
        super().__init__(flow)
        self.name = name.encode()
        self.eofs: list[str] = []

    def client_data(self, data: bytes) -> bytes:
        return b"<" + self.name + data

    def server_data(self, data: bytes) -> bytes:
        return data + self.name + b">"

    def client_eof(self) -> bytes:
        self.eofs.append("client")
        return b""

    def server_eof(self) -> bytes:
        self.eofs.append("server")
        return b""


class Later(Interceptor):
    """Schedules what a test tells it to."""

    def __init__(self, flow: FlowInfo, options: object = None) -> None:
        super().__init__(flow, options)
        self.fired: list[tuple[str, float]] = []


FLOW = FlowInfo.example()


def chain_of(*middle: Interceptor) -> tuple[Tag, Tag, Driver]:
    first, last = Tag(FLOW, "a"), Tag(FLOW, "z")
    return first, last, Driver(first, *middle, last)


def test_a_timer_fires_at_its_time_and_its_injections_pass_the_right_neighbours() -> None:
    mid = Later(FLOW)
    _, _, d = chain_of(mid)

    def fire() -> None:
        mid.fired.append(("fire", mid.now()))
        mid.inject_to_server(b"S")
        mid.inject_to_client(b"C")

    mid.call_later(1.5, fire)
    assert d.next_deadline == 1.5
    assert d.advance(1.499) == []
    assert mid.fired == []
    events = d.advance(0.001)
    assert mid.fired == [("fire", 1.5)]
    # Toward the server only the interceptor after it; toward the client only the one before.
    assert events == [(1.5, Output(to_server=b"<zS", to_client=b"Ca>"))]
    assert d.time == 1.5
    assert d.next_deadline is None


def test_cancelled_timers_do_not_fire() -> None:
    mid = Later(FLOW)
    d = Driver(mid)
    handle = mid.call_later(1, lambda: mid.fired.append(("x", mid.now())))
    assert handle.pending
    handle.cancel()
    assert not handle.pending
    assert d.next_deadline is None
    d.advance(5)
    assert mid.fired == []


def test_due_callbacks_run_in_deadline_then_creation_order() -> None:
    mid = Later(FLOW)
    d = Driver(mid)

    def record(name: str) -> None:
        mid.fired.append((name, mid.now()))

    for name, at in [("b", 2.0), ("a", 1.0), ("c", 2.0), ("d", 0.5)]:
        mid.call_later(at, functools.partial(record, name))
    d.advance(10)
    assert mid.fired == [("d", 0.5), ("a", 1.0), ("b", 2.0), ("c", 2.0)]
    assert d.time == 10


def test_a_zero_delay_timer_made_in_a_callback_runs_in_the_next_round() -> None:
    mid = Later(FLOW)
    d = Driver(mid)

    def first() -> None:
        mid.inject_to_server(b"1")
        mid.call_later(0, lambda: mid.inject_to_server(b"2"))

    mid.call_later(1, first)
    events = d.advance(1)
    assert events == [(1.0, Output(to_server=b"1")), (1.0, Output(to_server=b"2"))]


def test_a_callback_that_reschedules_itself_at_once_forever_is_caught() -> None:
    mid = Later(FLOW)
    d = Driver(mid)

    def again() -> None:
        mid.call_later(0, again)

    mid.call_later(0, again)
    d.MAX_ROUNDS = 50
    with pytest.raises(RuntimeError, match="timer rounds"):
        d.advance(1)


def test_call_later_rejects_negative_and_nan_delays() -> None:
    mid = Later(FLOW)
    Driver(mid)
    for bad in (-1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="finite and >= 0"):
            mid.call_later(bad, lambda: None)
    with pytest.raises(TypeError):
        mid.call_later(1, "not callable")  # type: ignore[arg-type]


def test_a_timer_callback_can_reply_and_abort() -> None:
    mid = Later(FLOW)
    _, _, d = chain_of(mid)

    def stop() -> None:
        mid.inject_to_client(b"bye")
        mid.abort("too slow")

    mid.call_later(2, stop)
    d.advance(3)
    assert d.aborted == "too slow"
    assert d.to_client == b"byea>"
    assert d.ended == "interceptor-abort"
    assert d.time == 2.0  # the flow ended there
    assert d.next_deadline is None


def test_a_raising_timer_callback_fails_only_its_flow_with_a_clear_name() -> None:
    mid = Later(FLOW)
    d = Driver(mid)

    def broken() -> None:
        raise ValueError("boom")

    mid.call_later(1, broken)
    d.advance(1)
    assert d.error is not None
    assert "broken (call_later)" in str(d.error)
    assert isinstance(d.error.error, ValueError)


def test_without_a_clock_asking_for_time_fails_the_flow_clearly() -> None:
    class Needy(Interceptor):
        def client_data(self, data: bytes) -> bytes:
            self.call_later(1, lambda: None)
            return data

    chain = Chain([Needy(FLOW)])  # as a relay that does not drive timers builds it
    chain.start()
    with pytest.raises(InterceptorError, match="relay that drives timers"):
        chain.client_data(b"x")
    assert chain.next_deadline() is None
    assert not chain.holds_client_reading and not chain.holds_client_eof


def test_chains_that_use_no_time_have_nothing_pending() -> None:
    d = Driver(Tag(FLOW), Tag(FLOW))
    d.client(b"x")
    d.client_eof()
    assert d.next_deadline is None
    assert not (d.holds_client_reading or d.holds_server_reading)
    assert not (d.holds_client_eof or d.holds_server_eof)
    assert d.server_half_closed and d.closed is None
    assert d.chain.take_thread_jobs() == []


def test_reading_holds_per_side_and_both() -> None:
    mid = Later(FLOW)
    other = Later(FLOW)
    d = Driver(mid, other)
    mid.hold_reading("client")
    assert d.holds_client_reading and not d.holds_server_reading
    other.hold_reading("both")
    mid.hold_reading("client", False)
    assert d.holds_client_reading and d.holds_server_reading  # other still holds
    other.hold_reading("both", False)
    assert not (d.holds_client_reading or d.holds_server_reading)
    with pytest.raises(ValueError, match="side must be"):
        mid.hold_reading("up")


class EofHolder(Interceptor):
    """Holds the client's end of stream and flushes ``tail`` on release, after ``delay``."""

    def __init__(self, flow: FlowInfo, delay: float, side: str = "client") -> None:
        super().__init__(flow)
        self.delay = delay
        self.side = side

    def client_eof(self) -> bytes:
        if self.side == "client":
            self._hold()
        return b"flushed"

    def server_eof(self) -> bytes:
        if self.side == "server":
            self._hold()
        return b"flushed"

    def _hold(self) -> None:
        self.hold_eof(self.side)
        self.call_later(self.delay, self._release)

    def _release(self) -> None:
        if self.side == "client":
            self.inject_to_server(b"late")
        else:
            self.inject_to_client(b"late")
        self.hold_eof(self.side, False)


def test_a_held_client_eof_stops_at_its_holder_until_released() -> None:
    holder = EofHolder(FLOW, 2.0)
    first, last, d = chain_of(holder)
    d.client_eof()
    # What the holder flushed went on as data; the interceptor after it has no eof yet.
    assert d.to_server == b"<zflushed"
    assert first.eofs == ["client"] and last.eofs == []
    assert d.holds_client_eof and not d.server_half_closed
    d.advance(1.999)
    assert d.holds_client_eof
    events = d.advance(0.001)
    assert events == [(2.0, Output(to_server=b"<zlate"))]
    assert last.eofs == ["client"]
    assert not d.holds_client_eof and d.server_half_closed


def test_a_held_server_eof_mirrors_the_client_one() -> None:
    holder = EofHolder(FLOW, 0.5, side="server")
    first, last, d = chain_of(holder)
    d.server_eof()
    assert d.to_client == b"flusheda>"
    assert last.eofs == ["server"] and first.eofs == []
    assert d.holds_server_eof and not d.client_half_closed
    d.advance(0.5)
    assert d.to_client == b"flusheda>latea>"
    assert first.eofs == ["server"] and d.client_half_closed


def test_an_eof_released_in_a_data_hook_is_carried_on_at_the_next_timer_round() -> None:
    class HoldUntilServerSpeaks(Interceptor):
        def start(self) -> None:
            self.hold_eof("client")

        def server_data(self, data: bytes) -> bytes:
            self.hold_eof("client", False)
            return data

    mid = HoldUntilServerSpeaks(FLOW)
    _, last, d = chain_of(mid)
    d.client_eof()
    assert d.holds_client_eof and last.eofs == []
    d.advance(10)
    assert d.holds_client_eof
    d.server(b"ok")
    assert d.next_deadline == d.time  # "now": a relay runs on_timer at once
    d.advance(0)
    assert last.eofs == ["client"] and not d.holds_client_eof


def test_close_ends_the_flow_politely_and_stops_timers() -> None:
    mid = Later(FLOW)
    d = Driver(mid)
    mid.call_later(5, lambda: mid.fired.append(("late", mid.now())))

    def shut() -> None:
        mid.inject_to_client(b"last words")
        mid.close("enough")

    mid.call_later(1, shut)
    d.advance(10)
    assert d.closed == "enough"
    assert d.to_client == b"last words"
    assert d.ended == "eof" and d.aborted is None
    assert d.server_half_closed and d.client_half_closed
    assert mid.fired == [] and d.next_deadline is None


class Lookup(Interceptor):
    """Holds client data until a (slow, blocking) lookup decides what to do with it."""

    def __init__(self, flow: FlowInfo, fn: object, hold: str = "both") -> None:
        super().__init__(flow)
        self.fn = fn
        self.hold = hold
        self.outcomes: list[object] = []

    def client_data(self, data: bytes) -> bytes:
        self.run_in_thread(lambda: self.fn(data), then=self.decided, hold=self.hold)  # type: ignore[operator]
        return b""

    def decided(self, outcome: object) -> None:
        self.outcomes.append(outcome)
        if isinstance(outcome, Exception):
            self.abort(f"lookup failed: {outcome}")
        self.inject_to_server(outcome)  # type: ignore[arg-type]
        self.inject_to_client(b"ack")


def test_run_in_thread_holds_reading_and_its_callback_injects_on_the_loop() -> None:
    mid = Lookup(FLOW, lambda data: data.upper())
    _, _, d = chain_of(mid)
    d.client(b"abc")
    assert d.to_server == b""
    assert d.holds_client_reading and d.holds_server_reading
    outputs = d.run_threads()
    # "a" tagged the data before the lookup saw it; "z" tags what the callback injects.
    assert outputs == [Output(to_server=b"<z<AABC", to_client=b"acka>")]
    assert mid.outcomes == [b"<AABC"]
    assert not (d.holds_client_reading or d.holds_server_reading)
    assert d.run_threads() == []


def test_run_in_thread_can_hold_one_side_only() -> None:
    mid = Lookup(FLOW, lambda data: data, hold="client")
    d = Driver(mid)
    d.client(b"x")
    assert d.holds_client_reading and not d.holds_server_reading


def test_run_in_thread_hands_an_exception_to_the_callback() -> None:
    def fails(data: bytes) -> bytes:
        raise LookupError("no such name")

    mid = Lookup(FLOW, fails)
    d = Driver(mid)
    d.client(b"x")
    d.run_threads()
    assert isinstance(mid.outcomes[0], LookupError)
    assert d.aborted == "lookup failed: no such name"


def test_run_in_thread_without_a_callback_fails_the_flow_on_an_exception() -> None:
    class Fire(Interceptor):
        def client_data(self, data: bytes) -> bytes:
            self.run_in_thread(lambda: 1 / 0)
            return data

    d = Driver(Fire(FLOW))
    d.client(b"x")
    d.run_threads()
    assert d.error is not None and isinstance(d.error.error, ZeroDivisionError)


def test_a_job_back_after_the_flow_ended_does_nothing() -> None:
    mid = Lookup(FLOW, lambda data: data)
    d = Driver(mid)
    d.client(b"x")
    jobs = d.take_thread_jobs()
    assert len(jobs) == 1
    d.end("reset")
    jobs[0].run()
    assert d.chain.on_thread_done(jobs[0]) == Output()
    assert mid.outcomes == []


def test_a_job_taken_by_hand_runs_in_a_real_thread() -> None:
    import threading

    seen: list[str] = []

    def note(data: bytes) -> bytes:
        seen.append(threading.current_thread().name)
        return data

    mid = Lookup(FLOW, note)
    d = Driver(mid)
    d.client(b"x")
    (job,) = d.take_thread_jobs()
    worker = threading.Thread(target=job.run, name="worker")
    worker.start()
    worker.join(5)
    assert job.done and seen == ["worker"]
    d.thread_done(job)
    assert d.to_server == b"x" and not d.holds_client_reading
    assert d.thread_done(job) == Output()  # handed back once only


def test_a_chain_with_a_pending_timer_is_not_passthrough_until_it_fired() -> None:
    class Once(Interceptor):
        def start(self) -> None:
            self.call_later(1, lambda: self.inject_to_client(b"late"))
            self.passthrough()

    d = Driver(Once(FLOW))
    assert not d.passthrough  # the engine must keep driving the timer
    d.advance(1)
    assert d.to_client == b"late"
    assert d.passthrough


def test_a_pending_thread_job_or_held_eof_keeps_the_chain_watched() -> None:
    mid = Lookup(FLOW, lambda data: data)
    d = Driver(mid)
    d.client(b"x")
    mid.passthrough()
    assert not d.passthrough
    d.run_threads()
    assert d.passthrough

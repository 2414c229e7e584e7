"""The flow core drives the interceptors' time: clock, timers, holds, close, thread jobs.

Events in, actions out, as in tests/test_relay_core.py, with real interceptors
(the built-in faults and small ones here) in a real :class:`Chain`.
"""

from __future__ import annotations

from tproxy import Interceptor
from tproxy.flow import EndReason, FlowInfo, FlowRecord
from tproxy.interceptor import Chain
from tproxy.interceptors.blackhole import Blackhole
from tproxy.interceptors.latency import Latency
from tproxy.interceptors.limit import Limit
from tproxy.interceptors.slow_close import SlowClose
from tproxy.relay.core import CLIENT, SERVER, End, FlowCore, Send, ShutdownWrite

INFO = FlowInfo.example()
CLEAN = (False, False)


def _core(*interceptors: Interceptor) -> FlowCore:
    core = FlowCore(INFO, record=FlowRecord(info=INFO, started=0.0), chain=Chain(interceptors))
    core.connected(0.0)
    return core


def _fault(cls: type[Interceptor], **options: str) -> Interceptor:
    return cls(INFO, cls.parse_options(options))


def test_the_chains_clock_is_the_time_of_the_event_being_handled() -> None:
    seen: list[float] = []

    class Clocked(Interceptor):
        def client_data(self, data: bytes) -> bytes:
            seen.append(self.now())
            self.call_later(0.5, lambda: seen.append(self.now()))
            return data

    core = _core(Clocked(INFO))
    core.received(CLIENT, b"x", 12.25)
    assert core.timer_deadline() == 12.75
    core.tick(12.8)
    assert seen == [12.25, 12.8]


def test_latency_through_the_core_delays_and_then_passes_the_eof() -> None:
    core = _core(_fault(Latency, ms="200"))
    assert core.received(SERVER, b"late", 1.0) == []
    assert core.eof(SERVER, 1.1) == []  # held behind the chunk: no ShutdownWrite yet
    assert core.timer_deadline() == 1.2
    actions = core.tick(1.2)
    assert actions == [Send(CLIENT, b"late")]
    assert core.sent(CLIENT, 4, 1.21) == [ShutdownWrite(CLIENT)]  # the FIN after the bytes


def test_slow_close_through_the_core_delays_the_shutdown() -> None:
    core = _core(_fault(SlowClose, delay="500"))
    assert core.eof(SERVER, 2.0) == []
    assert core.tick(2.4) == []
    assert core.tick(2.5) == [ShutdownWrite(CLIENT)]
    assert core.eof(CLIENT, 2.6) == [
        ShutdownWrite(SERVER),
        End(EndReason.EOF, "", CLEAN),
    ]


def test_a_read_hold_stops_reading_until_the_queue_drains() -> None:
    core = _core(_fault(Latency, ms="100", max_queue="10"))
    core.received(SERVER, b"0123456789", 0.0)
    assert not core.may_read(SERVER) and core.may_read(CLIENT)
    core.tick(0.1)
    core.sent(CLIENT, 10, 0.1)
    assert core.may_read(SERVER)


def test_limit_closes_politely_after_its_bytes() -> None:
    core = _core(_fault(Limit, bytes="4"))
    actions = core.received(SERVER, b"abcdef", 0.0)
    assert actions == [Send(CLIENT, b"abcd"), ShutdownWrite(SERVER)]
    assert not core.may_read(CLIENT) and not core.may_read(SERVER)
    assert core.sent(CLIENT, 4, 0.1) == [
        ShutdownWrite(CLIENT),
        End(EndReason.EOF, "limit: 4 bytes from the server", CLEAN),
    ]


def test_a_blackhole_timeout_closes_both_sides() -> None:
    core = _core(_fault(Blackhole, timeout="1000"))
    assert core.received(SERVER, b"gone", 0.5) == []
    assert core.tick(1.0) == [
        ShutdownWrite(CLIENT),
        ShutdownWrite(SERVER),
        End(EndReason.EOF, "blackhole: closed after 1000 ms", CLEAN),
    ]


class Lookup(Interceptor):
    """Holds the client's first chunk while a thread job upper-cases it."""

    def client_data(self, data: bytes) -> bytes:
        self.run_in_thread(lambda: data.upper(), then=self.inject_to_server, hold="client")
        return b""


def test_a_thread_job_is_handed_out_not_run_and_holds_reading() -> None:
    core = _core(Lookup(INFO))
    assert core.received(CLIENT, b"abc", 0.0) == []  # not run inline: nothing yet
    (job,) = core.take_thread_jobs()
    assert not job.done
    assert core.take_thread_jobs() == []  # taken once
    assert not core.may_read(CLIENT) and core.may_read(SERVER)  # the job's hold
    job.run()  # what the shell does in a worker thread
    assert core.thread_done(job, 0.5) == [Send(SERVER, b"ABC")]
    core.sent(SERVER, 3, 0.6)
    assert core.may_read(CLIENT)  # the hold was released


def test_a_thread_jobs_callback_sees_the_time_of_its_completion() -> None:
    seen: list[float] = []

    class Timed(Interceptor):
        def start(self) -> None:
            self.run_in_thread(lambda: None, then=lambda _: seen.append(self.now()))

    core = _core(Timed(INFO))
    (job,) = core.take_thread_jobs()
    job.run()
    assert core.thread_done(job, 7.5) == []
    assert seen == [7.5]


def test_a_thread_job_back_after_the_flow_ended_is_dropped() -> None:
    core = _core(Lookup(INFO))
    core.received(CLIENT, b"abc", 0.0)
    (job,) = core.take_thread_jobs()
    assert core.failed(SERVER, "server: reset", 0.1) == [
        End(EndReason.RESET, "server: reset", (True, True))
    ]
    job.run()
    assert core.thread_done(job, 0.2) == []  # nothing is written to closed sockets


def test_jobs_not_taken_when_the_flow_ends_are_never_handed_out() -> None:
    core = _core(Lookup(INFO))
    core.received(CLIENT, b"abc", 0.0)
    core.cancel()
    assert core.take_thread_jobs() == []


def test_a_failing_thread_job_without_callback_ends_the_flow_as_error() -> None:
    class Fails(Interceptor):
        def client_data(self, data: bytes) -> bytes:
            self.run_in_thread(lambda: 1 / 0)
            return data

    core = _core(Fails(INFO))
    assert core.received(CLIENT, b"x", 0.0) == [Send(SERVER, b"x")]
    (job,) = core.take_thread_jobs()
    job.run()
    (end,) = core.thread_done(job, 1.0)
    assert isinstance(end, End) and end.reason == EndReason.ERROR and end.reset == (True, True)
    assert "ZeroDivisionError" in end.detail or "run_in_thread" in end.detail


def test_a_thread_jobs_callback_may_start_another_job_and_abort() -> None:
    class Twice(Interceptor):
        def start(self) -> None:
            self.run_in_thread(lambda: 1, then=self.again)

        def again(self, n: object) -> None:
            self.run_in_thread(lambda: 2, then=lambda m: self.abort(f"done {n} {m}"))

    core = _core(Twice(INFO))
    (first,) = core.take_thread_jobs()
    first.run()
    assert core.thread_done(first, 1.0) == []
    (second,) = core.take_thread_jobs()
    second.run()
    assert core.thread_done(second, 2.0) == [
        End(EndReason.INTERCEPTOR_ABORT, "done 1 2", (True, True))
    ]


def test_a_timer_abort_resets_both() -> None:
    class Later(Interceptor):
        def start(self) -> None:
            self.call_later(3, lambda: self.abort("late abort"))

    core = _core(Later(INFO))
    assert core.tick(3.0) == [End(EndReason.INTERCEPTOR_ABORT, "late abort", (True, True))]


def test_flows_without_timers_have_no_wakeup() -> None:
    class Plain(Interceptor):
        pass

    core = _core(Plain(INFO))
    core.received(CLIENT, b"x", 0.0)
    core.sent(SERVER, 1, 0.0)
    assert core.next_wakeup() is None and core.timer_deadline() is None
    assert core.eof(CLIENT, 1.0) == [ShutdownWrite(SERVER)]

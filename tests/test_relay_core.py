"""The flow core, Playbook-style: events in, actions out; no sockets, no event loop, no clock.

Each test feeds a :class:`~tproxy.relay.core.FlowCore` the events a shell would
(``received``, ``sent``, ``eof``, ``failed``, ``tick``, ...) at made-up times
and checks the actions it returns, in order, and what it allows next
(``may_read``, ``may_splice``, ``next_wakeup``).
"""

from __future__ import annotations

import logging

import pytest

from tproxy import Interceptor
from tproxy.flow import EndReason, FlowInfo, FlowRecord
from tproxy.interceptor import Chain, Output
from tproxy.relay.core import (
    CLIENT,
    LINGER,
    SERVER,
    SMALL_READ,
    End,
    FlowCore,
    Reset,
    Send,
    ShutdownWrite,
)

INFO = FlowInfo.example()
CLEAN = (False, False)
BOTH = (True, True)


def _core(*interceptors: type[Interceptor] | Interceptor, **kwargs: object) -> FlowCore:
    """A connected core (at t=0) with a chain of ``interceptors`` (none: passthrough)."""
    record = FlowRecord(info=INFO, started=0.0)
    built = [i if isinstance(i, Interceptor) else i(INFO) for i in interceptors]
    chain = Chain(built) if built else None
    core = FlowCore(INFO, record=record, chain=chain, **kwargs)  # type: ignore[arg-type]
    assert core.connected(0.0) == [] or interceptors
    return core


class Upper(Interceptor):
    def server_data(self, data: bytes) -> bytes:
        return data.upper()


class Double(Interceptor):
    def client_data(self, data: bytes) -> bytes:
        return data * 2


class HoldUntilEof(Interceptor):
    def __init__(self, flow: FlowInfo, options: object = None) -> None:
        super().__init__(flow, options)
        self.held = b""

    def client_data(self, data: bytes) -> bytes:
        self.held += data
        return b""

    def client_eof(self) -> bytes:
        return self.held


class Boom(Interceptor):
    def client_data(self, data: bytes) -> bytes:
        raise RuntimeError("boom")


class Forgetful(Interceptor):
    def client_data(self, data: bytes) -> bytes:
        data.upper()
        return None  # type: ignore[return-value]


class Forbid(Interceptor):
    def client_data(self, data: bytes) -> bytes:
        self.inject_to_client(b"403")
        self.abort("forbidden")


class Banner(Interceptor):
    def start(self) -> None:
        self.inject_to_client(b"hello\n")


class Peek(Interceptor):
    def client_data(self, data: bytes) -> bytes:
        self.passthrough()
        return data


class Ender(Interceptor):
    ended: list[str] = []

    def end(self, reason: str) -> None:
        Ender.ended.append(reason)


# -- passthrough, splice, backpressure --------------------------------------------------------


def test_without_interceptors_bytes_go_across_and_may_be_spliced():
    core = _core()
    assert core.may_splice(CLIENT) and core.may_splice(SERVER)
    assert core.received(CLIENT, b"abc", 1.0) == [Send(SERVER, b"abc")]
    assert core.record is not None and core.record.bytes_up == 3
    core.spliced(SERVER, 10, 2.0)
    assert (core.read, core.delivered) == ([3, 10], [10, 0])
    assert core.record.bytes_down == 10


def test_backpressure_nothing_is_read_while_the_other_side_has_bytes_queued():
    core = _core()
    assert core.received(CLIENT, b"x" * 100, 1.0) == [Send(SERVER, b"x" * 100)]
    assert not core.may_read(CLIENT) and not core.may_splice(CLIENT)
    assert core.may_read(SERVER)  # the other direction is not held up
    assert core.sent(SERVER, 60, 2.0) == []
    assert not core.may_read(CLIENT)
    assert core.sent(SERVER, 40, 3.0) == []
    assert core.may_read(CLIENT)
    assert core.delivered == [0, 100]


def test_a_watching_interceptor_turns_splice_off_and_sees_the_bytes():
    core = _core(Upper)
    assert not core.may_splice(SERVER) and core.may_read(SERVER)
    assert core.received(SERVER, b"hi", 1.0) == [Send(CLIENT, b"HI")]


def test_read_and_delivered_counters_differ_when_an_interceptor_rewrites():
    core = _core(Double)
    assert core.received(CLIENT, b"ab", 1.0) == [Send(SERVER, b"abab")]
    assert core.sent(SERVER, 4, 1.0) == []
    assert core.read == [2, 0] and core.delivered == [0, 4]
    assert core.record is not None and core.record.bytes_up == 2  # the record counts reads
    assert core.record.delivered_up is None  # said only once the flow has ended
    assert core.eof(CLIENT, 2.0) == [ShutdownWrite(SERVER)]
    ended = core.eof(SERVER, 3.0)
    assert [type(a) for a in ended] == [ShutdownWrite, End]
    assert (core.record.delivered_up, core.record.delivered_down) == (4, 0)


def test_passthrough_mid_flow_allows_splice_once_the_queue_is_written():
    core = _core(Peek)
    assert not core.may_splice(CLIENT)
    assert core.received(CLIENT, b"GET", 1.0) == [Send(SERVER, b"GET")]
    assert not core.watching
    assert not core.may_splice(CLIENT)  # "GET" is not written yet
    core.sent(SERVER, 3, 1.0)
    assert core.may_splice(CLIENT) and core.may_splice(SERVER)


def test_the_small_read_heuristic_reads_less_after_a_small_message():
    core = _core(read_size=1024 * 1024)
    assert core.next_read_size(CLIENT) == 1024 * 1024
    core.received(CLIENT, b"tiny", 1.0)
    assert core.next_read_size(CLIENT) == SMALL_READ
    core.sent(SERVER, 4, 1.0)
    core.received(CLIENT, b"x" * SMALL_READ, 1.0)
    assert core.next_read_size(CLIENT) == 1024 * 1024


# -- half-close -----------------------------------------------------------------------------


@pytest.mark.parametrize("first", [CLIENT, SERVER])
def test_half_close_either_order_ends_cleanly(first):
    core = _core()
    second = 1 - first
    assert core.eof(first, 1.0) == [ShutdownWrite(second)]
    assert not core.may_read(first) and core.may_read(second)
    assert core.received(second, b"late", 2.0) == [Send(first, b"late")]
    core.sent(first, 4, 2.0)
    assert core.eof(second, 3.0) == [ShutdownWrite(first), End(EndReason.EOF, "", CLEAN)]
    assert core.ended
    assert core.received(CLIENT, b"x", 4.0) == [] and core.tick(100.0) == []


def test_end_of_stream_waits_for_queued_bytes():
    core = _core()
    core.received(SERVER, b"reply", 1.0)
    assert core.eof(SERVER, 1.0) == []  # "reply" is not written yet
    assert core.sent(CLIENT, 5, 2.0) == [ShutdownWrite(CLIENT)]


def test_end_of_stream_is_flushed_through_the_chain_first():
    core = _core(HoldUntilEof)
    assert core.received(CLIENT, b"ab", 1.0) == []
    assert core.received(CLIENT, b"cd", 1.0) == []
    assert core.eof(CLIENT, 2.0) == [Send(SERVER, b"abcd")]
    assert core.sent(SERVER, 4, 2.0) == [ShutdownWrite(SERVER)]


def test_a_side_that_cannot_half_close_ends_the_pair_at_its_end_of_stream():
    core = _core(half_close=(False, True))  # the client is TLS
    core.received(CLIENT, b"upload", 1.0)
    # The server finished while the upload to it was still being written: that side is
    # reset (a FIN would pass the cut upload off as complete); the client closes politely.
    assert core.eof(SERVER, 2.0) == [End(EndReason.EOF, "", (False, True))]


def test_bytes_for_a_side_already_shut_are_dropped_with_a_warning(caplog):
    class LateInjector(Interceptor):
        def server_data(self, data: bytes) -> bytes:
            self.inject_to_server(b"late")
            return data

    core = _core(LateInjector)
    assert core.eof(CLIENT, 1.0) == [ShutdownWrite(SERVER)]
    with caplog.at_level(logging.WARNING, logger="tproxy.flow"):
        assert core.received(SERVER, b"r", 2.0) == [Send(CLIENT, b"r")]
    assert "dropped 4 bytes for the server" in caplog.text


# -- resets, errors, aborts, shutdown ----------------------------------------------------------


@pytest.mark.parametrize("side", [CLIENT, SERVER])
def test_a_reset_on_either_side_resets_both(side):
    Ender.ended = []
    core = _core(Ender)
    assert core.failed(side, "ConnectionResetError(104)", 1.0) == [
        End(EndReason.RESET, "ConnectionResetError(104)", BOTH)
    ]
    assert Ender.ended == ["reset"]
    assert core.failed(1 - side, "again", 2.0) == []


def test_an_interceptor_that_raises_ends_only_its_flow_as_error():
    Ender.ended = []
    core = _core(Boom, Ender)
    [end] = core.received(CLIENT, b"x", 1.0)
    assert end == End(end.reason, end.detail, BOTH)
    assert end.reason is EndReason.ERROR
    assert "Boom.client_data raised RuntimeError('boom')" in end.detail
    assert Ender.ended == ["error"]


def test_a_data_hook_that_returns_none_ends_the_flow_with_a_hint():
    [end] = _core(Forgetful).received(CLIENT, b"x", 1.0)
    assert end.reason is EndReason.ERROR
    assert "Forgetful.client_data" in end.detail
    assert "did you forget to return?" in end.detail


def test_abort_with_a_reply_resets_the_server_and_closes_the_client_after_the_reply():
    core = _core(Forbid)
    assert core.received(CLIENT, b"GET /", 5.0) == [Reset(SERVER), Send(CLIENT, b"403")]
    assert not core.may_read(CLIENT) and not core.may_read(SERVER)
    assert core.next_wakeup() == 5.0 + LINGER
    assert core.failed(SERVER, "closed", 5.05) == []  # the server was reset: moot
    assert core.sent(CLIENT, 3, 5.1) == [
        End(EndReason.INTERCEPTOR_ABORT, "forbidden", (False, True))
    ]


def test_an_abort_reply_the_client_does_not_take_in_time_resets_it():
    core = _core(Forbid)
    core.received(CLIENT, b"GET /", 5.0)
    assert core.tick(5.0 + LINGER / 2) == []
    assert core.tick(5.0 + LINGER) == [End(EndReason.INTERCEPTOR_ABORT, "forbidden", BOTH)]


def test_an_abort_reply_behind_a_half_written_chunk_resets_the_client_instead():
    core = _core(Forbid)
    core.received(SERVER, b"x" * 1000, 1.0)  # not written to the client yet
    assert core.received(CLIENT, b"GET /", 2.0) == [
        End(EndReason.INTERCEPTOR_ABORT, "forbidden", BOTH)
    ]


def test_cancel_is_a_shutdown_that_resets_both():
    core = _core()
    assert core.cancel() == [End(EndReason.SHUTDOWN, "cancelled", BOTH)]
    assert core.cancel() == []


# -- start, timeouts, timers, holds --------------------------------------------------------------


def test_injection_from_start_goes_out_on_connect():
    core = FlowCore(INFO, chain=Chain([Banner(INFO)]), connect_timeout=10.0)
    assert not core.may_read(CLIENT)  # still connecting
    assert core.connected(1.0) == [Send(CLIENT, b"hello\n")]
    assert core.may_read(CLIENT) and not core.may_read(SERVER)  # the banner goes first


def test_idle_timeout_counts_progress_either_way_writes_included():
    core = _core(idle_timeout=30.0)
    assert core.next_wakeup() == 30.0
    assert core.tick(29.9) == []
    core.received(CLIENT, b"x", 20.0)
    core.sent(SERVER, 1, 40.0)  # a slow destination took it: progress
    assert core.next_wakeup() == 70.0
    assert core.tick(69.0) == []
    assert core.tick(70.0) == [End(EndReason.TIMEOUT, "idle for 30s", BOTH)]


def test_connect_timeout():
    core = FlowCore(INFO, connect_timeout=10.0, now=100.0)
    assert core.next_wakeup() == 110.0
    assert core.tick(109.0) == []
    [end] = core.tick(110.0)
    assert end.reason is EndReason.CONNECT_FAILED
    assert end.detail == "timeout: connect to 198.51.100.20:80 timed out after 10s"


def test_a_connect_that_fails_and_a_client_that_resets_while_connecting():
    assert FlowCore(INFO).connect_failed("refused: Connection refused") == [
        End(EndReason.CONNECT_FAILED, "refused: Connection refused", BOTH)
    ]
    assert FlowCore(INFO).failed(CLIENT, "client: reset", 1.0) == [
        End(EndReason.RESET, "client: reset", BOTH)
    ]


class TimedChain:
    """A chain-like with the optional members: a timer and read holds."""

    interceptors = [object()]
    passthrough = False

    def __init__(self) -> None:
        self.deadline: float | None = 7.0
        self.holds_client_reading = True
        self.holds_server_reading = False
        self.ended: list[str] = []

    def start(self) -> Output:
        return Output()

    def client_data(self, data: bytes) -> Output:
        return Output(to_server=data)

    def server_data(self, data: bytes) -> Output:
        return Output(to_client=data)

    def next_deadline(self) -> float | None:
        return self.deadline

    def on_timer(self, now: float) -> Output:
        self.deadline = None
        self.holds_client_reading = False
        return Output(to_server=b"ping@%g" % now)

    def end(self, reason: str) -> None:
        self.ended.append(reason)


def test_the_chains_timer_and_read_holds_are_honoured():
    chain = TimedChain()
    core = FlowCore(INFO, chain=chain, idle_timeout=100.0)
    assert core.connected(0.0) == []
    assert not core.may_read(CLIENT) and core.may_read(SERVER)  # held
    assert core.next_wakeup() == 7.0 and core.timer_deadline() == 7.0
    assert core.tick(6.0) == []
    assert core.tick(7.5) == [Send(SERVER, b"ping@7.5")]
    assert core.next_wakeup() == 100.0 and core.timer_deadline() is None
    core.sent(SERVER, 8, 7.5)
    assert core.may_read(CLIENT)  # released by the timer
    core.cancel()
    assert chain.ended == ["shutdown"]


def test_a_chain_like_without_the_optional_members_has_no_timer_and_no_hold():
    class Bare:
        interceptors = [object()]
        passthrough = False

        def start(self) -> Output:
            return Output(to_client=b"hi")

        def client_data(self, data: bytes) -> Output:
            return Output(to_server=data[::-1])

        def end(self, reason: str) -> None:
            pass

    core = FlowCore(INFO, chain=Bare())
    assert core.connected(0.0) == [Send(CLIENT, b"hi")]
    assert core.received(CLIENT, b"abc", 1.0) == [Send(SERVER, b"cba")]
    assert core.next_wakeup() is None and core.tick(1e9) == []


# -- the tap --------------------------------------------------------------------------------------


class Tap:
    def __init__(self) -> None:
        self.events: list[tuple[str, int, bytes] | tuple[str, str]] = []

    def on_read(self, side: int, data: bytes) -> None:
        self.events.append(("read", side, data))

    def on_deliver(self, side: int, data: bytes) -> None:
        self.events.append(("deliver", side, data))

    def on_end(self, reason: str) -> None:
        self.events.append(("end", reason))


def test_a_tap_sees_reads_deliveries_and_the_end_and_turns_splice_off():
    tap = Tap()
    core = _core(Double, tap=tap)
    core2 = _core(tap=Tap())
    assert not core2.may_splice(CLIENT) and core2.may_read(CLIENT)
    core.received(CLIENT, b"ab", 1.0)
    core.cancel()
    assert tap.events == [
        ("read", CLIENT, b"ab"),
        ("deliver", SERVER, b"abab"),
        ("end", "shutdown"),
    ]

"""The fault interceptors on the Driver's virtual clock: exact timings, order, bytes, bounds."""

from __future__ import annotations

import os
from typing import Any

import pytest

from tproxy.flow import FlowInfo
from tproxy.interceptor import Interceptor, OptionError, Output
from tproxy.interceptors.bandwidth import Bandwidth
from tproxy.interceptors.blackhole import Blackhole
from tproxy.interceptors.latency import Latency
from tproxy.interceptors.limit import Limit
from tproxy.interceptors.reset import Reset
from tproxy.interceptors.slicer import Slicer
from tproxy.interceptors.slow_close import SlowClose
from tproxy.loading import load_interceptor
from tproxy.testing import Driver


def pump(d: Driver, side: str, data: bytes, chunk: int) -> None:
    """Feed ``data`` as a relay reads it: only while ``side`` is not held; time runs meanwhile."""
    feed = d.client if side == "client" else d.server
    for i in range(0, len(data), chunk):
        for _ in range(100_000):
            if not getattr(d, f"holds_{side}_reading"):
                break
            deadline = d.next_deadline
            assert deadline is not None, "reading held with no timer pending: the flow stalls"
            d.advance(max(0.0, deadline - d.time))
        else:
            raise AssertionError("reading stayed held")
        feed(data[i : i + chunk])


def delivered(
    events: list[tuple[float, Output]], side: str = "client"
) -> list[tuple[float, bytes]]:
    """``(time, bytes)`` of every timer round that sent something toward ``side``."""
    key = "to_client" if side == "client" else "to_server"
    return [(t, getattr(out, key)) for t, out in events if getattr(out, key)]


# -- latency -----------------------------------------------------------------------------


def test_latency_delays_each_server_chunk_by_exactly_ms_and_leaves_the_client_alone() -> None:
    d = Driver(Latency, ms="200")
    d.client(b"GET /")
    assert d.to_server == b"GET /"  # default direction: the server's bytes only
    d.server(b"HTTP/1.1 200 OK\r\n")
    d.advance(0.05)
    d.server(b"body")
    assert d.to_client == b""
    events = d.advance(1)
    assert delivered(events) == [(0.2, b"HTTP/1.1 200 OK\r\n"), (0.25, b"body")]


def test_latency_both_ways_adds_ms_to_each_half_of_a_round_trip() -> None:
    d = Driver(Latency, ms="100", direction="both")
    d.client(b"ping")
    assert delivered(d.advance(0.5), "server") == [(pytest.approx(0.1), b"ping")]
    d.server(b"pong")
    assert delivered(d.advance(0.5)) == [(pytest.approx(0.6), b"pong")]


def test_latency_with_jitter_keeps_the_order_and_stays_within_bounds() -> None:
    d = Driver(Latency, ms="100", jitter="50", seed="7")
    sent = []
    events = []
    for i in range(200):
        chunk = f"[{i}]".encode()
        sent.append((d.time, chunk))
        d.server(chunk)
        events += d.advance(0.01)
    events += d.advance_until_idle()
    got = delivered(events)
    assert b"".join(data for _, data in got) == b"".join(chunk for _, chunk in sent)
    times = [t for t, _ in got]
    assert times == sorted(times)
    # Every chunk came out no sooner than 50 ms and no later than 150 ms after it came in,
    # or together with a chunk ahead of it that was held longer (order is kept).
    releases = {}
    for t, data in got:
        for part in data.replace(b"][", b"]\0[").split(b"\0"):
            releases[part] = t
    for arrived, chunk in sent:
        delay = releases[chunk] - arrived
        assert 0.05 - 1e-9 <= delay <= 0.15 + 1e-9
    delays = {round(releases[c] - a, 6) for a, c in sent}
    assert len(delays) > 20  # the jitter did vary the delays


def test_latency_same_seed_same_timings() -> None:
    def run() -> list[tuple[float, bytes]]:
        d = Driver(Latency, ms="100", jitter="90", seed="3")
        for i in range(20):
            d.server(bytes([i]))
            d.advance(0.003)
        return delivered(d.advance_until_idle())

    assert run() == run()


def test_latency_holds_the_end_of_stream_behind_the_last_chunk() -> None:
    d = Driver(Latency, ms="300")
    d.server(b"tail")
    d.advance(0.1)
    d.server_eof()
    assert d.holds_server_eof and not d.client_half_closed
    d.advance(0.199)
    assert d.to_client == b"" and d.holds_server_eof
    events = d.advance(0.001)
    assert delivered(events) == [(0.3, b"tail")]
    assert d.client_half_closed


def test_latency_eof_with_nothing_queued_passes_at_once() -> None:
    d = Driver(Latency, ms="300")
    d.server_eof()
    assert d.client_half_closed


def test_latency_bounds_what_it_queues_with_backpressure() -> None:
    d = Driver(Latency, ms="100", max_queue="256k")
    data = os.urandom(4 * 1024 * 1024)
    pump(d, "server", data, 64 * 1024)
    d.advance_until_idle()
    assert d.to_client == data
    lane = d.interceptor.lanes["server"]  # type: ignore[attr-defined]
    assert 256 * 1024 <= lane.peak <= 256 * 1024 + 64 * 1024
    # 4 MiB through a 256 KiB window that drains every 100 ms: at least 1.6 s.
    assert d.time >= 1.6


# -- bandwidth --------------------------------------------------------------------------


def test_bandwidth_moves_one_mib_at_100k_in_10_24_seconds_with_bounded_memory() -> None:
    d = Driver(Bandwidth, rate="100k")
    data = os.urandom(1024 * 1024)
    pump(d, "server", data, 256 * 1024)
    events = d.advance_until_idle()
    assert d.to_client == data
    assert d.time == pytest.approx(1024 * 1024 / 102400)
    lane = d.interceptor.lanes["server"]  # type: ignore[attr-defined]
    assert lane.peak <= 64 * 1024 + 256 * 1024  # max-queue plus one read
    # Never ahead of the rate by more than one slice, at any moment.
    total = len(d.to_client) - sum(len(b) for _, b in delivered(events))
    for t, chunk in delivered(events):
        total += len(chunk)
        assert total <= 102400 * t + 2048 + 1


def test_bandwidth_paces_a_small_write_over_its_transmission_time() -> None:
    d = Driver(Bandwidth, rate="1000")  # 1000 bytes/s: slices of 20 bytes every 20 ms
    d.server(b"x" * 100)
    events = delivered(d.advance(1))
    assert [round(t, 6) for t, _ in events] == [0.02, 0.04, 0.06, 0.08, 0.1]
    assert all(chunk == b"x" * 20 for _, chunk in events)


def test_bandwidth_upstream_only() -> None:
    d = Driver(Bandwidth, rate="1k", direction="upstream")
    d.server(b"fast")
    assert d.to_client == b"fast"
    d.client(b"y" * 1024)
    assert d.to_server == b""
    d.advance(0.5)
    assert len(d.to_server) == 500  # slices of 20 bytes, each 20/1024 s after the one before
    d.client_eof()
    assert d.holds_client_eof
    d.advance(0.5)
    assert d.to_server == b"y" * 1024 and d.server_half_closed


@pytest.mark.parametrize(
    ("rate", "expected"), [("100k", 102400.0), ("1m", 1048576.0), ("500", 500.0), ("2K/s", 2048.0)]
)
def test_bandwidth_rates(rate: str, expected: float) -> None:
    assert Bandwidth.parse_options({"rate": rate}).rate == expected


# -- slicer ------------------------------------------------------------------------------


def test_slicer_cuts_into_fixed_slices_spaced_by_delay() -> None:
    d = Driver(Slicer, size="10", delay="5")
    d.server(bytes(range(95)))
    events = delivered(d.advance(1))
    assert [round(t, 6) for t, _ in events] == [round(0.005 * i, 6) for i in range(10)]
    assert [len(chunk) for _, chunk in events] == [10] * 9 + [5]
    assert b"".join(chunk for _, chunk in events) == bytes(range(95))


def test_slicer_with_no_delay_still_sends_each_slice_on_its_own() -> None:
    d = Driver(Slicer, size="3")
    d.server(b"abcdefgh")
    events = d.advance(0)
    assert [out.to_client for _, out in events] == [b"abc", b"def", b"gh"]


def test_slicer_variation_is_bounded_and_repeatable() -> None:
    def run() -> list[bytes]:
        d = Driver(Slicer, size="20", variation="15", delay="1", seed="11")
        d.server(os.urandom(1) * 5000)
        return [chunk for _, chunk in delivered(d.advance_until_idle())]

    first = run()
    assert all(5 <= len(c) <= 35 for c in first[:-1])
    assert len({len(c) for c in first}) > 10
    assert [len(c) for c in first] == [len(c) for c in run()]


def test_slicer_keeps_the_spacing_across_reads_and_holds_the_eof() -> None:
    d = Driver(Slicer, size="4", delay="10", direction="client")
    d.client(b"aaaabbbb")
    d.advance(0.005)
    d.client(b"cccc")
    d.client_eof()
    assert d.holds_client_eof
    events = delivered(d.advance(1), "server")
    assert [(round(t, 6), c) for t, c in events] == [
        (0.01, b"bbbb"),
        (0.02, b"cccc"),
    ]
    assert d.to_server == b"aaaabbbbcccc"
    assert not d.holds_client_eof and d.server_half_closed


def test_slicer_sha256_equal_for_large_random_data() -> None:
    d = Driver(Slicer, size="100", variation="99", seed="1", delay="0.1")
    data = os.urandom(300_000)
    pump(d, "server", data, 32 * 1024)
    d.advance_until_idle()
    assert d.to_client == data
    assert d.interceptor.lanes["server"].peak <= 64 * 1024 + 32 * 1024  # type: ignore[attr-defined]


# -- limit ---------------------------------------------------------------------------------


def test_limit_cuts_the_read_that_reaches_it_and_closes() -> None:
    d = Driver(Limit, bytes="10")
    d.client(b"request")
    d.server(b"1234")
    assert d.closed is None
    d.server(b"56789abcdef")
    assert d.to_client == b"123456789a"
    assert d.closed == "limit: 10 bytes from the server"
    assert d.to_server == b"request"


def test_limit_zero_closes_at_the_first_byte_and_counts_per_direction() -> None:
    d = Driver(Limit, bytes="0", direction="client")
    d.server(b"banner")
    assert d.to_client == b"banner" and d.closed is None
    d.client(b"x")
    assert d.to_server == b"" and d.closed is not None


# -- reset -----------------------------------------------------------------------------------


def test_reset_after_bytes_delivers_them_first() -> None:
    d = Driver(Reset, bytes="5")
    d.server(b"abcdefgh")
    assert d.to_client == b"abcde" and d.aborted is None
    d.advance(0)
    assert d.aborted == "reset: after 5 bytes"
    assert d.to_client == b"abcde"


def test_reset_after_a_time() -> None:
    d = Driver(Reset, after="300")
    d.server(b"data")
    assert d.to_client == b"data"
    d.advance(0.299)
    assert d.aborted is None
    d.advance(0.001)
    assert d.aborted == "reset: after 300 ms"
    assert d.time == pytest.approx(0.3)


def test_reset_without_options_resets_at_connect() -> None:
    d = Driver(Reset)
    assert d.aborted == "reset: at connect"


def test_reset_bytes_or_time_whichever_first() -> None:
    d = Driver(Reset, bytes="100", after="1000", direction="client")
    d.client(b"x" * 10)
    d.advance(1)
    assert d.aborted == "reset: after 1000 ms"


# -- blackhole -------------------------------------------------------------------------------


def test_blackhole_swallows_and_never_closes_without_a_timeout() -> None:
    d = Driver(Blackhole)
    d.client(b"GET / HTTP/1.1\r\n\r\n")
    d.server(b"HTTP/1.1 200 OK\r\n\r\n")
    d.advance(3600)
    assert d.to_server == b"GET / HTTP/1.1\r\n\r\n"
    assert d.to_client == b""
    assert d.closed is None and d.aborted is None
    assert d.interceptor.swallowed == {"client": 0, "server": 19}  # type: ignore[attr-defined]
    assert d.next_deadline is None


def test_blackhole_closes_after_its_timeout() -> None:
    d = Driver(Blackhole, timeout="1500", direction="both")
    d.client(b"hello")
    assert d.to_server == b""
    d.advance(1.499)
    assert d.closed is None
    d.advance(0.001)
    assert d.closed == "blackhole: closed after 1500 ms"
    assert d.ended == "eof"


def test_blackhole_lets_the_end_of_stream_pass() -> None:
    d = Driver(Blackhole)
    d.server(b"lost")
    d.server_eof()
    assert d.client_half_closed and d.to_client == b""


# -- slow-close ------------------------------------------------------------------------------


def test_slow_close_delays_the_fin_but_not_the_data() -> None:
    d = Driver(SlowClose, delay="750")
    d.server(b"all of it")
    assert d.to_client == b"all of it"
    d.advance(1)
    d.server_eof()
    assert d.holds_server_eof and not d.client_half_closed
    d.advance(0.749)
    assert not d.client_half_closed
    d.advance(0.001)
    assert d.client_half_closed
    d.client_eof()  # not a chosen direction: at once
    assert d.server_half_closed


def test_slow_close_both_directions() -> None:
    d = Driver(SlowClose, delay="100", direction="both")
    d.client_eof()
    d.advance(0.05)
    d.server_eof()
    d.advance(0.05)
    assert d.server_half_closed and not d.client_half_closed
    d.advance(0.05)
    assert d.client_half_closed


# -- common: toxicity, seed, options, the command line ----------------------------------------

ALL: list[tuple[type[Interceptor], dict[str, str]]] = [
    (Latency, {"ms": "100"}),
    (Bandwidth, {"rate": "10k"}),
    (Slicer, {"size": "1"}),
    (Limit, {"bytes": "1"}),
    (Reset, {"bytes": "1"}),
    (Blackhole, {}),
    (SlowClose, {"delay": "100"}),
]


@pytest.mark.parametrize(("cls", "options"), ALL, ids=lambda v: getattr(v, "__name__", ""))
def test_toxicity_zero_leaves_every_flow_alone(
    cls: type[Interceptor], options: dict[str, str]
) -> None:
    d = Driver((cls, {"toxicity": "0", "direction": "both", **options}))
    assert d.passthrough
    d.client(b"abc")
    d.server(b"def")
    d.client_eof()
    d.server_eof()
    assert (d.to_server, d.to_client) == (b"abc", b"def")
    assert d.server_half_closed and d.client_half_closed and d.next_deadline is None


def test_toxicity_affects_that_share_of_flows_repeatably() -> None:
    def affected(seed: str) -> list[bool]:
        opts = Blackhole.parse_options({"toxicity": "0.3", "seed": seed})
        result = []
        for flow_id in range(1000):
            d = Driver(Blackhole(FlowInfo(flow_id, ("192.0.2.1", 1), ("192.0.2.2", 2)), opts))
            result.append(not d.passthrough)
        return result

    first = affected("5")
    assert 240 <= sum(first) <= 360
    assert affected("5") == first
    assert affected("6") != first


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("latency", {}, "give ms="),
        ("latency", {"ms": "-1"}, "at least 0 ms"),
        ("latency", {"ms": "10", "jitter": "20"}, "must not exceed ms"),
        ("latency", {"ms": "ten"}, "ms must be a number"),
        ("latency", {"ms": "10", "direction": "sideways"}, "direction must be"),
        ("latency", {"ms": "10", "toxicity": "1.5"}, "between 0 and 1"),
        ("latency", {"ms": "10", "seed": "x"}, "seed must be an integer"),
        ("latency", {"ms": "10", "max-queue": "0"}, "at least 1 bytes"),
        ("bandwidth", {"rate": "0"}, "above 0"),
        ("bandwidth", {"rate": "fast"}, "must be a size"),
        ("slicer", {"size": "4", "variation": "4"}, "less than size"),
        ("slicer", {"size": "0"}, "at least 1"),
        ("limit", {}, "give bytes="),
        ("reset", {"after": "soon"}, "after must be a number"),
        ("blackhole", {"timeout": "-5"}, "at least 0 ms"),
        ("slow-close", {}, "give delay="),
        ("slow-close", {"delay": "5", "typo": "1"}, "unknown option 'typo'"),
    ],
)
def test_bad_options_are_one_line_errors(name: str, options: dict[str, str], message: str) -> None:
    from tproxy.loading import LoadError

    with pytest.raises(LoadError, match=message) as info:
        load_interceptor(name, options)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        ("latency", Latency),
        ("bandwidth", Bandwidth),
        ("slicer", Slicer),
        ("limit", Limit),
        ("reset", Reset),
        ("blackhole", Blackhole),
        ("slow-close", SlowClose),
    ],
)
def test_faults_are_built_ins(name: str, cls: Any) -> None:
    options = dict(dict(ALL)[cls])
    factory = load_interceptor(name, {**options, "direction": "downstream"})
    assert factory.cls is cls
    assert factory.options.common.directions == frozenset({"server"})


def test_option_error_type() -> None:
    with pytest.raises(OptionError):
        Latency.parse_options({"ms": "1", "direction": "nowhere"})


def test_a_bad_fault_option_stops_tproxy_run_before_it_listens() -> None:
    from explicit_harness import run_tproxy

    result = run_tproxy(
        "run", "--mode", "forward:127.0.0.1:9@127.0.0.1:9", "-i", "bandwidth", "-o", "rate=fast"
    )
    assert result.returncode == 2
    lines = str(result.stderr).strip().splitlines()
    assert len(lines) == 1 and "bandwidth" in lines[0] and "rate" in lines[0], lines

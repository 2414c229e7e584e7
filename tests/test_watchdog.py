"""The stall watchdog: a hook or task that holds the event loop is named, once, in the log.

Unit tests drive :mod:`tproxy.watchdog` directly (a chain with a sleeping
interceptor, a trio run with the instrument); the end-to-end test runs
``tproxy run`` with a sleeping interceptor and real clients on loopback.
"""

from __future__ import annotations

import socket
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from explicit_harness import echo_server, recv_exact, run_tproxy, running_proxy

from tproxy import watchdog
from tproxy.flow import FlowInfo
from tproxy.interceptor import Chain, Interceptor


@pytest.fixture(autouse=True)
def fresh_watch() -> Iterator[watchdog.StallWatch]:
    yield watchdog.configure(100)
    watchdog.configure(watchdog.DEFAULT_THRESHOLD_MS)


class Sleepy(Interceptor):
    def client_data(self, data: bytes) -> bytes:
        time.sleep(0.15)
        return data


class Quick(Interceptor):
    pass


def flow(flow_id: int) -> FlowInfo:
    return FlowInfo(id=flow_id, client=("192.0.2.1", 1), destination=("192.0.2.2", 2), mode="t")


def stall_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "tproxy.watchdog"]


def test_a_slow_hook_is_named_with_its_flow(caplog: pytest.LogCaptureFixture) -> None:
    chain = Chain([Quick(flow(7)), Sleepy(flow(7))])
    chain.client_data(b"x")
    chain.server_data(b"y")  # quick: not reported
    [line] = stall_lines(caplog)
    assert "interceptor Sleepy.client_data (flow 7)" in line
    assert watchdog.stall_count() == 1


def test_reports_are_rate_limited_but_counted(caplog: pytest.LogCaptureFixture) -> None:
    chain = Chain([Sleepy(flow(8))])
    for _ in range(3):
        chain.client_data(b"x")
    assert len(stall_lines(caplog)) == 1
    assert watchdog.stall_count() == 3
    watchdog.WATCH.last_line -= watchdog.WATCH.interval  # as if the interval had passed
    chain.client_data(b"x")
    lines = stall_lines(caplog)
    assert len(lines) == 2 and "+2 more since the last report" in lines[1]


def test_zero_turns_it_off(caplog: pytest.LogCaptureFixture) -> None:
    watchdog.configure(0)
    Chain([Sleepy(flow(9))]).client_data(b"x")
    assert stall_lines(caplog) == [] and watchdog.stall_count() == 0
    assert watchdog.instruments() == []


def test_the_instrument_names_a_task_that_blocks(caplog: pytest.LogCaptureFixture) -> None:
    async def blocker() -> None:
        time.sleep(0.15)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(blocker, name="the-blocker")
            for _ in range(5):
                await trio.sleep(0)  # many quick steps: none reported

    trio.run(main, instruments=watchdog.instruments())
    [line] = stall_lines(caplog)
    assert "task the-blocker" in line


def test_a_hook_stall_inside_a_task_is_reported_once(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        Chain([Sleepy(flow(10))]).client_data(b"x")

    trio.run(main, instruments=watchdog.instruments())
    [line] = stall_lines(caplog)
    assert "Sleepy.client_data (flow 10)" in line
    assert watchdog.stall_count() == 1


SLEEPER = """
    import time
    from tproxy import Interceptor

    class Sleeper(Interceptor):
        def client_data(self, data):
            if data.startswith(b"sleep"):
                time.sleep(0.3)
            return data
"""


def test_a_blocking_interceptor_through_a_real_proxy(tmp_path: Path) -> None:
    plugin = tmp_path / "sleeper.py"
    plugin.write_text(textwrap.dedent(SLEEPER))
    with echo_server() as echo:
        modes = [f"forward:127.0.0.1:{echo}"]
        with running_proxy(tmp_path, modes, "-i", f"{plugin}:Sleeper") as proxy:
            port = proxy.port("forward")
            assert exchange_line(port, b"quick") == b"quick"
            assert exchange_line(port, b"sleep") == b"sleep"
            assert exchange_line(port, b"quick") == b"quick"
            proxy.wait_log("event loop stalled")
            time.sleep(0.5)  # a second line, if there were one, would be there by now
    log = proxy.log()  # stopped: the summary is there too
    lines = [line for line in log.splitlines() if "event loop stalled" in line]
    assert len(lines) == 1, log
    assert "interceptor Sleeper.client_data (flow " in lines[0]
    assert "WARNING tproxy.watchdog" in lines[0]
    assert "1 event loop stall(s) over 100 ms in all" in log  # the count, at the stop
    assert "Traceback" not in log


def exchange_line(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.settimeout(10)
        sock.sendall(data)
        return recv_exact(sock, len(data))


@pytest.mark.parametrize("value", ["-1", "abc", "nan"])
def test_bad_stall_warn_values_are_usage_errors(value: str) -> None:
    result = run_tproxy("run", "--stall-warn", value, "--mode", "socks@127.0.0.1:1")
    assert result.returncode == 2
    assert "--stall-warn" in result.stderr and "Traceback" not in result.stderr


class SlowStart(Interceptor):
    def start(self) -> None:
        time.sleep(0.15)


def test_a_slow_start_is_named_too(caplog: pytest.LogCaptureFixture) -> None:
    Chain([SlowStart(flow(11))]).start()
    [line] = stall_lines(caplog)
    assert "interceptor SlowStart.start (flow 11)" in line

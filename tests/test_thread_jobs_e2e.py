"""``run_in_thread`` through a real ``tproxy run --mode forward:...`` on loopback.

A job runs in a worker thread, so while one flow's job is blocked the same
proxy still relays other flows; the job's flow gets the injected result
afterwards, in order; and a job that never returns does not hold up the
proxy's shutdown. The job here blocks until the test releases it (a file
appears), so "still running" is known by construction, not by timing.
"""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

import pytest
from explicit_harness import HANG_GUARD, connect, echo_server, recv_exact, running_proxy

pytestmark = pytest.mark.timeout(90)  # hang guard; each wait below has its own

HOOK = '''
import pathlib
import time

from tproxy import Interceptor

STARTED = pathlib.Path({started!r})
RELEASE = pathlib.Path({release!r})
FINISHED = pathlib.Path({finished!r})


def slow() -> bytes:
    """Block (in a worker thread) until the test releases it, at most 30 s."""
    STARTED.touch()
    deadline = time.monotonic() + 30
    while not RELEASE.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    FINISHED.touch()
    return b"X"


class Slow(Interceptor):
    def client_data(self, data: bytes) -> bytes:
        if data.startswith(b"slow"):
            self.run_in_thread(slow, then=lambda r: self.inject_to_server(r + data))
            return b""
        return data
'''


def _hook(tmp_path: Path) -> tuple[str, Path, Path, Path]:
    started, release, finished = (tmp_path / n for n in ("started", "release", "finished"))
    path = tmp_path / "slowhook.py"
    path.write_text(HOOK.format(started=str(started), release=str(release), finished=str(finished)))
    return f"{path}:Slow", started, release, finished


def _wait_file(path: Path) -> None:
    deadline = time.monotonic() + HANG_GUARD
    while not path.exists():
        assert time.monotonic() < deadline, f"{path.name} never appeared"
        time.sleep(0.01)


def test_a_blocked_job_does_not_stall_other_flows_and_its_result_comes_in_order(
    tmp_path: Path,
) -> None:
    spec, started, release, finished = _hook(tmp_path)
    with (
        echo_server() as echo,
        running_proxy(tmp_path, [f"forward:127.0.0.1:{echo}"], "-i", spec) as proxy,
    ):
        port = proxy.port("forward")
        try:
            with connect(port) as first:
                first.sendall(b"slow")
                _wait_file(started)  # the job runs, and blocks until released
                first.sendall(b"more")  # held behind the job (its read hold)
                with connect(port) as second:
                    second.sendall(b"fast")
                    # On a loop that ran the job inline this times out (HANG_GUARD).
                    assert recv_exact(second, 4) == b"fast"
                assert not finished.exists()  # the round trip happened while the job ran
                first.setblocking(False)
                with pytest.raises(BlockingIOError):
                    first.recv(100)  # nothing for the first flow before its job is back
                first.settimeout(HANG_GUARD)
                release.touch()
                assert recv_exact(first, 9) == b"Xslowmore"  # result, its data, then the rest
        finally:
            release.touch()


def test_a_job_that_never_returns_does_not_hold_up_shutdown(tmp_path: Path) -> None:
    spec, started, _release, finished = _hook(tmp_path)
    with (
        echo_server() as echo,
        running_proxy(
            tmp_path, [f"forward:127.0.0.1:{echo}"], "-i", spec, "--grace", "0.5"
        ) as proxy,
    ):
        with connect(proxy.port("forward")) as sock:
            sock.sendall(b"slow")
            _wait_file(started)
            proxy.proc.terminate()
            try:
                # The job blocks for 30 s; the proxy abandons it and exits after the grace.
                code = proxy.proc.wait(HANG_GUARD)
            except subprocess.TimeoutExpired:
                pytest.fail("the proxy waited for a running thread job at shutdown")
            assert code == 0, proxy.log()
            assert not finished.exists()
            sock.settimeout(HANG_GUARD)
            with pytest.raises(ConnectionResetError):
                while sock.recv(100):
                    pass
    assert "Traceback" not in proxy.log()


def test_the_echo_of_a_plain_flow_is_unchanged(tmp_path: Path) -> None:
    spec, *_ = _hook(tmp_path)
    with (
        echo_server() as echo,
        running_proxy(tmp_path, [f"forward:127.0.0.1:{echo}"], "-i", spec) as proxy,
    ):
        with connect(proxy.port("forward")) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for i in range(5):
                sock.sendall(bytes([65 + i]) * 10)
                assert recv_exact(sock, 10) == bytes([65 + i]) * 10

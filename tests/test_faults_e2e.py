"""The fault interceptors through a real ``tproxy run --mode forward:...`` on loopback.

The relay core drives the interceptors' timers (``tproxy/relay/core.py``).
These check that a fault was applied (a delay, a rate, a reset, a timeout, many small reads),
with the generous bounds the issue states; they are not benchmarks.
"""

from __future__ import annotations

import hashlib
import os
import socket
import statistics
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

import pytest
from explicit_harness import (
    HANG_GUARD,
    connect,
    echo_server,
    recv_exact,
    running_proxy,
    tcp_server,
)


def source_server(payload: Callable[[socket.socket], None]) -> AbstractContextManager[int]:
    """A TCP server that runs ``payload(conn)`` for each connection, then closes it."""
    return tcp_server(payload, timeout=HANG_GUARD * 3)


def forward(port: int) -> list[str]:
    return [f"forward:127.0.0.1:{port}"]


def round_trips(port: int, count: int) -> list[float]:
    """Seconds per 100-byte echo round trip, on one connection."""
    times = []
    with connect(port) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(count):
            message = bytes([i]) * 100
            began = time.monotonic()
            sock.sendall(message)
            assert recv_exact(sock, 100) == message
            times.append(time.monotonic() - began)
    return times


def rss_kib(pid: int) -> int:
    """Resident set size of a process (VmRSS), in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_latency_raises_the_median_round_trip_by_200_to_250_ms(tmp_path: Path) -> None:
    with echo_server() as echo:
        with running_proxy(tmp_path, forward(echo)) as plain:
            base = statistics.median(round_trips(plain.port("forward"), 10))
        with running_proxy(tmp_path, forward(echo), "-i", "latency", "-o", "ms=200") as slow:
            delayed = statistics.median(round_trips(slow.port("forward"), 10))
    assert 0.200 <= delayed - base <= 0.250, (base, delayed)


def test_bandwidth_moves_1_mib_at_100k_in_10_s_with_the_proxy_rss_flat(tmp_path: Path) -> None:
    offered = 32 * 1024 * 1024  # far more than is read: buffering it would show in the RSS
    block = os.urandom(64 * 1024)

    def flood(conn: socket.socket) -> None:
        for _ in range(offered // len(block)):
            conn.sendall(block)

    with (
        source_server(flood) as port,
        running_proxy(tmp_path, forward(port), "-i", "bandwidth", "-o", "rate=100k") as proxy,
    ):
        with connect(proxy.port("forward")) as sock:
            sock.settimeout(HANG_GUARD * 2)
            first = recv_exact(sock, 1)
            began = time.monotonic()
            start_rss = rss_kib(proxy.proc.pid)
            peak_rss = start_rss
            got = len(first)
            while got < 1024 * 1024:
                chunk = sock.recv(min(65536, 1024 * 1024 - got))
                assert chunk, "the proxy closed early"
                got += len(chunk)
                peak_rss = max(peak_rss, rss_kib(proxy.proc.pid))
            elapsed = time.monotonic() - began
    assert 9.0 <= elapsed <= 11.0, elapsed  # 10 s +-10% (100k = 102400 bytes/s: 10.24 s)
    assert peak_rss - start_rss < 8 * 1024, (start_rss, peak_rss)


def test_reset_gives_the_client_econnreset(tmp_path: Path) -> None:
    with (
        echo_server() as echo,
        running_proxy(tmp_path, forward(echo), "-i", "reset", "-o", "after=200") as proxy,
    ):
        with connect(proxy.port("forward")) as sock:
            sock.sendall(b"hello")
            assert recv_exact(sock, 5) == b"hello"
            with pytest.raises(ConnectionResetError):
                while sock.recv(100):
                    pass


def test_reset_after_bytes_gives_the_client_econnreset(tmp_path: Path) -> None:
    with (
        echo_server() as echo,
        running_proxy(tmp_path, forward(echo), "-i", "reset", "-o", "bytes=3") as proxy,
    ):
        with connect(proxy.port("forward")) as sock:
            sock.sendall(b"hello")
            with pytest.raises(ConnectionResetError):
                while sock.recv(100):
                    pass


def test_blackhole_gives_the_client_a_read_timeout(tmp_path: Path) -> None:
    with echo_server() as echo, running_proxy(tmp_path, forward(echo), "-i", "blackhole") as proxy:
        with connect(proxy.port("forward")) as sock:
            sock.settimeout(1.0)
            sock.sendall(b"anyone there?")
            with pytest.raises(TimeoutError):
                sock.recv(100)


def test_blackhole_with_a_timeout_closes_the_connection(tmp_path: Path) -> None:
    with (
        echo_server() as echo,
        running_proxy(tmp_path, forward(echo), "-i", "blackhole", "-o", "timeout=300") as proxy,
    ):
        with connect(proxy.port("forward")) as sock:
            sock.sendall(b"anyone there?")
            assert sock.recv(100) == b""


def test_slicer_delivers_the_same_bytes_in_many_small_reads(tmp_path: Path) -> None:
    payload = os.urandom(64 * 1024)

    def send(conn: socket.socket) -> None:
        conn.sendall(payload)

    with (
        source_server(send) as port,
        running_proxy(
            tmp_path,
            forward(port),
            "-i",
            "slicer",
            "-o",
            "size=100",
            "-o",
            "variation=50",
            "-o",
            "delay=1",
        ) as proxy,
    ):
        with connect(proxy.port("forward")) as sock:
            reads = []
            while chunk := sock.recv(65536):
                reads.append(chunk)
    received = b"".join(reads)
    assert hashlib.sha256(received).hexdigest() == hashlib.sha256(payload).hexdigest()
    assert len(reads) >= 100, len(reads)
    assert max(len(r) for r in reads) < 16 * 1024


def test_limit_closes_after_the_bytes(tmp_path: Path) -> None:
    payload = os.urandom(10_000)

    def send(conn: socket.socket) -> None:
        conn.sendall(payload)
        conn.recv(1)  # keep the connection open: the proxy must close it

    with (
        source_server(send) as port,
        running_proxy(tmp_path, forward(port), "-i", "limit", "-o", "bytes=1000") as proxy,
    ):
        with connect(proxy.port("forward")) as sock:
            received = b""
            while chunk := sock.recv(65536):
                received += chunk
    assert received == payload[:1000]


def test_slow_close_delays_the_fin(tmp_path: Path) -> None:
    def send(conn: socket.socket) -> None:
        conn.sendall(b"done")

    with (
        source_server(send) as port,
        running_proxy(tmp_path, forward(port), "-i", "slow-close", "-o", "delay=500") as proxy,
    ):
        with connect(proxy.port("forward")) as sock:
            assert recv_exact(sock, 4) == b"done"
            began = time.monotonic()
            assert sock.recv(100) == b""
            waited = time.monotonic() - began
    assert waited >= 0.4, waited

"""`tproxy run`'s UDP options and the UDP listener's pieces that need no routing."""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import sys
import time

import pytest

from tproxy.modes import parse_mode
from tproxy.udp.door import is_udp_only, tcp_specs
from tproxy.udp.sockets import (
    IP_ORIGDSTADDR,
    IPV6_ORIGDSTADDR,
    listening_socket,
    original_destination,
)

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="IP_TRANSPARENT needs root")

BAD = [
    (["--udp-idle", "0"], "must be positive"),
    (["--udp-idle", "soon"], "is not a number"),
    (["--udp-max-sessions", "0"], "must be at least 1"),
    (["--udp-max-sessions", "many"], "is not a whole number"),
    (["--mode", "transparent-udp:x@:1"], "takes no ':' argument"),
]


@pytest.mark.parametrize(("args", "message"), BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_udp_argument_is_one_line_and_exit_2(args: list[str], message: str) -> None:
    argv = [sys.executable, "-m", "tproxy", "run", "--mode", "transparent@127.0.0.1:1", *args]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_transparent_udp_mode() -> None:
    spec = parse_mode("transparent-udp@[::1]:5353")
    assert (spec.kind, spec.host, spec.port) == ("transparent-udp", "::1", 5353)
    assert spec.transparent and is_udp_only(spec)
    assert parse_mode("transparent-udp").port == 9091
    both = parse_mode("transparent@127.0.0.1:9091")
    assert tcp_specs([spec, both]) == [both]


def test_original_destination_from_ancillary_data() -> None:
    sin = (
        struct.pack("=H", socket.AF_INET)
        + struct.pack("!H", 53)
        + socket.inet_aton("198.51.100.2")
        + bytes(8)
    )
    sin6 = (
        struct.pack("=H", socket.AF_INET6)
        + struct.pack("!HI", 443, 0)
        + socket.inet_pton(socket.AF_INET6, "2001:db8::2")
        + bytes(4)
    )
    assert original_destination([(socket.SOL_IP, IP_ORIGDSTADDR, sin)]) == ("198.51.100.2", 53)
    assert original_destination([(socket.IPPROTO_IPV6, IPV6_ORIGDSTADDR, sin6)]) == (
        "2001:db8::2",
        443,
    )
    assert original_destination([]) is None
    assert original_destination([(socket.SOL_IP, IP_ORIGDSTADDR, sin[:5])]) is None
    assert original_destination([(socket.SOL_SOCKET, 1, sin)]) is None


@root_only
@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_listener_reports_the_destination_of_each_datagram(host: str) -> None:
    sock = listening_socket(host, 0)
    family = sock.family
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as client:
            client.bind((host, 0))
            client.sendto(b"x", sock.getsockname()[:2])
            deadline = time.monotonic() + 5
            while True:
                try:
                    data, anc, _flags, source = sock.recvmsg(100, socket.CMSG_SPACE(28))
                    break
                except BlockingIOError:
                    assert time.monotonic() < deadline
                    time.sleep(0.01)
            assert data == b"x"
            assert source[:2] == client.getsockname()[:2]
            # not diverted: the destination is the listener itself (the relay drops those)
            assert original_destination(anc) == sock.getsockname()[:2]
    finally:
        sock.close()


@root_only
def test_a_udp_only_listener_runs_and_stops_on_sigterm() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "tproxy", "run", "--mode", f"transparent-udp@127.0.0.1:{port}"],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 20
        while f"127.0.0.1:{port}" not in _udp_listeners():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            assert tcp.connect_ex(("127.0.0.1", port)) != 0  # no TCP listener there
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert f"listening: udp 127.0.0.1:{port}" in err and "received SIGTERM" in err


def _udp_listeners() -> str:
    return subprocess.run(["ss", "-Hlun"], capture_output=True, text=True).stdout

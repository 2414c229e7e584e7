"""A client that vanishes (its link goes down) has its flow reaped by TCP keepalive.

client -- gateway (tproxy, forward listener) -- server (echo). The client
exchanges a few bytes, then its interface goes down: no FIN, no reset, the
server idle. Without keepalive the flow stayed open for good (no
``--idle-timeout``); with ``--keepalive 1,1,2`` the gateway's probes go
unanswered and the flow ends (both ends closed) within about three seconds.
"""

from __future__ import annotations

import re
import socket
import sys
import time

import pytest
from nsharness import Topology, echo_server, parse_peer_line

FORWARD_PORT = 9000
ECHO_PORT = 7000
IDLE, INTERVAL, COUNT = 1, 1, 2
REAP_BOUND = 20.0
"""Hang guard: the flow must end long before this (keepalive gives up after ~3 s)."""


@pytest.mark.parametrize("interceptor", [[], ["-i", "replace", "-o", "old=zz", "-o", "new=yy"]],
                         ids=["hub", "interceptor"])  # fmt: skip
def test_a_vanished_client_is_reaped_within_the_keepalive_time(
    topology: Topology, interceptor: list[str]
) -> None:
    echo_server(topology.server, "0.0.0.0", ECHO_PORT)
    gw = topology.gateway
    proxy = gw.popen(
        sys.executable, "-m", "tproxy", "run",
        "--mode", f"forward:{topology.server_ip4}:{ECHO_PORT}@{topology.gw_in_ip4}:{FORWARD_PORT}",
        "--allow-client", topology.client_net4,
        "--keepalive", f"{IDLE},{INTERVAL},{COUNT}",
        *interceptor,
        log_name="tproxy",
    )  # fmt: skip
    gw.wait_port(FORWARD_PORT, topology.gw_in_ip4, proc=proxy)
    with topology.client.socket() as sock:
        sock.settimeout(10)
        sock.connect((topology.gw_in_ip4, FORWARD_PORT))
        reader = sock.makefile("rb")
        parse_peer_line(reader.readline())
        sock.sendall(b"still here\n")
        assert reader.readline() == b"still here\n"
        gw.wait_log(proxy, "open mode=forward")
        topology.client.ip("link", "set", topology.client_if, "down")
        vanished = time.monotonic()
        log = gw.wait_log(proxy, " end reason=", timeout=REAP_BOUND)
        took = time.monotonic() - vanished
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
    [end] = [line for line in log.splitlines() if " end reason=" in line]
    assert re.search(r"reason=(reset|timeout)", end), end
    assert "Traceback" not in log
    established = gw.run("ss", "-tnH", "state", "established").stdout
    assert f":{ECHO_PORT}" not in established, established  # the outgoing flow is gone too
    print(f"vanished client reaped after {took:.1f}s (keepalive {IDLE},{INTERVAL},{COUNT})")

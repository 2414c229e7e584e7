"""TCP keepalive and TCP_USER_TIMEOUT on both sockets of every flow.

Checked with ``getsockopt`` on the sockets the engine makes (the accepted
socket inherits the listener's options) and with ``ss`` on a running proxy
(the kernel's keepalive timer on both of a flow's sockets). That a vanished
client's flow is really reaped is the netns test ``test_explicit_vanished_client``.
"""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from explicit_harness import connect, echo_server, recv_exact, run_tproxy, running_proxy

from tproxy import keepalive
from tproxy.engine import Engine, EngineConfig
from tproxy.keepalive import Keepalive
from tproxy.sockets import SourcePolicy, listening_socket, outgoing_socket

OPTIONS = {
    "SO_KEEPALIVE": (socket.SOL_SOCKET, socket.SO_KEEPALIVE),
    "TCP_KEEPIDLE": (socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
    "TCP_KEEPINTVL": (socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
    "TCP_KEEPCNT": (socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
    "TCP_USER_TIMEOUT": (socket.IPPROTO_TCP, keepalive.TCP_USER_TIMEOUT),
}


def options(sock: socket.socket) -> dict[str, int]:
    return {name: sock.getsockopt(*where) for name, where in OPTIONS.items()}


def expected(setting: Keepalive) -> dict[str, int]:
    return {
        "SO_KEEPALIVE": 1,
        "TCP_KEEPIDLE": setting.idle,
        "TCP_KEEPINTVL": setting.interval,
        "TCP_KEEPCNT": setting.count,
        "TCP_USER_TIMEOUT": setting.user_timeout_ms,
    }


@pytest.fixture(autouse=True)
def restore() -> Iterator[None]:
    yield
    keepalive.use(keepalive.DEFAULT)


@pytest.mark.parametrize("setting", [keepalive.DEFAULT, Keepalive(7, 3, 4)])
def test_an_accepted_and_an_outgoing_socket_carry_the_setting(setting: Keepalive) -> None:
    Engine(EngineConfig(keepalive=setting), [])
    with listening_socket("127.0.0.1", 0, transparent=False) as listener:
        with socket.create_connection(listener.getsockname()) as client:
            accepted, _ = listener.accept()
            with accepted:
                assert options(accepted) == expected(setting)
            del client
    with outgoing_socket(("127.0.0.1", 9), None, SourcePolicy.GATEWAY, None) as out:
        assert options(out) == expected(setting)


def test_the_default_reaps_a_vanished_peer_within_a_few_minutes() -> None:
    assert EngineConfig().keepalive == keepalive.DEFAULT
    assert keepalive.DEFAULT.reap_after <= 180
    assert keepalive.DEFAULT.user_timeout_ms == keepalive.DEFAULT.reap_after * 1000


def test_off_sets_nothing() -> None:
    Engine(EngineConfig(keepalive=None), [])
    with listening_socket("127.0.0.1", 0, transparent=False) as listener:
        with socket.create_connection(listener.getsockname()):
            accepted, _ = listener.accept()
            with accepted:
                assert accepted.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 0
                assert accepted.getsockopt(socket.IPPROTO_TCP, keepalive.TCP_USER_TIMEOUT) == 0


@pytest.mark.parametrize(
    ("text", "setting"),
    [("60,10,6", Keepalive(60, 10, 6)), ("1,1,1", Keepalive(1, 1, 1)), ("off", None)],
)
def test_parse(text: str, setting: Keepalive | None) -> None:
    assert keepalive.parse(text) == setting


@pytest.mark.parametrize("text", ["", "60", "60,10", "a,b,c", "0,10,6", "60,10,0", "1,1,200"])
def test_bad_values_are_one_line_and_exit_2(text: str) -> None:
    result = run_tproxy("run", "--keepalive", text, "--mode", "socks@127.0.0.1:1")
    assert result.returncode == 2, result.stderr
    assert "--keepalive" in result.stderr and "Traceback" not in result.stderr


def keepalive_timers(port: int) -> list[str]:
    """``ss`` lines of established sockets on ``port`` (either end) with a keepalive timer."""
    out = subprocess.run(
        ["ss", "-tnoH", "state", "established", f"( sport = :{port} or dport = :{port} )"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [line for line in out.splitlines() if "timer:(keepalive" in line]


@pytest.mark.parametrize("interceptor", [False, True], ids=["hub", "interceptor"])
def test_both_sockets_of_a_running_flow_probe(tmp_path: Path, interceptor: bool) -> None:
    extra = ["-i", "hexdump"] if interceptor else []
    with echo_server() as echo:
        modes = [f"forward:127.0.0.1:{echo}"]
        with running_proxy(tmp_path, modes, "--keepalive", "30,5,3", *extra) as proxy:
            port = proxy.port("forward")
            with connect(port) as sock:
                sock.sendall(b"ping")
                assert recv_exact(sock, 4) == b"ping"
                incoming = [line for line in keepalive_timers(port) if f":{port} " in line]
                outgoing = keepalive_timers(echo)
    # The proxy's accepted socket (local port = the listener's); the proxy's
    # outgoing socket toward the echo server (the echo server's side has none).
    assert len(incoming) == 1, incoming
    assert len(outgoing) == 1, outgoing

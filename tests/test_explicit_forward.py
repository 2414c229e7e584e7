"""``--mode forward:HOST:PORT`` end to end, the start-time checks of every explicit option,
and shutdown of explicit flows.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from explicit_harness import (
    PAGE,
    REPLACE,
    RunningProxy,
    connect,
    curl,
    echo_server,
    expect_reset,
    free_port,
    http_server,
    recv_all,
    recv_exact,
    run_tproxy,
    running_proxy,
)
from python_socks.sync import Proxy

from tproxy import loading
from tproxy.cli import UsageError, build_parser
from tproxy.engine import Engine, EngineConfig
from tproxy.explicit import check_unused
from tproxy.explicit.settings import ExplicitSettings
from tproxy.modes import parse_mode
from tproxy.protocols import Policy
from tproxy.runner import open_doors


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    with http_server(tmp_path_factory.mktemp("site")) as port:
        yield port


@pytest.mark.parametrize("target", ["127.0.0.1", "localhost"])
def test_forward_in_front_of_http_server(tmp_path: Path, site: int, target: str) -> None:
    with running_proxy(tmp_path, [f"forward:{target}:{site}"]) as running:
        result = curl(f"http://127.0.0.1:{running.port('forward')}/index.html")
        assert result.returncode == 0, result.stderr
        assert result.stdout == PAGE
        assert "mode=forward" in running.wait_log(f"dst={target}:{site} up=")


def test_an_interceptor_rewrites_forwarded_flows(tmp_path: Path, site: int) -> None:
    with running_proxy(tmp_path, [f"forward:localhost:{site}"], *REPLACE) as running:
        result = curl(f"http://127.0.0.1:{running.port('forward')}/")
    assert result.stdout == PAGE.replace("world", "WORLD")


def test_an_unreachable_target_resets_the_client(tmp_path: Path) -> None:
    with running_proxy(tmp_path, [f"forward:127.0.0.1:{free_port()}"]) as running:
        expect_reset(running.port("forward"))
        assert "refused" in running.wait_log("reason=connect-failed")


@contextlib.contextmanager
def one_flow_per_client(tmp_path: Path) -> Iterator[RunningProxy]:
    """A forward listener to an echo server, one flow per client, its readiness probe ended."""
    with (
        echo_server() as echo,
        running_proxy(
            tmp_path, [f"forward:127.0.0.1:{echo}"], "--max-flows-per-client", "1"
        ) as running,
    ):
        # the harness's readiness probe was a flow too: let it end first
        running.wait_log(" end reason=")
        yield running


def test_per_client_cap_resets_the_extra_connection(tmp_path: Path) -> None:
    with one_flow_per_client(tmp_path) as running:
        with connect(running.port("forward")) as first:
            first.sendall(b"one")
            assert recv_exact(first, 3) == b"one"
            expect_reset(running.port("forward"))
        assert "--max-flows-per-client" in running.wait_log("reason=rejected")


def test_a_client_gets_its_slot_back_when_its_flow_ends(tmp_path: Path) -> None:
    with one_flow_per_client(tmp_path) as running:
        before = running.log().count(" end reason=eof client")  # the readiness probe's
        for flows in range(1, 4):
            with connect(running.port("forward")) as sock:
                sock.sendall(b"ping")
                assert recv_exact(sock, 4) == b"ping"
                sock.shutdown(socket.SHUT_WR)
                assert recv_all(sock) == b""
            # The client sees EOF a moment before the proxy books the end.
            log = running.wait_log(" end reason=eof client", count=before + flows)
    assert "reason=rejected" not in log, log


def test_a_failed_connect_gives_the_slot_back_too(tmp_path: Path) -> None:
    target = f"forward:127.0.0.1:{free_port()}"
    with running_proxy(tmp_path, [target], "--max-flows-per-client", "1") as running:
        running.wait_log(" end reason=")  # the readiness probe held the slot while it connected
        for _ in range(3):
            expect_reset(running.port("forward"))
        log = running.wait_log("reason=connect-failed")
    assert "reason=rejected" not in log, log


@pytest.mark.parametrize(
    ("target", "extra", "fast"),
    [
        ("127.0.0.1:80", [], True),
        ("[::1]:80", [], True),
        ("localhost:80", [], False),  # a name: resolved per connection, in a task
        # the hub relays copied and intercepted flows too
        ("127.0.0.1:80", ["--no-splice"], True),
        ("127.0.0.1:80", REPLACE, True),
    ],
)
def test_which_forward_listeners_the_hub_serves_without_a_task(
    target: str, extra: list[str], fast: bool
) -> None:
    listen = f"forward:{target}@127.0.0.1:{free_port()}"
    args = build_parser().parse_args(["run", "--mode", listen, *extra])
    engine = Engine(EngineConfig(splice=args.splice), loading.load_all(args.interceptors))
    doors = open_doors(args.mode, engine, args)
    try:
        assert (doors[0].fast is not None) is fast
    finally:
        for door in doors:
            door.close()


def test_shutdown_resets_explicit_flows_after_the_grace_period(tmp_path: Path) -> None:
    with (
        echo_server() as echo,
        running_proxy(
            tmp_path, ["socks", f"forward:127.0.0.1:{echo}"], "--grace", "0.2"
        ) as running,
    ):
        tunnel = Proxy.from_url(f"socks5://127.0.0.1:{running.port('socks')}").connect(
            "127.0.0.1", echo
        )
        with (
            tunnel,
            connect(running.port("forward")) as forwarded,
            connect(running.port("socks")) as udp_control,
        ):
            for sock in (tunnel, forwarded):
                sock.sendall(b"hi")
                assert recv_exact(sock, 2) == b"hi"
            # a UDP association, alive as long as its control connection
            udp_control.sendall(b"\x05\x01\x00\x05\x03\x00\x01" + bytes(6))
            assert recv_exact(udp_control, 12)[:4] == b"\x05\x00\x05\x00"
            running.wait_log("mode=socks-udp")
            running.proc.terminate()
            assert running.proc.wait(10) == 0
            for sock in (tunnel, forwarded, udp_control):
                assert recv_all(sock) == b""
        log = running.log()
    assert log.count("reason=shutdown") == 3, log
    assert "shutting down: 3 live flow(s)" in log


def test_an_idle_udp_association_ends_and_closes_its_control_connection(tmp_path: Path) -> None:
    with running_proxy(tmp_path, ["socks"], "--idle-timeout", "0.3") as running:
        with connect(running.port("socks")) as control:
            control.sendall(b"\x05\x01\x00\x05\x03\x00\x01" + bytes(6))
            assert recv_exact(control, 12)[:4] == b"\x05\x00\x05\x00"
            assert recv_all(control) == b""
        assert "idle for 0.3s" in running.wait_log("mode=socks-udp")


# -- start-time checks ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--mode", "socks@0.0.0.0:1080"], "non-loopback address"),
        (["--mode", "http@0.0.0.0:8080"], "--allow-public"),
        (["--mode", "forward:x:1@0.0.0.0:9000", "--credentials", "a:b"], "give --allow-client"),
        (["--mode", "socks@:1080", "--allow-net", "10.0.0.0/33"], "bad network '10.0.0.0/33'"),
        (["--mode", "socks@:1080", "--allow-host", "(unclosed"], "bad host pattern"),
        (["--mode", "socks@:1080", "--deny-port", "70000"], "--deny-port: port 70000 is out"),
        (["--mode", "socks@:1080", "--credentials", "nopassword"], "want user:password"),
        (["--mode", "socks@:1080", "--credentials-file", "/nonexistent"], "cannot read"),
        (["--mode", "socks@:1080", "--certfile", "/x.pem"], "add --mode http"),
        (["--mode", "http@:8080", "--keyfile", "/x.pem"], "--keyfile needs --certfile"),
        (["--mode", "http@:8080", "--certfile", "/nonexistent.pem"], "cannot read"),
        (["--mode", "socks@:1080", "--max-handshake", "10"], "must be 64..1048576"),
        (["--mode", "socks@:1080", "--handshake-timeout", "0"], "must be positive"),
        (["--mode", "socks@:1080", "--max-flows-per-client", "0"], "must be at least 1"),
    ],
)
def test_bad_options_are_one_line_and_exit_2(args: list[str], message: str) -> None:
    result = run_tproxy("run", *args)
    assert result.returncode == 2, result
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_a_public_listener_needs_credentials_a_client_list_or_the_force_flag() -> None:
    public = parse_mode("socks@192.0.2.1:1080")
    forward = parse_mode("forward:127.0.0.1:80@192.0.2.1:9000")
    with pytest.raises(UsageError):
        ExplicitSettings().check_listener(public)
    ExplicitSettings(policy=Policy.from_options(credentials=["a:b"])).check_listener(public)
    ExplicitSettings(policy=Policy.from_options(clients=["10.0.0.0/8"])).check_listener(public)
    ExplicitSettings(allow_public=True).check_listener(public)
    ExplicitSettings().check_listener(parse_mode("socks@[::1]:1080"))
    # forward cannot ask for credentials: only a client list or the flag will do
    with pytest.raises(UsageError):
        ExplicitSettings(policy=Policy.from_options(credentials=["a:b"])).check_listener(forward)
    ExplicitSettings(policy=Policy.from_options(clients=["10.0.0.0/8"])).check_listener(forward)


def test_a_listener_that_cannot_bind_is_one_line_and_exit_2() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        result = run_tproxy("run", "--mode", f"socks@127.0.0.1:{taken.getsockname()[1]}")
    assert result.returncode == 2 and "cannot listen" in result.stderr, result


def test_explicit_options_without_an_explicit_listener_are_refused() -> None:
    parser = build_parser()
    transparent_only = [parse_mode("transparent@127.0.0.1:9091")]
    for given in (
        ["--allow-host", "x"],
        ["--credentials", "a:b"],
        ["--allow-public"],
        ["--handshake-timeout", "3"],
    ):
        with pytest.raises(UsageError, match=given[0]):
            check_unused(parser.parse_args(["run", *given]), transparent_only)
    args = parser.parse_args(["run", "--allow-host", "x", "--mode", "socks"])
    check_unused(args, [*transparent_only, *args.mode])
    check_unused(parser.parse_args(["run"]), transparent_only)

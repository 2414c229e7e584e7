"""``--mode socks`` end to end on loopback: curl, python-socks and raw SOCKS bytes.

Every refusal is checked for the exact bytes the client receives before
the proxy closes the connection.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from explicit_harness import (
    PAGE,
    REPLACE,
    RunningProxy,
    blackhole,
    connect,
    curl,
    echo_server,
    exchange,
    expect_reset,
    free_port,
    http_server,
    ipv6_loopback,
    recv_all,
    recv_exact,
    running_proxy,
    udp_echo_server,
)
from python_socks import ProxyError
from python_socks.sync import Proxy


def socks5_failure(code: int) -> bytes:
    """A SOCKS5 reply with REP ``code`` and the address 0.0.0.0:0."""
    return bytes((5, code, 0, 1)) + bytes(6)


SOCKS4_REJECTED = b"\x00\x5b" + bytes(6)
NO_AUTH = b"\x05\x01\x00"
"""A SOCKS5 greeting offering "no authentication" only."""


def socks5_address(host: str, port: int) -> bytes:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        name = host.encode()
        return bytes((3, len(name))) + name + struct.pack(">H", port)
    return bytes((1 if ip.version == 4 else 4,)) + ip.packed + struct.pack(">H", port)


def socks5_request(command: int, host: str, port: int) -> bytes:
    return bytes((5, command, 0)) + socks5_address(host, port)


def socks4_request(command: int, ip: str, port: int, user: bytes = b"") -> bytes:
    return bytes((4, command)) + struct.pack(">H", port) + socket.inet_aton(ip) + user + b"\0"


def read_socks5_reply(sock: socket.socket) -> tuple[int, tuple[str, int]]:
    """REP and the bound address of one SOCKS5 reply."""
    head = recv_exact(sock, 4)
    assert head[:1] == b"\x05" and len(head) == 4, head
    size = {1: 4, 4: 16}[head[3]]
    raw = recv_exact(sock, size + 2)
    host = str(ipaddress.ip_address(raw[:size]))
    return head[1], (host, struct.unpack(">H", raw[size:])[0])


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """The port of a ``python -m http.server`` on 127.0.0.1."""
    with http_server(tmp_path_factory.mktemp("site")) as port:
        yield port


@pytest.fixture(scope="module")
def echo() -> Iterator[int]:
    with echo_server() as port:
        yield port


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningProxy]:
    """A socks listener with default options, shared by the tests that need no special ones."""
    with running_proxy(tmp_path_factory.mktemp("socks"), ["socks"]) as running:
        yield running


@pytest.mark.parametrize(
    ("option", "host"),
    [
        ("--socks4", "127.0.0.1"),
        ("--socks4a", "localhost"),
        ("--socks5", "127.0.0.1"),
        ("--socks5-hostname", "localhost"),
    ],
)
def test_curl_fetches_a_page_through_every_socks_version(
    proxy: RunningProxy, site: int, option: str, host: str
) -> None:
    result = curl(option, f"127.0.0.1:{proxy.port('socks')}", f"http://{host}:{site}/")
    assert result.returncode == 0, result.stderr
    assert result.stdout == PAGE
    assert "mode=socks client=127.0.0.1:" in proxy.wait_log(f"dst={host}:{site}")


@pytest.mark.parametrize(
    ("url", "rdns"),
    [("socks4", False), ("socks4", True), ("socks5", False), ("socks5", True)],
)
def test_python_socks_connects_and_relays(
    proxy: RunningProxy, echo: int, url: str, rdns: bool
) -> None:
    client = Proxy.from_url(f"{url}://127.0.0.1:{proxy.port('socks')}", rdns=rdns)
    with client.connect("localhost" if rdns else "127.0.0.1", echo, timeout=10) as sock:
        sock.sendall(b"ping through socks")
        assert recv_exact(sock, 18) == b"ping through socks"


@pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback")
def test_socks5_connects_to_an_ipv6_destination(proxy: RunningProxy) -> None:
    with echo_server("::1") as port:
        client = Proxy.from_url(f"socks5://127.0.0.1:{proxy.port('socks')}")
        with client.connect("::1", port, timeout=10) as sock:
            sock.sendall(b"six")
            assert recv_exact(sock, 3) == b"six"


def test_data_pipelined_behind_the_request_arrives_first(proxy: RunningProxy, echo: int) -> None:
    with connect(proxy.port("socks")) as sock:
        sock.sendall(NO_AUTH + socks5_request(1, "127.0.0.1", echo) + b"early bytes")
        assert recv_exact(sock, 2) == b"\x05\x00"
        code, _ = read_socks5_reply(sock)
        assert code == 0
        assert recv_exact(sock, 11) == b"early bytes"


def test_an_interceptor_rewrites_socks_flows(tmp_path: Path, site: int) -> None:
    with running_proxy(tmp_path, ["socks"], *REPLACE) as running:
        result = curl(
            "--socks5-hostname", f"127.0.0.1:{running.port('socks')}", f"http://localhost:{site}/"
        )
    assert result.stdout == PAGE.replace("world", "WORLD")


# -- credentials -------------------------------------------------------------


@pytest.fixture(scope="module")
def locked(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningProxy]:
    """A socks listener that requires alice's credentials (one from a file)."""
    path = tmp_path_factory.mktemp("creds")
    (path / "users").write_text("# users\nbob:b:o:b\n")
    with running_proxy(
        path, ["socks"], "--credentials", "alice:s3cret", "--credentials-file", str(path / "users")
    ) as running:
        yield running


def test_socks5_with_the_right_credentials(locked: RunningProxy, site: int) -> None:
    for user in ("alice:s3cret", "bob:b:o:b"):
        result = curl(
            "--socks5",
            f"127.0.0.1:{locked.port('socks')}",
            "--proxy-user",
            user,
            f"http://127.0.0.1:{site}/",
        )
        assert result.stdout == PAGE, result.stderr
    client = Proxy.from_url(f"socks5://alice:s3cret@127.0.0.1:{locked.port('socks')}")
    with client.connect("127.0.0.1", site, timeout=10) as sock:
        sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
        assert recv_all(sock).endswith(PAGE.encode())


def test_socks5_wrong_password_gets_the_rfc1929_failure(locked: RunningProxy, site: int) -> None:
    request = b"\x05\x01\x02" + b"\x01\x05alice\x05wrong" + socks5_request(1, "127.0.0.1", site)
    assert exchange(locked.port("socks"), request) == b"\x05\x02\x01\x01"
    result = curl(
        "--socks5",
        f"127.0.0.1:{locked.port('socks')}",
        "--proxy-user",
        "alice:nope",
        f"http://127.0.0.1:{site}/",
    )
    assert result.returncode != 0 and result.stdout == ""
    assert "authentication failed for user 'alice'" in locked.wait_log("user 'alice'")


def test_socks5_without_credentials_gets_no_acceptable_method(locked: RunningProxy) -> None:
    assert exchange(locked.port("socks"), NO_AUTH) == b"\x05\xff"


def test_socks4_is_refused_when_credentials_are_required(locked: RunningProxy, site: int) -> None:
    assert exchange(locked.port("socks"), socks4_request(1, "127.0.0.1", site)) == SOCKS4_REJECTED


# -- policy and connect failures ---------------------------------------------------------


def test_destination_rules_answer_not_allowed(tmp_path: Path, site: int, echo: int) -> None:
    args = ["--allow-port", str(site), "--deny-net", "127.0.0.0/8,::1", "--allow-host", "localhost"]
    with running_proxy(tmp_path, ["socks"], *args) as running:
        port = running.port("socks")
        # a port outside --allow-port
        assert exchange(port, NO_AUTH + socks5_request(1, "localhost", echo)) == (
            b"\x05\x00" + socks5_failure(2)
        )
        assert exchange(port, socks4_request(1, "127.0.0.1", echo)) == SOCKS4_REJECTED
        # an allowed name that resolves into a denied network
        assert exchange(port, NO_AUTH + socks5_request(1, "localhost", site)) == (
            b"\x05\x00" + socks5_failure(2)
        )
        # a name outside --allow-host (refused before any resolution)
        assert exchange(port, NO_AUTH + socks5_request(1, "example.invalid", site)) == (
            b"\x05\x00" + socks5_failure(2)
        )
        log = running.wait_log("not in the allowed destinations")
    assert "reason=rejected" in log and "denied (in 127.0.0.0/8)" in log


def test_refused_upstream_answers_connection_refused(proxy: RunningProxy) -> None:
    closed = free_port()
    port = proxy.port("socks")
    assert exchange(port, NO_AUTH + socks5_request(1, "127.0.0.1", closed)) == (
        b"\x05\x00" + socks5_failure(5)
    )
    assert exchange(port, socks4_request(1, "127.0.0.1", closed)) == SOCKS4_REJECTED
    client = Proxy.from_url(f"socks5://127.0.0.1:{port}")
    with pytest.raises(ProxyError) as caught:
        client.connect("127.0.0.1", closed, timeout=10)
    assert caught.value.error_code == 5
    assert "reason=connect-failed" in proxy.wait_log(f"dst=127.0.0.1:{closed}")


def test_connect_timeout_answers_ttl_expired(tmp_path: Path) -> None:
    with (
        blackhole() as hole,
        running_proxy(tmp_path, ["socks"], "--connect-timeout", "0.3") as running,
    ):
        reply = exchange(running.port("socks"), NO_AUTH + socks5_request(1, "127.0.0.1", hole))
        assert reply == b"\x05\x00" + socks5_failure(6)
        assert "timed out" in running.wait_log("reason=connect-failed")


# -- malformed, slow and oversize handshakes -----------------------------------------------


@pytest.mark.parametrize(
    ("request_bytes", "reply"),
    [
        (b"GET / HTTP/1.1\r\n\r\n", b""),
        (b"\x05\x00", b"\x05\xff"),
        (NO_AUTH + b"\x05\x09\x00\x01" + bytes(6), b"\x05\x00" + socks5_failure(7)),
        (NO_AUTH + b"\x05\x01\x00\x02" + bytes(6), b"\x05\x00" + socks5_failure(8)),
        (b"\x04\x07\x00\x50\x7f\x00\x00\x01\x00", SOCKS4_REJECTED),
    ],
    ids=["not-socks", "no-methods", "bad-command", "bad-address-type", "socks4-bad-command"],
)
def test_malformed_handshakes_get_the_protocol_error(
    proxy: RunningProxy, request_bytes: bytes, reply: bytes
) -> None:
    assert exchange(proxy.port("socks"), request_bytes) == reply


def test_slow_and_oversize_handshakes(tmp_path: Path, echo: int) -> None:
    args = ["--handshake-timeout", "0.3", "--max-handshake", "64"]
    with running_proxy(tmp_path, ["socks"], *args) as running:
        port = running.port("socks")
        # nothing at all: no protocol to answer in
        assert exchange(port, b"") == b""
        # a greeting cut short, a request never sent, a SOCKS4 user id never ended
        assert exchange(port, b"\x05\x02\x00") == b"\x05\xff"
        assert exchange(port, NO_AUTH + b"\x05\x01") == b"\x05\x00" + socks5_failure(1)
        assert exchange(port, b"\x04\x01\x00\x50\x7f\x00\x00\x01ali") == SOCKS4_REJECTED
        # a SOCKS4 user id past --max-handshake
        assert exchange(port, socks4_request(1, "127.0.0.1", echo, b"u" * 100)) == SOCKS4_REJECTED
        log = running.wait_log("larger than 64 bytes")
    assert log.count("reason=timeout") == 4, log


# -- caps and the client allow list ---------------------------------------------------------------


def test_per_client_and_total_caps_answer_general_failure(tmp_path: Path, echo: int) -> None:
    for cap in (["--max-flows-per-client", "1"], ["--max-flows", "1"]):
        with running_proxy(tmp_path, ["socks"], *cap) as running:
            port = running.port("socks")
            first = Proxy.from_url(f"socks5://127.0.0.1:{port}").connect("127.0.0.1", echo)
            with first:
                first.sendall(b"x")
                assert recv_exact(first, 1) == b"x"
                reply = exchange(port, NO_AUTH + socks5_request(1, "127.0.0.1", echo))
                assert reply == b"\x05\x00" + socks5_failure(1)
                assert exchange(port, socks4_request(1, "127.0.0.1", echo)) == SOCKS4_REJECTED
            # the slot is free again once the first flow ended
            running.wait_log("reason=eof")
            with Proxy.from_url(f"socks5://127.0.0.1:{port}").connect("127.0.0.1", echo) as again:
                again.sendall(b"y")
                assert recv_exact(again, 1) == b"y"


def test_clients_outside_the_allow_list_are_reset_at_once(tmp_path: Path) -> None:
    with running_proxy(tmp_path, ["socks"], "--allow-client", "10.0.0.0/8") as running:
        expect_reset(running.port("socks"), NO_AUTH)
        assert "client not in --allow-client" in running.wait_log("reason=rejected")


# -- BIND -----------------------------------------------------------------------------


@pytest.mark.parametrize("version", [4, 5])
def test_bind_relays_between_the_client_and_the_peer(proxy: RunningProxy, version: int) -> None:
    peer = socket.socket()
    peer.settimeout(10)
    peer.bind(("127.0.0.1", 0))
    peer_port = peer.getsockname()[1]
    with connect(proxy.port("socks")) as control, peer:
        if version == 4:
            control.sendall(socks4_request(2, "127.0.0.1", peer_port, b"ftp"))
            first = recv_exact(control, 8)
            assert first[:2] == b"\x00\x5a"
            bound = (socket.inet_ntoa(first[4:]), struct.unpack(">H", first[2:4])[0])
        else:
            control.sendall(NO_AUTH + socks5_request(2, "127.0.0.1", peer_port))
            assert recv_exact(control, 2) == b"\x05\x00"
            code, bound = read_socks5_reply(control)
            assert code == 0
        assert bound[0] == "127.0.0.1" and bound[1] != 0
        peer.connect(bound)
        if version == 4:
            second = recv_exact(control, 8)
            assert second == b"\x00\x5a" + struct.pack(">H", peer_port) + socket.inet_aton(
                "127.0.0.1"
            )
        else:
            assert read_socks5_reply(control) == (0, ("127.0.0.1", peer_port))
        peer.sendall(b"from the peer")
        assert recv_exact(control, 13) == b"from the peer"
        control.sendall(b"from the client")
        assert recv_exact(peer, 15) == b"from the client"
        control.shutdown(socket.SHUT_WR)
        assert recv_all(peer) == b""
    assert f"dst=127.0.0.1:{peer_port}" in proxy.wait_log(f"dst=127.0.0.1:{peer_port} up=15")


def test_bind_timeout_answers_ttl_expired(tmp_path: Path) -> None:
    with running_proxy(tmp_path, ["socks"], "--bind-timeout", "0.3") as running:
        with connect(running.port("socks")) as control:
            control.sendall(NO_AUTH + socks5_request(2, "127.0.0.1", 2000))
            assert recv_exact(control, 2) == b"\x05\x00"
            assert read_socks5_reply(control)[0] == 0
            assert recv_all(control) == socks5_failure(6)


# -- UDP ASSOCIATE --------------------------------------------------------------------------


def udp_header(host: str, port: int) -> bytes:
    return b"\0\0\0" + socks5_address(host, port)


def test_udp_associate_relays_datagrams_until_the_control_connection_closes(
    proxy: RunningProxy,
) -> None:
    with udp_echo_server() as echo_port, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.settimeout(10)
        udp.bind(("127.0.0.1", 0))
        with connect(proxy.port("socks")) as control:
            control.sendall(NO_AUTH + socks5_request(3, "0.0.0.0", 0))
            assert recv_exact(control, 2) == b"\x05\x00"
            code, relay = read_socks5_reply(control)
            assert code == 0 and relay[0] == "127.0.0.1"
            for name in ("127.0.0.1", "localhost"):
                udp.sendto(udp_header(name, echo_port) + b"datagram", relay)
                data, source = udp.recvfrom(65535)
                assert source == relay
                assert data == udp_header("127.0.0.1", echo_port) + b"echo:datagram"
            # malformed and fragmented datagrams are dropped, the relay goes on
            udp.sendto(b"\0\0", relay)
            udp.sendto(b"\0\0\x01" + udp_header("127.0.0.1", echo_port)[3:] + b"frag", relay)
            udp.sendto(udp_header("127.0.0.1", echo_port) + b"again", relay)
            assert udp.recvfrom(65535)[0].endswith(b"echo:again")
        log = proxy.wait_log("mode=socks-udp")
        log = proxy.wait_log("control connection closed")
    assert "up=21 down=36" in log, log


def test_udp_associate_drops_datagrams_to_denied_destinations(tmp_path: Path) -> None:
    with (
        udp_echo_server() as echo_port,
        running_proxy(tmp_path, ["socks"], "--deny-port", str(echo_port)) as running,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp,
    ):
        udp.settimeout(0.5)
        udp.bind(("127.0.0.1", 0))
        with connect(running.port("socks")) as control:
            control.sendall(NO_AUTH + socks5_request(3, "0.0.0.0", 0))
            assert recv_exact(control, 2) == b"\x05\x00"
            _, relay = read_socks5_reply(control)
            udp.sendto(udp_header("127.0.0.1", echo_port) + b"denied", relay)
            with pytest.raises(TimeoutError):
                udp.recvfrom(65535)
        assert f"port {echo_port} denied" in running.wait_log("dropped a datagram")


@pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback")
def test_a_socks_listener_on_ipv6_loopback_relays_streams_and_datagrams(
    tmp_path: Path, site: int
) -> None:
    with running_proxy(tmp_path, ["socks"], host="::1") as running:
        port = running.port("socks")
        result = curl("--socks5", f"[::1]:{port}", f"http://127.0.0.1:{site}/")
        assert result.stdout == PAGE, result.stderr
        with (
            udp_echo_server() as echo_port,
            socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as udp,
            socket.create_connection(("::1", port), timeout=10) as control,
        ):
            udp.settimeout(10)
            udp.bind(("::1", 0))
            control.sendall(NO_AUTH + socks5_request(3, "::", 0))
            assert recv_exact(control, 2) == b"\x05\x00"
            code, relay = read_socks5_reply(control)
            assert code == 0 and relay[0] == "::1"
            udp.sendto(udp_header("127.0.0.1", echo_port) + b"v6", relay)
            data, _ = udp.recvfrom(65535)
            assert data == udp_header("127.0.0.1", echo_port) + b"echo:v6"

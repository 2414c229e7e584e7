"""``--mode http`` end to end on loopback: curl (plain and TLS proxy) and raw requests.

Every refusal is checked for the exact response the client receives.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme
from explicit_harness import (
    PAGE,
    REPLACE,
    RunningProxy,
    blackhole,
    connect,
    curl,
    echo_server,
    exchange,
    free_port,
    http_server,
    recv_exact,
    running_proxy,
)

from tproxy.explicit.http import AT_CAPACITY, REQUEST_TIMEOUT, TOO_MANY_FROM_CLIENT
from tproxy.protocols import HttpProxyError, HttpProxyHandshake
from tproxy.protocols.http_proxy import (
    CONNECTION_ESTABLISHED,
    forbidden,
    proxy_auth_required,
    response_for_error,
)


def protocol_error_reply(raw: bytes) -> bytes:
    """What the sans-io parser answers to ``raw`` (the proxy must send exactly that)."""
    with pytest.raises(HttpProxyError) as caught:
        HttpProxyHandshake(max_head_size=256).receive_data(raw)
    return caught.value.reply


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    with http_server(tmp_path_factory.mktemp("site")) as port:
        yield port


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningProxy]:
    with running_proxy(tmp_path_factory.mktemp("http"), ["http"]) as running:
        yield running


@pytest.mark.parametrize("tunnel", [False, True], ids=["absolute-form", "connect"])
def test_curl_through_the_http_proxy(proxy: RunningProxy, site: int, tunnel: bool) -> None:
    args = ["-p"] if tunnel else []
    result = curl(
        *args, "-x", f"http://127.0.0.1:{proxy.port('http')}", f"http://localhost:{site}/"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == PAGE
    assert "mode=http" in proxy.wait_log(f"dst=localhost:{site}")


def test_a_forwarded_request_is_rewritten_and_its_body_relayed(proxy: RunningProxy) -> None:
    with echo_server() as echo, connect(proxy.port("http")) as sock:
        sock.sendall(
            f"POST http://127.0.0.1:{echo}/submit?x=1 HTTP/1.1\r\n"
            f"Host: elsewhere\r\nProxy-Connection: keep-alive\r\n"
            "Content-Length: 5\r\n\r\nhello".encode()
        )
        head = (
            f"POST /submit?x=1 HTTP/1.1\r\nHost: 127.0.0.1:{echo}\r\nContent-Length: 5\r\n"
            "Connection: close\r\n\r\n"
        ).encode()
        assert recv_exact(sock, len(head) + 5) == head + b"hello"


def test_connect_tunnel_bytes_behind_the_head_go_first(proxy: RunningProxy) -> None:
    with echo_server() as echo, connect(proxy.port("http")) as sock:
        sock.sendall(f"CONNECT 127.0.0.1:{echo} HTTP/1.1\r\n\r\nearly".encode())
        assert (
            recv_exact(sock, len(CONNECTION_ESTABLISHED) + 5) == CONNECTION_ESTABLISHED + b"early"
        )


@pytest.mark.parametrize("tunnel", [False, True], ids=["absolute-form", "connect"])
def test_an_interceptor_rewrites_http_flows(tmp_path: Path, site: int, tunnel: bool) -> None:
    args = ["-p"] if tunnel else []
    with running_proxy(tmp_path, ["http"], *REPLACE) as running:
        result = curl(
            *args, "-x", f"http://127.0.0.1:{running.port('http')}", f"http://127.0.0.1:{site}/"
        )
    assert result.stdout == PAGE.replace("world", "WORLD")


# -- TLS to the proxy --------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningProxy, Path]]:
    """An http listener over TLS (cert and key in separate files), and its CA file."""
    path = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    ca.cert_pem.write_to_path(str(path / "ca.pem"))
    cert.cert_chain_pems[0].write_to_path(str(path / "cert.pem"))
    cert.private_key_pem.write_to_path(str(path / "key.pem"))
    args = ["--certfile", str(path / "cert.pem"), "--keyfile", str(path / "key.pem"), *REPLACE]
    with running_proxy(path, ["http"], *args) as running:
        yield running, path / "ca.pem"


@pytest.mark.parametrize("tunnel", [False, True], ids=["absolute-form", "connect"])
def test_curl_speaks_tls_to_the_proxy(
    tls_proxy: tuple[RunningProxy, Path], site: int, tunnel: bool
) -> None:
    running, ca = tls_proxy
    args = ["-p"] if tunnel else []
    result = curl(
        *args,
        "-x",
        f"https://localhost:{running.port('http')}",
        "--proxy-cacert",
        str(ca),
        f"http://127.0.0.1:{site}/",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == PAGE.replace("world", "WORLD")


def test_tls_proxy_refuses_an_untrusted_client_handshake(
    tls_proxy: tuple[RunningProxy, Path], site: int
) -> None:
    running, _ = tls_proxy
    # without the CA, curl rejects the proxy's certificate and gives up
    result = curl("-x", f"https://localhost:{running.port('http')}", f"http://127.0.0.1:{site}/")
    assert result.returncode == 60, result.stderr
    # plain HTTP to a TLS listener is not a TLS handshake
    reply = exchange(
        running.port("http"), f"GET http://127.0.0.1:{site}/ HTTP/1.1\r\n\r\n".encode()
    )
    assert not reply.startswith(b"HTTP/")
    assert "TLS handshake failed" in running.wait_log("TLS handshake failed")


# -- credentials ----------------------------------------------------------------------------


def test_credentials_407_then_200(tmp_path: Path, site: int) -> None:
    with running_proxy(tmp_path, ["http"], "--credentials", "alice:s3cret") as running:
        port = running.port("http")
        connect_head = f"CONNECT 127.0.0.1:{site} HTTP/1.1\r\nHost: x\r\n\r\n"
        assert exchange(port, connect_head.encode()) == proxy_auth_required(
            "tproxy", "proxy authentication required"
        )
        wrong = connect_head.replace("Host: x", "Proxy-Authorization: Basic YWxpY2U6bm9wZQ==")
        assert exchange(port, wrong.encode()) == proxy_auth_required(
            "tproxy", "proxy authentication failed"
        )
        result = curl(
            "-x",
            f"http://127.0.0.1:{port}",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            f"http://127.0.0.1:{site}/",
        )
        assert result.stdout == "407"
        for tunnel in ([], ["-p"]):
            result = curl(
                *tunnel,
                "-x",
                f"http://127.0.0.1:{port}",
                "--proxy-user",
                "alice:s3cret",
                f"http://127.0.0.1:{site}/",
            )
            assert result.stdout == PAGE, result.stderr


# -- refusals -----------------------------------------------------------------------


def test_policy_refusal_is_403(tmp_path: Path, site: int) -> None:
    args = ["--deny-port", str(site), "--deny-host", r".*\.invalid"]
    with running_proxy(tmp_path, ["http"], *args) as running:
        port = running.port("http")
        reply = exchange(port, f"CONNECT 127.0.0.1:{site} HTTP/1.1\r\n\r\n".encode())
        assert reply == forbidden(f"port {site} denied ({site})")
        reply = exchange(port, b"GET http://www.example.invalid/ HTTP/1.1\r\n\r\n")
        assert reply == forbidden(r"www.example.invalid denied (matches '.*\\.invalid')")
        result = curl(
            "-x",
            f"http://127.0.0.1:{port}",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            f"http://127.0.0.1:{site}/",
        )
        assert result.stdout == "403"


def test_refused_upstream_is_502(proxy: RunningProxy) -> None:
    closed = free_port()
    for head in (
        f"CONNECT 127.0.0.1:{closed} HTTP/1.1\r\n\r\n",
        f"GET http://127.0.0.1:{closed}/ HTTP/1.1\r\n\r\n",
    ):
        assert exchange(proxy.port("http"), head.encode()) == response_for_error(errno.ECONNREFUSED)
    assert b"502 Bad Gateway" in response_for_error(errno.ECONNREFUSED)


def test_connect_timeout_is_504(tmp_path: Path) -> None:
    with (
        blackhole() as hole,
        running_proxy(tmp_path, ["http"], "--connect-timeout", "0.3") as running,
    ):
        reply = exchange(
            running.port("http"), f"CONNECT 127.0.0.1:{hole} HTTP/1.1\r\n\r\n".encode()
        )
        assert reply == response_for_error(errno.ETIMEDOUT)
        assert reply.startswith(b"HTTP/1.1 504 Gateway Timeout\r\n")


@pytest.mark.parametrize(
    "raw",
    [
        b"GARBAGE\r\n\r\n",
        b"GET /relative HTTP/1.1\r\nHost: x\r\n\r\n",
        b"CONNECT host-without-port HTTP/1.1\r\n\r\n",
        b"GET http://x/ HTTP/2.0\r\n\r\n",
        b"GET http://x/ HTTP/1.1\r\n" + b"X-Filler: " + b"a" * 300 + b"\r\n\r\n",
    ],
    ids=["garbage", "origin-form", "no-port", "version", "oversize"],
)
def test_malformed_and_oversize_requests(small: RunningProxy, raw: bytes) -> None:
    assert exchange(small.port("http"), raw) == protocol_error_reply(raw)


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningProxy]:
    """An http listener with a 256-byte head limit and a short handshake timeout."""
    args = ["--max-handshake", "256", "--handshake-timeout", "0.3"]
    with running_proxy(tmp_path_factory.mktemp("small"), ["http"], *args) as running:
        yield running


def test_a_slow_request_head_gets_408(small: RunningProxy) -> None:
    assert exchange(small.port("http"), b"GET http://x/ HTTP/1.1\r\nHost:") == REQUEST_TIMEOUT
    assert REQUEST_TIMEOUT.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    assert "handshake timed out" in small.wait_log("reason=timeout")


def test_caps_are_429_per_client_and_503_in_total(tmp_path: Path) -> None:
    with echo_server() as echo:
        for cap, expected in (
            (["--max-flows-per-client", "1"], TOO_MANY_FROM_CLIENT),
            (["--max-flows", "1"], AT_CAPACITY),
        ):
            with running_proxy(tmp_path, ["http"], *cap) as running:
                port = running.port("http")
                head = f"CONNECT 127.0.0.1:{echo} HTTP/1.1\r\n\r\n".encode()
                with connect(port) as first:
                    first.sendall(head)
                    assert recv_exact(first, len(CONNECTION_ESTABLISHED)) == CONNECTION_ESTABLISHED
                    assert exchange(port, head) == expected
    assert TOO_MANY_FROM_CLIENT.startswith(b"HTTP/1.1 429 Too Many Requests\r\n")
    assert AT_CAPACITY.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")


def test_tls_proxy_without_interceptors(tmp_path: Path, site: int) -> None:
    # No interceptor: the socket side of the pair may take the zero-copy path,
    # the TLS side must not.
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    ca.issue_cert("localhost").private_key_and_cert_chain_pem.write_to_path(
        str(tmp_path / "both.pem")
    )
    with running_proxy(tmp_path, ["http"], "--certfile", str(tmp_path / "both.pem")) as running:
        for tunnel in ([], ["-p"]):
            result = curl(
                *tunnel,
                "-x",
                f"https://localhost:{running.port('http')}",
                "--proxy-cacert",
                str(tmp_path / "ca.pem"),
                f"http://127.0.0.1:{site}/",
            )
            assert result.stdout == PAGE, result.stderr

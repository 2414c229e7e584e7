"""HTTP forward-proxy request heads: CONNECT, absolute-form, auth, every response."""

from __future__ import annotations

import base64
import errno
import socket
import time

import pytest

from tproxy.protocols import ConnectRequest, ForwardRequest, HttpProxyError, HttpProxyHandshake
from tproxy.protocols.http_proxy import (
    CONNECTION_ESTABLISHED,
    bad_gateway,
    bad_request,
    forbidden,
    gateway_timeout,
    http_response,
    method_not_allowed,
    parse_authority,
    proxy_auth_required,
    response_for_error,
    status_for_error,
)


def one(data: bytes, **kwargs: object) -> tuple[object, HttpProxyHandshake]:
    hs = HttpProxyHandshake(**kwargs)  # type: ignore[arg-type]
    events = hs.receive_data(data)
    assert len(events) == 1
    return events[0], hs


def refused(data: bytes, **kwargs: object) -> HttpProxyError:
    with pytest.raises(HttpProxyError) as info:
        HttpProxyHandshake(**kwargs).receive_data(data)  # type: ignore[arg-type]
    return info.value


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def auth(user: str, password: str) -> bool:
    return (user, password) == ("alice", "pa:ss")


# -- CONNECT -------------------------------------------------------------------


def test_connect_as_curl_sends_it() -> None:
    data = (
        b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n"
        b"User-Agent: curl/8.5.0\r\nProxy-Connection: Keep-Alive\r\n\r\n"
    )
    request, hs = one(data + b"\x16\x03\x01client hello")
    assert request == ConnectRequest(
        host="example.com",
        port=443,
        headers=(
            ("Host", "example.com:443"),
            ("User-Agent", "curl/8.5.0"),
            ("Proxy-Connection", "Keep-Alive"),
        ),
        version="HTTP/1.1",
    )
    assert hs.take_leftover() == b"\x16\x03\x01client hello"
    assert hs.reply_success() == CONNECTION_ESTABLISHED
    assert CONNECTION_ESTABLISHED == b"HTTP/1.1 200 Connection established\r\n\r\n"


def test_connect_ipv6_and_ip_literal() -> None:
    request, _ = one(b"CONNECT [2001:db8::1]:8443 HTTP/1.1\r\n\r\n")
    assert isinstance(request, ConnectRequest)
    assert request.address == ("2001:db8::1", 8443)
    request, _ = one(b"CONNECT 192.0.2.1:22 HTTP/1.0\r\n\r\n")
    assert isinstance(request, ConnectRequest)
    assert (request.address, request.version) == (("192.0.2.1", 22), "HTTP/1.0")


@pytest.mark.parametrize(
    "target",
    [
        b"example.com",  # no port
        b"example.com:",
        b"example.com:0",
        b"example.com:65536",
        b"example.com:http",
        b":443",
        b"[2001:db8::1]",
        b"[not-v6]:443",
        b"[::1]x:443",
        b"2001:db8::1:443",  # unbracketed IPv6
        b"http://example.com:443/",
        b"/path",
        b"*",
    ],
)
def test_bad_connect_targets_are_400(target: bytes) -> None:
    error = refused(b"CONNECT " + target + b" HTTP/1.1\r\n\r\n")
    assert error.status == 400
    assert error.reply.startswith(b"HTTP/1.1 400 Bad Request\r\n")


# -- absolute-form -------------------------------------------------------------


def test_absolute_form_get_is_rewritten() -> None:
    data = (
        b"GET http://example.com/index.html?q=1 HTTP/1.1\r\n"
        b"Host: example.com\r\n"
        b"User-Agent: curl/8.5.0\r\n"
        b"Accept: */*\r\n"
        b"Proxy-Connection: Keep-Alive\r\n"
        b"Proxy-Authorization: Basic Zm9vOmJhcg==\r\n"
        b"Connection: keep-alive, X-Secret\r\n"
        b"X-Secret: 1\r\n"
        b"Keep-Alive: timeout=5\r\n"
        b"\r\n"
    )
    request, hs = one(data)
    assert isinstance(request, ForwardRequest)
    assert (request.method, request.host, request.port) == ("GET", "example.com", 80)
    assert (request.target, request.version) == ("/index.html?q=1", "HTTP/1.1")
    assert ("X-Secret", "1") in request.headers
    assert request.head == (
        b"GET /index.html?q=1 HTTP/1.1\r\n"
        b"Host: example.com\r\n"
        b"User-Agent: curl/8.5.0\r\n"
        b"Accept: */*\r\n"
        b"Connection: close\r\n"
        b"\r\n"
    )
    assert hs.reply_success() == b""
    assert hs.leftover == b""


def test_host_is_replaced_or_added_from_the_url() -> None:
    request, _ = one(b"GET http://a.test:8080 HTTP/1.1\r\nHost: evil.test\r\n\r\n")
    assert isinstance(request, ForwardRequest)
    assert request.target == "/"
    assert request.head == b"GET / HTTP/1.1\r\nHost: a.test:8080\r\nConnection: close\r\n\r\n"
    request, _ = one(b"GET http://[::1]:80/x HTTP/1.0\r\nAccept: */*\r\n\r\n")
    assert isinstance(request, ForwardRequest)
    assert request.host == "::1"
    assert request.head == (
        b"GET /x HTTP/1.0\r\nHost: [::1]\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    )


def test_post_body_pipelined_after_the_head_is_kept() -> None:
    data = b"POST http://h.test/f HTTP/1.1\r\nContent-Length: 11\r\n\r\nhello world"
    request, hs = one(data)
    assert isinstance(request, ForwardRequest)
    assert (request.content_length, request.chunked) == (11, False)
    assert hs.take_leftover() == b"hello world"
    assert b"Content-Length: 11\r\n" in request.head
    hs.receive_data(b"more body")
    assert hs.leftover == b"more body"


def test_chunked_body_keeps_transfer_encoding() -> None:
    data = (
        b"PUT http://h.test/ HTTP/1.1\r\n"
        b"Transfer-Encoding: chunked\r\nConnection: Transfer-Encoding\r\n\r\n"
    )
    request, _ = one(data)
    assert isinstance(request, ForwardRequest)
    assert request.chunked and request.content_length is None
    assert b"Transfer-Encoding: chunked\r\n" in request.head


def test_options_without_path_is_asterisk_and_query_only_gets_slash() -> None:
    request, _ = one(b"OPTIONS http://h.test HTTP/1.1\r\n\r\n")
    assert isinstance(request, ForwardRequest) and request.target == "*"
    request, _ = one(b"GET http://h.test?x=1#frag HTTP/1.1\r\n\r\n")
    assert isinstance(request, ForwardRequest) and request.target == "/?x=1"


def test_tolerated_forms() -> None:
    request, _ = one(b"\r\n\r\nGET http://h.test/ HTTP/1.1\nHost: h.test\n\n")
    assert isinstance(request, ForwardRequest) and request.host == "h.test"
    request, _ = one(b"GET HTTP://H.test/ HTTP/1.1\r\nX:   spaced  value \t\r\n\r\n")
    assert isinstance(request, ForwardRequest) and ("X", "spaced  value") in request.headers


@pytest.mark.parametrize(
    "head",
    [
        b"GET /origin-form HTTP/1.1\r\n\r\n",
        b"GET * HTTP/1.1\r\n\r\n",
        b"GET https://h.test/ HTTP/1.1\r\n\r\n",
        b"GET ftp://h.test/ HTTP/1.1\r\n\r\n",
        b"GET http://user:pw@h.test/ HTTP/1.1\r\n\r\n",
        b"GET http:///nohost HTTP/1.1\r\n\r\n",
        b"GET http://h.test/ HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        b"GET http://h.test/ HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        b"GET http://h.test/ HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
        b"GET http://h.test/ HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"GET http://h.test/ HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
        b"GET http://h.test/ HTTP/1.1\r\n folded\r\n\r\n",
        b"GET http://h.test/ HTTP/1.1\r\nNo colon\r\n\r\n",
        b"GET http://h.test/ HTTP/1.1\r\nBad Name: x\r\n\r\n",
        b"GET http://h.test/ HTTP/1.1\r\nX: a\rb\r\n\r\n",
        b"GET http://h.test/ HTTP/1.1\r\nX: a\x00b\r\n\r\n",
        b"GET  http://h.test/ HTTP/1.1\r\n\r\n",
        b"GET http://h.test/\r\n\r\n",
        b"GET http://h.test/ HTTP/1.1 extra\r\n\r\n",
        b"G@T http://h.test/ HTTP/1.1\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",
    ],
)
def test_malformed_heads_are_400(head: bytes) -> None:
    error = refused(head)
    assert error.status == 400, error.reason
    assert error.reply.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert b"\r\nConnection: close\r\n" in error.reply


def test_unsupported_version_is_505() -> None:
    error = refused(b"GET http://h.test/ HTTP/2.0\r\n\r\n")
    assert error.status == 505
    assert error.reply.startswith(b"HTTP/1.1 505 HTTP Version Not Supported\r\n")


# -- size limits -----------------------------------------------------------------


def test_head_over_max_size_is_431() -> None:
    hs = HttpProxyHandshake(max_head_size=100)
    assert hs.receive_data(b"GET http://h.test/ HTTP/1.1\r\nX: " + b"a" * 60) == []
    with pytest.raises(HttpProxyError) as info:
        hs.receive_data(b"a" * 20)
    assert info.value.status == 431
    assert info.value.reply.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n")


def test_head_exactly_at_max_size_passes_with_a_big_body() -> None:
    head = b"GET http://h.test/ HTTP/1.1\r\nX: " + b"a" * 64 + b"\r\n\r\n"
    assert len(head) == 100
    request, hs = one(head + b"b" * 10_000, max_head_size=100)
    assert isinstance(request, ForwardRequest)
    assert hs.leftover == b"b" * 10_000


def test_leading_empty_lines_count_toward_the_limit() -> None:
    hs = HttpProxyHandshake(max_head_size=1000)
    with pytest.raises(HttpProxyError) as info:
        hs.receive_data(b"\r\n" * 501)
    assert info.value.status == 431


def test_byte_by_byte_is_linear() -> None:
    """Feeding a near-maximal head one byte at a time stays fast (no rescans)."""
    head = b"GET http://h.test/ HTTP/1.1\r\n" + b"X-Filler: " + b"a" * 200_000 + b"\r\n\r\n"
    hs = HttpProxyHandshake(max_head_size=len(head))
    started = time.perf_counter()
    events: list[object] = []
    for i in range(len(head)):
        events += hs.receive_data(head[i : i + 1])
    assert len(events) == 1
    assert time.perf_counter() - started < 5


def test_spaces_in_a_huge_header_value_are_not_quadratic() -> None:
    head = b"GET http://h.test/ HTTP/1.1\r\nX: a" + b" " * 200_000 + b"b\r\n\r\n"
    started = time.perf_counter()
    request, _ = one(head, max_head_size=len(head))
    assert isinstance(request, ForwardRequest)
    assert time.perf_counter() - started < 2


# -- authentication ---------------------------------------------------------------


def test_basic_proxy_authorization_accepted() -> None:
    data = (
        b"GET http://h.test/ HTTP/1.1\r\nProxy-Authorization: "
        + basic("alice", "pa:ss").encode()
        + b"\r\n\r\n"
    )
    request, _ = one(data, authenticate=auth)
    assert isinstance(request, ForwardRequest)
    assert request.user == "alice"
    assert b"Proxy-Authorization" not in request.head
    request, _ = one(
        b"CONNECT h.test:443 HTTP/1.1\r\nproxy-authorization: "
        + basic("alice", "pa:ss").replace("Basic", "basic").encode()
        + b"\r\n\r\n",
        authenticate=auth,
    )
    assert isinstance(request, ConnectRequest) and request.user == "alice"


@pytest.mark.parametrize(
    "header",
    [
        None,
        basic("alice", "wrong"),
        basic("bob", "pa:ss"),
        "Basic !!!not-base64",
        "Basic " + base64.b64encode(b"no-colon").decode(),
        "Bearer abc",
    ],
)
def test_missing_or_wrong_credentials_are_407(header: str | None) -> None:
    line = b"" if header is None else f"Proxy-Authorization: {header}\r\n".encode()
    error = refused(b"CONNECT h.test:443 HTTP/1.1\r\n" + line + b"\r\n", authenticate=auth)
    assert error.status == 407
    assert error.reply.startswith(b"HTTP/1.1 407 Proxy Authentication Required\r\n")
    assert b'\r\nProxy-Authenticate: Basic realm="tproxy"\r\n' in error.reply


def test_two_authorization_headers_are_407() -> None:
    value = basic("alice", "pa:ss").encode()
    error = refused(
        b"CONNECT h.test:443 HTTP/1.1\r\nProxy-Authorization: "
        + value
        + b"\r\nProxy-Authorization: "
        + value
        + b"\r\n\r\n",
        authenticate=auth,
    )
    assert error.status == 407


def test_malformed_beats_authentication() -> None:
    assert refused(b"CONNECT h.test HTTP/1.1\r\n\r\n", authenticate=auth).status == 400


# -- responses ----------------------------------------------------------------------


def parse_response(data: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return status, headers, body


@pytest.mark.parametrize(
    ("response", "status"),
    [
        (bad_request(), 400),
        (forbidden(), 403),
        (method_not_allowed(), 405),
        (proxy_auth_required(), 407),
        (bad_gateway(), 502),
        (gateway_timeout(), 504),
        (http_response(431), 431),
    ],
)
def test_every_error_response_is_complete_and_closes(response: bytes, status: int) -> None:
    got, headers, body = parse_response(response)
    assert got == status
    assert headers["Connection"] == "close"
    assert int(headers["Content-Length"]) == len(body) > 0
    assert headers["Content-Type"].startswith("text/plain")


def test_specific_headers() -> None:
    assert parse_response(proxy_auth_required())[1]["Proxy-Authenticate"] == 'Basic realm="tproxy"'
    assert parse_response(method_not_allowed())[1]["Allow"] == "CONNECT"
    assert forbidden("no\r\nInjected: 1").count(b"Injected: 1\r\n") == 0


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (ConnectionRefusedError(errno.ECONNREFUSED, "refused"), 502),
        (OSError(errno.EHOSTUNREACH, "unreachable"), 502),
        (socket.gaierror(socket.EAI_NONAME, "no name"), 502),
        (TimeoutError(), 504),
        (OSError(errno.ETIMEDOUT, "timeout"), 504),
        (None, 502),
    ],
)
def test_status_for_connect_errors(error: BaseException | None, status: int) -> None:
    assert status_for_error(error) == status
    assert parse_response(response_for_error(error))[0] == status
    hs = HttpProxyHandshake()
    hs.receive_data(b"CONNECT h.test:1 HTTP/1.1\r\n\r\n")
    assert parse_response(hs.reply_failure(error))[0] == status
    assert parse_response(hs.reply_denied())[0] == 403


def test_parse_authority() -> None:
    assert parse_authority("h.test", 80) == ("h.test", 80)
    assert parse_authority("h.test:", 80) == ("h.test", 80)
    assert parse_authority("[::1]", 80) == ("::1", 80)
    assert parse_authority("[::1]:81", None) == ("::1", 81)
    with pytest.raises(HttpProxyError):
        parse_authority("h.test", None)


def test_complete_head_one_byte_over_max_size_is_431() -> None:
    head = b"GET http://h.test/ HTTP/1.1\r\nX: " + b"a" * 65 + b"\r\n\r\n"
    assert len(head) == 101
    for chunks in ([head], [head[:50], head[50:]], [bytes([b]) for b in head]):
        hs = HttpProxyHandshake(max_head_size=100)
        with pytest.raises(HttpProxyError) as info:
            for chunk in chunks:
                hs.receive_data(chunk)
        assert info.value.status == 431


def test_non_ascii_digits_are_not_numbers() -> None:
    error = refused(b"POST http://h.test/ HTTP/1.1\r\nContent-Length: \xb2\r\n\r\n")
    assert error.status == 400

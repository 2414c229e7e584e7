"""tproxy.http: HTTP/1.1 messages through hooks, byte-identical unless changed."""

from __future__ import annotations

import itertools
import logging

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tproxy.http import HttpInterceptor, Request, Response
from tproxy.testing import Driver


def split_feed(d: Driver, side: str, data: bytes, cuts: list[int]) -> None:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    for a, b in itertools.pairwise(points):
        getattr(d, side)(data[a:b])


class Watch(HttpInterceptor):
    """Records what the hooks saw; changes nothing."""

    def __init__(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.seen: list[tuple[str, str, bytes]] = []

    def request(self, req: Request) -> None:
        self.seen.append(("req", f"{req.method} {req.target}", req.body))

    def response(self, req: Request, resp: Response) -> None:
        self.seen.append(("resp", f"{req.method} {resp.status}", resp.body))


REQUESTS = [
    b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
    b"POST /form HTTP/1.1\r\nhost:  a \r\nContent-Length: 5\r\nX-Odd:\tv\r\n\r\nhello",
    b"HEAD /x HTTP/1.1\r\nHost: a\r\n\r\n",
    b"PUT /c HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"3;ext=1\r\nabc\r\n0A\r\n0123456789\r\n0\r\nX-Trailer: t\r\n\r\n",
    b"GET /304 HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET /204 HTTP/1.0\r\nHost: a\r\n\r\n",
]
RESPONSES = [
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi",
    b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\ncontent-length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n",  # HEAD: no body
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nchunk\r\n0\r\n\r\n",
    b"HTTP/1.1 304 Not Modified\r\nETag: x\r\n\r\n",
    b"HTTP/1.1 204 No Content\r\n\r\n",
]
EXPECTED_SEEN = [
    ("req", "GET /", b""),
    ("req", "POST /form", b"hello"),
    ("req", "HEAD /x", b""),
    ("req", "PUT /c", b"abc0123456789"),
    ("req", "GET /304", b""),
    ("req", "GET /204", b""),
    ("resp", "GET 200", b"hi"),
    ("resp", "POST 201", b""),
    ("resp", "HEAD 200", b""),
    ("resp", "PUT 200", b"chunk"),
    ("resp", "GET 304", b""),
    ("resp", "GET 204", b""),
]


@settings(max_examples=150, deadline=None)
@given(
    cuts_up=st.lists(st.integers(0, 10**6), max_size=40),
    cuts_down=st.lists(st.integers(0, 10**6), max_size=40),
)
def test_unchanged_pipelined_messages_are_byte_identical_across_any_split(
    cuts_up: list[int], cuts_down: list[int]
) -> None:
    d = Driver(Watch)
    up, down = b"".join(REQUESTS), b"".join(RESPONSES)
    split_feed(d, "client", up, cuts_up)
    split_feed(d, "server", down, cuts_down)
    d.client_eof()
    d.server_eof()
    assert d.to_server == up
    assert d.to_client == down
    assert sorted(d.interceptor.seen) == sorted(EXPECTED_SEEN)  # type: ignore[attr-defined]
    assert not d.passthrough


def test_keep_alive_interleaved() -> None:
    d = Driver(Watch)
    for req, resp in zip(REQUESTS, RESPONSES, strict=True):
        d.client(req)
        d.server(resp)
    assert d.to_server == b"".join(REQUESTS) and d.to_client == b"".join(RESPONSES)
    assert d.interceptor.seen[-2:] == [  # type: ignore[attr-defined]
        ("req", "GET /204", b""),
        ("resp", "GET 204", b""),
    ]


class Rewrite(HttpInterceptor):
    """Replaces 'cat' with 'tiger' in response bodies; tags requests with a header."""

    def request(self, req: Request) -> None:
        if req.target == "/tag":
            req.set_header("X-Tag", "1")

    def response(self, req: Request, resp: Response) -> None:
        resp.body = resp.body.replace(b"cat", b"tiger")


def test_changed_body_gets_a_correct_content_length() -> None:
    d = Driver(Rewrite)
    d.client(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    d.server(b"HTTP/1.1 200 OK\r\nServer: s\r\nContent-Length: 5\r\n\r\na cat")
    assert d.to_client == b"HTTP/1.1 200 OK\r\nServer: s\r\nContent-Length: 7\r\n\r\na tiger"


def test_changed_chunked_body_is_rechunked_with_its_trailers() -> None:
    d = Driver(Rewrite)
    d.client(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    d.server(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"2\r\na \r\n3\r\ncat\r\n0\r\nT: 1\r\n\r\n"
    )
    assert d.to_client == (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n7\r\na tiger\r\n0\r\nT: 1\r\n\r\n"
    )


def test_unchanged_body_keeps_its_bytes_when_only_headers_change() -> None:
    d = Driver(Rewrite)
    d.client(
        b"POST /tag HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nx\r\n0\r\n\r\n"
    )
    assert d.to_server == (
        b"POST /tag HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n"
        b"X-Tag: 1\r\n\r\n1\r\nx\r\n0\r\n\r\n"
    )


def test_response_until_close_is_completed_at_eof() -> None:
    d = Driver(Rewrite)
    d.client(b"GET / HTTP/1.0\r\n\r\n")
    d.server(b"HTTP/1.0 200 OK\r\n\r\none cat")
    assert d.to_client == b""
    d.server(b", two cats")
    d.server_eof()
    assert d.to_client == b"HTTP/1.0 200 OK\r\nContent-Length: 21\r\n\r\none tiger, two tigers"


class Small(Rewrite):
    max_body = 10


def test_bodies_over_max_body_stream_through_untouched() -> None:
    d = Driver(Small)
    d.client(b"GET / HTTP/1.1\r\n\r\n")
    d.server(b"HTTP/1.1 200 OK\r\nContent-Length: 20\r\n\r\ncat cat ")
    assert d.to_client == b"HTTP/1.1 200 OK\r\nContent-Length: 20\r\n\r\ncat cat "  # at once
    d.server(b"cat cat cat ")
    d.client(b"GET / HTTP/1.1\r\n\r\n")
    d.server(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\ncat \r\n")
    d.server(b"8\r\ncat cat \r\n0\r\n\r\n")  # over 10 bytes: streamed
    d.client(b"GET / HTTP/1.1\r\n\r\n")
    d.server(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\ncat")  # small again: rewritten
    assert d.to_client == (
        b"HTTP/1.1 200 OK\r\nContent-Length: 20\r\n\r\ncat cat cat cat cat "
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\ncat \r\n"
        b"8\r\ncat cat \r\n0\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\ntiger"
    )


def test_max_body_option() -> None:
    d = Driver(Rewrite, max_body="4")
    d.client(b"GET / HTTP/1.1\r\n\r\n")
    d.server(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\na cat")
    assert d.to_client.endswith(b"a cat")


@pytest.mark.parametrize(
    ("request_", "response", "after"),
    [
        (
            b"CONNECT h:443 HTTP/1.1\r\nHost: h:443\r\n\r\n",
            b"HTTP/1.1 200 OK\r\n\r\n",
            b"\x16\x03\x01 tls bytes",
        ),
        (
            b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n",
            b"\x81\x05hello",
        ),
    ],
)
def test_connect_and_upgrade_hand_over(request_: bytes, response: bytes, after: bytes) -> None:
    d = Driver(Rewrite)
    d.client(request_ + after)
    assert d.passthrough
    d.server(response + b"cat")
    assert d.to_server == request_ + after
    assert d.to_client == response + b"cat"


@pytest.mark.parametrize(
    "data",
    [
        b"*1\r\n$4\r\nPING\r\n",  # RESP
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # TLS
        b"GET / HTTP/2.0\r\n\r\n",
        b"GET / HTTP/1.1\r\nbad header\r\n\r\n",
        b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
        b"SSH-2.0-OpenSSH_9.2\r\n",
    ],
)
def test_not_http_from_the_client_becomes_passthrough(
    data: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    d = Driver(Rewrite)
    with caplog.at_level(logging.WARNING, "tproxy.http"):
        d.client(data)
    assert d.passthrough and d.to_server == data
    assert "passing the rest through" in caplog.text
    d.server(b"a cat")
    assert d.to_client == b"a cat"


def test_server_speaking_first_becomes_passthrough() -> None:
    d = Driver(Rewrite)
    d.server(b"220 smtp.example ESMTP\r\n")
    assert d.passthrough and d.to_client == b"220 smtp.example ESMTP\r\n"


def test_bad_response_after_good_ones_keeps_the_bytes() -> None:
    d = Driver(Rewrite)
    d.client(b"GET / HTTP/1.1\r\n\r\nGET /2 HTTP/1.1\r\n\r\n")
    d.server(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\ncatHTTP/1.1 200 OK\r\nTrans")
    d.server(b"fer-Encoding: chunked\r\n\r\nzz\r\n")
    assert d.passthrough
    assert d.to_client == (
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\ntiger"
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"
    )


def test_expect_100_continue_streams_the_request() -> None:
    d = Driver(Watch)
    head = b"PUT /up HTTP/1.1\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n"
    d.client(head)
    assert d.to_server == head  # not held: the client waits for the 100
    d.server(b"HTTP/1.1 100 Continue\r\n\r\n")
    d.client(b"abc")
    d.server(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert d.interceptor.seen == [("resp", "PUT 200", b"")]  # type: ignore[attr-defined]


def test_server_sent_events_are_not_held() -> None:
    d = Driver(Rewrite)
    d.client(b"GET /events HTTP/1.1\r\n\r\n")
    d.server(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n8\r\ndata: c\n\r\n"
    )
    assert d.to_client.endswith(b"data: c\n\r\n")


class Replacer(HttpInterceptor):
    def request(self, req: Request) -> Request:
        return Request(method="GET", target="/other", headers=[(b"Host", b"b")])


def test_a_hook_may_return_a_new_message() -> None:
    d = Driver(Replacer)
    d.client(b"POST / HTTP/1.1\r\nContent-Length: 2\r\n\r\nab")
    assert d.to_server == b"GET /other HTTP/1.1\r\nHost: b\r\nContent-Length: 0\r\n\r\n"


def test_stream_ending_inside_a_message_forwards_what_came() -> None:
    d = Driver(Rewrite)
    d.client(b"POST / HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc")
    d.client_eof()
    assert d.to_server == b"POST / HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc"


@settings(max_examples=300, deadline=None)
@given(up=st.binary(max_size=300), down=st.binary(max_size=300))
def test_random_bytes_are_forwarded_whole(up: bytes, down: bytes) -> None:
    d = Driver(Watch)
    d.client(up)
    d.server(down)
    d.client_eof()
    d.server_eof()
    assert d.to_server == up and d.to_client == down


@settings(max_examples=100, deadline=None)
@given(
    cuts_up=st.lists(st.integers(0, 10**6), max_size=40),
    cuts_down=st.lists(st.integers(0, 10**6), max_size=40),
)
def test_rewritten_output_does_not_depend_on_the_split(
    cuts_up: list[int], cuts_down: list[int]
) -> None:
    up = b"".join(REQUESTS)
    down = b"".join(RESPONSES).replace(b"\r\nhi", b"\r\nca").replace(b"\nchunk\r", b"\ncatch\r")
    whole = Driver(Rewrite)
    whole.client(up)
    whole.server(down)
    d = Driver(Rewrite)
    split_feed(d, "client", up, cuts_up)
    split_feed(d, "server", down, cuts_down)
    assert (d.to_server, d.to_client) == (whole.to_server, whole.to_client)
    assert b"tigerch" in d.to_client and b"Content-Length: 2\r\n\r\nca" in d.to_client

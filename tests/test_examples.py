"""The examples/ interceptors, driven with bytes (the netns tests run them for real)."""

from __future__ import annotations

import itertools
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st
from tls_hellos import python_client_hello

from tproxy.loading import resolve
from tproxy.testing import Driver

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def example(spec: str) -> type:
    return resolve(f"{EXAMPLES}/{spec}")


def split_feed(d: Driver, side: str, data: bytes, cuts: list[int]) -> None:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    for a, b in itertools.pairwise(points):
        getattr(d, side)(data[a:b])


def resp(*args: bytes) -> bytes:
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)


COMMANDS = resp(b"SET", b"k", b"a\r\nb") + b"PING\r\n" + resp(b"get", b"k") + resp(b"PING")
PREFIXED = resp(b"SET", b"t1:k", b"a\r\nb") + b"PING\r\n" + resp(b"get", b"t1:k") + resp(b"PING")


@settings(max_examples=100, deadline=None)
@given(cuts=st.lists(st.integers(0, 10**6), max_size=20))
def test_resp_key_prefix_across_any_split(cuts: list[int]) -> None:
    d = Driver(example("resp.py:KeyPrefix"), prefix="t1:")
    split_feed(d, "client", COMMANDS, cuts)
    assert d.to_server == PREFIXED
    d.server(b"+OK\r\n$4\r\na\r\nb\r\n")
    assert d.to_client == b"+OK\r\n$4\r\na\r\nb\r\n"


def test_http_body_rewrites_three_keep_alive_responses() -> None:
    d = Driver(example("http_body.py:BodyReplace"), old="world", new="WORLD!")
    for i in range(3):
        d.client(b"GET /%d HTTP/1.1\r\nHost: s\r\n\r\n" % i)
        d.server(b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\nhello world")
    assert d.to_client == b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\nhello WORLD!" * 3
    assert d.to_server == b"".join(b"GET /%d HTTP/1.1\r\nHost: s\r\n\r\n" % i for i in range(3))


def test_http_body_leaves_compressed_bodies_alone() -> None:
    d = Driver(example("http_body.py:BodyReplace"), old="world", new="WORLD")
    d.client(b"GET / HTTP/1.1\r\n\r\n")
    reply = b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: 5\r\n\r\nworld"
    d.server(reply)
    assert d.to_client == reply


def test_sni_block_aborts_a_blocked_name_split_anywhere() -> None:
    hello = python_client_hello("www.Blocked.test")
    cls = example("sni_block.py:SniBlock")
    for cut in (1, 5, 100, len(hello) - 1):
        d = Driver(cls, host=r"(.*\.)?blocked\.test")
        d.client(hello[:cut])
        assert d.to_server == b"" and d.aborted is None
        d.client(hello[cut:])
        assert d.aborted == "sni_block: www.Blocked.test"
        assert d.to_server == b""


def test_sni_block_passes_other_names_and_non_tls() -> None:
    cls = example("sni_block.py:SniBlock")
    hello = python_client_hello("fine.test")
    d = Driver(cls, host=r"(.*\.)?blocked\.test")
    d.client(hello[:50])
    d.client(hello[50:])
    assert d.to_server == hello and d.passthrough
    d = Driver(cls, host="blocked")
    d.client(b"GET / HTTP/1.1\r\n\r\n")
    assert d.to_server == b"GET / HTTP/1.1\r\n\r\n" and d.passthrough


def test_resp_key_prefix_hands_over_what_is_not_resp() -> None:
    d = Driver(example("resp.py:KeyPrefix"), prefix="t1:")
    d.client(resp(b"GET", b"k") + b"*x\r\n$3\r\nabc\r\n")
    d.client(b"more")
    assert d.to_server == resp(b"GET", b"t1:k") + b"*x\r\n$3\r\nabc\r\nmore"
    assert d.passthrough and d.error is None

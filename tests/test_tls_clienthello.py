"""parse_client_hello on real hellos (Python ssl, openssl s_client), built ones
(post-quantum sized, multi-record), every split, truncation and random bytes."""

from __future__ import annotations

import shutil
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tls_hellos import (
    alpn_ext,
    extension,
    handshake,
    openssl_client_hello,
    post_quantum_hello,
    python_client_hello,
    records,
    sni_ext,
    versions_ext,
)

from tproxy.tls import ClientHello, NeedMore, NotTLS, parse_client_hello


def complete(data: bytes) -> ClientHello:
    result = parse_client_hello(data)
    assert isinstance(result, ClientHello), result
    return result


def assert_prefixes_need_more(data: bytes, hello_end: int) -> None:
    """Every proper prefix of the hello asks for more, with a bound that is honest:
    more than it has, and never more than the hello actually needs."""
    for cut in range(hello_end):
        result = parse_client_hello(data[:cut])
        assert isinstance(result, NeedMore), (cut, result)
        assert cut < result.at_least <= hello_end, (cut, result)


def test_python_ssl_hello_gives_sni_alpn_and_versions() -> None:
    data = python_client_hello("www.example.test", ["h2", "http/1.1"])
    hello = complete(data)
    assert hello.sni == "www.example.test"
    assert hello.alpn == ("h2", "http/1.1")
    assert 0x0304 in hello.versions and hello.max_version == 0x0304
    assert hello.legacy_version == 0x0303
    assert hello.length == len(data)
    assert 0 in hello.extensions and 16 in hello.extensions


def test_python_ssl_hello_without_sni_or_alpn() -> None:
    hello = complete(python_client_hello(None))
    assert hello.sni is None
    assert hello.alpn == ()


def test_python_ssl_hello_every_prefix_needs_more() -> None:
    data = python_client_hello("split.example.test", ["http/1.1"])
    assert_prefixes_need_more(data, len(data))


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")
def test_openssl_s_client_hello() -> None:
    data = openssl_client_hello("s-client.example.test", "h2,http/1.1")
    hello = complete(data)
    assert hello.sni == "s-client.example.test"
    assert hello.alpn == ("h2", "http/1.1")
    assert 0x0304 in hello.versions


def test_post_quantum_hello_over_two_records_and_segments() -> None:
    message = post_quantum_hello(b"pq.example.test")
    assert 1900 <= len(message) <= 2200
    data = records(message, [1000])  # two records
    hello = complete(data)
    assert hello.sni == "pq.example.test"
    assert hello.alpn == ("h2", "http/1.1")
    assert hello.versions == (0x3A3A, 0x0304, 0x0303)
    assert hello.max_version == 0x0304  # GREASE skipped
    assert hello.length == len(data)
    assert_prefixes_need_more(data, len(data))


def test_hello_header_split_across_records() -> None:
    """Records of one byte: even the 4-byte handshake header spans records."""
    message = handshake(sni_ext(b"tiny.example") + versions_ext([0x0304]))
    data = records(message, [1] * 40)
    assert complete(data).sni == "tiny.example"
    assert_prefixes_need_more(data, len(data))


def test_hello_larger_than_16k_spans_records() -> None:
    message = handshake(sni_ext(b"big.example") + extension(21, bytes(20000)))
    data = records(message)
    assert len(data) > 20000
    assert complete(data).sni == "big.example"
    result = parse_client_hello(data[:16384])
    assert isinstance(result, NeedMore)
    assert result.at_least > 16384  # a caller with a 16 KiB bound knows to give up


def test_bytes_after_the_hello_are_not_read() -> None:
    data = python_client_hello("a.example")
    hello = complete(data + b"\x17\x03\x03\x00\x05early" + b"junk")
    assert hello.length == len(data)


def test_ssl3_hello_without_extensions() -> None:
    body = struct.pack("!H", 0x0300) + bytes(32) + b"\x00" + b"\x00\x02\x00\x2f" + b"\x01\x00"
    data = records(b"\x01" + len(body).to_bytes(3, "big") + body)
    hello = complete(data)
    assert hello.sni is None and hello.versions == (0x0300,)


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.1\r\n",
        b"\x00",
        b"\x80\x2e\x01\x03\x01",  # SSLv2-compatible hello
        b"\x16\x02\x00",  # record version major 2
        b"\x16\x03\x01\x00\x00",  # empty record
        b"\x16\x03\x01\x40\x01",  # longer than 16384
        b"\x16\x03\x01\x00\x04\x02\x00\x00\x00",  # ServerHello, not ClientHello
        b"\x16\x03\x01\x00\x02\x01\x00" + b"\x15\x03\x03",  # alert inside the hello
    ],
)
def test_not_tls(data: bytes) -> None:
    assert isinstance(parse_client_hello(data), NotTLS)


def test_malformed_bodies_are_not_tls() -> None:
    good = handshake(sni_ext(b"x.example"))
    # Claim a longer extensions block than there is, keeping the handshake length right.
    broken = bytearray(good)
    broken[-len(sni_ext(b"x.example")) - 2 : -len(sni_ext(b"x.example"))] = b"\xff\xff"
    assert isinstance(parse_client_hello(records(bytes(broken))), NotTLS)
    twice = handshake(sni_ext(b"a.example") + sni_ext(b"b.example"))
    assert isinstance(parse_client_hello(records(twice)), NotTLS)
    empty_alpn = handshake(alpn_ext([]))
    assert isinstance(parse_client_hello(records(empty_alpn)), NotTLS)
    tiny = b"\x01\x00\x00\x02\x03\x03"
    assert isinstance(parse_client_hello(records(tiny)), NotTLS)


def test_empty_input_needs_a_record_header() -> None:
    assert parse_client_hello(b"") == NeedMore(5)


@settings(max_examples=200, deadline=None)
@given(
    name=st.from_regex(r"[a-z0-9]{1,20}(\.[a-z0-9]{1,20}){0,3}", fullmatch=True),
    sizes=st.lists(st.integers(1, 3000), max_size=8),
    protocols=st.lists(st.binary(min_size=1, max_size=20), min_size=1, max_size=4),
    padding=st.integers(0, 3000),
)
def test_any_record_split_gives_the_same_hello(
    name: str, sizes: list[int], protocols: list[bytes], padding: int
) -> None:
    message = handshake(
        sni_ext(name.encode())
        + alpn_ext(protocols)
        + versions_ext([0x0304, 0x0303])
        + extension(21, bytes(padding))
    )
    data = records(message, sizes)
    hello = complete(data)
    assert hello.sni == name
    assert hello.alpn == tuple(p.decode("latin-1") for p in protocols)
    assert hello.versions == (0x0304, 0x0303)
    assert hello.length == len(data)


@settings(max_examples=100, deadline=None)
@given(sizes=st.lists(st.integers(1, 600), max_size=6), cuts=st.lists(st.integers(0, 2500)))
def test_any_prefix_of_a_pq_hello_needs_more(sizes: list[int], cuts: list[int]) -> None:
    data = records(post_quantum_hello(), sizes)
    for cut in cuts:
        if cut < len(data):
            result = parse_client_hello(data[:cut])
            assert isinstance(result, NeedMore)
            assert cut < result.at_least <= len(data)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=3000))
def test_random_bytes_never_raise(data: bytes) -> None:
    result = parse_client_hello(data)
    assert isinstance(result, ClientHello | NeedMore | NotTLS)
    if isinstance(result, NeedMore):
        assert result.at_least > len(data)


@settings(max_examples=300, deadline=None)
@given(
    body=st.binary(max_size=400),
    sizes=st.lists(st.integers(1, 100), max_size=5),
)
def test_random_hello_bodies_in_valid_records_never_raise(body: bytes, sizes: list[int]) -> None:
    """Valid framing around random contents reaches the body parser's every error path."""
    data = records(b"\x01" + len(body).to_bytes(3, "big") + body, sizes)
    result = parse_client_hello(data)
    assert isinstance(result, ClientHello | NotTLS)
    if isinstance(result, ClientHello):
        assert result.length == len(data)


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_mutated_real_hello_never_raises(data: st.DataObject) -> None:
    hello = bytearray(python_hello_once())
    for _ in range(data.draw(st.integers(1, 8))):
        index = data.draw(st.integers(0, len(hello) - 1))
        hello[index] = data.draw(st.integers(0, 255))
    result = parse_client_hello(bytes(hello))
    assert isinstance(result, ClientHello | NeedMore | NotTLS)


_PY_HELLO: list[bytes] = []


def python_hello_once() -> bytes:
    if not _PY_HELLO:
        _PY_HELLO.append(python_client_hello("mutate.example", ["h2"]))
    return _PY_HELLO[0]

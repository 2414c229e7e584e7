"""tproxy.framing: lines and length-prefixed messages, exact across any split."""

from __future__ import annotations

import itertools
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tproxy.framing import FramedInterceptor, LengthPrefixedInterceptor, LineInterceptor
from tproxy.testing import Driver


def feed(d: Driver, data: bytes, cuts: list[int], side: str = "client") -> None:
    """Feed ``data`` in pieces cut at the given offsets, then end that side."""
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    for a, b in itertools.pairwise(points):
        getattr(d, side)(data[a:b])
    getattr(d, f"{side}_eof")()


class Upper(LineInterceptor):
    """Upper-cases lines that start with 'set' from the client; drops 'noise' lines."""

    def client_line(self, line: bytes) -> bytes:
        if line.startswith(b"noise"):
            return b""
        return line.upper() if line.startswith(b"set") else line

    def server_line(self, line: bytes) -> bytes:
        return b"> " + line


def expected_upper(data: bytes) -> bytes:
    out = b""
    for line in data.splitlines(keepends=True):
        if line.startswith(b"noise"):
            continue
        out += line.upper() if line.startswith(b"set") else line
    return out


lines = st.lists(
    st.sampled_from([b"set a 1", b"get a", b"noise", b"", b"set \xff\r", b"x" * 300]), max_size=20
).map(lambda ls: b"".join(line + b"\n" for line in ls))


@settings(max_examples=200, deadline=None)
@given(
    data=lines,
    tail=st.sampled_from([b"", b"set tail", b"noise"]),
    cuts=st.lists(st.integers(0, 10**6), max_size=30),
)
def test_lines_exact_across_any_split(data: bytes, tail: bytes, cuts: list[int]) -> None:
    d = Driver(Upper)
    feed(d, data + tail, cuts)
    assert d.to_server == expected_upper(data + tail)


@settings(max_examples=100, deadline=None)
@given(data=st.binary(max_size=2000), cuts=st.lists(st.integers(0, 10**6), max_size=30))
def test_identity_lines_are_byte_identical(data: bytes, cuts: list[int]) -> None:
    d = Driver(LineInterceptor)
    feed(d, data, cuts)
    assert d.to_server == data
    d = Driver(LineInterceptor)
    feed(d, data, cuts, side="server")
    assert d.to_client == data


def test_crlf_kept_and_server_lines() -> None:
    d = Driver(Upper)
    d.server(b"one\r\ntw")
    assert d.to_client == b"> one\r\n"
    d.server(b"o\r\n")
    assert d.to_client == b"> one\r\n> two\r\n"


class Short(LineInterceptor):
    max_line = 8


def test_long_line_aborts_clearly() -> None:
    d = Driver(Short)
    d.client(b"12345678")  # exactly max_line, no delimiter yet: still waiting
    assert d.aborted is None and d.to_server == b""
    d.client(b"9")
    assert d.aborted == "Short: a line from the client exceeds 8 bytes"


def test_line_of_exactly_max_line_passes() -> None:
    d = Driver(Short)
    d.client(b"1234567\nabc")
    assert d.to_server == b"1234567\n" and d.aborted is None


class GreetThenPass(LineInterceptor):
    def client_line(self, line: bytes) -> bytes:
        self.passthrough()
        return line.upper()


def test_passthrough_from_a_hook_forwards_the_buffer() -> None:
    d = Driver(GreetThenPass)
    d.client(b"hello\nworld\nand mo")
    assert d.to_server == b"HELLO\nworld\nand mo"
    d.client(b"re\n")
    assert d.to_server.endswith(b"and more\n") and d.passthrough


class Prefixed(LengthPrefixedInterceptor):
    def client_payload(self, payload: bytes) -> bytes:
        return payload.replace(b"cat", b"tiger")


def message(payload: bytes) -> bytes:
    return struct.pack("!I", len(payload)) + payload


payloads = st.lists(
    st.sampled_from([b"", b"cat", b"a cat and a cat", b"dog", bytes(70)]), max_size=15
)


@settings(max_examples=200, deadline=None)
@given(items=payloads, cuts=st.lists(st.integers(0, 10**6), max_size=30))
def test_length_prefixed_exact_across_any_split(items: list[bytes], cuts: list[int]) -> None:
    d = Driver(Prefixed)
    feed(d, b"".join(message(p) for p in items), cuts)
    assert d.to_server == b"".join(message(p.replace(b"cat", b"tiger")) for p in items)


class TwoByteInclusive(LengthPrefixedInterceptor):
    """Type byte, then a 2-byte little-endian length that counts the header."""

    header_size = 3
    length_offset = 1
    length_size = 2
    byteorder = "little"
    length_includes_header = True
    max_frame = 100

    def server_payload(self, payload: bytes) -> bytes:
        return payload * 2


def test_length_prefixed_variants_and_limits() -> None:
    d = Driver(TwoByteInclusive)
    d.server(b"\x07\x05\x00ab" + b"\x08\x03\x00")
    assert d.to_client == b"\x07\x07\x00abab" + b"\x08\x03\x00"
    d.client(b"\x01\x05\x00ab")  # client side unchanged
    assert d.to_server == b"\x01\x05\x00ab"
    d.client(b"\x01\xff\x00")
    assert d.aborted == "TwoByteInclusive: a frame from the client exceeds 100 bytes"
    d = Driver(TwoByteInclusive)
    d.server(b"\x01\x01\x00")
    assert d.aborted is not None and "shorter than the 3-byte header" in d.aborted


def test_partial_frame_at_eof_is_forwarded() -> None:
    d = Driver(Prefixed)
    d.client(message(b"cat") + b"\x00\x00\x00\x09ca")
    d.client_eof()
    assert d.to_server == message(b"tiger") + b"\x00\x00\x00\x09ca"


class Unframed(FramedInterceptor):
    pass


def test_directions_without_a_frame_length_pass_untouched() -> None:
    d = Driver(Unframed)
    d.client(b"anything")
    d.server(b"at all")
    assert (d.to_server, d.to_client) == (b"anything", b"at all")


class BadLength(FramedInterceptor):
    def client_frame_length(self, buffer: bytearray, start: int) -> int | None:
        return 0


def test_a_wrong_frame_length_is_an_interceptor_error() -> None:
    d = Driver(BadLength)
    d.client(b"x")
    assert d.error is not None


@pytest.mark.parametrize("size", [1, 2, 3, 7])
def test_every_fixed_chunk_size(size: int) -> None:
    data = b"set a\nget b\r\nnoise\nset c"
    d = Driver(Upper)
    for i in range(0, len(data), size):
        d.client(data[i : i + size])
    d.client_eof()
    assert d.to_server == b"SET A\nget b\r\nSET C"

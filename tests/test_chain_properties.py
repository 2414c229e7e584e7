"""Hypothesis: whatever the chunking, chains forward exactly what they should.

The engine hands interceptors reads of arbitrary sizes, interleaved between
the two directions. These properties check that the result never depends on
that: a pass-through chain forwards exactly its input, ``replace`` forwards
exactly ``bytes.replace`` / ``re.sub`` of the whole stream.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tproxy.flow import FlowInfo
from tproxy.interceptor import Interceptor
from tproxy.interceptors.block import Block
from tproxy.interceptors.hexdump import Hexdump
from tproxy.interceptors.label import Label
from tproxy.interceptors.replace import Replace
from tproxy.options import encode_escapes
from tproxy.testing import Driver

Event = tuple[str, bytes]

chunks = st.lists(st.binary(min_size=1, max_size=40), max_size=20)
small_alphabet = st.lists(st.sampled_from(b"abc"), max_size=60).map(bytes)


def chunked(data: bytes) -> st.SearchStrategy[list[bytes]]:
    """Every way of cutting ``data`` into non-empty reads."""
    return st.lists(st.integers(0, len(data)), max_size=len(data) + 1).map(
        lambda cuts: _cut(data, cuts)
    )


def _cut(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({0, len(data), *cuts})
    return [data[a:b] for a, b in itertools.pairwise(points) if b > a]


@st.composite
def traffic(
    draw: st.DrawFn, client: bytes | None = None, server: bytes | None = None
) -> list[Event]:
    """Client and server reads interleaved at random (each direction keeps its order)."""
    up = draw(chunked(client)) if client is not None else draw(chunks)
    down = draw(chunked(server)) if server is not None else draw(chunks)
    order = draw(st.permutations(["c"] * len(up) + ["s"] * len(down)))
    ups, downs = iter(up), iter(down)
    return [(side, next(ups) if side == "c" else next(downs)) for side in order]


def run(driver: Driver, events: Sequence[Event], client_eof_first: bool = True) -> Driver:
    for side, data in events:
        (driver.client if side == "c" else driver.server)(data)
    if client_eof_first:
        driver.client_eof()
        driver.server_eof()
    else:
        driver.server_eof()
        driver.client_eof()
    driver.end()
    assert driver.error is None and driver.aborted is None
    return driver


def sent(events: Sequence[Event], side: str) -> bytes:
    return b"".join(data for s, data in events if s == side)


class Holder(Interceptor):
    """Holds every other read and releases it with the next one, or at end of stream."""

    def __init__(self, flow: FlowInfo, options: object = None) -> None:
        super().__init__(flow, options)
        self.held = {"c": b"", "s": b""}

    def _pass(self, side: str, data: bytes) -> bytes:
        if self.held[side]:
            out, self.held[side] = self.held[side] + data, b""
            return out
        self.held[side] = data
        return b""

    def client_data(self, data: bytes) -> bytes:
        return self._pass("c", data)

    def server_data(self, data: bytes) -> bytes:
        return self._pass("s", data)

    def client_eof(self) -> bytes:
        out, self.held["c"] = self.held["c"], b""
        return out

    def server_eof(self) -> bytes:
        out, self.held["s"] = self.held["s"], b""
        return out


class LatePassthrough(Interceptor):
    """Goes to passthrough after it has seen a few reads."""

    def __init__(self, flow: FlowInfo, options: object = None) -> None:
        super().__init__(flow, options)
        self.reads = 0

    def _count(self, data: bytes) -> bytes:
        self.reads += 1
        if self.reads >= 3:
            self.passthrough()
        return data

    client_data = _count
    server_data = _count


PASS_THROUGH = {
    "base": (Interceptor, {}),
    "holder": (Holder, {}),
    "late": (LatePassthrough, {}),
    "hexdump": (Hexdump, {"max-bytes": "16"}),
    "block-pattern": (Block, {"pattern": "(?!)", "first-bytes": "10"}),
    "block-port": (Block, {"port": "1"}),
    "replace-absent": (Replace, {"old": "\\xff\\xfe\\xfd\\xfc"}),
    "label-nothing": (Label, {"text": ""}),
}


@settings(max_examples=300)
@given(
    st.lists(st.sampled_from(sorted(PASS_THROUGH)), max_size=5),
    traffic(),
    st.booleans(),
)
def test_pass_through_chain_forwards_exactly_the_input(
    names: list[str], events: list[Event], client_first: bool
) -> None:
    d = run(Driver(*(PASS_THROUGH[n] for n in names)), events, client_first)
    assert d.to_server == sent(events, "c")
    assert d.to_client == sent(events, "s")


@given(
    st.lists(st.sampled_from(sorted(PASS_THROUGH)), max_size=3),
    traffic(),
)
def test_label_on_client_only_leaves_server_data_exact(
    names: list[str], events: list[Event]
) -> None:
    chain = [(Label, {"text": "#", "direction": "client"}), *(PASS_THROUGH[n] for n in names)]
    d = run(Driver(*chain), events)
    assert d.to_client == sent(events, "s")
    # the label is first: it sees the client's reads exactly as they came
    assert d.to_server == b"".join(b"#" + data for side, data in events if side == "c")


@st.composite
def replacement(draw: st.DrawFn) -> tuple[bytes, bytes, int | None]:
    old = draw(st.lists(st.sampled_from(b"abc"), min_size=1, max_size=5).map(bytes))
    new = draw(st.binary(max_size=6) | st.lists(st.sampled_from(b"abc"), max_size=6).map(bytes))
    count = draw(st.none() | st.integers(1, 4))
    return old, new, count


def expected_replace(data: bytes, old: bytes, new: bytes, count: int | None) -> bytes:
    return data.replace(old, new) if count is None else data.replace(old, new, count)


def replace_options(old: bytes, new: bytes, count: int | None, **extra: str) -> dict[str, str]:
    options = {"old": encode_escapes(old), "new": encode_escapes(new), **extra}
    if count is not None:
        options["count"] = str(count)
    return options


@settings(max_examples=500)
@given(st.data(), replacement(), small_alphabet, small_alphabet, st.booleans())
def test_replace_equals_bytes_replace_for_any_chunking(
    data: st.DataObject,
    rep: tuple[bytes, bytes, int | None],
    client: bytes,
    server: bytes,
    client_first: bool,
) -> None:
    old, new, count = rep
    events = data.draw(traffic(client, server))
    d = run(Driver((Replace, replace_options(old, new, count))), events, client_first)
    assert d.to_server == expected_replace(client, old, new, count)
    assert d.to_client == expected_replace(server, old, new, count)


@given(st.data(), replacement(), small_alphabet, small_alphabet)
def test_replace_one_direction_only(
    data: st.DataObject, rep: tuple[bytes, bytes, int | None], client: bytes, server: bytes
) -> None:
    old, new, count = rep
    events = data.draw(traffic(client, server))
    d = run(Driver((Replace, replace_options(old, new, count, direction="server"))), events)
    assert d.to_server == client
    assert d.to_client == expected_replace(server, old, new, count)


@settings(max_examples=300)
@given(st.data(), replacement(), replacement(), small_alphabet, small_alphabet)
def test_two_replaces_in_a_chain_compose_with_flushing(
    data: st.DataObject,
    first: tuple[bytes, bytes, int | None],
    second: tuple[bytes, bytes, int | None],
    client: bytes,
    server: bytes,
) -> None:
    events = data.draw(traffic(client, server))
    d = run(
        Driver(
            (Replace, replace_options(*first)),
            (Holder, {}),
            (Replace, replace_options(*second)),
        ),
        events,
    )
    # client -> server passes the first replace, then the second; server -> client the reverse
    assert d.to_server == expected_replace(expected_replace(client, *first), *second)
    assert d.to_client == expected_replace(expected_replace(server, *second), *first)


# Patterns whose every match, look-ahead included, is decided within 6 bytes
# of where it starts; max-match >= 6 makes the streaming result exact.
BOUNDED_PATTERNS = [
    (rb"ab{1,3}c", rb"<\g<0>>"),
    (rb"a.c", rb"X"),
    (rb"(a)(b)?", rb"\2\1"),
    (rb"x{0,3}", rb"-"),
    (rb"x*?", rb"-"),
    (rb"^ab", rb"S"),
    (rb"(?m)^b", rb"L"),
    (rb"(?<=a)b", rb"B"),
    (rb"\bab\b", rb"W"),
    (rb"a|ab", rb"1"),
    (rb"(?=bc)b", rb"Q"),
    (rb"b$", rb"E"),
    (rb"c\n?", rb""),
]

regex_input = st.lists(st.sampled_from(b"abcx \n"), max_size=60).map(bytes)


@pytest.mark.parametrize("pattern", BOUNDED_PATTERNS, ids=lambda p: p[0].decode())
@settings(max_examples=120)
@given(
    data=st.data(),
    client=regex_input,
    server=regex_input,
    max_match=st.integers(6, 12),
    count=st.none() | st.integers(1, 4),
)
def test_regex_replace_equals_re_sub_for_any_chunking(
    data: st.DataObject,
    pattern: tuple[bytes, bytes],
    client: bytes,
    server: bytes,
    max_match: int,
    count: int | None,
) -> None:
    regex, template = pattern
    options = {"pattern": regex.decode(), "new": template.decode(), "max-match": str(max_match)}
    if count is not None:
        options["count"] = str(count)
    events = data.draw(traffic(client, server))
    d = run(Driver((Replace, options)), events)
    assert d.to_server == re.sub(regex, template, client, count=count or 0)
    assert d.to_client == re.sub(regex, template, server, count=count or 0)

"""The ``replace`` built-in: literal and regex, split matches, flushing, count."""

from __future__ import annotations

import pytest

from tproxy.interceptor import OptionError
from tproxy.interceptors.replace import Replace
from tproxy.testing import Driver


def test_docstring_example() -> None:
    d = Driver(Replace, old="cat", new="dog", direction="server")
    d.server(b"a c")
    d.server(b"at")
    d.server_eof()
    assert d.to_client == b"a dog"


def test_holds_only_a_possible_prefix_of_old() -> None:
    d = Driver(Replace, old="abcd", new="X")
    out = d.client(b"xxabc")
    assert out.to_server == b"xx"  # "abc" could still become "abcd"
    out = d.client(b"ab")
    assert out.to_server == b"abc"  # "abcab": only "ab" can still start a match
    out = d.client(b"cd!")
    assert out.to_server == b"X!"
    assert d.to_server == b"xxabcX!"


def test_nothing_held_when_tail_cannot_start_a_match() -> None:
    d = Driver(Replace, old="abc", new="X")
    assert d.client(b"hello").to_server == b"hello"


def test_eof_flushes_the_held_tail() -> None:
    d = Driver(Replace, old="needle", new="pin")
    d.client(b"hay nee")
    assert d.to_server == b"hay "
    d.client_eof()
    assert d.to_server == b"hay nee"


def test_direction_client_leaves_server_data_alone() -> None:
    d = Driver(Replace, old="a", new="b", direction="client")
    d.client("aaa")
    d.server("aaa")
    assert (d.to_server, d.to_client) == (b"bbb", b"aaa")


def test_escapes_in_old_and_new() -> None:
    d = Driver(Replace, old=r"\r\n", new=r"\n\x00")
    d.server(b"a\r")
    d.server(b"\nb")
    assert d.to_client == b"a\n\x00b"


def test_new_defaults_to_deleting() -> None:
    d = Driver(Replace, old="secret")
    d.client(b"my secret word")
    assert d.to_server == b"my  word"


def test_count_then_passthrough() -> None:
    d = Driver(Replace, old="a", new="b", count="2", direction="client")
    d.client(b"a")
    assert not d.passthrough
    d.client(b"aa")
    assert d.passthrough
    d.client(b"aaa")
    assert d.to_server == b"bbaaaa"


def test_count_per_direction() -> None:
    d = Driver(Replace, old="ab", new="X", count="1")
    d.client(b"abab")
    assert not d.passthrough  # the server direction still has its one replacement
    d.server(b"xa")
    assert d.to_client == b"x"
    d.server(b"bab")
    assert d.passthrough
    assert (d.to_server, d.to_client) == (b"Xab", b"xXab")


def test_count_reached_flushes_what_was_held() -> None:
    d = Driver(Replace, old="abc", new="X", count="1", direction="client")
    d.client(b"abcab")
    assert d.to_server == b"Xab"
    assert d.passthrough


def test_eof_of_every_chosen_direction_means_passthrough() -> None:
    d = Driver(Replace, old="a", new="b", direction="client")
    d.client_eof()
    assert d.passthrough


def test_regex_with_groups_split_across_reads() -> None:
    d = Driver(Replace, pattern=r"Server: (\S+)\r\n", new=r"Server: hidden(\1)\r\n", max_match="64")
    d.server(b"HTTP/1.0 200 OK\r\nSer")
    d.server(b"ver: nginx\r")
    d.server(b"\nContent-Length: 0\r\n\r\n")
    d.server_eof()
    assert d.to_client == (b"HTTP/1.0 200 OK\r\nServer: hidden(nginx)\r\nContent-Length: 0\r\n\r\n")


def test_regex_holds_back_at_most_max_match_minus_one() -> None:
    d = Driver(Replace, pattern="x+y", new="Z", max_match="4")
    out = d.client(b"0123456789")
    assert out.to_server == b"0123456"
    d.client_eof()
    assert d.to_server == b"0123456789"


def test_regex_anchor_and_lookbehind_see_the_real_stream() -> None:
    d = Driver(Replace, pattern=r"^a|(?<=b)c", new="_", max_match="2")
    for chunk in (b"a", b"ab", b"c", b"ac", b"bc"):
        d.client(chunk)
    d.client_eof()
    assert d.to_server == b"_ab_acb_"


def test_regex_empty_matches_like_re_sub() -> None:
    import re

    data = b"abxxdx"
    d = Driver(Replace, pattern="x*", new="-", max_match="3")
    for i in range(len(data)):
        d.client(data[i : i + 1])
    d.client_eof()
    assert d.to_server == re.sub(rb"x*", b"-", data)


def test_regex_inline_flags() -> None:
    d = Driver(Replace, pattern="(?i)hello", new="bye")
    d.client(b"HeLLo")
    d.client_eof()
    assert d.to_server == b"bye"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({}, "exactly one of old=BYTES or pattern=REGEX"),
        ({"old": "a", "pattern": "b"}, "exactly one of"),
        ({"old": ""}, "old must not be empty"),
        ({"old": "a", "max-match": "3"}, "max-match only applies to pattern"),
        ({"pattern": "(", "new": ""}, "not a valid regular expression"),
        ({"pattern": "a", "new": r"\2"}, "not a valid template"),
        ({"pattern": "a", "max-match": "0"}, "at least 1"),
        ({"old": "a", "count": "0"}, "at least 1"),
        ({"old": "a", "direction": "in"}, "direction"),
        ({"old": "\\z"}, "unknown escape"),
    ],
)
def test_bad_options(options: dict[str, str], message: str) -> None:
    with pytest.raises(OptionError, match=message):
        Replace.parse_options(options)

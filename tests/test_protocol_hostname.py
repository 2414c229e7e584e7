"""``host_name_problem``: the names every door refuses before a resolver sees them."""

from __future__ import annotations

import pytest

from tproxy.protocols import HttpProxyError, HttpProxyHandshake, SocksError
from tproxy.protocols.hostname import host_name_problem
from tproxy.protocols.socks4 import Socks4Handshake
from tproxy.protocols.socks5 import Socks5Handshake


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("", "empty host name"),
        ("a..b", "empty label"),
        ("..", "empty label"),
        (".", "empty label"),
        (".a", "empty label"),
        ("a.b..", "empty label"),
        ("a" * 64 + ".test", "label longer than 63"),
        ("ß" * 40, "label longer than 63"),
        (".".join(["n" * 63] * 4), "longer than 253"),
        ("x" * 5000, "too long"),
        ("a\0b", "control character"),
        ("a b", "control character"),
        ("x\u0080", "not valid IDNA"),
        ("x\u05d0", "not valid IDNA"),
    ],
)
def test_names_no_resolver_can_be_asked_for(name: str, problem: str) -> None:
    found = host_name_problem(name)
    assert found is not None and problem in found


@pytest.mark.parametrize(
    "name",
    [
        "example.com",
        "example.com.",
        "localhost",
        "a",
        "_srv.example",
        "xn--exmple-cua.com",
        "exämple.com",
        "192.0.2.1",
        ".".join(["n" * 63] * 3 + ["n" * 61]),
    ],
)
def test_names_dns_can_carry(name: str) -> None:
    assert host_name_problem(name) is None


def test_each_parser_names_the_problem_in_its_error() -> None:
    socks5 = Socks5Handshake()
    with pytest.raises(SocksError) as caught5:
        socks5.receive_data(b"\x05\x01\x00\x05\x01\x00\x03\x04a..b\x00\x50")
    assert caught5.value.reply == b"\x05\x00\x05\x04\x00\x01" + bytes(6)
    assert "empty label" in caught5.value.reason and "'a..b'" in caught5.value.reason

    with pytest.raises(SocksError) as caught4:
        Socks4Handshake().receive_data(b"\x04\x01\x00\x50\x00\x00\x00\x01\x00a..b\x00")
    assert caught4.value.reply == b"\x00\x5b" + bytes(6)
    assert "empty label" in caught4.value.reason

    with pytest.raises(HttpProxyError) as caught_http:
        HttpProxyHandshake().receive_data(b"GET http://a..b/ HTTP/1.1\r\nHost: a..b\r\n\r\n")
    assert caught_http.value.status == 400
    assert "empty label" in caught_http.value.reason


def test_a_long_name_is_quoted_short_in_the_reason() -> None:
    name = b"x" * 200 + b"\x1b[31m"
    with pytest.raises(SocksError) as caught:
        Socks4Handshake().receive_data(b"\x04\x01\x00\x50\x00\x00\x00\x01\x00" + name + b"\x00")
    assert len(caught.value.reason) < 160
    assert "\x1b" not in caught.value.reason

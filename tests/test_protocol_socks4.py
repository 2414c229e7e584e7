"""SOCKS4 / 4a handshake: requests, replies, refusals, byte for byte."""

from __future__ import annotations

import pytest
from python_socks._protocols import socks4 as ps4

from tproxy.protocols import SocksCommand, SocksError, SocksRequest
from tproxy.protocols.socks4 import REJECTED_REPLY, Socks4Handshake, Socks4Reply, socks4_reply

REJECTED = b"\x00\x5b\x00\x00\x00\x00\x00\x00"


def test_connect_ipv4_with_user_id_and_pipelined_data() -> None:
    hs = Socks4Handshake()
    events = hs.receive_data(b"\x04\x01\x00\x50\xc0\x00\x02\x01alice\x00GET / HTTP/1.0\r\n")
    assert events == [
        SocksRequest(4, SocksCommand.CONNECT, "192.0.2.1", 80, user="alice", is_domain=False)
    ]
    assert hs.complete and hs.request == events[0]
    assert hs.take_leftover() == b"GET / HTTP/1.0\r\n"
    assert hs.leftover == b""
    hs.receive_data(b"more")
    assert hs.leftover == b"more"


def test_socks4a_domain_and_empty_user() -> None:
    hs = Socks4Handshake()
    events = hs.receive_data(b"\x04\x01\x01\xbb\x00\x00\x00\x07\x00example.com\x00")
    assert events == [
        SocksRequest(4, SocksCommand.CONNECT, "example.com", 443, user=None, is_domain=True)
    ]


def test_zero_address_is_not_4a() -> None:
    hs = Socks4Handshake()
    [request] = hs.receive_data(b"\x04\x01\x00\x50\x00\x00\x00\x00\x00example.com\x00")
    assert isinstance(request, SocksRequest)
    assert request.host == "0.0.0.0" and not request.is_domain
    assert hs.leftover == b"example.com\x00"


def test_bind_request_and_its_two_replies() -> None:
    hs = Socks4Handshake()
    [request] = hs.receive_data(b"\x04\x02\x1f\x90\xc6\x33\x64\x07\x00")
    assert isinstance(request, SocksRequest)
    assert request.command is SocksCommand.BIND
    assert request.address == ("198.51.100.7", 8080)
    first = hs.reply_success(("203.0.113.5", 40001))
    second = hs.reply_success(("198.51.100.7", 5555))
    assert first == b"\x00\x5a\x9c\x41\xcb\x00\x71\x05"
    assert second == b"\x00\x5a\x15\xb3\xc6\x33\x64\x07"


def test_byte_by_byte() -> None:
    hs = Socks4Handshake()
    data = b"\x04\x01\x00\x50\x00\x00\x00\x01bob\x00host.test\x00"
    for byte in data[:-1]:
        assert hs.receive_data(bytes([byte])) == []
    [request] = hs.receive_data(data[-1:])
    assert isinstance(request, SocksRequest)
    assert (request.host, request.user) == ("host.test", "bob")


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (Socks4Reply.GRANTED, b"\x00\x5a"),
        (Socks4Reply.REJECTED, b"\x00\x5b"),
        (Socks4Reply.NO_IDENTD, b"\x00\x5c"),
        (Socks4Reply.IDENTD_MISMATCH, b"\x00\x5d"),
    ],
)
def test_every_reply_code(code: Socks4Reply, expected: bytes) -> None:
    assert socks4_reply(code) == expected + b"\x00" * 6
    assert socks4_reply(code, ("10.0.0.1", 1080)) == expected + b"\x04\x38\x0a\x00\x00\x01"


def test_reply_with_unrepresentable_bound_address_is_zeros() -> None:
    assert socks4_reply(Socks4Reply.GRANTED, ("2001:db8::1", 80)) == b"\x00\x5a\x00\x50" + bytes(4)
    assert socks4_reply(Socks4Reply.GRANTED, ("name.test", 80)) == b"\x00\x5a\x00\x50" + bytes(4)


def test_failure_is_always_91() -> None:
    hs = Socks4Handshake()
    hs.receive_data(b"\x04\x01\x00\x50\x7f\x00\x00\x01\x00")
    assert hs.reply_failure(ConnectionRefusedError()) == REJECTED
    assert hs.reply_failure() == REJECTED == REJECTED_REPLY


@pytest.mark.parametrize(
    "data",
    [
        b"\x04\x03\x00\x50\x7f\x00\x00\x01\x00",  # unknown command
        b"\x04\x00\x00\x50\x7f\x00\x00\x01\x00",  # command 0
        b"\x05\x01\x00\x50\x7f\x00\x00\x01\x00",  # wrong version
        b"\x04\x01\x00\x50\x00\x00\x00\x01\x00\x00",  # 4a with an empty name
        b"\x04\x01\x00\x50\x00\x00\x00\x01\x00bad name\x00",  # 4a name with a space
        b"\x04\x01\x00\x50\x00\x00\x00\x01\x00\xff\xfe\x00",  # 4a name not UTF-8
    ],
)
def test_malformed_requests_are_rejected_with_91(data: bytes) -> None:
    with pytest.raises(SocksError) as info:
        Socks4Handshake().receive_data(data)
    assert info.value.reply == REJECTED


def test_flooded_user_id_is_rejected_at_max_size() -> None:
    hs = Socks4Handshake(max_size=64)
    hs.receive_data(b"\x04\x01\x00\x50\x7f\x00\x00\x01")
    assert hs.receive_data(b"u" * 56) == []
    with pytest.raises(SocksError) as info:
        hs.receive_data(b"u")
    assert info.value.reply == REJECTED
    assert "larger than 64" in info.value.reason


def test_request_exactly_at_max_size_passes() -> None:
    data = b"\x04\x01\x00\x50\x7f\x00\x00\x01" + b"u" * 55 + b"\x00"
    assert len(data) == 64
    [request] = Socks4Handshake(max_size=64).receive_data(data + b"payload" * 100)
    assert isinstance(request, SocksRequest)


def test_not_allowed_without_credentials_is_refused_after_reading() -> None:
    hs = Socks4Handshake(allowed=False)
    assert hs.receive_data(b"\x04\x01\x00\x50\x7f\x00") == []
    with pytest.raises(SocksError) as info:
        hs.receive_data(b"\x00\x01user\x00")
    assert info.value.reply == REJECTED


def test_python_socks_client_bytes_roundtrip() -> None:
    """python-socks' client request parses, and it accepts our reply."""
    for host in ("192.0.2.44", "example.org"):
        request_bytes = ps4.ConnectRequest(host=host, port=8443, user_id="me").dumps()
        hs = Socks4Handshake()
        [request] = hs.receive_data(request_bytes)
        assert isinstance(request, SocksRequest)
        assert (request.host, request.port, request.user) == (host, 8443, "me")
        reply = ps4.ConnectReply.loads(hs.reply_success(("192.0.2.9", 1234)))
        assert (reply.host, reply.port) == ("192.0.2.9", 1234)
        with pytest.raises(Exception, match="rejected or failed"):
            ps4.ConnectReply.loads(hs.reply_failure())


def test_request_one_byte_over_max_size_is_rejected() -> None:
    data = b"\x04\x01\x00\x50\x7f\x00\x00\x01" + b"u" * 56 + b"\x00"
    assert len(data) == 65
    with pytest.raises(SocksError):
        Socks4Handshake(max_size=64).receive_data(data + b"payload")


def test_ipv4_mapped_bound_address_is_shown() -> None:
    assert socks4_reply(Socks4Reply.GRANTED, ("::ffff:192.0.2.1", 80)) == (
        b"\x00\x5a\x00\x50\xc0\x00\x02\x01"
    )

"""One SOCKS port: SOCKS4, 4a and 5 told apart by the first byte."""

from __future__ import annotations

import pytest

from tproxy.protocols import Reply, SocksCommand, SocksError, SocksHandshake, SocksRequest
from tproxy.protocols.socks5 import Socks5Reply


def test_socks4_by_first_byte() -> None:
    hs = SocksHandshake()
    assert hs.version is None and not hs.complete
    [request] = hs.receive_data(b"\x04\x01\x00\x50\x7f\x00\x00\x01\x00data")
    assert hs.version == 4 and hs.complete and hs.request == request
    assert hs.take_leftover() == b"data"
    assert hs.reply_success(("127.0.0.1", 1)) == b"\x00\x5a\x00\x01\x7f\x00\x00\x01"
    assert hs.reply_failure(Socks5Reply.NOT_ALLOWED) == b"\x00\x5b" + bytes(6)


def test_socks5_by_first_byte_one_byte_at_a_time() -> None:
    hs = SocksHandshake()
    data = b"\x05\x01\x00\x05\x01\x00\x03\x04host\x01\xbbxyz"
    events: list[object] = []
    for byte in data:
        events += hs.receive_data(bytes([byte]))
    assert events == [
        Reply(b"\x05\x00"),
        SocksRequest(5, SocksCommand.CONNECT, "host", 443, is_domain=True),
    ]
    assert hs.version == 5 and hs.leftover == b"xyz"
    assert hs.reply_failure(TimeoutError()) == b"\x05\x06\x00\x01" + bytes(6)


def test_empty_data_waits() -> None:
    hs = SocksHandshake()
    assert hs.receive_data(b"") == []
    assert hs.version is None and hs.leftover == b""


@pytest.mark.parametrize("first", [b"\x00", b"\x03", b"G", b"\x16"])
def test_other_first_byte_is_refused_without_reply(first: bytes) -> None:
    with pytest.raises(SocksError) as info:
        SocksHandshake().receive_data(first + b"ET / HTTP/1.1\r\n")
    assert info.value.reply == b""


def test_replies_before_a_request_are_a_programming_error() -> None:
    with pytest.raises(RuntimeError):
        SocksHandshake().reply_success()
    with pytest.raises(RuntimeError):
        SocksHandshake().reply_failure()


def test_credentials_refuse_socks4_and_require_rfc1929() -> None:
    def auth(user: str, password: str) -> bool:
        return user == "u" and password == "p"

    with pytest.raises(SocksError) as info:
        SocksHandshake(authenticate=auth).receive_data(b"\x04\x01\x00\x50\x7f\x00\x00\x01u\x00")
    assert info.value.reply == b"\x00\x5b" + bytes(6)
    [request] = SocksHandshake(authenticate=auth, allow_socks4_without_auth=True).receive_data(
        b"\x04\x01\x00\x50\x7f\x00\x00\x01u\x00"
    )
    assert isinstance(request, SocksRequest)
    hs = SocksHandshake(authenticate=auth)
    events = hs.receive_data(b"\x05\x01\x02\x01\x01u\x01p\x05\x01\x00\x01\x7f\x00\x00\x01\x00\x50")
    assert events[:2] == [Reply(b"\x05\x02"), Reply(b"\x01\x00")]
    assert isinstance(events[2], SocksRequest) and events[2].user == "u"


def test_max_sizes_are_passed_on() -> None:
    hs = SocksHandshake(socks4_max_size=16)
    with pytest.raises(SocksError):
        hs.receive_data(b"\x04\x01\x00\x50\x7f\x00\x00\x01" + b"u" * 9)
    hs = SocksHandshake(socks5_max_size=4)
    with pytest.raises(SocksError) as info:
        hs.receive_data(b"\x05\x01\x00\x05\x01")
    assert info.value.reply == b"\x05\x00\x05\x01\x00\x01" + bytes(6)

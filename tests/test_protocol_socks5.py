"""SOCKS5 handshake (RFC 1928 + RFC 1929), replies, error mapping and UDP headers."""

from __future__ import annotations

import errno
import socket

import pytest
from python_socks._protocols import socks5 as ps5

from tproxy.protocols import Reply, SocksCommand, SocksError, SocksRequest
from tproxy.protocols.socks5 import (
    AUTH_FAILURE,
    NO_ACCEPTABLE_METHODS,
    DatagramError,
    Socks5Handshake,
    Socks5Reply,
    UdpDatagram,
    build_udp_datagram,
    encode_address,
    parse_udp_datagram,
    reply_code_for_error,
    socks5_reply,
)


def users(user: str, password: str) -> bool:
    return (user, password) == ("alice", "s3cret")


def fail(code: int) -> bytes:
    return bytes((5, code, 0, 1, 0, 0, 0, 0, 0, 0))


# -- negotiation ---------------------------------------------------------------


def test_no_auth_connect_ipv4() -> None:
    hs = Socks5Handshake()
    assert hs.receive_data(b"\x05\x01\x00") == [Reply(b"\x05\x00")]
    events = hs.receive_data(b"\x05\x01\x00\x01\xc0\x00\x02\x01\x00\x50")
    assert events == [SocksRequest(5, SocksCommand.CONNECT, "192.0.2.1", 80)]
    assert hs.complete and hs.leftover == b""


def test_connect_ipv6_and_domain() -> None:
    hs = Socks5Handshake()
    v6 = bytes.fromhex("20010db8000000000000000000000001")
    events = hs.receive_data(b"\x05\x02\x02\x00" + b"\x05\x01\x00\x04" + v6 + b"\x01\xbb")
    assert events[1] == SocksRequest(5, SocksCommand.CONNECT, "2001:db8::1", 443)
    hs = Socks5Handshake()
    events = hs.receive_data(b"\x05\x01\x00\x05\x01\x00\x03\x0bexample.com\x00\x50")
    assert events[1] == SocksRequest(5, SocksCommand.CONNECT, "example.com", 80, is_domain=True)


def test_bind_and_udp_associate_commands() -> None:
    for command in (SocksCommand.BIND, SocksCommand.UDP_ASSOCIATE):
        hs = Socks5Handshake()
        events = hs.receive_data(b"\x05\x01\x00\x05" + bytes([command]) + b"\x00\x01" + bytes(6))
        request = events[1]
        assert isinstance(request, SocksRequest)
        assert request.command is command and request.address == ("0.0.0.0", 0)


def test_pipelined_greeting_request_and_data_in_one_chunk() -> None:
    hs = Socks5Handshake()
    events = hs.receive_data(b"\x05\x01\x00\x05\x01\x00\x01\x7f\x00\x00\x01\x00\x16SSH-2.0-x\r\n")
    assert events == [Reply(b"\x05\x00"), SocksRequest(5, SocksCommand.CONNECT, "127.0.0.1", 22)]
    assert hs.take_leftover() == b"SSH-2.0-x\r\n"


def test_no_acceptable_method() -> None:
    with pytest.raises(SocksError) as info:
        Socks5Handshake().receive_data(b"\x05\x02\x01\x02")
    assert info.value.reply == b"\x05\xff"
    with pytest.raises(SocksError) as info:
        Socks5Handshake().receive_data(b"\x05\x00")
    assert info.value.reply == NO_ACCEPTABLE_METHODS


def test_credentials_configured_make_auth_required() -> None:
    with pytest.raises(SocksError) as info:
        Socks5Handshake(authenticate=users).receive_data(b"\x05\x01\x00")
    assert info.value.reply == b"\x05\xff"


def test_username_password_success() -> None:
    hs = Socks5Handshake(authenticate=users)
    assert hs.receive_data(b"\x05\x02\x00\x02") == [Reply(b"\x05\x02")]
    assert hs.receive_data(b"\x01\x05alice\x06s3cret") == [Reply(b"\x01\x00")]
    [request] = hs.receive_data(b"\x05\x01\x00\x03\x04host\x00\x50")
    assert isinstance(request, SocksRequest)
    assert request.user == "alice"


@pytest.mark.parametrize(
    "auth",
    [
        b"\x01\x05alice\x05wrong",
        b"\x01\x03bob\x06s3cret",
        b"\x01\x00\x00",
        b"\x02\x05alice\x06s3cret",  # wrong sub-negotiation version
    ],
)
def test_username_password_failure(auth: bytes) -> None:
    hs = Socks5Handshake(authenticate=users)
    hs.receive_data(b"\x05\x01\x02")
    with pytest.raises(SocksError) as info:
        hs.receive_data(auth)
    assert info.value.reply == AUTH_FAILURE == b"\x01\x01"


def test_error_reply_includes_replies_of_the_same_call() -> None:
    hs = Socks5Handshake(authenticate=users)
    with pytest.raises(SocksError) as info:
        hs.receive_data(b"\x05\x01\x02\x01\x05alice\x01x")
    assert info.value.reply == b"\x05\x02\x01\x01"


# -- request errors --------------------------------------------------------------


def test_unknown_command() -> None:
    hs = Socks5Handshake()
    hs.receive_data(b"\x05\x01\x00")
    with pytest.raises(SocksError) as info:
        hs.receive_data(b"\x05\x09\x00\x01")
    assert info.value.reply == fail(0x07)


def test_unknown_address_type() -> None:
    hs = Socks5Handshake()
    hs.receive_data(b"\x05\x01\x00")
    with pytest.raises(SocksError) as info:
        hs.receive_data(b"\x05\x01\x00\x02")
    assert info.value.reply == fail(0x08)


@pytest.mark.parametrize("name", [b"", b"a b", b"\xff\xfe", b"x\x00y"])
def test_unusable_domain_name_is_host_unreachable(name: bytes) -> None:
    hs = Socks5Handshake()
    hs.receive_data(b"\x05\x01\x00")
    with pytest.raises(SocksError) as info:
        hs.receive_data(b"\x05\x01\x00\x03" + bytes([len(name)]) + name + b"\x00\x50")
    assert info.value.reply == fail(0x04)


def test_wrong_request_version_is_general_failure() -> None:
    hs = Socks5Handshake()
    hs.receive_data(b"\x05\x01\x00")
    with pytest.raises(SocksError) as info:
        hs.receive_data(b"\x04\x01\x00\x01")
    assert info.value.reply == fail(0x01)


def test_max_size_in_each_phase() -> None:
    with pytest.raises(SocksError) as info:
        Socks5Handshake(max_size=10).receive_data(b"\x05\xff" + bytes(range(1, 10)))
    assert info.value.reply == b"\x05\xff"
    hs = Socks5Handshake(authenticate=users, max_size=20)
    hs.receive_data(b"\x05\x01\x02")
    with pytest.raises(SocksError) as info:
        hs.receive_data(b"\x01\x10" + b"u" * 16)
    assert info.value.reply == b"\x01\x01"
    hs = Socks5Handshake(max_size=20)
    hs.receive_data(b"\x05\x01\x00")
    with pytest.raises(SocksError) as info:
        hs.receive_data(b"\x05\x01\x00\x03\x20" + b"n" * 13)
    assert info.value.reply == fail(0x01)


def test_longest_possible_handshake_fits_the_default() -> None:
    # The longest handshake SOCKS5 can frame is read whole: its 255-byte name
    # is refused for what it is (too long for DNS, 0x04), not for its size.
    hs = Socks5Handshake(authenticate=lambda u, p: True)
    head = b"\x05\xff" + bytes(range(255)) + b"\x01\xff" + b"u" * 255 + b"\xff" + b"p" * 255
    data = head + b"\x05\x01\x00\x03\xff" + b"n" * 255 + b"\x00\x50"
    assert len(data) == 1032
    with pytest.raises(SocksError) as caught:
        hs.receive_data(data)
    assert caught.value.reply.endswith(socks5_reply(Socks5Reply.HOST_UNREACHABLE))
    assert "larger than" not in caught.value.reason
    # The longest name DNS can carry (253 bytes, four labels) is accepted.
    name = b".".join([b"n" * 63] * 3 + [b"n" * 61])
    assert len(name) == 253
    hs = Socks5Handshake(authenticate=lambda u, p: True)
    events = hs.receive_data(head + b"\x05\x01\x00\x03\xfd" + name + b"\x00\x50")
    assert isinstance(events[-1], SocksRequest)
    assert events[-1].host == name.decode()


# -- replies -------------------------------------------------------------------------


@pytest.mark.parametrize("code", list(Socks5Reply))
def test_every_reply_code(code: Socks5Reply) -> None:
    assert socks5_reply(code) == bytes((5, code, 0, 1)) + bytes(6)


def test_reply_bound_addresses() -> None:
    assert socks5_reply(Socks5Reply.SUCCEEDED, ("10.1.2.3", 4321)) == (
        b"\x05\x00\x00\x01\x0a\x01\x02\x03\x10\xe1"
    )
    assert socks5_reply(Socks5Reply.SUCCEEDED, ("::1", 80)) == (
        b"\x05\x00\x00\x04" + bytes(15) + b"\x01\x00\x50"
    )
    assert socks5_reply(Socks5Reply.SUCCEEDED, ("[::1]", 80)).endswith(b"\x01\x00\x50")
    assert socks5_reply(Socks5Reply.SUCCEEDED, ("proxy.test", 1)) == (
        b"\x05\x00\x00\x03\x0aproxy.test\x00\x01"
    )
    with pytest.raises(ValueError):
        encode_address("x" * 256, 1)


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (ConnectionRefusedError(errno.ECONNREFUSED, "refused"), Socks5Reply.CONNECTION_REFUSED),
        (OSError(errno.ENETUNREACH, "net"), Socks5Reply.NETWORK_UNREACHABLE),
        (OSError(errno.ENETDOWN, "net"), Socks5Reply.NETWORK_UNREACHABLE),
        (OSError(errno.EHOSTUNREACH, "host"), Socks5Reply.HOST_UNREACHABLE),
        (OSError(errno.EHOSTDOWN, "host"), Socks5Reply.HOST_UNREACHABLE),
        (socket.gaierror(socket.EAI_NONAME, "unknown"), Socks5Reply.HOST_UNREACHABLE),
        (TimeoutError(), Socks5Reply.TTL_EXPIRED),
        (OSError(errno.ETIMEDOUT, "timeout"), Socks5Reply.TTL_EXPIRED),
        (errno.ETIMEDOUT, Socks5Reply.TTL_EXPIRED),
        (PermissionError(errno.EPERM, "firewall"), Socks5Reply.NOT_ALLOWED),
        (OSError(errno.EACCES, "firewall"), Socks5Reply.NOT_ALLOWED),
        (OSError(errno.EAFNOSUPPORT, "family"), Socks5Reply.ADDRESS_TYPE_NOT_SUPPORTED),
        (OSError(errno.EIO, "other"), Socks5Reply.GENERAL_FAILURE),
        (RuntimeError("bug"), Socks5Reply.GENERAL_FAILURE),
        (None, Socks5Reply.GENERAL_FAILURE),
        (Socks5Reply.NOT_ALLOWED, Socks5Reply.NOT_ALLOWED),
    ],
)
def test_reply_code_for_error(error: object, code: Socks5Reply) -> None:
    assert reply_code_for_error(error) is code  # type: ignore[arg-type]


def test_reply_code_for_trio_style_errors() -> None:
    class TooSlowError(Exception):
        pass

    assert reply_code_for_error(TooSlowError()) is Socks5Reply.TTL_EXPIRED
    # trio.open_tcp_stream: OSError without errno, caused by a group of attempts.
    group = ExceptionGroup("attempts", [OSError(errno.ECONNREFUSED, "refused")])
    wrapper = OSError("all attempts to connect to example.com:80 failed")
    wrapper.__cause__ = group
    assert reply_code_for_error(wrapper) is Socks5Reply.CONNECTION_REFUSED


def test_reply_failure_and_success_methods() -> None:
    hs = Socks5Handshake()
    hs.receive_data(b"\x05\x01\x00\x05\x01\x00\x01\x7f\x00\x00\x01\x00\x50")
    assert hs.reply_failure(ConnectionRefusedError(errno.ECONNREFUSED, "x")) == fail(5)
    assert hs.reply_failure(Socks5Reply.NOT_ALLOWED) == fail(2)
    assert hs.reply_success(("127.0.0.1", 5000)) == b"\x05\x00\x00\x01\x7f\x00\x00\x01\x13\x88"


# -- python-socks, the client side ------------------------------------------------------


@pytest.mark.parametrize("host", ["192.0.2.1", "2001:db8::2", "example.com"])
@pytest.mark.parametrize("credentials", [None, ("alice", "s3cret")])
def test_python_socks_client_roundtrip(host: str, credentials: tuple[str, str] | None) -> None:
    user, password = credentials or (None, None)
    hs = Socks5Handshake(authenticate=users if credentials else None)
    methods = ps5.AuthMethodsRequest(username=user, password=password)
    [selection] = hs.receive_data(methods.dumps())
    assert isinstance(selection, Reply)
    chosen = ps5.AuthMethodReply.loads(selection.data)
    chosen.validate(methods)
    if credentials:
        assert chosen.method == ps5.AuthMethod.USERNAME_PASSWORD
        [status] = hs.receive_data(ps5.AuthRequest(*credentials).dumps())
        assert isinstance(status, Reply)
        ps5.AuthReply.loads(status.data)
    [request] = hs.receive_data(ps5.ConnectRequest(host=host, port=8080).dumps())
    assert isinstance(request, SocksRequest)
    assert (request.host, request.port, request.user) == (host, 8080, user)
    reply = ps5.ConnectReply.loads(hs.reply_success(("2001:db8::9", 1080)))
    assert (reply.bound_host, reply.bound_port) == ("2001:db8::9", 1080)
    for code in list(Socks5Reply)[1:]:
        with pytest.raises(Exception) as info:
            ps5.ConnectReply.loads(hs.reply_failure(code))
        assert getattr(info.value, "error_code", None) == code


# -- UDP ASSOCIATE datagrams ---------------------------------------------------------------


def test_udp_datagram_roundtrip() -> None:
    for host in ("192.0.2.3", "2001:db8::3", "dns.test"):
        packet = build_udp_datagram(host, 53, b"query")
        assert packet[:3] == b"\0\0\0"
        assert parse_udp_datagram(packet) == UdpDatagram(host, 53, b"query", host == "dns.test")


def test_udp_datagram_exact_bytes() -> None:
    packet = b"\x00\x00\x00\x01\x7f\x00\x00\x01\x00\x35hello"
    assert parse_udp_datagram(packet) == UdpDatagram("127.0.0.1", 53, b"hello")
    assert build_udp_datagram("127.0.0.1", 53, b"hello") == packet
    assert parse_udp_datagram(packet[:10]).data == b""


@pytest.mark.parametrize(
    "packet",
    [
        b"",
        b"\x00\x00\x00",
        b"\x00\x00\x01\x01\x7f\x00\x00\x01\x00\x35data",  # FRAG != 0: dropped
        b"\x00\x00\x00\x02\x7f\x00\x00\x01\x00\x35data",  # unknown ATYP
        b"\x00\x00\x00\x01\x7f\x00\x00",  # truncated address
        b"\x00\x00\x00\x03\x05ab",  # truncated name
        b"\x00\x00\x00\x03\x00\x00\x35",  # empty name
    ],
)
def test_udp_datagrams_to_drop(packet: bytes) -> None:
    with pytest.raises(DatagramError):
        parse_udp_datagram(packet)


@pytest.mark.parametrize("chunk", [1, 3, 100])
def test_max_size_boundary_whatever_the_chunking(chunk: int) -> None:
    data = b"\x05\x01\x00" + b"\x05\x01\x00\x01\x7f\x00\x00\x01\x00\x50"  # 13 bytes
    for max_size, accepted in ((13, True), (12, False)):
        hs = Socks5Handshake(max_size=max_size)
        stream = data + b"tail"
        try:
            for i in range(0, len(stream), chunk):
                hs.receive_data(stream[i : i + chunk])
        except SocksError as error:
            assert not accepted
            assert error.reply.endswith(fail(0x01))
        else:
            assert accepted and hs.leftover == b"tail"


def test_ipv4_mapped_bound_address_is_sent_as_ipv4() -> None:
    assert socks5_reply(Socks5Reply.SUCCEEDED, ("::ffff:192.0.2.1", 80)) == (
        b"\x05\x00\x00\x01\xc0\x00\x02\x01\x00\x50"
    )
    assert reply_code_for_error(ConnectionRefusedError()) is Socks5Reply.CONNECTION_REFUSED

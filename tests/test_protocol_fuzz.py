"""Hypothesis over every handshake: random bytes, random chunkings, bounded input.

Properties, for SOCKS4/4a, SOCKS5 (with and without RFC 1929), the SOCKS
dispatcher and the HTTP proxy:

- the outcome (bytes sent to the client, the request, the leftover, or the
  error's reply) is the same however the input is cut into chunks;
- nothing but the protocol's own error (a ``ProtocolError`` subclass)
  escapes, whatever the bytes;
- once more than the maximum handshake size has been fed, the handshake has
  either completed or failed: it never waits for more;
- a valid handshake yields exactly the request that was encoded, and the
  bytes after it are the leftover.
"""

from __future__ import annotations

import ipaddress
import itertools
from collections.abc import Callable
from dataclasses import dataclass

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tproxy.protocols import (
    ConnectRequest,
    ForwardRequest,
    HttpProxyError,
    HttpProxyHandshake,
    ProtocolError,
    Reply,
    SocksCommand,
    SocksError,
    SocksHandshake,
    SocksRequest,
)
from tproxy.protocols.socks4 import Socks4Handshake
from tproxy.protocols.socks5 import (
    DatagramError,
    Socks5Handshake,
    build_udp_datagram,
    encode_address,
    parse_udp_datagram,
)

fuzz = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def good_auth(user: str, password: str) -> bool:
    return (user, password) == ("user", "pass")


@dataclass(frozen=True)
class Outcome:
    sent: bytes
    """All reply bytes the client received, including an error's reply."""
    request: object
    leftover: bytes
    error: type[ProtocolError] | None

    @property
    def waiting(self) -> bool:
        return self.error is None and self.request is None


def drive(make: Callable[[], object], chunks: list[bytes]) -> Outcome:
    handshake = make()
    sent = b""
    request = None
    try:
        for chunk in chunks:
            for event in handshake.receive_data(chunk):  # type: ignore[attr-defined]
                if isinstance(event, Reply):
                    assert request is None, "a Reply after the request"
                    sent += event.data
                else:
                    assert request is None, "two requests"
                    request = event
    except ProtocolError as error:
        return Outcome(sent + error.reply, None, b"", type(error))
    assert handshake.complete == (request is not None)  # type: ignore[attr-defined]
    return Outcome(sent, request, handshake.leftover, None)  # type: ignore[attr-defined]


def cut(data: bytes, points: list[int]) -> list[bytes]:
    bounds = sorted({min(p, len(data)) for p in points} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(bounds)] or [b""]


FACTORIES: dict[str, tuple[Callable[[], object], type[ProtocolError], int]] = {
    "socks4": (lambda: Socks4Handshake(max_size=300), SocksError, 300),
    "socks5": (lambda: Socks5Handshake(max_size=600), SocksError, 600),
    "socks5-small": (lambda: Socks5Handshake(max_size=20), SocksError, 20),
    "socks4-small": (lambda: Socks4Handshake(max_size=12), SocksError, 12),
    "http-small": (lambda: HttpProxyHandshake(max_head_size=40), HttpProxyError, 40),
    "socks5-auth": (lambda: Socks5Handshake(authenticate=good_auth), SocksError, 1100),
    "socks": (lambda: SocksHandshake(socks4_max_size=300, socks5_max_size=600), SocksError, 600),
    "socks-auth": (lambda: SocksHandshake(authenticate=good_auth), SocksError, 1100),
    "http": (lambda: HttpProxyHandshake(max_head_size=400), HttpProxyError, 400),
    "http-auth": (
        lambda: HttpProxyHandshake(authenticate=good_auth, max_head_size=400),
        HttpProxyError,
        400,
    ),
}
kinds = st.sampled_from(sorted(FACTORIES))
cut_points = st.lists(st.integers(min_value=0, max_value=2000), max_size=30)

# -- generators of valid handshakes -------------------------------------------

names = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?(\.[a-z]{2,6}){1,2}", fullmatch=True)
ipv4s = st.ip_addresses(v=4).map(str)
ipv6s = st.ip_addresses(v=6).map(str)
unmapped_ipv6s = st.ip_addresses(v=6).filter(lambda ip: ip.ipv4_mapped is None).map(str)
ports = st.integers(min_value=1, max_value=65535)
trailing = st.binary(max_size=64)


@st.composite
def socks4_requests(draw: st.DrawFn) -> tuple[bytes, SocksRequest]:
    command = draw(st.sampled_from([SocksCommand.CONNECT, SocksCommand.BIND]))
    port = draw(ports)
    user = draw(st.text(st.characters(min_codepoint=1, max_codepoint=0x7F), max_size=20))
    head = bytes((4, command)) + port.to_bytes(2, "big")
    if draw(st.booleans()):
        host = draw(names)
        data = head + bytes((0, 0, 0, draw(st.integers(1, 255))))
        data += user.encode() + b"\0" + host.encode() + b"\0"
        domain = True
    else:
        host = draw(ipv4s.filter(lambda h: not h.startswith("0.0.0.") or h == "0.0.0.0"))
        data = head + ipaddress.IPv4Address(host).packed + user.encode() + b"\0"
        domain = False
    return data, SocksRequest(4, command, host, port, user or None, domain)


@st.composite
def socks5_requests(draw: st.DrawFn, auth: bool) -> tuple[bytes, bytes, SocksRequest]:
    wanted = 2 if auth else 0
    others = draw(st.lists(st.integers(0, 254).filter(lambda m: m != wanted), max_size=5))
    methods = draw(st.permutations([*others, wanted]))
    data = bytes((5, len(methods), *methods))
    replies = bytes((5, wanted))
    if auth:
        data += b"\x01\x04user\x04pass"
        replies += b"\x01\x00"
    command = draw(st.sampled_from(list(SocksCommand)))
    is_domain = draw(st.booleans())
    host = draw(names if is_domain else st.one_of(ipv4s, unmapped_ipv6s))
    port = draw(st.integers(0, 65535))
    data += bytes((5, command, 0)) + encode_address(host, port)
    request = SocksRequest(5, command, host, port, "user" if auth else None, is_domain)
    return data, replies, request


header_names = st.from_regex(r"X-[A-Za-z0-9-]{1,10}", fullmatch=True)
header_values = st.from_regex(r"[ -~]{0,30}", fullmatch=True).map(str.strip)


@st.composite
def http_requests(draw: st.DrawFn, auth: bool) -> tuple[bytes, tuple[str, int]]:
    host = draw(st.one_of(ipv4s, ipv6s, names))
    port = draw(ports)
    shown = f"[{host}]" if ":" in host else host
    if draw(st.booleans()):
        line = f"CONNECT {shown}:{port} HTTP/1.1"
    else:
        method = draw(st.sampled_from(["GET", "POST", "HEAD", "DELETE", "PUT"]))
        path = draw(st.from_regex(r"(/[a-z0-9._~-]{0,10}){0,3}(\?[a-z=&]{0,10})?", fullmatch=True))
        line = f"{method} http://{shown}:{port}{path} HTTP/1.1"
    headers = draw(st.lists(st.tuples(header_names, header_values), max_size=5))
    lines = [line, *(f"{n}: {v}" for n, v in headers)]
    if auth:
        lines.append("Proxy-Authorization: Basic dXNlcjpwYXNz")
    eol = draw(st.sampled_from(["\r\n", "\n"]))
    return (eol.join(lines) + eol + eol).encode(), (host, port)


# -- properties -----------------------------------------------------------------------


@fuzz
@given(kind=kinds, data=st.binary(max_size=700), points=cut_points)
def test_random_bytes_only_protocol_errors_and_chunking_does_not_matter(
    kind: str, data: bytes, points: list[int]
) -> None:
    make, error_type, max_size = FACTORIES[kind]
    whole = drive(make, [data])
    assert whole.error is None or issubclass(whole.error, error_type)
    if whole.request is not None:
        assert len(data) - len(whole.leftover) <= max_size
    assert drive(make, cut(data, points)) == whole
    assert drive(make, [bytes([b]) for b in data]) == whole


@fuzz
@given(kind=kinds, prefix=st.binary(max_size=40), filler=st.binary(min_size=1, max_size=1))
def test_never_waits_past_the_maximum_size(kind: str, prefix: bytes, filler: bytes) -> None:
    make, _, max_size = FACTORIES[kind]
    data = (prefix + filler * (max_size + 1))[: max_size + 1]
    outcome = drive(make, [data])
    assert not outcome.waiting
    assert not drive(make, [data[i : i + 7] for i in range(0, len(data), 7)]).waiting


@fuzz
@given(
    kind=kinds,
    seed=st.one_of(
        socks4_requests().map(lambda r: r[0]),
        socks5_requests(auth=False).map(lambda r: r[0]),
        socks5_requests(auth=True).map(lambda r: r[0]),
        http_requests(auth=False).map(lambda r: r[0]),
        http_requests(auth=True).map(lambda r: r[0]),
    ),
    flips=st.lists(st.tuples(st.integers(0, 1000), st.integers(0, 255)), max_size=4),
    points=cut_points,
)
def test_mutated_handshakes(
    kind: str, seed: bytes, flips: list[tuple[int, int]], points: list[int]
) -> None:
    data = bytearray(seed)
    for at, value in flips:
        if data:
            data[at % len(data)] = value
    make, error_type, max_size = FACTORIES[kind]
    whole = drive(make, [bytes(data)])
    assert whole.error is None or issubclass(whole.error, error_type)
    if whole.request is not None:
        assert len(data) - len(whole.leftover) <= max_size
    assert drive(make, cut(bytes(data), points)) == whole


@fuzz
@given(request=socks4_requests(), tail=trailing, points=cut_points)
def test_valid_socks4(request: tuple[bytes, SocksRequest], tail: bytes, points: list[int]) -> None:
    data, expected = request
    for make in (Socks4Handshake, SocksHandshake):
        outcome = drive(make, cut(data + tail, points))
        assert outcome == Outcome(b"", expected, tail, None)


@fuzz
@given(auth=st.booleans(), data=st.data(), tail=trailing, points=cut_points)
def test_valid_socks5(auth: bool, data: st.DataObject, tail: bytes, points: list[int]) -> None:
    raw, replies, expected = data.draw(socks5_requests(auth=auth))
    authenticate = good_auth if auth else None
    for make in (Socks5Handshake, SocksHandshake):
        outcome = drive(lambda m=make: m(authenticate=authenticate), cut(raw + tail, points))
        assert outcome == Outcome(replies, expected, tail, None)


@fuzz
@given(auth=st.booleans(), data=st.data(), tail=trailing, points=cut_points)
def test_valid_http(auth: bool, data: st.DataObject, tail: bytes, points: list[int]) -> None:
    raw, address = data.draw(http_requests(auth=auth))
    authenticate = good_auth if auth else None
    outcome = drive(lambda: HttpProxyHandshake(authenticate=authenticate), cut(raw + tail, points))
    assert outcome.error is None and outcome.sent == b""
    assert isinstance(outcome.request, ConnectRequest | ForwardRequest)
    assert outcome.request.address == address
    assert outcome.request.user == ("user" if auth else None)
    assert outcome.leftover == tail
    if isinstance(outcome.request, ForwardRequest):
        again = drive(HttpProxyHandshake, [outcome.request.head.replace(b" /", b" http://x/", 1)])
        assert isinstance(again.request, ForwardRequest)
        assert b"Proxy-Authorization" not in outcome.request.head


@fuzz
@given(packet=st.binary(max_size=300))
def test_udp_datagram_parse_only_raises_datagram_error(packet: bytes) -> None:
    try:
        datagram = parse_udp_datagram(packet)
    except DatagramError:
        return
    rebuilt = build_udp_datagram(datagram.host, datagram.port, datagram.data)
    assert parse_udp_datagram(rebuilt) == datagram


# -- host names: what passes a parser never trips the resolver -------------------------

label_chars = st.sampled_from("abcdefghijklmnopqrstuvwxyz0123456789-_")
labels = st.text(label_chars, min_size=1, max_size=63)
idn_labels = st.text(st.sampled_from("abcxyzäöüßéñ0123456789-"), min_size=1, max_size=20).filter(
    lambda label: _encodes(label) and len(label.encode("idna")) <= 63
)
valid_names = (
    st.lists(st.one_of(labels, idn_labels), min_size=1, max_size=8)
    .map(".".join)
    .filter(lambda name: len(name.encode("idna")) <= 253)
)


def _encodes(name: str) -> bool:
    try:
        name.encode("idna")
    except UnicodeError:
        return False
    return True


@st.composite
def bad_names(draw: st.DrawFn) -> str:
    """A name no resolver can be asked for: each way a name can be broken."""
    good = draw(st.lists(labels, min_size=1, max_size=4))
    at = draw(st.integers(0, len(good)))
    kind = draw(st.sampled_from(["empty", "long-label", "long-name", "control", "non-idna"]))
    if kind == "empty":
        broken = [*good[:at], "", *good[at:]]
        if broken == [*good, ""]:
            broken.append("")  # one trailing dot is a valid name; two are not
    elif kind == "long-label":
        broken = [*good[:at], "a" * draw(st.integers(64, 120)), *good[at:]]
    elif kind == "long-name":
        broken = ["b" * 63] * 4 + good
    elif kind == "control":
        char = draw(st.sampled_from(["\0", "\t", " ", "\x7f", "\x1b", "\n"]))
        label = good[0]
        cut_at = draw(st.integers(0, len(label)))
        broken = [label[:cut_at] + char + label[cut_at:], *good[1:]]
    else:
        char = draw(
            st.sampled_from(["\u0080", "\u009f", "\u2028", "\ufffe", "\u05d0", "\u06dd", "\ue000"])
        )
        broken = [*good[:at], "x" + char, *good[at:]]
    return ".".join(broken)


def socks5_name_request(name: bytes, port: int = 80) -> bytes:
    return b"\x05\x01\x00" + b"\x05\x01\x00\x03" + bytes((len(name),)) + name + port.to_bytes(2)


def socks4a_name_request(name: bytes, port: int = 80) -> bytes:
    return b"\x04\x01" + port.to_bytes(2) + b"\0\0\0\x07" + b"u\0" + name + b"\0"


def http_name_requests(name: str) -> list[bytes]:
    return [
        f"CONNECT {name}:443 HTTP/1.1\r\n\r\n".encode("utf-8", "surrogateescape"),
        f"GET http://{name}/ HTTP/1.1\r\n\r\n".encode("utf-8", "surrogateescape"),
    ]


SOCKS5_HOST_UNREACHABLE = b"\x05\x00" + b"\x05\x04\x00\x01" + bytes(6)
SOCKS4_REJECTED = b"\x00\x5b" + bytes(6)


@fuzz
@given(name=bad_names(), points=cut_points)
def test_a_broken_name_gets_each_protocols_refusal(name: str, points: list[int]) -> None:
    raw = name.encode()
    if len(raw) <= 255:
        outcome = drive(Socks5Handshake, cut(socks5_name_request(raw), points))
        assert (outcome.error, outcome.sent) == (SocksError, SOCKS5_HOST_UNREACHABLE), name
    if b"\0" not in raw:
        outcome = drive(Socks4Handshake, cut(socks4a_name_request(raw), points))
        assert (outcome.error, outcome.sent) == (SocksError, SOCKS4_REJECTED), name
    for head in http_name_requests(name):
        outcome = drive(HttpProxyHandshake, cut(head, points))
        assert outcome.error is HttpProxyError, name
        assert outcome.sent.startswith(b"HTTP/1.1 400 "), name


@fuzz
@given(name=valid_names, points=cut_points)
def test_every_name_dns_can_carry_passes_every_door(name: str, points: list[int]) -> None:
    raw = name.encode()
    if len(raw) <= 255:
        outcome = drive(Socks5Handshake, cut(socks5_name_request(raw), points))
        assert isinstance(outcome.request, SocksRequest) and outcome.request.host == name
    outcome = drive(Socks4Handshake, cut(socks4a_name_request(raw), points))
    assert isinstance(outcome.request, SocksRequest) and outcome.request.host == name
    if name.isascii():  # an HTTP request target is ASCII; IDNs arrive as xn-- labels
        for head in http_name_requests(name):
            outcome = drive(HttpProxyHandshake, [head])
            assert isinstance(outcome.request, ConnectRequest | ForwardRequest), name
            assert outcome.request.host == name


def _resolver_accepts(name: str) -> bool:
    """What ``getaddrinfo`` does with a ``str`` before any lookup: IDNA, no NUL."""
    return "\0" not in name and _encodes(name)


@fuzz
@given(raw=st.one_of(st.binary(max_size=255), st.text(max_size=80).map(str.encode)))
def test_a_name_a_socks_door_accepts_never_trips_the_resolver(raw: bytes) -> None:
    for data in (socks5_name_request(raw), socks4a_name_request(raw.replace(b"\0", b""))):
        outcome = drive(SocksHandshake, [data])
        if isinstance(outcome.request, SocksRequest):
            assert _resolver_accepts(outcome.request.host), outcome.request.host
        else:
            assert outcome.error is SocksError


@fuzz
@given(name=st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=300))
def test_a_host_the_http_door_accepts_never_trips_the_resolver(name: str) -> None:
    for head in http_name_requests(name):
        outcome = drive(HttpProxyHandshake, [head])
        if isinstance(outcome.request, ConnectRequest | ForwardRequest):
            host = outcome.request.host
            assert ":" in host or _resolver_accepts(host), host
        else:
            assert outcome.error is HttpProxyError

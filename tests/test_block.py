"""The ``block`` built-in: by destination (CIDR, host, port) and by first bytes."""

from __future__ import annotations

import pytest

from tproxy import loading
from tproxy.engine import Engine, EngineConfig
from tproxy.flow import FlowInfo
from tproxy.interceptor import AbortFlow, Chain, OptionError
from tproxy.interceptors.block import Block
from tproxy.testing import Driver


def to(host: str, port: int = 80) -> FlowInfo:
    return FlowInfo.example(destination=(host, port))


@pytest.mark.parametrize(
    ("options", "destination", "blocked"),
    [
        ({"cidr": "198.51.100.0/24"}, ("198.51.100.20", 80), True),
        ({"cidr": "10.0.0.0/8, 198.51.100.20"}, ("198.51.100.20", 443), True),
        ({"cidr": "10.0.0.0/8"}, ("198.51.100.20", 80), False),
        ({"cidr": "2001:db8::/32"}, ("2001:db8::1", 80), True),
        ({"cidr": "2001:db8::/32"}, ("198.51.100.20", 80), False),
        ({"cidr": "10.0.0.0/8"}, ("::ffff:10.1.2.3", 80), True),
        ({"cidr": "10.0.0.0/8"}, ("ten.example", 80), False),  # a name is not in a CIDR
        ({"port": "22,8000-8100"}, ("198.51.100.20", 22), True),
        ({"port": "22,8000-8100"}, ("198.51.100.20", 8080), True),
        ({"port": "22,8000-8100"}, ("198.51.100.20", 80), False),
        ({"cidr": "198.51.100.0/24", "port": "22"}, ("198.51.100.20", 80), False),
        ({"cidr": "198.51.100.0/24", "port": "22"}, ("198.51.100.20", 22), True),
        ({"host": r"(.*\.)?example\.com"}, ("WWW.Example.com.", 443), True),
        ({"host": r"(.*\.)?example\.com"}, ("example.com.evil", 443), False),
        ({"host": r".*"}, ("198.51.100.20", 80), False),  # host= matches names only
        ({"host": "a.test", "cidr": "192.0.2.0/24"}, ("192.0.2.1", 1), True),
        ({"host": "a.test", "cidr": "192.0.2.0/24"}, ("a.test", 1), True),
    ],
)
def test_destination(options: dict[str, str], destination: tuple[str, int], blocked: bool) -> None:
    d = Driver(Block, flow=to(*destination), **options)
    if blocked:
        assert d.aborted is not None and d.aborted.startswith("block: destination")
    else:
        assert d.aborted is None and d.passthrough
        d.client(b"data")
        assert d.to_server == b"data"


def test_reply_is_sent_before_the_abort() -> None:
    options = Block.parse_options({"port": "80", "reply": r"HTTP/1.0 403 Forbidden\r\n\r\n"})
    chain = Chain([Block(to("198.51.100.20"), options)])
    with pytest.raises(AbortFlow) as info:
        chain.start()
    assert info.value.to_client == b"HTTP/1.0 403 Forbidden\r\n\r\n"


def test_pattern_in_first_bytes_split_across_reads() -> None:
    d = Driver(Block, pattern=r"Host: evil\.test\r\n")
    d.client(b"GET / HTTP/1.1\r\nHost: ev")
    assert d.aborted is None
    d.client(b"il.test\r\n\r\n")
    assert d.aborted is not None and "pattern" in d.aborted
    assert d.to_server == b"GET / HTTP/1.1\r\nHost: ev"  # the completing read was not sent


def test_pattern_reply_via_chain() -> None:
    options = Block.parse_options({"pattern": "evil", "reply": "no"})
    chain = Chain([Block(to("198.51.100.20"), options)])
    chain.start()
    with pytest.raises(AbortFlow) as info:
        chain.client_data(b"so evil")
    assert info.value.to_client == b"no"


def test_data_is_forwarded_while_scanning_and_passthrough_after_first_bytes() -> None:
    d = Driver(Block, pattern="evil", first_bytes="8")
    assert d.client(b"GET ").to_server == b"GET "  # never held back
    assert not d.passthrough
    d.client(b"/ HTTP/1.1 evil")  # "evil" starts after the first 8 bytes
    assert d.aborted is None and d.passthrough
    d.server(b"ok")
    assert (d.to_server, d.to_client) == (b"GET / HTTP/1.1 evil", b"ok")


def test_pattern_only_for_matching_destinations() -> None:
    d = Driver(Block, flow=to("192.0.2.1", 443), pattern="evil", port="80")
    assert d.passthrough
    d = Driver(Block, flow=to("192.0.2.1", 80), pattern="evil", port="80")
    assert not d.passthrough
    d.client(b"evil")
    assert d.aborted


def test_server_data_is_untouched() -> None:
    d = Driver(Block, pattern="evil")
    d.server(b"evil from the server")
    d.server_eof()
    d.client_eof()
    assert d.aborted is None and d.to_client == b"evil from the server"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({}, "at least one of"),
        ({"reply": "x"}, "at least one of"),
        ({"cidr": "10.0.0.0/33"}, "cidr"),
        ({"cidr": ","}, "cidr is empty"),
        ({"port": "http"}, "port .http. is not a number"),
        ({"port": "90-80"}, "goes backwards"),
        ({"port": "70000"}, "out of range 1-65535"),
        ({"host": "("}, "host is not a valid regex"),
        ({"pattern": "["}, "pattern is not a valid regular expression"),
        ({"port": "1", "first-bytes": "10"}, "first-bytes only applies to pattern"),
        ({"pattern": "a", "first-bytes": "0"}, "at least 1"),
    ],
)
def test_bad_options(options: dict[str, str], message: str) -> None:
    with pytest.raises(OptionError, match=message):
        Block.parse_options(options)


@pytest.mark.parametrize(
    ("options", "destination", "applies"),
    [
        ({"cidr": "198.51.100.0/24"}, ("198.51.100.20", 80), True),
        ({"cidr": "198.51.100.0/24"}, ("192.0.2.1", 80), False),
        ({"port": "22"}, ("192.0.2.1", 80), False),
        ({"host": r"(.*\.)?example\.com"}, ("www.example.com", 443), True),
        ({"pattern": "GET"}, ("192.0.2.1", 80), True),  # content checks need every flow
        ({"cidr": "198.51.100.0/24", "pattern": "x"}, ("192.0.2.1", 80), False),
    ],
)
def test_a_flow_whose_destination_does_not_match_gets_no_instance(
    options: dict[str, str], destination: tuple[str, int], applies: bool
) -> None:
    """The engine asks before it builds a chain: an unmatched flow has no interceptor to
    call, so it is relayed (spliced) like passthrough from its first byte."""
    factory = loading.load_interceptor("block", options)
    info = to(*destination)
    assert factory.selects(info) is applies
    chain = Engine(EngineConfig(), [factory]).chain_for(info)
    assert (chain is not None) is applies

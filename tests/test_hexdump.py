"""The ``hexdump`` built-in: logs, forwards unchanged, goes passthrough after max-bytes."""

from __future__ import annotations

import logging

import pytest

from tproxy.flow import FlowInfo
from tproxy.interceptor import OptionError
from tproxy.interceptors.hexdump import Hexdump, hexdump
from tproxy.testing import Driver


def test_hexdump_format_matches_hexdump_c() -> None:
    assert hexdump(b"GET / HTTP/1.1\r\nHost") == [
        "00000000  47 45 54 20 2f 20 48 54  54 50 2f 31 2e 31 0d 0a  |GET / HTTP/1.1..|",
        "00000010  48 6f 73 74                                       |Host|",
    ]
    assert hexdump(b"\x00\xff", offset=0x20) == [
        "00000020  00 ff                                             |..|"
    ]
    assert hexdump(b"") == []


def records(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "tproxy.hexdump"]


def test_logs_both_directions_and_forwards_unchanged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="tproxy.hexdump")
    d = Driver(Hexdump, flow=FlowInfo(7, ("192.0.2.1", 1234), ("198.51.100.2", 80)))
    d.client(b"hello")
    d.server(b"world!")
    d.client(b"more")
    d.client_eof()
    d.server_eof()
    d.end()
    assert (d.to_server, d.to_client) == (b"hellomore", b"world!")
    logged = records(caplog)
    assert logged[0] == "flow 7 hexdump start client=192.0.2.1:1234 dst=198.51.100.2:80"
    assert logged[1].splitlines() == [
        "flow 7 client->server 5 bytes at offset 0",
        f"00000000  {'68 65 6c 6c 6f':<48}  |hello|",
    ]
    assert logged[2].startswith("flow 7 server->client 6 bytes at offset 0\n")
    assert logged[3].startswith("flow 7 client->server 4 bytes at offset 5\n00000005  6d 6f")
    assert logged[4:] == [
        "flow 7 client->server eof after 9 bytes",
        "flow 7 server->client eof after 6 bytes",
        "flow 7 hexdump end reason=eof up=9 down=6",
    ]


def test_max_bytes_then_passthrough(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="tproxy.hexdump")
    d = Driver(Hexdump, max_bytes="4")
    d.client(b"abcdef")
    assert not d.passthrough  # the server direction still logs
    d.server(b"xy")
    d.server(b"zw!")
    assert d.passthrough
    d.client(b"unseen")
    assert d.to_server == b"abcdefunseen" and d.to_client == b"xyzw!"
    logged = records(caplog)
    assert "00000000  61 62 63 64 " in logged[1]
    assert "2 bytes of this read and the rest of client->server not shown" in logged[1]
    assert logged[3].splitlines()[1].startswith("00000002  7a 77  ")
    assert all("unseen" not in line and "75 6e" not in line for line in logged)


def test_one_direction_goes_passthrough_when_it_is_done(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="tproxy.hexdump")
    d = Driver(Hexdump, direction="server", **{"max-bytes": "3"})
    d.client(b"not logged")
    assert not d.passthrough
    d.server(b"abc")
    assert d.passthrough
    assert not any("client->server" in line for line in records(caplog))


def test_no_limit() -> None:
    d = Driver(Hexdump, max_bytes="none")
    d.client(b"x" * 100_000)
    assert not d.passthrough


def test_forwarding_does_not_depend_on_logging_level(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="tproxy.hexdump")
    d = Driver(Hexdump, max_bytes="2")
    d.client(b"abc")
    d.server(b"abc")
    assert d.passthrough and records(caplog) == []


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"max-bytes": "0"}, "at least 1"),
        ({"max-bytes": "lots"}, "integer"),
        ({"direction": "sideways"}, "direction"),
    ],
)
def test_bad_options(options: dict[str, str], message: str) -> None:
    with pytest.raises(OptionError, match=message):
        Hexdump.parse_options(options)

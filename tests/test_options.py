"""tproxy.options: the typed option parsers every interceptor may use."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tproxy import Interceptor
from tproxy import options as o
from tproxy.interceptor import OptionError
from tproxy.testing import Driver


def test_normalize_keys_spells_underscores_and_rejects_twins() -> None:
    assert o.normalize_keys({"max-bytes": "1", " y ": "2"}) == {"max_bytes": "1", "y": "2"}
    assert o.normalize_keys({"n": 3}) == {"n": "3"}
    with pytest.raises(OptionError, match="given twice"):
        o.normalize_keys({"max-bytes": "1", "max_bytes": "2"})


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("4096", 4096),
        ("64k", 65536),
        ("64K", 65536),
        ("1m", 2**20),
        ("2g", 2**31),
        ("64kib", 65536),
        ("1 MB", 2**20),
        ("0", 0),
    ],
)
def test_size(text: str, value: int) -> None:
    assert o.parse_size("t", "max-bytes", text) == value


@pytest.mark.parametrize("text", ["", "k", "-1", "1.5k", "12q", "1kk"])
def test_bad_size(text: str) -> None:
    with pytest.raises(OptionError, match=r"^t: max-bytes must be a size"):
        o.parse_size("t", "max-bytes", text)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("250ms", 0.25), ("1.5s", 1.5), ("2m", 120.0), ("1h", 3600.0), ("10", 10.0), (".5", 0.5)],
)
def test_duration(text: str, seconds: float) -> None:
    assert o.parse_duration("t", "delay", text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "ms", "-1s", "1d", "1 2"])
def test_bad_duration(text: str) -> None:
    with pytest.raises(OptionError, match=r"^t: delay must be a duration"):
        o.parse_duration("t", "delay", text)


def test_int_bounds() -> None:
    assert o.parse_int("t", "n", " 7 ", minimum=1, maximum=7) == 7
    with pytest.raises(OptionError, match="at least 1"):
        o.parse_int("t", "n", "0", minimum=1)
    with pytest.raises(OptionError, match="at most 7"):
        o.parse_int("t", "n", "8", maximum=7)
    with pytest.raises(OptionError, match="must be an integer"):
        o.parse_int("t", "n", "seven")


@pytest.mark.parametrize(
    ("text", "value"),
    [("yes", True), ("ON", True), ("1", True), ("false", False), ("off", False), ("0", False)],
)
def test_bool(text: str, value: bool) -> None:
    assert o.parse_bool("t", "flag", text) is value


def test_bad_bool_choice_list() -> None:
    with pytest.raises(OptionError, match="true or false"):
        o.parse_bool("t", "flag", "maybe")
    assert o.choice("a", "b")("t", "k", "B") == "b"
    with pytest.raises(OptionError, match="one of a, b"):
        o.choice("a", "b")("t", "k", "c")
    assert o.parse_list("t", "k", " a, b,,c ") == ("a", "b", "c")
    with pytest.raises(OptionError, match="k is empty"):
        o.parse_list("t", "k", " , ")


def test_cidrs_and_ports() -> None:
    nets = o.parse_cidrs("t", "cidr", "10.0.0.0/8, 2001:db8::/32,192.0.2.7")
    assert nets[2] == ipaddress.ip_network("192.0.2.7/32")
    assert o.address_in("10.1.2.3", nets) and o.address_in("::ffff:10.0.0.1", nets)
    assert not o.address_in("11.0.0.1", nets) and not o.address_in("example.com", nets)
    with pytest.raises(OptionError, match="t: cidr:"):
        o.parse_cidrs("t", "cidr", "10.0.0.0/33")
    ports = o.parse_ports("t", "port", "80;8000-8100", separator=";")
    assert ports == ((80, 80), (8000, 8100))
    assert o.port_in(8050, ports) and not o.port_in(81, ports)
    for bad in ("x", "90-80", "70000", "0", "80;;81"):
        with pytest.raises(OptionError, match="t: port:"):
            o.parse_ports("t", "port", bad, separator=";")


def test_regexes() -> None:
    assert o.parse_regex("t", "p", r"a\d+").search(b"xa12")
    assert o.parse_text_regex("t", "h", r"(.*\.)?example\.com").fullmatch("WWW.Example.com")
    with pytest.raises(OptionError, match="not a valid regular expression"):
        o.parse_regex("t", "p", "(")


@given(st.binary(max_size=64))
def test_escapes_round_trip(data: bytes) -> None:
    assert o.decode_escapes("t", "k", o.encode_escapes(data)) == data


def test_escapes() -> None:
    assert o.parse_bytes("t", "k", r"a\r\n\x00\\") == b"a\r\n\x00\\"
    with pytest.raises(OptionError, match="unknown escape"):
        o.parse_bytes("t", "k", r"\q")


class Tarpit(Interceptor):
    """A user interceptor written with tproxy.options.parse."""

    @classmethod
    def parse_options(cls, raw):  # type: ignore[no-untyped-def]
        return o.parse(
            "tarpit",
            raw,
            delay=(o.parse_duration, 0.25),
            max_bytes=(o.parse_size, 65536),
            greeting=o.parse_bytes,
            mode=(o.choice("slow", "stop"), "slow"),
        )


def test_parse_schema_with_both_spellings_and_defaults() -> None:
    opts = Tarpit.parse_options({"max-bytes": "1k", "greeting": r"hi\n"})
    assert (opts.delay, opts.max_bytes, opts.greeting, opts.mode) == (0.25, 1024, b"hi\n", "slow")


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({}, "tarpit: option 'greeting' is required"),
        ({"greeting": "x", "colour": "red"}, "unknown option 'colour' .accepted: delay, greeting"),
        ({"greeting": "x", "max_bytes": "lots"}, "tarpit: max-bytes must be a size"),
    ],
)
def test_parse_schema_errors(raw: dict[str, str], message: str) -> None:
    with pytest.raises(OptionError, match=message):
        Tarpit.parse_options(raw)


def test_driver_takes_options_as_the_command_line_does() -> None:
    d = Driver(Tarpit, max_bytes=2048, greeting=r"\x41")
    assert d.interceptor.options.max_bytes == 2048
    assert d.interceptor.options.greeting == b"A"
    d2 = Driver((Tarpit, {"max-bytes": "4k", "greeting": "g"}))
    assert d2.interceptor.options.max_bytes == 4096
    with pytest.raises(OptionError, match="given twice"):
        Driver((Tarpit, {"max-bytes": "4k", "max_bytes": "1k", "greeting": "g"}))


def test_builtin_options_in_either_spelling() -> None:
    from tproxy.interceptors.hexdump import Hexdump

    assert (
        Driver(Hexdump, max_bytes="10").interceptor.options
        == Driver((Hexdump, {"max-bytes": "10"})).interceptor.options
    )

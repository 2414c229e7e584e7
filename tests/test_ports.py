"""The one port syntax (tproxy/ports.py): what it accepts, what it refuses and how it says so,
and that every caller takes the same syntax with its own error form."""

from __future__ import annotations

import argparse

import pytest

from tproxy import options
from tproxy.interceptor import OptionError
from tproxy.metrics import _address as metrics_address
from tproxy.modes import ModeError, parse_mode
from tproxy.ports import PortRange, PortSpecError, parse_port, parse_port_range, parse_ports
from tproxy.protocols.policy import Policy, PolicyError
from tproxy.routing.plan import PlanError, build_request
from tproxy.selection import SelectionError, parse_condition

ACCEPTED = [
    ("80", [(80, 80)]),
    (" 80 ", [(80, 80)]),
    ("1", [(1, 1)]),
    ("65535", [(65535, 65535)]),
    ("080", [(80, 80)]),
    ("8000-8100", [(8000, 8100)]),
    ("8000:8100", [(8000, 8100)]),
    ("8000 - 8100", [(8000, 8100)]),
    ("5-5", [(5, 5)]),
    ("1-65535", [(1, 65535)]),
    ("443,80", [(80, 80), (443, 443)]),
    ("80, 443", [(80, 80), (443, 443)]),
    ("80,81,82-90,85:95", [(80, 95)]),
    ("100-200,150-160", [(100, 200)]),
    ("80,80", [(80, 80)]),
]

REJECTED = [
    ("", "empty port in ''"),
    (" ", "empty port"),
    ("0", "port 0 is out of range 1-65535"),
    ("0-1023", "port 0 is out of range"),
    ("65536", "port 65536 is out of range 1-65535"),
    ("1-70000", "port 70000 is out of range"),
    ("99999999999999999999", "is out of range"),
    ("90-80", "port range '90-80' goes backwards"),
    ("80,", "empty port in '80,'"),
    (",80", "empty port"),
    ("80,,443", "empty port in '80,,443'"),
    ("http", "port 'http' is not a number"),
    ("8 0", "port '8 0' is not a number"),
    ("+80", "port '+80' is not a number"),
    ("8_0", "port '8_0' is not a number"),
    ("٨٠", "is not a number"),
    ("²", "is not a number"),
    ("-5", "port range '-5' is not LOW-HIGH"),
    ("5-", "port range '5-' is not LOW-HIGH"),
    ("1-2-3", "port range '1-2-3' is not LOW-HIGH"),
    ("80-http", "is not LOW-HIGH"),
]


@pytest.mark.parametrize(("spec", "ranges"), ACCEPTED)
def test_accepted(spec: str, ranges: list[tuple[int, int]]) -> None:
    assert parse_ports(spec) == tuple(PortRange(a, b) for a, b in ranges)


@pytest.mark.parametrize(("spec", "message"), REJECTED)
def test_rejected(spec: str, message: str) -> None:
    with pytest.raises(PortSpecError) as caught:
        parse_ports(spec)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_lists_separators_and_the_empty_list() -> None:
    assert parse_ports(["443", "80-81"]) == parse_ports("80,81,443")
    assert parse_ports("80;8000-8100", separator=";") == (PortRange(80, 80), PortRange(8000, 8100))
    with pytest.raises(PortSpecError, match="not a number"):
        parse_ports("80,443", separator=";")
    with pytest.raises(PortSpecError, match="no ports given"):
        parse_ports([])


def test_single_port_and_range_items() -> None:
    assert parse_port(" 9091 ") == 9091
    with pytest.raises(PortSpecError, match=r"^proxy port 0 is out of range 1-65535$"):
        parse_port("0", "proxy port")
    with pytest.raises(PortSpecError, match="not a number"):
        parse_port("80-90")
    assert parse_port_range("7") == PortRange(7, 7)
    assert parse_port_range("7:9") == PortRange(7, 9)


def test_a_long_bad_value_is_shortened_in_the_message() -> None:
    with pytest.raises(PortSpecError) as caught:
        parse_port("x" * 10_000)
    assert len(str(caught.value)) < 80


def test_range_values() -> None:
    assert 80 in PortRange(80, 90) and 91 not in PortRange(80, 90) and "80" not in PortRange(80, 90)
    assert str(PortRange(8, 8)) == "8" and str(PortRange(8, 9)) == "8-9"
    assert PortRange(8, 9).iptables == "8:9"
    for first, last in ((0, 1), (2, 1), (1, 65536)):
        with pytest.raises(PortSpecError):
            PortRange(first, last)


# -- every caller: the same syntax, the caller's own error form ----------------------


@pytest.mark.parametrize(("spec", "message"), REJECTED[:12])
def test_callers_refuse_the_same_specs(spec: str, message: str) -> None:
    with pytest.raises(OptionError, match=r"^blk: port: "):
        options.parse_ports("blk", "port", spec)
    with pytest.raises(PolicyError, match=r"^--allow-port: "):
        Policy.from_options(allow_ports=[spec])
    with pytest.raises(PlanError):
        build_request("eth0", "eth1", spec)
    when = spec.replace(",", ";")
    if when.strip():  # an empty --when value has its own message
        with pytest.raises(SelectionError, match="port"):
            parse_condition(f"port={when}")


@pytest.mark.parametrize(("spec", "ranges"), ACCEPTED)
def test_callers_accept_the_same_specs(spec: str, ranges: list[tuple[int, int]]) -> None:
    assert options.parse_ports("blk", "port", spec) == tuple(ranges)
    policy = Policy.from_options(allow_ports=[spec])
    assert policy.allow_ports == tuple(PortRange(a, b) for a, b in ranges)
    request = build_request("eth0", "eth1", spec)
    assert request.ports == tuple(PortRange(a, b) for a, b in ranges)


def test_listen_and_metrics_ports_take_the_same_single_port_rule() -> None:
    assert parse_mode("socks@:1081").port == 1081
    for bad, message in (("0", "out of range"), ("65536", "out of range"), ("x", "not a number")):
        with pytest.raises(ModeError, match=message):
            parse_mode(f"socks@:{bad}")
        with pytest.raises(argparse.ArgumentTypeError, match=message):
            metrics_address(f"127.0.0.1:{bad}")
    assert metrics_address("[::1]:9100") == ("::1", 9100)

"""The explicit-proxy Policy: clients, destinations, ports, credentials."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from tproxy.protocols.policy import (
    Decision,
    Policy,
    PolicyError,
    PortRange,
    load_credentials_file,
    parse_credentials,
    parse_ports,
)


def test_default_allows_everything_without_auth() -> None:
    policy = Policy()
    assert policy.check_client("203.0.113.1")
    assert policy.check_destination("example.com", 443) == Decision(True, "allowed")
    assert policy.check_destination("10.0.0.1", 1)
    assert not policy.requires_auth and not policy.restricts_clients
    assert policy.check_credentials("any", "thing") is False


def test_client_allow_list() -> None:
    policy = Policy.from_options(clients=["127.0.0.0/8,::1", "192.0.2.0/24"])
    assert policy.restricts_clients
    assert policy.check_client("127.0.0.1")
    assert policy.check_client("::1")
    assert policy.check_client("::ffff:192.0.2.7")
    assert policy.check_client(ipaddress.ip_address("192.0.2.200"))
    assert not policy.check_client("198.51.100.1")
    assert not policy.check_client("2001:db8::1")
    assert not policy.check_client("not an ip")


def test_host_patterns_are_full_case_insensitive_matches() -> None:
    policy = Policy.from_options(allow_hosts=[r"(.*\.)?example\.com"])
    assert policy.check_destination("example.com", 443)
    assert policy.check_destination("WWW.Example.COM.", 443)
    assert not policy.check_destination("example.com.evil.net", 443)
    assert not policy.check_destination("notexample.com", 443)
    decision = policy.check_destination("93.184.216.34", 443)
    assert not decision and "not in the allowed" in decision.reason


def test_deny_patterns_win() -> None:
    policy = Policy.from_options(allow_hosts=[r".*\.test"], deny_hosts=[r"admin\..*"])
    assert policy.check_destination("www.test", 80)
    decision = policy.check_destination("admin.test", 80)
    assert not decision and "admin" in decision.reason


def test_networks_apply_to_ip_literals_only() -> None:
    policy = Policy.from_options(allow_networks=["192.0.2.0/24"], deny_networks=["192.0.2.128/25"])
    assert policy.check_destination("192.0.2.1", 80)
    assert policy.check_destination("[::ffff:192.0.2.2]", 80)
    assert not policy.check_destination("192.0.2.200", 80)
    assert not policy.check_destination("198.51.100.1", 80)
    # A name is not resolved: with only network allow lists no name is allowed.
    assert not policy.check_destination("localhost", 80)


def test_deny_networks_only_and_resolved_addresses() -> None:
    policy = Policy.from_options(deny_networks=["10.0.0.0/8", "fd00::/8"])
    assert policy.check_destination("internal.example", 80)  # not resolved here
    assert not policy.check_resolved("10.1.2.3")
    assert not policy.check_resolved("fd00::1")
    assert not policy.check_resolved("::ffff:10.0.0.1")
    assert policy.check_resolved("93.184.216.34")
    assert not policy.check_resolved("not-an-ip")
    assert not policy.check_destination("10.0.0.1", 80)


def test_ip_literal_may_match_a_pattern() -> None:
    policy = Policy.from_options(allow_hosts=[r"127\.0\.0\.1|localhost"])
    assert policy.check_destination("127.0.0.1", 80)
    assert not policy.check_destination("127.0.0.2", 80)


def test_ports() -> None:
    policy = Policy.from_options(allow_ports=["80,443", "8000-8100"], deny_ports=["8080"])
    assert policy.check_destination("h.test", 80)
    assert policy.check_destination("h.test", 8000)
    assert policy.check_destination("h.test", 8100)
    assert not policy.check_destination("h.test", 8080)
    assert not policy.check_destination("h.test", 22)
    assert "port 22" in policy.check_destination("h.test", 22).reason


def test_parse_ports() -> None:
    assert parse_ports("80-81, 22") == (PortRange(22, 22), PortRange(80, 81))
    assert parse_ports([]) == ()
    assert str(PortRange(1, 2)) == "1-2" and str(PortRange(5, 5)) == "5"
    assert 3 not in PortRange(1, 2) and "1" not in PortRange(1, 2)
    for bad in ("x", "10-5", "70000", "1-2-3", "-1", "0", "22,", ""):
        with pytest.raises(PolicyError, match=r"^port: "):
            parse_ports(bad)


def test_bad_options_raise_policy_error() -> None:
    with pytest.raises(PolicyError, match="bad network"):
        Policy.from_options(clients=["10.0.0.0/33"])
    with pytest.raises(PolicyError, match="bad host pattern"):
        Policy.from_options(allow_hosts=["("])


def test_credentials_from_strings_and_file(tmp_path: Path) -> None:
    path = tmp_path / "users"
    path.write_text("# users\n\ncarol:c:o:l\r\ndave: spaced \n", encoding="utf-8")
    policy = Policy.from_options(credentials=["alice:s3cret", "bob:"], credentials_file=path)
    assert policy.requires_auth and policy.restricts_clients
    assert policy.check_credentials("alice", "s3cret")
    assert policy.check_credentials("bob", "")
    assert policy.check_credentials("carol", "c:o:l")
    assert policy.check_credentials("dave", " spaced ")
    assert not policy.check_credentials("alice", "S3cret")
    assert not policy.check_credentials("eve", "s3cret")
    assert not policy.check_credentials("alice", "\udcff")  # surrogate-escaped bytes
    assert "s3cret" not in repr(policy)


def test_credentials_errors(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="user:password"):
        parse_credentials(["nocolon"])
    with pytest.raises(PolicyError, match="user:password"):
        parse_credentials([":pw"])
    with pytest.raises(PolicyError, match="twice"):
        parse_credentials(["a:1", "a:2"])
    path = tmp_path / "users"
    path.write_text("a:1\n")
    with pytest.raises(PolicyError, match="twice"):
        Policy.from_options(credentials=["a:2"], credentials_file=path)
    with pytest.raises(PolicyError, match="cannot read"):
        load_credentials_file(tmp_path / "missing")


def test_policy_is_frozen_and_hashable() -> None:
    policy = Policy.from_options(credentials=["a:1"])
    with pytest.raises(AttributeError):
        policy.clients = ()  # type: ignore[misc]
    hash(policy)

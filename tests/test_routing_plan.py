"""The pure plan: what is installed, in which order, for which options; no I/O."""

from __future__ import annotations

import json

import pytest

from tproxy.routing.plan import (
    Accept,
    Chain,
    IpRule,
    LocalRoute,
    MangleRule,
    PlanError,
    PlanRequest,
    Reject,
    SetMark,
    Tproxy,
    build_request,
    chain_names,
    instance_of_chain,
    item_from_json,
    item_to_json,
    make_plan,
)
from tproxy.routing.ports import PortRange


def plan(*ports: str, **kw: object):  # type: ignore[no-untyped-def]
    return make_plan(build_request("eth0", "eth1", list(ports) or ["80"], **kw))  # type: ignore[arg-type]


def test_defaults() -> None:
    request = build_request("eth0", "eth1", "80")
    assert request.proxy_port == 9091
    assert (request.proxy_v4, request.proxy_v6) == ("127.0.0.1", "::1")
    assert (request.mark, request.mask) == (1, 0xFFFFFFFF)
    assert (request.table, request.priority) == (100, 100)
    assert request.families == (4, 6)
    assert request.instance == "default"


def test_ipv4_plan_items_in_install_order() -> None:
    items = plan("80", ipv4=True).items
    c = "tproxy:default"
    assert items == (
        LocalRoute(4, 100),
        IpRule(4, 1, 0xFFFFFFFF, 100, 100),
        Chain(4, "TPROXY_DIVERT"),
        Chain(4, "TPROXY_PRE"),
        MangleRule(4, "TPROXY_DIVERT", SetMark(1, 0xFFFFFFFF), c),
        MangleRule(4, "TPROXY_DIVERT", Accept(), c),
        MangleRule(
            4,
            "TPROXY_PRE",
            items[6].target,
            c,
            "eth0",
            "tcp",
            dport=PortRange(80, 80),
            not_syn=True,
            socket_transparent=True,
        ),
        MangleRule(
            4,
            "TPROXY_PRE",
            items[6].target,
            c,
            "eth1",
            "tcp",
            sport=PortRange(80, 80),
            socket_transparent=True,
        ),
        MangleRule(
            4,
            "TPROXY_PRE",
            Tproxy("127.0.0.1", 9091, 1, 0xFFFFFFFF),
            c,
            "eth0",
            "tcp",
            dport=PortRange(80, 80),
        ),
        MangleRule(4, "PREROUTING", items[-1].target, c, first=True),
    )
    assert items[6].target.chain == "TPROXY_DIVERT"  # type: ignore[union-attr]
    assert items[-1].target.chain == "TPROXY_PRE"  # type: ignore[union-attr]


def test_ipv6_twin_uses_ipv6_proxy_address() -> None:
    items = plan("80", ipv6=True).items
    assert {i.family for i in items} == {6}
    assert LocalRoute(6, 100).dst == "::/0"
    tproxy = [i for i in items if isinstance(i, MangleRule) and isinstance(i.target, Tproxy)]
    assert [t.target.on_ip for t in tproxy] == ["::1"]  # type: ignore[union-attr]


def test_both_families_ipv4_first_and_every_item_once() -> None:
    both = plan("80,443")
    assert [i.family for i in both.items] == [4] * 13 + [6] * 13
    assert len(set(both.items)) == len(both.items)
    assert both.items[:13] == plan("80,443", ipv4=True).items


def test_several_ports_and_ranges() -> None:
    items = plan("80,443,8000-8100", ipv4=True).items
    rules = [i for i in items if isinstance(i, MangleRule) and i.chain == "TPROXY_PRE"]
    # socket rules (dport from IN, sport from OUT) for every range, then TPROXY rules
    assert [(r.in_interface, r.dport, r.sport, type(r.target).__name__) for r in rules] == [
        ("eth0", PortRange(80, 80), None, "Jump"),
        ("eth1", None, PortRange(80, 80), "Jump"),
        ("eth0", PortRange(443, 443), None, "Jump"),
        ("eth1", None, PortRange(443, 443), "Jump"),
        ("eth0", PortRange(8000, 8100), None, "Jump"),
        ("eth1", None, PortRange(8000, 8100), "Jump"),
        ("eth0", PortRange(80, 80), None, "Tproxy"),
        ("eth0", PortRange(443, 443), None, "Tproxy"),
        ("eth0", PortRange(8000, 8100), None, "Tproxy"),
    ]


def test_custom_mark_table_priority_port_address_instance() -> None:
    p = plan(
        "22",
        mark="0x10/0xf0",
        table="200",
        priority="42",
        proxy_port="8080",
        proxy_addresses=["10.0.0.1", "fd00::1"],
        instance="lab",
    )
    assert IpRule(4, 0x10, 0xF0, 200, 42) in p.items
    assert IpRule(6, 0x10, 0xF0, 200, 42) in p.items
    assert LocalRoute(6, 200) in p.items
    assert Chain(4, "TPROXY_DIVERT_lab") in p.items
    targets = {i.target for i in p.items if isinstance(i, MangleRule)}
    assert Tproxy("10.0.0.1", 8080, 0x10, 0xF0) in targets
    assert Tproxy("fd00::1", 8080, 0x10, 0xF0) in targets
    assert SetMark(0x10, 0xF0) in targets
    assert {i.comment for i in p.items if isinstance(i, MangleRule)} == {"tproxy:lab"}


def test_chain_names_and_their_owner() -> None:
    assert chain_names("default") == ("TPROXY_PRE", "TPROXY_DIVERT")
    assert chain_names("lab") == ("TPROXY_PRE_lab", "TPROXY_DIVERT_lab")
    assert instance_of_chain("TPROXY_DIVERT") == "default"
    assert instance_of_chain("TPROXY_PRE_lab") == "lab"
    assert instance_of_chain("DIVERT") is None
    assert instance_of_chain("TPROXY_PREFIX") is None


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"mark": "0"}, "mark"),
        ({"mark": "0x100/0xff"}, "within mask"),
        ({"mark": "one"}, "bad mark"),
        ({"table": "254"}, "reserved"),
        ({"table": "x"}, "route table"),
        ({"priority": "32766"}, "priority"),
        ({"proxy_port": "0"}, "proxy port"),
        ({"proxy_port": "70000"}, "proxy port"),
        ({"proxy_addresses": ["300.1.1.1"]}, "bad proxy address"),
        ({"proxy_addresses": ["1.2.3.4", "5.6.7.8"]}, "two IPv4"),
        ({"instance": "bad name"}, "instance"),
        ({"instance": "x" * 15}, "instance"),
    ],
)
def test_bad_arguments(kw: dict[str, object], message: str) -> None:
    with pytest.raises(PlanError, match=message):
        build_request("eth0", "eth1", "80", **kw)  # type: ignore[arg-type]


def test_bad_ports_and_interfaces() -> None:
    with pytest.raises(PlanError, match="out of range"):
        build_request("eth0", "eth1", "80,70000")
    with pytest.raises(PlanError, match="interface"):
        build_request("eth 0", "eth1", "80")
    with pytest.raises(PlanError, match="interface"):
        build_request("a" * 16, "eth1", "80")


def test_request_and_items_survive_json() -> None:
    request = build_request("eth0", "eth1", "80,1000-2000", mark="3/0xf", ipv6=True)
    again = PlanRequest.from_json(json.loads(json.dumps(request.to_json())))
    assert again == request
    for item in make_plan(request).items:
        assert item_from_json(json.loads(json.dumps(item_to_json(item)))) == item


def test_udp_ports_divert_to_the_same_proxy_port() -> None:
    items = make_plan(
        build_request("eth0", "eth1", "80", udp_ports="53,5000-5100", ipv4=True)
    ).items
    rules = [i for i in items if isinstance(i, MangleRule) and i.chain == "TPROXY_PRE"]
    assert [
        (
            r.protocol,
            r.in_interface,
            r.dport,
            r.sport,
            type(r.target).__name__,
            r.socket_transparent,
            r.not_syn,
        )
        for r in rules
    ] == [
        ("tcp", "eth0", PortRange(80, 80), None, "Jump", True, True),
        ("tcp", "eth1", None, PortRange(80, 80), "Jump", True, False),
        # UDP: only servers' replies take the socket shortcut; clients' datagrams meet TPROXY
        ("udp", "eth1", None, PortRange(53, 53), "Jump", True, False),
        ("udp", "eth1", None, PortRange(5000, 5100), "Jump", True, False),
        ("tcp", "eth0", PortRange(80, 80), None, "Tproxy", False, False),
        ("udp", "eth0", PortRange(53, 53), None, "Tproxy", False, False),
        ("udp", "eth0", PortRange(5000, 5100), None, "Tproxy", False, False),
    ]
    tproxies = {r.target for r in rules if isinstance(r.target, Tproxy)}
    assert tproxies == {Tproxy("127.0.0.1", 9091, 1, 0xFFFFFFFF)}


def test_udp_only_plan_both_families() -> None:
    items = make_plan(build_request("eth0", "eth1", None, udp_ports="53")).items
    assert {i.protocol for i in items if isinstance(i, MangleRule) and i.protocol} == {"udp"}
    tproxies = [i for i in items if isinstance(i, MangleRule) and isinstance(i.target, Tproxy)]
    assert [(t.family, t.target.on_ip) for t in tproxies] == [  # type: ignore[union-attr]
        (4, "127.0.0.1"),
        (6, "::1"),
    ]
    with pytest.raises(PlanError, match="no ports"):
        build_request("eth0", "eth1", None)
    with pytest.raises(PlanError, match="no ports"):
        build_request("eth0", "eth1", [], udp_ports=[])
    with pytest.raises(PlanError, match="out of range"):
        build_request("eth0", "eth1", None, udp_ports="65536")


def test_block_quic_rejects_udp_443_in_filter_forward() -> None:
    items = make_plan(build_request("eth0", "eth1", "80,443", block_quic=True)).items
    rejects = [i for i in items if isinstance(i, MangleRule) and isinstance(i.target, Reject)]
    assert rejects == [
        MangleRule(
            f,
            "FORWARD",
            Reject(),
            "tproxy:default",
            "eth0",
            "udp",
            dport=PortRange(443, 443),
            first=True,
            table="filter",
        )
        for f in (4, 6)
    ]
    assert all(
        i.table == "mangle"
        for i in items
        if isinstance(i, MangleRule) and not isinstance(i.target, Reject)
    )
    with pytest.raises(PlanError, match="block-quic"):
        build_request("eth0", "eth1", "80", udp_ports="400-500", block_quic=True)


def test_records_without_udp_fields_still_load() -> None:
    request = build_request("eth0", "eth1", "80", udp_ports="53", block_quic=True)
    data = json.loads(json.dumps(request.to_json()))
    assert data["udp_ports"] == [[53, 53]] and data["block_quic"] is True
    assert PlanRequest.from_json(data) == request
    for key in ("udp_ports", "block_quic"):
        del data[key]
    old = PlanRequest.from_json(data)
    assert old.udp_ports == () and old.block_quic is False
    for item in make_plan(request).items:
        assert item_from_json(json.loads(json.dumps(item_to_json(item)))) == item

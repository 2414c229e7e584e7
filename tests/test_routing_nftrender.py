"""The nftables rendering (pure), reading a table back, and how ``auto`` picks a backend."""

from __future__ import annotations

import json

import pytest

from tproxy.cli import main
from tproxy.routing import installer, nft, nftrules
from tproxy.routing.plan import (
    IpRule,
    LocalRoute,
    MangleRule,
    NftTable,
    PlanError,
    Return,
    SetMark,
    Tproxy,
    build_request,
    cgroup2_root,
    make_plan,
)
from tproxy.routing.ports import PortRange


def nft_plan(ports: str = "80", **kw: object):  # type: ignore[no-untyped-def]
    return make_plan(build_request("in0", "out0", ports, backend="nft", **kw))  # type: ignore[arg-type]


def batch(table: NftTable) -> list[dict]:
    return json.loads(table.script)["nftables"]


def test_nft_plan_is_routes_rules_then_one_table() -> None:
    items = nft_plan().items
    assert [type(i).__name__ for i in items] == [
        "LocalRoute",
        "IpRule",
        "LocalRoute",
        "IpRule",
        "NftTable",
    ]
    assert items[:2] == (LocalRoute(4, 100), IpRule(4, 1, 0xFFFFFFFF, 100, 100))
    table = items[-1]
    assert isinstance(table, NftTable)
    assert (table.name, table.instance, table.mark, table.route_table) == (
        "tproxy_default",
        "default",
        1,
        100,
    )


def test_batch_replaces_the_table_atomically_and_is_deterministic() -> None:
    table = nft_plan("80,443", udp_ports="53").items[-1]
    commands = batch(table)
    name = {"family": "inet", "name": "tproxy_default"}
    assert commands[:3] == [
        {"add": {"table": name}},
        {"delete": {"table": name}},
        {"add": {"table": name}},
    ]
    assert table == nft_plan("443,80", udp_ports="53").items[-1]  # same ports, same digest
    assert table != nft_plan("80", udp_ports="53").items[-1]
    rules = [c["add"]["rule"] for c in commands if "rule" in c.get("add", {})]
    assert table.rules == len(rules)
    assert rules[0]["comment"] == (
        f"tproxy:default d={table.digest} n={len(rules)} m=0x1/0xffffffff t=100"
    )
    assert all(r["comment"].startswith("tproxy:default") for r in rules)
    bases = {
        c["add"]["chain"]["name"]: c["add"]["chain"]
        for c in commands
        if "chain" in c.get("add", {}) and "hook" in c["add"]["chain"]
    }
    assert {k: (v["type"], v["hook"], v["prio"]) for k, v in bases.items()} == {
        "prerouting": ("filter", "prerouting", -150)
    }


def test_rule_rendering() -> None:
    tproxy = MangleRule(
        6,
        "TPROXY_PRE",
        Tproxy("::1", 9091, 0x10, 0xF0),
        "tproxy:x",
        "in0",
        "udp",
        dport=PortRange(5000, 5100),
    )
    assert nftrules.rule_exprs(tproxy) == [
        {"match": {"op": "==", "left": {"meta": {"key": "nfproto"}}, "right": "ipv6"}},
        {"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": "in0"}},
        {"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": "udp"}},
        {
            "match": {
                "op": "==",
                "left": {"payload": {"protocol": "udp", "field": "dport"}},
                "right": {"range": [5000, 5100]},
            }
        },
        {"tproxy": {"family": "ip6", "addr": "::1", "port": 9091}},
        {
            "mangle": {
                "key": {"meta": {"key": "mark"}},
                "value": {"|": [{"&": [{"meta": {"key": "mark"}}, 0xFFFFFF0F]}, 0x10]},
            }
        },
        {"accept": None},
    ]
    skip = MangleRule(4, "TPROXY_OUT", Return(), "tproxy:x", match_mark=0x7470)
    assert nftrules.rule_exprs(skip) == [
        {"match": {"op": "==", "left": {"meta": {"key": "mark"}}, "right": 0x7470}},
        {"return": None},
    ]
    uid = MangleRule(4, "TPROXY_OUT", Return(), "tproxy:x", uid_owner=0)
    assert nftrules.rule_exprs(uid)[0]["match"]["left"] == {"meta": {"key": "skuid"}}


def test_local_plan_items_for_both_backends() -> None:
    request = build_request(
        "in0",
        "out0",
        "80",
        udp_ports="53",
        local=True,
        ipv4=True,
        exclude_uids=["1000"],
        exclude_cgroups=[cgroup2_root() + "/a/b/", "c"],
    )
    assert request.exclude_cgroups == ("a/b", "c")
    items = make_plan(request).items
    out = [i for i in items if isinstance(i, MangleRule) and i.chain == "TPROXY_OUT"]
    assert [
        (i.dst, i.match_mark, i.uid_owner, i.cgroup, type(i.target).__name__, i.protocol)
        for i in out
    ] == [
        ("127.0.0.0/8", None, None, None, "Return", None),
        (None, 0x7470, None, None, "Return", None),
        (None, None, 1000, None, "Return", None),
        (None, None, None, "a/b", "Return", None),
        (None, None, None, "c", "Return", None),
        (None, None, None, None, "SetMark", "tcp"),
        (None, None, None, None, "SetMark", "udp"),
    ]
    assert out[-1].target == SetMark(1, 0xFFFFFFFF)
    lo = [i for i in items if isinstance(i, MangleRule) and i.in_interface == "lo"]
    assert [(i.protocol, i.match_mark, type(i.target).__name__) for i in lo] == [
        ("tcp", 1, "Tproxy"),
        ("udp", 1, "Tproxy"),
    ]
    jumps = [i for i in items if isinstance(i, MangleRule) and i.chain == "OUTPUT"]
    assert len(jumps) == 1 and jumps[0].first
    table = make_plan(
        build_request("in0", "out0", "80", local=True, backend="nft", ipv4=True)
    ).items[-1]
    assert {
        c["add"]["chain"]["name"]: c["add"]["chain"].get("type")
        for c in batch(table)
        if "chain" in c.get("add", {})
    } == {
        "prerouting": "filter",
        "output": "route",
        "tproxy_divert4": None,
        "tproxy_pre4": None,
        "tproxy_out4": None,
    }


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"exclude_uids": ["0"]}, "need --local"),
        ({"local": True, "proxy_mark": "1"}, "would be routed as diverted"),
        ({"local": True, "exclude_uids": ["no-such-user-xyz"]}, "no such user"),
        ({"backend": "pf"}, "bad backend"),
        ({"backend": "nft", "local": True, "exclude_cgroups": ["a"]}, "needs --backend iptables"),
    ],
)
def test_bad_local_and_backend_arguments(kw: dict, message: str) -> None:
    with pytest.raises(PlanError, match=message):
        build_request("in0", "out0", "80", **kw)


def test_read_table_back() -> None:
    table = nft_plan().items[-1]
    rules = [{"rule": c["add"]["rule"]} for c in batch(table) if "rule" in c.get("add", {})]
    assert nftrules.read_table(rules, "tproxy_default") == table
    assert nftrules.read_table(rules[1:], "tproxy_default") != table  # a rule gone: not equal
    foreign = [{"rule": {"comment": "someone else"}}]
    assert nftrules.read_table(foreign, "tproxy_default") is None


def test_auto_keeps_iptables_where_legacy_works(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(installer, "legacy_problem", lambda: None)
    assert installer.choose_backend("auto")[0] == "iptables"
    monkeypatch.setattr(installer, "legacy_problem", lambda: "no legacy x_tables")
    monkeypatch.setattr(nft, "available", lambda: None)
    chosen, why = installer.choose_backend("auto")
    assert chosen == "nft" and "no legacy x_tables" in why
    monkeypatch.setattr(nft, "available", lambda: "no libnftables")
    with pytest.raises(installer.InputError, match="no routing backend"):
        installer.choose_backend("auto")
    assert installer.choose_backend("nft")[0] == "nft"


def test_nft_dry_run_is_a_pasteable_heredoc(capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(["setup", "eth0", "eth1", "-p", "80", "--backend", "nft", "--ipv4", "--dry-run"]) == 0
    )
    lines = capsys.readouterr().out.splitlines()
    assert lines[:3] == [
        "ip -4 route add local 0.0.0.0/0 dev lo table 100 proto 116",
        "ip -4 rule add fwmark 0x1/0xffffffff lookup 100 priority 100 protocol 116",
        "nft -j -f - <<'EOF'",
    ]
    assert lines[-1] == "EOF"
    assert json.loads("\n".join(lines[3:-1]))["nftables"][0] == {
        "add": {"table": {"family": "inet", "name": "tproxy_default"}}
    }

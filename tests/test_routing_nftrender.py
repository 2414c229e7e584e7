"""The nftables rendering (pure), reading a table back, and how ``auto`` picks a backend."""

from __future__ import annotations

import pytest

from tproxy.cli import main
from tproxy.routing import installer, nft, nftrules
from tproxy.routing import plan as plan_module
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


def lines(table: NftTable) -> list[str]:
    return table.script.splitlines()


def rule_comments(table: NftTable) -> list[str]:
    return [
        line.split(' comment "')[1][:-1] for line in lines(table) if line.startswith("add rule")
    ]


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


def test_script_creates_or_swaps_the_table_and_is_deterministic() -> None:
    table = nft_plan("80,443", udp_ports="53").items[-1]
    assert isinstance(table, NftTable)
    assert nftrules.batch(table).splitlines()[0] == "create table inet tproxy_default"
    assert nftrules.batch(table, replace=True).splitlines()[:3] == [
        "add table inet tproxy_default",
        "delete table inet tproxy_default",
        "add table inet tproxy_default",
    ]
    assert nftrules.batch(table).endswith(table.script)
    assert table == nft_plan("443,80", udp_ports="53").items[-1]  # same ports, same digest
    assert table != nft_plan("80", udp_ports="53").items[-1]
    comments = rule_comments(table)
    assert table.rules == len(comments)
    assert (
        comments[0] == f"tproxy:default d={table.digest} n={len(comments)} m=0x1/0xffffffff t=100"
    )
    assert all(c.startswith("tproxy:default") for c in comments)
    bases = [line for line in lines(table) if line.startswith("add chain") and "hook" in line]
    assert bases == [
        "add chain inet tproxy_default prerouting "
        "{ type filter hook prerouting priority -150; policy accept; }"
    ]
    # the two TCP ports are one set, shared by every rule and both families
    assert "add element inet tproxy_default ports0 { 80, 443 }" in lines(table)
    assert sum("@ports0" in line for line in lines(table)) == 6
    assert not any("ports1" in line for line in lines(table))  # udp 53 alone: no set


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
    assert nftrules.rule_text(tproxy) == (
        'meta nfproto ipv6 iifname "in0" meta l4proto udp udp dport 5000-5100 '
        "tproxy ip6 to [::1]:9091 meta mark set meta mark & 0xffffff0f | 0x10 accept"
    )
    assert nftrules.rule_text(tproxy, "@ports1").count("udp dport @ports1 ") == 1
    skip = MangleRule(4, "TPROXY_OUT", Return(), "tproxy:x", match_mark=0x7470)
    assert nftrules.rule_text(skip) == "meta mark 0x7470 return"
    masked = MangleRule(4, "TPROXY_PRE", Return(), "x", match_mark=0x10, match_mask=0xF0)
    assert nftrules.rule_text(masked) == "meta mark & 0xf0 == 0x10 return"
    uid = MangleRule(4, "TPROXY_OUT", Return(), "tproxy:x", uid_owner=0)
    assert nftrules.rule_text(uid) == "meta skuid 0 return"
    # a cgroup: its depth in the v2 hierarchy, its path as nft finds it under /sys/fs/cgroup
    cgroup = MangleRule(4, "TPROXY_OUT", Return(), "tproxy:x", cgroup="a/b")
    assert nftrules.rule_text(cgroup, cgroup_dir="unified") == (
        'socket cgroupv2 level 2 "unified/a/b" return'
    )
    assert nftrules.rule_text(cgroup) == 'socket cgroupv2 level 2 "a/b" return'


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
    assert [line.split()[4:7] for line in lines(table) if line.startswith("add chain")] == [
        ["prerouting", "{", "type"],
        ["output", "{", "type"],
        ["tproxy_divert4"],
        ["tproxy_pre4"],
        ["tproxy_out4"],
    ]
    assert "{ type route hook output priority -150; policy accept; }" in table.script


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"exclude_uids": ["0"]}, "need --local"),
        ({"local": True, "proxy_mark": "1"}, "would be routed as diverted"),
        ({"local": True, "exclude_uids": ["no-such-user-xyz"]}, "no such user"),
        ({"backend": "pf"}, "bad backend"),
        ({"local": True, "exclude_cgroups": ["a/../b"]}, "bad cgroup path"),
        ({"local": True, "exclude_cgroups": ['a"b']}, "bad cgroup path"),
    ],
)
def test_bad_local_and_backend_arguments(kw: dict, message: str) -> None:
    with pytest.raises(PlanError, match=message):
        build_request("in0", "out0", "80", **kw)


def test_read_table_back() -> None:
    table = nft_plan().items[-1]
    rules = [{"rule": {"comment": c}} for c in rule_comments(table)]  # as nft -j lists them
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
    argv = ["setup", "eth0", "eth1", "-p", "80", "--backend", "nft", "--ipv4", "--dry-run"]
    assert main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[:4] == [
        "ip -4 route add local 0.0.0.0/0 dev lo table 100 proto 116",
        "ip -4 rule add fwmark 0x1/0xffffffff lookup 100 priority 100 protocol 116",
        "nft -f - <<'EOF'",
        "create table inet tproxy_default",
    ]
    assert out[-1] == "EOF"
    table = make_plan(build_request("eth0", "eth1", "80", backend="nft", ipv4=True)).items[-1]
    assert "\n".join(out[4:-1]) + "\n" == table.script  # exactly what the backend applies
    assert main([*argv, "--replace"]) == 0
    assert capsys.readouterr().out.splitlines()[3:6] == [
        "add table inet tproxy_default",
        "delete table inet tproxy_default",
        "add table inet tproxy_default",
    ]


def test_nft_cgroup_dir_is_where_nft_finds_cgroup2(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(plan_module, "cgroup2_mount", lambda: "/sys/fs/cgroup/unified")
    request = build_request("in0", "out0", "80", local=True, backend="nft", exclude_cgroups=["a"])
    assert request.nft_cgroup_dir == "unified"
    assert 'socket cgroupv2 level 1 "unified/a" return' in make_plan(request).items[-1].script
    assert (
        build_request("in0", "out0", "80", local=True, exclude_cgroups=["a"]).nft_cgroup_dir == ""
    )
    monkeypatch.setattr(plan_module, "cgroup2_mount", lambda: "/sys/fs/cgroup")
    assert plan_module.nft_cgroup_dir() == ""
    monkeypatch.setattr(plan_module, "cgroup2_mount", lambda: "/mnt/cg2")
    with pytest.raises(PlanError, match="nft finds cgroups only under /sys/fs/cgroup"):
        build_request("in0", "out0", "80", local=True, backend="nft", exclude_cgroups=["a"])
    monkeypatch.setattr(plan_module, "cgroup2_mount", lambda: None)
    with pytest.raises(PlanError, match="no cgroup2 file system is mounted here"):
        build_request("in0", "out0", "80", local=True, backend="nft", exclude_cgroups=["a"])
    assert plan_module.cgroup_problem("a", "iptables") is None  # the kernel checks it
    assert "no cgroup2" in str(plan_module.cgroup_problem("a", "nft"))


def test_a_missing_cgroup_is_bad_input(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "there").mkdir()
    monkeypatch.setattr(plan_module, "cgroup2_mount", lambda: str(tmp_path))
    assert plan_module.cgroup_problem("there", "iptables") is None
    problem = plan_module.cgroup_problem("gone/x", "nft")
    assert problem == f"--exclude-cgroup gone/x: no such cgroup (no directory {tmp_path}/gone/x)"

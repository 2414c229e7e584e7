"""``--dry-run`` text, compared with the exact expected commands, and CLI input errors."""

from __future__ import annotations

import pytest

from tproxy.cli import main
from tproxy.routing import installer
from tproxy.routing.commands import setup_commands, teardown_commands
from tproxy.routing.plan import build_request, make_plan

EXPECTED_V4 = """\
ip -4 route add local 0.0.0.0/0 dev lo table 100 proto 116
ip -4 rule add fwmark 0x1/0xffffffff lookup 100 priority 100 protocol 116
iptables-legacy -t mangle -N TPROXY_DIVERT
iptables-legacy -t mangle -N TPROXY_PRE
iptables-legacy -t mangle -A TPROXY_DIVERT -m comment --comment tproxy:default -j MARK --set-xmark 0x1/0xffffffff
iptables-legacy -t mangle -A TPROXY_DIVERT -m comment --comment tproxy:default -j ACCEPT
iptables-legacy -t mangle -A TPROXY_PRE -i eth0 -p tcp -m tcp --dport 80 '!' --syn -m socket --transparent -m comment --comment tproxy:default -j TPROXY_DIVERT
iptables-legacy -t mangle -A TPROXY_PRE -i eth1 -p tcp -m tcp --sport 80 -m socket --transparent -m comment --comment tproxy:default -j TPROXY_DIVERT
iptables-legacy -t mangle -A TPROXY_PRE -i eth0 -p tcp -m tcp --dport 8000:8100 '!' --syn -m socket --transparent -m comment --comment tproxy:default -j TPROXY_DIVERT
iptables-legacy -t mangle -A TPROXY_PRE -i eth1 -p tcp -m tcp --sport 8000:8100 -m socket --transparent -m comment --comment tproxy:default -j TPROXY_DIVERT
iptables-legacy -t mangle -A TPROXY_PRE -i eth0 -p tcp -m tcp --dport 80 -m comment --comment tproxy:default -j TPROXY --on-port 9091 --on-ip 127.0.0.1 --tproxy-mark 0x1/0xffffffff
iptables-legacy -t mangle -A TPROXY_PRE -i eth0 -p tcp -m tcp --dport 8000:8100 -m comment --comment tproxy:default -j TPROXY --on-port 9091 --on-ip 127.0.0.1 --tproxy-mark 0x1/0xffffffff
iptables-legacy -t mangle -I PREROUTING 1 -m comment --comment tproxy:default -j TPROXY_PRE
"""  # noqa: E501

EXPECTED_V6_CUSTOM = """\
ip -6 route add local ::/0 dev lo table 200 proto 116
ip -6 rule add fwmark 0x10/0xf0 lookup 200 priority 50 protocol 116
ip6tables-legacy -t mangle -N TPROXY_DIVERT_lab
ip6tables-legacy -t mangle -N TPROXY_PRE_lab
ip6tables-legacy -t mangle -A TPROXY_DIVERT_lab -m comment --comment tproxy:lab -j MARK --set-xmark 0x10/0xf0
ip6tables-legacy -t mangle -A TPROXY_DIVERT_lab -m comment --comment tproxy:lab -j ACCEPT
ip6tables-legacy -t mangle -A TPROXY_PRE_lab -i in0 -p tcp -m tcp --dport 443 '!' --syn -m socket --transparent -m comment --comment tproxy:lab -j TPROXY_DIVERT_lab
ip6tables-legacy -t mangle -A TPROXY_PRE_lab -i out0 -p tcp -m tcp --sport 443 -m socket --transparent -m comment --comment tproxy:lab -j TPROXY_DIVERT_lab
ip6tables-legacy -t mangle -A TPROXY_PRE_lab -i in0 -p tcp -m tcp --dport 443 -m comment --comment tproxy:lab -j TPROXY --on-port 8443 --on-ip 2001:db8::5 --tproxy-mark 0x10/0xf0
ip6tables-legacy -t mangle -I PREROUTING 1 -m comment --comment tproxy:lab -j TPROXY_PRE_lab
"""  # noqa: E501

EXPECTED_V6_TEARDOWN = """\
ip6tables-legacy -t mangle -D PREROUTING -m comment --comment tproxy:lab -j TPROXY_PRE_lab
ip6tables-legacy -t mangle -D TPROXY_PRE_lab -i in0 -p tcp -m tcp --dport 443 -m comment --comment tproxy:lab -j TPROXY --on-port 8443 --on-ip 2001:db8::5 --tproxy-mark 0x10/0xf0
ip6tables-legacy -t mangle -D TPROXY_PRE_lab -i out0 -p tcp -m tcp --sport 443 -m socket --transparent -m comment --comment tproxy:lab -j TPROXY_DIVERT_lab
ip6tables-legacy -t mangle -D TPROXY_PRE_lab -i in0 -p tcp -m tcp --dport 443 '!' --syn -m socket --transparent -m comment --comment tproxy:lab -j TPROXY_DIVERT_lab
ip6tables-legacy -t mangle -D TPROXY_DIVERT_lab -m comment --comment tproxy:lab -j ACCEPT
ip6tables-legacy -t mangle -D TPROXY_DIVERT_lab -m comment --comment tproxy:lab -j MARK --set-xmark 0x10/0xf0
ip6tables-legacy -t mangle -F TPROXY_PRE_lab
ip6tables-legacy -t mangle -X TPROXY_PRE_lab
ip6tables-legacy -t mangle -F TPROXY_DIVERT_lab
ip6tables-legacy -t mangle -X TPROXY_DIVERT_lab
ip -6 rule del fwmark 0x10/0xf0 lookup 200 priority 50 protocol 116
ip -6 route del local ::/0 dev lo table 200 proto 116
"""  # noqa: E501

CUSTOM = [
    "in0",
    "out0",
    "--port",
    "443",
    "--ipv6",
    "--mark",
    "0x10/0xf0",
    "--table",
    "200",
    "--priority",
    "50",
    "--proxy-port",
    "8443",
    "--proxy-address",
    "2001:db8::5",
    "--instance",
    "lab",
]


def test_setup_dry_run_ipv4(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["setup", "eth0", "eth1", "--port", "8000-8100,80", "--ipv4", "--dry-run"]) == 0
    assert capsys.readouterr().out == EXPECTED_V4


def test_setup_dry_run_ipv6_custom(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["setup", *CUSTOM, "--dry-run"]) == 0
    assert capsys.readouterr().out == EXPECTED_V6_CUSTOM


def test_dry_run_needs_neither_root_nor_interfaces(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(installer, "has_net_admin", lambda: False)
    assert main(["setup", "nosuch0", "nosuch1", "-p", "80", "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 20 and lines[10].startswith("ip -6 route add local ::/0")


def test_teardown_text_is_the_reverse() -> None:
    request = build_request(
        "in0",
        "out0",
        "443",
        mark="0x10/0xf0",
        table=200,
        priority=50,
        proxy_port=8443,
        proxy_addresses=["2001:db8::5"],
        ipv6=True,
        instance="lab",
    )
    plan = make_plan(request)
    assert "\n".join(setup_commands(plan)) + "\n" == EXPECTED_V6_CUSTOM
    assert "\n".join(teardown_commands(plan)) + "\n" == EXPECTED_V6_TEARDOWN


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["setup", "eth0", "eth1", "--port", "70000"], "out of range"),
        (["setup", "eth0", "eth1"], "no ports"),
        (["setup", "eth0", "eth1", "-p", "80", "--proxy-address", "1.2.3"], "bad proxy address"),
        (["setup", "eth0", "eth1", "-p", "80", "--mark", "0"], "mark"),
        (["setup", "eth0", "eth1", "-p", "80", "--proxy-port", "http"], "proxy port"),
        (["teardown", "--instance", "no/slash"], "instance"),
    ],
)
def test_bad_input_is_one_line_exit_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([*argv, "--dry-run"] if argv[0] == "setup" else argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_missing_interface_and_not_root_are_exit_2(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args: object, **kw: object) -> str:
        raise AssertionError("nothing may be installed")

    monkeypatch.setattr(installer, "install", refuse)
    monkeypatch.setattr(installer, "has_net_admin", lambda: True)
    assert main(["setup", "nosuch-if0", "lo", "-p", "80"]) == 2
    err = capsys.readouterr().err
    assert err == "tproxy setup: error: no such interface 'nosuch-if0'\n"
    monkeypatch.setattr(installer, "has_net_admin", lambda: False)
    assert main(["setup", "lo", "lo", "-p", "80"]) == 2
    assert "must be root" in capsys.readouterr().err
    for command in (["teardown"], ["status"]):
        assert main(command) == 2
        assert "must be root" in capsys.readouterr().err


EXPECTED_UDP_V6 = """\
ip -6 route add local ::/0 dev lo table 100 proto 116
ip -6 rule add fwmark 0x1/0xffffffff lookup 100 priority 100 protocol 116
ip6tables-legacy -t mangle -N TPROXY_DIVERT
ip6tables-legacy -t mangle -N TPROXY_PRE
ip6tables-legacy -t mangle -A TPROXY_DIVERT -m comment --comment tproxy:default -j MARK --set-xmark 0x1/0xffffffff
ip6tables-legacy -t mangle -A TPROXY_DIVERT -m comment --comment tproxy:default -j ACCEPT
ip6tables-legacy -t mangle -A TPROXY_PRE -i eth1 -p udp -m udp --sport 53 -m socket --transparent -m comment --comment tproxy:default -j TPROXY_DIVERT
ip6tables-legacy -t mangle -A TPROXY_PRE -i eth0 -p udp -m udp --dport 53 -m comment --comment tproxy:default -j TPROXY --on-port 9091 --on-ip ::1 --tproxy-mark 0x1/0xffffffff
ip6tables-legacy -t mangle -I PREROUTING 1 -m comment --comment tproxy:default -j TPROXY_PRE
ip6tables-legacy -t filter -I FORWARD 1 -i eth0 -p udp -m udp --dport 443 -m comment --comment tproxy:default -j REJECT --reject-with icmp6-port-unreachable
"""  # noqa: E501


def test_setup_dry_run_udp_and_block_quic(capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(["setup", "eth0", "eth1", "--udp-port", "53", "--block-quic", "--ipv6", "--dry-run"])
        == 0
    )
    assert capsys.readouterr().out == EXPECTED_UDP_V6
    plan = make_plan(
        build_request("eth0", "eth1", None, udp_ports="53", block_quic=True, ipv6=True)
    )
    undo = teardown_commands(plan)
    assert undo[0] == (
        "ip6tables-legacy -t filter -D FORWARD -i eth0 -p udp -m udp --dport 443"
        " -m comment --comment tproxy:default -j REJECT --reject-with "
        "icmp6-port-unreachable"
    )  # the switches first


def test_tcp_and_udp_ports_together(capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(
            [
                "setup",
                "eth0",
                "eth1",
                "-p",
                "80",
                "--udp-port",
                "53",
                "--udp-port",
                "123",
                "--ipv4",
                "--dry-run",
            ]
        )
        == 0
    )
    lines = capsys.readouterr().out.splitlines()
    tproxy = [
        line.split(" -m comment")[0].split("TPROXY_PRE ")[1]
        for line in lines
        if "-j TPROXY --on-port" in line
    ]
    assert tproxy == [
        "-i eth0 -p tcp -m tcp --dport 80",
        "-i eth0 -p udp -m udp --dport 53",
        "-i eth0 -p udp -m udp --dport 123",
    ]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--udp-port", "65536"], "out of range"),
        (["--udp-port", "53,abc"], "not a number"),
        (["--udp-port", "443", "--block-quic"], "block-quic"),
        (["--block-quic"], "no ports"),
    ],
)
def test_bad_udp_input_is_one_line_exit_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["setup", "eth0", "eth1", *argv, "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err

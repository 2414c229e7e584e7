"""``tproxy setup/teardown/status`` in fresh namespaces, checked with independent tools.

What is installed is read with ``iptables-legacy-save``, ``ip6tables-legacy-save``,
``nft list ruleset``, ``nft -j list ruleset``, ``ip -j rule`` and ``ip -j route
show table all``, never with tproxy's own code. Each test gets a namespace (the
harness's ``netns`` fixture, lo up) with a veth pair ``in0``/``out0`` (left down:
no packets, so counters stay put) and the mangle tables instantiated, as on any
gateway; its ``/run/tproxy`` record directory is removed afterwards even when
the test fails. Tests taking the ``gw`` fixture run once per backend
(``--backend iptables`` and ``--backend nft``): every other ruleset must stay
exactly as it was.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from nsharness import Namespace, Topology, echo_server, parse_peer_line

IN, OUT = "in0", "out0"
HANG = "diverted connections hang: start `tproxy run` or `tproxy teardown`"


def backend_args(ns: Namespace) -> list[str]:
    """``--backend X`` for the backend the namespace's test runs with (none: the default)."""
    backend = getattr(ns, "backend", None)
    return ["--backend", backend] if backend else []


def tproxy(ns: Namespace, *args: str) -> subprocess.CompletedProcess[str]:
    """``python -m tproxy ARGS`` in ``ns``; never raises on a non-zero exit.

    ``setup`` gets the namespace's ``--backend`` (see :func:`backend_args`).
    """
    extra = backend_args(ns) if args and args[0] == "setup" else []
    return ns.run(sys.executable, "-m", "tproxy", *args, *extra, check=False, timeout=120)


def snapshot(ns: Namespace) -> dict[str, str]:
    """The namespace's rulesets and routing, as independent tools print them.

    Only the ``# Generated/Completed on <date>`` lines are dropped from the
    iptables dumps; everything else is compared byte for byte.
    """

    def save(tool: str) -> str:
        out = ns.run(tool).stdout
        return "".join(line for line in out.splitlines(True) if not line.startswith("# "))

    return {
        "iptables": save("iptables-legacy-save"),
        "ip6tables": save("ip6tables-legacy-save"),
        "nft": ns.run("nft", "list", "ruleset").stdout,
        "nftjson": ns.run("nft", "-j", "list", "ruleset").stdout,
        "rule4": ns.run("ip", "-4", "-j", "-d", "rule").stdout,
        "rule6": ns.run("ip", "-6", "-j", "-d", "rule").stdout,
        "route4": ns.run("ip", "-4", "-j", "-d", "route", "show", "table", "all").stdout,
        "route6": ns.run("ip", "-6", "-j", "-d", "route", "show", "table", "all").stdout,
    }


def json_set(text: str) -> set[str]:
    return {json.dumps(entry, sort_keys=True) for entry in json.loads(text)}


def added(before: dict[str, str], after: dict[str, str], key: str) -> list[dict]:
    """Rules or routes present after but not before (for the ``rule*``/``route*`` keys)."""
    return [json.loads(e) for e in sorted(json_set(after[key]) - json_set(before[key]))]


def state_dir_of(ns: Namespace) -> Path:
    code = "from tproxy.routing import state; print(state.state_dir())"
    return Path(ns.python("-c", code).stdout.strip())


def prepare(ns: Namespace) -> None:
    ns.run("ip", "link", "add", IN, "type", "veth", "peer", "name", OUT)
    for tool in ("iptables-legacy", "ip6tables-legacy"):
        ns.run(tool, "-t", "mangle", "-S")  # instantiate mangle, as on any gateway


@contextlib.contextmanager
def routing_namespace(netns: Callable[..., Namespace], backend: str | None) -> Iterator[Namespace]:
    ns = netns("routing")
    ns.backend = backend  # type: ignore[attr-defined]
    prepare(ns)
    records = state_dir_of(ns)
    try:
        yield ns
    finally:
        shutil.rmtree(records, ignore_errors=True)


@pytest.fixture(params=["iptables", "nft"])
def gw(netns: Callable[..., Namespace], request: pytest.FixtureRequest) -> Iterator[Namespace]:
    """A namespace with ``in0``/``out0`` and mangle tables, once per backend; record removed."""
    with routing_namespace(netns, request.param) as ns:
        yield ns


@pytest.fixture
def gw1(netns: Callable[..., Namespace]) -> Iterator[Namespace]:
    """Like ``gw``, for tests that do not depend on the backend (the default, auto)."""
    with routing_namespace(netns, None) as ns:
        yield ns


def nft_table(ns: Namespace, instance: str = "default") -> str:
    """Our table as ``nft list table`` prints it ("" if it is not there)."""
    out = ns.run("nft", "list", "table", "inet", f"tproxy_{instance}", check=False)
    return out.stdout if out.returncode == 0 else ""


def assert_only_backend_changed(
    ns: Namespace, before: dict[str, str], after: dict[str, str]
) -> None:
    """The other backend's rulesets are exactly as they were."""
    if ns.backend == "nft":  # type: ignore[attr-defined]
        assert (after["iptables"], after["ip6tables"]) == (before["iptables"], before["ip6tables"])
    else:
        assert after["nftjson"] == before["nftjson"]


EXPECTED_MANGLE_V4 = """\
*mangle
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:TPROXY_DIVERT - [0:0]
:TPROXY_PRE - [0:0]
-A PREROUTING -m comment --comment "tproxy:default" -j TPROXY_PRE
-A TPROXY_DIVERT -m comment --comment "tproxy:default" -j MARK --set-xmark 0x1/0xffffffff
-A TPROXY_DIVERT -m comment --comment "tproxy:default" -j ACCEPT
-A TPROXY_PRE -i in0 -p tcp -m tcp --dport 80 ! --tcp-flags FIN,SYN,RST,ACK SYN -m socket --transparent -m comment --comment "tproxy:default" -j TPROXY_DIVERT
-A TPROXY_PRE -i out0 -p tcp -m tcp --sport 80 -m socket --transparent -m comment --comment "tproxy:default" -j TPROXY_DIVERT
-A TPROXY_PRE -i in0 -p tcp -m tcp --dport 8000:8100 ! --tcp-flags FIN,SYN,RST,ACK SYN -m socket --transparent -m comment --comment "tproxy:default" -j TPROXY_DIVERT
-A TPROXY_PRE -i out0 -p tcp -m tcp --sport 8000:8100 -m socket --transparent -m comment --comment "tproxy:default" -j TPROXY_DIVERT
-A TPROXY_PRE -i in0 -p tcp -m tcp --dport 80 -m comment --comment "tproxy:default" -j TPROXY --on-port 9091 --on-ip 127.0.0.1 --tproxy-mark 0x1/0xffffffff
-A TPROXY_PRE -i in0 -p tcp -m tcp --dport 8000:8100 -m comment --comment "tproxy:default" -j TPROXY --on-port 9091 --on-ip 127.0.0.1 --tproxy-mark 0x1/0xffffffff
COMMIT
"""  # noqa: E501


EXPECTED_NFT_LINES = [
    "type filter hook prerouting priority mangle; policy accept;",
    'meta nfproto ipv4 jump tproxy_pre4 comment "tproxy:default"',
    'meta nfproto ipv6 jump tproxy_pre6 comment "tproxy:default"',
    # one rule per kind, the port ranges in one set shared by both families
    "elements = { 80, 8000-8100 }",
    'iifname "in0" tcp dport @ports0 tcp flags != syn / fin,syn,rst,ack '
    'socket transparent 1 jump tproxy_divert4 comment "tproxy:default"',
    'iifname "out0" tcp sport @ports0 socket transparent 1 jump tproxy_divert6 '
    'comment "tproxy:default"',
    'meta nfproto ipv4 iifname "in0" tcp dport @ports0 tproxy ip to 127.0.0.1:9091 '
    'meta mark set 0x00000001 accept comment "tproxy:default"',
    'meta nfproto ipv6 iifname "in0" tcp dport @ports0 tproxy ip6 to [::1]:9091 '
    'meta mark set 0x00000001 accept comment "tproxy:default"',
]


def test_setup_installs_exactly_the_plan(gw: Namespace) -> None:
    before = snapshot(gw)
    result = tproxy(gw, "setup", IN, OUT, "--port", "80,8000-8100")
    assert result.returncode == 0, result.stderr
    after = snapshot(gw)
    assert_only_backend_changed(gw, before, after)
    if gw.backend == "iptables":  # type: ignore[attr-defined]
        assert after["iptables"] == EXPECTED_MANGLE_V4
        assert after["ip6tables"] == EXPECTED_MANGLE_V4.replace("127.0.0.1", "::1")
    else:
        table = nft_table(gw)
        assert after["nft"] == table  # our table is the whole ruleset
        for line in EXPECTED_NFT_LINES:
            assert line in table, (line, table)
    for family in ("4", "6"):
        rules = added(before, after, "rule" + family)
        assert len(rules) == 1, rules
        assert {k: rules[0][k] for k in ("priority", "fwmark", "table", "protocol")} == {
            "priority": 100,
            "fwmark": "0x1",
            "table": "100",
            "protocol": "116",
        }
        routes = added(before, after, "route" + family)
        assert len(routes) == 1, routes
        route = routes[0]
        assert (route["type"], route["dst"], route["dev"], route["table"], route["protocol"]) == (
            "local",
            "default",
            "lo",
            "100",
            "116",
        )
    assert json.loads(after["route4"]) and added(before, after, "route4")[0]["scope"] == "host"
    status = tproxy(gw, "status")  # complete, but nobody listens: diverted connections hang
    assert status.returncode == 1 and "complete" in status.stdout, status.stdout
    assert HANG in status.stdout and "owner: tproxy setup" in status.stdout


def plant_foreign(ns: Namespace) -> None:
    """Someone's own DIVERT recipe, a mangle rule, a fwmark rule and table-100 routes."""
    script = """
set -e
for t in iptables-legacy ip6tables-legacy; do
  $t -t mangle -N DIVERT
  $t -t mangle -A DIVERT -j MARK --set-mark 1
  $t -t mangle -A DIVERT -j ACCEPT
  $t -t mangle -A PREROUTING -p tcp -m socket -j DIVERT
  $t -t mangle -A PREROUTING -i in0 -p udp --dport 53 -j MARK --set-mark 7
done
ip -4 rule add fwmark 1 lookup 100 priority 100
ip -6 rule add fwmark 1 lookup 100 priority 100
ip -4 rule add fwmark 7 lookup 107
ip -4 route add 198.51.100.0/24 dev lo table 100
ip -6 route add 2001:db8:5::/64 dev lo table 100
nft -f - <<'EOF'
table inet foreign {
  chain pre {
    type filter hook prerouting priority mangle; policy accept;
    iifname "in0" tcp dport 80 counter meta mark set 0x7
  }
  chain out {
    type route hook output priority mangle; policy accept;
    tcp dport 443 counter
  }
  chain forward_q {
    type filter hook forward priority filter; policy accept;
    udp dport 443 counter
  }
}
table ip tproxy_other {
  chain c {
    counter
  }
}
EOF
"""
    ns.run("sh", "-c", script)


def test_foreign_rules_survive_and_teardown_restores_byte_identical(gw: Namespace) -> None:
    plant_foreign(gw)
    before = snapshot(gw)
    assert tproxy(gw, "setup", IN, OUT, "--port", "80,443").returncode == 0
    during = snapshot(gw)
    assert_only_backend_changed(gw, before, during)
    if gw.backend == "nft":  # type: ignore[attr-defined]
        # the foreign tables (same hooks and priorities as ours) are untouched
        ours = nft_table(gw)
        assert ours and during["nft"].replace(ours, "") == before["nft"]
    for key in ("iptables", "ip6tables") if gw.backend == "iptables" else ():  # type: ignore[attr-defined]
        # the foreign lines are all still there, in their order; ours go on top of PREROUTING
        foreign = [line for line in before[key].splitlines() if line.startswith("-A")]
        ours_first = [line for line in during[key].splitlines() if line.startswith("-A")]
        assert [line for line in ours_first if "tproxy:" not in line] == foreign
        prerouting = [line for line in ours_first if line.startswith("-A PREROUTING")]
        assert prerouting[0].endswith("-j TPROXY_PRE")
    for family in ("4", "6"):
        assert json_set(before["rule" + family]) <= json_set(during["rule" + family])
        assert json_set(before["route" + family]) <= json_set(during["route" + family])
    result = tproxy(gw, "teardown")
    assert result.returncode == 0, result.stderr
    assert snapshot(gw) == before
    again = tproxy(gw, "teardown")
    assert again.returncode == 0 and "nothing installed" in again.stdout
    assert snapshot(gw) == before


@pytest.mark.parametrize("breakage", ["conflicting-ipv6-route", "loopback-down"])
def test_failure_halfway_leaves_nothing(gw: Namespace, breakage: str) -> None:
    # The IPv4 half installs, then the kernel refuses the first IPv6 step.
    if breakage == "conflicting-ipv6-route":
        gw.run("ip", "-6", "route", "add", "local", "::/0", "dev", "lo", "table", "100")
        cause = "File exists"
    else:
        gw.run("ip", "link", "set", "lo", "down")  # IPv6 routes via a down device: ENETDOWN
        cause = "Network is down"
    before = snapshot(gw)
    result = tproxy(gw, "setup", IN, OUT, "--port", "80")
    assert result.returncode == 1
    assert "ip -6 route add local ::/0 dev lo table 100 proto 116" in result.stderr
    steps = 10 if gw.backend == "iptables" else 2  # type: ignore[attr-defined]
    assert cause in result.stderr and f"rolled back {steps} step(s)" in result.stderr, result.stderr
    assert snapshot(gw) == before
    assert tproxy(gw, "status").returncode == 3


def test_double_setup_is_idempotent(gw: Namespace) -> None:
    assert tproxy(gw, "setup", IN, OUT, "-p", "80").returncode == 0
    once = snapshot(gw)
    second = tproxy(gw, "setup", IN, OUT, "-p", "80")
    assert second.returncode == 0 and "unchanged" in second.stdout
    assert snapshot(gw) == once


def test_different_plan_refused_unless_replace(gw: Namespace) -> None:
    before = snapshot(gw)
    assert tproxy(gw, "setup", IN, OUT, "-p", "80").returncode == 0
    installed = snapshot(gw)
    refused = tproxy(gw, "setup", IN, OUT, "-p", "443")
    assert refused.returncode == 1 and "different plan" in refused.stderr
    assert snapshot(gw) == installed
    replaced = tproxy(gw, "setup", IN, OUT, "-p", "443", "--replace")
    assert replaced.returncode == 0, replaced.stderr
    now = snapshot(gw)["iptables" if gw.backend == "iptables" else "nft"]  # type: ignore[attr-defined]
    assert "dport 443" in now and "dport 80 " not in now
    assert tproxy(gw, "teardown").returncode == 0
    assert snapshot(gw) == before


def test_dry_run_pasted_into_sh_gives_the_same_ruleset(
    gw: Namespace, netns: Callable[..., Namespace]
) -> None:
    args = [
        "setup",
        IN,
        OUT,
        "--port",
        "80,443,8000-8100",
        "--mark",
        "0x10/0xf0",
        "--table",
        "200",
        "--priority",
        "300",
        "--proxy-port",
        "8443",
    ]
    dry = tproxy(gw, *args, "--dry-run")
    assert dry.returncode == 0
    pristine = snapshot(gw)
    assert tproxy(gw, *args).returncode == 0
    real = snapshot(gw)

    paste = netns("paste")
    prepare(paste)
    empty = snapshot(paste)
    assert empty == pristine
    paste.run("sh", "-e", input=dry.stdout)
    assert snapshot(paste) == real

    # and the teardown commands undo it, in the other namespace too
    undo = tproxy(gw, "teardown", "--dry-run")
    assert undo.returncode == 0 and undo.stdout.strip()
    assert snapshot(gw) == real  # a dry run changes nothing
    paste.run("sh", "-e", input=undo.stdout)
    assert snapshot(paste) == pristine
    assert tproxy(gw, "teardown").returncode == 0
    assert snapshot(gw) == pristine


def test_teardown_without_the_record_finds_ours_by_tags(gw: Namespace) -> None:
    before = snapshot(gw)
    assert tproxy(gw, "setup", IN, OUT, "-p", "80", "--mark", "5", "--table", "55").returncode == 0
    records = state_dir_of(gw)
    assert (records / "default.json").exists()
    shutil.rmtree(records)
    status = tproxy(gw, "status")
    assert status.returncode == 1 and "no record" in status.stdout
    assert tproxy(gw, "teardown").returncode == 0
    assert snapshot(gw) == before


def test_status_exit_codes(gw: Namespace) -> None:
    assert tproxy(gw, "status").returncode == 3
    assert tproxy(gw, "setup", IN, OUT, "-p", "80", "--ipv4").returncode == 0
    idle = tproxy(gw, "status")
    assert idle.returncode == 1, idle.stdout
    assert "listener tcp 127.0.0.1:9091: NOTHING LISTENS" in idle.stdout and HANG in idle.stdout
    with gw.socket() as listener:
        listener.bind(("127.0.0.1", 9091))
        listener.listen()
        served = tproxy(gw, "status")
        assert served.returncode == 0, served.stdout
        assert "listener tcp 127.0.0.1:9091: listening" in served.stdout
        assert HANG not in served.stdout
        if gw.backend == "iptables":  # type: ignore[attr-defined]
            gw.run(
                "iptables-legacy",
                "-t",
                "mangle",
                "-D",
                "TPROXY_DIVERT",
                "-m",
                "comment",
                "--comment",
                "tproxy:default",
                "-j",
                "ACCEPT",
            )
            missing = "missing: iptables-legacy"
        else:  # someone deletes rules of our table
            gw.run("nft", "flush", "chain", "inet", "tproxy_default", "tproxy_divert4")
            missing = "missing: nft table inet tproxy_default"
        partial = tproxy(gw, "status")
    assert partial.returncode == 1
    assert "partial" in partial.stdout and missing in partial.stdout, partial.stdout
    assert tproxy(gw, "teardown").returncode == 0
    assert tproxy(gw, "status").returncode == 3


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([IN, "nosuch0", "-p", "80"], "no such interface 'nosuch0'"),
        ([IN, OUT, "-p", "0"], "out of range"),
        ([IN, OUT, "-p", "80", "--proxy-address", "::1::2"], "bad proxy address"),
    ],
)
def test_bad_input_installs_nothing(gw1: Namespace, args: list[str], message: str) -> None:
    gw = gw1
    before = snapshot(gw)
    result = tproxy(gw, "setup", *args)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
    assert snapshot(gw) == before


def test_instances_are_independent(gw: Namespace) -> None:
    before = snapshot(gw)
    assert tproxy(gw, "setup", IN, OUT, "-p", "80").returncode == 0
    one = snapshot(gw)
    lab = [
        "setup",
        OUT,
        IN,
        "-p",
        "443",
        "--instance",
        "lab",
        "--mark",
        "2",
        "--table",
        "101",
        "--priority",
        "101",
        "--proxy-port",
        "9092",
    ]
    assert tproxy(gw, *lab).returncode == 0
    now = snapshot(gw)
    assert "TPROXY_PRE_lab" in now["iptables"] or "table inet tproxy_lab" in now["nft"]
    assert tproxy(gw, "status").returncode == 1  # complete, but nothing listens
    assert tproxy(gw, "teardown", "--instance", "lab").returncode == 0
    assert snapshot(gw) == one
    assert tproxy(gw, "teardown").returncode == 0
    assert snapshot(gw) == before


def wait_status(ns: Namespace, code: int, proc: subprocess.Popen[str]) -> None:
    """Poll ``tproxy status`` until it exits with ``code`` (hang guard: the test timeout)."""
    while tproxy(ns, "status").returncode != code:
        assert proc.poll() is None, ns.read_log(proc)
        time.sleep(0.1)


@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_run_setup_removes_routing_on_stop_and_teardown_after_kill(gw: Namespace, how: str) -> None:
    before = snapshot(gw)
    proc = gw.popen(
        sys.executable,
        "-m",
        "tproxy",
        "run",
        "--setup",
        IN,
        OUT,
        "--port",
        "80",
        *backend_args(gw),
        log_name="tproxy-run",
    )
    wait_status(gw, 0, proc)
    installed = snapshot(gw)
    assert_only_backend_changed(gw, before, installed)
    if gw.backend == "iptables":  # type: ignore[attr-defined]
        assert "TPROXY_PRE" in installed["iptables"] and "TPROXY_PRE" in installed["ip6tables"]
    else:
        assert "tproxy ip to 127.0.0.1:9091" in installed["nft"]
        assert "tproxy ip6 to [::1]:9091" in installed["nft"]
    proc.send_signal(getattr(signal, how))
    proc.wait(timeout=60)
    if how == "SIGTERM":
        assert snapshot(gw) == before, gw.read_log(proc)  # the engine removed it on its way out
    else:
        assert snapshot(gw) == installed  # nothing could run: the rules stayed
        status = tproxy(gw, "status")
        assert status.returncode == 1 and HANG in status.stdout, status.stdout
        assert f"owner: tproxy run, pid {proc.pid}, not running" in status.stdout
        assert "listener tcp 127.0.0.1:9091: NOTHING LISTENS" in status.stdout
        result = tproxy(gw, "teardown")
        assert result.returncode == 0 and "removed" in result.stdout
        assert snapshot(gw) == before


@pytest.mark.parametrize("backend", ["iptables", "nft"])
def test_traffic_is_intercepted_after_setup_and_direct_after_teardown(
    topology: Topology, backend: str
) -> None:
    """With ``--source gateway`` the server sees the gateway when (and only when) diverted."""
    topo = topology
    gateway = topo.gateway
    echo_server(topo.server, "::", 7000)

    def seen_by_server(server_ip: str) -> str:
        out = topo.client.python(
            "-c",
            "import socket,sys\n"
            f"s=socket.create_connection(({server_ip!r},7000),timeout=30)\n"
            "line=b''\n"
            "while not line.endswith(b'\\n'):\n"
            "    b=s.recv(1)\n"
            "    if not b: break\n"
            "    line+=b\n"
            "sys.stdout.write(line.decode())\n",
        ).stdout
        return parse_peer_line(out)[0]

    proc = gateway.popen(
        sys.executable, "-m", "tproxy", "run", "--source", "gateway", log_name="tproxy-run"
    )
    try:
        gateway.wait_port(9091, "127.0.0.1", proc=proc)
        gateway.wait_port(9091, "::1", proc=proc)
        assert seen_by_server(topo.server_ip4) == topo.client_ip4
        result = tproxy(
            gateway, "setup", topo.gw_in, topo.gw_out, "--port", "7000", "--backend", backend
        )
        assert result.returncode == 0, result.stderr
        try:
            assert seen_by_server(topo.server_ip4) == topo.gw_out_ip4
            assert seen_by_server(topo.server_ip6) == topo.gw_out_ip6
        finally:
            assert tproxy(gateway, "teardown").returncode == 0
        assert seen_by_server(topo.server_ip4) == topo.client_ip4
        assert seen_by_server(topo.server_ip6) == topo.client_ip6
    finally:
        gateway.stop(proc)
        shutil.rmtree(state_dir_of(gateway), ignore_errors=True)


def test_doctor_reports_and_names_fixes(gw1: Namespace) -> None:
    gw = gw1
    gw.run("sysctl", "-qw", "net.ipv4.ip_forward=0")
    gw.run("ip", "-4", "rule", "add", "fwmark", "1", "lookup", "100", "priority", "100")
    gw.run("ip", "-4", "route", "add", "local", "0.0.0.0/0", "dev", "lo", "table", "100")
    before = snapshot(gw)
    result = tproxy(gw, "doctor", IN, OUT)
    out = result.stdout
    assert result.returncode == 0, out  # warnings only: everything needed is there
    assert "[ok  ] privileges" in out and "[ok  ] xtables plugins" in out
    assert "[warn] IPv4 forwarding" in out and "fix: sysctl -w net.ipv4.ip_forward=1" in out
    assert "[warn] mark 0x1/0xffffffff: already used by foreign ip rule(s)" in out
    assert "[warn] table 100" in out and "clashes with ours" in out
    assert "[ok  ] interface in0" in out
    missing = tproxy(gw, "doctor", "nosuch0")
    assert missing.returncode == 1 and "[fail] interface nosuch0" in missing.stdout
    gw.run("ip", "link", "set", "lo", "down")
    down = tproxy(gw, "doctor")
    assert down.returncode == 1 and "fix: ip link set lo up" in down.stdout
    after = snapshot(gw)  # doctor changed nothing (lo down dropped lo's routes, not doctor)
    assert {k: after[k] for k in ("iptables", "ip6tables", "rule4", "rule6")} == {
        k: before[k] for k in ("iptables", "ip6tables", "rule4", "rule6")
    }


def test_teardown_all_removes_every_instance_and_orphans(gw: Namespace) -> None:
    before = snapshot(gw)
    assert tproxy(gw, "setup", IN, OUT, "-p", "80").returncode == 0
    assert (
        tproxy(
            gw,
            "setup",
            IN,
            OUT,
            "-p",
            "81",
            "--instance",
            "b",
            "--mark",
            "2",
            "--table",
            "102",
            "--priority",
            "102",
        ).returncode
        == 0
    )
    # an orphan: our ip rule left alone, record and iptables rules gone
    gw.run(
        "ip", "rule", "add", "fwmark", "9", "lookup", "109", "priority", "109", "protocol", "116"
    )
    status = tproxy(gw, "status")
    assert status.returncode == 1 and "unattributed" in status.stdout, status.stdout
    result = tproxy(gw, "teardown", "--all")
    assert result.returncode == 0, result.stderr
    assert snapshot(gw) == before


@pytest.mark.parametrize("second", ["80,443", "443"])
def test_a_wider_or_narrower_plan_is_refused_without_replace(gw: Namespace, second: str) -> None:
    first = "80,443" if second == "443" else "80"
    assert tproxy(gw, "setup", IN, OUT, "-p", first).returncode == 0
    installed = snapshot(gw)
    refused = tproxy(gw, "setup", IN, OUT, "-p", second)
    assert refused.returncode == 1 and "different plan" in refused.stderr, refused.stderr
    assert snapshot(gw) == installed
    assert tproxy(gw, "setup", IN, OUT, "-p", second, "--replace").returncode == 0
    assert tproxy(gw, "teardown").returncode == 0


def test_ipv6_disabled_setup_error_suggests_ipv4(gw: Namespace) -> None:
    gw.sysctl(
        {
            "net.ipv6.conf.all.disable_ipv6": 1,
            "net.ipv6.conf.default.disable_ipv6": 1,
            "net.ipv6.conf.lo.disable_ipv6": 1,
        }
    )
    before = snapshot(gw)
    result = tproxy(gw, "setup", IN, OUT, "-p", "80")
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "use --ipv4" in result.stderr, result.stderr
    assert snapshot(gw) == before
    assert tproxy(gw, "setup", IN, OUT, "-p", "80", "--ipv4").returncode == 0
    assert tproxy(gw, "teardown").returncode == 0


@pytest.mark.parametrize(
    ("ports", "message"),
    [
        (["--port", "80"], "no such interface 'nosuch0'"),
        (["--port", "65536"], "out of range"),
        (["--port", "80,abc"], "not a number"),
        ([], "no ports to divert"),
    ],
)
def test_run_setup_with_bad_arguments_exits_2_before_listening(
    gw1: Namespace, ports: list[str], message: str
) -> None:
    """The process ends with one line and exit 2; it never listened or installed anything."""
    gw = gw1
    before = snapshot(gw)
    in_if = "nosuch0" if message.startswith("no such") else IN
    proc = gw.popen(
        sys.executable,
        "-m",
        "tproxy",
        "run",
        "-v",
        "--setup",
        in_if,
        OUT,
        *ports,
        log_name="tproxy-run",
    )
    assert proc.wait(timeout=60) == 2
    log = gw.read_log(proc)
    assert message in log and "listening" not in log and "Traceback" not in log, log
    lines = [line for line in log.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("tproxy run: error: "), log
    assert snapshot(gw) == before

"""``--udp-port`` and ``--block-quic`` in fresh namespaces, read with independent tools.

The rules are read with ``iptables-legacy-save``/``ip6tables-legacy-save``; a
real datagram from the client namespace shows that UDP is diverted to the
proxy port with its original destination, and that QUIC is rejected at once
(ICMP port unreachable) instead of being forwarded.
"""

from __future__ import annotations

import shutil
import socket
import sys
from collections.abc import Callable

import pytest
from nsharness import Namespace, Topology
from test_routing import (  # noqa: F401
    IN,
    OUT,
    assert_only_backend_changed,
    gw,
    snapshot,
    state_dir_of,
    tproxy,
)

UDP_LINES_V4 = [
    "-A TPROXY_PRE -i out0 -p udp -m udp --sport 53 -m socket --transparent "
    '-m comment --comment "tproxy:default" -j TPROXY_DIVERT',
    "-A TPROXY_PRE -i out0 -p udp -m udp --sport 5000:5100 -m socket --transparent "
    '-m comment --comment "tproxy:default" -j TPROXY_DIVERT',
    '-A TPROXY_PRE -i in0 -p udp -m udp --dport 53 -m comment --comment "tproxy:default" '
    "-j TPROXY --on-port 9091 --on-ip 127.0.0.1 --tproxy-mark 0x1/0xffffffff",
    "-A TPROXY_PRE -i in0 -p udp -m udp --dport 5000:5100 -m comment --comment "
    '"tproxy:default" -j TPROXY --on-port 9091 --on-ip 127.0.0.1 --tproxy-mark 0x1/0xffffffff',
]
NFT_UDP_LINES = [
    "elements = { 53, 5000-5100 }",
    'iifname "out0" udp sport @ports0 socket transparent 1 jump tproxy_divert6',
    'meta nfproto ipv4 iifname "in0" udp dport @ports0 tproxy ip to 127.0.0.1:9091 '
    "meta mark set 0x00000001 accept",
    'meta nfproto ipv6 iifname "in0" udp dport @ports0 tproxy ip6 to [::1]:9091',
    "type filter hook forward priority filter; policy accept;",
    'iifname "in0" udp dport 443 reject with icmp port-unreachable',
    'iifname "in0" udp dport 443 reject with icmpv6 port-unreachable',
]
REJECT_V4 = (
    "-A FORWARD -i in0 -p udp -m udp --dport 443 -m comment --comment "
    '"tproxy:default" -j REJECT --reject-with icmp-port-unreachable'
)


def rules(dump: str) -> list[str]:
    return [line for line in dump.splitlines() if line.startswith("-A")]


@pytest.fixture
def gwf(gw: Namespace) -> Namespace:  # noqa: F811
    """The routing namespace with the filter tables instantiated too (as on any gateway)."""
    for tool in ("iptables-legacy", "ip6tables-legacy"):
        gw.run(tool, "-t", "filter", "-S")
    return gw


def test_udp_ports_and_block_quic_appear_and_disappear(gwf: Namespace) -> None:
    before = snapshot(gwf)
    result = tproxy(
        gwf, "setup", IN, OUT, "--port", "80", "--udp-port", "53,5000-5100", "--block-quic"
    )
    assert result.returncode == 0, result.stderr
    after = snapshot(gwf)
    assert_only_backend_changed(gwf, before, after)
    if gwf.backend == "nft":  # type: ignore[attr-defined]
        table = after["nft"]
        for line in NFT_UDP_LINES:
            assert line in table, (line, table)
        assert tproxy(gwf, "teardown").returncode == 0
        assert snapshot(gwf) == before
        return
    v4 = rules(after["iptables"])
    assert [line for line in v4 if "-p udp" in line and "TPROXY_PRE" in line] == UDP_LINES_V4
    assert v4[0] == REJECT_V4  # filter comes before mangle in iptables-save
    v6 = rules(after["ip6tables"])
    assert [line for line in v6 if "-p udp" in line and "TPROXY_PRE" in line] == [
        line.replace("127.0.0.1", "::1") for line in UDP_LINES_V4
    ]
    assert v6[0] == REJECT_V4.replace("icmp-", "icmp6-")
    status = tproxy(gwf, "status")  # nothing listens: exit 1, one line per listener
    assert status.returncode == 1 and "udp 53,5000-5100" in status.stdout, status.stdout
    assert "listener udp [::1]:9091: NOTHING LISTENS" in status.stdout
    assert "QUIC (udp/443) rejected" in status.stdout
    assert tproxy(gwf, "teardown").returncode == 0
    assert snapshot(gwf) == before
    assert tproxy(gwf, "status").returncode == 3


def test_udp_only_and_dry_run_pasted_gives_the_same_ruleset(
    gwf: Namespace, netns: Callable[..., Namespace]
) -> None:
    args = ["setup", IN, OUT, "--udp-port", "53", "--block-quic"]
    dry = tproxy(gwf, *args, "--dry-run")
    assert dry.returncode == 0 and "-p tcp" not in dry.stdout
    pristine = snapshot(gwf)
    assert tproxy(gwf, *args).returncode == 0
    real = snapshot(gwf)
    ruleset = real["iptables"] if gwf.backend == "iptables" else real["nft"]  # type: ignore[attr-defined]
    assert "tcp" not in ruleset and "dport 53" in ruleset
    paste = netns("paste")
    paste.run("ip", "link", "add", IN, "type", "veth", "peer", "name", OUT)
    for tool in ("iptables-legacy", "ip6tables-legacy"):
        for table in ("mangle", "filter"):  # the order gw instantiated them
            paste.run(tool, "-t", table, "-S")
    assert snapshot(paste) == pristine
    paste.run("sh", "-e", input=dry.stdout)
    assert snapshot(paste) == real
    assert tproxy(gwf, "teardown").returncode == 0
    assert snapshot(gwf) == pristine


# A stand-in for the proxy's UDP listener: one transparent socket per family,
# with the original destination in the ancillary data (constants Python lacks).
RECEIVER = r"""
import socket, struct, sys
family = socket.AF_INET6 if sys.argv[1] == "6" else socket.AF_INET
s = socket.socket(family, socket.SOCK_DGRAM)
if family == socket.AF_INET:
    s.setsockopt(socket.SOL_IP, 19, 1)    # IP_TRANSPARENT
    s.setsockopt(socket.SOL_IP, 20, 1)    # IP_RECVORIGDSTADDR
    s.bind(("127.0.0.1", 9091))
else:
    s.setsockopt(41, 75, 1)               # IPV6_TRANSPARENT
    s.setsockopt(41, 74, 1)               # IPV6_RECVORIGDSTADDR
    s.bind(("::1", 9091))
print("ready", flush=True)
s.settimeout(30)
data, anc, flags, src = s.recvmsg(2048, 256)
for level, kind, raw in anc:
    if family == socket.AF_INET and kind == 20:
        port, ip = struct.unpack("!2xH4s8x", raw[:16])
        print("ORIG", socket.inet_ntop(family, ip), port, data.decode(), flush=True)
    elif family == socket.AF_INET6 and kind == 74:
        port, ip = struct.unpack("!2xH4x16s4x", raw[:28])
        print("ORIG", socket.inet_ntop(family, ip), port, data.decode(), flush=True)
"""


@pytest.mark.parametrize("backend", ["iptables", "nft"])
@pytest.mark.parametrize("family", [4, 6])
def test_udp_is_diverted_and_quic_rejected(topology: Topology, family: int, backend: str) -> None:
    topo = topology
    gateway = topo.gateway
    server_ip = topo.server_ip4 if family == 4 else topo.server_ip6
    af = socket.AF_INET if family == 4 else socket.AF_INET6
    receiver = gateway.popen(sys.executable, "-c", RECEIVER, str(family), log_name="udp-rx")
    try:
        gateway.wait_log(receiver, "ready")
        result = tproxy(
            gateway,
            "setup",
            topo.gw_in,
            topo.gw_out,
            "--udp-port",
            "5353",
            "--block-quic",
            f"--ipv{family}",
            "--backend",
            backend,
        )
        assert result.returncode == 0, result.stderr
        with topo.client.socket(af, socket.SOCK_DGRAM) as sock:
            sock.settimeout(10)
            sock.connect((server_ip, 5353))
            sock.send(b"hello")
            gateway.wait_log(receiver, f"ORIG {server_ip} 5353 hello")
        with topo.client.socket(af, socket.SOCK_DGRAM) as quic:
            quic.settimeout(10)
            quic.connect((server_ip, 443))
            quic.send(b"initial")
            with pytest.raises(ConnectionRefusedError):  # the gateway's ICMP unreachable
                quic.recv(100)
        assert tproxy(gateway, "teardown").returncode == 0
    finally:
        gateway.stop(receiver)
        tproxy(gateway, "teardown")
        shutil.rmtree(state_dir_of(gateway), ignore_errors=True)

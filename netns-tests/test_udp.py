"""Transparent UDP end to end: DNS through the gateway, many sessions, idle expiry, the cap.

The proxy runs in ``topology.gateway``; UDP to the chosen port is diverted
to it with TPROXY. Clients are dig and dnspython (DNS) and plain sockets
(the UDP echo peer) in the client namespace.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from typing import Any

import dns.message
import dns.query
import dns.rdatatype
import pytest
from nsharness import PEERS_DIR, Namespace, Topology, echo_server, wait_until

DNS_PORT = 53
ECHO_PORT = 7000
PROXY_PORT = 9091

FAMILIES = pytest.mark.parametrize("family", [4, 6], ids=["ipv4", "ipv6"])


def server_ip(topology: Topology, family: int) -> str:
    return topology.server_ip4 if family == 4 else topology.server_ip6


def client_ip(topology: Topology, family: int) -> str:
    return topology.client_ip4 if family == 4 else topology.client_ip6


def dns_server(ns: Namespace, *records: str) -> subprocess.Popen[Any]:
    argv = [sys.executable, "-u", PEERS_DIR / "dns_server.py", "--host", "::", "--port", DNS_PORT]
    for record in records:
        argv += ["--record", record]
    proc = ns.popen(*argv, log_name="dns_server")
    ns.wait_port(DNS_PORT, "::", proto="udp", proc=proc)
    return proc


def start_proxy(topology: Topology, udp_port: int, *extra: str) -> subprocess.Popen[Any]:
    """``tproxy run --setup`` diverting UDP ``udp_port`` (both families); wait until diverted."""
    gw = topology.gateway
    proxy = gw.popen(
        sys.executable,
        "-m",
        "tproxy",
        "run",
        "-v",
        "--setup",
        topology.gw_in,
        topology.gw_out,
        "--udp-port",
        str(udp_port),
        *extra,
        log_name="tproxy",
    )
    gw.wait_port(PROXY_PORT, "127.0.0.1", proto="udp", proc=proxy)
    wait_until(
        lambda: (
            proxy.poll() is None
            and gw.run(sys.executable, "-m", "tproxy", "status", check=False).returncode == 0
        ),
        60,
        "tproxy run --setup to install its routing",
    )
    assert proxy.poll() is None, gw.read_log(proxy)
    return proxy


def descriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_dns_server_sees_the_client_and_the_reply_comes_from_the_server(
    topology: Topology,
) -> None:
    server = dns_server(topology.server)
    proxy = start_proxy(topology, DNS_PORT)
    for family in (4, 6):
        q = dns.message.make_query("whoami.test", "TXT")
        with topology.client.enter():
            # dns.query.udp refuses an answer from any other address than it asked
            reply = dns.query.udp(q, server_ip(topology, family), port=DNS_PORT, timeout=5)
        (txt,) = [rd for rrset in reply.answer for rd in rrset]
        ip, port = txt.strings[0].decode().split()
        assert ip == client_ip(topology, family)
        assert f"QUERY {ip} {port} whoami.test. TXT" in topology.server.read_log(server)
        log = topology.gateway.read_log(proxy)
        assert "mode=transparent-udp" in log and f"via={_fmt(ip, int(port))}" in log


@FAMILIES
def test_dig_through_the_gateway_and_dns_rewrite(topology: Topology, family: int) -> None:
    dns_server(topology.server, "www.test=198.51.100.80", "www.test=2001:db8:2::80")
    proxy = start_proxy(
        topology,
        DNS_PORT,
        "-i",
        "dns",
        "-o",
        "rewrite=www.test=192.0.2.99;www.test=2001:db8:1::99",
        "-o",
        r"block=^ads\.",
    )
    target = server_ip(topology, family)
    rdtype = "A" if family == 4 else "AAAA"
    out = topology.client.run(
        "dig",
        f"@{target}",
        "-p",
        str(DNS_PORT),
        "www.test",
        rdtype,
        "+short",
        "+tries=2",
        "+time=3",
    ).stdout.split()
    assert out == (["192.0.2.99"] if family == 4 else ["2001:db8:1::99"])
    full = topology.client.run("dig", f"@{target}", "ads.test", "A", "+tries=2", "+time=3").stdout
    assert "status: NXDOMAIN" in full and f"SERVER: {target}#{DNS_PORT}" in full
    log = topology.gateway.read_log(proxy)
    assert "dns query" in log and "(rewritten)" in log and "dns blocked ads.test" in log


@FAMILIES
@pytest.mark.timeout(180)
def test_a_thousand_sessions_no_crosstalk_and_descriptors_come_back(
    topology: Topology, family: int
) -> None:
    echo_server(topology.server, "::", ECHO_PORT, udp=True)
    # idle long enough that no session expires while answers lost on the way are re-asked
    proxy = start_proxy(topology, ECHO_PORT, "--udp-idle", "10")
    baseline = descriptors(proxy.pid)
    fam = socket.AF_INET if family == 4 else socket.AF_INET6
    target = (server_ip(topology, family), ECHO_PORT)
    socks = [topology.client.socket(fam, socket.SOCK_DGRAM) for _ in range(1000)]
    try:
        for s in socks:
            s.bind(("0.0.0.0" if family == 4 else "::", 0))
            s.setblocking(False)
        ports = {s.getsockname()[1] for s in socks}
        assert len(ports) == 1000
        replies = _exchange(socks, target)
        for s in socks:
            port = s.getsockname()[1]
            got = replies[port]
            # only its own payload, seen by the server from its own address and port
            assert got == [f"PEER {client_ip(topology, family)} {port}\nfrom {port}".encode()]
        peak = descriptors(proxy.pid)
        assert peak >= baseline + 1000  # a socket per session was open
        wait_until(
            lambda: descriptors(proxy.pid) <= baseline,
            30,
            "the proxy's descriptors to return to their baseline",
        )

        def every_session_ended() -> str | None:
            # A session's end record may be written just after its socket closed.
            log = topology.gateway.read_log(proxy)
            return (
                log if log.count(" end reason=") >= log.count("open mode=transparent-udp") else None
            )

        log = str(wait_until(every_session_ended, 10, "an end record for every session"))
        opened = log.count("open mode=transparent-udp")
        assert opened >= 1000 and log.count("end reason=idle") == opened
    finally:
        for s in socks:
            s.close()


def _exchange(socks: list[socket.socket], target: tuple[str, int]) -> dict[int, list[bytes]]:
    """Each socket sends ``from <port>`` until it has an answer (UDP may drop); collect all."""
    replies: dict[int, list[bytes]] = {s.getsockname()[1]: [] for s in socks}
    deadline = time.monotonic() + 60
    pending = list(socks)
    while pending and time.monotonic() < deadline:
        for s in pending:
            s.sendto(f"from {s.getsockname()[1]}".encode(), target)
        round_end = time.monotonic() + 3
        while time.monotonic() < round_end and any(not replies[p] for p in replies):
            for s in pending:
                try:
                    data, source = s.recvfrom(65535)
                except BlockingIOError:
                    continue
                assert (source[0], source[1]) == target, "a reply from another address"
                replies[s.getsockname()[1]].append(data)
            time.sleep(0.01)
        pending = [s for s in pending if not replies[s.getsockname()[1]]]
    assert not pending, f"{len(pending)} sockets got no answer"
    time.sleep(0.5)  # anything late (a duplicate, a stray) would show up now
    for s in socks:
        while True:
            try:
                data, _ = s.recvfrom(65535)
            except BlockingIOError:
                break
            replies[s.getsockname()[1]].append(data)
    return replies


def test_the_session_cap_evicts_the_least_recently_used_and_logs(topology: Topology) -> None:
    echo_server(topology.server, "::", ECHO_PORT, udp=True)
    proxy = start_proxy(topology, ECHO_PORT, "--udp-max-sessions", "20")
    target = (topology.server_ip4, ECHO_PORT)
    for n in range(30):
        with topology.client.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(5)
            s.sendto(b"n%d" % n, target)
            data, source = s.recvfrom(65535)
            assert data.endswith(b"n%d" % n) and source == target
    log = topology.gateway.read_log(proxy)
    assert log.count("end reason=evicted") == 10
    assert log.count("session cap reached (20 sessions): evicting flow") == 10


def _fmt(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def test_workers_keep_each_session_in_one_process(topology: Topology) -> None:
    """``--workers 2``: SO_REUSEPORT spreads clients, but a client's datagrams stay together."""
    echo_server(topology.server, "::", ECHO_PORT, udp=True)
    proxy = start_proxy(topology, ECHO_PORT, "--workers", "2")
    socks = [topology.client.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(40)]
    for round_ in range(3):
        for s in socks:
            s.settimeout(5)
            s.sendto(b"r%d" % round_, (topology.server_ip4, ECHO_PORT))
            data, _ = s.recvfrom(65535)
            assert data.endswith(b"r%d" % round_)
    log = topology.gateway.read_log(proxy)
    opens = [line for line in log.splitlines() if "open mode=transparent-udp" in line]
    assert len(opens) == 40  # one session per client, not one per worker it reached
    assert any(" w0 " in line for line in opens) and any(" w1 " in line for line in opens)


@pytest.mark.parametrize("source", ["client-ip", "gateway"])
def test_source_choices(topology: Topology, source: str) -> None:
    dns_server(topology.server)
    start_proxy(topology, DNS_PORT, "--source", source)
    with topology.client.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("0.0.0.0", 0))
        port = s.getsockname()[1]
    ip, _ = _whoami(topology, port)
    if source == "gateway":
        assert ip == topology.gw_out_ip4
    else:
        assert ip == topology.client_ip4


def test_client_port_taken_on_the_gateway_falls_back_to_a_free_port(topology: Topology) -> None:
    dns_server(topology.server)
    start_proxy(topology, DNS_PORT)
    with topology.gateway.socket(socket.AF_INET, socket.SOCK_DGRAM) as holder:
        # a local socket on the client's address and port, without SO_REUSEADDR
        holder.setsockopt(socket.SOL_IP, 19, 1)  # IP_TRANSPARENT
        holder.bind((topology.client_ip4, 0))
        taken = holder.getsockname()[1]
        ip, port = _whoami(topology, taken)
    assert ip == topology.client_ip4 and port != taken


def _whoami(topology: Topology, client_port: int) -> tuple[str, int]:
    """Ask the DNS peer who it sees, from ``client_port`` in the client namespace."""
    q = dns.message.make_query("whoami.test", "TXT")
    with topology.client.enter():
        reply = dns.query.udp(
            q,
            topology.server_ip4,
            port=DNS_PORT,
            timeout=5,
            source="0.0.0.0",
            source_port=client_port,
        )
    (txt,) = [rd for rrset in reply.answer for rd in rrset]
    ip, port = txt.strings[0].decode().split()
    return ip, int(port)


def _flows(topology: Topology, proxy: subprocess.Popen[Any], *args: str) -> Any:
    return topology.gateway.run(
        sys.executable, "-m", "tproxy", "flows", "--pid", proxy.pid, *args, check=False
    )


def test_flows_lists_udp_sessions_and_kills_one(topology: Topology) -> None:
    """``tproxy flows`` shows a live UDP session (protocol, client, destination, bytes,
    age, the interceptors its --when selected) and ``--kill`` ends it, logged."""
    echo_server(topology.server, "::", ECHO_PORT, udp=True)
    proxy = start_proxy(
        topology,
        ECHO_PORT,
        *("-i", "label", "--when", f"port={ECHO_PORT}"),
        *("-i", "hexdump", "--when", "port=1"),
        *("--metrics", "127.0.0.1:9109"),
    )
    target = (topology.server_ip4, ECHO_PORT)
    with topology.client.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(5)
        s.sendto(b"hello", target)
        data, source = s.recvfrom(65535)
        assert data.endswith(b"hello") and source == target
        client = f"{topology.client_ip4}:{s.getsockname()[1]}"
        listed = _flows(topology, proxy, "--json")
        assert listed.returncode == 0, listed.stderr
        (flow,) = [f for f in json.loads(listed.stdout) if f["client"] == client]
        assert flow["protocol"] == "udp" and flow["mode"] == "transparent-udp"
        assert flow["destination"] == f"{topology.server_ip4}:{ECHO_PORT}"
        assert flow["bytes_read_up"] == 5 and flow["bytes_read_down"] == len(data)
        assert flow["age"] >= 0 and flow["interceptors"] == ["label"]
        table = _flows(topology, proxy).stdout
        assert "PROTO" in table and client in table and "udp" in table
        scrape = topology.gateway.run("curl", "-sf", "http://127.0.0.1:9109/metrics").stdout
        assert "\ntproxy_flows_live 1.0\n" in scrape  # the session is a live flow
        killed = _flows(topology, proxy, "--kill", str(flow["id"]))
        assert killed.returncode == 0 and f"killed flow {flow['id']}" in killed.stdout
        wait_until(
            lambda: f"flow {flow['id']} end reason=shutdown" in topology.gateway.read_log(proxy),
            10,
            "the killed session's end line",
        )
        assert "killed (tproxy flows --kill)" in topology.gateway.read_log(proxy)
        listed_after = json.loads(_flows(topology, proxy, "--json").stdout)
        assert all(f["id"] != flow["id"] for f in listed_after)
        # the client's next datagram opens a new session: the old one is gone for good
        s.sendto(b"again", target)
        data, _ = s.recvfrom(65535)
        assert data.endswith(b"again")
    again = [
        f for f in json.loads(_flows(topology, proxy, "--json").stdout) if f["client"] == client
    ]
    assert len(again) == 1 and again[0]["id"] != flow["id"]
    assert _flows(topology, proxy, "--kill", str(flow["id"])).returncode == 1

"""Tests of the namespace harness itself: the path works, peers tell the truth, nothing leaks.

End-to-end tests of the proxy stand on this harness, so these check each
promise it makes: client reaches server through the gateway (v4, v6, ping,
curl, iperf3), the echo server reports the address it really sees, hosts files
resolve, helpers fail with useful messages, and namespaces are deleted on
failure, on Ctrl-C/SIGTERM and after a crash (by the next run).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
from nsharness import (
    CommandError,
    HarnessError,
    Namespace,
    Topology,
    curl,
    diff_snapshots,
    echo_server,
    http_server,
    iperf3_client,
    iperf3_server,
    list_namespaces,
    owner_of,
    parse_peer_line,
    remove_stale,
    run_command,
    run_id,
    snapshot_root,
    url,
    wait_until,
    write_hosts,
)

HERE = Path(__file__).resolve().parent
# Under pytest-xdist these run one after another on one worker: one of them adds a
# namespace to the root that the hygiene check of another's inner session would see.
pytestmark = pytest.mark.xdist_group("netns-harness")
FAMILIES = [
    pytest.param(socket.AF_INET, id="ipv4"),
    pytest.param(socket.AF_INET6, id="ipv6"),
]


def addrs(topo: Topology, family: int) -> tuple[str, str]:
    """(client address, server address) of the topology in ``family``."""
    if family == socket.AF_INET6:
        return topo.client_ip6, topo.server_ip6
    return topo.client_ip4, topo.server_ip4


def recv_until_eof(sock: socket.socket, limit: int = 1 << 20) -> bytes:
    """Read until the peer's EOF (bounded by ``limit`` bytes)."""
    chunks = []
    total = 0
    while total <= limit:
        data = sock.recv(65536)
        if not data:
            break
        chunks.append(data)
        total += len(data)
    return b"".join(chunks)


def root_link_names() -> set[str]:
    out = run_command(["ip", "-j", "link", "show"]).stdout
    return {link["ifname"] for link in json.loads(out)}


# ---------------------------------------------------------------------------
# The topology.


def test_topology_names_and_addresses(topology: Topology) -> None:
    names = [ns.name for ns in topology.namespaces]
    assert len(set(names)) == 3
    for ns in topology.namespaces:
        assert owner_of(ns.name) == run_id()
        assert ns.name in list_namespaces()
    gw_links = topology.gateway.ip("-br", "link").stdout
    assert topology.gw_in in gw_links and topology.gw_out in gw_links
    assert topology.gw_in_ip4 in topology.gateway.ip("-4", "addr", "show", topology.gw_in).stdout
    assert topology.gw_out_ip6 in topology.gateway.ip("-6", "addr", "show", topology.gw_out).stdout
    fwd = topology.gateway.run(
        "cat", "/proc/sys/net/ipv4/ip_forward", "/proc/sys/net/ipv6/conf/all/forwarding"
    )
    assert fwd.stdout.split() == ["1", "1"]


def test_root_namespace_never_holds_a_veth() -> None:
    before = root_link_names()
    with Topology() as topo:
        during = root_link_names()
        assert all(ns.name in list_namespaces() for ns in topo.namespaces)
    assert during - before == set()
    assert all(ns.name not in list_namespaces() for ns in topo.namespaces)


@pytest.mark.parametrize("family", FAMILIES)
def test_ping_client_to_server_through_gateway(topology: Topology, family: int) -> None:
    _, server = addrs(topology, family)
    out = topology.client.run("ping", "-n", "-c", "1", "-W", "5", server).stdout
    assert "1 received" in out
    # The path goes through the gateway, not some other way out.
    route = topology.client.ip("route", "get", server).stdout
    gw = topology.gw_in_ip6 if family == socket.AF_INET6 else topology.gw_in_ip4
    assert f"via {gw}" in route


@pytest.mark.parametrize("family", FAMILIES)
def test_curl_fetches_from_http_server_through_gateway(
    topology: Topology, tmp_path: Path, family: int
) -> None:
    client, server = addrs(topology, family)
    (tmp_path / "index.html").write_text("hello from the server namespace\n")
    proc = http_server(topology.server, server, 8080, tmp_path)
    body = curl(topology.client, url(server, 8080, "/index.html")).stdout
    assert body == "hello from the server namespace\n"
    # http.server logs the client address it saw: no NAT on this path.
    assert client in topology.server.read_log(proc)


@pytest.mark.parametrize("family", FAMILIES)
def test_echo_server_reports_client_address(topology: Topology, family: int) -> None:
    client, server = addrs(topology, family)
    proc = echo_server(topology.server, "::", 7000)
    with topology.client.socket(family) as sock:
        sock.settimeout(10)
        sock.connect((server, 7000))
        local = sock.getsockname()
        reader = sock.makefile("rb")
        peer = parse_peer_line(reader.readline())
        assert peer == (client, local[1])
        sock.sendall(b"ping\n" * 1000)
        sock.shutdown(socket.SHUT_WR)
        assert reader.read() == b"ping\n" * 1000
    assert f"CONNECT {client} {local[1]}" in topology.server.read_log(proc)


def test_echo_server_handles_concurrent_connections(topology: Topology) -> None:
    echo_server(topology.server, topology.server_ip4, 7001)
    socks = [topology.client.socket() for _ in range(40)]
    try:
        for sock in socks:
            sock.settimeout(10)
            sock.connect((topology.server_ip4, 7001))
        # Every connection is open at once; each gets its own PEER line and echo.
        for i, sock in enumerate(socks):
            line = b""
            while not line.endswith(b"\n") and len(line) < 100:
                line += sock.recv(1)
            assert parse_peer_line(line) == (topology.client_ip4, sock.getsockname()[1])
            sock.sendall(f"conn {i}".encode())
            sock.shutdown(socket.SHUT_WR)
        for i, sock in enumerate(socks):
            assert recv_until_eof(sock) == f"conn {i}".encode()
    finally:
        for sock in socks:
            sock.close()


@pytest.mark.parametrize("family", FAMILIES)
def test_udp_echo_reports_client_address(topology: Topology, family: int) -> None:
    client, server = addrs(topology, family)
    echo_server(topology.server, "::", 7002, udp=True)
    with topology.client.socket(family, socket.SOCK_DGRAM) as sock:
        sock.settimeout(10)
        sock.sendto(b"datagram", (server, 7002))
        data, _ = sock.recvfrom(65536)
        line, payload = data.split(b"\n", 1)
        assert parse_peer_line(line) == (client, sock.getsockname()[1])
        assert payload == b"datagram"


def test_trio_socket_in_namespace(topology: Topology) -> None:
    echo_server(topology.server, topology.server_ip6, 7003)

    async def talk() -> tuple[str, bytes]:
        sock = topology.client.trio_socket(socket.AF_INET6)
        with sock:
            with trio.fail_after(10):
                await sock.connect((topology.server_ip6, 7003))
                stream = trio.SocketStream(sock)
                await stream.send_all(b"trio says hi")
                await stream.send_eof()
                received = b""
                for _ in range(1000):
                    data = await stream.receive_some()
                    if not data:
                        break
                    received += data
        line, rest = received.split(b"\n", 1)
        return parse_peer_line(line)[0], rest

    peer, echoed = trio.run(talk)
    assert (peer, echoed) == (topology.client_ip6, b"trio says hi")


def test_enter_creates_sockets_in_namespace_and_returns(topology: Topology) -> None:
    with topology.server.enter():
        listener = socket.create_server((topology.server_ip4, 7004))
    with listener:
        # Back in the root namespace, the server's address is not even local.
        with socket.socket() as probe, pytest.raises(OSError):
            probe.bind((topology.server_ip4, 0))
        topology.server.wait_port(7004, topology.server_ip4)
        with topology.client.socket() as sock:
            sock.settimeout(10)
            sock.connect((topology.server_ip4, 7004))
            conn, addr = listener.accept()
            conn.close()
            assert addr[0] == topology.client_ip4


def test_iperf3_through_gateway(topology: Topology) -> None:
    iperf3_server(topology.server, topology.server_ip4, 5201)
    report = iperf3_client(topology.client, topology.server_ip4, "-n", "1M", port=5201)
    # The sender counts what it pushed through; the receiver's tally can stop early for
    # such a short run, so it only has to have seen data.
    assert report["end"]["sum_sent"]["bytes"] >= 1 << 20
    assert report["end"]["sum_received"]["bytes"] > 0


def test_hosts_file_resolves_inside_namespace(topology: Topology, tmp_path: Path) -> None:
    path = write_hosts(topology.client, {"server.test": [topology.server_ip4, topology.server_ip6]})
    assert path == Path("/etc/netns") / topology.client.name / "hosts"
    out = topology.client.run("getent", "ahostsv4", "server.test").stdout
    assert topology.server_ip4 in out
    (tmp_path / "f.txt").write_text("by name\n")
    http_server(topology.server, "::", 8081, tmp_path)
    assert curl(topology.client, "http://server.test:8081/f.txt", "-4").stdout == "by name\n"
    # Only the client namespace sees the name.
    assert topology.server.run("getent", "hosts", "server.test", check=False).returncode != 0
    topology.client.close()
    assert not path.parent.exists()


# ---------------------------------------------------------------------------
# Helpers fail with something useful.


def test_netns_factory_gives_isolated_namespaces(netns: Callable[..., Namespace]) -> None:
    a, b = netns("alpha"), netns("beta")
    assert a.name != b.name and a.name.endswith("-alpha")
    assert "UP" in a.ip("-br", "link", "show", "lo").stdout
    with a.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        a.wait_port(port, "127.0.0.1")
        with b.socket() as sock, pytest.raises(ConnectionRefusedError):
            sock.connect(("127.0.0.1", port))


def test_run_error_carries_stderr(netns: Callable[..., Namespace]) -> None:
    ns = netns()
    with pytest.raises(CommandError) as info:
        ns.run("sh", "-c", "echo something broke >&2; exit 3")
    assert info.value.returncode == 3
    assert "something broke" in str(info.value)
    assert ns.run("sh", "-c", "exit 4", check=False).returncode == 4
    assert ns.python("-c", "print(6 * 7)").stdout == "42\n"


def test_wait_port_fails_with_the_log_of_a_dead_process(netns: Callable[..., Namespace]) -> None:
    ns = netns()
    proc = ns.popen(sys.executable, "-c", "print('cannot start: bad config'); raise SystemExit(1)")
    with pytest.raises(HarnessError) as info:
        ns.wait_port(9999, proc=proc, timeout=30)
    assert "cannot start: bad config" in str(info.value)


def test_wait_port_gives_up(netns: Callable[..., Namespace]) -> None:
    ns = netns()
    ns.popen("sleep", "60")
    with pytest.raises(HarnessError, match="nothing listens"):
        ns.wait_port(9998, timeout=0.3)


def test_wait_log_and_wait_until(netns: Callable[..., Namespace]) -> None:
    ns = netns()
    proc = ns.popen(sys.executable, "-c", "import time; print('READY'); time.sleep(60)")
    assert "READY" in ns.wait_log(proc, "READY", timeout=30)
    assert wait_until(lambda: proc.pid, what="a pid") == proc.pid
    quitter = ns.popen(sys.executable, "-c", "print('bye')")
    with pytest.raises(HarnessError, match="never appeared"):
        ns.wait_log(quitter, "READY", timeout=30)
    with pytest.raises(HarnessError, match="nothing did not happen"):
        wait_until(lambda: False, timeout=0.2, what="nothing")


def test_close_stops_processes_and_sockets(netns: Callable[..., Namespace]) -> None:
    ns = netns()
    proc = ns.popen("sh", "-c", "sleep 60 & sleep 60; wait")
    sock = ns.socket()
    ns.close()
    assert proc.poll() is not None
    assert sock.fileno() == -1
    assert ns.name not in list_namespaces()
    ns.close()  # idempotent


# ---------------------------------------------------------------------------
# Cleanup when things go wrong: run an inner pytest session and watch it.

INNER_HEADER = """
import os, sys, time
from pathlib import Path
import pytest
from nsharness import echo_server

RECORD = Path(os.environ["TPX_RECORD"])

def record(topology, proc):
    names = [ns.name for ns in topology.namespaces]
    RECORD.write_text(" ".join([str(proc.pid), *names]))
"""


def run_inner(
    tmp_path: Path,
    body: str,
    *,
    interrupt: int | None = None,
    repeat: int = 1,
    env: dict[str, str] | None = None,
) -> tuple[subprocess.CompletedProcess[str], list[str], int]:
    """Run ``body`` as a test file in a child pytest using this conftest as a plugin.

    Returns (result, namespace names the inner test recorded, pid of its echo
    server). With ``interrupt``, that signal is sent ``repeat`` times in a row once
    the test has recorded.
    """
    test_file = tmp_path / "inner" / "test_inner.py"
    test_file.parent.mkdir()
    test_file.write_text(INNER_HEADER + textwrap.dedent(body))
    record = tmp_path / "record.txt"
    child_env = {
        **os.environ,
        "PYTHONPATH": str(HERE),
        "TPX_RECORD": str(record),
        "TPX_HYGIENE": "fail",
        **(env or {}),
    }
    argv = [
        sys.executable, "-m", "pytest", "-p", "conftest", "-p", "no:cacheprovider",
        "-q", "-s", "--rootdir", str(test_file.parent), str(test_file),
    ]  # fmt: skip
    proc = subprocess.Popen(
        argv, env=child_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        if interrupt is not None:
            for _ in range(600):
                if (record.exists() and record.read_text()) or proc.poll() is not None:
                    break
                time.sleep(0.05)
            for _ in range(repeat):
                proc.send_signal(interrupt)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    result = subprocess.CompletedProcess(argv, proc.returncode, out, "")
    recorded = record.read_text().split() if record.exists() else []
    assert recorded, f"the inner test recorded nothing:\n{out}"
    return result, recorded[1:], int(recorded[0])


def process_gone(pid: int) -> bool:
    """True once ``pid`` has exited (a zombie counts as exited)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def assert_gone(names: list[str], pid: int, output: str) -> None:
    present = set(list_namespaces())
    leftover = [n for n in names if n in present or (Path("/etc/netns") / n).exists()]
    assert not leftover, f"left behind: {leftover}\n{output}"
    assert process_gone(pid), output


def test_failing_test_still_cleans_up(tmp_path: Path) -> None:
    result, names, pid = run_inner(
        tmp_path,
        """
        def test_fails(topology):
            proc = echo_server(topology.server, "::", 7000)
            record(topology, proc)
            assert False, "deliberate failure"
    """,
    )
    assert result.returncode == 1, result.stdout
    assert "deliberate failure" in result.stdout
    assert "namespace process logs" in result.stdout  # logs attached to the failure
    assert "LISTEN tcp :: 7000" in result.stdout
    assert_gone(names, pid, result.stdout)


@pytest.mark.parametrize(
    ("sig", "repeat"),
    [(signal.SIGINT, 1), (signal.SIGTERM, 1), (signal.SIGINT, 3)],
    ids=["SIGINT", "SIGTERM", "SIGINTx3"],
)
def test_interrupted_session_cleans_up(tmp_path: Path, sig: int, repeat: int) -> None:
    result, names, pid = run_inner(
        tmp_path,
        """
        def test_waits(topology):
            proc = echo_server(topology.server, "::", 7000)
            record(topology, proc)
            for _ in range(1200):
                time.sleep(0.05)
    """,
        interrupt=sig,
        repeat=repeat,
    )
    assert result.returncode == pytest.ExitCode.INTERRUPTED, result.stdout
    assert_gone(names, pid, result.stdout)


def test_hygiene_check_fails_a_leaking_session(tmp_path: Path) -> None:
    leak = f"tpxleak-{os.getpid()}"
    try:
        result, _, _ = run_inner(
            tmp_path,
            f"""
            import subprocess
            def test_leaks(topology):
                proc = echo_server(topology.server, "::", 7000)
                record(topology, proc)
                subprocess.run(["ip", "netns", "add", "{leak}"], check=True)
        """,
        )
        assert result.returncode == 1, result.stdout
        assert "hygiene check FAILED" in result.stdout
        assert f"+ {leak}" in result.stdout
    finally:
        run_command(["ip", "netns", "delete", leak], check=False)


CRASHING_RUN = """
import os, sys
sys.path.insert(0, sys.argv[1])
import nsharness
ns = nsharness.Namespace("crash")
ns.popen("sleep", "300")
nsharness.write_hosts(ns, {"x.test": "192.0.2.9"})
print(ns.name, flush=True)
os.kill(os.getpid(), 9)
"""


def test_leftovers_of_a_crashed_run_are_removed() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", CRASHING_RUN, str(HERE)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    name = proc.stdout.strip()
    try:
        assert proc.returncode == -signal.SIGKILL, proc.stderr
        assert name in list_namespaces()
        pids = run_command(["ip", "netns", "pids", name]).stdout.split()
        assert pids, "the crashed run's process should still run inside its namespace"
        removed = remove_stale()
        assert name in removed
        assert name not in list_namespaces()
        assert not (Path("/etc/netns") / name).exists()
        assert all(process_gone(int(pid)) for pid in pids)
    finally:
        if name and name in list_namespaces():
            run_command(["ip", "netns", "delete", name], check=False)


def test_live_runs_are_never_treated_as_stale(netns: Callable[..., Namespace]) -> None:
    mine = netns("mine")
    assert mine.name not in remove_stale()
    assert mine.name in list_namespaces()


# ---------------------------------------------------------------------------
# The hygiene comparison.


def test_snapshot_sees_a_new_namespace(netns: Callable[..., Namespace]) -> None:
    before = snapshot_root()
    ns = netns("hygiene")
    during = diff_snapshots(before, snapshot_root())
    assert f"  + {ns.name}" in during
    ns.close()
    assert f"  + {ns.name}" not in diff_snapshots(before, snapshot_root())


def test_diff_ignores_counters_and_foreign_live_runs() -> None:
    before = {"namespaces": ["a"], "ip route (all tables)": ["x"], "nft list ruleset": ["r"]}
    foreign = "tpx-1-abcd-1-client"  # pid 1 is alive but never a harness run of ours
    after = {
        "namespaces": ["a", foreign, "leak"],
        "ip route (all tables)": ["x", "y"],
        "nft list ruleset": ["r"],
    }
    diff = diff_snapshots(before, after)
    assert diff == ["namespaces:", "  + leak", "ip route (all tables):", "  + y"]
    assert diff_snapshots(before, before) == []

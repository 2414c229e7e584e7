"""The engine end to end through a real TPROXY gateway.

client -- gateway (``tproxy setup`` + ``tproxy run``) -- server, with real
peers: the echo server that reports the address it sees, python's HTTP
server and curl. Checks what DESIGN.md promises: the server sees the
client's own address, bytes arrive unchanged (or rewritten by an
interceptor), half-close and resets propagate, many flows work at once, and
shutdown resets what is left when the grace period runs out.
"""

from __future__ import annotations

import json
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from nsharness import Namespace, Topology, curl, echo_server, http_server, url

HERE = Path(__file__).resolve().parent
CLIENT = HERE / "flowclient.py"
ECHO_PORT = 7000
HTTP_PORT = 80
DIVERTED = f"{ECHO_PORT},{HTTP_PORT},7001"


def tproxy(ns: Namespace, *args: str, check: bool = True) -> Any:
    return ns.run(sys.executable, "-m", "tproxy", *args, check=check, timeout=60)


@contextmanager
def proxy(topo: Topology, *run_args: str, ports: str = DIVERTED) -> Iterator[Any]:
    """``tproxy run`` in the gateway, then the routing; removed in reverse order."""
    gw = topo.gateway
    proc = gw.popen(sys.executable, "-m", "tproxy", "run", *run_args, log_name="tproxy")
    try:
        gw.wait_port(9091, "127.0.0.1", proc=proc)
        tproxy(gw, "setup", topo.gw_in, topo.gw_out, "--port", ports)
        try:
            yield proc
        finally:
            tproxy(gw, "teardown")
    finally:
        if proc.poll() is None:
            gw.stop(proc)


def client_json(topo: Topology, *args: str | int, timeout: float = 120) -> dict:
    out = topo.client.python(CLIENT, *map(str, args), timeout=timeout).stdout
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.parametrize("family", [4, 6])
def test_server_sees_the_clients_own_address_and_port(topology: Topology, family: int) -> None:
    server_ip = topology.server_ip4 if family == 4 else topology.server_ip6
    echo_server(topology.server, "::" if family == 6 else "0.0.0.0", ECHO_PORT)
    with proxy(topology) as proc:
        result = client_json(topology, "peer", server_ip, ECHO_PORT)
        log = topology.gateway.read_log(proc)
    assert result["peer"] == result["local"], "the server saw another address than the client's"
    client_ip = topology.client_ip4 if family == 4 else topology.client_ip6
    assert result["local"][0] == client_ip
    assert "mode=transparent" in log and "reason=eof" in log, log


def test_replace_rewrites_a_real_http_response(topology: Topology, tmp_path: Path) -> None:
    (tmp_path / "index.html").write_text("hello world, from the server\n")
    http_server(topology.server, topology.server_ip4, HTTP_PORT, tmp_path)
    args = ["-i", "replace", "-o", "old=world", "-o", "new=WORLD", "-o", "direction=server"]
    with proxy(topology, *args):
        page = curl(topology.client, url(topology.server_ip4, HTTP_PORT, "/index.html")).stdout
    assert page == "hello WORLD, from the server\n"
    server_log = topology.server.read_log()
    assert topology.client_ip4 in server_log


def syn_retransmissions(ns: Namespace) -> int:
    """The namespace's count of SYNs its sockets sent again (its own, nobody else's)."""
    out = ns.run("nstat", "-az", "TcpExtTCPSynRetrans").stdout
    return int(out.split("TcpExtTCPSynRetrans")[1].split()[0])


@pytest.mark.parametrize("family", [4, 6])
def test_a_client_reusing_a_port_in_time_wait_connects_at_the_first_syn(
    topology: Topology, tmp_path: Path, family: int
) -> None:
    # HTTP/1.0: the server closes first, so the proxy closes its accepted
    # socket first and that socket waits in TIME_WAIT on the gateway for 60 s.
    # A client that reuses its port meanwhile must reach the proxy with its
    # first SYN; the socket match used to divert that SYN to the TIME_WAIT
    # socket, which answered with a stray ACK and cost a SYN retransmission.
    (tmp_path / "index.html").write_text("hello\n")
    server_ip = topology.server_ip4 if family == 4 else topology.server_ip6
    http_server(topology.server, "::" if family == 6 else "0.0.0.0", HTTP_PORT, tmp_path)
    with proxy(topology, "-q"):
        first = client_json(topology, "http10", server_ip, HTTP_PORT, "--timeout", 10)
        port = first["local"][1]
        waiting = topology.gateway.run(
            "ss", "-tanH", "state", "time-wait", f"( sport = :{HTTP_PORT} and dport = :{port} )"
        ).stdout
        assert waiting.strip(), "no TIME_WAIT socket on the gateway: the test proves nothing"
        before = syn_retransmissions(topology.client)
        again = client_json(
            topology, "http10", server_ip, HTTP_PORT, "--source-port", port, "--timeout", 10
        )
        after = syn_retransmissions(topology.client)
    assert first["status"].startswith("HTTP/1.0 200") and again["status"] == first["status"]
    assert again["local"][1] == port
    assert after == before, f"{after - before} SYN retransmission(s) to reach the proxy"


@pytest.mark.slow
def test_one_gib_each_way_arrives_unchanged(topology: Topology) -> None:
    echo_server(topology.server, "0.0.0.0", ECHO_PORT)
    size = 1 << 30
    with proxy(topology) as proc:
        result = client_json(topology, "bulk", topology.server_ip4, ECHO_PORT, "--size", size)
        log = topology.gateway.read_log(proc)
    assert result["errors"] == []
    assert result["received"] == size
    assert result["received_sha256"] == result["sent_sha256"]
    assert f"up={size} " in log, log[-2000:]


# With no interceptor the relay may take its zero-copy path; with one that
# never matches it takes the copy path. Both must keep half-close.
COPY_PATH = ["-i", "replace", "-o", "old=NEVER-IN-THE-DATA", "-o", "new=x"]


@pytest.mark.parametrize("run_args", [[], COPY_PATH], ids=["passthrough", "copy"])
def test_half_close_client_still_gets_the_whole_reply(
    topology: Topology, run_args: list[str]
) -> None:
    echo_server(topology.server, "0.0.0.0", ECHO_PORT)
    with proxy(topology, *run_args):
        result = client_json(
            topology, "halfclose", topology.server_ip4, ECHO_PORT, "--size", 3_000_000
        )
    assert result["echo_ok"], result
    assert result["peer_line"] == f"PEER {topology.client_ip4} " + result["peer_line"].split()[-1]


def test_refused_upstream_resets_the_client_at_once(topology: Topology) -> None:
    # Port 7001 is diverted but nothing listens on the server: the proxy's
    # connect is refused and the client must see a reset, not a hang.
    with proxy(topology) as proc:
        result = client_json(
            topology, "expect-reset", topology.server_ip4, 7001, "--timeout", "1.0"
        )
        log = topology.gateway.read_log(proc)
    assert result["outcome"] == "reset", result
    assert "reason=connect-failed" in log and "refused" in log, log


def test_five_hundred_concurrent_flows_all_complete(topology: Topology) -> None:
    echo_server(topology.server, "0.0.0.0", ECHO_PORT)
    with proxy(topology, "-q") as proc:
        result = client_json(topology, "many", topology.server_ip4, ECHO_PORT, "--count", 500)
        assert proc.poll() is None
    assert result == {"ok": 500, "failures": [], "failed": 0}


def test_an_interceptor_that_raises_ends_only_its_own_flow(
    topology: Topology, tmp_path: Path
) -> None:
    plugin = tmp_path / "picky.py"
    plugin.write_text(
        "from tproxy import Interceptor\n"
        "class Picky(Interceptor):\n"
        "    def client_data(self, data):\n"
        "        if b'bad' in data:\n"
        "            raise ValueError('I do not like this')\n"
        "        return data\n"
    )
    echo_server(topology.server, "0.0.0.0", ECHO_PORT)
    with proxy(topology, "-i", f"{plugin}:Picky") as proc:
        code = (
            "import socket,sys\n"
            "a=socket.create_connection((sys.argv[1],7000),timeout=5); a.recv(100)\n"
            "b=socket.create_connection((sys.argv[1],7000),timeout=5); b.recv(100)\n"
            "a.sendall(b'bad'); \n"
            "try:\n    r=a.recv(100); print('a', 'eof' if not r else r)\n"
            "except ConnectionResetError: print('a reset')\n"
            "b.sendall(b'good'); print('b', b.recv(100).decode())\n"
        )
        out = topology.client.python("-c", code, topology.server_ip4).stdout
        log = topology.gateway.read_log(proc)
        assert proc.poll() is None, "the server died with one flow"
    assert "a reset" in out and "b good" in out, out
    assert "ValueError: I do not like this" in log and "reason=error" in log, log


def test_sigterm_resets_long_flows_when_the_grace_period_ends(topology: Topology) -> None:
    echo_server(topology.server, "0.0.0.0", ECHO_PORT)
    with proxy(topology, "--grace", "1") as proc:
        client = topology.client.popen(
            sys.executable, CLIENT, "stream", topology.server_ip4, ECHO_PORT, "--seconds", "20",
            log_name="stream",
        )  # fmt: skip
        _wait_for(lambda: "STREAMING" in topology.client.read_log(client), 10)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=15)
        client.wait(timeout=15)
        client_out = topology.client.read_log(client)
        log = topology.gateway.read_log(proc)
    assert code == 0, log
    outcome = json.loads(client_out.strip().splitlines()[-1])["outcome"]
    assert outcome in ("reset", "broken-pipe"), client_out
    assert "reason=shutdown" in log, log
    established = topology.server.run("ss", "-tnH", "state", "established").stdout
    assert f":{ECHO_PORT}" not in established


def _wait_for(predicate: Any, timeout: float) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.05)

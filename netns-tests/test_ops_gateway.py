"""Operating ``tproxy run --workers 2`` on a real TPROXY gateway (issue 14's done-when).

1,000 flows through two workers; one scrape of the supervisor's ``/metrics``
counts every flow exactly (the test's own three flows included); every line
the proxy logs is JSON (``jq`` parses it); ``tproxy flows`` lists a held-open
flow with its client and destination; SIGHUP with an edited interceptor file
changes new flows and not the live one; a broken edit keeps the old code.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from nsharness import Topology, echo_server

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CLIENT = HERE / "flowclient.py"
ECHO_PORT = 7000
METRICS = "127.0.0.1:9100"

V1 = """
from tproxy import Interceptor

class Mark(Interceptor):
    def server_data(self, data):
        return data.replace(b"abc", b"ABC")
"""
V2 = V1.replace('b"ABC"', 'b"v2!"')

pytestmark = pytest.mark.timeout(600)


def _wait(
    predicate: Callable[[], Any],
    timeout: float,
    what: str,
    proc: subprocess.Popen[Any],
    topo: Topology,
) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(
                f"{what}: not reached (proxy exit {proc.poll()})\n{topo.gateway.read_log(proc)}"
            )
        time.sleep(0.1)


def _scrape(topo: Topology) -> dict[str, float]:
    text = topo.gateway.run("curl", "-sf", f"http://{METRICS}/metrics").stdout
    found = {}
    for line in text.splitlines():
        m = re.match(r"^(tproxy_flows(?:_opened)?_total)(\{[^}]*\})\s+(\S+)$", line)
        if m:
            found[m.group(1) + m.group(2)] = float(m.group(3))
    return found


def _total(scrape: dict[str, float], name: str) -> float:
    return sum(v for k, v in scrape.items() if k.startswith(name + "{"))


def _exchange(sock: socket.socket, data: bytes) -> bytes:
    sock.sendall(data)
    got = b""
    while len(got) < len(data):
        chunk = sock.recv(4096)
        if not chunk:
            break
        got += chunk
    return got


def _connect(topo: Topology) -> socket.socket:
    sock = topo.client.socket()
    sock.settimeout(15)
    sock.connect((topo.server_ip4, ECHO_PORT))
    line = b""
    while not line.endswith(b"\n"):
        line += sock.recv(1)
    return sock


def test_workers_metrics_json_log_flows_and_reload(topology: Topology, tmp_path: Path) -> None:
    topo = topology
    echo_server(topo.server, "0.0.0.0", ECHO_PORT)
    module = tmp_path / "mark.py"
    module.write_text(V1)
    gw = topo.gateway
    proc = gw.popen(
        sys.executable, "-m", "tproxy", "run", "--workers", "2", "--grace", "1",
        "--mode", "transparent@127.0.0.1:9091",
        "--setup", topo.gw_in, topo.gw_out, "--port", str(ECHO_PORT), "--ipv4",
        "--metrics", METRICS, "--log-format", "json", "-i", f"{module}:Mark",
        log_name="tproxy", cwd=ROOT,
    )  # fmt: skip
    try:
        _wait(lambda: "workers listening" in gw.read_log(proc), 30, "listening", proc, topo)
        _wait(
            lambda: "TPROXY" in gw.run("iptables-legacy-save", "-t", "mangle").stdout,
            30,
            "routing",
            proc,
            topo,
        )

        # 1,000 flows, 250 at a time
        for _ in range(4):
            out = topo.client.python(
                CLIENT, "many", topo.server_ip4, ECHO_PORT, "--count", 250, timeout=180
            ).stdout
            result = json.loads(out.strip().splitlines()[-1])
            assert result == {"ok": 250, "failures": [], "failed": 0}, result
        scrape = _wait(
            lambda: (s := _scrape(topo)) and _total(s, "tproxy_flows_total") == 1000 and s,
            30,
            "1000 ended flows in one scrape",
            proc,
            topo,
        )
        assert _total(scrape, "tproxy_flows_opened_total") == 1000
        assert (
            scrape['tproxy_flows_total{listener="transparent",mode="transparent",reason="eof"}']
            == 1000
        )

        # a held-open flow is listed, with its client and destination
        held = _connect(topo)
        assert _exchange(held, b"abc") == b"ABC"
        listed = json.loads(
            gw.run(
                sys.executable, "-m", "tproxy", "flows", "--json", "--pid", proc.pid, cwd=ROOT
            ).stdout
        )
        mine = [f for f in listed if f["client"] == f"{topo.client_ip4}:{held.getsockname()[1]}"]
        assert len(mine) == 1, listed
        assert mine[0]["destination"] == f"{topo.server_ip4}:{ECHO_PORT}"
        assert mine[0]["worker"] in ("w0", "w1") and mine[0]["interceptors"] == [f"{module}:Mark"]
        table = gw.run(sys.executable, "-m", "tproxy", "flows", "--pid", proc.pid, cwd=ROOT).stdout
        assert f"{topo.server_ip4}:{ECHO_PORT}" in table

        # SIGHUP with an edited file: new flows change, the live one does not
        module.write_text(V2)
        proc.send_signal(signal.SIGHUP)
        _wait(
            lambda: gw.read_log(proc).count("reloaded: interceptors for new flows") == 2,
            30,
            "both workers reloaded",
            proc,
            topo,
        )
        fresh = _connect(topo)
        assert _exchange(fresh, b"abc") == b"v2!"
        fresh.close()
        assert _exchange(held, b"abc") == b"ABC"

        # a broken edit keeps the old one working
        module.write_text("def broken(:\n")
        proc.send_signal(signal.SIGHUP)
        _wait(
            lambda: gw.read_log(proc).count("reload failed, keeping") == 2,
            30,
            "both workers refused the broken reload",
            proc,
            topo,
        )
        again = _connect(topo)
        assert _exchange(again, b"abc") == b"v2!"
        again.close()
        assert _exchange(held, b"abc") == b"ABC"
        held.close()

        # exactly the 1,000 plus the test's own three flows
        scrape = _wait(
            lambda: (s := _scrape(topo)) and _total(s, "tproxy_flows_total") == 1003 and s,
            30,
            "1003 ended flows",
            proc,
            topo,
        )
        assert _total(scrape, "tproxy_flows_opened_total") == 1003

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, gw.read_log(proc)
        assert "TPROXY" not in gw.run("iptables-legacy-save", "-t", "mangle").stdout
    finally:
        if proc.poll() is None:
            gw.stop(proc, timeout=30)
        gw.run(sys.executable, "-m", "tproxy", "teardown", "--all", check=False, cwd=ROOT)

    log = gw.read_log(proc)
    lines = [line for line in log.splitlines() if line.strip()]
    done = subprocess.run(["jq", "-c", "."], input=log, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    ends = [r for r in records if r.get("event") == "flow_end"]
    assert len(ends) == 1003
    assert {r["worker"] for r in ends} == {"w0", "w1"}
    assert all(r["destination"] == f"{topo.server_ip4}:{ECHO_PORT}" for r in ends)
    assert not any("Traceback" in r.get("exception", "") for r in records)


@pytest.mark.parametrize("workers", [1, 2])
def test_sighup_then_sigquit_keep_then_remove_the_routing(topology: Topology, workers: int) -> None:
    """Issue 18 item 7: SIGHUP used to kill ``run --setup`` (exit 129) leaving its rules."""
    topo = topology
    echo_server(topo.server, "0.0.0.0", ECHO_PORT)
    gw = topo.gateway
    proc = gw.popen(
        sys.executable, "-m", "tproxy", "run", "--workers", str(workers), "--grace", "1",
        "--mode", "transparent@127.0.0.1:9091",
        "--setup", topo.gw_in, topo.gw_out, "--port", str(ECHO_PORT), "--ipv4",
        log_name="tproxy", cwd=ROOT,
    )  # fmt: skip

    def installed() -> bool:
        return "TPROXY" in gw.run("iptables-legacy-save", "-t", "mangle").stdout

    try:
        _wait(installed, 30, "routing", proc, topo)
        proc.send_signal(signal.SIGHUP)
        _wait(
            lambda: "SIGHUP" in gw.read_log(proc) or "reload" in gw.read_log(proc),
            30,
            "the SIGHUP logged",
            proc,
            topo,
        )
        time.sleep(0.5)
        assert proc.poll() is None, gw.read_log(proc)
        assert installed()
        flow = _connect(topo)  # still served
        assert _exchange(flow, b"abc") == b"abc"
        flow.close()
        proc.send_signal(signal.SIGQUIT)
        assert proc.wait(timeout=60) == 0, gw.read_log(proc)
        assert not installed(), "the routing is removed by the ordered shutdown"
        assert "received SIGQUIT" in gw.read_log(proc)
    finally:
        if proc.poll() is None:
            gw.stop(proc, timeout=30)
        gw.run(sys.executable, "-m", "tproxy", "teardown", "--all", check=False, cwd=ROOT)

"""``tproxy run --workers N`` through a real TPROXY gateway.

The supervisor starts N workers that share the transparent listener with
SO_REUSEPORT, installs ``--setup`` routing once they all listen and removes
it after they stopped; it restarts a worker killed under it, forwards
SIGTERM, and exits 0. Flow ids of different workers never collide.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from nsharness import Topology, echo_server

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CLIENT = HERE / "flowclient.py"
ECHO_PORT = 7000


def _has_workers() -> bool:
    out = subprocess.run(
        [sys.executable, "-m", "tproxy", "run", "--help"],
        capture_output=True, text=True, cwd=ROOT, timeout=60,
    ).stdout  # fmt: skip
    return "--workers" in out


pytestmark = pytest.mark.skipif(not _has_workers(), reason="tproxy run has no --workers yet")


@contextmanager
def supervisor(topo: Topology, *extra: str, workers: int = 2) -> Iterator[subprocess.Popen[Any]]:
    """``tproxy run --workers N --setup ...`` in the gateway; stopped (and checked) at exit."""
    gw = topo.gateway
    proc = gw.popen(
        sys.executable, "-m", "tproxy", "run", "--workers", str(workers), "--grace", "1",
        "--mode", "transparent@127.0.0.1:9091",
        "--setup", topo.gw_in, topo.gw_out, "--port", str(ECHO_PORT), "--ipv4", *extra,
        log_name="tproxy", cwd=ROOT,
    )  # fmt: skip
    try:
        _wait_for(lambda: "workers listening" in gw.read_log(proc), 30, proc, topo)
        _wait_for(lambda: _routing_installed(topo), 30, proc, topo)
        yield proc
    finally:
        if proc.poll() is None:
            gw.stop(proc, timeout=30)
        # whatever happened, leave no rules behind in this gateway
        gw.run(sys.executable, "-m", "tproxy", "teardown", "--all", check=False, cwd=ROOT)


def _routing_installed(topo: Topology) -> bool:
    out = topo.gateway.run("iptables-legacy-save", "-t", "mangle", check=False).stdout
    return "TPROXY" in out


def _listener_pids(topo: Topology) -> set[int]:
    out = topo.gateway.run("ss", "-ltnpH", "sport = :9091").stdout
    return {int(pid) for pid in re.findall(r"pid=(\d+)", out)}


def _worker_pids(log: str) -> dict[int, int]:
    """The latest pid of each worker index, from the supervisor's log."""
    pids: dict[int, int] = {}
    for index, pid in re.findall(r"worker (\d+) started \(pid (\d+)\)", log):
        pids[int(index)] = int(pid)
    return pids


def _many(topo: Topology, count: int) -> dict[str, Any]:
    out = topo.client.python(
        CLIENT, "many", topo.server_ip4, ECHO_PORT, "--count", count, timeout=120
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def _flow_ids(log: str) -> dict[str, set[int]]:
    ids: dict[str, set[int]] = {}
    for worker, flow in re.findall(r"\b(w\d+) flow (\d+) open\b", log):
        ids.setdefault(worker, set()).add(int(flow))
    return ids


def _wait_for(
    predicate: Callable[[], bool],
    timeout: float,
    proc: subprocess.Popen[Any] | None = None,
    topo: Topology | None = None,
) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            logs = topo.gateway.read_log(proc) if topo else ""
            raise AssertionError(f"the supervisor exited {proc.returncode}\n{logs}")
        if time.monotonic() > deadline:
            logs = topo.gateway.read_log(proc) if topo and proc else ""
            raise AssertionError(f"condition not reached in {timeout}s\n{logs}")
        time.sleep(0.05)


def test_workers_share_the_listener_serve_flows_and_stop_in_order(topology: Topology) -> None:
    echo_server(topology.server, "0.0.0.0", ECHO_PORT)
    gw = topology.gateway
    with supervisor(topology) as proc:
        pids = _worker_pids(gw.read_log(proc))
        assert set(pids) == {0, 1}
        assert _listener_pids(topology) == set(pids.values())
        result = _many(topology, 300)
        assert result == {"ok": 300, "failures": [], "failed": 0}, result
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
        log = gw.read_log(proc)
        assert code == 0, log
        # the workers are gone and, after them, the routing
        assert not _listener_pids(topology)
        assert not _routing_installed(topology), log
    ids = _flow_ids(log)
    assert set(ids) == {"w0", "w1"}, log  # the kernel spread 300 flows over both
    assert not ids["w0"] & ids["w1"]
    assert all(i % 2 == 1 for i in ids["w0"]) and all(i % 2 == 0 for i in ids["w1"])
    assert sum(len(v) for v in ids.values()) == 300
    assert "300 flow(s) in all" in log, log


def test_a_worker_killed_is_restarted_and_flows_go_on(topology: Topology) -> None:
    echo_server(topology.server, "0.0.0.0", ECHO_PORT)
    gw = topology.gateway
    with supervisor(topology) as proc:
        before = _worker_pids(gw.read_log(proc))
        os.kill(before[1], signal.SIGKILL)
        _wait_for(lambda: _worker_pids(gw.read_log(proc))[1] != before[1], 30, proc, topology)
        after = _worker_pids(gw.read_log(proc))
        _wait_for(lambda: _listener_pids(topology) == set(after.values()), 30, proc, topology)
        assert after[0] == before[0]
        assert "worker 1" in gw.read_log(proc) and "restarting" in gw.read_log(proc)
        result = _many(topology, 100)
        assert result == {"ok": 100, "failures": [], "failed": 0}, result
        assert _routing_installed(topology)  # a restart does not touch the routing
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, gw.read_log(proc)
    # the restarted worker numbers its flows in a fresh range: no id seen twice
    ids = _flow_ids(gw.read_log(proc))
    assert not ids.get("w0", set()) & ids.get("w1", set())


def test_a_worker_that_cannot_listen_fails_the_command_without_routing(
    topology: Topology,
) -> None:
    gw = topology.gateway
    with gw.enter():
        squatter = socket.socket()
    try:
        squatter.bind(("127.0.0.1", 9091))  # no SO_REUSEPORT: the workers cannot join
        squatter.listen()
        result = gw.run(
            sys.executable, "-m", "tproxy", "run", "--workers", "2",
            "--mode", "transparent@127.0.0.1:9091",
            "--setup", topology.gw_in, topology.gw_out, "--port", str(ECHO_PORT), "--ipv4",
            check=False, timeout=60, cwd=ROOT,
        )  # fmt: skip
    finally:
        squatter.close()
    assert result.returncode != 0
    assert "cannot listen" in result.stderr, result.stderr
    assert not _routing_installed(topology)


def test_workers_outlive_the_thread_that_started_them(topology: Topology) -> None:
    """trio starts processes from a worker thread and retires it after 10 s idle: a
    worker tied to that thread (PR_SET_PDEATHSIG) would be stopped then. Not a timing
    assertion: the wait only lets that moment pass."""
    gw = topology.gateway
    with supervisor(topology) as proc:
        before = _worker_pids(gw.read_log(proc))
        time.sleep(12)
        log = gw.read_log(proc)
        assert _worker_pids(log) == before, log
        assert "died" not in log and "restarting" not in log, log
        assert _listener_pids(topology) == set(before.values())


def test_workers_end_with_a_killed_supervisor(topology: Topology) -> None:
    gw = topology.gateway
    with supervisor(topology) as proc:
        pids = _worker_pids(gw.read_log(proc))
        proc.kill()
        proc.wait(timeout=10)

        def gone() -> bool:
            return all(not Path(f"/proc/{pid}").exists() for pid in pids.values())

        _wait_for(gone, 30)
        assert not _listener_pids(topology)

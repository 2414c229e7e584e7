"""``--local``: the gateway's own connections are intercepted too, for both backends.

A ``curl`` run *on the gateway* (in the gateway namespace) to the server's
port is diverted to ``tproxy run --setup --local -i replace`` and comes back
rewritten; the server logs exactly one request (one connection: HTTP/1.0)
per curl, so the proxy's own upstream connection was not captured again; a
curl run as an excluded uid goes straight to the server, unrewritten; and
when the proxy stops, every ruleset is byte-identical to before.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from nsharness import Namespace, Topology, curl, http_server, url
from test_routing import IN, OUT, gw1, snapshot, state_dir_of, tproxy  # noqa: F401

PORT = 8080
NOBODY = 65534


def ruleset(ns: Namespace) -> dict[str, str]:
    """The snapshot with legacy chain counters zeroed: traffic moves them, not rules."""
    return {k: re.sub(r"\[\d+:\d+\]", "[0:0]", v) for k, v in snapshot(ns).items()}


def requests_logged(topo: Topology, proc: object) -> int:
    return topo.server.read_log(proc).count('"GET /index.html')  # type: ignore[arg-type]


@pytest.mark.parametrize("backend", ["iptables", "nft"])
def test_local_curl_is_intercepted_once_and_excluded_uid_is_not(
    topology: Topology, tmp_path: Path, backend: str
) -> None:
    topo = topology
    gateway = topo.gateway
    (tmp_path / "index.html").write_text("hello world, from the server\n")
    tmp_path.chmod(0o755)
    server = http_server(topo.server, "::", PORT, tmp_path)
    for tool in ("iptables-legacy", "ip6tables-legacy"):
        gateway.run(tool, "-t", "mangle", "-S")  # instantiated, as on any gateway
    before = ruleset(gateway)
    proc = gateway.popen(
        sys.executable,
        "-m",
        "tproxy",
        "run",
        "-v",
        "--setup",
        topo.gw_in,
        topo.gw_out,
        "--port",
        str(PORT),
        "--local",
        "--exclude-uid",
        str(NOBODY),
        "--backend",
        backend,
        "-i",
        "replace",
        "-o",
        "old=world",
        "-o",
        "new=WORLD",
        "-o",
        "direction=server",
        log_name="tproxy-run",
    )
    try:
        gateway.wait_log(proc, "routing installed", timeout=60)
        log = gateway.read_log(proc)
        assert f"routing installed ({backend} backend" in log, log
        assert "outgoing source is this host's own address" in log, log
        expected = 0
        for server_ip in (topo.server_ip4, topo.server_ip6, topo.server_ip4):
            page = curl(gateway, url(server_ip, PORT, "/index.html")).stdout
            assert page == "hello WORLD, from the server\n", gateway.read_log(proc)
            expected += 1
            assert requests_logged(topo, server) == expected  # one connection, no loop
        server_log = topo.server.read_log(server)
        assert topo.gw_out_ip4 in server_log and topo.gw_out_ip6 in server_log
        flows = gateway.read_log(proc).count("mode=transparent")
        assert flows >= 3, gateway.read_log(proc)

        # the excluded user goes straight to the server: not rewritten, not a flow
        direct = gateway.run(
            "setpriv",
            f"--reuid={NOBODY}",
            f"--regid={NOBODY}",
            "--clear-groups",
            "curl",
            "-sS",
            "--fail",
            "--max-time",
            "20",
            url(topo.server_ip4, PORT, "/index.html"),
            timeout=30,
        )
        assert direct.stdout == "hello world, from the server\n"
        assert requests_logged(topo, server) == expected + 1
        assert gateway.read_log(proc).count("mode=transparent") == flows
        assert tproxy(gateway, "status").returncode == 0
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        shutil.rmtree(state_dir_of(gateway), ignore_errors=True)
    assert ruleset(gateway) == before, gateway.read_log(proc)


def cgroup2_mount() -> Path | None:
    """Where this (the test's) mount namespace has the cgroup v2 hierarchy, or None."""
    for line in Path("/proc/self/mounts").read_text().splitlines():
        fields = line.split()
        if len(fields) > 2 and fields[2] == "cgroup2":
            return Path(fields[1])
    return None


@contextlib.contextmanager
def cgroups(*relative: str) -> Iterator[Path]:
    """A unique cgroup v2 subtree with ``relative`` children; removed afterwards, children first."""
    mount = cgroup2_mount()
    if mount is None:
        pytest.skip("no cgroup2 hierarchy mounted")
    base = mount / f"tpx-test-{os.getpid()}-{time.monotonic_ns()}"
    made: list[Path] = []
    try:
        for path in ("", *relative):
            (base / path).mkdir()
            made.append(base / path)
        yield base
    finally:
        for path in reversed(made):
            with contextlib.suppress(OSError):
                path.rmdir()


def host_mounts(*argv: str) -> list[str]:
    """``argv`` with this process's mount namespace: ``ip netns exec`` hides cgroupfs under /sys."""
    return ["nsenter", f"--mount=/proc/{os.getpid()}/ns/mnt", "--", *argv]


def curl_in_cgroup(ns: Namespace, cgroup: Path, target: str) -> str:
    """The page a curl run on ``ns`` from inside ``cgroup`` gets (moved there before exec)."""
    script = f'echo $$ > "{cgroup}/cgroup.procs" && exec curl -sS --fail --max-time 20 "$1"'
    return ns.run(*host_mounts("sh", "-c", script, "sh", target), timeout=30).stdout


@pytest.mark.parametrize("backend", ["iptables", "nft"])
def test_local_curl_in_an_excluded_cgroup_is_not_intercepted(
    topology: Topology, tmp_path: Path, backend: str
) -> None:
    """``--exclude-cgroup``: a cgroup's processes and its children's go straight out.

    The excluded cgroup is two levels deep (nft matches the ancestor at that
    level); curl runs in a child of it (not intercepted) and in a sibling
    (intercepted and rewritten).
    """
    topo = topology
    gateway = topo.gateway
    (tmp_path / "index.html").write_text("hello world, from the server\n")
    tmp_path.chmod(0o755)
    server = http_server(topo.server, "::", PORT, tmp_path)
    for tool in ("iptables-legacy", "ip6tables-legacy"):
        gateway.run(tool, "-t", "mangle", "-S")
    before = ruleset(gateway)
    with cgroups("excluded", "excluded/child", "other") as base:
        mount = cgroup2_mount()
        assert mount is not None
        # the cgroup's directory, or its path as /proc/PID/cgroup shows it
        excluded = (
            str(base / "excluded")
            if backend == "iptables"
            else f"/{base.relative_to(mount)}/excluded"
        )
        proc = gateway.popen(
            *host_mounts(sys.executable, "-m", "tproxy", "run", "-v", "--setup"),
            topo.gw_in,
            topo.gw_out,
            "--port",
            str(PORT),
            "--local",
            "--exclude-cgroup",
            excluded,
            "--backend",
            backend,
            "-i",
            "replace",
            "-o",
            "old=world",
            "-o",
            "new=WORLD",
            "-o",
            "direction=server",
            log_name="tproxy-run",
        )
        try:
            gateway.wait_log(proc, "routing installed", timeout=60)
            target = url(topo.server_ip4, PORT, "/index.html")
            other = curl_in_cgroup(gateway, base / "other", target)
            assert other == "hello WORLD, from the server\n", gateway.read_log(proc)
            assert requests_logged(topo, server) == 1
            flows = gateway.read_log(proc).count("mode=transparent")
            assert flows >= 1
            for cgroup in (base / "excluded", base / "excluded" / "child"):
                direct = curl_in_cgroup(gateway, cgroup, target)
                assert direct == "hello world, from the server\n", gateway.read_log(proc)
            target6 = url(topo.server_ip6, PORT, "/index.html")
            assert curl_in_cgroup(gateway, base / "excluded/child", target6) == (
                "hello world, from the server\n"
            )
            assert curl_in_cgroup(gateway, base / "other", target6) == (
                "hello WORLD, from the server\n"
            )
            assert requests_logged(topo, server) == 5  # one connection each
            assert gateway.read_log(proc).count("mode=transparent") == flows + 1
            assert tproxy(gateway, "status").returncode == 0
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
            shutil.rmtree(state_dir_of(gateway), ignore_errors=True)
    assert ruleset(gateway) == before, gateway.read_log(proc)


def test_a_missing_cgroup_is_one_line_and_exit_2(gw1: Namespace) -> None:  # noqa: F811
    """A cgroup that does not exist, or no cgroup2 to find it in: exit 2, nothing installed."""
    before = snapshot(gw1)
    setup = ["-m", "tproxy", "setup", IN, OUT, "-p", "80", "--local"]
    missing = f"tpx-test-missing-{os.getpid()}"
    for backend in ("iptables", "nft"):
        argv = [*setup, "--backend", backend, "--exclude-cgroup", missing]
        result = gw1.run(*host_mounts(sys.executable, *argv), check=False)
        assert result.returncode == 2, result.stderr
        assert result.stderr.count("\n") == 1
        assert f"--exclude-cgroup {missing}: no such cgroup (no directory " in result.stderr
    # under ip netns exec there is no cgroupfs: nft cannot look the cgroup up
    hidden = gw1.python(*setup, "--backend", "nft", "--exclude-cgroup", missing, check=False)
    assert hidden.returncode == 2 and "no cgroup2 file system is mounted here" in hidden.stderr
    # python-iptables leaves the lookup to the kernel, which refuses: rolled back
    kernel = gw1.python(*setup, "--backend", "iptables", "--exclude-cgroup", missing, check=False)
    assert kernel.returncode == 1 and "rolled back" in kernel.stderr, kernel.stderr
    assert "is there such a cgroup?" in kernel.stderr
    assert snapshot(gw1) == before

"""``--local``: the gateway's own connections are intercepted too, for both backends.

A ``curl`` run *on the gateway* (in the gateway namespace) to the server's
port is diverted to ``tproxy run --setup --local -i replace`` and comes back
rewritten; the server logs exactly one request (one connection: HTTP/1.0)
per curl, so the proxy's own upstream connection was not captured again; a
curl run as an excluded uid goes straight to the server, unrewritten; and
when the proxy stops, every ruleset is byte-identical to before.
"""

from __future__ import annotations

import re
import shutil
import signal
import sys
from pathlib import Path

import pytest
from nsharness import Namespace, Topology, curl, http_server, url
from test_routing import snapshot, state_dir_of, tproxy

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

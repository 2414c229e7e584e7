"""Explicit proxies on a gateway's real addresses: client -- gateway (tproxy) -- server.

The proxy listens on the gateway's client-side addresses (IPv4 and IPv6)
with a client allow list; curl in the client namespace goes through SOCKS5,
HTTP and forward to python's HTTP server in the server namespace, by name
(a hosts file in the gateway) and by address. The server sees the gateway,
not the client (explicit modes do not spoof). A peer outside the allow list
is reset at once, and without an allow list the proxy refuses to start.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from nsharness import Topology, curl, http_server, write_hosts

SOCKS_PORT = 1080
HTTP_PORT = 8080
FORWARD_PORT = 9000
WEB_PORT = 80
PAGE = "explicit through the gateway\n"


@pytest.fixture
def gateway_proxy(topology: Topology, tmp_path: Path) -> Iterator[subprocess.Popen[Any]]:
    """A web server behind the gateway and ``tproxy run`` with three explicit listeners."""
    (tmp_path / "index.html").write_text(PAGE)
    http_server(topology.server, "::", WEB_PORT, tmp_path)
    gw = topology.gateway
    write_hosts(gw, {"web.test": [topology.server_ip4, topology.server_ip6]})
    proc = gw.popen(
        sys.executable, "-m", "tproxy", "run",
        "--mode", f"socks@{topology.gw_in_ip4}:{SOCKS_PORT}",
        "--mode", f"http@[{topology.gw_in_ip6}]:{HTTP_PORT}",
        "--mode", f"forward:web.test:{WEB_PORT}@{topology.gw_in_ip4}:{FORWARD_PORT}",
        "--allow-client", f"{topology.client_net4},{topology.client_net6}",
        log_name="tproxy",
    )  # fmt: skip
    gw.wait_port(SOCKS_PORT, topology.gw_in_ip4, proc=proc)
    gw.wait_port(HTTP_PORT, topology.gw_in_ip6, proc=proc)
    gw.wait_port(FORWARD_PORT, topology.gw_in_ip4, proc=proc)
    yield proc


def test_clients_reach_the_server_through_every_explicit_mode(
    topology: Topology, gateway_proxy: subprocess.Popen[Any]
) -> None:
    client = topology.client
    socks = f"{topology.gw_in_ip4}:{SOCKS_PORT}"
    pages = [
        curl(client, "http://web.test/", "--socks5-hostname", socks).stdout,
        curl(client, f"http://{topology.server_ip4}/", "--socks4", socks).stdout,
        curl(client, "http://web.test/", "-x", f"http://[{topology.gw_in_ip6}]:{HTTP_PORT}").stdout,
        curl(
            client, "http://web.test/", "-p", "-x", f"http://[{topology.gw_in_ip6}]:{HTTP_PORT}"
        ).stdout,
        curl(client, f"http://{topology.gw_in_ip4}:{FORWARD_PORT}/").stdout,
    ]
    assert pages == [PAGE] * 5
    server_log = topology.server.read_log()
    assert topology.client_ip4 not in server_log and topology.client_ip6 not in server_log
    log = topology.gateway.wait_log(gateway_proxy, "mode=forward")
    assert f"client={topology.client_ip4}:" in log and f"client=[{topology.client_ip6}]:" in log


def test_a_peer_outside_the_allow_list_is_reset(
    topology: Topology, gateway_proxy: subprocess.Popen[Any]
) -> None:
    # The server namespace reaches the gateway's client-side address too.
    result = curl(
        topology.server,
        f"http://{topology.server_ip4}/",
        "--socks5",
        f"{topology.gw_in_ip4}:{SOCKS_PORT}",
        check=False,
    )
    assert result.returncode != 0 and result.stdout == ""
    log = topology.gateway.wait_log(gateway_proxy, "client not in --allow-client")
    assert f"end reason=rejected client={topology.server_ip4}:" in log


def test_a_public_listener_without_an_allow_list_does_not_start(topology: Topology) -> None:
    result = topology.gateway.run(
        sys.executable, "-m", "tproxy", "run",
        "--mode", f"socks@{topology.gw_in_ip4}:{SOCKS_PORT}",
        check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert "--allow-public" in result.stderr and len(result.stderr.splitlines()) == 1

"""TLS interception through a real TPROXY gateway, IPv4 and IPv6.

client -- gateway (``tproxy run --tls intercept`` + ``tproxy setup``) -- server.
The server is ``tests/tls_server.py`` with a certificate from a stand-in
public CA (``--tls-upstream-ca``); it answers with the address it saw. curl
in the client namespace trusts only the interception CA.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from nsharness import Topology, curl

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from tls_helpers import Upstream  # noqa: E402

SERVER = HERE.parent / "tests" / "tls_server.py"
NAME = "shop.example.test"
REPLACE = ["-i", "replace", "-o", "old=world", "-o", "new=WORLD", "-o", "direction=server"]


@contextmanager
def gateway(topo: Topology, tmp_path: Path, *run_args: str) -> Iterator[tuple[Any, Path]]:
    """The interception CA, ``tproxy run --tls intercept ...`` and the routing for port 443."""
    gw = topo.gateway
    ca_dir = tmp_path / "ca"
    gw.run(sys.executable, "-m", "tproxy", "ca", "init", "--dir", str(ca_dir))
    proc = gw.popen(
        sys.executable, "-m", "tproxy", "run", "--tls", "intercept", "--ca-dir", str(ca_dir),
        *run_args, log_name="tproxy",
    )  # fmt: skip
    try:
        gw.wait_port(9091, "127.0.0.1", proc=proc)
        gw.run(sys.executable, "-m", "tproxy", "setup", topo.gw_in, topo.gw_out, "--port", "443")
        try:
            yield proc, ca_dir / "ca.pem"
        finally:
            gw.run(sys.executable, "-m", "tproxy", "teardown")
    finally:
        if proc.poll() is None:
            gw.stop(proc)


def serve(topo: Topology, upstream: Upstream, family: int) -> Any:
    chain = upstream.forge.chain_file((NAME,))
    host = "::" if family == 6 else "0.0.0.0"
    proc = topo.server.popen(
        sys.executable,
        str(SERVER),
        host,
        "443",
        str(chain),
        str(upstream.forge.key_path),
        log_name="tls-server",
    )
    topo.server.wait_port(443, proc=proc)
    return proc


def resolve(topo: Topology, family: int) -> tuple[str, str]:
    ip = topo.server_ip4 if family == 4 else topo.server_ip6
    return ip, f"{NAME}:443:{ip if family == 4 else f'[{ip}]'}"


def leaf_text(topo: Topology, ip: str, cafile: Path) -> str:
    """``openssl s_client -showcerts`` from the client, and its first certificate decoded."""
    shown = topo.client.run(
        "openssl", "s_client", "-showcerts", "-connect", f"[{ip}]:443" if ":" in ip
        else f"{ip}:443", "-servername", NAME, "-CAfile", str(cafile), input="", timeout=20,
    ).stdout  # fmt: skip
    first = re.search(r"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----", shown, re.S)
    assert first is not None, shown
    decoded = subprocess.run(
        ["openssl", "x509", "-noout", "-text"], input=first.group(0), capture_output=True,
        text=True, check=True,
    ).stdout  # fmt: skip
    return shown + "\n" + decoded


@pytest.mark.parametrize("family", [4, 6])
def test_curl_gets_the_page_rewritten_with_a_leaf_for_the_name(
    topology: Topology, tmp_path: Path, family: int
) -> None:
    upstream = Upstream(tmp_path)
    serve(topology, upstream, family)
    ip, resolve_arg = resolve(topology, family)
    with gateway(topology, tmp_path, "--tls-upstream-ca", str(upstream.ca_file), *REPLACE) as (
        proc,
        ca_pem,
    ):
        page = curl(topology.client, f"https://{NAME}/", "--cacert", str(ca_pem),
                    "--resolve", resolve_arg).stdout  # fmt: skip
        shown = leaf_text(topology, ip, ca_pem)
        log = topology.gateway.read_log(proc)
    client_ip = topology.client_ip4 if family == 4 else topology.client_ip6
    assert page.startswith("hello WORLD, from the server\n"), page
    assert f"peer {client_ip}\n" in page  # the server saw the client's own address
    assert shown.count("-----BEGIN CERTIFICATE-----") == 2
    assert "Verify return code: 0 (ok)" in shown
    sans = re.search(r"X509v3 Subject Alternative Name:.*?\n\s*(.*)\n", shown)
    assert sans is not None and sans.group(1).strip() == f"DNS:{NAME}"
    assert re.search(r"Issuer: .*CN = tproxy interception CA", shown)
    assert "mode=transparent" in log, log


def test_tls_ignore_shows_the_servers_own_certificate(topology: Topology, tmp_path: Path) -> None:
    upstream = Upstream(tmp_path)
    serve(topology, upstream, 4)
    ip, resolve_arg = resolve(topology, 4)
    with gateway(topology, tmp_path, "--tls-upstream-ca", str(upstream.ca_file),
                 "--tls-ignore", r"^shop\.", *REPLACE):  # fmt: skip
        page = curl(topology.client, f"https://{NAME}/", "--cacert", str(upstream.ca_file),
                    "--resolve", resolve_arg).stdout  # fmt: skip
        shown = leaf_text(topology, ip, upstream.ca_file)
    assert page.startswith("hello world, from the server\n")  # untouched
    assert f"peer {topology.client_ip4}\n" in page
    assert re.search(r"Issuer: .*CN = test upstream CA", shown)

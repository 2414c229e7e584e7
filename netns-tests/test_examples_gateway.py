"""The examples/ interceptors through a real TPROXY gateway, with real clients.

One ``tproxy run`` on the gateway carries three interceptors, each limited to
its own flows with ``--when``: the HTTP body rewriter on port 80 (curl, three
requests on one keep-alive connection), the Redis key prefixer on port 6379
(redis-cli against redis-server) and the SNI blocker on port 443 (curl https
against ``openssl s_server``). Each protocol is rewritten by its own
interceptor and left alone by the others; an unselected port is relayed as is.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from nsharness import Namespace, Topology, curl, echo_server, url

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
PORTS = "80,443,6379,7000"


def tproxy(ns: Namespace, *args: str) -> Any:
    return ns.run(sys.executable, "-m", "tproxy", *args, timeout=60)


@contextmanager
def proxy(topo: Topology, *run_args: str) -> Iterator[Any]:
    """``tproxy run`` in the gateway, then the routing; removed in reverse order."""
    gw = topo.gateway
    proc = gw.popen(sys.executable, "-m", "tproxy", "run", *run_args, log_name="tproxy")
    try:
        gw.wait_port(9091, "127.0.0.1", proc=proc)
        tproxy(gw, "setup", topo.gw_in, topo.gw_out, "--port", PORTS)
        try:
            yield proc
        finally:
            tproxy(gw, "teardown")
    finally:
        if proc.poll() is None:
            gw.stop(proc)


def http_server_11(ns: Namespace, host: str, port: int, directory: Path) -> Any:
    """python's http.server speaking HTTP/1.1, so that connections are kept alive."""
    proc = ns.popen(
        sys.executable,
        "-u",
        "-m",
        "http.server",
        "--bind",
        host,
        "--directory",
        str(directory),
        "--protocol",
        "HTTP/1.1",
        str(port),
        log_name="http11",
    )
    ns.wait_port(port, host, proc=proc)
    return proc


def redis_server(ns: Namespace, port: int = 6379) -> Any:
    proc = ns.popen(
        "redis-server",
        "--port",
        str(port),
        "--bind",
        "0.0.0.0",
        "--protected-mode",
        "no",
        "--save",
        "",
        "--appendonly",
        "no",
        log_name="redis",
    )
    ns.wait_port(port, proc=proc)
    return proc


def tls_server(ns: Namespace, tmp_path: Path, port: int = 443) -> Any:
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    ns.run(
        "openssl",
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        str(key),
        "-out",
        str(cert),
        "-days",
        "1",
        "-subj",
        "/CN=tls.test",
    )
    proc = ns.popen(
        "openssl",
        "s_server",
        "-accept",
        str(port),
        "-cert",
        str(cert),
        "-key",
        str(key),
        "-www",
        "-quiet",
        log_name="s_server",
    )
    ns.wait_port(port, proc=proc)
    return proc


def redis(ns: Namespace, host: str, *command: str) -> str:
    return ns.run("redis-cli", "-h", host, "--no-raw", *command, timeout=20).stdout.strip()


def test_one_gateway_rewrites_http_and_redis_each_with_its_own_interceptor(
    topology: Topology, tmp_path: Path
) -> None:
    server = topology.server_ip4
    site = tmp_path / "site"
    site.mkdir()
    for name in ("a", "b", "c"):
        (site / name).write_text(f"{name}: hello world\n")
    http_server_11(topology.server, server, 80, site)
    redis_server(topology.server)
    echo_server(topology.server, "0.0.0.0", 7000)
    args = [
        "-i",
        f"{EXAMPLES}/http_body.py:BodyReplace",
        "-o",
        "old=world",
        "-o",
        "new=WORLD!",
        "--when",
        "port=80",
        "-i",
        f"{EXAMPLES}/resp.py:KeyPrefix",
        "-o",
        "prefix=t1:",
        "--when",
        "port=6379",
    ]
    with proxy(topology, *args) as proc:
        urls = [url(server, 80, f"/{name}") for name in ("a", "b", "c")]
        done = curl(
            topology.client,
            urls[0],
            "-w",
            "[%{num_connects}]\n",
            *[part for u in urls[1:] for part in ("-w", "[%{num_connects}]\n", u)],
        )
        assert redis(topology.client, server, "SET", "greeting", "hello world") == "OK"
        through_proxy = redis(topology.client, server, "GET", "greeting")
        echoed = topology.client.run(
            "sh", "-c", f"printf 'hello world\\n' | socat -t5 - TCP:{server}:7000", timeout=20
        ).stdout
        log = topology.gateway.read_log(proc)
    # HTTP: three rewritten bodies, with correct lengths, over one connection.
    assert "a: hello WORLD!\n" in done.stdout and "c: hello WORLD!\n" in done.stdout
    assert done.stdout.count("hello WORLD!") == 3
    assert done.stdout.count("[1]") == 1 and done.stdout.count("[0]") == 2, done.stdout
    # Redis: the key went to the server with its prefix; the value was not touched
    # by the HTTP rewriter (the body rewriter never saw this flow).
    assert through_proxy == '"hello world"'
    direct = topology.server
    assert redis(direct, "127.0.0.1", "GET", "t1:greeting") == '"hello world"'
    assert redis(direct, "127.0.0.1", "EXISTS", "greeting") == "(integer) 0"
    # Port 7000 is selected by no interceptor: relayed untouched.
    assert "hello world\n" in echoed and "WORLD" not in echoed
    assert "reason=error" not in log and "Traceback" not in log, log


def test_sni_block_blocks_by_name_through_curl_https(topology: Topology, tmp_path: Path) -> None:
    server = topology.server_ip4
    tls_server(topology.server, tmp_path)
    args = [
        "-i",
        f"{EXAMPLES}/sni_block.py:SniBlock",
        "-o",
        r"host=(.*\.)?blocked\.test",
        "--when",
        "port=443",
    ]
    with proxy(topology, *args) as proc:
        ok = curl(
            topology.client,
            "https://allowed.test/",
            "-k",
            "--resolve",
            f"allowed.test:443:{server}",
        )
        blocked = curl(
            topology.client,
            "https://www.blocked.test/",
            "-k",
            "--resolve",
            f"www.blocked.test:443:{server}",
            check=False,
        )
        log = topology.gateway.wait_log(proc, "reason=interceptor-abort")
    assert "s_server" in ok.stdout or "Ciphers" in ok.stdout, ok.stdout
    assert blocked.returncode != 0
    assert "sni_block: www.blocked.test" in log, log

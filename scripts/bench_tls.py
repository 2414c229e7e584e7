#!/usr/bin/env python3
"""Benchmark TLS interception: tproxy --tls intercept against mitmproxy, on loopback.

    .venv/bin/python scripts/bench_tls.py [--seconds 8] [--concurrency 4]
                                          [--mitmdump PATH] [--json FILE]

Every run measures, on one machine and in one go:

- the CPU cost of one TLS 1.3 handshake pair (client + server ``SSLObject``
  in memory, P-256 leaf), the unit the others are compared with;
- new TLS connections per second through ``tproxy run --mode forward:...
  --tls intercept -i tproxy.interceptor:Interceptor`` (an interceptor that
  returns every byte unchanged), each connection one HTTP/1.1 request, and
  the proxy's CPU per connection (from /proc, user + system);
- the same connections through the same proxy without ``--tls`` (ciphertext
  relayed through the same interceptor): the difference is the CPU that
  interception adds per connection;
- keep-alive requests per second over a few long TLS connections;
- the same two rates through ``mitmdump --mode reverse:https://...`` (regular
  HTTP proxying, its own CA, upstream verified) when ``--mitmdump`` is given
  or found on PATH.

The server is a small asyncio HTTPS server (P-256 certificate from a test CA)
and the clients are asyncio in another process; neither verifies anything
(the same client cost for every proxy). All on loopback; every process
started here is stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NAME = "bench.example.test"
RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Type: text/plain\r\n\r\nhello"
REQUEST = f"GET / HTTP/1.1\r\nHost: {NAME}\r\n\r\n".encode()


# -- server and client (run as subprocesses of this script) -------------------------------


async def _serve(port: int, chain: str, key: str) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(chain, key)
    ctx.set_alpn_protocols(["http/1.1"])

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                await reader.readuntil(b"\r\n\r\n")
                writer.write(RESPONSE)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError, OSError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", port, ssl=ctx, backlog=1024)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


async def _load(port: int, mode: str, seconds: float, concurrency: int) -> dict[str, float]:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["http/1.1"])
    done = 0
    errors = 0
    stop = time.monotonic() + seconds

    async def one_request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(REQUEST)
        await writer.drain()
        await reader.readuntil(b"\r\n\r\n")
        await reader.readexactly(5)

    async def new_connections() -> None:
        nonlocal done, errors
        while time.monotonic() < stop:
            try:
                reader, writer = await asyncio.open_connection(
                    "127.0.0.1", port, ssl=ctx, server_hostname=NAME
                )
                await one_request(reader, writer)
                writer.close()
                done += 1
            except (OSError, ssl.SSLError, asyncio.IncompleteReadError):
                errors += 1
                await asyncio.sleep(0.01)

    async def keep_alive() -> None:
        nonlocal done, errors
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=ctx, server_hostname=NAME
        )
        while time.monotonic() < stop:
            try:
                await one_request(reader, writer)
                done += 1
            except (OSError, ssl.SSLError, asyncio.IncompleteReadError):
                errors += 1
                return
        writer.close()

    start = time.monotonic()
    body = new_connections if mode == "connect" else keep_alive
    await asyncio.gather(*(body() for _ in range(concurrency)))
    elapsed = time.monotonic() - start
    return {"done": done, "errors": errors, "seconds": elapsed}


# -- measuring ----------------------------------------------------------------------------


def handshake_pair_cost(server_ctx: ssl.SSLContext, rounds: int = 300) -> float:
    """CPU seconds of one TLS 1.3 handshake pair in memory (client and server)."""
    client_ctx = ssl.create_default_context()
    client_ctx.check_hostname = False
    client_ctx.verify_mode = ssl.CERT_NONE

    def pair() -> None:
        c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
        client = client_ctx.wrap_bio(c_in, c_out, server_hostname=NAME)
        server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
        for _ in range(10):
            for obj, out, peer_in in ((client, c_out, s_in), (server, s_out, c_in)):
                try:
                    obj.do_handshake()
                except ssl.SSLWantReadError:
                    pass
                if out.pending:
                    peer_in.write(out.read())
            if client.version() and server.version() and not c_out.pending:
                try:
                    server.do_handshake()
                    client.do_handshake()
                    return
                except ssl.SSLWantReadError:
                    continue
        raise RuntimeError("in-memory handshake did not finish")

    for _ in range(20):
        pair()
    start = time.process_time()
    for _ in range(rounds):
        pair()
    return (time.process_time() - start) / rounds


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process (and its reaped children), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = sum(int(f) for f in fields[11:15])
    return ticks / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listens on {port}")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_load(port: int, mode: str, seconds: float, concurrency: int) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, __file__, "--load", str(port), mode, str(seconds), str(concurrency)],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
        check=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])  # type: ignore[no-any-return]


def measure(
    name: str, argv: list[str], port: int, args: argparse.Namespace, log: Path
) -> dict[str, float]:
    """Start a proxy, then measure its connection rate, CPU per connection, keep-alive rate."""
    with log.open("wb") as log_file:
        proc = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT)
    try:
        wait_port(port, proc)
        run_load(port, "connect", 1.0, 1)  # warm-up: caches, lazy imports
        before = cpu_seconds(proc.pid)
        conn = run_load(port, "connect", args.seconds, args.concurrency)
        cpu = cpu_seconds(proc.pid) - before
        keep = run_load(port, "keepalive", args.seconds, args.concurrency)
    finally:
        stop(proc)
    result = {
        "conn_per_s": conn["done"] / conn["seconds"],
        "conn_errors": conn["errors"],
        "cpu_ms_per_conn": 1000 * cpu / max(conn["done"], 1),
        "keepalive_req_per_s": keep["done"] / keep["seconds"],
        "keepalive_errors": keep["errors"],
    }
    print(
        f"{name:<28} {result['conn_per_s']:8.0f} conn/s  "
        f"{result['cpu_ms_per_conn']:6.2f} ms CPU/conn  "
        f"{result['keepalive_req_per_s']:8.0f} req/s keep-alive"
        + (f"  ({conn['errors']} conn errors)" if conn["errors"] else ""),
        flush=True,
    )
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--mitmdump", default=shutil.which("mitmdump"))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    sys.path.insert(0, str(ROOT))
    from tproxy.tls import ca
    from tproxy.tls.certs import LeafForge

    results: dict[str, object] = {}
    with tempfile.TemporaryDirectory(prefix="bench-tls-") as tmp:
        tmp_path = Path(tmp)
        intercept_ca = ca.create(tmp_path / "ca")
        upstream_ca = ca.create(tmp_path / "upstream-ca", common_name="bench upstream CA")
        forge = LeafForge(upstream_ca)
        chain = forge.chain_file((NAME, "127.0.0.1"))
        server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server_ctx.load_cert_chain(chain, forge.key_path)
        pair = handshake_pair_cost(server_ctx)
        results["handshake_pair_ms"] = 1000 * pair
        print(f"one TLS 1.3 handshake pair in memory: {1000 * pair:.2f} ms CPU", flush=True)

        server_port = free_port()
        server = subprocess.Popen(
            [sys.executable, __file__, "--serve", str(server_port), str(chain),
             str(forge.key_path)],
            stdout=subprocess.PIPE,
        )  # fmt: skip
        try:
            wait_port(server_port, server)
            port = free_port()
            tproxy = [
                sys.executable, "-m", "tproxy", "run", "-q",
                "--mode", f"forward:127.0.0.1:{server_port}@127.0.0.1:{port}",
                "-i", "tproxy.interceptor:Interceptor",
            ]  # fmt: skip
            tls = ["--tls", "intercept", "--ca-dir", str(intercept_ca.directory),
                   "--tls-upstream-ca", str(upstream_ca.cert_path)]  # fmt: skip
            results["tproxy_intercept"] = measure(
                "tproxy --tls intercept -i", tproxy + tls, port, args, tmp_path / "t1.log"
            )
            port = free_port()
            tproxy[6] = f"forward:127.0.0.1:{server_port}@127.0.0.1:{port}"
            results["tproxy_relay"] = measure(
                "tproxy -i (TLS relayed)", tproxy, port, args, tmp_path / "t2.log"
            )
            if args.mitmdump:
                port = free_port()
                mitm = [
                    args.mitmdump, "-q", "--listen-host", "127.0.0.1", "--listen-port",
                    str(port), "--mode", f"reverse:https://127.0.0.1:{server_port}",
                    "--set", f"confdir={tmp_path / 'mitm'}",
                    "--set", f"ssl_verify_upstream_trusted_ca={upstream_ca.cert_path}",
                ]  # fmt: skip
                results["mitmproxy"] = measure(
                    "mitmdump (reverse mode)", mitm, port, args, tmp_path / "m.log"
                )
        finally:
            stop(server)
    ti = results["tproxy_intercept"]
    tr = results["tproxy_relay"]
    assert isinstance(ti, dict) and isinstance(tr, dict)
    added = ti["cpu_ms_per_conn"] - tr["cpu_ms_per_conn"]
    results["added_cpu_ms_per_conn"] = added
    results["added_cpu_in_handshake_pairs"] = added / results["handshake_pair_ms"]  # type: ignore[operator]
    print(
        f"CPU added by interception: {added:.2f} ms per connection = "
        f"{results['added_cpu_in_handshake_pairs']:.2f} handshake pairs",
    )
    mitm_result = results.get("mitmproxy")
    if isinstance(mitm_result, dict) and mitm_result["conn_per_s"]:
        ratio = ti["conn_per_s"] / mitm_result["conn_per_s"]
        results["conn_rate_vs_mitmproxy"] = ratio
        print(f"tproxy / mitmproxy new-connection rate: {ratio:.2f}x")
        print(
            "tproxy / mitmproxy keep-alive rate: "
            f"{ti['keepalive_req_per_s'] / max(mitm_result['keepalive_req_per_s'], 1):.2f}x"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--serve":
        asyncio.run(_serve(int(sys.argv[2]), sys.argv[3], sys.argv[4]))
    elif len(sys.argv) > 1 and sys.argv[1] == "--load":
        port, mode, seconds, concurrency = sys.argv[2:6]
        result = asyncio.run(_load(int(port), mode, float(seconds), int(concurrency)))
        print(json.dumps(result))
    else:
        raise SystemExit(main())

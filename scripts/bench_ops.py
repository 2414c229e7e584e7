#!/usr/bin/env python3
"""What ``--metrics`` and ``--log-format json`` cost on new connections per second.

Side by side on loopback: an asyncio echo server, ``tproxy run`` as a
forward proxy in front of it (one process, logging to a file in every
configuration so the terminal is not what is measured), and an asyncio
client that opens connections as fast as it can (``--concurrency`` at a
time; each sends 16 bytes, reads them back and closes). The configurations
run interleaved, ``--rounds`` times each, and the median is reported::

    .venv/bin/python scripts/bench_ops.py --seconds 5 --rounds 3

On a shared machine the spread between rounds says how much to trust a
difference. The proxy's CPU time per connection (user + system, from
``/proc``) is reported beside the rate: other work on the machine slows the
rate far more than it changes the CPU a connection costs, so it is the
steadier measure of what an option adds.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

ECHO = """
import asyncio, sys
async def echo(r, w):
    try:
        while data := await r.read(65536):
            w.write(data)
            await w.drain()
    except ConnectionError:
        pass
    finally:
        w.close()
async def main():
    server = await asyncio.start_server(echo, "127.0.0.1", int(sys.argv[1]), backlog=1024)
    print("ready", flush=True)
    await server.serve_forever()
asyncio.run(main())
"""

CLIENT = """
import asyncio, json, sys, time
port, seconds, concurrency = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
done = errors = 0
async def worker(deadline):
    global done, errors
    while time.monotonic() < deadline:
        try:
            r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(b"0123456789abcdef")
            await w.drain()
            got = b""
            while len(got) < 16:
                chunk = await r.read(16 - len(got))
                if not chunk:
                    break
                got += chunk
            w.close()
            await w.wait_closed()
            if got == b"0123456789abcdef":
                done += 1
            else:
                errors += 1
        except OSError:
            errors += 1
async def main():
    start = time.monotonic()
    await asyncio.gather(*(worker(start + seconds) for _ in range(concurrency)))
    rate = done / (time.monotonic() - start)
    print(json.dumps({"rate": rate, "done": done, "errors": errors}))
asyncio.run(main())
"""

CONFIGS = {
    "baseline (text log)": ["--log-format", "text"],
    "--metrics": ["--log-format", "text", "--metrics", "127.0.0.1:{metrics}"],
    "--log-format json": ["--log-format", "json"],
}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_listening(port: int, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the proxy exited with {proc.returncode}")
        out = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True)
        if out.stdout.strip():
            return
        time.sleep(0.05)
    raise SystemExit("the proxy did not listen")


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time the process ``pid`` has used so far (``/proc/PID/stat``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def one_round(
    name: str, extra: list[str], echo_port: int, args: argparse.Namespace, tmp: Path
) -> tuple[float, float]:
    """One configuration once: (new connections/s, proxy CPU µs per connection)."""
    port, metrics = _port(), _port()
    argv = [
        sys.executable,
        "-m",
        "tproxy",
        "run",
        "--mode",
        f"forward:127.0.0.1:{echo_port}@127.0.0.1:{port}",
        "--log-file",
        str(tmp / "proxy.log"),
        *(a.format(metrics=metrics) for a in extra),
    ]
    env = {**os.environ, "TPROXY_RUN_DIR": str(tmp / "run")}
    proxy = subprocess.Popen(argv, cwd=ROOT, env=env)
    try:
        _wait_listening(port, proxy)
        cpu_before = _cpu_seconds(proxy.pid)
        out = subprocess.run(
            [sys.executable, "-c", CLIENT, str(port), str(args.seconds), str(args.concurrency)],
            capture_output=True,
            text=True,
            timeout=args.seconds + 60,
            check=True,
        ).stdout
        result = json.loads(out)
        cpu = (_cpu_seconds(proxy.pid) - cpu_before) / max(1, result["done"]) * 1e6
        if "--metrics" in extra:  # the endpoint answers and counted the flows
            text = subprocess.run(
                ["curl", "-sf", f"http://127.0.0.1:{metrics}/metrics"],
                capture_output=True,
                text=True,
                timeout=30,
            ).stdout
            assert "tproxy_flows_total" in text
        print(
            f"  {name:<22} {result['rate']:8.0f} conn/s  {cpu:6.0f} µs CPU/conn  "
            f"({result['errors']} errors)",
            flush=True,
        )
        return float(result["rate"]), cpu
    finally:
        proxy.send_signal(signal.SIGTERM)
        proxy.wait(30)


SINK = """
import socket, sys
srv = socket.create_server(("127.0.0.1", int(sys.argv[1])))
print("ready", flush=True)
while True:
    conn, _ = srv.accept()
    with conn:
        while conn.recv(1 << 20):
            pass
"""


def stream(mib: int, rounds: int, tmp: Path) -> None:
    """One stream's Gbit/s through the proxy: spliced, copied, and copied + --record."""
    sink_port = _port()
    sink = subprocess.Popen([sys.executable, "-c", SINK, str(sink_port)], stdout=subprocess.PIPE)
    configs = {
        "spliced (default)": [],
        "--no-splice": ["--no-splice"],
        "--record FILE": ["--record", str(tmp / "rec.pcapng")],
    }
    results: dict[str, list[float]] = {name: [] for name in configs}
    block = os.urandom(1 << 20)
    try:
        assert sink.stdout is not None and sink.stdout.readline().strip() == b"ready"
        for _ in range(rounds):
            for name, extra in configs.items():
                port = _port()
                proxy = subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "tproxy",
                        "run",
                        "--log-file",
                        str(tmp / "p.log"),
                        "--mode",
                        f"forward:127.0.0.1:{sink_port}@127.0.0.1:{port}",
                        *extra,
                    ],
                    cwd=ROOT,
                    env={**os.environ, "TPROXY_RUN_DIR": str(tmp / "run")},
                )
                try:
                    _wait_listening(port, proxy)
                    with socket.create_connection(("127.0.0.1", port)) as conn:
                        start = time.perf_counter()
                        for _ in range(mib):
                            conn.sendall(block)
                        conn.shutdown(socket.SHUT_WR)
                        conn.recv(1)  # the proxy closes once the sink has it all
                        elapsed = time.perf_counter() - start
                    results[name].append(mib * 8 * 2**20 / elapsed / 1e9)
                finally:
                    proxy.send_signal(signal.SIGTERM)
                    proxy.wait(60)
    finally:
        sink.terminate()
        sink.wait(10)
    for name, values in results.items():
        print(
            f"  {name:<20} {statistics.median(values):6.2f} Gbit/s  "
            f"(rounds: {', '.join(f'{v:.2f}' for v in values)})"
        )


def micro(count: int = 20000) -> None:
    """CPU per flow of what the options add, measured in-process (steadier than conn/s
    on a shared machine): the metrics observer, and a flow's two log records as the
    engine logs them (``log_flow`` through the handler ``tproxy run`` sets up, writing
    to /dev/null), text vs JSON."""
    import logging

    sys.path.insert(0, str(ROOT))
    from tproxy import logformat
    from tproxy.flow import EndReason, FlowInfo, FlowRecord
    from tproxy.metrics import FlowStats

    records = []
    for i in range(count):
        r = FlowRecord(
            FlowInfo(i, ("192.0.2.2", 40000 + i % 20000), ("198.51.100.2", 80)),
            started=time.monotonic(),
            bytes_up=100,
            bytes_down=2000,
        )
        r.outgoing_source = r.info.client
        r.interceptors = ("label",)
        r.end(EndReason.EOF, now=r.started + 0.01)
        records.append(r)
    stats = FlowStats()
    t0 = time.perf_counter()
    for r in records:
        stats.flow_opened(r)
        stats.flow_ended(r)
    observer = (time.perf_counter() - t0) / count
    timings = {}
    logger = logging.getLogger("tproxy.flow")
    for name in ("text", "json"):
        logformat.configure(logging.INFO, name, os.devnull)  # as tproxy run sets it up
        best = float("inf")
        for _ in range(5):  # the least CPU of 5 rounds: the machine's noise only adds
            t0 = time.process_time()
            for r in records:
                logformat.log_flow(logger, "open", r)
                logformat.log_flow(logger, "end", r)
            best = min(best, (time.process_time() - t0) / count)
        timings[name] = best
    print(
        f"per flow, in-process ({count} flows): metrics observer {observer * 1e6:.1f} us; "
        f"log records text {timings['text'] * 1e6:.1f} us, json {timings['json'] * 1e6:.1f} us "
        f"({(timings['json'] - timings['text']) * 1e6:+.1f} us)"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument(
        "--micro-only", action="store_true", help="only the in-process per-flow costs"
    )
    parser.add_argument(
        "--stream-mib",
        type=int,
        default=0,
        help="instead of conn/s: one stream of this many MiB, spliced, copied and recorded",
    )
    args = parser.parse_args()
    micro()
    if args.micro_only:
        return 0
    if args.stream_mib:
        with tempfile.TemporaryDirectory() as tmp:
            stream(args.stream_mib, args.rounds, Path(tmp))
        return 0
    echo_port = _port()
    echo = subprocess.Popen([sys.executable, "-c", ECHO, str(echo_port)], stdout=subprocess.PIPE)
    try:
        assert echo.stdout is not None and echo.stdout.readline().strip() == b"ready"
        rates: dict[str, list[float]] = {name: [] for name in CONFIGS}
        cpus: dict[str, list[float]] = {name: [] for name in CONFIGS}
        with tempfile.TemporaryDirectory() as tmp:
            for n in range(args.rounds):
                print(f"round {n + 1}/{args.rounds}", flush=True)
                for name, extra in CONFIGS.items():
                    rate, cpu = one_round(name, extra, echo_port, args, Path(tmp))
                    rates[name].append(rate)
                    cpus[name].append(cpu)
        base = statistics.median(rates["baseline (text log)"])
        base_cpu = statistics.median(cpus["baseline (text log)"])
        print(
            f"\nmedian of {args.rounds} rounds, {args.seconds:g}s each, "
            f"concurrency {args.concurrency}:"
        )
        for name, values in rates.items():
            med, cpu = statistics.median(values), statistics.median(cpus[name])
            print(
                f"  {name:<22} {med:8.0f} conn/s  {100 * (med - base) / base:+6.1f}%  "
                f"{cpu:6.0f} µs CPU/conn {100 * (cpu - base_cpu) / base_cpu:+6.1f}%  "
                f"(rounds: {', '.join(f'{v:.0f}' for v in values)})"
            )
    finally:
        echo.terminate()
        echo.wait(10)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

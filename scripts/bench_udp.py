#!/usr/bin/env python3
"""UDP through tproxy, side by side with no proxy and with socat, in one run.

    sudo .venv/bin/python scripts/bench_udp.py [--seconds 3] [--window 32] [--concurrency 16]

Builds client -- gateway -- server namespaces (netns-tests/nsharness.py),
runs a UDP echo in the server namespace and measures, from the client
namespace, for each configuration:

- ``datagrams/s``: one client socket keeps ``--window`` datagrams of
  ``--size`` bytes in flight to the echo and counts the answers (one session);
- ``sessions/s``: ``--concurrency`` at a time, a fresh socket (a new client
  port, so a new session) sends one datagram, waits for its answer, closes.

Configurations: ``direct`` (the gateway only routes), ``tproxy`` (``tproxy
run --setup ... --udp-port``, no interceptor), ``socat`` (``socat
UDP-RECVFROM:PORT,fork UDP-SENDTO:SERVER:PORT`` on the gateway, which the
client addresses explicitly: one forked child per datagram, as socat
relays UDP). The echo
and the load generator are plain Python in every configuration, so the
figures compare the middle, not absolute capacity. Needs root; prints a
table, changes nothing outside its namespaces.
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import socket
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ECHO_PORT = 7000
SOCAT_PORT = 7100

ECHO = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
s.bind(("0.0.0.0", int(sys.argv[1])))
print("ready", flush=True)
while True:
    data, peer = s.recvfrom(65535)
    s.sendto(data, peer)
"""


# -- load generators (run inside the client namespace) ------------------------------


def load_datagrams(target: tuple[str, int], seconds: float, window: int, size: int) -> dict:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.connect(target)
    sock.settimeout(0.5)
    payload = b"x" * size
    answered = sent = 0
    end = time.monotonic() + seconds
    in_flight = 0
    while time.monotonic() < end:
        while in_flight < window:
            sock.send(payload)
            sent += 1
            in_flight += 1
        try:
            sock.recv(65535)
            answered += 1
            in_flight -= 1
        except TimeoutError:
            in_flight = 0  # lost on the way: refill the window
    sock.close()
    return {"rate": answered / seconds, "sent": sent, "answered": answered}


def load_sessions(target: tuple[str, int], seconds: float, concurrency: int) -> dict:
    sel = selectors.DefaultSelector()
    done = lost = 0
    started: dict[socket.socket, float] = {}

    def open_one() -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setblocking(False)
        s.connect(target)
        s.send(b"hello")
        sel.register(s, selectors.EVENT_READ)
        started[s] = time.monotonic()

    end = time.monotonic() + seconds
    for _ in range(concurrency):
        open_one()
    while time.monotonic() < end:
        for key, _ in sel.select(timeout=0.1):
            s = key.fileobj
            try:
                s.recv(65535)
                done += 1
            except OSError:
                lost += 1
            sel.unregister(s)
            del started[s]
            s.close()
            open_one()
        now = time.monotonic()
        for s, t0 in list(started.items()):
            if now - t0 > 1.0:  # lost: give up on it, start another
                lost += 1
                sel.unregister(s)
                del started[s]
                s.close()
                open_one()
    for s in started:
        s.close()
    return {"rate": done / seconds, "answered": done, "lost": lost}


# -- orchestration (root namespace) -----------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--window", type=int, default=32)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--load", choices=["datagrams", "sessions"], help=argparse.SUPPRESS)
    parser.add_argument("--target", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.load:
        host, _, port = args.target.rpartition(":")
        target = (host, int(port))
        if args.load == "datagrams":
            result = load_datagrams(target, args.seconds, args.window, args.size)
        else:
            result = load_sessions(target, args.seconds, args.concurrency)
        print(json.dumps(result))
        return 0
    if os.geteuid() != 0:
        print("bench_udp: needs root (network namespaces, TPROXY rules)", file=sys.stderr)
        return 2
    sys.path.insert(0, str(ROOT / "netns-tests"))
    import nsharness

    nsharness.install_signal_handlers()
    rows: list[tuple[str, dict, dict]] = []
    with nsharness.Topology() as topo:
        echo = topo.server.popen(sys.executable, "-u", "-c", ECHO, str(ECHO_PORT), log_name="echo")
        topo.server.wait_log(echo, "ready")

        def measure(name: str, target: str) -> None:
            results = []
            for load in ("datagrams", "sessions"):
                out = topo.client.run(
                    sys.executable,
                    __file__,
                    "--load",
                    load,
                    "--target",
                    target,
                    "--seconds",
                    str(args.seconds),
                    "--window",
                    str(args.window),
                    "--size",
                    str(args.size),
                    "--concurrency",
                    str(args.concurrency),
                    timeout=args.seconds + 60,
                ).stdout
                results.append(json.loads(out.strip().splitlines()[-1]))
            rows.append((name, results[0], results[1]))
            print(
                f"  {name}: {results[0]['rate']:,.0f} datagrams/s, "
                f"{results[1]['rate']:,.0f} sessions/s",
                file=sys.stderr,
            )

        server = f"{topo.server_ip4}:{ECHO_PORT}"
        measure("direct (no proxy)", server)

        proxy = topo.gateway.popen(
            sys.executable,
            "-m",
            "tproxy",
            "run",
            "-q",
            "--setup",
            topo.gw_in,
            topo.gw_out,
            "--udp-port",
            str(ECHO_PORT),
            "--udp-idle",
            "2",
            log_name="tproxy",
            cwd=str(ROOT),
        )
        nsharness.wait_until(
            lambda: (
                topo.gateway.run(
                    sys.executable, "-m", "tproxy", "status", check=False, cwd=str(ROOT)
                ).returncode
                == 0
            ),
            20,
            "tproxy's routing",
        )
        measure("tproxy (transparent)", server)
        topo.gateway.stop(proxy)

        socat = topo.gateway.popen(
            "socat",
            f"UDP4-RECVFROM:{SOCAT_PORT},fork,reuseaddr",
            f"UDP4-SENDTO:{topo.server_ip4}:{ECHO_PORT}",
            log_name="socat",
        )
        topo.gateway.wait_port(SOCAT_PORT, proto="udp", proc=socat)
        measure("socat UDP-RECVFROM,fork", f"{topo.gw_in_ip4}:{SOCAT_PORT}")
        topo.gateway.stop(socat)

    print(
        f"\nUDP, {args.size}-byte datagrams, {args.seconds:g} s per figure; "
        f"window {args.window}, {args.concurrency} sessions at a time\n"
    )
    print("| configuration | datagrams/s (one session) | sessions/s | lost sessions |")
    print("| --- | ---: | ---: | ---: |")
    for name, dgrams, sessions in rows:
        print(f"| {name} | {dgrams['rate']:,.0f} | {sessions['rate']:,.0f} | {sessions['lost']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

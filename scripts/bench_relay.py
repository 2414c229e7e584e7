"""The relay's own CPU per request: the hub, in-process, on socketpairs.

``scripts/bench`` measures the proxy on a real namespace path, where the
kernel's TCP work (and the peers') dominates and rounds spread widely. This
measures only what the proxy's Python costs: one process runs the epoll hub
(:mod:`tproxy.hub`) over ``--pairs`` flow pairs (TCP over loopback), a
child process plays the clients and servers (keep-alive: a request up, a
reply down, one in flight on every pair at once, ``--requests`` in all), and the hub process's CPU
time per request is reported for each configuration, side by side in one
run:

- ``splice``: no interceptor (passthrough, spliced)
- ``copy``: no interceptor, ``splice=False``
- ``unchanged``: an interceptor that returns every chunk unchanged (the
  cost of watching a flow, issue 11)
- ``unchanged2``: two such interceptors

    .venv/bin/python scripts/bench_relay.py [--requests 20000] [--pairs 16]
    .venv/bin/python scripts/bench_relay.py --only unchanged --profile /tmp/relay.prof
    .venv/bin/python scripts/bench_relay.py --memory 2000

No root, no namespaces. Run it beside ``scripts/bench``, not instead.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import resource
import socket
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tproxy.flow import FlowInfo, FlowRecord  # noqa: E402
from tproxy.hub import SpliceHub  # noqa: E402
from tproxy.interceptor import Chain, Interceptor  # noqa: E402

PEER = r"""
import socket, sys
fds = [int(x) for x in sys.argv[1].split(",")]
requests, size_up, size_down = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
socks = [socket.socket(fileno=fd) for fd in fds]
pairs = [(socks[i], socks[i + 1]) for i in range(0, len(socks), 2)]
up, down = b"u" * size_up, b"d" * size_down

def take(sock, size):
    got = 0
    while got < size:
        got += len(sock.recv(65536))

sys.stdin.readline()
done = 0
while done < requests:
    # one request in flight on every pair at once, as a load generator with
    # one connection per pair keeps them (the hub sees batches of events)
    batch = pairs[: requests - done]
    for client, _ in batch:
        client.sendall(up)
    for _, server in batch:
        take(server, size_up)
        server.sendall(down)
    for client, _ in batch:
        take(client, size_down)
    done += len(batch)
print("done", flush=True)
"""


class Unchanged(Interceptor):
    """Returns every chunk unchanged (the bench's ``-i`` interceptor)."""

    def client_data(self, data: bytes) -> bytes:
        return data

    def server_data(self, data: bytes) -> bytes:
        return data


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _pair(transport: str) -> tuple[socket.socket, socket.socket]:
    """Two connected sockets: a Unix socketpair, or TCP over loopback."""
    if transport == "unix":
        return socket.socketpair()
    with socket.create_server(("127.0.0.1", 0)) as listener:
        a = socket.create_connection(listener.getsockname())
        b, _ = listener.accept()
    for s in (a, b):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return a, b


def _hub(config: str) -> SpliceHub:
    """A hub as the engine makes one, splicing only for the ``splice`` configuration."""
    return SpliceHub(
        opened=lambda info, local: FlowRecord(info, time.time()),
        rejected=lambda *a: None,
        closed=lambda record: None,
        splice=config == "splice",
    )


def _adopt(hub: SpliceHub, config: str, k: int, transport: str) -> tuple[socket.socket, ...]:
    """Flow pair ``k`` in the hub, with the configuration's interceptors; its two peer ends."""
    client_peer, client = _pair(transport)
    server, server_peer = _pair(transport)
    for s in (client, server):
        s.setblocking(False)
    info = FlowInfo(k + 1, ("192.0.2.1", 40000 + k), ("192.0.2.2", 80), mode="forward")
    chains = {"unchanged": 1, "unchanged2": 2}.get(config, 0)
    chain = Chain([Unchanged(info) for _ in range(chains)]) if chains else None
    hub.adopt(client, server, FlowRecord(info, time.time()), chain)
    return client_peer, server_peer


async def _memory(config: str, flows: int) -> float:
    """Python memory per idle flow pair in the hub (tracemalloc), sockets included."""
    hub = _hub(config)
    keep: list[socket.socket] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(hub.run)
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        for k in range(flows):
            keep += _adopt(hub, config, k, "unix")
        await trio.sleep(0.2)
        used = tracemalloc.get_traced_memory()[0] - before
        tracemalloc.stop()
        nursery.cancel_scope.cancel()
    for s in keep:
        s.close()
    return used / flows


async def _run(
    config: str,
    pairs: int,
    requests: int,
    up: int,
    down: int,
    profile: str | None,
    transport: str,
) -> float:
    hub = _hub(config)
    peer_fds: list[int] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(hub.run)
        for k in range(pairs):
            peer_fds += [peer.detach() for peer in _adopt(hub, config, k, transport)]
        proc = subprocess.Popen(
            [sys.executable, "-c", PEER, ",".join(map(str, peer_fds)), str(requests), str(up),
             str(down)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, pass_fds=peer_fds, text=True,
        )  # fmt: skip
        for fd in peer_fds:
            os.close(fd)
        prof = cProfile.Profile() if profile else None
        cpu0 = _cpu()
        if prof is not None:
            prof.enable()
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
        line = await trio.to_thread.run_sync(proc.stdout.readline)
        used = _cpu() - cpu0
        if prof is not None:
            prof.disable()
            prof.dump_stats(profile)
        if line.strip() != "done":
            raise SystemExit(f"the peer failed: {line!r}")
        proc.wait()
        nursery.cancel_scope.cancel()
    return used / requests * 1e6


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=20_000)
    p.add_argument("--pairs", type=int, default=16)
    p.add_argument("--up", type=int, default=100, help="request size, bytes")
    p.add_argument("--down", type=int, default=600, help="reply size, bytes")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--transport", choices=("tcp", "unix"), default="tcp",
                   help="TCP on loopback (default; splice works), or Unix socketpairs")  # fmt: skip
    p.add_argument("--only", default="splice,copy,unchanged,unchanged2")
    p.add_argument("--profile", default=None, help="cProfile stats of the last round here")
    p.add_argument("--memory", type=int, default=0, metavar="FLOWS",
                   help="instead: Python memory per idle flow pair over FLOWS pairs "
                   "(tracemalloc; the proxy-side objects, sockets included)")  # fmt: skip
    args = p.parse_args()
    configs = args.only.split(",")
    if args.memory:
        print(f"bytes of Python memory per idle flow pair ({args.memory} pairs, tracemalloc):")
        for config in configs:
            print(f"  {config:12s} {trio.run(_memory, config, args.memory):7.0f}")
        return 0
    results: dict[str, list[float]] = {c: [] for c in configs}
    for r in range(args.rounds):
        for config in configs:
            prof = args.profile if r == args.rounds - 1 else None
            run = (config, args.pairs, args.requests, args.up, args.down, prof, args.transport)
            results[config].append(trio.run(_run, *run))
    print(f"hub CPU µs per request ({args.requests} requests over {args.pairs} "
          f"{args.transport} pairs, "
          f"{args.up} B up, {args.down} B down; best of {args.rounds}):")  # fmt: skip
    # The least CPU of the rounds: other work on the machine only ever adds to it.
    base = min(results[configs[0]])
    for config in configs:
        med = min(results[config])
        print(f"  {config:12s} {med:7.1f}   {med / base:5.2f}x {configs[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

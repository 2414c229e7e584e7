"""Chaos: many clients with random behaviour through every door while a worker is killed.

client -- gateway (``tproxy run --workers 2 --setup``: transparent, socks,
http) -- server (echo). For :data:`SECONDS` seconds, :data:`THREADS` client
threads in the client namespace each run one client after another, every
one with a behaviour and a door drawn from a seeded random generator:

- ``normal``: send N bytes while reading the echo, read N bytes, close;
- ``half-close``: send N bytes, ``shutdown(SHUT_WR)``, read to EOF;
- ``stall``: like ``half-close``, with a pause of a few seconds mid-stream
  (neither sending nor reading);
- ``reset``: send part, then close with ``SO_LINGER`` 0 (a reset mid-stream);
- ``vanish``: send part, then vanish: the client namespace drops the
  connection's packets both ways (nft) and closes, so the gateway never
  hears from it again (keepalive must reap the flow);
- ``garbage``: random bytes (or a host name no resolver accepts) to an
  explicit door, reading until the proxy closes.

A third of the way in, worker 1 is SIGKILLed; the supervisor restarts it.

Afterwards: every well-behaved flow (normal, half-close, stall) that was not
in flight when the worker died received exactly what it sent (SHA-256); no
flow is left on the gateway once keepalive reaped the vanished ones; the
workers hold as many sockets as right after they started; the log has no
traceback; the supervisor stops with 0, removing its routing, and ``status``
and ``teardown`` find nothing left. The figures are printed (``-s`` shows
them). ``TPX_CHAOS_SEED`` replays a run, ``TPX_CHAOS_SECONDS`` changes its length,
``TPX_CHAOS_LOG=FILE`` keeps the proxy's and the echo server's logs.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from nsharness import Topology, echo_server, list_namespaces

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

SEED = int(os.environ.get("TPX_CHAOS_SEED", "0")) or random.SystemRandom().randrange(1, 2**31)
SECONDS = float(os.environ.get("TPX_CHAOS_SECONDS", "45"))
THREADS = 12
ECHO_PORT = 7000
SOCKS_PORT = 1080
HTTP_PORT = 8080
KEEPALIVE = (3, 1, 3)
"""Small keepalive: a vanished client's flow is reaped within 6 s."""
HANDSHAKE_TIMEOUT = 3
VANISH_PORTS = (20000, 30000)
"""Source ports of vanishing clients, below the ephemeral range (32768-60999)."""
OP_TIMEOUT = 30.0
"""Hang guard of every client socket operation."""

BEHAVIOURS = ["normal", "half-close", "stall", "reset", "vanish", "garbage"]
WEIGHTS = [30, 25, 8, 12, 8, 17]
WELL_BEHAVED = {"normal", "half-close", "stall"}
DOORS = ["transparent", "socks", "http"]
BAD_NAMES = [b"a..b", b"x" * 64 + b".test", b"..", b"\x80x.test"]


@dataclass
class Outcome:
    """What one client did and saw."""

    behaviour: str
    door: str
    started: float
    ended: float = 0.0
    sent: int = 0
    verified: int = 0
    """Bytes echoed back and found SHA-256-equal (well-behaved flows)."""
    error: str | None = None
    port: int = 0
    """The client's local port (the flow records name it)."""


@dataclass
class Run:
    """The shared state of the client threads."""

    topology: Topology
    stop_at: float
    outcomes: list[Outcome] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    next_vanish_port: int = VANISH_PORTS[0]

    def vanish_port(self) -> int:
        """A port no other client of this run uses: its packets are dropped after it vanished."""
        with self.lock:
            port = self.next_vanish_port
            self.next_vanish_port += 1
        assert port < VANISH_PORTS[1], "more vanishing clients than ports set aside"
        return port

    def add(self, outcome: Outcome) -> None:
        with self.lock:
            self.outcomes.append(outcome)


# -- the client side ---------------------------------------------------------------


def client_socket(topo: Topology) -> socket.socket:
    with topo.client.enter():
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(OP_TIMEOUT)
    return sock


def read_line(sock: socket.socket) -> bytes:
    line = b""
    while not line.endswith(b"\n") and len(line) < 200:
        byte = sock.recv(1)
        if not byte:
            raise ConnectionError(f"closed before the end of a line: {line!r}")
        line += byte
    return line


def recv_exact(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(min(size - len(data), 1 << 16))
        if not chunk:
            raise ConnectionError(f"closed after {len(data)} of {size} bytes")
        data += chunk
    return bytes(data)


def open_flow(topo: Topology, door: str, run: Run, vanishing: bool = False) -> socket.socket:
    """A connection to the echo server through ``door``, past the PEER line.

    ``vanishing``: from a port of its own (see :func:`vanish`), never an ephemeral one.
    """
    sock = client_socket(topo)
    try:
        if vanishing:
            sock.bind(("0.0.0.0", run.vanish_port()))
        if door == "transparent":
            sock.connect((topo.server_ip4, ECHO_PORT))
        elif door == "socks":
            sock.connect((topo.gw_in_ip4, SOCKS_PORT))
            request = b"\x05\x01\x00\x01" + socket.inet_aton(topo.server_ip4)
            sock.sendall(b"\x05\x01\x00" + request + struct.pack(">H", ECHO_PORT))
            reply = recv_exact(sock, 2 + 10)
            if reply[:2] != b"\x05\x00" or reply[3] != 0:
                raise ConnectionError(f"SOCKS5 refused: {reply.hex()}")
        else:
            sock.connect((topo.gw_in_ip4, HTTP_PORT))
            target = f"{topo.server_ip4}:{ECHO_PORT}"
            sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
            head = b""
            while not head.endswith(b"\r\n\r\n"):
                head += recv_exact(sock, 1)
            if not head.startswith(b"HTTP/1.1 200 "):
                raise ConnectionError(f"CONNECT refused: {head[:60]!r}")
        read_line(sock)  # PEER ...
        return sock
    except BaseException:
        sock.close()
        raise


def echo_exchange(
    sock: socket.socket, payload: bytes, *, half_close: bool, pause_at: int | None, pause: float
) -> int:
    """Send ``payload`` while reading its echo; return the bytes echoed, checked by SHA-256."""
    received = hashlib.sha256()
    got = 0
    failure: list[BaseException] = []

    def reader() -> None:
        nonlocal got
        try:
            while got < len(payload) or half_close:
                chunk = sock.recv(1 << 16)
                if not chunk:
                    return
                received.update(chunk)
                got += len(chunk)
        except BaseException as exc:  # reported by the sender
            failure.append(exc)

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    view = memoryview(payload)
    sent = 0
    while sent < len(payload):
        end = len(payload) if pause_at is None or sent >= pause_at else pause_at
        sock.sendall(view[sent:end])
        sent = end
        if pause_at is not None and sent == pause_at:
            time.sleep(pause)
            pause_at = None
    if half_close:
        sock.shutdown(socket.SHUT_WR)
    thread.join(OP_TIMEOUT * 2)
    if thread.is_alive():
        raise TimeoutError("the echo never ended")
    if failure:
        raise failure[0]
    if got != len(payload):
        raise ConnectionError(f"echo ended after {got} of {len(payload)} bytes")
    if received.digest() != hashlib.sha256(payload).digest():
        raise AssertionError(f"echo of {len(payload)} bytes differs (SHA-256)")
    return got


def reset_close(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def one_client(run: Run, rng: random.Random) -> Outcome:
    topo = run.topology
    behaviour = rng.choices(BEHAVIOURS, WEIGHTS)[0]
    door = rng.choice(DOORS[1:] if behaviour == "garbage" else DOORS)
    outcome = Outcome(behaviour, door, time.monotonic())
    size = rng.choice([rng.randrange(1, 4096), rng.randrange(4096, 256 * 1024), 2 * 1024 * 1024])
    if behaviour == "normal" and size == 2 * 1024 * 1024 and rng.random() < 0.5:
        size = 8 * 1024 * 1024
    payload = rng.randbytes(size)
    try:
        if behaviour == "garbage":
            garbage(topo, door, rng)
        else:
            with contextlib.closing(open_flow(topo, door, run, behaviour == "vanish")) as sock:
                outcome.port = sock.getsockname()[1]
                if behaviour in WELL_BEHAVED:
                    stall = behaviour == "stall"
                    outcome.verified = echo_exchange(
                        sock,
                        payload,
                        half_close=behaviour != "normal",
                        pause_at=rng.randrange(len(payload)) if stall else None,
                        pause=rng.uniform(1.0, 2.5),
                    )
                    outcome.sent = len(payload)
                else:
                    part = payload[: rng.randrange(1, len(payload) + 1)]
                    sock.sendall(part)
                    outcome.sent = len(part)
                    time.sleep(rng.uniform(0, 0.2))
                    if behaviour == "vanish":
                        vanish(topo, sock)
                    reset_close(sock)
    except Exception as exc:
        outcome.error = f"{type(exc).__name__}: {exc}"
    outcome.ended = time.monotonic()
    return outcome


def garbage(topo: Topology, door: str, rng: random.Random) -> None:
    """Random bytes, or a request naming an impossible host; the proxy must close."""
    sock = client_socket(topo)
    with contextlib.closing(sock):
        sock.connect((topo.gw_in_ip4, SOCKS_PORT if door == "socks" else HTTP_PORT))
        if rng.random() < 0.3:
            name = rng.choice(BAD_NAMES)
            if door == "socks":
                data = b"\x05\x01\x00\x05\x01\x00\x03" + bytes((len(name),)) + name + b"\0\x50"
            else:
                host = name.decode("latin-1")
                data = f"GET http://{host}/ HTTP/1.1\r\nHost: {host}\r\n\r\n".encode("latin-1")
        else:
            data = rng.randbytes(rng.randrange(1, 3000))
        try:
            sock.sendall(data)
            while sock.recv(65536):
                pass
        except (ConnectionResetError, BrokenPipeError):
            pass  # a reset is a fine answer to garbage


def vanish(topo: Topology, sock: socket.socket) -> None:
    """From now on the client namespace drops this connection's packets, both ways."""
    port = sock.getsockname()[1]
    topo.client.run("nft", "add", "element", "inet", "chaos", "ports", f"{{ {port} }}")


def client_thread(run: Run, seed: int) -> None:
    rng = random.Random(seed)
    while time.monotonic() < run.stop_at:
        run.add(one_client(run, rng))


# -- the gateway side ----------------------------------------------------------------------


def worker_pids(log: str) -> dict[int, int]:
    return {int(i): int(p) for i, p in re.findall(r"worker (\d+) started \(pid (\d+)\)", log)}


def socket_count(pid: int) -> int:
    fds = Path(f"/proc/{pid}/fd")
    count = 0
    for fd in fds.iterdir():
        with contextlib.suppress(OSError):
            count += os.readlink(fd).startswith("socket:")
    return count


def wait_for(what: str, predicate: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:g}s")
        time.sleep(0.2)


def flows_on_gateway(topo: Topology) -> list[str]:
    """Sockets of the proxy's flows still open on the gateway.

    ESTAB: a flow not ended; CLOSE-WAIT: a peer closed and the proxy did not.
    TIME-WAIT and FIN-WAIT belong to the kernel once the proxy closed.
    """
    ports = (ECHO_PORT, SOCKS_PORT, HTTP_PORT)
    out = topo.gateway.run("ss", "-tanH", "state", "established", "state", "close-wait").stdout
    return [line for line in out.splitlines() if any(f":{p} " in line + " " for p in ports)]


def routing_installed(topo: Topology) -> bool:
    out = topo.gateway.run("iptables-legacy-save", "-t", "mangle", check=False).stdout
    return "TPROXY" in out


@contextlib.contextmanager
def supervisor(topo: Topology) -> Iterator[subprocess.Popen[Any]]:
    gw = topo.gateway
    proc = gw.popen(
        sys.executable, "-m", "tproxy", "run", "--workers", "2", "--grace", "2",
        "--mode", "transparent@127.0.0.1:9091",
        "--mode", f"socks@{topo.gw_in_ip4}:{SOCKS_PORT}",
        "--mode", f"http@{topo.gw_in_ip4}:{HTTP_PORT}",
        "--allow-client", topo.client_net4,
        "--handshake-timeout", str(HANDSHAKE_TIMEOUT),
        "--keepalive", ",".join(map(str, KEEPALIVE)),
        "--setup", topo.gw_in, topo.gw_out, "--port", str(ECHO_PORT), "--ipv4",
        log_name="tproxy", cwd=ROOT,
    )  # fmt: skip
    try:
        wait_for("workers listening", lambda: "workers listening" in gw.read_log(proc), 60)
        # The supervisor installs the routing after that line: a flow opened before the
        # rules would go around the proxy, and be reset once its packets are diverted.
        wait_for("routing installed", lambda: routing_installed(topo), 60)
        yield proc
    finally:
        if proc.poll() is None:
            gw.stop(proc, timeout=30)
        gw.run(sys.executable, "-m", "tproxy", "teardown", "--all", check=False, cwd=ROOT)


# -- the test ------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(int(SECONDS) + 240)
def test_chaos(topology: Topology) -> None:
    print(f"\nchaos seed {SEED} ({SECONDS:g}s, {THREADS} clients at a time): TPX_CHAOS_SEED={SEED}")
    topo = topology
    echo_server(topo.server, "0.0.0.0", ECHO_PORT)
    topo.client.run(
        "nft", "-f", "-",
        input="table inet chaos {\n"
        "  set ports { type inet_service; }\n"
        "  chain out { type filter hook output priority 0; tcp sport @ports drop; }\n"
        "  chain in { type filter hook input priority 0; tcp dport @ports drop; }\n"
        "}\n",
    )  # fmt: skip
    gw = topo.gateway
    with supervisor(topo) as proc:
        pids = worker_pids(gw.read_log(proc))
        assert set(pids) == {0, 1}, gw.read_log(proc)
        baseline = {index: socket_count(pid) for index, pid in pids.items()}

        started = time.monotonic()
        run = Run(topo, stop_at=started + SECONDS)
        seeds = random.Random(SEED)
        threads = [
            threading.Thread(target=client_thread, args=(run, seeds.randrange(2**31)), daemon=True)
            for _ in range(THREADS)
        ]
        for thread in threads:
            thread.start()
        time.sleep(SECONDS / 3)
        killed_at = time.monotonic()
        os.kill(pids[1], signal.SIGKILL)
        wait_for(
            "worker 1 restarted",
            lambda: worker_pids(gw.read_log(proc)).get(1) not in (None, pids[1]),
            60,
        )
        restarted_at = time.monotonic()
        for thread in threads:
            thread.join(SECONDS + OP_TIMEOUT * 4)
            assert not thread.is_alive(), "a client thread hung"
        chaos_ended = time.monotonic()

        # Vanished clients are reaped by keepalive; nothing else may stay.
        reap = sum(KEEPALIVE[:2]) + KEEPALIVE[1] * KEEPALIVE[2] + 15
        with contextlib.suppress(AssertionError):
            wait_for("every flow gone", lambda: not flows_on_gateway(topo), reap)
        left = flows_on_gateway(topo)
        now_pids = worker_pids(gw.read_log(proc))
        counts = {index: socket_count(pid) for index, pid in now_pids.items()}

        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
        log = gw.read_log(proc)

    status = gw.run(sys.executable, "-m", "tproxy", "status", check=False, cwd=ROOT)
    teardown = gw.run(sys.executable, "-m", "tproxy", "teardown", check=False, cwd=ROOT)

    outcomes = run.outcomes
    if os.environ.get("TPX_CHAOS_LOG"):
        Path(os.environ["TPX_CHAOS_LOG"]).write_text(log + topo.server.read_log())
    by_kind = Counter((o.behaviour, o.door) for o in outcomes)
    # In flight while worker 1 was dead: it may have held them (or their SYN in its queue).
    cut = [
        o
        for o in outcomes
        if o.error
        and o.behaviour in WELL_BEHAVED
        and o.started <= restarted_at + 1
        and o.ended >= killed_at
    ]
    failed = [o for o in outcomes if o.error and o.behaviour in WELL_BEHAVED and o not in cut]
    other_errors = Counter(
        o.error.split(":")[0] for o in outcomes if o.error and o.behaviour not in WELL_BEHAVED
    )
    verified = sum(o.verified for o in outcomes)
    ends = Counter(re.findall(r" end reason=([a-z-]+)", log))
    print(f"chaos: {len(outcomes)} clients in {chaos_ended - started:.0f}s, seed {SEED}")
    for behaviour in BEHAVIOURS:
        counts_by_door = {d: by_kind[(behaviour, d)] for d in DOORS if by_kind[(behaviour, d)]}
        doors = ", ".join(f"{d} {n}" for d, n in counts_by_door.items())
        print(f"  {behaviour:<10} {sum(by_kind[(behaviour, d)] for d in DOORS):>5}  ({doors})")
    well = sum(1 for o in outcomes if o.behaviour in WELL_BEHAVED)
    print(f"  well-behaved flows verified by SHA-256: {well - len(cut) - len(failed)} of {well},"
          f" {verified / 2**20:.1f} MiB echoed")  # fmt: skip
    print(f"  cut by the worker kill (in flight at SIGKILL): {len(cut)}")
    print(f"  failed otherwise: {len(failed)}")
    print(f"  client-side errors of reset/vanish/garbage clients: {dict(other_errors)}")
    for o in [o for o in outcomes if o.error and o not in cut][:10]:
        print(f"    {o.behaviour} via {o.door} from port {o.port} at {o.started - started:.1f}s"
              f"-{o.ended - started:.1f}s: {o.error}")  # fmt: skip
        for line in log.splitlines():
            if o.port and f"client=192.0.2.2:{o.port} " in line:
                print(f"      {line}")
    print(f"  flow records by end reason: {dict(ends)}")
    print(f"  worker 1 restarted {restarted_at - killed_at:.1f}s after its SIGKILL")
    print(f"  worker sockets at start {baseline}, after the run {counts}")
    print(f"  stall warnings: {log.count('event loop stalled')}")
    print(f"  flows left on the gateway after {reap}s: {len(left)}")

    assert not left, "\n".join(left)
    assert not failed, "\n".join(f"{o.behaviour} via {o.door}: {o.error}" for o in failed[:20])
    assert len(cut) <= THREADS, [o.error for o in cut]
    assert well - len(cut) > 0 and verified > 0
    assert "Traceback" not in log and "ExceptionGroup" not in log, log[-5000:]
    assert code == 0, log[-3000:]
    assert counts == baseline, (baseline, counts)
    assert status.returncode == 3, status.stdout + status.stderr  # nothing installed
    assert teardown.returncode == 0, teardown.stdout + teardown.stderr
    assert "TPROXY" not in gw.run("iptables-legacy-save", "-t", "mangle").stdout
    names = {ns.name for ns in topo.namespaces}
    topo.close()  # as the fixture would; idempotent
    assert not names & set(list_namespaces()), list_namespaces()

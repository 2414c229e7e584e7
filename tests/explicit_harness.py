"""Real processes and sockets on loopback for the explicit-mode tests.

``tproxy run`` runs as a subprocess (:func:`running_proxy`), peers are
``python -m http.server`` or small threads (echo, UDP echo), and clients are
curl, python-socks and raw sockets, so every test sees the exact bytes a
real client receives. All addresses are loopback; everything started here
is stopped in ``finally`` blocks. Timeouts are hang guards only.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

HANG_GUARD = 10.0
"""Seconds any single wait may take before the test fails instead of hanging."""

PAGE = "hello world, from the server\n"

REPLACE = ["-i", "replace", "-o", "old=world", "-o", "new=WORLD", "-o", "direction=server"]
"""An interceptor that visibly rewrites PAGE on its way to the client."""


def free_port(family: int = socket.AF_INET, kind: int = socket.SOCK_STREAM) -> int:
    """A port nothing listens on right now."""
    with socket.socket(family, kind) as s:
        s.bind(("::1" if family == socket.AF_INET6 else "127.0.0.1", 0))
        return int(s.getsockname()[1])


def ipv6_loopback() -> bool:
    """Whether ::1 can be bound here."""
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def wait_port(host: str, port: int, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Return once ``host:port`` accepts TCP connections; fail if ``proc`` died first."""
    deadline = time.monotonic() + HANG_GUARD
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening")
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port}")


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL if it does not exit (hang guard)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(HANG_GUARD)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class RunningProxy:
    """A ``tproxy run`` subprocess and its listeners (kind -> port)."""

    proc: subprocess.Popen[bytes]
    ports: dict[str, int]
    log_path: Path

    def port(self, kind: str) -> int:
        return self.ports[kind]

    def log(self) -> str:
        return self.log_path.read_text()

    def wait_log(self, text: str, count: int = 1) -> str:
        """The log once it contains ``text`` ``count`` times (a flow is logged after its
        client saw the end)."""
        deadline = time.monotonic() + HANG_GUARD
        while time.monotonic() < deadline:
            log = self.log()
            if log.count(text) >= count:
                return log
            time.sleep(0.02)
        raise AssertionError(f"{text!r} never appeared {count} time(s) in the log:\n{self.log()}")


@contextlib.contextmanager
def running_proxy(
    tmp_path: Path, modes: Sequence[str], *args: str, host: str = "127.0.0.1"
) -> Iterator[RunningProxy]:
    """Run ``tproxy run --mode KIND@HOST:PORT ...`` for each mode, on free ports."""
    ports: dict[str, int] = {}
    argv = [sys.executable, "-m", "tproxy", "run"]
    for mode in modes:
        port = free_port(socket.AF_INET6 if ":" in host else socket.AF_INET)
        ports[mode.partition(":")[0]] = port
        where = f"[{host}]" if ":" in host else host
        argv += ["--mode", f"{mode}@{where}:{port}"]
    argv += list(args)
    log_path = tmp_path / f"tproxy-{len(list(tmp_path.glob('tproxy-*.log')))}.log"
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT)
    try:
        for port in ports.values():
            try:
                wait_port(host, port, proc)
            except RuntimeError:
                raise RuntimeError(f"tproxy did not start:\n{log_path.read_text()}") from None
        yield RunningProxy(proc, ports, log_path)
    finally:
        stop(proc)


def run_tproxy(*args: str) -> subprocess.CompletedProcess[str]:
    """``tproxy ARGS`` to completion (for start-time checks)."""
    return subprocess.run(
        [sys.executable, "-m", "tproxy", *args],
        capture_output=True,
        text=True,
        timeout=HANG_GUARD * 3,
        check=False,
    )


@contextlib.contextmanager
def http_server(directory: Path, host: str = "127.0.0.1") -> Iterator[int]:
    """``python -m http.server`` serving ``directory`` (with ``index.html`` = :data:`PAGE`)."""
    (directory / "index.html").write_text(PAGE)
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", host, "-d", str(directory)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_port(host, port, proc)
        yield port
    finally:
        stop(proc)


def curl(*args: str) -> subprocess.CompletedProcess[str]:
    """curl with a hang guard; never raises for curl's own exit code."""
    return subprocess.run(
        ["curl", "-sS", "--max-time", str(HANG_GUARD), *args],
        capture_output=True,
        text=True,
        timeout=HANG_GUARD * 2,
        check=False,
    )


@contextlib.contextmanager
def tcp_server(
    handler: Callable[[socket.socket], None],
    host: str = "127.0.0.1",
    *,
    timeout: float = HANG_GUARD,
) -> Iterator[int]:
    """A TCP server that runs ``handler(conn)`` for each connection (one thread each),
    then closes it; yields its port. Socket errors inside ``handler`` end that one."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.bind((host, 0))
    listener.listen(16)
    listener.settimeout(0.2)
    done = threading.Event()

    def serve_one(conn: socket.socket) -> None:
        with conn:
            conn.settimeout(timeout)
            with contextlib.suppress(OSError):
                handler(conn)

    def serve() -> None:
        while not done.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=serve_one, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield int(listener.getsockname()[1])
    finally:
        done.set()
        thread.join(HANG_GUARD)
        listener.close()


def _echo(conn: socket.socket) -> None:
    while data := conn.recv(65536):
        conn.sendall(data)


def echo_server(host: str = "127.0.0.1") -> contextlib.AbstractContextManager[int]:
    """A TCP server that echoes every connection until EOF (one thread per connection)."""
    return tcp_server(_echo, host)


@contextlib.contextmanager
def udp_echo_server(host: str = "127.0.0.1") -> Iterator[int]:
    """A UDP server that sends every datagram back to its sender, prefixed with ``echo:``."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((host, 0))
    sock.settimeout(0.2)
    done = threading.Event()

    def serve() -> None:
        while not done.is_set():
            try:
                data, source = sock.recvfrom(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            sock.sendto(b"echo:" + data, source)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield int(sock.getsockname()[1])
    finally:
        done.set()
        thread.join(HANG_GUARD)
        sock.close()


@contextlib.contextmanager
def blackhole() -> Iterator[int]:
    """A loopback port whose connects hang: a listener with a full accept queue.

    Linux drops SYNs to a listener whose accept queue is full, so a connect
    there neither succeeds nor fails until the connecting side gives up: a
    connect timeout without any traffic leaving loopback.
    """
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = int(listener.getsockname()[1])
    filler = socket.socket()
    filler.settimeout(HANG_GUARD)
    try:
        filler.connect(("127.0.0.1", port))
        yield port
    finally:
        filler.close()
        listener.close()


def connect(port: int, host: str = "127.0.0.1") -> socket.socket:
    """A plain client connection with a hang-guard timeout."""
    sock = socket.create_connection((host, port), timeout=HANG_GUARD)
    sock.settimeout(HANG_GUARD)
    return sock


def recv_exact(sock: socket.socket, size: int) -> bytes:
    """Exactly ``size`` bytes (fewer only if the peer closed)."""
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            break
        data += chunk
    return data


def recv_all(sock: socket.socket) -> bytes:
    """Everything until the peer closes (a reset ends it too: what arrived is returned)."""
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk


def exchange(port: int, request: bytes) -> bytes:
    """Send ``request`` to the proxy and return everything it answers before closing."""
    with connect(port) as sock:
        sock.sendall(request)
        return recv_all(sock)


def expect_reset(port: int, send: bytes = b"") -> None:
    """Connect, send ``send``, and see the proxy reset the connection without a byte.

    The reset may surface at any step: even connect() reports it when it
    arrives before the connect call returns.
    """
    try:
        with connect(port) as sock:
            if send:
                sock.sendall(send)
            data = sock.recv(100)
    except (ConnectionResetError, BrokenPipeError):
        return
    raise AssertionError(f"expected a reset, got {data!r}")

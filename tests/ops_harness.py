"""Helpers of the operations tests: a real ``tproxy run`` process on loopback, an
echo server, scrapes of its metrics and queries of its control socket."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.settimeout(30)
        with contextlib.suppress(OSError):
            while data := sock.recv(65536):
                sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)


@contextlib.contextmanager
def echo_server() -> Iterator[int]:
    """An echo server on 127.0.0.1 (each connection echoes until EOF); yields its port."""
    socketserver.ThreadingTCPServer.allow_reuse_address = True
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()


def wait_until(predicate: Any, timeout: float = 10.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


class Proxy:
    """One ``python -m tproxy run ...`` with its log in a file and its own run dir."""

    def __init__(self, tmp: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.tmp = tmp
        self.run_dir = tmp / "run"
        self.log_path = tmp / f"proxy-{time.monotonic_ns()}.log"
        self.env = {**os.environ, "TPROXY_RUN_DIR": str(self.run_dir), **(env or {})}
        self.env["PYTHONPATH"] = str(ROOT) + os.pathsep + self.env.get("PYTHONPATH", "")
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tproxy", "run", *args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=self.env,
            cwd=tmp,
        )

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_log(self, pattern: str, timeout: float = 15.0, count: int = 1) -> None:
        def seen() -> bool:
            if self.proc.poll() is not None and len(re.findall(pattern, self.log)) < count:
                raise AssertionError(f"proxy exited {self.proc.returncode}:\n{self.log}")
            return len(re.findall(pattern, self.log)) >= count

        wait_until(seen, timeout, f"{pattern!r} in the proxy log:\n{self.log}")

    def wait_port(self, port: int, timeout: float = 15.0) -> None:
        """Wait for the listener's log line (a probe connection would be a flow)."""
        self.wait_log(rf"listening: \S+@127\.0\.0\.1:{port}\b", timeout)

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def tproxy(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run another ``tproxy`` command with this proxy's run dir."""
        return subprocess.run(
            [sys.executable, "-m", "tproxy", *args],
            capture_output=True,
            text=True,
            timeout=30,
            env=self.env,
            check=check,
        )

    def stop(self, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()
        return int(self.proc.returncode)


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        return str(reply.read().decode())


def samples(text: str, name: str) -> dict[str, float]:
    """``{labels: value}`` of metric ``name`` in Prometheus text."""
    found = {}
    for line in text.splitlines():
        m = re.match(rf"^{re.escape(name)}(\{{[^}}]*\}})?\s+(\S+)$", line)
        if m:
            found[m.group(1) or ""] = float(m.group(2))
    return found


def echo_once(port: int, data: bytes, timeout: float = 10.0) -> bytes:
    """Send ``data`` (from a thread, so large data cannot deadlock), half-close, read
    until EOF."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:

        def send() -> None:
            with contextlib.suppress(OSError):
                s.sendall(data)
                s.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        out = bytearray()
        while chunk := s.recv(65536):
            out += chunk
        sender.join(timeout)
        return bytes(out)

"""scripts/tproxy.service: its command lines, started the way systemd starts them (a
NOTIFY_SOCKET datagram socket the test listens on), say READY, RELOADING, STOPPING."""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ops_harness import Proxy, echo_once, echo_server, free_port

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "scripts" / "tproxy.service"


def _unit() -> dict[str, str]:
    keys: dict[str, str] = {}
    for line in UNIT.read_text().splitlines():
        m = re.match(r"^(\w+)=(.*)$", line)
        if m:
            keys.setdefault(m.group(1), m.group(2))
    return keys


def test_unit_declares_what_the_service_needs() -> None:
    unit = _unit()
    assert unit["Type"] == "notify"
    assert unit["ExecReload"] == "kill -HUP $MAINPID"
    assert unit["Restart"] == "on-failure"
    assert set(unit["AmbientCapabilities"].split()) == {"CAP_NET_ADMIN", "CAP_NET_RAW"}
    assert unit["ExecStart"].split()[1:] == ["run", "-c", "/etc/tproxy/tproxy.toml"]


def _command(line: str, config: Path) -> list[str]:
    """The unit's command line with this checkout's tproxy and the test's config."""
    argv = shlex.split(line)
    assert argv[0].endswith("/tproxy")
    return [
        sys.executable,
        "-m",
        "tproxy",
        *(str(config) if a.endswith(".toml") else a for a in argv[1:]),
    ]


def _receive(sock: socket.socket, want: str, timeout: float = 20.0) -> list[str]:
    """Datagrams until one has the line ``want``; all their lines."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.settimeout(max(0.1, deadline - time.monotonic()))
        try:
            lines = sock.recv(4096).decode().splitlines()
        except TimeoutError:
            break
        seen += lines
        if want in lines:
            return seen
    raise AssertionError(f"no {want} from the service; got {seen}")


@pytest.mark.parametrize("workers", [1, 2])
def test_notifications_as_systemd_sees_them(tmp_path: Path, workers: int) -> None:
    unit = _unit()
    with echo_server() as echo:
        port = free_port()
        config = tmp_path / "tproxy.toml"
        config.write_text(
            f'mode = ["forward:127.0.0.1:{echo}@127.0.0.1:{port}"]\nworkers = {workers}\n'
            '[[interceptor]]\nspec = "label"\n'
        )
        check = subprocess.run(
            _command(unit["ExecStartPre"], config),
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
        )
        assert check.returncode == 0, check.stderr
        notify_path = tmp_path / "notify.sock"
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
            listener.bind(str(notify_path))
            argv = _command(unit["ExecStart"], config)
            proxy = Proxy(tmp_path, *argv[4:], env={"NOTIFY_SOCKET": str(notify_path)})
            try:
                assert "READY=1" in _receive(listener, "READY=1")
                assert echo_once(port, b"hi") == b"[tproxy] hi"  # ready means serving
                reload = unit["ExecReload"].replace("$MAINPID", str(proxy.proc.pid))
                subprocess.run(shlex.split(reload), check=True, timeout=10)
                got = _receive(listener, "RELOADING=1")
                assert any(line.startswith("MONOTONIC_USEC=") for line in got)
                _receive(listener, "READY=1")
                os.kill(proxy.proc.pid, getattr(signal, unit.get("KillSignal", "SIGTERM")))
                _receive(listener, "STOPPING=1")
                assert proxy.proc.wait(30) == 0, proxy.log
            finally:
                proxy.stop()
        if workers > 1:  # only the supervisor talks to systemd (NotifyAccess=main)
            assert "2 workers listening" in proxy.log

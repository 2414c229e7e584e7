"""A flow refused during its handshake is recorded with the time it really took.

The record of a refused flow used to start when the refusal was logged, so a
handshake that timed out after its full ``--handshake-timeout`` was logged
as ``duration=0.000s``.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from explicit_harness import connect, recv_all, running_proxy

TIMEOUT = 0.6


@pytest.mark.parametrize(("mode", "first"), [("socks", b"\x05"), ("http", b"GET http://")])
def test_a_handshake_timeout_lasts_its_timeout(tmp_path: Path, mode: str, first: bytes) -> None:
    with running_proxy(tmp_path, [mode], "--handshake-timeout", str(TIMEOUT)) as proxy:
        with connect(proxy.port(mode)) as sock:
            sock.sendall(first)
            recv_all(sock)  # the proxy answers (or not) and closes once the time is up
        log = proxy.wait_log("reason=timeout")
    [line] = [line for line in log.splitlines() if "reason=timeout" in line]
    duration = float(re.search(r"duration=([0-9.]+)s", line).group(1))  # type: ignore[union-attr]
    assert duration >= TIMEOUT * 0.9, line  # the deadline cannot pass earlier

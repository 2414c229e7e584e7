"""Out of descriptors (EMFILE): the accept loop says so once per interval, with a count.

``tproxy run`` runs a SOCKS door with a low ``RLIMIT_NOFILE``; clients open
connections and say nothing, so each holds one descriptor (its handshake
waits) and the descriptors run out at ``accept`` itself, while more clients
wait in the queue. (Flows that fail at once, such as a connect refused for
want of a descriptor, give theirs back and let the next accept through.)
The log gets one line for the whole episode (the loop retries ten times a
second), and one when accepting works again.
"""

from __future__ import annotations

import contextlib
import errno
import re
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio
import trio.testing
from explicit_harness import HANG_GUARD, REPLACE, free_port, stop, wait_port

from tproxy.server import ACCEPT_ERROR_INTERVAL, AcceptErrors

LIMIT = 64
"""Descriptors the proxy may have: a few dozen flows' worth."""


def low_limit() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (LIMIT, LIMIT))


def test_emfile_is_logged_once_per_interval_with_a_count(tmp_path: Path) -> None:
    log_path = tmp_path / "tproxy.log"
    port = free_port()
    with contextlib.ExitStack() as clients:
        argv = [sys.executable, "-m", "tproxy", "run", *REPLACE]
        argv += ["--mode", f"socks@127.0.0.1:{port}"]
        with log_path.open("wb") as log_file:
            proc = subprocess.Popen(
                argv, stdout=log_file, stderr=subprocess.STDOUT, preexec_fn=low_limit
            )
        try:
            wait_port("127.0.0.1", port, proc)
            # Each waiting handshake holds one descriptor: LIMIT clients use them up.
            for _ in range(LIMIT):
                sock = clients.enter_context(socket.create_connection(("127.0.0.1", port)))
                sock.settimeout(HANG_GUARD)
            deadline = time.monotonic() + HANG_GUARD
            while "Too many open files; retrying" not in log_path.read_text():
                assert time.monotonic() < deadline, log_path.read_text()
                time.sleep(0.05)
            time.sleep(2.5)  # some 25 retries of the accept loop
            during = log_path.read_text()
            clients.close()  # the handshakes end, descriptors come back: accepts work
            # The recovery is said at the first accept once the interval has passed.
            deadline = time.monotonic() + ACCEPT_ERROR_INTERVAL + HANG_GUARD
            while "works again" not in log_path.read_text():
                assert time.monotonic() < deadline, log_path.read_text()
                with socket.create_connection(("127.0.0.1", port)):
                    pass
                time.sleep(0.25)
            after = log_path.read_text()
        finally:
            stop(proc)
    failures = [line for line in during.splitlines() if "accept on" in line]
    assert len(failures) == 1, during
    assert "Too many open files; retrying" in failures[0]
    # The retries went on all along, unlogged, and the recovery line counts them.
    recovery = re.search(r"works again, after (\d+) more failure", after)
    assert recovery is not None and int(recovery.group(1)) >= 10, after
    assert "Traceback" not in after


@pytest.mark.trio
async def test_one_line_per_interval_and_the_count(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    errors = AcceptErrors("door", interval=10.0)
    emfile = OSError(errno.EMFILE, "Too many open files")
    for _ in range(30):  # three seconds of retries, every other accept succeeding
        errors.failed(emfile)
        await trio.sleep(0.05)
        errors.recovered()
        await trio.sleep(0.05)
    await trio.sleep(10)
    errors.failed(emfile)
    errors.recovered()  # too soon after the last line: said later
    await trio.sleep(11)
    assert errors.down
    errors.recovered()
    lines = [r.getMessage() for r in caplog.records if r.name == "tproxy.server"]
    assert lines == [
        "accept on door failed: Too many open files; retrying",
        "accept on door failed: Too many open files (30 failures since the last report); retrying",
        "accept on door works again",
    ]
    assert not errors.down

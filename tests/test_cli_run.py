"""`tproxy run` refuses bad arguments with one line and exit code 2, before listening."""

from __future__ import annotations

import subprocess
import sys

import pytest

BAD = [
    (["--read-size", "10"], "read size must be 1024.."),
    (["--read-size", str(32 * 2**20)], "read size must be 1024.."),
    (["--connect-timeout", "0"], "connect timeout must be positive"),
    (["--connect-timeout", "soon"], "invalid float value"),
    (["--idle-timeout", "-1"], "idle timeout must be positive"),
    (["--grace", "-1"], "grace period must not be negative"),
    (["--max-flows", "0"], "max flows must be at least 1"),
    (["--mark", str(2**32)], "mark must fit in 32 bits"),
    (["--mark", "red"], "is not a number"),
    (["--mode", "bogus@:1"], "unknown mode"),
    (["--mode", "transparent@[::1:9091"], "expected [IPv6]:PORT"),
    (["-i", "no-such-interceptor"], "no-such-interceptor"),
    (["-o", "a=b"], "comes before any -i"),
]


@pytest.mark.parametrize(("args", "message"), BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_run_argument_is_one_line_and_exit_2(args: list[str], message: str) -> None:
    # An unused port: if the check came after binding, this would listen.
    argv = [sys.executable, "-m", "tproxy", "run", "--mode", "transparent@127.0.0.1:1", *args]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert done.stdout == ""

"""With IPv6 disabled in a namespace, ``tproxy run`` says it drops its [::1] listener.

The default listeners are 127.0.0.1:9091 and [::1]:9091; where ::1 cannot be
bound (``net.ipv6.conf.all.disable_ipv6=1``) the second is left out, and a
gateway operator must learn that from the log, not from IPv6 clients that hang.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from nsharness import Namespace


def test_run_warns_once_that_it_drops_the_ipv6_listener(
    netns: Callable[[str], Namespace],
) -> None:
    ns = netns("v6off")
    ns.sysctl({"net.ipv6.conf.all.disable_ipv6": 1, "net.ipv6.conf.default.disable_ipv6": 1})
    proc = ns.popen(sys.executable, "-m", "tproxy", "run")
    ns.wait_port(9091, "127.0.0.1", proc=proc)
    ns.wait_log(proc, "listening: transparent@127.0.0.1:9091")
    ns.stop(proc)
    log = ns.read_log(proc)
    warnings = [line for line in log.splitlines() if "[::1]" in line]
    assert len(warnings) == 1, log
    assert "WARNING" in warnings[0] and "IPv6 is off" in warnings[0]
    assert "Traceback" not in log

"""sd_notify(3) with the standard library: tell systemd (``Type=notify``) how we are.

``READY=1`` once the listeners (and the ``--setup`` routing) are up,
``RELOADING=1`` with ``MONOTONIC_USEC`` when a SIGHUP reload begins (then
``READY=1`` again), ``STOPPING=1`` when the ordered shutdown begins. Without
``$NOTIFY_SOCKET`` (not started by systemd) every call does nothing.
"""

from __future__ import annotations

import os
import socket
import time

ENV = "NOTIFY_SOCKET"


def notify(*states: str) -> bool:
    """Send ``states`` (``"READY=1"``, ...) as one datagram; ``False`` if there is no socket."""
    address = os.environ.get(ENV)
    if not address:
        return False
    if address.startswith("@"):  # an abstract socket
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall("\n".join(states).encode())
    except OSError:
        return False
    return True


def ready(status: str = "") -> bool:
    return notify("READY=1", *([f"STATUS={status}"] if status else []))


def reloading() -> bool:
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return notify("RELOADING=1", f"MONOTONIC_USEC={usec}")


def stopping() -> bool:
    return notify("STOPPING=1")

"""Explicit modes answer each real connect failure with its own reply code.

One namespace holds the proxy and the failures, all made by the kernel
inside it, so no packet leaves: no route at all (network unreachable), an
``unreachable`` route (host unreachable), a ``prohibit`` route (EACCES, not
allowed), a veth pair whose far end swallows the SYN (a connect timeout),
and a resolver that nobody answers (unknown name). SOCKS5 gets 0x03, 0x04,
0x02, 0x06 and 0x04; HTTP 502 with the cause, or 504; SOCKS4 91.
"""

from __future__ import annotations

import errno
import socket
import struct
import sys
from collections.abc import Callable, Iterator

import pytest
from nsharness import Namespace, write_hosts

from tproxy.protocols.http_proxy import response_for_error

SOCKS_PORT = 1080
HTTP_PORT = 8080
NO_ROUTE = "203.0.113.1"
UNREACHABLE = "198.51.100.1"
PROHIBITED = "192.0.2.1"
SWALLOWED = "10.9.0.2"


@pytest.fixture
def failing(netns: Callable[..., Namespace]) -> Iterator[Namespace]:
    """A namespace with the failure routes and ``tproxy run`` (socks, http) inside."""
    ns = netns("explicit")
    # a veth pair inside the namespace: SYNs to SWALLOWED go out of "hole" to a
    # MAC nobody has, and the other end drops them
    ns.run("ip", "link", "add", "hole", "type", "veth", "peer", "name", "hole-end")
    ns.run("ip", "addr", "add", "10.9.0.1/24", "dev", "hole")
    ns.run("ip", "link", "set", "hole", "up")
    ns.run("ip", "link", "set", "hole-end", "up")
    ns.run("ip", "neigh", "add", SWALLOWED, "lladdr", "02:00:00:00:00:02", "dev", "hole",
           "nud", "permanent")  # fmt: skip
    ns.run("ip", "route", "add", "unreachable", "198.51.100.0/24")
    ns.run("ip", "route", "add", "prohibit", "192.0.2.0/24")
    write_hosts(ns, {"unreachable.test": UNREACHABLE})
    (ns.etc_dir() / "resolv.conf").write_text("nameserver 127.0.0.1\noptions attempts:1\n")
    proc = ns.popen(
        sys.executable, "-m", "tproxy", "run",
        "--mode", f"socks@127.0.0.1:{SOCKS_PORT}",
        "--mode", f"http@127.0.0.1:{HTTP_PORT}",
        "--connect-timeout", "0.5",
        log_name="tproxy",
    )  # fmt: skip
    ns.wait_port(SOCKS_PORT, "127.0.0.1", proc=proc)
    ns.wait_port(HTTP_PORT, "127.0.0.1", proc=proc)
    yield ns


def exchange(ns: Namespace, port: int, request: bytes) -> bytes:
    """Send ``request`` to the proxy in ``ns``; everything it answers before closing."""
    sock = ns.socket()
    with sock:
        sock.settimeout(10)
        sock.connect(("127.0.0.1", port))
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
        return data


def socks5_connect(host: str, port: int = 80) -> bytes:
    try:
        address = b"\x01" + socket.inet_aton(host)
    except OSError:
        address = bytes((3, len(host))) + host.encode()
    return b"\x05\x01\x00" + b"\x05\x01\x00" + address + struct.pack(">H", port)


@pytest.mark.parametrize(
    ("host", "code", "cause"),
    [
        (NO_ROUTE, 0x03, errno.ENETUNREACH),
        (UNREACHABLE, 0x04, errno.EHOSTUNREACH),
        ("unreachable.test", 0x04, errno.EHOSTUNREACH),
        (PROHIBITED, 0x02, errno.EACCES),
        (SWALLOWED, 0x06, errno.ETIMEDOUT),
        ("nowhere.invalid", 0x04, socket.gaierror()),
    ],
    ids=["no-route", "unreachable", "unreachable-name", "prohibited", "timeout", "unknown-name"],
)
def test_each_connect_failure_gets_its_own_reply(
    failing: Namespace, host: str, code: int, cause: int | Exception
) -> None:
    socks5 = exchange(failing, SOCKS_PORT, socks5_connect(host))
    assert socks5 == b"\x05\x00" + bytes((5, code, 0, 1)) + bytes(6)
    http = exchange(failing, HTTP_PORT, f"CONNECT {host}:80 HTTP/1.1\r\n\r\n".encode())
    assert http == response_for_error(cause)
    if "." in host and host[0].isdigit():
        socks4 = b"\x04\x01\x00\x50" + socket.inet_aton(host) + b"\x00"
        assert exchange(failing, SOCKS_PORT, socks4) == b"\x00\x5b" + bytes(6)

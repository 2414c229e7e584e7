"""Is anybody serving an installed plan? (``tproxy status``)

With rules installed and nothing listening on the TPROXY address and port,
diverted connections hang (SYNs are dropped, no RST). ``status`` therefore
looks, in the current network namespace (the one the record belongs to), for
a listening TCP socket (or a bound UDP socket, for ``--udp-port``) on the
plan's proxy address or a wildcard, through ``/proc/net/{tcp,udp}{,6}``
(no connection is made: that would be a flow in the proxy), and checks
whether the process recorded as the owner still runs.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

from .items import Family
from .plan import PlanRequest

_TCP_LISTEN = "0A"
_UDP_UNCONNECTED = "07"


@dataclass(frozen=True)
class Listener:
    """Whether something serves one (family, protocol) of a plan."""

    family: Family
    protocol: str
    address: str
    port: int
    listening: bool


def _decode(hex_address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    raw = bytes.fromhex(hex_address)
    # /proc/net prints each 32-bit word in host (little-endian) byte order.
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    return ipaddress.ip_address(words)


def bound_sockets(protocol: str, proc: Path = Path("/proc/net")) -> set[tuple[str, int]]:
    """(address, port) of every listening TCP or unconnected UDP socket in this namespace."""
    state = _TCP_LISTEN if protocol == "tcp" else _UDP_UNCONNECTED
    found: set[tuple[str, int]] = set()
    for name in (protocol, protocol + "6"):
        try:
            lines = (proc / name).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 4 or fields[3] != state:
                continue
            address, _, port = fields[1].partition(":")
            found.add((str(_decode(address)), int(port, 16)))
    return found


def serves(sockets: set[tuple[str, int]], family: Family, address: str, port: int) -> bool:
    """Whether one of ``sockets`` receives what TPROXY sends to ``address``:``port``."""
    wanted = {address, "::"} | ({"0.0.0.0", "::ffff:" + address} if family == 4 else set())
    return any(p == port and a in wanted for a, p in sockets)


def listeners(request: PlanRequest, proc: Path = Path("/proc/net")) -> list[Listener]:
    """For each family and protocol of the plan: does something listen where TPROXY sends?"""
    result = []
    for protocol, ports in (("tcp", request.ports), ("udp", request.udp_ports)):
        if not ports:
            continue
        sockets = bound_sockets(protocol, proc)
        for family in request.families:
            address = request.proxy_v4 if family == 4 else request.proxy_v6
            result.append(
                Listener(
                    family,
                    protocol,
                    address,
                    request.proxy_port,
                    serves(sockets, family, address, request.proxy_port),
                )
            )
    return result


def start_time(pid: int) -> str | None:
    """The start time of ``pid`` (clock ticks since boot), or None if it is gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    rest = stat[stat.rfind(")") + 2 :].split()
    if not rest or rest[0] in ("Z", "X"):
        return None
    return rest[19]


def process_alive(pid: int, started: str | None) -> bool:
    """Whether ``pid`` runs and (if ``started`` is known) is the same process, not a reuse."""
    now = start_time(pid)
    return now is not None and (started is None or now == started)

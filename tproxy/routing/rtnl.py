"""Just enough rtnetlink for our ip rules and local routes: add, delete, dump.

Four request kinds on one ``NETLINK_ROUTE`` socket, encoded with
:mod:`struct` (``linux/fib_rules.h``, ``linux/rtnetlink.h``). pyroute2 does
the same in general, but each of its requests costs a few milliseconds of
Python (an event loop and its message classes per call) against some
microseconds here, and ``setup`` makes nine of them (four changes, four
dumps and a link dump), the largest part of its time with the nft backend
(``docs/measurements.md``).

A socket stays in the network namespace it was opened in.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass

NETLINK_ROUTE = 0
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLM_F_DUMP = 0x300
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400
RTM_NEWROUTE, RTM_DELROUTE, RTM_GETROUTE = 24, 25, 26
RTM_NEWRULE, RTM_DELRULE, RTM_GETRULE = 32, 33, 34
FR_ACT_TO_TBL = 1
FRA_PRIORITY, FRA_FWMARK, FRA_TABLE, FRA_FWMASK, FRA_PROTOCOL = 6, 10, 15, 16, 21
RTA_DST, RTA_OIF, RTA_TABLE = 1, 4, 15
RTN_LOCAL = 2
RT_SCOPE_UNIVERSE, RT_SCOPE_HOST = 0, 254

_HEADER = struct.Struct("=IHHII")  # nlmsghdr: len, type, flags, seq, pid
_BODY = struct.Struct("=BBBBBBBBI")  # fib_rule_hdr and rtmsg have the same shape
_ATTR = struct.Struct("=HH")


class NetlinkError(OSError):
    """The kernel refused a request (``errno`` is set)."""


@dataclass(frozen=True)
class Message:
    """One rule or route of a dump: its fixed header fields and its attributes."""

    table: int  # the header's 8-bit table (RT_TABLE_UNSPEC when RTA/FRA_TABLE holds it)
    protocol: int  # rtmsg's protocol (routes); 0 for rules (theirs is FRA_PROTOCOL)
    kind: int  # rtmsg's type (routes) or fib_rule_hdr's action (rules)
    dst_len: int
    attrs: dict[int, bytes]

    def u32(self, kind: int, default: int = 0) -> int:
        value = self.attrs.get(kind)
        return struct.unpack("=I", value[:4])[0] if value and len(value) >= 4 else default

    def u8(self, kind: int, default: int = 0) -> int:
        value = self.attrs.get(kind)
        return value[0] if value else default


def _attr(kind: int, value: bytes) -> bytes:
    size = _ATTR.size + len(value)
    return _ATTR.pack(size, kind) + value + b"\0" * (-size % 4)


def _u32(kind: int, value: int) -> bytes:
    return _attr(kind, struct.pack("=I", value))


def _attrs(data: bytes) -> dict[int, bytes]:
    found: dict[int, bytes] = {}
    offset = 0
    while offset + _ATTR.size <= len(data):
        size, kind = _ATTR.unpack_from(data, offset)
        if size < _ATTR.size:
            break
        found[kind & 0x3FFF] = data[offset + _ATTR.size : offset + size]
        offset += (size + 3) & ~3
    return found


class Rtnl:
    """One ``NETLINK_ROUTE`` socket in the current network namespace."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE)
        self._sock.bind((0, 0))
        self._seq = 0

    def close(self) -> None:
        self._sock.close()

    def _send(self, kind: int, flags: int, payload: bytes) -> int:
        self._seq += 1
        header = _HEADER.pack(_HEADER.size + len(payload), kind, flags, self._seq, 0)
        self._sock.send(header + payload)
        return self._seq

    def _replies(self, seq: int) -> Iterator[tuple[int, bytes]]:
        """(type, payload) of each reply to request ``seq`` until its ack or dump end."""
        while True:
            data = self._sock.recv(1 << 16)
            offset = 0
            while offset + _HEADER.size <= len(data):
                size, kind, _, got, _ = _HEADER.unpack_from(data, offset)
                payload = data[offset + _HEADER.size : offset + size]
                offset += (size + 3) & ~3
                if got != seq:
                    continue  # a late reply to an earlier request that was given up
                if kind == NLMSG_ERROR:
                    code = -struct.unpack_from("=i", payload)[0]
                    if code:
                        raise NetlinkError(code, os.strerror(code))
                    return
                if kind == NLMSG_DONE:
                    return
                yield kind, payload

    def request(self, kind: int, body: bytes, attrs: bytes, create: bool = False) -> None:
        """Send one change and wait for the kernel's answer (:class:`NetlinkError` if refused)."""
        flags = NLM_F_REQUEST | NLM_F_ACK | (NLM_F_CREATE | NLM_F_EXCL if create else 0)
        for _ in self._replies(self._send(kind, flags, body + attrs)):
            pass

    def dump(self, kind: int, family: int) -> list[Message]:
        """Every rule (``RTM_GETRULE``) or route (``RTM_GETROUTE``, all tables) of a family."""
        seq = self._send(
            kind, NLM_F_REQUEST | NLM_F_DUMP, _BODY.pack(family, 0, 0, 0, 0, 0, 0, 0, 0)
        )
        found = []
        for _, payload in self._replies(seq):
            # rtmsg's protocol, scope, type are fib_rule_hdr's res1, res2, action
            _, dst_len, _, _, table, protocol, _, what, _ = _BODY.unpack_from(payload)
            if kind == RTM_GETRULE:
                protocol = 0
            found.append(Message(table, protocol, what, dst_len, _attrs(payload[_BODY.size :])))
        return found


def rule_message(
    family: int, fwmark: int, fwmask: int, table: int, priority: int, protocol: int
) -> tuple[bytes, bytes]:
    """fib_rule_hdr and attributes of ``fwmark MARK/MASK lookup TABLE priority P protocol N``."""
    body = _BODY.pack(family, 0, 0, 0, table if table < 256 else 0, 0, 0, FR_ACT_TO_TBL, 0)
    attrs = (
        _u32(FRA_TABLE, table)
        + _u32(FRA_PRIORITY, priority)
        + _u32(FRA_FWMARK, fwmark)
        + _u32(FRA_FWMASK, fwmask)
        + _attr(FRA_PROTOCOL, bytes([protocol]))
    )
    return body, attrs


def local_route_message(family: int, oif: int, table: int, protocol: int) -> tuple[bytes, bytes]:
    """rtmsg and attributes of ``local 0.0.0.0/0 dev OIF table TABLE proto N`` (or ``::/0``).

    An IPv4 local route needs host scope (the kernel answers EINVAL otherwise).
    """
    scope = RT_SCOPE_HOST if family == socket.AF_INET else RT_SCOPE_UNIVERSE
    body = _BODY.pack(family, 0, 0, 0, table if table < 256 else 0, protocol, scope, RTN_LOCAL, 0)
    return body, _u32(RTA_TABLE, table) + _u32(RTA_OIF, oif)


GONE = {errno.ENOENT, errno.ESRCH, errno.EADDRNOTAVAIL}

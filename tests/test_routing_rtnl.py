"""The rtnetlink messages of our ip rules and local routes, as bytes (the kernel's side is
checked with ``ip -j rule`` / ``ip -j route`` in ``netns-tests/test_routing.py``)."""

from __future__ import annotations

import socket
import struct

from tproxy.routing import rtnl


def test_rule_message_layout() -> None:
    body, attrs = rtnl.rule_message(socket.AF_INET6, 0x10, 0xF0, 300, 100, 116)
    # fib_rule_hdr: family, dst_len, src_len, tos, table (300 > 255: in FRA_TABLE), 2x res, action
    assert body == struct.pack("=BBBBBBBBI", socket.AF_INET6, 0, 0, 0, 0, 0, 0, 1, 0)
    parsed = rtnl.Message(0, 0, 1, 0, rtnl._attrs(attrs))
    assert (
        parsed.u32(rtnl.FRA_TABLE),
        parsed.u32(rtnl.FRA_PRIORITY),
        parsed.u32(rtnl.FRA_FWMARK),
        parsed.u32(rtnl.FRA_FWMASK),
        parsed.u8(rtnl.FRA_PROTOCOL),
    ) == (300, 100, 0x10, 0xF0, 116)
    assert len(attrs) % 4 == 0  # the one-byte protocol attribute is padded
    assert rtnl.rule_message(socket.AF_INET, 1, 1, 100, 100, 116)[0][4] == 100  # small: in hdr too


def test_local_route_message_layout() -> None:
    body, attrs = rtnl.local_route_message(socket.AF_INET, 1, 100, 116)
    family, dst_len, _, _, table, proto, scope, kind, _ = struct.unpack("=BBBBBBBBI", body)
    assert (family, dst_len, table, proto, scope, kind) == (
        socket.AF_INET,
        0,
        100,
        116,
        rtnl.RT_SCOPE_HOST,  # an IPv4 local route needs host scope
        rtnl.RTN_LOCAL,
    )
    parsed = rtnl.Message(table, proto, kind, dst_len, rtnl._attrs(attrs))
    assert (parsed.u32(rtnl.RTA_TABLE), parsed.u32(rtnl.RTA_OIF)) == (100, 1)
    assert struct.unpack("=BBBBBBBBI", rtnl.local_route_message(10, 1, 100, 116)[0])[6] == 0


def test_attributes_stop_at_a_malformed_length() -> None:
    good = rtnl._attr(rtnl.FRA_PRIORITY, struct.pack("=I", 7))
    assert rtnl._attrs(good + struct.pack("=HH", 2, 9)) == {rtnl.FRA_PRIORITY: struct.pack("=I", 7)}
    assert rtnl.Message(0, 0, 0, 0, {}).u32(rtnl.FRA_TABLE, 42) == 42

"""A small pcapng writer (the format of draft-ietf-opsawg-pcapng) built with ``struct``.

Only what a recording needs: one Section Header Block, Interface Description
Blocks (``LINKTYPE_RAW``: packets start with their IPv4 or IPv6 header;
microsecond timestamps, the default resolution) and Enhanced Packet Blocks,
each optionally with an ``opt_comment``. Everything is little-endian, as the
byte-order magic of the section says.
"""

from __future__ import annotations

import struct
from typing import BinaryIO

SHB = 0x0A0D0D0A
IDB = 0x00000001
EPB = 0x00000006
BYTE_ORDER_MAGIC = 0x1A2B3C4D
LINKTYPE_RAW = 101
LINKTYPE_ETHERNET = 1
OPT_END = 0
OPT_COMMENT = 1
IF_NAME = 2
SHB_USERAPPL = 4


def _pad(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % 4)


def options(*items: tuple[int, bytes]) -> bytes:
    """Encoded options (code, value) followed by ``opt_endofopt``; empty if none."""
    if not items:
        return b""
    out = b"".join(struct.pack("<HH", code, len(value)) + _pad(value) for code, value in items)
    return out + struct.pack("<HH", OPT_END, 0)


def block(block_type: int, body: bytes) -> bytes:
    """One block: type, total length, body (padded), total length again."""
    body = _pad(body)
    total = 12 + len(body)
    return struct.pack("<II", block_type, total) + body + struct.pack("<I", total)


def section_header(comment: str | None = None, application: str = "tproxy") -> bytes:
    opts = [(SHB_USERAPPL, application.encode())]
    if comment:
        opts.append((OPT_COMMENT, comment.encode()))
    body = struct.pack("<IHHq", BYTE_ORDER_MAGIC, 1, 0, -1) + options(*opts)
    return block(SHB, body)


def interface(linktype: int = LINKTYPE_RAW, name: str | None = None, snaplen: int = 0) -> bytes:
    opts = [(IF_NAME, name.encode())] if name else []
    return block(IDB, struct.pack("<HHI", linktype, 0, snaplen) + options(*opts))


def packet(data: bytes, timestamp: float, iface: int = 0, comment: str | None = None) -> bytes:
    """An Enhanced Packet Block; ``timestamp`` in seconds (microsecond resolution)."""
    usec = round(timestamp * 1_000_000)
    head = struct.pack("<IIIII", iface, usec >> 32, usec & 0xFFFFFFFF, len(data), len(data))
    opts = options((OPT_COMMENT, comment.encode())) if comment else b""
    return block(EPB, head + _pad(data) + opts)


class PcapngWriter:
    """Writes one section with one raw-IP interface to a binary file."""

    def __init__(self, out: BinaryIO, comment: str | None = None) -> None:
        self.out = out
        self.bytes_written = 0
        self._write(section_header(comment))
        self._write(interface(LINKTYPE_RAW, "tproxy"))

    def _write(self, data: bytes) -> None:
        self.out.write(data)
        self.bytes_written += len(data)

    def packet(self, data: bytes, timestamp: float, comment: str | None = None) -> None:
        self._write(packet(data, timestamp, 0, comment))

    def flush(self) -> None:
        self.out.flush()

    def close(self) -> None:
        self.out.close()

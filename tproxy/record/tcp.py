"""Synthetic TCP conversations: IPv4/IPv6 + TCP headers with correct checksums.

A :class:`Conversation` turns "the client sent these bytes" into the packets a
capture would have shown: the three-way handshake, MSS-sized segments with
sequence and acknowledgement numbers that add up, and FIN or RST at the end.
"""

from __future__ import annotations

import functools
import ipaddress
import struct
from collections.abc import Iterator

FIN, SYN, RST, PSH, ACK = 0x01, 0x02, 0x04, 0x08, 0x10
MSS_V4 = 1460
MSS_V6 = 1440
WINDOW = 65535


def checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071) of ``data``.

    The one's complement sum of 16-bit words is the number the bytes spell,
    modulo 0xFFFF (as 2**16 = 1 mod 0xFFFF), which Python computes in C: far
    faster than summing words one by one. A sum that is 0 modulo 0xFFFF is
    0xFFFF unless every byte is zero.
    """
    if len(data) % 2:
        data += b"\0"
    number = int.from_bytes(data, "big")
    folded = number % 0xFFFF
    if folded == 0 and number:
        folded = 0xFFFF
    return ~folded & 0xFFFF


def _checksum_by_words(data: bytes) -> int:
    """RFC 1071 word by word: the reference the tests hold :func:`checksum` to."""
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


@functools.lru_cache(maxsize=1024)
def _address(host: str) -> tuple[int, bytes]:
    ip = ipaddress.ip_address(host)
    return ip.version, ip.packed


def tcp_packet(
    src: tuple[str, int],
    dst: tuple[str, int],
    seq: int,
    ack: int,
    flags: int,
    payload: bytes = b"",
    *,
    ident: int = 0,
) -> bytes:
    """One IP packet carrying one TCP segment (IPv4 or IPv6 as the addresses are)."""
    s_version, s_packed = _address(src[0])
    d_version, d_packed = _address(dst[0])
    if s_version != d_version:
        raise ValueError("both ends must be of one address family")
    opts = b""
    if flags & SYN:  # MSS option, so the reader knows the segment size
        opts = struct.pack("!BBH", 2, 4, MSS_V4 if s_version == 4 else MSS_V6)
    offset = (20 + len(opts)) // 4
    header = (
        struct.pack(
            "!HHIIBBHHH",
            src[1],
            dst[1],
            seq & 0xFFFFFFFF,
            ack & 0xFFFFFFFF if flags & ACK else 0,
            offset << 4,
            flags,
            WINDOW,
            0,
            0,
        )
        + opts
    )
    segment = header + payload
    if s_version == 4:
        pseudo = s_packed + d_packed + struct.pack("!BBH", 0, 6, len(segment))
    else:
        pseudo = s_packed + d_packed + struct.pack("!IxxxB", len(segment), 6)
    csum = checksum(pseudo + segment)
    segment = segment[:16] + struct.pack("!H", csum) + segment[18:]
    if s_version == 4:
        ip = struct.pack(
            "!BBHHHBBH4s4s",
            0x45,
            0,
            20 + len(segment),
            ident & 0xFFFF,
            0x4000,
            64,
            6,
            0,
            s_packed,
            d_packed,
        )
        ip = ip[:10] + struct.pack("!H", checksum(ip)) + ip[12:]
        return ip + segment
    ip6 = struct.pack("!IHBB16s16s", 6 << 28, len(segment), 6, 64, s_packed, d_packed)
    return ip6 + segment


class Conversation:
    """One TCP connection between ``client`` and ``server``, as packets.

    ``next_*`` are the sequence numbers each end sends next; every packet
    acknowledges everything the other end sent so far.
    """

    def __init__(
        self,
        client: tuple[str, int],
        server: tuple[str, int],
        *,
        client_isn: int = 0x10000000,
        server_isn: int = 0x20000000,
    ) -> None:
        self.client = client
        self.server = server
        self.mss = MSS_V4 if ipaddress.ip_address(client[0]).version == 4 else MSS_V6
        self.next_client = client_isn
        self.next_server = server_isn
        self._ident = 0
        self.closed_client = False
        self.closed_server = False

    def _pkt(self, from_client: bool, flags: int, payload: bytes = b"") -> bytes:
        self._ident += 1
        if from_client:
            seq, ack, src, dst = self.next_client, self.next_server, self.client, self.server
        else:
            seq, ack, src, dst = self.next_server, self.next_client, self.server, self.client
        return tcp_packet(src, dst, seq, ack, flags, payload, ident=self._ident)

    def handshake(self) -> Iterator[bytes]:
        yield self._pkt(True, SYN)
        self.next_client += 1
        syn_ack = self._pkt(False, SYN | ACK)
        self.next_server += 1
        yield syn_ack
        yield self._pkt(True, ACK)

    def data(self, from_client: bool, payload: bytes) -> Iterator[bytes]:
        """MSS-sized segments of ``payload`` in one direction."""
        for start in range(0, len(payload), self.mss):
            chunk = payload[start : start + self.mss]
            yield self._pkt(from_client, PSH | ACK, chunk)
            if from_client:
                self.next_client += len(chunk)
            else:
                self.next_server += len(chunk)

    def skip(self, from_client: bool, count: int) -> None:
        """Advance a direction's sequence over bytes not recorded (a size cap)."""
        if from_client:
            self.next_client += count
        else:
            self.next_server += count

    def fin(self, from_client: bool) -> Iterator[bytes]:
        if self.closed_client if from_client else self.closed_server:
            return
        yield self._pkt(from_client, FIN | ACK)
        if from_client:
            self.next_client += 1
            self.closed_client = True
        else:
            self.next_server += 1
            self.closed_server = True

    def rst(self, from_client: bool) -> Iterator[bytes]:
        yield self._pkt(from_client, RST | ACK)
        self.closed_client = self.closed_server = True

#!/usr/bin/env python3
"""Echo server that reports the peer address it sees; a test peer for tproxy.

TCP: for each connection it first sends ``PEER <ip> <port>\\n`` with the
client address as the server sees it, then echoes everything until the
client's EOF, then half-closes its side and closes. This is how end-to-end
tests check that a transparent proxy connected from the client's own address.

UDP (``--udp``): each datagram is answered with ``PEER <ip> <port>\\n``
followed by the datagram's payload.

IPv4-mapped IPv6 peers (``::ffff:a.b.c.d`` on a dual-stack ``::`` socket) are
reported as plain IPv4. Each connection is logged on stdout as ``CONNECT``
and ``CLOSE`` lines. Standard library only, so it runs under any Python 3.11.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import socket
import sys


def peer_text(addr: tuple) -> str:
    """``"<ip> <port>"`` for a socket address, IPv4-mapped IPv6 unmapped."""
    ip = ipaddress.ip_address(addr[0].split("%", 1)[0])
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return f"{ip} {addr[1]}"


def bind_socket(host: str, port: int, kind: int) -> socket.socket:
    """A socket bound to host:port; ``::`` also accepts IPv4 (dual stack)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, kind)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.bind((host, port))
    return sock


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Report the peer, echo until EOF, half-close."""
    peer = peer_text(writer.get_extra_info("peername"))
    print(f"CONNECT {peer}", flush=True)
    total = 0
    try:
        writer.write(f"PEER {peer}\n".encode())
        await writer.drain()
        while data := await reader.read(65536):
            total += len(data)
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
        await writer.drain()
    except OSError as exc:
        print(f"ERROR {peer} {exc}", flush=True)
    finally:
        print(f"CLOSE {peer} {total}", flush=True)
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass


class UdpEcho(asyncio.DatagramProtocol):
    """Answer each datagram with the PEER line and the payload."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        peer = peer_text(addr)
        print(f"DATAGRAM {peer} {len(data)}", flush=True)
        self.transport.sendto(f"PEER {peer}\n".encode() + data, addr)


async def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="::")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--udp", action="store_true")
    args = parser.parse_args(argv)
    loop = asyncio.get_running_loop()
    if args.udp:
        sock = bind_socket(args.host, args.port, socket.SOCK_DGRAM)
        await loop.create_datagram_endpoint(UdpEcho, sock=sock)
        print(f"LISTEN udp {args.host} {args.port}", flush=True)
        await asyncio.Event().wait()
    sock = bind_socket(args.host, args.port, socket.SOCK_STREAM)
    server = await asyncio.start_server(handle, sock=sock, backlog=1024)
    print(f"LISTEN tcp {args.host} {args.port}", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    try:
        asyncio.run(main(sys.argv[1:]))
    except KeyboardInterrupt:
        pass

#!/usr/bin/env python3
"""A small authoritative DNS server over UDP (dnspython); a test peer for tproxy.

Answers from a fixed table given as ``--record NAME=ADDRESS`` (A or AAAA by
the address), NXDOMAIN for names it does not know, and ``whoami.test TXT``
with the client address it sees, as ``"<ip> <port>"``. Each query is logged
on stdout as ``QUERY <ip> <port> <name> <type>`` (IPv4-mapped addresses
unmapped), so tests can check that a transparent proxy kept the client's
address and port. Listens on ``--host`` (``::`` also takes IPv4).
"""

from __future__ import annotations

import argparse
import ipaddress
import socket
import sys

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset


def plain(address: tuple) -> tuple[str, int]:
    ip = ipaddress.ip_address(address[0].split("%", 1)[0])
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ip), address[1]


def answer(query: dns.message.Message, table: dict[str, list[str]], peer: tuple[str, int]) -> bytes:
    reply = dns.message.make_response(query)
    reply.flags |= dns.flags.AA
    for q in query.question:
        name = q.name.to_text(omit_final_dot=True).lower()
        if name == "whoami.test" and q.rdtype == dns.rdatatype.TXT:
            reply.answer.append(
                dns.rrset.from_text(q.name, 0, "IN", "TXT", f'"{peer[0]} {peer[1]}"')
            )
        elif name in table:
            version = 4 if q.rdtype == dns.rdatatype.A else 6
            found = [a for a in table[name] if ipaddress.ip_address(a).version == version]
            if found and q.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
                reply.answer.append(dns.rrset.from_text_list(q.name, 300, "IN", q.rdtype, found))
        elif name != "whoami.test":
            reply.set_rcode(dns.rcode.NXDOMAIN)
    return reply.to_wire()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="::")
    parser.add_argument("--port", type=int, default=53)
    parser.add_argument("--record", action="append", default=[], metavar="NAME=ADDRESS")
    args = parser.parse_args()
    table: dict[str, list[str]] = {}
    for item in args.record:
        name, _, address = item.partition("=")
        table.setdefault(name.lower().rstrip("."), []).append(str(ipaddress.ip_address(address)))
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.bind((args.host, args.port))
    print(f"LISTEN udp {args.host} {args.port}", flush=True)
    while True:
        data, source = sock.recvfrom(65535)
        peer = plain(source)
        try:
            query = dns.message.from_wire(data)
        except Exception as exc:
            print(f"BAD {peer[0]} {peer[1]} {exc!r}", flush=True)
            continue
        for q in query.question:
            print(
                f"QUERY {peer[0]} {peer[1]} {q.name} {dns.rdatatype.to_text(q.rdtype)}", flush=True
            )
        sock.sendto(answer(query, table, peer), source)


if __name__ == "__main__":
    sys.exit(main())

"""SOCKS5 UDP ASSOCIATE: a datagram relay that lives as long as its TCP control connection.

The relay has one socket facing the client, bound to the address the
client reached the proxy on (its port is sent in the success reply), and
one unbound socket per address family facing the destinations:

- a datagram from the client carries a SOCKS5 UDP header naming its
  destination; the header is parsed (malformed or fragmented datagrams are
  dropped), the destination checked against the rules, a name resolved and
  its addresses checked, and the payload sent on from the outward socket;
- a datagram arriving on an outward socket from an address the client
  sent to is wrapped in a header naming that address and sent to the
  client; datagrams from anyone else are dropped.

Only datagrams from the control connection's client IP are taken (and from
the port named in the request, when it named one; otherwise the first
datagram's port is kept), as RFC 1928 requires. The association ends when
the control connection closes (or fails), on an idle timeout, or at
shutdown. It is one flow record (mode ``socks-udp``), counted in the
engine's live flows; its byte counters are payload bytes. Interceptors work
on byte streams and do not see datagrams.
"""

from __future__ import annotations

import logging
import socket
import time

import trio

from ..flow import Address, EndReason, FlowRecord
from ..protocols import (
    DatagramError,
    SocksHandshake,
    SocksRequest,
    build_udp_datagram,
    parse_udp_datagram,
)
from ..sockets import SO_MARK, family_of
from .accepted import Accepted
from .handshake import close_after_reply, send_reply
from .upstream import is_ip_literal

log = logging.getLogger("tproxy.explicit")
flow_log = logging.getLogger("tproxy.flow")

MAX_DATAGRAM = 65535
MAX_PEERS = 4096
"""Remembered destinations (whose answers are let through) per association."""
MAX_NAMES = 256
"""Resolved names cached per association."""
MODE = "socks-udp"
ANY_DESTINATION: Address = ("*", 0)


class UdpAssociation:
    """The relay state of one UDP ASSOCIATE."""

    def __init__(
        self, accepted: Accepted, relay: trio.socket.SocketType, request: SocksRequest
    ) -> None:
        self.accepted = accepted
        self.relay = relay
        self.client_ip = accepted.client[0]
        self.client_port: int | None = request.port or None
        self.outward: dict[int, trio.socket.SocketType] = {}
        self.peers: dict[Address, None] = {}
        self.names: dict[str, list[str]] = {}
        self.last_activity = time.monotonic()
        self.record: FlowRecord | None = None

    async def run(self, record: FlowRecord) -> None:
        """Relay until the control connection ends (or idle timeout, or cancellation)."""
        self.record = record
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._from_client)
                nursery.start_soon(self._watch_control)
                if self.accepted.engine.config.idle_timeout is not None:
                    nursery.start_soon(self._watch_idle)
        finally:
            for sock in self.outward.values():
                sock.close()

    def _end(self, reason: EndReason, detail: str = "") -> None:
        assert self.record is not None
        self.record.end(reason, detail, now=time.monotonic())
        self._nursery.cancel_scope.cancel()

    async def _watch_control(self) -> None:
        """The association ends with its TCP control connection; data on it is ignored."""
        stream = self.accepted.stream
        while True:
            try:
                data = await stream.receive_some(4096)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                self._end(EndReason.RESET, f"control connection failed: {exc!r}")
                return
            if not data:
                self._end(EndReason.EOF, "control connection closed")
                return

    async def _watch_idle(self) -> None:
        idle = self.accepted.engine.config.idle_timeout
        assert idle is not None
        while True:
            deadline = self.last_activity + idle
            now = time.monotonic()
            if now >= deadline:
                self._end(EndReason.TIMEOUT, f"idle for {idle:g}s")
                return
            await trio.sleep(deadline - now)

    async def _from_client(self) -> None:
        while True:
            packet, source = await self.relay.recvfrom(MAX_DATAGRAM)
            if source[0] != self.client_ip or (
                self.client_port is not None and source[1] != self.client_port
            ):
                log.debug("UDP relay: dropped a datagram from %s", source[:2])
                continue
            self.client_port = source[1]
            try:
                datagram = parse_udp_datagram(packet)
            except DatagramError as exc:
                log.debug("UDP relay: dropped a datagram: %s", exc)
                continue
            decision = self.accepted.settings.policy.check_destination(datagram.host, datagram.port)
            if not decision:
                log.info("UDP relay: dropped a datagram: %s", decision.reason)
                continue
            target = await self._address_of(datagram.host)
            if target is None:
                continue
            destination = (target, datagram.port)
            try:
                sock = await self._outward(family_of(target))
                await sock.sendto(datagram.data, destination)
            except OSError as exc:
                log.debug("UDP relay: cannot send to %s: %s", destination, exc)
                continue
            assert self.record is not None
            self.record.bytes_up += len(datagram.data)
            self.last_activity = time.monotonic()
            self._remember(destination)

    async def _address_of(self, host: str) -> str | None:
        """The first allowed address of ``host``, or ``None`` (the datagram is dropped)."""
        if is_ip_literal(host):
            addresses = [host]
        elif host in self.names:
            addresses = self.names[host]
        else:
            try:
                infos = await trio.socket.getaddrinfo(host, None, type=socket.SOCK_DGRAM)
            except (socket.gaierror, ValueError) as exc:  # ValueError: IDNA, NUL
                log.debug("UDP relay: cannot resolve %r: %s", host, exc)
                return None
            addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
            if len(self.names) >= MAX_NAMES:
                self.names.clear()
            self.names[host] = addresses
        policy = self.accepted.settings.policy
        allowed = next((ip for ip in addresses if policy.check_resolved(ip)), None)
        if allowed is None:
            log.info("UDP relay: dropped a datagram to %s: denied address", host)
        return allowed

    def _remember(self, destination: Address) -> None:
        self.peers.pop(destination, None)
        self.peers[destination] = None
        if len(self.peers) > MAX_PEERS:
            del self.peers[next(iter(self.peers))]

    async def _outward(self, family: int) -> trio.socket.SocketType:
        sock = self.outward.get(family)
        if sock is None:
            sock = trio.socket.socket(family, socket.SOCK_DGRAM)
            mark = self.accepted.engine.config.mark
            if mark is not None:
                sock.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)
            await sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", 0))
            self.outward[family] = sock
            self._nursery.start_soon(self._from_destinations, sock)
        return sock

    async def _from_destinations(self, sock: trio.socket.SocketType) -> None:
        while True:
            try:
                data, source = await sock.recvfrom(MAX_DATAGRAM)
            except OSError as exc:
                # an ICMP error of an earlier datagram (ECONNREFUSED...): nothing to relay
                log.debug("UDP relay: %s", exc)
                continue
            peer = (str(source[0]), int(source[1]))
            if peer not in self.peers or self.client_port is None:
                log.debug("UDP relay: dropped a datagram from %s", peer)
                continue
            try:
                await self.relay.sendto(
                    build_udp_datagram(peer[0], peer[1], data), (self.client_ip, self.client_port)
                )
            except OSError as exc:
                log.debug("UDP relay: cannot send to the client: %s", exc)
                continue
            assert self.record is not None
            self.record.bytes_down += len(data)
            self.last_activity = time.monotonic()


async def serve_udp_associate(
    accepted: Accepted, handshake: SocksHandshake, request: SocksRequest
) -> None:
    """Answer a UDP ASSOCIATE with the relay's address and relay until the control ends."""
    stream = accepted.stream
    local_ip = str(stream.socket.getsockname()[0])
    relay = trio.socket.socket(family_of(local_ip), socket.SOCK_DGRAM)
    try:
        try:
            await relay.bind((local_ip, 0))
        except OSError as exc:
            accepted.reject(EndReason.ERROR, f"UDP relay: {exc}", ANY_DESTINATION)
            await close_after_reply(stream, handshake.reply_failure(exc))
            return
        bound = relay.getsockname()
        association = UdpAssociation(accepted, relay, request)
        with accepted.engine.track(accepted.flow(ANY_DESTINATION, MODE)) as record:
            if not await send_reply(stream, handshake.reply_success((bound[0], bound[1]))):
                record.end(EndReason.RESET, "client went away", now=time.monotonic())
                return
            await association.run(record)
    finally:
        relay.close()
        await trio.aclose_forcefully(stream)

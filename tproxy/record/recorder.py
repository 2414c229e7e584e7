"""The sans-io flow recorder and the ``--record`` option.

The tap interface (what a relay calls for each flow it records):

- ``feed(side, stage, data)``: ``side`` is where the bytes came *from*
  (``"client"`` or ``"server"``); ``stage`` is ``"read"`` (as received from
  that side, before the interceptors) or ``"delivered"`` (as written to the
  other side, after them). Call it in the order things happened.
- ``end(reason)``: the flow ended with this end reason (``eof`` closes both
  conversations with FIN, anything else with RST).

A flow whose bytes no interceptor changed is one TCP conversation (client
to destination). A flow with changed bytes is two, each marked in its first
packet's comment: the *client side* (what the client sent, and what it was
delivered) and the *server side* (what the server was delivered, and what it
sent), so a change made by an interceptor shows as a difference between them.
The server side is held back (up to :data:`HOLD_MAX` bytes of packets) until
the flow ends or the two sides differ; a server side equal to its client side
is dropped at the end. (Held packets keep their timestamps, so the file may
hold them out of time order.)
The server side's client address is the outgoing flow's source; where that
equals the client's address and port (transparent mode's default) its port
is changed (top bit flipped) so that readers keep the two streams apart.
"""

from __future__ import annotations

import argparse
import hashlib
import ipaddress
import logging
import os
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, BinaryIO, Literal, Protocol

from ..flow import Address, FlowInfo, format_address
from .pcapng import PcapngWriter
from .tcp import Conversation

log = logging.getLogger("tproxy.record")

Side = Literal["client", "server"]
Stage = Literal["read", "delivered"]

HOLD_MAX = 4 * 2**20
"""How much of a server side that equals its client side is held back (then written)."""

UNKNOWN_HOST_V4 = "240.0.0.1"
"""The server address written for a destination given by name (reserved space)."""


class FlowTap(Protocol):
    """What a relay calls for one recorded flow (see the module docstring)."""

    def feed(self, side: Side, stage: Stage, data: bytes) -> None: ...

    def end(self, reason: str) -> None: ...


class Sink(Protocol):
    def packet(self, data: bytes, timestamp: float, comment: str | None = None) -> None: ...


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--record`` and ``--record-max-bytes`` to ``run``'s parser."""
    group = parser.add_argument_group("recording")
    group.add_argument(
        "--record",
        default=None,
        metavar="PATH",
        help="write every flow to PATH as pcapng (synthetic TCP; PATH.pcapng: one file, a "
        "directory: one file per flow). Recorded flows are copied, never spliced",
    )
    group.add_argument(
        "--record-max-bytes",
        type=_size,
        default=None,
        metavar="BYTES",
        help="record at most BYTES of data per flow (both ways, all conversations)",
    )


def _size(text: str) -> int:
    match = re.fullmatch(r"(\d+)\s*([kKmMgG]?)i?[bB]?", text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (e.g. 1048576, 64k, 10M)")
    value: int = int(match.group(1)) * 1024 ** " kmg".index(match.group(2).lower() or " ")
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None


def _pair(client: Address, server: Address) -> tuple[Address, Address]:
    """Two endpoints of one family (IPv4 in IPv6 as ``::ffff:a.b.c.d`` when mixed)."""
    c_ip = _ip(client[0]) or ipaddress.ip_address(UNKNOWN_HOST_V4)
    s_ip = _ip(server[0]) or ipaddress.ip_address(UNKNOWN_HOST_V4)
    if c_ip.version != s_ip.version:
        c_ip = c_ip if c_ip.version == 6 else ipaddress.IPv6Address(f"::ffff:{c_ip}")
        s_ip = s_ip if s_ip.version == 6 else ipaddress.IPv6Address(f"::ffff:{s_ip}")
    return (str(c_ip), int(client[1])), (str(s_ip), int(server[1]))


class Recorder:
    """Turns one flow's tap events into packets on ``sink``."""

    def __init__(
        self,
        sink: Sink,
        info: FlowInfo,
        interceptors: Sequence[str] = (),
        *,
        via: Address | None = None,
        max_bytes: int | None = None,
        clock: Callable[[], float] = time.time,
        on_end: Callable[[], None] | None = None,
    ) -> None:
        self.sink = sink
        self.info = info
        self.max_bytes = max_bytes
        self.clock = clock
        self.on_end = on_end
        self.recorded = 0
        self.truncated = False
        self.ended = False
        chain = ", ".join(interceptors) or "none"
        about = (
            f"tproxy flow {info.id} mode={info.mode} client={format_address(info.client)} "
            f"destination={format_address(info.destination)} interceptors: {chain}"
        )
        client, server = _pair(info.client, info.destination)
        self.client_side = Conversation(client, server)
        self.server_side: Conversation | None = None
        self._first: dict[int, str] = {}
        if interceptors:
            source = via or info.client
            b_client, b_server = _pair(source, info.destination)
            if b_client == client:
                b_client = (b_client[0], b_client[1] ^ 0x8000 or 1)
            self.server_side = Conversation(
                b_client, b_server, client_isn=0x30000000, server_isn=0x40000000
            )
            self._first[id(self.client_side)] = (
                f"{about}; CLIENT SIDE: what the client sent and what it was delivered"
            )
            self._first[id(self.server_side)] = (
                f"{about}; SERVER SIDE: what the server was delivered and what it sent "
                f"(from {format_address(source)})"
            )
        else:
            self._first[id(self.client_side)] = about
        self._held: list[tuple[bytes, float, str | None]] | None = None
        """The server side's packets, held back while it still equals the client side."""
        self._held_bytes = 0
        self._digests: list[Any] = []
        if self.server_side is not None:
            self._held = []
            self._digests = [hashlib.sha256() for _ in range(4)]
        for conv in self._conversations():
            self._emit(conv, conv.handshake())

    def _conversations(self) -> list[Conversation]:
        return [c for c in (self.client_side, self.server_side) if c is not None]

    def _emit(self, conv: Conversation, packets: Any, comment: str | None = None) -> None:
        now = self.clock()
        held = self._held if conv is self.server_side else None
        for pkt in packets:
            first = self._first.pop(id(conv), None)
            note = "; ".join(n for n in (first, comment) if n) or None
            comment = None
            if held is None:
                self.sink.packet(pkt, now, note)
                continue
            held.append((pkt, now, note))
            self._held_bytes += len(pkt)
            if self._held_bytes > HOLD_MAX:
                self._release()
                held = None

    def _release(self) -> None:
        """Write the held server side: it differs, or holding it costs too much memory."""
        held, self._held = self._held, None
        for pkt, ts, note in held or ():
            self.sink.packet(pkt, ts, note)

    # -- the tap --------------------------------------------------------------

    def feed(self, side: Side, stage: Stage, data: bytes) -> None:
        """Bytes ``side`` sent (``read``) or that reached the other side (``delivered``)."""
        if self.ended or not data:
            return
        from_client = side == "client"
        if self.server_side is None:
            if stage != "read":
                return  # without interceptors, delivered is what was read
            conv = self.client_side
        elif (stage == "read") == from_client:
            conv = self.client_side  # client read / server delivered: the client's view
        else:
            conv = self.server_side
        data = bytes(data)
        if self._held is not None:
            index = (0 if from_client else 2) + (stage == "delivered")
            self._digests[index].update(data)
        room = len(data) if self.max_bytes is None else max(0, self.max_bytes - self.recorded)
        keep, skip = data[:room], len(data) - min(room, len(data))
        if keep:
            self.recorded += len(keep)
            self._emit(conv, conv.data(from_client, keep))
        if skip:
            conv.skip(from_client, skip)
            if not self.truncated:
                self.truncated = True
                log.debug("flow %d: recording truncated at %d bytes", self.info.id, self.recorded)

    def end(self, reason: str) -> None:
        """Close both conversations: FIN both ways on ``eof``, else RST."""
        if self.ended:
            return
        self.ended = True
        note = f"flow {self.info.id} ended: {reason}"
        if self._held is not None:
            up_read, up_delivered, down_read, down_delivered = (d.digest() for d in self._digests)
            if up_read == up_delivered and down_read == down_delivered:
                self._held = None  # the interceptors changed nothing: one conversation
                self.server_side = None
                note += "; the interceptors changed no byte (one conversation)"
            else:
                self._release()
        if self.truncated:
            note += f"; recording truncated at {self.max_bytes} bytes (--record-max-bytes)"
        for conv, client_view in ((self.client_side, True), (self.server_side, False)):
            if conv is None:
                continue
            if reason == "eof":
                self._emit(conv, conv.fin(True), note)
                self._emit(conv, conv.fin(False))
            else:
                # the client side sees the proxy's reset come from the server, the
                # server side sees it come from the client
                self._emit(conv, conv.rst(not client_view), note)
        if self.on_end is not None:
            self.on_end()


class Recording:
    """``--record PATH``: where recordings go; makes one :class:`Recorder` per flow.

    PATH ending in ``.pcapng`` (or an existing file) is one file for all
    flows; anything else is a directory with ``flow-<id>.pcapng`` per flow.
    A worker of ``--workers N`` writes ``NAME.w<I>.pcapng`` instead of one
    shared file.
    """

    def __init__(self, path: str, max_bytes: int | None = None, worker: str | None = None) -> None:
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.per_flow = not (path.endswith(".pcapng") or self.path.is_file())
        self._shared: PcapngWriter | None = None
        if self.per_flow:
            self.path.mkdir(parents=True, exist_ok=True)
        else:
            if worker is not None:
                self.path = self.path.with_name(f"{self.path.stem}.{worker}{self.path.suffix}")
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._shared = PcapngWriter(_open(self.path), comment="tproxy recording")

    def tap_for(
        self, info: FlowInfo, interceptors: Sequence[str], via: Address | None = None
    ) -> Recorder:
        """The tap of one flow (the engine calls ``feed``/``end`` on it)."""
        if self._shared is not None:
            shared = self._shared
            return Recorder(
                shared, info, interceptors, via=via, max_bytes=self.max_bytes, on_end=shared.flush
            )
        writer = PcapngWriter(
            _open(self.path / f"flow-{info.id}.pcapng"), comment=f"tproxy flow {info.id}"
        )
        return Recorder(
            writer, info, interceptors, via=via, max_bytes=self.max_bytes, on_end=writer.close
        )

    def close(self) -> None:
        if self._shared is not None:
            self._shared.close()
            self._shared = None

    def relay_tap(self, info: FlowInfo, interceptors: Sequence[str]) -> RelayTap:
        """The recorder of one flow as the relay's tap (the engine's ``tap_for``)."""
        return RelayTap(self.tap_for(info, interceptors, via=info.via))


def _open(path: Path) -> BinaryIO:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    return os.fdopen(fd, "wb")


_SIDE_NAMES: tuple[Side, Side] = ("client", "server")
"""The relay's side numbers (:data:`tproxy.relay.core.CLIENT` 0, ``SERVER`` 1) as names."""


class RelayTap:
    """A :class:`Recorder` fed by the relay core (:class:`tproxy.relay.core.FlowTap`).

    The core reports bytes read from a side, and bytes handed to a side for
    writing (after the interceptors); the recorder wants where bytes came
    *from*, so what is delivered to one side came from the other. A tapped
    flow is copied through user space, never spliced.
    """

    __slots__ = ("recorder",)

    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder

    def on_read(self, side: int, data: bytes) -> None:
        self.recorder.feed(_SIDE_NAMES[side], "read", data)

    def on_deliver(self, side: int, data: bytes) -> None:
        self.recorder.feed(_SIDE_NAMES[1 - side], "delivered", data)

    def on_end(self, reason: str) -> None:
        self.recorder.end(reason)

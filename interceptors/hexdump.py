"""``hexdump``: log each direction's data as a classic hex dump, forward it unchanged.

Records go to the logger ``tproxy.hexdump`` at INFO level, one record per read
(a header line with the flow id, direction, size and stream offset, then the
dump lines), so they stay together in the log. Logging is bounded per flow and
direction by ``max-bytes``; once every logged direction is over its limit the
interceptor calls :meth:`~tproxy.Interceptor.passthrough`, so the engine can
relay the rest of the flow on its fast path.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

from tproxy.flow import FlowInfo, format_address
from tproxy.interceptor import Interceptor
from tproxy.options import CLIENT, SERVER, normalize, parse_direction, parse_int

logger = logging.getLogger("tproxy.hexdump")

_ARROWS = {CLIENT: "client->server", SERVER: "server->client"}
_PRINTABLE = bytes(b if 0x20 <= b < 0x7F else 0x2E for b in range(256))


def hexdump(data: bytes, offset: int = 0) -> list[str]:
    """Format ``data`` as ``hexdump -C`` does: offset, 16 hex bytes, ASCII column.

    ``offset`` is the position of ``data[0]`` in the stream, shown in the
    first column so that successive reads line up.
    """
    lines = []
    for i in range(0, len(data), 16):
        row = data[i : i + 16]
        hexes = " ".join(f"{b:02x}" for b in row[:8])
        if len(row) > 8:
            hexes += "  " + " ".join(f"{b:02x}" for b in row[8:])
        text = row.translate(_PRINTABLE).decode("ascii")
        lines.append(f"{offset + i:08x}  {hexes:<48}  |{text}|")
    return lines


@dataclass(frozen=True)
class HexdumpOptions:
    """Checked options of :class:`Hexdump`."""

    directions: frozenset[str] = frozenset({CLIENT, SERVER})
    max_bytes: int | None = 65536
    """Bytes logged per flow and direction; ``None``: no limit."""


class Hexdump(Interceptor):
    """Log data as hex dumps; forward everything unchanged.

    Options: ``direction`` ``client`` | ``server`` | ``both`` (default both),
    ``max-bytes`` per flow and direction (default 65536; ``none`` for no
    limit). When every logged direction has reached ``max-bytes``, logging
    stops and the flow goes to passthrough.
    """

    options: HexdumpOptions

    @classmethod
    def parse_options(cls, options: Mapping[str, str]) -> HexdumpOptions:
        opts = normalize("hexdump", options, {"direction", "max-bytes"})
        default = HexdumpOptions()
        directions = (
            parse_direction("hexdump", opts["direction"])
            if "direction" in opts
            else default.directions
        )
        max_bytes = default.max_bytes
        if "max-bytes" in opts:
            raw = opts["max-bytes"].strip().lower()
            max_bytes = (
                None
                if raw in ("none", "unlimited")
                else parse_int("hexdump", "max-bytes", raw, minimum=1)
            )
        return HexdumpOptions(directions=directions, max_bytes=max_bytes)

    def __init__(self, flow: FlowInfo, options: HexdumpOptions | None = None) -> None:
        super().__init__(flow, options if options is not None else HexdumpOptions())
        self.seen = {CLIENT: 0, SERVER: 0}
        """Bytes seen so far per direction (all of them, logged or not)."""

    def start(self) -> None:
        logger.info(
            "flow %d hexdump start client=%s dst=%s",
            self.flow.id,
            format_address(self.flow.client),
            format_address(self.flow.destination),
        )
        self._check_done()

    def client_data(self, data: bytes) -> bytes:
        self._log(CLIENT, data)
        return data

    def server_data(self, data: bytes) -> bytes:
        self._log(SERVER, data)
        return data

    def client_eof(self) -> bytes:
        self._log_eof(CLIENT)
        return b""

    def server_eof(self) -> bytes:
        self._log_eof(SERVER)
        return b""

    def end(self, reason: str) -> None:
        logger.info(
            "flow %d hexdump end reason=%s up=%d down=%d",
            self.flow.id,
            reason,
            self.seen[CLIENT],
            self.seen[SERVER],
        )

    # -- internals ------------------------------------------------------

    def _remaining(self, direction: str) -> int | None:
        """Bytes still to log in ``direction`` (``None``: no limit)."""
        if direction not in self.options.directions:
            return 0
        if self.options.max_bytes is None:
            return None
        return max(0, self.options.max_bytes - self.seen[direction])

    def _log(self, direction: str, data: bytes) -> None:
        remaining = self._remaining(direction)
        offset = self.seen[direction]
        self.seen[direction] += len(data)
        if remaining == 0:
            return
        shown = data if remaining is None else data[:remaining]
        if logger.isEnabledFor(logging.INFO):
            header = (
                f"flow {self.flow.id} {_ARROWS[direction]} {len(data)} bytes at offset {offset}"
            )
            lines = [header, *hexdump(shown, offset)]
            if len(shown) < len(data):
                lines.append(
                    f"... max-bytes={self.options.max_bytes} reached, "
                    f"{len(data) - len(shown)} bytes of this read and the rest "
                    f"of {_ARROWS[direction]} not shown"
                )
            logger.info("%s", "\n".join(lines))
        self._check_done()

    def _log_eof(self, direction: str) -> None:
        if self._remaining(direction) != 0:
            logger.info(
                "flow %d %s eof after %d bytes",
                self.flow.id,
                _ARROWS[direction],
                self.seen[direction],
            )

    def _check_done(self) -> None:
        """Go to passthrough once no direction has anything left to log."""
        if all(self._remaining(d) == 0 for d in (CLIENT, SERVER)):
            self.passthrough()

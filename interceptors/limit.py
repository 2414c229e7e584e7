"""``limit``: let a number of bytes through, then close the flow politely.

The bytes are counted per chosen direction; the read that reaches ``bytes``
is cut there, and the flow is closed at once (a FIN to both ends, like a
server that stops after a size limit, or a download cut short). ``bytes=0``
closes the flow at the first byte in a chosen direction.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from tproxy.flow import FlowInfo
from tproxy.options import CLIENT, SERVER

from ._fault import Common, Fault, parse_common, parse_size, require_one

NAME = "limit"


@dataclass(frozen=True)
class LimitOptions:
    """Checked options of :class:`Limit`."""

    limit: int
    common: Common = field(default_factory=Common)


class Limit(Fault):
    """Close the flow once ``bytes`` bytes went through a chosen direction.

    Options: ``bytes`` (required; ``64k`` style suffixes allowed), and the
    common ``direction`` (default ``server``), ``toxicity``, ``seed``.
    """

    NAME = NAME
    options: LimitOptions

    @classmethod
    def parse_options(cls, options: Mapping[str, str]) -> LimitOptions:
        opts, common = parse_common(NAME, options, {"bytes"})
        require_one(NAME, opts, ["bytes"])
        return LimitOptions(limit=parse_size(NAME, "bytes", opts["bytes"]), common=common)

    def __init__(self, flow: FlowInfo, options: LimitOptions) -> None:
        super().__init__(flow, options)
        self.passed = {CLIENT: 0, SERVER: 0}
        """Bytes let through per direction."""
        self.reached = False
        """The limit was reached and the flow is closing: nothing more passes."""

    def _count(self, side: str, data: bytes) -> bytes:
        if self.reached:
            return b""
        if not self.affects(side):
            return data
        room = self.options.limit - self.passed[side]
        data = data[:room]
        self.passed[side] += len(data)
        if self.passed[side] >= self.options.limit:
            self.reached = True
            self.close(f"limit: {self.options.limit} bytes from the {side}")
        return data

    def client_data(self, data: bytes) -> bytes:
        return self._count(CLIENT, data)

    def server_data(self, data: bytes) -> bytes:
        return self._count(SERVER, data)

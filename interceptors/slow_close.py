"""``slow-close``: delay the end of stream (the FIN) by some milliseconds.

Data passes unchanged and at once; when a chosen side finishes sending, its
end of stream is held ``delay`` ms before the other end is half-closed
(toxiproxy's ``slow_close``), which finds clients that wait for the close
instead of the length.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from tproxy.options import CLIENT, SERVER

from ._fault import Common, Fault, parse_common, parse_ms, require_one

NAME = "slow-close"


@dataclass(frozen=True)
class SlowCloseOptions:
    """Checked options of :class:`SlowClose`."""

    delay: float
    """Seconds the end of stream is held."""
    common: Common = field(default_factory=Common)


class SlowClose(Fault):
    """Hold each chosen side's end of stream for ``delay`` ms.

    Options: ``delay`` (ms, required), and the common ``direction`` (default
    ``server``: the server's FIN reaches the client late), ``toxicity``,
    ``seed``.
    """

    NAME = NAME
    options: SlowCloseOptions

    @classmethod
    def parse_options(cls, options: Mapping[str, str]) -> SlowCloseOptions:
        opts, common = parse_common(NAME, options, {"delay"})
        require_one(NAME, opts, ["delay"])
        return SlowCloseOptions(delay=parse_ms(NAME, "delay", opts["delay"]), common=common)

    def _slow(self, side: str) -> bytes:
        if self.affects(side):
            self.hold_eof(side)
            self.call_later(self.options.delay, lambda: self.hold_eof(side, False))
        return b""

    def client_eof(self) -> bytes:
        return self._slow(CLIENT)

    def server_eof(self) -> bytes:
        return self._slow(SERVER)

"""``blackhole``: swallow data, and optionally close the flow after a timeout.

Data in the chosen directions is dropped as it arrives (nothing is kept),
so the peer waiting for it runs into its own read timeout. An end of stream
still passes: a peer that closes ends the flow as usual. With
``timeout=MS``, the flow is closed politely (a FIN both ways) that long
after it started, like toxiproxy's ``timeout`` toxic; without it (or 0),
the flow stays open.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from tproxy.flow import FlowInfo
from tproxy.options import CLIENT, SERVER

from ._fault import Common, Fault, parse_common, parse_ms

NAME = "blackhole"


@dataclass(frozen=True)
class BlackholeOptions:
    """Checked options of :class:`Blackhole`."""

    timeout: float = 0.0
    """Seconds after the start until the flow is closed; 0 for never."""
    common: Common = field(default_factory=Common)


class Blackhole(Fault):
    """Drop the data of the chosen directions; close after ``timeout`` ms if given.

    Options: ``timeout`` (ms, default 0: never close), and the common
    ``direction`` (default ``server``), ``toxicity``, ``seed``.
    """

    NAME = NAME
    options: BlackholeOptions

    @classmethod
    def parse_options(cls, options: Mapping[str, str]) -> BlackholeOptions:
        opts, common = parse_common(NAME, options, {"timeout"})
        timeout = parse_ms(NAME, "timeout", opts["timeout"]) if "timeout" in opts else 0.0
        return BlackholeOptions(timeout=timeout, common=common)

    def __init__(self, flow: FlowInfo, options: BlackholeOptions) -> None:
        super().__init__(flow, options)
        self.swallowed = {CLIENT: 0, SERVER: 0}
        """Bytes dropped per direction."""

    def begin(self) -> None:
        if self.options.timeout > 0:
            self.call_later(self.options.timeout, self._timeout)

    def _timeout(self) -> None:
        self.close(f"blackhole: closed after {self.options.timeout * 1000:g} ms")

    def _swallow(self, side: str, data: bytes) -> bytes:
        if not self.affects(side):
            return data
        self.swallowed[side] += len(data)
        return b""

    def client_data(self, data: bytes) -> bytes:
        return self._swallow(CLIENT, data)

    def server_data(self, data: bytes) -> bytes:
        return self._swallow(SERVER, data)

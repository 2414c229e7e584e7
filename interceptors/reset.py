"""``reset``: reset the flow (both ends) after some bytes or some time.

With ``bytes=N``, the first ``N`` bytes of a chosen direction go through,
then both ends are reset (``SO_LINGER`` 0: the client sees
``ECONNRESET``). With ``after=MS``, both ends are reset ``MS`` milliseconds
after the flow started, whatever passed. With both, whichever comes first;
with neither, the flow is reset as soon as it is connected.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from tproxy.flow import FlowInfo
from tproxy.options import CLIENT, SERVER

from ._fault import Common, Fault, parse_common, parse_ms, parse_size

NAME = "reset"


@dataclass(frozen=True)
class ResetOptions:
    """Checked options of :class:`Reset`."""

    limit: int | None = None
    after: float | None = None
    """Seconds after the start."""
    common: Common = field(default_factory=Common)


class Reset(Fault):
    """Reset both ends after ``bytes`` bytes in a chosen direction, or ``after`` ms.

    Options: ``bytes``, ``after`` (ms), and the common ``direction`` (default
    ``server``; only ``bytes`` counts per direction), ``toxicity``, ``seed``.
    """

    NAME = NAME
    options: ResetOptions

    @classmethod
    def parse_options(cls, options: Mapping[str, str]) -> ResetOptions:
        opts, common = parse_common(NAME, options, {"bytes", "after"})
        return ResetOptions(
            limit=parse_size(NAME, "bytes", opts["bytes"]) if "bytes" in opts else None,
            after=parse_ms(NAME, "after", opts["after"]) if "after" in opts else None,
            common=common,
        )

    def __init__(self, flow: FlowInfo, options: ResetOptions) -> None:
        super().__init__(flow, options)
        self.passed = {CLIENT: 0, SERVER: 0}
        self.due = False
        """The reset is decided (it happens on the next timer round)."""

    def begin(self) -> None:
        opts = self.options
        if opts.limit is None and opts.after is None:
            self.abort("reset: at connect")
        if opts.after is not None:
            self.call_later(opts.after, self._reset_after)
        if opts.limit == 0:
            self._reset_soon()

    def _reset_after(self) -> None:
        assert self.options.after is not None
        self.abort(f"reset: after {self.options.after * 1000:g} ms")

    def _reset_soon(self) -> None:
        # Not abort() here: what this call returns must reach the peer before the reset.
        if not self.due:
            self.due = True
            self.call_later(0, self._reset_now)

    def _reset_now(self) -> None:
        self.abort(f"reset: after {self.options.limit} bytes")

    def _count(self, side: str, data: bytes) -> bytes:
        limit = self.options.limit
        if self.due:
            return b""
        if limit is None or not self.affects(side):
            return data
        data = data[: limit - self.passed[side]]
        self.passed[side] += len(data)
        if self.passed[side] >= limit:
            self._reset_soon()
        return data

    def client_data(self, data: bytes) -> bytes:
        return self._count(CLIENT, data)

    def server_data(self, data: bytes) -> bytes:
        return self._count(SERVER, data)

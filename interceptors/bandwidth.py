"""``bandwidth``: pace data to a rate, with backpressure instead of buffering.

Data leaves in slices (``rate/50`` bytes, between 1 byte and 64 KiB), each
released when a link of ``rate`` bytes per second would have finished
sending it: ``n`` bytes arriving at an idle link come out over ``n/rate``
seconds. While ``max-queue`` bytes or more wait, the sender is not read, so
a bulk transfer is slowed by TCP backpressure and the proxy holds at most
``max-queue`` plus one read per direction, however large the transfer.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from tproxy.flow import FlowInfo

from ._fault import Common, Lane, LaneFault, parse_common, parse_rate, parse_size, require_one

NAME = "bandwidth"
MAX_SLICE = 64 * 1024


@dataclass(frozen=True)
class BandwidthOptions:
    """Checked options of :class:`Bandwidth`."""

    rate: float
    """Bytes per second."""
    max_queue: int = 64 * 1024
    common: Common = field(default_factory=Common)

    @property
    def slice(self) -> int:
        """Bytes released per timer round: about 50 rounds a second."""
        return max(1, min(MAX_SLICE, int(self.rate / 50)))


class Bandwidth(LaneFault):
    """Limit each chosen direction to ``rate`` bytes per second.

    Options: ``rate`` (required; ``100k`` = 102400 bytes/s, suffixes ``k m g``
    in powers of 1024), ``max-queue`` (default ``64k``), and the common
    ``direction`` (default ``server``), ``toxicity``, ``seed``.
    """

    NAME = NAME
    ONE_PER_ROUND = True
    options: BandwidthOptions

    @classmethod
    def parse_options(cls, options: Mapping[str, str]) -> BandwidthOptions:
        opts, common = parse_common(NAME, options, {"rate", "max-queue"})
        require_one(NAME, opts, ["rate"])
        max_queue = (
            parse_size(NAME, "max-queue", opts["max-queue"], minimum=1)
            if "max-queue" in opts
            else BandwidthOptions.max_queue
        )
        return BandwidthOptions(
            rate=parse_rate(NAME, "rate", opts["rate"]), max_queue=max_queue, common=common
        )

    def __init__(self, flow: FlowInfo, options: BandwidthOptions) -> None:
        super().__init__(flow, options)
        self.free_at: dict[str, float] = {}
        """When each direction's virtual link finishes what it was given."""

    def lane_opened(self, side: str) -> None:
        self.free_at[side] = self.now()

    def queue(self, lane: Lane, side: str, data: bytes) -> None:
        rate, size = self.options.rate, self.options.slice
        free_at = max(self.free_at[side], self.now())
        for i in range(0, len(data), size):
            piece = data[i : i + size]
            free_at += len(piece) / rate
            lane.push(free_at, piece)
        self.free_at[side] = free_at

"""``slicer``: cut data into small pieces sent one by one, with a pause between them.

Each chunk read is cut into slices of ``size`` ± ``variation`` bytes (uniform,
at least 1) and the slices leave one per timer round, ``delay`` ms apart
(with ``delay=0``, one after the other as separate writes). The bytes are
unchanged; only how they are cut changes, which finds parsers that assume a
message arrives in one read. An end of stream follows the last slice, and
while ``max-queue`` bytes or more wait, the sender is not read.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from tproxy.interceptor import OptionError
from tproxy.options import parse_int

from ._fault import Common, Lane, LaneFault, parse_common, parse_ms, parse_size

NAME = "slicer"


@dataclass(frozen=True)
class SlicerOptions:
    """Checked options of :class:`Slicer`."""

    size: int = 64
    variation: int = 0
    delay: float = 0.0
    """Seconds between two slices."""
    max_queue: int = 64 * 1024
    common: Common = field(default_factory=Common)


class Slicer(LaneFault):
    """Deliver data in slices of ``size`` ± ``variation`` bytes, ``delay`` ms apart.

    Options: ``size`` (average bytes, default 64), ``variation`` (bytes,
    default 0, less than ``size``), ``delay`` (ms between slices, default
    0), ``max-queue`` (default ``64k``), and the common ``direction``
    (default ``server``), ``toxicity``, ``seed``.
    """

    NAME = NAME
    ONE_PER_ROUND = True
    options: SlicerOptions

    @classmethod
    def parse_options(cls, options: Mapping[str, str]) -> SlicerOptions:
        opts, common = parse_common(NAME, options, {"size", "variation", "delay", "max-queue"})
        default = SlicerOptions()
        size = parse_int(NAME, "size", opts["size"], minimum=1) if "size" in opts else default.size
        variation = parse_int(NAME, "variation", opts["variation"]) if "variation" in opts else 0
        if variation >= size:
            raise OptionError(f"{NAME}: variation ({variation}) must be less than size ({size})")
        return SlicerOptions(
            size=size,
            variation=variation,
            delay=parse_ms(NAME, "delay", opts["delay"]) if "delay" in opts else 0.0,
            max_queue=(
                parse_size(NAME, "max-queue", opts["max-queue"], minimum=1)
                if "max-queue" in opts
                else default.max_queue
            ),
            common=common,
        )

    def queue(self, lane: Lane, side: str, data: bytes) -> None:
        opts = self.options
        # The first slice leaves now, or ``delay`` after the previous one.
        due = max(self.now(), lane.last_due + opts.delay)
        i = 0
        while i < len(data):
            size = opts.size
            if opts.variation:
                size += self.rng.randint(-opts.variation, opts.variation)
            lane.push(due, data[i : i + size])
            i += size
            due += opts.delay

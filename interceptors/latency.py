"""``latency``: delay every chunk by a fixed time plus jitter, keeping the order.

Each read of the engine is one chunk; a chunk read at ``t`` is delivered at
``t + ms ± jitter`` (uniform), never before the chunk read ahead of it, so
the stream keeps its order and only its timing changes. An end of stream
follows the last delayed chunk. While ``max-queue`` bytes or more wait, the
sender is not read (TCP backpressure), so a fast sender is slowed to about
``max-queue`` bytes per ``ms`` instead of the proxy buffering without limit.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from tproxy.interceptor import OptionError

from ._fault import Common, Lane, LaneFault, parse_common, parse_ms, parse_size, require_one

NAME = "latency"


@dataclass(frozen=True)
class LatencyOptions:
    """Checked options of :class:`Latency` (times in seconds)."""

    delay: float
    jitter: float = 0.0
    max_queue: int = 1024 * 1024
    common: Common = field(default_factory=Common)


class Latency(LaneFault):
    """Delay data by ``ms`` milliseconds (± ``jitter``), per chunk, in order.

    Options: ``ms`` (required), ``jitter`` (ms, default 0), ``max-queue``
    (default ``1m``), and the common ``direction`` (default ``server``),
    ``toxicity``, ``seed``.
    """

    NAME = NAME
    options: LatencyOptions

    @classmethod
    def parse_options(cls, options: Mapping[str, str]) -> LatencyOptions:
        opts, common = parse_common(NAME, options, {"ms", "jitter", "max-queue"})
        require_one(NAME, opts, ["ms"])
        delay = parse_ms(NAME, "ms", opts["ms"])
        jitter = parse_ms(NAME, "jitter", opts["jitter"]) if "jitter" in opts else 0.0
        if jitter > delay:
            raise OptionError(f"{NAME}: jitter ({jitter * 1000:g} ms) must not exceed ms")
        max_queue = (
            parse_size(NAME, "max-queue", opts["max-queue"], minimum=1)
            if "max-queue" in opts
            else LatencyOptions.max_queue
        )
        return LatencyOptions(delay=delay, jitter=jitter, max_queue=max_queue, common=common)

    def queue(self, lane: Lane, side: str, data: bytes) -> None:
        delay = self.options.delay
        if self.options.jitter:
            delay += self.rng.uniform(-self.options.jitter, self.options.jitter)
        lane.push(self.now() + delay, data)

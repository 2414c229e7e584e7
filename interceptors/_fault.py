"""What the fault interceptors share: direction, toxicity, a seeded RNG, delay queues.

Every fault (``latency``, ``bandwidth``, ``slicer``, ``limit``, ``reset``,
``blackhole``, ``slow-close``) takes:

- ``direction``: ``client`` (alias ``upstream``: bytes the client sends),
  ``server`` (alias ``downstream``: bytes the server sends; the default, as
  in toxiproxy) or ``both``;
- ``toxicity``: the probability (0..1, default 1) that a flow is affected at
  all, drawn once per flow; an unaffected flow goes passthrough at once;
- ``seed``: an integer that makes the draws (toxicity, jitter, slice sizes)
  repeatable: each flow's generator is seeded with ``seed`` and the flow id.

Sizes and rates take ``k``, ``m``, ``g`` suffixes in powers of 1024, like
curl's ``--limit-rate`` (``64k`` = 65536 bytes, ``100k`` = 102400 bytes/s);
durations are milliseconds, fractions allowed.
"""

from __future__ import annotations

import math
import random
import re
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from tproxy.flow import FlowInfo
from tproxy.interceptor import Interceptor, OptionError
from tproxy.options import CLIENT, SERVER, normalize, parse_direction
from tproxy.timers import TimerHandle

COMMON = frozenset({"direction", "toxicity", "seed"})
"""The option keys every fault accepts."""

_ALIASES = {"upstream": CLIENT, "downstream": SERVER}
_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}
_EPSILON = 1e-9
"""Clock slack when comparing a due time with now (float sums of delays)."""


@dataclass(frozen=True)
class Common:
    """The options every fault shares, checked."""

    directions: frozenset[str] = frozenset({SERVER})
    toxicity: float = 1.0
    seed: int | None = None


def parse_common(
    name: str, options: Mapping[str, str], allowed: Iterable[str]
) -> tuple[dict[str, str], Common]:
    """Normalise ``options`` (``allowed`` keys and the common ones); parse the common ones."""
    opts = normalize(name, options, set(allowed) | COMMON)
    directions = Common.directions
    if "direction" in opts:
        value = opts["direction"].strip().lower()
        directions = parse_direction(name, _ALIASES.get(value, value))
    toxicity = 1.0
    if "toxicity" in opts:
        toxicity = parse_float(name, "toxicity", opts["toxicity"])
        if not 0.0 <= toxicity <= 1.0:
            raise OptionError(f"{name}: toxicity must be between 0 and 1, not {toxicity:g}")
    seed = None
    if "seed" in opts:
        try:
            seed = int(opts["seed"].strip(), 10)
        except ValueError:
            raise OptionError(f"{name}: seed must be an integer, not {opts['seed']!r}") from None
    return opts, Common(directions=directions, toxicity=toxicity, seed=seed)


def parse_float(name: str, key: str, value: str) -> float:
    """A finite decimal number."""
    try:
        number = float(value.strip())
    except ValueError:
        raise OptionError(f"{name}: {key} must be a number, not {value!r}") from None
    if not math.isfinite(number):
        raise OptionError(f"{name}: {key} must be a finite number, not {value!r}")
    return number


def parse_ms(name: str, key: str, value: str) -> float:
    """Milliseconds (``200``, ``0.5``) -> seconds; at least 0."""
    number = parse_float(name, key, value)
    if number < 0:
        raise OptionError(f"{name}: {key} must be at least 0 ms, not {number:g}")
    return number / 1000.0


def parse_size(name: str, key: str, value: str, *, minimum: int = 0) -> int:
    """``4096``, ``64k``, ``1m``, ``1.5m`` (powers of 1024) -> bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmg]?)(?:i?b)?\s*", value.lower())
    if match is None:
        raise OptionError(f"{name}: {key} must be a size such as 4096, 64k or 1m, not {value!r}")
    number = int(float(match.group(1)) * _UNITS[match.group(2)])
    if number < minimum:
        raise OptionError(f"{name}: {key} must be at least {minimum} bytes, not {value!r}")
    return number


def parse_rate(name: str, key: str, value: str) -> float:
    """``100k`` (bytes per second, powers of 1024; ``/s`` allowed) -> bytes/s, above 0."""
    text = value.strip().lower().removesuffix("/s")
    rate = parse_size(name, key, text, minimum=0)
    if rate <= 0:
        raise OptionError(f"{name}: {key} must be above 0 bytes/s, not {value!r}")
    return float(rate)


def require_one(name: str, opts: Mapping[str, str], required: Iterable[str]) -> None:
    """Raise when none of ``required`` is among ``opts``."""
    required = list(required)
    if not any(key in opts for key in required):
        raise OptionError(f"{name}: give {' or '.join(f'{k}=' for k in required)}")


class Fault(Interceptor):
    """Base of the fault interceptors: toxicity, directions, a per-flow RNG.

    Subclasses set ``NAME`` and override :meth:`begin` (called from
    :meth:`start` in affected flows only).
    """

    NAME = "fault"
    common: Common

    def __init__(self, flow: FlowInfo, options: object) -> None:
        super().__init__(flow, options)
        self.common = getattr(options, "common", Common())
        seed = self.common.seed
        self.rng = random.Random(f"{seed}:{flow.id}") if seed is not None else random.Random()
        """This flow's generator: toxicity, jitter, slice sizes."""
        self.affected = False
        """Whether the toxicity draw chose this flow."""

    def start(self) -> None:
        toxicity = self.common.toxicity
        self.affected = toxicity >= 1.0 or self.rng.random() < toxicity
        if not self.affected:
            self.passthrough()
            return
        self.begin()

    def begin(self) -> None:
        """The flow is affected: set up timers and state."""

    def affects(self, side: str) -> bool:
        """Whether this fault applies to the bytes ``side`` sends."""
        return side in self.common.directions


class LaneFault(Fault):
    """A fault that queues the data of each affected direction in a :class:`Lane`.

    Subclasses say how one chunk is queued (:meth:`queue`) and whether a
    lane releases one chunk per timer round (``ONE_PER_ROUND``); the data
    and end-of-stream hooks, and unaffected directions passing through, are
    here once. ``options.max_queue`` bounds each lane.
    """

    ONE_PER_ROUND = False

    def __init__(self, flow: FlowInfo, options: object) -> None:
        super().__init__(flow, options)
        self.lanes: dict[str, Lane] = {}

    def begin(self) -> None:
        max_queue = self.options.max_queue
        for side in (CLIENT, SERVER):
            if self.affects(side):
                self.lanes[side] = Lane(self, side, max_queue, one_per_round=self.ONE_PER_ROUND)
                self.lane_opened(side)

    def lane_opened(self, side: str) -> None:
        """``side``'s lane was made (the flow is affected): set up per-side state."""

    def queue(self, lane: Lane, side: str, data: bytes) -> None:
        """Queue ``data`` that ``side`` sent on ``lane``, with its release time(s)."""
        raise NotImplementedError

    def _take(self, side: str, data: bytes) -> bytes:
        lane = self.lanes.get(side)
        if lane is None:
            return data
        self.queue(lane, side, data)
        return b""

    def client_data(self, data: bytes) -> bytes:
        return self._take(CLIENT, data)

    def server_data(self, data: bytes) -> bytes:
        return self._take(SERVER, data)

    def client_eof(self) -> bytes:
        if CLIENT in self.lanes:
            self.lanes[CLIENT].eof()
        return b""

    def server_eof(self) -> bytes:
        if SERVER in self.lanes:
            self.lanes[SERVER].eof()
        return b""


class Lane:
    """One direction's queue of chunks that wait for their release time.

    ``push(due, data)`` queues; a timer releases every chunk whose time came
    (with ``one_per_round``, one chunk per timer round, so each goes out as
    its own write) and injects it onward from the interceptor's place. The
    sender's reading is held while ``max_queue`` bytes or more wait. An end
    of stream that comes while chunks wait is held until the last went out.
    """

    def __init__(
        self, owner: Interceptor, side: str, max_queue: int, *, one_per_round: bool = False
    ) -> None:
        self.owner = owner
        self.side = side
        self.max_queue = max_queue
        self.one_per_round = one_per_round
        self.chunks: deque[tuple[float, bytes]] = deque()
        self.queued = 0
        """Bytes waiting."""
        self.peak = 0
        """The most bytes that ever waited at once."""
        self.last_due = -math.inf
        """The release time of the newest chunk (releases never go backwards)."""
        self.timer: TimerHandle | None = None
        self.eof_held = False
        self._holding = False

    def push(self, due: float, data: bytes) -> None:
        due = max(due, self.last_due)
        self.last_due = due
        self.chunks.append((due, data))
        self.queued += len(data)
        self.peak = max(self.peak, self.queued)
        self._hold()
        self._arm()

    def eof(self) -> None:
        """The sender finished: hold its end of stream while chunks wait."""
        if self.chunks:
            self.eof_held = True
            self.owner.hold_eof(self.side)

    def _arm(self) -> None:
        if self.timer is None and self.chunks:
            delay = max(0.0, self.chunks[0][0] - self.owner.now())
            self.timer = self.owner.call_later(delay, self._release)

    def _release(self) -> None:
        self.timer = None
        now = self.owner.now() + _EPSILON
        out = []
        while self.chunks and self.chunks[0][0] <= now:
            out.append(self.chunks.popleft()[1])
            if self.one_per_round:
                break
        data = b"".join(out)
        self.queued -= len(data)
        if data:
            if self.side == CLIENT:
                self.owner.inject_to_server(data)
            else:
                self.owner.inject_to_client(data)
        self._hold()
        self._arm()
        if self.eof_held and not self.chunks:
            self.eof_held = False
            self.owner.hold_eof(self.side, False)

    def _hold(self) -> None:
        holding = self.queued >= self.max_queue
        if holding != self._holding:
            self._holding = holding
            self.owner.hold_reading(self.side, holding)

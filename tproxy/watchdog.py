"""The stall watchdog: say when something holds the event loop, and who.

Every flow of a process shares one event loop (and the splice hub's epoll
loop): an interceptor hook that blocks (``time.sleep``, a synchronous HTTP
call, a heavy computation) freezes every other flow and every new
connection for as long as it runs. Nothing fails, so without this module
nothing would be logged.

Two measurements, one report:

- the interceptor chain reads ``time.perf_counter()`` around each hook call
  and calls :func:`hook_ended` when the hook took longer than the threshold
  (so may any other loop that calls hooks). It is reported by name:
  interceptor class, hook, flow id, duration.
- :class:`LoopInstrument`, a trio instrument, times every task step. A step
  that held the loop longer than the threshold and was not already reported
  as a hook is reported with the task's name.

Reports are one ``WARNING`` line each on the ``tproxy.watchdog`` logger, at
most one per :attr:`StallWatch.interval` seconds; the ones in between are
counted and the next line says how many were held back. :func:`stall_count`
is the total, for metrics and the final summary.

The threshold is ``tproxy run --stall-warn MS`` (default 100 ms; 0 turns
the watchdog off). The cost when nothing stalls: two ``perf_counter`` calls
per hook and per task step.
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import trio

log = logging.getLogger("tproxy.watchdog")

DEFAULT_THRESHOLD_MS = 100.0
DEFAULT_INTERVAL = 10.0
"""At most one stall line per this many seconds; the rest are counted."""


@dataclass
class StallWatch:
    """The threshold, the rate limit and the counters of one process's watchdog."""

    threshold: float = DEFAULT_THRESHOLD_MS / 1000
    """Seconds a hook or task step may hold the loop before it is reported; 0 = off."""
    interval: float = DEFAULT_INTERVAL
    count: int = 0
    """Stalls seen since the process started (reported or held back)."""
    held_back: int = 0
    """Stalls seen since the last line, not logged on their own."""
    last_line: float = field(default=-float("inf"))
    blamed_at: float = 0.0
    """``perf_counter`` of the last hook stall reported (so its task step is not reported twice)."""

    @property
    def enabled(self) -> bool:
        return self.threshold > 0

    def report(self, seconds: float, culprit: str) -> None:
        """Count one stall of ``seconds`` caused by ``culprit``; log it unless rate-limited."""
        self.count += 1
        now = time.monotonic()
        if now - self.last_line < self.interval:
            self.held_back += 1
            return
        more = f" (+{self.held_back} more since the last report)" if self.held_back else ""
        log.warning(
            "event loop stalled %.0f ms by %s: every flow of this process waited "
            "(stall #%d, --stall-warn %.0f ms)%s",
            seconds * 1000,
            culprit,
            self.count,
            self.threshold * 1000,
            more,
        )
        self.last_line = now
        self.held_back = 0


WATCH = StallWatch()
"""This process's watchdog (one event loop per process)."""


def configure(threshold_ms: float, interval: float = DEFAULT_INTERVAL) -> StallWatch:
    """Set the threshold (milliseconds, 0 = off) and the rate limit; reset the counters."""
    if threshold_ms < 0:
        raise ValueError("--stall-warn must not be negative")
    WATCH.threshold = threshold_ms / 1000
    WATCH.interval = interval
    WATCH.count = WATCH.held_back = 0
    WATCH.last_line = -float("inf")
    return WATCH


def stall_count() -> int:
    """Stalls seen since the process started."""
    return WATCH.count


def summary() -> None:
    """Log how many stalls the process saw in all, if any (at the end of ``run``)."""
    if WATCH.count:
        log.warning(
            "%d event loop stall(s) over %.0f ms in all", WATCH.count, WATCH.threshold * 1000
        )


def hook_ended(began: float, interceptor: object, hook: str) -> None:
    """Call after a hook returned (or raised), ``began`` being ``time.perf_counter()``
    before it: report it if it held the loop too long.

    ``interceptor`` is the instance whose ``hook`` ran; its class names it
    and its ``flow`` (when it has one) gives the flow id.
    """
    now = time.perf_counter()
    seconds = now - began
    if seconds < WATCH.threshold or not WATCH.enabled:
        return
    flow = getattr(getattr(interceptor, "flow", None), "id", None)
    where = f"flow {flow}" if flow is not None else "no flow"
    WATCH.blamed_at = now
    WATCH.report(seconds, f"interceptor {type(interceptor).__name__}.{hook} ({where})")


class LoopInstrument(trio.abc.Instrument):
    """Times every trio task step; reports a step that held the loop past the threshold.

    A step whose time went into a hook already reported by :func:`hook_ended`
    is not reported again.
    """

    def __init__(self, watch: StallWatch = WATCH) -> None:
        self.watch = watch
        self._began = 0.0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self._began = time.perf_counter()

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        now = time.perf_counter()
        seconds = now - self._began
        if seconds < self.watch.threshold or not self.watch.enabled:
            return
        if self._began <= self.watch.blamed_at <= now:
            return  # a hook of this step, reported by name already
        self.watch.report(seconds, f"task {task.name}")


def instruments() -> list[trio.abc.Instrument]:
    """What to pass to ``trio.run(..., instruments=...)``: the loop timer, when enabled."""
    return [LoopInstrument()] if WATCH.enabled else []


def _threshold(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of milliseconds") from None
    if value < 0 or value != value:
        raise argparse.ArgumentTypeError("--stall-warn must be 0 (off) or a positive number")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``--stall-warn MS`` for ``tproxy run``."""
    parser.add_argument(
        "--stall-warn",
        type=_threshold,
        default=DEFAULT_THRESHOLD_MS,
        metavar="MS",
        help="log (one line, rate-limited) when an interceptor hook or anything else holds "
        "the event loop longer than MS milliseconds, naming it (default 100; 0 = off)",
    )


def configure_from(args: Any) -> StallWatch:
    """Apply ``--stall-warn`` from parsed arguments."""
    return configure(getattr(args, "stall_warn", DEFAULT_THRESHOLD_MS))

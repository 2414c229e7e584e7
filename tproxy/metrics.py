"""``tproxy run --metrics HOST:PORT``: Prometheus metrics of the flows, at ``/metrics``.

:class:`FlowStats` is a :class:`~tproxy.flow.FlowObserver` that keeps plain
counters (no per-client labels: a gateway sees too many clients). Its
:meth:`FlowStats.snapshot` is JSON-able and snapshots *add up*
(:func:`merge`), which is how ``--workers N`` shows one sum: every worker
keeps its own ``FlowStats``, the supervisor asks them for snapshots when it
is scraped (and keeps the last one of each worker, so a dead worker's flows
stay counted and counters never go backwards). prometheus-client's own
multiprocess mode is not used: it needs a shared directory and drops custom
collectors.

Metrics (all prefixed ``tproxy_``):

- ``flows_opened_total{listener,mode}``, ``flows_total{listener,mode,reason}``
  (ended flows by end reason), ``flows_live``;
- ``bytes_read_total{direction}`` (what the proxy received: ``up`` from
  clients, ``down`` from servers) and ``bytes_delivered_total{direction}``
  (what it wrote on, after the interceptors; counted where the relay reports
  it, see :attr:`~tproxy.flow.FlowRecord.delivered_up`);
- ``connect_failures_total{cause}`` (``refused``, ``timeout``, ``dns``, ...);
- ``handshake_rejections_total{mode,code,reply}`` (explicit modes: flows
  refused before relaying; ``code`` is the end reason, ``rejected`` or
  ``timeout``, and ``reply`` the protocol's code the client was answered
  with: SOCKS5 ``0x02`` (not allowed), SOCKS4 ``0x5b``, RFC 1929 ``0x01``,
  HTTP ``403``/``407``/``400``..., or ``none`` when the client got no reply);
- ``interceptor_errors_total{interceptor}``;
- ``flow_duration_seconds`` (histogram of ended flows).
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from . import ports
from .flow import EndReason, FlowRecord

log = logging.getLogger("tproxy.metrics")

BUCKETS: tuple[float, ...] = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
    3600.0,
)
"""Upper bounds of the flow duration histogram, in seconds (``+Inf`` is implied)."""

_INTERCEPTOR_DETAIL = re.compile(r"^(\w+)\.\w+ raised ")
_SEP = "\x1f"  # joins label values into one JSON-able key


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--metrics HOST:PORT`` to ``run``'s parser."""
    parser.add_argument(
        "--metrics",
        type=_address,
        default=None,
        metavar="HOST:PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics (with --workers: the sum "
        "over all workers, served by the supervisor)",
    )


def _address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep:
        raise argparse.ArgumentTypeError(f"{text!r}: expected HOST:PORT")
    try:
        return (host or "127.0.0.1", ports.parse_port(port))
    except ports.PortSpecError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: {exc}") from None


class FlowStats:
    """Counters of one process's flows; an engine observer.

    Updated on the event loop; :meth:`snapshot` may be called from another
    thread (the HTTP server's): copying a dict of ints is atomic under the GIL.
    """

    def __init__(self, live: Callable[[], int] | None = None) -> None:
        self.opened_count = 0
        self.ended_count = 0
        self._live = live or (lambda: self.opened_count - self.ended_count)
        self.opened: Counter[str] = Counter()
        self.ended: Counter[str] = Counter()
        self.bytes: Counter[str] = Counter()
        self.connect_failures: Counter[str] = Counter()
        self.rejections: Counter[str] = Counter()
        self.interceptor_errors: Counter[str] = Counter()
        self.buckets = [0] * (len(BUCKETS) + 1)
        self.duration_sum = 0.0

    # -- FlowObserver ---------------------------------------------------------

    def flow_opened(self, record: FlowRecord) -> None:
        self.opened_count += 1
        self.opened[_key(_listener(record), record.info.mode)] += 1

    def flow_ended(self, record: FlowRecord) -> None:
        info = record.info
        reason = str(record.reason or "unknown")
        self.ended_count += 1
        self.ended[_key(_listener(record), info.mode, reason)] += 1
        self.bytes["up" + _SEP + "read"] += record.bytes_up
        self.bytes["down" + _SEP + "read"] += record.bytes_down
        if record.delivered_up is not None:
            self.bytes["up" + _SEP + "delivered"] += record.delivered_up
        if record.delivered_down is not None:
            self.bytes["down" + _SEP + "delivered"] += record.delivered_down
        if record.reason is EndReason.CONNECT_FAILED:
            cause = record.detail.partition(":")[0].strip() if ":" in record.detail else "error"
            self.connect_failures[cause or "error"] += 1
        elif (
            info.mode != "transparent"
            and record.reason
            in (
                EndReason.REJECTED,
                EndReason.TIMEOUT,
            )
            and not record.bytes_down
            and record.outgoing_source is None
        ):
            self.rejections[_key(info.mode, reason, record.reply_code or "none")] += 1
        if record.reason is EndReason.ERROR:
            match = _INTERCEPTOR_DETAIL.match(record.detail)
            if match:
                self.interceptor_errors[match.group(1)] += 1
            elif record.detail.startswith("interceptor init"):
                self.interceptor_errors["init"] += 1
        duration = max(0.0, (record.ended or record.started) - record.started)
        self.duration_sum += duration
        for i, bound in enumerate(BUCKETS):
            if duration <= bound:
                self.buckets[i] += 1
                break
        else:
            self.buckets[-1] += 1

    # -- snapshots ------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """The counters as plain JSON-able data (summed with :func:`merge`)."""
        return {
            "pid": os.getpid(),
            "events": self.opened_count + self.ended_count,
            "opened": dict(self.opened),
            "ended": dict(self.ended),
            "live": self._live(),
            "bytes": dict(self.bytes),
            "connect_failures": dict(self.connect_failures),
            "rejections": dict(self.rejections),
            "interceptor_errors": dict(self.interceptor_errors),
            "buckets": list(self.buckets),
            "duration_sum": self.duration_sum,
        }


def _listener(record: FlowRecord) -> str:
    """The listener label: the door a flow came through where known, else its mode."""
    listener = getattr(record.info, "listener", None)
    return str(listener) if listener else record.info.mode


def _key(*parts: str) -> str:
    return _SEP.join(parts)


def empty_snapshot() -> dict[str, Any]:
    return FlowStats(live=lambda: 0).snapshot()


def merge(snapshots: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Add snapshots up (counters, live flows and histogram buckets alike)."""
    total = empty_snapshot()
    for snap in snapshots:
        for name in (
            "opened",
            "ended",
            "bytes",
            "connect_failures",
            "rejections",
            "interceptor_errors",
        ):
            into = total[name]
            for key, value in snap.get(name, {}).items():
                into[key] = into.get(key, 0) + value
        total["live"] += snap.get("live", 0)
        total["events"] += snap.get("events", 0)
        total["duration_sum"] += snap.get("duration_sum", 0.0)
        buckets = snap.get("buckets", [])
        for i, value in enumerate(buckets[: len(total["buckets"])]):
            total["buckets"][i] += value
    return total


def families(snap: dict[str, Any]) -> Iterator[Any]:
    """Prometheus metric families for one (maybe merged) snapshot."""
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
    )

    def counter(name: str, doc: str, labels: list[str], data: dict[str, int]) -> Any:
        family = CounterMetricFamily(name, doc, labels=labels)
        for key, value in sorted(data.items()):
            family.add_metric(key.split(_SEP), value)
        return family

    yield counter(
        "tproxy_flows_opened",
        "Flows opened, by listener and mode.",
        ["listener", "mode"],
        snap["opened"],
    )
    yield counter(
        "tproxy_flows",
        "Flows ended, by listener, mode and end reason.",
        ["listener", "mode", "reason"],
        snap["ended"],
    )
    live = GaugeMetricFamily("tproxy_flows_live", "Flows open now.")
    live.add_metric([], snap["live"])
    yield live
    read = CounterMetricFamily(
        "tproxy_bytes_read",
        "Bytes the proxy received: up from clients, down from servers.",
        labels=["direction"],
    )
    delivered = CounterMetricFamily(
        "tproxy_bytes_delivered",
        "Bytes the proxy wrote on after the interceptors: up to servers, down to clients.",
        labels=["direction"],
    )
    for key, value in sorted(snap["bytes"].items()):
        direction, stage = key.split(_SEP)
        (read if stage == "read" else delivered).add_metric([direction], value)
    yield read
    yield delivered
    yield counter(
        "tproxy_connect_failures",
        "Outgoing connects that failed, by cause.",
        ["cause"],
        snap["connect_failures"],
    )
    yield counter(
        "tproxy_handshake_rejections",
        "Explicit-mode flows refused before relaying, by mode, code (end reason) and the "
        "protocol's reply code.",
        ["mode", "code", "reply"],
        snap["rejections"],
    )
    yield counter(
        "tproxy_interceptor_errors",
        "Flows ended by an interceptor that raised.",
        ["interceptor"],
        snap["interceptor_errors"],
    )
    cumulative = 0
    buckets = []
    for bound, value in zip((*BUCKETS, float("inf")), snap["buckets"], strict=True):
        cumulative += value
        buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
    histogram = HistogramMetricFamily(
        "tproxy_flow_duration_seconds", "How long ended flows lasted."
    )
    histogram.add_metric([], buckets, snap["duration_sum"])
    yield histogram


class SnapshotCollector:
    """A prometheus-client collector around a function that returns a snapshot."""

    def __init__(self, source: Callable[[], dict[str, Any]]) -> None:
        self.source = source

    def collect(self) -> Iterator[Any]:
        try:
            snap = self.source()
        except Exception:  # a scrape must not take the proxy down
            log.exception("collecting metrics failed")
            snap = empty_snapshot()
        yield from families(snap)


class MetricsServer:
    """The HTTP endpoint, in a daemon thread (prometheus-client's own server)."""

    def __init__(self, address: tuple[str, int], source: Callable[[], dict[str, Any]]) -> None:
        from prometheus_client import CollectorRegistry

        self.address = address
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(SnapshotCollector(source))
        self._server: Any = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Bind now (an error is the caller's to report) and serve in the background."""
        from prometheus_client import start_http_server

        host, port = self.address
        self._server, self._thread = start_http_server(port, addr=host, registry=self.registry)
        log.info("metrics at http://%s:%d/metrics", _bracket(host), self.port)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1]) if self._server is not None else 0

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host

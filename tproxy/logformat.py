"""How ``tproxy run`` logs: ``--log-format text|json``, ``--log-file PATH``.

``text`` is the classic one line per record. ``json`` writes one JSON object
per line for every record; a flow's open and end records (which the engine
logs with ``extra={"flow_event": ("open"|"end", record)}``) carry the whole
flow: id, worker, mode, client, destination, via, sni, interceptors, reason,
detail, bytes read and delivered each way, duration and timestamps.

``--log-file PATH`` appends there instead of stderr and reopens the file on
SIGUSR1, for log rotation (``logrotate``'s ``postrotate``: ``kill -USR1``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from typing import Any

from .flow import FlowRecord, format_address

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--log-format`` and ``--log-file`` to ``run``'s parser."""
    group = parser.add_argument_group("logging")
    group.add_argument(
        "--log-format",
        choices=["text", "json"],
        default="text",
        help="text (default) or json: one JSON object per line, a flow's open and end "
        "with all its fields",
    )
    group.add_argument(
        "--log-file",
        default=None,
        metavar="PATH",
        help="append the log to PATH instead of stderr; reopened on SIGUSR1 (log rotation)",
    )


def _worker(record: logging.LogRecord) -> str | None:
    worker = getattr(record, "worker", None)
    return str(worker) if worker is not None else None


class TextFormatter(logging.Formatter):
    """The classic line; a worker's records start with its name (``w0 ...``)."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def formatMessage(self, record: logging.LogRecord) -> str:
        worker = _worker(record)
        if worker is not None:
            record.message = f"{worker} {record.message}"
        return super().formatMessage(record)


class JsonFormatter(logging.Formatter):
    """One JSON object per record; flow records spelled out field by field."""

    def format(self, record: logging.LogRecord) -> str:
        event = getattr(record, "flow_event", None)
        out: dict[str, Any] = {
            "time": _iso(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "worker": _worker(record),
        }
        if event is not None:
            kind, flow = event
            out["event"] = f"flow_{kind}"
            out.update(flow_fields(flow, kind == "end"))
        else:
            out["message"] = record.getMessage()
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return _encode(out)


def flow_fields(flow: FlowRecord, ended: bool) -> dict[str, Any]:
    """A flow record as JSON-able fields (also ``tproxy flows --json``)."""
    info = flow.info
    now_mono, now_wall = time.monotonic(), time.time()
    started_wall = now_wall - (now_mono - flow.started)
    fields: dict[str, Any] = {
        "id": info.id,
        "mode": info.mode,
        "client": format_address(info.client),
        "destination": format_address(info.destination),
        "via": format_address(flow.outgoing_source) if flow.outgoing_source else None,
        "sni": getattr(info, "sni", None),
        "interceptors": list(flow.interceptors),
        "started": _iso(started_wall),
        "bytes_read_up": flow.bytes_up,
        "bytes_read_down": flow.bytes_down,
        "bytes_delivered_up": flow.delivered_up,
        "bytes_delivered_down": flow.delivered_down,
    }
    if ended:
        end = flow.ended if flow.ended is not None else flow.started
        fields["reason"] = str(flow.reason) if flow.reason else None
        fields["detail"] = flow.detail
        fields["duration"] = round(end - flow.started, 6)
        fields["ended"] = _iso(started_wall + (end - flow.started))
    return fields


_encode = json.JSONEncoder(separators=(",", ":"), default=str).encode
_second: list[Any] = [None, ""]
"""The last whole second formatted, and its text: most records share it."""


def _iso(wall: float) -> str:
    """UTC ISO 8601 with milliseconds (``2026-12-03T09:38:03.096Z``)."""
    sec = int(wall)
    if _second[0] != sec:
        _second[0], _second[1] = sec, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
    return f"{_second[1]}.{int((wall - sec) * 1000):03d}Z"


class ReopeningFileHandler(logging.FileHandler):
    """A file handler that :meth:`reopen` points at a fresh file at the same path."""

    def reopen(self) -> None:
        self.acquire()
        try:
            if self.stream is not None:
                self.stream.flush()
                self.stream.close()
            self.stream = self._open()
        finally:
            self.release()


_handler: logging.Handler | None = None


def configure(level: int, log_format: str = "text", log_file: str | None = None) -> logging.Handler:
    """Set up the root logger with one handler; return it. Replaces an earlier setup."""
    global _handler
    root = logging.getLogger()
    if _handler is not None:
        root.removeHandler(_handler)
        _handler.close()
    handler: logging.Handler
    if log_file:
        handler = ReopeningFileHandler(log_file, encoding="utf-8")
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root.addHandler(handler)
    root.setLevel(level)
    _handler = handler
    return handler


def reopen() -> bool:
    """Reopen the log file (SIGUSR1); ``False`` when logging goes to stderr."""
    if isinstance(_handler, ReopeningFileHandler):
        _handler.reopen()
        return True
    return False

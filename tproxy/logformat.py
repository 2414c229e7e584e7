"""How ``tproxy run`` logs: ``--log-format text|json``, ``--log-file PATH``.

``text`` is the classic one line per record. ``json`` writes one JSON object
per line for every record; a flow's open and end records (which the engine
logs with :func:`log_flow`) carry the whole flow: id, worker, mode, client,
destination, via, sni, interceptors, reason, detail, bytes read and delivered
each way, duration and timestamps.

A flow's records are logged for every flow, so their cost counts in new
connections per second (``scripts/bench_ops.py``; ``docs/measurements.md``):
the message is a :class:`FlowEvent` whose text line is built only if a
formatter asks for it (the JSON formatter never does), and the JSON line of
a flow is written field by field (:func:`flow_json`) rather than through a
dict and ``json.JSONEncoder``.

``--log-file PATH`` appends there instead of stderr and reopens the file on
SIGUSR1, for log rotation (``logrotate``'s ``postrotate``: ``kill -USR1``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from json.encoder import encode_basestring_ascii as _quote  # json's own quoting, in C
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


class FlowEvent:
    """A flow's open or end as a log message. ``str()`` gives the text line
    (``flow 7 open mode=...``), built once and only when asked: the JSON
    formatter reads the record itself."""

    __slots__ = ("_line", "kind", "record")

    def __init__(self, kind: str, record: FlowRecord) -> None:
        self.kind = kind
        """``"open"`` or ``"end"``."""
        self.record = record
        self._line: str | None = None

    def __str__(self) -> str:
        if self._line is None:
            record = self.record
            self._line = record.open_line() if self.kind == "open" else record.close_line()
        return self._line

    def __repr__(self) -> str:
        return f"FlowEvent({self.kind!r}, flow {self.record.info.id})"


def log_flow(logger: logging.Logger, kind: str, record: FlowRecord) -> None:
    """Log a flow's open (``kind="open"``) or end (``"end"``) at INFO, if enabled."""
    if logger.isEnabledFor(logging.INFO):
        logger.info(FlowEvent(kind, record))


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
        event = record.msg
        if type(event) is FlowEvent and not record.exc_info:
            return flow_json(record, event.kind, event.record)
        out: dict[str, Any] = {
            "time": _iso(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "worker": _worker(record),
        }
        if type(event) is FlowEvent:
            out["event"] = f"flow_{event.kind}"
            out.update(flow_fields(event.record, event.kind == "end"))
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


def flow_json(record: logging.LogRecord, kind: str, flow: FlowRecord) -> str:
    """The JSON line of a flow's open or end: the same object as :class:`JsonFormatter`
    would encode from :func:`flow_fields`, in the same key order, written directly
    (a third of the cost of building the dict and encoding it)."""
    info = flow.info
    started_wall = record.created - (time.monotonic() - flow.started)
    worker = getattr(record, "worker", None)
    via = flow.outgoing_source
    sni = getattr(info, "sni", None)
    line = (
        f'{{"time":"{_iso(record.created)}","level":{_quote(record.levelname.lower())},'
        f'"logger":{_quote(record.name)},'
        f'"worker":{"null" if worker is None else _quote(str(worker))},'
        f'"event":"flow_{kind}","id":{int(info.id)},"mode":{_quote(info.mode)},'
        f'"client":{_quote(format_address(info.client))},'
        f'"destination":{_quote(format_address(info.destination))},'
        f'"via":{"null" if via is None else _quote(format_address(via))},'
        f'"sni":{"null" if sni is None else _quote(str(sni))},'
        f'"interceptors":[{",".join(map(_quote, flow.interceptors))}],'
        f'"started":"{_iso(started_wall)}",'
        f'"bytes_read_up":{int(flow.bytes_up)},"bytes_read_down":{int(flow.bytes_down)},'
        f'"bytes_delivered_up":{_int_or_null(flow.delivered_up)},'
        f'"bytes_delivered_down":{_int_or_null(flow.delivered_down)}'
    )
    if kind != "end":
        return line + "}"
    end = flow.ended if flow.ended is not None else flow.started
    reason = flow.reason
    return (
        f'{line},"reason":{"null" if not reason else _quote(str(reason))},'
        f'"detail":{_quote(flow.detail)},"duration":{float(round(end - flow.started, 6))!r},'
        f'"ended":"{_iso(started_wall + (end - flow.started))}"}}'
    )


def _int_or_null(value: int | None) -> str:
    return "null" if value is None else str(int(value))


_encode = json.JSONEncoder(separators=(",", ":"), default=str).encode
_MILLIS = tuple(f"{ms:03d}" for ms in range(1000))
_seconds: dict[int, str] = {}
"""Whole seconds formatted lately: a flow's records name the current second and the
one it started in, and most flows are short."""


def _iso(wall: float) -> str:
    """UTC ISO 8601 with milliseconds (``2026-12-03T09:38:03.096Z``)."""
    sec = int(wall)
    text = _seconds.get(sec)
    if text is None:
        if len(_seconds) >= 256:
            _seconds.clear()
        text = _seconds[sec] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
    return f"{text}.{_MILLIS[int((wall - sec) * 1000)]}Z"


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
    # Neither format shows the caller, thread or process of a record: skip finding them
    # for every record (two per flow), as the logging HOWTO's "Optimization" advises.
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
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

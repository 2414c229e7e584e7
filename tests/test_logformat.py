"""The flow log's formats (tproxy/logformat.py): the JSON line of a flow written field by
field is the object the generic path encodes, and the text line is built only when shown."""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tproxy.flow import EndReason, FlowInfo, FlowRecord
from tproxy.logformat import FlowEvent, JsonFormatter, TextFormatter, flow_fields, log_flow

CLOCK_FIELDS = ("time", "started", "ended")


def make_record(
    *,
    sni: str | None = None,
    via: bool = True,
    interceptors: tuple[str, ...] = ("label",),
    detail: str = "",
    delivered: bool = True,
    ended: bool = True,
) -> FlowRecord:
    info = FlowInfo(7, ("192.0.2.2", 46338), ("2001:db8::1", 443), mode="forward", sni=sni)
    record = FlowRecord(info=info, started=time.monotonic() - 0.25, bytes_up=86, bytes_down=203)
    record.interceptors = interceptors
    if via:
        record.outgoing_source = ("192.0.2.2", 46338)
    if delivered:
        record.delivered_up, record.delivered_down = 80, 0
    if ended:
        record.end(EndReason.EOF, detail, now=record.started + 0.123456789)
    return record


def log_record(event: FlowEvent, worker: str | None = None) -> logging.LogRecord:
    rec = logging.LogRecord("tproxy.flow", logging.INFO, __file__, 1, event, (), None)
    if worker is not None:
        rec.worker = worker
    return rec


def generic(rec: logging.LogRecord) -> dict[str, object]:
    """What the generic (dict + JSONEncoder) path of JsonFormatter writes for ``rec``."""
    event = rec.msg
    assert isinstance(event, FlowEvent)
    worker = getattr(rec, "worker", None)
    out: dict[str, object] = {
        "time": None,
        "level": "info",
        "logger": rec.name,
        "worker": None if worker is None else str(worker),
        "event": f"flow_{event.kind}",
    }
    out.update(flow_fields(event.record, event.kind == "end"))
    return out


def same_but_clocks(line: str, want: dict[str, object]) -> None:
    got = json.loads(line)
    assert list(got) == list(want)  # the same keys in the same order
    for key in CLOCK_FIELDS:
        if key in want:
            assert isinstance(got.pop(key), str) and got.get(key) is None
            want = {k: v for k, v in want.items() if k != key}
    assert got == want


@pytest.mark.parametrize("kind", ["open", "end"])
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"sni": "example.test", "via": False, "interceptors": (), "delivered": False},
        {"detail": 'said "no"\n\tand \\ left \x00', "interceptors": ("a:B", "c.py:D")},
    ],
)
def test_the_written_line_is_the_encoded_object(kind: str, options: dict[str, object]) -> None:
    record = make_record(**options)  # type: ignore[arg-type]
    for worker in (None, "w1"):
        rec = log_record(FlowEvent(kind, record), worker)
        same_but_clocks(JsonFormatter().format(rec), generic(rec))


@given(
    sni=st.none() | st.text(max_size=30),
    detail=st.text(max_size=60),
    names=st.lists(st.text(max_size=10), max_size=3),
)
def test_any_text_is_quoted_as_json_quotes_it(
    sni: str | None, detail: str, names: list[str]
) -> None:
    record = make_record(sni=sni, detail=detail, interceptors=tuple(names))
    rec = log_record(FlowEvent("end", record))
    line = JsonFormatter().format(rec)
    assert "\n" not in line and line.isascii()
    same_but_clocks(line, generic(rec))


def test_timestamps_are_the_flow_s_own() -> None:
    record = make_record()
    rec = log_record(FlowEvent("end", record))
    got = json.loads(JsonFormatter().format(rec))
    assert got["duration"] == 0.123457
    assert got["started"] < got["ended"] and got["time"].endswith("Z")
    assert json.loads(JsonFormatter().format(log_record(FlowEvent("open", record))))["id"] == 7


def test_an_unended_flow_and_an_exception_take_the_generic_path() -> None:
    record = make_record(ended=False)
    end = json.loads(JsonFormatter().format(log_record(FlowEvent("end", record))))
    assert end["reason"] is None and end["duration"] == 0.0
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        rec = logging.LogRecord(
            "tproxy.flow", logging.ERROR, __file__, 1, FlowEvent("end", record), (), True
        )
        rec.exc_info = __import__("sys").exc_info()
    out = json.loads(JsonFormatter().format(rec))
    assert out["event"] == "flow_end" and "RuntimeError: boom" in out["exception"]


FlowLogger = tuple[logging.Logger, io.StringIO, "logging.StreamHandler[io.StringIO]"]


@pytest.fixture
def flow_logger() -> Iterator[FlowLogger]:
    # A logger outside the hierarchy: only this handler formats its records.
    logger = logging.Logger("tproxy.flow", logging.INFO)
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger.addHandler(handler)
    yield logger, stream, handler


def test_json_never_builds_the_text_line(
    flow_logger: FlowLogger,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    logger, stream, handler = flow_logger
    handler.setFormatter(JsonFormatter())
    built: list[str] = []
    monkeypatch.setattr(FlowRecord, "open_line", lambda self: built.append("open") or "")
    monkeypatch.setattr(FlowRecord, "close_line", lambda self: built.append("end") or "")
    record = make_record()
    log_flow(logger, "open", record)
    log_flow(logger, "end", record)
    assert built == []
    lines = stream.getvalue().splitlines()
    assert [json.loads(line)["event"] for line in lines] == ["flow_open", "flow_end"]


def test_text_shows_the_line_built_once(
    flow_logger: FlowLogger,
) -> None:
    logger, stream, handler = flow_logger
    handler.setFormatter(TextFormatter())
    record = make_record()
    log_flow(logger, "open", record)
    log_flow(logger, "end", record)
    text = stream.getvalue()
    assert "flow 7 open mode=forward client=192.0.2.2:46338 dst=[2001:db8::1]:443" in text
    assert "flow 7 end reason=eof" in text and "up=86 down=203" in text
    event = FlowEvent("end", record)
    assert str(event) is str(event)  # built once, then kept


def test_nothing_is_logged_below_info(
    flow_logger: FlowLogger,
) -> None:
    logger, stream, _ = flow_logger
    logger.setLevel(logging.WARNING)
    log_flow(logger, "open", make_record())
    assert stream.getvalue() == ""

"""FlowStats counts flow records into summable snapshots; the Prometheus text of a
merged snapshot is what one scrape of ``--workers N`` shows."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from tproxy.flow import EndReason, FlowInfo, FlowRecord
from tproxy.metrics import BUCKETS, FlowStats, SnapshotCollector, merge
from tproxy.protocols import reply_code


def _record(
    mode: str,
    reason: EndReason,
    detail: str = "",
    *,
    duration: float = 0.2,
    up: int = 0,
    down: int = 0,
    via: bool = True,
    reply: str | None = None,
) -> FlowRecord:
    record = FlowRecord(
        info=FlowInfo(id=1, client=("192.0.2.1", 1), destination=("198.51.100.1", 80), mode=mode),
        started=100.0,
        bytes_up=up,
        bytes_down=down,
    )
    record.outgoing_source = ("192.0.2.1", 1) if via else None
    record.reply_code = reply
    record.end(reason, detail, now=100.0 + duration)
    return record


def _fed(*records: FlowRecord) -> FlowStats:
    stats = FlowStats()
    for record in records:
        stats.flow_opened(record)
        stats.flow_ended(record)
    return stats


def _text(snapshot: dict) -> str:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(lambda: snapshot))  # type: ignore[arg-type]
    return generate_latest(registry).decode()


def test_reasons_causes_codes_and_interceptors_are_labelled() -> None:
    stats = _fed(
        _record("transparent", EndReason.EOF, up=10, down=20),
        _record("transparent", EndReason.CONNECT_FAILED, "refused: Connection refused", via=False),
        _record("socks", EndReason.CONNECT_FAILED, "dns: cannot resolve x", via=False),
        _record("socks", EndReason.REJECTED, "destination not allowed", via=False, reply="0x02"),
        _record("http", EndReason.TIMEOUT, "handshake timed out", via=False),
        _record("transparent", EndReason.ERROR, "Shout.server_data raised ValueError('x')"),
        _record("transparent", EndReason.ERROR, "interceptor init: RuntimeError()"),
        _record("transparent", EndReason.REJECTED, "too many flows", via=False),
    )
    snap = stats.snapshot()
    assert snap["connect_failures"] == {"refused": 1, "dns": 1}
    assert snap["interceptor_errors"] == {"Shout": 1, "init": 1}
    assert snap["rejections"] == {"socks\x1frejected\x1f0x02": 1, "http\x1ftimeout\x1fnone": 1}
    text = _text(snap)
    assert 'tproxy_connect_failures_total{cause="refused"} 1.0' in text
    assert (
        'tproxy_handshake_rejections_total{code="rejected",mode="socks",reply="0x02"} 1.0' in text
    )
    assert 'tproxy_handshake_rejections_total{code="timeout",mode="http",reply="none"} 1.0' in text
    assert 'tproxy_interceptor_errors_total{interceptor="Shout"} 1.0' in text
    assert 'tproxy_bytes_read_total{direction="up"} 10.0' in text
    assert "tproxy_flows_live 0.0" in text
    assert 'tproxy_flow_duration_seconds_bucket{le="0.25"} 8.0' in text
    assert 'tproxy_flow_duration_seconds_bucket{le="0.1"} 0.0' in text


def test_snapshots_add_up_and_the_histogram_stays_cumulative() -> None:
    a = _fed(_record("transparent", EndReason.EOF, duration=0.001, up=1))
    b = _fed(
        _record("transparent", EndReason.EOF, duration=7200.0, up=2),
        _record("forward", EndReason.RESET, duration=3.0),
    )
    total = merge([a.snapshot(), b.snapshot()])
    assert total["ended"] == {
        "transparent\x1ftransparent\x1feof": 2,
        "forward\x1fforward\x1freset": 1,
    }
    assert total["events"] == 6
    assert sum(total["buckets"]) == 3 and total["buckets"][-1] == 1  # beyond the last bound
    assert len(total["buckets"]) == len(BUCKETS) + 1
    text = _text(total)
    assert 'tproxy_flow_duration_seconds_bucket{le="+Inf"} 3.0' in text
    assert "tproxy_flow_duration_seconds_count 3.0" in text
    assert 'tproxy_bytes_read_total{direction="up"} 3.0' in text


def test_delivered_bytes_are_counted_only_where_the_relay_counts_them() -> None:
    counted = _record("transparent", EndReason.EOF, up=5, down=6)
    counted.delivered_up, counted.delivered_down = 4, 9
    text = _text(_fed(counted, _record("transparent", EndReason.EOF, up=1)).snapshot())
    assert 'tproxy_bytes_delivered_total{direction="up"} 4.0' in text
    assert 'tproxy_bytes_delivered_total{direction="down"} 9.0' in text
    assert 'tproxy_bytes_read_total{direction="up"} 6.0' in text


@pytest.mark.parametrize(
    ("reply", "code"),
    [
        (b"\x05\x02\x00\x01\x00\x00\x00\x00\x00\x00", "0x02"),  # SOCKS5 not allowed
        (b"\x05\xff", "0xff"),  # SOCKS5: no acceptable method
        (b"\x01\x01", "0x01"),  # RFC 1929: authentication failed
        (b"\x00\x5b\x00\x00\x00\x00\x00\x00", "0x5b"),  # SOCKS4 rejected
        (b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n", "403"),
        (b"HTTP/1.0 407 Proxy Authentication Required\r\n\r\n", "407"),
        (b"", None),
        (b"\x05", None),
        (b"HTTP/1.1 4x3 Odd\r\n\r\n", None),
        (b"garbage", None),
    ],
)
def test_reply_codes_of_refusals(reply: bytes, code: str | None) -> None:
    assert reply_code(reply) == code

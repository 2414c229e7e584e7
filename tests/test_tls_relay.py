"""The TLS layer driven by the trio-stream shell (StreamRelay), on trio's virtual clock."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
from tls_helpers import Endpoint, client_context
from trio.testing import memory_stream_pair

from tproxy.flow import EndReason, FlowInfo, FlowRecord
from tproxy.relay.streams import StreamRelay
from tproxy.tls import ca
from tproxy.tls.certs import LeafForge
from tproxy.tls.layer import TlsInterception, TlsSettings


@pytest.mark.trio
async def test_a_client_stalling_mid_hello_is_ended_by_the_relay(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    tls = TlsInterception(TlsSettings(handshake_timeout=10), LeafForge(ca.create(tmp_path / "ca")))
    info = FlowInfo.example()
    client_end, incoming = memory_stream_pair()
    outgoing, _server_end = memory_stream_pair()
    record = FlowRecord(info=info, started=0.0)
    pair = StreamRelay(incoming, outgoing, record, tls.wrap(None, info))
    hello = Endpoint(client_context(None), server_side=False, name="x.test")
    hello.step()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pair.run)
        await trio.sleep(30)  # quiet before the first byte: not a stall
        assert record.reason is None
        await client_end.send_all(hello.take()[:50])
        started = trio.current_time()
        with trio.fail_after(60):
            while record.reason is None:
                await trio.sleep(0.5)
    assert record.reason == EndReason.INTERCEPTOR_ABORT
    assert "stalled" in record.detail
    assert 10 <= trio.current_time() - started <= 11

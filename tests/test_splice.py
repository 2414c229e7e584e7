"""Splice in the hub, on real loopback TCP: the pipe pool, and when a direction goes zero-copy.

The flow rules themselves are tested on the core (test_relay_core.py) and on
both shells (test_flow_rules.py); here: the pipe pool's public interface,
and that the hub splices exactly the directions nobody watches, including
a flow whose interceptors went passthrough mid-flow.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import AsyncIterator

import pytest
import trio
import trio.testing
from stream_helpers import read_all as _read_all
from stream_helpers import reset as _reset
from stream_helpers import send_and_eof as _send_and_eof

import tproxy.splice
from tproxy import Interceptor
from tproxy.flow import EndReason, FlowInfo, FlowRecord, next_flow_id
from tproxy.hub import HubFlow, SpliceHub
from tproxy.interceptor import Chain
from tproxy.splice import IDLE_PIPES, PipePool, splice_available

pytestmark = [
    pytest.mark.skipif(not splice_available(), reason="os.splice is not available"),
    pytest.mark.timeout(60),
]


# -- the pipe pool ------------------------------------------------------------------------


def test_pipe_pool_reuses_empty_pipes_and_keeps_only_so_many():
    pool = PipePool()
    a = pool.take(65536)
    b = pool.take(65536)
    assert a != b
    pool.give(a, 65536)
    assert pool.idle_fds() == set(a)
    assert pool.take(65536) == a  # reused, not a new pipe
    pool.give(a, 65536)
    pool.discard(b)  # may hold bytes: closed, never kept
    with pytest.raises(OSError):
        os.fstat(b[0])
    many = [pool.take(4096) for _ in range(IDLE_PIPES + 3)]
    for pipe in many:
        pool.give(pipe, 4096)
    assert len(pool.idle[4096]) == IDLE_PIPES
    pool.close_idle()
    assert pool.idle_fds() == set()


# -- the hub, splicing where nobody watches ----------------------------------------------------


async def _tcp_pair(small: bool = False) -> tuple[trio.SocketStream, socket.socket]:
    """(the outer end as a trio stream, the proxy's end as a plain socket); ``small``: the
    outer end receives into a small buffer (set before connecting: a slow reader)."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    try:
        port = listeners[0].socket.getsockname()[1]
        raw = trio.socket.socket()
        if small:
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
        await raw.connect(("127.0.0.1", port))
        outer = trio.SocketStream(raw)
        accepted = await listeners[0].accept()
    finally:
        for listener in listeners:
            await listener.aclose()
    tsock = accepted.socket
    trio.lowlevel.notify_closing(tsock)
    inner = socket.socket(tsock.family, tsock.type, tsock.proto, fileno=tsock.detach())
    inner.setblocking(False)
    return outer, inner


def _record() -> FlowRecord:
    info = FlowInfo(next_flow_id(), ("127.0.0.1", 1), ("127.0.0.1", 2), "test")
    return FlowRecord(info=info, started=time.monotonic())


@contextlib.asynccontextmanager
async def _hub(**kwargs: object) -> AsyncIterator[SpliceHub]:
    hub = SpliceHub(
        opened=lambda info, source: FlowRecord(info=info, started=0.0),
        rejected=lambda *args: None,
        closed=lambda record: None,
        **kwargs,  # type: ignore[arg-type]
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(hub.run)
        try:
            yield hub
        finally:
            nursery.cancel_scope.cancel()


async def _relayed(
    hub: SpliceHub, *interceptors: type[Interceptor], slow_client: bool = False
) -> tuple[trio.SocketStream, trio.SocketStream, HubFlow]:
    client_end, incoming = await _tcp_pair(slow_client)
    server_end, outgoing = await _tcp_pair()
    record = _record()
    chain = Chain([cls(record.info) for cls in interceptors]) if interceptors else None
    return client_end, server_end, hub.adopt(incoming, outgoing, record, chain)


class _Peek(Interceptor):
    """Sees the first client chunk, then hands the rest of the flow back (passthrough)."""

    def client_data(self, data: bytes) -> bytes:
        self.passthrough()
        return data


class _Watch(Interceptor):
    """Sees every byte (returns it unchanged)."""


@pytest.mark.parametrize("interceptors", [(), (_Peek,), (_Watch,)])
def test_hub_relay_with_interceptors_is_a_half_closeable_stream(interceptors):
    async def main():
        async with _hub() as hub:

            async def maker():
                client_end, server_end, _ = await _relayed(hub, *interceptors)
                return client_end, server_end

            await trio.testing.check_half_closeable_stream(maker, None)

    trio.run(main)


@pytest.mark.parametrize("interceptors", [(), (_Peek,), (_Watch,)])
def test_counters_and_reset_with_or_without_interceptors(interceptors):
    async def main():
        async with _hub() as hub:
            client_end, server_end, flow = await _relayed(hub, *interceptors)
            payload = os.urandom(3_000_000)
            async with trio.open_nursery() as n:
                n.start_soon(_send_and_eof, client_end, payload)
                assert await _read_all(server_end) == payload
            await server_end.send_all(b"ok")
            assert await client_end.receive_some(10) == b"ok"
            _reset(server_end)
            with pytest.raises(trio.BrokenResourceError), trio.fail_after(10):
                while await client_end.receive_some(10):
                    pass
            assert flow.done is not None
            await flow.done.wait()
            record = flow.record
            assert record is not None and record.reason is EndReason.RESET
            assert (record.bytes_up, record.bytes_down) == (len(payload), 2)
            await trio.aclose_forcefully(client_end)

    trio.run(main)


@pytest.mark.parametrize(
    ("interceptors", "splices"), [((), True), ((_Peek,), True), ((_Watch,), False)]
)
def test_the_hub_splices_exactly_what_nobody_watches(interceptors, splices, monkeypatch):
    taken: list[int] = []
    real_take = tproxy.splice.pipes.take

    def take(size: int) -> tuple[int, int]:
        taken.append(size)
        return real_take(size)

    monkeypatch.setattr(tproxy.splice.pipes, "take", take)

    async def main():
        async with _hub() as hub:
            client_end, server_end, flow = await _relayed(hub, *interceptors)
            await client_end.send_all(b"first")  # _Peek goes passthrough here
            assert await server_end.receive_some(100) == b"first"
            before = len(taken)
            payload = os.urandom(1_000_000)
            async with trio.open_nursery() as n:
                n.start_soon(_send_and_eof, client_end, payload)
                n.start_soon(_send_and_eof, server_end, payload)
                assert await _read_all(server_end) == payload
                assert await _read_all(client_end) == payload
            assert (len(taken) > before) is splices
            assert flow.done is not None
            await flow.done.wait()
            assert flow.record is not None and flow.record.reason is EndReason.EOF
            for stream in (client_end, server_end):
                await trio.aclose_forcefully(stream)

    trio.run(main)


def test_a_hub_without_splice_copies_every_direction(monkeypatch):
    def no_take(size: int) -> tuple[int, int]:
        raise AssertionError("splice=False must not take pipes")

    monkeypatch.setattr(tproxy.splice.pipes, "take", no_take)

    async def main():
        async with _hub(splice=False) as hub:
            client_end, server_end, flow = await _relayed(hub)
            payload = os.urandom(500_000)
            async with trio.open_nursery() as n:
                n.start_soon(_send_and_eof, client_end, payload)
                n.start_soon(_send_and_eof, server_end, payload[::-1])
                assert await _read_all(server_end) == payload
                assert await _read_all(client_end) == payload[::-1]
            assert flow.done is not None
            await flow.done.wait()
            assert flow.record is not None and flow.record.reason is EndReason.EOF
            for stream in (client_end, server_end):
                await trio.aclose_forcefully(stream)

    trio.run(main)


class _AckThenPassthrough(Interceptor):
    def server_data(self, data: bytes) -> bytes:
        self.inject_to_server(b"ACK")
        self.passthrough()
        return data


def test_injection_from_the_hook_that_turns_passthrough_on_is_not_starved():
    """The other direction may start splicing while that injection still waits to be sent."""

    async def main():
        async with _hub() as hub:
            client, server, _ = await _relayed(hub, _AckThenPassthrough, slow_client=True)
            big = 8 * 1024 * 1024
            got = b""
            total = 0
            with trio.fail_after(30):  # hang guard
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(server.send_all, b"x" * big)
                    await trio.sleep(0.3)
                    await client.send_all(b"REQ")
                    while total < big:
                        total += len(await client.receive_some(1 << 20))
                    while b"ACK" not in got:
                        got += await server.receive_some(65536)
                    nursery.cancel_scope.cancel()
            assert got == b"ACKREQ"  # the injection came first, with the first server chunk
            assert total == big
            for stream in (client, server):
                await trio.aclose_forcefully(stream)

    trio.run(main)


class _Tap:
    def __init__(self) -> None:
        self.read = [b"", b""]
        self.delivered = [b"", b""]
        self.ended: list[str] = []

    def on_read(self, side: int, data: bytes) -> None:
        self.read[side] += data

    def on_deliver(self, side: int, data: bytes) -> None:
        self.delivered[side] += data

    def on_end(self, reason: str) -> None:
        self.ended.append(reason)


def test_a_tap_sees_every_byte_and_keeps_the_flow_off_splice(monkeypatch):
    def no_take(size: int) -> tuple[int, int]:
        raise AssertionError("a tapped flow must not be spliced")

    monkeypatch.setattr(tproxy.splice.pipes, "take", no_take)

    async def main():
        async with _hub() as hub:
            client_end, incoming = await _tcp_pair()
            server_end, outgoing = await _tcp_pair()
            tap = _Tap()
            flow = hub.adopt(incoming, outgoing, _record(), tap=tap)
            up, down = os.urandom(300_000), os.urandom(200_000)
            async with trio.open_nursery() as n:
                n.start_soon(_send_and_eof, client_end, up)
                n.start_soon(_send_and_eof, server_end, down)
                assert await _read_all(server_end) == up
                assert await _read_all(client_end) == down
            assert flow.done is not None
            await flow.done.wait()
            assert tap.read == [up, down]
            assert tap.delivered == [down, up]  # to the client, to the server
            assert tap.ended == ["eof"]
            for stream in (client_end, server_end):
                await trio.aclose_forcefully(stream)

    trio.run(main)

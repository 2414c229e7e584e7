"""The relay as a stream: conformance, segmentation, backpressure, resets.

The two outer ends of a relay (what the client holds and what the server
holds) must behave like one half-closeable stream: ``trio.testing`` ships a
conformance test for exactly that.
"""

from __future__ import annotations

import contextlib
import gc

import pytest
import trio
import trio.testing
from trio.testing import (
    check_half_closeable_stream,
    lockstep_stream_pair,
    memory_stream_pair,
)

from tproxy import Interceptor
from tproxy.flow import EndReason, FlowInfo, FlowRecord
from tproxy.interceptor import Chain
from tproxy.relay.streams import StreamRelay as FlowPair


class Upper(Interceptor):
    def server_data(self, data: bytes) -> bytes:
        return data.upper()


class Boom(Interceptor):
    def client_data(self, data: bytes) -> bytes:
        raise RuntimeError("boom")


class Deny(Interceptor):
    def client_data(self, data: bytes) -> bytes:
        if b"deny" in data:
            self.abort("denied")
        return data


class Banner(Interceptor):
    def start(self) -> None:
        self.inject_to_client(b"hello\n")


def _record() -> FlowRecord:
    return FlowRecord(info=FlowInfo.example(), started=0.0)


def _pair(incoming, outgoing, *interceptors: type[Interceptor], read_size=65536) -> FlowPair:
    info = FlowInfo.example()
    chain = Chain([cls(info) for cls in interceptors]) if interceptors else None
    return FlowPair(incoming, outgoing, _record(), chain, read_size=read_size)


def _memory_pair(*interceptors: type[Interceptor], **kwargs):
    """The client's end, the server's end, and a relay (not started) between them."""
    client_end, incoming = memory_stream_pair()
    outgoing, server_end = memory_stream_pair()
    return client_end, server_end, _pair(incoming, outgoing, *interceptors, **kwargs)


def _relayed(nursery: trio.Nursery, *interceptors: type[Interceptor]):
    """Two outer ends with a relay running between them."""
    client_end, server_end, pair = _memory_pair(*interceptors)
    nursery.start_soon(pair.run)
    return client_end, server_end, pair


class PassThrough(Interceptor):
    pass


@pytest.mark.parametrize("interceptors", [(), (PassThrough, PassThrough)])
def test_relay_is_a_half_closeable_stream(interceptors):
    async def main():
        async with trio.open_nursery() as nursery:

            async def maker():
                client_end, server_end, _ = _relayed(nursery, *interceptors)
                return client_end, server_end

            # No clogged-stream maker: a relay is a buffer of one read per
            # direction, so its client end is never "clogged" in the sense
            # of wait_send_all_might_not_block; backpressure has its own test.
            await check_half_closeable_stream(maker, None)
            nursery.cancel_scope.cancel()

    trio.run(main)


def _one_byte_one_way():
    """A one-way memory stream that delivers one byte per receive."""
    send = trio.testing.MemorySendStream()
    recv = trio.testing.MemoryReceiveStream()

    def pump() -> None:
        trio.testing.memory_stream_pump(send, recv, max_bytes=1)

    async def async_pump() -> None:
        pump()

    send.send_all_hook = async_pump
    recv.receive_some_hook = async_pump
    send.close_hook = pump
    return send, recv


def test_one_byte_segments_arrive_whole():
    """A relay fed one byte at a time (memory_stream_pump) loses and adds nothing."""

    async def main():
        payload = bytes(range(256)) * 40
        up_send, up_recv = _one_byte_one_way()
        down_send, down_recv = _one_byte_one_way()
        client_end = trio.StapledStream(up_send, down_recv)
        incoming = trio.StapledStream(down_send, up_recv)
        outgoing, server_end = memory_stream_pair()
        pair = _pair(incoming, outgoing, Upper)
        got = bytearray()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pair.run)
            await client_end.send_all(payload)
            await client_end.send_eof()
            while chunk := await server_end.receive_some(7):
                got += chunk
            await server_end.send_all(b"reply")
            await server_end.send_eof()
            reply = bytearray()
            while chunk := await client_end.receive_some(100):
                reply += chunk
        assert reply == b"REPLY"
        assert bytes(got) == payload
        assert pair.record.reason is EndReason.EOF
        assert pair.record.bytes_up == len(payload)
        assert pair.record.bytes_down == 5

    trio.run(main)


def test_backpressure_bounds_memory():
    """With a server that never reads, the relay stops reading from the client."""

    async def main():
        client_end, incoming = memory_stream_pair()
        outgoing, _server_end = lockstep_stream_pair()
        pair = _pair(incoming, outgoing, read_size=4096)
        chunk = b"x" * 4096
        sent = 0
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pair.run)

            async def flood():
                nonlocal sent
                for _ in range(10_000):
                    await client_end.send_all(chunk)
                    sent += len(chunk)

            nursery.start_soon(flood)
            await trio.testing.wait_all_tasks_blocked()
            # The relay holds one read at most; the rest waits in the client's
            # memory stream (unbounded in the memory stream itself, not in us).
            assert pair.record.bytes_up <= 2 * len(chunk)
            buffered_in_client_stream = incoming.receive_stream._incoming._data
            assert len(buffered_in_client_stream) >= sent - 2 * len(chunk) - 4096
            nursery.cancel_scope.cancel()
        gc.collect()

    trio.run(main)


@pytest.mark.parametrize(
    ("interceptor", "reason"),
    [(Boom, EndReason.ERROR), (Deny, EndReason.INTERCEPTOR_ABORT)],
)
def test_interceptor_failure_ends_only_its_flow_and_resets(interceptor, reason):
    async def main():
        client_end, server_end, pair = _memory_pair(interceptor)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pair.run)
            await client_end.send_all(b"please deny")
            await trio.testing.wait_all_tasks_blocked()
        assert pair.record.reason is reason
        with pytest.raises((trio.BrokenResourceError, trio.ClosedResourceError)):
            for _ in range(3):
                await client_end.send_all(b"more")
                await trio.testing.wait_all_tasks_blocked()
        assert await server_end.receive_some(100) == b""

    trio.run(main)


def test_banner_from_start_hook_reaches_client_first():
    async def main():
        client_end, server_end, pair = _memory_pair(Banner)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pair.run)
            assert await client_end.receive_some(100) == b"hello\n"
            await server_end.send_all(b"data")
            assert await client_end.receive_some(100) == b"data"
            await client_end.send_eof()
            await server_end.send_eof()
        assert pair.record.reason is EndReason.EOF

    trio.run(main)


def test_cancel_resets_both_ends_and_records_shutdown():
    async def main():
        client_end, server_end, pair = _memory_pair()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pair.run)
            await client_end.send_all(b"x")
            assert await server_end.receive_some(10) == b"x"
            nursery.cancel_scope.cancel()
        assert pair.record.reason is EndReason.SHUTDOWN
        assert await server_end.receive_some(10) == b""

    trio.run(main)


class Forbid(Interceptor):
    def client_data(self, data: bytes) -> bytes:
        self.inject_to_client(b"HTTP/1.1 403 Forbidden\r\n\r\n")
        self.abort("forbidden")


def test_abort_with_reply_delivers_reply_then_eof_and_resets_server():
    async def main():
        client_end, server_end, pair = _memory_pair(Forbid)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pair.run)
            await client_end.send_all(b"GET / HTTP/1.1\r\n\r\n")
            reply = bytearray()
            while chunk := await client_end.receive_some(100):
                reply += chunk
        assert reply == b"HTTP/1.1 403 Forbidden\r\n\r\n"
        assert pair.record.reason is EndReason.INTERCEPTOR_ABORT
        assert await server_end.receive_some(100) == b""

    trio.run(main)


def _idle_pair(idle: float):
    client_end, incoming = memory_stream_pair()
    outgoing, server_end = memory_stream_pair()
    pair = FlowPair(incoming, outgoing, _record(), None, idle_timeout=idle)
    return client_end, server_end, pair


def test_idle_timeout_ends_a_silent_pair_with_a_reset():
    async def main():
        client_end, server_end, pair = _idle_pair(30.0)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pair.run)
            await client_end.send_all(b"x")
            assert await server_end.receive_some(10) == b"x"
        assert pair.record.reason is EndReason.TIMEOUT
        assert trio.current_time() >= 30.0

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_idle_timeout_does_not_outlive_a_finished_pair():
    async def main():
        client_end, server_end, pair = _idle_pair(30.0)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pair.run)
            await client_end.send_eof()
            await server_end.send_eof()
        assert pair.record.reason is EndReason.EOF
        assert trio.current_time() < 30.0

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_a_slow_but_moving_reader_is_not_idle():
    """Progress while one big chunk drains to a slow reader counts as activity."""

    async def main():
        client_end, incoming = lockstep_stream_pair()
        outgoing, server_end = memory_stream_pair()
        pair = FlowPair(incoming, outgoing, _record(), None, idle_timeout=5.0)
        payload = b"y" * 1_000_000
        got = bytearray()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pair.run)
            await server_end.send_all(payload)
            await server_end.send_eof()
            while chunk := await client_end.receive_some(65536):
                got += chunk
                await trio.sleep(2.0)  # 32 KiB/s: one 256 KiB read takes 8 s to drain
            await client_end.send_eof()
        assert bytes(got) == payload
        assert pair.record.reason is EndReason.EOF

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


class AbortOnRequest(Interceptor):
    def client_data(self, data: bytes) -> bytes:
        self.inject_to_client(b"DENIED")
        self.abort("denied")


def test_abort_that_cuts_a_write_to_the_client_resets_it_instead_of_replying():
    async def main():
        client_end, incoming = lockstep_stream_pair()
        outgoing, server_end = memory_stream_pair()
        pair = _pair(incoming, outgoing, AbortOnRequest)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pair.run)
            await server_end.send_all(b"x" * 100_000)  # stuck: the client does not read yet
            await trio.testing.wait_all_tasks_blocked()
            await client_end.send_all(b"request")
            received = bytearray()
            # Memory streams know no reset: the end shows as EOF or a broken stream.
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                while chunk := await client_end.receive_some(65536):
                    received += chunk
        assert pair.record.reason is EndReason.INTERCEPTOR_ABORT
        assert not received.endswith(b"DENIED")

    trio.run(main)

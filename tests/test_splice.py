"""The splice relay on real loopback TCP: bytes, half-close, resets, cancellation, pipes.

Each test builds client_end <-> incoming and outgoing <-> server_end over
127.0.0.1 and relays incoming <-> outgoing with splice, as the engine would
between an accepted and a connected socket. Nothing asserts a time.
"""

from __future__ import annotations

import fcntl
import functools
import os
import random
import socket
import struct
import termios
import time
from collections.abc import Callable

import pytest
import trio
import trio.testing
from stream_helpers import read_all as _read_all
from stream_helpers import reset as _reset
from stream_helpers import send_and_eof as _send_and_eof

from tproxy import Interceptor
from tproxy.flow import EndReason, FlowInfo, FlowRecord
from tproxy.interceptor import Chain
from tproxy.pair import FlowPair
from tproxy.sockets import reset_stream
from tproxy.splice import DEFAULT_CHUNK, close_idle_pipes, splice_available, splice_one_way

pytestmark = pytest.mark.skipif(not splice_available(), reason="os.splice is not available")

_LINGER_RESET = struct.pack("ii", 1, 0)


async def splice_relay(
    client: trio.SocketStream,
    server: trio.SocketStream,
    record: FlowRecord,
    *,
    chunk: int = DEFAULT_CHUNK,
) -> None:
    """Both directions of :func:`splice_one_way`, half-closing each as it ends (a test rig).

    Counts into ``record.bytes_up`` / ``record.bytes_down``. Returns when
    both directions ended cleanly; the caller closes both streams. On a
    reset or broken pipe either way the other direction is stopped, the
    record ends with :attr:`EndReason.RESET` (as :class:`~tproxy.pair.FlowPair`
    records it) and the stream error is raised, so the caller resets both
    ends. Neither stream is closed here.
    """
    failures: list[trio.BrokenResourceError | trio.ClosedResourceError | OSError] = []

    def up(n: int) -> None:
        record.bytes_up += n

    def down(n: int) -> None:
        record.bytes_down += n

    async def direction(
        src: trio.SocketStream, dst: trio.SocketStream, count: Callable[[int], None]
    ) -> None:
        try:
            await splice_one_way(src, dst, count, chunk=chunk)
            await dst.send_eof()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            failures.append(exc)
            nursery.cancel_scope.cancel()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(direction, client, server, up)
        nursery.start_soon(direction, server, client, down)
    if failures:
        exc = failures[0]
        record.end(EndReason.RESET, f"{exc.__cause__ or exc!r}", now=time.monotonic())
        raise exc


def _record() -> FlowRecord:
    return FlowRecord(info=FlowInfo.example(), started=0.0)


async def _tcp_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    """Two ends of one loopback TCP connection."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    try:
        port = listeners[0].socket.getsockname()[1]
        connecting = await trio.open_tcp_stream("127.0.0.1", port)
        accepted = await listeners[0].accept()
        return connecting, accepted
    finally:
        for listener in listeners:
            await listener.aclose()


async def _topology() -> tuple[trio.SocketStream, ...]:
    """(client_end, incoming, outgoing, server_end)."""
    client_end, incoming = await _tcp_pair()
    outgoing, server_end = await _tcp_pair()
    return client_end, incoming, outgoing, server_end


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def _close_all(*streams: trio.SocketStream) -> None:
    for s in streams:
        await trio.aclose_forcefully(s)


async def _serve(incoming: trio.SocketStream, outgoing: trio.SocketStream) -> None:
    """What the engine does around the relay: close after a clean end, reset after a failure."""
    try:
        await splice_relay(incoming, outgoing, _record())
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        await reset_stream(incoming)
        await reset_stream(outgoing)
    finally:
        await trio.aclose_forcefully(incoming)
        await trio.aclose_forcefully(outgoing)


def test_splice_relay_is_a_half_closeable_stream():
    """The outer ends of a splice relay behave as one TCP connection (trio's conformance test)."""

    async def main():
        async with trio.open_nursery() as nursery:

            async def maker():
                client_end, incoming, outgoing, server_end = await _topology()
                nursery.start_soon(_serve, incoming, outgoing)
                return client_end, server_end

            await trio.testing.check_half_closeable_stream(maker, None)
            nursery.cancel_scope.cancel()

    trio.run(main)


@pytest.mark.parametrize("seed", range(6))
def test_bytes_equal_both_ways_for_random_sizes(seed):
    rng = random.Random(seed)
    sizes = [0, 1, 17, 65535, 65537, 300_000, 2_500_000]
    up = rng.randbytes(rng.choice(sizes))
    down = rng.randbytes(rng.choice(sizes))
    chunk = rng.choice([4096, 65536, 256 * 1024])

    async def main():
        client_end, incoming, outgoing, server_end = await _topology()
        record = _record()
        got = {}

        async def client():
            async with trio.open_nursery() as n:
                n.start_soon(_send_and_eof, client_end, up)
                got["down"] = await _read_all(client_end)

        async def server():
            async with trio.open_nursery() as n:
                n.start_soon(_send_and_eof, server_end, down)
                got["up"] = await _read_all(server_end)

        async with trio.open_nursery() as n:
            n.start_soon(functools.partial(splice_relay, incoming, outgoing, record, chunk=chunk))
            n.start_soon(client)
            n.start_soon(server)
        assert got["up"] == up
        assert got["down"] == down
        assert record.bytes_up == len(up)
        assert record.bytes_down == len(down)
        assert record.reason is None  # a clean end is the caller's to record
        await _close_all(client_end, incoming, outgoing, server_end)

    trio.run(main)


@pytest.mark.parametrize("first", ["client", "server"])
def test_half_close_each_way(first):
    """EOF from one side reaches the other while the other direction goes on."""

    async def main():
        client_end, incoming, outgoing, server_end = await _topology()
        record = _record()
        async with trio.open_nursery() as n:
            n.start_soon(splice_relay, incoming, outgoing, record)
            a, b = (client_end, server_end) if first == "client" else (server_end, client_end)
            await _send_and_eof(a, b"request")
            assert await _read_all(b) == b"request"  # data, then EOF
            # The other direction is still open after the half-close.
            await b.send_all(b"reply part 1, ")
            await b.send_all(b"part 2")
            await b.send_eof()
            assert await _read_all(a) == b"reply part 1, part 2"
        assert (record.bytes_up, record.bytes_down) == ((7, 20) if first == "client" else (20, 7))
        await _close_all(client_end, incoming, outgoing, server_end)

    trio.run(main)


def test_splice_one_way_returns_at_eof_without_closing_destination():
    async def main():
        client_end, incoming, outgoing, server_end = await _topology()
        counted = []
        await client_end.send_all(b"abc")
        await client_end.send_eof()
        await splice_one_way(incoming, outgoing, counted.append, chunk=1024)
        assert sum(counted) == 3
        # dst still open: the caller decides when to half-close.
        await outgoing.send_all(b"def")
        await outgoing.send_eof()
        assert await _read_all(server_end) == b"abcdef"
        await _close_all(client_end, incoming, outgoing, server_end)

    trio.run(main)


async def _relay_catching(incoming, outgoing, record, caught: list[BaseException]) -> None:
    try:
        await splice_relay(incoming, outgoing, record)
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        caught.append(exc)


@pytest.mark.parametrize("who", ["client", "server"])
def test_reset_on_either_side_raises_and_records_reset(who):
    async def main():
        client_end, incoming, outgoing, server_end = await _topology()
        record = _record()
        caught: list[BaseException] = []
        async with trio.open_nursery() as n:
            n.start_soon(_relay_catching, incoming, outgoing, record, caught)
            await client_end.send_all(b"x" * 1000)
            assert len(await server_end.receive_some(1000)) > 0
            await trio.testing.wait_all_tasks_blocked()
            _reset(client_end if who == "client" else server_end)
        assert len(caught) == 1
        assert record.reason is EndReason.RESET
        assert "reset" in record.detail.lower() or "pipe" in record.detail.lower()
        await _close_all(client_end, incoming, outgoing, server_end)

    trio.run(main)


def test_write_to_reset_destination_raises():
    """The destination reset while bytes are on their way to it: EPIPE/ECONNRESET."""

    async def main():
        client_end, incoming, outgoing, server_end = await _topology()
        _reset(server_end)
        caught: list[BaseException] = []

        async def one_way():
            try:
                await splice_one_way(incoming, outgoing, lambda n: None)
            except trio.BrokenResourceError as exc:
                caught.append(exc)
                await trio.aclose_forcefully(incoming)

        async with trio.open_nursery() as n:
            n.start_soon(one_way)
            # keep sending until the relay notices the dead destination and drops us
            for _ in range(10_000):
                try:
                    await client_end.send_all(b"y" * 65536)
                except trio.BrokenResourceError:
                    break
                await trio.testing.wait_all_tasks_blocked()
                if caught:
                    break
        assert len(caught) == 1
        await _close_all(client_end, incoming, outgoing, server_end)

    trio.run(main)


def test_cancellation_leaves_no_fds():
    async def main():
        close_idle_pipes()
        before = _fds()
        client_end, incoming, outgoing, server_end = await _topology()
        record = _record()
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as n:
                n.start_soon(splice_relay, incoming, outgoing, record)
                # data in flight and the server not reading: the relay is mid-flow
                await client_end.send_all(os.urandom(200_000))
                await trio.testing.wait_all_tasks_blocked()
                assert _bytes_in_pipes() > 0
                scope.cancel()
        await _close_all(client_end, incoming, outgoing, server_end)
        close_idle_pipes()
        assert _fds() == before

    trio.run(main)


def test_idle_flows_hold_no_pipes():
    """A direction waiting for its source gives its pipe back: idle flows cost sockets only."""

    async def main():
        close_idle_pipes()
        before = _fds()
        ends = []
        async with trio.open_nursery() as n:
            for _ in range(20):
                client_end, incoming, outgoing, server_end = await _topology()
                ends += [client_end, incoming, outgoing, server_end]
                n.start_soon(splice_relay, incoming, outgoing, _record())
            await trio.testing.wait_all_tasks_blocked()
            # 80 sockets, and at most one pipe (idle in the pool) for 40 waiting directions
            assert _fds() - before <= 80 + 2
            # and the idle pipe is lent again when data arrives
            await ends[0].send_all(b"wake")
            assert await ends[3].receive_some(10) == b"wake"
            n.cancel_scope.cancel()
        await _close_all(*ends)
        close_idle_pipes()
        assert _fds() == before

    trio.run(main)


def test_urgent_data_does_not_stall_the_splice_path():
    """splice(2) stops in front of TCP urgent data (MSG_OOB) for good; the pump reads past
    it as the copy path does, so the bytes after it arrive and the end is the real end."""

    async def main():
        client_end, incoming, outgoing, server_end = await _topology()
        async with trio.open_nursery() as n:
            n.start_soon(_serve, incoming, outgoing)
            await client_end.send_all(b"before")
            await trio.sleep(0.05)  # the pump has spliced it and waits for more
            raw = client_end.socket
            await raw.send(b"!", socket.MSG_OOB)
            await raw.send(b"after")
            await client_end.send_eof()
            with trio.fail_after(10):
                assert await _read_all(server_end) == b"beforeafter"
            await server_end.send_eof()
            with trio.fail_after(10):
                assert await _read_all(client_end) == b""
        await _close_all(client_end, server_end)

    trio.run(main)


def test_eof_with_data_still_in_the_pipe():
    """The source ends while the destination is full: everything still arrives, then EOF."""

    async def main():
        client_end, incoming, outgoing, server_end = await _topology()
        for s in (outgoing, server_end):
            s.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
            s.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        payload = os.urandom(500_000)
        record = _record()
        sent = trio.Event()

        async def client():
            await _send_and_eof(client_end, payload)
            sent.set()

        async with trio.open_nursery() as n:
            n.start_soon(splice_relay, incoming, outgoing, record)
            n.start_soon(client)
            await trio.testing.wait_all_tasks_blocked()
            # The client has sent everything and its EOF; the server has read nothing, so
            # the relay holds bytes in its pipe. Backpressure: never more than one pipe.
            assert sent.is_set()
            in_pipe = _bytes_in_pipes()
            assert 0 < in_pipe <= 256 * 1024
            assert record.bytes_up >= in_pipe + _inq(server_end)
            assert await _read_all(server_end) == payload
            await server_end.send_eof()
        assert record.bytes_up == len(payload)
        assert await _read_all(client_end) == b""
        await _close_all(client_end, incoming, outgoing, server_end)

    trio.run(main)


def test_closed_source_raises_closed_resource_error():
    async def main():
        client_end, incoming, outgoing, server_end = await _topology()
        await incoming.aclose()
        with pytest.raises(trio.ClosedResourceError):
            await splice_one_way(incoming, outgoing, lambda n: None)
        await _close_all(client_end, incoming, outgoing, server_end)

    trio.run(main)


def _inq(fd_or_stream: trio.SocketStream | int) -> int:
    fd = fd_or_stream if isinstance(fd_or_stream, int) else fd_or_stream.socket.fileno()
    return struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0" * 4))[0]


def _bytes_in_pipes() -> int:
    """Bytes held by every pipe this process has open (the relay's, here)."""
    held = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
            if target.startswith("pipe:"):
                held[target] = _inq(int(name))  # both ends of a pipe name one inode
        except OSError:
            pass
    return sum(held.values())


# -- the flow pair over real sockets: the splice path once nobody needs the bytes ----------


class _Peek(Interceptor):
    """Sees the first client chunk, then hands the rest of the flow back (passthrough)."""

    def client_data(self, data: bytes) -> bytes:
        self.passthrough()
        return data


def _flow_pair(incoming, outgoing, *interceptors: type[Interceptor]) -> FlowPair:
    info = FlowInfo.example()
    chain = Chain([cls(info) for cls in interceptors]) if interceptors else None
    return FlowPair(incoming, outgoing, _record(), chain)


@pytest.mark.parametrize("interceptors", [(), (_Peek,)])
def test_flow_pair_over_tcp_is_a_half_closeable_stream(interceptors):
    async def main():
        async with trio.open_nursery() as nursery:

            async def maker():
                client_end, incoming, outgoing, server_end = await _topology()
                nursery.start_soon(_flow_pair(incoming, outgoing, *interceptors).run)
                return client_end, server_end

            await trio.testing.check_half_closeable_stream(maker, None)
            nursery.cancel_scope.cancel()

    trio.run(main)


@pytest.mark.parametrize("interceptors", [(), (_Peek,)])
def test_flow_pair_over_tcp_bytes_counters_and_reset(interceptors):
    async def main():
        client_end, incoming, outgoing, server_end = await _topology()
        pair = _flow_pair(incoming, outgoing, *interceptors)
        payload = os.urandom(3_000_000)
        async with trio.open_nursery() as n:
            n.start_soon(pair.run)
            n.start_soon(_send_and_eof, client_end, payload)
            assert await _read_all(server_end) == payload
            await server_end.send_all(b"ok")
            assert await client_end.receive_some(10) == b"ok"
            _reset(server_end)
            with pytest.raises(trio.BrokenResourceError):
                while await client_end.receive_some(10):
                    pass
        assert pair.record.reason is EndReason.RESET
        assert (pair.record.bytes_up, pair.record.bytes_down) == (len(payload), 2)
        await _close_all(client_end, incoming, outgoing, server_end)

    trio.run(main)


def test_flow_pair_uses_splice_when_it_can(monkeypatch):
    """Once integrated (FlowPair.splice), a pair without interceptors splices both ways."""
    import tproxy.pair

    if not hasattr(tproxy.pair, "splice_one_way"):
        pytest.skip("FlowPair does not splice yet")
    calls = []
    real = tproxy.pair.splice_one_way

    async def spy(*args, **kwargs):
        calls.append(args[:2])
        await real(*args, **kwargs)

    monkeypatch.setattr(tproxy.pair, "splice_one_way", spy)

    async def main():
        client_end, incoming, outgoing, server_end = await _topology()
        async with trio.open_nursery() as n:
            n.start_soon(_flow_pair(incoming, outgoing).run)
            await _send_and_eof(client_end, b"up")
            assert await _read_all(server_end) == b"up"
            await _send_and_eof(server_end, b"down")
            assert await _read_all(client_end) == b"down"
        assert sorted(map(id, sum(calls, ()))) == sorted(
            map(id, (incoming, outgoing, outgoing, incoming))
        )
        await _close_all(client_end, incoming, outgoing, server_end)

    trio.run(main)


async def _tcp(small_buffers: bool = False):
    """(proxy-side, peer-side) streams over loopback TCP; small buffers make a slow peer."""
    listener = trio.socket.socket()
    if small_buffers:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
    await listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    peer = trio.socket.socket()
    if small_buffers:
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
    await peer.connect(listener.getsockname())
    proxy_side, _ = await listener.accept()
    listener.close()
    return trio.SocketStream(proxy_side), trio.SocketStream(peer)


class _AckThenPassthrough(Interceptor):
    def server_data(self, data: bytes) -> bytes:
        self.inject_to_server(b"ACK")
        self.passthrough()
        return data


def test_injection_from_the_hook_that_turns_passthrough_on_is_not_starved():
    """The other direction may start splicing while that injection still waits to be sent."""

    async def main():
        incoming, client = await _tcp(small_buffers=True)
        outgoing, server = await _tcp()
        big = 8 * 1024 * 1024
        info = FlowInfo.example()
        pair = FlowPair(incoming, outgoing, _record(), Chain([_AckThenPassthrough(info)]),
                        read_size=big)
        got = b""
        total = 0
        with trio.fail_after(30):  # hang guard
            async with trio.open_nursery() as nursery:
                nursery.start_soon(pair.run)
                # The pump toward the slow client blocks sending this.
                nursery.start_soon(server.send_all, b"x" * big)
                await trio.sleep(0.3)
                await client.send_all(b"REQ")  # the client->server pump starts splicing
                while total < big:
                    total += len(await client.receive_some(1 << 20))
                while b"ACK" not in got:
                    got += await server.receive_some(65536)
                nursery.cancel_scope.cancel()
        assert got == b"REQACK"
        assert total == big
        for stream in (client, server, incoming, outgoing):
            await trio.aclose_forcefully(stream)

    trio.run(main)

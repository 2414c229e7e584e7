"""The flow rules as one conformance suite, run against every relay shell.

In the manner of ``trio.testing.check_half_closeable_stream``: a shell is
described by ``make_pair``, an async context manager factory that puts a
relay between two outer ends and yields a :class:`Rig`; every check then
plays client and server on those ends and looks at what they see and at
the flow record. :func:`check_flow_rules` runs them all; the test files run
them one by one (``FLOW_RULES``) so a failure names its rule.

The rules are the flow core's (tproxy/relay/core.py, docs/architecture.md);
what is checked here is that a shell carries them out on real streams.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field

import pytest
import trio
import trio.testing

from tproxy import Interceptor
from tproxy.flow import EndReason, FlowRecord

HANG_GUARD = 20.0
"""Seconds any wait in a check may take before it fails instead of hanging."""


@dataclass
class Rig:
    """One relayed pair as a check sees it."""

    client: trio.abc.HalfCloseableStream
    """The client's end (talks to the relay's incoming side)."""
    server: trio.abc.HalfCloseableStream
    """The server's end (talks to the relay's outgoing side)."""
    record: FlowRecord
    done: Callable[[], Awaitable[None]]
    """Returns once the relay ended the pair (and reported the record)."""
    cancel: Callable[[], None]
    """Shut the relay down (the engine's shutdown, after its grace period)."""
    reset_client: Callable[[], None] | None = None
    """The client resets (RST); ``None`` where the transport has no reset (memory)."""
    reset_server: Callable[[], None] | None = None
    timeout: float = 0.5
    """The idle timeout the rig was made with, when asked for one."""
    extras: dict[str, object] = field(default_factory=dict)


MakePair = Callable[..., AbstractAsyncContextManager[Rig]]
"""``make_pair(*interceptor_classes, idle_timeout=False)`` -> an async context manager of a
:class:`Rig`; ``idle_timeout=True`` asks for the rig's (short) idle timeout."""


# -- interceptors the checks use ---------------------------------------------------------------


class Watch(Interceptor):
    """Sees every byte both ways and returns it unchanged (the copy path)."""


class Upper(Interceptor):
    def server_data(self, data: bytes) -> bytes:
        return data.upper()


class Peek(Interceptor):
    """Sees the first client chunk, then hands the rest back (passthrough mid-flow)."""

    def client_data(self, data: bytes) -> bytes:
        self.passthrough()
        return data


class Boom(Interceptor):
    def client_data(self, data: bytes) -> bytes:
        raise RuntimeError("boom")


class Forbid(Interceptor):
    def client_data(self, data: bytes) -> bytes:
        self.inject_to_client(b"HTTP/1.1 403 Forbidden\r\ncontent-length: 0\r\n\r\n")
        self.abort("forbidden")


class Banner(Interceptor):
    def start(self) -> None:
        self.inject_to_client(b"220 hello\r\n")


# -- steps ------------------------------------------------------------------------------------


async def read_all(stream: trio.abc.ReceiveStream) -> bytes:
    chunks = []
    with trio.fail_after(HANG_GUARD):
        while data := await stream.receive_some(65536):
            chunks.append(data)
    return b"".join(chunks)


async def send_and_eof(stream: trio.abc.HalfCloseableStream, data: bytes) -> None:
    if data:
        await stream.send_all(data)
    await stream.send_eof()


async def sees_the_end(stream: trio.abc.ReceiveStream, *, reset: bool | None) -> None:
    """The pair ended toward this end: ``reset`` True: a reset; False: a clean end of
    stream; None: either (a transport without resets shows a reset as an end)."""
    try:
        with trio.fail_after(HANG_GUARD):
            while await stream.receive_some(65536):
                pass
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        assert reset is not False, f"expected a clean end, got {exc!r} ({exc.__cause__!r})"
        if reset:
            assert isinstance(exc.__cause__, ConnectionResetError), exc.__cause__
        return
    assert not reset, "expected a reset, got a clean end of stream"


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- the rules -----------------------------------------------------------------------------------


async def check_half_close_client_first(make_pair: MakePair) -> None:
    async with make_pair(Watch) as rig:
        await send_and_eof(rig.client, b"request")
        assert await read_all(rig.server) == b"request"
        await rig.server.send_all(b"reply after the client's end")
        assert await rig.client.receive_some(100) == b"reply after the client's end"
        await rig.server.send_eof()
        assert await read_all(rig.client) == b""
        await rig.done()
        assert rig.record.reason is EndReason.EOF
        assert (rig.record.bytes_up, rig.record.bytes_down) == (7, 28)


async def check_half_close_server_first(make_pair: MakePair) -> None:
    async with make_pair() as rig:
        await send_and_eof(rig.server, b"banner, then nothing more")
        assert await read_all(rig.client) == b"banner, then nothing more"
        await rig.client.send_all(b"still uploading")
        assert await rig.server.receive_some(100) == b"still uploading"
        await rig.client.send_eof()
        assert await read_all(rig.server) == b""
        await rig.done()
        assert rig.record.reason is EndReason.EOF


async def check_reset_from_the_client(make_pair: MakePair) -> None:
    async with make_pair(Watch) as rig:
        if rig.reset_client is None:
            pytest.skip("this transport has no reset")
        await rig.client.send_all(b"x")
        assert await rig.server.receive_some(10) == b"x"
        rig.reset_client()
        await sees_the_end(rig.server, reset=True)
        await rig.done()
        assert rig.record.reason is EndReason.RESET


async def check_reset_from_the_server(make_pair: MakePair) -> None:
    async with make_pair() as rig:
        if rig.reset_server is None:
            pytest.skip("this transport has no reset")
        await rig.server.send_all(b"y")
        assert await rig.client.receive_some(10) == b"y"
        rig.reset_server()
        await sees_the_end(rig.client, reset=True)
        await rig.done()
        assert rig.record.reason is EndReason.RESET


async def check_backpressure_bound(make_pair: MakePair) -> None:
    """A server that never reads: the client ends up blocked; the relay took what it sent
    at most (never more than it was given: nothing is invented, nothing buffered without end)."""
    async with make_pair(Watch) as rig:
        block = b"z" * 65536
        sent = 0
        cap = 64 * 1024 * 1024
        with trio.move_on_after(2.0):  # a client that blocks for good is what we expect
            while sent < cap:
                with trio.move_on_after(0.5) as blocked:
                    await rig.client.send_all(block)
                    sent += len(block)
                if blocked.cancelled_caught:
                    break
        assert sent < cap, "the client was never held back: unbounded buffering"
        assert rig.record.bytes_up <= sent
        rig.cancel()
        await rig.done()


async def check_idle_timeout(make_pair: MakePair) -> None:
    async with make_pair(idle_timeout=True) as rig:
        await rig.client.send_all(b"x")
        assert await rig.server.receive_some(10) == b"x"
        await rig.done()  # nothing moves: the timeout ends it
        assert rig.record.reason is EndReason.TIMEOUT
        assert rig.record.detail == f"idle for {rig.timeout:g}s"
        await sees_the_end(rig.client, reset=True if rig.reset_client else None)


async def check_abort_with_reply_before_reset(make_pair: MakePair) -> None:
    async with make_pair(Forbid) as rig:
        await rig.client.send_all(b"GET / HTTP/1.1\r\n\r\n")
        reply = await read_all(rig.client)  # then a clean end, not a reset
        assert reply.startswith(b"HTTP/1.1 403 Forbidden\r\n")
        await sees_the_end(rig.server, reset=True if rig.reset_server else None)
        await rig.done()
        assert rig.record.reason is EndReason.INTERCEPTOR_ABORT
        assert rig.record.detail == "forbidden"


async def check_shutdown_resets_both(make_pair: MakePair) -> None:
    async with make_pair(Watch) as rig:
        await rig.client.send_all(b"x")
        assert await rig.server.receive_some(10) == b"x"
        rig.cancel()
        await rig.done()
        assert rig.record.reason is EndReason.SHUTDOWN
        reset = True if rig.reset_client else None
        await sees_the_end(rig.client, reset=reset)
        await sees_the_end(rig.server, reset=reset)


async def check_an_interceptor_that_raises(make_pair: MakePair) -> None:
    async with make_pair(Boom) as rig:
        await rig.client.send_all(b"trigger")
        await rig.done()
        assert rig.record.reason is EndReason.ERROR
        assert "Boom.client_data raised RuntimeError('boom')" in rig.record.detail
        reset = True if rig.reset_client else None
        await sees_the_end(rig.client, reset=reset)
        await sees_the_end(rig.server, reset=reset)


async def check_injection_from_start(make_pair: MakePair) -> None:
    async with make_pair(Banner) as rig:
        with trio.fail_after(HANG_GUARD):
            assert await rig.client.receive_some(100) == b"220 hello\r\n"
        await send_and_eof(rig.server, b"after")
        await send_and_eof(rig.client, b"")
        assert await read_all(rig.client) == b"after"
        await rig.done()
        assert rig.record.reason is EndReason.EOF


async def check_passthrough_mid_flow(make_pair: MakePair) -> None:
    rng = random.Random(3)
    up = rng.randbytes(2_000_000)
    down = rng.randbytes(1_500_000)
    async with make_pair(Peek) as rig:
        await rig.client.send_all(b"first")
        with trio.fail_after(HANG_GUARD):
            assert await rig.server.receive_some(100) == b"first"
        async with trio.open_nursery() as n:
            n.start_soon(send_and_eof, rig.client, up)
            n.start_soon(send_and_eof, rig.server, down)
            got_up = await read_all(rig.server)
            got_down = await read_all(rig.client)
        assert digest(got_up) == digest(up) and digest(got_down) == digest(down)
        await rig.done()
        assert rig.record.reason is EndReason.EOF
        assert (rig.record.bytes_up, rig.record.bytes_down) == (len(up) + 5, len(down))


async def check_one_byte_segments(make_pair: MakePair) -> None:
    payload = bytes(range(256)) * 8
    async with make_pair(Upper) as rig:

        async def trickle(stream: trio.abc.HalfCloseableStream, data: bytes) -> None:
            for i in range(len(data)):
                await stream.send_all(data[i : i + 1])
                await trio.sleep(0)
            await stream.send_eof()

        async with trio.open_nursery() as n:
            n.start_soon(trickle, rig.client, payload)
            n.start_soon(trickle, rig.server, payload)
            got_up = await read_all(rig.server)
            got_down = await read_all(rig.client)
        assert digest(got_up) == digest(payload)
        assert digest(got_down) == digest(payload.upper())
        await rig.done()
        assert rig.record.reason is EndReason.EOF


async def check_random_chunking(make_pair: MakePair) -> None:
    for seed, interceptors in enumerate([(), (Watch,), (Watch, Peek)]):
        rng = random.Random(seed)
        up = rng.randbytes(rng.choice([1, 4097, 700_000]))
        down = rng.randbytes(rng.choice([3, 65537, 900_000]))
        async with make_pair(*interceptors) as rig:

            async def chunked(stream: trio.abc.HalfCloseableStream, data: bytes, seed: int) -> None:
                pick = random.Random(seed)
                i = 0
                while i < len(data):
                    n = pick.choice([1, 7, 1000, 65536, 300_000])
                    await stream.send_all(data[i : i + n])
                    i += n
                await stream.send_eof()

            async with trio.open_nursery() as n:
                n.start_soon(chunked, rig.client, up, seed)
                n.start_soon(chunked, rig.server, down, seed + 100)
                got_up = await read_all(rig.server)
                got_down = await read_all(rig.client)
            assert digest(got_up) == digest(up), interceptors
            assert digest(got_down) == digest(down), interceptors
            await rig.done()
            assert rig.record.reason is EndReason.EOF
            assert (rig.record.bytes_up, rig.record.bytes_down) == (len(up), len(down))


FLOW_RULES: list[Callable[[MakePair], Awaitable[None]]] = [
    check_half_close_client_first,
    check_half_close_server_first,
    check_reset_from_the_client,
    check_reset_from_the_server,
    check_backpressure_bound,
    check_idle_timeout,
    check_abort_with_reply_before_reset,
    check_shutdown_resets_both,
    check_an_interceptor_that_raises,
    check_injection_from_start,
    check_passthrough_mid_flow,
    check_one_byte_segments,
    check_random_chunking,
]
"""Every rule; connect timeouts and the shutdown grace are the hub's and the server's
(test_flow_rules.py checks them there: the stream shell never connects)."""


async def check_flow_rules(make_pair: MakePair) -> None:
    """Run every rule against one shell (what ``check_half_closeable_stream`` is to streams)."""
    for check in FLOW_RULES:
        await check(make_pair)

"""Interceptors' thread jobs in both relay shells, on real loopback TCP.

The job blocks on a :class:`threading.Event` the test sets, so "the job is
still running" is known by construction. On a relay that ran jobs inline
the event loop would be frozen meanwhile: these tests would fail (each
job's wait is bounded, so they fail instead of hanging).
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import AsyncIterator

import pytest
import trio

from tproxy import Interceptor
from tproxy.flow import EndReason, FlowInfo, FlowRecord, next_flow_id
from tproxy.hub import SpliceHub
from tproxy.interceptor import Chain
from tproxy.relay.streams import StreamRelay

pytestmark = pytest.mark.timeout(60)

HANG_GUARD = 10.0


class Gate:
    """A job that blocks until released (at most HANG_GUARD seconds), then returns b"X"."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.release = threading.Event()
        self.finished = threading.Event()

    def __call__(self) -> bytes:
        self.started.set()
        self.release.wait(HANG_GUARD)
        self.finished.set()
        return b"X"

    async def wait_started(self) -> None:
        with trio.fail_after(HANG_GUARD):
            while not self.started.is_set():
                await trio.sleep(0.005)


def _slow(gate: Gate, hold: str = "both") -> type[Interceptor]:
    class Slow(Interceptor):
        """Sends the job's result, then the chunk that started it, to the server."""

        def client_data(self, data: bytes) -> bytes:
            if data.startswith(b"slow"):
                self.run_in_thread(gate, then=lambda r: self.inject_to_server(r + data), hold=hold)
                return b""
            return data

    return Slow


def _tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        connecting = socket.create_connection(listener.getsockname())
        accepted, _ = listener.accept()
    connecting.setblocking(False)
    accepted.setblocking(False)
    return connecting, accepted


def _stream(sock: socket.socket) -> trio.SocketStream:
    return trio.SocketStream(trio.socket.from_stdlib_socket(sock))


def _record() -> FlowRecord:
    info = FlowInfo(
        id=next_flow_id(), client=("127.0.0.1", 1), destination=("127.0.0.1", 2), mode="forward"
    )
    return FlowRecord(info=info, started=time.monotonic())


async def _recv_exact(stream: trio.SocketStream, size: int) -> bytes:
    data = b""
    with trio.fail_after(HANG_GUARD):
        while len(data) < size:
            chunk = await stream.receive_some(size - len(data))
            if not chunk:
                break
            data += chunk
    return data


async def _nothing_waits(stream: trio.SocketStream) -> bool:
    """Whether nothing can be read now (the socket's receive queue is empty)."""
    with trio.move_on_after(0) as scope:
        await stream.receive_some(1)
    return scope.cancelled_caught


class Pair:
    """Client end <-> (incoming, outgoing) <-> server end, for a shell to relay."""

    def __init__(self) -> None:
        client_end, self.incoming = _tcp_pair()
        self.outgoing, server_end = _tcp_pair()
        self.client = _stream(client_end)
        self.server = _stream(server_end)
        self.record = _record()


# -- the trio-stream shell ----------------------------------------------------------------


@pytest.mark.trio
async def test_stream_relay_runs_a_job_off_the_loop_with_its_hold(
    nursery: trio.Nursery,
) -> None:
    gate = Gate()
    pair = Pair()
    chain = Chain([_slow(gate, hold="client")(pair.record.info)])
    relay = StreamRelay(_stream(pair.incoming), _stream(pair.outgoing), pair.record, chain)
    done = trio.Event()

    async def run() -> None:
        await relay.run()
        done.set()

    nursery.start_soon(run)
    try:
        await pair.client.send_all(b"slow")
        await gate.wait_started()
        await pair.client.send_all(b"more")  # held behind the job (client reading)
        # The server's direction is not held, and the loop runs: it flows now.
        await pair.server.send_all(b"down")
        assert await _recv_exact(pair.client, 4) == b"down"
        assert not gate.finished.is_set()
        assert await _nothing_waits(pair.server)
    finally:
        gate.release.set()
    assert await _recv_exact(pair.server, 9) == b"Xslowmore"
    await pair.client.send_eof()
    await pair.server.send_eof()
    with trio.fail_after(HANG_GUARD):
        await done.wait()
    assert pair.record.reason == EndReason.EOF


@pytest.mark.trio
async def test_stream_relay_cancelled_with_a_running_job_does_not_wait_for_it() -> None:
    gate = Gate()
    pair = Pair()
    relay = StreamRelay(
        _stream(pair.incoming),
        _stream(pair.outgoing),
        pair.record,
        Chain([_slow(gate)(pair.record.info)]),
    )
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(relay.run)
            await pair.client.send_all(b"slow")
            await gate.wait_started()
            nursery.cancel_scope.cancel()  # the engine's shutdown: the job is abandoned
        assert not gate.finished.is_set()  # returned while fn still runs in its thread
        assert pair.record.reason == EndReason.SHUTDOWN
    finally:
        gate.release.set()


@pytest.mark.trio
async def test_stream_relay_drops_a_job_whose_flow_ended(nursery: trio.Nursery) -> None:
    gate = Gate()
    pair = Pair()
    relay = StreamRelay(
        _stream(pair.incoming),
        _stream(pair.outgoing),
        pair.record,
        Chain([_slow(gate, hold="client")(pair.record.info)]),
    )
    done = trio.Event()

    async def run() -> None:
        await relay.run()
        done.set()

    nursery.start_soon(run)
    try:
        await pair.client.send_all(b"slow")
        await gate.wait_started()
        pair.server.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
        await pair.server.aclose()  # a reset from the server ends the pair
        with trio.fail_after(HANG_GUARD):
            await done.wait()
        assert pair.record.reason == EndReason.RESET
    finally:
        gate.release.set()


# -- the hub -------------------------------------------------------------------------------


class Closed:
    def __init__(self) -> None:
        self.records: list[FlowRecord] = []

    def __call__(self, record: FlowRecord) -> None:
        self.records.append(record)


@contextlib.asynccontextmanager
async def _hub() -> AsyncIterator[tuple[SpliceHub, Closed, trio.Nursery]]:
    closed = Closed()

    def opened(info: FlowInfo, source: object) -> FlowRecord:
        raise AssertionError("not used: the tests adopt pairs")

    hub = SpliceHub(opened=opened, rejected=lambda *a: None, closed=closed)
    async with trio.open_nursery() as nursery:
        await nursery.start(hub.run)
        yield hub, closed, nursery
        nursery.cancel_scope.cancel()


@pytest.mark.trio
async def test_hub_runs_a_job_off_the_loop_and_relays_other_flows_meanwhile() -> None:
    gate = Gate()
    async with _hub() as (hub, _closed, _):
        slow, other = Pair(), Pair()
        hub.adopt(slow.incoming, slow.outgoing, slow.record, Chain([_slow(gate)(slow.record.info)]))
        hub.adopt(
            other.incoming, other.outgoing, other.record, Chain([_slow(gate)(other.record.info)])
        )
        try:
            await slow.client.send_all(b"slow")
            await gate.wait_started()
            await slow.client.send_all(b"more")
            assert hub.jobs_running == 1
            # Another flow through the same hub (and an interceptor) goes on meanwhile.
            await other.client.send_all(b"fast")
            assert await _recv_exact(other.server, 4) == b"fast"
            await other.server.send_all(b"back")
            assert await _recv_exact(other.client, 4) == b"back"
            assert not gate.finished.is_set()
            assert await _nothing_waits(slow.server)
        finally:
            gate.release.set()
        # The completion wakes the hub: the result, then the held bytes, in order.
        assert await _recv_exact(slow.server, 9) == b"Xslowmore"
        assert hub.jobs_running == 0
        await slow.server.send_all(b"reply")
        assert await _recv_exact(slow.client, 5) == b"reply"


@pytest.mark.trio
async def test_hub_drops_a_job_whose_flow_ended_and_stops_without_waiting() -> None:
    gate, stuck = Gate(), Gate()
    try:
        async with _hub() as (hub, closed, _):
            ended, running = Pair(), Pair()
            flow = hub.adopt(
                ended.incoming,
                ended.outgoing,
                ended.record,
                Chain([_slow(gate)(ended.record.info)]),
            )
            hub.adopt(
                running.incoming,
                running.outgoing,
                running.record,
                Chain([_slow(stuck)(running.record.info)]),
            )
            await ended.client.send_all(b"slow")
            await running.client.send_all(b"slow")
            await gate.wait_started()
            await stuck.wait_started()
            hub.abort(flow, EndReason.RESET, "test")  # the flow ends while its job runs
            assert ended.record.reason == EndReason.RESET
            gate.release.set()
            with trio.fail_after(HANG_GUARD):
                while hub.jobs_running > 1:
                    await trio.sleep(0.005)
            assert len(hub) == 1  # the dropped result ended nothing else
            # Leaving the block cancels the hub while `stuck` still runs: it is abandoned.
        assert not stuck.finished.is_set()
        assert running.record.reason == EndReason.SHUTDOWN
        assert [r.info.id for r in closed.records] == [ended.record.info.id, running.record.info.id]
    finally:
        gate.release.set()
        stuck.release.set()

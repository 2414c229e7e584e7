"""The splice hub (tproxy.hub) on real loopback TCP: the copy path's rules, flow by flow.

Each test builds client_end <-> incoming and outgoing <-> server_end over
loopback and hands incoming and outgoing to a running :class:`SpliceHub`
(``adopt``), or lets the hub open the outgoing flow itself (``connect``). The
outer ends are trio streams; no socket is mocked, only the failures a test
injects on purpose. Times are hang guards, and lower bounds where a timeout
must not fire early; the "is the hub quiet" checks count the hub task's
scheduler steps, not seconds of CPU.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import gc
import os
import random
import select
import socket
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import pytest
import trio
import trio.testing
from explicit_harness import ipv6_loopback
from stream_helpers import read_all as _read_all
from stream_helpers import reset as _reset
from stream_helpers import send_and_eof as _send_and_eof

import tproxy.splice
from tproxy.engine import Engine, EngineConfig
from tproxy.explicit import handler_for
from tproxy.explicit.settings import ExplicitSettings
from tproxy.flow import Address, EndReason, FlowInfo, FlowRecord, next_flow_id
from tproxy.hub import HubFlow, SpliceHub
from tproxy.modes import ModeSpec
from tproxy.server import Door, Server
from tproxy.sockets import SourcePolicy, outgoing_socket
from tproxy.splice import close_idle_pipes, splice_available

pytestmark = [
    pytest.mark.skipif(not splice_available(), reason="os.splice is not available"),
    pytest.mark.timeout(60),  # hang guard for the whole test; each wait has its own below
]

HANG_GUARD = 10.0
"""Seconds any single wait may take before the test fails instead of hanging."""

_V6 = pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback")
HOSTS = ["127.0.0.1", pytest.param("::1", marks=_V6)]

_LINGER_RESET = struct.pack("ii", 1, 0)


# -- rigs ----------------------------------------------------------------------------------


class Reports:
    """What a hub reports through its callbacks, and a way to wait for it."""

    def __init__(self) -> None:
        self.opened: list[tuple[FlowInfo, Address]] = []
        self.rejected: list[tuple[FlowInfo, EndReason, str]] = []
        self.closed: list[FlowRecord] = []
        self._changed = trio.Event()

    def on_opened(self, info: FlowInfo, source: Address) -> FlowRecord:
        self.opened.append((info, source))
        self._poke()
        return FlowRecord(info=info, started=time.monotonic())

    def on_rejected(self, info: FlowInfo, reason: EndReason, detail: str) -> None:
        self.rejected.append((info, reason, detail))
        self._poke()

    def on_closed(self, record: FlowRecord) -> None:
        self.closed.append(record)
        self._poke()

    def _poke(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait(self, predicate: Callable[[], object]) -> None:
        with trio.fail_after(HANG_GUARD):
            while not predicate():
                await self._changed.wait()


def _hub(reports: Reports, **kwargs: object) -> SpliceHub:
    return SpliceHub(
        opened=reports.on_opened,
        rejected=reports.on_rejected,
        closed=reports.on_closed,
        **kwargs,  # type: ignore[arg-type]
    )


@contextlib.asynccontextmanager
async def running_hub(**kwargs: object) -> AsyncIterator[tuple[SpliceHub, Reports]]:
    """A hub whose ``run`` is running; cancelled on the way out."""
    reports = Reports()
    hub = _hub(reports, **kwargs)
    async with trio.open_nursery() as nursery:
        await nursery.start(hub.run)
        try:
            yield hub, reports
        finally:
            nursery.cancel_scope.cancel()


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _listener(host: str = "127.0.0.1", backlog: int = 16, *, small: bool = False) -> socket.socket:
    sock = socket.socket(_family(host), socket.SOCK_STREAM)
    if small:
        _make_small(sock)  # accepted sockets inherit these
    sock.bind((host, 0))
    sock.listen(backlog)
    return sock


SMALL_BUFFER = 8192
"""SO_SNDBUF/SO_RCVBUF of a "small" connection (the kernel doubles it)."""
SMALL_MSS = 1400
"""Its segment size: loopback's own (about 64 KiB) is larger than a small buffer, and TCP
then crawls on zero-window probes instead of moving bytes as the reader frees room."""


def _tcp_pair(
    host: str = "127.0.0.1", *, small: bool = False
) -> tuple[socket.socket, socket.socket]:
    """(connecting, accepted): two ends of one loopback TCP connection, non-blocking.

    ``small``: both ends get small, fixed buffers (no autotuning) and a small MSS, set
    before the connection exists so the window is negotiated for them.
    """
    with _listener(host, small=small) as listener:
        connecting = socket.socket(_family(host), socket.SOCK_STREAM)
        if small:
            _make_small(connecting)
        connecting.connect(listener.getsockname()[:2])
        accepted, _ = listener.accept()
    connecting.setblocking(False)
    accepted.setblocking(False)
    return connecting, accepted


def _make_small(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SMALL_BUFFER)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL_BUFFER)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, SMALL_MSS)


def _stream(sock: socket.socket) -> trio.SocketStream:
    return trio.SocketStream(trio.socket.from_stdlib_socket(sock))


def _record(host: str = "127.0.0.1") -> FlowRecord:
    info = FlowInfo(id=next_flow_id(), client=(host, 1), destination=(host, 2), mode="forward")
    return FlowRecord(info=info, started=time.monotonic())


class Relayed:
    """One flow pair adopted by the hub: the two outer ends, the proxy's sockets, the flow."""

    def __init__(
        self,
        hub: SpliceHub,
        host: str = "127.0.0.1",
        *,
        small_client: bool = False,
        small_server: bool = False,
        early: bytes = b"",
    ) -> None:
        """``small_*``: small buffers on that side's connection; ``early``: bytes the
        client has sent before the hub takes the pair."""
        client_end, self.incoming = _tcp_pair(host, small=small_client)
        self.outgoing, server_end = _tcp_pair(host, small=small_server)
        if early:
            client_end.sendall(early)
        self.client_sock, self.server_sock = client_end, server_end
        self.client = _stream(client_end)  # (these wrap the same socket objects)
        self.server = _stream(server_end)
        self.record = _record(host)
        self.flow: HubFlow = hub.adopt(self.incoming, self.outgoing, self.record)

    async def done(self) -> FlowRecord:
        assert self.flow.done is not None
        with trio.fail_after(HANG_GUARD):
            await self.flow.done.wait()
        return self.record

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.client)
        await trio.aclose_forcefully(self.server)


async def _sees_reset(stream: trio.SocketStream) -> None:
    """The peer was reset (RST), not closed politely (FIN): receiving ends in ECONNRESET."""
    with trio.fail_after(HANG_GUARD), pytest.raises(trio.BrokenResourceError) as caught:
        while await stream.receive_some(65536):
            pass  # bytes that arrived before the reset may still be read
    assert isinstance(caught.value.__cause__, ConnectionResetError), caught.value.__cause__


async def _send_fails_at_once(sock: socket.socket) -> None:
    """The peer was reset after it had sent us its FIN: receiving only shows that EOF again
    (Linux), but the reset shows at once on the next send (a peer that had merely closed
    would take that send and answer it with a reset only later)."""
    await trio.testing.wait_all_tasks_blocked(cushion=0.01)  # the RST is in by now
    with pytest.raises((BrokenPipeError, ConnectionResetError)):
        sock.send(b"x")


def _fds() -> int:
    """Open descriptors; garbage of earlier tests (sockets in reference cycles) closed first."""
    gc.collect()
    return len(os.listdir("/proc/self/fd"))


def _pipe_fds() -> set[int]:
    """The descriptors of every pipe end this process has open."""
    found = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}").startswith("pipe:"):
                found.add(int(name))
        except OSError:
            pass  # the listing's own descriptor, closed meanwhile
    return found


def _pooled_pipe_fds() -> set[int]:
    return tproxy.splice.pipes.idle_fds()


def _closed_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on (connects to it are refused)."""
    with socket.socket(_family(host)) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def _unanswered(host: str = "127.0.0.1") -> Iterator[Address]:
    """An address whose SYNs are dropped: a listen(0) listener whose accept queue is full.

    Linux drops a SYN when the accept queue is full (tcp_abort_on_overflow=0), so
    a connect there stays in progress (SYN_SENT) until its own timeout.
    """
    listener = _listener(host, backlog=0)
    fillers = []
    try:
        address = listener.getsockname()[:2]
        for _ in range(2):  # one fills the queue (backlog 0 holds one); one more for margin
            s = socket.socket(_family(host))
            s.setblocking(False)
            s.connect_ex(address)
            fillers.append(s)
        yield (address[0], address[1])
    finally:
        for s in fillers:
            s.close()
        listener.close()


@functools.cache
def _syns_dropped() -> bool:
    """Whether :func:`_unanswered` works here: a connect to it is still pending after a while."""
    with _unanswered() as address, socket.socket() as probe:
        probe.setblocking(False)
        probe.connect_ex(address)
        time.sleep(0.05)  # an answer on loopback would be back long before
        pending = not select.select([], [probe], [], 0)[1]
        return pending and not probe.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)


needs_dropped_syns = pytest.mark.skipif(
    "not _syns_dropped()", reason="this kernel answers SYNs to a full accept queue"
)


async def _accept(listener: socket.socket) -> tuple[trio.SocketStream, Address]:
    """Accept one connection on a plain listener from inside trio."""
    with trio.fail_after(HANG_GUARD):
        await trio.lowlevel.wait_readable(listener)
    sock, peer = listener.accept()
    sock.setblocking(False)
    return _stream(sock), (peer[0], peer[1])


@contextlib.contextmanager
def _listening(host: str = "127.0.0.1") -> Iterator[socket.socket]:
    """A listener waited on with trio: trio is told before it is closed."""
    listener = _listener(host)
    try:
        yield listener
    finally:
        trio.lowlevel.notify_closing(listener)
        listener.close()


class _HubSteps(trio.abc.Instrument):
    """Counts the scheduler steps of the hub's task: a spinning hub makes thousands."""

    def __init__(self) -> None:
        self.steps = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if task.name.endswith("SpliceHub.run"):
            self.steps += 1


async def _assert_hub_quiet(seconds: float = 0.2, most: int = 6) -> None:
    """Nothing to do: the hub sleeps on its epoll descriptor, it does not poll in a loop.

    A sleeping hub wakes at most every quarter of a timeout (75 ms with 0.3 s) to
    check timeouts; one that is woken by readiness nobody handles steps hundreds of
    times in ``seconds``.
    """
    counter = _HubSteps()
    trio.lowlevel.add_instrument(counter)
    try:
        await trio.sleep(seconds)
    finally:
        trio.lowlevel.remove_instrument(counter)
    assert counter.steps <= most, f"the hub stepped {counter.steps} times while idle"


async def _fill(sock: socket.socket, cap: int = 256 * 1024 * 1024) -> bytearray:
    """Send from ``sock`` until nothing moves any more (every buffer on the way is full).

    Returns what was sent. Fails if ``cap`` bytes went out: something on the way
    buffers without bound.
    """
    block = random.Random(7).randbytes(65536)
    sent = bytearray()
    stuck = 0
    with trio.fail_after(HANG_GUARD):
        while stuck < 3:
            try:
                n = sock.send(block)
            except BlockingIOError:
                stuck += 1
                # let the hub (and the kernel) move what they can, then try again
                await trio.testing.wait_all_tasks_blocked(cushion=0.02)
                continue
            stuck = 0
            sent += block[:n]
            assert len(sent) < cap, "the sender never blocked: unbounded buffering"
    return sent


def _run(main: Callable[[], Awaitable[None]]) -> None:
    """``trio.run`` with a hang guard over the whole test body, in trio's own time."""

    async def guarded() -> None:
        with trio.fail_after(HANG_GUARD * 3):
            await main()

    trio.run(guarded)


# -- 1. conformance -----------------------------------------------------------------------


def test_hub_relay_is_a_half_closeable_stream():
    """The outer ends of a hub-relayed pair behave as one TCP connection (trio's conformance)."""

    async def main():
        async with running_hub() as (hub, _):

            async def maker():
                relayed = Relayed(hub)
                return relayed.client, relayed.server

            with trio.fail_after(HANG_GUARD * 3):
                await trio.testing.check_half_closeable_stream(maker, None)

    _run(main)


# -- 2. bytes, counters, clean end ------------------------------------------------------


@pytest.mark.parametrize(
    ("seed", "host"),
    [
        *((seed, "127.0.0.1") for seed in range(5)),
        *(pytest.param(seed, "::1", marks=_V6) for seed in (5, 6)),
    ],
)
def test_bytes_equal_both_ways_counters_exact_eof_and_sockets_closed(seed, host):
    rng = random.Random(seed)
    sizes = [0, 1, 17, 65535, 65537, 300_000, 2_500_000]
    up = rng.randbytes(rng.choice(sizes))
    down = rng.randbytes(rng.choice(sizes))
    chunk = rng.choice([4096, 65536, 256 * 1024])
    early = up[:1000]  # already waiting in the socket when the hub takes the pair

    async def main():
        close_idle_pipes()
        before = _fds()
        async with running_hub(chunk=chunk) as (hub, reports):
            relayed = Relayed(hub, host, early=early)
            got = {}

            async def client():
                async with trio.open_nursery() as n:
                    n.start_soon(_send_and_eof, relayed.client, up[len(early) :])
                    got["down"] = await _read_all(relayed.client)

            async def server():
                async with trio.open_nursery() as n:
                    n.start_soon(_send_and_eof, relayed.server, down)
                    got["up"] = await _read_all(relayed.server)

            async with trio.open_nursery() as n:
                n.start_soon(client)
                n.start_soon(server)
            record = await relayed.done()
            assert got["up"] == up
            assert got["down"] == down
            assert (record.bytes_up, record.bytes_down) == (len(up), len(down))
            assert record.reason is EndReason.EOF
            assert reports.closed == [record]
            assert len(hub) == 0
            # the hub closed both of the proxy's sockets
            assert relayed.incoming.fileno() == -1
            assert relayed.outgoing.fileno() == -1
            await relayed.aclose()
        close_idle_pipes()
        assert _fds() == before

    _run(main)


# -- 3. half-close ------------------------------------------------------------------------


@pytest.mark.parametrize("first", ["client", "server"])
def test_half_close_each_way(first):
    """EOF from one side reaches the other while the other direction goes on, to the end."""
    reply = random.Random(3).randbytes(1_500_000)

    async def main():
        async with running_hub() as (hub, _):
            relayed = Relayed(hub)
            a, b = (
                (relayed.client, relayed.server)
                if first == "client"
                else (relayed.server, relayed.client)
            )
            await _send_and_eof(a, b"request")
            assert await _read_all(b) == b"request"  # data, then EOF
            # The other direction is still open after the half-close: a whole reply.
            async with trio.open_nursery() as n:
                n.start_soon(_send_and_eof, b, reply)
                assert await _read_all(a) == reply
            record = await relayed.done()
            assert record.reason is EndReason.EOF
            sizes = (len(b"request"), len(reply))
            assert (record.bytes_up, record.bytes_down) == (
                sizes if first == "client" else sizes[::-1]
            )
            await relayed.aclose()

    _run(main)


# -- 4. resets ------------------------------------------------------------------------------


@pytest.mark.parametrize("stalled", [False, True], ids=["idle", "stalled"])
@pytest.mark.parametrize("who", ["client", "server"])
def test_reset_on_either_side_resets_the_other(who, stalled):
    """A reset on one side is a reset on the other: never passed off as a clean end.

    ``stalled``: the server reads nothing, so the client->server direction holds
    bytes the server has not taken (the hub waits to write, not to read).
    """

    async def main():
        async with running_hub(chunk=65536) as (hub, _):
            relayed = Relayed(hub, small_server=True)
            await relayed.client.send_all(b"hello")
            assert await relayed.server.receive_some(100) == b"hello"
            await relayed.server.send_all(b"hi")
            assert await relayed.client.receive_some(100) == b"hi"
            if stalled:
                await _fill(relayed.client_sock)
            _reset(relayed.client if who == "client" else relayed.server)
            # The hub notices by itself, with nobody reading or writing on the other side
            # (stalled: its source is gone while it waits to write, an event nobody asked for).
            record = await relayed.done()
            assert record.reason is EndReason.RESET
            await _sees_reset(relayed.server if who == "client" else relayed.client)
            assert len(hub) == 0
            await relayed.aclose()

    _run(main)


# -- 5. idle timeout -------------------------------------------------------------------------


@pytest.mark.parametrize("stalled", [False, True], ids=["silent", "receiver-stopped"])
def test_idle_flow_is_reset_as_timeout(stalled):
    """No progress for idle_timeout: the flow is reset, not before the timeout has passed.

    ``receiver-stopped``: bytes wait for a server that stopped reading; waiting
    to write is no progress either (the copy path counts writes, not waits).
    """

    async def main():
        async with running_hub(idle_timeout=0.3, chunk=65536) as (hub, _):
            relayed = Relayed(hub, small_server=True)
            if stalled:
                await _fill(relayed.client_sock)
            else:
                await relayed.client.send_all(b"x")
                assert await relayed.server.receive_some(10) == b"x"
            quiet_since = time.monotonic()
            record = await relayed.done()
            if not stalled:  # (the stalled flow's last progress came before _fill returned)
                assert time.monotonic() - quiet_since >= 0.25  # not cut before its time
            assert record.reason is EndReason.TIMEOUT
            await _sees_reset(relayed.server)
            await _sees_reset(relayed.client)
            await relayed.aclose()

    _run(main)


@pytest.mark.parametrize("reader", ["server", "client"])
def test_a_slow_but_steady_reader_is_not_idle(reader):
    """A receiver that drains a transfer slowly, well past idle_timeout, keeps it alive.

    The sender hands everything over at once, so the hub soon holds a pipe-load
    and then has nothing to read for a long while: only its writes, each time the
    reader frees some room, show progress (the copy path counts those too). Small
    buffers on the reader's side make those writes frequent.
    """
    idle = 0.3
    payload = random.Random(5).randbytes(300_000)  # more than one pipe-load (256 KiB)
    step = 8192
    pause = 0.05  # 160 KB/s: a pipe-load (128 KiB or more after the first) drains in 0.8 s+

    async def main():
        async with running_hub(idle_timeout=idle) as (hub, _):
            relayed = Relayed(hub, small_client=reader == "client", small_server=reader == "server")
            record = relayed.record
            sender, receiver = (
                (relayed.client, relayed.server)
                if reader == "server"
                else (relayed.server, relayed.client)
            )

            def taken() -> int:  # bytes the hub has read from the sender
                return record.bytes_up if reader == "server" else record.bytes_down

            got = bytearray()
            longest_without_reads = 0.0
            last_taken, since = taken(), time.monotonic()
            async with trio.open_nursery() as n:
                n.start_soon(_send_and_eof, sender, payload)
                with trio.fail_after(HANG_GUARD):
                    while data := await receiver.receive_some(step):
                        got += data
                        now = time.monotonic()
                        if taken() != last_taken:
                            last_taken, since = taken(), now
                        longest_without_reads = max(longest_without_reads, now - since)
                        await trio.sleep(pause)
            assert bytes(got) == payload
            # The premise: for longer than the idle timeout (plus its check interval, a
            # quarter of it) the hub only wrote; a hub that counted only reads would have cut.
            assert longest_without_reads > 1.5 * idle
            await receiver.send_eof()
            record = await relayed.done()
            assert record.reason is EndReason.EOF, record.detail
            await relayed.aclose()

    _run(main)


# -- 6. shutdown ------------------------------------------------------------------------------


@needs_dropped_syns
def test_cancelling_run_resets_every_flow_records_shutdown_and_frees_every_fd():
    async def main():
        close_idle_pipes()
        before = _fds()
        reports = Reports()
        hub = _hub(reports, chunk=65536, connect_timeout=30.0)
        with _unanswered() as nowhere:
            async with trio.open_nursery() as nursery:
                await nursery.start(hub.run)
                idle = Relayed(hub)
                busy = Relayed(hub, small_server=True)
                half = Relayed(hub)
                # busy: bytes in flight, the server not reading (the hub holds a full pipe)
                await _fill(busy.client_sock)
                # half: the client said EOF, the server has not yet
                await half.client.send_eof()
                assert await _read_all(half.server) == b""
                # and one connect still under way
                client_end, incoming = _tcp_pair()
                pending = _stream(client_end)
                info = FlowInfo(next_flow_id(), incoming.getpeername()[:2], nowhere, "test")
                hub.connect(
                    incoming,
                    info,
                    functools.partial(outgoing_socket, nowhere, None, SourcePolicy.GATEWAY, None),
                )
                await trio.testing.wait_all_tasks_blocked(cushion=0.02)
                assert len(hub) == 4 and hub.connecting == 1
                nursery.cancel_scope.cancel()
            assert not hub.running
            assert len(hub) == 0 and hub.connecting == 0
            for relayed in (idle, busy, half):
                assert relayed.flow.done is not None and relayed.flow.done.is_set()
                assert relayed.record.reason is EndReason.SHUTDOWN
            assert sorted(r.info.id for r in reports.closed) == sorted(
                r.record.info.id for r in (idle, busy, half)
            )
            assert [(i.id, reason) for i, reason, _ in reports.rejected] == [
                (info.id, EndReason.SHUTDOWN)
            ]
            for relayed in (idle, busy, half):
                if relayed is half:  # the server had its EOF before the reset came
                    await _send_fails_at_once(relayed.server_sock)
                else:
                    await _sees_reset(relayed.server)
                await _sees_reset(relayed.client)
                await relayed.aclose()
            await _sees_reset(pending)
            await trio.aclose_forcefully(pending)
            # a stopped hub takes no more flows
            a, b = _tcp_pair()
            with pytest.raises(RuntimeError):
                hub.adopt(a, b, _record())
            a.close()
            b.close()
        close_idle_pipes()
        assert _fds() == before

    _run(main)


# -- 7. backpressure ---------------------------------------------------------------------------


@pytest.mark.parametrize("pipes", [True, False], ids=["splice", "emfile-copy"])
def test_backpressure_a_server_that_never_reads_bounds_what_the_hub_takes(pipes, monkeypatch):
    """The hub takes at most one chunk more than the kernel buffers toward the server hold.

    Between the client and the server: the client's send buffer and the proxy's
    receive buffer (not the hub's business), the hub's pipe (at most ``chunk``),
    the proxy's send buffer toward the server and the server's receive buffer.
    Both of those are set (fixed, no autotuning), so ``bytes_up`` is bounded by
    their sizes (as the kernel reports them: doubled, overhead included) plus one
    chunk. A hub that kept reading would count far more, and the client would
    never block.
    """
    if not pipes:
        monkeypatch.setattr(tproxy.splice.pipes, "take", _no_pipes)
    chunk = 65536

    async def main():
        async with running_hub(chunk=chunk) as (hub, _):
            relayed = Relayed(hub, small_server=True)
            sndbuf = relayed.outgoing.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
            rcvbuf = relayed.server.socket.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
            client_sock = relayed.client_sock
            sent = await _fill(client_sock)
            taken = relayed.record.bytes_up
            assert 0 < taken <= sndbuf + rcvbuf + chunk, (taken, sndbuf, rcvbuf, chunk)
            assert len(sent) > taken  # the client blocked while the rest waits before the hub
            # Once the server reads, everything arrives, in order.
            async with trio.open_nursery() as n:
                n.start_soon(_send_and_eof, relayed.client, b"")
                assert await _read_all(relayed.server) == sent
            await relayed.server.send_eof()
            record = await relayed.done()
            assert record.reason is EndReason.EOF
            assert record.bytes_up == len(sent)
            await relayed.aclose()

    _run(main)


def _no_pipes(size: int) -> tuple[int, int]:
    raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))


# -- 8. idle flows hold no pipes ---------------------------------------------------------------


def test_idle_flows_hold_no_pipes_and_the_hub_sleeps():
    """After traffic, idle (and half-closed) flows give their pipes back; only the pool keeps
    a few, and a hub with nothing to do does not wake up."""

    async def main():
        close_idle_pipes()
        baseline = _pipe_fds()
        async with running_hub(chunk=65536) as (hub, _):
            flows = [Relayed(hub) for _ in range(30)]
            blob = random.Random(1).randbytes(300_000)  # several chunks: pipes are lent
            for i, relayed in enumerate(flows):
                async with trio.open_nursery() as n:
                    n.start_soon(relayed.client.send_all, blob)
                    assert await _read_exact(relayed.server, len(blob)) == blob
                await relayed.server.send_all(b"reply")
                assert await _read_exact(relayed.client, 5) == b"reply"
                if i % 3 == 0:  # a third half-closed, client side; a third server side
                    await relayed.client.send_eof()
                    assert await relayed.server.receive_some(10) == b""
                elif i % 3 == 1:
                    await relayed.server.send_eof()
                    assert await relayed.client.receive_some(10) == b""
            await trio.testing.wait_all_tasks_blocked(cushion=0.02)
            assert len(hub) == 30
            held = _pipe_fds() - baseline - _pooled_pipe_fds()
            assert held == set(), f"{len(held) // 2} pipe(s) held by idle flows"
            assert len(_pipe_fds() - baseline) <= 2 * 4  # the pool keeps only what was needed
            for relayed in flows:
                assert all(way.pipe is None for way in relayed.flow.ways)
            await _assert_hub_quiet()
            for relayed in flows:
                await relayed.aclose()

    _run(main)


async def _read_exact(stream: trio.SocketStream, n: int) -> bytes:
    got = bytearray()
    with trio.fail_after(HANG_GUARD):
        while len(got) < n:
            data = await stream.receive_some(n - len(got))
            assert data, "EOF too early"
            got += data
    return bytes(got)


# -- 9. connect -------------------------------------------------------------------------------


def _gateway(destination: Address) -> Callable[[], socket.socket]:
    return functools.partial(outgoing_socket, destination, None, SourcePolicy.GATEWAY, None)


def _accepted_client(host: str = "127.0.0.1") -> tuple[trio.SocketStream, socket.socket, Address]:
    """(client end, the proxy's accepted socket, the client's address)."""
    client_end, incoming = _tcp_pair(host)
    peer = incoming.getpeername()
    return _stream(client_end), incoming, (peer[0], peer[1])


@pytest.mark.parametrize("host", HOSTS)
def test_connect_opens_the_outgoing_flow_and_relays(host):
    """The client's first bytes and its EOF, sent before the connect even starts, arrive."""

    async def main():
        close_idle_pipes()
        before = _fds()
        async with running_hub() as (hub, reports):
            with _listening(host) as target_listener:
                target = target_listener.getsockname()[:2]
                client, incoming, client_addr = _accepted_client(host)
                info = FlowInfo(next_flow_id(), client_addr, (target[0], target[1]), "test")
                request = random.Random(2).randbytes(50_000)  # fits the buffers
                reply = random.Random(4).randbytes(700_000)
                await _send_and_eof(client, request)
                hub.connect(incoming, info, _gateway(info.destination))
                server, server_addr = await _accept(target_listener)
                async with trio.open_nursery() as n:
                    n.start_soon(_send_and_eof, server, reply)
                    assert await _read_all(server) == request
                    assert await _read_all(client) == reply
                await reports.wait(lambda: reports.closed)
            [(opened_info, source)] = reports.opened
            assert opened_info is info
            assert source == server_addr  # the outgoing flow's own address
            [record] = reports.closed
            assert record.info is info
            assert record.reason is EndReason.EOF
            assert (record.bytes_up, record.bytes_down) == (len(request), len(reply))
            assert reports.rejected == []
            assert hub.connecting == 0 and len(hub) == 0
            await trio.aclose_forcefully(client)
            await trio.aclose_forcefully(server)
        close_idle_pipes()
        assert _fds() == before

    _run(main)


@pytest.mark.parametrize("host", HOSTS)
def test_connect_refused_is_rejected_and_resets_the_client_at_once(host):
    async def main():
        close_idle_pipes()
        before = _fds()
        async with running_hub(connect_timeout=30.0) as (hub, reports):
            client, incoming, client_addr = _accepted_client(host)
            info = FlowInfo(next_flow_id(), client_addr, (host, _closed_port(host)), "test")
            hub.connect(incoming, info, _gateway(info.destination))
            with trio.fail_after(5):  # "at once": long before the 30 s connect timeout
                await reports.wait(lambda: reports.rejected)
                await _sees_reset(client)  # not a clean, empty reply
            [(rejected_info, reason, detail)] = reports.rejected
            assert rejected_info is info
            assert reason is EndReason.CONNECT_FAILED
            assert "refused" in detail
            assert reports.opened == [] and reports.closed == []
            assert hub.connecting == 0 and len(hub) == 0
            await trio.aclose_forcefully(client)
            await _assert_hub_quiet()
        assert _fds() == before

    _run(main)


@needs_dropped_syns
def test_connect_timeout_is_rejected_and_resets_the_client():
    async def main():
        close_idle_pipes()
        before = _fds()
        async with running_hub(connect_timeout=0.3) as (hub, reports):
            with _unanswered() as nowhere:
                client, incoming, client_addr = _accepted_client()
                info = FlowInfo(next_flow_id(), client_addr, nowhere, "test")
                started = time.monotonic()
                hub.connect(incoming, info, _gateway(nowhere))
                assert hub.connecting == 1 and len(hub) == 1
                await reports.wait(lambda: reports.rejected)
                assert time.monotonic() - started >= 0.25  # not given up before its time
                [(rejected_info, reason, detail)] = reports.rejected
                assert rejected_info is info
                assert reason is EndReason.CONNECT_FAILED
                assert "timeout" in detail
                await _sees_reset(client)
                assert hub.connecting == 0 and len(hub) == 0
                await trio.aclose_forcefully(client)
        assert _fds() == before

    _run(main)


@needs_dropped_syns
def test_client_reset_while_connecting_ends_the_attempt():
    """The client gives up (RST) while the outgoing connect is still in progress: the attempt
    ends then, not at the connect timeout, and nothing is left for the hub to spin on."""

    async def main():
        close_idle_pipes()
        before = _fds()
        async with running_hub(connect_timeout=30.0) as (hub, reports):
            with _unanswered() as nowhere:
                client, incoming, client_addr = _accepted_client()
                info = FlowInfo(next_flow_id(), client_addr, nowhere, "test")
                hub.connect(incoming, info, _gateway(nowhere))
                await trio.testing.wait_all_tasks_blocked(cushion=0.02)
                assert hub.connecting == 1
                _reset(client)
                with trio.fail_after(5):  # long before the 30 s connect timeout
                    await reports.wait(lambda: reports.rejected)
                [(rejected_info, reason, _)] = reports.rejected
                assert rejected_info is info
                assert reason in (EndReason.RESET, EndReason.CONNECT_FAILED)
                assert reports.opened == [] and reports.closed == []
                assert hub.connecting == 0 and len(hub) == 0
                await _assert_hub_quiet()
                await trio.aclose_forcefully(client)
        assert _fds() == before

    _run(main)


def test_outgoing_socket_that_cannot_be_made_is_rejected():
    async def main():
        async with running_hub() as (hub, reports):
            client, incoming, client_addr = _accepted_client()
            info = FlowInfo(next_flow_id(), client_addr, ("127.0.0.1", 9), "test")

            def fails() -> socket.socket:
                raise OSError(errno.EACCES, os.strerror(errno.EACCES))

            hub.connect(incoming, info, fails)
            [(rejected_info, reason, _)] = reports.rejected
            assert (rejected_info, reason) == (info, EndReason.CONNECT_FAILED)
            await _sees_reset(client)
            assert len(hub) == 0 and hub.connecting == 0
            await trio.aclose_forcefully(client)

    _run(main)


# -- 10. an unexpected failure ends one flow only ----------------------------------------------


def test_an_unexpected_exception_ends_only_its_flow(monkeypatch):
    real_pump = SpliceHub._pump
    victims: set[int] = set()

    def pump(self, flow, way):
        if flow.record.info.id in victims:
            raise RuntimeError("boom")
        real_pump(self, flow, way)

    monkeypatch.setattr(SpliceHub, "_pump", pump)

    async def main():
        async with running_hub() as (hub, _):
            flows = [Relayed(hub) for _ in range(3)]
            victim = flows[1]
            victims.add(victim.record.info.id)
            await victim.client.send_all(b"trigger")
            record = await victim.done()
            assert record.reason is EndReason.ERROR
            assert "boom" in record.detail
            await _sees_reset(victim.server)
            await _sees_reset(victim.client)
            assert hub.running
            # the others, and a new one, still relay to a clean end
            survivors = [flows[0], flows[2], Relayed(hub)]
            for relayed in survivors:
                async with trio.open_nursery() as n:
                    n.start_soon(_send_and_eof, relayed.client, b"up" * 50_000)
                    n.start_soon(_send_and_eof, relayed.server, b"down" * 50_000)
                    assert await _read_all(relayed.server) == b"up" * 50_000
                    assert await _read_all(relayed.client) == b"down" * 50_000
                record = await relayed.done()
                assert record.reason is EndReason.EOF
                assert (record.bytes_up, record.bytes_down) == (100_000, 200_000)
            assert len(hub) == 0
            for relayed in flows:
                await relayed.aclose()

    _run(main)


def test_an_opened_callback_that_raises_ends_only_that_connect():
    """The engine's ``opened`` for one connect raises: that attempt ends, the hub goes on."""

    async def main():
        reports = Reports()
        failing: set[int] = set()

        def opened(info: FlowInfo, source: Address) -> FlowRecord:
            if info.id in failing:
                raise RuntimeError("opened failed")
            return reports.on_opened(info, source)

        hub = SpliceHub(opened=opened, rejected=reports.on_rejected, closed=reports.on_closed)
        async with trio.open_nursery() as nursery:
            await nursery.start(hub.run)
            with _listening() as target_listener:
                target = target_listener.getsockname()[:2]
                client, incoming, client_addr = _accepted_client()
                info = FlowInfo(next_flow_id(), client_addr, (target[0], target[1]), "test")
                failing.add(info.id)
                hub.connect(incoming, info, _gateway(info.destination))
                await reports.wait(lambda: reports.rejected)
                [(rejected_info, reason, detail)] = reports.rejected
                assert rejected_info is info
                assert reason is EndReason.ERROR and "opened failed" in detail
                await _sees_reset(client)
                assert hub.running and len(hub) == 0 and hub.connecting == 0
                # the attempt had connected (then reset) before opened() failed
                stale, _ = await _accept(target_listener)
                await _sees_reset(stale)
                # the next connect is served as usual
                client2, incoming2, client_addr2 = _accepted_client()
                info2 = FlowInfo(next_flow_id(), client_addr2, info.destination, "test")
                hub.connect(incoming2, info2, _gateway(info2.destination))
                server, _ = await _accept(target_listener)
                await _send_and_eof(client2, b"hello")
                assert await _read_all(server) == b"hello"
                for stream in (client, client2, server, stale):
                    await trio.aclose_forcefully(stream)
            nursery.cancel_scope.cancel()

    _run(main)


def test_a_closed_callback_that_raises_in_the_timeout_sweep_ends_only_that_flow():
    async def main():
        reports = Reports()
        failing: set[int] = set()

        def closed(record: FlowRecord) -> None:
            reports.on_closed(record)
            if record.info.id in failing:
                raise RuntimeError("closed failed")

        hub = SpliceHub(
            opened=reports.on_opened,
            rejected=reports.on_rejected,
            closed=closed,
            idle_timeout=0.3,
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(hub.run)
            idle = Relayed(hub)
            failing.add(idle.record.info.id)
            await idle.done()
            assert idle.record.reason is EndReason.TIMEOUT
            await trio.testing.wait_all_tasks_blocked(cushion=0.02)
            assert hub.running
            fresh = Relayed(hub)
            await _send_and_eof(fresh.client, b"still relayed")
            assert await _read_all(fresh.server) == b"still relayed"
            for relayed in (idle, fresh):
                await relayed.aclose()
            nursery.cancel_scope.cancel()

    _run(main)


# -- 11. out of descriptors: the user-space copy ------------------------------------------------


@pytest.mark.parametrize("seed", range(3))
def test_emfile_falls_back_to_copying_and_bytes_arrive_equal(seed, monkeypatch):
    refused = []

    def no_pipes(size: int) -> tuple[int, int]:
        refused.append(size)
        return _no_pipes(size)

    monkeypatch.setattr(tproxy.splice.pipes, "take", no_pipes)
    rng = random.Random(seed)
    up = rng.randbytes(rng.choice([1, 65537, 2_500_000]))
    down = rng.randbytes(rng.choice([17, 300_000, 2_500_000]))

    async def main():
        close_idle_pipes()
        pipes_before = _pipe_fds()
        async with running_hub(chunk=rng.choice([4096, 65536])) as (hub, _):
            relayed = Relayed(hub, small_client=True, small_server=True)
            async with trio.open_nursery() as n:
                n.start_soon(_send_and_eof, relayed.client, up)
                n.start_soon(_send_and_eof, relayed.server, down)
                assert await _read_all(relayed.server) == up
                assert await _read_all(relayed.client) == down
            record = await relayed.done()
            assert record.reason is EndReason.EOF
            assert (record.bytes_up, record.bytes_down) == (len(up), len(down))
            assert refused  # the copy path was taken
            assert _pipe_fds() == pipes_before
            await relayed.aclose()

    _run(main)


# -- 12. abort ------------------------------------------------------------------------------------


def test_abort_resets_an_adopted_flow_and_sets_done_once():
    async def main():
        async with running_hub() as (hub, reports):
            relayed = Relayed(hub)
            await relayed.client.send_all(b"x")
            assert await relayed.server.receive_some(10) == b"x"
            hub.abort(relayed.flow, EndReason.INTERCEPTOR_ABORT, "told to")
            assert relayed.flow.done is not None and relayed.flow.done.is_set()
            assert relayed.record.reason is EndReason.INTERCEPTOR_ABORT
            assert relayed.record.detail == "told to"
            assert len(hub) == 0
            await _sees_reset(relayed.client)
            await _sees_reset(relayed.server)
            hub.abort(relayed.flow, EndReason.SHUTDOWN, "again")  # no-op once ended
            assert relayed.record.reason is EndReason.INTERCEPTOR_ABORT
            assert reports.closed == [relayed.record]
            await relayed.aclose()

            # a flow that ended cleanly stays ended cleanly, even if its fds were reused
            ended = Relayed(hub)
            await ended.client.send_eof()
            await ended.server.send_eof()
            await ended.done()
            reuser = Relayed(hub)  # may get the same descriptor numbers
            hub.abort(ended.flow, EndReason.SHUTDOWN, "late")
            assert ended.record.reason is EndReason.EOF
            assert len(hub) == 1 and not reuser.flow.done.is_set()  # type: ignore[union-attr]
            await reuser.client.send_all(b"still here")
            assert await reuser.server.receive_some(100) == b"still here"
            await ended.aclose()
            await reuser.aclose()

    _run(main)


# -- 13. the engine uses the hub -------------------------------------------------------------


def test_server_forward_door_relays_through_the_hub():
    """A forward listener of a real Server: the flow is relayed by the engine's hub (one
    flow in it while live), so the suite notices if the hub path stops being used."""

    async def main():
        engine = Engine(EngineConfig())
        assert engine.hub is not None
        with _listening() as target_listener:
            target = target_listener.getsockname()[:2]
            spec = ModeSpec("forward", "127.0.0.1", 0, target=(target[0], target[1]))
            door = Door.open(spec, handler_for(spec, engine, ExplicitSettings()))
            port = door.sock.getsockname()[1]
            server = Server(engine, [door])
            async with trio.open_nursery() as nursery:
                await nursery.start(functools.partial(server.serve, handle_signals=False))
                assert engine.hub.running
                with trio.fail_after(HANG_GUARD):
                    client = await trio.open_tcp_stream("127.0.0.1", port)
                    backend, _ = await _accept(target_listener)
                    await client.send_all(b"ping")
                    assert await backend.receive_some(10) == b"ping"
                    assert len(engine.hub) == 1  # the live flow is in the hub
                    assert len(engine.live) == 1
                    await backend.send_all(b"pong")
                    assert await client.receive_some(10) == b"pong"
                    await client.send_eof()
                    await _send_and_eof(backend, b"")
                    assert await _read_all(backend) == b""
                    assert await _read_all(client) == b""
                    await engine.wait_idle()
                assert len(engine.hub) == 0
                assert engine.total == 1
                server.stop()
            assert not engine.hub.running
            await trio.aclose_forcefully(client)
            await trio.aclose_forcefully(backend)

    _run(main)


def test_engine_transparent_in_hub_connects_and_relays():
    """The engine's fast transparent door: the hub connects to the accepted socket's local
    address (the original destination) and relays; the engine's books balance."""

    async def main():
        engine = Engine(EngineConfig(source_policy=SourcePolicy.GATEWAY))
        assert engine.hub is not None and engine.accept_fast is not None
        async with trio.open_nursery() as nursery:
            await nursery.start(engine.hub.run)
            with _listening() as destination:
                # The client's connection is accepted from the "destination" itself, as a
                # diverted one would be; the hub then connects to that same address.
                client_end = socket.create_connection(destination.getsockname()[:2])
                incoming, _ = destination.accept()
                incoming.setblocking(False)
                engine.accept_fast(incoming)
                backend, _ = await _accept(destination)
            client = _stream(client_end)
            await _send_and_eof(client, b"GET")
            assert await _read_all(backend) == b"GET"
            assert len(engine.live) == 1 and len(engine.hub) == 1
            await _send_and_eof(backend, b"200 OK")
            assert await _read_all(client) == b"200 OK"
            with trio.fail_after(HANG_GUARD):
                await engine.wait_idle()
            assert engine.total == 1 and len(engine.hub) == 0
            nursery.cancel_scope.cancel()
        await trio.aclose_forcefully(client)
        await trio.aclose_forcefully(backend)

    _run(main)


# -- found by review with real peers ----------------------------------------------------------


@pytest.mark.parametrize("first", ["client", "server"])
def test_a_hang_up_while_its_last_bytes_wait_for_a_slow_reader_is_not_a_reset(first):
    """One side half-closes; the other answers with more than the slow reader's buffers
    hold and closes at once. Its FIN reaches the proxy while its bytes still wait there:
    epoll says "hung up" (HUP cannot be masked), which is not a dead peer."""
    reply = random.Random(11).randbytes(3_000_000)

    async def main():
        async with running_hub() as (hub, _):
            relayed = Relayed(hub, small_client=first == "client", small_server=first == "server")
            a, b = (
                (relayed.client, relayed.server)
                if first == "client"
                else (relayed.server, relayed.client)
            )
            await _send_and_eof(a, b"request")
            assert await _read_all(b) == b"request"
            async with trio.open_nursery() as n:

                async def answer_and_close() -> None:
                    await b.send_all(reply)
                    await b.aclose()

                n.start_soon(answer_and_close)
                await trio.sleep(0.5)  # the reader is slow: everything piles up on the way
                assert await _read_all(a) == reply
            record = await relayed.done()
            assert record.reason is EndReason.EOF, record.detail
            assert len(reply) in (record.bytes_up, record.bytes_down)
            await relayed.aclose()

    _run(main)


@pytest.mark.parametrize("urgent_last", [False, True])
def test_urgent_data_neither_stalls_nor_spins_nor_ends_the_flow_early(urgent_last):
    """TCP urgent data (MSG_OOB): splice(2) stops in front of it for good. The copy path
    reads past it (the urgent byte is out of band), and so must the hub: the bytes after
    it arrive, the flow ends eof only at the real end, and the hub does not spin."""

    async def main():
        async with running_hub() as (hub, _):
            relayed = Relayed(hub)
            relayed.client_sock.send(b"before")
            relayed.client_sock.send(b"!", socket.MSG_OOB)
            if not urgent_last:
                await _assert_hub_quiet()  # readable, yet splice gets nothing: no busy loop
                relayed.client_sock.send(b"after")
            await relayed.client.send_eof()
            expected = b"before" if urgent_last else b"beforeafter"
            assert await _read_all(relayed.server) == expected
            await relayed.server.send_eof()
            assert await _read_all(relayed.client) == b""
            record = await relayed.done()
            assert record.reason is EndReason.EOF
            assert record.bytes_up == len(expected)
            await relayed.aclose()

    _run(main)


def test_the_outgoing_socket_and_the_listener_turn_nagle_off():
    """The hub writes what it reads at once; with Nagle a second small write waits for the
    server's delayed ACK (about 40 ms per write-write-read round). Accepted sockets inherit
    the listener's setting."""
    from tproxy.sockets import listening_socket

    out = outgoing_socket(("127.0.0.1", 9), None, SourcePolicy.GATEWAY, None)
    with out, listening_socket("127.0.0.1", 0, transparent=False) as listener:
        assert out.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        assert listener.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)

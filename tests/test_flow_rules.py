"""The flow rules (tests/flow_rules.py) on both shells, and what only the hub and server do.

Shells: the hub (real loopback TCP, splicing where it may, and with splice
off), the trio-stream shell on real TCP, and the trio-stream shell on
memory streams with a virtual clock (``autojump_clock``), where timeouts
take no real time. Then, on the hub only: the connect timeout of a flow
whose chain is built when it connects, and the server's shutdown grace
with intercepted flows.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import socket
import struct
import time
from collections.abc import AsyncIterator

import pytest
import trio
import trio.testing
from flow_rules import FLOW_RULES, Banner, MakePair, Rig, Watch, read_all, send_and_eof

from tproxy import Interceptor
from tproxy.engine import Engine, EngineConfig
from tproxy.explicit import handler_for
from tproxy.explicit.settings import ExplicitSettings
from tproxy.flow import FlowInfo, FlowRecord, next_flow_id
from tproxy.hub import SpliceHub
from tproxy.interceptor import Chain
from tproxy.loading import InterceptorFactory
from tproxy.modes import ModeSpec
from tproxy.relay.streams import StreamRelay
from tproxy.server import Door, Server
from tproxy.splice import splice_available

pytestmark = pytest.mark.timeout(120)

_LINGER_RESET = struct.pack("ii", 1, 0)
SHORT = 0.5
"""The idle timeout on a real clock (a rule that nothing moves, not a speed)."""
VIRTUAL = 30.0
"""The idle timeout on the virtual clock."""


def _record() -> FlowRecord:
    info = FlowInfo(next_flow_id(), ("127.0.0.1", 1), ("127.0.0.1", 2), "test")
    return FlowRecord(info=info, started=time.monotonic())


def _chain(record: FlowRecord, interceptors: tuple[type[Interceptor], ...]) -> Chain | None:
    return Chain([cls(record.info) for cls in interceptors]) if interceptors else None


async def _tcp_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    """(outer end, proxy's end) of one loopback TCP connection."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    try:
        port = listeners[0].socket.getsockname()[1]
        outer = await trio.open_tcp_stream("127.0.0.1", port)
        inner = await listeners[0].accept()
    finally:
        for listener in listeners:
            await listener.aclose()
    return outer, inner


def _plain(stream: trio.SocketStream) -> socket.socket:
    tsock = stream.socket
    trio.lowlevel.notify_closing(tsock)
    sock = socket.socket(tsock.family, tsock.type, tsock.proto, fileno=tsock.detach())
    sock.setblocking(False)
    return sock


def _resetter(stream: trio.SocketStream):
    def reset() -> None:
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        stream.socket.close()

    return reset


# -- the shells as make_pair factories ---------------------------------------------------------


def hub_pair(*, splice: bool) -> MakePair:
    @contextlib.asynccontextmanager
    async def make(
        *interceptors: type[Interceptor], idle_timeout: bool = False
    ) -> AsyncIterator[Rig]:
        hub = SpliceHub(
            opened=lambda info, source: FlowRecord(info=info, started=0.0),
            rejected=lambda *args: None,
            closed=lambda record: None,
            idle_timeout=SHORT if idle_timeout else None,
            splice=splice,
        )
        hub_scope = trio.CancelScope()

        async def run_hub(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            with hub_scope:
                await hub.run(task_status=task_status)

        client, incoming = await _tcp_pair()
        server, outgoing = await _tcp_pair()
        async with trio.open_nursery() as nursery:
            await nursery.start(run_hub)
            record = _record()
            flow = hub.adopt(
                _plain(incoming), _plain(outgoing), record, _chain(record, interceptors)
            )

            async def done() -> None:
                assert flow.done is not None
                with trio.fail_after(20):
                    await flow.done.wait()

            try:
                yield Rig(
                    client,
                    server,
                    record,
                    done,
                    hub_scope.cancel,
                    _resetter(client),
                    _resetter(server),
                    SHORT,
                )
            finally:
                hub_scope.cancel()
        await trio.aclose_forcefully(client)
        await trio.aclose_forcefully(server)

    return make


def stream_pair(*, memory: bool) -> MakePair:
    @contextlib.asynccontextmanager
    async def make(
        *interceptors: type[Interceptor], idle_timeout: bool = False
    ) -> AsyncIterator[Rig]:
        if memory:
            # Lockstep: a send waits until the other end takes the bytes, so the memory
            # transport holds nothing of its own (backpressure shows).
            client, incoming = trio.testing.lockstep_stream_pair()
            outgoing, server = trio.testing.lockstep_stream_pair()
            resets: tuple[object, object] = (None, None)
            timeout = VIRTUAL
        else:
            client, incoming = await _tcp_pair()
            server, outgoing = await _tcp_pair()
            resets = (_resetter(client), _resetter(server))
            timeout = SHORT
        record = _record()
        relay = StreamRelay(
            incoming,
            outgoing,
            record,
            _chain(record, interceptors),
            idle_timeout=timeout if idle_timeout else None,
        )
        scope = trio.CancelScope()
        finished = trio.Event()

        async def run() -> None:
            try:
                with scope:
                    await relay.run()
            finally:
                finished.set()

        async def done() -> None:
            with trio.fail_after(60 if memory else 20):
                await finished.wait()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(run)
            try:
                yield Rig(client, server, record, done, scope.cancel, *resets, timeout)  # type: ignore[arg-type]
            finally:
                scope.cancel()
        await trio.aclose_forcefully(client)
        await trio.aclose_forcefully(server)

    return make


_needs_splice = pytest.mark.skipif(not splice_available(), reason="os.splice is not available")
_RULES = pytest.mark.parametrize("check", FLOW_RULES, ids=lambda check: check.__name__[6:])


@_needs_splice
@_RULES
@pytest.mark.trio
async def test_hub_with_splice(check) -> None:
    await check(hub_pair(splice=True))


@_RULES
@pytest.mark.trio
async def test_hub_copying(check) -> None:
    await check(hub_pair(splice=False))


@_RULES
@pytest.mark.trio
async def test_stream_shell_on_tcp(check) -> None:
    await check(stream_pair(memory=False))


# Memory streams know no reset: the two reset rules run on TCP only.
_NO_RESET_RULES = pytest.mark.parametrize(
    "check",
    [c for c in FLOW_RULES if "reset_from" not in c.__name__],
    ids=lambda check: check.__name__[6:],
)


@_NO_RESET_RULES
@pytest.mark.trio
async def test_stream_shell_on_lockstep_memory_with_a_virtual_clock(check, autojump_clock) -> None:
    await check(stream_pair(memory=True))


# -- the hub as the engine's: connects, builds chains, shuts down with a grace ----------------


class _Hold(Interceptor):
    """Holds every client byte until the client's end of stream (a buffering interceptor)."""

    def __init__(self, flow: FlowInfo, options: object = None) -> None:
        super().__init__(flow, options)
        self.held = b""

    def client_data(self, data: bytes) -> bytes:
        self.held += data
        return b""

    def client_eof(self) -> bytes:
        return self.held


def _factory(cls: type[Interceptor]) -> InterceptorFactory:
    return InterceptorFactory(cls=cls, options=None, spec=cls.__name__)


@contextlib.asynccontextmanager
async def _forward_server(engine: Engine) -> AsyncIterator[tuple[Server, int, socket.socket]]:
    """A Server with one forward door to a local listener: (server, door port, target)."""
    target = socket.socket()
    target.bind(("127.0.0.1", 0))
    target.listen(16)
    target.setblocking(False)
    address = target.getsockname()[:2]
    spec = ModeSpec("forward", "127.0.0.1", 0, target=(address[0], address[1]))
    door = Door.open(
        spec,
        handler_for(spec, engine, ExplicitSettings()),
        fast=engine.accept_fast and _forward_fast(engine, spec),
    )
    server = Server(engine, [door])
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(functools.partial(server.serve, handle_signals=False))
            yield server, door.sock.getsockname()[1], target
            server.stop()
            server.stop()
    finally:
        trio.lowlevel.notify_closing(target)
        target.close()


def _forward_fast(engine: Engine, spec: ModeSpec):
    from tproxy.explicit.forward import forward_in_hub

    assert spec.target is not None
    return forward_in_hub(engine, ExplicitSettings(), spec.target)


async def _accept(listener: socket.socket) -> trio.SocketStream:
    with trio.fail_after(20):
        await trio.lowlevel.wait_readable(listener)
    sock, _ = listener.accept()
    return trio.SocketStream(trio.socket.from_stdlib_socket(sock))


@pytest.mark.trio
async def test_the_server_door_relays_intercepted_flows_in_the_hub() -> None:
    """``-i`` no longer takes flows off the hub: a forward door with interceptors is served
    synchronously from the accept loop and relayed by the hub, banner and buffering included."""
    engine = Engine(EngineConfig(), [_factory(Banner), _factory(_Hold)])
    async with _forward_server(engine) as (_, port, target):
        client = await trio.open_tcp_stream("127.0.0.1", port)
        backend = await _accept(target)
        with trio.fail_after(20):
            assert await client.receive_some(100) == b"220 hello\r\n"
        assert engine.hub is not None and len(engine.hub) == 1
        await send_and_eof(client, b"held until the end")
        assert await read_all(backend) == b"held until the end"
        await send_and_eof(backend, b"ok")
        assert await read_all(client) == b"ok"
        with trio.fail_after(20):
            await engine.wait_idle()
        assert len(engine.hub) == 0 and engine.total == 1
        for stream in (client, backend):
            await trio.aclose_forcefully(stream)


@pytest.mark.trio
async def test_a_flow_no_interceptor_selects_is_passthrough() -> None:
    class Never(InterceptorFactory):
        def selects(self, info: FlowInfo) -> bool:
            return False

    engine = Engine(EngineConfig(), [Never(cls=Banner, options=None, spec="never")])
    info = FlowInfo(1, ("127.0.0.1", 1), ("127.0.0.1", 2), "test")
    assert engine.chain_for(info) is None
    assert Engine(EngineConfig(), [_factory(Watch)]).chain_for(info) is not None
    assert Engine(EngineConfig()).chain_for(info) is None


@pytest.mark.trio
async def test_shutdown_grace_lets_intercepted_flows_finish_then_resets_the_rest() -> None:
    engine = Engine(EngineConfig(grace=1.0), [_factory(Watch)])
    async with _forward_server(engine) as (server, port, target):
        finishing = await trio.open_tcp_stream("127.0.0.1", port)
        finishing_backend = await _accept(target)
        lingering = await trio.open_tcp_stream("127.0.0.1", port)
        lingering_backend = await _accept(target)
        await lingering.send_all(b"x")
        assert await lingering_backend.receive_some(10) == b"x"
        records: dict[int, FlowRecord] = dict(engine.live)
        assert len(records) == 2
        server.stop()  # the grace period starts
        await trio.sleep(0.1)
        await send_and_eof(finishing, b"bye")
        assert await read_all(finishing_backend) == b"bye"
        await send_and_eof(finishing_backend, b"")
        assert await read_all(finishing) == b""
        with trio.fail_after(20):
            await engine.wait_idle()
        reasons = sorted(str(record.reason) for record in records.values())
        assert reasons == ["eof", "shutdown"]
        with pytest.raises(trio.BrokenResourceError), trio.fail_after(20):
            while await lingering.receive_some(10):
                pass
        for stream in (finishing, finishing_backend, lingering, lingering_backend):
            await trio.aclose_forcefully(stream)


@pytest.mark.trio
async def test_an_interceptor_that_fails_to_start_ends_only_its_flow_in_the_hub(caplog) -> None:
    """The hub builds the chain when its connect completes; a constructor that raises ends
    that flow as ``error`` (``interceptor init``), resets the client, and nothing else."""

    class Broken(Interceptor):
        def __init__(self, flow: FlowInfo, options: object = None) -> None:
            raise ValueError("no config")

    caplog.set_level(logging.INFO, logger="tproxy.flow")
    engine = Engine(EngineConfig(), [_factory(Watch), _factory(Broken)])
    async with _forward_server(engine) as (_, port, target):
        client = await trio.open_tcp_stream("127.0.0.1", port)
        backend = await _accept(target)
        with pytest.raises(trio.BrokenResourceError), trio.fail_after(20):
            while await client.receive_some(10):
                pass
        with trio.fail_after(20):
            await engine.wait_idle()
        assert engine.total == 1 and engine.hub is not None and len(engine.hub) == 0
        [end] = [r.getMessage() for r in caplog.records if " end reason=" in r.getMessage()]
        assert "reason=error" in end and "interceptor init: ValueError('no config')" in end
        for stream in (client, backend):
            await trio.aclose_forcefully(stream)

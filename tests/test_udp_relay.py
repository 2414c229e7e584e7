"""The UDP session table on loopback: relaying, idle expiry, the cap, interceptors, shutdown.

No TPROXY here (that is netns-tests/test_udp.py): datagrams enter through
``UdpRelay.from_client`` as the listener would hand them over, sessions use
``--source gateway`` and replies leave from a plain loopback socket, so
everything runs unprivileged. Timeouts run on trio's autojump clock.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import AsyncIterator

import pytest
import trio

from tproxy import FlowInfo, Interceptor
from tproxy.engine import Engine, EngineConfig
from tproxy.flow import Address, format_address
from tproxy.loading import InterceptorFactory
from tproxy.sockets import SourcePolicy
from tproxy.udp.relay import UdpConfig, UdpRelay

LOOP = "127.0.0.1"


def plain_reply(destination: Address, mark: int | None) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    sock.bind((LOOP, 0))
    return sock


@pytest.fixture
async def server() -> AsyncIterator[trio.socket.SocketType]:
    sock = client_socket()
    yield sock
    sock.close()


def client_socket() -> trio.socket.SocketType:
    """A trio UDP socket bound on loopback (call inside the trio run)."""
    raw = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    raw.bind((LOOP, 0))
    return trio.socket.from_stdlib_socket(raw)


def addr(sock: trio.socket.SocketType) -> Address:
    host, port = sock.getsockname()[:2]
    return host, port


def make_relay(factories: list[InterceptorFactory] | None = None, **config: object) -> UdpRelay:
    engine = Engine(EngineConfig(splice=False), factories or [])
    settings: dict[str, object] = {"source_policy": SourcePolicy.GATEWAY, "idle": 30.0}
    settings.update(config)
    return UdpRelay(engine, UdpConfig(**settings), open_reply=plain_reply)  # type: ignore[arg-type]


async def echo_once(server: trio.socket.SocketType, prefix: bytes = b"re:") -> Address:
    data, source = await server.recvfrom(65535)
    await server.sendto(prefix + data, source)
    return source[:2]


@pytest.mark.trio
async def test_a_session_relays_both_ways_and_ends_idle(
    server: trio.socket.SocketType,
    autojump_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "tproxy.flow")
    relay = make_relay(idle=30.0)
    client = client_socket()
    async with trio.open_nursery() as nursery:
        await nursery.start(relay.run, [])
        relay.from_client(addr(client), addr(server), b"hello")
        await echo_once(server)
        assert await client.recv(100) == b"re:hello"
        (session,) = relay.sessions.values()
        assert session.record.bytes_up == 5 and session.record.bytes_down == 8
        await trio.sleep(29)
        relay.from_client(addr(client), addr(server), b"again")  # activity: stays open
        await echo_once(server)
        assert await client.recv(100) == b"re:again"
        assert len(relay.sessions) == 1 and relay.engine.total == 1
        await trio.sleep(31)
        assert relay.sessions == {}
        assert session.sock.fileno() == -1 and relay.replies == {}
        nursery.cancel_scope.cancel()
    client.close()
    assert "open mode=transparent-udp" in caplog.text
    assert "end reason=idle" in caplog.text and "up=10 down=16" in caplog.text


@pytest.mark.trio
async def test_the_cap_evicts_the_least_recently_used(
    server: trio.socket.SocketType, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    relay = make_relay(max_sessions=2)
    clients = [client_socket() for _ in range(3)]
    async with trio.open_nursery() as nursery:
        await nursery.start(relay.run, [])
        relay.from_client(addr(clients[0]), addr(server), b"0")
        relay.from_client(addr(clients[1]), addr(server), b"1")
        relay.from_client(addr(clients[0]), addr(server), b"0 again")  # 1 is now the oldest
        relay.from_client(addr(clients[2]), addr(server), b"2")
        assert [s.client for s in relay.sessions.values()] == [addr(clients[0]), addr(clients[2])]
        assert relay.evicted == 1
        nursery.cancel_scope.cancel()
    for c in clients:
        c.close()
    assert "session cap reached (2 sessions): evicting flow" in caplog.text
    assert caplog.text.count("end reason=evicted") == 1
    assert caplog.text.count("end reason=shutdown") == 2


@pytest.mark.trio
async def test_sessions_are_per_client_and_destination(server: trio.socket.SocketType) -> None:
    relay = make_relay()
    client = client_socket()
    other = client_socket()
    async with trio.open_nursery() as nursery:
        await nursery.start(relay.run, [])
        relay.from_client(addr(client), addr(server), b"a")
        relay.from_client(addr(other), addr(server), b"b")
        seen = {await echo_once(server, b"to "), await echo_once(server, b"to ")}
        assert len(seen) == 2  # two session sockets
        assert await client.recv(100) == b"to a"
        assert await other.recv(100) == b"to b"
        nursery.cancel_scope.cancel()
    client.close()
    other.close()


class Upper(Interceptor):
    def client_datagram(self, data: bytes) -> bytes | None:
        return data.upper()

    def server_datagram(self, data: bytes) -> bytes | None:
        if data.endswith(b"STOP"):
            self.abort("told to stop")
        return data + b"!"


class NotMe(Interceptor):
    def client_datagram(self, data: bytes) -> bytes | None:
        raise AssertionError("not selected, never called")


class Selective(InterceptorFactory):
    def selects(self, info: FlowInfo) -> bool:
        return False


@pytest.mark.trio
async def test_interceptors_selected_run_and_abort(
    server: trio.socket.SocketType, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "tproxy.flow")
    factories = [
        InterceptorFactory(Upper, None, "upper"),
        Selective(NotMe, None, "notme"),
    ]
    relay = make_relay(factories)
    client = client_socket()
    async with trio.open_nursery() as nursery:
        await nursery.start(relay.run, [])
        relay.from_client(addr(client), addr(server), b"hi")
        await echo_once(server, b"")
        assert await client.recv(100) == b"HI!"
        (session,) = relay.sessions.values()
        assert session.record.interceptors == ("upper",)  # notme did not select it
        relay.from_client(addr(client), addr(server), b"stop")
        await echo_once(server, b"")
        await trio.testing.wait_all_tasks_blocked()
        assert relay.sessions == {}
        nursery.cancel_scope.cancel()
    client.close()
    assert "end reason=interceptor-abort" in caplog.text and "told to stop" in caplog.text


@pytest.mark.trio
async def test_answers_from_elsewhere_are_dropped(server: trio.socket.SocketType) -> None:
    relay = make_relay()
    client = client_socket()
    stranger = client_socket()
    async with trio.open_nursery() as nursery:
        await nursery.start(relay.run, [])
        relay.from_client(addr(client), addr(server), b"q")
        session_addr = await echo_once(server, b"")
        await stranger.sendto(b"spoof", session_addr)  # refused by the connected socket
        await server.sendto(b"real", session_addr)
        assert await client.recv(100) == b"q"
        assert await client.recv(100) == b"real"
        nursery.cancel_scope.cancel()
    client.close()
    stranger.close()


def test_config_is_checked() -> None:
    with pytest.raises(ValueError, match="idle"):
        UdpConfig(idle=0)
    with pytest.raises(ValueError, match="cap"):
        UdpConfig(max_sessions=0)


class Observer:
    """Collects what the engine tells its flow observers (metrics, the control socket)."""

    def __init__(self) -> None:
        self.opened: list[int] = []
        self.ended: list[tuple[int, str]] = []

    def flow_opened(self, record: object) -> None:
        self.opened.append(record.info.id)  # type: ignore[attr-defined]

    def flow_ended(self, record: object) -> None:
        self.ended.append((record.info.id, str(record.reason)))  # type: ignore[attr-defined]


@pytest.mark.trio
async def test_sessions_reach_the_flow_observers(
    server: trio.socket.SocketType, autojump_clock: trio.testing.MockClock
) -> None:
    relay = make_relay(idle=5.0)
    observer = Observer()
    relay.engine.observers.append(observer)
    client = client_socket()
    async with trio.open_nursery() as nursery:
        await nursery.start(relay.run, [])
        relay.from_client(addr(client), addr(server), b"hello")
        await echo_once(server)
        assert await client.recv(100) == b"re:hello"
        (session,) = relay.sessions.values()
        assert observer.opened == [session.record.info.id] and observer.ended == []
        await trio.sleep(6)
        assert observer.ended == [(session.record.info.id, "idle")]
        nursery.cancel_scope.cancel()
    client.close()


@pytest.mark.trio
async def test_the_control_table_lists_and_kills_sessions(
    server: trio.socket.SocketType, caplog: pytest.LogCaptureFixture
) -> None:
    from tproxy.control import FlowTable, format_table

    caplog.set_level(logging.INFO, "tproxy.flow")
    factories = [InterceptorFactory(Upper, None, "upper"), Selective(NotMe, None, "notme")]
    relay = make_relay(factories)
    engine = relay.engine
    table = FlowTable(engine.live, engine.kills, dict, sessions=engine.udp_live)
    client = client_socket()
    async with trio.open_nursery() as nursery:
        await nursery.start(relay.run, [])
        relay.from_client(addr(client), addr(server), b"hi")
        await echo_once(server, b"")
        assert await client.recv(100) == b"HI!"
        (flow,) = table.flows()
        assert flow["protocol"] == "udp" and flow["mode"] == "transparent-udp"
        assert flow["client"] == format_address(addr(client))
        assert flow["destination"] == format_address(addr(server))
        assert (flow["bytes_read_up"], flow["bytes_read_down"]) == (2, 2)
        assert flow["interceptors"] == ["upper"] and flow["age"] >= 0
        assert "PROTO" in format_table([flow]).splitlines()[0]
        (session,) = relay.sessions.values()
        assert table.kill(flow["id"]) is True
        assert relay.sessions == {} and session.sock.fileno() == -1
        assert engine.udp_live == {} and engine.kills == {} and table.flows() == []
        assert table.kill(flow["id"]) is False
        relay.from_client(addr(client), addr(server), b"again")  # a new session
        await echo_once(server, b"")
        assert await client.recv(100) == b"AGAIN!"
        assert [f["id"] for f in table.flows()] != [flow["id"]]
        nursery.cancel_scope.cancel()
    client.close()
    assert engine.udp_live == {}  # the shutdown ended the second session
    assert f"flow {flow['id']} end reason=shutdown" in caplog.text
    assert "killed (tproxy flows --kill)" in caplog.text

"""The ClientHello peek of ``--when sni=/host=`` selection, on bytes (no relay, no Driver).

:class:`tproxy.peek.Peek` is driven here exactly as a relay drives a chain:
``set_clock`` then ``start``, data and end-of-stream calls, ``next_deadline`` /
``on_timer`` on a virtual clock. Each test checks the bytes that come out, in
order, and which interceptors were built with which ``flow.sni``.
"""

from __future__ import annotations

import pytest
from tls_hellos import (
    alpn_ext,
    extension,
    handshake,
    key_share_ext,
    python_client_hello,
    records,
    sni_ext,
    versions_ext,
)

from tproxy.engine import Engine, EngineConfig
from tproxy.flow import FlowInfo
from tproxy.interceptor import AbortFlow, Chain, Interceptor, Output
from tproxy.loading import InterceptorFactory
from tproxy.peek import PEEK_LIMIT, Peek
from tproxy.selection import parse_selection
from tproxy.timers import TimerHandle

BUILT: list[Tag] = []
ORIGINAL: list[FlowInfo] = []
"""The FlowInfo the engine got for the flow of the last peek_for."""


class Tag(Interceptor):
    """Injects ``START>`` toward the server at start, then forwards everything unchanged."""

    def __init__(self, flow: FlowInfo, options: object) -> None:
        super().__init__(flow, options)
        self.seen = b""
        self.ended: str | None = None
        BUILT.append(self)

    def start(self) -> None:
        self.inject_to_server(b"START>")

    def client_data(self, data: bytes) -> bytes:
        self.seen += data
        return data

    def end(self, reason: str) -> None:
        self.ended = reason


class Late(Tag):
    """Like Tag, plus a timer 5 s after start that injects ``LATE`` toward the client."""

    def start(self) -> None:
        super().start()
        self.timer: TimerHandle = self.call_later(5, lambda: self.inject_to_client(b"LATE"))


class Broken(Interceptor):
    def __init__(self, flow: FlowInfo, options: object) -> None:
        raise RuntimeError("no")


def factory(cls: type[Interceptor], *when: str) -> InterceptorFactory:
    return InterceptorFactory(cls, None, cls.__name__, parse_selection(when))


def flow(mode: str = "transparent") -> FlowInfo:
    return FlowInfo(id=7, client=("192.0.2.1", 40000), destination=("198.51.100.9", 443), mode=mode)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def peek_for(*factories: InterceptorFactory, timeout: float = 2.0, mode: str = "transparent"):
    """The engine's chain for a flow, with a virtual clock, started as a relay starts it."""
    BUILT.clear()
    engine = Engine(EngineConfig(hub=False, peek_timeout=timeout), list(factories))
    ORIGINAL[:] = [flow(mode)]
    peek = engine.chain_for(ORIGINAL[0])
    assert isinstance(peek, Peek)
    clock = Clock()
    peek.set_clock(clock)
    assert peek.start() == Output()
    return peek, clock


def feed(peek: Peek, data: bytes, size: int) -> Output:
    """Send ``data`` in pieces of ``size``; everything before the last must be held."""
    total = Output()
    for pos in range(0, len(data), size):
        out = peek.client_data(data[pos : pos + size])
        if pos + size < len(data):
            assert not peek.decided and out == Output(), pos
        total.to_server += out.to_server
        total.to_client += out.to_client
    return total


# -- deciding on the ClientHello -----------------------------------------------------


def test_a_hello_split_over_many_segments_selects_by_sni() -> None:
    hello = python_client_hello("a.test", ["h2", "http/1.1"])
    peek, _ = peek_for(factory(Tag, r"sni=a\.test"))
    assert not peek.passthrough
    out = feed(peek, hello, 7)
    assert peek.why == "client-hello"
    assert out.to_server == b"START>" + hello  # start injection first, then the hello
    (tag,) = BUILT
    assert tag.flow.sni == "a.test" and tag.flow.alpn == ("h2", "http/1.1")
    assert tag.seen == hello
    assert peek.client_data(b"more") == Output(to_server=b"more")
    assert peek.server_data(b"reply") == Output(to_client=b"reply")
    peek.end("eof")
    assert tag.ended == "eof"


def test_a_hello_for_another_name_builds_nothing_and_turns_passthrough() -> None:
    hello = python_client_hello("b.test")
    peek, _ = peek_for(factory(Tag, r"sni=a\.test"))
    out = feed(peek, hello, 100)
    assert out == Output(to_server=hello)
    assert BUILT == [] and peek.chain is None and peek.passthrough
    assert peek.info.sni == "b.test"
    assert ORIGINAL[0].sni == "b.test"  # the record's info too (the flow log shows it)
    assert peek.client_data(b"x") == Output(to_server=b"x")


def test_a_2k_post_quantum_hello_in_two_pieces() -> None:
    # Chrome-like with X25519MLKEM768, padded past 2 KiB, in two TLS records as well
    message = handshake(
        sni_ext(b"a.test")
        + alpn_ext([b"h2", b"http/1.1"])
        + versions_ext([0x3A3A, 0x0304, 0x0303])
        + key_share_ext(0x11EC, 1216)
        + extension(21, bytes(700))
    )
    hello = records(message, [1500])
    assert len(hello) > 2048
    peek, _ = peek_for(factory(Tag, r"host=a\.test"))
    assert peek.client_data(hello[:1000]) == Output() and not peek.decided
    out = peek.client_data(hello[1000:] + b"early")
    assert out.to_server == b"START>" + hello + b"early"
    assert BUILT[0].flow.sni == "a.test"


def test_not_tls_is_decided_at_once_with_no_sni() -> None:
    request = b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n"
    peek, _ = peek_for(factory(Tag, r"sni=a\.test"), factory(Tag, "port=443"))
    out = peek.client_data(request)
    assert peek.why == "not-tls"
    assert [t.flow.sni for t in BUILT] == [None]  # only the port= one selects it
    assert out.to_server == b"START>" + request


def test_server_first_decides_and_keeps_both_directions_in_order() -> None:
    hello = python_client_hello("a.test")
    peek, _ = peek_for(factory(Tag, r"sni=a\.test"))
    assert peek.client_data(hello[:3]) == Output()
    out = peek.server_data(b"220 ready\r\n")
    assert peek.why == "server-first" and peek.chain is None and peek.passthrough
    assert out == Output(to_server=hello[:3], to_client=b"220 ready\r\n")
    assert peek.client_data(hello[3:]) == Output(to_server=hello[3:])


def test_timeout_on_the_relays_clock_releases_the_held_bytes() -> None:
    hello = python_client_hello("a.test")
    peek, clock = peek_for(factory(Tag, r"sni=a\.test"), factory(Tag, "port=443"), timeout=0.5)
    assert peek.next_deadline() == 100.5
    assert peek.client_data(hello[:10]) == Output()
    clock.now = 100.4
    assert peek.on_timer(100.4) == Output() and not peek.decided
    clock.now = 100.5
    out = peek.on_timer(100.5)
    assert peek.why == "timeout"
    assert out.to_server == b"START>" + hello[:10]
    assert [t.flow.sni for t in BUILT] == [None]
    assert peek.next_deadline() is None  # the chain has no timers
    assert peek.client_data(hello[10:]).to_server == hello[10:]


def test_a_hello_over_16k_is_given_up_on_without_losing_a_byte() -> None:
    big = records(handshake(key_share_ext(0x11EC, 24000)))
    assert len(big) > PEEK_LIMIT + 4096
    peek, _ = peek_for(factory(Tag, r"sni=a\.test"), factory(Tag, "port=443"))
    total = b""
    for pos in range(0, len(big), 4096):
        total += peek.client_data(big[pos : pos + 4096]).to_server
        if pos == 0:  # its length says it is over the limit: no use waiting for it
            assert peek.why == "over-limit"
    assert total == b"START>" + big
    assert [t.flow.sni for t in BUILT] == [None]


def test_client_eof_before_anything() -> None:
    peek, _ = peek_for(factory(Tag, r"sni=a\.test"))
    assert peek.client_eof() == Output()
    assert peek.why == "client-eof" and peek.passthrough
    assert peek.server_data(b"bye") == Output(to_client=b"bye")


def test_client_eof_after_part_of_a_hello_flushes_it_first() -> None:
    hello = python_client_hello("a.test")
    peek, _ = peek_for(factory(Tag, "port=443"), factory(Tag, r"sni=a\.test"))
    peek.client_data(hello[:20])
    out = peek.client_eof()
    assert out.to_server == b"START>" + hello[:20]
    assert BUILT[0].seen == hello[:20]


def test_the_real_chains_timers_are_driven_through_the_peek() -> None:
    peek, clock = peek_for(factory(Late, r"sni=a\.test"))
    out = peek.client_data(python_client_hello("a.test"))
    assert out.to_server.startswith(b"START>")
    assert peek.next_deadline() == 105.0  # Late's timer, on the clock given before
    assert not peek.holds_client_reading and peek.closing is None
    clock.now = 105.0
    assert peek.on_timer(105.0) == Output(to_client=b"LATE")


def test_an_interceptor_failing_to_build_aborts_only_its_flow() -> None:
    peek, _ = peek_for(factory(Broken, r"sni=a\.test"))
    with pytest.raises(AbortFlow):
        peek.client_data(python_client_hello("a.test"))


# -- when the engine peeks ----------------------------------------------------------


def test_the_engine_peeks_only_when_a_hello_could_change_the_selection() -> None:
    engine = Engine(EngineConfig(hub=False), [factory(Tag, r"sni=a\.test,port=443")])
    assert isinstance(engine.chain_for(flow()), Peek)
    assert isinstance(engine.chain_for(flow("forward")), Peek)
    web = FlowInfo(id=1, client=("192.0.2.1", 1), destination=("198.51.100.9", 80))
    assert engine.chain_for(web) is None  # port= already says no
    named = FlowInfo(id=2, client=("192.0.2.1", 1), destination=("a.test", 443), mode="socks")
    everything = Engine(EngineConfig(hub=False), [factory(Tag), factory(Tag, r"host=a\.test")])
    assert isinstance(everything.chain_for(named), Chain)  # the name decides, no peek
    assert isinstance(everything.chain_for(flow()), Peek)


def test_a_bad_peek_timeout_is_refused() -> None:
    with pytest.raises(ValueError, match="peek-timeout"):
        EngineConfig(peek_timeout=0)


def test_16k_held_without_a_whole_hello_is_given_up_on() -> None:
    # A 9 KB hello in 1-byte records: 6 bytes on the wire per byte of hello, so 16 KiB
    # arrive long before the hello is whole, though its own length is under the limit.
    tiny = records(handshake(key_share_ext(0x11EC, 9000)), [1] * 20000)
    peek, _ = peek_for(factory(Tag, r"sni=a\.test"), factory(Tag, "port=443"))
    total = b""
    for pos in range(0, len(tiny), 1000):
        total += peek.client_data(tiny[pos : pos + 1000]).to_server
        if pos + 1000 >= PEEK_LIMIT:
            assert peek.decided, pos
        elif pos < 5000:
            assert not peek.decided, pos
    assert peek.why == "over-limit"
    assert total == b"START>" + tiny


# -- driven by the engine's relay, on trio's clock ------------------------------------


@pytest.mark.trio
async def test_the_relay_releases_a_stalled_hello_at_the_peek_timeout(autojump_clock) -> None:
    """A relay shell drives the peek's deadline: the first bytes of a hello that never
    completes reach the server after --peek-timeout, before the client ends anything."""
    import functools

    import trio

    hello = python_client_hello("a.test")[:10]
    BUILT.clear()
    engine = Engine(
        EngineConfig(peek_timeout=2.0), [factory(Tag, r"sni=a\.test"), factory(Tag, "port=443")]
    )
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    front = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    arrived = trio.Event()
    received = b""
    async with trio.open_nursery() as nursery:

        async def server() -> None:
            nonlocal received
            stream = await listener.accept()
            async with stream:
                while chunk := await stream.receive_some(65536):
                    received += chunk
                    if received == b"START>" + hello:
                        arrived.set()
            await listener.aclose()

        nursery.start_soon(server)
        client = await trio.open_tcp_stream("127.0.0.1", front.socket.getsockname()[1])
        incoming = await front.accept()
        await front.aclose()
        outgoing = await trio.open_tcp_stream("127.0.0.1", listener.socket.getsockname()[1])
        info = engine.new_flow(("127.0.0.1", 1), ("127.0.0.1", 443), "forward")
        nursery.start_soon(
            functools.partial(engine.relay, source=("127.0.0.1", 1)), incoming, outgoing, info
        )
        opened = trio.current_time()  # virtual (autojump): the peek's hold, not speed
        await client.send_all(hello)
        with trio.fail_after(30):
            await arrived.wait()
        assert trio.current_time() >= opened + 2.0
        assert [t.flow.sni for t in BUILT] == [None]
        await client.send_eof()
        with trio.fail_after(30):
            while await client.receive_some(65536):
                pass
        await client.aclose()
    assert received == b"START>" + hello

"""Datagram hooks, the DatagramChain and Driver.datagrams, with bytes alone."""

from __future__ import annotations

import pytest

from tproxy import Interceptor
from tproxy.testing import Driver
from tproxy.udp.chain import DatagramChain, DatagramOutput


class Tag(Interceptor):
    """Appends its options' tag to every datagram, both ways."""

    @classmethod
    def parse_options(cls, options):  # type: ignore[no-untyped-def]
        return options.get("tag", "")

    def client_datagram(self, data: bytes) -> bytes | None:
        return data + self.options.encode()

    def server_datagram(self, data: bytes) -> bytes | None:
        return data + self.options.encode()


class DropOdd(Interceptor):
    def client_datagram(self, data: bytes) -> bytes | None:
        return None if len(data) % 2 else data


class Answer(Interceptor):
    """Answers b'ping' itself (toward the client) and drops it; injects a hello at start."""

    def start(self) -> None:
        self.inject_datagram_to_server(b"hello")

    def client_datagram(self, data: bytes) -> bytes | None:
        if data == b"ping":
            self.inject_datagram_to_client(b"pong")
            return None
        return data


class Boom(Interceptor):
    def server_datagram(self, data: bytes) -> bytes | None:
        raise ValueError("no")


class Quitter(Interceptor):
    def client_datagram(self, data: bytes) -> bytes | None:
        if data == b"quit":
            self.abort("asked to")
        return data


class Wrong(Interceptor):
    def client_datagram(self, data: bytes) -> bytes | None:
        return "text"  # type: ignore[return-value]


def test_default_hooks_forward_unchanged_keeping_boundaries() -> None:
    d = Driver.datagrams(Interceptor)
    d.client_datagram(b"a")
    d.client_datagram(b"")
    d.server_datagram(b"bc")
    assert d.datagrams_to_server == [b"a", b""]
    assert d.datagrams_to_client == [b"bc"]


def test_order_client_forward_server_reverse() -> None:
    d = Driver.datagrams((Tag, {"tag": "1"}), (Tag, {"tag": "2"}))
    assert d.client_datagram(b"x").to_server == [b"x12"]
    assert d.server_datagram(b"y").to_client == [b"y21"]


def test_none_drops_before_later_interceptors() -> None:
    d = Driver.datagrams(DropOdd, (Tag, {"tag": "!"}))
    d.client_datagram(b"odd")
    d.client_datagram(b"even")
    assert d.datagrams_to_server == [b"even!"]


def test_injections_pass_the_interceptors_beyond_the_injector() -> None:
    # Tag(a) before Answer, Tag(b) after it: the start hello passes only b,
    # the pong toward the client passes only a.
    d = Driver.datagrams((Tag, {"tag": "a"}), Answer, (Tag, {"tag": "b"}))
    assert d.datagrams_to_server == [b"hellob"]
    out = d.client_datagram(b"ping")
    # Tag(a) ran on the way in (ping -> pinga) so Answer does not recognise it
    assert out.to_server == [b"pingab"]
    d2 = Driver.datagrams(Answer, (Tag, {"tag": "b"}))
    out = d2.client_datagram(b"ping")
    assert out == DatagramOutput([], [b"pong"])


def test_stream_injections_are_not_datagrams() -> None:
    class Streamy(Interceptor):
        def start(self) -> None:
            self.inject_to_client(b"banner")

    d = Driver.datagrams(Streamy)
    assert d.datagrams_to_client == []
    assert d.client_datagram(b"q").to_server == [b"q"]


def test_raising_hook_ends_the_session_as_error() -> None:
    d = Driver.datagrams(Boom)
    d.client_datagram(b"ok")
    assert d.server_datagram(b"x") == DatagramOutput()
    assert d.error is not None and "Boom.server_datagram" in str(d.error)
    assert d.ended == "error"
    with pytest.raises(RuntimeError):
        d.client_datagram(b"more")


def test_abort_ends_the_session() -> None:
    d = Driver.datagrams(Quitter)
    d.client_datagram(b"a")
    d.client_datagram(b"quit")
    assert d.aborted == "asked to"
    assert d.ended == "interceptor-abort"
    assert d.datagrams_to_server == [b"a"]


def test_non_bytes_result_is_an_interceptor_error() -> None:
    d = Driver.datagrams(Wrong)
    d.client_datagram(b"a")
    assert d.error is not None and "not bytes" in str(d.error)


def test_passthrough_interceptor_is_skipped() -> None:
    class Once(Interceptor):
        def client_datagram(self, data: bytes) -> bytes | None:
            self.passthrough()
            return data.upper()

    chain = DatagramChain([Once(Driver(Interceptor).flow)])
    assert chain.client_datagram(b"a").to_server == [b"A"]
    assert chain.passthrough
    assert chain.client_datagram(b"b").to_server == [b"b"]


def test_end_is_called_once_per_interceptor() -> None:
    ended: list[str] = []

    class Ends(Interceptor):
        def end(self, reason: str) -> None:
            ended.append(reason)

    d = Driver.datagrams(Ends, Ends)
    d.end("idle")
    d.end("idle")
    assert ended == ["idle", "idle"]

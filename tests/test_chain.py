"""Semantics of :class:`tproxy.interceptor.Chain`: order, injection routing, abort, errors,
passthrough, end-of-stream flushing and start() injections."""

from __future__ import annotations

import pytest

from tproxy.flow import FlowInfo
from tproxy.interceptor import AbortFlow, Chain, Interceptor, InterceptorError, Output
from tproxy.testing import Driver

FLOW = FlowInfo.example()


class Tag(Interceptor):
    """Appends its name to data in both directions and records every call."""

    def __init__(self, name: str, log: list[str]) -> None:
        super().__init__(FLOW)
        self.name = name
        self.log = log

    def start(self) -> None:
        self.log.append(f"{self.name}.start")

    def client_data(self, data: bytes) -> bytes:
        self.log.append(f"{self.name}.client_data({data.decode()})")
        return data + self.name.encode()

    def server_data(self, data: bytes) -> bytes:
        self.log.append(f"{self.name}.server_data({data.decode()})")
        return data + self.name.encode()

    def client_eof(self) -> bytes:
        self.log.append(f"{self.name}.client_eof")
        return b""

    def server_eof(self) -> bytes:
        self.log.append(f"{self.name}.server_eof")
        return b""

    def end(self, reason: str) -> None:
        self.log.append(f"{self.name}.end({reason})")


def three(log: list[str]) -> list[Tag]:
    return [Tag("A", log), Tag("B", log), Tag("C", log)]


def test_client_to_server_in_order_server_to_client_in_reverse() -> None:
    log: list[str] = []
    chain = Chain(three(log))
    assert chain.start() == Output()
    assert chain.client_data(b"x") == Output(to_server=b"xABC")
    assert chain.server_data(b"y") == Output(to_client=b"yCBA")
    assert log == [
        "A.start",
        "B.start",
        "C.start",
        "A.client_data(x)",
        "B.client_data(xA)",
        "C.client_data(xAB)",
        "C.server_data(y)",
        "B.server_data(yC)",
        "A.server_data(yCB)",
    ]


def test_empty_chain_forwards() -> None:
    chain = Chain([])
    assert chain.passthrough
    assert chain.client_data(b"a") == Output(to_server=b"a")
    assert chain.server_data(b"b") == Output(to_client=b"b")
    assert chain.client_eof() == Output()


class Injector(Tag):
    """On client data ``to-client`` / ``to-server``, injects instead of forwarding."""

    def client_data(self, data: bytes) -> bytes:
        super().client_data(data)
        if data.startswith(b"to-client"):
            self.inject_to_client(b"<" + self.name.encode() + b">")
            return b""
        if data.startswith(b"to-server"):
            self.inject_to_server(b"[" + self.name.encode() + b"]")
            return b"rest"
        return data

    def server_data(self, data: bytes) -> bytes:
        super().server_data(data)
        if data.startswith(b"ping"):
            self.inject_to_server(b"pong" + self.name.encode())
        return data


def test_injection_toward_client_passes_earlier_interceptors_only() -> None:
    log: list[str] = []
    chain = Chain([Tag("A", log), Injector("B", log), Tag("C", log)])
    out = chain.client_data(b"to-client")
    assert out == Output(to_client=b"<B>A")
    assert "C.client_data(to-clientA)" not in log
    assert not any(entry.startswith("C.server_data") for entry in log)


def test_injection_toward_server_passes_later_interceptors_first_in_stream() -> None:
    log: list[str] = []
    chain = Chain([Tag("A", log), Injector("B", log), Tag("C", log)])
    # injected bytes come before what the hook returned: they were made first
    assert chain.client_data(b"to-server") == Output(to_server=b"[B]restC")


def test_injection_toward_server_from_server_data() -> None:
    log: list[str] = []
    chain = Chain([Tag("A", log), Injector("B", log), Tag("C", log)])
    out = chain.server_data(b"ping")
    # B answers the server: the pong passes C (toward the server) only;
    # the ping goes on to the client through A
    assert out == Output(to_server=b"pongBC", to_client=b"pingCA")


class Banner(Interceptor):
    def start(self) -> None:
        self.inject_to_client(b"220 hello\r\n")
        self.inject_to_server(b"HELLO\r\n")


def test_start_injections_are_routed_like_data() -> None:
    log: list[str] = []
    chain = Chain([Tag("A", log), Banner(FLOW), Tag("C", log)])
    out = chain.start()
    assert out == Output(to_server=b"HELLO\r\nC", to_client=b"220 hello\r\nA")


def test_no_data_hook_runs_before_its_own_start() -> None:
    log: list[str] = []
    chain = Chain([Tag("A", log), Banner(FLOW), Tag("C", log)])
    chain.start()
    assert log.index("C.start") < log.index("C.client_data(HELLO\r\n)")


def test_start_abort_after_an_earlier_banner() -> None:
    from tproxy.interceptors.block import Block

    block = Block(FLOW, Block.parse_options({"port": "80", "reply": "denied"}))
    chain = Chain([Banner(FLOW), block])
    with pytest.raises(AbortFlow) as info:
        chain.start()
    assert info.value.to_client == b"denied"


def test_start_banner_with_driver() -> None:
    d = Driver(Banner)
    assert (d.to_client, d.to_server) == (b"220 hello\r\n", b"HELLO\r\n")


class Aborter(Interceptor):
    def client_data(self, data: bytes) -> bytes:
        if b"bad" in data:
            self.abort("saw bad")
        return data


def test_abort_stops_the_chain() -> None:
    log: list[str] = []
    chain = Chain([Tag("A", log), Aborter(FLOW), Tag("C", log)])
    with pytest.raises(AbortFlow) as info:
        chain.client_data(b"bad")
    assert info.value.reason == "saw bad"
    assert info.value.to_client == b""
    assert not any(entry.startswith("C.") for entry in log)
    chain.end("interceptor-abort")
    assert log[-2:] == ["A.end(interceptor-abort)", "C.end(interceptor-abort)"]


def test_abort_with_driver() -> None:
    d = Driver(Aborter)
    d.client(b"fine")
    d.client(b"bad")
    assert d.aborted == "saw bad" and d.ended == "interceptor-abort"
    assert d.to_server == b"fine"
    with pytest.raises(RuntimeError):
        d.client(b"more")


class Replier(Interceptor):
    def client_data(self, data: bytes) -> bytes:
        self.inject_to_client(b"403")
        self.inject_to_server(b"dropped")
        self.abort("denied")


def test_abort_keeps_the_client_injection_through_earlier_interceptors() -> None:
    log: list[str] = []
    chain = Chain([Tag("A", log), Replier(FLOW), Tag("C", log)])
    with pytest.raises(AbortFlow) as info:
        chain.client_data(b"x")
    assert info.value.to_client == b"403A"


class Raiser(Interceptor):
    def server_data(self, data: bytes) -> bytes:
        raise KeyError("oops")


class WrongType(Interceptor):
    def client_data(self, data: bytes) -> bytes:
        return "text"  # type: ignore[return-value]


def test_exceptions_become_interceptor_error() -> None:
    chain = Chain([Raiser(FLOW)])
    with pytest.raises(InterceptorError) as info:
        chain.server_data(b"x")
    assert info.value.hook == "server_data"
    assert isinstance(info.value.error, KeyError)
    assert "Raiser.server_data raised KeyError('oops')" in str(info.value)


def test_returning_non_bytes_is_an_interceptor_error() -> None:
    with pytest.raises(InterceptorError, match="returned str, not bytes"):
        Chain([WrongType(FLOW)]).client_data(b"x")


def test_a_data_hook_returning_none_is_an_error_naming_interceptor_and_hook() -> None:
    """A data hook that forgot its ``return`` ends the flow, with a hint (issue 18 item 4)."""

    class ReturnsNone(Interceptor):
        def client_data(self, data: bytes) -> bytes:
            data.upper()  # the return was forgotten
            return None  # type: ignore[return-value]

    with pytest.raises(InterceptorError) as caught:
        Chain([ReturnsNone(FLOW)]).client_data(b"x")
    assert caught.value.hook == "client_data"
    assert "ReturnsNone.client_data" in str(caught.value)
    assert "did you forget to return?" in str(caught.value)


def test_none_from_an_eof_hook_means_nothing_held() -> None:
    class EofNone(Interceptor):
        def client_eof(self) -> bytes:
            return None  # type: ignore[return-value]

    assert Chain([EofNone(FLOW)]).client_eof() == Output()


def test_error_with_driver_and_end_errors() -> None:
    class EndRaiser(Interceptor):
        def end(self, reason: str) -> None:
            raise ValueError("end failed")

    d = Driver(Raiser)
    d.server(b"x")
    assert d.error is not None and d.ended == "error"
    log: list[str] = []
    chain = Chain([EndRaiser(FLOW), Tag("B", log)])
    with pytest.raises(InterceptorError, match=r"EndRaiser\.end"):
        chain.end("eof")
    assert log == ["B.end(eof)"]  # the others were still told
    chain.end("eof")  # only once


class Once(Tag):
    """Goes to passthrough after its first client data."""

    def client_data(self, data: bytes) -> bytes:
        self.passthrough()
        return super().client_data(data)


def test_passthrough_skips_the_interceptor() -> None:
    log: list[str] = []
    chain = Chain([Tag("A", log), Once("B", log), Tag("C", log)])
    assert chain.client_data(b"1") == Output(to_server=b"1ABC")  # this call is still forwarded
    assert not chain.passthrough
    log.clear()
    assert chain.client_data(b"2") == Output(to_server=b"2AC")
    assert chain.server_data(b"3") == Output(to_client=b"3CA")
    chain.client_eof()
    assert "B.client_eof" not in log
    chain.end("eof")
    assert "B.end(eof)" in log  # end is still called


def test_chain_passthrough_when_all_are() -> None:
    log: list[str] = []
    a, b = Once("A", log), Once("B", log)
    chain = Chain([a, b])
    chain.client_data(b"x")
    assert chain.passthrough


class Holder(Interceptor):
    """Holds all client data until end of stream."""

    def __init__(self) -> None:
        super().__init__(FLOW)
        self.held = b""

    def client_data(self, data: bytes) -> bytes:
        self.held += data
        return b""

    def client_eof(self) -> bytes:
        held, self.held = self.held, b""
        return held


def test_eof_flush_passes_later_interceptors_then_their_eof() -> None:
    log: list[str] = []
    chain = Chain([Holder(), Tag("B", log), Holder(), Tag("D", log)])
    assert chain.client_data(b"x") == Output()
    assert chain.client_data(b"y") == Output()
    assert log == []  # nothing got past the first holder
    out = chain.client_eof()
    assert out == Output(to_server=b"xyBD")
    assert log == ["B.client_data(xy)", "B.client_eof", "D.client_data(xyB)", "D.client_eof"]


def test_server_eof_runs_in_reverse() -> None:
    log: list[str] = []
    chain = Chain(three(log))
    chain.server_eof()
    assert log == ["C.server_eof", "B.server_eof", "A.server_eof"]


def test_eof_with_injections() -> None:
    class Trailer(Interceptor):
        def client_eof(self) -> bytes:
            self.inject_to_client(b"bye")
            self.inject_to_server(b"QUIT\r\n")
            return b"tail"

    log: list[str] = []
    chain = Chain([Tag("A", log), Trailer(FLOW), Tag("C", log)])
    assert chain.client_eof() == Output(to_server=b"QUIT\r\ntailC", to_client=b"byeA")

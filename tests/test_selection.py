"""--when: parsing, matching flows, class defaults, start-up warnings, the engine's filter."""

from __future__ import annotations

import dataclasses
import functools
import subprocess
import sys

import pytest
import trio

from tproxy import Interceptor
from tproxy.engine import Engine, EngineConfig
from tproxy.flow import FlowInfo
from tproxy.loading import (
    LoadError,
    load_all,
    load_interceptor,
    parse_interceptor_args,
    selection_warnings,
)
from tproxy.selection import (
    SelectionError,
    parse_condition,
    parse_selection,
    requested_host,
    unmatchable,
)


def flow(
    dst: tuple[str, int] = ("198.51.100.20", 80),
    client: str = "192.0.2.10",
    mode: str = "transparent",
    sni: str | None = None,
) -> FlowInfo:
    return dataclasses.replace(FlowInfo.example((client, 40000), dst, mode), sni=sni)


@pytest.mark.parametrize(
    ("expr", "info", "expected"),
    [
        ("port=80", flow(), True),
        ("port=443;8000-8100", flow(("198.51.100.20", 8050)), True),
        ("port=443;8000-8100", flow(), False),
        ("dst=198.51.100.0/24", flow(), True),
        ("dst=10.0.0.0/8;198.51.100.20", flow(), True),
        ("dst=10.0.0.0/8", flow(), False),
        ("dst=10.0.0.0/8", flow(("::ffff:10.1.1.1", 80)), True),
        ("dst=10.0.0.0/8", flow(("example.com", 80), mode="socks"), False),
        ("client=192.0.2.0/24", flow(), True),
        ("client=2001:db8::/32", flow(), False),
        ("mode=transparent", flow(), True),
        ("mode=socks;http", flow(mode="http"), True),
        ("mode=socks", flow(mode="socks-udp"), True),
        ("mode=forward", flow(), False),
        ("host=(.*\\.)?example\\.com", flow(("www.EXAMPLE.com.", 443), mode="socks"), True),
        ("host=example\\.com", flow(("www.example.com", 443), mode="socks"), False),
        ("host=example\\.com", flow(("1.2.3.4", 443), mode="socks", sni="example.com"), True),
        ("host=example\\.com", flow(sni="example.com"), True),
        ("host=example\\.com", flow(), False),
        ("sni=.*\\.test", flow(sni="a.test"), True),
        ("sni=.*\\.test", flow(("a.test", 443), mode="http"), False),
        ("port=443,sni=a{1,3}\\.test", flow(("1.2.3.4", 443), sni="aa.test"), True),
        ("port=443, mode=socks", flow(("1.2.3.4", 443)), False),
    ],
)
def test_condition_matches(expr: str, info: FlowInfo, expected: bool) -> None:
    assert parse_condition(expr).matches(info) is expected


def test_repeated_when_is_or_and_none_is_everything() -> None:
    sel = parse_selection(["port=80", "port=6379"])
    assert sel.matches(flow()) and sel.matches(flow(("1.2.3.4", 6379)))
    assert not sel.matches(flow(("1.2.3.4", 22)))
    assert parse_selection([]).matches(flow()) and parse_selection([]).everything


def test_requested_host() -> None:
    assert requested_host(flow(("name.example", 1), mode="forward")) == "name.example"
    assert requested_host(flow(("name.example", 1), sni="s.example")) == "s.example"
    assert requested_host(flow()) is None


@pytest.mark.parametrize(
    ("expr", "message"),
    [
        ("", "empty expression"),
        ("port", "is not KEY=VALUE"),
        ("colour=red", "unknown key 'colour'"),
        ("port=80,port=81", "port= given twice"),
        ("port=", "port= has no value"),
        ("port=http", "port 'http' is not a number"),
        ("dst=300.1.1.1", "dst:"),
        ("mode=udp", "unknown mode 'udp'"),
        ("sni=(", "not a valid regular expression"),
    ],
)
def test_bad_expression(expr: str, message: str) -> None:
    with pytest.raises(SelectionError, match=message) as info:
        parse_condition(expr)
    assert "\n" not in str(info.value)


class OnlyRedis(Interceptor):
    when = "port=6379"


class Everything(Interceptor):
    pass


def test_class_default_and_override() -> None:
    assert parse_interceptor_args(["-i", "block", "-o", "port=22"]) == [("block", {"port": "22"})]
    factory = load_interceptor(f"{__name__}:OnlyRedis")
    assert factory.selects(flow(("1.2.3.4", 6379))) and not factory.selects(flow())
    overridden = load_interceptor(f"{__name__}:OnlyRedis", {}, ["port=80"])
    assert overridden.selects(flow()) and not overridden.selects(flow(("1.2.3.4", 6379)))
    assert load_interceptor(f"{__name__}:Everything").selects(flow())


def test_command_line_when_follows_its_interceptor() -> None:
    specs = parse_interceptor_args(
        [
            "-i",
            "label",
            "--when",
            "port=80",
            "--when",
            "port=8080",
            "-i",
            "hexdump",
            "-o",
            "max-bytes=4",
        ]
    )
    assert specs == [("label", {}, ("port=80", "port=8080")), ("hexdump", {"max-bytes": "4"})]
    label, hexdump = load_all(specs)
    assert label.selects(flow(("1.2.3.4", 8080))) and not label.selects(flow(("1.2.3.4", 22)))
    assert hexdump.selects(flow(("1.2.3.4", 22)))
    assert hexdump.options.max_bytes == 4
    with pytest.raises(LoadError, match="before any -i"):
        parse_interceptor_args(["--when", "port=80"])
    with pytest.raises(LoadError, match="unknown key"):
        parse_interceptor_args(["-i", "label", "--when", "prot=80"])
    with pytest.raises(LoadError, match="given twice"):
        parse_interceptor_args(["-i", "hexdump", "-o", "max-bytes=1", "-o", "max_bytes=2"])


def test_bad_when_on_the_command_line_is_one_line_and_exit_2() -> None:
    argv = [
        sys.executable,
        "-m",
        "tproxy",
        "run",
        "--mode",
        "transparent@127.0.0.1:1",
        "-i",
        "label",
        "--when",
        "port=80,bogus=1",
    ]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert done.returncode == 2, done.stderr
    assert "unknown key 'bogus'" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_warnings_for_terms_that_never_match() -> None:
    sel = parse_selection(["host=example\\.com"])
    assert unmatchable(sel, ["transparent"], sni_available=False)
    assert not unmatchable(sel, ["transparent", "socks"], sni_available=False)
    assert not unmatchable(sel, ["transparent"], sni_available=True)
    assert unmatchable(parse_selection(["sni=x"]), ["http"], sni_available=False)
    assert unmatchable(parse_selection(["mode=socks"]), ["transparent"], sni_available=True)
    assert not unmatchable(parse_selection(["port=80"]), ["transparent"], sni_available=False)
    block = load_all([("block", {"host": "example\\.com"})])
    lines = selection_warnings(block, ["transparent"])
    assert len(lines) == 1 and "block host= never matches" in lines[0]
    assert selection_warnings(block, ["transparent", "socks"]) == []


class Tag(Interceptor):
    """Appends its option to what the client sends."""

    @classmethod
    def parse_options(cls, options):  # type: ignore[no-untyped-def]
        return options["tag"].encode()

    def client_data(self, data: bytes) -> bytes:
        return data + self.options


async def relay_once(engine: Engine, dst_port: int) -> bytes:
    """Relay one loopback flow whose destination port is ``dst_port`` (as the flow says)."""
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    received = b""
    async with trio.open_nursery() as nursery:

        async def server() -> None:
            nonlocal received
            stream = await listener.accept()
            async with stream:
                while chunk := await stream.receive_some(65536):
                    received += chunk
            await listener.aclose()

        nursery.start_soon(server)
        front = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
        client = await trio.open_tcp_stream("127.0.0.1", front.socket.getsockname()[1])
        incoming = await front.accept()
        await front.aclose()
        outgoing = await trio.open_tcp_stream("127.0.0.1", port)
        info = engine.new_flow(("127.0.0.1", 1), ("127.0.0.1", dst_port), "forward")
        source = outgoing.socket.getsockname()[:2]
        nursery.start_soon(functools.partial(engine.relay, source=source), incoming, outgoing, info)
        await client.send_all(b"hello")
        await client.send_eof()
        with trio.fail_after(10):
            while await client.receive_some(65536):
                pass
        await client.aclose()
    return received


@pytest.mark.trio
async def test_engine_builds_only_the_selected_interceptors() -> None:
    factories = load_all(
        [
            (f"{__name__}:Tag", {"tag": "-web"}, ("port=80",)),
            (f"{__name__}:Tag", {"tag": "-redis"}, ("port=6379",)),
        ]
    )
    engine = Engine(EngineConfig(), factories)
    assert await relay_once(engine, 80) == b"hello-web"
    assert await relay_once(engine, 6379) == b"hello-redis"
    assert await relay_once(engine, 22) == b"hello"  # no interceptor: passthrough


def test_tproxy_run_warns_about_block_host_on_transparent_listeners() -> None:
    import socket

    with socket.socket() as taken:  # a port in use: tproxy exits 2 after its start-up checks
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        argv = [
            sys.executable,
            "-m",
            "tproxy",
            "run",
            "--mode",
            f"transparent@127.0.0.1:{port}",
            "-i",
            "block",
            "-o",
            "host=ads\\.example",
            "-i",
            "label",
            "--when",
            "sni=x",
            "--when",
            "mode=socks",
        ]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert done.returncode == 2, done.stderr
    assert "block host= never matches on transparent listeners" in done.stderr
    # sni= can match on a TCP listener: the engine peeks the ClientHello (tproxy.peek)
    assert "sni= never matches" not in done.stderr
    assert "no listener has mode socks" in done.stderr


def test_sni_warnings_only_where_no_client_hello_is_peeked() -> None:
    sni = parse_selection(["sni=a\\.test"])
    host = parse_selection(["host=a\\.test"])
    for modes in (["transparent"], ["forward"], ["transparent", "transparent-udp"]):
        assert unmatchable(sni, modes, sni_available=True) == [], modes
        assert unmatchable(host, modes, sni_available=True) == [], modes
    (line,) = unmatchable(sni, ["transparent-udp"], sni_available=True)
    assert "sni= never matches" in line and "UDP" in line
    (line,) = unmatchable(host, ["transparent-udp"], sni_available=True)
    assert "host= never matches" in line
    label = load_all([("label", {}, ("sni=a\\.test",))])
    assert selection_warnings(label, ["transparent"]) == []
    assert selection_warnings(label, ["forward"]) == []
    assert selection_warnings(label, ["transparent-udp"])


class Via(Interceptor):
    def client_data(self, data: bytes) -> bytes:
        assert self.flow.via is not None and self.flow.started > 0
        return data + f"|{self.flow.via[0]}".encode()


@pytest.mark.trio
async def test_flow_via_and_started_reach_the_interceptor() -> None:
    engine = Engine(EngineConfig(), load_all([(f"{__name__}:Via", {})]))
    assert await relay_once(engine, 80) == b"hello|127.0.0.1"


def test_wants_client_hello_only_when_an_sni_could_change_the_answer() -> None:
    sel = parse_selection(["port=443,sni=(.*\\.)?blocked\\.test"])
    assert sel.wants_client_hello(flow(("1.2.3.4", 443)))
    assert not sel.wants_client_hello(flow(("1.2.3.4", 80)))  # port decides: no peek
    assert not sel.wants_client_hello(flow(("1.2.3.4", 443), sni="x.test"))  # already known
    host = parse_selection(["host=a\\.test"])
    assert host.wants_client_hello(flow(("1.2.3.4", 443)))
    assert not host.wants_client_hello(flow(("a.test", 443), mode="socks"))  # the name decides
    both = parse_selection(["port=80", "sni=a\\.test"])
    assert not both.wants_client_hello(flow(("1.2.3.4", 80)))  # selected anyway
    assert not parse_selection(["port=80"]).wants_client_hello(flow(("1.2.3.4", 443)))
    factory = load_interceptor("label", {}, ["sni=a\\.test"])
    assert factory.wants_client_hello(flow())

"""Host names that cannot name a host, through every explicit door, on real sockets.

Each door answers with its protocol's own refusal (SOCKS5 REP 0x04 host
unreachable, SOCKS4 91, HTTP 400), logs one line and records the flow; no
traceback ever reaches the log (these names used to make ``getaddrinfo``
raise ``UnicodeError`` inside the flow's task). Clients: raw sockets for
the exact bytes, curl and python-socks for what real clients send.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Iterator

import pytest
import trio
from explicit_harness import (
    HANG_GUARD,
    RunningProxy,
    curl,
    exchange,
    run_tproxy,
    running_proxy,
)
from python_socks import ProxyError
from python_socks.sync import Proxy

from tproxy.explicit.upstream import resolve
from tproxy.sockets import ConnectError

LONG_LABEL = "a" * 64 + ".test"
LONG_NAME = ".".join(["n" * 63] * 4)  # 255 bytes, every label valid
BAD_NAMES: dict[str, bytes] = {
    "empty-label": b"a..b",
    "long-label": LONG_LABEL.encode(),
    "dots": b"..",
    "dot": b".",
    "leading-dot": b".a.test",
    "long-name": LONG_NAME.encode(),
    "non-idna": "\u0080x.test".encode(),
    "nul": b"a\0b.test",
    "not-utf8": b"\xff\xfe.test",
}
"""Names a SOCKS client can send (at most 255 bytes: SOCKS5's length byte)."""
HTTP_NAMES = ["a..b", LONG_LABEL, "..", ".a.test", LONG_NAME, "x" * 300 + ".test"]
"""Names that survive HTTP's own request-target syntax (the rest are a 400 already)."""

NO_AUTH = b"\x05\x01\x00"
SOCKS5_HOST_UNREACHABLE = b"\x05\x04\x00\x01" + bytes(6)
SOCKS4_REJECTED = b"\x00\x5b" + bytes(6)
REFUSALS = ("invalid host name", "bad host")


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningProxy]:
    with running_proxy(tmp_path_factory.mktemp("names"), ["socks", "http"]) as running:
        yield running


def refusals_in(log: str) -> int:
    return sum(log.count(text) for text in REFUSALS)


def refusals(proxy: RunningProxy) -> int:
    return refusals_in(proxy.log())


def wait_refusals(proxy: RunningProxy, count: int) -> str:
    """The log once it holds ``count`` refusal lines (a flow is logged after its reply)."""
    deadline = time.monotonic() + HANG_GUARD
    log = proxy.log()
    while refusals_in(log) < count and time.monotonic() < deadline:
        time.sleep(0.02)
        log = proxy.log()
    return log


def socks5_domain_request(name: bytes, port: int = 80) -> bytes:
    return NO_AUTH + b"\x05\x01\x00\x03" + bytes((len(name),)) + name + struct.pack(">H", port)


def socks4a_request(name: bytes, port: int = 80) -> bytes:
    return b"\x04\x01" + struct.pack(">H", port) + b"\0\0\0\x01" + b"user\0" + name + b"\0"


def check_refused(proxy: RunningProxy, before: int) -> None:
    log = wait_refusals(proxy, before + 1)
    lines = [line for line in log.splitlines() if any(text in line for text in REFUSALS)]
    assert len(lines) == before + 1, log
    assert "reason=rejected" in lines[-1], lines[-1]
    assert "Traceback" not in log and "UnicodeError" not in log, log


@pytest.mark.parametrize("name", list(BAD_NAMES.values()), ids=list(BAD_NAMES))
def test_socks5_answers_host_unreachable(proxy: RunningProxy, name: bytes) -> None:
    before = refusals(proxy)
    reply = exchange(proxy.port("socks"), socks5_domain_request(name))
    assert reply == b"\x05\x00" + SOCKS5_HOST_UNREACHABLE
    check_refused(proxy, before)


SOCKS4A_NAMES = {k: v for k, v in BAD_NAMES.items() if k != "nul"}  # NUL ends a 4a name
SOCKS4A_NAMES["300-bytes"] = b"x" * 300 + b".test"


@pytest.mark.parametrize("name", list(SOCKS4A_NAMES.values()), ids=list(SOCKS4A_NAMES))
def test_socks4a_answers_rejected(proxy: RunningProxy, name: bytes) -> None:
    before = refusals(proxy)
    assert exchange(proxy.port("socks"), socks4a_request(name)) == SOCKS4_REJECTED
    check_refused(proxy, before)


@pytest.mark.parametrize("name", HTTP_NAMES, ids=range(len(HTTP_NAMES)))
@pytest.mark.parametrize("form", ["connect", "absolute"])
def test_http_answers_400(proxy: RunningProxy, name: str, form: str) -> None:
    before = refusals(proxy)
    if form == "connect":
        head = f"CONNECT {name}:443 HTTP/1.1\r\nHost: {name}:443\r\n\r\n"
    else:
        head = f"GET http://{name}/ HTTP/1.1\r\nHost: {name}\r\n\r\n"
    reply = exchange(proxy.port("http"), head.encode())
    assert reply.startswith(b"HTTP/1.1 400 "), reply[:200]
    check_refused(proxy, before)


@pytest.mark.parametrize("name", ["a..b", LONG_LABEL])
@pytest.mark.parametrize("scheme", ["socks5h", "socks4a", "http", "http-tunnel"])
def test_curl_gets_a_clean_refusal(proxy: RunningProxy, name: str, scheme: str) -> None:
    before = refusals(proxy)
    if scheme.startswith("http"):
        args = ["-x", f"http://127.0.0.1:{proxy.port('http')}"]
        args += ["-p"] if scheme == "http-tunnel" else []
    else:
        args = ["-x", f"{scheme}://127.0.0.1:{proxy.port('socks')}"]
    result = curl("-o", "/dev/null", "-w", "%{http_code}", *args, f"http://{name}/")
    assert result.returncode != 0 or result.stdout == "400", (result.stdout, result.stderr)
    if scheme == "http":
        assert result.stdout == "400"
    check_refused(proxy, before)


@pytest.mark.parametrize("version", ["socks5", "socks4"])
def test_python_socks_gets_the_protocol_error(proxy: RunningProxy, version: str) -> None:
    before = refusals(proxy)
    client = Proxy.from_url(f"{version}://127.0.0.1:{proxy.port('socks')}", rdns=True)
    with pytest.raises(ProxyError) as caught:
        client.connect(LONG_NAME, 80, timeout=10)  # it IDNA-encodes: no empty label
    assert caught.value.error_code == (4 if version == "socks5" else 91)
    check_refused(proxy, before)


def test_a_forward_target_that_cannot_name_a_host_is_refused_at_start() -> None:
    result = run_tproxy("run", "--mode", "forward:a..b:80@127.0.0.1:1")
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "a..b" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("name", ["a..b", LONG_LABEL, "a\0b", "\u0080x", "x" * 300])
def test_resolve_turns_every_unusable_name_into_a_dns_error(name: str) -> None:
    async def main() -> None:
        with pytest.raises(ConnectError) as caught:
            await resolve(name, 80)
        assert caught.value.kind == "dns"

    trio.run(main)

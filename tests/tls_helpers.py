"""CAs, server contexts and in-memory TLS endpoints for the TLS layer's tests."""

from __future__ import annotations

import contextlib
import ssl
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from explicit_harness import free_port, run_tproxy, stop, wait_port

from tproxy.tls import ca
from tproxy.tls.certs import LeafForge


class Upstream:
    """A stand-in public PKI: its own CA and server certificates signed by it."""

    def __init__(self, directory: Path) -> None:
        self.ca = ca.create(directory / "upstream-ca", common_name="test upstream CA")
        self.forge = LeafForge(self.ca)
        self.ca_file = self.ca.cert_path

    def server_context(self, names: list[str], alpn: list[str] | None = None) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.forge.chain_file(tuple(names)), self.forge.key_path)
        if alpn:
            ctx.set_alpn_protocols(alpn)
        return ctx


def client_context(cafile: Path | None, alpn: list[str] | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(cafile) if cafile else None)
    if alpn:
        ctx.set_alpn_protocols(alpn)
    return ctx


class Endpoint:
    """One side of a TLS connection over memory BIOs: bytes in, bytes out."""

    def __init__(self, ctx: ssl.SSLContext, *, server_side: bool, name: str | None = None):
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(
            self.incoming, self.outgoing, server_side=server_side, server_hostname=name
        )
        self.done = False
        self.error: ssl.SSLError | None = None
        self.received = b""
        self.closed = False

    def step(self) -> None:
        """Advance the handshake, or read what arrived once it is done."""
        if self.error is not None:
            return
        try:
            if not self.done:
                self.obj.do_handshake()
                self.done = True
            while True:
                chunk = self.obj.read(65536)
                if not chunk:
                    self.closed = True
                    break
                self.received += chunk
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLZeroReturnError:
            self.closed = True
        except ssl.SSLError as exc:
            self.error = exc

    def take(self) -> bytes:
        return self.outgoing.read()


class RawTls:
    """TLS over a blocking socket through memory BIOs, keeping every raw byte both ways
    (so a test can compare the ciphertext at both ends of a proxy)."""

    def __init__(self, sock, ctx: ssl.SSLContext, *, server_side: bool, name: str | None = None):
        self.sock = sock
        self.end = Endpoint(ctx, server_side=server_side, name=name)
        self.raw_in = b""
        self.raw_out = b""

    def _send(self) -> None:
        data = self.end.take()
        if data:
            self.raw_out += data
            self.sock.sendall(data)

    def _recv(self) -> bool:
        data = self.sock.recv(65536)
        if not data:
            return False
        self.raw_in += data
        self.end.incoming.write(data)
        return True

    def handshake(self) -> None:
        for _ in range(100):
            self.end.step()
            self._send()
            if self.end.error is not None:
                raise self.end.error
            if self.end.done:
                return
            if not self._recv():
                raise ConnectionError("closed during the handshake")
        raise AssertionError("handshake did not finish")

    def send(self, data: bytes) -> None:
        self.end.obj.write(data)
        self._send()

    def receive_until(self, marker: bytes) -> bytes:
        for _ in range(1000):
            self.end.step()
            self._send()
            if marker in self.end.received or self.end.closed:
                return self.end.received
            if not self._recv():
                return self.end.received
        raise AssertionError("nothing more came")

    def close(self) -> None:
        try:
            self.end.obj.unwrap()
        except ssl.SSLError:
            pass
        self._send()
        self.sock.shutdown(2)
        self.sock.close()


SERVER_SCRIPT = Path(__file__).with_name("tls_server.py")


def make_pki(tmp_path: Path) -> tuple[Path, Upstream]:
    """The interception CA (made by ``tproxy ca init``) and the stand-in public PKI."""
    ca_dir = tmp_path / "ca"
    done = run_tproxy("ca", "init", "--dir", str(ca_dir))
    assert done.returncode == 0, done.stderr
    return ca_dir, Upstream(tmp_path)


@contextlib.contextmanager
def tls_server(upstream: Upstream, names: Sequence[str]) -> Iterator[int]:
    """``tls_server.py`` on 127.0.0.1 with one certificate for ``names``; yields its port."""
    chain = upstream.forge.chain_file(tuple(names))
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            str(SERVER_SCRIPT),
            "127.0.0.1",
            str(port),
            str(chain),
            str(upstream.forge.key_path),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_port("127.0.0.1", port, proc)
        yield port
    finally:
        stop(proc)


def tls_args(pki: tuple[Path, Upstream], *more: str) -> list[str]:
    """``tproxy run`` options for TLS interception with this CA, trusting the stand-in PKI."""
    ca_dir, upstream = pki
    return [
        "--tls",
        "intercept",
        "--ca-dir",
        str(ca_dir),
        "--tls-upstream-ca",
        str(upstream.ca_file),
        *more,
    ]

"""TLS interception end to end on loopback: real tproxy, real clients (curl, openssl, ssl).

The proxy runs in forward or SOCKS mode (no root needed); the server is
``tls_server.py`` with a certificate from a test CA that stands in for the
public PKI (``--tls-upstream-ca``). Clients name the server through
``--resolve`` so SNI and certificate names are real names.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import ssl
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from explicit_harness import (
    HANG_GUARD,
    REPLACE,
    curl,
    http_server,
    run_tproxy,
    running_proxy,
)
from tls_helpers import RawTls, Upstream, client_context, make_pki, tls_args, tls_server

NAME = "site.example.test"


@pytest.fixture
def pki(tmp_path: Path) -> tuple[Path, Upstream]:
    """The interception CA (made by the CLI) and the stand-in public PKI."""
    return make_pki(tmp_path)


@pytest.fixture
def server(pki: tuple[Path, Upstream]) -> Iterator[int]:
    """``tls_server.py`` on 127.0.0.1 with a certificate for NAME, localhost, 127.0.0.1."""
    with tls_server(pki[1], (NAME, "localhost", "127.0.0.1")) as port:
        yield port


def https(port: int, *args: str) -> subprocess.CompletedProcess[str]:
    return curl("--resolve", f"{NAME}:{port}:127.0.0.1", *args, f"https://{NAME}:{port}/")


# -- tproxy ca ------------------------------------------------------------------------


def test_ca_init_show_export(tmp_path: Path) -> None:
    ca_dir = tmp_path / "ca"
    assert run_tproxy("ca", "init", "--dir", str(ca_dir)).returncode == 0
    assert stat.S_IMODE(os.stat(ca_dir / "ca-key.pem").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(ca_dir).st_mode) == 0o700
    shown = run_tproxy("ca", "show", "--dir", str(ca_dir))
    assert shown.returncode == 0
    fingerprint = (
        subprocess.run(
            ["openssl", "x509", "-in", str(ca_dir / "ca.pem"), "-noout", "-fingerprint", "-sha256"],
            capture_output=True,
            text=True,
            check=True,
        )
        .stdout.strip()
        .split("=", 1)[1]
    )
    assert fingerprint in shown.stdout
    assert "update-ca-certificates" in shown.stdout and "--cacert" in shown.stdout
    assert "Firefox" in shown.stdout
    der = subprocess.run(
        [sys.executable, "-m", "tproxy", "ca", "export", "--dir", str(ca_dir), "--format", "der"],
        capture_output=True,
        check=True,
    ).stdout
    cert = x509.load_der_x509_certificate(der)
    assert cert.public_bytes(ssl_pem()) == (ca_dir / "ca.pem").read_bytes()
    years = (cert.not_valid_after_utc - cert.not_valid_before_utc).days / 365
    assert 9.9 < years < 10.1
    again = run_tproxy("ca", "init", "--dir", str(ca_dir))
    assert again.returncode == 2 and len(again.stderr.strip().splitlines()) == 1
    missing = run_tproxy("ca", "show", "--dir", str(tmp_path / "nothing"))
    assert missing.returncode == 2 and "tproxy ca init" in missing.stderr


def ssl_pem():  # type: ignore[no-untyped-def]
    from cryptography.hazmat.primitives.serialization import Encoding

    return Encoding.PEM


def test_run_without_a_ca_is_a_usage_error(tmp_path: Path) -> None:
    done = run_tproxy(
        "run",
        "--mode",
        "socks@127.0.0.1:1",
        "--tls",
        "intercept",
        "--ca-dir",
        str(tmp_path / "none"),
    )
    assert done.returncode == 2
    assert "no CA in" in done.stderr and len(done.stderr.strip().splitlines()) == 1


# -- curl and openssl through the proxy -------------------------------------------------


def test_curl_through_forward_gets_the_page_rewritten(tmp_path, pki, server) -> None:
    ca_dir, _ = pki
    with running_proxy(
        tmp_path, [f"forward:127.0.0.1:{server}"], *tls_args(pki), *REPLACE
    ) as proxy:
        port = proxy.port("forward")
        done = https(port, "--cacert", str(ca_dir / "ca.pem"))
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith("hello WORLD, from the server")
        # keep-alive: two requests on one connection, both rewritten
        url = f"https://{NAME}:{port}/"
        done = curl(
            "--resolve", f"{NAME}:{port}:127.0.0.1", "--cacert", str(ca_dir / "ca.pem"), url, url
        )
        assert done.stdout.count("hello WORLD") == 2, done.stderr


def test_curl_through_socks_gets_the_page_rewritten(tmp_path, pki, server) -> None:
    ca_dir, _ = pki
    with running_proxy(tmp_path, ["socks"], *tls_args(pki), *REPLACE) as proxy:
        done = https(
            server,
            "--socks5",
            f"127.0.0.1:{proxy.port('socks')}",
            "--cacert",
            str(ca_dir / "ca.pem"),
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith("hello WORLD")


def test_openssl_shows_the_forged_chain(tmp_path, pki, server) -> None:
    ca_dir, _ = pki
    with running_proxy(tmp_path, [f"forward:127.0.0.1:{server}"], *tls_args(pki)) as proxy:
        done = subprocess.run(
            [
                "openssl",
                "s_client",
                "-showcerts",
                "-connect",
                f"127.0.0.1:{proxy.port('forward')}",
                "-servername",
                NAME,
                "-CAfile",
                str(ca_dir / "ca.pem"),
                "-verify_hostname",
                NAME,
            ],
            input="",
            capture_output=True,
            text=True,
            timeout=HANG_GUARD,
        )
    out = done.stdout
    assert out.count("-----BEGIN CERTIFICATE-----") == 2  # the leaf, then the CA
    assert f"CN = {NAME}" in out and "tproxy interception CA" in out
    assert "Verify return code: 0 (ok)" in out


def test_a_client_that_does_not_trust_the_ca_fails_once_then_passes_through(
    tmp_path, pki, server
) -> None:
    _, upstream = pki
    with running_proxy(
        tmp_path, [f"forward:127.0.0.1:{server}"], *tls_args(pki), *REPLACE
    ) as proxy:
        port = proxy.port("forward")
        # this client trusts the real server's CA only
        first = https(port, "--cacert", str(upstream.ca_file))
        assert first.returncode != 0
        proxy.wait_log("rejected the forged certificate")
        second = https(port, "--cacert", str(upstream.ca_file))
        assert second.returncode == 0, second.stderr
        assert second.stdout.startswith("hello world")  # untouched: no rewrite
        third = https(port, "--cacert", str(upstream.ca_file))
        assert third.returncode == 0
        assert proxy.log().count("passing") + proxy.log().count("pass through untouched") == 1


def test_an_unverifiable_server_is_an_alert_and_a_log_line(tmp_path, pki, server) -> None:
    ca_dir, _ = pki
    # no --tls-upstream-ca: the system store does not know the test PKI
    with running_proxy(
        tmp_path, [f"forward:127.0.0.1:{server}"], "--tls", "intercept", "--ca-dir", str(ca_dir)
    ) as proxy:
        done = https(proxy.port("forward"), "--cacert", str(ca_dir / "ca.pem"))
        assert done.returncode != 0
        assert "alert" in done.stderr.lower()
        log = proxy.wait_log("upstream certificate")
        assert re.search(r"upstream certificate of site\.example\.test rejected: \w", log)
        # --tls-upstream-verify no accepts it
    with running_proxy(
        tmp_path,
        [f"forward:127.0.0.1:{server}"],
        "--tls",
        "intercept",
        "--ca-dir",
        str(ca_dir),
        "--tls-upstream-verify",
        "no",
    ) as proxy:
        done = https(proxy.port("forward"), "--cacert", str(ca_dir / "ca.pem"))
        assert done.returncode == 0, done.stderr


def test_plain_http_is_untouched_by_tls_and_still_intercepted(tmp_path, pki) -> None:
    with (
        http_server(tmp_path) as port,
        running_proxy(tmp_path, [f"forward:127.0.0.1:{port}"], *tls_args(pki), *REPLACE) as proxy,
    ):
        done = curl(f"http://127.0.0.1:{proxy.port('forward')}/")
        assert done.stdout.startswith("hello WORLD"), done.stderr


# -- raw clients: exact bytes ------------------------------------------------------------


class RawServer:
    """One TLS connection served in a thread with :class:`RawTls` (every raw byte kept)."""

    def __init__(self, upstream: Upstream) -> None:
        self.ctx = upstream.server_context([NAME])
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(HANG_GUARD)
        self.port = self.listener.getsockname()[1]
        self.tls: RawTls | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            for _ in range(5):  # the harness's port probe connects (and leaves) first
                conn, _ = self.listener.accept()
                conn.settimeout(HANG_GUARD)
                tls = self.tls = RawTls(conn, self.ctx, server_side=True)
                try:
                    tls.handshake()
                    break
                except ConnectionError:
                    conn.close()
            tls.receive_until(b"\r\n\r\n")
            tls.send(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nthe END\r\n")
            while tls._recv():  # the rest, until the client's FIN
                pass
            conn.close()
        except BaseException as exc:  # reported by the test
            self.error = exc

    def join(self) -> RawTls:
        self.thread.join(HANG_GUARD)
        self.listener.close()
        if self.error is not None:
            raise self.error
        assert self.tls is not None
        return self.tls


def raw_client(port: int, cafile: Path, alpn: list[str] | None = None) -> RawTls:
    sock = socket.create_connection(("127.0.0.1", port), timeout=HANG_GUARD)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return RawTls(sock, client_context(cafile, alpn), server_side=False, name=NAME)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_tls_ignore_gives_byte_identical_ciphertext(tmp_path, pki) -> None:
    _, upstream = pki
    raw_server = RawServer(upstream)
    with running_proxy(
        tmp_path,
        [f"forward:127.0.0.1:{raw_server.port}"],
        *tls_args(pki, "--tls-ignore", r"^site\.example\.test$"),
        *REPLACE,
    ) as proxy:
        client = raw_client(proxy.port("forward"), upstream.ca_file)
        client.handshake()
        leaf = x509.load_der_x509_certificate(client.end.obj.getpeercert(binary_form=True))
        assert leaf.issuer == upstream.ca.cert.subject  # the server's own certificate
        client.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert client.receive_until(b"END\r\n").endswith(b"the END\r\n")
        client.close()
        served = raw_server.join()
    assert sha(client.raw_out) == sha(served.raw_in)
    assert sha(served.raw_out) == sha(client.raw_in)
    assert len(client.raw_out) > 500


def test_a_2100_byte_hello_in_two_segments_200ms_apart_is_intercepted(
    tmp_path, pki, server
) -> None:
    ca_dir, _ = pki
    # A long ALPN list makes the hello as big as a post-quantum one.
    alpn = [f"x-padding-{i:03d}" for i in range(128)] + ["http/1.1"]
    with running_proxy(
        tmp_path, [f"forward:127.0.0.1:{server}"], *tls_args(pki), *REPLACE
    ) as proxy:
        client = raw_client(proxy.port("forward"), ca_dir / "ca.pem", alpn)
        client.end.step()
        hello = client.end.take()
        assert 2100 <= len(hello) < 2200
        client.sock.sendall(hello[:1000])
        time.sleep(0.2)
        client.sock.sendall(hello[1000:])
        client.handshake()
        assert client.end.obj.selected_alpn_protocol() == "http/1.1"
        client.send(f"GET / HTTP/1.1\r\nHost: {NAME}\r\n\r\n".encode())
        reply = client.receive_until(b"peer 127.0.0.1\n")
        assert b"hello WORLD" in reply
        client.close()


def test_a_client_stalling_mid_hello_is_closed_after_the_timeout(tmp_path, pki, server):
    ca_dir, _ = pki
    with running_proxy(
        tmp_path, [f"forward:127.0.0.1:{server}"], *tls_args(pki, "--tls-handshake-timeout", "0.5")
    ) as proxy:
        client = raw_client(proxy.port("forward"), ca_dir / "ca.pem")
        client.end.step()
        client.sock.sendall(client.end.take()[:40])
        try:
            assert client.sock.recv(100) == b""
        except ConnectionResetError:
            pass
        log = proxy.wait_log("stalled in the TLS handshake")
        assert log.count("WARNING") == 1
        # the proxy is fine: the next client is served
        done = https(proxy.port("forward"), "--cacert", str(ca_dir / "ca.pem"))
        assert done.returncode == 0, done.stderr


def test_garbage_after_a_hello_prefix_ends_only_its_flow(tmp_path, pki, server) -> None:
    ca_dir, _ = pki
    with running_proxy(tmp_path, [f"forward:127.0.0.1:{server}"], *tls_args(pki)) as proxy:
        with socket.create_connection(("127.0.0.1", proxy.port("forward")), 5) as sock:
            sock.sendall(b"\x16\x03\x01\x00\x30\x01\x00\x00\x2c" + b"\xee" * 44)
            try:
                assert sock.recv(100) == b""
            except ConnectionResetError:
                pass
        proxy.wait_log("broken ClientHello")
        done = https(proxy.port("forward"), "--cacert", str(ca_dir / "ca.pem"))
        assert done.returncode == 0, done.stderr


def test_keylog_gets_both_sides(tmp_path, pki, server) -> None:
    ca_dir, _ = pki
    keylog = tmp_path / "keys.log"
    with running_proxy(
        tmp_path, [f"forward:127.0.0.1:{server}"], *tls_args(pki, "--tls-keylog", str(keylog))
    ) as proxy:
        done = https(proxy.port("forward"), "--cacert", str(ca_dir / "ca.pem"))
        assert done.returncode == 0, done.stderr
        proxy.wait_log("flow 1 end")
    randoms = set(re.findall(r"^CLIENT_TRAFFIC_SECRET_0 (\w+)", keylog.read_text(), re.M))
    assert len(randoms) == 2


def test_ssl_client_context_roundtrip_sanity() -> None:
    # the test client offers TLS 1.3 by default, like curl here
    assert ssl.HAS_TLSv1_3


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--tls-ignore", "x"], "needs --tls intercept"),
        (["--tls", "intercept", "--tls-ignore", "("], "--tls-ignore '('"),
        (["--tls", "intercept", "--tls-handshake-timeout", "0"], "must be positive"),
        (["--tls", "intercept", "--tls-upstream-ca", "/nonexistent"], "no such file"),
    ],
)
def test_bad_tls_options_are_one_line_and_exit_2(tmp_path, pki, args, message) -> None:
    ca_dir, _ = pki
    done = run_tproxy("run", "--mode", "socks@127.0.0.1:1", "--ca-dir", str(ca_dir), *args)
    assert done.returncode == 2
    assert message in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_curl_through_http_connect_gets_the_page_rewritten(tmp_path, pki, server) -> None:
    ca_dir, _ = pki
    with running_proxy(tmp_path, ["http"], *tls_args(pki), *REPLACE) as proxy:
        # CONNECT localhost:PORT: the proxy resolves the name, which is the SNI too
        done = curl(
            "--proxy",
            f"http://127.0.0.1:{proxy.port('http')}",
            "--cacert",
            str(ca_dir / "ca.pem"),
            f"https://localhost:{server}/",
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith("hello WORLD")

"""``--when sni=...`` and ``--tls-when`` end to end on loopback: real tproxy, curl, python ssl.

The proxy runs in forward mode (no root needed), so every flow's destination is
an address and its server name exists only in the ClientHello: the engine peeks
it (without ``--tls``) or the TLS layer reads it (with ``--tls intercept``).
The server is ``tls_server.py`` with a certificate from a test CA for several
names; curl reaches it by name through ``--resolve``.
"""

from __future__ import annotations

import socket
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from explicit_harness import (
    HANG_GUARD,
    REPLACE,
    curl,
    run_tproxy,
    running_proxy,
)
from tls_helpers import Upstream, make_pki, tls_args, tls_server

NAMES = ("a.test", "b.test", "blocked.test", "ok.test", "127.0.0.1")


@pytest.fixture
def pki(tmp_path: Path) -> tuple[Path, Upstream]:
    """The interception CA (made by the CLI) and the stand-in public PKI."""
    return make_pki(tmp_path)


@pytest.fixture
def server(pki: tuple[Path, Upstream]) -> Iterator[int]:
    """``tls_server.py`` on 127.0.0.1 with one certificate for every name of NAMES."""
    with tls_server(pki[1], NAMES) as port:
        yield port


def https(name: str, port: int, *args: str) -> subprocess.CompletedProcess[str]:
    return curl("--resolve", f"{name}:{port}:127.0.0.1", *args, f"https://{name}:{port}/")


def fetch(port: int, name: str, cafiles: list[Path]) -> tuple[x509.Certificate, bytes]:
    """One GET through python ssl trusting ``cafiles``: the leaf it saw and the reply."""
    ctx = ssl.create_default_context()
    for cafile in cafiles:
        ctx.load_verify_locations(cafile=str(cafile))
    with socket.create_connection(("127.0.0.1", port), timeout=HANG_GUARD) as raw:
        with ctx.wrap_socket(raw, server_hostname=name) as tls:
            leaf = x509.load_der_x509_certificate(tls.getpeercert(binary_form=True))
            tls.sendall(f"GET / HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n".encode())
            reply = b""
            for _ in range(100):
                chunk = tls.recv(65536)
                if not chunk:
                    break
                reply += chunk
                if b"peer " in reply and reply.endswith(b"\n"):
                    break
    return leaf, reply


def test_when_sni_selects_the_interceptor_behind_tls_interception(tmp_path, pki, server):
    ca_dir, _ = pki
    with running_proxy(
        tmp_path,
        [f"forward:127.0.0.1:{server}"],
        *tls_args(pki),
        *REPLACE,
        "--when",
        r"sni=a\.test",
    ) as proxy:
        port = proxy.port("forward")
        selected = https("a.test", port, "--cacert", str(ca_dir / "ca.pem"))
        assert selected.returncode == 0, selected.stderr
        assert selected.stdout.startswith("hello WORLD, from the server")
        other = https("b.test", port, "--cacert", str(ca_dir / "ca.pem"))
        assert other.returncode == 0, other.stderr
        assert other.stdout.startswith("hello world, from the server")  # not rewritten
    assert "sni= never matches" not in proxy.log()


def test_when_sni_without_tls_peeks_the_hello_and_blocks_by_name(tmp_path, server):
    with running_proxy(
        tmp_path,
        [f"forward:127.0.0.1:{server}"],
        "-i",
        "block",
        "-o",
        f"port={server}",
        "--when",
        r"sni=blocked\.test",
    ) as proxy:
        port = proxy.port("forward")
        blocked = https("blocked.test", port, "-k")
        assert blocked.returncode != 0
        assert "hello" not in blocked.stdout
        fine = https("ok.test", port, "-k")
        assert fine.returncode == 0, fine.stderr
        assert fine.stdout.startswith("hello world, from the server")
        # the same name again, after a flow of another name: decided per flow
        assert https("blocked.test", port, "-k").returncode != 0
        proxy.wait_log("block: destination")
    log = proxy.log()
    assert "sni= never matches" not in log
    assert log.count("block: destination") == 2, log


def test_when_sni_plain_http_is_not_held_and_not_selected(tmp_path):
    from explicit_harness import http_server

    with http_server(tmp_path) as web:
        with running_proxy(
            tmp_path,
            [f"forward:127.0.0.1:{web}"],
            "-i",
            "block",
            "-o",
            f"port={web}",
            "--when",
            r"sni=.*",
        ) as proxy:
            done = curl(f"http://127.0.0.1:{proxy.port('forward')}/")
            assert done.returncode == 0, done.stderr
            assert done.stdout == "hello world, from the server\n"


def test_tls_when_intercepts_only_the_selected_names(tmp_path, pki, server):
    ca_dir, upstream = pki
    ours = x509.load_pem_x509_certificate((ca_dir / "ca.pem").read_bytes())
    with running_proxy(
        tmp_path,
        [f"forward:127.0.0.1:{server}"],
        *tls_args(pki, "--tls-when", r"sni=a\.test"),
        *REPLACE,
    ) as proxy:
        port = proxy.port("forward")
        both = [ca_dir / "ca.pem", upstream.ca_file]
        leaf, reply = fetch(port, "a.test", both)
        assert leaf.issuer == ours.subject  # forged
        assert b"hello WORLD" in reply
        leaf, reply = fetch(port, "b.test", both)
        assert leaf.issuer == upstream.ca.cert.subject  # the server's real certificate
        assert b"hello world" in reply  # and the interceptors never saw it
        # curl that trusts only the server's own CA gets b.test untouched
        done = https("b.test", port, "--cacert", str(upstream.ca_file))
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith("hello world")


def test_tls_when_unselected_flow_is_byte_identical_ciphertext(tmp_path, pki) -> None:
    from test_tls_loopback import RawServer, raw_client, sha

    _, upstream = pki
    raw_server = RawServer(upstream)
    with running_proxy(
        tmp_path,
        [f"forward:127.0.0.1:{raw_server.port}"],
        *tls_args(pki, "--tls-when", r"sni=a\.test", "--tls-when", "port=1"),
        *REPLACE,
    ) as proxy:
        client = raw_client(proxy.port("forward"), upstream.ca_file)
        client.handshake()
        leaf = x509.load_der_x509_certificate(client.end.obj.getpeercert(binary_form=True))
        assert leaf.issuer == upstream.ca.cert.subject
        client.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert client.receive_until(b"END\r\n").endswith(b"the END\r\n")
        client.close()
        served = raw_server.join()
    assert sha(client.raw_out) == sha(served.raw_in)
    assert sha(served.raw_out) == sha(client.raw_in)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--tls-when", "sni=x"], "--tls-when needs --tls intercept"),
        (["--tls", "intercept", "--tls-when", "snx=x"], "--tls-when 'snx=x': unknown key"),
        (["--tls", "intercept", "--tls-when", "sni=("], "--tls-when 'sni=('"),
        (["--peek-timeout", "0"], "--peek-timeout must be positive"),
    ],
)
def test_bad_options_are_one_line_and_exit_2(tmp_path, pki, args, message) -> None:
    ca_dir, _ = pki
    if "--tls" in args:
        args = [*args, "--ca-dir", str(ca_dir)]
    done = run_tproxy("run", "--mode", "socks@127.0.0.1:1", *args)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_a_stalled_hello_is_released_after_the_peek_timeout(tmp_path):
    """The relay honours the peek's deadline: the first bytes of a ClientHello that never
    completes reach the server (an echo here) once --peek-timeout passed, in order."""
    from explicit_harness import echo_server, recv_exact

    start = b"\x16\x03\x01\x00\x80\x01\x00"  # a ClientHello's start, 0x80 bytes announced
    with echo_server() as echo:
        with running_proxy(
            tmp_path,
            [f"forward:127.0.0.1:{echo}"],
            "-vv",
            "--peek-timeout",
            "0.3",
            "-i",
            "replace",
            "-o",
            "old=\\x80\\x01",
            "-o",
            "new=AB",
            "--when",
            f"port={echo}",
            "-i",
            "label",
            "--when",
            r"sni=a\.test",
        ) as proxy:
            with socket.create_connection(
                ("127.0.0.1", proxy.port("forward")), timeout=HANG_GUARD
            ) as sock:
                sock.sendall(start)
                assert recv_exact(sock, len(start)) == b"\x16\x03\x01\x00AB\x00"
                sock.sendall(b"more")
                assert recv_exact(sock, 4) == b"more"
            proxy.wait_log("peeked 7 bytes (timeout, sni=None)")

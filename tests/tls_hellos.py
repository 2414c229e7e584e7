"""Real and built ClientHellos for the tests of ``tproxy.tls.parse_client_hello``."""

from __future__ import annotations

import os
import socket
import ssl
import struct
import subprocess
import time


def python_client_hello(server_name: str | None, alpn: list[str] | None = None) -> bytes:
    """The first flight of Python's ssl client (one record, as OpenSSL writes it)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if alpn:
        context.set_alpn_protocols(alpn)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=server_name)
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


def openssl_client_hello(server_name: str, alpn: str, timeout: float = 10.0) -> bytes:
    """What ``openssl s_client`` sends first, read by a loopback listener."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        listener.settimeout(timeout)
        proc = subprocess.Popen(
            [
                "openssl",
                "s_client",
                "-connect",
                f"127.0.0.1:{port}",
                "-servername",
                server_name,
                "-alpn",
                alpn,
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            conn, _ = listener.accept()
            with conn:
                conn.settimeout(timeout)
                data = b""
                deadline = time.monotonic() + timeout
                while time.monotonic() < deadline:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                    if len(data) >= 5 and len(data) >= 5 + struct.unpack("!H", data[3:5])[0]:
                        break
                return data
        finally:
            proc.kill()
            proc.wait(timeout)


def extension(ext_type: int, body: bytes) -> bytes:
    return struct.pack("!HH", ext_type, len(body)) + body


def sni_ext(name: bytes) -> bytes:
    entry = b"\x00" + struct.pack("!H", len(name)) + name
    return extension(0, struct.pack("!H", len(entry)) + entry)


def alpn_ext(protocols: list[bytes]) -> bytes:
    names = b"".join(bytes([len(p)]) + p for p in protocols)
    return extension(16, struct.pack("!H", len(names)) + names)


def versions_ext(versions: list[int]) -> bytes:
    body = b"".join(struct.pack("!H", v) for v in versions)
    return extension(43, bytes([len(body)]) + body)


def key_share_ext(group: int, key_length: int) -> bytes:
    """A key_share with one entry of ``key_length`` bytes: X25519MLKEM768 (0x11ec) has 1216,
    which is what makes post-quantum hellos about 2 KiB."""
    entry = struct.pack("!HH", group, key_length) + os.urandom(key_length)
    return extension(51, struct.pack("!H", len(entry)) + entry)


def handshake(extensions: bytes, *, legacy_version: int = 0x0303, suites: int = 16) -> bytes:
    """A ClientHello handshake message (type, 3-byte length, body)."""
    body = (
        struct.pack("!H", legacy_version)
        + os.urandom(32)
        + b"\x20"
        + os.urandom(32)
        + struct.pack("!H", 2 * suites)
        + b"".join(struct.pack("!H", 0x1301 + i) for i in range(suites))
        + b"\x01\x00"
        + struct.pack("!H", len(extensions))
        + extensions
    )
    return b"\x01" + len(body).to_bytes(3, "big") + body


def records(message: bytes, sizes: list[int] | None = None, version: int = 0x0301) -> bytes:
    """Carry a handshake message in handshake records of the given sizes (the last record
    takes the rest; sizes are capped at 16384)."""
    out = b""
    pos = 0
    for size in sizes or []:
        if pos >= len(message):
            break
        chunk = message[pos : pos + max(1, min(size, 16384))]
        out += struct.pack("!BHH", 22, version, len(chunk)) + chunk
        pos += len(chunk)
    while pos < len(message):
        chunk = message[pos : pos + 16384]
        out += struct.pack("!BHH", 22, version, len(chunk)) + chunk
        pos += len(chunk)
    return out


def post_quantum_hello(server_name: bytes = b"pq.example") -> bytes:
    """A ClientHello shaped like Chrome's with X25519MLKEM768: about 2 KiB of handshake."""
    exts = (
        sni_ext(server_name)
        + alpn_ext([b"h2", b"http/1.1"])
        + versions_ext([0x3A3A, 0x0304, 0x0303])
        + key_share_ext(0x11EC, 1216)
        + extension(21, bytes(520))  # padding (and what else Chrome sends)
    )
    return handshake(exts)

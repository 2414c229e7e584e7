"""Read the server name, ALPN list and versions from a TLS ClientHello, sans-io.

:func:`parse_client_hello` looks at the first bytes a client sent (as many as
have arrived so far) and answers one of three things:

- :class:`ClientHello`: the hello is complete and well formed;
- :class:`NeedMore`: everything so far is a valid start of a ClientHello,
  call again once at least ``at_least`` bytes are there;
- :class:`NotTLS`: these bytes are not (or not a usable) TLS ClientHello.

It reassembles a hello that spans several TLS records (post-quantum hellos of
about 2 KiB often do) and does not care how the bytes were split by TCP. It
never raises on any input and never reads past the records that carry the
hello, so whatever follows (early data, the next records) is left alone.
The caller decides how many bytes it is willing to wait for: compare
``NeedMore.at_least`` with its own bound (a peek of 16 KiB, say).

Formats: RFC 8446 §5.1 (records), §4.1.2 (ClientHello), RFC 6066 §3
(server_name), RFC 7301 (ALPN), RFC 8446 §4.2.1 (supported_versions).
"""

from __future__ import annotations

from dataclasses import dataclass

RECORD_HEADER = 5
"""Bytes of a TLS record header: content type, version, length."""
MAX_RECORD = 1 << 14
"""The largest plaintext record a peer may send (RFC 8446 §5.1)."""
HANDSHAKE = 22
CLIENT_HELLO = 1
EXT_SERVER_NAME = 0
EXT_ALPN = 16
EXT_SUPPORTED_VERSIONS = 43


@dataclass(frozen=True)
class ClientHello:
    """What a complete ClientHello says about the connection the client wants."""

    sni: str | None
    """The host_name of the server_name extension, as sent; ``None`` if absent."""
    alpn: tuple[str, ...]
    """Protocols offered by ALPN in the client's order (``h2``, ``http/1.1``); empty if none.
    Decoded as Latin-1, so every byte string maps to exactly one ``str``."""
    versions: tuple[int, ...]
    """The supported_versions list in the client's order (``0x0304`` = TLS 1.3), GREASE
    values included; ``(legacy_version,)`` when the extension is absent."""
    legacy_version: int
    """The ClientHello's ``legacy_version`` field (``0x0303`` for TLS 1.2 and 1.3)."""
    record_version: int
    """The version field of the first record header (often ``0x0301``)."""
    cipher_suites: tuple[int, ...]
    extensions: tuple[int, ...]
    """Extension types in the order sent."""
    length: int
    """Bytes of the stream up to the end of the record that holds the hello's last byte."""

    @property
    def max_version(self) -> int:
        """The highest real version offered (GREASE values ``0x?a?a`` are skipped)."""
        real = [v for v in self.versions if not _is_grease(v)]
        return max(real, default=self.legacy_version)


@dataclass(frozen=True)
class NeedMore:
    """A valid beginning: call again with at least ``at_least`` bytes in total."""

    at_least: int
    """A lower bound on the total bytes needed before the answer can change. Once a
    handshake length is known, it covers the whole hello (plus the record header
    of every further record it will need, at least one)."""


@dataclass(frozen=True)
class NotTLS:
    """Not a TLS ClientHello, or one this parser refuses (malformed). ``reason`` says why."""

    reason: str


ParseResult = ClientHello | NeedMore | NotTLS


def _is_grease(value: int) -> bool:
    return value & 0x0F0F == 0x0A0A and value >> 8 == value & 0xFF


class _Malformed(Exception):
    pass


class _Reader:
    """Reads big-endian fields from a bytes body; raises _Malformed past its end."""

    def __init__(self, data: bytes | memoryview) -> None:
        self.data = memoryview(data)
        self.pos = 0

    def remaining(self) -> int:
        return len(self.data) - self.pos

    def take(self, n: int, what: str) -> memoryview:
        if n > self.remaining():
            raise _Malformed(f"{what} runs past its end")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def uint(self, size: int, what: str) -> int:
        return int.from_bytes(self.take(size, what), "big")

    def rest(self) -> bytes:
        return bytes(self.data[self.pos :])

    def vector(self, size: int, what: str) -> _Reader:
        """A length-prefixed vector (``size`` bytes of length) as its own reader."""
        return _Reader(self.take(self.uint(size, what), what))


def parse_client_hello(data: bytes | bytearray | memoryview) -> ParseResult:
    """Parse the start of a client's stream as a TLS ClientHello. Never raises."""
    data = bytes(data)
    if not data:
        return NeedMore(RECORD_HEADER)
    if data[0] != HANDSHAKE:
        if data[0] & 0x80:
            return NotTLS("SSLv2-style record (or not TLS)")
        return NotTLS(f"first byte 0x{data[0]:02x} is not a TLS handshake record")
    handshake = bytearray()
    pos = 0
    record_version = -1
    hello_length = -1  # of the handshake body, once its 4-byte header is in
    while True:
        header = data[pos : pos + RECORD_HEADER]
        if len(header) >= 2 and header[1] != 3:
            return NotTLS(f"record version major {header[1]} is not 3")
        if len(header) >= 1 and header[0] != HANDSHAKE:
            return NotTLS(f"record of content type {header[0]} inside the ClientHello")
        if len(header) < RECORD_HEADER:
            return NeedMore(_need(pos, handshake, hello_length))
        version = int.from_bytes(header[1:3], "big")
        if record_version < 0:
            record_version = version
        length = int.from_bytes(header[3:5], "big")
        if length == 0:
            return NotTLS("empty handshake record")
        if length > MAX_RECORD:
            return NotTLS(f"record of {length} bytes exceeds 16384")
        body = data[pos + RECORD_HEADER : pos + RECORD_HEADER + length]
        handshake += body
        if hello_length < 0 and len(handshake) >= 1 and handshake[0] != CLIENT_HELLO:
            return NotTLS(f"handshake message type {handshake[0]} is not a ClientHello")
        if hello_length < 0 and len(handshake) >= 4:
            hello_length = int.from_bytes(handshake[1:4], "big")
        if len(body) < length:
            end = pos + RECORD_HEADER + length
            if hello_length >= 0 and len(handshake) - len(body) + length < 4 + hello_length:
                # This record cannot finish the hello: another header at least.
                missing = 4 + hello_length - (len(handshake) - len(body) + length)
                end += RECORD_HEADER + missing
            return NeedMore(end)
        pos += RECORD_HEADER + length
        if hello_length >= 0 and len(handshake) >= 4 + hello_length:
            if len(handshake) > 4 + hello_length:
                # Another handshake message shares the record: only legal after the hello
                # if it is itself complete and well formed, which no client does before
                # the server answers.
                return NotTLS("extra handshake data after the ClientHello")
            try:
                return _parse_body(bytes(handshake[4:]), record_version, pos)
            except _Malformed as error:
                return NotTLS(f"malformed ClientHello: {error}")


def _need(pos: int, handshake: bytearray, hello_length: int) -> int:
    """Bytes needed when the data stops inside a record header at ``pos``."""
    if hello_length < 0:
        return pos + RECORD_HEADER + 1
    missing = max(1, 4 + hello_length - len(handshake))
    return pos + RECORD_HEADER + missing


def _parse_body(body: bytes, record_version: int, length: int) -> ClientHello:
    r = _Reader(body)
    legacy_version = r.uint(2, "legacy_version")
    if legacy_version >> 8 != 3:
        raise _Malformed(f"legacy_version 0x{legacy_version:04x}")
    r.take(32, "random")
    session_id = r.vector(1, "legacy_session_id")
    if session_id.remaining() > 32:
        raise _Malformed("session id longer than 32 bytes")
    suites_reader = r.vector(2, "cipher_suites")
    if suites_reader.remaining() < 2 or suites_reader.remaining() % 2:
        raise _Malformed("cipher_suites length")
    suites = tuple(
        suites_reader.uint(2, "cipher suite") for _ in range(suites_reader.remaining() // 2)
    )
    compression = r.vector(1, "legacy_compression_methods")
    if compression.remaining() < 1:
        raise _Malformed("no compression method")
    sni: str | None = None
    alpn: tuple[str, ...] = ()
    versions: tuple[int, ...] = (legacy_version,)
    types: list[int] = []
    if r.remaining():
        extensions = r.vector(2, "extensions")
        if r.remaining():
            raise _Malformed("bytes after the extensions")
        while extensions.remaining():
            ext_type = extensions.uint(2, "extension type")
            ext = extensions.vector(2, f"extension {ext_type}")
            if ext_type in types:
                raise _Malformed(f"extension {ext_type} twice")
            types.append(ext_type)
            if ext_type == EXT_SERVER_NAME:
                sni = _server_name(ext)
            elif ext_type == EXT_ALPN:
                alpn = _alpn(ext)
            elif ext_type == EXT_SUPPORTED_VERSIONS:
                versions = _versions(ext)
    return ClientHello(
        sni=sni,
        alpn=alpn,
        versions=versions,
        legacy_version=legacy_version,
        record_version=record_version,
        cipher_suites=suites,
        extensions=tuple(types),
        length=length,
    )


def _server_name(ext: _Reader) -> str | None:
    names = ext.vector(2, "server_name_list")
    if ext.remaining():
        raise _Malformed("bytes after server_name_list")
    host: str | None = None
    while names.remaining():
        name_type = names.uint(1, "name_type")
        name = names.vector(2, "server name").rest()
        if name_type == 0:
            if host is not None:
                raise _Malformed("two host_name entries")
            if not name:
                raise _Malformed("empty host_name")
            host = name.decode("latin-1")
    return host


def _alpn(ext: _Reader) -> tuple[str, ...]:
    protocols = ext.vector(2, "protocol_name_list")
    if ext.remaining():
        raise _Malformed("bytes after protocol_name_list")
    out = []
    while protocols.remaining():
        name = protocols.vector(1, "protocol name").rest()
        if not name:
            raise _Malformed("empty ALPN protocol name")
        out.append(name.decode("latin-1"))
    if not out:
        raise _Malformed("empty ALPN list")
    return tuple(out)


def _versions(ext: _Reader) -> tuple[int, ...]:
    listed = ext.vector(1, "supported_versions")
    if ext.remaining():
        raise _Malformed("bytes after supported_versions")
    if listed.remaining() < 2 or listed.remaining() % 2:
        raise _Malformed("supported_versions length")
    return tuple(listed.uint(2, "version") for _ in range(listed.remaining() // 2))

"""An HTTP/1.1 interceptor base: hooks on parsed requests and responses.

Subclass :class:`HttpInterceptor` and override :meth:`~HttpInterceptor.request`
and/or :meth:`~HttpInterceptor.response`. Each gets a whole message (start
line, headers as ordered raw ``(name, value)`` byte pairs, body) and may
change it in place. What is forwarded:

- a message the hook did not change: its **original bytes**, byte-identical
  (header case, spacing, chunk sizes, trailers and all);
- a changed message: the new start line and headers, and the body framed
  correctly: ``Content-Length`` set to the new length, or, if the message is
  chunked, the new body as one chunk (original trailers kept);
- a message whose body exceeds ``max_body`` (option ``max-body``, default
  1 MiB), a request with ``Expect: 100-continue``, or a message for which
  :meth:`~HttpInterceptor.wants_body` says no (by default: server-sent
  events): streamed through untouched as it arrives, without a hook call.

Keep-alive and pipelining work: requests are answered in order, and each
response is paired with its request (``response(req, resp)``), so a response
to ``HEAD``, a ``1xx``, ``204`` or ``304`` is known to have no body. Bodies
are framed as RFC 9112 §6 says (``Content-Length``, ``chunked``, or until the
server closes). ``CONNECT`` and ``Upgrade`` (WebSocket, h2c) are handed over:
the request (and its response) go through and the rest of the flow is
passthrough. Anything that is not HTTP/1.x as this parser reads it (another
protocol, a malformed head, a response nobody asked for) makes the flow
passthrough from that point, with a log line: the bytes held so far are
forwarded as they came, so nothing is lost and nothing hangs.

Why not h11 for the framing: h11 keeps header case but re-serialises what it
parses (re-chunking bodies), and a proxy must forward unchanged messages as
their original bytes; so this module frames messages itself, sans-io, and
only the hooks see parsed messages.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

from tproxy import options as _options
from tproxy.flow import FlowInfo
from tproxy.interceptor import Interceptor

log = logging.getLogger("tproxy.http")

MAX_HEAD = 64 * 1024
"""The largest request or response head (start line and headers) read as HTTP."""

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_REQUEST_LINE = re.compile(rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+) ([^ \x00-\x1f\x7f]+) (HTTP/1\.[01])")
_STATUS_LINE = re.compile(rb"(HTTP/1\.[01]) ([0-9]{3})(?: ([^\r\n]*))?")
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,16})[ \t]*(?:;[^\r\n]*)?")


class HttpError(Exception):
    """The bytes are not HTTP/1.x as this parser reads it."""


Headers = list[tuple[bytes, bytes]]


@dataclass(eq=False, kw_only=True)
class Message:
    """What requests and responses share: version, headers, body."""

    version: str = "HTTP/1.1"
    headers: Headers = field(default_factory=list)
    """Ordered ``(name, value)`` pairs as sent (name case kept, value without the
    surrounding spaces)."""
    body: bytes = b""
    """The whole body, de-chunked."""

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (case-insensitive), Latin-1 decoded."""
        key = name.lower().encode("latin-1")
        for k, v in self.headers:
            if k.lower() == key:
                return v.decode("latin-1")
        return None

    def header_values(self, name: str) -> list[str]:
        """Every value of header ``name`` in order, comma-separated lists split."""
        key = name.lower().encode("latin-1")
        return [
            part.strip().decode("latin-1")
            for k, v in self.headers
            if k.lower() == key
            for part in v.split(b",")
            if part.strip()
        ]

    def set_header(self, name: str, value: str | bytes) -> None:
        """Set header ``name``: the first one keeps its place and spelling, others go."""
        key = name.lower().encode("latin-1")
        raw = value.encode("latin-1") if isinstance(value, str) else value
        out: Headers = []
        done = False
        for k, v in self.headers:
            if k.lower() == key:
                if not done:
                    out.append((k, raw))
                    done = True
            else:
                out.append((k, v))
        if not done:
            out.append((name.encode("latin-1"), raw))
        self.headers[:] = out

    def remove_header(self, name: str) -> None:
        """Remove every header ``name``."""
        key = name.lower().encode("latin-1")
        self.headers[:] = [(k, v) for k, v in self.headers if k.lower() != key]

    def _start_line(self) -> bytes:
        raise NotImplementedError

    def _snapshot(self) -> tuple[Any, ...]:
        return (self._start_line(), tuple(self.headers), self.body)


@dataclass(eq=False, kw_only=True)
class Request(Message):
    """An HTTP request as the client sent it."""

    method: str
    target: str

    def _start_line(self) -> bytes:
        return f"{self.method} {self.target} {self.version}".encode("latin-1")


@dataclass(eq=False, kw_only=True)
class Response(Message):
    """An HTTP response as the server sent it."""

    status: int
    reason: str = ""

    def _start_line(self) -> bytes:
        return f"{self.version} {self.status} {self.reason}".encode("latin-1")


# -- framing ---------------------------------------------------------------------

_HEAD, _BODY_LENGTH, _CHUNK_SIZE_LINE, _CHUNK_DATA, _CHUNK_END, _TRAILERS, _UNTIL_CLOSE = range(7)


@dataclass
class _Head:
    message: Request | Response
    length: int
    """Bytes of the head (start line to the blank line)."""
    chunked: bool
    content_length: int | None
    until_close: bool
    no_body: bool
    tunnel: bool
    """After this message the connection is no longer HTTP (CONNECT, Upgrade, 101)."""


class _Reader:
    """Frames one direction's messages in a growing buffer, without re-reading."""

    def __init__(self, side: str) -> None:
        self.side = side
        self.buffer = bytearray()
        self.streaming = False
        """The current message's bytes go out as they come (no hook)."""
        self._reset()

    def _reset(self) -> None:
        self.state = _HEAD
        self.pos = 0  # parsed up to here, within buffer
        self.head: _Head | None = None
        self.body = bytearray()
        self.remaining = 0
        self.trailers_at = 0
        self.streaming = False

    @property
    def idle(self) -> bool:
        """No part of a message is buffered or under way."""
        return self.state == _HEAD and not self.buffer

    def start_body(self, head: _Head) -> None:
        self.head = head
        self.pos = head.length
        if head.no_body:
            self.state = -1
        elif head.chunked:
            self.state = _CHUNK_SIZE_LINE
        elif head.content_length is not None:
            self.state, self.remaining = _BODY_LENGTH, head.content_length
        elif head.until_close:
            self.state = _UNTIL_CLOSE
        else:
            self.state = -1

    def advance(self) -> bool:
        """Parse the body as far as the buffer goes; True once the message is complete."""
        buf = self.buffer
        keep = not self.streaming
        while True:
            if self.state == -1:
                return True
            if self.state == _BODY_LENGTH:
                take = min(self.remaining, len(buf) - self.pos)
                if keep:
                    self.body += buf[self.pos : self.pos + take]
                self.pos += take
                self.remaining -= take
                if self.remaining:
                    return False
                self.state = -1
            elif self.state == _UNTIL_CLOSE:
                if keep:
                    self.body += buf[self.pos :]
                self.pos = len(buf)
                return False
            elif self.state == _CHUNK_SIZE_LINE:
                end = buf.find(b"\r\n", self.pos)
                if end < 0:
                    if len(buf) - self.pos > 4096:
                        raise HttpError("chunk size line too long")
                    return False
                match = _CHUNK_SIZE.fullmatch(buf, self.pos, end)
                if match is None:
                    raise HttpError("bad chunk size line")
                size = int(match.group(1), 16)
                self.pos = end + 2
                if size == 0:
                    self.state = _TRAILERS
                    self.trailers_at = self.pos
                else:
                    self.state, self.remaining = _CHUNK_DATA, size
            elif self.state == _CHUNK_DATA:
                take = min(self.remaining, len(buf) - self.pos)
                if keep:
                    self.body += buf[self.pos : self.pos + take]
                self.pos += take
                self.remaining -= take
                if self.remaining:
                    return False
                self.state = _CHUNK_END
            elif self.state == _CHUNK_END:
                if len(buf) - self.pos < 2:
                    return False
                if buf[self.pos : self.pos + 2] != b"\r\n":
                    raise HttpError("chunk data not followed by CRLF")
                self.pos += 2
                self.state = _CHUNK_SIZE_LINE
            elif self.state == _TRAILERS:
                end = buf.find(b"\r\n", self.pos)
                if end < 0:
                    if len(buf) - self.trailers_at > MAX_HEAD:
                        raise HttpError("trailers too long")
                    return False
                line_empty = end == self.pos
                self.pos = end + 2
                if line_empty:
                    self.state = -1

    def take(self, n: int) -> bytes:
        """Remove and return the first ``n`` buffered bytes (positions shift)."""
        raw = bytes(self.buffer[:n])
        del self.buffer[:n]
        self.pos -= n
        self.trailers_at -= n
        return raw

    def finish(self) -> bytes:
        """The message is complete: remove its bytes, get ready for the next one."""
        raw = bytes(self.buffer[: self.pos])
        del self.buffer[: self.pos]
        self._reset()
        return raw


_FRAMING = {b"transfer-encoding", b"content-length", b"connection", b"upgrade"}


def _parse_head(raw: bytes, side: str, request: Request | None) -> _Head:
    """Parse a head (without its final blank line) and decide how its body is framed."""
    lines = raw.split(b"\r\n")
    start = lines[0]
    headers: Headers = []
    framing: dict[bytes, list[bytes]] = {}
    token = _TOKEN.fullmatch
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not token(name):
            raise HttpError(f"bad header line {line[:40]!r}")
        value = value.strip(b" \t")
        headers.append((name, value))
        low = name.lower()
        if low in _FRAMING:
            framing.setdefault(low, []).extend(
                v.strip().lower() for v in value.split(b",") if v.strip()
            )
    message: Request | Response
    if side == "client":
        match = _REQUEST_LINE.fullmatch(start)
        if match is None:
            raise HttpError(f"bad request line {start[:60]!r}")
        method, target, version = match.groups()
        message = Request(
            method=method.decode("latin-1"),
            target=target.decode("latin-1"),
            version=version.decode("latin-1"),
            headers=headers,
        )
    else:
        match = _STATUS_LINE.fullmatch(start)
        if match is None:
            raise HttpError(f"bad status line {start[:60]!r}")
        message = Response(
            version=match.group(1).decode("latin-1"),
            status=int(match.group(2)),
            reason=(match.group(3) or b"").decode("latin-1"),
            headers=headers,
        )
    encodings = framing.get(b"transfer-encoding", [])
    lengths = set(framing.get(b"content-length", []))
    chunked = bool(encodings) and encodings[-1] == b"chunked"
    content_length = None
    if encodings and lengths:
        raise HttpError("both Transfer-Encoding and Content-Length")
    if lengths:
        if len(lengths) > 1 or not all(v.isdigit() for v in lengths):
            raise HttpError(f"bad Content-Length {sorted(lengths)}")
        content_length = int(lengths.pop())
    upgrade = b"upgrade" in framing.get(b"connection", [])
    if isinstance(message, Request):
        if encodings and not chunked:
            raise HttpError("request body with a Transfer-Encoding other than chunked")
        tunnel = message.method == "CONNECT" or (upgrade and b"upgrade" in framing)
        return _Head(message, len(raw) + 4, chunked, content_length, False, False, tunnel)
    status = message.status
    assert request is not None
    no_body = request.method == "HEAD" or status < 200 or status in (204, 304)
    tunnel = status == 101 or (request.method == "CONNECT" and 200 <= status < 300)
    until_close = not no_body and not tunnel and content_length is None and not chunked
    return _Head(
        message, len(raw) + 4, chunked, content_length, until_close, no_body or tunnel, tunnel
    )


def _serialize_head(message: Message) -> bytes:
    lines = [message._start_line()]
    lines += [name + b": " + value for name, value in message.headers]
    return b"\r\n".join(lines) + b"\r\n\r\n"


# -- the interceptor ---------------------------------------------------------------


class HttpInterceptor(Interceptor):
    """Calls :meth:`request` and :meth:`response` on parsed HTTP/1.1 messages.

    Option ``max-body`` (a size: ``1m``, ``64k``; default 1 MiB): larger
    bodies stream through untouched. Subclasses add options with the class
    attribute ``option_schema`` (keys and parsers as for
    :func:`tproxy.options.parse`); ``self.options`` holds them all.
    """

    max_body: ClassVar[int] = 1 << 20
    option_schema: ClassVar[dict[str, Any]] = {}

    @classmethod
    def parse_options(cls, options: Any) -> Any:
        return _options.parse(
            cls.__name__,
            options,
            max_body=(_options.parse_size, cls.max_body),
            **cls.option_schema,
        )

    def __init__(self, flow: FlowInfo, options: Any = None) -> None:
        super().__init__(flow, options)
        self._limit = getattr(options, "max_body", None) or type(self).max_body
        self._client = _Reader("client")
        self._server = _Reader("server")
        self._pending: list[Request] = []
        """Requests whose responses have not all arrived, oldest first."""

    # -- hooks ----------------------------------------------------------------

    def request(self, req: Request) -> Request | None:
        """A whole request from the client: change it in place, or return a new one."""
        return None

    def response(self, req: Request, resp: Response) -> Response | None:
        """A whole final response to ``req``: change it in place, or return a new one.
        ``req`` is the request as forwarded; its body is ``b""`` if it was streamed."""
        return None

    def wants_body(self, message: Request | Response) -> bool:
        """Whether to hold this message until its body is complete and call its hook.
        ``False`` streams it through untouched. Default: not for server-sent events."""
        content_type = (message.header("content-type") or "").lower()
        return not content_type.startswith("text/event-stream")

    # -- Interceptor ------------------------------------------------------------------

    def client_data(self, data: bytes) -> bytes:
        return self._feed(self._client, data)

    def server_data(self, data: bytes) -> bytes:
        return self._feed(self._server, data)

    def client_eof(self) -> bytes:
        return b"".join(self._at_eof(self._client))

    def server_eof(self) -> bytes:
        return b"".join(self._at_eof(self._server))

    # -- internals ----------------------------------------------------------------------

    def _feed(self, reader: _Reader, data: bytes) -> bytes:
        reader.buffer += data
        out: list[bytes] = []
        try:
            self._run(reader, out)
        except HttpError as exc:
            return self._give_up(reader, out, str(exc))
        if self.is_passthrough and reader.buffer:  # a hook asked for passthrough
            self._hand_over(reader)
            out.append(bytes(reader.buffer))
            reader.buffer.clear()
        return b"".join(out)

    def _run(self, reader: _Reader, out: list[bytes]) -> None:
        while not self.is_passthrough:
            if reader.state == _HEAD:
                if reader.side == "client":
                    # Empty lines before a request are allowed (RFC 9112 §2.2): forward them.
                    while reader.buffer[:2] == b"\r\n":
                        del reader.buffer[:2]
                        out.append(b"\r\n")
                if not reader.buffer:
                    return
                head = self._read_head(reader)
                if head is None:
                    return
                reader.start_body(head)
                if not self._wants_whole(reader, head):
                    reader.streaming = True
                    self._note_streamed(reader, head)
            complete = reader.advance()
            if not reader.streaming and len(reader.body) > self._limit:
                # Too big to hold: what is buffered goes out, the rest streams.
                reader.streaming = True
                reader.body.clear()
                assert reader.head is not None
                self._note_streamed(reader, reader.head)
            if reader.streaming:
                if not complete:
                    out.append(reader.take(reader.pos))
                    return
                out.append(reader.finish())
                self._after(reader, None)
                continue
            if not complete:
                return
            self._complete(reader, out)

    def _read_head(self, reader: _Reader) -> _Head | None:
        buf = reader.buffer
        self._check_start(reader)
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            if len(buf) > MAX_HEAD:
                raise HttpError(f"head longer than {MAX_HEAD} bytes")
            return None
        request = None
        if reader.side == "server":
            if not self._pending:
                raise HttpError("a response nobody asked for")
            request = self._pending[0]
        return _parse_head(bytes(buf[:end]), reader.side, request)

    def _check_start(self, reader: _Reader) -> None:
        """Fail early, before a whole head arrives, on what cannot start HTTP/1.x."""
        buf = reader.buffer
        first = bytes(buf[:16])
        if reader.side == "client":
            space = first.find(b" ")
            token = first if space < 0 else first[:space]
            if (token and not _TOKEN.fullmatch(token)) or space == 0:
                raise HttpError(f"not an HTTP request: {first!r}")
            line_end = buf.find(b"\r\n", 0, 8192 + 2)
            if line_end >= 0 and _REQUEST_LINE.fullmatch(buf, 0, line_end) is None:
                raise HttpError(f"bad request line {bytes(buf[: min(line_end, 60)])!r}")
            if line_end < 0 and len(buf) > 8192:
                raise HttpError("request line longer than 8192 bytes")
        else:
            n = min(len(first), 5)
            if first[:n] != b"HTTP/"[:n]:
                raise HttpError(f"not an HTTP response: {first!r}")

    def _wants_whole(self, reader: _Reader, head: _Head) -> bool:
        message = head.message
        if head.tunnel:
            return True  # forwarded whole (it has no body), then passthrough
        if head.content_length is not None and head.content_length > self._limit:
            return False
        if isinstance(message, Request) and "100-continue" in [
            v.lower() for v in message.header_values("expect")
        ]:
            return False  # the client waits for the 100 before it sends the body
        return self.wants_body(message)

    def _note_streamed(self, reader: _Reader, head: _Head) -> None:
        if reader.side == "client":
            assert isinstance(head.message, Request)
            self._pending.append(head.message)  # paired with its response, body b""

    def _complete(self, reader: _Reader, out: list[bytes]) -> None:
        head = reader.head
        assert head is not None
        message = head.message
        message.body = bytes(reader.body)
        trailers_at = reader.trailers_at
        raw = reader.finish()
        if isinstance(message, Response) and message.status < 200 and message.status != 101:
            out.append(raw)  # an interim response: the final one follows
            return
        before = message._snapshot()
        if isinstance(message, Request):
            message = self.request(message) or message
        else:
            message = self.response(self._pending[0], message) or message
        if message._snapshot() == before:
            out.append(raw)
        else:
            out.append(self._encode(message, head, raw, trailers_at, before[2]))
        if isinstance(message, Request):
            self._pending.append(message)
        self._after(reader, head)

    def _after(self, reader: _Reader, head: _Head | None) -> None:
        """A message went out: pair responses with requests, hand tunnels over."""
        if reader.side == "server" and self._pending:
            self._pending.pop(0)
        if head is not None and head.tunnel:
            self._hand_over(reader)

    def _hand_over(self, reader: _Reader) -> None:
        """CONNECT or Upgrade: the rest is not HTTP; forward what is held, stop looking."""
        self.passthrough()
        other = self._server if reader is self._client else self._client
        held = bytes(other.buffer)
        other.buffer.clear()
        if held:
            if other.side == "client":
                self.inject_to_server(held)
            else:
                self.inject_to_client(held)

    def _encode(
        self, message: Message, head: _Head, raw: bytes, trailers_at: int, old_body: bytes
    ) -> bytes:
        """A changed message: new head; the original body bytes if the body is the same,
        else the new body framed as the new headers say (re-chunked or a new length)."""
        if message.body == old_body:
            return _serialize_head(message) + raw[head.length :]
        if head.no_body:
            return _serialize_head(message)
        te = [e.lower() for e in message.header_values("transfer-encoding")]
        if te and te[-1] == "chunked":
            trailers = raw[trailers_at:] if head.chunked and trailers_at else b"\r\n"
            body = message.body
            chunk = (f"{len(body):x}\r\n".encode() + body + b"\r\n") if body else b""
            return _serialize_head(message) + chunk + b"0\r\n" + trailers
        message.set_header("Content-Length", str(len(message.body)))
        return _serialize_head(message) + message.body

    def _at_eof(self, reader: _Reader) -> list[bytes]:
        out: list[bytes] = []
        if self.is_passthrough or reader.idle:
            return [bytes(reader.buffer)] if reader.buffer else []
        if reader.state == _UNTIL_CLOSE and not reader.streaming:
            reader.state = -1
            self._complete(reader, out)
            return out
        if reader.state == _UNTIL_CLOSE:
            out.append(reader.finish())
            return out
        # The stream ended inside a message: forward what came, as it came.
        out.append(bytes(reader.buffer))
        reader.buffer.clear()
        return out

    def _give_up(self, reader: _Reader, out: list[bytes], why: str) -> bytes:
        log.warning(
            "flow %d: %s: not HTTP/1.1 as expected from the %s (%s); passing the rest through",
            self.flow.id,
            type(self).__name__,
            reader.side,
            why,
        )
        out.append(bytes(reader.buffer))
        reader.buffer.clear()
        self._hand_over(reader)
        return b"".join(out)

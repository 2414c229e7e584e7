"""The request head of an HTTP/1.1 forward proxy, server side, sans-io.

Two kinds of requests reach a forward proxy:

- ``CONNECT host:port HTTP/1.1`` (authority form; an IPv6 host in
  brackets): :class:`ConnectRequest`. Answer :data:`CONNECTION_ESTABLISHED`
  and tunnel; bytes after the head (a pipelined TLS ClientHello) are tunnel
  data, kept in ``leftover``.
- absolute-form requests, ``GET http://host[:port]/path HTTP/1.1`` (what
  ``curl -x`` sends for ``http://`` URLs): :class:`ForwardRequest`, which
  carries the rewritten head to send upstream. Bytes after the head (the
  request body, pipelined) are kept in ``leftover``.

The head rewrite for a forwarded request: origin-form request line
(``GET /path HTTP/1.1``); hop-by-hop headers removed (Connection,
Proxy-Connection, Keep-Alive, Proxy-Authorization, Proxy-Authenticate, TE,
Trailer, Upgrade, and every header named in Connection / Proxy-Connection
except the body-framing Content-Length, Transfer-Encoding and Host); Host
set from the URL (RFC 9112 section 3.2.2: the proxy replaces a received Host
with the target's authority), added if absent; ``Connection: close`` appended.
One request per client connection: the upstream closes after its response,
which ends the flow. Content-Length and Transfer-Encoding are kept, the body
is relayed as is; a request with both, or with conflicting Content-Lengths,
is refused (400) so the upstream can never frame it differently from us.

Errors (:class:`HttpProxyError`, with ``status`` and the full response in
``reply``): malformed head -> 400, a host that cannot name a host (empty
or over-long label, over 253 bytes, not IDNA: :mod:`.hostname`) included;
HTTP version other than 1.0/1.1 -> 505;
head larger than ``max_head_size`` -> 431 (Request Header Fields Too Large:
also used for an over-long request line, so that one status means "too
big"); credentials required and missing or wrong -> 407 with
``Proxy-Authenticate: Basic realm="tproxy"``. The front door answers the
others itself: policy refusal 403 (:func:`forbidden`), connect failure 502
or 504 (:func:`response_for_error`).

Every response built here, except the 200 to CONNECT, has a short
``text/plain`` body, ``Content-Length`` and ``Connection: close``: after an
error the proxy closes the connection.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from .base import ConnectFailure, ProtocolError, RequestHandshake, classify_error
from .hostname import host_name_problem
from .socks_request import shown_name

Authenticator = Callable[[str, str], bool]
"""``authenticate(user, password) -> bool``, e.g. ``Policy.check_credentials``."""
Headers = tuple[tuple[str, str], ...]
"""Header fields as received, in order: ``(name, value)``, decoded as Latin-1."""

DEFAULT_MAX_HEAD_SIZE = 32 * 1024
"""Largest request head (request line + headers + blank line), in bytes."""

REASONS: dict[int, str] = {
    200: "Connection established",
    400: "Bad Request",
    403: "Forbidden",
    405: "Method Not Allowed",
    407: "Proxy Authentication Required",
    408: "Request Timeout",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
    505: "HTTP Version Not Supported",
}

CONNECTION_ESTABLISHED = b"HTTP/1.1 200 Connection established\r\n\r\n"
"""The answer to a successful CONNECT: no body, no Content-Length, no close."""


def http_response(
    status: int, message: str | None = None, *, headers: Sequence[tuple[str, str]] = ()
) -> bytes:
    """A complete error-style response: status line, headers, short text body.

    The body is ``message`` (default: the reason phrase) and a newline;
    ``Content-Type: text/plain``, ``Content-Length`` and ``Connection:
    close`` are always sent; ``headers`` are added after them.
    """
    reason = REASONS.get(status, "Error")
    body = ((message or reason).replace("\r", " ").replace("\n", " ") + "\n").encode()
    lines = [
        f"HTTP/1.1 {status} {reason}",
        "Content-Type: text/plain; charset=utf-8",
        f"Content-Length: {len(body)}",
        "Connection: close",
        *(f"{name}: {value}" for name, value in headers),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "replace") + body


def bad_request(message: str = "bad request") -> bytes:
    """400."""
    return http_response(400, message)


def forbidden(message: str = "destination not allowed") -> bytes:
    """403: policy refused the client or the destination."""
    return http_response(403, message)


def method_not_allowed(message: str = "method not allowed", allow: str = "CONNECT") -> bytes:
    """405, with an ``Allow`` header (for a front door that restricts methods)."""
    return http_response(405, message, headers=[("Allow", allow)])


def proxy_auth_required(
    realm: str = "tproxy", message: str = "proxy authentication required"
) -> bytes:
    """407 with ``Proxy-Authenticate: Basic realm="..."``."""
    return http_response(407, message, headers=[("Proxy-Authenticate", f'Basic realm="{realm}"')])


def bad_gateway(message: str = "cannot reach the destination") -> bytes:
    """502: the upstream could not be reached (refused, unreachable, DNS)."""
    return http_response(502, message)


def gateway_timeout(message: str = "timed out connecting to the destination") -> bytes:
    """504: connecting to the upstream timed out."""
    return http_response(504, message)


def status_for_error(error: BaseException | int | None) -> int:
    """504 when connecting timed out, else 502 (see ``base.classify_error``)."""
    return 504 if classify_error(error) is ConnectFailure.TIMEOUT else 502


def response_for_error(error: BaseException | int | None, message: str | None = None) -> bytes:
    """The 502/504 response for a failed upstream connect; the body names the cause."""
    failure = classify_error(error)
    status = 504 if failure is ConnectFailure.TIMEOUT else 502
    return http_response(status, message or f"cannot connect to the destination: {failure}")


class HttpProxyError(ProtocolError):
    """The request cannot be served; send :attr:`reply` (an HTTP response) and close."""

    def __init__(self, status: int, reason: str, reply: bytes | None = None) -> None:
        super().__init__(reason, http_response(status, reason) if reply is None else reply)
        self.status = status


@dataclass(frozen=True)
class ConnectRequest:
    """``CONNECT host:port``: open a tunnel. ``host`` has no brackets."""

    host: str
    port: int
    headers: Headers
    version: str = "HTTP/1.1"
    user: str | None = None
    """The Basic user name, when credentials were checked."""

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)


@dataclass(frozen=True)
class ForwardRequest:
    """An absolute-form request to forward to ``host:port``.

    ``target`` is the origin-form target (``/path?query``; ``*`` for
    ``OPTIONS http://host``), ``headers`` the headers as received, ``head``
    the rewritten head to send upstream, verbatim. ``content_length`` and
    ``chunked`` describe the request body that follows (in ``leftover``
    and beyond).
    """

    method: str
    host: str
    port: int
    target: str
    version: str
    headers: Headers
    head: bytes
    user: str | None = None
    content_length: int | None = None
    chunked: bool = False

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)


_TOKEN = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_REQUEST_LINE = re.compile(rf"({_TOKEN}) ([\x21-\x7e]+) HTTP/(\d)\.(\d)")
_HEADER = re.compile(rf"({_TOKEN}):(.*)")
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_DIGITS = re.compile(r"[0-9]{1,18}")
_REG_NAME = re.compile(r"[A-Za-z0-9._~%!$&'()*+,;=-]+")
_ABSOLUTE = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://([^/?#]*)([^#]*)(?:#.*)?")
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "proxy-connection",
        "keep-alive",
        "proxy-authorization",
        "proxy-authenticate",
        "te",
        "trailer",
        "upgrade",
    }
)
_NEVER_DROPPED = frozenset({"content-length", "transfer-encoding", "host"})


def _bad(reason: str) -> HttpProxyError:
    return HttpProxyError(400, reason)


def parse_authority(authority: str, default_port: int | None) -> tuple[str, int]:
    """``host:port`` / ``[v6]:port`` -> ``(host, port)``; ``host`` without brackets.

    Without a port, ``default_port`` is used, or the authority is refused
    when it is ``None`` (CONNECT needs a port). Raises :class:`HttpProxyError`
    (400).
    """
    if authority.startswith("["):
        close = authority.find("]")
        if close < 0:
            raise _bad(f"bad authority {authority!r}")
        host = authority[1:close]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise _bad(f"bad IPv6 address {host!r}") from None
        rest = authority[close + 1 :]
        if rest and not rest.startswith(":"):
            raise _bad(f"bad authority {authority!r}")
        port_text = rest[1:] if rest else None
    else:
        host, colon, port_text_ = authority.rpartition(":")
        if not colon:
            host, port_text_ = authority, ""
        port_text = port_text_ if colon else None
        if not host or not _REG_NAME.fullmatch(host):
            raise _bad(f"bad host in {shown_name(authority)}")
        problem = host_name_problem(host)
        if problem is not None:
            raise _bad(f"bad host: {problem} ({shown_name(host)})")
    if port_text is None or port_text == "":
        if default_port is None:
            raise _bad(f"no port in {authority!r}")
        return host, default_port
    if not _DIGITS.fullmatch(port_text) or len(port_text) > 5 or not 0 < int(port_text) <= 0xFFFF:
        raise _bad(f"bad port in {authority!r}")
    return host, int(port_text)


def _authority(host: str, port: int) -> str:
    shown = f"[{host}]" if ":" in host else host
    return shown if port == 80 else f"{shown}:{port}"


def _basic_credentials(value: str) -> tuple[str, str] | None:
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        raw = base64.b64decode(token.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    user, colon, password = raw.decode("utf-8", "surrogateescape").partition(":")
    if not colon:
        return None
    return user, password


class HttpProxyHandshake(RequestHandshake[ConnectRequest | ForwardRequest]):
    """Reads one request head; returns a :class:`ConnectRequest` or :class:`ForwardRequest`.

    ``receive_data`` returns ``[]`` until the head is complete (the blank
    line; bare LF line ends and leading empty lines are tolerated), then the
    one request event; it raises :class:`HttpProxyError` as described in the
    module docstring. ``authenticate`` (``(user, password) -> bool``) makes
    ``Proxy-Authorization: Basic`` mandatory. Finding the end of the head is
    linear in its size however the bytes are cut, and no more than
    ``max_head_size + 1`` bytes are ever buffered.
    """

    def __init__(
        self,
        *,
        authenticate: Authenticator | None = None,
        max_head_size: int = DEFAULT_MAX_HEAD_SIZE,
        realm: str = "tproxy",
    ) -> None:
        super().__init__()
        self.authenticate = authenticate
        self.max_head_size = max_head_size
        self.realm = realm
        self._buf = bytearray()
        self._line_start = 0
        self._scan = 0
        self._seen_line = False
        """Whether a non-empty line (the request line) was seen."""

    # -- contract -------------------------------------------------------

    def receive_data(self, data: bytes) -> list[object]:
        """Feed client bytes; return ``[request]`` once the head is complete."""
        if self._request is not None:
            self._leftover += data
            return []
        room = self.max_head_size + 1 - len(self._buf)
        self._buf += data[:room]
        rest = data[room:]
        end = self._find_head_end()
        if end is None:
            if len(self._buf) > self.max_head_size:
                raise HttpProxyError(431, f"request head larger than {self.max_head_size} bytes")
            return []
        if end > self.max_head_size:
            raise HttpProxyError(431, f"request head larger than {self.max_head_size} bytes")
        head = bytes(self._buf[:end])
        request = self._parse(head)
        self._request = request
        self._leftover += self._buf[end:]
        self._leftover += rest
        self._buf = bytearray()
        return [request]

    # -- replies ----------------------------------------------------------

    def reply_success(self) -> bytes:
        """CONNECT: ``200 Connection established``. Forwarding: ``b""`` (upstream answers)."""
        return CONNECTION_ESTABLISHED if isinstance(self._request, ConnectRequest) else b""

    def reply_failure(self, cause: BaseException | int | None = None) -> bytes:
        """502, or 504 when connecting timed out."""
        return response_for_error(cause)

    def reply_denied(self, message: str = "destination not allowed") -> bytes:
        """403."""
        return forbidden(message)

    # -- parsing ------------------------------------------------------------

    def _find_head_end(self) -> int | None:
        """Index just past the blank line ending the head, scanning each byte once."""
        buf = self._buf
        while True:
            newline = buf.find(b"\n", self._scan)
            if newline < 0:
                self._scan = len(buf)
                return None
            self._scan = newline + 1
            line_length = newline - self._line_start
            blank = line_length == 0 or (line_length == 1 and buf[self._line_start] == 0x0D)
            self._line_start = newline + 1
            if not blank:
                self._seen_line = True
            elif self._seen_line:
                return newline + 1
            # else: an empty line before the request line, tolerated (RFC 9112 2.2).

    def _parse(self, head: bytes) -> ConnectRequest | ForwardRequest:
        text = head.decode("latin-1")
        lines = [line[:-1] if line.endswith("\r") else line for line in text.split("\n")]
        first = next((i for i, line in enumerate(lines) if line), len(lines))
        lines = lines[first:-2]  # no leading empty lines, nor the blank line and empty tail
        if not lines:
            raise _bad("empty request")
        match = _REQUEST_LINE.fullmatch(lines[0])
        if match is None:
            raise _bad(f"bad request line {lines[0][:100]!r}")
        method, target, major, minor = match.groups()
        if (major, minor) not in (("1", "0"), ("1", "1")):
            raise HttpProxyError(505, f"HTTP/{major}.{minor} not supported")
        version = f"HTTP/{major}.{minor}"
        headers = self._parse_headers(lines[1:])
        # A malformed request is answered 400 even without credentials: the
        # request is checked completely before authentication.
        request: ConnectRequest | ForwardRequest
        if method == "CONNECT":
            if "/" in target or target.startswith("*"):
                raise _bad(f"CONNECT target must be host:port, not {target[:100]!r}")
            host, port = parse_authority(target, None)
            request = ConnectRequest(host=host, port=port, headers=headers, version=version)
        else:
            request = self._forward(method, target, version, headers)
        user = self._check_auth(headers)
        return request if user is None else replace(request, user=user)

    @staticmethod
    def _parse_headers(lines: list[str]) -> Headers:
        headers = []
        for line in lines:
            if line[:1] in (" ", "\t"):
                raise _bad("obsolete header line folding")
            match = _HEADER.fullmatch(line)
            if match is None or _CONTROL.search(match.group(2)):
                raise _bad(f"bad header line {line[:100]!r}")
            headers.append((match.group(1), match.group(2).strip(" \t")))
        return tuple(headers)

    def _check_auth(self, headers: Headers) -> str | None:
        if self.authenticate is None:
            return None
        values = [v for n, v in headers if n.lower() == "proxy-authorization"]
        credentials = _basic_credentials(values[0]) if len(values) == 1 else None
        if credentials is None or not self.authenticate(*credentials):
            reason = "proxy authentication failed" if values else "proxy authentication required"
            raise HttpProxyError(407, reason, proxy_auth_required(self.realm, reason))
        return credentials[0]

    def _forward(self, method: str, target: str, version: str, headers: Headers) -> ForwardRequest:
        match = _ABSOLUTE.fullmatch(target)
        if match is None:
            raise _bad(f"a proxy needs an absolute URL or CONNECT, not {target[:100]!r}")
        scheme, authority, path = match.groups()
        if scheme.lower() != "http":
            raise _bad(f"cannot forward {scheme}:// URLs (use CONNECT)")
        if "@" in authority:
            raise _bad("user information in the URL")
        host, port = parse_authority(authority, 80)
        if not path:
            path = "*" if method == "OPTIONS" else "/"
        elif path.startswith("?"):
            path = "/" + path

        lowered = [(name.lower(), value) for name, value in headers]
        if sum(1 for name, _ in lowered if name == "host") > 1:
            raise _bad("more than one Host header")
        lengths = {value.strip() for name, value in lowered if name == "content-length"}
        content_length = None
        if lengths:
            if len(lengths) > 1 or not all(_DIGITS.fullmatch(v) for v in lengths):
                raise _bad("bad or conflicting Content-Length")
            content_length = int(lengths.pop())
        encodings = [value for name, value in lowered if name == "transfer-encoding"]
        if encodings and content_length is not None:
            raise _bad("both Transfer-Encoding and Content-Length")
        chunked = bool(encodings) and encodings[-1].split(",")[-1].strip().lower() == "chunked"
        if encodings and not chunked:
            raise _bad("Transfer-Encoding without chunked last")

        dropped = set(_HOP_BY_HOP)
        for name, value in lowered:
            if name in ("connection", "proxy-connection"):
                dropped.update(t.strip().lower() for t in value.split(",") if t.strip())
        dropped -= _NEVER_DROPPED

        host_value = _authority(host, port)
        out = [f"{method} {path} {version}"]
        host_written = False
        for (name, value), (low, _) in zip(headers, lowered, strict=True):
            if low in dropped:
                continue
            if low == "host":
                out.append(f"{name}: {host_value}")
                host_written = True
            else:
                out.append(f"{name}: {value}")
        if not host_written:
            out.insert(1, f"Host: {host_value}")
        out.append("Connection: close")
        head = ("\r\n".join(out) + "\r\n\r\n").encode("latin-1")
        return ForwardRequest(
            method=method,
            host=host,
            port=port,
            target=path,
            version=version,
            headers=headers,
            head=head,
            content_length=content_length,
            chunked=chunked,
        )

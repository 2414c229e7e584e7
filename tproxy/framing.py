"""Interceptor bases that cut each direction into frames: lines, length-prefixed messages,
or frames you define. Write the protocol logic; the buffering across reads is done here.

TCP delivers a stream: one ``client_data`` call may hold half a message or
three. A :class:`FramedInterceptor` keeps what arrived, cuts off every
complete frame and calls one hook per frame, in order, and returns what the
hooks returned. A frame the hooks leave alone goes out byte-identical, and
the output never depends on how the stream was split (tested with random
splits). A frame that grows past ``max_frame`` without completing aborts the
flow with a reason that says so, instead of buffering without bound.

- :class:`LineInterceptor`: ``client_line(line)`` / ``server_line(line)``; a
  line includes its terminator (``b"\\n"`` by default, so ``\\r\\n`` comes
  through as sent).
- :class:`LengthPrefixedInterceptor`: frames of a fixed-size header holding
  the payload length (``length_size`` bytes, big-endian by default);
  ``client_payload(payload)`` / ``server_payload(payload)``; a changed
  payload gets a correct length.
- :class:`FramedInterceptor`: override ``client_frame_length(buffer, start)``
  (and/or the server one) to say where a frame ends; ``examples/resp.py``
  frames Redis commands this way.

When the stream ends inside a frame, the partial frame is forwarded as it
came (nothing is lost or invented); override :meth:`FramedInterceptor.client_partial`
to do otherwise. Calling :meth:`~tproxy.Interceptor.passthrough` from a hook
forwards everything still buffered and stops framing.
"""

from __future__ import annotations

from tproxy.interceptor import Interceptor

CLIENT = "client"
SERVER = "server"


class FramedInterceptor(Interceptor):
    """Cuts each direction into frames and calls a hook per complete frame.

    A direction whose ``*_frame_length`` is not overridden is not framed: its
    bytes pass as they come (and cost nothing).
    """

    max_frame: int = 1 << 20
    """The largest frame (bytes) a direction may buffer before the flow is aborted."""

    # -- what a frame is ----------------------------------------------------

    def client_frame_length(self, buffer: bytearray, start: int) -> int | None:
        """The length of the complete frame at ``buffer[start:]``, or ``None`` if it is
        not complete yet. Look, don't modify. Return at least 1."""
        raise NotImplementedError

    def server_frame_length(self, buffer: bytearray, start: int) -> int | None:
        """As :meth:`client_frame_length`, for bytes from the server."""
        raise NotImplementedError

    # -- hooks ----------------------------------------------------------------

    def client_frame(self, frame: bytes) -> bytes:
        """One complete frame from the client; return what to send on (``b""``: drop it)."""
        return frame

    def server_frame(self, frame: bytes) -> bytes:
        """One complete frame from the server; return what to send on."""
        return frame

    def client_partial(self, rest: bytes) -> bytes:
        """The client's stream ended inside a frame: what to do with ``rest``."""
        return rest

    def server_partial(self, rest: bytes) -> bytes:
        """The server's stream ended inside a frame: what to do with ``rest``."""
        return rest

    # -- the Interceptor side -------------------------------------------------

    def client_data(self, data: bytes) -> bytes:
        if type(self).client_frame_length is FramedInterceptor.client_frame_length:
            return data
        return self._feed(CLIENT, data)

    def server_data(self, data: bytes) -> bytes:
        if type(self).server_frame_length is FramedInterceptor.server_frame_length:
            return data
        return self._feed(SERVER, data)

    def client_eof(self) -> bytes:
        rest = self._take_rest(CLIENT)
        return self.client_partial(rest) if rest else b""

    def server_eof(self) -> bytes:
        rest = self._take_rest(SERVER)
        return self.server_partial(rest) if rest else b""

    # -- internals ----------------------------------------------------------------

    def _buffer(self, side: str) -> bytearray:
        name = f"_framing_{side}"
        buffer: bytearray | None = self.__dict__.get(name)
        if buffer is None:
            buffer = bytearray()
            setattr(self, name, buffer)
        return buffer

    def _take_rest(self, side: str) -> bytes:
        buffer = self._buffer(side)
        rest = bytes(buffer)
        buffer.clear()
        return rest

    def _feed(self, side: str, data: bytes) -> bytes:
        buffer = self._buffer(side)
        buffer += data
        if side == CLIENT:
            length_of, hook = self.client_frame_length, self.client_frame
        else:
            length_of, hook = self.server_frame_length, self.server_frame
        out: list[bytes] = []
        start = 0
        while start < len(buffer):
            length = length_of(buffer, start)
            if length is None:
                if len(buffer) - start > self.max_frame:
                    self._too_long(side)
                break
            if length < 1 or length > len(buffer) - start:
                raise ValueError(
                    f"{side}_frame_length returned {length} for "
                    f"{len(buffer) - start} buffered bytes"
                )
            if length > self.max_frame:
                self._too_long(side)
            frame = bytes(buffer[start : start + length])
            start += length
            out.append(hook(frame))
            if self.is_passthrough:
                out.append(bytes(buffer[start:]))
                start = len(buffer)
        del buffer[:start]
        return b"".join(out)

    def _too_long(self, side: str) -> None:
        self.abort(f"{type(self).__name__}: a frame from the {side} exceeds {self.max_frame} bytes")


class LineInterceptor(FramedInterceptor):
    """Calls :meth:`client_line` / :meth:`server_line` for every complete line.

    A line includes its ``delimiter`` (``b"\\n"``: a CRLF line arrives as
    ``b"...\\r\\n"``). The last line of a stream may lack it: it goes to the
    line hook too, at end of stream. A line longer than ``max_line`` aborts
    the flow ("a line from the client exceeds N bytes").
    """

    delimiter: bytes = b"\n"
    max_line: int = 64 * 1024
    """The longest line accepted, delimiter included."""

    @property
    def max_frame(self) -> int:  # type: ignore[override]
        return self.max_line

    def client_line(self, line: bytes) -> bytes:
        """One line from the client; return what to send on (``b""`` drops it)."""
        return line

    def server_line(self, line: bytes) -> bytes:
        """One line from the server; return what to send on."""
        return line

    def client_frame_length(self, buffer: bytearray, start: int) -> int | None:
        return self._line_length(buffer, start)

    def server_frame_length(self, buffer: bytearray, start: int) -> int | None:
        return self._line_length(buffer, start)

    def client_frame(self, frame: bytes) -> bytes:
        return self.client_line(frame)

    def server_frame(self, frame: bytes) -> bytes:
        return self.server_line(frame)

    def client_partial(self, rest: bytes) -> bytes:
        return self.client_line(rest)

    def server_partial(self, rest: bytes) -> bytes:
        return self.server_line(rest)

    def _line_length(self, buffer: bytearray, start: int) -> int | None:
        end = buffer.find(self.delimiter, start, start + self.max_line)
        if end < 0:
            return None
        return end - start + len(self.delimiter)

    def _too_long(self, side: str) -> None:
        self.abort(f"{type(self).__name__}: a line from the {side} exceeds {self.max_line} bytes")


class LengthPrefixedInterceptor(FramedInterceptor):
    """Frames of ``header_size`` bytes holding a ``length_size``-byte payload length at
    ``length_offset``, then the payload. ``client_payload`` / ``server_payload`` see the
    payload; a payload they change is sent with its length field updated, an unchanged
    one as the original bytes.

    Defaults describe a plain 4-byte big-endian length before each payload. Set
    ``length_includes_header`` when the length counts the header too.
    """

    length_size: int = 4
    length_offset: int = 0
    header_size: int = 4
    byteorder: str = "big"
    length_includes_header: bool = False

    def client_payload(self, payload: bytes) -> bytes:
        """The payload of one message from the client; return the payload to send."""
        return payload

    def server_payload(self, payload: bytes) -> bytes:
        """The payload of one message from the server; return the payload to send."""
        return payload

    def client_frame_length(self, buffer: bytearray, start: int) -> int | None:
        return self._message_length(buffer, start)

    def server_frame_length(self, buffer: bytearray, start: int) -> int | None:
        return self._message_length(buffer, start)

    def client_frame(self, frame: bytes) -> bytes:
        return self._rewrite(frame, self.client_payload)

    def server_frame(self, frame: bytes) -> bytes:
        return self._rewrite(frame, self.server_payload)

    def _message_length(self, buffer: bytearray, start: int) -> int | None:
        if len(buffer) - start < self.header_size:
            return None
        field = buffer[start + self.length_offset : start + self.length_offset + self.length_size]
        length = int.from_bytes(field, self.byteorder)  # type: ignore[arg-type]
        total = length if self.length_includes_header else self.header_size + length
        if total < self.header_size:
            self.abort(
                f"{type(self).__name__}: a length field of {length} is shorter "
                f"than the {self.header_size}-byte header"
            )
        if total > self.max_frame:
            self._too_long(CLIENT if buffer is self._buffer(CLIENT) else SERVER)
        if len(buffer) - start < total:
            return None
        return total

    def _rewrite(self, frame: bytes, hook: object) -> bytes:
        header, payload = frame[: self.header_size], frame[self.header_size :]
        new = hook(payload)  # type: ignore[operator]
        if new == payload:
            return frame
        length = len(new) + (self.header_size if self.length_includes_header else 0)
        if length >= 1 << (8 * self.length_size):
            self.abort(
                f"{type(self).__name__}: a rewritten payload of {len(new)} bytes "
                f"does not fit a {self.length_size}-byte length"
            )
        field = length.to_bytes(self.length_size, self.byteorder)  # type: ignore[arg-type]
        start, end = self.length_offset, self.length_offset + self.length_size
        return header[:start] + field + header[end:] + bytes(new)

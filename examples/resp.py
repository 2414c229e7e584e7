"""Put every Redis key under a prefix: ``GET k`` reaches the server as ``GET tenant1:k``.

    tproxy run -i examples/resp.py:KeyPrefix -o prefix=tenant1: --when port=6379

Written on :class:`tproxy.framing.FramedInterceptor`: :meth:`client_frame_length`
says where one RESP command ends (an array of bulk strings, or an inline
command line), and :meth:`client_frame` gets whole commands however TCP cut
them. Replies from the server are not framed and pass untouched.
"""

from __future__ import annotations

from tproxy import options
from tproxy.framing import FramedInterceptor

SINGLE_KEY = {
    b"GET",
    b"SET",
    b"DEL",
    b"INCR",
    b"DECR",
    b"APPEND",
    b"STRLEN",
    b"EXISTS",
    b"EXPIRE",
    b"TTL",
    b"GETSET",
    b"SETNX",
    b"SETEX",
    b"TYPE",
}
"""Commands whose first argument is a key (multi-key forms keep only the first one here)."""


def _line(buffer: bytes | bytearray, start: int) -> tuple[bytes, int] | None:
    end = buffer.find(b"\r\n", start)
    return None if end < 0 else (bytes(buffer[start:end]), end + 2)


class KeyPrefix(FramedInterceptor):
    """Prefix the key of single-key commands with the option ``prefix``."""

    @classmethod
    def parse_options(cls, raw):  # type: ignore[no-untyped-def]
        return options.parse("resp", raw, prefix=options.parse_bytes)

    def client_frame_length(self, buffer: bytearray, start: int) -> int | None:
        if buffer[start : start + 1] != b"*":  # an inline command: one line
            found = _line(buffer, start)
            return None if found is None else found[1] - start
        try:
            parsed = _bulk_strings(buffer, start)
        except ValueError:  # not RESP after all: hand the rest of the flow over untouched
            self.passthrough()
            return len(buffer) - start
        return None if parsed is None else parsed[1] - start

    def client_frame(self, frame: bytes) -> bytes:
        if self.is_passthrough or not frame.startswith(b"*"):
            return frame
        args = _bulk_strings(frame, 0)[0]  # type: ignore[index]
        if len(args) < 2 or args[0].upper() not in SINGLE_KEY:
            return frame
        args[1] = self.options.prefix + args[1]
        return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)


def _bulk_strings(buffer: bytes | bytearray, start: int) -> tuple[list[bytes], int] | None:
    """``*N`` then N ``$len`` bulk strings: the strings and where they end, or None."""
    header = _line(buffer, start)
    if header is None:
        return None
    count_text, pos = header
    args = []
    for _ in range(int(count_text[1:])):
        bulk = _line(buffer, pos)
        if bulk is None:
            return None
        size_text, pos = bulk
        size = int(size_text[1:])
        if pos + size + 2 > len(buffer):
            return None
        args.append(bytes(buffer[pos : pos + size]))
        pos += size + 2
    return args, pos

"""``replace``: replace a byte string or a regex in a stream, across read boundaries.

A stream arrives in reads of arbitrary sizes, so a match can be split between
two reads. Each direction therefore keeps back the shortest tail that could
still be the start of a match and prepends it to the next read; end of stream
(``client_eof``/``server_eof``) flushes it.

- Literal (``old``/``new``): the output is exactly ``stream.replace(old, new)``
  (``count`` limits it like ``bytes.replace``). At most ``len(old) - 1`` bytes
  are held back, and only while they are a prefix of ``old``.
- Regex (``pattern``/``new``): the output is exactly ``re.sub(pattern, new,
  stream)`` provided the regex decides every match within ``max-match`` bytes
  of where it starts (the match plus any look-ahead; look-behind may look back
  up to ``max-match`` bytes too). Python's ``re`` cannot tell whether a
  partial match could still grow, so the last ``max-match - 1`` bytes of a
  direction are held until more data or end of stream arrives: pick a
  ``max-match`` close to the longest real match for request/response protocols.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from tproxy.flow import FlowInfo
from tproxy.interceptor import Interceptor, OptionError
from tproxy.options import (
    CLIENT,
    SERVER,
    compile_regex,
    decode_escapes,
    normalize,
    parse_direction,
    parse_int,
)

NAME = "replace"


@dataclass(frozen=True)
class ReplaceOptions:
    """Checked options of :class:`Replace`: exactly one of ``old`` and ``pattern``."""

    new: bytes
    old: bytes | None = None
    pattern: re.Pattern[bytes] | None = None
    directions: frozenset[str] = frozenset({CLIENT, SERVER})
    count: int | None = None
    """Replacements per direction; ``None``: no limit."""
    max_match: int = 4096


class _LiteralStream:
    """One direction of a literal replacement."""

    def __init__(self, old: bytes, new: bytes, count: int | None) -> None:
        self.old = old
        self.new = new
        self.left = count
        self.held = b""

    @property
    def exhausted(self) -> bool:
        return self.left == 0

    def feed(self, data: bytes, final: bool = False) -> bytes:
        buf = self.held + data if self.held else data
        self.held = b""
        if self.left == 0:
            return buf
        old, pos, out = self.old, 0, []
        while self.left != 0:
            hit = buf.find(old, pos)
            if hit < 0:
                break
            out.append(buf[pos:hit])
            out.append(self.new)
            pos = hit + len(old)
            if self.left is not None:
                self.left -= 1
        if final or self.left == 0:
            cut = len(buf)
        else:
            # Leftmost-first, non-overlapping matching (as bytes.replace): the
            # next match can only start in the longest suffix that is a proper
            # prefix of ``old``; everything before it is final.
            cut = len(buf)
            for size in range(min(len(old) - 1, len(buf) - pos), 0, -1):
                if buf.endswith(old[:size]):
                    cut = len(buf) - size
                    break
        out.append(buf[pos:cut])
        self.held = buf[cut:]
        return b"".join(out)


class _RegexStream:
    """One direction of a regex replacement.

    ``buf`` is look-behind context followed by the bytes not yet released;
    scanning starts at ``start`` (so ``^`` and look-behind see the real stream
    before it, as :meth:`re.Pattern.finditer` with ``pos`` allows).

    Empty matches need no state across reads: a committed match starts at or
    before ``limit`` while the cut is after it, so a new scan never starts
    right where an empty match ended (where ``re`` would refuse a second one).
    """

    def __init__(
        self, pattern: re.Pattern[bytes], new: bytes, count: int | None, max_match: int
    ) -> None:
        self.pattern = pattern
        self.new = new
        self.left = count
        self.max_match = max_match
        self.buf = b""
        self.start = 0

    @property
    def exhausted(self) -> bool:
        return self.left == 0

    @property
    def held(self) -> bytes:
        """Bytes received but not released yet."""
        return self.buf[self.start :]

    def feed(self, data: bytes, final: bool = False) -> bytes:
        buf = self.buf + data
        start = self.start
        if self.left == 0:
            self.buf, self.start = b"", 0
            return buf[start:]
        # a match may be committed only if it starts where the regex has seen
        # max_match bytes of the stream (or the stream is over)
        limit = len(buf) if final else len(buf) - self.max_match
        out, pos = [], start
        for m in self.pattern.finditer(buf, start):
            s, e = m.span()
            if s > limit:
                break
            out.append(buf[pos:s])
            out.append(m.expand(self.new))
            pos = e
            if self.left is not None:
                self.left -= 1
                if self.left == 0:
                    break
        cut = len(buf) if final or self.left == 0 else max(pos, limit + 1)
        out.append(buf[pos:cut])
        # keep max_match bytes before the cut as look-behind / ^ context
        keep_from = max(0, cut - self.max_match)
        self.buf = buf[keep_from:]
        self.start = cut - keep_from
        return b"".join(out)


class Replace(Interceptor):
    """Replace ``old`` by ``new`` (or regex ``pattern`` by ``new``) in chosen directions.

    Options: ``old`` (bytes, backslash escapes ``\\r \\n \\t \\0 \\xHH \\\\``)
    or ``pattern`` (a bytes regex, e.g. ``(?i)server: \\S+``); ``new`` (with
    ``old``: escapes as above; with ``pattern``: a ``re.sub`` template,
    ``\\1`` and ``\\g<name>`` allowed; default empty, i.e. delete);
    ``direction`` ``client`` | ``server`` | ``both`` (default both);
    ``count`` replacements per direction (default no limit; when every
    chosen direction used its count, the rest of the flow is passed through);
    ``max-match`` (regex only, default 4096): the longest match, and the most
    held back.
    """

    options: ReplaceOptions

    @classmethod
    def parse_options(cls, options: Mapping[str, str]) -> ReplaceOptions:
        opts = normalize(
            NAME, options, {"old", "new", "pattern", "direction", "count", "max-match"}
        )
        if ("old" in opts) == ("pattern" in opts):
            raise OptionError(f"{NAME}: give exactly one of old=BYTES or pattern=REGEX")
        directions = (
            parse_direction(NAME, opts["direction"])
            if "direction" in opts
            else frozenset({CLIENT, SERVER})
        )
        count = parse_int(NAME, "count", opts["count"], minimum=1) if "count" in opts else None
        if "old" in opts:
            if "max-match" in opts:
                raise OptionError(f"{NAME}: max-match only applies to pattern=")
            old = decode_escapes(NAME, "old", opts["old"])
            if not old:
                raise OptionError(f"{NAME}: old must not be empty")
            new = decode_escapes(NAME, "new", opts.get("new", ""))
            return ReplaceOptions(new=new, old=old, directions=directions, count=count)
        pattern = compile_regex(NAME, "pattern", opts["pattern"])
        new = opts.get("new", "").encode("utf-8", "surrogateescape")
        try:
            pattern.sub(new, b"")  # checks the template (groups, escapes) now
        except (re.error, IndexError) as exc:
            raise OptionError(f"{NAME}: new is not a valid template for pattern: {exc}") from None
        max_match = (
            parse_int(NAME, "max-match", opts["max-match"], minimum=1)
            if "max-match" in opts
            else 4096
        )
        return ReplaceOptions(
            new=new, pattern=pattern, directions=directions, count=count, max_match=max_match
        )

    def __init__(self, flow: FlowInfo, options: ReplaceOptions) -> None:
        super().__init__(flow, options)
        self.streams: dict[str, _LiteralStream | _RegexStream] = {}
        """Per chosen direction, the replacement state."""
        self._finished: set[str] = set()
        for direction in options.directions:
            if options.old is not None:
                self.streams[direction] = _LiteralStream(options.old, options.new, options.count)
            else:
                assert options.pattern is not None
                self.streams[direction] = _RegexStream(
                    options.pattern, options.new, options.count, options.max_match
                )

    def client_data(self, data: bytes) -> bytes:
        return self._feed(CLIENT, data)

    def server_data(self, data: bytes) -> bytes:
        return self._feed(SERVER, data)

    def client_eof(self) -> bytes:
        return self._feed(CLIENT, b"", final=True)

    def server_eof(self) -> bytes:
        return self._feed(SERVER, b"", final=True)

    def _feed(self, direction: str, data: bytes, final: bool = False) -> bytes:
        stream = self.streams.get(direction)
        if stream is None:
            result = data
        else:
            result = stream.feed(data, final)
        if final:
            self._finished.add(direction)
        # Nothing held (an exhausted direction flushes at once) and nothing
        # more to replace anywhere: let the engine take over.
        if all(s.exhausted or d in self._finished for d, s in self.streams.items()):
            self.passthrough()
        return result

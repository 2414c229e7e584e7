"""Small parsers shared by the built-in interceptors' ``parse_options``.

Command-line options arrive as strings (``-o key=value``). These helpers turn
them into checked values and raise :class:`~tproxy.interceptor.OptionError`
with one line that names the interceptor and the option, so a typo stops
``tproxy run`` before it listens. Keys may be written with ``-`` or ``_``
(``max-bytes`` or ``max_bytes``, handy as keyword arguments of
:class:`tproxy.testing.Driver`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from tproxy.interceptor import OptionError

CLIENT = "client"
"""The client-to-server direction (bytes the client sends)."""
SERVER = "server"
"""The server-to-client direction (bytes the server sends)."""

_DIRECTIONS = {
    CLIENT: frozenset({CLIENT}),
    SERVER: frozenset({SERVER}),
    "both": frozenset({CLIENT, SERVER}),
}


def normalize(name: str, options: Mapping[str, str], allowed: Iterable[str]) -> dict[str, str]:
    """Return ``options`` with ``_`` spelled ``-`` in keys; reject unknown keys.

    ``name`` is the interceptor's name, used in the error message.
    """
    allowed = sorted(allowed)
    result: dict[str, str] = {}
    for key, value in options.items():
        norm = key.replace("_", "-")
        if norm not in allowed:
            raise OptionError(
                f"{name}: unknown option {key!r} (accepted: {', '.join(allowed)})"
            )
        if norm in result:
            raise OptionError(f"{name}: option {norm!r} given twice")
        result[norm] = value
    return result


def parse_direction(name: str, value: str) -> frozenset[str]:
    """``client``, ``server`` or ``both`` -> the set of directions it names."""
    try:
        return _DIRECTIONS[value.strip().lower()]
    except KeyError:
        raise OptionError(
            f"{name}: direction must be client, server or both, not {value!r}"
        ) from None


def parse_int(name: str, key: str, value: str, *, minimum: int = 0) -> int:
    """A decimal integer of at least ``minimum``."""
    try:
        number = int(value.strip(), 10)
    except ValueError:
        raise OptionError(f"{name}: {key} must be an integer, not {value!r}") from None
    if number < minimum:
        raise OptionError(f"{name}: {key} must be at least {minimum}, not {number}")
    return number


def parse_choice(name: str, key: str, value: str, choices: Iterable[str]) -> str:
    """One of ``choices`` (case-insensitive)."""
    choices = list(choices)
    low = value.strip().lower()
    if low not in choices:
        raise OptionError(f"{name}: {key} must be one of {', '.join(choices)}, not {value!r}")
    return low


_SIMPLE_ESCAPES = {
    "\\": b"\\",
    "n": b"\n",
    "r": b"\r",
    "t": b"\t",
    "0": b"\0",
    "'": b"'",
    '"': b'"',
}


def decode_escapes(name: str, key: str, text: str) -> bytes:
    """Turn an option string into bytes, understanding backslash escapes.

    ``\\r \\n \\t \\0 \\\\ \\xHH`` are decoded (so ``reply=HTTP/1.0 403
    Forbidden\\r\\n\\r\\n`` works from a shell); every other character is
    encoded as UTF-8. An unknown escape is an error rather than a guess.
    """
    out = bytearray()
    i = 0
    while i < len(text):
        ch = text[i]
        if ch != "\\":
            out += ch.encode("utf-8", "surrogateescape")
            i += 1
            continue
        nxt = text[i + 1 : i + 2]
        if nxt in _SIMPLE_ESCAPES:
            out += _SIMPLE_ESCAPES[nxt]
            i += 2
        elif nxt == "x" and re.fullmatch(r"[0-9a-fA-F]{2}", text[i + 2 : i + 4]):
            out.append(int(text[i + 2 : i + 4], 16))
            i += 4
        else:
            raise OptionError(
                f"{name}: {key}: unknown escape {text[i : i + 2]!r} at position {i} "
                "(use \\\\ for a backslash, \\xHH for any byte)"
            )
    return bytes(out)


def encode_escapes(data: bytes) -> str:
    """The inverse of :func:`decode_escapes`: any bytes as an option string."""
    parts = []
    for byte in data:
        ch = chr(byte)
        if ch == "\\":
            parts.append("\\\\")
        elif 0x20 <= byte < 0x7F:
            parts.append(ch)
        else:
            parts.append(f"\\x{byte:02x}")
    return "".join(parts)


def compile_regex(name: str, key: str, text: str) -> re.Pattern[bytes]:
    """Compile ``text`` (UTF-8) as a bytes regular expression.

    Regex escapes (``\\r``, ``\\d``, ``\\x00``) are left to :mod:`re`; inline
    flags such as ``(?i)`` or ``(?s)`` select case-insensitivity or dot-all.
    """
    try:
        return re.compile(text.encode("utf-8", "surrogateescape"))
    except re.error as exc:
        raise OptionError(f"{name}: {key} is not a valid regular expression: {exc}") from None

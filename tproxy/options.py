"""Typed parsers for interceptor options, as the built-ins use them.

Command-line options arrive as strings (``-i NAME -o key=value``). The engine
spells every key with ``_`` before an interceptor's ``parse_options`` sees it
(``-o max-bytes=1`` and ``-o max_bytes=1`` both arrive as ``max_bytes``; see
:func:`normalize_keys`), and :class:`tproxy.testing.Driver` does the same.
Values stay strings: only the interceptor knows whether ``\\n`` is a newline
(:func:`parse_bytes`) or a regex escape (:func:`parse_regex`).

Every parser takes the interceptor's name and the option's key first, only
for the message: a bad value raises :class:`~tproxy.interceptor.OptionError`
with one line that names both, and ``tproxy run`` prints it and exits with
code 2 before it listens. :func:`parse` checks a whole option mapping against
a schema in one call::

    from tproxy import Interceptor, options

    class Tarpit(Interceptor):
        @classmethod
        def parse_options(cls, raw):
            return options.parse("tarpit", raw,
                                 delay=(options.parse_duration, 0.25),
                                 max_bytes=(options.parse_size, 65536))

    # self.options.delay == 0.25, self.options.max_bytes == 65536
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable, Mapping
from types import SimpleNamespace
from typing import Any, TypeVar

from . import ports
from .interceptor import OptionError

T = TypeVar("T")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

CLIENT = "client"
"""The client-to-server direction (bytes the client sends)."""
SERVER = "server"
"""The server-to-client direction (bytes the server sends)."""

_DIRECTIONS = {
    CLIENT: frozenset({CLIENT}),
    SERVER: frozenset({SERVER}),
    "both": frozenset({CLIENT, SERVER}),
}


# -- keys ----------------------------------------------------------------------


def normalize_key(key: str) -> str:
    """The one spelling of an option key: stripped, ``-`` written ``_``."""
    return key.strip().replace("-", "_")


def normalize_keys(options: Mapping[str, Any]) -> dict[str, str]:
    """``options`` with every key spelled by :func:`normalize_key` and every value a string.

    Two keys that differ only in ``-``/``_`` are an error: one of them would be lost.
    """
    result: dict[str, str] = {}
    for key, value in options.items():
        norm = normalize_key(key)
        if not norm:
            raise OptionError("an option has an empty key")
        if norm in result:
            raise OptionError(f"option {norm.replace('_', '-')!r} given twice")
        result[norm] = value if isinstance(value, str) else str(value)
    return result


def normalize(name: str, options: Mapping[str, str], allowed: Iterable[str]) -> dict[str, str]:
    """Return ``options`` with keys spelled with ``-``; reject keys not in ``allowed``.

    The built-ins name their options with ``-`` (``max-bytes``); either spelling is
    accepted. ``name`` is the interceptor's name, for the message.
    """
    allowed = sorted(k.replace("_", "-") for k in allowed)
    result: dict[str, str] = {}
    for key, value in options.items():
        norm = key.strip().replace("_", "-")
        if norm not in allowed:
            raise OptionError(f"{name}: unknown option {norm!r} (accepted: {', '.join(allowed)})")
        if norm in result:
            raise OptionError(f"{name}: option {norm!r} given twice")
        result[norm] = value
    return result


def parse(
    name: str,
    options: Mapping[str, str],
    **schema: Callable[[str, str, str], Any] | tuple[Callable[[str, str, str], Any], Any],
) -> SimpleNamespace:
    """Check ``options`` against ``schema`` and return the parsed values as attributes.

    Each schema entry is ``key=parser`` (the option is required) or
    ``key=(parser, default)`` (the default is used as is, not parsed). A
    parser is any ``f(name, key, text)`` of this module (or your own).
    Unknown keys are an error that lists the accepted ones.
    """
    given = normalize_keys(options)
    unknown = sorted(set(given) - set(schema))
    if unknown:
        accepted = ", ".join(k.replace("_", "-") for k in sorted(schema)) or "none"
        raise OptionError(
            f"{name}: unknown option {unknown[0].replace('_', '-')!r} (accepted: {accepted})"
        )
    values: dict[str, Any] = {}
    for key, entry in schema.items():
        parser, default, required = (
            (entry[0], entry[1], False) if isinstance(entry, tuple) else (entry, None, True)
        )
        shown = key.replace("_", "-")
        if key in given:
            values[key] = parser(name, shown, given[key])
        elif required:
            raise OptionError(f"{name}: option {shown!r} is required")
        else:
            values[key] = default
    return SimpleNamespace(**values)


# -- scalar values --------------------------------------------------------------


def parse_str(name: str, key: str, value: str) -> str:
    """The text as given (for a :func:`parse` schema)."""
    return value


def parse_int(
    name: str, key: str, value: str, *, minimum: int = 0, maximum: int | None = None
) -> int:
    """A decimal integer of at least ``minimum`` (and at most ``maximum``)."""
    try:
        number = int(value.strip(), 10)
    except ValueError:
        raise OptionError(f"{name}: {key} must be an integer, not {value!r}") from None
    if number < minimum:
        raise OptionError(f"{name}: {key} must be at least {minimum}, not {number}")
    if maximum is not None and number > maximum:
        raise OptionError(f"{name}: {key} must be at most {maximum}, not {number}")
    return number


_SIZE_UNITS = {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30}


def parse_size(name: str, key: str, value: str) -> int:
    """A byte count: ``4096``, ``64k``, ``1m``, ``2g`` (binary units, ``kib``/``kb`` too)."""
    match = re.fullmatch(r"\s*(\d+)\s*([kmg]?)(?:i?b)?\s*", value.lower())
    if match is None:
        raise OptionError(f"{name}: {key} must be a size like 4096, 64k or 1m, not {value!r}")
    return int(match.group(1)) * _SIZE_UNITS[match.group(2)]


_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "": 1.0}


def parse_duration(name: str, key: str, value: str) -> float:
    """Seconds from ``250ms``, ``1.5s``, ``2m``, ``1h`` or a bare number of seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h|)\s*", value.lower())
    if match is None:
        raise OptionError(
            f"{name}: {key} must be a duration like 250ms, 1.5s, 2m or 10, not {value!r}"
        )
    return float(match.group(1)) * _DURATION_UNITS[match.group(2)]


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def parse_bool(name: str, key: str, value: str) -> bool:
    """``true/false``, ``yes/no``, ``on/off``, ``1/0`` (any case)."""
    low = value.strip().lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise OptionError(f"{name}: {key} must be true or false (yes/no, on/off, 1/0), not {value!r}")


def parse_choice(name: str, key: str, value: str, choices: Iterable[str]) -> str:
    """One of ``choices`` (case-insensitive); returned in lower case."""
    choices = list(choices)
    low = value.strip().lower()
    if low not in choices:
        raise OptionError(f"{name}: {key} must be one of {', '.join(choices)}, not {value!r}")
    return low


def choice(*choices: str) -> Callable[[str, str, str], str]:
    """A parser for :func:`parse` that accepts one of ``choices``."""

    def parser(name: str, key: str, value: str) -> str:
        return parse_choice(name, key, value, choices)

    return parser


def parse_direction(name: str, value: str) -> frozenset[str]:
    """``client``, ``server`` or ``both`` -> the set of directions it names."""
    try:
        return _DIRECTIONS[value.strip().lower()]
    except KeyError:
        raise OptionError(
            f"{name}: direction must be client, server or both, not {value!r}"
        ) from None


# -- bytes and patterns ------------------------------------------------------------

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


parse_bytes = decode_escapes
"""Bytes with escapes (``\\r \\n \\t \\0 \\\\ \\xHH``): the parser for :func:`parse`."""


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


parse_regex = compile_regex
"""A bytes regular expression: the parser for :func:`parse`."""


def parse_text_regex(
    name: str, key: str, text: str, *, flags: int = re.IGNORECASE
) -> re.Pattern[str]:
    """A ``str`` regular expression (for names: hosts, SNI), case-insensitive by default."""
    try:
        return re.compile(text, flags)
    except re.error as exc:
        raise OptionError(f"{name}: {key} is not a valid regular expression: {exc}") from None


# -- lists, networks, ports -------------------------------------------------------------


def parse_list(name: str, key: str, value: str, *, separator: str = ",") -> tuple[str, ...]:
    """``a, b,c`` -> ``("a", "b", "c")``: stripped, empty items dropped, none is an error."""
    items = tuple(part.strip() for part in value.split(separator) if part.strip())
    if not items:
        raise OptionError(f"{name}: {key} is empty")
    return items


def parse_cidrs(name: str, key: str, value: str, *, separator: str = ",") -> tuple[Network, ...]:
    """``10.0.0.0/8, 2001:db8::/32, 192.0.2.7`` -> networks (a bare address is /32 or /128)."""
    networks = []
    for part in parse_list(name, key, value, separator=separator):
        try:
            networks.append(ipaddress.ip_network(part, strict=False))
        except ValueError as exc:
            raise OptionError(f"{name}: {key}: {exc}") from None
    return tuple(networks)


def parse_ports(
    name: str, key: str, value: str, *, separator: str = ","
) -> tuple[tuple[int, int], ...]:
    """``22,80,8000-8100`` -> ``((22, 22), (80, 80), (8000, 8100))``: sorted and merged.

    The syntax is the one every port option of tproxy takes (see
    ``tproxy/ports.py``): ports 1-65535, ``LOW-HIGH`` ranges, no empty items.
    """
    try:
        ranges = ports.parse_ports(value, separator=separator)
    except ports.PortSpecError as exc:
        raise OptionError(f"{name}: {key}: {exc}") from None
    return tuple((r.first, r.last) for r in ranges)


def address_in(address: str, networks: Iterable[Network]) -> bool:
    """Whether the IP literal ``address`` lies in any of ``networks`` (an IPv4-mapped
    IPv6 address counts as its IPv4 address); a name is in none."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip.version == net.version and ip in net for net in networks)


def port_in(port: int, ranges: Iterable[tuple[int, int]]) -> bool:
    """Whether ``port`` lies in any of the ``(low, high)`` ranges."""
    return any(low <= port <= high for low, high in ranges)

"""Port numbers and port specifications such as ``80,443,8000-8100``: one syntax everywhere.

Every place that reads ports from a user parses them here: ``tproxy setup
--port/--udp-port``, ``--mode ...@HOST:PORT``, ``--metrics HOST:PORT``,
``--when port=``, interceptor options (``tproxy.options.parse_ports``) and the
SOCKS/HTTP ``--allow-port``/``--deny-port`` policy. The rules:

- a port is 1-65535, written in ASCII digits only (no sign, no ``_``, no
  spaces inside); port 0 is refused, since no connection goes to it and a
  listener on a random port helps nobody;
- a range is ``LOW-HIGH`` (or ``LOW:HIGH``, as iptables writes it), both
  ends included, ``LOW <= HIGH``;
- a list separates items with ``,`` (the caller may choose another
  separator: ``--when`` uses ``;`` because ``,`` separates its terms); spaces
  around an item are ignored, an empty item (``80,,443``, ``80,``) is an
  error, and so is an empty list;
- the result is sorted and merged, so ``443,80`` and ``80,443`` give the
  same ranges.

Errors are :class:`PortSpecError` with a message that names the bad item;
callers wrap it into their own error type (a one-line CLI error, an
:class:`~tproxy.interceptor.OptionError`, a policy error) without rewording.
This module imports nothing of tproxy, so anything may use it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = [
    "MAX_PORT",
    "PortRange",
    "PortSpecError",
    "parse_port",
    "parse_port_range",
    "parse_ports",
]

MAX_PORT = 65535
_DIGITS = re.compile(r"[0-9]+")


class PortSpecError(ValueError):
    """A port or port specification that cannot be parsed or is out of range."""


@dataclass(frozen=True, order=True)
class PortRange:
    """An inclusive range of TCP/UDP ports; ``first == last`` for one port."""

    first: int
    last: int

    def __post_init__(self) -> None:
        if not (1 <= self.first <= self.last <= MAX_PORT):
            raise PortSpecError(f"bad port range {self.first}-{self.last}")

    def __contains__(self, port: object) -> bool:
        return isinstance(port, int) and self.first <= port <= self.last

    @property
    def iptables(self) -> str:
        """The range as iptables writes it: ``80`` or ``8000:8100``."""
        return str(self.first) if self.first == self.last else f"{self.first}:{self.last}"

    def __str__(self) -> str:
        return str(self.first) if self.first == self.last else f"{self.first}-{self.last}"


def _shorten(text: str, limit: int = 24) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def parse_port(text: str, what: str = "port") -> int:
    """One port number 1-65535 in ASCII digits (spaces around it ignored).

    ``what`` names the value in the error (``"proxy port"``).
    """
    text = text.strip()
    if not _DIGITS.fullmatch(text):
        raise PortSpecError(f"{what} {_shorten(text)!r} is not a number")
    # More than five digits is out of range whatever they are; checking the
    # length first also keeps int() away from absurdly long strings.
    value = int(text) if len(text) <= 5 else MAX_PORT + 1
    if not 1 <= value <= MAX_PORT:
        raise PortSpecError(f"{what} {_shorten(text)} is out of range 1-{MAX_PORT}")
    return value


def parse_port_range(text: str) -> PortRange:
    """One item of a list: ``80``, ``8000-8100`` or ``8000:8100``."""
    text = text.strip()
    sep = "-" if "-" in text else ":" if ":" in text else None
    if sep is None:
        port = parse_port(text)
        return PortRange(port, port)
    low_text, _, high_text = text.partition(sep)
    if not (_DIGITS.fullmatch(low_text.strip()) and _DIGITS.fullmatch(high_text.strip())):
        raise PortSpecError(f"port range {_shorten(text)!r} is not LOW-HIGH")
    low, high = parse_port(low_text), parse_port(high_text)
    if low > high:
        raise PortSpecError(f"port range {_shorten(text)!r} goes backwards")
    return PortRange(low, high)


def parse_ports(spec: str | Iterable[str], *, separator: str = ",") -> tuple[PortRange, ...]:
    """``80,443,8000-8100`` (or several such strings) -> sorted, merged ranges.

    Overlapping and adjacent ranges are merged, so the result names each port
    once and two specs naming the same ports compare equal.
    """
    specs = [spec] if isinstance(spec, str) else list(spec)
    ranges: list[PortRange] = []
    for item in specs:
        for part in item.split(separator):
            if not part.strip():
                raise PortSpecError(f"empty port in {_shorten(item)!r}")
            ranges.append(parse_port_range(part))
    if not ranges:
        raise PortSpecError("no ports given")
    ranges.sort()
    merged = [ranges[0]]
    for current in ranges[1:]:
        last = merged[-1]
        if current.first <= last.last + 1:
            merged[-1] = PortRange(last.first, max(last.last, current.last))
        else:
            merged.append(current)
    return tuple(merged)

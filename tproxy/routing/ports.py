"""Port specifications such as ``80,443,8000-8100``.

A spec is parsed into sorted, merged :class:`PortRange` values so that two
specs naming the same ports (``443,80`` and ``80,443``) give the same plan,
and each range becomes one iptables ``--dport``/``--sport`` match.
"""

from __future__ import annotations

from dataclasses import dataclass


class PortSpecError(ValueError):
    """A port specification that cannot be parsed or is out of range."""


@dataclass(frozen=True, order=True)
class PortRange:
    """An inclusive range of TCP/UDP ports; ``first == last`` for one port."""

    first: int
    last: int

    def __post_init__(self) -> None:
        if not (1 <= self.first <= self.last <= 65535):
            raise PortSpecError(f"bad port range {self.first}-{self.last}")

    @property
    def iptables(self) -> str:
        """The port as iptables writes it: ``80`` or ``8000:8100``."""
        return str(self.first) if self.first == self.last else f"{self.first}:{self.last}"

    def __str__(self) -> str:
        return str(self.first) if self.first == self.last else f"{self.first}-{self.last}"


def parse_port(text: str, what: str = "port") -> int:
    """Parse one port number (1-65535); raise :class:`PortSpecError` otherwise."""
    text = text.strip()
    if not text.isdigit():
        raise PortSpecError(f"{what} {text!r} is not a number")
    value = int(text)
    if not 1 <= value <= 65535:
        raise PortSpecError(f"{what} {value} is out of range 1-65535")
    return value


def parse_ports(spec: str | list[str] | tuple[str, ...]) -> tuple[PortRange, ...]:
    """Parse ``80,443,8000-8100`` (or several such strings) into merged ranges.

    Ranges use ``-`` (``:`` is accepted too, as iptables writes it). Overlapping
    and adjacent ranges are merged and the result is sorted.
    """
    parts: list[str] = []
    for item in [spec] if isinstance(spec, str) else list(spec):
        parts.extend(item.split(","))
    ranges: list[PortRange] = []
    for part in parts:
        part = part.strip()
        if not part:
            raise PortSpecError(f"empty port in {','.join(parts)!r}")
        sep = "-" if "-" in part else ":" if ":" in part else None
        if sep is None:
            port = parse_port(part)
            ranges.append(PortRange(port, port))
            continue
        low_text, _, high_text = part.partition(sep)
        low, high = parse_port(low_text), parse_port(high_text)
        if low > high:
            raise PortSpecError(f"port range {part!r} goes backwards")
        ranges.append(PortRange(low, high))
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

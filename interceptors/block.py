"""``block``: abort flows by destination (CIDR, port, host name) or by their first bytes.

The destination is checked before the flow's interceptors are made
(:meth:`Block.applies_to`): a flow whose destination does not match gets no
``block`` instance, and with no other interceptor it is spliced like any
passthrough flow. :meth:`Block.start` checks again (a test driving the class
directly). With ``pattern``, the
first ``first-bytes`` bytes from the client are searched; a match aborts the
flow, no match within that many bytes hands the flow back to the engine.

Client data is forwarded as it arrives, never held back: holding it would
stall every protocol whose first message is shorter than ``first-bytes``
(an HTTP GET waits for its answer). The read that completes a match is not
forwarded; if the match started in an earlier read, that earlier part has
already reached the server, which then sees the flow reset.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from tproxy.flow import FlowInfo, format_address
from tproxy.interceptor import Interceptor, OptionError
from tproxy.options import (
    compile_regex,
    decode_escapes,
    normalize,
    parse_cidrs,
    parse_int,
    parse_ports,
)

NAME = "block"

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class BlockOptions:
    """Checked options of :class:`Block`."""

    cidrs: tuple[Network, ...] = ()
    ports: tuple[tuple[int, int], ...] = ()
    host: re.Pattern[str] | None = None
    pattern: re.Pattern[bytes] | None = None
    first_bytes: int = 4096
    reply: bytes = b""
    by_destination: bool = field(init=False)
    """Whether any of cidr/host/port was given."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "by_destination", bool(self.cidrs or self.ports or self.host))


class Block(Interceptor):
    """Abort flows by destination or by a regex in the client's first bytes.

    Options:

    - ``cidr``: comma-separated networks (``10.0.0.0/8,2001:db8::/32``);
      matches IP destinations only (an IPv4-mapped IPv6 address counts as its
      IPv4 address).
    - ``host``: a regex that must match the whole destination *name*
      (case-insensitive; explicit proxies may get names instead of
      addresses), e.g. ``(.*\\.)?example\\.com``.
    - ``port``: comma-separated ports and ranges (``22,8000-8100``).
    - ``pattern``: a bytes regex searched in the first ``first-bytes``
      (default 4096) bytes from the client.
    - ``reply``: bytes sent to the client before the flow is aborted (escapes
      ``\\r \\n \\xHH`` allowed), e.g. an HTTP 403.

    ``cidr`` and ``host`` are alternatives (either may match); ``port`` must
    match as well when given. With ``pattern`` as well, only flows whose
    destination matches are searched (no destination option: all flows).
    """

    options: BlockOptions

    @classmethod
    def parse_options(cls, options: Mapping[str, str]) -> BlockOptions:
        opts = normalize(NAME, options, {"cidr", "port", "host", "pattern", "first-bytes", "reply"})
        if not ({"cidr", "port", "host", "pattern"} & opts.keys()):
            raise OptionError(f"{NAME}: give at least one of cidr=, port=, host=, pattern=")
        host = None
        if "host" in opts:
            try:
                host = re.compile(opts["host"], re.IGNORECASE)
            except re.error as exc:
                raise OptionError(f"{NAME}: host is not a valid regex: {exc}") from None
        if "first-bytes" in opts and "pattern" not in opts:
            raise OptionError(f"{NAME}: first-bytes only applies to pattern=")
        return BlockOptions(
            cidrs=parse_cidrs(NAME, "cidr", opts["cidr"]) if "cidr" in opts else (),
            ports=parse_ports(NAME, "port", opts["port"]) if "port" in opts else (),
            host=host,
            pattern=compile_regex(NAME, "pattern", opts["pattern"]) if "pattern" in opts else None,
            first_bytes=(
                parse_int(NAME, "first-bytes", opts["first-bytes"], minimum=1)
                if "first-bytes" in opts
                else 4096
            ),
            reply=decode_escapes(NAME, "reply", opts["reply"]) if "reply" in opts else b"",
        )

    @classmethod
    def unmatchable(cls, options: BlockOptions, modes: Iterable[str]) -> list[str]:
        """Start-up warnings: ``host=`` never matches where listeners see only addresses."""
        if options.host is not None and set(modes) <= {"transparent"}:
            return [
                "block host= never matches on transparent listeners: they see "
                "addresses, not names (use cidr=, or an explicit --mode socks/http)"
            ]
        return []

    def __init__(self, flow: FlowInfo, options: BlockOptions) -> None:
        super().__init__(flow, options)
        self.seen = b""
        """The client's first bytes, kept for the pattern search."""

    @classmethod
    def applies_to(cls, options: BlockOptions, flow: FlowInfo) -> bool:
        """A flow whose destination no cidr/host/port matches gets no instance (it is
        spliced as passthrough from the start)."""
        return not options.by_destination or _destination_matches(options, flow)

    def destination_matches(self) -> bool:
        """Whether the flow's destination matches cidr/host (either) and port."""
        return _destination_matches(self.options, self.flow)

    def start(self) -> None:
        opts = self.options
        if opts.by_destination and not self.destination_matches():
            self.passthrough()
        elif opts.pattern is None:
            self._block(f"destination {format_address(self.flow.destination)} blocked")

    def client_data(self, data: bytes) -> bytes:
        if self.options.pattern is None:  # start() aborts or passes through
            return data
        room = self.options.first_bytes - len(self.seen)
        self.seen += data[:room]
        match = self.options.pattern.search(self.seen)
        if match is not None:
            self._block(f"pattern {match.group(0)[:60]!r} in the first bytes from the client")
        if len(self.seen) >= self.options.first_bytes:
            self.seen = b""
            self.passthrough()
        return data

    def client_eof(self) -> bytes:
        self.seen = b""
        return b""

    def _block(self, reason: str) -> None:
        if self.options.reply:
            self.inject_to_client(self.options.reply)
        self.abort(f"block: {reason}")


def _destination_matches(opts: BlockOptions, flow: FlowInfo) -> bool:
    host, port = flow.destination[0], flow.destination[1]
    if opts.ports and not any(low <= port <= high for low, high in opts.ports):
        return False
    if not (opts.cidrs or opts.host):
        return True
    address = _ip(host)
    if address is None:
        name = host.rstrip(".")
        return opts.host is not None and opts.host.fullmatch(name) is not None
    candidates = [address]
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        candidates.append(address.ipv4_mapped)
    return any(a.version == net.version and a in net for a in candidates for net in opts.cidrs)


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None

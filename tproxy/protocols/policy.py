"""Who may use an explicit proxy, to reach what, with which credentials.

A :class:`Policy` is pure data with pure checks, shared by the SOCKS and
HTTP front doors (and usable by ``forward``):

- clients: an allow list of CIDRs (empty: any client);
- destinations: allow and deny lists of host-name regexes, of CIDRs and of
  ports (single ports and ranges). Deny wins over allow. With any
  host/network allow list configured, a destination must match one of them;
  with a port allow list, its port must be in it;
- credentials: user -> password (Basic for HTTP, RFC 1929 for SOCKS5);
  configured credentials are required.

Names are never resolved here. :meth:`Policy.check_destination` matches a
host name against the regexes only and an IP literal against the CIDRs (and
the regexes, as text). A name allowed by the regexes may still resolve to a
denied address: the front door must check every resolved address with
:meth:`Policy.check_resolved` before connecting to it (deny CIDRs only: an
allowed name is not also required to resolve into an allowed network).

Regexes must match the whole name (``re.fullmatch``), case-insensitively,
after lower-casing and dropping a trailing dot: ``example\\.com`` does not
allow ``example.com.evil.net``; write ``(.*\\.)?example\\.com`` for subdomains.
"""

from __future__ import annotations

import hmac
import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .. import ports
from ..ports import PortRange as PortRange

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class PolicyError(ValueError):
    """A policy option cannot be understood; the message is fit for the command line."""


@dataclass(frozen=True)
class Decision:
    """Whether something is allowed, and why (for the flow log); truthy when allowed."""

    allowed: bool
    reason: str

    def __bool__(self) -> bool:
        return self.allowed


def parse_ports(specs: str | Iterable[str], source: str = "port") -> tuple[PortRange, ...]:
    """``"80"``, ``"8000-8100"``, ``"80,443,8000-8100"`` (or a list of those) -> ranges.

    The syntax is :func:`tproxy.ports.parse_ports`'s; ``source`` (the option,
    ``--allow-port``) prefixes its error. An empty list is no ports at all.
    """
    specs = [specs] if isinstance(specs, str) else list(specs)
    if not specs:
        return ()
    try:
        return ports.parse_ports(specs)
    except ports.PortSpecError as exc:
        raise PolicyError(f"{source}: {exc}") from None


def parse_networks(specs: Iterable[str]) -> tuple[IPNetwork, ...]:
    """CIDRs (``10.0.0.0/8``, ``2001:db8::/32``) or single addresses -> networks."""
    networks = []
    for spec in specs:
        for part in spec.split(","):
            part = part.strip()
            if not part:
                continue
            try:
                networks.append(ipaddress.ip_network(part.strip("[]"), strict=False))
            except ValueError:
                raise PolicyError(f"bad network {part!r} (want a CIDR like 10.0.0.0/8)") from None
    return tuple(networks)


def parse_patterns(specs: Iterable[str]) -> tuple[re.Pattern[str], ...]:
    """Host-name regexes, compiled case-insensitive."""
    patterns = []
    for spec in specs:
        try:
            patterns.append(re.compile(spec, re.IGNORECASE))
        except re.error as error:
            raise PolicyError(f"bad host pattern {spec!r}: {error}") from None
    return tuple(patterns)


def parse_credentials(lines: Iterable[str], *, source: str = "credentials") -> dict[str, str]:
    """``user:password`` strings -> ``{user: password}``.

    The password is everything after the first colon (it may contain
    colons; a user name may not, as Basic authentication splits there).
    Blank lines and lines starting with ``#`` are skipped, and the line end
    is removed but other spaces are kept. A user given twice is an error.
    """
    credentials: dict[str, str] = {}
    for number, raw in enumerate(lines, 1):
        line = raw.rstrip("\r\n")
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        user, colon, password = line.partition(":")
        if not colon or not user:
            raise PolicyError(f"{source} line {number}: want user:password")
        if user in credentials:
            raise PolicyError(f"{source} line {number}: user {user!r} given twice")
        credentials[user] = password
    return credentials


def load_credentials_file(path: str | Path) -> dict[str, str]:
    """Read a file of ``user:password`` lines (see :func:`parse_credentials`)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as error:
        raise PolicyError(f"cannot read credentials file {path}: {error.strerror}") from None
    return parse_credentials(text.splitlines(), source=str(path))


def _ip(host: str | IPAddress) -> IPAddress | None:
    """An IP address from a literal (brackets and an IPv4-mapped IPv6 form tolerated)."""
    if not isinstance(host, str):
        ip: IPAddress = host
    else:
        try:
            ip = ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _in(ip: IPAddress, networks: Iterable[IPNetwork]) -> IPNetwork | None:
    for network in networks:
        if ip.version == network.version and ip in network:
            return network
    return None


@dataclass(frozen=True)
class Policy:
    """Access rules of an explicit proxy; the default allows everything, no auth.

    Build it from command-line strings with :meth:`from_options`.
    """

    allow_hosts: tuple[re.Pattern[str], ...] = ()
    deny_hosts: tuple[re.Pattern[str], ...] = ()
    allow_networks: tuple[IPNetwork, ...] = ()
    deny_networks: tuple[IPNetwork, ...] = ()
    allow_ports: tuple[PortRange, ...] = ()
    deny_ports: tuple[PortRange, ...] = ()
    clients: tuple[IPNetwork, ...] = ()
    """Client allow list; empty allows every client."""
    credentials: Mapping[str, str] = field(default_factory=dict, hash=False, repr=False)
    """user -> password; not empty means authentication is required."""

    @classmethod
    def from_options(
        cls,
        *,
        allow_hosts: Iterable[str] = (),
        deny_hosts: Iterable[str] = (),
        allow_networks: Iterable[str] = (),
        deny_networks: Iterable[str] = (),
        allow_ports: Iterable[str] = (),
        deny_ports: Iterable[str] = (),
        clients: Iterable[str] = (),
        credentials: Iterable[str] = (),
        credentials_file: str | Path | None = None,
    ) -> Policy:
        """Parse command-line strings; raise :class:`PolicyError` with a readable message.

        Networks and ports may be comma-separated within one string;
        ``credentials`` are ``user:password`` strings, merged with the
        file's lines (a user in both is an error).
        """
        creds = parse_credentials(credentials, source="--credentials")
        if credentials_file is not None:
            for user, password in load_credentials_file(credentials_file).items():
                if user in creds:
                    raise PolicyError(f"user {user!r} given twice")
                creds[user] = password
        return cls(
            allow_hosts=parse_patterns(allow_hosts),
            deny_hosts=parse_patterns(deny_hosts),
            allow_networks=parse_networks(allow_networks),
            deny_networks=parse_networks(deny_networks),
            allow_ports=parse_ports(list(allow_ports), "--allow-port"),
            deny_ports=parse_ports(list(deny_ports), "--deny-port"),
            clients=parse_networks(clients),
            credentials=creds,
        )

    # -- properties ---------------------------------------------------------

    @property
    def requires_auth(self) -> bool:
        """Whether clients must authenticate (credentials are configured)."""
        return bool(self.credentials)

    @property
    def restricts_clients(self) -> bool:
        """Whether not everyone may use the proxy: credentials or a client allow list.

        A front door refuses to listen on a non-loopback address when this is
        false, unless forced, so nobody opens a public proxy by accident.
        """
        return self.requires_auth or bool(self.clients)

    # -- checks ---------------------------------------------------------------

    def check_client(self, ip: str | IPAddress) -> bool:
        """Whether a client at ``ip`` may use the proxy (always, without a client list)."""
        if not self.clients:
            return True
        address = _ip(ip)
        return address is not None and _in(address, self.clients) is not None

    def check_destination(self, host: str, port: int) -> Decision:
        """Whether the client may ask for ``host:port`` (a name is not resolved).

        Order: deny ports, allow ports, then for an IP literal deny CIDRs and
        deny regexes (on its text), for a name deny regexes; finally, if any
        host or network allow list exists, the destination must match one
        (a name: a regex; an IP literal: a CIDR or a regex).
        """
        if (hit := next((r for r in self.deny_ports if port in r), None)) is not None:
            return Decision(False, f"port {port} denied ({hit})")
        if self.allow_ports and not any(port in r for r in self.allow_ports):
            return Decision(False, f"port {port} not in the allowed ports")
        ip = _ip(host)
        name = str(ip) if ip is not None else host.lower().rstrip(".")
        if ip is not None and (net := _in(ip, self.deny_networks)) is not None:
            return Decision(False, f"{name} denied (in {net})")
        if (pattern := next((p for p in self.deny_hosts if p.fullmatch(name)), None)) is not None:
            return Decision(False, f"{name} denied (matches {pattern.pattern!r})")
        if self.allow_hosts or self.allow_networks:
            if ip is not None and (net := _in(ip, self.allow_networks)) is not None:
                return Decision(True, f"{name} allowed (in {net})")
            if (p := next((p for p in self.allow_hosts if p.fullmatch(name)), None)) is not None:
                return Decision(True, f"{name} allowed (matches {p.pattern!r})")
            return Decision(False, f"{name} not in the allowed destinations")
        return Decision(True, "allowed")

    def check_resolved(self, ip: str | IPAddress) -> Decision:
        """Whether an address a name resolved to may be connected to (deny CIDRs only)."""
        address = _ip(ip)
        if address is None:
            return Decision(False, f"{ip} is not an IP address")
        if (net := _in(address, self.deny_networks)) is not None:
            return Decision(False, f"{address} denied (in {net})")
        return Decision(True, "allowed")

    def check_credentials(self, user: str, password: str) -> bool:
        """Whether ``user``/``password`` are configured; compared in constant time.

        An unknown user costs the same comparison as a known one, so timing
        does not reveal which user names exist.
        """
        expected = self.credentials.get(user)
        given = password.encode("utf-8", "surrogateescape")
        if expected is None:
            hmac.compare_digest(given, given)
            return False
        return hmac.compare_digest(given, expected.encode("utf-8", "surrogateescape"))

"""The routing plan: every chain, rule, ip rule and route interception needs.

A :class:`Plan` is pure data computed from the arguments by :func:`make_plan`,
with no I/O, so it can be printed (``--dry-run``), compared with what is
installed (``status``, refusing a different plan), stored (``/run/tproxy``)
and handed to any backend (python-iptables and pyroute2 today, nftables
later). The items are in installation order; removal is the reverse order.

Per family the plan is the classic TPROXY recipe, made recognisable as ours::

    ip route add local 0.0.0.0/0 dev lo table TABLE proto 116
    ip rule add fwmark MARK/MASK lookup TABLE priority PRIO protocol 116
    iptables -t mangle -N TPROXY_DIVERT            # MARK, then ACCEPT
    iptables -t mangle -N TPROXY_PRE               # our part of PREROUTING
    # packets of flows we already own (-m socket --transparent):
    #   from IN by destination port, but never a SYN (! --syn),
    #   from OUT by source port                             -> TPROXY_DIVERT
    # new connections from IN by destination port -> TPROXY --on-ip --on-port
    iptables -t mangle -I PREROUTING 1 -j TPROXY_PRE

The route and the ip rule come first and the ``PREROUTING`` jump last, so no
packet is diverted before the way to the local socket exists. The jump is
inserted at the top of ``PREROUTING`` so a foreign ``-j ACCEPT`` earlier in
the chain cannot hide diverted traffic from us; packets our chain does not
match fall through it and meet the foreign rules exactly as before. Every
iptables rule carries ``-m comment --comment tproxy:INSTANCE``; ip rules and
routes carry the protocol number :data:`RT_PROTO` (they have no comments).

A client's SYN never takes the socket shortcut. When a client reuses a port
while the proxy's accepted socket for that 4-tuple is still in TIME_WAIT (it
is, for 60 s, whenever the proxy closed first), ``-m socket --transparent``
matches the TIME_WAIT socket; diverted past the TPROXY rule, the SYN meets
that socket, which has no listener behind the original destination and
answers with a bare ACK, and the client connects only after a SYN
retransmission (a second or more). The TPROXY target handles exactly this
case: it retires the TIME_WAIT socket and hands the SYN to the listener.
``scripts/bench`` found it: with the socket rule taking SYNs too, 5 % of
new connections through tproxy and 25 % through HAProxy (same rules) needed
a SYN retransmission; with SYNs kept off it, HAProxy went from 5,700 to
13,500 new connections/s.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from .ports import PortRange, PortSpecError, parse_port, parse_ports

Family = Literal[4, 6]

#: Protocol number tagging our ip rules and routes (``ip rule ... protocol 116``).
RT_PROTO = 116
DEFAULT_INSTANCE = "default"
DEFAULT_PROXY_PORT = 9091
DEFAULT_PROXY_V4 = "127.0.0.1"
DEFAULT_PROXY_V6 = "::1"
DEFAULT_MARK = 1
DEFAULT_MASK = 0xFFFFFFFF
DEFAULT_TABLE = 100
DEFAULT_PRIORITY = 100
CHAIN_PREFIX_PRE = "TPROXY_PRE"
CHAIN_PREFIX_DIVERT = "TPROXY_DIVERT"
COMMENT_PREFIX = "tproxy:"
_INSTANCE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,13}$")
_IFNAME_RE = re.compile(r"^[^\s/:]{1,15}$")
_RESERVED_TABLES = {0: "unspec", 253: "default", 254: "main", 255: "local"}


class PlanError(ValueError):
    """An argument that cannot make a plan (bad port, address, mark, ...)."""


# ---------------------------------------------------------------- items


@dataclass(frozen=True)
class Jump:
    """``-j CHAIN``: continue in one of our chains."""

    chain: str


@dataclass(frozen=True)
class SetMark:
    """``-j MARK --set-xmark MARK/MASK``: set the bits of MASK to MARK."""

    mark: int
    mask: int


@dataclass(frozen=True)
class Accept:
    """``-j ACCEPT``: stop traversing the mangle chain."""


@dataclass(frozen=True)
class Reject:
    """``-j REJECT --reject-with icmp-port-unreachable`` (``icmp6-`` for IPv6).

    Only valid in the filter table; used by ``--block-quic`` so a browser's
    QUIC attempt fails at once and it falls back to TCP.
    """


@dataclass(frozen=True)
class Tproxy:
    """``-j TPROXY --on-port PORT --on-ip IP --tproxy-mark MARK/MASK``."""

    on_ip: str
    on_port: int
    mark: int
    mask: int


Target = Jump | SetMark | Accept | Tproxy | Reject


@dataclass(frozen=True)
class Chain:
    """A user chain of ours in the mangle table of one family."""

    family: Family
    name: str


@dataclass(frozen=True)
class MangleRule:
    """One rule in the mangle table (or ``table``); matches are in iptables-save order.

    ``first`` means "insert at the top of the chain" (our PREROUTING jump);
    otherwise the rule is appended. ``table`` is ``filter`` only for the
    ``--block-quic`` reject rule (REJECT is not allowed in mangle).
    """

    family: Family
    chain: str
    target: Target
    comment: str
    in_interface: str | None = None
    protocol: str | None = None
    dport: PortRange | None = None
    sport: PortRange | None = None
    #: ``! --syn``: every TCP packet but a connection's first SYN.
    not_syn: bool = False
    socket_transparent: bool = False
    first: bool = False
    table: str = "mangle"


@dataclass(frozen=True)
class IpRule:
    """``ip rule add fwmark MARK/MASK lookup TABLE priority PRIO protocol 116``."""

    family: Family
    fwmark: int
    fwmask: int
    table: int
    priority: int


@dataclass(frozen=True)
class LocalRoute:
    """``ip route add local 0.0.0.0/0 dev lo table TABLE proto 116`` (``::/0`` for IPv6)."""

    family: Family
    table: int
    dev: str = "lo"

    @property
    def dst(self) -> str:
        return "0.0.0.0/0" if self.family == 4 else "::/0"


Item = Chain | MangleRule | IpRule | LocalRoute


@dataclass(frozen=True)
class UnknownRule:
    """A rule of ours (in our chain, or tagged with our comment) we cannot parse.

    Never part of a plan: found in the kernel, ``status`` reports it as extra
    and ``teardown`` removes it by its text like any other rule of ours.
    """

    family: Family
    chain: str
    text: str
    comment: str | None
    table: str = "mangle"

    @property
    def instance(self) -> str | None:
        if self.comment and self.comment.startswith(COMMENT_PREFIX):
            return self.comment[len(COMMENT_PREFIX) :]
        return instance_of_chain(self.chain)


#: Anything a backend can report as installed.
Found = Item | UnknownRule


# ---------------------------------------------------------------- plan


@dataclass(frozen=True)
class PlanRequest:
    """The arguments a plan is made from; stored as the record of an installation."""

    in_interface: str
    out_interface: str
    ports: tuple[PortRange, ...]
    proxy_port: int = DEFAULT_PROXY_PORT
    proxy_v4: str = DEFAULT_PROXY_V4
    proxy_v6: str = DEFAULT_PROXY_V6
    mark: int = DEFAULT_MARK
    mask: int = DEFAULT_MASK
    table: int = DEFAULT_TABLE
    priority: int = DEFAULT_PRIORITY
    families: tuple[Family, ...] = (4, 6)
    instance: str = DEFAULT_INSTANCE
    #: UDP destination ports diverted to the same proxy port (``--udp-port``).
    udp_ports: tuple[PortRange, ...] = ()
    #: Reject UDP/443 from IN (``--block-quic``), so browsers fall back to TCP.
    block_quic: bool = False

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict (ports as ``[first, last]`` pairs)."""
        data = asdict(self)
        for key in _PORT_FIELDS:
            data[key] = [[r.first, r.last] for r in getattr(self, key)]
        data["families"] = list(self.families)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PlanRequest:
        """Inverse of :meth:`to_json` (fields missing from older records keep defaults)."""
        data = dict(data)
        for key in _PORT_FIELDS:
            if key in data:
                data[key] = tuple(PortRange(a, b) for a, b in data[key])
        data["families"] = tuple(data["families"])
        return cls(**data)


_PORT_FIELDS = ("ports", "udp_ports")
QUIC_PORT = PortRange(443, 443)


@dataclass(frozen=True)
class Plan:
    """Everything to install for one instance, in installation order."""

    request: PlanRequest
    items: tuple[Item, ...] = field(default=())

    @property
    def instance(self) -> str:
        return self.request.instance


def chain_names(instance: str) -> tuple[str, str]:
    """Our (PREROUTING part, divert) chain names for an instance."""
    suffix = "" if instance == DEFAULT_INSTANCE else f"_{instance}"
    return CHAIN_PREFIX_PRE + suffix, CHAIN_PREFIX_DIVERT + suffix


def instance_of_chain(name: str) -> str | None:
    """The instance owning a chain called ``name``, or None if it is not ours."""
    for prefix in (CHAIN_PREFIX_DIVERT, CHAIN_PREFIX_PRE):
        if name == prefix:
            return DEFAULT_INSTANCE
        if name.startswith(prefix + "_"):
            rest = name[len(prefix) + 1 :]
            if _INSTANCE_RE.match(rest) and rest != DEFAULT_INSTANCE:
                return rest
    return None


def comment_for(instance: str) -> str:
    """The ``-m comment`` text that tags our rules."""
    return COMMENT_PREFIX + instance


def make_plan(request: PlanRequest) -> Plan:
    """Compute the plan for ``request`` (validated first); no I/O."""
    validate_request(request)
    pre, divert = chain_names(request.instance)
    comment = comment_for(request.instance)
    items: list[Item] = []
    for family in request.families:
        on_ip = request.proxy_v4 if family == 4 else request.proxy_v6
        items.append(LocalRoute(family, request.table))
        items.append(IpRule(family, request.mark, request.mask, request.table, request.priority))
        items.append(Chain(family, divert))
        items.append(Chain(family, pre))
        items.append(MangleRule(family, divert, SetMark(request.mark, request.mask), comment))
        items.append(MangleRule(family, divert, Accept(), comment))
        for ports in request.ports:
            items.append(
                MangleRule(family, pre, Jump(divert), comment, request.in_interface, "tcp",
                           dport=ports, not_syn=True, socket_transparent=True)
            )
            items.append(
                MangleRule(family, pre, Jump(divert), comment, request.out_interface, "tcp",
                           sport=ports, socket_transparent=True)
            )
        # UDP: only the servers' replies take the socket shortcut. The client's
        # datagrams always meet TPROXY, whose own socket lookup finds a session
        # socket (transparent, bound to the original destination) before the listener.
        for ports in request.udp_ports:
            items.append(
                MangleRule(family, pre, Jump(divert), comment, request.out_interface, "udp",
                           sport=ports, socket_transparent=True)
            )
        tproxy = Tproxy(on_ip, request.proxy_port, request.mark, request.mask)
        for ports in request.ports:
            items.append(MangleRule(family, pre, tproxy, comment, request.in_interface, "tcp",
                                    dport=ports))
        for ports in request.udp_ports:
            items.append(MangleRule(family, pre, tproxy, comment, request.in_interface, "udp",
                                    dport=ports))
        items.append(MangleRule(family, "PREROUTING", Jump(pre), comment, first=True))
        if request.block_quic:
            items.append(MangleRule(family, "FORWARD", Reject(), comment, request.in_interface,
                                    "udp", dport=QUIC_PORT, first=True, table="filter"))
    return Plan(request, tuple(items))


# ---------------------------------------------------------------- parsing


def check_instance(name: str) -> str:
    """Return ``name`` if it can name an instance (it becomes part of chain names)."""
    if not _INSTANCE_RE.match(name):
        raise PlanError(f"bad instance name {name!r}: 1-14 letters, digits, '_' or '-'")
    return name


def validate_request(request: PlanRequest) -> None:
    """Raise :class:`PlanError` naming the first bad field of ``request``."""
    check_instance(request.instance)
    for name in (request.in_interface, request.out_interface):
        if not _IFNAME_RE.match(name):
            raise PlanError(f"bad interface name {name!r}")
    if not request.ports and not request.udp_ports:
        raise PlanError("no ports given")
    if request.block_quic and any(r.first <= 443 <= r.last for r in request.udp_ports):
        raise PlanError("--block-quic rejects UDP port 443, which --udp-port diverts: "
                        "drop one of them")
    if not 1 <= request.proxy_port <= 65535:
        raise PlanError(f"proxy port {request.proxy_port} is out of range 1-65535")
    if not request.families or set(request.families) - {4, 6}:
        raise PlanError(f"bad address families {request.families!r}")
    if len(set(request.families)) != len(request.families):
        raise PlanError("address family given twice")
    check_address(request.proxy_v4, 4)
    check_address(request.proxy_v6, 6)
    if not 0 < request.mask <= 0xFFFFFFFF:
        raise PlanError(f"mask {request.mask:#x} must be 1-0xffffffff")
    if not 0 < request.mark <= 0xFFFFFFFF or request.mark & ~request.mask:
        raise PlanError(
            f"mark {request.mark:#x} must be non-zero and within mask {request.mask:#x}"
        )
    if request.table in _RESERVED_TABLES or not 0 < request.table <= 0xFFFFFFFF:
        raise PlanError(f"route table {request.table} is reserved or out of range")
    if not 0 < request.priority < 32766:
        raise PlanError(f"rule priority {request.priority} must be 1-32765 (before 'main')")


def check_address(text: str, family: Family) -> str:
    """Return ``text`` if it is an IPv``family`` address, else raise :class:`PlanError`."""
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        raise PlanError(f"bad IPv{family} address {text!r}") from None
    if address.version != family:
        raise PlanError(f"{text!r} is not an IPv{family} address")
    return str(address)


def parse_number(text: str, what: str) -> int:
    """Parse a decimal or ``0x`` hex number."""
    try:
        return int(text, 0)
    except ValueError:
        raise PlanError(f"bad {what} {text!r}") from None


def parse_mark(text: str) -> tuple[int, int]:
    """Parse ``MARK`` or ``MARK/MASK`` (decimal or hex) into (mark, mask)."""
    mark_text, slash, mask_text = text.partition("/")
    mark = parse_number(mark_text, "mark")
    mask = parse_number(mask_text, "mask") if slash else DEFAULT_MASK
    return mark, mask


def build_request(
    in_interface: str,
    out_interface: str,
    ports: str | list[str] | None,
    *,
    udp_ports: str | list[str] | None = None,
    block_quic: bool = False,
    proxy_port: int | str = DEFAULT_PROXY_PORT,
    proxy_addresses: list[str] | None = None,
    mark: str = str(DEFAULT_MARK),
    table: int | str = DEFAULT_TABLE,
    priority: int | str = DEFAULT_PRIORITY,
    ipv4: bool = False,
    ipv6: bool = False,
    instance: str = DEFAULT_INSTANCE,
) -> PlanRequest:
    """Turn command-line style strings into a validated :class:`PlanRequest`.

    ``ipv4``/``ipv6`` select families (neither means both). ``proxy_addresses``
    holds at most one address per family; a family not given keeps its default.
    """
    if not ports and not udp_ports:
        raise PlanError("no ports to divert: give --port and/or --udp-port")
    try:
        port_ranges = parse_ports(ports) if ports else ()
        udp_ranges = parse_ports(udp_ports) if udp_ports else ()
        proxy = parse_port(str(proxy_port), "proxy port")
    except PortSpecError as exc:
        raise PlanError(str(exc)) from None
    families: tuple[Family, ...] = (4, 6) if ipv4 == ipv6 else (4,) if ipv4 else (6,)
    v4, v6 = DEFAULT_PROXY_V4, DEFAULT_PROXY_V6
    seen: set[int] = set()
    for text in proxy_addresses or []:
        try:
            address = ipaddress.ip_address(text)
        except ValueError:
            raise PlanError(f"bad proxy address {text!r}") from None
        if address.version in seen:
            raise PlanError(f"two IPv{address.version} proxy addresses given")
        seen.add(address.version)
        if address.version == 4:
            v4 = str(address)
        else:
            v6 = str(address)
    mark_value, mask_value = parse_mark(mark)
    request = PlanRequest(
        in_interface=in_interface,
        out_interface=out_interface,
        ports=port_ranges,
        proxy_port=proxy,
        proxy_v4=v4,
        proxy_v6=v6,
        mark=mark_value,
        mask=mask_value,
        table=parse_number(str(table), "route table"),
        priority=parse_number(str(priority), "rule priority"),
        families=families,
        instance=instance,
        udp_ports=udp_ranges,
        block_quic=block_quic,
    )
    validate_request(request)
    return request


# ---------------------------------------------------------------- JSON codec

_CODEC_TYPES: dict[str, type] = {
    cls.__name__: cls
    for cls in (Jump, SetMark, Accept, Tproxy, Reject, Chain, MangleRule, IpRule, LocalRoute,
                UnknownRule, PortRange)
}


def item_to_json(value: Any) -> Any:
    """Encode a plan item (or target, port range) as JSON-able data."""
    if type(value).__name__ in _CODEC_TYPES:
        fields = {k: item_to_json(getattr(value, k)) for k in value.__dataclass_fields__}
        return {"type": type(value).__name__, **fields}
    return value


def item_from_json(data: Any) -> Any:
    """Inverse of :func:`item_to_json`."""
    if isinstance(data, dict) and data.get("type") in _CODEC_TYPES:
        cls = _CODEC_TYPES[data["type"]]
        return cls(**{k: item_from_json(v) for k, v in data.items() if k != "type"})
    if isinstance(data, list):
        return [item_from_json(v) for v in data]
    return data

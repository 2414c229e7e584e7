"""The routing plan: every chain, rule, ip rule and route interception needs.

A :class:`Plan` is pure data computed from the arguments by :func:`make_plan`,
with no I/O, so it can be printed (``--dry-run``), compared with what is
installed (``status``, refusing a different plan), stored (``/run/tproxy``)
and handed to a backend (python-iptables or nftables, with pyroute2 for ip
rules and routes; ``request.backend = "nft"`` renders the chains and rules as
one :class:`NftTable`, see :mod:`.nftrules`). The items are in installation
order; removal is the reverse order. The item classes live in :mod:`.items`
(so backends and the renderer need not import the plan); they are
re-exported here.

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
import os
import re
from dataclasses import dataclass, field, fields
from typing import Any

# tproxy's modules import item names from .items; ``X as X`` marks the few re-exports.
from .items import COMMENT_PREFIX as COMMENT_PREFIX
from .items import (
    DEFAULT_INSTANCE,
    INSTANCE_RE,
    Accept,
    Chain,
    Family,
    IpRule,
    Item,
    Jump,
    LocalRoute,
    MangleRule,
    NftTable,
    Reject,
    Return,
    SetMark,
    Tproxy,
    UnknownRule,
    chain_names,
    comment_for,
    out_chain_name,
)
from .items import Found as Found
from .items import Target as Target
from .items import instance_of_chain as instance_of_chain
from .nftrules import NFT_CGROUP_BASE, table_item
from .ports import PortRange, PortSpecError, parse_port, parse_ports

#: Protocol number tagging our ip rules and routes (``ip rule ... protocol 116``).
RT_PROTO = 116
DEFAULT_PROXY_PORT = 9091
DEFAULT_PROXY_V4 = "127.0.0.1"
DEFAULT_PROXY_V6 = "::1"
DEFAULT_MARK = 1
DEFAULT_MASK = 0xFFFFFFFF
DEFAULT_TABLE = 100
DEFAULT_PRIORITY = 100
#: SO_MARK of the proxy's outgoing sockets under ``--local`` ("tp"); see ``run --mark``.
DEFAULT_PROXY_MARK = 0x7470
BACKENDS = ("iptables", "nft")
_IFNAME_RE = re.compile(r"^[^\s/:]{1,15}$")
_RESERVED_TABLES = {0: "unspec", 253: "default", 254: "main", 255: "local"}


class PlanError(ValueError):
    """An argument that cannot make a plan (bad port, address, mark, ...)."""


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
    #: ``iptables`` (python-iptables, legacy x_tables) or ``nft`` (one inet table).
    backend: str = "iptables"
    #: Also divert the gateway's own connections (``--local``).
    local: bool = False
    exclude_uids: tuple[int, ...] = ()
    #: cgroup v2 paths relative to the v2 root (``-m cgroup --path``, as in /proc/PID/cgroup).
    exclude_cgroups: tuple[str, ...] = ()
    #: nft only: the cgroup v2 hierarchy as nft finds it under /sys/fs/cgroup
    #: (``unified`` on hybrid hosts, ``""`` where /sys/fs/cgroup is cgroup2).
    nft_cgroup_dir: str = ""
    #: The SO_MARK of the proxy's own outgoing sockets, never captured by ``--local``.
    proxy_mark: int = DEFAULT_PROXY_MARK

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict (ports as ``[first, last]`` pairs)."""
        data = {f.name: getattr(self, f.name) for f in fields(self)}  # asdict copies deeply
        for key in _PORT_FIELDS:
            data[key] = [[r.first, r.last] for r in getattr(self, key)]
        data["families"] = list(self.families)
        data["exclude_uids"] = list(self.exclude_uids)
        data["exclude_cgroups"] = list(self.exclude_cgroups)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PlanRequest:
        """Inverse of :meth:`to_json` (fields missing from older records keep defaults)."""
        data = dict(data)
        for key in _PORT_FIELDS:
            if key in data:
                data[key] = tuple(PortRange(a, b) for a, b in data[key])
        data["families"] = tuple(data["families"])
        for key in ("exclude_uids", "exclude_cgroups"):
            if key in data:
                data[key] = tuple(data[key])
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
                MangleRule(
                    family,
                    pre,
                    Jump(divert),
                    comment,
                    request.in_interface,
                    "tcp",
                    dport=ports,
                    not_syn=True,
                    socket_transparent=True,
                )
            )
            items.append(
                MangleRule(
                    family,
                    pre,
                    Jump(divert),
                    comment,
                    request.out_interface,
                    "tcp",
                    sport=ports,
                    socket_transparent=True,
                )
            )
        # UDP: only the servers' replies take the socket shortcut. The client's
        # datagrams always meet TPROXY, whose own socket lookup finds a session
        # socket (transparent, bound to the original destination) before the listener.
        for ports in request.udp_ports:
            items.append(
                MangleRule(
                    family,
                    pre,
                    Jump(divert),
                    comment,
                    request.out_interface,
                    "udp",
                    sport=ports,
                    socket_transparent=True,
                )
            )
        tproxy = Tproxy(on_ip, request.proxy_port, request.mark, request.mask)
        by_protocol = (("tcp", request.ports), ("udp", request.udp_ports))
        for protocol, port_ranges in by_protocol:
            for ports in port_ranges:
                items.append(
                    MangleRule(
                        family, pre, tproxy, comment, request.in_interface, protocol, dport=ports
                    )
                )
        if request.local:
            items += _local_items(request, family, tproxy, comment)
        items.append(MangleRule(family, "PREROUTING", Jump(pre), comment, first=True))
        if request.local:
            out = out_chain_name(request.instance)
            items.append(MangleRule(family, "OUTPUT", Jump(out), comment, first=True))
        if request.block_quic:
            items.append(
                MangleRule(
                    family,
                    "FORWARD",
                    Reject(),
                    comment,
                    request.in_interface,
                    "udp",
                    dport=QUIC_PORT,
                    first=True,
                    table="filter",
                )
            )
    if request.backend == "nft":
        per_item = [i for i in items if isinstance(i, IpRule | LocalRoute)]
        rules = [i for i in items if isinstance(i, Chain | MangleRule)]
        items = [*per_item, table_item(request, rules)]
    return Plan(request, tuple(items))


def _local_items(request: PlanRequest, family: Family, tproxy: Tproxy, comment: str) -> list[Item]:
    """``--local``: the OUTPUT chain marking the gateway's own flows, and TPROXY on ``lo``.

    Marked in a route-type OUTPUT hook, the packets are routed again: the
    fwmark rule sends them to the local table, so they loop back through
    ``lo``, where PREROUTING hands them to the proxy. The proxy's own sockets
    (``proxy_mark``), loopback destinations and excluded users or cgroups
    return early and are never captured.
    """
    pre, _ = chain_names(request.instance)
    out = out_chain_name(request.instance)
    loopback = "127.0.0.0/8" if family == 4 else "::1/128"
    items: list[Item] = [
        Chain(family, out),
        MangleRule(family, out, Return(), comment, dst=loopback),
        MangleRule(family, out, Return(), comment, match_mark=request.proxy_mark),
    ]
    items += [
        MangleRule(family, out, Return(), comment, uid_owner=uid) for uid in request.exclude_uids
    ]
    items += [
        MangleRule(family, out, Return(), comment, cgroup=path) for path in request.exclude_cgroups
    ]
    by_protocol = (("tcp", request.ports), ("udp", request.udp_ports))
    for protocol, port_ranges in by_protocol:
        for ports in port_ranges:
            items.append(
                MangleRule(
                    family,
                    out,
                    SetMark(request.mark, request.mask),
                    comment,
                    protocol=protocol,
                    dport=ports,
                )
            )
    for protocol, port_ranges in by_protocol:
        for ports in port_ranges:
            items.append(
                MangleRule(
                    family,
                    pre,
                    tproxy,
                    comment,
                    "lo",
                    protocol,
                    dport=ports,
                    match_mark=request.mark,
                    match_mask=request.mask,
                )
            )
    return items


# ---------------------------------------------------------------- parsing


def check_instance(name: str) -> str:
    """Return ``name`` if it can name an instance (it becomes part of chain names)."""
    if not INSTANCE_RE.match(name):
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
        raise PlanError(
            "--block-quic rejects UDP port 443, which --udp-port diverts: drop one of them"
        )
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
    if request.backend not in BACKENDS:
        raise PlanError(f"bad backend {request.backend!r}: iptables or nft")
    if not 0 < request.proxy_mark <= 0xFFFFFFFF:
        raise PlanError(f"proxy mark {request.proxy_mark:#x} must be 1-0xffffffff")
    if request.local and request.proxy_mark & request.mask == request.mark:
        raise PlanError(
            f"the proxy's mark {request.proxy_mark:#x} would be routed as diverted "
            f"(mark {request.mark:#x}/{request.mask:#x}): pick another"
        )
    if (request.exclude_uids or request.exclude_cgroups) and not request.local:
        raise PlanError("--exclude-uid and --exclude-cgroup need --local")
    for uid in request.exclude_uids:
        if not 0 <= uid <= 0xFFFFFFFE:
            raise PlanError(f"bad uid {uid}")
    for path in request.exclude_cgroups:
        parts = path.split("/")
        if (
            not path
            or len(path) > 200
            or any(c in path for c in '"\n\0\\')
            or any(p in ("", ".", "..") for p in parts)
        ):
            raise PlanError(f"bad cgroup path {path!r}")


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
    backend: str = "iptables",
    local: bool = False,
    exclude_uids: list[str] | None = None,
    exclude_cgroups: list[str] | None = None,
    proxy_mark: str | int = DEFAULT_PROXY_MARK,
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
        backend=backend,
        local=local,
        exclude_uids=tuple(dict.fromkeys(_uid(text) for text in exclude_uids or ())),
        exclude_cgroups=tuple(dict.fromkeys(_cgroup(text) for text in exclude_cgroups or ())),
        nft_cgroup_dir=nft_cgroup_dir() if exclude_cgroups and backend == "nft" else "",
        proxy_mark=parse_number(str(proxy_mark), "proxy mark"),
    )
    validate_request(request)
    return request


def _uid(text: str) -> int:
    """A uid as a number, or a user name looked up in the password database."""
    if text.isdigit():
        return int(text)
    import pwd

    try:
        return pwd.getpwnam(text).pw_uid
    except KeyError:
        raise PlanError(f"no such user {text!r}") from None


def cgroup2_mount() -> str | None:
    """Where the cgroup v2 hierarchy is mounted here, or None (``ip netns exec`` hides it)."""
    try:
        with open("/proc/self/mounts") as handle:
            for line in handle:
                fields = line.split()
                if len(fields) > 2 and fields[2] == "cgroup2":
                    return fields[1]
    except OSError:
        pass
    return None


def cgroup2_root() -> str:
    """Where the cgroup v2 hierarchy is mounted (``/sys/fs/cgroup/unified`` on hybrid hosts)."""
    return cgroup2_mount() or NFT_CGROUP_BASE


def nft_cgroup_dir() -> str:
    """The cgroup v2 mount relative to /sys/fs/cgroup, where nft looks cgroups up.

    nft's ``socket cgroupv2`` takes a path it resolves itself under
    /sys/fs/cgroup (fixed in nft), so the v2 hierarchy must be mounted there
    (or below: ``unified`` on hybrid hosts) in this mount namespace.
    """
    mount = cgroup2_mount()
    if mount is None:
        raise PlanError(
            "--exclude-cgroup: no cgroup2 file system is mounted here "
            "(ip netns exec hides it: run setup with nsenter --net=/run/netns/NAME)"
        )
    if mount != NFT_CGROUP_BASE and not mount.startswith(NFT_CGROUP_BASE + "/"):
        raise PlanError(
            f"--exclude-cgroup with --backend nft: cgroup2 is mounted at {mount}, "
            f"but nft finds cgroups only under {NFT_CGROUP_BASE}"
        )
    return mount[len(NFT_CGROUP_BASE) :].strip("/")


def cgroup_problem(path: str, backend: str) -> str | None:
    """Why ``--exclude-cgroup PATH`` cannot be installed here (None: it can).

    The cgroup must exist: python-iptables' ``-m cgroup --path`` is resolved by
    the kernel against the v2 root (EINVAL if missing), nft's by nft itself
    under /sys/fs/cgroup. Where no cgroup2 is mounted (``ip netns exec``)
    only the iptables backend can go on, and the kernel checks the path.
    """
    mount = cgroup2_mount()
    if mount is None:
        if backend == "nft":
            return f"--exclude-cgroup {path}: no cgroup2 file system is mounted here"
        return None
    if not os.path.isdir(os.path.join(mount, path)):
        return f"--exclude-cgroup {path}: no such cgroup (no directory {mount}/{path})"
    return None


def _cgroup(text: str) -> str:
    """A cgroup v2 path relative to the v2 root (an absolute path under the mount is cut)."""
    path = text.strip()
    root = cgroup2_root()
    if path.startswith(root + "/"):
        path = path[len(root) :]
    return path.strip("/")


# ---------------------------------------------------------------- JSON codec

_CODEC_TYPES: dict[str, type] = {
    cls.__name__: cls
    for cls in (
        Jump,
        SetMark,
        Accept,
        Tproxy,
        Reject,
        Return,
        NftTable,
        Chain,
        MangleRule,
        IpRule,
        LocalRoute,
        UnknownRule,
        PortRange,
    )
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

"""The items of a routing plan, and the names that mark chains and rules as ours.

Pure data with no I/O and no dependence on how a plan is made
(:mod:`.plan`), so backends, the nft renderer (:mod:`.nftrules`) and the
plan all share one vocabulary. Each item is one thing a backend installs:
a chain of ours, a mangle (or filter) rule, an ip rule, a local route, or
the nftables backend's whole table. :class:`UnknownRule` is what a backend
reports for a rule of ours it cannot parse; it is never part of a plan.

Ownership by name: our chains are ``TPROXY_PRE``/``TPROXY_DIVERT``/
``TPROXY_OUT`` (+ ``_INSTANCE`` except for the default instance), our rules
carry the comment ``tproxy:INSTANCE``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from .ports import PortRange

Family = Literal[4, 6]

DEFAULT_INSTANCE = "default"
CHAIN_PREFIX_PRE = "TPROXY_PRE"
CHAIN_PREFIX_DIVERT = "TPROXY_DIVERT"
CHAIN_PREFIX_OUT = "TPROXY_OUT"
COMMENT_PREFIX = "tproxy:"
#: What can name an instance (it becomes part of chain and table names).
INSTANCE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,13}$")


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
class Return:
    """``-j RETURN``: leave our chain (``--local`` skips loopback, the proxy, excluded users)."""


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


Target = Jump | SetMark | Accept | Tproxy | Reject | Return


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
    #: ``-d NET``: destination network (``--local``'s loopback exemption).
    dst: str | None = None
    #: ``-m mark --mark MATCH_MARK/MATCH_MASK``.
    match_mark: int | None = None
    match_mask: int = 0xFFFFFFFF
    #: ``-m owner --uid-owner UID``.
    uid_owner: int | None = None
    #: ``-m cgroup --path PATH`` (cgroup v2, relative to the cgroup root).
    cgroup: str | None = None


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


@dataclass(frozen=True)
class NftTable:
    """The nftables backend's whole share of a plan: one ``inet`` table, applied atomically.

    ``digest`` identifies the rendered batch, ``rules`` counts its rules; both
    are also written into the comment of the table's first rule, so what is
    installed can be compared with a plan without parsing rules back.
    ``mark``/``mask``/``route_table`` let ip rules be attributed without a
    record. ``script`` (the table's sets, chains and rules as an ``nft -f``
    script, :func:`.nftrules.batch` puts the table's own command before it) is
    not part of equality: a table read back from the kernel has none.
    """

    name: str
    instance: str
    digest: str
    rules: int
    mark: int
    mask: int
    route_table: int
    script: str = field(default="", compare=False, hash=False, repr=False)


Item = Chain | MangleRule | IpRule | LocalRoute | NftTable


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


# ---------------------------------------------------------------- names


def chain_names(instance: str) -> tuple[str, str]:
    """Our (PREROUTING part, divert) chain names for an instance."""
    suffix = "" if instance == DEFAULT_INSTANCE else f"_{instance}"
    return CHAIN_PREFIX_PRE + suffix, CHAIN_PREFIX_DIVERT + suffix


def out_chain_name(instance: str) -> str:
    """Our OUTPUT chain (``--local``) for an instance."""
    return CHAIN_PREFIX_OUT + ("" if instance == DEFAULT_INSTANCE else f"_{instance}")


def instance_of_chain(name: str) -> str | None:
    """The instance owning a chain called ``name``, or None if it is not ours."""
    for prefix in (CHAIN_PREFIX_DIVERT, CHAIN_PREFIX_PRE, CHAIN_PREFIX_OUT):
        if name == prefix:
            return DEFAULT_INSTANCE
        if name.startswith(prefix + "_"):
            rest = name[len(prefix) + 1 :]
            if INSTANCE_RE.match(rest) and rest != DEFAULT_INSTANCE:
                return rest
    return None


def comment_for(instance: str) -> str:
    """The ``-m comment`` text that tags our rules."""
    return COMMENT_PREFIX + instance

"""Our nftables table as an ``nft -f`` script: rendered from a plan, read back from the kernel.

Pure, no I/O: :mod:`.plan` renders with it, :mod:`.nft` (the backend) applies
and lists what it renders. :func:`table_item` turns the iptables-shaped
items of a plan (chains and mangle/filter rules, both families) into the
body of one script in nft's text syntax; :func:`batch` puts it behind the
table's own command::

    create table inet tproxy_INSTANCE   # a fresh install: fails if the name is taken
    add table inet tproxy_INSTANCE      # or, replacing our own table:
    delete table inet tproxy_INSTANCE   #   whatever an earlier setup left goes
    add table inet tproxy_INSTANCE      #   in the same transaction
    ...                                 # then every set, chain and rule

Text, not libnftables' JSON: nft 1.0.6's JSON input has no cgroupv2 match
(``socket cgroupv2 level N "PATH"``, ``--exclude-cgroup``), and JSON and text
cannot share one transaction. The kernel applies a script as one
transaction: either the whole new table is there, or (any error) nothing
changed and the previous table is untouched. Our base chains hook where
iptables' mangle (and filter) tables do: ``prerouting`` (filter, priority
mangle), ``output`` (type route, priority mangle: a changed mark re-routes the
packet) and ``forward`` (filter, priority filter); per-family regular chains
(``tproxy_pre4``, ...) hold the rules, entered with ``meta nfproto ipv4 jump
...``. Rules that differ only in their ports become one rule matching a named
interval set (``tcp dport @ports0``), shared by both families. Other tables,
even with the same hooks and priorities, are never touched.

Ownership: the table is ours by its name (``tproxy_`` + instance) and by the
comment ``tproxy:INSTANCE`` on its rules; the first rule's comment also says
``d=DIGEST n=RULES m=MARK/MASK t=TABLE``, so ``status`` compares what is
installed with a plan (digest and rule count, :func:`read_table`) and ip
rules can be attributed without a record.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .items import (
    Accept,
    Chain,
    Family,
    Item,
    Jump,
    MangleRule,
    NftTable,
    Reject,
    Return,
    SetMark,
    Tproxy,
)
from .ports import PortRange

if TYPE_CHECKING:
    from .plan import PlanRequest

NFT_TABLE_PREFIX = "tproxy_"
FAMILY = "inet"
#: Where iptables' tables hook: (nft chain, type, hook, priority).
BASE_CHAINS = {
    "PREROUTING": ("prerouting", "filter", "prerouting", -150),
    "OUTPUT": ("output", "route", "output", -150),
    "FORWARD": ("forward", "filter", "forward", 0),
}
#: Where nft looks cgroup v2 paths up (``socket cgroupv2``): fixed in nft itself.
NFT_CGROUP_BASE = "/sys/fs/cgroup"
_META_RE = re.compile(r"d=(\w+) n=(\d+) m=(0x[0-9a-f]+)/(0x[0-9a-f]+) t=(\d+)")
_NFPROTO = {4: "ipv4", 6: "ipv6"}
_FULL = 0xFFFFFFFF


def table_name(instance: str) -> str:
    """The nft table owned by an instance."""
    return NFT_TABLE_PREFIX + instance


def chain_name(family: Family, chain: str) -> str:
    """The nft name of one of our regular chains (per family: one inet table holds both)."""
    return f"{chain.lower()}{family}"


# ---------------------------------------------------------------- rendering


def _port(ports: PortRange) -> str:
    return str(ports.first) if ports.first == ports.last else f"{ports.first}-{ports.last}"


def _set_mark(mark: int, mask: int) -> str:
    if mask == _FULL:
        return f"meta mark set {mark:#x}"
    return f"meta mark set meta mark & {~mask & _FULL:#x} | {mark:#x}"


def cgroup_match(path: str, cgroup_dir: str) -> str:
    """``socket cgroupv2 level N "PATH"`` for a cgroup v2 ``path`` relative to the v2 root.

    nft resolves PATH under /sys/fs/cgroup (:data:`NFT_CGROUP_BASE`), where
    ``cgroup_dir`` is the v2 hierarchy (``unified`` on hybrid hosts, ``""``
    where /sys/fs/cgroup is cgroup2 itself); the kernel compares the id of the
    socket's cgroup's ancestor at LEVEL, the depth of ``path`` in the v2
    hierarchy, so ``path`` and everything below it match.
    """
    level = len([part for part in path.split("/") if part])
    full = f"{cgroup_dir}/{path}" if cgroup_dir else path
    return f'socket cgroupv2 level {level} "{full}"'


def rule_text(rule: MangleRule, ports: str | None = None, cgroup_dir: str = "") -> str:
    """One plan rule in nft's syntax (matches in iptables' order, then the verdict).

    ``ports`` replaces the rule's one ``dport`` or ``sport`` range (the name of
    a set, ``@ports0``: the rules of a plan that differ only in their ports
    become one rule). ``cgroup_dir``: see :func:`cgroup_match`.
    """
    words: list[str] = []
    target = rule.target
    base = rule.chain in BASE_CHAINS
    if base or rule.dst or isinstance(target, Tproxy | Reject):
        words.append(f"meta nfproto {_NFPROTO[rule.family]}")
    if rule.in_interface is not None:
        words.append(f'iifname "{rule.in_interface}"')
    if rule.dst is not None:
        words.append(f"{'ip' if rule.family == 4 else 'ip6'} daddr {rule.dst}")
    if rule.protocol is not None:
        words.append(f"meta l4proto {rule.protocol}")
    for field, one in (("sport", rule.sport), ("dport", rule.dport)):
        if one is not None:
            words.append(f"{rule.protocol or 'tcp'} {field} {ports or _port(one)}")
    if rule.not_syn:
        words.append("tcp flags & (fin|syn|rst|ack) != syn")
    if rule.socket_transparent:
        words.append("socket transparent 1")
    if rule.match_mark is not None:
        if rule.match_mask != _FULL:
            words.append(f"meta mark & {rule.match_mask:#x} == {rule.match_mark:#x}")
        else:
            words.append(f"meta mark {rule.match_mark:#x}")
    if rule.uid_owner is not None:
        words.append(f"meta skuid {rule.uid_owner}")
    if rule.cgroup is not None:
        words.append(cgroup_match(rule.cgroup, cgroup_dir))
    if isinstance(target, Jump):
        words.append(f"jump {chain_name(rule.family, target.chain)}")
    elif isinstance(target, Accept):
        words.append("accept")
    elif isinstance(target, Return):
        words.append("return")
    elif isinstance(target, SetMark):
        words.append(_set_mark(target.mark, target.mask))
    elif isinstance(target, Tproxy):
        to = target.on_ip if rule.family == 4 else f"[{target.on_ip}]"
        words.append(f"tproxy {'ip' if rule.family == 4 else 'ip6'} to {to}:{target.on_port}")
        words.append(_set_mark(target.mark, target.mask))
        words.append("accept")
    elif isinstance(target, Reject):
        icmp = "icmp" if rule.family == 4 else "icmpv6"
        words.append(f"reject with {icmp} type port-unreachable")
    return " ".join(words)


#: A rule's fields but its ports: rules equal in these differ only in their ports.
_BUT_PORTS = tuple(
    f.name for f in dataclasses.fields(MangleRule) if f.name not in ("dport", "sport")
)


def table_item(request: PlanRequest, items: Sequence[Item]) -> NftTable:
    """Render the chains and rules of a plan into the :class:`NftTable` that installs them."""
    name = table_name(request.instance)
    where = f"{FAMILY} {name}"
    bases: dict[str, str] = {}
    chains: list[str] = []
    sets: dict[tuple[PortRange, ...], str] = {}
    rules: list[tuple[str, str, str]] = []  # (chain, rule text, comment)
    # Rules that differ only in their port range become one rule matching a
    # set of ranges, in the place of the first (all of one kind come before
    # the next kind in a plan, so the order of kinds is kept).
    merged: dict[tuple[object, ...], tuple[MangleRule, list[PortRange]]] = {}
    for item in items:
        if isinstance(item, Chain):
            chains.append(f"add chain {where} {chain_name(item.family, item.name)}")
            continue
        assert isinstance(item, MangleRule)
        one = item.dport or item.sport
        if one is None:
            merged[(item,)] = (item, [])
            continue
        key = (*(getattr(item, name) for name in _BUT_PORTS), item.dport is None)
        merged.setdefault(key, (item, []))[1].append(one)
    for item, ranges in merged.values():
        if item.chain in BASE_CHAINS:
            nft_name, kind, hook, prio = BASE_CHAINS[item.chain]
            bases.setdefault(
                nft_name,
                f"add chain {where} {nft_name} "
                f"{{ type {kind} hook {hook} priority {prio}; policy accept; }}",
            )
            chain = nft_name
        else:
            chain = chain_name(item.family, item.chain)
        ports = None
        if len(ranges) > 1:
            ports = "@" + sets.setdefault(tuple(ranges), f"ports{len(sets)}")
        rules.append((chain, rule_text(item, ports, request.nft_cgroup_dir), item.comment))
    set_lines: list[str] = []
    for members, set_name in sets.items():
        set_lines.append(f"add set {where} {set_name} {{ type inet_service; flags interval; }}")
        elements = ", ".join(_port(r) for r in members)
        set_lines.append(f"add element {where} {set_name} {{ {elements} }}")
    plain = [f"add rule {where} {chain} {text}" for chain, text, _ in rules]
    digest = hashlib.sha256(
        "\n".join([*bases.values(), *chains, *set_lines, *plain]).encode()
    ).hexdigest()[:16]
    rule_lines = []
    for index, (line, (_, _, comment)) in enumerate(zip(plain, rules, strict=True)):
        if index == 0:
            comment += (
                f" d={digest} n={len(rules)} "
                f"m={request.mark:#x}/{request.mask:#x} t={request.table}"
            )
        rule_lines.append(f'{line} comment "{comment}"')
    body = "\n".join([*bases.values(), *chains, *set_lines, *rule_lines]) + "\n"
    return NftTable(
        name,
        request.instance,
        digest,
        len(rules),
        request.mark,
        request.mask,
        request.table,
        body,
    )


def batch(table: NftTable, replace: bool = False) -> str:
    """The whole script that installs ``table``: the table's own command, then its body.

    A fresh install *creates* the table (the kernel refuses if the name is
    taken, so a foreign table is never merged into). ``replace`` swaps our own
    table in one transaction: ``add; delete; add``. Deleting a table with base
    chains waits for the kernel to unhook them (about 10 ms here), which a
    fresh install never pays.
    """
    head = f"table {FAMILY} {table.name}"
    if replace:
        return f"add {head}\ndelete {head}\nadd {head}\n{table.script}"
    return f"create {head}\n{table.script}"


def delete_script(name: str) -> str:
    """The script that removes one table (and nothing else)."""
    return f"delete table {FAMILY} {name}\n"


def setup_lines(table: NftTable, replace: bool = False) -> list[str]:
    """Shell lines applying the table's script (for ``--dry-run``)."""
    return ["nft -f - <<'EOF'", *batch(table, replace).splitlines(), "EOF"]


def read_table(objects: list[dict[str, Any]], name: str) -> NftTable | None:
    """An installed table of ours as an :class:`NftTable` (None if it is not ours)."""
    instance = name[len(NFT_TABLE_PREFIX) :]
    rules = [o["rule"] for o in objects if "rule" in o]
    comments = [str(r.get("comment", "")) for r in rules]
    if not any(c.startswith("tproxy:" + instance) for c in comments):
        return None
    for comment in comments:
        meta = _META_RE.search(comment)
        if meta:
            digest, _, mark, mask, table = meta.groups()
            return NftTable(
                name, instance, digest, len(rules), int(mark, 16), int(mask, 16), int(table)
            )
    return NftTable(name, instance, "?", len(rules), 0, 0, 0)

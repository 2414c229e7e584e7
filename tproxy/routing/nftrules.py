"""Our nftables table as libnftables JSON: rendered from a plan, read back from the kernel.

Pure, no I/O: :mod:`.plan` renders with it, :mod:`.nft` (the backend) applies
and lists what it renders. :func:`table_item` turns the iptables-shaped
items of a plan (chains and mangle/filter rules, both families) into one
libnftables JSON batch::

    add table inet tproxy_INSTANCE      # so that the delete cannot fail
    delete table inet tproxy_INSTANCE   # whatever an earlier setup left
    add table inet tproxy_INSTANCE      # then every chain and rule

The kernel applies a batch as one transaction: either the whole new table is
there, or (any error) nothing changed and the previous table is untouched.
Our base chains hook where iptables' mangle (and filter) tables do:
``prerouting`` (filter, priority mangle), ``output`` (type route, priority
mangle: a changed mark re-routes the packet) and ``forward`` (filter,
priority filter); per-family regular chains (``tproxy_pre4``, ...) hold the
rules, entered with ``meta nfproto ipv4 jump ...``. Other tables, even with
the same hooks and priorities, are never touched.

Ownership: the table is ours by its name (``tproxy_`` + instance) and by the
comment ``tproxy:INSTANCE`` on its rules; the first rule's comment also says
``d=DIGEST n=RULES m=MARK/MASK t=TABLE``, so ``status`` compares what is
installed with a plan (digest and rule count, :func:`read_table`) and ip
rules can be attributed without a record.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
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


def _match(left: Any, right: Any, op: str = "==") -> dict[str, Any]:
    return {"match": {"op": op, "left": left, "right": right}}


def _meta(key: str) -> dict[str, Any]:
    return {"meta": {"key": key}}


def _port(ports: PortRange) -> Any:
    return ports.first if ports.first == ports.last else {"range": [ports.first, ports.last]}


def _ports(ranges: list[PortRange]) -> Any:
    """One range as itself, several as an anonymous set: one rule matches them all."""
    return _port(ranges[0]) if len(ranges) == 1 else {"set": [_port(r) for r in ranges]}


def _set_mark(mark: int, mask: int) -> dict[str, Any]:
    value: Any = mark
    if mask != _FULL:
        value = {"|": [{"&": [_meta("mark"), ~mask & _FULL]}, mark]}
    return {"mangle": {"key": _meta("mark"), "value": value}}


def rule_exprs(rule: MangleRule, ports: list[PortRange] | None = None) -> list[dict[str, Any]]:
    """The nft expressions of one plan rule (matches in iptables' order, then the verdict).

    ``ports`` replaces the rule's one ``dport`` or ``sport`` range with several
    (the rules of a plan that differ only in their ports become one rule).
    """
    exprs: list[dict[str, Any]] = []
    target = rule.target
    base = rule.chain in BASE_CHAINS
    if base or rule.dst or isinstance(target, Tproxy | Reject):
        exprs.append(_match(_meta("nfproto"), _NFPROTO[rule.family]))
    if rule.in_interface is not None:
        exprs.append(_match(_meta("iifname"), rule.in_interface))
    if rule.dst is not None:
        address, _, length = rule.dst.partition("/")
        exprs.append(
            _match(
                {"payload": {"protocol": "ip" if rule.family == 4 else "ip6", "field": "daddr"}},
                {"prefix": {"addr": address, "len": int(length)}},
            )
        )
    if rule.protocol is not None:
        exprs.append(_match(_meta("l4proto"), rule.protocol))
    for field, one in (("sport", rule.sport), ("dport", rule.dport)):
        if one is not None:
            exprs.append(
                _match(
                    {"payload": {"protocol": rule.protocol or "tcp", "field": field}},
                    _ports(ports or [one]),
                )
            )
    if rule.not_syn:
        flags = {
            "&": [{"payload": {"protocol": "tcp", "field": "flags"}}, ["fin", "syn", "rst", "ack"]]
        }
        exprs.append(_match(flags, "syn", "!="))
    if rule.socket_transparent:
        exprs.append(_match({"socket": {"key": "transparent"}}, 1))
    if rule.match_mark is not None:
        left: Any = _meta("mark")
        if rule.match_mask != _FULL:
            left = {"&": [left, rule.match_mask]}
        exprs.append(_match(left, rule.match_mark))
    if rule.uid_owner is not None:
        exprs.append(_match(_meta("skuid"), rule.uid_owner))
    if rule.cgroup is not None:  # refused by validate_request (no JSON for it here)
        raise ValueError("the nft backend cannot match a cgroup")
    if isinstance(target, Jump):
        exprs.append({"jump": {"target": chain_name(rule.family, target.chain)}})
    elif isinstance(target, Accept):
        exprs.append({"accept": None})
    elif isinstance(target, Return):
        exprs.append({"return": None})
    elif isinstance(target, SetMark):
        exprs.append(_set_mark(target.mark, target.mask))
    elif isinstance(target, Tproxy):
        exprs.append(
            {
                "tproxy": {
                    "family": "ip" if rule.family == 4 else "ip6",
                    "addr": target.on_ip,
                    "port": target.on_port,
                }
            }
        )
        exprs.append(_set_mark(target.mark, target.mask))
        exprs.append({"accept": None})
    elif isinstance(target, Reject):
        exprs.append(
            {
                "reject": {
                    "type": "icmp" if rule.family == 4 else "icmpv6",
                    "expr": "port-unreachable",
                }
            }
        )
    return exprs


def table_item(request: PlanRequest, items: Sequence[Item]) -> NftTable:
    """Render the chains and rules of a plan into the :class:`NftTable` that installs them."""
    name = table_name(request.instance)
    where = {"family": FAMILY, "table": name}
    chains: list[dict[str, Any]] = []
    rules: list[dict[str, Any]] = []
    bases: dict[str, dict[str, Any]] = {}
    # Rules that differ only in their port range become one rule with a set of
    # ranges, in the place of the first (all of one kind come before the next
    # kind in a plan, so the order of kinds is kept).
    merged: dict[tuple[MangleRule, bool], tuple[MangleRule, list[PortRange]]] = {}
    for item in items:
        if isinstance(item, Chain):
            chains.append({"add": {"chain": {**where, "name": chain_name(item.family, item.name)}}})
            continue
        assert isinstance(item, MangleRule)
        one = item.dport or item.sport
        if one is None:
            merged[(item, False)] = (item, [])
            continue
        key = (dataclasses.replace(item, dport=None, sport=None), True)
        merged.setdefault(key, (item, []))[1].append(one)
    for item, ports in merged.values():
        if item.chain in BASE_CHAINS:
            nft_name, kind, hook, prio = BASE_CHAINS[item.chain]
            bases.setdefault(
                nft_name,
                {
                    "add": {
                        "chain": {
                            **where,
                            "name": nft_name,
                            "type": kind,
                            "hook": hook,
                            "prio": prio,
                            "policy": "accept",
                        }
                    }
                },
            )
            chain = nft_name
        else:
            chain = chain_name(item.family, item.chain)
        rules.append(
            {
                "add": {
                    "rule": {
                        **where,
                        "chain": chain,
                        "comment": item.comment,
                        "expr": rule_exprs(item, ports or None),
                    }
                }
            }
        )
    body = list(bases.values()) + chains + rules
    digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]
    if rules:
        first = rules[0]["add"]["rule"]
        first["comment"] = (
            f"{first['comment']} d={digest} n={len(rules)} "
            f"m={request.mark:#x}/{request.mask:#x} t={request.table}"
        )
    table = {"table": {"family": FAMILY, "name": name}}
    batch = [{"add": table}, {"delete": table}, {"add": table}, *body]
    # One command per line: readable in --dry-run, still one JSON document.
    script = '{"nftables": [\n' + ",\n".join(json.dumps(c) for c in batch) + "\n]}"
    return NftTable(
        name,
        request.instance,
        digest,
        len(rules),
        request.mark,
        request.mask,
        request.table,
        script,
    )


def delete_script(name: str) -> str:
    """The batch that removes one table (and nothing else)."""
    return json.dumps({"nftables": [{"delete": {"table": {"family": FAMILY, "name": name}}}]})


def setup_lines(table: NftTable) -> list[str]:
    """Shell lines applying the table's batch (for ``--dry-run``)."""
    return ["nft -j -f - <<'EOF'", *table.script.splitlines(), "EOF"]


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

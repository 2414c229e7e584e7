"""A plan as the shell commands a person could paste (``--dry-run``).

The commands name ``iptables-legacy``/``ip6tables-legacy`` because the
python-iptables backend writes the legacy x_tables ruleset; on a host whose
``iptables`` is the nft variant a plain ``iptables`` would write elsewhere.
Pasted into ``sh`` in a fresh namespace, :func:`setup_commands` produce the
same ``iptables-legacy-save`` output as ``tproxy setup`` (a netns test checks
this), and :func:`teardown_commands` undo them.
"""

from __future__ import annotations

import shlex

from .items import (
    Accept,
    Chain,
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
)
from .nftrules import setup_lines
from .plan import RT_PROTO, Plan

IPTABLES = {4: "iptables-legacy", 6: "ip6tables-legacy"}


def rule_spec(rule: MangleRule) -> list[str]:
    """The rule's match and target arguments, in iptables-save order."""
    args: list[str] = []
    if rule.dst is not None:
        args += ["-d", rule.dst]
    if rule.in_interface is not None:
        args += ["-i", rule.in_interface]
    if rule.protocol is not None:
        args += ["-p", rule.protocol]
    if rule.dport is not None or rule.sport is not None:
        args += ["-m", rule.protocol or "tcp"]
        if rule.sport is not None:
            args += ["--sport", rule.sport.iptables]
        if rule.dport is not None:
            args += ["--dport", rule.dport.iptables]
    if rule.not_syn:
        if rule.dport is None and rule.sport is None:
            args += ["-m", "tcp"]
        args += ["!", "--syn"]
    if rule.socket_transparent:
        args += ["-m", "socket", "--transparent"]
    if rule.match_mark is not None:
        mark = f"{rule.match_mark:#x}"
        if rule.match_mask != 0xFFFFFFFF:
            mark += f"/{rule.match_mask:#x}"
        args += ["-m", "mark", "--mark", mark]
    if rule.uid_owner is not None:
        args += ["-m", "owner", "--uid-owner", str(rule.uid_owner)]
    if rule.cgroup is not None:
        args += ["-m", "cgroup", "--path", rule.cgroup]
    args += ["-m", "comment", "--comment", rule.comment]
    target = rule.target
    if isinstance(target, Jump):
        args += ["-j", target.chain]
    elif isinstance(target, Accept):
        args += ["-j", "ACCEPT"]
    elif isinstance(target, Return):
        args += ["-j", "RETURN"]
    elif isinstance(target, SetMark):
        args += ["-j", "MARK", "--set-xmark", f"{target.mark:#x}/{target.mask:#x}"]
    elif isinstance(target, Reject):
        icmp = "icmp6" if rule.family == 6 else "icmp"
        args += ["-j", "REJECT", "--reject-with", f"{icmp}-port-unreachable"]
    elif isinstance(target, Tproxy):
        args += [
            "-j",
            "TPROXY",
            "--on-port",
            str(target.on_port),
            "--on-ip",
            target.on_ip,
            "--tproxy-mark",
            f"{target.mark:#x}/{target.mask:#x}",
        ]
    return args


def _ip(family: int) -> list[str]:
    return ["ip", "-4" if family == 4 else "-6"]


def add_command(item: Item) -> list[str]:
    """The argv that installs one item."""
    if isinstance(item, Chain):
        return [IPTABLES[item.family], "-t", "mangle", "-N", item.name]
    if isinstance(item, MangleRule):
        where = ["-I", item.chain, "1"] if item.first else ["-A", item.chain]
        return [IPTABLES[item.family], "-t", item.table, *where, *rule_spec(item)]
    if isinstance(item, IpRule):
        return [*_ip(item.family), "rule", "add", *_rule_args(item)]
    if isinstance(item, LocalRoute):
        return [*_ip(item.family), "route", "add", *_route_args(item)]
    if isinstance(item, NftTable):
        return ["nft", "-f", "-", f"(table inet {item.name}, {item.rules} rules)"]
    raise TypeError(f"not a plan item: {item!r}")


def remove_commands(item: Item | UnknownRule) -> list[list[str]]:
    """The argv(s) that remove one item (a chain is flushed, then deleted)."""
    if isinstance(item, UnknownRule):
        return [
            [IPTABLES[item.family], "-t", item.table, "-D", item.chain, *shlex.split(item.text)]
        ]
    if isinstance(item, Chain):
        base = [IPTABLES[item.family], "-t", "mangle"]
        return [[*base, "-F", item.name], [*base, "-X", item.name]]
    if isinstance(item, MangleRule):
        return [[IPTABLES[item.family], "-t", item.table, "-D", item.chain, *rule_spec(item)]]
    if isinstance(item, IpRule):
        return [[*_ip(item.family), "rule", "del", *_rule_args(item)]]
    if isinstance(item, LocalRoute):
        return [[*_ip(item.family), "route", "del", *_route_args(item)]]
    if isinstance(item, NftTable):
        return [["nft", "delete", "table", "inet", item.name]]
    raise TypeError(f"not a plan item: {item!r}")


def _rule_args(item: IpRule) -> list[str]:
    return [
        "fwmark",
        f"{item.fwmark:#x}/{item.fwmask:#x}",
        "lookup",
        str(item.table),
        "priority",
        str(item.priority),
        "protocol",
        str(RT_PROTO),
    ]


def _route_args(item: LocalRoute) -> list[str]:
    return ["local", item.dst, "dev", item.dev, "table", str(item.table), "proto", str(RT_PROTO)]


def describe(item: Item) -> str:
    """One line naming an item: its install command."""
    if isinstance(item, NftTable):
        return f"nft -f - (table inet {item.name}, {item.rules} rules)"
    return shlex.join(add_command(item))


def setup_commands(plan: Plan, replace: bool = False) -> list[str]:
    """Shell lines that install ``plan``, in order (an nft table as a ``nft -f -`` heredoc).

    ``replace``: the nft table replaces an installed one of ours (``--replace``)
    rather than being created.
    """
    lines: list[str] = []
    for item in plan.items:
        if isinstance(item, NftTable):
            lines += setup_lines(item, replace)
        else:
            lines.append(shlex.join(add_command(item)))
    return lines


def teardown_commands(
    items: Plan | tuple[Item | UnknownRule, ...] | list[Item | UnknownRule],
) -> list[str]:
    """Shell lines that remove ``items`` (a plan's, or what is installed), in removal order."""
    sequence = items.items if isinstance(items, Plan) else tuple(items)
    lines: list[str] = []
    for item in removal_order(sequence):
        lines += [shlex.join(argv) for argv in remove_commands(item)]
    return lines


def removal_order(
    items: tuple[Item | UnknownRule, ...] | list[Item | UnknownRule],
) -> list[Item | UnknownRule]:
    """Order items for removal: PREROUTING jumps, other rules, chains, ip rules, routes.

    Within a kind the order is the reverse of installation. The switch that
    diverts traffic goes first and the local route last, so a half-done
    removal never leaves packets diverted to a port without a route.
    """

    def rank(item: Item | UnknownRule) -> int:
        if isinstance(item, NftTable):
            return 0  # one transaction: the switch and everything behind it
        if isinstance(item, MangleRule | UnknownRule):
            return 0 if item.chain in ("PREROUTING", "OUTPUT", "FORWARD") else 1
        if isinstance(item, Chain):
            return 2
        if isinstance(item, IpRule):
            return 3
        return 4

    indexed = list(enumerate(items))
    indexed.sort(key=lambda pair: (rank(pair[1]), -pair[0]))
    return [item for _, item in indexed]

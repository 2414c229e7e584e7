"""``tproxy setup``, ``teardown``, ``status`` and ``doctor``.

Exit codes:

* ``setup``: 0 installed (or already installed, unchanged); 1 a step failed
  (rolled back) or a different plan is installed (use ``--replace``);
  2 bad input (nothing installed).
* ``teardown``: 0 removed, or nothing was there; 1 something could not be
  removed; 2 bad input.
* ``status``: 0 installed, complete and served; 1 partial (something
  missing, extra, or no record to compare with) or nothing listening on the
  TPROXY address and port (diverted connections hang); 3 nothing installed;
  2 bad input.
* ``doctor``: 0 no failed check (warnings allowed); 1 some check failed.
"""

from __future__ import annotations

import argparse
import sys

from ..errors import UsageError
from . import installer, state
from .commands import describe, setup_commands, teardown_commands
from .items import DEFAULT_INSTANCE
from .plan import (
    DEFAULT_MARK,
    DEFAULT_PRIORITY,
    DEFAULT_PROXY_MARK,
    DEFAULT_PROXY_PORT,
    DEFAULT_TABLE,
    PlanError,
    PlanRequest,
    check_instance,
    make_plan,
    parse_mark,
    parse_number,
)

EXIT_COMPLETE, EXIT_PARTIAL, EXIT_ABSENT = 0, 1, 3


def add_plan_arguments(parser: argparse.ArgumentParser, prefix: str = "") -> None:
    """Add the plan options (``--port``, ``--mark``, ...) to ``parser``.

    ``prefix`` is put before the option names that may clash with another
    command's own options (``tproxy run`` uses ``route-``: ``--route-mark``).
    Ports, proxy port and address and families keep their names.
    """
    group = parser.add_argument_group("routing plan")
    group.add_argument(
        "-p",
        "--port",
        dest="route_ports",
        action="append",
        metavar="PORTS",
        help="TCP destination ports to divert: 80,443,8000-8100 (repeatable)",
    )
    group.add_argument(
        "--udp-port",
        dest="route_udp_ports",
        action="append",
        metavar="PORTS",
        help="UDP destination ports to divert to the same proxy port "
        "(alongside or instead of --port; repeatable)",
    )
    group.add_argument(
        "--block-quic",
        dest="route_block_quic",
        action="store_true",
        help="reject UDP/443 from IN so browsers fall back to TCP",
    )
    group.add_argument(
        f"--{prefix}instance",
        dest="route_instance",
        default=DEFAULT_INSTANCE,
        metavar="NAME",
        help="name of this installation; several may coexist (default: default)",
    )
    group.add_argument(
        f"--{prefix}mark",
        dest="route_mark",
        default=str(DEFAULT_MARK),
        metavar="MARK[/MASK]",
        help="fwmark for diverted packets (default 1)",
    )
    group.add_argument(
        f"--{prefix}table",
        dest="route_table",
        default=str(DEFAULT_TABLE),
        metavar="TABLE",
        help="route table for the local route (default 100)",
    )
    group.add_argument(
        f"--{prefix}priority",
        dest="route_priority",
        default=str(DEFAULT_PRIORITY),
        metavar="PRIO",
        help="ip rule priority, before main's 32766 (default 100)",
    )
    group.add_argument(
        "--ipv4", dest="route_ipv4", action="store_true", help="IPv4 only (default: both families)"
    )
    group.add_argument(
        "--ipv6", dest="route_ipv6", action="store_true", help="IPv6 only (default: both families)"
    )
    add_backend_argument(group)
    group.add_argument(
        "--local",
        dest="route_local",
        action="store_true",
        help="also divert this host's own connections to the ports "
        "(the proxy's sockets, marked --proxy-mark, are skipped)",
    )
    group.add_argument(
        "--exclude-uid",
        dest="route_exclude_uids",
        action="append",
        metavar="UID",
        help="with --local: never divert this user's connections (uid or name; repeatable)",
    )
    group.add_argument(
        "--exclude-cgroup",
        dest="route_exclude_cgroups",
        action="append",
        metavar="PATH",
        help="with --local: never divert this cgroup (v2) and its children (repeatable)",
    )
    if not prefix:  # run: the proxy's mark is its own --mark (set for you with --local)
        group.add_argument(
            "--proxy-mark",
            dest="route_proxy_mark",
            default=str(DEFAULT_PROXY_MARK),
            metavar="MARK",
            help="with --local: the SO_MARK of the proxy's outgoing sockets "
            "(tproxy run --mark), never diverted (default 0x7470)",
        )


def add_backend_argument(parser: argparse._ActionsContainer) -> None:
    """``--backend iptables|nft|auto`` (setup, teardown, status, doctor, run --setup)."""
    parser.add_argument(
        "--backend",
        dest="route_backend",
        default="auto",
        choices=("auto", "iptables", "nft"),
        help="python-iptables (legacy x_tables) or one nftables table; auto: "
        "iptables where the legacy tables work, else nft",
    )


def request_from_args(
    args: argparse.Namespace,
    in_interface: str,
    out_interface: str,
    proxy_port: int | str,
    proxy_addresses: list[str] | None,
) -> PlanRequest:
    """Build the request from parsed plan options; :class:`UsageError` if bad."""
    from .plan import build_request

    if not args.route_ports and not args.route_udp_ports:
        raise UsageError("no ports to divert: give --port PORTS and/or --udp-port PORTS")
    try:
        backend, _ = installer.choose_backend(args.route_backend, args.route_instance)
    except installer.InputError as exc:
        raise UsageError(str(exc)) from None
    try:
        return build_request(
            in_interface,
            out_interface,
            args.route_ports,
            udp_ports=args.route_udp_ports,
            block_quic=args.route_block_quic,
            backend=backend,
            local=args.route_local,
            exclude_uids=args.route_exclude_uids,
            exclude_cgroups=args.route_exclude_cgroups,
            proxy_mark=getattr(args, "route_proxy_mark", DEFAULT_PROXY_MARK),
            proxy_port=proxy_port,
            proxy_addresses=proxy_addresses,
            mark=args.route_mark,
            table=args.route_table,
            priority=args.route_priority,
            ipv4=args.route_ipv4,
            ipv6=args.route_ipv6,
            instance=args.route_instance,
        )
    except PlanError as exc:
        raise UsageError(str(exc)) from None


def _check_instance(name: str) -> str:
    try:
        check_instance(name)
    except PlanError as exc:
        raise UsageError(str(exc)) from None
    return name


def _need_root() -> None:
    if not installer.has_net_admin():
        raise UsageError("must be root (or have CAP_NET_ADMIN)")


# ---------------------------------------------------------------- setup


def cmd_setup(args: argparse.Namespace) -> int:
    request = request_from_args(
        args, args.in_interface, args.out_interface, args.proxy_port, args.proxy_address
    )
    plan = make_plan(request)
    if args.dry_run:
        print("\n".join(setup_commands(plan, args.replace)))
        return 0
    try:
        installer.check_host(request)
    except installer.InputError as exc:
        raise UsageError(str(exc)) from None
    try:
        outcome = installer.install(plan, replace=args.replace)
    except (installer.ConflictError, installer.SetupError, installer.TeardownError) as exc:
        print(f"tproxy setup: {exc}", file=sys.stderr)
        return 1
    what = {
        "installed": "installed",
        "unchanged": "already installed, unchanged",
        "replaced": "replaced the previous installation",
    }[outcome]
    print(
        f"tproxy setup: instance {request.instance!r} {what} "
        f"({request.backend}, {len(plan.items)} items; tproxy teardown"
        f"{'' if request.instance == DEFAULT_INSTANCE else ' --instance ' + request.instance}"
        " removes them)"
    )
    return 0


# ---------------------------------------------------------------- teardown


def _select_backends(args: argparse.Namespace) -> None:
    """status/teardown read (and remove) through ``--backend``'s backends; auto: all."""
    wanted = args.route_backend
    installer.SELECTED = "all" if wanted == "auto" else wanted


def cmd_teardown(args: argparse.Namespace) -> int:
    _check_instance(args.instance)
    _need_root()
    _select_backends(args)
    if args.all:
        names = sorted(n for n in installer.inspect() if n)
    else:
        names = [args.instance]
    if args.dry_run:
        for name in names:
            current = installer.inspect(name)[name]
            lines = teardown_commands(current.live)
            if lines:
                print("\n".join(lines))
        if args.all and "" in installer.inspect():
            print("\n".join(teardown_commands(installer.inspect()[""].live)))
        return 0
    status = 0
    for name in names:
        try:
            removed = installer.teardown(name)
        except installer.TeardownError as exc:
            print(f"tproxy teardown: instance {name!r}: {exc}", file=sys.stderr)
            status = 1
            continue
        if removed:
            print(f"tproxy teardown: instance {name!r}: removed {len(removed)} items")
        else:
            print(f"tproxy teardown: instance {name!r}: nothing installed")
    if args.all:
        try:
            orphans = installer.teardown_orphans()
        except installer.TeardownError as exc:
            print(f"tproxy teardown: {exc}", file=sys.stderr)
            return 1
        if orphans:
            print(f"tproxy teardown: removed {len(orphans)} unattributed ip rules/routes")
    return status


# ---------------------------------------------------------------- status


def _describe_request(request: PlanRequest) -> str:
    parts = []
    if request.ports:
        parts.append("tcp " + ",".join(str(p) for p in request.ports))
    if request.udp_ports:
        parts.append("udp " + ",".join(str(p) for p in request.udp_ports))
    ports = " + ".join(parts)
    fams = "+".join(f"IPv{f}" for f in request.families)
    if request.block_quic:
        fams += ", QUIC (udp/443) rejected"
    if request.local:
        fams += f", local (proxy mark {request.proxy_mark:#x}"
        fams += "".join(f", not uid {u}" for u in request.exclude_uids)
        fams += "".join(f", not cgroup {c}" for c in request.exclude_cgroups) + ")"
    fams += f", backend {request.backend}"
    addresses = "/".join(request.proxy_v4 if f == 4 else request.proxy_v6 for f in request.families)
    return (
        f"{request.in_interface} -> {request.out_interface}, ports {ports} -> "
        f"{addresses} port {request.proxy_port}, "
        f"mark {request.mark:#x}/{request.mask:#x}, table {request.table}, "
        f"priority {request.priority}, {fams}"
    )


def _line(item: object) -> str:
    from .items import NftTable, UnknownRule

    if isinstance(item, NftTable):
        return f"nft table inet {item.name} ({item.rules} rules, digest {item.digest})"
    if isinstance(item, UnknownRule):
        return f"iptables rule in {item.table} {item.chain}: {item.text}"
    return describe(item)  # type: ignore[arg-type]


HANG = "diverted connections hang: start `tproxy run` or `tproxy teardown`"


def _serving(inst: installer.InstanceState) -> tuple[list[str], bool]:
    """Lines saying who serves an installed instance, and whether its traffic hangs.

    The TPROXY targets come from what is installed (the kernel is the truth,
    record or not); the owner from the record.
    """
    from .items import MangleRule, Tproxy
    from .liveness import bound_sockets, process_alive, serves

    targets = sorted(
        {
            (r.family, r.protocol or "tcp", r.target.on_ip, r.target.on_port)
            for r in inst.live
            if isinstance(r, MangleRule) and isinstance(r.target, Tproxy)
        }
    )
    if inst.recorded is not None:  # an nft table is one item: the record says where it sends
        request = inst.recorded
        targets = sorted(
            {
                (f, proto, request.proxy_v4 if f == 4 else request.proxy_v6, request.proxy_port)
                for proto, ports in (("tcp", request.ports), ("udp", request.udp_ports))
                if ports
                for f in request.families
            }
        )
    lines, hang = [], False
    sockets = {proto: bound_sockets(proto) for proto in {t[1] for t in targets}}
    for family, proto, address, port in targets:
        ok = serves(sockets[proto], family, address, port)
        where = f"[{address}]:{port}" if family == 6 else f"{address}:{port}"
        lines.append(f"  listener {proto} {where}: {'listening' if ok else 'NOTHING LISTENS'}")
        hang |= not ok
    owner = state.owner_process(inst.instance) if inst.recorded is not None else None
    if owner is not None:
        who, pid, started = owner
        if who == "run":
            alive = isinstance(pid, int) and process_alive(pid, started)
            lines.append(
                f"  owner: tproxy run, pid {pid}, "
                + ("running" if alive else "not running (killed?)")
            )
        else:
            lines.append("  owner: tproxy setup (stays until tproxy teardown)")
    if hang:
        lines.append(f"  {HANG}")
    return lines, hang


def cmd_status(args: argparse.Namespace) -> int:
    _need_root()
    _select_backends(args)
    name = _check_instance(args.instance) if args.instance else None
    found = installer.inspect(name)
    shown = {k: v for k, v in found.items() if v.live or v.recorded}
    if not shown:
        print("tproxy status: nothing installed")
        return EXIT_ABSENT
    codes = []
    for key, inst in shown.items():
        if key == "":
            print(
                f"unattributed ip rules/routes of ours ({len(inst.live)}); "
                "tproxy teardown --all removes them"
            )
            for item in inst.live:
                print(f"  extra: {_line(item)}")
            codes.append(EXIT_PARTIAL)
            continue
        status = inst.status
        note = ""
        if status == "partial" and inst.recorded is None:
            note = " (no record in " + str(state.state_dir()) + ": cannot compare)"
        elif status == "absent" and inst.recorded is not None:
            note = " (stale record: nothing of it is installed)"
        print(f"instance {key}: {status}{note}, {len(inst.live)} items installed")
        if inst.recorded is not None:
            print(f"  plan: {_describe_request(inst.recorded)}")
        if status != "absent":
            for item in inst.missing:
                print(f"  missing: {_line(item)}")
            label = "extra" if inst.recorded is not None else "installed"
            if inst.recorded is not None or not args.verbose:
                for item in inst.extra:
                    print(f"  {label}: {_line(item)}")
        if args.verbose and inst.recorded is not None:
            for item in inst.live:
                print(f"  installed: {_line(item)}")
        hang = False
        if inst.live:
            lines, hang = _serving(inst)
            print("\n".join(lines))
        codes.append(
            EXIT_PARTIAL
            if hang
            else {"complete": EXIT_COMPLETE, "partial": EXIT_PARTIAL, "absent": EXIT_ABSENT}[status]
        )
    if EXIT_PARTIAL in codes:
        return EXIT_PARTIAL
    if EXIT_COMPLETE in codes:
        return EXIT_COMPLETE
    return EXIT_ABSENT


# ---------------------------------------------------------------- doctor


def cmd_doctor(args: argparse.Namespace) -> int:
    from .doctor import run_checks

    try:
        mark, mask = parse_mark(args.mark)
        table = parse_number(args.table, "route table")
        proxy_mark = parse_number(args.proxy_mark, "proxy mark")
        check_instance(args.instance)
    except PlanError as exc:
        raise UsageError(str(exc)) from None
    failed = False
    findings = run_checks(
        args.interfaces,
        mark,
        mask,
        table,
        backend=args.route_backend,
        instance=args.instance,
        local=args.local,
        proxy_mark=proxy_mark,
    )
    for finding in findings:
        print(f"[{finding.level:4}] {finding.name}: {finding.detail}")
        if finding.fix:
            print(f"       fix: {finding.fix}")
        failed |= finding.level == "fail"
    return 1 if failed else 0


# ---------------------------------------------------------------- parsers


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the routing subcommands to the ``tproxy`` parser."""
    setup = sub.add_parser(
        "setup",
        help="install the interception routing (TPROXY rules, fwmark rule, route)",
        description="Install the TPROXY routing diverting IN's TCP traffic to PORTS "
        "to the local proxy. Exit 0 installed, 1 failed (rolled back) or a "
        "different plan is installed, 2 bad input.",
    )
    setup.add_argument("in_interface", metavar="IN", help="interface clients' traffic arrives on")
    setup.add_argument("out_interface", metavar="OUT", help="interface servers' replies arrive on")
    setup.add_argument(
        "--proxy-port",
        default=str(DEFAULT_PROXY_PORT),
        metavar="PORT",
        help="port the proxy listens on (default 9091)",
    )
    setup.add_argument(
        "--proxy-address",
        action="append",
        metavar="ADDR",
        help="address the proxy listens on, one per family (default 127.0.0.1 and ::1)",
    )
    add_plan_arguments(setup)
    setup.add_argument(
        "--dry-run",
        action="store_true",
        help="print the equivalent iptables-legacy/ip commands; change nothing",
    )
    setup.add_argument(
        "--replace",
        action="store_true",
        help="replace a different plan installed for the same instance",
    )
    setup.set_defaults(handler=cmd_setup)

    teardown = sub.add_parser(
        "teardown",
        help="remove exactly what setup installed",
        description="Remove what setup installed (works after a crash). Nothing "
        "installed is not an error. Exit 0 done, 1 something could not be removed.",
    )
    teardown.add_argument("--instance", default=DEFAULT_INSTANCE, metavar="NAME")
    teardown.add_argument("--all", action="store_true", help="every instance, and any leftovers")
    teardown.add_argument(
        "--dry-run",
        action="store_true",
        help="print the commands that would remove it; change nothing",
    )
    add_backend_argument(teardown)
    teardown.set_defaults(handler=cmd_teardown)

    status = sub.add_parser(
        "status",
        help="show what is installed",
        description="Show what is installed, compare it with the recorded plan, and say "
        "whether something listens where it diverts to and whether its owner "
        "runs. Exit 0 installed, complete and served; 1 partial or nothing "
        "listening; 3 nothing installed.",
    )
    status.add_argument(
        "--instance", default=None, metavar="NAME", help="only this instance (default: all)"
    )
    status.add_argument("-v", "--verbose", action="store_true", help="list every installed item")
    add_backend_argument(status)
    status.set_defaults(handler=cmd_status)

    doctor = sub.add_parser(
        "doctor",
        help="check what interception needs and how to fix misses",
        description="Check privileges, forwarding, rp_filter, xtables plugins, the "
        "iptables variant, and whether the mark or table is used by others. "
        "Exit 0 no failure (warnings allowed), 1 some check failed.",
    )
    doctor.add_argument(
        "interfaces", nargs="*", metavar="IFACE", help="interfaces to check (IN and OUT)"
    )
    doctor.add_argument("--mark", default=str(DEFAULT_MARK), metavar="MARK[/MASK]")
    doctor.add_argument("--table", default=str(DEFAULT_TABLE), metavar="TABLE")
    doctor.add_argument("--instance", default=DEFAULT_INSTANCE, metavar="NAME")
    doctor.add_argument(
        "--local",
        action="store_true",
        help="also check what --local needs (marks, rp_filter, route_localnet)",
    )
    doctor.add_argument("--proxy-mark", default=str(DEFAULT_PROXY_MARK), metavar="MARK")
    add_backend_argument(doctor)
    doctor.set_defaults(handler=cmd_doctor)

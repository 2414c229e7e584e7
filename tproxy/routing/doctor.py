"""``tproxy doctor``: check what interception needs, and say how to fix each miss.

Each check returns a :class:`Finding` (``ok``, ``warn`` or ``fail``) with a
one-line detail and, when not ok, the command or step that fixes it. Only
``fail`` findings make doctor exit non-zero: warnings describe situations
that work but surprise people (nft rules next to ours, rp_filter, ...).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

from . import installer, nft, nftrules
from .capabilities import has_net_admin, plugins_problem, xtables_dirs
from .plan import DEFAULT_MARK, DEFAULT_MASK, DEFAULT_PROXY_MARK, DEFAULT_TABLE, RT_PROTO


@dataclass(frozen=True)
class Finding:
    """One check's result."""

    name: str
    level: str  # "ok" | "warn" | "fail"
    detail: str
    fix: str = ""


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def check_privileges() -> Finding:
    if has_net_admin():
        return Finding("privileges", "ok", "root or CAP_NET_ADMIN")
    return Finding(
        "privileges",
        "fail",
        "neither root nor CAP_NET_ADMIN",
        "run as root (sudo tproxy ...) or grant CAP_NET_ADMIN",
    )


def check_forwarding() -> list[Finding]:
    found = []
    for family, path, knob in (
        ("IPv4", "/proc/sys/net/ipv4/ip_forward", "net.ipv4.ip_forward"),
        ("IPv6", "/proc/sys/net/ipv6/conf/all/forwarding", "net.ipv6.conf.all.forwarding"),
    ):
        value = _read(path)
        if value == "1":
            found.append(Finding(f"{family} forwarding", "ok", f"{knob} = 1"))
        else:
            found.append(
                Finding(
                    f"{family} forwarding",
                    "warn",
                    f"{knob} = {value}: traffic not diverted is not routed through this gateway",
                    f"sysctl -w {knob}=1",
                )
            )
    return found


def check_rp_filter(interfaces: list[str]) -> list[Finding]:
    found = []
    all_value = _read("/proc/sys/net/ipv4/conf/all/rp_filter") or "0"
    for name in interfaces or ["default"]:
        value = _read(f"/proc/sys/net/ipv4/conf/{name}/rp_filter")
        if value is None:
            continue
        effective = max(int(all_value), int(value))
        if effective == 1:
            found.append(
                Finding(
                    f"rp_filter {name}",
                    "warn",
                    "strict reverse-path filtering can drop diverted packets and spoofed replies",
                    f"sysctl -w net.ipv4.conf.all.rp_filter=2 net.ipv4.conf.{name}.rp_filter=2",
                )
            )
        else:
            found.append(Finding(f"rp_filter {name}", "ok", f"rp_filter = {effective}"))
    return found


def check_plugins() -> Finding:
    dirs = xtables_dirs()
    problem = plugins_problem(dirs)
    if problem is not None:
        fix = (
            "apt install iptables"
            if dirs
            else "apt install iptables (python-iptables needs its extension plugins)"
        )
        return Finding("xtables plugins", "fail", problem, fix)
    return Finding("xtables plugins", "ok", f"TPROXY, socket, MARK, comment in {dirs[0]}")


def check_python_iptables() -> Finding:
    try:
        import iptc  # noqa: F401
    except Exception as exc:
        return Finding(
            "python-iptables",
            "fail",
            f"cannot load: {exc}",
            "apt install iptables; pip install python-iptables",
        )
    return Finding("python-iptables", "ok", "loads (libip4tc, libxtables)")


def check_iptables_variant() -> Finding:
    tool = shutil.which("iptables")
    if tool is None:
        return Finding(
            "iptables command",
            "warn",
            "no iptables command on PATH",
            "apt install iptables (to inspect: iptables-legacy-save)",
        )
    try:
        version = subprocess.run(
            [tool, "--version"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError) as exc:
        return Finding("iptables command", "warn", f"cannot run iptables: {exc}")
    if "nf_tables" not in version:
        return Finding("iptables command", "ok", f"{version}: the legacy ruleset tproxy uses")
    rules = 0
    save = shutil.which("iptables-nft-save")
    if save:
        try:
            out = subprocess.run([save], capture_output=True, text=True, timeout=10).stdout
            rules = sum(1 for line in out.splitlines() if line.startswith("-A "))
        except (OSError, subprocess.SubprocessError):
            pass
    detail = (
        f"{version}: plain 'iptables' shows the nft ruleset, not tproxy's legacy rules "
        "(see them with iptables-legacy-save)"
    )
    if rules:
        detail += f"; the nft ruleset has {rules} rule(s) of its own, and both rulesets apply"
    return Finding(
        "iptables command",
        "warn",
        detail,
        "inspect with iptables-legacy-save / ip6tables-legacy-save",
    )


def check_loopback() -> Finding:
    flags = _read("/sys/class/net/lo/flags")
    if flags is None or int(flags, 16) & 1:
        return Finding("loopback", "ok", "lo is up")
    return Finding(
        "loopback", "fail", "lo is down: the IPv6 local route cannot be added", "ip link set lo up"
    )


def check_interfaces(interfaces: list[str]) -> list[Finding]:
    found = []
    for name in interfaces:
        try:
            socket.if_nametoindex(name)
            found.append(Finding(f"interface {name}", "ok", "exists"))
        except OSError:
            found.append(
                Finding(
                    f"interface {name}", "fail", "no such interface", "check the name with: ip link"
                )
            )
    return found


def check_mark_and_table(mark: int, mask: int, table: int) -> list[Finding]:
    """Foreign ip rules using our mark bits, foreign routes in our table."""
    try:
        from pyroute2 import IPRoute
    except Exception as exc:  # pragma: no cover - dependency missing
        return [Finding("mark and table", "warn", f"cannot read rules: {exc}")]
    marks, routes = [], []
    try:
        with IPRoute() as ipr:
            for family in (socket.AF_INET, socket.AF_INET6):
                for rule in ipr.get_rules(family=family):
                    if rule.get_attr("FRA_PROTOCOL") == RT_PROTO:
                        continue
                    fwmark = rule.get_attr("FRA_FWMARK")
                    fwmask = rule.get_attr("FRA_FWMASK") or 0xFFFFFFFF
                    rtable = rule.get_attr("FRA_TABLE") or rule["table"]
                    if (
                        fwmark is not None
                        and fwmask & mask
                        and (fwmark & fwmask & mask) == (mark & fwmask)
                    ):
                        marks.append(f"fwmark {fwmark:#x}/{fwmask:#x} lookup {rtable}")
                    elif rtable == table:
                        marks.append(f"priority {rule.get_attr('FRA_PRIORITY')} lookup {rtable}")
                for route in ipr.get_routes(family=family, table=table):
                    if route["proto"] != RT_PROTO:
                        dst = route.get_attr("RTA_DST") or "default"
                        routes.append(f"{dst}/{route['dst_len']}")
    except Exception as exc:
        return [Finding("mark and table", "warn", f"cannot read rules: {exc}")]
    found = []
    if marks:
        found.append(
            Finding(
                f"mark {mark:#x}/{mask:#x}",
                "warn",
                "already used by foreign ip rule(s): " + "; ".join(marks),
                "pick another with --mark / --table",
            )
        )
    else:
        found.append(Finding(f"mark {mark:#x}/{mask:#x}", "ok", "no foreign ip rule uses it"))
    if routes:
        found.append(
            Finding(
                f"table {table}",
                "warn",
                f"already holds foreign route(s): {', '.join(routes)}"
                + (
                    " (a default route there clashes with ours)"
                    if any(r.startswith(("default", "0.0.0.0/0", "::/0")) for r in routes)
                    else ""
                ),
                "pick another with --table",
            )
        )
    else:
        found.append(Finding(f"table {table}", "ok", "no foreign routes"))
    return found


def check_backend(wanted: str, instance: str) -> list[Finding]:
    """Which backend ``setup --backend WANTED`` would use, and why; nft's own checks."""
    found = []
    try:
        chosen, why = installer.choose_backend(wanted, instance)
        found.append(Finding("backend", "ok", f"would use {chosen}: {why}"))
    except installer.InputError as exc:
        return [Finding("backend", "fail", str(exc), "apt install iptables nftables")]
    problem = nft.available()
    if problem is not None:
        level = "fail" if chosen == "nft" else "warn"
        found.append(Finding("nftables", level, f"not usable: {problem}", "apt install nftables"))
        return found
    found.append(
        Finding(
            "nftables",
            "ok",
            "libnftables answers"
            + ("" if nft.Nft()._lib is not None else " (through the nft command)"),
        )
    )
    name = nftrules.table_name(instance)
    objects = nft.Nft().list_json(f"table inet {name}")
    if objects and nftrules.read_table(objects, name) is None:
        found.append(
            Finding(
                f"nft table {name}",
                "fail",
                "exists and is not ours: setup with the nft backend would replace it",
                "pick another --instance",
            )
        )
    else:
        found.append(
            Finding(f"nft table {name}", "ok", "ours (installed)" if objects else "name is free")
        )
    ours = {(hook, prio) for _, _, hook, prio in nftrules.BASE_CHAINS.values()}
    same = []
    for entry in nft.Nft().list_json("chains"):
        chain = entry.get("chain") or {}
        if str(chain.get("table", "")).startswith("tproxy_"):
            continue
        if (chain.get("hook"), chain.get("prio")) in ours:
            same.append(
                f"{chain.get('family')} {chain.get('table')} {chain.get('name')} "
                f"({chain.get('hook')} {chain.get('prio')})"
            )
    if same:
        found.append(
            Finding(
                "nft priorities",
                "warn",
                "foreign base chains at our hooks and priorities (they run too, in no fixed order "
                "with ours; a drop there drops diverted packets): " + "; ".join(same),
            )
        )
    else:
        found.append(
            Finding(
                "nft priorities",
                "ok",
                "no foreign base chain at prerouting/output -150 or forward 0",
            )
        )
    return found


def check_local(mark: int, mask: int, proxy_mark: int) -> list[Finding]:
    """What ``--local`` needs: a proxy mark apart from the route mark, loopback rp_filter."""
    found = []
    if proxy_mark & mask == mark:
        found.append(
            Finding(
                "local: proxy mark",
                "fail",
                f"{proxy_mark:#x} matches the route mark {mark:#x}/{mask:#x}: "
                "the proxy's own connections would be diverted again",
                "pick another with --proxy-mark (and tproxy run --mark)",
            )
        )
    else:
        found.append(
            Finding(
                "local: proxy mark",
                "ok",
                f"{proxy_mark:#x} (tproxy run --mark) is skipped by OUTPUT and "
                f"apart from {mark:#x}/{mask:#x}",
            )
        )
    strict = [
        name for name in ("all", "lo") if _read(f"/proc/sys/net/ipv4/conf/{name}/rp_filter") == "1"
    ]
    if strict:
        found.append(
            Finding(
                "local: rp_filter",
                "warn",
                f"strict on {', '.join(strict)}: looped-back local flows carry "
                "this host's outside addresses on lo",
                "sysctl -w " + " ".join(f"net.ipv4.conf.{n}.rp_filter=2" for n in strict),
            )
        )
    else:
        found.append(Finding("local: rp_filter", "ok", "not strict on all/lo"))
    localnet = _read("/proc/sys/net/ipv4/conf/all/route_localnet")
    found.append(
        Finding(
            "local: route_localnet",
            "ok",
            f"= {localnet}; not needed: local flows are diverted on lo, where 127.0.0.0/8 "
            "is always routable",
        )
    )
    return found


def run_checks(
    interfaces: list[str] | None = None,
    mark: int = DEFAULT_MARK,
    mask: int = DEFAULT_MASK,
    table: int = DEFAULT_TABLE,
    *,
    backend: str = "auto",
    instance: str = "default",
    local: bool = False,
    proxy_mark: int = DEFAULT_PROXY_MARK,
) -> list[Finding]:
    """Every check, in the order they are printed."""
    interfaces = interfaces or []
    findings = [check_privileges(), *check_backend(backend, instance)]
    if backend != "nft":
        findings += [check_python_iptables(), check_plugins(), check_iptables_variant()]
    findings.append(check_loopback())
    if local:
        findings += check_local(mark, mask, proxy_mark)
    findings += check_interfaces(interfaces)
    findings += check_forwarding()
    findings += check_rp_filter(interfaces)
    findings += check_mark_and_table(mark, mask, table)
    return findings

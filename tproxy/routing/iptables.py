"""Backend for the mangle table through python-iptables (legacy x_tables).

libxtables keeps one registry of extensions per process, and registering a
multi-family target such as ``TPROXY`` for IPv6 after IPv4 makes it print
``target "TPROXY" already registered`` and *exit the process* (python-iptables
issues #135, #316). So python-iptables never runs in the calling process:
:class:`IptablesBackend` talks JSON lines to one worker process per family
(``python -m tproxy.routing.iptables --worker 4|6``), and each worker uses
:class:`FamilyTables` for its family only. A worker that dies mid-step becomes
a :class:`StepError` in the caller, who can still roll back; the engine
process of ``tproxy run`` never loads libxtables at all.

Each add or remove is one libiptc transaction (read the table, change it,
commit) taken under the xtables lock (``/run/xtables.lock``, the lock the
``iptables-legacy`` command takes), so a concurrent ``iptables`` command does
not lose our change or we its. Only our chains and rules carrying our
comment are ever reported or removed.

python-iptables quirks handled here (see DESIGN.md): ``Table`` objects are
per-process singletons, ``refresh()`` is needed after each ``commit()``, and
building any non-builtin target (``MARK``, ``TPROXY``, a jump) makes it open
*every* table of the family to ask whether the name is a chain; that would
instantiate the ``nat``/``raw``/... tables in a namespace that never used
them, so while we work the library is told only ``mangle`` exists.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import ipaddress
import json
import os
import shlex
import subprocess
import sys
from collections.abc import Iterator
from typing import Any, Literal

from .backend import StepError
from .commands import describe
from .items import (
    COMMENT_PREFIX,
    Accept,
    Chain,
    Family,
    Found,
    Item,
    Jump,
    MangleRule,
    Reject,
    Return,
    SetMark,
    Target,
    Tproxy,
    UnknownRule,
    instance_of_chain,
)
from .plan import item_from_json, item_to_json
from .ports import PortRange

XTABLES_LOCK = os.environ.get("XTABLES_LOCKFILE", "/run/xtables.lock")
_ANY4 = "0.0.0.0/0.0.0.0"
_ANY6 = "::/0"
#: Tables besides mangle where rules of ours may be (``--block-quic``'s REJECT).
OTHER_TABLES = ("filter",)
#: ``! --syn`` as python-iptables spells it (``--syn`` is ``--tcp-flags FIN,SYN,RST,ACK SYN``).
_NOT_SYN = ("!", "FIN,SYN,RST,ACK", "SYN")


def _iptc() -> Any:
    try:
        import iptc
    except Exception as exc:  # libxtables missing, etc.
        raise StepError("load python-iptables", str(exc)) from exc
    return iptc


@contextlib.contextmanager
def xtables_lock() -> Iterator[None]:
    """Hold the xtables lock (as ``iptables -w`` does) while changing a table."""
    try:
        fd = os.open(XTABLES_LOCK, os.O_CREAT | os.O_RDWR, 0o600)
    except OSError:
        yield  # no writable /run: nothing to coordinate with
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def instantiated_tables(family: int) -> set[str]:
    """The legacy tables that exist in this namespace (opening one would create it)."""
    name = "/proc/net/ip_tables_names" if family == 4 else "/proc/net/ip6_tables_names"
    try:
        with open(name) as handle:
            return {line.strip() for line in handle if line.strip()}
    except OSError:
        return set()


class FamilyTables:
    """Chains and mangle rules of one family via python-iptables (runs in a worker)."""

    def __init__(self, family: Family) -> None:
        self._mod = _iptc()
        self.family = family

    # -- library plumbing

    def _classes(self, family: Family) -> tuple[Any, Any]:
        if family == 4:
            return self._mod.Table, self._mod.Rule
        return self._mod.Table6, self._mod.Rule6

    @contextlib.contextmanager
    def _table(self, family: Family, write: bool, which: str = "mangle") -> Iterator[Any]:
        table_cls, _ = self._classes(family)
        known = table_cls.existing_table_names
        saved = dict(known)
        for name in table_cls.ALL:
            known[name] = name == which
        try:
            with xtables_lock() if write else contextlib.nullcontext():
                table = table_cls(which)
                table.autocommit = False
                table.refresh()
                yield table
                if write:
                    table.commit()
                    table.refresh()
        finally:
            known.clear()
            known.update(saved)

    def _build(self, rule: MangleRule) -> Any:
        _, rule_cls = self._classes(rule.family)
        built = rule_cls()
        if rule.in_interface is not None:
            built.in_interface = rule.in_interface
        if rule.protocol is not None:
            built.protocol = rule.protocol
        if rule.dport is not None or rule.sport is not None or rule.not_syn:
            match = built.create_match(rule.protocol or "tcp")
            if rule.sport is not None:
                match.sport = rule.sport.iptables
            if rule.dport is not None:
                match.dport = rule.dport.iptables
            if rule.not_syn:
                match.tcp_flags = list(_NOT_SYN)
        if rule.dst is not None:
            built.dst = rule.dst
        if rule.socket_transparent:
            built.create_match("socket").transparent = ""
        if rule.match_mark is not None:
            mark = f"{rule.match_mark:#x}"
            if rule.match_mask != 0xFFFFFFFF:
                mark += f"/{rule.match_mask:#x}"
            built.create_match("mark").mark = mark
        if rule.uid_owner is not None:
            built.create_match("owner").uid_owner = str(rule.uid_owner)
        if rule.cgroup is not None:
            built.create_match("cgroup").path = rule.cgroup
        built.create_match("comment").comment = rule.comment
        target = rule.target
        if isinstance(target, Jump):
            built.create_target(target.chain)
        elif isinstance(target, Accept):
            built.create_target("ACCEPT")
        elif isinstance(target, Return):
            built.create_target("RETURN")
        elif isinstance(target, SetMark):
            built.create_target("MARK").set_xmark = f"{target.mark:#x}/{target.mask:#x}"
        elif isinstance(target, Reject):
            icmp = "icmp6" if rule.family == 6 else "icmp"
            built.create_target("REJECT").reject_with = f"{icmp}-port-unreachable"
        elif isinstance(target, Tproxy):
            made = built.create_target("TPROXY")
            made.on_port = str(target.on_port)
            made.on_ip = target.on_ip
            made.tproxy_mark = f"{target.mark:#x}/{target.mask:#x}"
        return built

    # -- Backend interface

    def handles(self, item: object) -> bool:
        return isinstance(item, Chain | MangleRule | UnknownRule)

    def add(self, item: Item) -> None:
        step = describe(item)
        if not isinstance(item, Chain | MangleRule):
            raise StepError(step, "not an iptables item")
        which = item.table if isinstance(item, MangleRule) else "mangle"
        try:
            with self._table(item.family, write=True, which=which) as table:
                if isinstance(item, Chain):
                    if table.is_chain(item.name):
                        raise StepError(step, f"chain {item.name} already exists")
                    table.create_chain(item.name)
                else:
                    chain = self._mod.Chain(table, item.chain)
                    built = self._build(item)
                    if item.first:
                        chain.insert_rule(built, 0)
                    else:
                        chain.append_rule(built)
        except StepError:
            raise
        except Exception as exc:
            raise StepError(step, _error_text(exc)) from exc

    def remove(self, item: Found) -> bool:
        if not isinstance(item, Chain | MangleRule | UnknownRule):
            return False  # not an iptables item (see handles): never ours to list
        step = describe(item) if not isinstance(item, UnknownRule) else item.text
        which = "mangle" if isinstance(item, Chain) else item.table
        if which not in instantiated_tables(item.family):
            return False  # never instantiate a table just to look for our rule in it
        try:
            with self._table(item.family, write=True, which=which) as table:
                if isinstance(item, Chain):
                    if not table.is_chain(item.name):
                        return False
                    table.flush_entries(item.name)
                    table.delete_chain(item.name)
                    return True
                if not table.is_chain(item.chain):
                    return False
                chain = self._mod.Chain(table, item.chain)
                for live in chain.rules:
                    if self._parse(item.family, item.chain, live, which) == item:
                        chain.delete_rule(live)
                        return True
                return False
        except StepError:
            raise
        except Exception as exc:
            raise StepError("remove " + step, _error_text(exc)) from exc

    def installed(self) -> list[Item | UnknownRule]:
        found: list[Item | UnknownRule] = []
        family = self.family
        # Only tables that exist: opening one would create it (status must change nothing).
        live = instantiated_tables(family)
        tables = [t for t in ("mangle", *OTHER_TABLES) if t in live]
        for which in tables:
            try:
                with self._table(family, write=False, which=which) as table:
                    for chain in table.chains:
                        ours = which == "mangle" and instance_of_chain(chain.name) is not None
                        if ours:
                            found.append(Chain(family, chain.name))
                        for live in chain.rules:
                            parsed = self._parse(family, chain.name, live, which)
                            comment = parsed.comment
                            if ours or (comment or "").startswith(COMMENT_PREFIX):
                                found.append(parsed)
            except StepError:
                raise
            except Exception as exc:
                raise StepError(
                    f"read {'ip' if family == 4 else 'ip6'}tables {which}", _error_text(exc)
                ) from exc
        return found

    def close(self) -> None:
        if "mangle" not in instantiated_tables(self.family):
            return  # never opened (opening it now would create it)
        table_cls, _ = self._classes(self.family)
        with contextlib.suppress(Exception):
            table_cls(table_cls.MANGLE).close()

    # -- reading rules back

    def _parse(
        self, family: Family, chain: str, live: Any, which: str = "mangle"
    ) -> MangleRule | UnknownRule:
        """Turn a live rule into a :class:`MangleRule`, or an :class:`UnknownRule`."""
        matches = [(m.name, m.get_all_parameters()) for m in live.matches]
        target_name = live.target.name if live.target else ""
        target_params = live.target.get_all_parameters() if live.target else {}
        comment = None
        for name, params in matches:
            if name == "comment":
                comment = " ".join(params.get("comment", []))
        text = _rule_text(live, matches, target_name, target_params)
        unknown = UnknownRule(family, chain, text, comment, which)
        any_addr = _ANY4 if family == 4 else _ANY6
        if live.src not in (any_addr, None) or live.out_interface or comment is None:
            return unknown
        dst = None if live.dst in (any_addr, None) else _prefix(live.dst)
        if dst is False:
            return unknown
        protocol = live.protocol if live.protocol not in (None, "ip", "all", "0") else None
        dport = sport = None
        transparent = not_syn = False
        extra: dict[str, Any] = {}
        for name, params in matches:
            if name == protocol and set(params) <= {"dport", "sport", "tcp-flags"}:
                if "dport" in params:
                    dport = _port_range(params["dport"])
                if "sport" in params:
                    sport = _port_range(params["sport"])
                if "tcp-flags" in params:
                    if params["tcp-flags"] != list(_NOT_SYN):
                        return unknown
                    not_syn = True
            elif name == "socket" and params == {"transparent": []}:
                transparent = True
            elif name == "mark" and set(params) == {"mark"}:
                mark = _mark(params["mark"])
                if mark is None:
                    return unknown
                extra["match_mark"], extra["match_mask"] = mark
            elif name == "owner" and set(params) == {"uid-owner"}:
                try:
                    extra["uid_owner"] = int(params["uid-owner"][0])
                except (ValueError, IndexError):
                    return unknown
            elif name == "cgroup" and set(params) == {"path"} and len(params["path"]) == 1:
                extra["cgroup"] = params["path"][0]
            elif name != "comment":
                return unknown
        target = _parse_target(family, target_name, target_params)
        if target is None or (dport is False or sport is False):
            return unknown
        return MangleRule(
            family,
            chain,
            target,
            comment,
            live.in_interface or None,
            protocol,
            dport=dport or None,
            sport=sport or None,
            not_syn=not_syn,
            socket_transparent=transparent,
            first=chain in ("PREROUTING", "FORWARD", "OUTPUT"),
            table=which,
            dst=dst or None,
            **extra,
        )


def _prefix(text: str) -> str | Literal[False]:
    """``127.0.0.0/255.0.0.0`` (as libiptc gives it) as ``127.0.0.0/8``; False if odd."""
    address, _, mask = text.partition("/")
    try:
        if ":" in mask or "." in mask:
            bits = bin(int(ipaddress.ip_address(mask))).count("1")
        else:
            bits = int(mask) if mask else (32 if ":" not in address else 128)
        return str(ipaddress.ip_network(f"{address}/{bits}"))
    except ValueError:
        return False


def _port_range(values: list[str]) -> PortRange | Literal[False]:
    if len(values) != 1:
        return False
    low, _, high = values[0].partition(":")
    try:
        return PortRange(int(low), int(high or low))
    except ValueError:
        return False


def _mark(values: list[str]) -> tuple[int, int] | None:
    if len(values) != 1:
        return None
    mark, _, mask = values[0].partition("/")
    try:
        return int(mark, 0), int(mask, 0) if mask else 0xFFFFFFFF
    except ValueError:
        return None


def _parse_target(family: Family, name: str, params: dict[str, list[str]]) -> Target | None:
    if name == "ACCEPT" and not params:
        return Accept()
    icmp = "icmp6" if family == 6 else "icmp"
    if name == "REJECT" and params == {"reject-with": [f"{icmp}-port-unreachable"]}:
        return Reject()
    if name == "MARK" and set(params) == {"set-xmark"}:
        mark = _mark(params["set-xmark"])
        return SetMark(*mark) if mark else None
    if name == "TPROXY" and set(params) == {"on-port", "on-ip", "tproxy-mark"}:
        mark = _mark(params["tproxy-mark"])
        try:
            port = int(params["on-port"][0])
        except (ValueError, IndexError):
            return None
        return Tproxy(params["on-ip"][0], port, *mark) if mark else None
    if name == "RETURN" and not params:
        return Return()
    if instance_of_chain(name) is not None and not params:
        return Jump(name)
    return None


def _rule_text(
    live: Any,
    matches: list[tuple[str, dict[str, list[str]]]],
    target_name: str,
    target_params: dict[str, list[str]],
) -> str:
    """An iptables-style spec of a live rule, used to name and find unknown rules."""
    args: list[str] = []
    for flag, value in (("-s", live.src), ("-d", live.dst)):
        if value not in (None, _ANY4, _ANY6):
            args += [flag, value]
    if live.in_interface:
        args += ["-i", live.in_interface]
    if live.out_interface:
        args += ["-o", live.out_interface]
    if live.protocol not in (None, "ip", "all", "0"):
        args += ["-p", live.protocol]
    for name, params in matches:
        args += ["-m", name]
        for key, values in params.items():
            args += [f"--{key}", *values]
    args += ["-j", target_name]
    for key, values in target_params.items():
        args += [f"--{key}", *values]
    return shlex.join(args)


def _error_text(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    if isinstance(exc, OSError) and exc.errno is not None:
        text = f"{os.strerror(exc.errno)} (errno {errno.errorcode.get(exc.errno, exc.errno)})"
    return text


# ---------------------------------------------------------------- worker protocol


class IptablesBackend:
    """Chains and mangle rules for both families, each in its own worker process."""

    def __init__(self) -> None:
        self._workers: dict[int, subprocess.Popen[str]] = {}

    def _worker(self, family: int) -> subprocess.Popen[str]:
        worker = self._workers.get(family)
        if worker is None or worker.poll() is not None:
            worker = subprocess.Popen(
                [sys.executable, "-m", "tproxy.routing.iptables", "--worker", str(family)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                bufsize=1,
                start_new_session=True,  # a Ctrl-C meant for us must not kill it mid-step
            )
            self._workers[family] = worker
        return worker

    def _call(self, family: int, op: str, step: str, item: object = None) -> Any:
        worker = self._worker(family)
        assert worker.stdin is not None and worker.stdout is not None
        try:
            worker.stdin.write(json.dumps({"op": op, "item": item_to_json(item)}) + "\n")
            worker.stdin.flush()
            line = worker.stdout.readline()
        except OSError:
            line = ""  # the worker is gone: report its stderr below
        except BaseException:
            # Interrupted while the worker works: its reply would desynchronise
            # the next call, so this worker is dropped (the next call starts one).
            worker.kill()
            worker.wait()
            self._workers.pop(family, None)
            raise
        if not line:
            worker.kill()
            _, err = worker.communicate()
            self._workers.pop(family, None)
            text = " ".join(err.split())[-300:] or f"exit status {worker.returncode}"
            raise StepError(step, f"iptables worker died: {text}")
        reply = json.loads(line)
        if "error" in reply:
            raise StepError(reply["error"]["step"], reply["error"]["cause"])
        return item_from_json(reply["result"])

    def handles(self, item: object) -> bool:
        return isinstance(item, Chain | MangleRule | UnknownRule)

    def add(self, item: Item) -> None:
        if not isinstance(item, Chain | MangleRule):
            raise StepError(describe(item), "not an iptables item")
        self._call(item.family, "add", describe(item), item)

    def remove(self, item: Found) -> bool:
        if not isinstance(item, Chain | MangleRule | UnknownRule):
            return False  # not an iptables item (see handles): never ours to list
        step = item.text if isinstance(item, UnknownRule) else describe(item)
        return bool(self._call(item.family, "remove", "remove " + step, item))

    def installed(self) -> list[Item | UnknownRule]:
        found: list[Item | UnknownRule] = []
        for family in (4, 6):
            found.extend(self._call(family, "installed", f"read mangle (IPv{family})"))
        return found

    def close(self) -> None:
        for worker in self._workers.values():
            with contextlib.suppress(OSError):
                if worker.stdin:
                    worker.stdin.close()
            try:
                worker.wait(timeout=10)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()
            for stream in (worker.stdout, worker.stderr):
                if stream:
                    stream.close()
        self._workers.clear()


def serve(family: Family) -> int:
    """Worker main loop: one JSON request per line on stdin, one reply per line on stdout."""
    try:
        tables: FamilyTables | None = FamilyTables(family)
        load_error = None
    except StepError as exc:
        tables, load_error = None, exc
    for line in sys.stdin:
        request = json.loads(line)
        item = item_from_json(request["item"])
        try:
            if tables is None:
                assert load_error is not None
                raise load_error
            if request["op"] == "add":
                tables.add(item)
                result: Any = None
            elif request["op"] == "remove":
                result = tables.remove(item)
            else:
                result = [item_to_json(i) for i in tables.installed()]
            reply: dict[str, Any] = {"result": result}
        except StepError as exc:
            reply = {"error": {"step": exc.step, "cause": exc.cause}}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()
    if tables is not None:
        tables.close()
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker" and sys.argv[2] in ("4", "6"):
        raise SystemExit(serve(4 if sys.argv[2] == "4" else 6))
    raise SystemExit("usage: python -m tproxy.routing.iptables --worker 4|6")

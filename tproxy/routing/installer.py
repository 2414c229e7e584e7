"""Apply, verify, revert and inspect plans with the backends.

* :func:`install` applies a plan item by item; if a step fails it removes
  what this call added (newest first) and raises :class:`SetupError` naming
  the step and the kernel's error. The same plan installed twice is a no-op;
  a different plan of the same instance, wider or narrower, is refused
  (:class:`ConflictError`) unless ``replace=True``.
* :func:`teardown` removes everything of one instance: its recorded plan's
  items and whatever the kernel shows tagged for it. Nothing there: no-op.
* :func:`inspect` reports, per instance, what is installed and how it
  compares with the record (``complete`` / ``partial`` / ``absent``).

Ownership: iptables chains are ours by name (``TPROXY_PRE``/``TPROXY_DIVERT``
+ ``_INSTANCE``), rules by ``-m comment tproxy:INSTANCE``; ip rules and
routes by protocol 116, attributed to an instance by its record, or else by
the mark its TPROXY/MARK rules set and the table that mark's rule looks up.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from . import state
from .backend import Backend, StepError

# cli calls installer.has_net_admin (tests replace it here), hence the re-export.
from .capabilities import has_net_admin as has_net_admin
from .capabilities import plugins_problem, xtables_dirs
from .commands import removal_order
from .items import (
    Chain,
    Found,
    IpRule,
    LocalRoute,
    MangleRule,
    NftTable,
    SetMark,
    Tproxy,
    UnknownRule,
    instance_of_chain,
)
from .plan import Plan, PlanRequest, cgroup_problem, make_plan


class RoutingError(Exception):
    """Base of the errors this package raises for the command line."""


class InputError(RoutingError):
    """Bad input found against the host (missing interface, not root): exit 2."""


class ConflictError(RoutingError):
    """A different plan is installed for the instance."""


class SetupError(RoutingError):
    """A step failed; what this call installed has been rolled back.

    ``step`` is the failed command, ``cause`` the kernel's error, and
    ``leftovers`` the steps whose rollback failed too (normally empty).
    """

    def __init__(self, step: str, cause: str, rolled_back: int, leftovers: list[str]) -> None:
        text = f"step failed: {step}: {cause}; rolled back {rolled_back} step(s)"
        hint = ipv6_hint(step, cause)
        if hint:
            text += f"; {hint}"
        if "-m cgroup --path" in step and "Invalid argument" in cause:
            text += "; is there such a cgroup? (paths are relative to the cgroup v2 root)"
        if leftovers:
            text += f"; could NOT roll back: {'; '.join(leftovers)} (run tproxy teardown)"
        super().__init__(text)
        self.step = step
        self.cause = cause
        self.leftovers = leftovers


def ipv6_disabled() -> bool:
    """Whether IPv6 is switched off in this namespace (``disable_ipv6`` on all or lo)."""
    for name in ("all", "lo"):
        try:
            with open(f"/proc/sys/net/ipv6/conf/{name}/disable_ipv6") as handle:
                if handle.read().strip() == "1":
                    return True
        except OSError:
            return True  # no IPv6 in this kernel at all
    return False


def ipv6_hint(step: str, cause: str) -> str:
    """A suggestion when an IPv6 step failed because IPv6 is off (the kernel says EACCES)."""
    if not ("ip -6 " in step or "ip6tables" in step):
        return ""
    if "EACCES" in cause or ipv6_disabled():
        return (
            "IPv6 is disabled here (net.ipv6.conf.all.disable_ipv6=1): use --ipv4, or enable IPv6"
        )
    return ""


class TeardownError(RoutingError):
    """Some items could not be removed (the record is kept so teardown can be retried)."""


@dataclass
class InstanceState:
    """What is installed for one instance and how it compares with its record."""

    instance: str
    recorded: PlanRequest | None
    record_status: str | None
    live: list[Found] = field(default_factory=list)
    missing: list[Found] = field(default_factory=list)
    extra: list[Found] = field(default_factory=list)

    @property
    def status(self) -> str:
        """``complete`` (record matches the kernel), ``partial`` or ``absent``."""
        if not self.live:
            return "absent"
        if self.recorded is not None and not self.missing and not self.extra:
            return "complete"
        return "partial"


# ------------------------------------------------------------- backends


def open_backends(kind: str = "all") -> list[Backend]:
    """Backends for ``kind``: ``iptables``, ``nft``, or ``all`` that work here.

    pyroute2 always handles ip rules and routes. ``all`` (for reading and
    removing: status, teardown) has python-iptables where the legacy tables
    work and nftables where it is available, so an instance is found
    whichever backend installed it.
    """
    from .iproute import IPRouteBackend

    opened: list[Backend] = []
    if kind in ("iptables", "all") and (kind == "iptables" or legacy_problem() is None):
        from .iptables import IptablesBackend

        opened.append(IptablesBackend())
    if kind in ("nft", "all"):
        from . import nft

        if kind == "nft" or nft.available() is None:
            opened.append(nft.NftBackend())
    opened.append(IPRouteBackend())
    return opened


#: Set by ``--backend`` for commands that read and remove (status, teardown).
SELECTED = "all"


def legacy_problem() -> str | None:
    """None if python-iptables can work here (legacy x_tables), else why not.

    Checked without loading libxtables (the engine process must not): the
    kernel's legacy ``ip_tables``, the python-iptables package and the xtables
    plugins it needs.
    """
    import importlib.util

    if not os.path.exists("/proc/net/ip_tables_names"):
        return "the kernel has no legacy x_tables (no /proc/net/ip_tables_names)"
    if importlib.util.find_spec("iptc") is None:
        return "python-iptables is not installed"
    return plugins_problem(xtables_dirs())


def choose_backend(wanted: str, instance: str | None = None) -> tuple[str, str]:
    """Resolve ``--backend`` (``auto`` included) to ``iptables`` or ``nft``, with the reason.

    ``auto`` keeps an instance's recorded backend, else takes python-iptables
    where the legacy tables work and nftables where they do not. Raises
    :class:`InputError` if neither works.
    """
    if wanted != "auto":
        return wanted, f"--backend {wanted}"
    record = state.load(instance) if instance else None
    if record is not None:
        return record[0].backend, f"instance {instance!r} is installed with it"
    problem = legacy_problem()
    if problem is None:
        return "iptables", "the legacy x_tables work here (python-iptables)"
    from . import nft

    nft_problem = nft.available()
    if nft_problem is None:
        return "nft", f"legacy tables unusable ({problem}); nftables works"
    raise InputError(f"no routing backend works here: {problem}; nft: {nft_problem}")


@contextmanager
def _backends(given: list[Backend] | None, kind: str | None = None) -> Iterator[list[Backend]]:
    if given is not None:
        yield given
        return
    opened = open_backends(kind or SELECTED)
    try:
        yield opened
    finally:
        for backend in opened:
            backend.close()


def _backend_for(backends: list[Backend], item: Found) -> Backend:
    for backend in backends:
        if backend.handles(item):
            return backend
    raise StepError(repr(item), "no backend handles this item")


# ------------------------------------------------------------- checks


def check_host(request: PlanRequest) -> None:
    """Raise :class:`InputError` if this host cannot take the plan (before any change)."""
    if not has_net_admin():
        raise InputError("must be root (or have CAP_NET_ADMIN) to change routing")
    for name in dict.fromkeys((request.in_interface, request.out_interface)):
        try:
            socket.if_nametoindex(name)
        except OSError:
            raise InputError(f"no such interface {name!r}") from None
    for path in request.exclude_cgroups:
        problem = cgroup_problem(path, request.backend)
        if problem:
            raise InputError(problem)


# ------------------------------------------------------------- inspect


def _instance_of(item: Found) -> str | None:
    if isinstance(item, NftTable):
        return item.instance
    if isinstance(item, Chain):
        return instance_of_chain(item.name)
    if isinstance(item, UnknownRule):
        return item.instance
    if isinstance(item, MangleRule):
        if item.comment.startswith("tproxy:"):
            return item.comment[len("tproxy:") :]
        return instance_of_chain(item.chain)
    return None


def inspect(
    instance: str | None = None,
    backends: list[Backend] | None = None,
) -> dict[str, InstanceState]:
    """What is installed per instance (all, or just ``instance``), with records.

    Ours but unattributable ip rules and routes (record gone and no iptables
    rule naming their mark) are reported under the key ``""``.
    """
    with _backends(backends) as opened:
        found: list[Found] = []
        for backend in opened:
            found.extend(backend.installed())
    names = set(state.recorded_instances())
    names |= {n for n in map(_instance_of, found) if n}
    if instance is not None:
        names = {instance}
    result: dict[str, InstanceState] = {}
    claimed: set[Found] = set()
    ip_items = [i for i in found if isinstance(i, IpRule | LocalRoute)]
    for name in sorted(names):
        record = state.load(name)
        recorded, record_status = record if record else (None, None)
        mine = [i for i in found if _instance_of(i) == name]
        planned: list[Found] = list(make_plan(recorded).items) if recorded else []
        marks = {
            (t.mark, t.mask)
            for r in mine
            if isinstance(r, MangleRule)
            for t in [r.target]
            if isinstance(t, SetMark | Tproxy)
        }
        marks |= {(t.mark, t.mask) for t in mine if isinstance(t, NftTable)}
        rules = [
            i
            for i in ip_items
            if i in planned or (isinstance(i, IpRule) and (i.fwmark, i.fwmask) in marks)
        ]
        tables = {r.table for r in rules if isinstance(r, IpRule)}
        tables |= {i.table for i in planned if isinstance(i, LocalRoute)}
        routes = [i for i in ip_items if isinstance(i, LocalRoute) and i.table in tables]
        mine += [i for i in dict.fromkeys([*rules, *routes]) if i not in mine]
        claimed.update(mine)
        live_set = set(mine)
        result[name] = InstanceState(
            instance=name,
            recorded=recorded,
            record_status=record_status,
            live=mine,
            missing=[i for i in planned if i not in live_set],
            extra=[i for i in mine if i not in set(planned)],
        )
    if instance is None:
        orphans = [i for i in found if i not in claimed]
        if orphans:
            result[""] = InstanceState("", None, None, live=orphans, extra=orphans)
    return result


# ------------------------------------------------------------- apply / revert


def _remove_all(items: Iterable[Found], backends: list[Backend]) -> tuple[list[Found], list[str]]:
    """Remove ``items`` in removal order; return (removed, errors).

    Rules inside one of our chains that is removed too go with it (the chain
    is flushed, then deleted): removing them one by one first would cost one
    table transaction each.
    """
    items = list(items)
    chains = {(i.family, i.name) for i in items if isinstance(i, Chain)}
    inside = [
        i
        for i in items
        if isinstance(i, MangleRule | UnknownRule)
        and i.table == "mangle"
        and (i.family, i.chain) in chains
    ]
    removed: list[Found] = []
    errors: list[str] = []
    for item in removal_order([i for i in items if i not in inside]):
        try:
            if _backend_for(backends, item).remove(item):
                removed.append(item)
                if isinstance(item, Chain):
                    removed += [
                        i for i in inside if (i.family, i.chain) == (item.family, item.name)
                    ]
        except StepError as exc:
            errors.append(str(exc))
    return removed, errors


def install(
    plan: Plan,
    *,
    replace: bool = False,
    backends: list[Backend] | None = None,
    owner: str = "setup",
) -> str:
    """Install ``plan``; return ``"installed"``, ``"unchanged"`` or ``"replaced"``.

    ``owner`` goes into the record (``setup`` or ``run``); an unchanged
    installation keeps the owner it had.

    Raises :class:`ConflictError` (nothing changed) if the instance has a
    different plan installed and ``replace`` is false, and :class:`SetupError`
    (everything this call added removed again) if a step fails.
    """
    request = plan.request
    atomic = any(isinstance(i, NftTable) for i in plan.items)
    with state.locked(), _backends(backends, request.backend) as opened:
        state.collect_stale()
        current = inspect(request.instance, opened)[request.instance]
        outcome = "installed"
        if current.live:
            if set(current.live) == set(plan.items):
                # The recorded owner stays; a run adopting a killed run's plan
                # becomes its owner process.
                recorded = state.owner_process(request.instance)
                if recorded is None or (owner == "run" and recorded[0] == "run"):
                    state.save(request, "installed", recorded[0] if recorded else owner)
                else:
                    state.save(request, "installed", recorded[0], process=recorded[1:])
                return "unchanged"
            same_plan = current.recorded == request
            if not replace and not same_plan:
                raise ConflictError(
                    _conflict_text(request.instance) + "; use --replace, or tproxy teardown first"
                )
            if not atomic:
                _, errors = _remove_all(current.live, opened)
                if errors:
                    raise TeardownError(
                        "could not remove the old installation: " + "; ".join(errors)
                    )
            outcome = "replaced" if not same_plan else "installed"
        # nft: the table replaces its predecessor in one transaction, so the old
        # installation stays until the new one is in (and stays if it fails).
        keep = set(current.live) if atomic else set()
        old_record = state.read_raw(request.instance)
        state.save(request, "installing", owner)
        applied: list[Found] = []
        try:
            for item in plan.items:
                if item in keep and not isinstance(item, NftTable):
                    continue
                applied.append(item)
                _backend_for(opened, item).add(item)
        except BaseException as exc:  # a kernel refusal, or Ctrl-C half-way: roll back
            if isinstance(exc, StepError):
                applied.pop()  # refused: not added (and never remove a foreign twin)
            # else the interrupted step may or may not have happened: remove is a no-op if not
            leftovers: list[str] = []
            for done in reversed(applied):
                try:
                    _backend_for(opened, done).remove(done)
                except StepError as undo:
                    leftovers.append(str(undo))
            if leftovers:
                state.save(request, "failed", owner)
            elif keep and old_record is not None:
                state.write_raw(request.instance, old_record)  # the old one is still in place
            else:
                state.forget(request.instance)
            if isinstance(exc, StepError):
                raise SetupError(exc.step, exc.cause, len(applied), leftovers) from exc
            raise
        if keep:
            stale = [
                i
                for i in current.live
                if i not in set(plan.items)
                and not (
                    isinstance(i, NftTable)
                    and any(isinstance(n, NftTable) and n.name == i.name for n in plan.items)
                )
            ]
            _, errors = _remove_all(stale, opened)
            if errors:
                state.save(request, "installed", owner)
                raise TeardownError(
                    "installed, but could not remove parts of the old "
                    "installation: " + "; ".join(errors)
                )
        state.save(request, "installed", owner)
        return outcome


def _conflict_text(instance: str) -> str:
    return f"instance {instance!r} is installed with a different plan (see tproxy status)"


def conflict(plan: Plan, backends: list[Backend] | None = None) -> str | None:
    """Why ``install(plan)`` would raise :class:`ConflictError`, or None if it would not.

    Any difference counts, a wider plan as much as a narrower one: only the
    same plan (installed completely, or partly under its own record, which
    ``install`` completes) is not a conflict. Changes nothing.
    """
    with state.locked(), _backends(backends) as opened:
        current = inspect(plan.instance, opened)[plan.instance]
    if not current.live or set(current.live) == set(plan.items):
        return None
    if current.recorded == plan.request:
        return None
    return _conflict_text(plan.instance)


def teardown(instance: str, backends: list[Backend] | None = None) -> list[Found]:
    """Remove everything of ``instance``; return what was removed (empty: nothing there)."""
    with state.locked(), _backends(backends) as opened:
        current = inspect(instance, opened)[instance]
        removed, errors = _remove_all(current.live, opened)
        if errors:
            raise TeardownError("; ".join(errors))
        state.forget(instance)
        return removed


def teardown_orphans(backends: list[Backend] | None = None) -> list[Found]:
    """Remove ip rules and routes of ours that no instance claims."""
    with state.locked(), _backends(backends) as opened:
        orphans = inspect(None, opened).get("")
        if orphans is None:
            return []
        removed, errors = _remove_all(orphans.live, opened)
        if errors:
            raise TeardownError("; ".join(errors))
        return removed

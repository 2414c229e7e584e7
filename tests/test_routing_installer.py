"""The installer against an in-memory backend: rollback, idempotency, conflicts, teardown.

The real backends are exercised in ``netns-tests/test_routing.py``; here the
kernel is a set, so every failure point can be hit without root.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tproxy.routing import installer, state
from tproxy.routing.backend import StepError
from tproxy.routing.commands import describe
from tproxy.routing.plan import Chain, Found, Item, MangleRule, Plan, build_request, make_plan


class MemoryKernel:
    """One backend for every item kind; ``fail_on`` makes the matching add fail."""

    def __init__(self) -> None:
        self.items: list[Found] = []
        self.fail_on: Item | None = None
        self.fail_remove: bool = False
        self.log: list[str] = []

    def handles(self, item: object) -> bool:
        return True

    def add(self, item: Item) -> None:
        if item == self.fail_on:
            raise StepError(describe(item), "Invalid argument (errno EINVAL)")
        if item in self.items:
            raise StepError(describe(item), "File exists (errno EEXIST)")
        self.items.append(item)
        self.log.append(f"add {describe(item)}")

    def remove(self, item: Item) -> bool:
        if self.fail_remove:
            raise StepError("remove " + describe(item), "Device or resource busy")
        if item not in self.items:
            return False
        self.items.remove(item)
        self.log.append(f"del {describe(item)}")
        if isinstance(item, Chain):  # a chain is flushed, then deleted, as the kernel does
            self.items = [
                i
                for i in self.items
                if not (
                    isinstance(i, MangleRule) and (i.family, i.chain) == (item.family, item.name)
                )
            ]
        return True

    def installed(self) -> list[Found]:
        return list(self.items)

    def close(self) -> None:
        pass


@pytest.fixture(autouse=True)
def state_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(state, "ROOT", tmp_path / "run-tproxy")
    return tmp_path / "run-tproxy"


def make(ports: str = "80", **kw: object) -> Plan:
    return make_plan(build_request("eth0", "eth1", ports, **kw))  # type: ignore[arg-type]


def test_install_then_teardown_leaves_nothing() -> None:
    kernel = MemoryKernel()
    plan = make()
    assert installer.install(plan, backends=[kernel]) == "installed"
    assert kernel.items == list(plan.items)
    assert state.load("default") == (plan.request, "installed")
    assert installer.inspect(backends=[kernel])["default"].status == "complete"
    removed = installer.teardown("default", backends=[kernel])
    assert set(removed) == set(plan.items)
    assert kernel.items == []
    assert state.load("default") is None
    assert not state.state_dir().exists()
    assert installer.teardown("default", backends=[kernel]) == []


def test_same_plan_twice_changes_nothing() -> None:
    kernel = MemoryKernel()
    installer.install(make(), backends=[kernel])
    before = list(kernel.log)
    assert installer.install(make(), backends=[kernel]) == "unchanged"
    assert kernel.log == before


def test_different_plan_refused_unless_replace() -> None:
    kernel = MemoryKernel()
    installer.install(make("80"), backends=[kernel])
    before = list(kernel.items)
    with pytest.raises(installer.ConflictError, match="different plan"):
        installer.install(make("443"), backends=[kernel])
    assert kernel.items == before
    assert installer.install(make("443"), replace=True, backends=[kernel]) == "replaced"
    assert kernel.items == list(make("443").items)


def test_failure_halfway_rolls_back_in_reverse_and_names_the_step() -> None:
    kernel = MemoryKernel()
    plan = make()
    failing = next(i for i in plan.items if i.family == 6)  # first IPv6 step
    kernel.fail_on = failing
    with pytest.raises(installer.SetupError) as caught:
        installer.install(plan, backends=[kernel])
    assert caught.value.step == describe(failing)
    assert "Invalid argument" in str(caught.value)
    assert "rolled back 10 step(s)" in str(caught.value)
    assert kernel.items == []
    adds = [line[4:] for line in kernel.log if line.startswith("add ")]
    dels = [line[4:] for line in kernel.log if line.startswith("del ")]
    assert dels == list(reversed(adds))
    assert state.load("default") is None


def test_failed_rollback_keeps_the_record_for_teardown() -> None:
    kernel = MemoryKernel()
    plan = make(ipv4=True)
    kernel.fail_on = plan.items[-1]

    def remove_fails(item: Item) -> bool:
        raise StepError("remove " + describe(item), "Device or resource busy")

    kernel.remove = remove_fails  # type: ignore[method-assign]
    with pytest.raises(installer.SetupError, match="could NOT roll back"):
        installer.install(plan, backends=[kernel])
    assert state.load("default") == (plan.request, "failed")


def test_partial_is_reported_and_repaired_by_the_same_setup() -> None:
    kernel = MemoryKernel()
    plan = make()
    installer.install(plan, backends=[kernel])
    gone = plan.items[3]
    kernel.items.remove(gone)
    found = installer.inspect(backends=[kernel])["default"]
    assert found.status == "partial" and found.missing == [gone]
    assert installer.install(plan, backends=[kernel]) == "installed"
    assert set(kernel.items) == set(plan.items)


def test_found_without_record_is_attributed_by_tags() -> None:
    kernel = MemoryKernel()
    plan = make()
    installer.install(plan, backends=[kernel])
    state.forget("default")
    found = installer.inspect(backends=[kernel])
    assert set(found["default"].live) == set(plan.items)  # ip rules/routes found via the mark
    assert found["default"].status == "partial"  # nothing to compare with
    installer.teardown("default", backends=[kernel])
    assert kernel.items == []


def test_instances_are_independent() -> None:
    kernel = MemoryKernel()
    a = make("80")
    b = make("443", instance="lab", mark="2", table="101")
    installer.install(a, backends=[kernel])
    installer.install(b, backends=[kernel])
    installer.teardown("default", backends=[kernel])
    assert kernel.items == list(b.items)
    assert installer.inspect(backends=[kernel])["lab"].status == "complete"


def test_foreign_items_are_never_reported_or_removed() -> None:
    kernel = MemoryKernel()
    foreign = MangleRule(4, "PREROUTING", make().items[5].target, "not ours")  # type: ignore[union-attr]
    kernel.items.append(foreign)
    installer.install(make(), backends=[kernel])
    installer.teardown("default", backends=[kernel])
    assert kernel.items == [foreign]


def test_interrupt_halfway_rolls_back_and_reraises() -> None:
    kernel = MemoryKernel()
    plan = make()
    real_add = kernel.add

    def add(item: Item) -> None:
        real_add(item)  # the step happened, then Ctrl-C arrived
        if item == plan.items[5]:
            raise KeyboardInterrupt

    kernel.add = add  # type: ignore[method-assign]
    with pytest.raises(KeyboardInterrupt):
        installer.install(plan, backends=[kernel])
    assert kernel.items == []
    assert state.load("default") is None


def test_records_of_deleted_namespaces_are_collected(state_root: Path) -> None:
    import json
    import os

    gone = state_root / "ns-1"
    gone.mkdir(parents=True)
    (gone / "default.json").write_text(json.dumps({"netns_inode": 1}))
    alive = state_root / "ns-2"
    alive.mkdir()
    here = os.stat("/proc/self/ns/net").st_ino
    (alive / "default.json").write_text(json.dumps({"netns_inode": here}))
    assert state.collect_stale() == [gone]
    assert not gone.exists() and alive.exists()


@pytest.mark.parametrize(("first", "second"), [("80", "80,443"), ("80,443", "80"), ("80", "81")])
def test_any_different_plan_is_refused_wider_or_narrower(first: str, second: str) -> None:
    kernel = MemoryKernel()
    installer.install(make(first), backends=[kernel])
    before = list(kernel.items)
    assert installer.conflict(make(second), backends=[kernel]) is not None
    with pytest.raises(installer.ConflictError, match=r"different plan.*--replace"):
        installer.install(make(second), backends=[kernel])
    assert kernel.items == before and state.load("default") == (make(first).request, "installed")
    assert installer.conflict(make(first), backends=[kernel]) is None
    assert installer.install(make(second), replace=True, backends=[kernel]) == "replaced"
    assert kernel.items == list(make(second).items)


def test_a_subset_without_a_record_is_a_conflict_too() -> None:
    kernel = MemoryKernel()
    installer.install(make("80"), backends=[kernel])
    state.forget("default")
    with pytest.raises(installer.ConflictError):
        installer.install(make("80,443"), backends=[kernel])


def test_ipv6_refused_with_eacces_suggests_ipv4() -> None:
    kernel = MemoryKernel()
    plan = make()
    failing = next(i for i in plan.items if i.family == 6)

    def refuse(item: Item) -> None:
        if item == failing:
            raise StepError(describe(item), "Permission denied (errno EACCES)")
        kernel.items.append(item)

    kernel.add = refuse  # type: ignore[method-assign]
    with pytest.raises(installer.SetupError, match="use --ipv4") as caught:
        installer.install(plan, backends=[kernel])
    assert str(caught.value).count("\n") == 0 and "rolled back" in str(caught.value)
    assert kernel.items == []
    assert installer.ipv6_hint("ip -4 route add local 0.0.0.0/0", "EACCES") == ""

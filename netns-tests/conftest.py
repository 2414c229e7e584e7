"""pytest wiring for the network-namespace tests: fixtures, marks, cleanup, hygiene.

* Every test under ``netns-tests/`` is marked ``netns`` and skipped (with the
  reason) unless running as root with ``ip`` available.
* Fixtures: ``topology`` (a fresh `nsharness.Topology` per test) and ``netns``
  (a factory for standalone namespaces), both deleted after the test even when
  it fails; the logs of processes started in them are attached to the report
  of a failing test.
* At session start, leftovers of crashed earlier runs are removed and the root
  namespace is snapshotted; at session end (after all fixtures are torn down)
  it is compared again and any leftover fails the run. ``TPX_HYGIENE=warn``
  reports without failing (for machines where people experiment alongside).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import nsharness  # noqa: E402
from nsharness import Namespace, Topology  # noqa: E402

_NAMESPACES_KEY = pytest.StashKey[list[Namespace]]()
_SNAPSHOT_KEY = pytest.StashKey[dict[str, list[str]]]()
_WORKERS_OPEN_KEY = pytest.StashKey[list[str]]()
_STATE_DIR_KEY = pytest.StashKey[Path]()
_STILL_OPEN = "tpx_namespaces_still_open"
"""Key of a pytest-xdist worker's ``workeroutput``: the namespaces it had not closed."""


def netns_unavailable_reason() -> str | None:
    """Why namespace tests cannot run here, or None if they can."""
    if os.geteuid() != 0:
        return "netns tests need root (network namespaces, veth, iptables); run as root"
    if shutil.which("ip") is None:
        return "netns tests need iproute2's `ip` (apt-get install iproute2)"
    return None


def _in_netns_tests(item: pytest.Item) -> bool:
    return HERE in Path(str(item.path)).resolve().parents


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark netns-tests items ``netns`` (before ``-m`` selects) and skip them when impossible."""
    reason = netns_unavailable_reason()
    for item in items:
        if _in_netns_tests(item):
            item.add_marker(pytest.mark.netns)
        if reason and item.get_closest_marker("netns") is not None:
            item.add_marker(pytest.mark.skip(reason=reason))


def _xdist_worker(config: pytest.Config) -> bool:
    """True in a pytest-xdist worker process (``-n N``)."""
    return hasattr(config, "workerinput")


def pytest_sessionstart(session: pytest.Session) -> None:
    """Remove leftovers of dead runs, then remember what the root namespace holds.

    Under pytest-xdist only the controller does this (before it starts the
    workers) and compares at the end (after every worker has exited): a worker
    that finished early must not count another worker's live test as a leak.
    """
    if netns_unavailable_reason() is not None:
        return
    nsharness.install_signal_handlers()
    if _xdist_worker(session.config):
        # `tproxy setup`/`teardown` hold one host-wide lock in their state directory
        # for seconds; each worker gets its own, or the workers' routing tests would
        # queue on each other (and a proxy's start-up wait could run out).
        if "TPROXY_STATE_DIR" not in os.environ:
            state_dir = Path(tempfile.mkdtemp(prefix="tpx-state-", dir="/run"))
            session.stash[_STATE_DIR_KEY] = state_dir
            os.environ["TPROXY_STATE_DIR"] = str(state_dir)
        return
    removed = nsharness.remove_stale()
    if removed:
        _write(session.config, f"netns harness: removed leftovers of crashed runs: {removed}")
    session.stash[_SNAPSHOT_KEY] = nsharness.snapshot_root()


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """After fixture teardown: fail the run if the root namespace gained anything."""
    if _xdist_worker(session.config):
        # Tell the controller (see pytest_testnodedown) what this worker still had open.
        session.config.workeroutput[_STILL_OPEN] = nsharness.live_namespaces()  # type: ignore[attr-defined]
        nsharness.cleanup_all()
        state_dir = session.stash.get(_STATE_DIR_KEY, None)
        if state_dir is not None:
            shutil.rmtree(state_dir, ignore_errors=True)
            os.environ.pop("TPROXY_STATE_DIR", None)
        return
    before = session.stash.get(_SNAPSHOT_KEY, None)
    if before is None:
        return
    still_open = nsharness.live_namespaces() + session.config.stash.get(_WORKERS_OPEN_KEY, [])
    nsharness.cleanup_all()
    nsharness.remove_stale()
    diff = nsharness.diff_snapshots(before, nsharness.snapshot_root())
    if still_open:
        diff.insert(0, f"namespaces still open at session end (now deleted): {still_open}")
    if not diff:
        return
    lines = [
        "netns hygiene check FAILED: the root namespace differs from the session start",
        *diff,
    ]
    if os.environ.get("TPX_HYGIENE", "fail") == "warn":
        lines[0] += " (TPX_HYGIENE=warn: not failing the run)"
    elif session.exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    _write(session.config, "\n".join(lines), red=True)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: object) -> None:
    """pytest-xdist controller: collect what an exiting worker still had open."""
    still_open = getattr(node, "workeroutput", {}).get(_STILL_OPEN, [])
    if still_open:
        node.config.stash.setdefault(_WORKERS_OPEN_KEY, []).extend(still_open)


def _write(config: pytest.Config, text: str, red: bool = False) -> None:
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.ensure_newline()
        reporter.write_line(text, red=red, bold=red)
    else:
        print(text, file=sys.stderr)


def _track(request: pytest.FixtureRequest, ns: Namespace) -> None:
    request.node.stash.setdefault(_NAMESPACES_KEY, []).append(ns)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Attach the logs of the test's namespace processes to a failing report."""
    report = yield
    if report.failed and call.when in ("setup", "call"):
        logs = "\n".join(
            text for ns in item.stash.get(_NAMESPACES_KEY, []) if (text := ns.read_log())
        )
        if logs:
            report.sections.append(("namespace process logs", logs))
    return report


@pytest.fixture
def topology(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Topology]:
    """A fresh client -- gateway -- server topology, deleted after the test."""
    topo = Topology(log_dir=tmp_path / "netns-logs")
    for ns in topo.namespaces:
        _track(request, ns)
    try:
        yield topo
    finally:
        topo.close()


@pytest.fixture
def netns(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[..., Namespace]]:
    """Factory: ``netns(role="ns")`` gives a fresh namespace with lo up, deleted after the test."""
    created: list[Namespace] = []

    def make(role: str = "ns") -> Namespace:
        ns = Namespace(role, log_dir=tmp_path / "netns-logs")
        created.append(ns)
        _track(request, ns)
        return ns

    try:
        yield make
    finally:
        errors: list[BaseException] = []
        for ns in reversed(created):
            try:
                ns.close()
            except Exception as exc:
                errors.append(exc)
        if errors:
            raise errors[0]

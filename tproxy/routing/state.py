"""The record of installations under ``/run/tproxy/`` (one file per instance).

``/run`` is shared by every network namespace on the host, while rules live
in one namespace, so records are kept per namespace:
``/run/tproxy/ns-<cookie>/<instance>.json``. The cookie is the kernel's
network-namespace cookie (``SO_NETNS_COOKIE``): unlike the inode of
``/proc/self/ns/net`` it is never reused within a boot, so a namespace created
after another was deleted cannot inherit its records. (Kernels before 5.14
lack it; then the inode is used, and the live tags decide anyway: a record
whose items are not installed is treated as stale.) ``TPROXY_STATE_DIR``
overrides ``/run/tproxy`` (tests).

The record is written *before* the first change (status ``installing``) and
marked ``installed`` after the last, so ``teardown`` after a crash at any
point knows what may be there. It is a convenience: everything of ours is
also found from the tags (chain names, comments, protocol 116).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .plan import PlanRequest

SO_NETNS_COOKIE = 71
ROOT = Path(os.environ.get("TPROXY_STATE_DIR", "/run/tproxy"))


def namespace_key() -> str:
    """A name for the current network namespace, unique within this boot."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        try:
            cookie = int.from_bytes(
                sock.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8), "little"
            )
            return f"ns-{cookie}"
        except OSError:
            pass
    info = os.stat("/proc/self/ns/net")
    return f"ns-ino-{info.st_dev}-{info.st_ino}"


def state_dir() -> Path:
    """The directory holding this namespace's records."""
    return ROOT / namespace_key()


def _path(instance: str) -> Path:
    return state_dir() / f"{instance}.json"


@contextlib.contextmanager
def locked() -> Iterator[None]:
    """Serialise tproxy setup/teardown (one flock on ``/run/tproxy/lock`` for all namespaces).

    One host-wide lock keeps per-namespace directories removable when empty;
    the critical sections are short.
    """
    ROOT.mkdir(parents=True, exist_ok=True, mode=0o755)
    fd = os.open(ROOT / "lock", os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def load(instance: str) -> tuple[PlanRequest, str] | None:
    """The recorded (request, status) of an instance, or None (missing or unreadable)."""
    try:
        data: dict[str, Any] = json.loads(_path(instance).read_text())
        return PlanRequest.from_json(data["request"]), str(data.get("status", "installed"))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def save(
    request: PlanRequest,
    status: str,
    owner: str = "setup",
    process: tuple[int | None, str | None] | None = None,
) -> None:
    """Record an instance's request atomically (write a temporary file, rename it).

    A reader sees the old record or the new one, never half of one, whenever
    this process dies. There is no fsync: it would only matter if the machine
    went down, and that takes the rules the record describes with it (netfilter
    state and ip rules live in the kernel; ``/run`` is normally a tmpfs), and a
    record whose items are not installed is treated as stale anyway.

    ``owner`` is ``setup`` (installed by the command, removed by ``teardown``)
    or ``run`` (installed by ``tproxy run --setup`` for its lifetime).
    ``process`` is the owner's (pid, start time); default: this process.
    """
    path = _path(request.instance)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    from .liveness import start_time

    pid, started = process or (os.getpid(), start_time(os.getpid()))
    data = {
        "request": request.to_json(),
        "status": status,
        "owner": owner,
        "pid": pid,
        "pid_start": started,
        "netns_inode": os.stat("/proc/self/ns/net").st_ino,
    }
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def owner(instance: str) -> str | None:
    """Who installed an instance (``setup`` or ``run``), or None without a record."""
    try:
        return str(json.loads(_path(instance).read_text()).get("owner", "setup"))
    except (OSError, ValueError, AttributeError):
        return None


def owner_process(instance: str) -> tuple[str, int | None, str | None] | None:
    """(owner, pid, pid start time) from an instance's record, or None without a record."""
    try:
        data = json.loads(_path(instance).read_text())
        return (str(data.get("owner", "setup")), data.get("pid"), data.get("pid_start"))
    except (OSError, ValueError, AttributeError):
        return None


def read_raw(instance: str) -> str | None:
    """An instance's record as stored (to put it back with :func:`write_raw`), or None."""
    try:
        return _path(instance).read_text()
    except OSError:
        return None


def write_raw(instance: str, text: str) -> None:
    """Put back a record read with :func:`read_raw` (atomically)."""
    path = _path(instance)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def forget(instance: str) -> None:
    """Delete an instance's record; remove the namespace directory when it is empty."""
    with contextlib.suppress(FileNotFoundError):
        _path(instance).unlink()
    with contextlib.suppress(OSError):
        state_dir().rmdir()  # only succeeds when no record is left


def _live_namespace_inodes() -> set[int]:
    """Inodes of every network namespace still in use: a process's, or a bind mount's."""
    inodes: set[int] = set()
    for pattern in ("/proc/[0-9]*/ns/net", "/run/netns/*", "/var/run/netns/*"):
        for path in Path("/").glob(pattern.lstrip("/")):
            with contextlib.suppress(OSError):
                inodes.add(os.stat(path).st_ino)
    return inodes


def collect_stale() -> list[Path]:
    """Delete record directories of namespaces that no longer exist; return them.

    A namespace deleted without ``teardown`` took its rules with it, but its
    record would stay in the shared ``/run``. A directory is kept if any of its
    records names a namespace still in use (by a process or an ``ip netns``
    bind mount), or names none; an inode reused by a new namespace only
    delays the clean-up.
    """
    if not ROOT.is_dir():
        return []
    ours = state_dir()
    live: set[int] | None = None  # scanning /proc costs a few ms: only when needed
    removed = []
    for directory in ROOT.glob("ns-*"):
        if directory == ours:
            continue  # this namespace exists: we are in it
        inodes = set()
        for record in directory.glob("*.json"):
            with contextlib.suppress(OSError, ValueError, AttributeError):
                inodes.add(json.loads(record.read_text()).get("netns_inode"))
        if not inodes or None in inodes:
            continue
        if live is None:
            live = _live_namespace_inodes()
        if inodes & live:
            continue
        for record in directory.iterdir():
            with contextlib.suppress(OSError):
                record.unlink()
        with contextlib.suppress(OSError):
            directory.rmdir()
            removed.append(directory)
    return removed


def recorded_instances() -> list[str]:
    """Instances with a record in this namespace."""
    directory = state_dir()
    if not directory.exists():
        return []
    return sorted(p.stem for p in directory.glob("*.json"))

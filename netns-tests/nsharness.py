"""Network-namespace test harness: namespaces, a client--gateway--server topology, peers.

tproxy only means something on a real path, so its end-to-end tests build one out
of Linux network namespaces joined by veth pairs::

    client (eth0) ---- (gw-in) gateway (gw-out) ---- (eth0) server
    192.0.2.2/24      192.0.2.1/24   198.51.100.1/24      198.51.100.2/24
    2001:db8:1::2/64  2001:db8:1::1/64  2001:db8:2::1/64  2001:db8:2::2/64

Everything here is plain, blocking Python and the ``ip`` tool, so it can be used
from pytest fixtures (see ``conftest.py``) and from standalone scripts alike.

Safety rules this module enforces, because tests share machines with people:

* Names are unique per process: ``tpx-<pid>-<token>-<n>-<role>``. The pid and a
  registry file holding the owner's start time tell whether the owner still runs,
  so leftovers of a crashed run are found and removed (`remove_stale`) while the
  namespaces of a concurrent live run are left alone.
* Veth pairs are created with both ends directly inside namespaces; the root
  namespace never holds one, not even for a moment.
* Every namespace is deleted by `Namespace.close` (processes stopped, sockets
  closed, ``/etc/netns/<name>`` removed); `cleanup_all` runs at exit as a backstop,
  and `install_signal_handlers` turns SIGTERM/SIGHUP into KeyboardInterrupt so
  that ``finally`` blocks run.
* `snapshot_root` and `diff_snapshots` compare the root namespace before and
  after a session (the hygiene check).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

PREFIX = "tpx"
"""Every namespace this harness creates is named ``tpx-<pid>-<token>-<n>-<role>``."""

NETNS_RUN_DIR = Path("/run/netns")
ETC_NETNS_DIR = Path("/etc/netns")
REGISTRY_DIR = Path("/run/tpx-harness")
"""One file per live harness process, ``<pid>-<token>``, holding its start time."""

PEERS_DIR = Path(__file__).resolve().parent / "peers"

_NAME_RE = re.compile(rf"^{PREFIX}-(\d+)-([0-9a-f]{{4}})-")
_CLONE_NEWNET = 0x40000000
# Defaults for Namespace.socket, whose name shadows the module inside the class body.
_AF_INET = socket.AF_INET
_SOCK_STREAM = socket.SOCK_STREAM
_POLL_INTERVAL = 0.05


class HarnessError(RuntimeError):
    """Something the harness was asked to set up or observe did not happen."""


class CommandError(subprocess.CalledProcessError):
    """A command exited non-zero; ``str()`` includes its stdout and stderr."""

    def __str__(self) -> str:
        return (
            f"command {_show(self.cmd)} exited with status {self.returncode}\n"
            f"--- stdout ---\n{self.stdout or ''}--- stderr ---\n{self.stderr or ''}"
        )


class CommandTimeout(subprocess.TimeoutExpired):
    """A command ran longer than its timeout and was killed; ``str()`` shows its output."""

    def __str__(self) -> str:
        out = _text(self.stdout)
        err = _text(self.stderr)
        return (
            f"command {_show(self.cmd)} timed out after {self.timeout}s and was killed\n"
            f"--- stdout ---\n{out}--- stderr ---\n{err}"
        )


def _text(data: str | bytes | None) -> str:
    if data is None:
        return ""
    if isinstance(data, bytes):
        return data.decode(errors="replace")
    return data


def _show(argv: Any) -> str:
    if isinstance(argv, (list, tuple)):
        return " ".join(str(a) for a in argv)
    return str(argv)


def run_command(
    argv: Sequence[str | os.PathLike[str] | int],
    *,
    check: bool = True,
    timeout: float = 30.0,
    input: str | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` to completion with text output captured.

    Raises `CommandError` (with stderr in its message) on a non-zero exit when
    ``check`` is true, and `CommandTimeout` when it outlives ``timeout``.
    """
    args = [str(a) for a in argv]
    try:
        proc = subprocess.run(
            args,
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
            env=None if env is None else dict(env),
            cwd=cwd,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise CommandTimeout(args, timeout, exc.stdout, exc.stderr) from None
    if check and proc.returncode != 0:
        raise CommandError(proc.returncode, args, proc.stdout, proc.stderr)
    return proc


# --------------------------------------------------------------------------
# Ownership: which process a namespace belongs to, and whether it still runs.

_run_token: tuple[int, str] | None = None


def run_id() -> str:
    """``<pid>-<token>`` of this process; recomputed after a fork so children differ."""
    global _run_token
    pid = os.getpid()
    if _run_token is None or _run_token[0] != pid:
        _run_token = (pid, secrets.token_hex(2))
    return f"{_run_token[0]}-{_run_token[1]}"


def _proc_start_time(pid: int) -> str | None:
    """The start time of ``pid`` (clock ticks since boot), or None if it is gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name (field 2) may contain spaces and parentheses; fields after it do not.
    rest = stat[stat.rfind(")") + 2 :].split()
    if not rest or rest[0] in ("Z", "X"):
        return None
    return rest[19]


def _register_owner() -> None:
    """Record this process's start time so others can tell it from a reused pid."""
    REGISTRY_DIR.mkdir(parents=True, exist_ok=True)
    path = REGISTRY_DIR / run_id()
    if not path.exists():
        path.write_text(f"{_proc_start_time(os.getpid())}\n")


def _unregister_owner() -> None:
    with contextlib.suppress(FileNotFoundError):
        (REGISTRY_DIR / run_id()).unlink()


def owner_of(name: str) -> str | None:
    """The ``<pid>-<token>`` owner encoded in a harness name, or None for foreign names."""
    m = _NAME_RE.match(name)
    return f"{m.group(1)}-{m.group(2)}" if m else None


def owner_alive(owner: str) -> bool:
    """Whether the harness process ``<pid>-<token>`` still runs.

    Conservative: a live pid without a registry file counts as alive, so a
    concurrent run is never disturbed; a dead or zombie pid, or a live pid whose
    start time differs from the recorded one (pid reuse), counts as dead.
    """
    if owner == run_id():
        return True
    pid = int(owner.split("-", 1)[0])
    started = _proc_start_time(pid)
    if started is None:
        return False
    try:
        recorded = (REGISTRY_DIR / owner).read_text().strip()
    except FileNotFoundError:
        return True
    return recorded == started


def is_foreign_live(name: str) -> bool:
    """True for a harness name that belongs to another process that still runs."""
    owner = owner_of(name)
    return owner is not None and owner != run_id() and owner_alive(owner)


def list_namespaces() -> list[str]:
    """Names of all named network namespaces (``ip netns list``)."""
    out = run_command(["ip", "netns", "list"]).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _kill_namespace_pids(name: str, *, timeout: float = 5.0) -> None:
    """SIGKILL every process still inside namespace ``name`` and wait until they are gone."""
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / _POLL_INTERVAL) + 1):
        proc = run_command(["ip", "netns", "pids", name], check=False)
        pids = [int(p) for p in proc.stdout.split() if p.isdigit() and int(p) != os.getpid()]
        live = [p for p in pids if _proc_start_time(p) is not None]
        if not live or time.monotonic() > deadline:
            return
        for pid in live:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(_POLL_INTERVAL)


def _delete_namespace(name: str) -> None:
    """Kill what runs in ``name``, delete it and its ``/etc/netns`` directory; absent is fine."""
    if (NETNS_RUN_DIR / name).exists():
        _kill_namespace_pids(name)
        proc = run_command(["ip", "netns", "delete", name], check=False)
        if proc.returncode != 0 and (NETNS_RUN_DIR / name).exists():
            raise CommandError(proc.returncode, proc.args, proc.stdout, proc.stderr)
    shutil.rmtree(ETC_NETNS_DIR / name, ignore_errors=True)


def remove_stale() -> list[str]:
    """Delete namespaces, ``/etc/netns`` entries and registry files of dead harness runs.

    Returns the names removed. Namespaces of live runs (this one or a concurrent
    one) and namespaces not named by this harness are never touched.
    """
    removed: list[str] = []
    for name in list_namespaces():
        owner = owner_of(name)
        if owner is not None and not owner_alive(owner):
            _delete_namespace(name)
            removed.append(name)
    if ETC_NETNS_DIR.is_dir():
        for entry in ETC_NETNS_DIR.iterdir():
            owner = owner_of(entry.name)
            if owner is not None and not owner_alive(owner):
                shutil.rmtree(entry, ignore_errors=True)
                if entry.name not in removed:
                    removed.append(entry.name)
    if REGISTRY_DIR.is_dir():
        for entry in REGISTRY_DIR.iterdir():
            if re.fullmatch(r"\d+-[0-9a-f]{4}", entry.name) and not owner_alive(entry.name):
                with contextlib.suppress(FileNotFoundError):
                    entry.unlink()
    return removed


# --------------------------------------------------------------------------
# Entering a namespace from this process (for sockets).

_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


@contextlib.contextmanager
def _inside(name: str) -> Iterator[None]:
    """Move the calling *thread* into namespace ``name`` and back.

    Uses setns(2) directly: unlike ``pyroute2.netns.setns`` it never creates a
    missing namespace. Only this thread moves; do not await or block on other
    work inside, or unrelated sockets would be created in the namespace.
    """
    target = os.open(NETNS_RUN_DIR / name, os.O_RDONLY | os.O_CLOEXEC)
    try:
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            _setns(target)
            try:
                yield
            finally:
                _setns(home)
        finally:
            os.close(home)
    finally:
        os.close(target)


# --------------------------------------------------------------------------
# Namespaces.


@dataclass
class _Tracked:
    proc: subprocess.Popen[Any]
    log_path: Path | None
    log_file: IO[bytes] | None
    argv: list[str] = field(default_factory=list)


_LIVE: dict[str, Namespace] = {}
_counter = 0


class Namespace:
    """One named network namespace, created by this harness and deleted by `close`.

    Commands run through ``ip netns exec``, so ``/etc/netns/<name>/hosts`` (see
    `write_hosts`) replaces ``/etc/hosts`` for them. Sockets made by `socket` or
    inside `enter` live in the namespace for their whole life.
    """

    def __init__(self, role: str = "ns", log_dir: str | os.PathLike[str] | None = None) -> None:
        """Create a fresh namespace named ``tpx-<pid>-<token>-<n>-<role>`` with ``lo`` up.

        ``log_dir`` receives the logs of processes started with `popen`; without
        it a temporary directory is used and removed by `close`.
        """
        global _counter
        if not re.fullmatch(r"[a-z0-9][a-z0-9_-]{0,30}", role):
            raise ValueError(f"role must be a short lowercase name, got {role!r}")
        _counter += 1
        self.role = role
        self.name = f"{PREFIX}-{run_id()}-{_counter}-{role}"
        self._own_log_dir = log_dir is None
        self.log_dir = (
            Path(log_dir)
            if log_dir is not None
            else Path(tempfile.mkdtemp(prefix=f"{PREFIX}-logs-"))
        )
        self._procs: list[_Tracked] = []
        self._sockets: weakref.WeakSet[socket.socket] = weakref.WeakSet()
        self.closed = False
        _register_owner()
        # Registered before creation so an interrupt right after `ip netns add`
        # still finds it at exit.
        _LIVE[self.name] = self
        try:
            run_command(["ip", "netns", "add", self.name])
            run_command(["ip", "-n", self.name, "link", "set", "lo", "up"])
        except BaseException:
            self.close()
            raise

    def __repr__(self) -> str:
        return f"<Namespace {self.name}{' closed' if self.closed else ''}>"

    def __enter__(self) -> Namespace:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- commands ---------------------------------------------------------

    def _argv(self, argv: Iterable[str | os.PathLike[str] | int]) -> list[str]:
        if self.closed:
            raise HarnessError(f"{self.name} is closed")
        return ["ip", "netns", "exec", self.name, *(str(a) for a in argv)]

    def run(
        self,
        *argv: str | os.PathLike[str] | int,
        check: bool = True,
        timeout: float = 30.0,
        input: str | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` in the namespace to completion, text output captured.

        Raises `CommandError` including stderr on failure (if ``check``) and
        `CommandTimeout` after ``timeout`` seconds (a hang guard, not a measure).
        """
        return run_command(
            self._argv(argv), check=check, timeout=timeout, input=input, env=env, cwd=cwd
        )

    def python(
        self, *args: str | os.PathLike[str] | int, **kw: Any
    ) -> subprocess.CompletedProcess[str]:
        """`run` this interpreter (the project's venv) with ``args``."""
        return self.run(sys.executable, *args, **kw)

    def ip(self, *args: str | int, **kw: Any) -> subprocess.CompletedProcess[str]:
        """``ip -n NAME args...``: iproute2 against this namespace without ``exec``."""
        if self.closed:
            raise HarnessError(f"{self.name} is closed")
        return run_command(["ip", "-n", self.name, *(str(a) for a in args)], **kw)

    def popen(
        self, *argv: str | os.PathLike[str] | int, log_name: str | None = None, **popen_kw: Any
    ) -> subprocess.Popen[Any]:
        """Start a long-lived process in the namespace; `close` stops and reaps it.

        stdout and stderr go to ``<log_dir>/<role>-<n>-<log_name>.log`` unless
        given; read it with `read_log`. stdin is /dev/null, the process gets its
        own session (so the whole group can be signalled) and
        ``PYTHONUNBUFFERED=1`` so Python peers log as they go. The returned
        Popen has a ``log_path`` attribute (None if both streams were redirected).
        """
        args = self._argv(argv)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        label = log_name or Path(str(argv[0])).name
        label = re.sub(r"[^A-Za-z0-9_.-]", "_", label)[:40]
        log_path: Path | None = None
        log_file: IO[bytes] | None = None
        if "stdout" not in popen_kw or "stderr" not in popen_kw:
            log_path = self.log_dir / f"{self.role}-{len(self._procs) + 1}-{label}.log"
            log_file = open(log_path, "ab")  # closed by stop()
            if "stdout" not in popen_kw:
                popen_kw["stdout"] = log_file
                popen_kw.setdefault("stderr", subprocess.STDOUT)
            else:
                popen_kw["stderr"] = log_file
        popen_kw.setdefault("stdin", subprocess.DEVNULL)
        popen_kw.setdefault("start_new_session", True)
        env = dict(popen_kw.pop("env", None) or os.environ)
        env.setdefault("PYTHONUNBUFFERED", "1")
        try:
            proc = subprocess.Popen(args, env=env, **popen_kw)
        except BaseException:
            if log_file is not None:
                log_file.close()
            raise
        proc.log_path = log_path  # type: ignore[attr-defined]
        self._procs.append(_Tracked(proc, log_path, log_file, args[4:]))
        return proc

    def processes(self) -> list[subprocess.Popen[Any]]:
        """The processes started with `popen`, oldest first."""
        return [t.proc for t in self._procs]

    def read_log(self, proc: subprocess.Popen[Any] | None = None) -> str:
        """The log of ``proc``, or of every `popen` process (with headers) if None."""
        tracked = self._procs if proc is None else [self._tracked(proc)]
        parts: list[str] = []
        for t in tracked:
            text = ""
            if t.log_path is not None:
                with contextlib.suppress(FileNotFoundError):
                    text = t.log_path.read_text(errors="replace")
            if proc is not None:
                return text
            status = "running" if t.proc.poll() is None else f"exited {t.proc.returncode}"
            parts.append(f"----- {self.name}: {_show(t.argv)} ({status}) -----\n{text}")
        return "\n".join(parts)

    def _tracked(self, proc: subprocess.Popen[Any]) -> _Tracked:
        for t in self._procs:
            if t.proc is proc:
                return t
        raise HarnessError(f"{proc.args!r} was not started by {self.name}")

    def stop(self, proc: subprocess.Popen[Any], timeout: float = 5.0) -> int:
        """Stop one `popen` process: SIGTERM to its group, SIGKILL if it lingers; reap it."""
        t = self._tracked(proc)
        try:
            if proc.poll() is None:
                self._signal_group(proc, signal.SIGTERM)
                try:
                    proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    self._signal_group(proc, signal.SIGKILL)
                    proc.wait(timeout=timeout)
            else:
                # The leader is gone; children it left in its group must go too.
                self._signal_group(proc, signal.SIGKILL)
        finally:
            if t.log_file is not None and not t.log_file.closed:
                t.log_file.close()
            for stream in (proc.stdout, proc.stderr, proc.stdin):
                if stream is not None:
                    with contextlib.suppress(OSError):
                        stream.close()
        return proc.returncode

    @staticmethod
    def _signal_group(proc: subprocess.Popen[Any], sig: int) -> None:
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            with contextlib.suppress(ProcessLookupError):
                if proc.poll() is None:
                    proc.send_signal(sig)

    # -- observing ----------------------------------------------------------

    def listening(self, proto: str = "tcp") -> list[tuple[str, int]]:
        """(address, port) of every listening TCP or bound UDP socket, from ``ss``."""
        flags = {"tcp": "-ltnH", "udp": "-lunH"}.get(proto)
        if flags is None:
            raise ValueError(f"proto must be 'tcp' or 'udp', got {proto!r}")
        out = self.run("ss", flags, timeout=10.0).stdout
        found: list[tuple[str, int]] = []
        for line in out.splitlines():
            cols = line.split()
            if len(cols) < 5:
                continue
            host, _, port = cols[3].rpartition(":")
            host = host.strip("[]").split("%", 1)[0]
            if port.isdigit():
                found.append((host, int(port)))
        return found

    def wait_port(
        self,
        port: int,
        host: str | None = None,
        proto: str = "tcp",
        timeout: float = 10.0,
        proc: subprocess.Popen[Any] | None = None,
    ) -> None:
        """Wait until something listens on ``port`` (and ``host``, wildcards match) here.

        Polls ``ss`` instead of sleeping. Fails at once if ``proc`` (or, when not
        given, every process started here) has exited, and on timeout; the error
        carries the process logs.
        """
        deadline = time.monotonic() + timeout
        watched = [proc] if proc is not None else self.processes()
        for _ in range(int(timeout / _POLL_INTERVAL) + 2):
            if any(port == p and _host_matches(host, h) for h, p in self.listening(proto)):
                return
            if watched and all(p.poll() is not None for p in watched):
                raise HarnessError(
                    f"nothing listens on {proto} {host or '*'}:{port} in {self.name} "
                    f"and the process exited\n{self._logs_for(proc)}"
                )
            if time.monotonic() > deadline:
                break
            time.sleep(_POLL_INTERVAL)
        raise HarnessError(
            f"nothing listens on {proto} {host or '*'}:{port} in {self.name} after {timeout}s\n"
            f"{self._logs_for(proc)}"
        )

    def wait_log(self, proc: subprocess.Popen[Any], text: str, timeout: float = 10.0) -> str:
        """Wait until ``text`` appears in the log of ``proc``; returns the log.

        Fails at once if the process exits without having written it, and on
        timeout; the error carries the log.
        """
        deadline = time.monotonic() + timeout
        for _ in range(int(timeout / _POLL_INTERVAL) + 2):
            exited = proc.poll() is not None
            log = self.read_log(proc)
            if text in log:
                return log
            if exited or time.monotonic() > deadline:
                break
            time.sleep(_POLL_INTERVAL)
        state = f"exited {proc.returncode}" if proc.poll() is not None else f"after {timeout}s"
        raise HarnessError(
            f"{text!r} never appeared in the log of {_show(proc.args)} ({state})\n{log}"
        )

    def _logs_for(self, proc: subprocess.Popen[Any] | None) -> str:
        if proc is not None and any(t.proc is proc for t in self._procs):
            return f"--- log of {_show(proc.args)} ---\n{self.read_log(proc)}"
        return self.read_log()

    # -- sockets --------------------------------------------------------------

    @contextlib.contextmanager
    def enter(self) -> Iterator[Namespace]:
        """Run the body with the calling thread inside this namespace.

        Sockets created in the body (stdlib or ``trio.socket.socket``) belong to
        the namespace for good. Keep the body synchronous: only this thread
        moves, and an ``await`` would let other tasks run inside the namespace.
        """
        if self.closed:
            raise HarnessError(f"{self.name} is closed")
        with _inside(self.name):
            yield self

    def socket(
        self, family: int = _AF_INET, type: int = _SOCK_STREAM, proto: int = 0
    ) -> socket.socket:
        """A stdlib socket created inside this namespace; `close` closes it if still open."""
        with self.enter():
            sock = socket.socket(family, type, proto)
        self._sockets.add(sock)
        return sock

    def trio_socket(self, family: int = _AF_INET, type: int = _SOCK_STREAM, proto: int = 0) -> Any:
        """A ``trio.socket.SocketType`` created inside this namespace."""
        import trio

        return trio.socket.from_stdlib_socket(self.socket(family, type, proto))

    def sysctl(self, settings: Mapping[str, str | int]) -> None:
        """Write ``{"net.ipv4.ip_forward": 1, ...}`` for this namespace (no sysctl binary needed).

        /proc/sys/net is resolved against the opening thread's namespace, so the
        files are opened from inside it.
        """
        with self.enter():
            for key, value in settings.items():
                path = Path("/proc/sys") / key.replace(".", "/")
                path.write_text(f"{value}\n")

    def etc_dir(self) -> Path:
        """``/etc/netns/<name>``: files here replace ``/etc/<file>`` under ``ip netns exec``."""
        path = ETC_NETNS_DIR / self.name
        path.mkdir(parents=True, exist_ok=True)
        return path

    # -- teardown ---------------------------------------------------------------

    def close(self) -> None:
        """Stop processes, close sockets, delete the namespace and its /etc/netns entry.

        Idempotent, and safe to call again after an interrupted call: the
        namespace counts as gone only once it is deleted. Ctrl-C/SIGTERM arriving
        meanwhile are held back until the end. Errors are collected and the first
        is raised after everything has been attempted.
        """
        self.closed = True
        if _LIVE.get(self.name) is not self:
            return
        errors: list[BaseException] = []
        with _signals_deferred():
            for t in reversed(self._procs):
                try:
                    self.stop(t.proc)
                except Exception as exc:  # keep tearing down
                    errors.append(exc)
            for sock in list(self._sockets):
                with contextlib.suppress(OSError):
                    sock.close()
            try:
                _delete_namespace(self.name)
            except Exception as exc:
                errors.append(exc)
            else:
                _LIVE.pop(self.name, None)
                if self._own_log_dir:
                    shutil.rmtree(self.log_dir, ignore_errors=True)
        if errors:
            raise errors[0]


def wait_until(
    predicate: Callable[[], object], timeout: float = 10.0, what: str = "condition"
) -> object:
    """Poll ``predicate`` until it returns something truthy, and return that.

    A hang guard for things no port or log line signals; raises `HarnessError`
    naming ``what`` after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / _POLL_INTERVAL) + 2):
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            break
        time.sleep(_POLL_INTERVAL)
    raise HarnessError(f"{what} did not happen within {timeout}s")


def _host_matches(want: str | None, have: str) -> bool:
    if want is None or have == "*":
        return True
    try:
        want_ip = ipaddress.ip_address(want)
        have_ip = ipaddress.ip_address(have)
    except ValueError:
        return want == have
    if have_ip.is_unspecified:
        # "::" normally accepts IPv4 too (bindv6only=0); "0.0.0.0" only IPv4.
        return have_ip.version == 6 or want_ip.version == 4
    return want_ip == have_ip


def live_namespaces() -> list[str]:
    """Names of the namespaces this process created and has not closed yet."""
    return list(_LIVE)


def cleanup_all() -> None:
    """Close every namespace this process still has; registered with atexit."""
    with _signals_deferred():
        for ns in list(_LIVE.values()):
            with contextlib.suppress(Exception):
                ns.close()
    if not _LIVE:
        with contextlib.suppress(OSError):
            _unregister_owner()


atexit.register(cleanup_all)


_INTERRUPTS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_deferral_depth = 0
_deferred: list[int] = []


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM/SIGHUP back during cleanup, then deliver them.

    Without this a second Ctrl-C (``timeout`` even signals twice: the child,
    then its group) lands in the middle of a teardown and leaves half of it
    undone. Only the main thread can do this; elsewhere it is a no-op. Nested
    uses deliver once, when the outermost ends.
    """
    global _deferral_depth
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous: dict[int, Any] = {}
    if _deferral_depth == 0:
        for sig in _INTERRUPTS:
            previous[sig] = signal.signal(sig, lambda signum, frame: _deferred.append(signum))
    _deferral_depth += 1
    try:
        yield
    finally:
        _deferral_depth -= 1
        if _deferral_depth == 0:
            for sig, handler in previous.items():
                signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
            pending = list(dict.fromkeys(_deferred))
            _deferred.clear()
            for sig in pending:
                signal.raise_signal(sig)


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


def install_signal_handlers() -> None:
    """Make SIGTERM and SIGHUP raise KeyboardInterrupt (like Ctrl-C) so cleanup code runs.

    Only replaces default dispositions, and only from the main thread.
    """
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) is signal.SIG_DFL:
            signal.signal(sig, _raise_interrupt)


# --------------------------------------------------------------------------
# The three-namespace topology.


class Topology:
    """client -- gateway -- server over two veth pairs, IPv4 and IPv6, forwarding on.

    The gateway forwards both families with rp_filter off; client and server
    route everything through it. IPv6 addresses skip DAD so they work at once.
    """

    client_ip4 = "192.0.2.2"
    gw_in_ip4 = "192.0.2.1"
    gw_out_ip4 = "198.51.100.1"
    server_ip4 = "198.51.100.2"
    client_ip6 = "2001:db8:1::2"
    gw_in_ip6 = "2001:db8:1::1"
    gw_out_ip6 = "2001:db8:2::1"
    server_ip6 = "2001:db8:2::2"
    client_net4 = "192.0.2.0/24"
    server_net4 = "198.51.100.0/24"
    client_net6 = "2001:db8:1::/64"
    server_net6 = "2001:db8:2::/64"

    gw_in = "gw-in"
    """The gateway's interface toward the client."""
    gw_out = "gw-out"
    """The gateway's interface toward the server."""
    client_if = "eth0"
    server_if = "eth0"

    def __init__(self, log_dir: str | os.PathLike[str] | None = None) -> None:
        """Build the three namespaces; on any failure, delete what was built and re-raise."""
        self.client: Namespace
        self.gateway: Namespace
        self.server: Namespace
        self._namespaces: list[Namespace] = []
        try:
            self.client = self._add("client", log_dir)
            self.gateway = self._add("gateway", log_dir)
            self.server = self._add("server", log_dir)
            self._wire()
        except BaseException:
            self.close()
            raise

    def _add(self, role: str, log_dir: str | os.PathLike[str] | None) -> Namespace:
        ns = Namespace(role, log_dir)
        self._namespaces.append(ns)
        return ns

    @property
    def namespaces(self) -> tuple[Namespace, Namespace, Namespace]:
        """(client, gateway, server)."""
        return (self.client, self.gateway, self.server)

    def _wire(self) -> None:
        quiet = {
            "net.ipv4.conf.all.rp_filter": 0,
            "net.ipv4.conf.default.rp_filter": 0,
            "net.ipv6.conf.all.accept_dad": 0,
            "net.ipv6.conf.default.accept_dad": 0,
        }
        for ns in self.namespaces:
            ns.sysctl(quiet)
        self.gateway.sysctl({"net.ipv4.ip_forward": 1, "net.ipv6.conf.all.forwarding": 1})
        # Both ends are born inside namespaces: the root namespace never sees them.
        for gw_if, peer in ((self.gw_in, self.client), (self.gw_out, self.server)):
            run_command([
                "ip", "link", "add", gw_if, "netns", self.gateway.name, "type", "veth",
                "peer", "name", "eth0", "netns", peer.name,
            ])  # fmt: skip
        self._batch(self.gateway, [
            f"addr add {self.gw_in_ip4}/24 dev {self.gw_in}",
            f"addr add {self.gw_in_ip6}/64 dev {self.gw_in} nodad",
            f"addr add {self.gw_out_ip4}/24 dev {self.gw_out}",
            f"addr add {self.gw_out_ip6}/64 dev {self.gw_out} nodad",
            f"link set {self.gw_in} up",
            f"link set {self.gw_out} up",
        ])  # fmt: skip
        for ns, ip4, ip6, gw4, gw6 in (
            (self.client, self.client_ip4, self.client_ip6, self.gw_in_ip4, self.gw_in_ip6),
            (self.server, self.server_ip4, self.server_ip6, self.gw_out_ip4, self.gw_out_ip6),
        ):
            self._batch(ns, [
                f"addr add {ip4}/24 dev eth0",
                f"addr add {ip6}/64 dev eth0 nodad",
                "link set eth0 up",
                f"route add default via {gw4}",
                f"route add default via {gw6}",
            ])  # fmt: skip
        self.gateway.sysctl({
            f"net.ipv4.conf.{self.gw_in}.rp_filter": 0,
            f"net.ipv4.conf.{self.gw_out}.rp_filter": 0,
        })  # fmt: skip

    @staticmethod
    def _batch(ns: Namespace, commands: list[str]) -> None:
        run_command(["ip", "-n", ns.name, "-batch", "-"], input="\n".join(commands) + "\n")

    def read_logs(self) -> str:
        """The logs of every process started in any of the three namespaces."""
        return "\n".join(text for ns in self.namespaces if (text := ns.read_log()))

    def close(self) -> None:
        """Delete the three namespaces (and with them the veths); idempotent."""
        errors: list[BaseException] = []
        with _signals_deferred():
            for ns in reversed(self._namespaces):
                try:
                    ns.close()
                except Exception as exc:
                    errors.append(exc)
        if errors:
            raise errors[0]

    def __enter__(self) -> Topology:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------
# Real peers.


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def http_server(
    ns: Namespace, host: str, port: int, directory: str | os.PathLike[str], timeout: float = 10.0
) -> subprocess.Popen[Any]:
    """``python -m http.server`` serving ``directory`` on host:port in ``ns``, once listening.

    Its log (one line per request, with the client address it saw) is readable
    with ``ns.read_log(proc)``.
    """
    proc = ns.popen(
        sys.executable, "-u", "-m", "http.server", "--bind", host, "--directory",
        os.fspath(directory), str(port), log_name="http_server",
    )  # fmt: skip
    ns.wait_port(port, host, timeout=timeout, proc=proc)
    return proc


def echo_server(
    ns: Namespace, host: str, port: int, *, udp: bool = False, timeout: float = 10.0
) -> subprocess.Popen[Any]:
    """Start ``peers/echo_server.py`` on host:port in ``ns`` and wait until it listens.

    TCP: each connection first receives ``PEER <ip> <port>\\n`` (the client
    address the server sees), then gets everything it sends echoed until EOF,
    then a half-close. UDP (``udp=True``): each datagram is answered with
    ``PEER <ip> <port>\\n`` followed by its payload.
    """
    argv = [sys.executable, "-u", PEERS_DIR / "echo_server.py", "--host", host, "--port", port]
    if udp:
        argv.append("--udp")
    proc = ns.popen(*argv, log_name="echo_server_udp" if udp else "echo_server")
    ns.wait_port(port, host, proto="udp" if udp else "tcp", timeout=timeout, proc=proc)
    return proc


def parse_peer_line(line: bytes | str) -> tuple[str, int]:
    """``b"PEER 192.0.2.2 40000\\n"`` -> ``("192.0.2.2", 40000)``."""
    text = line.decode() if isinstance(line, bytes) else line
    word, ip, port = text.split()
    if word != "PEER":
        raise ValueError(f"not a PEER line: {text!r}")
    return ip, int(port)


def iperf3_server(
    ns: Namespace, host: str, port: int = 5201, timeout: float = 10.0
) -> subprocess.Popen[Any]:
    """An ``iperf3 -s`` bound to host:port in ``ns``, once listening."""
    proc = ns.popen("iperf3", "-s", "-B", host, "-p", port, log_name="iperf3_server")
    ns.wait_port(port, host, timeout=timeout, proc=proc)
    return proc


def iperf3_client(
    ns: Namespace, host: str, *args: str | int, port: int = 5201, timeout: float = 120.0
) -> dict[str, Any]:
    """Run ``iperf3 -c host -p port -J args...`` in ``ns`` and return its JSON report."""
    out = ns.run("iperf3", "-c", host, "-p", port, "-J", *args, timeout=timeout).stdout
    result: dict[str, Any] = json.loads(out)
    if "error" in result:
        raise HarnessError(f"iperf3 failed: {result['error']}")
    return result


def curl(
    ns: Namespace, url: str, *args: str | int, timeout: float = 30.0, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """``curl -sS --fail --max-time`` in ``ns``; extra ``args`` go before the URL."""
    return ns.run(
        "curl", "-sS", "--fail", "--max-time", int(timeout), *args, url,
        timeout=timeout + 5, check=check,
    )  # fmt: skip


def url(host: str, port: int, path: str = "/") -> str:
    """``http://host:port/path`` with IPv6 hosts bracketed."""
    return f"http://{_url_host(host)}:{port}{path}"


def write_hosts(ns: Namespace, entries: Mapping[str, str | Iterable[str]]) -> Path:
    """Write ``/etc/netns/<name>/hosts`` mapping names to addresses; returns its path.

    ``ip netns exec`` bind-mounts it over ``/etc/hosts`` for commands run with
    `Namespace.run`/`popen` (not for resolution inside this Python process). It
    is removed with the namespace.
    """
    lines = ["127.0.0.1 localhost", "::1 localhost ip6-localhost ip6-loopback"]
    for name, addrs in entries.items():
        for addr in [addrs] if isinstance(addrs, str) else addrs:
            ipaddress.ip_address(addr)
            lines.append(f"{addr} {name}")
    path = ns.etc_dir() / "hosts"
    path.write_text("\n".join(lines) + "\n")
    return path


# --------------------------------------------------------------------------
# Hygiene: the root namespace before and after.

_VOLATILE = [
    (re.compile(r"\s+expires \S+"), ""),
    (re.compile(r"\[\d+:\d+\]"), "[0:0]"),
    (re.compile(r"packets \d+ bytes \d+"), "packets 0 bytes 0"),
]


def _lines(argv: list[str]) -> list[str]:
    if shutil.which(argv[0]) is None:
        return [f"({argv[0]} not installed)"]
    proc = run_command(argv, check=False, timeout=30.0)
    if proc.returncode != 0:
        return [f"({_show(argv)} failed: {proc.stderr.strip()})"]
    out: list[str] = []
    for line in proc.stdout.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        for pattern, repl in _VOLATILE:
            line = pattern.sub(repl, line)
        out.append(line.rstrip())
    return out


def _links() -> list[str]:
    proc = run_command(["ip", "-j", "-d", "link", "show"], check=False)
    try:
        data = json.loads(proc.stdout or "[]")
    except json.JSONDecodeError:
        return [f"(ip -j link failed: {proc.stderr.strip()})"]
    return sorted(
        f"{link.get('ifname')} "
        f"{link.get('linkinfo', {}).get('info_kind', link.get('link_type', ''))}"
        for link in data
    )


def _addresses() -> list[str]:
    proc = run_command(["ip", "-j", "addr", "show"], check=False)
    try:
        data = json.loads(proc.stdout or "[]")
    except json.JSONDecodeError:
        return [f"(ip -j addr failed: {proc.stderr.strip()})"]
    return sorted(
        f"{link.get('ifname')} {a.get('local')}/{a.get('prefixlen')}"
        for link in data
        for a in link.get("addr_info", [])
    )


def _sysctls() -> list[str]:
    keys = ["net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding"]
    out = []
    for key in keys:
        try:
            value = (Path("/proc/sys") / key.replace(".", "/")).read_text().strip()
        except OSError as exc:
            value = f"({exc})"
        out.append(f"{key} = {value}")
    return out


def snapshot_root() -> dict[str, list[str]]:
    """What the root namespace holds that tests could leave behind, as comparable lines.

    Must be called from a thread in the root namespace. Counters and expiry
    timers are normalised so only real changes show.
    """
    etc = sorted(p.name for p in ETC_NETNS_DIR.iterdir()) if ETC_NETNS_DIR.is_dir() else []
    return {
        "namespaces": sorted(list_namespaces()),
        "/etc/netns": etc,
        "links": _links(),
        "addresses": _addresses(),
        "ip rule": _lines(["ip", "-4", "rule", "show"]),
        "ip -6 rule": _lines(["ip", "-6", "rule", "show"]),
        "ip route (all tables)": sorted(_lines(["ip", "-4", "route", "show", "table", "all"])),
        "ip -6 route (all tables)": sorted(_lines(["ip", "-6", "route", "show", "table", "all"])),
        "iptables-legacy-save": _lines(["iptables-legacy-save"]),
        "ip6tables-legacy-save": _lines(["ip6tables-legacy-save"]),
        "nft list ruleset": _lines(["nft", "list", "ruleset"]),
        "sysctl": _sysctls(),
    }


def diff_snapshots(before: Mapping[str, list[str]], after: Mapping[str, list[str]]) -> list[str]:
    """Human-readable differences (``+ added`` / ``- removed`` per section), empty if clean.

    Namespaces and /etc/netns entries owned by another live harness process are
    ignored: they belong to a concurrent run, not to this session.
    """
    report: list[str] = []
    for section in after:
        old = list(before.get(section, []))
        new = list(after[section])
        if section in ("namespaces", "/etc/netns"):
            new = [n for n in new if not is_foreign_live(n)]
            old = [n for n in old if not is_foreign_live(n)]
        added = _multiset_minus(new, old)
        removed = _multiset_minus(old, new)
        if section in ("namespaces", "/etc/netns"):
            removed = []  # someone else deleting theirs is not a leftover of ours
        if added or removed:
            report.append(f"{section}:")
            report.extend(f"  + {line}" for line in added)
            report.extend(f"  - {line}" for line in removed)
    return report


def _multiset_minus(a: list[str], b: list[str]) -> list[str]:
    remaining = list(b)
    out = []
    for item in a:
        if item in remaining:
            remaining.remove(item)
        else:
            out.append(item)
    return out

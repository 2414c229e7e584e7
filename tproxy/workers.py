"""``tproxy run --workers N``: N engine processes on the same listeners, one supervisor.

One trio process relays on one core. With ``--workers N`` the command
becomes a *supervisor* that starts N *workers*, each the same ``tproxy run``
command line plus a hidden ``--worker-index I``. Every worker opens its own
listeners on the same addresses with ``SO_REUSEPORT``, so the kernel spreads
new (also diverted) connections over them; flows, logs and counters stay
per worker. The supervisor:

- starts the workers and waits until each has bound its listeners (a worker
  writes ``ready`` on a pipe once ``listen()`` returned: from then on the
  kernel queues connections for it, even before its event loop runs);
- only then installs the routing of ``--setup`` (diverted connections must
  always find a listener, DESIGN.md), and removes it after every worker
  has stopped;
- restarts a worker that dies unexpectedly, with exponential backoff (a
  worker that fails before it is ready is not restarted: that is a usage
  error such as an address in use, and the whole command fails);
- forwards SIGINT/SIGTERM to the workers (each runs its own grace period;
  a second signal skips it, as with one process), waits for them and
  exits 0.

Workers run in their own session, so a Ctrl-C on the terminal reaches them
once, through the supervisor, not twice. Each worker holds the read end of
a *lifeline* pipe whose write end only the supervisor holds: when the
supervisor dies, even by ``kill -9``, the pipe reads end of file and the
worker stops itself as on SIGTERM, so no orphan keeps serving.
(``PR_SET_PDEATHSIG`` would not do: it fires when the *thread* that forked
exits, and trio forks from a worker thread that it retires when idle.)

Flow ids do not collide across workers: worker I of N numbers its flows
I+1, I+1+N, I+1+2N, ...; a restarted worker continues in a fresh range
(generation g starts at ``g * N * 2**32``). Log lines carry ``w<I>``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from . import control, logformat, metrics, notify
from .flow import set_flow_ids

log = logging.getLogger("tproxy.workers")

CONTROL_ENV = "TPROXY_WORKER_CONTROL"
"""``<ready fd>:<generation>:<lifeline fd>``, set by the supervisor for each worker."""

WORKER_INDEX_FLAG = "--worker-index"

BACKOFF_FIRST = 0.5
BACKOFF_MAX = 30.0
STABLE_AFTER = 10.0
"""A worker that ran this long before dying restarts after the first backoff again."""

READY_TIMEOUT = 60.0
"""How long a worker may take to bind its listeners."""

STOP_TIMEOUT_MARGIN = 30.0
"""After forwarding a stop, how much longer than the grace period to wait before SIGKILL."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--workers N`` (and the hidden ``--worker-index``) to ``run``'s parser."""
    parser.add_argument(
        "--workers",
        type=_worker_count,
        default=1,
        metavar="N",
        help="run N engine processes on the same listeners (SO_REUSEPORT; the kernel "
        "spreads connections over them) under a supervisor that restarts a worker that "
        "dies and forwards SIGINT/SIGTERM (default 1: no supervisor)",
    )
    parser.add_argument(WORKER_INDEX_FLAG, type=int, default=None, help=argparse.SUPPRESS)


def _worker_count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 1 <= value <= 1024:
        raise argparse.ArgumentTypeError(f"{text!r}: must be 1..1024")
    return value


def wants_supervisor(args: argparse.Namespace) -> bool:
    """Whether this ``run`` is the supervisor of several workers."""
    return getattr(args, "workers", 1) > 1 and getattr(args, "worker_index", None) is None


# ----------------------------------------------------------------------------
# The worker side.


@dataclass
class Worker:
    """What a worker process knows about itself; see :func:`current`."""

    index: int
    count: int
    generation: int = 0
    ready_fd: int | None = None
    lifeline_fd: int | None = None

    @property
    def name(self) -> str:
        return f"w{self.index}"

    def configure(self) -> None:
        """Call once, after logging is configured and before any flow: ids, logs, parent."""
        _watch_lifeline(self.lifeline_fd)
        start = self.index + 1 + self.count * (self.generation << 32)
        set_flow_ids(start, self.count)
        name = self.name
        make_record = logging.getLogRecordFactory()

        def named(*args: Any, **kwargs: Any) -> logging.LogRecord:
            record = make_record(*args, **kwargs)
            record.worker = name  # the formatters of tproxy.logformat show it
            return record

        logging.setLogRecordFactory(named)

    def ready(self) -> None:
        """The listeners are bound: tell the supervisor (it may now install routing)."""
        self.tell(b"ready\n")

    def finished(self, flows: int) -> None:
        """The engine stopped after ``flows`` flows: tell the supervisor, for its total."""
        self.tell(f"flows {flows}\n".encode())
        if self.ready_fd is not None:
            try:
                os.close(self.ready_fd)
            except OSError:
                pass
            self.ready_fd = None

    def tell(self, line: bytes) -> None:
        """Send one line to the supervisor (``ready``, ``stats {...}``, ``flows N``)."""
        if self.ready_fd is None:
            return
        try:
            os.write(self.ready_fd, line)
        except OSError:
            pass  # the supervisor is gone; the lifeline stops us


def current(args: argparse.Namespace) -> Worker | None:
    """This process's :class:`Worker` if it was started by a supervisor, else None."""
    index = getattr(args, "worker_index", None)
    if index is None:
        return None
    count = max(getattr(args, "workers", 1), index + 1)
    worker = Worker(index=index, count=count)
    control = os.environ.pop(CONTROL_ENV, "")
    if control:
        fd, generation, lifeline = control.split(":")
        worker.ready_fd = int(fd)
        worker.generation = int(generation)
        worker.lifeline_fd = int(lifeline)
    return worker


def _watch_lifeline(fd: int | None) -> None:
    """Stop this worker (as SIGTERM does: grace period, then exit) when the supervisor dies.

    A daemon thread blocks reading the lifeline; only the supervisor holds its
    write end and never writes, so the read returns only when that end closes.
    """
    if fd is None:
        return

    def watch() -> None:
        try:
            while os.read(fd, 1):
                pass
        except OSError:
            pass
        log.error("the supervisor is gone; stopping")
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="tproxy-lifeline", daemon=True).start()


# ----------------------------------------------------------------------------
# The supervisor side.


class StartupError(Exception):
    """A worker exited before its listeners were ready: nothing will work; give up."""

    def __init__(self, index: int, returncode: int | None) -> None:
        if returncode is None:
            what = f"had not bound its listeners after {READY_TIMEOUT:g}s"
        else:
            what = f"exited with status {returncode} before its listeners were ready"
        super().__init__(f"worker {index} {what}")
        self.index = index
        self.returncode = returncode


@dataclass
class _Slot:
    index: int
    generation: int = 0
    process: trio.Process | None = None
    started: float = 0.0
    failures: int = 0
    flows: int = 0
    lifeline: int | None = None
    """The write end of this worker's lifeline pipe (held, never written)."""
    ready: trio.Event = field(default_factory=trio.Event)
    stats: dict[str, Any] | None = None
    """The newest metrics snapshot of the running generation (pushed or asked for)."""
    retired: list[dict[str, Any]] = field(default_factory=list)
    """The last snapshots of earlier generations, so their counts never go away."""

    pid: int | None = None
    """The running worker's pid: snapshots of an earlier generation are not its own."""

    def update_stats(self, snapshot: dict[str, Any]) -> None:
        """Keep ``snapshot`` if it is the running worker's and at least as new as the one
        held (its counters only grow)."""
        with _stats_lock:
            if self.pid is None or snapshot.get("pid") != self.pid:
                return
            held = self.stats
            if held is None or snapshot.get("events", 0) >= held.get("events", 0):
                self.stats = snapshot

    def retire_stats(self) -> None:
        """The worker is gone: keep its last counts, with no live flows."""
        with _stats_lock:
            if self.stats is not None:
                self.retired.append({**self.stats, "live": 0})
            self.stats = None
            self.pid = None


_stats_lock = threading.Lock()


class Supervisor:
    """Starts, watches, restarts and stops the workers of one ``run --workers N``."""

    def __init__(
        self,
        argv: Sequence[str],
        count: int,
        *,
        grace: float,
        routing: Callable[[], AbstractContextManager[object]] | None = None,
        executable: Sequence[str] | None = None,
    ) -> None:
        if count < 1:
            raise ValueError("at least one worker")
        self.argv = list(argv)
        self.count = count
        self.grace = grace
        self.routing = routing
        self.executable = list(executable or [sys.executable, "-m", "tproxy"])
        self.slots = [_Slot(i) for i in range(count)]
        self.stopping = False
        self.restarts = 0
        self._stop = trio.Event()

    def command(self, slot: _Slot) -> list[str]:
        return [*self.executable, *self.argv, WORKER_INDEX_FLAG, str(slot.index)]

    async def run(self) -> int:
        """Run until a signal (or :meth:`stop`), then stop the workers; the exit status."""
        failed: list[StartupError] = []
        with trio.open_signal_receiver(
            signal.SIGINT, signal.SIGTERM, signal.SIGQUIT, signal.SIGHUP, signal.SIGUSR1
        ) as signals:
            _replay_held_signals()
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._signals, signals)
                    await nursery.start(self._control)
                    try:
                        await self._serve(nursery)
                    finally:
                        with trio.CancelScope(shield=True):
                            await self._stop_all()
                    nursery.cancel_scope.cancel()
            except* StartupError as group:
                failed += [e for e in group.exceptions if isinstance(e, StartupError)]
        if failed:
            log.error("%s", failed[0])
            code = failed[0].returncode
            return code if code is not None and code > 0 else 1
        total = sum(s.flows for s in self.slots)
        log.info(
            "stopped: %d worker(s), %d flow(s) in all, %d restart(s)",
            self.count,
            total,
            self.restarts,
        )
        return 0

    def stop(self) -> None:
        """Begin the shutdown: forward SIGTERM (again: the workers skip their grace)."""
        if not self.stopping:
            notify.stopping()
        self.stopping = True
        self._stop.set()
        self._signal_all(signal.SIGTERM)

    async def _serve(self, nursery: trio.Nursery) -> None:
        for slot in self.slots:
            await self._spawn(slot, nursery)
        with trio.move_on_after(READY_TIMEOUT):
            for slot in self.slots:
                await slot.ready.wait()
        not_ready = [s.index for s in self.slots if not s.ready.is_set()]
        if not_ready:
            raise StartupError(not_ready[0], None)
        log.info("%d workers listening", self.count)
        if self.routing is None:
            notify.ready(f"{self.count} workers")
            await self._stop.wait()
        else:
            with self.routing():
                notify.ready(f"{self.count} workers")
                await self._stop.wait()
                await self._wait_all()  # routing stays until every worker stopped
        # (without routing, _stop_all waits for the workers)

    async def _signals(self, signals: Any) -> None:
        async for signum in signals:
            name = signal.Signals(signum).name
            if signum == signal.SIGHUP:
                log.info("received SIGHUP: the workers reload")
                notify.reloading()
                self._signal_all(signal.SIGHUP)
                notify.ready(f"{self.count} workers")
            elif signum == signal.SIGUSR1:
                logformat.reopen()
                log.info("received SIGUSR1: log file reopened, workers told")
                self._signal_all(signal.SIGUSR1)
            else:
                log.info("received %s: stopping %d worker(s)", name, self.count)
                self.stop()

    # -- what the workers count, and their flows --------------------------------

    def worker_socket(self, slot: _Slot) -> Path:
        return control.socket_path(os.getpid(), slot.index)

    def snapshot(self) -> dict[str, Any]:
        """The sum of every worker's counters, dead generations' included (blocking:
        asks each running worker; call it off the event loop)."""
        for slot in self.slots:
            if slot.pid is None:
                continue
            try:
                fresh = control.query(self.worker_socket(slot), {"op": "stats"}, timeout=2.0)
            except (OSError, ValueError):
                continue  # busy or gone: its last pushed counts stand in
            if isinstance(fresh, dict) and "opened" in fresh:
                slot.update_stats(fresh)
        with _stats_lock:
            parts = [snap for slot in self.slots for snap in slot.retired]
            parts += [slot.stats for slot in self.slots if slot.stats is not None]
        return metrics.merge(parts)

    def _ask_all(self, request: dict[str, Any]) -> list[Any]:
        answers = []
        for slot in self.slots:
            try:
                answers.append(control.query(self.worker_socket(slot), request))
            except (OSError, ValueError):
                continue
        return answers

    async def _answer(self, request: dict[str, Any]) -> dict[str, Any]:
        op = request.get("op")
        if op == "stats":
            return await trio.to_thread.run_sync(self.snapshot)
        answers = await trio.to_thread.run_sync(self._ask_all, request)
        if op == "flows":
            flows = [f for a in answers for f in a.get("flows", [])]
            return {"flows": sorted(flows, key=lambda f: f["id"])}
        if op == "kill":
            return {"killed": any(a.get("killed") for a in answers)}
        return {"error": f"unknown op {op!r}"}

    async def _control(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        await control.serve(control.socket_path(), self._answer, task_status=task_status)

    async def _spawn(self, slot: _Slot, nursery: trio.Nursery) -> None:
        read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
        life_r, life_w = os.pipe2(os.O_CLOEXEC)
        self._close_lifeline(slot)
        slot.lifeline = life_w
        env = dict(os.environ)
        env.pop(notify.ENV, None)  # only the supervisor talks to the service manager
        env[CONTROL_ENV] = f"{write_fd}:{slot.generation}:{life_r}"
        try:
            slot.process = await trio.lowlevel.open_process(
                self.command(slot),
                env=env,
                pass_fds=(write_fd, life_r),
                start_new_session=True,
            )
        except BaseException:
            os.close(read_fd)
            self._close_lifeline(slot)
            raise
        finally:
            os.close(write_fd)
            os.close(life_r)
        slot.started = time.monotonic()
        with _stats_lock:
            slot.pid = slot.process.pid
        slot.ready = trio.Event()
        log.info("worker %d started (pid %d)", slot.index, slot.process.pid)
        nursery.start_soon(self._watch, slot, slot.process, read_fd, nursery)

    async def _watch(
        self, slot: _Slot, process: trio.Process, read_fd: int, nursery: trio.Nursery
    ) -> None:
        """Read the worker's control pipe until it closes, then reap and maybe restart it."""
        was_ready = False
        stream = trio.lowlevel.FdStream(read_fd)
        try:
            buffer = b""
            while True:
                data = await stream.receive_some(4096)
                if not data:
                    break
                buffer += data
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    if line == b"ready":
                        was_ready = True
                        slot.ready.set()
                    elif line.startswith(b"flows "):
                        slot.flows += int(line.split()[1])
                    elif line.startswith(b"stats "):
                        try:
                            slot.update_stats(json.loads(line[6:]))
                        except ValueError:
                            log.warning("worker %d sent unreadable counters", slot.index)
        finally:
            await stream.aclose()
        returncode = await process.wait()
        slot.retire_stats()
        if self.stopping:
            log.info("worker %d exited with status %d", slot.index, returncode)
            return
        if not was_ready:
            raise StartupError(slot.index, returncode)
        lived = time.monotonic() - slot.started
        slot.failures = 1 if lived >= STABLE_AFTER else slot.failures + 1
        delay = min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** (slot.failures - 1))
        log.warning(
            "worker %d (pid %d) died with status %d after %.1fs; restarting in %.1fs",
            slot.index,
            process.pid,
            returncode,
            lived,
            delay,
        )
        with trio.move_on_after(delay):
            await self._stop.wait()
        if self.stopping:
            return
        slot.generation += 1
        self.restarts += 1
        await self._spawn(slot, nursery)

    @staticmethod
    def _close_lifeline(slot: _Slot) -> None:
        if slot.lifeline is not None:
            os.close(slot.lifeline)
            slot.lifeline = None

    def _signal_all(self, signum: int) -> None:
        for slot in self.slots:
            process = slot.process
            if process is not None and process.returncode is None:
                try:
                    process.send_signal(signum)
                except ProcessLookupError:
                    pass

    async def _wait_all(self) -> None:
        """Wait for every worker to exit; SIGKILL the ones that outlive grace + margin."""
        with trio.move_on_after(self.grace + STOP_TIMEOUT_MARGIN):
            for slot in self.slots:
                if slot.process is not None:
                    await slot.process.wait()
            return
        log.error("workers still running %gs after the stop: killing them", self.grace)
        self._signal_all(signal.SIGKILL)
        for slot in self.slots:
            if slot.process is not None:
                await slot.process.wait()

    async def _stop_all(self) -> None:
        if not self.stopping:
            self.stopping = True
            self._signal_all(signal.SIGTERM)
        await self._wait_all()
        for slot in self.slots:
            self._close_lifeline(slot)


def _replay_held_signals() -> None:
    """Signals that arrived before the receiver existed (``lifecycle.hold_signals``
    noted them): send them again, now that the receiver is there to get them."""
    from . import lifecycle

    held, lifecycle._pending[:] = list(lifecycle._pending), []
    for signum in held:
        os.kill(os.getpid(), signum)


def run_supervisor(
    args: argparse.Namespace,
    argv: Sequence[str],
    routing: Callable[[], AbstractContextManager[object]] | None = None,
) -> int:
    """Run ``args.workers`` workers of the ``tproxy`` command line ``argv`` (``run ...``).

    ``argv`` is what follows the program name (``sys.argv[1:]``); each worker
    gets it plus ``--worker-index I``. ``routing`` is the ``--setup`` context
    (``runner.routing_for``), entered once every worker listens.
    """
    supervisor = Supervisor(argv, args.workers, grace=args.grace, routing=routing)
    exposed = None
    if getattr(args, "metrics", None) is not None:
        exposed = metrics.MetricsServer(args.metrics, supervisor.snapshot)
        try:
            exposed.start()
        except OSError as exc:
            from .errors import UsageError

            raise UsageError(
                f"cannot serve --metrics on {args.metrics[0]}:{args.metrics[1]}: "
                f"{exc.strerror or exc}"
            ) from None
    try:
        return trio.run(supervisor.run)
    finally:
        if exposed is not None:
            exposed.stop()

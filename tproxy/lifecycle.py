"""The life of one engine process around :class:`~tproxy.server.Server`: signals,
reload, the control socket, metrics and service-manager notifications.

Signals (none of them ends the process without the ordered shutdown of
:mod:`tproxy.server`, which removes the ``--setup`` routing last):

- SIGINT, SIGTERM, SIGQUIT: stop (a second one skips the grace period);
- SIGHUP: reload the config file and the interceptor modules. New flows get
  the new chain, live flows keep theirs; a reload that fails keeps the old
  configuration and logs why;
- SIGUSR1: reopen ``--log-file`` (log rotation).

:func:`hold_signals` is called first thing in ``tproxy run``: until the event
loop takes over, SIGHUP/SIGQUIT are noted instead of killing the process
(their default), and acted on once it runs.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol

import trio

from . import control, loading, logformat, notify
from .engine import Engine
from .metrics import FlowStats, empty_snapshot
from .server import Door

log = logging.getLogger("tproxy")

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGQUIT)
HANDLED = (*STOP_SIGNALS, signal.SIGHUP, signal.SIGUSR1)
STATS_INTERVAL = 1.0
"""How often a worker reports its counters to the supervisor (which keeps the last)."""

_pending: list[int] = []


def hold_signals() -> None:
    """Note SIGHUP/SIGQUIT/SIGUSR1 that arrive before the event loop runs, instead of
    dying of them; :class:`Lifecycle` acts on them once it starts."""
    for signum in (signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1):
        signal.signal(signum, lambda signum, frame: _pending.append(signum))


class Serving(Protocol):
    """What :class:`Lifecycle` runs: a :class:`~tproxy.server.Server`, or a
    :class:`~tproxy.udp.door.UdpServer` (a Server plus UDP listeners)."""

    @property
    def doors(self) -> Sequence[Door]: ...

    def stop(self) -> None: ...

    async def serve(
        self,
        routing: Callable[[], AbstractContextManager[object]] | None = None,
        *,
        handle_signals: bool = True,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None: ...


class ReloadError(Exception):
    """A reload that could not be applied; the old configuration stays."""


Reloader = Callable[[Engine], None]
"""Applies a reloaded configuration to the engine, or raises :class:`ReloadError`."""


def reload_factories(
    specs: list[tuple[str, dict[str, str]]],
) -> list[loading.InterceptorFactory]:
    """Load the interceptors of ``specs`` afresh: files re-imported, modules reloaded.

    A failure raises :class:`ReloadError` and leaves the running factories alone
    (they keep references to their own, old classes).
    """
    saved = dict(loading._file_modules)
    loading._file_modules.clear()  # force FILE.py specs to be executed again
    try:
        for spec, _ in specs:
            where, sep, _attr = spec.rpartition(":")
            if sep and not (where.endswith(".py") or "/" in where or os.sep in where):
                module = sys.modules.get(where)
                if module is not None:
                    importlib.reload(module)
        return loading.load_all(specs)
    except Exception as exc:
        loading._file_modules.clear()
        loading._file_modules.update(saved)
        message = str(exc) if isinstance(exc, loading.LoadError) else f"{type(exc).__name__}: {exc}"
        raise ReloadError(message) from exc


class Lifecycle:
    """Runs a :class:`Serving` server with signals, reload, control socket and notifications."""

    def __init__(
        self,
        engine: Engine,
        server: Serving,
        *,
        stats: FlowStats | None,
        reloader: Reloader | None = None,
        worker: Any = None,
        control_path: Path | None = None,
    ) -> None:
        self.engine = engine
        self.server = server
        self.stats = stats
        self.reloader = reloader
        self.worker = worker
        self.control_path = control_path
        self.reloads = 0
        self.table = control.FlowTable(
            engine.live,
            engine.kills,
            stats.snapshot if stats is not None else empty_snapshot,
            hub_kill=control.hub_killer(engine),
            worker=worker.name if worker is not None else None,
            sessions=engine.udp_live,
        )
        if stats is not None:  # only with --metrics: counting costs a little per flow
            engine.observers.append(stats)

    async def run(
        self, routing: Callable[[], AbstractContextManager[object]] | None = None
    ) -> None:
        """Serve until stopped; the ordered shutdown always runs."""
        async with trio.open_nursery() as nursery:
            if self.control_path is not None:
                await nursery.start(
                    lambda task_status: control.serve(
                        self.control_path,  # type: ignore[arg-type]
                        self.table.answer,
                        sample=self.table.sample,
                        task_status=task_status,
                    )
                )
            with trio.open_signal_receiver(*HANDLED) as signals:
                nursery.start_soon(self._signals, signals)
                if self.worker is not None and self.stats is not None:
                    nursery.start_soon(self._report_stats)
                async with trio.open_nursery() as serving:
                    await serving.start(
                        lambda task_status: self.server.serve(
                            routing, handle_signals=False, task_status=task_status
                        )
                    )
                    if self.worker is None:
                        notify.ready(f"{len(self.server.doors)} listener(s)")
                    for signum in _pending:
                        self._on_signal(signum)
                    _pending.clear()
            nursery.cancel_scope.cancel()
        if self.worker is not None and self.stats is not None:
            self._tell_stats()

    async def _signals(self, signals: Any) -> None:
        async for signum in signals:
            self._on_signal(signum)

    def _on_signal(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if signum in STOP_SIGNALS:
            log.info("received %s: stopping", name)
            if self.worker is None:
                notify.stopping()
            self.server.stop()
        elif signum == signal.SIGHUP:
            self.reload()
        elif signum == signal.SIGUSR1:
            if logformat.reopen():
                log.info("received SIGUSR1: log file reopened")
            else:
                log.info("received SIGUSR1: logging to stderr, nothing to reopen")

    def reload(self) -> bool:
        """Apply a reload now (SIGHUP); ``False`` (and the old config kept) if it failed."""
        if self.worker is None:
            notify.reloading()
        try:
            if self.reloader is None:
                log.warning("received SIGHUP: nothing to reload")
                return False
            self.reloader(self.engine)
        except ReloadError as exc:
            log.error("reload failed, keeping the running configuration: %s", exc)
            return False
        finally:
            if self.worker is None:
                notify.ready()
        self.reloads += 1
        names = ", ".join(getattr(f, "name", "?") for f in self.engine.factories) or "none"
        log.info("reloaded: interceptors for new flows: %s", names)
        return True

    async def _report_stats(self) -> None:
        while True:
            await trio.sleep(STATS_INTERVAL)
            self._tell_stats()

    def _tell_stats(self) -> None:
        tell = getattr(self.worker, "tell", None)
        if tell is not None and self.stats is not None:
            tell(b"stats " + json.dumps(self.stats.snapshot()).encode() + b"\n")


def snapshots_of(paths: Iterator[Path]) -> Iterator[dict[str, Any]]:
    """Ask each control socket for its stats; skip the ones that do not answer."""
    for path in paths:
        try:
            yield control.query(path, {"op": "stats"}, timeout=2.0)
        except (OSError, ValueError):
            continue

"""Listeners, accept loops and an orderly shutdown around the engine.

The order of events matters on a gateway (docs/architecture.md, routing): diverted connections
to a port nobody listens on hang, so listeners come up before routing is
installed and stay up until it is removed. On SIGINT/SIGTERM the server:

1. stops taking new flows: connections still arriving are reset at once;
2. gives live flows ``grace`` seconds to end by themselves;
3. cancels the rest (both ends reset);
4. leaves the ``routing`` context (removing the rules), then closes listeners.

A second signal skips what is left of the grace period.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import signal
import socket
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass

import trio

from .engine import Engine
from .modes import ModeSpec
from .sockets import listening_socket, reset_socket, reset_stream
from .splice import close_idle_pipes

log = logging.getLogger("tproxy.server")

Handler = Callable[[trio.SocketStream], Awaitable[None]]
FastHandler = Callable[[socket.socket], None]
"""A front door that serves an accepted socket synchronously, without a task."""

# Out of file descriptors or buffers: the flow cannot be accepted now, but
# the next may be; trio's own serve_listeners makes the same choice.
_CAPACITY_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
_CAPACITY_BACKOFF = 0.1
# The connection died in the queue, or a firewall refused it: the next one is fine
# (trio's SocketListener ignores the same ones).
_IGNORED_ERRNOS = {
    errno.ECONNABORTED,
    errno.EPERM,
    errno.EPROTO,
    errno.ENETDOWN,
    errno.ENOPROTOOPT,
    errno.EHOSTDOWN,
    errno.ENONET,
    errno.EHOSTUNREACH,
    errno.EOPNOTSUPP,
    errno.ENETUNREACH,
}
_ACCEPT_BATCH = 32
"""Connections accepted back to back before other tasks get a turn."""
ACCEPT_ERROR_INTERVAL = 10.0
"""Seconds between two log lines about a listener's repeated accept errors."""


class AcceptErrors:
    """At most one line per :data:`ACCEPT_ERROR_INTERVAL` about a listener's accept errors.

    EMFILE lasts as long as the descriptors stay taken, and the accept loop
    retries ten times a second; often every other accept succeeds (a failed
    flow gives its descriptor back) and the next fails again. So failures and
    the recovery share one rate limit, and a line says how many failures it
    stands for.
    """

    def __init__(self, where: object, interval: float = ACCEPT_ERROR_INTERVAL) -> None:
        self.where = where
        self.interval = interval
        self.failing = 0
        """Failures not reported in a line yet."""
        self.down = False
        """Whether accepting failed and no line said it works again yet."""
        self._last_line = -float("inf")

    def failed(self, exc: OSError) -> None:
        """An accept failed with a capacity error (the loop backs off and retries)."""
        self.failing += 1
        self.down = True
        now = trio.current_time()
        if now - self._last_line < self.interval:
            return
        times = "" if self.failing == 1 else f" ({self.failing} failures since the last report)"
        log.error("accept on %s failed: %s%s; retrying", self.where, exc.strerror, times)
        self.failing = 0
        self._last_line = now

    def recovered(self) -> None:
        """An accept succeeded after failures (said at the next free line)."""
        now = trio.current_time()
        if now - self._last_line < self.interval:
            return
        more = f", after {self.failing} more failure(s)" if self.failing else ""
        log.warning("accept on %s works again%s", self.where, more)
        self.failing = 0
        self.down = False
        self._last_line = now


@dataclass
class Door:
    """One listening socket and the front door that serves what it accepts."""

    spec: ModeSpec
    sock: socket.socket
    handler: Handler
    fast: FastHandler | None = None
    """Serves an accepted socket at once, in the accept loop, when set (the hub's path)."""

    @classmethod
    def open(
        cls,
        spec: ModeSpec,
        handler: Handler,
        *,
        reuse_port: bool = False,
        fast: FastHandler | None = None,
    ) -> Door:
        """Bind and listen now (outside the event loop), so errors come before serving."""
        sock = listening_socket(
            spec.host, spec.port, transparent=spec.transparent, reuse_port=reuse_port
        )
        return cls(spec, sock, handler, fast)

    def close(self) -> None:
        self.sock.close()


class Server:
    """Runs doors on one engine until told to stop."""

    def __init__(self, engine: Engine, doors: list[Door]) -> None:
        self.engine = engine
        self.doors = doors
        self.draining = False
        self._stop = trio.Event()
        self._hurry = trio.Event()

    def stop(self) -> None:
        """Begin the shutdown (as SIGTERM does); a second call skips the grace period."""
        if self._stop.is_set():
            self._hurry.set()
        self._stop.set()

    async def serve(
        self,
        routing: Callable[[], contextlib.AbstractContextManager[object]] | None = None,
        *,
        handle_signals: bool = True,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept and relay until :meth:`stop` or a signal; then shut down in order."""
        try:
            for door in self.doors:
                door.sock.setblocking(False)
            async with trio.open_nursery() as flows:
                hub = self.engine.hub
                if hub is not None:
                    await flows.start(hub.run)
                async with trio.open_nursery() as accepting:
                    for door in self.doors:
                        accepting.start_soon(self._accept_loop, door, flows)
                        log.info("listening: %s", door.spec)
                    if handle_signals:
                        accepting.start_soon(self._signals)
                    with _entered(routing):
                        task_status.started()
                        await self._stop.wait()
                        self.draining = True
                        await self._drain(flows)
                    accepting.cancel_scope.cancel()
        finally:
            for door in self.doors:
                door.close()

    async def _drain(self, flows: trio.Nursery) -> None:
        grace = self.engine.config.grace
        live = len(self.engine.live)
        log.info("shutting down: %d live flow(s), grace period %gs", live, grace)
        with trio.move_on_after(grace):
            async with trio.open_nursery() as waiting:

                async def first_of(event_wait: Callable[[], Awaitable[object]]) -> None:
                    await event_wait()
                    waiting.cancel_scope.cancel()

                waiting.start_soon(first_of, self.engine.wait_idle)
                waiting.start_soon(first_of, self._hurry.wait)
        if self.engine.live:
            log.info("grace period over: resetting %d flow(s)", len(self.engine.live))
        flows.cancel_scope.cancel()

    async def _signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                log.info("received %s", signal.Signals(signum).name)
                self.stop()

    async def _accept_loop(self, door: Door, flows: trio.Nursery) -> None:
        """Accept until cancelled: a batch at a time, then wait for the listener.

        Plain ``accept()`` on the non-blocking listener, not trio's
        ``SocketListener``: a door with a ``fast`` handler serves the socket
        right here, and only the others cost a task (and a trio stream).
        """
        lsock = door.sock
        fast = door.fast
        hub = self.engine.hub
        errors = AcceptErrors(door.spec)
        while True:
            for _ in range(_ACCEPT_BATCH):
                try:
                    sock, _ = lsock.accept()
                except BlockingIOError:
                    break
                except OSError as exc:
                    if exc.errno in _IGNORED_ERRNOS:
                        continue
                    if exc.errno in _CAPACITY_ERRNOS:
                        errors.failed(exc)
                        close_idle_pipes()  # spare pipes give their descriptors back
                        await trio.sleep(_CAPACITY_BACKOFF)
                        break
                    raise
                if errors.down:
                    errors.recovered()
                sock.setblocking(False)
                if self.draining:
                    reset_socket(sock)
                elif fast is not None and hub is not None and hub.running:
                    try:
                        fast(sock)
                    except Exception:
                        log.exception("front door %s failed on one connection", door.spec)
                        reset_socket(sock)
                else:
                    stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
                    flows.start_soon(self._serve_one, door, stream)
            else:
                await trio.lowlevel.checkpoint()
                continue
            await trio.lowlevel.wait_readable(lsock)

    async def _serve_one(self, door: Door, stream: trio.SocketStream) -> None:
        """Contain a flow's failure: trio would otherwise end the whole server."""
        try:
            await door.handler(stream)
        except Exception:
            log.exception("front door %s failed on one connection", door.spec)
            await reset_stream(stream)
        except BaseExceptionGroup as group:
            # A failure that met a cancellation (shutdown): log the failure,
            # let only the cancellation go on.
            cancelled, failures = group.split(trio.Cancelled)
            if failures is not None:
                log.error("front door %s failed on one connection", door.spec, exc_info=failures)
                await reset_stream(stream)
            if cancelled is not None:
                raise cancelled from None
            if failures is not None and failures.split(Exception)[1] is not None:
                raise  # KeyboardInterrupt and the like are not a flow's business


@contextlib.contextmanager
def _entered(
    factory: Callable[[], contextlib.AbstractContextManager[object]] | None,
) -> Iterator[None]:
    if factory is None:
        yield
    else:
        with factory():
            yield

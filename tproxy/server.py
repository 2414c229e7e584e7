"""Listeners, accept loops and an orderly shutdown around the engine.

The order of events matters on a gateway (DESIGN.md): diverted connections
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
from .sockets import listening_socket, reset_stream

log = logging.getLogger("tproxy.server")

Handler = Callable[[trio.SocketStream], Awaitable[None]]

# Out of file descriptors or buffers: the flow cannot be accepted now, but
# the next may be; trio's own serve_listeners makes the same choice.
_CAPACITY_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
_CAPACITY_BACKOFF = 0.1


@dataclass
class Door:
    """One listening socket and the front door that serves what it accepts."""

    spec: ModeSpec
    sock: socket.socket
    handler: Handler

    @classmethod
    def open(cls, spec: ModeSpec, handler: Handler, *, reuse_port: bool = False) -> Door:
        """Bind and listen now (outside the event loop), so errors come before serving."""
        sock = listening_socket(
            spec.host, spec.port, transparent=spec.transparent, reuse_port=reuse_port
        )
        return cls(spec, sock, handler)

    def close(self) -> None:
        self.sock.close()


class Server:
    """Runs doors on one engine until told to stop."""

    def __init__(self, engine: Engine, doors: list[Door]) -> None:
        if not doors:
            raise ValueError("a server needs at least one listener")
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
            listeners = [
                trio.SocketListener(trio.socket.from_stdlib_socket(door.sock))
                for door in self.doors
            ]
            async with trio.open_nursery() as flows:
                async with trio.open_nursery() as accepting:
                    for door, listener in zip(self.doors, listeners, strict=True):
                        accepting.start_soon(self._accept_loop, door, listener, flows)
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

    async def _accept_loop(
        self, door: Door, listener: trio.SocketListener, flows: trio.Nursery
    ) -> None:
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:
                if exc.errno in _CAPACITY_ERRNOS:
                    log.error("accept on %s failed: %s; retrying", door.spec, exc)
                    await trio.sleep(_CAPACITY_BACKOFF)
                    continue
                raise
            if self.draining:
                await reset_stream(stream)
                continue
            flows.start_soon(self._serve_one, door, stream)

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
                log.error(
                    "front door %s failed on one connection", door.spec, exc_info=failures
                )
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

"""The engine: turns an accepted connection and a destination into a flow pair.

Front doors (transparent, forward, SOCKS, HTTP) differ only in how they
learn the destination. They all call the same two steps here:
:meth:`Engine.connect` opens the outgoing flow (with the configured source
policy, mark and timeout) and :meth:`Engine.relay` runs the pair through the
interceptors, writes the flow records and closes both ends. A flow's
interceptors are chosen in one place, :meth:`Engine.select` (``--when``),
for TCP flows and UDP sessions alike, and the flow record names what it
chose (:meth:`Engine.interceptors_of`: the flow log, ``tproxy flows``,
metrics and recordings all read that); :meth:`Engine.chain_for` builds them.
Every flow with a socket on both ends is relayed by the hub
(:mod:`tproxy.hub`), intercepted or not; the trio-stream shell
(:mod:`tproxy.relay.streams`) serves the others (TLS, memory streams).
Every flow's failure is caught inside that flow: one bad peer or
interceptor never ends the server.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import trio

from . import keepalive
from .flow import Address, EndReason, FlowInfo, FlowObserver, FlowRecord, next_flow_id
from .hub import SpliceHub
from .interceptor import Chain, Interceptor, InterceptorError
from .keepalive import DEFAULT as DEFAULT_KEEPALIVE
from .keepalive import Keepalive
from .logformat import log_flow
from .peek import DEFAULT_TIMEOUT as DEFAULT_PEEK_TIMEOUT
from .peek import Peek
from .relay.core import FlowTap
from .relay.streams import DEFAULT_READ_SIZE, StreamRelay, is_cancellation
from .sockets import (
    ConnectError,
    SourcePolicy,
    connect_outgoing,
    flow_addresses,
    outgoing_socket,
    reset_socket,
    reset_stream,
)
from .splice import splice_available

log = logging.getLogger("tproxy.flow")

InterceptorFactory = Callable[[FlowInfo], Interceptor]
MAX_READ_SIZE = 16 * 2**20


def factory_name(factory: InterceptorFactory) -> str:
    """How flow records, logs, ``tproxy flows``, metrics and recordings name an
    interceptor: the ``-i`` spec as given, else the class's or function's name."""
    name = getattr(factory, "name", "") or getattr(factory, "__name__", "")
    return str(name or type(factory).__name__)


@dataclass(frozen=True)
class EngineConfig:
    """Per-process settings of the engine, checked once here."""

    read_size: int = DEFAULT_READ_SIZE
    connect_timeout: float = 10.0
    source_policy: SourcePolicy = SourcePolicy.CLIENT_PORT
    mark: int | None = None
    idle_timeout: float | None = None
    grace: float = 5.0
    max_flows: int | None = None
    splice: bool = True
    """Relay directions that no interceptor watches with splice(2) (zero-copy)."""
    hub: bool = True
    """Relay flows with sockets from the hub (one task); off: the trio-stream shell (tests)."""
    keepalive: Keepalive | None = DEFAULT_KEEPALIVE
    """TCP keepalive and TCP_USER_TIMEOUT on every flow's sockets (``None``: off)."""
    peek_timeout: float = DEFAULT_PEEK_TIMEOUT
    """Seconds a flow waits for its ClientHello when ``sni=``/``host=`` selection needs it."""

    def __post_init__(self) -> None:
        if not 1024 <= self.read_size <= MAX_READ_SIZE:
            raise ValueError(f"read size must be 1024..{MAX_READ_SIZE} bytes")
        if self.connect_timeout <= 0:
            raise ValueError("connect timeout must be positive")
        if self.idle_timeout is not None and self.idle_timeout <= 0:
            raise ValueError("idle timeout must be positive")
        if self.grace < 0:
            raise ValueError("grace period must not be negative")
        if self.mark is not None and not 0 <= self.mark < 2**32:
            raise ValueError("mark must fit in 32 bits")
        if self.max_flows is not None and self.max_flows < 1:
            raise ValueError("max flows must be at least 1")
        if not self.peek_timeout > 0:
            raise ValueError("--peek-timeout must be positive")


class Engine:
    """Opens outgoing flows and relays flow pairs; keeps the set of live flows."""

    recording: Any = None
    """``--record``: makes each flow's tap (tproxy.record.Recording; the runner sets it)."""
    tls: Any = None
    """``--tls intercept``: wraps every flow's chain (tproxy.tls.options.attach sets it)."""

    def __init__(
        self, config: EngineConfig | None = None, factories: Sequence[InterceptorFactory] = ()
    ) -> None:
        self.config = config or EngineConfig()
        keepalive.use(self.config.keepalive)  # the sockets made from now on
        self.factories = list(factories)
        self.live: dict[int, FlowRecord] = {}
        self.total = 0
        self.connecting = 0
        """Outgoing connects under way: flows past the capacity check, not live yet."""
        self._idle = trio.Event()
        self._idle.set()
        self.observers: list[FlowObserver] = []
        """Told of every flow's open and end (metrics, control socket): see FlowObserver."""
        self.kills: dict[int, Callable[[], None]] = {}
        """Flow id -> how to end that flow now (``tproxy flows --kill``); UDP sessions too."""
        self.udp_live: dict[int, FlowRecord] = {}
        """The records of live UDP sessions by flow id, kept by :mod:`tproxy.udp` for
        ``tproxy flows``. Unlike :attr:`live`, they do not count toward ``max_flows``
        (sessions have their own cap) and the shutdown does not wait for them."""
        self._selection: dict[int, tuple[FlowInfo, list[InterceptorFactory]]] = {}
        """Flow id -> the factories chosen when its record opened, for the chain built
        right after from the same ``info`` (so a flow asks ``selects`` once)."""
        self.hub: SpliceHub | None = None
        """Relays every pair with sockets, all from one task (:mod:`tproxy.hub`);
        in use while its ``run`` runs (the server starts it)."""
        if self.config.hub:
            self.hub = SpliceHub(
                opened=self._open_connected,
                rejected=self.reject,
                closed=self._close,
                chunk=self.config.read_size,
                idle_timeout=self.config.idle_timeout,
                connect_timeout=self.config.connect_timeout,
                chain_for=self.chain_for,
                tap_for=self.tap_for,
                splice=self.config.splice and splice_available(),
            )

    # -- a flow's interceptors --------------------------------------------------

    def select(self, info: FlowInfo) -> list[InterceptorFactory]:
        """The factories whose selection (``--when``) takes the flow ``info``, in chain
        order; a factory without ``selects`` takes every flow. TCP flows and UDP
        sessions both choose their interceptors here."""
        out = []
        for factory in self.factories:
            selects = getattr(factory, "selects", None)
            if selects is None or selects(info):
                out.append(factory)
        return out

    @staticmethod
    def names(factories: Sequence[InterceptorFactory]) -> tuple[str, ...]:
        """The names a flow record gives ``factories`` (see :func:`factory_name`)."""
        return tuple(factory_name(f) for f in factories)

    def chain_for(self, info: FlowInfo) -> Any:
        """Build the interceptor chain of one flow: ``None`` when no interceptor selects
        it (the flow is relayed as passthrough, spliced where possible).

        Every factory is asked ``selects(info)`` (a factory without it selects
        every flow). An interceptor whose constructor raises makes this raise;
        the ones built before it are told ``end("error")`` first.

        When a factory's ``sni=``/``host=`` selection needs the ClientHello
        (``wants_client_hello``), the chain is built later, by a
        :class:`tproxy.peek.Peek` that holds the client's first bytes until then.
        With ``--tls intercept`` the TLS layer builds it once it parsed the hello.
        """
        if self.tls is not None:
            # --tls intercept: every flow gets the layer (it passes non-TLS flows on)
            return self.tls.wrap(self._build_chain, info)
        if any(getattr(f, "wants_client_hello", _never)(info) for f in self.factories):
            return Peek(info, self._build_chain, timeout=self.config.peek_timeout)
        return self._build_chain(info)

    def _build_chain(self, info: FlowInfo) -> Chain | None:
        """The chain of the interceptors that select ``info`` now (``None``: none does).

        The live record's ``interceptors`` become their names: a flow whose
        selection waited for its ClientHello (``sni=``/``host=``) gets its final
        list here, after its open line was logged.
        """
        cached = self._selection.pop(info.id, None)
        factories = cached[1] if cached is not None and cached[0] is info else None
        if factories is None:
            factories = self.select(info)
            record = self.live.get(info.id)
            if record is not None:
                record.interceptors = self.names(factories)
        built: list[Interceptor] = []
        try:
            for factory in factories:
                built.append(factory(info))
        except Exception:
            try:
                Chain(built).end(str(EndReason.ERROR))
            except InterceptorError as error:
                log.error("flow %d: %s", info.id, error, exc_info=error.error)
            raise
        if not built:
            return None
        return Chain(built)

    def tap_for(self, info: FlowInfo) -> FlowTap | None:
        """The tap that watches one flow's bytes (``--record``), or ``None``.

        A tapped flow is copied through user space, never spliced, so the
        recording holds what was read and what was delivered each way.
        """
        if self.recording is None:
            return None
        tap: FlowTap = self.recording.relay_tap(info, self.interceptors_of(info))
        return tap

    def interceptors_of(self, info: FlowInfo) -> tuple[str, ...]:
        """The names of the interceptors the flow ``info`` gets, as its record gives them
        (``--when`` applied): what flow records, the JSON log, ``tproxy flows``, metrics
        and recordings show. Asks the factories only for a flow with no live record."""
        record = self.live.get(info.id)
        if record is not None:
            return record.interceptors
        return self.names(self.select(info))

    # -- flows --------------------------------------------------------------

    def new_flow(self, client: Address, destination: Address, mode: str) -> FlowInfo:
        """Metadata for a new flow pair, with a fresh id."""
        return FlowInfo(id=next_flow_id(), client=client, destination=destination, mode=mode)

    def at_capacity(self) -> bool:
        """Whether ``max_flows`` flow pairs are live or connecting already."""
        limit = self.config.max_flows
        if limit is None:
            return False
        connecting = self.connecting + (self.hub.connecting if self.hub is not None else 0)
        return len(self.live) + connecting >= limit

    async def connect(
        self, destination: Address, *, source: Address | None = None
    ) -> tuple[trio.SocketStream, Address]:
        """Open the outgoing flow; raise :class:`ConnectError` with a ``kind``.

        While it connects, the flow counts toward ``max_flows``: a burst
        cannot slip past the cap while the first connects are pending.
        """
        self.connecting += 1
        try:
            return await connect_outgoing(
                destination,
                source=source,
                policy=self.config.source_policy,
                mark=self.config.mark,
                timeout=self.config.connect_timeout,
            )
        finally:
            self.connecting -= 1

    async def relay(
        self,
        incoming: trio.abc.Stream,
        outgoing: trio.abc.Stream,
        info: FlowInfo,
        *,
        client_prefix: bytes = b"",
        source: Address | None = None,
    ) -> FlowRecord:
        """Run the flow pair to its end and log it; never raises for the flow's failures.

        ``client_prefix`` is client data that arrived with a handshake and
        must be forwarded first. ``source`` is the outgoing flow's local
        address, for the open log line.
        """
        if source is not None and info.via is None:
            info = dataclasses.replace(info, via=source)
        hub = self.hub
        if (
            hub is not None
            and hub.running
            and type(incoming) is trio.SocketStream
            and type(outgoing) is trio.SocketStream
        ):
            return await self._relay_in_hub(hub, incoming, outgoing, info, client_prefix, source)
        record = self._open_connected(info, source)
        try:
            try:
                chain = self.chain_for(info)
                tap = self.tap_for(info)
            except Exception as exc:
                log.error("flow %d: an interceptor failed to start", info.id, exc_info=exc)
                record.end(EndReason.ERROR, f"interceptor init: {exc!r}", now=time.monotonic())
                with trio.CancelScope(shield=True):
                    await reset_stream(incoming)
                    await reset_stream(outgoing)
                return record
            scope = trio.CancelScope()
            self.kills[info.id] = scope.cancel
            relay = StreamRelay(
                incoming,
                outgoing,
                record,
                chain,
                read_size=self.config.read_size,
                idle_timeout=self.config.idle_timeout,
                tap=tap,
            )
            try:
                with scope:
                    await relay.run(client_prefix=client_prefix)
            except Exception as exc:
                log.error("flow %d: unexpected error", info.id, exc_info=exc)
            return record
        finally:
            self._close(record)

    async def _relay_in_hub(
        self,
        hub: SpliceHub,
        incoming: trio.SocketStream,
        outgoing: trio.SocketStream,
        info: FlowInfo,
        client_prefix: bytes,
        source: Address | None,
    ) -> FlowRecord:
        """Hand a pair to the hub; return once it has ended there."""
        record = self._open_connected(info, source)
        try:
            chain = self.chain_for(info)
            tap = self.tap_for(info)
        except Exception as exc:
            log.error("flow %d: an interceptor failed to start", info.id, exc_info=exc)
            record.end(EndReason.ERROR, f"interceptor init: {exc!r}", now=time.monotonic())
            with trio.CancelScope(shield=True):
                await reset_stream(incoming)
                await reset_stream(outgoing)
            self._close(record)
            return record
        flow = hub.adopt(
            _unwrap(incoming), _unwrap(outgoing), record, chain, prefix=client_prefix, tap=tap
        )
        self.kills[info.id] = functools.partial(hub.abort, flow, EndReason.SHUTDOWN, "killed")
        try:
            assert flow.done is not None
            await flow.done.wait()
        except BaseException:
            hub.abort(flow, EndReason.SHUTDOWN, "cancelled")
            raise
        return record

    def _open_connected(self, info: FlowInfo, source: Address | None) -> FlowRecord:
        """Open the record of a flow whose outgoing side is connected; log its open line."""
        record = self._open(info)
        record.outgoing_source = source
        log_flow(log, "open", record)
        return record

    @contextlib.contextmanager
    def track(self, info: FlowInfo) -> Iterator[FlowRecord]:
        """Count a flow that is not a stream pair (a SOCKS5 UDP association) as live.

        Inside, the flow counts toward ``max_flows`` and the shutdown waits
        for it; its open and end lines are logged as for :meth:`relay`. The
        caller counts its bytes and ends the record; a cancellation ends it
        as ``shutdown``, an exception as ``error``.
        """
        record = self._open(info)
        log_flow(log, "open", record)
        try:
            yield record
        except BaseException as exc:
            if is_cancellation(exc):
                record.end(EndReason.SHUTDOWN, "cancelled", now=time.monotonic())
            else:
                record.end(EndReason.ERROR, repr(exc), now=time.monotonic())
            raise
        finally:
            self._close(record)

    def reject(
        self,
        info: FlowInfo,
        reason: EndReason,
        detail: str,
        *,
        started: float | None = None,
        reply_code: str | None = None,
    ) -> FlowRecord:
        """Log a flow that ended before it was relayed (connect failed, refused by policy).

        ``started`` (``time.monotonic()``) is when its connection was accepted, if earlier;
        ``reply_code`` the protocol's code the client was refused with (metrics).
        """
        record = self._open(info)
        record.reply_code = reply_code
        if started is not None:
            record.started = started
        record.end(reason, detail, now=time.monotonic())
        self._close(record)
        return record

    def _open(self, info: FlowInfo) -> FlowRecord:
        record = FlowRecord(info=info, started=time.monotonic())
        if self.factories:
            # Chosen once, from what is known as the flow opens; the chain built next
            # takes the same factories (see _build_chain).
            factories = self.select(info)
            self._selection[info.id] = (info, factories)
            record.interceptors = self.names(factories)
        self.live[info.id] = record
        self.total += 1
        self._idle = trio.Event() if self._idle.is_set() else self._idle
        for observer in self.observers:
            observer.flow_opened(record)
        return record

    def _close(self, record: FlowRecord) -> None:
        if record.reason is None:
            record.end(EndReason.ERROR, "ended without a reason", now=time.monotonic())
        self.live.pop(record.info.id, None)
        self.kills.pop(record.info.id, None)
        self._selection.pop(record.info.id, None)
        for observer in self.observers:
            observer.flow_ended(record)
        log_flow(log, "end", record)
        if not self.live:
            self._idle.set()

    async def wait_idle(self) -> None:
        """Return once no flow pair is live."""
        while self.live:
            await self._idle.wait()

    # -- the transparent front door -----------------------------------------

    @property
    def accept_fast(self) -> Callable[[socket.socket], None] | None:
        """The synchronous front door for diverted connections, where the hub serves them
        whole (it connects, builds the chain and relays); ``None`` without a hub."""
        if self.hub is None:
            return None
        return self.transparent_in_hub

    def transparent_in_hub(self, incoming: socket.socket) -> None:
        """Serve one diverted connection without a task: the hub connects and relays it.

        The same steps as :meth:`handle_transparent`; ``incoming`` is a plain,
        non-blocking socket as accepted.
        """
        hub = self.hub
        if hub is None or not hub.running:
            raise RuntimeError("the splice hub is not running")
        try:
            client, destination = flow_addresses(incoming)
        except OSError as exc:
            log.debug("diverted connection vanished before it was served: %s", exc)
            reset_socket(incoming)
            return
        info = self.new_flow(client, destination, "transparent")
        if self.at_capacity():
            self.reject(info, EndReason.REJECTED, "too many flows")
            reset_socket(incoming)
            return
        config = self.config
        hub.connect(
            incoming,
            info,
            functools.partial(
                outgoing_socket, destination, client, config.source_policy, config.mark
            ),
        )

    async def handle_transparent(self, incoming: trio.SocketStream) -> None:
        """Serve one diverted connection: its local address is the destination."""
        try:
            client, destination = flow_addresses(incoming.socket)
        except OSError as exc:
            # the client already went away (ENOTCONN)
            log.debug("diverted connection vanished before it was served: %s", exc)
            await reset_stream(incoming)
            return
        info = self.new_flow(client, destination, "transparent")
        if self.at_capacity():
            self.reject(info, EndReason.REJECTED, "too many flows")
            await reset_stream(incoming)
            return
        try:
            outgoing, source = await self.connect(destination, source=client)
        except ConnectError as exc:
            self.reject(info, EndReason.CONNECT_FAILED, str(exc))
            # Reset the client at once: a silent close would look like an empty reply.
            await reset_stream(incoming)
            return
        except BaseException:
            await reset_stream(incoming)
            raise
        await self.relay(incoming, outgoing, info, source=source)


def _unwrap(stream: trio.SocketStream) -> socket.socket:
    """The plain socket under a trio stream, for the hub, which owns it from now on.

    trio is told first that it no longer watches the descriptor, so a later
    socket that reuses the number starts clean there.
    """
    tsock = stream.socket
    trio.lowlevel.notify_closing(tsock)
    family, type_, proto = tsock.family, tsock.type, tsock.proto
    return socket.socket(family, type_, proto, fileno=tsock.detach())


def _never(info: FlowInfo) -> bool:
    """``wants_client_hello`` of a factory without one: it never needs a ClientHello."""
    return False

"""The interceptor contract and the chain that runs several of them.

Everything here is sans-io: an interceptor is a plain object that is fed
bytes and returns bytes, and the :class:`Chain` turns calls on a flow's
interceptors into an :class:`Output` (what to send to the server, what to
send to the client). The engine owns all sockets; nothing here awaits, so a
chain can be driven by tests with bytes alone (see :mod:`tproxy.testing`).

Direction conventions: bytes from the client to the server pass the chain's
interceptors in order (0, 1, ... n-1); bytes from the server to the client
pass them in reverse. Bytes that interceptor *k* injects toward the server
pass the interceptors after it (k+1 ...), bytes it injects toward the client
pass the ones before it (k-1 ... 0), exactly as if they had come from *k*'s
position in the stream.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

from . import watchdog
from .flow import FlowInfo
from .timers import CLIENT, SERVER, SIDES, FlowTimers, ThreadJob, TimerHandle


class OptionError(ValueError):
    """An interceptor was given options it does not accept."""


class AbortFlow(Exception):
    """Raised (through :meth:`Interceptor.abort`) to end the flow pair with a reset.

    ``to_client`` holds what the chain had ready for the client when the
    abort happened, above all what the aborting hook injected toward the
    client just before (an error reply such as an HTTP 403). The engine sends
    it and closes the client side before resetting; it is empty otherwise.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.to_client = b""


class Interceptor:
    """Base class of interceptors. The engine makes one instance per flow pair.

    Override what you need; every hook has a pass-through default:

    - :meth:`start`: the outgoing flow is connected; inject a banner here.
    - :meth:`client_data` / :meth:`server_data`: return what to forward
      (``b""`` forwards nothing, e.g. while buffering; ``None`` is an error
      that ends the flow: a forgotten ``return``).
    - :meth:`client_eof` / :meth:`server_eof`: that side finished sending;
      return whatever you still hold for the other side. After this the
      engine half-closes the other side.
    - :meth:`end`: the flow pair is over (reason as in the flow record).

    Actions, callable from any hook: :meth:`inject_to_client`,
    :meth:`inject_to_server`, :meth:`abort`, :meth:`passthrough`.

    Options come from the command line as strings (``-i NAME -o key=value``).
    :meth:`parse_options` turns them into one value per interceptor spec,
    checked before the proxy listens; each instance sees it as
    ``self.options``.
    """

    def __init__(self, flow: FlowInfo, options: Any = None) -> None:
        self.flow = flow
        self.options = options
        self._to_client: list[bytes] = []
        self._to_server: list[bytes] = []
        self._passthrough = False

    # -- configuration -------------------------------------------------

    @classmethod
    def parse_options(cls, options: Mapping[str, str]) -> Any:
        """Check and convert command-line options; raise :class:`OptionError`.

        The default accepts no options. Called once per ``-i``, not per flow.
        """
        if options:
            raise OptionError(f"{cls.__name__} takes no options (got {', '.join(options)})")
        return None

    @classmethod
    def applies_to(cls, options: Any, flow: FlowInfo) -> bool:
        """Whether a flow gets an instance at all, decided from its addresses and the
        options (``parse_options``' value) before one is made. Default: every flow.

        Override it where ``start`` would pass most flows through at once (a
        filter by destination): a flow no interceptor applies to is relayed as
        passthrough from its first byte (spliced), without an instance, a chain
        or their memory. ``--when`` selects first; this narrows what it selected.
        """
        return True

    # -- hooks ----------------------------------------------------------

    def start(self) -> None:
        """The outgoing flow is connected and data may flow."""

    def client_data(self, data: bytes) -> bytes:
        """Bytes from the client toward the server; return what to forward."""
        return data

    def server_data(self, data: bytes) -> bytes:
        """Bytes from the server toward the client; return what to forward."""
        return data

    def client_eof(self) -> bytes:
        """The client sent its last byte; return what is still held for the server."""
        return b""

    def server_eof(self) -> bytes:
        """The server sent its last byte; return what is still held for the client."""
        return b""

    def end(self, reason: str) -> None:
        """The flow pair ended (``eof``, ``reset``, ``interceptor-abort``, ...)."""

    # -- actions ----------------------------------------------------------

    def inject_to_client(self, data: bytes) -> None:
        """Send ``data`` toward the client, as if it came from this interceptor."""
        if data:
            self._to_client.append(bytes(data))

    def inject_to_server(self, data: bytes) -> None:
        """Send ``data`` toward the server, as if it came from this interceptor."""
        if data:
            self._to_server.append(bytes(data))

    def abort(self, reason: str = "aborted by interceptor") -> NoReturn:
        """End the flow pair now: both ends are reset, nothing more is forwarded.

        Bytes injected toward the client earlier in the same hook are still
        delivered first (see :attr:`AbortFlow.to_client`): inject a reply,
        then abort.
        """
        raise AbortFlow(reason)

    def passthrough(self) -> None:
        """Stop calling this interceptor's data hooks: it has seen enough.

        What the current call returns is still forwarded, so return anything
        you buffered. :meth:`end` is still called. When every interceptor of a
        flow asked for passthrough, the engine relays the rest of the flow on
        its fastest path.
        """
        self._passthrough = True

    @property
    def is_passthrough(self) -> bool:
        """Whether :meth:`passthrough` was called."""
        return self._passthrough

    # -- time, pacing and threads (the state lives in tproxy.timers) -----------

    _tproxy_chain: Chain | None = None
    _tproxy_index = 0

    def _flow_timers(self, what: str) -> FlowTimers:
        chain = self._tproxy_chain
        if chain is None:
            raise RuntimeError(
                f"{what} needs a relay that drives timers, and this flow's chain has no "
                "clock (Chain.set_clock was never called)"
            )
        return chain.timers()

    def now(self) -> float:
        """The flow's clock in seconds: the relay's monotonic time, the Driver's virtual time.

        Only differences mean something. Use it instead of :func:`time.monotonic`,
        so tests on :class:`tproxy.testing.Driver` control time.
        """
        return self._flow_timers("now()").clock()

    def call_later(self, seconds: float, fn: Callable[[], object]) -> TimerHandle:
        """Call ``fn()`` once, ``seconds`` from now (0: as soon as the hook returned).

        The callback may do what a hook does: inject (routed from this
        interceptor's place in the chain, like a hook's injections), abort,
        close, pass through, hold or release reading and end of stream, set
        more timers. Its return value is ignored. Callbacks due at the same
        time run in the order they were made. Returns a handle whose
        ``cancel()`` drops the call; all timers die with the flow.
        """
        return self._flow_timers("call_later()").call_later(self._tproxy_index, seconds, fn)

    def hold_reading(self, side: str, held: bool = True) -> None:
        """Ask the relay to stop (``held``) or resume reading from ``side``.

        ``side`` is ``client``, ``server`` or ``both``. While any interceptor
        holds a side, the relay reads nothing from it: the sender meets TCP
        backpressure instead of the proxy queueing without bound. Hold when
        what you queued passes a limit, release when it drained (in a timer
        callback). The relay may still deliver one read that was in flight.
        """
        self._flow_timers("hold_reading()").hold_reading(self._tproxy_index, side, held)

    def hold_eof(self, side: str, held: bool = True) -> None:
        """Hold ``side``'s end of stream at this interceptor (``held=False``: let it go on).

        When ``side`` (``client``, ``server`` or ``both``) finishes sending, its
        end of stream passes the chain like data; at an interceptor holding
        it, it stops after that interceptor's ``client_eof``/``server_eof``
        hook (which may call this, or it may have been called earlier). The
        interceptors after it see their eof hook, and the other end gets its
        half-close, only once this interceptor releases it — after it
        injected what it still queued. ``slow-close`` uses ``hold_eof`` plus
        ``call_later`` to delay a FIN.
        """
        self._flow_timers("hold_eof()").hold_eof(self._tproxy_index, side, held)

    def close(self, reason: str = "closed by interceptor") -> None:
        """End the flow politely: both ends get a FIN, not a reset.

        What the current call returns or injected is still delivered first;
        then the relay stops reading, half-closes both sides and ends the flow
        (reason ``eof``, ``reason`` as its detail). Timers stop. Compare
        :meth:`abort`, which resets both ends.
        """
        timers = self._flow_timers("close()")
        if timers.closing is None:
            timers.closing = reason

    def run_in_thread(
        self,
        fn: Callable[[], Any],
        then: Callable[[Any], object] | None = None,
        *,
        hold: str = "both",
    ) -> ThreadJob:
        """Run ``fn()`` in a worker thread, off the event loop; then ``then(outcome)`` on it.

        The only sanctioned way to do slow or blocking work (a lookup, a
        file, a subprocess): a hook that blocks freezes every flow of the
        process. ``outcome`` is what ``fn`` returned or the exception it
        raised; ``then`` runs as this interceptor and may inject, abort,
        close or pass through. Without ``then`` an exception from ``fn``
        fails the flow. Meanwhile the relay does not read from ``hold``
        (``client``, ``server``, ``both`` — the default — or ``none``), so
        the data that triggered the job is not overtaken by more. ``fn``
        must not touch the interceptor's state unguarded: it runs in
        another thread. In :class:`tproxy.testing.Driver` jobs run when the
        test calls ``run_threads()``; the relay runs them in worker threads
        (see tproxy/relay/threads.py: bounded, abandoned at shutdown).
        """
        return self._flow_timers("run_in_thread()").run_in_thread(
            self._tproxy_index, fn, then, hold
        )

    # -- datagrams (UDP sessions) ----------------------------------------------
    #
    # In a UDP session (one per client address and original destination) the
    # engine calls these instead of the stream hooks; ``start`` and ``end``
    # mark the session's beginning and end as they do a flow pair's. A
    # datagram keeps its boundaries: each hook gets one whole datagram and
    # returns one (``b""`` is an empty datagram) or ``None`` to drop it.

    def client_datagram(self, data: bytes) -> bytes | None:
        """A datagram from the client toward the server; return it, a new one, or ``None``."""
        return data

    def server_datagram(self, data: bytes) -> bytes | None:
        """A datagram from the server toward the client; return it, a new one, or ``None``."""
        return data

    def inject_datagram_to_client(self, data: bytes) -> None:
        """Send one datagram toward the client, as if it came from this interceptor."""
        self.__dict__.setdefault("_datagrams_to_client", []).append(bytes(data))

    def inject_datagram_to_server(self, data: bytes) -> None:
        """Send one datagram toward the server, as if it came from this interceptor."""
        self.__dict__.setdefault("_datagrams_to_server", []).append(bytes(data))

    def _take_datagrams(self) -> tuple[list[bytes], list[bytes]]:
        """Remove and return the datagrams injected so far: (to the server, to the client)."""
        to_server: list[bytes] = self.__dict__.pop("_datagrams_to_server", [])
        to_client: list[bytes] = self.__dict__.pop("_datagrams_to_client", [])
        return to_server, to_client


class InterceptorError(Exception):
    """An interceptor raised; the engine ends that one flow and logs this."""

    def __init__(self, interceptor: Interceptor, hook: str, error: BaseException) -> None:
        super().__init__(f"{type(interceptor).__name__}.{hook} raised {error!r}")
        self.interceptor = interceptor
        self.hook = hook
        self.error = error


@dataclass(slots=True)
class Output:
    """What one chain call asks the engine to send."""

    to_server: bytes = b""
    to_client: bytes = b""

    def __bool__(self) -> bool:
        return bool(self.to_server or self.to_client)


_DATA_HOOKS = frozenset({"client_data", "server_data"})
_WATCH = watchdog.WATCH
_perf_counter = time.perf_counter


def end_each(interceptors: Sequence[Interceptor], reason: str) -> None:
    """Call every interceptor's ``end(reason)``; the first failure is raised (as an
    :class:`InterceptorError`) once all of them ran. Stream and datagram chains share it."""
    errors: list[InterceptorError] = []
    for ic in interceptors:
        try:
            ic.end(reason)
        except Exception as exc:
            errors.append(InterceptorError(ic, "end", exc))
    if errors:
        raise errors[0]


def _as_bytes(ic: Interceptor, hook: str, result: object) -> bytes:
    """A data hook's result that is not exactly ``bytes``: converted, or the hook's error."""
    if result is None:
        raise InterceptorError(
            ic, hook, TypeError(f"{hook} returned None, not bytes: did you forget to return?")
        )
    if not isinstance(result, bytes | bytearray | memoryview):
        raise InterceptorError(
            ic, hook, TypeError(f"{hook} returned {type(result).__name__}, not bytes")
        )
    return bytes(result)


class _Collect:
    """Accumulates chunks per direction during one chain call."""

    __slots__ = ("client", "server")

    def __init__(self) -> None:
        self.server: list[bytes] = []
        self.client: list[bytes] = []

    def output(self) -> Output:
        return Output(b"".join(self.server), b"".join(self.client))


class Chain:
    """Runs a flow's interceptors in order and routes what they return and inject.

    Raises :class:`AbortFlow` when an interceptor aborts and
    :class:`InterceptorError` when one raises anything else. After either,
    the chain must not be fed again; :meth:`end` may still be called.
    """

    def __init__(self, interceptors: Sequence[Interceptor]) -> None:
        self.interceptors = list(interceptors)
        self._ended = False

    @property
    def passthrough(self) -> bool:
        """True when no interceptor wants to see data any more (or there are none).

        A timer, a held end of stream or a thread job still pending keeps the
        chain in the engine's hands until it is done.
        """
        for ic in self.interceptors:
            if not ic._passthrough:
                return False
        return not self._timers_busy()

    def start(self) -> Output:
        """Call every interceptor's :meth:`Interceptor.start`, in order.

        What the start hooks inject is routed only once all of them ran, so
        no interceptor sees data (say, an earlier one's banner) before its
        own ``start``, where it may still decide to abort or pass through.
        """
        out = _Collect()
        injected: list[tuple[bytes, bytes]] = []
        for k, ic in enumerate(self.interceptors):
            self._invoke(k, "start", (), out)
            injected.append((b"".join(ic._to_server), b"".join(ic._to_client)))
            ic._to_server.clear()
            ic._to_client.clear()
        for k, (to_server, to_client) in enumerate(injected):
            if to_client:
                self._to_client(k - 1, to_client, out)
            if to_server:
                self._to_server(k + 1, to_server, out)
        return out.output()

    def client_data(self, data: bytes) -> Output:
        return self._data(data, toward_server=True)

    def server_data(self, data: bytes) -> Output:
        return self._data(data, toward_server=False)

    def _data(self, data: bytes, *, toward_server: bool) -> Output:
        """A chunk through the interceptors, the common case inline.

        Every chunk of every watched flow comes here: each interceptor in turn,
        no collector while none injects. The first one that injected hands the
        rest of the trip to the general routing (:meth:`_route`, then
        :meth:`_to_server` / :meth:`_to_client`).
        """
        ics = self.interceptors
        if toward_server:
            hook, order = "client_data", range(len(ics))
        else:
            hook, order = "server_data", range(len(ics) - 1, -1, -1)
        for k in order:
            ic = ics[k]
            if ic._passthrough:
                continue
            result = self._invoke(k, hook, (data,), None)
            if ic._to_server or ic._to_client:
                out = _Collect()
                result = self._route(k, result, out, toward_server=toward_server)
                if toward_server:
                    self._to_server(k + 1, result, out)
                else:
                    self._to_client(k - 1, result, out)
                return out.output()
            data = result
            if not data:
                return Output()
        return Output(data, b"") if toward_server else Output(b"", data)

    def client_eof(self) -> Output:
        """Flush the client-to-server direction, interceptor by interceptor."""
        out = _Collect()
        self._eof_from(CLIENT, 0, out)
        return out.output()

    def server_eof(self) -> Output:
        """Flush the server-to-client direction, interceptor by interceptor."""
        out = _Collect()
        self._eof_from(SERVER, len(self.interceptors) - 1, out)
        return out.output()

    def end(self, reason: str) -> None:
        """Tell every interceptor the flow ended; errors here are only logged by the caller."""
        if self._ended:
            return
        self._ended = True
        end_each(self.interceptors, reason)

    # -- routing ------------------------------------------------------------

    def _to_server(self, start: int, data: bytes, out: _Collect) -> None:
        for k in range(start, len(self.interceptors)):
            if not data:
                return
            if self.interceptors[k].is_passthrough:
                continue
            data = self._call(k, "client_data", (data,), out, to_server_from=k)
        if data:
            out.server.append(data)

    def _to_client(self, start: int, data: bytes, out: _Collect) -> None:
        for k in range(start, -1, -1):
            if not data:
                return
            if self.interceptors[k].is_passthrough:
                continue
            data = self._call(k, "server_data", (data,), out, to_client_from=k)
        if data:
            out.client.append(data)

    def _call(
        self,
        k: int,
        hook: str,
        args: tuple[bytes, ...],
        out: _Collect,
        *,
        to_server_from: int | None = None,
        to_client_from: int | None = None,
    ) -> bytes:
        """Call hook ``hook`` of interceptor ``k`` and route its injections.

        The hook's result continues in the direction being processed; the
        caller passes it on (see :meth:`_route`).
        """
        result = self._invoke(k, hook, args, out)
        return self._route(k, result, out, toward_server=to_server_from is not None)

    def _invoke(self, k: int, hook: str, args: tuple[bytes, ...], out: _Collect | None) -> bytes:
        """Call hook ``hook`` of interceptor ``k``: its result as ``bytes``.

        Timed for the stall watchdog; an abort keeps what ``k`` injected toward
        the client (into ``out``, a new collector when ``None``) and is raised
        on; any other exception is raised as :class:`InterceptorError`. ``None``
        from an eof or start hook is "nothing"; from a data hook it is an error.
        """
        ic = self.interceptors[k]
        began = _perf_counter()
        try:
            result = getattr(ic, hook)(*args)
        except AbortFlow as exc:
            self._keep_reply(k, exc, out if out is not None else _Collect())
            raise
        except Exception as exc:
            raise InterceptorError(ic, hook, exc) from exc
        finally:
            if _perf_counter() - began >= _WATCH.threshold:
                watchdog.hook_ended(began, ic, hook)
        if type(result) is bytes:
            return result
        if result is None and hook not in _DATA_HOOKS:
            return b""
        return _as_bytes(ic, hook, result)

    def _route(self, k: int, result: bytes, out: _Collect, *, toward_server: bool) -> bytes:
        """What interceptor ``k`` injected during a call that returned ``result``.

        Injections in the direction being processed go in front of the result
        (they were made during the call, before it returned), which the caller
        passes on; injections the other way start their own trip from ``k``'s
        neighbour.
        """
        ic = self.interceptors[k]
        inj_server = b"".join(ic._to_server)
        inj_client = b"".join(ic._to_client)
        ic._to_server.clear()
        ic._to_client.clear()
        if toward_server:
            result = inj_server + result
            if inj_client:
                self._to_client(k - 1, inj_client, out)
        else:
            result = inj_client + result
            if inj_server:
                self._to_server(k + 1, inj_server, out)
        return result

    def _keep_reply(self, k: int, exc: AbortFlow, out: _Collect) -> None:
        """Interceptor ``k`` aborted: keep what it injected toward the client.

        The injection passes interceptors k-1 ... 0 as usual; if one of them
        fails or aborts in turn, what got through so far is kept. Injections
        toward the server are dropped (the server is reset).
        """
        ic = self.interceptors[k]
        inj_client = b"".join(ic._to_client)
        ic._to_client.clear()
        ic._to_server.clear()
        if inj_client:
            try:
                self._to_client(k - 1, inj_client, out)
            except (AbortFlow, InterceptorError):
                pass
        exc.to_client = b"".join(out.client)

    # -- time: optional members a relay honours (contract in tproxy.timers) -----

    _flow_timers: FlowTimers | None = None
    _clock: Callable[[], float] | None = None

    def set_clock(self, clock: Callable[[], float]) -> None:
        """Give the chain the relay's clock; call once, before :meth:`start`.

        Calling it promises that the caller honours every member below; an
        interceptor asking for time in a chain without a clock fails its flow.
        """
        self._clock = clock
        for k, ic in enumerate(self.interceptors):
            ic._tproxy_chain = self
            ic._tproxy_index = k

    def timers(self) -> FlowTimers:
        """The flow's timer state, made when an interceptor first asks for time.

        Most flows never do: until then every question below is answered
        without it, and an idle flow does not carry its tables.
        """
        timers = self._flow_timers
        if timers is None:
            if self._clock is None:
                raise RuntimeError("the chain has no clock (Chain.set_clock was never called)")
            timers = self._flow_timers = FlowTimers(self._clock)
        return timers

    def _timers_busy(self) -> bool:
        timers = self._flow_timers
        return timers is not None and not self._ended and timers.busy()

    def next_deadline(self) -> float | None:
        """When :meth:`on_timer` is next wanted (on the chain's clock); None for never."""
        timers = self._flow_timers
        if timers is None or self._ended or timers.closing is not None:
            return None
        return timers.next_deadline()

    def on_timer(self, now: float) -> Output:
        """Run the callbacks due at ``now`` in order and route what they inject.

        A callback's injections toward the server pass the interceptors after
        its own, toward the client the ones before it, as a hook's do. Raises
        like the data hooks. Callbacks made during this call run in the next.
        """
        timers = self._flow_timers
        if timers is None or self._ended:
            return Output()
        out = _Collect()
        made_before = timers.last_seq
        while timers.closing is None:
            handle = timers.pop_due(now, made_before)
            if handle is None:
                break
            self._callback(handle.owner, handle.fn, (), "call_later", out)
            self._release_eofs(timers, out)
        self._release_eofs(timers, out)
        return out.output()

    @property
    def holds_client_reading(self) -> bool:
        """While true the relay must not read from the client."""
        timers = self._flow_timers
        return timers is not None and timers.holds_reading(CLIENT)

    @property
    def holds_server_reading(self) -> bool:
        """While true the relay must not read from the server."""
        timers = self._flow_timers
        return timers is not None and timers.holds_reading(SERVER)

    @property
    def holds_client_eof(self) -> bool:
        """The client's end of stream is held in the chain: do not half-close the server yet."""
        timers = self._flow_timers
        return timers is not None and timers.eof_at[CLIENT] is not None

    @property
    def holds_server_eof(self) -> bool:
        """The server's end of stream is held in the chain: do not half-close the client yet."""
        timers = self._flow_timers
        return timers is not None and timers.eof_at[SERVER] is not None

    @property
    def closing(self) -> str | None:
        """Set when an interceptor asked to end the flow with a FIN both ways (its reason)."""
        timers = self._flow_timers
        return None if timers is None else timers.closing

    @property
    def has_requests(self) -> bool:
        """Whether :attr:`closing` is set or thread jobs wait: one cheap check per call."""
        timers = self._flow_timers
        return timers is not None and (timers.closing is not None or bool(timers.new_jobs))

    def take_thread_jobs(self) -> list[ThreadJob]:
        """Jobs asked for since the last call; run each's ``run()`` off the loop."""
        timers = self._flow_timers
        return [] if timers is None else timers.take_jobs()

    def on_thread_done(self, job: ThreadJob) -> Output:
        """A job's ``run()`` returned: release its hold and call its ``then`` on the loop."""
        timers = self._flow_timers
        if timers is None or not timers.job_back(job) or self._ended:
            return Output()
        out = _Collect()
        if timers.closing is None:
            if job.then is not None:
                self._callback(job.owner, job.then, (job.outcome,), "run_in_thread", out)
            elif job.error is not None:
                ic = self.interceptors[job.owner]
                raise InterceptorError(ic, "run_in_thread", job.error) from job.error
        self._release_eofs(timers, out)
        return out.output()

    def _callback(
        self, k: int, fn: Callable[..., object], args: tuple[Any, ...], via: str, out: _Collect
    ) -> None:
        """Run a timer or thread callback as interceptor ``k`` and route its injections."""
        ic = self.interceptors[k]
        try:
            fn(*args)
        except AbortFlow as exc:
            self._keep_reply(k, exc, out)
            raise
        except Exception as exc:
            name = getattr(fn, "__name__", "callback")
            raise InterceptorError(ic, f"{name} ({via})", exc) from exc
        inj_server = b"".join(ic._to_server)
        inj_client = b"".join(ic._to_client)
        ic._to_server.clear()
        ic._to_client.clear()
        if inj_client:
            self._to_client(k - 1, inj_client, out)
        if inj_server:
            self._to_server(k + 1, inj_server, out)

    def _eof_from(self, side: str, start: int, out: _Collect) -> None:
        """Carry ``side``'s end of stream on from interceptor ``start`` until one holds it.

        Each interceptor first gets what the ones before it flushed (as data),
        then its eof hook; one that holds the eof keeps it, and what it
        flushed goes on as data only.
        """
        pending = b""
        if side == CLIENT:
            for k in range(start, len(self.interceptors)):
                if self.interceptors[k].is_passthrough:
                    continue
                if pending:
                    pending = self._call(k, "client_data", (pending,), out, to_server_from=k)
                pending += self._call(k, "client_eof", (), out, to_server_from=k)
                # read each time: the hook may have made the timers (hold_eof)
                timers = self._flow_timers
                if timers is not None and timers.stops_eof(k, CLIENT):
                    self._to_server(k + 1, pending, out)
                    return
            if pending:
                out.server.append(pending)
        else:
            for k in range(start, -1, -1):
                if self.interceptors[k].is_passthrough:
                    continue
                if pending:
                    pending = self._call(k, "server_data", (pending,), out, to_client_from=k)
                pending += self._call(k, "server_eof", (), out, to_client_from=k)
                timers = self._flow_timers
                if timers is not None and timers.stops_eof(k, SERVER):
                    self._to_client(k - 1, pending, out)
                    return
            if pending:
                out.client.append(pending)

    def _release_eofs(self, timers: FlowTimers, out: _Collect) -> None:
        """Carry on each end of stream whose holder let go of it."""
        for side in SIDES:
            at = timers.eof_at[side]
            if at is not None and at not in timers.eof_holds[side]:
                timers.eof_at[side] = None
                self._eof_from(side, at + 1 if side == CLIENT else at - 1, out)

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

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

from .flow import FlowInfo


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
      (``b""`` forwards nothing, e.g. while buffering).
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


@dataclass
class Output:
    """What one chain call asks the engine to send."""

    to_server: bytes = b""
    to_client: bytes = b""

    def __bool__(self) -> bool:
        return bool(self.to_server or self.to_client)


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
        """True when no interceptor wants to see data any more (or there are none)."""
        return all(i.is_passthrough for i in self.interceptors)

    def start(self) -> Output:
        """Call every interceptor's :meth:`Interceptor.start`, in order.

        What the start hooks inject is routed only once all of them ran, so
        no interceptor sees data (say, an earlier one's banner) before its
        own ``start``, where it may still decide to abort or pass through.
        """
        out = _Collect()
        injected: list[tuple[bytes, bytes]] = []
        for k, ic in enumerate(self.interceptors):
            try:
                ic.start()
            except AbortFlow as exc:
                self._keep_reply(k, exc, out)
                raise
            except Exception as exc:
                raise InterceptorError(ic, "start", exc) from exc
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
        out = _Collect()
        self._to_server(0, data, out)
        return out.output()

    def server_data(self, data: bytes) -> Output:
        out = _Collect()
        self._to_client(len(self.interceptors) - 1, data, out)
        return out.output()

    def client_eof(self) -> Output:
        """Flush the client-to-server direction, interceptor by interceptor."""
        out = _Collect()
        pending = b""
        for k, ic in enumerate(self.interceptors):
            if ic.is_passthrough:
                continue
            if pending:
                pending = self._call(k, "client_data", (pending,), out, to_server_from=k)
            pending += self._call(k, "client_eof", (), out, to_server_from=k)
        if pending:
            out.server.append(pending)
        return out.output()

    def server_eof(self) -> Output:
        """Flush the server-to-client direction, interceptor by interceptor."""
        out = _Collect()
        pending = b""
        for k in range(len(self.interceptors) - 1, -1, -1):
            ic = self.interceptors[k]
            if ic.is_passthrough:
                continue
            if pending:
                pending = self._call(k, "server_data", (pending,), out, to_client_from=k)
            pending += self._call(k, "server_eof", (), out, to_client_from=k)
        if pending:
            out.client.append(pending)
        return out.output()

    def end(self, reason: str) -> None:
        """Tell every interceptor the flow ended; errors here are only logged by the caller."""
        if self._ended:
            return
        self._ended = True
        errors: list[InterceptorError] = []
        for ic in self.interceptors:
            try:
                ic.end(reason)
            except Exception as exc:
                errors.append(InterceptorError(ic, "end", exc))
        if errors:
            raise errors[0]

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
        caller passes it on. Injections in the *same* direction are put in
        front of the result (they were made during the call, before it
        returned); injections in the other direction start their own trip
        from ``k``'s neighbour.
        """
        ic = self.interceptors[k]
        try:
            result = getattr(ic, hook)(*args)
        except AbortFlow as exc:
            self._keep_reply(k, exc, out)
            raise
        except Exception as exc:
            raise InterceptorError(ic, hook, exc) from exc
        if result is None:
            result = b""
        elif not isinstance(result, bytes | bytearray | memoryview):
            raise InterceptorError(
                ic, hook, TypeError(f"{hook} returned {type(result).__name__}, not bytes")
            )
        result = bytes(result)
        inj_server = b"".join(ic._to_server)
        inj_client = b"".join(ic._to_client)
        ic._to_server.clear()
        ic._to_client.clear()
        if to_server_from is not None:
            # processing toward the server (or start): same-direction injections lead
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

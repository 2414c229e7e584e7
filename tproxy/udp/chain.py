"""The datagram chain: a UDP session's interceptors, fed one datagram at a time.

The stream :class:`~tproxy.interceptor.Chain` concatenates what interceptors
return and inject; a datagram has boundaries that must survive, so this
chain keeps every datagram whole and returns lists of them. The routing is
the same as for streams: a datagram from the client passes interceptors
0, 1, ... n-1, one from the server passes them in reverse; a datagram that
interceptor *k* injects toward the server passes k+1 ..., one it injects
toward the client passes k-1 ... 0. A hook that returns ``None`` drops its
datagram: the interceptors after it never see it.

Like the stream chain it is sans-io and raises :class:`AbortFlow` or
:class:`InterceptorError`; after either the session ends.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from ..interceptor import AbortFlow, Interceptor, InterceptorError, end_each


@dataclass
class DatagramOutput:
    """What one chain call asks the engine to send: whole datagrams, in order."""

    to_server: list[bytes] = field(default_factory=list)
    to_client: list[bytes] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.to_server or self.to_client)


class DatagramChain:
    """Runs a session's interceptors on datagrams and routes what they return and inject."""

    def __init__(self, interceptors: Sequence[Interceptor]) -> None:
        self.interceptors = list(interceptors)
        self._ended = False

    @property
    def passthrough(self) -> bool:
        """True when no interceptor wants to see datagrams any more (or there are none)."""
        return all(i.is_passthrough for i in self.interceptors)

    def start(self) -> DatagramOutput:
        """Call every interceptor's ``start``, in order, then route what they injected.

        As for streams, injections wait until every ``start`` ran, so no
        interceptor sees a datagram before its own ``start``.
        """
        out = DatagramOutput()
        injected: list[tuple[list[bytes], list[bytes]]] = []
        for ic in self.interceptors:
            try:
                ic.start()
            except AbortFlow:
                raise
            except Exception as exc:
                raise InterceptorError(ic, "start", exc) from exc
            injected.append(_take(ic))
        for k, (to_server, to_client) in enumerate(injected):
            for data in to_client:
                self._to_client(k - 1, data, out)
            for data in to_server:
                self._to_server(k + 1, data, out)
        return out

    def client_datagram(self, data: bytes) -> DatagramOutput:
        """One datagram from the client."""
        out = DatagramOutput()
        self._to_server(0, data, out)
        return out

    def server_datagram(self, data: bytes) -> DatagramOutput:
        """One datagram from the server."""
        out = DatagramOutput()
        self._to_client(len(self.interceptors) - 1, data, out)
        return out

    def end(self, reason: str) -> None:
        """Tell every interceptor the session ended; the first error is raised after all ran."""
        if self._ended:
            return
        self._ended = True
        end_each(self.interceptors, reason)

    # -- routing ------------------------------------------------------------

    def _to_server(self, start: int, data: bytes | None, out: DatagramOutput) -> None:
        for k in range(start, len(self.interceptors)):
            if data is None:
                return
            if self.interceptors[k].is_passthrough:
                continue
            data = self._call(k, "client_datagram", data, out)
        if data is not None:
            out.to_server.append(data)

    def _to_client(self, start: int, data: bytes | None, out: DatagramOutput) -> None:
        for k in range(start, -1, -1):
            if data is None:
                return
            if self.interceptors[k].is_passthrough:
                continue
            data = self._call(k, "server_datagram", data, out)
        if data is not None:
            out.to_client.append(data)

    def _call(self, k: int, hook: str, data: bytes, out: DatagramOutput) -> bytes | None:
        """Call ``hook`` of interceptor ``k``; route its injections; return its result.

        Injections in the direction being processed go out before the
        result (they were made before it returned).
        """
        ic = self.interceptors[k]
        try:
            returned: object = getattr(ic, hook)(data)
        except AbortFlow:
            raise
        except Exception as exc:
            raise InterceptorError(ic, hook, exc) from exc
        result: bytes | None = None
        if returned is not None:
            if not isinstance(returned, bytes | bytearray | memoryview):
                raise InterceptorError(
                    ic, hook, TypeError(f"{hook} returned {type(returned).__name__}, not bytes")
                )
            result = bytes(returned)
        to_server, to_client = _take(ic)
        for injected in to_server:
            self._to_server(k + 1, injected, out)
        for injected in to_client:
            self._to_client(k - 1, injected, out)
        return result


def _take(ic: Interceptor) -> tuple[list[bytes], list[bytes]]:
    """The datagrams ``ic`` injected; stream injections mean nothing here and are dropped."""
    ic._to_server.clear()
    ic._to_client.clear()
    return ic._take_datagrams()

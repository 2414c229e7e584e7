"""Drive interceptors with bytes: no sockets, no event loop.

    >>> from tproxy.testing import Driver
    >>> from interceptors.replace import Replace
    >>> d = Driver(Replace, old="cat", new="dog", direction="server")
    >>> d.server(b"a c"); d.server(b"at"); d.server_eof()
    >>> d.to_client
    b'a dog'

A :class:`Driver` plays the engine: it runs a :class:`~tproxy.interceptor.Chain`
and keeps everything the chain asked to send, per direction, plus whether the
flow was aborted, failed or went to passthrough.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .flow import FlowInfo
from .interceptor import AbortFlow, Chain, Interceptor, InterceptorError, Output
from .udp.chain import DatagramChain, DatagramOutput

InterceptorLike = type[Interceptor] | Interceptor | tuple[type[Interceptor], Mapping[str, str]]


class Driver:
    """A fake engine around one chain of interceptors.

    ``Driver(A)`` builds ``A`` with no options; ``Driver(A, key="v")`` passes
    string options through ``A.parse_options`` as the command line would;
    ``Driver((A, {...}), (B, {...}))`` or ``Driver(a_instance, ...)`` builds a
    chain. :meth:`start` is called on construction unless ``start=False``.
    """

    def __init__(
        self,
        *interceptors: InterceptorLike,
        flow: FlowInfo | None = None,
        start: bool = True,
        **options: str,
    ) -> None:
        self.flow = flow or FlowInfo.example()
        built: list[Interceptor] = []
        for item in interceptors:
            if isinstance(item, Interceptor):
                built.append(item)
            elif isinstance(item, tuple):
                cls, opts = item
                built.append(cls(self.flow, cls.parse_options(dict(opts))))
            else:
                opts = options if len(interceptors) == 1 else {}
                built.append(item(self.flow, item.parse_options(dict(opts))))
        self.interceptors = built
        self.chain = Chain(built)
        self.to_server = b""
        """Everything forwarded or injected toward the server so far."""
        self.to_client = b""
        """Everything forwarded or injected toward the client so far."""
        self.aborted: str | None = None
        """The abort reason, once an interceptor aborted the flow."""
        self.error: InterceptorError | None = None
        """The error, once an interceptor raised."""
        self.client_closed = False
        self.server_closed = False
        self.ended: str | None = None
        if start:
            self.start()

    @property
    def interceptor(self) -> Interceptor:
        """The first (often only) interceptor of the chain."""
        return self.interceptors[0]

    @property
    def passthrough(self) -> bool:
        """Whether the engine would now relay the rest of the flow untouched."""
        return self.chain.passthrough

    @property
    def done(self) -> bool:
        return self.aborted is not None or self.error is not None

    def _run(self, method: str, *args: Any) -> Output:
        if self.done:
            raise RuntimeError("the flow already ended (aborted or failed)")
        try:
            out: Output = getattr(self.chain, method)(*args)
        except AbortFlow as exc:
            self.to_client += exc.to_client
            self.aborted = exc.reason
            self.end("interceptor-abort")
            return Output()
        except InterceptorError as exc:
            self.error = exc
            self.end("error")
            return Output()
        self.to_server += out.to_server
        self.to_client += out.to_client
        return out

    def start(self) -> Output:
        return self._run("start")

    def client(self, data: bytes | str) -> Output:
        """Feed bytes that the client sent."""
        return self._run("client_data", _b(data))

    def server(self, data: bytes | str) -> Output:
        """Feed bytes that the server sent."""
        return self._run("server_data", _b(data))

    def client_eof(self) -> Output:
        """The client shut down its sending side."""
        self.client_closed = True
        return self._run("client_eof")

    def server_eof(self) -> Output:
        """The server shut down its sending side."""
        self.server_closed = True
        return self._run("server_eof")

    def end(self, reason: str = "eof") -> None:
        """End the flow, as the engine does when both directions are done."""
        if self.ended is None:
            self.ended = reason
            self.chain.end(reason)

    # -- datagrams (UDP sessions) ---------------------------------------------

    @classmethod
    def datagrams(
        cls, *interceptors: InterceptorLike, flow: FlowInfo | None = None, **options: str
    ) -> Driver:
        """A driver for a UDP session: built like ``Driver(...)``, started as a session.

            >>> d = Driver.datagrams(Interceptor)
            >>> d.client_datagram(b"ping").to_server
            [b'ping']
        """
        driver = cls(*interceptors, flow=flow, start=False, **options)
        driver.datagram_start()
        return driver

    @property
    def datagram_chain(self) -> DatagramChain:
        """The session's chain over the same interceptors as :attr:`chain`."""
        chain = self.__dict__.get("_datagram_chain")
        if chain is None:
            chain = self.__dict__["_datagram_chain"] = DatagramChain(self.interceptors)
        return chain

    @property
    def datagrams_to_server(self) -> list[bytes]:
        """Every datagram forwarded or injected toward the server so far, in order."""
        sent: list[bytes] = self.__dict__.setdefault("_datagrams_to_server", [])
        return sent

    @property
    def datagrams_to_client(self) -> list[bytes]:
        """Every datagram forwarded or injected toward the client so far, in order."""
        sent: list[bytes] = self.__dict__.setdefault("_datagrams_to_client", [])
        return sent

    def datagram_start(self) -> DatagramOutput:
        """Start the session (every interceptor's ``start``), as the UDP engine does."""
        return self._run_datagrams("start")

    def client_datagram(self, data: bytes | str) -> DatagramOutput:
        """Feed one datagram that the client sent."""
        return self._run_datagrams("client_datagram", _b(data))

    def server_datagram(self, data: bytes | str) -> DatagramOutput:
        """Feed one datagram that the server sent."""
        return self._run_datagrams("server_datagram", _b(data))

    def _run_datagrams(self, method: str, *args: Any) -> DatagramOutput:
        if self.done:
            raise RuntimeError("the session already ended (aborted or failed)")
        try:
            out: DatagramOutput = getattr(self.datagram_chain, method)(*args)
        except AbortFlow as exc:
            self.aborted = exc.reason
            self.end("interceptor-abort")
            return DatagramOutput()
        except InterceptorError as exc:
            self.error = exc
            self.end("error")
            return DatagramOutput()
        self.datagrams_to_server.extend(out.to_server)
        self.datagrams_to_client.extend(out.to_client)
        return out


def _b(data: bytes | str) -> bytes:
    return data.encode() if isinstance(data, str) else data

"""Drive interceptors with bytes: no sockets, no event loop.

    >>> from tproxy.testing import Driver
    >>> from tproxy.interceptors.replace import Replace
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
from .options import normalize_keys
from .timers import ThreadJob
from .udp.chain import DatagramChain, DatagramOutput

InterceptorLike = type[Interceptor] | Interceptor | tuple[type[Interceptor], Mapping[str, Any]]


class Driver:
    """A fake engine around one chain of interceptors.

    ``Driver(A)`` builds ``A`` with no options; ``Driver(A, key="v")`` passes
    options through ``A.parse_options`` exactly as the command line would
    (keys spelled with ``_``, values as strings: ``max_bytes=1`` is ``-o max-bytes=1``);
    ``Driver((A, {...}), (B, {...}))`` or ``Driver(a_instance, ...)`` builds a
    chain. :meth:`start` is called on construction unless ``start=False``.
    """

    def __init__(
        self,
        *interceptors: InterceptorLike,
        flow: FlowInfo | None = None,
        start: bool = True,
        **options: Any,
    ) -> None:
        self.flow = flow or FlowInfo.example()
        built: list[Interceptor] = []
        for item in interceptors:
            if isinstance(item, Interceptor):
                built.append(item)
            elif isinstance(item, tuple):
                cls, opts = item
                built.append(cls(self.flow, cls.parse_options(normalize_keys(opts))))
            else:
                opts = options if len(interceptors) == 1 else {}
                built.append(item(self.flow, item.parse_options(normalize_keys(opts))))
        self.interceptors = built
        self.chain = Chain(built)
        self.time = 0.0
        """The virtual clock in seconds that ``now()`` reads (see :meth:`advance`)."""
        self.chain.set_clock(lambda: self.time)
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

    # -- virtual time and threads -----------------------------------------------

    MAX_ROUNDS = 100_000
    """How many timer rounds one :meth:`advance` may run before it calls it a runaway."""

    def advance(self, seconds: float) -> list[tuple[float, Output]]:
        """Move the virtual clock forward, firing due timers in order, at their own times.

        Each round of due callbacks runs with :attr:`time` set to their
        deadline, as a relay would run them; what they send is added to
        :attr:`to_server`/:attr:`to_client` and returned as ``(time, output)``
        pairs (rounds that sent nothing included, so tests see when a hold
        or an end of stream was released). Stops early if the flow ends.
        """
        if not seconds >= 0:
            raise ValueError(f"advance: seconds must be >= 0, not {seconds!r}")
        target = self.time + seconds
        events: list[tuple[float, Output]] = []
        for _ in range(self.MAX_ROUNDS):
            if self.done or self.ended is not None:
                break
            deadline = self.chain.next_deadline()
            if deadline is None or deadline > target:
                break
            self.time = max(self.time, deadline)
            events.append((self.time, self._run("on_timer", self.time)))
            self._closed_check()
        else:
            raise RuntimeError(
                f"advance: more than {self.MAX_ROUNDS} timer rounds before t={target:g} "
                "(a callback rescheduling itself without delay?)"
            )
        if self.ended is None:
            self.time = target
        return events

    def advance_until_idle(self, limit: float = 3600.0) -> list[tuple[float, Output]]:
        """Advance until no timer is pending (at most ``limit`` virtual seconds)."""
        deadline = self.chain.next_deadline()
        events: list[tuple[float, Output]] = []
        end = self.time + limit
        while deadline is not None and deadline <= end and not self.done and self.ended is None:
            events += self.advance(max(0.0, deadline - self.time))
            deadline = self.chain.next_deadline()
        return events

    @property
    def next_deadline(self) -> float | None:
        """When the next timer is due on the virtual clock (None: none pending)."""
        return self.chain.next_deadline()

    @property
    def holds_client_reading(self) -> bool:
        """Whether the relay would now stop reading from the client."""
        return self.chain.holds_client_reading

    @property
    def holds_server_reading(self) -> bool:
        """Whether the relay would now stop reading from the server."""
        return self.chain.holds_server_reading

    @property
    def holds_client_eof(self) -> bool:
        """The client's end of stream came but the server is not half-closed yet."""
        return self.chain.holds_client_eof

    @property
    def holds_server_eof(self) -> bool:
        """The server's end of stream came but the client is not half-closed yet."""
        return self.chain.holds_server_eof

    @property
    def server_half_closed(self) -> bool:
        """Whether the relay would have sent the server its FIN by now."""
        return (self.client_closed and not self.holds_client_eof) or self.closed is not None

    @property
    def client_half_closed(self) -> bool:
        """Whether the relay would have sent the client its FIN by now."""
        return (self.server_closed and not self.holds_server_eof) or self.closed is not None

    @property
    def closed(self) -> str | None:
        """The reason, once an interceptor closed the flow politely (``close()``)."""
        return self.chain.closing

    def _closed_check(self) -> None:
        if self.chain.closing is not None and self.ended is None:
            self.end("eof")

    def run_threads(self) -> list[Output]:
        """Run the pending :meth:`~tproxy.interceptor.Interceptor.run_in_thread` jobs here.

        Each job's function runs synchronously, then its ``then`` callback as
        the relay would run it back on the loop; jobs those callbacks start
        run too. Returns each job's output.
        """
        outputs: list[Output] = []
        for _ in range(self.MAX_ROUNDS):
            jobs = self.chain.take_thread_jobs()
            if not jobs:
                return outputs
            for job in jobs:
                if self.done or self.ended is not None:
                    return outputs
                job.run()
                outputs.append(self._run("on_thread_done", job))
                self._closed_check()
        raise RuntimeError(f"run_threads: more than {self.MAX_ROUNDS} rounds of jobs")

    def take_thread_jobs(self) -> list[ThreadJob]:
        """Take the pending jobs to run them by hand (``job.run()``, then :meth:`thread_done`)."""
        return self.chain.take_thread_jobs()

    def thread_done(self, job: ThreadJob) -> Output:
        """Hand back a job taken with :meth:`take_thread_jobs` after its ``run()``."""
        out = self._run("on_thread_done", job)
        self._closed_check()
        return out

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

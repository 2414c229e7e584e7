"""Peek at a flow's ClientHello before choosing its interceptors, sans-io.

Selection by ``sni=`` or ``host=`` (``--when``, :mod:`tproxy.selection`) on a
flow whose destination is an address (transparent and forward modes) needs the
server name from the client's TLS ClientHello, which arrives only after the
flow is open. :class:`Peek` stands in for the flow's chain until then: it has
the interface of :class:`tproxy.interceptor.Chain` (``start``,
``client_data``, ``server_data``, ``client_eof``, ``server_eof`` ->
:class:`~tproxy.interceptor.Output`, ``end``, ``passthrough``) and the optional
timer members a relay honours (:mod:`tproxy.timers`), so any relay shell drives
it like a chain, without knowing it peeks.

It holds the client's first bytes until one of these decides:

- :func:`tproxy.tls.parse_client_hello` gives a ClientHello (``flow.sni`` and
  ``flow.alpn`` are set from it) or says the bytes are not TLS;
- 16 KiB are held and the hello is still incomplete;
- ``--peek-timeout`` (default 2 s) passed since the flow opened (on the relay's
  clock: :meth:`next_deadline` / :meth:`on_timer`);
- the server speaks first, or either side ends its stream.

Then it asks the factories again with the new metadata (``build``), starts the
real chain (its ``start`` injections go out then, ahead of the held bytes),
feeds it the held bytes in order and delegates everything after. When no
interceptor selects the flow, the held bytes go to the server as they are and
the peek turns ``passthrough``, so the relay splices the rest. Nothing is lost
or reordered.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any

from .flow import FlowInfo
from .interceptor import AbortFlow, Chain, Output
from .tls.clienthello import ClientHello, NeedMore, NotTLS, parse_client_hello

log = logging.getLogger("tproxy")

PEEK_LIMIT = 16 * 1024
"""The most client bytes held while waiting for a complete ClientHello."""
DEFAULT_TIMEOUT = 2.0
"""Seconds from the flow's start to deciding without a ClientHello (``--peek-timeout``)."""

ChainBuilder = Callable[[FlowInfo], Chain | None]
"""Builds a flow's chain from its metadata (``None``: no interceptor selects it)."""

_NO_JOBS: list[Any] = []


class Peek:
    """A flow's chain-to-be, decided once its ClientHello is known (see module doc)."""

    def __init__(
        self,
        info: FlowInfo,
        build: ChainBuilder,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        limit: int = PEEK_LIMIT,
    ) -> None:
        if not timeout > 0:
            raise ValueError("peek timeout must be positive")
        self.info = info
        """The flow's metadata; replaced by a copy with ``sni``/``alpn`` once a hello is read."""
        self.timeout = timeout
        self.limit = limit
        self.chain: Chain | None = None
        """The real chain once decided (``None``: undecided, or no interceptor selected)."""
        self.decided = False
        self.why: str | None = None
        """What decided (``client-hello``, ``not-tls``, ``timeout``, ...), for logs and tests."""
        self._build = build
        self._held = bytearray()
        self._clock: Callable[[], float] | None = None
        self._deadline: float | None = None

    # -- the Chain interface ----------------------------------------------------

    @property
    def passthrough(self) -> bool:
        """False while peeking; then whether the real chain is passthrough (none: True)."""
        if not self.decided:
            return False
        return self.chain is None or self.chain.passthrough

    def start(self) -> Output:
        """The flow is open: the peek's deadline starts now (the real chain starts later)."""
        if self._clock is not None and self._deadline is None:
            self._deadline = self._clock() + self.timeout
        return Output()

    def client_data(self, data: bytes) -> Output:
        if self.decided:
            chain = self.chain
            return Output(to_server=data) if chain is None else chain.client_data(data)
        self._held += data
        result = parse_client_hello(self._held)
        if isinstance(result, ClientHello):
            return self._decide(result, "client-hello")
        if isinstance(result, NotTLS):
            return self._decide(None, "not-tls")
        assert isinstance(result, NeedMore)
        if len(self._held) >= self.limit or result.at_least > self.limit:
            return self._decide(None, "over-limit")
        return Output()

    def server_data(self, data: bytes) -> Output:
        out = self._decide(None, "server-first") if not self.decided else Output()
        chain = self.chain
        _add(out, Output(to_client=data) if chain is None else chain.server_data(data))
        return out

    def client_eof(self) -> Output:
        out = self._decide(None, "client-eof") if not self.decided else Output()
        if self.chain is not None:
            _add(out, self.chain.client_eof())
        return out

    def server_eof(self) -> Output:
        out = self._decide(None, "server-eof") if not self.decided else Output()
        if self.chain is not None:
            _add(out, self.chain.server_eof())
        return out

    def end(self, reason: str) -> None:
        if self.chain is not None:
            self.chain.end(reason)

    # -- chain timers (optional members, tproxy.timers) ---------------------------

    def set_clock(self, clock: Callable[[], float]) -> None:
        """Take the relay's clock: the peek's deadline, and the real chain's timers."""
        self._clock = clock
        if self.chain is not None:
            self.chain.set_clock(clock)

    def next_deadline(self) -> float | None:
        if not self.decided:
            return self._deadline
        return self.chain.next_deadline() if self.chain is not None else None

    def on_timer(self, now: float) -> Output:
        if not self.decided:
            if self._deadline is not None and now >= self._deadline:
                return self._decide(None, "timeout")
            return Output()
        return self.chain.on_timer(now) if self.chain is not None else Output()

    @property
    def holds_client_reading(self) -> bool:
        return self.chain is not None and self.chain.holds_client_reading

    @property
    def holds_server_reading(self) -> bool:
        return self.chain is not None and self.chain.holds_server_reading

    @property
    def holds_client_eof(self) -> bool:
        return self.chain is not None and self.chain.holds_client_eof

    @property
    def holds_server_eof(self) -> bool:
        return self.chain is not None and self.chain.holds_server_eof

    @property
    def closing(self) -> str | None:
        return self.chain.closing if self.chain is not None else None

    @property
    def has_requests(self) -> bool:
        return self.chain is not None and self.chain.has_requests

    def take_thread_jobs(self) -> list[Any]:
        return self.chain.take_thread_jobs() if self.chain is not None else _NO_JOBS

    def on_thread_done(self, job: Any) -> Output:
        return self.chain.on_thread_done(job) if self.chain is not None else Output()

    # -- deciding -------------------------------------------------------------------

    def _decide(self, hello: ClientHello | None, why: str) -> Output:
        """Build the real chain with what is known now; start it; feed it the held bytes."""
        self.decided = True
        self.why = why
        if hello is not None:
            original = self.info
            self.info = dataclasses.replace(original, sni=hello.sni, alpn=hello.alpn)
            # The flow's record shares the original: the log, metrics and `tproxy flows`
            # show the name too (FlowInfo is frozen for interceptors, not for the engine).
            object.__setattr__(original, "sni", hello.sni)
            object.__setattr__(original, "alpn", hello.alpn)
        held = bytes(self._held)
        self._held.clear()
        log.debug(
            "flow %d: peeked %d bytes (%s, sni=%s)", self.info.id, len(held), why, self.info.sni
        )
        try:
            chain = self._build(self.info)
        except Exception as exc:
            log.error("flow %d: an interceptor failed to start", self.info.id, exc_info=exc)
            raise AbortFlow(f"interceptor init: {exc!r}") from exc
        if chain is not None and not chain.interceptors:
            chain = None
        if chain is None:
            return Output(to_server=held)
        self.chain = chain
        if self._clock is not None:
            chain.set_clock(self._clock)
        out = chain.start()
        if held:
            _add(out, chain.client_data(held))
        return out


def _add(out: Output, more: Output) -> None:
    out.to_server += more.to_server
    out.to_client += more.to_client

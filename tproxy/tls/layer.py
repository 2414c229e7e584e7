"""The TLS interception layer: a chain-like that decrypts a flow for the chain inside it.

:class:`TlsLayer` has the interface of :class:`tproxy.interceptor.Chain`
(``start``, ``client_data``, ``server_data``, ``client_eof``, ``server_eof``
-> :class:`~tproxy.interceptor.Output`, ``end``, ``passthrough``), plus the
optional chain timers ``next_deadline`` / ``on_timer``, so any relay shell
drives it like a chain. It is sans-io: two ``ssl.SSLObject`` over memory
BIOs, one toward the server, one toward the client; bytes in, bytes out.

One flow goes like this:

1. *Sniff*: the client's first bytes are held until
   :func:`tproxy.tls.parse_client_hello` answers. Not TLS: the held bytes go
   to the inner chain and the layer steps aside. An SNI matching
   ``--tls-ignore``, a hello that ``--tls-when`` does not select, or a
   (client, SNI) that rejected a forged certificate recently: the held bytes
   go to the server unchanged and the whole flow is passthrough
   (byte-identical ciphertext). The inner chain may be given as a builder
   (``wrap(build, info)``): it is then built here, with ``flow.sni`` and
   ``flow.alpn`` from the hello, so ``--when sni=...`` selects interceptors.
2. *Upstream handshake*, first: offering the client's SNI (or the
   destination's name) and ALPN list (``http1``: only ``http/1.1`` when the
   client offered it), verifying the server's certificate.
3. *Client handshake*: the held ClientHello is fed to a server-side
   ``SSLObject`` whose context presents a leaf with the upstream
   certificate's names and exactly the ALPN protocol the upstream chose.
4. *Open*: client ciphertext -> plaintext -> inner chain -> re-encrypted
   toward the server, and back. ``abort`` in the inner chain sends what it
   injected for the client, then close_notify.

A failure ends only its flow, with one log line (:class:`AbortFlow`).
"""

from __future__ import annotations

import logging
import re
import ssl
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import Any, NoReturn

from cryptography import x509

from ..flow import FlowInfo
from ..interceptor import AbortFlow, Chain, Output
from ..selection import Selection, parse_selection
from .certs import LeafForge, names_of
from .clienthello import ClientHello, NeedMore, NotTLS, parse_client_hello
from .info import TlsInfo

log = logging.getLogger("tproxy.tls")

HELLO_LIMIT = 16 * 1024 + 5
"""The most ClientHello bytes held: a 16 KiB hello, one record header."""
HOLD_LIMIT = 64 * 1024
"""The most client bytes held while the upstream handshake runs."""
READ_CHUNK = 256 * 1024
HANDSHAKE = 0x16

# TLS alert descriptions (RFC 8446 §6)
ALERT_HANDSHAKE_FAILURE = 40
ALERT_BAD_CERTIFICATE = 42

_REJECTIONS = frozenset(
    {
        "TLSV1_ALERT_UNKNOWN_CA",
        "SSLV3_ALERT_BAD_CERTIFICATE",
        "SSLV3_ALERT_CERTIFICATE_UNKNOWN",
        "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE",
        "SSLV3_ALERT_CERTIFICATE_EXPIRED",
        "TLSV1_ALERT_ACCESS_DENIED",
        "TLSV1_ALERT_DECRYPT_ERROR",
    }
)
"""Alerts (as OpenSSL names them) by which a client says it does not trust the leaf."""


def alert_record(description: int) -> bytes:
    """A fatal TLS alert in a plaintext record, for a client whose handshake never began."""
    return bytes([21, 3, 3, 0, 2, 2, description])


class _State(Enum):
    SNIFF = "sniff"
    UPSTREAM = "upstream-handshake"
    CLIENT = "client-handshake"
    OPEN = "open"
    DELEGATE = "not-tls"
    IGNORED = "passthrough"


@dataclass
class TlsSettings:
    """Options of ``tproxy run --tls intercept`` (see :mod:`tproxy.tls.options`)."""

    ignore: Sequence[str] = ()
    """SNI regexes (``re.search``) of flows passed through untouched."""
    upstream_verify: bool = True
    upstream_ca: Path | None = None
    """Trust these CAs upstream instead of the system store."""
    alpn: str = "http1"
    """``http1``: only ``http/1.1`` when the client offers it; ``mirror``: the client's list."""
    learn: float = 600.0
    """Seconds a (client, SNI) that rejected a forged leaf is passed through."""
    keylog: str | None = None
    handshake_timeout: float = 10.0
    """Seconds from the first ClientHello byte to both handshakes done."""
    clock: Callable[[], float] | None = None
    """The time source of deadlines; ``None``: trio's clock (the relay's timers)."""
    cache_size: int = 1024
    when: Sequence[str] = ()
    """``--tls-when`` expressions (OR; :mod:`tproxy.selection` grammar): only TLS flows
    they select are intercepted, the others pass untouched; none: every TLS flow."""
    patterns: list[re.Pattern[str]] = field(init=False, default_factory=list)
    selection: Selection = field(init=False, default_factory=Selection)

    def __post_init__(self) -> None:
        if self.alpn not in ("http1", "mirror"):
            raise ValueError(f"--tls-alpn must be http1 or mirror, not {self.alpn!r}")
        if self.learn < 0:
            raise ValueError("--tls-learn must not be negative")
        if self.handshake_timeout <= 0:
            raise ValueError("--tls-handshake-timeout must be positive")
        for text in self.ignore:
            try:
                self.patterns.append(re.compile(text))
            except re.error as exc:
                raise ValueError(f"--tls-ignore {text!r}: {exc}") from None
        self.selection = parse_selection(self.when, "--tls-when")  # SelectionError: ValueError


class TlsInterception:
    """Process-wide state of TLS interception: the forge, upstream contexts, what was learnt.

    :meth:`wrap` puts a :class:`TlsLayer` around one flow's chain.
    """

    def __init__(self, settings: TlsSettings, forge: LeafForge) -> None:
        self.settings = settings
        self.forge = forge
        self._upstream: OrderedDict[tuple[str, ...], ssl.SSLContext] = OrderedDict()
        self.learned: dict[tuple[str, str], float] = {}
        """(client IP, server name) -> until when it is passed through."""
        if settings.clock is None:
            import trio

            self.clock: Callable[[], float] = trio.current_time
        else:
            self.clock = settings.clock

    def wrap(self, chain: Chain | ChainBuilder | None, info: FlowInfo) -> TlsLayer:
        """The flow's chain inside a TLS layer (a flow with no interceptors gets one too).

        ``chain`` may be a builder, called with the flow's metadata once the layer
        knows whether the flow is TLS and, if so, its SNI and ALPN (``None`` from it:
        no interceptor selects the flow)."""
        if chain is None:
            chain = Chain([])
        return TlsLayer(self, chain, info)

    # -- upstream ----------------------------------------------------------

    def upstream_context(self, alpn: tuple[str, ...]) -> ssl.SSLContext:
        """A client context offering ``alpn``, cached per list (stdlib sets ALPN per context)."""
        ctx = self._upstream.get(alpn)
        if ctx is not None:
            self._upstream.move_to_end(alpn)
            return ctx
        s = self.settings
        if s.upstream_ca is not None:
            ctx = ssl.create_default_context(cafile=str(s.upstream_ca))
        else:
            ctx = ssl.create_default_context()
        if not s.upstream_verify:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        if alpn:
            ctx.set_alpn_protocols(list(alpn))
        if s.keylog:
            ctx.keylog_filename = s.keylog
        self._upstream[alpn] = ctx
        if len(self._upstream) > 64:
            self._upstream.popitem(last=False)
        return ctx

    def offer_upstream(self, client_alpn: tuple[str, ...]) -> tuple[str, ...]:
        """What to offer the server: in ``http1`` mode only ``http/1.1`` if the client can."""
        if self.settings.alpn == "http1" and "http/1.1" in client_alpn:
            return ("http/1.1",)
        return client_alpn

    # -- passthrough decisions ----------------------------------------------

    def ignored(self, name: str) -> bool:
        return any(p.search(name) for p in self.settings.patterns)

    def is_learned(self, client: str, name: str) -> bool:
        until = self.learned.get((client, name))
        if until is None:
            return False
        if self.clock() < until:
            return True
        del self.learned[(client, name)]
        return False

    def learn(self, client: str, name: str, why: str) -> None:
        """Pass (client, name) through for ``--tls-learn`` seconds; log it once."""
        if self.settings.learn <= 0:
            return
        if len(self.learned) > 100_000:  # bounded: forget the expired ones
            now = self.clock()
            self.learned = {k: v for k, v in self.learned.items() if v > now}
        fresh = (client, name) not in self.learned
        self.learned[(client, name)] = self.clock() + self.settings.learn
        if fresh:
            log.warning(
                "tls: client %s rejected the forged certificate for %s (%s): "
                "its flows to %s pass through untouched for %gs",
                client,
                name,
                why,
                name,
                self.settings.learn,
            )


ChainBuilder = Callable[[FlowInfo], Chain | None]
"""Builds a flow's chain from its metadata (``tproxy.engine.Engine`` selects by it)."""


class TlsLayer:
    """A flow's chain behind TLS interception; drivable as a :class:`Chain` (see module doc)."""

    def __init__(self, tls: TlsInterception, inner: Chain | ChainBuilder, info: FlowInfo) -> None:
        self.tls = tls
        self._builder: ChainBuilder | None = None
        if isinstance(inner, Chain):
            self.inner = inner
        else:  # built once the hello is read (or the flow is known not to be TLS)
            self._builder = inner
            self.inner = Chain([])
        self._relay_clock: Callable[[], float] | None = None
        self.info = info
        self.state = _State.SNIFF
        self._held = bytearray()
        self._start_out = Output()
        self._deadline: float | None = None
        self._clock: Callable[[], float] = tls.clock
        self._quiet_since = self._clock()
        self.meta: TlsInfo | None = None
        self._up: ssl.SSLObject | None = None
        self._up_in = ssl.MemoryBIO()
        self._up_out = ssl.MemoryBIO()
        self._down: ssl.SSLObject | None = None
        self._down_in = ssl.MemoryBIO()
        self._down_out = ssl.MemoryBIO()
        self._name = info.destination[0]
        self._client_ended = False  # the inner chain got client_eof
        self._server_ended = False
        self._client_notified = False  # close_notify came from that side
        self._server_notified = False
        self._up_shut = False  # we sent close_notify that way
        self._down_shut = False

    # -- the Chain interface ---------------------------------------------------

    @property
    def passthrough(self) -> bool:
        """True once nothing more needs the layer: an untouched flow, or a non-TLS
        flow whose inner chain is passthrough."""
        if self.state is _State.IGNORED:
            return True
        if self.state is _State.DELEGATE:
            return self.inner.passthrough
        return False

    def start(self) -> Output:
        """Start the inner chain (a built one; a builder's chain starts once built);
        what it injects waits until the flow is known to be TLS (then it is
        encrypted) or not."""
        if self._builder is None:
            self._start_out = self.inner.start()
        return Output()

    def _build_inner(self, info: FlowInfo) -> None:
        """Build and start the inner chain from the builder, with what the layer knows."""
        build, self._builder = self._builder, None
        if build is None:
            return
        try:
            chain = build(info)
        except Exception as exc:
            log.error("flow %d: an interceptor failed to start", info.id, exc_info=exc)
            raise AbortFlow(f"interceptor init: {exc!r}") from exc
        if chain is None:
            return  # the empty chain stays
        self.inner = chain
        if self._relay_clock is not None:
            chain.set_clock(self._relay_clock)
        self._start_out = chain.start()

    def client_data(self, data: bytes) -> Output:
        state = self.state
        if state is _State.OPEN:
            self._down_in.write(data)
            return self._pump(Output())
        if state is _State.DELEGATE:
            return self.inner.client_data(data)
        if state is _State.IGNORED:
            return Output(to_server=data)
        if state is _State.SNIFF:
            if self._deadline is None:
                self._deadline = self._clock() + self.tls.settings.handshake_timeout
            self._held += data
            return self._sniff()
        if state is _State.UPSTREAM:
            self._held += data
            if len(self._held) > HOLD_LIMIT:
                self._fail("client sent over 64 KiB before the upstream handshake finished")
            return Output()
        # CLIENT
        self._down_in.write(data)
        return self._client_handshake(Output())

    def server_data(self, data: bytes) -> Output:
        state = self.state
        if state is _State.OPEN:
            self._up_in.write(data)
            return self._pump(Output())
        if state is _State.DELEGATE:
            return self.inner.server_data(data)
        if state is _State.IGNORED:
            return Output(to_client=data)
        if state is _State.SNIFF:
            # The server spoke first: not TLS (a TLS client always speaks first).
            out = self._delegate("server spoke first")
            _add(out, self.inner.server_data(data))
            return out
        self._up_in.write(data)
        if state is _State.UPSTREAM:
            return self._upstream_handshake(Output())
        return Output()  # CLIENT: read once the client's handshake is done

    def client_eof(self) -> Output:
        state = self.state
        if state is _State.OPEN:
            out = Output()
            self._end_client(out)
            return out
        if state is _State.DELEGATE:
            return self.inner.client_eof()
        if state is _State.IGNORED:
            return Output()
        if state is _State.SNIFF:
            if self._held and self._held[0] == HANDSHAKE:
                self._fail(f"client closed after {len(self._held)} bytes of a ClientHello")
            out = self._delegate("client closed")
            _add(out, self.inner.client_eof())
            return out
        if state is _State.CLIENT:
            self._rejected("it closed during the handshake")
        self._fail("client closed during the upstream handshake")

    def server_eof(self) -> Output:
        state = self.state
        if state is _State.OPEN:
            out = Output()
            self._end_server(out)
            return out
        if state is _State.DELEGATE:
            return self.inner.server_eof()
        if state is _State.IGNORED:
            return Output()
        if state is _State.SNIFF:
            out = self._delegate("server closed")
            _add(out, self.inner.server_eof())
            return out
        self._fail(
            "server closed during the upstream handshake"
            if state is _State.UPSTREAM
            else "server closed before the client's handshake finished",
            alert=ALERT_HANDSHAKE_FAILURE,
        )

    def end(self, reason: str) -> None:
        self.inner.end(reason)

    # -- chain timers (optional members of the Chain interface) ----------------------

    def set_clock(self, clock: Callable[[], float]) -> None:
        """Take the relay's clock for the handshake deadline and pass it to the inner
        chain, whose interceptors' timers run on it too."""
        self._clock = clock
        self._relay_clock = clock
        self._quiet_since = clock()
        self.inner.set_clock(clock)

    def _plain(self) -> bool:
        """Whether the inner chain's own holds and requests apply to the flow's bytes."""
        return self.state is _State.OPEN or self.state is _State.DELEGATE

    @property
    def holds_client_reading(self) -> bool:
        return self._plain() and self.inner.holds_client_reading

    @property
    def holds_server_reading(self) -> bool:
        return self._plain() and self.inner.holds_server_reading

    @property
    def holds_client_eof(self) -> bool:
        return self._plain() and self.inner.holds_client_eof

    @property
    def holds_server_eof(self) -> bool:
        return self._plain() and self.inner.holds_server_eof

    @property
    def closing(self) -> str | None:
        return self.inner.closing if self._plain() else None

    @property
    def has_requests(self) -> bool:
        return self._plain() and self.inner.has_requests

    def take_thread_jobs(self) -> list[Any]:
        return self.inner.take_thread_jobs() if self._plain() else []

    def on_thread_done(self, job: Any) -> Output:
        """A thread job of an inner interceptor is back: its output, encrypted if need be."""
        return self._outside_hook("on_thread_done", job)

    def _outside_hook(self, member: str, arg: Any) -> Output:
        """Call an inner member that makes output outside a data hook (a timer, a thread
        job's callback); in an intercepted flow the output is encrypted, and an abort
        gets its reply encrypted, then close_notify."""
        if self.state is _State.OPEN:
            out = Output()
            self._encrypt(self._inner(member, arg, out), out)
            return out
        return getattr(self.inner, member)(arg)  # type: ignore[no-any-return]

    def _own_deadline(self) -> float | None:
        """When a handshake under way times out; None once both handshakes are done (or
        the flow is not intercepted). Before the client's first byte it is a check that
        only moves on: a flow nobody speaks on is not a stalled handshake."""
        if self.state in (_State.SNIFF, _State.UPSTREAM, _State.CLIENT):
            if self._deadline is None:
                return self._quiet_since + self.tls.settings.handshake_timeout
            return self._deadline
        return None

    def next_deadline(self) -> float | None:
        """The earlier of the handshake deadline and the inner chain's next timer."""
        own = self._own_deadline()
        inner = self.inner.next_deadline() if self._plain() else None
        if own is None or inner is None:
            return own if inner is None else inner
        return min(own, inner)

    def on_timer(self, now: float) -> Output:
        if self._plain():
            return self._outside_hook("on_timer", now)
        deadline = self._own_deadline()
        if deadline is None or now < deadline:
            return Output()
        if self._deadline is None:  # still quiet: check again later
            self._quiet_since = now
            return Output()
        timeout = self.tls.settings.handshake_timeout
        if self.state is _State.UPSTREAM:
            self._fail(
                f"the server did not finish its handshake in {timeout:g}s",
                alert=ALERT_HANDSHAKE_FAILURE,
            )
        self._fail(f"client stalled in the TLS handshake for {timeout:g}s ({self.state.value})")

    # -- sniffing ----------------------------------------------------------------

    def _sniff(self) -> Output:
        result = parse_client_hello(self._held)
        if isinstance(result, NeedMore):
            if result.at_least > HELLO_LIMIT:
                self._fail(f"ClientHello larger than 16 KiB ({result.at_least} bytes needed)")
            return Output()
        if isinstance(result, NotTLS):
            if self._held[0] == HANDSHAKE:
                self._fail(f"broken ClientHello: {result.reason}")
            out = self._delegate(result.reason)
            held = bytes(self._held)
            self._held.clear()
            _add(out, self.inner.client_data(held))
            return out
        return self._hello(result)

    def _delegate(self, why: str) -> Output:
        """Not a TLS flow: the inner chain sees the bytes as they are from now on."""
        log.debug("flow %d: tls: not TLS (%s)", self.info.id, why)
        self.state = _State.DELEGATE
        self._build_inner(self.info)
        out, self._start_out = self._start_out, Output()
        return out

    def _hello(self, hello: ClientHello) -> Output:
        info = self.info
        name = hello.sni or info.destination[0]
        meta = TlsInfo(sni=hello.sni, client_alpn=hello.alpn)
        self.meta = meta
        _set_flow_tls(info, meta)
        selected = replace(info, sni=hello.sni, alpn=hello.alpn)
        object.__setattr__(info, "sni", hello.sni)  # for the flow's log line, as tls
        object.__setattr__(info, "alpn", hello.alpn)
        reason = None
        if self.tls.ignored(name):
            reason = "--tls-ignore"
        elif not self.tls.settings.selection.matches(selected):
            reason = "not selected by --tls-when"
        elif self.tls.is_learned(info.client[0], name):
            reason = "client rejected a forged certificate recently"
        if reason is not None:
            meta.passthrough_reason = reason
            log.debug("flow %d: tls: %s passes through (%s)", info.id, name, reason)
            self.state = _State.IGNORED
            if self._start_out:
                log.debug("flow %d: tls: dropped what interceptors injected at start", info.id)
            held = bytes(self._held)
            self._held.clear()
            return Output(to_server=held)
        self._name = name
        self._build_inner(selected)
        ctx = self.tls.upstream_context(self.tls.offer_upstream(hello.alpn))
        try:
            self._up = ctx.wrap_bio(self._up_in, self._up_out, server_hostname=name)
        except (ValueError, UnicodeError) as exc:
            self._fail(f"cannot use server name {name!r}: {exc}")
        self.state = _State.UPSTREAM
        return self._upstream_handshake(Output())

    # -- handshakes ----------------------------------------------------------------

    def _upstream_handshake(self, out: Output) -> Output:
        up = self._up
        assert up is not None
        try:
            up.do_handshake()
        except ssl.SSLWantReadError:
            _flush(self._up_out, out, server=True)
            return out
        except ssl.SSLCertVerificationError as exc:
            self._fail(
                f"upstream certificate of {self._name} rejected: {exc.verify_message}",
                alert=ALERT_BAD_CERTIFICATE,
            )
        except ssl.SSLError as exc:
            self._fail(
                f"upstream handshake with {self._name} failed: {exc.reason or exc}",
                alert=ALERT_HANDSHAKE_FAILURE,
            )
        _flush(self._up_out, out, server=True)
        return self._begin_client(out)

    def _begin_client(self, out: Output) -> Output:
        up = self._up
        assert up is not None and self.meta is not None
        meta = self.meta
        der = up.getpeercert(binary_form=True)
        names: list[str] = []
        if der:
            try:
                cert = x509.load_der_x509_certificate(der)
                names = names_of(cert)
                meta.upstream_subject = cert.subject.rfc4514_string()
                meta.upstream_issuer = cert.issuer.rfc4514_string()
            except ValueError as exc:
                log.debug("flow %d: tls: unreadable upstream certificate: %s", self.info.id, exc)
        if not names:
            names = [self._name]
        meta.names = tuple(names)
        meta.upstream_version = up.version()
        cipher = up.cipher()
        meta.upstream_cipher = cipher[0] if cipher else None
        chosen = up.selected_alpn_protocol()
        try:
            ctx = self.tls.forge.context(names, chosen)
        except (ValueError, ssl.SSLError) as exc:
            self._fail(f"cannot forge a certificate for {names}: {exc}")
        self._down = ctx.wrap_bio(self._down_in, self._down_out, server_side=True)
        self._down_in.write(bytes(self._held))
        self._held.clear()
        self.state = _State.CLIENT
        return self._client_handshake(out)

    def _client_handshake(self, out: Output) -> Output:
        down = self._down
        assert down is not None and self.meta is not None
        try:
            down.do_handshake()
        except ssl.SSLWantReadError:
            _flush(self._down_out, out, server=False)
            return out
        except ssl.SSLError as exc:
            reason = exc.reason or str(exc)
            if reason in _REJECTIONS:
                self._rejected(f"alert {reason}")
            self._fail(f"client handshake failed: {reason}")
        _flush(self._down_out, out, server=False)
        meta = self.meta
        meta.alpn = down.selected_alpn_protocol()
        meta.version = down.version()
        cipher = down.cipher()
        meta.cipher = cipher[0] if cipher else None
        meta.intercepted = True
        self.state = _State.OPEN
        log.debug(
            "flow %d: tls: intercepting %s (%s, %s, alpn=%s)",
            self.info.id,
            self._name,
            meta.version,
            meta.cipher,
            meta.alpn,
        )
        start, self._start_out = self._start_out, Output()
        self._encrypt(start, out)
        return self._pump(out)

    # -- the open flow -----------------------------------------------------------------

    def _pump(self, out: Output) -> Output:
        """Decrypt what both sides sent, run it through the inner chain, encrypt the result."""
        down, up = self._down, self._up
        assert down is not None and up is not None
        plain, closed = self._read(down, "client")
        if plain:
            self._encrypt(self._inner("client_data", plain, out), out)
        if closed:
            self._client_notified = True
            self._end_client(out)
        plain, closed = self._read(up, "server")
        if plain:
            self._encrypt(self._inner("server_data", plain, out), out)
        if closed:
            self._server_notified = True
            self._end_server(out)
        _flush(self._down_out, out, server=False)
        _flush(self._up_out, out, server=True)
        return out

    def _end_client(self, out: Output) -> None:
        """The client ended (close_notify or FIN): flush the inner chain, then close_notify
        upstream only if the client sent one (a truncation stays a truncation)."""
        if self._client_ended:
            return
        self._client_ended = True
        self._encrypt(self._inner("client_eof", None, out), out)
        if self._client_notified and not self._up_shut:
            assert self._up is not None
            self._up_shut = True
            _shutdown(self._up)
            _flush(self._up_out, out, server=True)

    def _end_server(self, out: Output) -> None:
        if self._server_ended:
            return
        self._server_ended = True
        self._encrypt(self._inner("server_eof", None, out), out)
        if self._server_notified and not self._down_shut:
            assert self._down is not None
            self._down_shut = True
            _shutdown(self._down)
            _flush(self._down_out, out, server=False)

    def _read(self, obj: ssl.SSLObject, side: str) -> tuple[bytes, bool]:
        """All plaintext ``obj`` can give now, and whether the peer sent close_notify."""
        chunks: list[bytes] = []
        closed = False
        while True:
            try:
                chunk = obj.read(READ_CHUNK)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                closed = True
                break
            except ssl.SSLError as exc:
                self._fail(f"TLS error from the {side}: {exc.reason or exc}")
            if not chunk:
                closed = True
                break
            chunks.append(chunk)
        return b"".join(chunks), closed

    def _inner(self, hook: str, data: Any, out: Output) -> Output:
        """Call the inner chain; an abort gets its reply encrypted, then close_notify."""
        try:
            if data is None:
                return getattr(self.inner, hook)()  # type: ignore[no-any-return]
            return getattr(self.inner, hook)(data)  # type: ignore[no-any-return]
        except AbortFlow as exc:
            down = self._down
            assert down is not None
            if not self._down_shut:
                if exc.to_client:
                    down.write(exc.to_client)
                self._down_shut = True
                _shutdown(down)
            _flush(self._down_out, out, server=False)
            exc.to_client = out.to_client
            raise

    def _encrypt(self, plain: Output, out: Output) -> None:
        down, up = self._down, self._up
        assert down is not None and up is not None
        if plain.to_client:
            if self._down_shut:
                self._dropped(len(plain.to_client), "client")
            else:
                down.write(plain.to_client)
                _flush(self._down_out, out, server=False)
        if plain.to_server:
            if self._up_shut:
                self._dropped(len(plain.to_server), "server")
            else:
                up.write(plain.to_server)
                _flush(self._up_out, out, server=True)

    def _dropped(self, n: int, side: str) -> None:
        log.warning(
            "flow %d: tls: dropped %d bytes for the %s, which was sent close_notify",
            self.info.id,
            n,
            side,
        )

    # -- failures ----------------------------------------------------------------------

    def _rejected(self, why: str) -> NoReturn:
        """The client refused the forged leaf: learn passthrough, end this flow."""
        self.tls.learn(self.info.client[0], self._name, why)
        raise AbortFlow(f"tls: client rejected the forged certificate ({why})")

    def _fail(self, reason: str, *, alert: int | None = None) -> NoReturn:
        """End this flow: one log line, a fatal alert to a client still waiting for its
        ServerHello, then the relay resets."""
        log.warning("flow %d: tls: %s (client %s)", self.info.id, reason, self.info.client[0])
        exc = AbortFlow(f"tls: {reason}")
        if alert is not None and self.state in (_State.SNIFF, _State.UPSTREAM):
            exc.to_client = alert_record(alert)
        raise exc


def _flush(bio: ssl.MemoryBIO, out: Output, *, server: bool) -> None:
    if bio.pending:
        data = bio.read()
        if server:
            out.to_server += data
        else:
            out.to_client += data


def _add(out: Output, more: Output) -> None:
    out.to_server += more.to_server
    out.to_client += more.to_client


def _shutdown(obj: ssl.SSLObject) -> None:
    """Queue our close_notify (the answer, if any, is not waited for)."""
    try:
        obj.unwrap()
    except (ssl.SSLWantReadError, ssl.SSLZeroReturnError, ssl.SSLError):
        pass


def _set_flow_tls(info: FlowInfo, meta: TlsInfo | None) -> None:
    """``FlowInfo`` is frozen for interceptors; the layer alone fills in ``tls``."""
    object.__setattr__(info, "tls", meta)

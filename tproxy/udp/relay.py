"""The UDP relay: sessions per (client, original destination) between diverted datagrams.

A datagram diverted to a UDP listener names its client (the source) and,
in ancillary data, the destination the client sent it to. The pair is a
*session*: the first datagram opens it, with

- a session socket bound to the client's address (``--source``) and
  connected to the destination, which carries the client's datagrams out
  and receives the server's answers (only those whose source is the
  destination are taken: see :func:`tproxy.udp.sockets.session_socket`);
- a reply socket bound to the destination, shared by every session with
  that destination and closed with the last of them, which sends the
  answers to the client from the address the client asked;
- the interceptors that the factories select for it, driven through a
  :class:`~tproxy.udp.chain.DatagramChain`.

A session ends when nothing passed either way for ``idle`` seconds
(``idle``), when the session cap evicts it as the least recently used one
(``evicted``), when an interceptor aborts or fails (``interceptor-abort``,
``error``), or at shutdown (``shutdown``). Each is logged with the flow
log's ``flow N open`` / ``flow N end`` lines, mode ``transparent-udp``, byte
counts in payload bytes; sessions are not counted in ``--max-flows`` (they
have their own cap, which evicts instead of refusing).

Everything but waiting is synchronous: sends are non-blocking and a
datagram that does not fit a full socket buffer is dropped, as the network
would drop it. Listeners, session sockets and reply sockets sit in one
epoll set of the relay's own, which a single task waits on through trio
(an epoll descriptor is readable while any of its sockets is): a session
costs one ``epoll_ctl`` and no task. One more task expires idle sessions.
"""

from __future__ import annotations

import errno
import functools
import ipaddress
import logging
import resource
import select
import socket
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import trio

from ..flow import Address, EndReason, FlowInfo, FlowRecord, format_address
from ..interceptor import AbortFlow, Interceptor, InterceptorError
from ..logformat import log_flow
from ..sockets import SourcePolicy
from .chain import DatagramChain
from .sockets import ANCILLARY_SPACE, MAX_DATAGRAM, original_destination, reply_socket
from .sockets import session_socket as open_session_socket

log = logging.getLogger("tproxy.udp")
flow_log = logging.getLogger("tproxy.flow")

MODE = "transparent-udp"
DEFAULT_IDLE = 60.0
DEFAULT_MAX_SESSIONS = 16384
BATCH = 64
"""Datagrams read from one socket before other tasks get a turn."""
_OUT_OF_DESCRIPTORS = {errno.EMFILE, errno.ENFILE}

SessionKey = tuple[Address, Address]


@dataclass(frozen=True)
class UdpConfig:
    """Settings of the UDP relay, checked here."""

    idle: float = DEFAULT_IDLE
    max_sessions: int = DEFAULT_MAX_SESSIONS
    source_policy: SourcePolicy = SourcePolicy.CLIENT_PORT
    mark: int | None = None

    def __post_init__(self) -> None:
        if not self.idle > 0:
            raise ValueError("UDP idle timeout must be positive")
        if self.max_sessions < 1:
            raise ValueError("UDP session cap must be at least 1")


@dataclass(eq=False)
class Session:
    """One (client, original destination) pair and what serves it."""

    key: SessionKey
    record: FlowRecord
    sock: socket.socket
    chain: DatagramChain | None
    last: float
    reply: socket.socket | None = None
    reply_failed: bool = False
    """The reply socket could not be opened (warned once; later answers are dropped)."""
    ended: bool = False

    @property
    def client(self) -> Address:
        return self.key[0]

    @property
    def destination(self) -> Address:
        return self.key[1]


@dataclass(eq=False)
class _Reply:
    sock: socket.socket
    users: int = 0


class UdpRelay:
    """All UDP sessions of the process, fed by any number of listeners.

    ``engine`` provides flow ids, the interceptor factories and the flow
    total; the relay keeps its own session table (not ``engine.live``) and puts each
    session's record in ``engine.udp_live`` and how to end it in ``engine.kills``, for
    ``tproxy flows`` and ``--kill``.
    """

    def __init__(
        self,
        engine: Any,
        config: UdpConfig,
        *,
        open_reply: Callable[[Address, int | None], socket.socket] = reply_socket,
    ) -> None:
        self.engine = engine
        self.config = config
        self._open_reply = open_reply
        """Makes the reply socket of a destination (replaceable in unprivileged tests)."""
        self.sessions: OrderedDict[SessionKey, Session] = OrderedDict()
        """Live sessions, least recently active first."""
        self.replies: dict[Address, _Reply] = {}
        self.evicted = 0
        self._poll: select.epoll | None = None
        self._readers: dict[int, Callable[[], None]] = {}
        """What to call when a descriptor in the epoll set is readable."""
        self._wake = trio.Event()

    # -- running --------------------------------------------------------------

    async def run(
        self,
        listeners: Sequence[socket.socket],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve the listeners until cancelled; then end every session (``shutdown``)."""
        self._poll = select.epoll()
        try:
            for sock in listeners:
                self._watch(sock, functools.partial(self._on_listener, sock, _local(sock)))
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._expire)
                nursery.start_soon(self._dispatch)
                task_status.started()
        finally:
            for session in list(self.sessions.values()):
                self._end(session, EndReason.SHUTDOWN, "cancelled")
            for reply in self.replies.values():
                reply.sock.close()
            self.replies.clear()
            self._readers.clear()
            poll, self._poll = self._poll, None
            poll.close()

    def _watch(self, sock: socket.socket, reader: Callable[[], None]) -> None:
        assert self._poll is not None
        fd = sock.fileno()
        self._poll.register(fd, select.EPOLLIN)
        self._readers[fd] = reader

    def _unwatch(self, sock: socket.socket) -> None:
        fd = sock.fileno()
        if self._readers.pop(fd, None) is not None and self._poll is not None:
            self._poll.unregister(fd)

    async def _dispatch(self) -> None:
        """Wait for the epoll set; call the reader of every ready descriptor.

        Level-triggered: a reader takes at most ``BATCH`` datagrams, and
        what it leaves makes its descriptor ready again at the next round.
        A descriptor closed (and its number reused) during a round gets a
        call for nothing: readers only do non-blocking reads.
        """
        poll = self._poll
        assert poll is not None
        while True:
            await trio.lowlevel.wait_readable(poll.fileno())
            for fd, _events in poll.poll(0, 1024):
                reader = self._readers.get(fd)
                if reader is None:
                    continue
                try:
                    reader()
                except Exception:
                    # a bug, not a peer: keep serving the other sessions
                    log.exception("udp: reading descriptor %d failed", fd)
            await trio.lowlevel.checkpoint()

    def _on_listener(self, sock: socket.socket, own: Address) -> None:
        for _ in range(BATCH):
            try:
                data, ancdata, _flags, source = sock.recvmsg(MAX_DATAGRAM, ANCILLARY_SPACE)
            except BlockingIOError:
                return
            except OSError as exc:
                log.debug("udp: receive on %s failed: %s", format_address(own), exc)
                continue
            destination = original_destination(ancdata)
            if destination is None or _is_self(destination, own):
                # Sent straight to the listener, not diverted: a session
                # toward the listener would feed it its own datagrams.
                log.debug("udp: dropped a datagram from %s sent to the proxy itself", source[:2])
                continue
            self.from_client((source[0], source[1]), destination, data)

    async def _expire(self) -> None:
        """End sessions idle for ``idle`` seconds, oldest first, when they are due."""
        idle = self.config.idle
        while True:
            now = trio.current_time()
            while self.sessions:
                oldest = next(iter(self.sessions.values()))
                if oldest.last + idle > now:
                    break
                self._end(oldest, EndReason.IDLE, f"idle for {idle:g}s")
            if self.sessions:
                await trio.sleep_until(next(iter(self.sessions.values())).last + idle)
            else:
                self._wake = trio.Event()
                await self._wake.wait()

    # -- datagrams ----------------------------------------------------------------

    def from_client(self, client: Address, destination: Address, data: bytes) -> None:
        """A datagram the client sent to ``destination``: open or find its session, relay it."""
        key = (client, destination)
        session = self.sessions.get(key)
        if session is None:
            session = self._open(client, destination)
            if session is None or session.ended:
                return
        else:
            self.sessions.move_to_end(key)
        session.last = trio.current_time()
        session.record.bytes_up += len(data)
        if session.chain is None:
            self._send_server(session, data)
        else:
            self._run_chain(session, "client_datagram", data)

    def from_server(self, session: Session, data: bytes) -> None:
        """A datagram the destination sent back on the session socket."""
        if session.ended:
            return
        self.sessions.move_to_end(session.key)
        session.last = trio.current_time()
        session.record.bytes_down += len(data)
        if session.chain is None:
            self._send_client(session, data)
        else:
            self._run_chain(session, "server_datagram", data)

    def _run_chain(self, session: Session, method: str, *args: bytes) -> None:
        chain = session.chain
        assert chain is not None
        try:
            out = getattr(chain, method)(*args)
        except AbortFlow as exc:
            self._end(session, EndReason.INTERCEPTOR_ABORT, exc.reason)
            return
        except InterceptorError as exc:
            log.error("flow %d: %s", session.record.info.id, exc, exc_info=exc.error)
            self._end(session, EndReason.ERROR, str(exc))
            return
        for data in out.to_server:
            self._send_server(session, data)
        for data in out.to_client:
            self._send_client(session, data)
        if chain.passthrough:
            session.chain = None  # nobody watches any more: relay without calls

    def _send_server(self, session: Session, data: bytes) -> None:
        try:
            session.sock.send(data)
        except OSError as exc:
            # A full buffer (EAGAIN) or an ICMP error of an earlier datagram: UDP drops.
            log.debug("flow %d: datagram to the server dropped: %s", session.record.info.id, exc)

    def _send_client(self, session: Session, data: bytes) -> None:
        sock = session.reply
        if sock is None:
            if session.reply_failed:
                return
            try:
                sock = session.reply = self._acquire_reply(session.destination)
            except OSError as exc:
                session.reply_failed = True
                log.warning(
                    "flow %d: cannot answer from %s (answers are dropped): %s",
                    session.record.info.id,
                    format_address(session.destination),
                    exc,
                )
                return
        try:
            sock.sendto(data, session.client)
        except OSError as exc:
            log.debug("flow %d: datagram to the client dropped: %s", session.record.info.id, exc)

    # -- sessions -------------------------------------------------------------------

    def _open(self, client: Address, destination: Address) -> Session | None:
        """Open the session of a first datagram; ``None`` (logged) when it cannot be."""
        if len(self.sessions) >= self.config.max_sessions:
            self._evict("session cap reached")
        info: FlowInfo = self.engine.new_flow(client, destination, MODE)
        try:
            sock = self._session_socket(destination, client)
        except OSError as exc:
            self.engine.reject(info, EndReason.CONNECT_FAILED, str(exc))
            return None
        try:
            interceptors, names = self._interceptors(info)
        except Exception as exc:
            log.error("flow %d: an interceptor failed to start", info.id, exc_info=exc)
            sock.close()
            self.engine.reject(info, EndReason.ERROR, f"interceptor init: {exc!r}")
            return None
        record = FlowRecord(info=info, started=time.monotonic())
        local = sock.getsockname()
        record.outgoing_source = (local[0], local[1])
        record.interceptors = names
        self.engine.total += 1
        for observer in self.engine.observers:  # metrics count sessions like TCP flows
            observer.flow_opened(record)
        log_flow(flow_log, "open", record)
        chain = DatagramChain(interceptors) if interceptors else None
        session = Session((client, destination), record, sock, chain, trio.current_time())
        self.sessions[session.key] = session
        self.engine.udp_live[info.id] = record  # listed and killed by tproxy flows
        self.engine.kills[info.id] = functools.partial(self._end, session, EndReason.SHUTDOWN)
        self._wake.set()
        self._watch(sock, functools.partial(self._on_session, session))
        if chain is not None:
            self._run_chain(session, "start")
        return session

    def _session_socket(self, destination: Address, client: Address) -> socket.socket:
        config = self.config
        try:
            return open_session_socket(destination, client, config.source_policy, config.mark)
        except OSError as exc:
            if exc.errno not in _OUT_OF_DESCRIPTORS or not self.sessions:
                raise
        # Out of descriptors: the least recently used session gives its own back.
        self._evict("out of file descriptors")
        return open_session_socket(destination, client, config.source_policy, config.mark)

    def _interceptors(self, info: FlowInfo) -> tuple[list[Interceptor], tuple[str, ...]]:
        """The session's interceptors, those whose factory selects it (``--when``), and
        their names as the flow record gives them (the engine's choice, as for TCP)."""
        factories = self.engine.select(info)
        return [factory(info) for factory in factories], self.engine.names(factories)

    def _evict(self, why: str) -> None:
        oldest = next(iter(self.sessions.values()))
        self.evicted += 1
        log.info(
            "udp: %s (%d sessions): evicting flow %d, the least recently used",
            why,
            len(self.sessions),
            oldest.record.info.id,
        )
        self._end(oldest, EndReason.EVICTED, why)

    def _end(self, session: Session, reason: EndReason, detail: str = "") -> None:
        """End a session now: close its socket, log its end line, tell its interceptors."""
        if session.ended:
            return
        session.ended = True
        if self.sessions.get(session.key) is session:
            del self.sessions[session.key]
        flow_id = session.record.info.id
        self.engine.udp_live.pop(flow_id, None)
        self.engine.kills.pop(flow_id, None)
        self._unwatch(session.sock)
        session.sock.close()
        if session.reply is not None:
            self._release_reply(session.destination)
            session.reply = None
        record = session.record
        record.end(reason, detail, now=time.monotonic())
        for observer in self.engine.observers:
            observer.flow_ended(record)
        log_flow(flow_log, "end", record)
        self._end_chain(session, str(reason))

    def _end_chain(self, session: Session, reason: str) -> None:
        chain = session.chain
        session.chain = None
        if chain is None:
            return
        try:
            chain.end(reason)
        except InterceptorError as exc:
            log.error("flow %d: %s", session.record.info.id, exc, exc_info=exc.error)

    def _on_session(self, session: Session) -> None:
        """Relay what the destination answered on the session socket."""
        sock = session.sock
        destination = session.destination
        for _ in range(BATCH):
            if session.ended:
                return
            try:
                data, source = sock.recvfrom(MAX_DATAGRAM)
            except BlockingIOError:
                return
            except OSError as exc:
                # ICMP errors (port unreachable...) of datagrams sent earlier
                log.debug("flow %d: %s", session.record.info.id, exc)
                continue
            if (source[0], source[1]) != destination:
                # queued between bind and connect: not this session's
                log.debug("flow %d: dropped a datagram from %s", session.record.info.id, source[:2])
                continue
            self.from_server(session, data)

    # -- reply sockets ------------------------------------------------------------------

    def _acquire_reply(self, destination: Address) -> socket.socket:
        reply = self.replies.get(destination)
        if reply is None:
            reply = _Reply(self._open_reply(destination, self.config.mark))
            self.replies[destination] = reply
            self._watch(reply.sock, functools.partial(self._on_reply, destination, reply))
        reply.users += 1
        return reply.sock

    def _release_reply(self, destination: Address) -> None:
        reply = self.replies.get(destination)
        if reply is None:
            return
        reply.users -= 1
        if reply.users <= 0:
            del self.replies[destination]
            self._unwatch(reply.sock)
            reply.sock.close()

    def _on_reply(self, destination: Address, reply: _Reply) -> None:
        """Datagrams that land on a reply socket are clients' datagrams to its destination.

        A firewall rule that marks packets of sockets we own (``-m socket``)
        on the client side would find the reply socket bound to the
        destination for the client's next datagrams, and the kernel would
        deliver them there instead of diverting them to the listener
        (``tproxy setup`` installs no such rule for UDP): they belong to a
        session all the same.
        """
        sock = reply.sock
        for _ in range(BATCH):
            if self.replies.get(destination) is not reply:
                return  # closed with its last session while we were reading
            try:
                data, source = sock.recvfrom(MAX_DATAGRAM)
            except BlockingIOError:
                return
            except OSError as exc:
                log.debug("udp: reply socket %s: %s", format_address(destination), exc)
                continue
            self.from_client((source[0], source[1]), destination, data)


def _local(sock: socket.socket) -> Address:
    local = sock.getsockname()
    return local[0], local[1]


def _is_self(destination: Address, listener: Address) -> bool:
    """Whether ``destination`` is the listener's own address (a wildcard covers loopback)."""
    if destination[1] != listener[1]:
        return False
    if destination[0] == listener[0]:
        return True
    if listener[0] in ("0.0.0.0", "::"):
        ip = ipaddress.ip_address(destination[0])
        return ip.is_loopback or ip.is_unspecified
    return False


def raise_descriptor_limit(wanted: int) -> None:
    """Raise the soft limit on open files toward ``wanted`` (up to the hard limit)."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (OSError, ValueError):
        return
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (OSError, ValueError):
            log.debug("udp: cannot raise the open-files limit to %d", target)

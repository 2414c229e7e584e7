"""Opening the outgoing flow of an explicit mode: resolve, check every address, connect.

A client names its destination; a name allowed by the host rules may still
resolve into a denied network (``--deny-net``), so names are resolved here,
every address is checked with :meth:`~tproxy.protocols.Policy.check_resolved`,
and only allowed IP literals are handed to :meth:`Engine.connect
<tproxy.engine.Engine.connect>`, one after the other (as
``trio.open_tcp_stream`` tries a name's addresses in turn). The whole
attempt, resolution included, ends within the engine's connect timeout.
"""

from __future__ import annotations

import errno
import ipaddress
import socket

import trio

from ..engine import Engine
from ..errors import ConnectError, most_telling
from ..flow import Address
from ..protocols import Policy
from ..protocols.hostname import host_name_problem
from ..protocols.socks_request import shown_name


class DestinationDenied(Exception):
    """Every address the destination resolved to is denied by the policy."""


def is_ip_literal(host: str) -> bool:
    """Whether ``host`` is an IPv4 or IPv6 address (not a name)."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


async def resolve(host: str, port: int) -> list[str]:
    """The IP addresses of ``host`` in resolver order, without repeats.

    An IP literal is its own answer; a name that cannot be resolved is a
    :class:`ConnectError` of kind ``dns``. So is a name that cannot even be
    asked for: the protocol parsers refuse such names already
    (:mod:`tproxy.protocols.hostname`), but a forward target or any other
    caller may still hand one over, and ``getaddrinfo`` raises
    ``UnicodeError`` (IDNA: ``a..b``, a 64-byte label) or ``ValueError``
    (a NUL) for them instead of ``gaierror``.
    """
    if is_ip_literal(host):
        return [host]
    problem = host_name_problem(host)
    if problem is not None:
        raise ConnectError("dns", f"cannot resolve {shown_name(host)}: {problem}")
    try:
        infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ConnectError("dns", f"cannot resolve {shown_name(host)}: {exc.strerror}") from None
    except ValueError as exc:  # UnicodeError included: names the codec cannot encode
        raise ConnectError("dns", f"cannot resolve {shown_name(host)}: {exc}") from None
    addresses: list[str] = []
    for info in infos:
        ip = str(info[4][0])
        if ip not in addresses:
            addresses.append(ip)
    if not addresses:
        raise ConnectError("dns", f"no address for {host}")
    return addresses


async def open_upstream(
    engine: Engine, policy: Policy, destination: Address
) -> tuple[trio.SocketStream, Address]:
    """Connect to ``destination`` (a name or an IP literal) as the policy allows.

    Returns the stream and its local address. Raises
    :class:`DestinationDenied` when the policy refuses every resolved
    address, and :class:`ConnectError` when none could be connected.
    """
    host, port = destination
    timeout = engine.config.connect_timeout
    try:
        with trio.fail_after(timeout):
            addresses = await resolve(host, port)
            decisions = [(ip, policy.check_resolved(ip)) for ip in addresses]
            allowed = [ip for ip, decision in decisions if decision]
            if not allowed:
                raise DestinationDenied(decisions[0][1].reason)
            errors: list[ConnectError] = []
            for ip in allowed:
                try:
                    return await engine.connect((ip, port))
                except ConnectError as exc:
                    errors.append(exc)
            raise most_telling(errors)
    except trio.TooSlowError:
        raise ConnectError(
            "timeout", f"connect to {host}:{port} timed out after {timeout:g}s", errno.ETIMEDOUT
        ) from None


def failure_cause(error: ConnectError) -> BaseException | int:
    """What to give a handshake's ``reply_failure``: the error itself, whose ``kind``
    :func:`~tproxy.errors.classify_error` reads (one vocabulary, no translation)."""
    return error

"""The errors several parts share: bad usage, and one vocabulary for failed connects.

This module imports nothing of tproxy, so any module may import it (the
command line, the engine, the protocols) without an import circle.

A failed connect is said one way everywhere: a :class:`ConnectFailure`.
:func:`classify_error` derives it from whatever was caught (an errno, an
``OSError``, a ``gaierror``, a timeout, a :class:`ConnectError`);
:class:`ConnectError` carries it as ``kind`` and writes it at the front of
its message, which is what flow records show (``detail='refused: ...'``);
the protocols map it to their reply codes.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Iterable
from enum import StrEnum


class UsageError(Exception):
    """A bad argument found after parsing (e.g. an interceptor that does not load)."""


class ConnectFailure(StrEnum):
    """Why connecting to a destination failed; the value is the word flow records show."""

    REFUSED = "refused"
    NETWORK_UNREACHABLE = "network-unreachable"
    HOST_UNREACHABLE = "host-unreachable"
    NAME_NOT_FOUND = "dns"
    TIMEOUT = "timeout"
    NOT_ALLOWED = "not-allowed"
    ADDRESS_FAMILY = "address-family"
    OTHER = "error"


_ERRNO_FAILURES: dict[int, ConnectFailure] = {
    errno.ECONNREFUSED: ConnectFailure.REFUSED,
    errno.ENETUNREACH: ConnectFailure.NETWORK_UNREACHABLE,
    errno.ENETDOWN: ConnectFailure.NETWORK_UNREACHABLE,
    errno.EHOSTUNREACH: ConnectFailure.HOST_UNREACHABLE,
    errno.EHOSTDOWN: ConnectFailure.HOST_UNREACHABLE,
    errno.ETIMEDOUT: ConnectFailure.TIMEOUT,
    errno.EACCES: ConnectFailure.NOT_ALLOWED,
    errno.EPERM: ConnectFailure.NOT_ALLOWED,
    errno.EAFNOSUPPORT: ConnectFailure.ADDRESS_FAMILY,
}

_TELLING = [
    ConnectFailure.REFUSED,
    ConnectFailure.HOST_UNREACHABLE,
    ConnectFailure.NETWORK_UNREACHABLE,
    ConnectFailure.TIMEOUT,
    ConnectFailure.NOT_ALLOWED,
]
"""Of several failed addresses, the failure to report first (a refusal says the most)."""


class ConnectError(OSError):
    """The outgoing flow could not be opened; ``kind`` says why (a :class:`ConnectFailure`)."""

    def __init__(self, kind: ConnectFailure | str, message: str, errno_: int | None = None) -> None:
        super().__init__(errno_ or 0, message)
        self.kind = ConnectFailure(kind)

    def __str__(self) -> str:
        return f"{self.kind}: {self.strerror}"


def classify_error(error: BaseException | int | None) -> ConnectFailure:
    """Say why a connect failed, from the exception (or errno) that was caught.

    - a :class:`ConnectError`: its ``kind``;
    - ``socket.gaierror`` (DNS failure): ``NAME_NOT_FOUND``;
    - ``TimeoutError``, errno ``ETIMEDOUT``, or ``trio.TooSlowError`` (from
      ``trio.fail_after``; recognised by its name so this module needs no
      trio): ``TIMEOUT``;
    - an ``OSError`` (or a bare errno ``int``): by errno (ECONNREFUSED,
      ENETUNREACH/ENETDOWN, EHOSTUNREACH/EHOSTDOWN, ETIMEDOUT, EACCES/EPERM,
      EAFNOSUPPORT);
    - an ``OSError`` without errno (``trio.open_tcp_stream`` raises
      ``OSError("all attempts to connect ... failed")`` with the individual
      errors in an exception group as its ``__cause__``): the first of
      those inner errors that says more than ``OTHER``;
    - anything else: ``OTHER``.
    """
    if error is None:
        return ConnectFailure.OTHER
    if isinstance(error, int):
        return _ERRNO_FAILURES.get(error, ConnectFailure.OTHER)
    if isinstance(error, ConnectError):
        return error.kind
    if isinstance(error, socket.gaierror):
        return ConnectFailure.NAME_NOT_FOUND
    if isinstance(error, TimeoutError) or type(error).__name__ == "TooSlowError":
        return ConnectFailure.TIMEOUT
    if isinstance(error, ConnectionRefusedError):
        return ConnectFailure.REFUSED
    if isinstance(error, BaseExceptionGroup):
        for inner in error.exceptions:
            found = classify_error(inner)
            if found is not ConnectFailure.OTHER:
                return found
        return ConnectFailure.OTHER
    if isinstance(error, OSError):
        if error.errno:
            return _ERRNO_FAILURES.get(error.errno, ConnectFailure.OTHER)
        cause = error.__cause__
        if cause is not None and cause is not error:
            return classify_error(cause)
    return ConnectFailure.OTHER


def connect_error_from(exc: OSError) -> ConnectError:
    """Translate a connect failure into a :class:`ConnectError`, once, here."""
    if isinstance(exc, ConnectError):
        return exc
    kind = classify_error(exc)
    if isinstance(exc, socket.gaierror):
        return ConnectError(kind, f"name resolution failed: {exc}", None)
    return ConnectError(kind, exc.strerror or str(exc), exc.errno)


def most_telling(errors: Iterable[ConnectError]) -> ConnectError:
    """Of the failures of several addresses, the one to report (a refusal first)."""
    return min(
        errors, key=lambda e: _TELLING.index(e.kind) if e.kind in _TELLING else len(_TELLING)
    )

"""Whether a host name sent by a client can name a host at all, before any resolver sees it.

A client of an explicit door names its destination; that name ends in
``getaddrinfo``, which first encodes it with Python's ``idna`` codec. Names
the codec cannot encode (an empty label as in ``a..b``, a label over 63
bytes, characters IDNA forbids) make it raise ``UnicodeError`` instead of a
resolver error, and DNS cannot carry a name over 253 bytes anyway. So every
door refuses such names while parsing, with the protocol's own reply, and
they never reach a resolver or a log line unquoted.

Accepted: what DNS could carry. Letters, digits, ``-``, ``_`` and other
printable ASCII in labels of 1-63 bytes (the resolver decides whether they
exist), internationalised names that IDNA 2003 encodes, one trailing dot.
"""

from __future__ import annotations

MAX_NAME_LENGTH = 253
"""Longest name DNS can carry, in ASCII (IDNA-encoded) bytes, without the trailing dot."""
MAX_LABEL_LENGTH = 63
"""Longest label, in ASCII (IDNA-encoded) bytes."""


def host_name_problem(name: str) -> str | None:
    """Why ``name`` cannot name a host (a short phrase for the log), or ``None`` if it can.

    ``name`` is a host name, not an IP literal in brackets; an IP literal
    written like a name (``192.0.2.1``) passes.
    """
    if not name:
        return "empty host name"
    if any(ord(c) <= 0x20 or ord(c) == 0x7F for c in name):
        return "control character or space in the host name"
    if len(name) > 4 * (MAX_NAME_LENGTH + 1):
        # Not even the codec is asked: bounded work for any input.
        return f"host name of {len(name)} characters is too long"
    try:
        encoded = name.encode("idna")
    except UnicodeError as error:
        return _label_problem(name) or f"host name is not valid IDNA ({_cause(error)})"
    body = encoded[:-1] if encoded.endswith(b".") else encoded
    if len(body) > MAX_NAME_LENGTH:
        return f"host name of {len(body)} bytes is longer than {MAX_NAME_LENGTH}"
    return _label_problem(body.decode("ascii"))


def _label_problem(name: str) -> str | None:
    body = name[:-1] if name.endswith(".") else name
    for label in body.split("."):
        if not label:
            return "empty label in the host name"
        if len(label.encode("utf-8")) > MAX_LABEL_LENGTH:
            return f"host name label longer than {MAX_LABEL_LENGTH} bytes"
    return None


def _cause(error: UnicodeError) -> str:
    """The codec's own words ("Invalid character '\\x80'"), without the codec preamble."""
    inner = error.__cause__ or error.__context__ or error
    return str(inner)[:80]


__all__ = ["MAX_LABEL_LENGTH", "MAX_NAME_LENGTH", "host_name_problem"]

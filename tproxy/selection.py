"""Which flows an interceptor gets: ``-i SPEC --when EXPR``, decided per flow, pure.

``EXPR`` is comma-separated ``KEY=VALUE`` terms that must all hold; repeating
``--when`` for the same ``-i`` means OR. Keys:

- ``dst=CIDR[;CIDR...]``: the destination is an IP address in one of them
  (an IPv4-mapped IPv6 address counts as IPv4; a name matches none);
- ``port=PORTS``: the destination port is in ``80;443;8000-8100``;
- ``client=CIDR[;CIDR...]``: the client's address is in one of them;
- ``mode=MODE[;MODE...]``: the front door: ``transparent``, ``forward``,
  ``socks``, ``http``;
- ``host=REGEX``: the requested name in explicit modes (a SOCKS or CONNECT
  request for a name), else the TLS server name (SNI), else no match;
- ``sni=REGEX``: the TLS server name of the client's ClientHello.

``sni=`` and ``host=`` on a flow whose destination is an address need the
ClientHello, which comes after the flow opened: the engine then peeks the
client's first bytes before it builds the chain (:mod:`tproxy.peek`), and
with ``--tls intercept`` the TLS layer decides once it read the hello.
``--tls-when`` (which TLS flows are intercepted) uses the same grammar.

A REGEX must match the whole name, case-insensitively, and may contain commas
(a comma starts a new term only when a word and ``=`` follow it). An interceptor
class may declare a default with a class attribute ``when`` (a string, or a
tuple of strings for OR); ``--when`` on the command line replaces it.
Without either, the interceptor gets every flow. A flow that no interceptor
selects is relayed untouched, on the engine's passthrough path.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .flow import FlowInfo
from .interceptor import OptionError
from .options import Network, address_in, parse_cidrs, parse_ports, port_in

KEYS = ("dst", "port", "client", "mode", "host", "sni")
MODES = ("transparent", "forward", "socks", "http")
EXPLICIT_MODES = ("forward", "socks", "http")

_TERM_START = re.compile(r",\s*(?=[A-Za-z_][\w-]*\s*=)")


class SelectionError(ValueError):
    """A ``--when`` expression is wrong; the message is one line."""


@dataclass(frozen=True)
class Condition:
    """One ``--when EXPR``: every term given must hold (``None`` = not given)."""

    text: str
    dst: tuple[Network, ...] | None = None
    port: tuple[tuple[int, int], ...] | None = None
    client: tuple[Network, ...] | None = None
    mode: frozenset[str] | None = None
    host: re.Pattern[str] | None = None
    sni: re.Pattern[str] | None = None

    def matches(self, info: FlowInfo) -> bool:
        """Whether ``info`` satisfies every term (cheap terms first)."""
        if self.mode is not None and _base_mode(info.mode) not in self.mode:
            return False
        if self.port is not None and not port_in(info.destination[1], self.port):
            return False
        if self.dst is not None and not address_in(info.destination[0], self.dst):
            return False
        if self.client is not None and not address_in(info.client[0], self.client):
            return False
        if self.sni is not None and not _name_matches(self.sni, _sni(info)):
            return False
        return self.host is None or _name_matches(self.host, requested_host(info))

    @property
    def needs_sni(self) -> bool:
        """Whether this condition reads the TLS server name (``sni=`` or ``host=``)."""
        return self.sni is not None or self.host is not None

    def could_match_with_sni(self, info: FlowInfo) -> bool:
        """Whether a ClientHello could make this condition hold for ``info``: its other
        terms hold, and it reads an SNI that ``info`` does not have yet."""
        if not self.needs_sni or _sni(info) is not None:
            return False
        if self.host is not None and requested_host(info) is not None:
            return False  # the host term is decided by the requested name
        return Condition(self.text, self.dst, self.port, self.client, self.mode).matches(info)


@dataclass(frozen=True)
class Selection:
    """The conditions of one interceptor, OR-ed; none at all selects every flow."""

    conditions: tuple[Condition, ...] = ()

    def matches(self, info: FlowInfo) -> bool:
        return not self.conditions or any(c.matches(info) for c in self.conditions)

    @property
    def everything(self) -> bool:
        """Whether every flow is selected (no condition given)."""
        return not self.conditions

    @property
    def needs_sni(self) -> bool:
        """Whether some condition needs the client's ClientHello to decide."""
        return any(c.needs_sni for c in self.conditions)

    def wants_client_hello(self, info: FlowInfo) -> bool:
        """Whether peeking the ClientHello of this flow could change the answer: it is
        not selected yet, and some condition would hold given a matching SNI. The
        engine peeks only then (cheap terms like ``port=`` decide most flows)."""
        if self.matches(info):
            return False
        return any(c.could_match_with_sni(info) for c in self.conditions)

    def __str__(self) -> str:
        return " OR ".join(c.text for c in self.conditions) or "every flow"


def parse_condition(text: str, flag: str = "--when") -> Condition:
    """Parse one ``--when`` expression; raise :class:`SelectionError` with one line
    (naming the option ``flag``: ``--tls-when`` shares the grammar)."""
    source = text.strip()
    if not source:
        raise SelectionError(f"{flag}: empty expression (expected KEY=VALUE[,KEY=VALUE...])")
    fields: dict[str, object] = {}
    for raw in _TERM_START.split(source):
        term = raw.strip()
        key, eq, value = term.partition("=")
        key, value = key.strip().lower(), value.strip()
        if not eq or not key:
            raise SelectionError(f"{flag} {source!r}: {term!r} is not KEY=VALUE")
        if key not in KEYS:
            raise SelectionError(
                f"{flag} {source!r}: unknown key {key!r} (keys: {', '.join(KEYS)})"
            )
        if key in fields:
            raise SelectionError(
                f"{flag} {source!r}: {key}= given twice (use ';' inside a value, "
                f"or another {flag} for OR)"
            )
        if not value:
            raise SelectionError(f"{flag} {source!r}: {key}= has no value")
        fields[key] = _parse_value(source, key, value, flag)
    return Condition(text=source, **fields)  # type: ignore[arg-type]


def parse_selection(expressions: Iterable[str], flag: str = "--when") -> Selection:
    """The OR of several ``--when`` expressions (none: every flow)."""
    return Selection(tuple(parse_condition(e, flag) for e in expressions))


def class_default(cls: type) -> tuple[str, ...]:
    """The ``when`` class attribute of an interceptor class, as a tuple of expressions."""
    when = getattr(cls, "when", None)
    if when is None:
        return ()
    if isinstance(when, str):
        return (when,)
    if isinstance(when, Sequence) and all(isinstance(w, str) for w in when):
        return tuple(when)
    raise SelectionError(
        f"{cls.__name__}.when must be a string or a tuple of strings, not {type(when).__name__}"
    )


def unmatchable(selection: Selection, modes: Iterable[str], *, sni_available: bool) -> list[str]:
    """Why terms of ``selection`` can never match with listeners of these ``modes``.

    ``sni_available`` says whether TCP flows get their ClientHello peeked
    (``flow.sni``: the engine peeks when ``sni=``/``host=`` needs it, see
    :mod:`tproxy.peek`); without it, or on UDP listeners only (``*-udp``: a
    datagram session has no ClientHello), ``sni=`` never matches, and ``host=``
    matches only in explicit modes.
    """
    modes = list(modes)
    kinds = {_base_mode(m) for m in modes}
    stream_kinds = {_base_mode(m) for m in modes if not m.endswith("-udp")}
    problems: list[str] = []
    for cond in selection.conditions:
        usable = kinds if cond.mode is None else kinds & cond.mode
        if cond.mode is not None and not usable:
            problems.append(
                f"--when {cond.text!r}: no listener has mode {'/'.join(sorted(cond.mode))} "
                f"(listeners: {', '.join(sorted(kinds)) or 'none'})"
            )
            continue
        if sni_available and usable & stream_kinds:
            continue
        why = (
            "no ClientHello is peeked in this configuration"
            if not sni_available
            else "its listeners carry only UDP, which has no ClientHello"
        )
        if cond.sni is not None:
            problems.append(
                f"--when {cond.text!r}: sni= never matches: {why}, so flows have no sni"
            )
        elif cond.host is not None and not (usable & set(EXPLICIT_MODES)):
            problems.append(
                f"--when {cond.text!r}: host= never matches on transparent listeners "
                f"(they see addresses, not names, and {why})"
            )
    return problems


def requested_host(info: FlowInfo) -> str | None:
    """The name the client asked for: the explicit destination name, else the SNI."""
    host = info.destination[0]
    if _base_mode(info.mode) != "transparent" and not _is_ip(host):
        return host
    return _sni(info)


# -- helpers --------------------------------------------------------------------


def _parse_value(source: str, key: str, value: str, flag: str = "--when") -> object:
    where = f"{flag} {source!r}"
    try:
        if key in ("dst", "client"):
            return parse_cidrs(where, key, value, separator=";")
        if key == "port":
            return parse_ports(where, key, value, separator=";")
    except OptionError as exc:
        raise SelectionError(str(exc)) from None
    if key == "mode":
        modes = frozenset(m.strip().lower() for m in value.split(";") if m.strip())
        unknown = sorted(modes - set(MODES))
        if unknown or not modes:
            raise SelectionError(
                f"{where}: unknown mode {unknown[0] if unknown else value!r} "
                f"(modes: {', '.join(MODES)})"
            )
        return modes
    try:
        return re.compile(value, re.IGNORECASE)
    except re.error as exc:
        raise SelectionError(f"{where}: {key}= is not a valid regular expression: {exc}") from None


def _base_mode(mode: str) -> str:
    """``socks-udp`` counts as ``socks``."""
    return mode.partition("-")[0]


def _sni(info: FlowInfo) -> str | None:
    sni = getattr(info, "sni", None)
    return sni if isinstance(sni, str) else None


def _name_matches(pattern: re.Pattern[str], name: str | None) -> bool:
    return name is not None and pattern.fullmatch(name.rstrip(".")) is not None


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]").split("%", 1)[0])
    except ValueError:
        return False
    return True

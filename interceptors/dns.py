"""``dns``: log DNS queries and answers in UDP sessions, rewrite answers, block names.

Works on datagrams (a transparent UDP session, e.g. with ``tproxy setup
--udp-port 53``); DNS over TCP passes untouched. Every query and answer is
logged on ``tproxy.dns`` (INFO)::

    flow 7 dns query id=4660 example.com. A
    flow 7 dns answer id=4660 example.com. A NOERROR example.com. 300 IN A 93.184.216.34

Options:

- ``rewrite=NAME=ADDRESS[;NAME=ADDRESS...]`` (more under suffixed keys:
  ``-o rewrite.2=...``, since ``-o`` takes each key once): answers to A/AAAA questions
  for NAME carry ADDRESS instead of what the server said (several entries
  for one name give several addresses; ``*.example.com`` covers every name
  below example.com). A question of the other family gets an empty answer
  (NODATA), so the real address of that family does not leak past the rule.
  The query still reaches the server; only its answer is changed.
- ``block=REGEX``: a query whose name (lower case, no trailing dot) matches
  (``re.search``; anchor with ``^...$``) is answered NXDOMAIN by the proxy
  and never reaches the server.
- ``log=no``: do not log queries and answers.

What does not parse as DNS (another protocol on the port, a truncated or
malformed packet) is forwarded unchanged, and nothing it does raises out of
a hook: the session goes on.
"""

from __future__ import annotations

import ipaddress
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from tproxy.flow import FlowInfo
from tproxy.interceptor import Interceptor, OptionError

NAME = "dns"
log = logging.getLogger("tproxy.dns")

DEFAULT_TTL = 60
"""TTL of rewritten records when the server's answer had none to copy."""
MAX_LOGGED_RECORDS = 8

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
_REWRITE_KEY = re.compile(r"rewrite(?:[._-].+)?")
"""``rewrite``, or ``rewrite.2``, ``rewrite-www``...: -o takes a key once, so more
rules than one option holds come under suffixed keys."""


@dataclass(frozen=True)
class RewriteRule:
    """Answer A/AAAA questions for ``name`` (or, with ``wildcard``, names below it)."""

    name: str
    """Lower case, no trailing dot."""
    wildcard: bool
    addresses: tuple[Address, ...]

    def matches(self, qname: str) -> bool:
        if self.wildcard:
            return qname.endswith("." + self.name)
        return qname == self.name


@dataclass(frozen=True)
class DnsOptions:
    """Checked options of :class:`Dns`."""

    rewrite: tuple[RewriteRule, ...] = ()
    block: re.Pattern[str] | None = None
    log: bool = True


def parse_rewrite(text: str) -> tuple[RewriteRule, ...]:
    """``"a.test=192.0.2.1;a.test=2001:db8::1;*.b.test=192.0.2.9"`` -> rules, one per name."""
    by_name: dict[tuple[str, bool], list[Address]] = {}
    for entry in text.split(";"):
        entry = entry.strip()
        if not entry:
            continue
        name, eq, address = entry.rpartition("=")
        if not eq or not name.strip():
            raise OptionError(f"{NAME}: rewrite entry {entry!r} is not NAME=ADDRESS")
        try:
            ip = ipaddress.ip_address(address.strip())
        except ValueError:
            raise OptionError(
                f"{NAME}: rewrite: {address.strip()!r} is not an IP address"
            ) from None
        name = name.strip().lower().rstrip(".")
        wildcard = name.startswith("*.")
        if wildcard:
            name = name[2:]
        if not name or "*" in name:
            raise OptionError(f"{NAME}: rewrite: bad name {entry.partition('=')[0]!r}")
        try:
            dns.name.from_text(name)
        except dns.exception.DNSException as exc:
            raise OptionError(f"{NAME}: rewrite: bad name {name!r}: {exc}") from None
        by_name.setdefault((name, wildcard), []).append(ip)
    if not by_name:
        raise OptionError(f"{NAME}: rewrite is empty")
    return tuple(RewriteRule(n, w, tuple(a)) for (n, w), a in by_name.items())


class Dns(Interceptor):
    """Log, rewrite and block DNS in UDP sessions (see the module docstring)."""

    options: DnsOptions

    @classmethod
    def parse_options(cls, options: Mapping[str, str]) -> DnsOptions:
        opts: dict[str, str] = {}
        rewrites: list[str] = []
        for key, value in options.items():
            if _REWRITE_KEY.fullmatch(key):
                rewrites.append(value)
            elif key in ("block", "log"):
                opts[key] = value
            else:
                raise OptionError(f"{NAME}: unknown option {key!r} (accepted: block, log, rewrite)")
        block = None
        if "block" in opts:
            try:
                block = re.compile(opts["block"], re.IGNORECASE)
            except re.error as exc:
                raise OptionError(f"{NAME}: block is not a valid regex: {exc}") from None
        return DnsOptions(
            rewrite=parse_rewrite(";".join(rewrites)) if rewrites else (),
            block=block,
            log=_yes_no(opts.get("log", "yes")),
        )

    def __init__(self, flow: FlowInfo, options: DnsOptions | None = None) -> None:
        super().__init__(flow, options or DnsOptions())

    # -- hooks -----------------------------------------------------------------

    def client_datagram(self, data: bytes) -> bytes | None:
        query = _parse(data)
        if query is None or query.flags & dns.flags.QR:
            return data
        try:
            if self.options.log:
                for q in query.question:
                    log.info(
                        "flow %d dns query id=%d %s %s",
                        self.flow.id,
                        query.id,
                        q.name,
                        dns.rdatatype.to_text(q.rdtype),
                    )
            if self._blocked(query):
                reply = dns.message.make_response(query)
                reply.flags |= dns.flags.RA
                reply.set_rcode(dns.rcode.NXDOMAIN)
                self.inject_datagram_to_client(reply.to_wire())
                return None
        except Exception as exc:  # a parsed message dnspython cannot answer: let it through
            log.debug("flow %d dns: query left alone: %r", self.flow.id, exc)
        return data

    def server_datagram(self, data: bytes) -> bytes | None:
        answer = _parse(data)
        if answer is None or not answer.flags & dns.flags.QR:
            return data
        try:
            result = data
            if self.options.rewrite and _rewrite(answer, self.options.rewrite):
                result = answer.to_wire()
            if self.options.log:
                self._log_answer(answer, rewritten=result is not data)
            return result
        except Exception as exc:
            log.debug("flow %d dns: answer left alone: %r", self.flow.id, exc)
            return data

    # -- helpers -----------------------------------------------------------------

    def _blocked(self, query: dns.message.Message) -> bool:
        block = self.options.block
        if block is None:
            return False
        for q in query.question:
            name = _plain(q.name)
            if block.search(name):
                log.info("flow %d dns blocked %s (NXDOMAIN)", self.flow.id, name)
                return True
        return False

    def _log_answer(self, answer: dns.message.Message, *, rewritten: bool) -> None:
        question = " ".join(f"{q.name} {dns.rdatatype.to_text(q.rdtype)}" for q in answer.question)
        records = [line for rrset in answer.answer for line in rrset.to_text().splitlines()]
        shown = "; ".join(records[:MAX_LOGGED_RECORDS])
        if len(records) > MAX_LOGGED_RECORDS:
            shown += f"; (+{len(records) - MAX_LOGGED_RECORDS} more)"
        log.info(
            "flow %d dns answer id=%d %s %s%s %s",
            self.flow.id,
            answer.id,
            question,
            dns.rcode.to_text(answer.rcode()),
            " (rewritten)" if rewritten else "",
            shown,
        )


def _yes_no(text: str) -> bool:
    value = text.strip().lower()
    if value not in ("yes", "no"):
        raise OptionError(f"{NAME}: log must be yes or no, not {text!r}")
    return value == "yes"


def _parse(data: bytes) -> dns.message.Message | None:
    """A DNS message, or ``None`` for anything that is not one (never raises)."""
    try:
        return dns.message.from_wire(data, ignore_trailing=False)
    except Exception:
        return None


def _plain(name: dns.name.Name) -> str:
    return name.to_text(omit_final_dot=True).lower()


def _rewrite(answer: dns.message.Message, rules: tuple[RewriteRule, ...]) -> bool:
    """Rewrite ``answer`` in place for the first question a rule covers; whether it did."""
    for q in answer.question:
        if q.rdclass != dns.rdataclass.IN or q.rdtype not in (dns.rdatatype.A, dns.rdatatype.AAAA):
            continue
        qname = _plain(q.name)
        rule = next((r for r in rules if r.matches(qname)), None)
        if rule is None:
            continue
        version = 4 if q.rdtype == dns.rdatatype.A else 6
        addresses = [str(a) for a in rule.addresses if a.version == version]
        ttls = [rrset.ttl for rrset in answer.answer]
        ttl = min(ttls) if ttls else DEFAULT_TTL
        answer.answer = []
        answer.authority = []
        if addresses:
            answer.answer.append(
                dns.rrset.from_text_list(q.name, ttl, dns.rdataclass.IN, q.rdtype, addresses)
            )
        answer.set_rcode(dns.rcode.NOERROR)
        return True
    return False

"""Options of the explicit front doors, read and checked once, before anything listens.

Every explicit listener of one ``tproxy run`` shares one :class:`ExplicitSettings`:
the access :class:`~tproxy.protocols.Policy`, the handshake limits, the
per-client cap (counted over all explicit listeners together) and the TLS
context of ``http`` listeners. A bad value is a :class:`~tproxy.cli.UsageError`
(one line, exit code 2), raised before the first socket is bound.
"""

from __future__ import annotations

import argparse
import ipaddress
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..errors import UsageError
from ..modes import ModeSpec
from ..protocols import Policy, PolicyError
from .limits import ClientSlots

DEFAULT_HANDSHAKE_TIMEOUT = 10.0
DEFAULT_BIND_TIMEOUT = 60.0
MIN_HANDSHAKE_SIZE = 64
MAX_HANDSHAKE_SIZE = 1024 * 1024


@dataclass
class ExplicitSettings:
    """What the explicit front doors need besides the engine."""

    policy: Policy = field(default_factory=Policy)
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT
    max_handshake: int | None = None
    """Largest handshake in bytes; ``None`` keeps each protocol's own default."""
    bind_timeout: float = DEFAULT_BIND_TIMEOUT
    """How long a SOCKS BIND waits for the peer to connect."""
    slots: ClientSlots = field(default_factory=lambda: ClientSlots(None))
    tls: ssl.SSLContext | None = None
    """Server-side TLS for ``http`` listeners (``--certfile``)."""
    allow_public: bool = False

    def check_listener(self, spec: ModeSpec) -> None:
        """Refuse an open proxy: a non-loopback listener needs credentials or a client list.

        ``forward`` cannot ask for credentials, so there only a client allow
        list (or ``--allow-public``) will do.
        """
        if self.allow_public or ipaddress.ip_address(spec.host).is_loopback:
            return
        if spec.kind == "forward":
            if self.policy.clients:
                return
            need = "--allow-client"
        else:
            if self.policy.restricts_clients:
                return
            need = "--credentials, --credentials-file or --allow-client"
        raise UsageError(
            f"{spec} listens on a non-loopback address and anyone could use it: "
            f"give {need}, or --allow-public to really open it"
        )


_FLAGS = {
    "allow_host": "--allow-host",
    "deny_host": "--deny-host",
    "allow_net": "--allow-net",
    "deny_net": "--deny-net",
    "allow_port": "--allow-port",
    "deny_port": "--deny-port",
    "allow_client": "--allow-client",
    "credentials": "--credentials",
    "credentials_file": "--credentials-file",
    "handshake_timeout": "--handshake-timeout",
    "max_handshake": "--max-handshake",
    "max_flows_per_client": "--max-flows-per-client",
    "bind_timeout": "--bind-timeout",
    "certfile": "--certfile",
    "keyfile": "--keyfile",
    "allow_public": "--allow-public",
}
"""Options whose default is "not given", by argparse destination (for :func:`check_unused`)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the explicit-mode options to ``tproxy run``."""
    g = parser.add_argument_group(
        "explicit proxies (forward, socks, http)",
        "Destination rules: deny wins over allow; with any --allow-host/--allow-net, a "
        "destination must match one of them; with --allow-port, its port must be listed. "
        "Host patterns are regexes matched against the whole name, case-insensitively.",
    )
    g.add_argument(
        "--allow-host",
        action="append",
        default=[],
        metavar="REGEX",
        help="allow destinations whose name matches (repeatable)",
    )
    g.add_argument(
        "--deny-host",
        action="append",
        default=[],
        metavar="REGEX",
        help="deny destinations whose name matches (repeatable)",
    )
    g.add_argument(
        "--allow-net",
        action="append",
        default=[],
        metavar="CIDR",
        help="allow destination addresses in these networks (repeatable, commas)",
    )
    g.add_argument(
        "--deny-net",
        action="append",
        default=[],
        metavar="CIDR",
        help="deny destination addresses in these networks, also when a name "
        "resolves into them (repeatable, commas)",
    )
    g.add_argument(
        "--allow-port",
        action="append",
        default=[],
        metavar="PORTS",
        help="allow only these destination ports: 443, 8000-8100 (repeatable, commas)",
    )
    g.add_argument(
        "--deny-port",
        action="append",
        default=[],
        metavar="PORTS",
        help="deny these destination ports (repeatable, commas)",
    )
    g.add_argument(
        "--allow-client",
        action="append",
        default=[],
        metavar="CIDR",
        help="only clients from these networks may connect; others are closed at "
        "once (repeatable, commas)",
    )
    g.add_argument(
        "--credentials",
        action="append",
        default=[],
        metavar="USER:PASS",
        help="require authentication (HTTP Basic, SOCKS5 RFC 1929; SOCKS4 is then "
        "refused); repeatable",
    )
    g.add_argument(
        "--credentials-file",
        default=None,
        metavar="PATH",
        help="user:password lines (# comments); keeps passwords out of ps",
    )
    g.add_argument(
        "--handshake-timeout",
        type=_positive,
        default=None,
        metavar="SECONDS",
        help="a client must finish its handshake (and TLS) within this time "
        f"(default {DEFAULT_HANDSHAKE_TIMEOUT:g})",
    )
    g.add_argument(
        "--max-handshake",
        type=_handshake_size,
        default=None,
        metavar="BYTES",
        help="largest SOCKS handshake or HTTP request head (default: SOCKS4 1024, "
        "SOCKS5 1100, HTTP 32768)",
    )
    g.add_argument(
        "--max-flows-per-client",
        type=_count,
        default=None,
        metavar="N",
        help="flows one client IP may have open at once, over all explicit listeners "
        "(default: no cap)",
    )
    g.add_argument(
        "--bind-timeout",
        type=_positive,
        default=None,
        metavar="SECONDS",
        help=f"how long a SOCKS BIND waits for its peer (default {DEFAULT_BIND_TIMEOUT:g})",
    )
    g.add_argument(
        "--certfile",
        default=None,
        metavar="PEM",
        help="serve http listeners over TLS with this certificate (chain)",
    )
    g.add_argument(
        "--keyfile",
        default=None,
        metavar="PEM",
        help="the private key of --certfile, if not in the same file",
    )
    g.add_argument(
        "--allow-public",
        action="store_true",
        help="allow an explicit listener on a non-loopback address without "
        "credentials or a client allow list (an open proxy)",
    )


def check_unused(args: argparse.Namespace, specs: Sequence[ModeSpec]) -> None:
    """Refuse explicit-mode options when no explicit listener would use them.

    ``tproxy run --allow-host ...`` with only transparent listeners would
    otherwise start and silently apply nothing.
    """
    if any(not spec.transparent for spec in specs):
        return
    for dest, flag in _FLAGS.items():
        if getattr(args, dest, None) not in (None, False, []):
            raise UsageError(
                f"{flag} applies to explicit listeners: add --mode socks@..., http@... "
                "or forward:HOST:PORT@..."
            )


def settings_from(args: argparse.Namespace) -> ExplicitSettings:
    """Build (once per ``args``) and check the shared settings; UsageError on bad values."""
    cached: ExplicitSettings | None = getattr(args, "_explicit_settings", None)
    if cached is not None:
        return cached
    try:
        policy = Policy.from_options(
            allow_hosts=args.allow_host,
            deny_hosts=args.deny_host,
            allow_networks=args.allow_net,
            deny_networks=args.deny_net,
            allow_ports=args.allow_port,
            deny_ports=args.deny_port,
            clients=args.allow_client,
            credentials=args.credentials,
            credentials_file=args.credentials_file,
        )
    except PolicyError as exc:
        raise UsageError(str(exc)) from None
    settings = ExplicitSettings(
        policy=policy,
        handshake_timeout=args.handshake_timeout or DEFAULT_HANDSHAKE_TIMEOUT,
        max_handshake=args.max_handshake,
        bind_timeout=args.bind_timeout or DEFAULT_BIND_TIMEOUT,
        slots=ClientSlots(args.max_flows_per_client),
        tls=_tls_context(args),
        allow_public=args.allow_public,
    )
    args._explicit_settings = settings
    return settings


def _tls_context(args: argparse.Namespace) -> ssl.SSLContext | None:
    if args.certfile is None:
        if args.keyfile is not None:
            raise UsageError("--keyfile needs --certfile")
        return None
    modes = args.mode or []
    if not any(spec.kind == "http" for spec in modes):
        raise UsageError("--certfile serves http listeners over TLS: add --mode http@HOST:PORT")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(args.certfile, args.keyfile)
    except FileNotFoundError as exc:
        raise UsageError(f"cannot read {exc.filename}: {exc.strerror}") from None
    except (ssl.SSLError, OSError) as exc:
        raise UsageError(f"cannot load the TLS certificate or key: {exc}") from None
    return context


def _number(text: str, kind: type[float] | type[int]) -> float:
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


def _positive(text: str) -> float:
    value = float(_number(text, float))
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be positive")
    return value


def _count(text: str) -> int:
    value = int(_number(text, int))
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be at least 1")
    return value


def _handshake_size(text: str) -> int:
    value = int(_number(text, int))
    if not MIN_HANDSHAKE_SIZE <= value <= MAX_HANDSHAKE_SIZE:
        raise argparse.ArgumentTypeError(
            f"{text!r}: must be {MIN_HANDSHAKE_SIZE}..{MAX_HANDSHAKE_SIZE}"
        )
    return value

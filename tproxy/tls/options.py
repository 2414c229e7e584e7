"""``tproxy run --tls intercept ...``: the options of TLS interception and its set-up.

:func:`add_arguments` registers the options (called from ``tproxy.runner``);
:func:`attach` checks them, loads the CA and puts the interception on the
engine, which wraps every flow's chain in a :class:`~tproxy.tls.layer.TlsLayer`.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger("tproxy.tls")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the ``--tls*`` options of ``tproxy run``."""
    g = parser.add_argument_group("TLS interception")
    g.add_argument(
        "--tls",
        choices=["off", "intercept"],
        default="off",
        help="intercept: decrypt flows that start with a TLS ClientHello, with certificates "
        "forged by the CA of --ca-dir, so interceptors see plaintext (default off)",
    )
    g.add_argument(
        "--ca-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="the CA made by 'tproxy ca init' (default $TPROXY_CA_DIR or /var/lib/tproxy/ca)",
    )
    g.add_argument(
        "--tls-ignore",
        action="append",
        default=[],
        metavar="REGEX",
        help="pass TLS flows whose server name (SNI, else the destination) matches REGEX "
        "(re.search) through untouched. Repeatable",
    )
    g.add_argument(
        "--tls-when",
        action="append",
        default=[],
        metavar="EXPR",
        help="intercept only the TLS flows EXPR selects (the grammar of --when, read after "
        "the ClientHello, so sni= works); the others pass untouched. Repeatable: OR",
    )
    g.add_argument(
        "--tls-upstream-verify",
        choices=["yes", "no"],
        default="yes",
        help="verify servers' certificates (default yes)",
    )
    g.add_argument(
        "--tls-upstream-ca",
        type=Path,
        default=None,
        metavar="FILE",
        help="trust the CAs in this PEM file upstream instead of the system store",
    )
    g.add_argument(
        "--tls-alpn",
        choices=["http1", "mirror"],
        default="http1",
        help="http1: offer only http/1.1 when the client does (default); mirror: offer the "
        "client's list and pass the server's choice through (h2 frames reach interceptors)",
    )
    g.add_argument(
        "--tls-learn",
        type=float,
        default=600.0,
        metavar="SECONDS",
        help="how long a (client, server name) that rejected a forged certificate passes "
        "through untouched (default 600; 0: never learn)",
    )
    g.add_argument(
        "--tls-handshake-timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="end a flow whose ClientHello and handshakes take longer (default 10)",
    )
    g.add_argument(
        "--tls-keylog",
        default=None,
        metavar="FILE",
        help="append NSS key-log lines of both sides to FILE (Wireshark decrypts a capture)",
    )


def attach(engine: Any, args: argparse.Namespace) -> None:
    """With ``--tls intercept``, give the engine its TLS interception; else check that no
    other ``--tls-*`` option was given."""
    from ..errors import UsageError

    if getattr(args, "tls", "off") != "intercept":
        given = [
            flag
            for flag, value, default in (
                ("--ca-dir", args.ca_dir, None),
                ("--tls-ignore", args.tls_ignore, []),
                ("--tls-when", args.tls_when, []),
                ("--tls-upstream-verify", args.tls_upstream_verify, "yes"),
                ("--tls-upstream-ca", args.tls_upstream_ca, None),
                ("--tls-alpn", args.tls_alpn, "http1"),
                ("--tls-learn", args.tls_learn, 600.0),
                ("--tls-handshake-timeout", args.tls_handshake_timeout, 10.0),
                ("--tls-keylog", args.tls_keylog, None),
            )
            if value != default
        ]
        if given:
            raise UsageError(f"{given[0]} needs --tls intercept")
        return
    try:
        interception = interception_from(args)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    engine.tls = interception
    log.info(
        "TLS interception on: CA %s (SHA-256 %s)",
        interception.forge.ca.cert_path,
        interception.forge.ca.fingerprint(),
    )


def interception_from(args: argparse.Namespace) -> Any:
    """The :class:`~tproxy.tls.layer.TlsInterception` for these options (``ValueError``)."""
    from . import ca
    from .certs import LeafForge
    from .layer import TlsInterception, TlsSettings

    settings = TlsSettings(
        ignore=list(args.tls_ignore),
        when=list(args.tls_when),
        upstream_verify=args.tls_upstream_verify == "yes",
        upstream_ca=args.tls_upstream_ca,
        alpn=args.tls_alpn,
        learn=args.tls_learn,
        keylog=args.tls_keylog,
        handshake_timeout=args.tls_handshake_timeout,
    )
    if settings.upstream_ca is not None and not settings.upstream_ca.is_file():
        raise ValueError(f"--tls-upstream-ca {settings.upstream_ca}: no such file")
    if settings.keylog:
        try:
            fd = os.open(settings.keylog, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            os.close(fd)
        except OSError as exc:
            raise ValueError(f"--tls-keylog {settings.keylog}: {exc.strerror}") from None
    try:
        authority = ca.load(args.ca_dir or ca.default_ca_dir())
    except ca.CAError as exc:
        raise ValueError(str(exc)) from None
    if settings.upstream_ca is not None:
        import ssl

        try:
            ssl.create_default_context(cafile=str(settings.upstream_ca))
        except ssl.SSLError as exc:
            raise ValueError(f"--tls-upstream-ca {settings.upstream_ca}: {exc}") from None
    return TlsInterception(settings, LeafForge(authority, keylog=settings.keylog))

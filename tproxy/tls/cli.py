"""``tproxy ca init|show|export``: make the interception CA and tell clients to trust it."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HOW_TO_TRUST = """\
How to make clients trust it:
  Debian/Ubuntu (system store, also curl/wget/python):
    cp {cert} /usr/local/share/ca-certificates/tproxy-ca.crt && update-ca-certificates
  curl, one command:
    curl --cacert {cert} https://example.org/
  Firefox (own store):
    Settings > Privacy & Security > Certificates > View Certificates > Authorities >
    Import... {cert}, tick "Trust this CA to identify websites"
    (or policies.json: {{"policies": {{"Certificates": {{"Install": ["{cert}"]}}}}}})
"""


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``ca`` (with ``init``, ``show``, ``export``) to the ``tproxy`` parser."""
    p = sub.add_parser(
        "ca",
        help="the CA that signs certificates for TLS interception",
        description=__doc__.splitlines()[0],
    )
    actions = p.add_subparsers(dest="ca_command", required=True, parser_class=type(p))
    init = actions.add_parser("init", help="make a new CA (P-256, 10 years)")
    show = actions.add_parser("show", help="where the CA is, its fingerprint, how to trust it")
    export = actions.add_parser("export", help="write the CA certificate to stdout")
    export.add_argument("--format", choices=["pem", "der"], default="pem")
    for q in (init, show, export):
        q.add_argument(
            "--dir",
            type=Path,
            default=None,
            metavar="DIR",
            help="CA directory (default $TPROXY_CA_DIR or /var/lib/tproxy/ca)",
        )
    p.set_defaults(handler=main)


def main(args: argparse.Namespace) -> int:
    """Entry point of ``tproxy ca``."""
    from ..errors import UsageError
    from . import ca

    directory = args.dir or ca.default_ca_dir()
    try:
        if args.ca_command == "init":
            authority = ca.create(directory)
            print(f"created a CA in {directory}")
            _show(authority)
        elif args.ca_command == "show":
            _show(ca.load(directory))
        else:
            authority = ca.load(directory)
            data = authority.pem() if args.format == "pem" else authority.der()
            sys.stdout.buffer.write(data)
            sys.stdout.buffer.flush()
    except ca.CAError as exc:
        raise UsageError(str(exc)) from None
    except OSError as exc:
        raise UsageError(f"{directory}: {exc.strerror or exc}") from None
    return 0


def _show(authority: object) -> None:
    from .ca import CertificateAuthority

    assert isinstance(authority, CertificateAuthority)
    cert = authority.cert
    print(f"certificate: {authority.cert_path}")
    print(f"key:         {authority.key_path}")
    print(f"subject:     {cert.subject.rfc4514_string()}")
    print(f"valid until: {cert.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC")
    print(f"SHA-256 fingerprint: {authority.fingerprint()}")
    print()
    print(HOW_TO_TRUST.format(cert=authority.cert_path), end="")

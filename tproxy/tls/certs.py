"""Forged leaf certificates and the server-side contexts that present them.

One P-256 key is made when the forge is built and serves every leaf (making
a key per host would cost more than the handshake it serves). A leaf is
signed per set of names and cached, and so is the ``SSLContext`` per
(names, ALPN): the standard library has no ALPN select callback, so the
context offered to a client carries exactly the one protocol the upstream
chose. Both caches are bounded (least recently used goes). The standard
library loads certificates only from files, so each leaf chain is written
once into a private temporary directory (mode 0700) that lives as long as
the forge.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
import ssl
import tempfile
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .ca import CertificateAuthority

LEAF_VALIDITY = datetime.timedelta(days=397)
"""Under the 398 days clients such as Safari accept for a server certificate."""
DEFAULT_CACHE_SIZE = 1024


def is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class LeafForge:
    """Signs leaves with a CA and hands out server contexts for them, cached.

    ``signed`` counts signatures and ``contexts_made`` counts contexts built:
    many connections to one host cost one of each.
    """

    def __init__(
        self,
        ca: CertificateAuthority,
        *,
        cache_size: int = DEFAULT_CACHE_SIZE,
        keylog: str | None = None,
    ) -> None:
        if cache_size < 1:
            raise ValueError("cache size must be at least 1")
        self.ca = ca
        self.cache_size = cache_size
        self.keylog = keylog
        self.key = ec.generate_private_key(ec.SECP256R1())
        self._dir = tempfile.TemporaryDirectory(prefix="tproxy-leaves-")
        self.directory = Path(self._dir.name)
        os.chmod(self.directory, 0o700)
        self.key_path = self.directory / "key.pem"
        fd = os.open(self.key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(
                self.key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
            )
        self._ca_pem = ca.pem()
        self._ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca.cert.public_key())
        self._chains: OrderedDict[tuple[str, ...], Path] = OrderedDict()
        self._contexts: OrderedDict[tuple[tuple[str, ...], str | None], ssl.SSLContext] = (
            OrderedDict()
        )
        self.signed = 0
        self.contexts_made = 0

    def close(self) -> None:
        """Remove the temporary directory (also done when the forge is collected)."""
        self._dir.cleanup()

    # -- public ------------------------------------------------------------

    def context(self, names: Sequence[str], alpn: str | None) -> ssl.SSLContext:
        """A server context presenting a leaf for ``names`` (the first is the CN),
        offering only ``alpn`` (or no ALPN)."""
        key = (tuple(names), alpn)
        ctx = self._contexts.get(key)
        if ctx is not None:
            self._contexts.move_to_end(key)
            return ctx
        chain = self.chain_file(key[0])
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(chain, self.key_path)
        if alpn is not None:
            ctx.set_alpn_protocols([alpn])
        # No resumption tickets: a ticket costs an encryption per handshake and
        # the contexts come and go with the cache.
        ctx.num_tickets = 0
        if self.keylog:
            ctx.keylog_filename = self.keylog
        self.contexts_made += 1
        self._contexts[key] = ctx
        if len(self._contexts) > self.cache_size:
            self._contexts.popitem(last=False)
        return ctx

    def chain_file(self, names: tuple[str, ...]) -> Path:
        """The PEM file with the leaf for ``names`` then the CA, signed at first use."""
        path = self._chains.get(names)
        if path is not None:
            self._chains.move_to_end(names)
            return path
        leaf = self.sign(names)
        digest = hashlib.sha256("\0".join(names).encode("utf-8", "replace")).hexdigest()[:32]
        path = self.directory / f"leaf-{digest}.pem"
        path.write_bytes(leaf.public_bytes(serialization.Encoding.PEM) + self._ca_pem)
        self._chains[names] = path
        if len(self._chains) > self.cache_size:
            _, old = self._chains.popitem(last=False)
            old.unlink(missing_ok=True)
        return path

    def sign(self, names: Sequence[str]) -> x509.Certificate:
        """A new leaf for ``names`` (DNS names and IP addresses), signed by the CA."""
        if not names:
            raise ValueError("a leaf needs at least one name")
        sans: list[x509.GeneralName] = []
        for name in names:
            if is_ip(name):
                sans.append(x509.IPAddress(ipaddress.ip_address(name)))
            else:
                sans.append(x509.DNSName(name))
        # A CN is limited to 64 characters; SANs carry the names that count.
        common = names[0][:64]
        now = datetime.datetime.now(datetime.UTC)
        not_after = min(now + LEAF_VALIDITY, self.ca.cert.not_valid_after_utc)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)]))
            .issuer_name(self.ca.cert.subject)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(not_after)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(self._ca_ski),
                critical=False,
            )
            .sign(self.ca.key, hashes.SHA256())
        )
        self.signed += 1
        return cert


def names_of(cert: x509.Certificate) -> list[str]:
    """The DNS names and IP addresses a certificate's SAN extension lists, in order."""
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    names: list[str] = []
    for general in ext.value:
        if isinstance(general, x509.DNSName):
            names.append(general.value)
        elif isinstance(general, x509.IPAddress) and isinstance(
            general.value, ipaddress.IPv4Address | ipaddress.IPv6Address
        ):
            names.append(str(general.value))
    return names

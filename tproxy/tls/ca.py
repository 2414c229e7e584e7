"""The interception CA: made once by ``tproxy ca init``, trusted by clients, signs leaves.

A CA directory holds ``ca.pem`` (the self-signed certificate, what clients
trust) and ``ca-key.pem`` (its P-256 private key, mode 0600; the directory
itself is mode 0700). ``tproxy run --tls intercept --ca-dir DIR`` loads it
and signs one forged leaf per host with it (:mod:`tproxy.tls.certs`).
"""

from __future__ import annotations

import datetime
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

DEFAULT_CA_DIR = "/var/lib/tproxy/ca"
CA_DIR_ENV = "TPROXY_CA_DIR"
CERT_FILE = "ca.pem"
KEY_FILE = "ca-key.pem"
VALIDITY = datetime.timedelta(days=3650)


class CAError(Exception):
    """The CA directory is missing, incomplete or unreadable; the message says which."""


def default_ca_dir() -> Path:
    """``$TPROXY_CA_DIR`` if set, else ``/var/lib/tproxy/ca``."""
    return Path(os.environ.get(CA_DIR_ENV) or DEFAULT_CA_DIR)


@dataclass(frozen=True)
class CertificateAuthority:
    """A loaded CA: its certificate, key and where they live."""

    directory: Path
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def cert_path(self) -> Path:
        return self.directory / CERT_FILE

    @property
    def key_path(self) -> Path:
        return self.directory / KEY_FILE

    def fingerprint(self) -> str:
        """SHA-256 of the DER certificate, as ``AA:BB:...`` (what browsers show)."""
        digest = hashlib.sha256(self.der()).hexdigest().upper()
        return ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))

    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def der(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.DER)


def create(directory: Path, *, common_name: str = "tproxy interception CA") -> CertificateAuthority:
    """Make a new CA in ``directory``; refuse to overwrite one that is there.

    P-256 key (cheap leaves: a signature costs about 0.1 ms), self-signed,
    valid 10 years from an hour ago (clock skew between gateway and clients).
    """
    cert_path, key_path = directory / CERT_FILE, directory / KEY_FILE
    if cert_path.exists() or key_path.exists():
        raise CAError(f"a CA is already in {directory} (remove {CERT_FILE} and {KEY_FILE} first)")
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "tproxy"),
        ]
    )
    now = datetime.datetime.now(datetime.UTC)
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    # The key is born 0600: never readable by others, not even for an instant.
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key_pem)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return CertificateAuthority(directory, cert, key)


def load(directory: Path) -> CertificateAuthority:
    """Load the CA of ``directory``; :class:`CAError` says what is wrong."""
    cert_path, key_path = directory / CERT_FILE, directory / KEY_FILE
    if not cert_path.exists() and not key_path.exists():
        raise CAError(f"no CA in {directory}: run 'tproxy ca init --dir {directory}'")
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except OSError as exc:
        raise CAError(f"cannot read the CA in {directory}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise CAError(f"the CA in {directory} is not readable PEM: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CAError(f"the CA key in {directory} is not an EC key")
    if cert.public_key() != key.public_key():
        raise CAError(f"{CERT_FILE} and {KEY_FILE} in {directory} do not belong together")
    return CertificateAuthority(directory, cert, key)

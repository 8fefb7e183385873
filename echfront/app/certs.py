# -*- test-case-name: tests.test_local -*-
"""Self-signed certificate authority and certificates, for the demo and tests.

``twistd -n echfront`` with no configuration serves a demo that needs a
CA and certificates for a public name and a private name; the test suite
needs the same for its real TLS peers.  Production deployments bring their
own certificates (``[public] cert`` and ``[locals.X] cert`` settings).
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["IssuedCertificate", "TestCA"]

_VALIDITY = datetime.timedelta(days=825)


@dataclass(frozen=True)
class IssuedCertificate:
    """Files of one issued certificate.

    :ivar chain: PEM chain file, leaf first.
    :ivar key: PEM private key file (PKCS#8, mode 0600).
    :ivar combined: one PEM file with the chain and the key.
    """

    chain: Path
    key: Path
    combined: Path


class TestCA:
    """A small CA that writes its files into a directory.

    Not for production: keys are unencrypted and validity is long.
    """

    __test__ = False  # not a pytest test class, despite its name

    def __init__(self, directory: Path, name: str = "echfront demo CA") -> None:
        """Create (or load) a CA in ``directory``."""
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.cert_path = directory / "ca.pem"
        key_path = directory / "ca.key"
        if self.cert_path.exists() and key_path.exists():
            self._key = serialization.load_pem_private_key(key_path.read_bytes(), None)
            self.certificate = x509.load_pem_x509_certificate(self.cert_path.read_bytes())
            return
        self._key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.UTC)
        self.certificate = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + _VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                critical=True,
            )
            .sign(self._key, hashes.SHA256())
        )
        _write_private(key_path, _key_pem(self._key))
        self.cert_path.write_bytes(self.certificate.public_bytes(serialization.Encoding.PEM))

    def issue(self, names: Sequence[str], stem: str | None = None) -> IssuedCertificate:
        """Issue (or reuse) a server certificate for ``names`` (first is the CN)."""
        stem = stem or names[0].replace("*", "_wildcard")
        chain_path = self.directory / f"{stem}.pem"
        key_path = self.directory / f"{stem}.key"
        combined_path = self.directory / f"{stem}.combined.pem"
        if not (chain_path.exists() and key_path.exists() and combined_path.exists()):
            key = ec.generate_private_key(ec.SECP256R1())
            now = datetime.datetime.now(datetime.UTC)
            cert = (
                x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
                .issuer_name(self.certificate.subject)
                .public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(hours=1))
                .not_valid_after(now + _VALIDITY)
                .add_extension(
                    x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False
                )
                .add_extension(
                    x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
                )
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .sign(self._key, hashes.SHA256())  # type: ignore[arg-type]
            )
            chain = cert.public_bytes(serialization.Encoding.PEM) + self.certificate.public_bytes(
                serialization.Encoding.PEM
            )
            key_pem = _key_pem(key)
            chain_path.write_bytes(chain)
            _write_private(key_path, key_pem)
            _write_private(combined_path, chain + key_pem)
        return IssuedCertificate(chain_path, key_path, combined_path)


def _key_pem(key: ec.EllipticCurvePrivateKey | object) -> bytes:
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write_private(path: Path, data: bytes) -> None:
    """Write a file holding a private key, readable by the owner only."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)

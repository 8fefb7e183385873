"""Certificates for the front-to-exit link, and the front's ``tls:`` endpoint to an exit.

The link has a CA of its own (docs/security.rst advises one): it issues the
exit's server certificate and the fronts' client certificates.  A client
certificate from another CA is made too, for the exit to refuse.  Used by
tests.test_exit and benchmarks/hopbench.py.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["EXIT_NAME", "LinkPki", "exit_endpoint", "make_link_pki"]

#: The exit's certificate name, which the front checks.
EXIT_NAME = "exit.test"


def _certificate(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None,
    usage: x509.ObjectIdentifier | None,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    issuer_name, issuer_key = issuer if issuer is not None else (name, key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
    )
    if usage is None:  # a CA
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=0), True)
    else:
        builder = builder.add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), False)
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(subject)]), False)
    return builder.sign(issuer_key, hashes.SHA256())


@dataclass(frozen=True)
class LinkPki:
    """The front-to-exit link's certificates (a CA of its own, as docs/security.rst advises).

    :ivar ca_dir: a directory holding the CA, as ``tls:`` ``trustRoots`` wants.
    """

    ca: Path
    ca_dir: Path
    exit_cert: Path
    exit_key: Path
    front_cert: Path
    front_key: Path
    rogue_cert: Path
    rogue_key: Path


def _write_pair(directory: Path, stem: str, cert: x509.Certificate, key: object) -> Path:
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    (directory / f"{stem}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / f"{stem}.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return directory / f"{stem}.pem"


def make_link_pki(directory: Path) -> LinkPki:
    """A link CA with the exit's server certificate and the front's client certificate,
    and a client certificate from another CA."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _certificate("echfront link CA", ca_key, None, None)
    ca_dir = directory / "link-ca"
    ca_dir.mkdir()
    (ca_dir / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    issuer = (ca.subject, ca_key)
    exit_key = ec.generate_private_key(ec.SECP256R1())
    exit_cert = _certificate(EXIT_NAME, exit_key, issuer, ExtendedKeyUsageOID.SERVER_AUTH)
    front_key = ec.generate_private_key(ec.SECP256R1())
    front_cert = _certificate("front-1", front_key, issuer, ExtendedKeyUsageOID.CLIENT_AUTH)
    rogue_ca_key = ec.generate_private_key(ec.SECP256R1())
    rogue_ca = _certificate("another CA", rogue_ca_key, None, None)
    rogue_key = ec.generate_private_key(ec.SECP256R1())
    rogue = _certificate(
        "front-1", rogue_key, (rogue_ca.subject, rogue_ca_key), ExtendedKeyUsageOID.CLIENT_AUTH
    )
    return LinkPki(
        ca=ca_dir / "ca.pem",
        ca_dir=ca_dir,
        exit_cert=_write_pair(directory, "exit", exit_cert, exit_key),
        exit_key=directory / "exit.key",
        front_cert=_write_pair(directory, "front", front_cert, front_key),
        front_key=directory / "front.key",
        rogue_cert=_write_pair(directory, "rogue", rogue, rogue_key),
        rogue_key=directory / "rogue.key",
    )


def exit_endpoint(link: LinkPki, port: int) -> str:
    """The front's ``tls:`` endpoint to the exit: check its name, present our certificate."""
    return (
        f"tls:host={EXIT_NAME}:port={port}:endpoint=tcp\\:127.0.0.1\\:{port}"
        f":trustRoots={link.ca_dir}:certificate={link.front_cert}:privateKey={link.front_key}"
    )

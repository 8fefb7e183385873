"""The etcd client's TLS settings, without a cluster (tests/test_etcd.py runs one).

The client certificate must reach pyOpenSSL as cryptography objects (its
own X509 and PKey types are deprecated there, so a later pyOpenSSL would
refuse them), and a key that is not the certificate's must stop the front
at start-up with one line naming both files, not fail every handshake later.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory

from echfront.errors import ConfigError
from echfront.keys.etcd import _TLSPolicy
from echfront.keys.etcdapi import EtcdSettings
from tests.etcdcluster import TLSFiles, write_tls_files


@pytest.fixture
def tls_files(tmp_path: Path) -> TLSFiles:
    """A test CA with a client certificate and its key."""
    return write_tls_files(tmp_path)


def settings(cert: Path | None, key: Path | None, ca: Path | None = None) -> EtcdSettings:
    """Settings for one TLS endpoint on loopback with these files."""
    return EtcdSettings(("https://127.0.0.1:2379",), ca_file=ca, cert_file=cert, key_file=key)


def test_client_certificate_reaches_pyopenssl_without_deprecated_types(
    tls_files: TLSFiles,
) -> None:
    # No CA file: the system's trust store, so every warning here would be
    # about the client certificate.
    policy = _TLSPolicy(settings(tls_files.client_cert, tls_files.client_key))
    creator = policy.creatorForNetloc(b"127.0.0.1", 2379)
    factory = TLSMemoryBIOFactory(creator, True, Factory.forProtocol(Protocol))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tls = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 2379))
        assert tls is not None
        tls.makeConnection(StringTransport())  # the OpenSSL connection, and its ClientHello
    deprecated = [str(w.message) for w in caught if issubclass(w.category, DeprecationWarning)]
    assert deprecated == []
    # The certificate the connection will present is the configured one.
    presented = tls.getHandle().get_certificate()
    assert presented is not None
    expected = x509.load_pem_x509_certificate(tls_files.client_cert.read_bytes())
    assert presented.to_cryptography() == expected


def test_a_key_other_than_the_certificates_is_refused_at_start_up(
    tls_files: TLSFiles, tmp_path: Path
) -> None:
    other = tmp_path / "other.key"
    other.write_bytes(
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(ConfigError) as caught:
        _TLSPolicy(settings(tls_files.client_cert, other))
    assert str(caught.value) == f"etcd TLS: {other} is not the key of {tls_files.client_cert}"


def test_unreadable_and_missing_files_are_one_line_errors(
    tls_files: TLSFiles, tmp_path: Path
) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not PEM\n")
    with pytest.raises(ConfigError, match=r"^etcd TLS: unreadable certificate or key \("):
        _TLSPolicy(settings(garbage, tls_files.client_key))
    missing = tmp_path / "missing.key"
    with pytest.raises(ConfigError, match=rf"^etcd TLS: cannot read {re.escape(str(missing))} \("):
        _TLSPolicy(settings(tls_files.client_cert, missing))

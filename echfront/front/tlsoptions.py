# -*- test-case-name: tests.test_local -*-
"""Server TLS options for local services, from PEM files (pyOpenSSL).

:func:`load_certificate_options` builds the options a local service (the
public name's, or a configured local name's) terminates TLS with; the
configuration calls it, :mod:`echfront.front.local` uses what it returns.
Problems in the files are :class:`~echfront.errors.ConfigError` lines.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from OpenSSL import SSL
from twisted.internet.ssl import Certificate, CertificateOptions, KeyPair

from echfront.errors import ConfigError

if TYPE_CHECKING:
    from pathlib import Path

__all__ = ["NoApplicationProtocol", "load_certificate_options"]

_PEM_CERT = b"-----BEGIN CERTIFICATE-----"


def load_certificate_options(
    cert_path: Path, key_path: Path | None = None, *, alpn: Sequence[str] = ()
) -> CertificateOptions:
    """Build server TLS options from PEM files.

    :param cert_path: the certificate chain, leaf first; it may also hold the
        private key when ``key_path`` is None.
    :param key_path: the private key, if it is in its own file.
    :param alpn: protocols to negotiate, in preference order.
    :raises ConfigError: naming the file and the problem.
    """
    try:
        chain_pem = cert_path.read_bytes()
        key_pem = key_path.read_bytes() if key_path is not None else chain_pem
    except OSError as error:
        raise ConfigError(f"{error.filename}: cannot read ({error.strerror})") from None
    blocks = [_PEM_CERT + part for part in chain_pem.split(_PEM_CERT)[1:]]
    if not blocks:
        raise ConfigError(f"{cert_path}: no PEM CERTIFICATE block")
    try:
        key = KeyPair.load(key_pem, format=1)  # 1 = FILETYPE_PEM
    except Exception:
        raise ConfigError(f"{key_path or cert_path}: no usable PEM private key") from None
    try:
        certificate = Certificate.loadPEM(blocks[0])
        extra = [Certificate.loadPEM(block) for block in blocks[1:]]
    except Exception as error:
        raise ConfigError(f"{cert_path}: unreadable certificate ({error})") from None
    if certificate.getPublicKey().keyHash() != key.keyHash():
        raise ConfigError(f"{cert_path}: the private key does not match the certificate")
    # CertificateOptions hands these straight to pyOpenSSL, which wants
    # cryptography objects (its own X509/PKey types are deprecated).
    protocols = [p.encode() for p in alpn]
    options = CertificateOptions(
        privateKey=key.original.to_cryptography_key(),
        certificate=certificate.original.to_cryptography(),
        extraCertChain=[c.original.to_cryptography() for c in extra],
        acceptableProtocols=protocols or None,
    )
    # The context is built once and cached by the options: replace the ALPN
    # choice Twisted installed (see _select_alpn).
    options.getContext().set_alpn_select_callback(_select_alpn(protocols))
    return options


class NoApplicationProtocol(SSL.Error):
    """The client offered ALPN, none of it configured (RFC 7301 §3.2)."""


def _select_alpn(
    protocols: Sequence[bytes],
) -> Callable[[SSL.Connection, list[bytes]], bytes | SSL._NoOverlappingProtocols]:
    """The ALPN choice of a local service (RFC 7301 §3.2).

    Twisted's own callback, installed even with no protocols configured,
    answers an empty protocol when nothing overlaps, which OpenSSL turns
    into an internal_error alert: every client offering ALPN (every
    browser) would fail on a service without ``alpn``.  Here, a service
    without ``alpn`` ignores the extension, and one with ``alpn`` picks its
    most preferred protocol the client offered, or refuses with the
    no_application_protocol alert (120), as RFC 7301 §3.2 requires (OpenSSL
    sends it when the callback fails).
    """

    def select(
        connection: SSL.Connection, offered: list[bytes]
    ) -> bytes | SSL._NoOverlappingProtocols:
        if not protocols:
            return SSL.NO_OVERLAPPING_PROTOCOLS
        for protocol in protocols:
            if protocol in offered:
                return protocol
        # In OpenSSL's error-queue shape, which Twisted's TLS layer reads.
        raise NoApplicationProtocol([("SSL routines", "", "no application protocol")])

    return select

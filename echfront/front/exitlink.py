# -*- test-case-name: tests.test_exit -*-
"""The exit's end of the encrypted hop to backends (RFC 9849 §10.10.6).

In split mode the front forwards the ClientHelloInner, with the real server
name, to the backend.  Across a network the front does not control, that
hop is wrapped in TLS: the front connects with a ``tls:`` client endpoint
that presents a client certificate, and an *exit* echfront beside the
backends (``[exit]`` in its configuration) accepts it.  The exit's
listeners are wrapped here: :func:`exit_tls_options` requires TLS 1.3 and a
client certificate issued by the configured CA, and
:class:`ExitListenEndpoint` puts every accepted connection behind that TLS
layer before the front's protocol sees a byte.

:func:`trusted_link` is what lets the exit route a relayed ClientHelloInner
(which carries the inner-type ECH extension, RFC 9849 §5) as ECH accepted:
it is true only for a connection accepted by an exit listener whose peer
proved a certificate from that CA.  Any other connection, on any listener,
gets today's answer to an inner-type hello: illegal_parameter (§7).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.internet.ssl import (
    Certificate,
    CertificateOptions,
    TLSVersion,
    trustRootFromCertificates,
)
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from zope.interface import implementer

from echfront.errors import ConfigError
from echfront.front.tlsoptions import load_certificate_options

if TYPE_CHECKING:
    from pathlib import Path

    from twisted.internet.defer import Deferred
    from twisted.internet.interfaces import (
        IListeningPort,
        IProtocolFactory,
        IReactorTime,
        ITransport,
    )

__all__ = ["ExitLinkProtocol", "ExitListenEndpoint", "exit_tls_options", "trusted_link"]

_PEM_CERT = b"-----BEGIN CERTIFICATE-----"


class ExitLinkProtocol(TLSMemoryBIOProtocol):
    """The TLS layer of one connection from a front.

    Writes go through at once (not Twisted's buffering subclass): an alert
    written just before a close must not be held back and lost (the reason
    :mod:`echfront.front.local` does the same).
    """

    def makeConnection(self, transport: ITransport) -> None:
        """Send small writes at once (TCP_NODELAY), then start TLS.

        A relay forwards what it reads as it reads it; with Nagle's
        algorithm a small write that follows another one waits for the
        peer's delayed ACK (40 ms on Linux), which the TLS handshake's last
        flight followed by the first relayed bytes would hit every time.
        """
        set_no_delay = getattr(transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            set_no_delay(True)
        super().makeConnection(transport)  # type: ignore[no-untyped-call]

    def loseWriteConnection(self) -> None:
        """Half-close as TLS does it: close_notify after what is queued (RFC 8446 §6.1).

        Without this, the relay's half-close would reach the TCP transport
        underneath (the wrapper passes unknown attributes down) and end the
        stream with a bare FIN, which the front's TLS layer can only read as
        a truncation.  Reading goes on until the front closes too.
        """
        self.loseConnection()  # type: ignore[no-untyped-call]


class _ExitLinkFactory(TLSMemoryBIOFactory):
    protocol = ExitLinkProtocol


def trusted_link(transport: object) -> bool:
    """Whether ``transport`` is an exit link whose peer presented a verified certificate.

    The exit listener's TLS options make OpenSSL refuse a peer without a
    certificate from the configured CA before any application byte is
    delivered; the certificate is checked here again so that the answer
    never depends on that alone.
    """
    if not isinstance(transport, ExitLinkProtocol):
        return False
    peer: object = transport.getPeerCertificate()  # type: ignore[no-untyped-call]
    return peer is not None


def _ca_certificates(path: Path) -> list[Certificate]:
    """Every PEM certificate in ``path`` (the fronts' CA, perhaps several)."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ConfigError(f"exit.client_ca: {path}: cannot read ({error.strerror})") from None
    blocks = [_PEM_CERT + part for part in data.split(_PEM_CERT)[1:]]
    if not blocks:
        raise ConfigError(f"exit.client_ca: {path}: no PEM CERTIFICATE block")
    try:
        return [Certificate.loadPEM(block) for block in blocks]
    except Exception as error:  # pyOpenSSL raises its own Error types
        raise ConfigError(f"exit.client_ca: {path}: unreadable certificate ({error})") from None


def exit_tls_options(cert: Path, key: Path | None, client_ca: Path) -> CertificateOptions:
    """Server TLS options for an exit listener: TLS 1.3, a client certificate from ``client_ca``.

    :param cert: the exit's certificate chain, leaf first (the key may be in it).
    :param key: its private key, if in a file of its own.
    :raises ConfigError: naming the file and the problem.
    """
    try:
        own = load_certificate_options(cert, key)
    except ConfigError as error:
        raise ConfigError(f"exit.cert: {error}") from None
    authorities = _ca_certificates(client_ca)
    # trustRoot makes Twisted set VERIFY_PEER | VERIFY_FAIL_IF_NO_PEER_CERT:
    # a peer without a certificate, or with one from another CA, fails the
    # handshake (tests.test_exit checks both).
    return CertificateOptions(
        privateKey=own.privateKey,
        certificate=own.certificate,
        extraCertChain=own.extraCertChain,
        trustRoot=trustRootFromCertificates(authorities),
        raiseMinimumTo=TLSVersion.TLSv1_3,
    )


@implementer(IStreamServerEndpoint)
class ExitListenEndpoint:
    """A server endpoint whose connections are exit links (see the module docstring).

    :param endpoint: the listening endpoint of a ``listen`` entry.
    :param options: from :func:`exit_tls_options`.
    :param clock: for the TLS layer's timers.
    """

    def __init__(
        self, endpoint: IStreamServerEndpoint, options: CertificateOptions, clock: IReactorTime
    ) -> None:
        """Wrap ``endpoint``."""
        self.endpoint = endpoint
        self.options = options
        self.clock = clock

    def listen(self, protocolFactory: IProtocolFactory) -> Deferred[IListeningPort]:  # noqa: N803
        """Listen with ``protocolFactory`` behind the exit's TLS layer."""
        wrapped = _ExitLinkFactory(self.options, False, protocolFactory, clock=self.clock)
        return self.endpoint.listen(wrapped)

# -*- test-case-name: tests.test_local -*-
"""Terminating TLS in the front (pyOpenSSL), for the public name and local names.

The hand-off keeps the client's real transport: a server-side
``TLSMemoryBIOProtocol`` is connected to it and fed the buffered first
flight, and the front forwards every later read to it (delegation, not
class swapping).  For an ECH-accepted connection the first flight is the
rebuilt ClientHelloInner; OpenSSL 4.0 (bundled with cryptography >= 50)
then acts as the split-mode backend and confirms ECH itself (RFC 9849 §7.2).

pyOpenSSL has no ECH API, so a connection whose ECH was rejected and is
terminated here cannot receive ``retry_configs`` (RFC 9849 §7.1, checklist
REJ-2).  Route such connections to an ECH-capable public-name backend when
that matters (see docs/security.rst).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from OpenSSL import SSL
from twisted.internet.interfaces import IProtocolFactory, IReactorTime
from twisted.internet.ssl import Certificate, CertificateOptions, KeyPair
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import directlyProvides, providedBy

from echfront.ech.decoder import ClientHelloInfo
from echfront.errors import ConfigError, InternalError
from echfront.targets import Local

if TYPE_CHECKING:
    from pathlib import Path

    from echfront.front.protocol import ConnectionRecord, FrontProtocol, StreamTransport

__all__ = ["LocalHandoff", "hello_info_for", "load_certificate_options", "local_target"]

_PEM_CERT = b"-----BEGIN CERTIFICATE-----"

#: The decoded hello of each locally terminated connection, keyed by the TLS
#: protocol that is the application's transport; entries die with it.
_HELLO_BY_TRANSPORT: weakref.WeakKeyDictionary[object, ClientHelloInfo] = (
    weakref.WeakKeyDictionary()
)


def hello_info_for(transport: object) -> ClientHelloInfo | None:
    """The decoded ClientHello of a locally terminated connection.

    An application protocol behind local termination calls this with its
    own ``self.transport`` to learn the ECH outcome and the server name the
    client asked for (inner when ECH was accepted).
    """
    return _HELLO_BY_TRANSPORT.get(transport)


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


class _UnbufferedTLSFactory(TLSMemoryBIOFactory):
    """A TLS server factory whose protocol writes through at once.

    Since Twisted 23.10 the default protocol (``BufferingTLSTransport``)
    holds small writes until the next reactor turn.  When a client's last
    data and its close_notify arrive in one read, the application answers
    within that read, TLS then shuts down, and the held answer is dropped
    silently (tests.test_interop_front exercises exactly this).  Writing
    through costs one more TLS record per small write, which is harmless.
    """

    protocol = TLSMemoryBIOProtocol


def local_target(
    name: str, options: CertificateOptions, app_factory: IProtocolFactory, clock: IReactorTime
) -> Local:
    """A :class:`~echfront.targets.Local` target terminating TLS with ``options``."""
    return Local(name, _UnbufferedTLSFactory(options, False, app_factory, clock=clock))


class _CountingTransport:
    """The client transport as the TLS layer sees it: writes are counted.

    Everything else is the real transport's, and the proxy declares the
    same interfaces, so TLS half-close and producer handling are unchanged.
    """

    def __init__(self, transport: StreamTransport, record: ConnectionRecord) -> None:
        self._transport = transport
        self._record = record
        directlyProvides(self, providedBy(transport))

    def write(self, data: bytes) -> None:
        self._record.bytes_to_client += len(data)
        self._transport.write(data)

    def writeSequence(self, data: Iterable[bytes]) -> None:
        self.write(b"".join(data))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class LocalHandoff:
    """Connects a local TLS server to a client connection the front has read from."""

    def __init__(self, front: FrontProtocol, info: ClientHelloInfo, target: Local) -> None:
        """Prepare to hand ``front``'s connection to ``target``."""
        self.front = front
        self.info = info
        self.target = target
        self._tls: TLSMemoryBIOProtocol | None = None

    def start(self) -> None:
        """Build the TLS protocol on the client transport and replay the first flight."""
        front = self.front
        tls = self.target.tls_factory.buildProtocol(front.transport.getPeer())
        # Twisted's annotations say never None, but a factory may decline a
        # connection by returning None from buildProtocol.
        wrapped: object = tls.wrappedProtocol
        if wrapped is None:
            front.fail(InternalError(f"local service {self.target.name} refused the connection"))
            return
        _HELLO_BY_TRANSPORT[tls] = self.info
        self._tls = tls
        record = front.record
        tls.makeConnection(_CountingTransport(front.transport, record))

        def receive(data: bytes) -> None:
            record.bytes_from_client += len(data)
            tls.dataReceived(data)

        front.set_input(receive)
        # The first flight is counted as first_flight_bytes; only what
        # followed it counts as bytes from the client, as for relays.
        tls.dataReceived(self.info.forward)
        after = self.info.rest + front.take_held()
        if after:
            receive(after)
        front.transport.resumeProducing()

    def handshake_pending(self) -> bool:
        """Whether the TLS handshake is still under way.

        Twisted exposes completion only through ``IHandshakeListener`` on
        the application protocol, which applications need not provide; the
        flag read here is the one that drives that callback
        (tests.test_local checks a stalled handshake is still aborted).
        """
        return self._tls is not None and not getattr(self._tls, "_handshakeDone", True)

    def client_eof(self) -> None:
        """The client sent FIN; TLS has no half-close here, so close after flushing."""
        self.front.transport.loseConnection()

    def client_lost(self, reason: Failure) -> None:
        """Tell the TLS layer (and through it the application) the connection is gone."""
        if self._tls is not None:
            self._tls.connectionLost(reason)

    def abort(self) -> None:
        """Nothing to release besides the client transport, which the front closes."""

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

A client that wanted ECH and sees it rejected ends such a connection with
the ``ech_required`` alert (RFC 9849 §6.1.6).  Since the front terminates
TLS here it can read that alert, and it counts every alert clients send
(``echfront_client_alerts_total``): §7.1 tells servers to watch
``ech_required`` rather than decryption failures, which GREASE causes too.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from OpenSSL import SSL
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from zope.interface import directlyProvides, providedBy

from echfront.ech.decoder import ClientHelloInfo
from echfront.errors import InternalError
from echfront.targets import Local

if TYPE_CHECKING:
    from twisted.internet.interfaces import IProtocolFactory, IReactorTime
    from twisted.internet.ssl import CertificateOptions
    from twisted.python.failure import Failure

    from echfront.front.connection import ClientSide, ConnectionRecord, StreamTransport
    from echfront.front.metrics import Metrics

__all__ = ["LocalHandoff", "hello_info_for", "local_target"]

#: The decoded hello of each locally terminated connection, keyed by the TLS
#: protocol that is the application's transport; entries die with it.
_HELLO_BY_TRANSPORT: weakref.WeakKeyDictionary[object, ClientHelloInfo] = (
    weakref.WeakKeyDictionary()
)


#: Where the alerts each locally terminated connection's client sends are
#: counted, keyed like :data:`_HELLO_BY_TRANSPORT` (Twisted makes the TLS
#: protocol the pyOpenSSL connection's app data, which is how the context's
#: info callback finds the entry).
_ALERT_SINKS: weakref.WeakKeyDictionary[object, Callable[[int], object]] = (
    weakref.WeakKeyDictionary()
)


_READ_ALERT = SSL.SSL_CB_READ_ALERT


def _read_alerts(connection: SSL.Connection, where: int, value: int) -> None:
    """Hand each alert a client sends to its connection's sink (a pyOpenSSL info callback).

    OpenSSL calls it with ``SSL_CB_READ_ALERT`` and ``level << 8 |
    description`` for every alert record it reads.  close_notify (0) is the
    normal end of a connection, not worth a count.  Called from C: it must
    not raise, and it only looks things up.
    """
    # SSL_CB_READ_ALERT is two bits (read, alert): both must be set.
    if where & _READ_ALERT == _READ_ALERT and value & 0xFF:
        sink = _ALERT_SINKS.get(connection.get_app_data())
        if sink is not None:
            sink(value & 0xFF)


def hello_info_for(transport: object) -> ClientHelloInfo | None:
    """The decoded ClientHello of a locally terminated connection.

    An application protocol behind local termination calls this with its
    own ``self.transport`` to learn the ECH outcome and the server name the
    client asked for (inner when ECH was accepted).
    """
    return _HELLO_BY_TRANSPORT.get(transport)


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
    name: str, options: CertificateOptions, app_factory: IProtocolFactory, reactor: IReactorTime
) -> Local:
    """A :class:`~echfront.targets.Local` target terminating TLS with ``options``.

    :param options: from :func:`echfront.front.tlsoptions.load_certificate_options`;
        its context gets the info callback that reads clients' alerts.
    :param reactor: for the TLS layer's write timer.
    """
    # The context is built once and cached by the options (as tlsoptions
    # relies on for ALPN); every connection of this target shares it.
    options.getContext().set_info_callback(_read_alerts)
    return Local(name, _UnbufferedTLSFactory(options, False, app_factory, clock=reactor))


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
    """Connects a local TLS server to a client connection the front has read from.

    It satisfies :class:`~echfront.front.connection.Handler`.

    :param client: the client's connection; the hand-off rebinds its input.
    :param info: the decoded first ClientHello (what to replay to TLS).
    :param target: the local service.
    :param metrics: where the alerts the client sends are counted.
    """

    def __init__(
        self, client: ClientSide, info: ClientHelloInfo, target: Local, *, metrics: Metrics
    ) -> None:
        """Prepare to hand ``client``'s connection to ``target``."""
        self.client = client
        self.info = info
        self.target = target
        self.metrics = metrics
        self._tls: TLSMemoryBIOProtocol | None = None

    def start(self, pending: bytes) -> None:
        """Build the TLS protocol on the client transport and replay the first flight."""
        client = self.client
        tls = self.target.tls_factory.buildProtocol(client.transport.getPeer())
        # Twisted's annotations say never None, but a factory may decline a
        # connection by returning None from buildProtocol.
        wrapped: object = tls.wrappedProtocol
        if wrapped is None:
            error = InternalError(f"local service {self.target.name} refused the connection")
            client.refuse(error.alert, str(error))
            return
        _HELLO_BY_TRANSPORT[tls] = self.info
        _ALERT_SINKS[tls] = self.metrics.client_alert
        self._tls = tls
        record = client.record
        tls.makeConnection(_CountingTransport(client.transport, record))

        def receive(data: bytes) -> None:
            record.bytes_from_client += len(data)
            tls.dataReceived(data)

        client.set_input(receive)
        # The first flight is counted as first_flight_bytes; only what
        # followed it counts as bytes from the client, as for relays.
        tls.dataReceived(self.info.forward)
        if pending:
            receive(pending)
        client.transport.resumeProducing()

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
        self.client.transport.loseConnection()

    def client_lost(self, reason: Failure) -> None:
        """Tell the TLS layer (and through it the application) the connection is gone."""
        if self._tls is not None:
            self._tls.connectionLost(reason)

    def abort(self) -> None:
        """Nothing to release besides the client transport, which the front closes."""

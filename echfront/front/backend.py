# -*- test-case-name: tests.test_relay -*-
"""Reaching a backend: the connect, its timeout, and the backend connection's protocol.

:func:`connect_backend` connects to a :class:`~echfront.targets.Backend`
through its Twisted client endpoint (``tcp:``, ``unix:``, ``tls:`` or any
endpoint plugin), or for plain TCP backends straight through the reactor's
``connectTCP``, bounded by the backend's connect timeout.  What happens on
the connection is reported to a :class:`BackendListener` (the relay), which
this module does not import.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from twisted.internet.defer import TimeoutError
from twisted.internet.error import ConnectError, ConnectionRefusedError, DNSLookupError
from twisted.internet.error import TimeoutError as ConnectTimeoutError
from twisted.internet.interfaces import IHalfCloseableProtocol, IReactorTCP
from twisted.internet.protocol import ClientFactory, Factory
from twisted.internet.protocol import Protocol as TwistedProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred
    from twisted.internet.interfaces import IAddress, IConnector, IReactorTime

    from echfront.front.connection import StreamTransport
    from echfront.targets import Backend

__all__ = ["BackendListener", "BackendProtocol", "connect_backend", "connect_failure"]


class BackendListener(Protocol):
    """What the backend connection reports to (the relay satisfies it)."""

    def connected(self, peer: BackendProtocol) -> None:
        """The connection is up."""

    def connect_failed(self, failure: Failure) -> None:
        """The connection could not be made (or the attempt was cancelled)."""

    def from_backend(self, data: bytes) -> None:
        """Bytes from the backend, until the listener rebinds ``dataReceived``."""

    def backend_eof(self) -> None:
        """The backend sent FIN."""

    def backend_lost(self, reason: Failure) -> None:
        """The backend connection is gone."""


@implementer(IHalfCloseableProtocol)
class BackendProtocol(TwistedProtocol):
    """The backend side of a relay; its ``dataReceived`` is rebound by the relay."""

    transport: StreamTransport  # type: ignore[assignment]

    def __init__(self, listener: BackendListener, *, announce: bool = False) -> None:
        """Report to ``listener``; ``announce`` the connection when no Deferred will."""
        self.listener = listener
        self._announce = announce

    def connectionMade(self) -> None:
        """With a plain connector (no endpoint Deferred), tell the listener here."""
        if self._announce:
            self.listener.connected(self)

    def dataReceived(self, data: bytes) -> None:
        """Until the listener rebinds this, pass bytes to it."""
        self.listener.from_backend(data)

    def readConnectionLost(self) -> None:
        """The backend sent FIN."""
        self.listener.backend_eof()

    def writeConnectionLost(self) -> None:
        """Our FIN to the backend went out; nothing to do."""

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:  # noqa: B008
        """The backend connection is gone.

        The listener and the sink it bound both point back at the listener's
        side, which points here: dropped, so reference counting frees the
        connection at once rather than the garbage collector, later.
        """
        listener, self.listener = self.listener, _DETACHED
        self.__dict__.pop("dataReceived", None)
        listener.backend_lost(reason)


class _Detached:
    """The listener of a backend connection that has ended: nothing is reported."""

    def connected(self, peer: BackendProtocol) -> None:
        """Too late to be told."""

    def connect_failed(self, failure: Failure) -> None:
        """Too late to be told."""

    def from_backend(self, data: bytes) -> None:
        """Too late to be told."""

    def backend_eof(self) -> None:
        """Too late to be told."""

    def backend_lost(self, reason: Failure) -> None:
        """Too late to be told."""


_DETACHED: BackendListener = _Detached()


class _EndpointFactory(Factory):
    noisy = False

    def __init__(self, listener: BackendListener) -> None:
        self.listener = listener

    def buildProtocol(self, addr: IAddress) -> BackendProtocol:  # type: ignore[override]
        return BackendProtocol(self.listener)


class _DirectFactory(ClientFactory):
    """For ``tcp:`` backends: ``reactor.connectTCP`` without endpoint layers.

    The endpoint path costs a Deferred chain per connection and a wrapping
    protocol that adds a Python call to every backend read; for the plain
    TCP backends most deployments use, the connector does the same job.
    """

    noisy = False

    def __init__(self, listener: BackendListener) -> None:
        self.listener = listener

    def buildProtocol(self, addr: IAddress) -> BackendProtocol:  # type: ignore[override]
        return BackendProtocol(self.listener, announce=True)

    def clientConnectionFailed(self, connector: IConnector, reason: Failure) -> None:
        listener, self.listener = self.listener, _DETACHED
        listener.connect_failed(reason)

    def clientConnectionLost(self, connector: IConnector, reason: Failure) -> None:
        # Twisted's connector and its transport keep each other (and so this
        # factory) until a collection: let that cycle hold nothing of ours.
        self.listener = _DETACHED


def _timed_out(result: object, timeout: float) -> object:
    """Report a connect the timeout cancelled as a timeout, whatever the endpoint said.

    Endpoints fail a cancelled connect with their own errors (TCP endpoints
    with ConnectingCancelledError, which Deferred.addTimeout's default does
    not translate).  A connection that completed in the same instant is
    dropped: the client has already been refused.
    """
    if isinstance(result, BackendProtocol):
        result.transport.abortConnection()
    raise TimeoutError(timeout, "backend connect")


def connect_backend(
    backend: Backend, reactor: IReactorTime, listener: BackendListener
) -> Callable[[], object]:
    """Start connecting to ``backend``; return what cancels the attempt.

    ``listener`` then hears ``connected`` or ``connect_failed`` once.  An
    endpoint may answer before this returns; a ``tcp:`` backend (with a
    reactor providing ``IReactorTCP``) never does.
    """
    address = backend.address
    if address is not None and IReactorTCP.providedBy(reactor):
        connector = reactor.connectTCP(
            address[0], address[1], _DirectFactory(listener), timeout=backend.connect_timeout
        )
        return connector.stopConnecting
    d: Deferred[BackendProtocol] = backend.endpoint.connect(  # type: ignore[assignment]
        _EndpointFactory(listener)
    )
    d.addTimeout(backend.connect_timeout, reactor, onTimeoutCancel=_timed_out)
    cancel = d.cancel
    d.addCallbacks(listener.connected, listener.connect_failed)
    return cancel


def connect_failure(failure: Failure) -> tuple[str, str, bool]:
    """How a failed connect is counted and told: (kind, reason, expected).

    ``kind`` is the ``reason`` label of ``echfront_backend_failures_total``
    (timeout, refused, error); ``reason`` is the line logged; ``expected`` is
    False for a failure no endpoint should produce, worth a traceback.
    """
    if failure.check(TimeoutError, ConnectTimeoutError):
        kind, reason = "timeout", "backend connect timed out"
    else:
        kind = "refused" if failure.check(ConnectionRefusedError) else "error"
        reason = f"backend connect failed: {failure.getErrorMessage()}"
    expected = failure.check(
        ConnectError, ConnectionRefusedError, DNSLookupError, TimeoutError, ConnectTimeoutError
    )
    return kind, reason, expected is not None

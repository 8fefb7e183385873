# -*- test-case-name: tests.test_front -*-
"""The client-facing protocol: read the first flight, decode ECH, route, hand off.

:class:`FrontProtocol` owns the client's connection from accept to close.
It reads exactly one ClientHello (any fragmentation, bounded in bytes and
time), asks the decoder what it means and the router where it goes, then
hands the connection to a relay (:mod:`echfront.relay`) or to local TLS
(:mod:`echfront.local`).  It stops reading from the client as soon as the
ClientHello is complete, so nothing is read past what the hand-off needs,
and it never closes without telling the client why: every refusal is a
precise TLS alert.

Everything a connection needs (decoder, router, allowed targets, limits) is
one immutable :class:`FrontState`.  The factory holds the current state and
a reload swaps it; each connection keeps the state it was accepted with.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from typing import Protocol as TypingProtocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IHalfCloseableProtocol, IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from echfront.decoder import ClientHelloInfo, ECHDecoder
from echfront.errors import AlertDescription, AlertError, InternalError, alert_record
from echfront.hello import HANDSHAKE_CLIENT_HELLO
from echfront.interfaces import IRouter
from echfront.local import LocalHandoff
from echfront.records import DEFAULT_MAX_FLIGHT, HandshakeReader
from echfront.relay import Relay
from echfront.routing import Backend, Local, Reject, Route

if TYPE_CHECKING:
    from twisted.internet.interfaces import IAddress, IDelayedCall

__all__ = [
    "ConnectionRecord",
    "FrontFactory",
    "FrontProtocol",
    "FrontSettings",
    "FrontState",
    "StreamTransport",
]


class StreamTransport(TypingProtocol):
    """What the front needs of a connected stream transport (TCP, UNIX, TLS...).

    Twisted types ``Protocol.transport`` as an optional ``ITransport``; the
    producer and abort methods used here are on every stream transport
    Twisted has, so protocols here narrow the attribute to this.
    """

    def write(self, data: bytes) -> None: ...
    def loseConnection(self) -> None: ...
    def abortConnection(self) -> None: ...
    def getPeer(self) -> IAddress: ...
    def getHost(self) -> IAddress: ...
    def pauseProducing(self) -> None: ...
    def resumeProducing(self) -> None: ...
    def registerProducer(self, producer: Any, streaming: bool) -> None: ...
    def unregisterProducer(self) -> None: ...


@dataclass(frozen=True)
class FrontSettings:
    """Limits of the handshake phase, each with a safe default.

    :ivar first_flight_timeout: seconds to receive the whole ClientHello;
        a client that is slower is aborted (slowloris, checklist PAR-10).
    :ivar handshake_timeout: seconds from the ClientHello to the end of the
        inspected phase: the backend's ServerHello when relaying, the TLS
        handshake when terminating locally.
    :ivar max_first_flight: bytes of records the ClientHello may occupy.
    """

    first_flight_timeout: float = 10.0
    handshake_timeout: float = 30.0
    max_first_flight: int = DEFAULT_MAX_FLIGHT


@dataclass(frozen=True)
class FrontState:
    """What a connection is decided with; replaced as a whole on reload.

    :ivar targets: the only connectable targets; a router returning any
        other is refused, so the front is never an open proxy.
    """

    decoder: ECHDecoder
    router: IRouter
    targets: frozenset[Backend | Local]
    settings: FrontSettings = field(default_factory=FrontSettings)


@dataclass
class ConnectionRecord:
    """Facts about one connection, filled in as it progresses (for logs, metrics)."""

    started: float
    peer: str = ""
    info: ClientHelloInfo | None = None
    route: str = ""
    alert: AlertDescription | None = None
    close_reason: str = ""


@implementer(IHalfCloseableProtocol)
class FrontProtocol(Protocol):
    """One client connection (see the module docstring).

    ``dataReceived`` is rebound per phase: the first-flight reader, then a
    holding buffer while routing, then the relay or the local TLS protocol,
    and finally, on the relay fast path, the backend transport's ``write``
    itself, so relayed bytes cost no Python frame of ours.
    """

    factory: FrontFactory
    transport: StreamTransport  # type: ignore[assignment]
    log = Logger()

    def __init__(self, state: FrontState, clock: IReactorTime) -> None:
        """Serve one connection under ``state``."""
        self.state = state
        self.clock = clock
        self.record = ConnectionRecord(started=time.monotonic())
        self.info: ClientHelloInfo | None = None
        self._reader: HandshakeReader | None = HandshakeReader(
            HANDSHAKE_CLIENT_HELLO, max_bytes=state.settings.max_first_flight
        )
        self._timer: IDelayedCall | None = None
        self._held: list[bytes] = []
        self._handler: Relay | LocalHandoff | None = None
        self._closed = False

    # -- phase 1: the first flight ---------------------------------------

    def connectionMade(self) -> None:
        """Start the first-flight deadline."""
        self.record.peer = str(self.transport.getPeer())
        self._start_timer(self.state.settings.first_flight_timeout, "first flight timeout")

    def dataReceived(self, data: bytes) -> None:
        """Feed the first-flight reader; decode and route once it is complete."""
        reader = self._reader
        if reader is None:  # a transport that ignored pauseProducing; keep it bounded
            self._hold(data)
            return
        try:
            flight = reader.feed(data)
            if flight is None:
                return
            self._reader = None
            self.transport.pauseProducing()
            self.dataReceived = self._hold  # type: ignore[method-assign]
            info = self.state.decoder.decode(flight)
        except AlertError as error:
            self.fail(error)
            return
        self.info = self.record.info = info
        self._start_timer(self.state.settings.handshake_timeout, "handshake timeout")
        try:
            route = self.state.router.route(info, self.transport.getPeer())
        except Exception:
            self.log.failure("router failed")
            self.fail(InternalError("router failed"))
            return
        if isinstance(route, Deferred):
            route.addCallbacks(self._routed, self._route_failed)
        else:
            self._routed(route)

    def _hold(self, data: bytes) -> None:
        """Keep bytes that arrive before the hand-off, within the flight bound."""
        self._held.append(data)
        if sum(map(len, self._held)) > self.state.settings.max_first_flight:
            self.abort("client sent too much before the hand-off")

    def take_held(self) -> bytes:
        """Return and forget bytes received since the ClientHello completed."""
        held = b"".join(self._held)
        self._held.clear()
        return held

    # -- phase 2: routing --------------------------------------------------

    def _route_failed(self, failure: Failure) -> None:
        if self._closed:
            return
        self.log.failure("router failed", failure)
        self.fail(InternalError("router failed"))

    def _routed(self, route: Route) -> None:
        """Hand the connection to its target (or refuse it)."""
        if self._closed:
            return
        self.record.route = route.name if isinstance(route, Backend | Local | Reject) else "?"
        if isinstance(route, Reject):
            self.send_alert(route.alert, route.reason or "rejected by router")
            return
        if route not in self.state.targets:
            # Never an open proxy: a router may only return configured targets.
            self.log.error("router returned an unconfigured target {route!r}", route=route)
            self.fail(InternalError("router returned an unconfigured target"))
            return
        info = self.info
        assert info is not None
        if isinstance(route, Backend):
            relay = Relay(self, info, route, self.clock)
            self._handler = relay
            relay.connect()
        else:
            handoff = LocalHandoff(self, info, route)
            self._handler = handoff
            handoff.start()

    # -- hooks for handlers --------------------------------------------------

    def set_input(self, sink: Callable[[bytes], Any]) -> None:
        """Send every later read from the client to ``sink``."""
        self.dataReceived = sink  # type: ignore[method-assign,assignment]

    def handshake_done(self) -> None:
        """The inspected phase is over: stop the handshake deadline."""
        self._cancel_timer()

    def fail(self, error: AlertError) -> None:
        """Refuse the connection with the error's alert."""
        self.send_alert(error.alert, str(error))

    def send_alert(self, alert: AlertDescription, reason: str) -> None:
        """Send a fatal alert and close (RFC 8446 §6.2)."""
        if self._closed:
            return
        self.record.alert = alert
        self.record.close_reason = reason
        self.log.debug("refusing {peer}: {reason}", peer=self.record.peer, reason=reason)
        self.transport.write(alert_record(alert))
        self.close()

    def close(self) -> None:
        """Close after the written bytes are flushed; the backend too, if any."""
        if self._handler is not None:
            self._handler.abort()
        self.transport.loseConnection()

    def abort(self, reason: str) -> None:
        """Drop the connection at once (timeouts, abuse): nothing more is sent."""
        if self._closed:
            return
        self.record.close_reason = self.record.close_reason or reason
        if self._handler is not None:
            self._handler.abort()
        self.transport.abortConnection()

    # -- timers ---------------------------------------------------------------

    def _start_timer(self, seconds: float, reason: str) -> None:
        self._cancel_timer()
        self._timer = self.clock.callLater(seconds, self._timed_out, reason)

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _timed_out(self, reason: str) -> None:
        self._timer = None
        if self._handler is not None and not self._handler.handshake_pending():
            return  # the handshake finished just in time
        self.abort(reason)

    # -- close ------------------------------------------------------------------

    def readConnectionLost(self) -> None:
        """The client sent FIN (IHalfCloseableProtocol)."""
        if self._handler is not None:
            self._handler.client_eof()
        else:
            # Before a hand-off a half-close ends the attempt: the ClientHello
            # is incomplete or the target not chosen yet.
            self.record.close_reason = self.record.close_reason or "client closed"
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        """Our write side is closed; nothing to do (IHalfCloseableProtocol)."""

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:  # noqa: B008
        """Tidy up: timers, the handler, and report the connection."""
        self._closed = True
        self._cancel_timer()
        if not self.record.close_reason:
            self.record.close_reason = reason.getErrorMessage()
        if self._handler is not None:
            self._handler.client_lost(reason)
        self.factory.connection_closed(self)


class FrontFactory(Factory):
    """Builds :class:`FrontProtocol` instances with the current state.

    :ivar state: the state new connections get; assign to reload.
    :ivar clock: the reactor (or a test clock) for every timer.
    """

    protocol = FrontProtocol  # type: ignore[assignment]
    noisy = False

    def __init__(self, state: FrontState, clock: IReactorTime) -> None:
        """Serve with ``state`` and ``clock``."""
        self.state = state
        self.clock = clock
        self.open_connections = 0

    def buildProtocol(self, addr: IAddress) -> FrontProtocol:  # type: ignore[override]
        """Build a protocol bound to the current state."""
        proto = FrontProtocol(self.state, self.clock)
        proto.factory = self
        self.open_connections += 1
        return proto

    def connection_closed(self, proto: FrontProtocol) -> None:
        """Called once per connection when it closes."""
        self.open_connections -= 1

# -*- test-case-name: tests.test_front -*-
"""The client-facing protocol: read the first flight, decode ECH, route, hand off.

:class:`FrontProtocol` owns the client's connection from accept to close.
It reads exactly one ClientHello (any fragmentation, bounded in bytes and
time), asks the decoder what it means and the router where it goes, then
hands the connection to a relay (:mod:`echfront.front.relay`) or to local TLS
(:mod:`echfront.front.local`).  It stops reading from the client as soon as the
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

from echfront.ech.decoder import ClientHelloInfo, ECHDecoder, HelloSummary
from echfront.errors import AlertDescription, AlertError, InternalError, alert_record
from echfront.front.limits import AddressLimits, address_key
from echfront.front.local import LocalHandoff
from echfront.front.metrics import Metrics
from echfront.front.relay import Relay
from echfront.interfaces import IRouter
from echfront.logs import log_connection
from echfront.targets import Backend, Local, Reject, Route
from echfront.tls.hello import HANDSHAKE_CLIENT_HELLO
from echfront.tls.records import DEFAULT_MAX_FLIGHT, HandshakeReader

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
    """Limits and switches that may change on reload, each with a safe default.

    :ivar first_flight_timeout: seconds to receive the whole ClientHello;
        a client that is slower is aborted (slowloris, checklist PAR-10).
    :ivar handshake_timeout: seconds from the ClientHello to the end of the
        inspected phase: the backend's ServerHello when relaying, the TLS
        handshake when terminating locally.
    :ivar max_first_flight: bytes of records the ClientHello may occupy.
    :ivar idle_timeout: seconds without a byte either way after which a
        relayed or locally served connection is closed (0: never).  Checked
        by a sweep every ``idle_timeout / 2`` seconds, so a connection is
        closed after between one and one and a half times this.
    :ivar max_connections: open client connections; new ones beyond it are
        closed at once (0: unlimited).
    :ivar max_first_flights_per_address: unfinished first flights per client
        address (IPv6: per /64); more are closed at once (0: unlimited).
    :ivar hpke_rate: HPKE decryptions per second per client address (0:
        unlimited); a ClientHello beyond it gets handshake_failure.
    :ivar hpke_burst: how many of those may come at once.
    :ivar log_server_names: log the inner server name of ECH connections.
    :ivar shutdown_grace: seconds open connections get to finish on shutdown.
    :ivar splice: relay with splice(2) once inspection is over (Linux).
    """

    first_flight_timeout: float = 10.0
    handshake_timeout: float = 30.0
    max_first_flight: int = DEFAULT_MAX_FLIGHT
    idle_timeout: float = 300.0
    max_connections: int = 10000
    max_first_flights_per_address: int = 64
    hpke_rate: float = 200.0
    hpke_burst: float = 400.0
    log_server_names: bool = False
    shutdown_grace: float = 30.0
    splice: bool = True


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
    """Facts about one connection, filled in as it progresses (for logs, metrics).

    :ivar started: the clock's seconds at accept.
    :ivar address: the client address as limits account it.
    :ivar limit: the limit that closed the connection, if one did.
    """

    started: float
    peer: str = ""
    address: str = ""
    hello: HelloSummary | None = None
    route: str = ""
    alert: AlertDescription | None = None
    close_reason: str = ""
    limit: str = ""
    first_flight_bytes: int = 0
    hello_retry: bool = False
    bytes_from_client: int = 0
    bytes_to_client: int = 0
    zero_copy: bool = False


def format_address(address: object) -> str:
    """``host:port`` (``[host]:port`` for IPv6), or the address's own text."""
    host = getattr(address, "host", None)
    port = getattr(address, "port", None)
    if isinstance(host, str) and isinstance(port, int):
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    name = getattr(address, "name", None)
    return name.decode("utf-8", "replace") if isinstance(name, bytes) else str(address)


@implementer(IHalfCloseableProtocol)
class FrontProtocol(Protocol):
    """One client connection (see the module docstring).

    ``dataReceived`` is rebound per phase: the first-flight reader, then a
    holding buffer while routing, then the relay or the local TLS protocol,
    and finally, on the relay fast path, a two-line function that counts the
    bytes and writes them to the backend transport.
    """

    factory: FrontFactory
    transport: StreamTransport  # type: ignore[assignment]
    log = Logger()

    def __init__(self, state: FrontState, clock: IReactorTime) -> None:
        """Serve one connection under ``state``."""
        self.state = state
        self.clock = clock
        self.record = ConnectionRecord(started=clock.seconds())
        self.info: ClientHelloInfo | None = None
        self._reader: HandshakeReader | None = HandshakeReader(
            HANDSHAKE_CLIENT_HELLO, max_bytes=state.settings.max_first_flight
        )
        self._timer: IDelayedCall | None = None
        self._held: list[bytes] = []
        self._handler: Relay | LocalHandoff | None = None
        self._closed = False
        #: Idle sweep bookkeeping: bytes seen at the last sweep, and sweeps since.
        self.seen_activity = -1
        self.quiet_sweeps = 0

    # -- phase 1: the first flight ---------------------------------------

    def connectionMade(self) -> None:
        """Start the first-flight deadline."""
        self.record.peer = format_address(self.transport.getPeer())
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
            self.factory.first_flight_done(self, len(flight.records))
            decode_started = time.perf_counter()
            info = self.state.decoder.decode(flight, may_decrypt=self._may_decrypt)
        except AlertError as error:
            self.fail(error)
            return
        if info.config_id is not None:
            self.factory.metrics.decode_seconds.observe(time.perf_counter() - decode_started)
        self.info = info
        self.record.hello = info.summary
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

    def _may_decrypt(self) -> bool:
        """The decoder asks before spending an HPKE operation (RFC 9849 §10.4)."""
        settings = self.state.settings
        allowed = self.factory.limits.take_hpke(
            self.record.address, settings.hpke_rate, settings.hpke_burst
        )
        if not allowed:
            self.record.limit = "hpke_rate"
        return allowed

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
        """The inspected phase is over: stop the deadline, release the hellos.

        An idle relayed connection should cost little memory; the decoded
        hellos (several KiB) are no longer needed, ``record.hello`` keeps
        what the logs and metrics report.
        """
        self._cancel_timer()
        self.info = None

    @property
    def handed_off(self) -> bool:
        """Whether the connection is past its handshake phase (relaying or served)."""
        return self._handler is not None and not self._handler.handshake_pending()

    def fail(self, error: AlertError) -> None:
        """Refuse the connection with the error's alert."""
        self.send_alert(error.alert, str(error))

    def send_alert(self, alert: AlertDescription, reason: str) -> None:
        """Send a fatal alert and close (RFC 8446 §6.2)."""
        if self._closed:
            return
        self.record.alert = alert
        self.record.close_reason = reason  # reported by the connection's log event
        self.transport.write(alert_record(alert))
        self.close()

    def close(self) -> None:
        """Close after the written bytes are flushed; the backend too, if any."""
        if self._handler is not None:
            self._handler.abort()
        self.transport.loseConnection()

    def abort(self, reason: str, *, limit: str = "") -> None:
        """Drop the connection at once (timeouts, abuse): nothing more is sent."""
        if self._closed:
            return
        self.record.close_reason = self.record.close_reason or reason
        self.record.limit = self.record.limit or limit
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
        if self.handed_off:
            return  # the handshake finished just in time
        self.abort(reason, limit=reason.replace(" ", "_"))

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
    """Builds :class:`FrontProtocol` instances and keeps what they share.

    :ivar state: the state new connections get; assign to reload.
    :ivar clock: the reactor (or a test clock) for every timer.
    :ivar metrics: the front's metrics.
    :ivar limits: per-address first flights and HPKE buckets (survive reloads).
    :ivar connections: the open connections.
    """

    protocol = FrontProtocol  # type: ignore[assignment]
    noisy = False

    def __init__(
        self, state: FrontState, clock: IReactorTime, metrics: Metrics | None = None
    ) -> None:
        """Serve with ``state`` and ``clock``."""
        self.state = state
        self.clock = clock
        self.metrics = metrics if metrics is not None else Metrics()
        self.limits = AddressLimits(clock.seconds)
        self.connections: set[FrontProtocol] = set()
        self._sweeper: IDelayedCall | None = None

    @property
    def open_connections(self) -> int:
        """Number of open client connections."""
        return len(self.connections)

    def buildProtocol(self, addr: IAddress) -> FrontProtocol | None:  # type: ignore[override]
        """Build a protocol bound to the current state, or None to refuse at once."""
        settings = self.state.settings
        if settings.max_connections and len(self.connections) >= settings.max_connections:
            self.metrics.limited.labels("max_connections").inc()
            return None
        host = getattr(addr, "host", None)
        key = address_key(host) if isinstance(host, str) else ""
        if not self.limits.start_first_flight(key, settings.max_first_flights_per_address):
            self.metrics.limited.labels("first_flights_per_address").inc()
            return None
        proto = FrontProtocol(self.state, self.clock)
        proto.factory = self
        proto.record.address = key
        self.connections.add(proto)
        self.metrics.active.inc()
        self._schedule_sweep()
        return proto

    def first_flight_done(self, proto: FrontProtocol, size: int) -> None:
        """The connection's ClientHello is complete."""
        self.limits.end_first_flight(proto.record.address)
        proto.record.first_flight_bytes = size
        self.metrics.first_flight_bytes.observe(size)
        self.metrics.first_flight_seconds.observe(self.clock.seconds() - proto.record.started)

    def connection_closed(self, proto: FrontProtocol) -> None:
        """Called once per connection when it closes: account and log it."""
        self.connections.discard(proto)
        if not proto.record.first_flight_bytes:  # closed before its ClientHello was complete
            self.limits.end_first_flight(proto.record.address)
        self.metrics.active.dec()
        if not self.connections:
            self._stop_sweep()  # no timer runs while the front is idle
        self.metrics.closed(proto.record)
        log_connection(
            proto.record,
            self.clock.seconds(),
            log_server_names=proto.state.settings.log_server_names,
        )

    # -- the idle sweep -------------------------------------------------------

    def _schedule_sweep(self) -> None:
        if self._sweeper is None:
            interval = self.state.settings.idle_timeout / 2 or 30.0
            self._sweeper = self.clock.callLater(interval, self._sweep)

    def _sweep(self) -> None:
        """Close handed-off connections with no traffic for two sweeps.

        Counting bytes costs one addition per read; a timer per read would
        cost a reschedule each.  A connection whose byte counts did not move
        between two consecutive sweeps has been idle for at least
        ``idle_timeout``.
        """
        self._sweeper = None
        settings = self.state.settings
        if settings.idle_timeout:
            for proto in list(self.connections):
                if not proto.handed_off:
                    continue
                activity = proto.record.bytes_from_client + proto.record.bytes_to_client
                if activity != proto.seen_activity:
                    proto.seen_activity = activity
                    proto.quiet_sweeps = 0
                    continue
                proto.quiet_sweeps += 1
                if proto.quiet_sweeps >= 2:
                    proto.abort("idle timeout", limit="idle_timeout")
        self.limits.sweep(settings.hpke_rate, settings.hpke_burst)
        if self.connections:
            self._schedule_sweep()

    def _stop_sweep(self) -> None:
        if self._sweeper is not None and self._sweeper.active():
            self._sweeper.cancel()
        self._sweeper = None

    def stopFactory(self) -> None:
        """Stop the sweep (the listener is gone)."""
        self._stop_sweep()

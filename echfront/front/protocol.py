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

The hand-off is declared in :mod:`echfront.front.connection`: the protocol
is the handlers' :class:`~echfront.front.connection.ClientSide`, and gives
each handler what it uses (reactor, metrics, settings, the pending bytes)
as arguments.  What a connection is decided with is one immutable
:class:`~echfront.front.state.FrontState`, which a reload replaces.

Why this module is long: it is one connection's life from accept
to close (admission, a balancer's PROXY header, the first flight, routing,
deadlines) and the factory that accounts for all of them; the phases share
private state (the deadline, held bytes, the unfinished-first-flight
count) that a split would have to expose.  What does not need that state
lives beside it: :mod:`~echfront.front.accept`, :mod:`~echfront.front.limits`,
:mod:`~echfront.front.proxyproto`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from echfront.errors import AlertDescription, AlertError, InternalError, alert_record
from echfront.front.accept import ListenerFactory, proxied_addresses, trusted
from echfront.front.connection import (
    ConnectionRecord,
    format_address,
)
from echfront.front.connlog import ConnectionLog, emit_connection
from echfront.front.exitlink import trusted_link
from echfront.front.limits import AddressLimits, address_key
from echfront.front.local import LocalHandoff
from echfront.front.metrics import Metrics
from echfront.front.proxyproto import ProxyHeaderError, ProxyHeaderReader
from echfront.front.relay import Relay
from echfront.targets import Backend, Local, Reject, Route
from echfront.tls.hello import HANDSHAKE_CLIENT_HELLO
from echfront.tls.records import HandshakeReader

if TYPE_CHECKING:
    from twisted.internet.interfaces import IAddress, IDelayedCall, IReactorTime

    from echfront.ech.decoder import ClientHelloInfo
    from echfront.front.connection import ClientSide, Handler, StreamTransport
    from echfront.front.proxyproto import ProxyHeader
    from echfront.front.state import FrontState

__all__ = ["FrontFactory", "FrontProtocol", "log_connection"]


def log_connection(record: ConnectionRecord, now: float, *, log_server_names: bool) -> None:
    """Emit the connection's one event (level info) now; ``now`` in the reactor's seconds.

    Observers (:mod:`echfront.logs`) write its fields, documented in
    docs/operations.rst, as JSON or text.  The factory batches these
    (:class:`~echfront.front.connlog.ConnectionLog`).
    """
    emit_connection(record, now, log_server_names=log_server_names)


@implementer(IHalfCloseableProtocol)
class FrontProtocol(Protocol):
    """One client connection (see the module docstring).

    It is the :class:`~echfront.front.connection.ClientSide` its handler
    works with.  ``dataReceived`` is rebound per phase: the first-flight
    reader, then a holding buffer while routing, then the relay or the local
    TLS protocol, and finally, on the relay fast path, a two-line function
    that counts the bytes and writes them to the backend transport.

    :param state: what the connection is decided with.
    :param reactor: for the deadlines, and handed to the handler.
    :param proxied: the connection comes from a balancer on a ``[proxy]
        listen`` endpoint and starts with a PROXY header, read (within the
        first-flight deadline and size) before the ClientHello.
    """

    factory: FrontFactory
    transport: StreamTransport  # type: ignore[assignment]
    log = Logger()

    def __init__(self, state: FrontState, reactor: IReactorTime, *, proxied: bool = False) -> None:
        """Serve one connection under ``state``."""
        self.state = state
        self.reactor = reactor
        self.record = ConnectionRecord(started=reactor.seconds())
        self.info: ClientHelloInfo | None = None
        self._reader: HandshakeReader | None = HandshakeReader(
            HANDSHAKE_CLIENT_HELLO, max_bytes=state.settings.max_first_flight
        )
        self._timer: IDelayedCall | None = None
        #: What the running deadline is for (logged if it fires).
        self._timer_reason = ""
        self._held: list[bytes] = []
        #: Bytes held in all, taken or not: the bound is on the total.
        self._held_bytes = 0
        self._handler: Handler | None = None
        self._closed = False
        #: Set by close(): a close waiting for its bytes to leave keeps a deadline.
        self._closing = False
        proxy_reader = ProxyHeaderReader(state.settings.max_first_flight) if proxied else None
        self._proxy_reader = proxy_reader
        #: The key this connection's unfinished first flight is counted
        #: under by the factory's limits; None once it is not counted.
        self.pending_key: str | None = None
        #: Idle sweep bookkeeping: bytes seen at the last sweep, and sweeps since.
        self.seen_activity = -1
        self.quiet_sweeps = 0

    # -- phase 1: the first flight ---------------------------------------

    def connectionMade(self) -> None:
        """Start the first-flight deadline."""
        self.record.peer = format_address(self.transport.getPeer())
        self._start_timer(self.state.settings.first_flight_timeout, "first flight timeout")
        if self._proxy_reader is not None:
            self.dataReceived = self._read_proxy_header  # type: ignore[method-assign]

    def _read_proxy_header(self, data: bytes) -> None:
        """Read a balancer's PROXY header, then go on with the first flight.

        The header's bytes are consumed here, before the ClientHello; the
        connection is the client's own from then on (half-close, splice).
        A connection without a valid header is dropped, with no alert: its
        peer is a balancer, not a TLS client.
        """
        reader = self._proxy_reader
        assert reader is not None
        try:
            done = reader.feed(data)
        except ProxyHeaderError as error:
            self.abort(str(error), limit="proxy_header")
            return
        if done is None:
            return
        header, rest = done
        self._proxy_reader = None
        del self.dataReceived  # the class's first-flight reader from here on
        if self.factory.proxy_header_read(self, header) and rest:
            self.dataReceived(rest)

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
            decoder = self.state.decoder
            # An exit's link from a front carries ClientHelloInners (RFC 9849 §10.10.6).
            decode = decoder.decode_relayed if trusted_link(self.transport) else decoder.decode
            info = decode(flight, may_decrypt=self._may_decrypt)
        except AlertError as error:
            self.fail(error)
            return
        if info.config_id is not None:
            self.factory.metrics.decode_seconds.observe(time.perf_counter() - decode_started)
        self.info = info
        self.record.hello = info.summary
        self._start_timer(self.state.settings.handshake_timeout, "handshake timeout")
        try:
            route = self.state.router.route(info, self._client_address())
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
        limits = self.factory.limits
        key = self.record.address
        if not limits.take_hpke(key, settings.hpke_rate, settings.hpke_burst):
            self.record.limit = "hpke_rate"
            return False
        if limits.shed(key, settings.saturation_first_flights):
            # Saturated, and this address asks far beyond its share.
            self.record.limit = "hpke_fair_share"
            return False
        return True

    def _client_address(self) -> IAddress:
        """The client's address: a balancer's PROXY header's, or the transport's peer."""
        proxied = self.record.proxied
        return proxied[0] if proxied is not None else self.transport.getPeer()

    def _hold(self, data: bytes) -> None:
        """Keep bytes that arrive before the handler reads, within the flight bound."""
        self._held.append(data)
        self._held_bytes += len(data)
        if self._held_bytes > self.state.settings.max_first_flight:
            self.abort("client sent too much before the hand-off")

    def _take_held(self) -> bytes:
        """Return and forget bytes received since the ClientHello completed."""
        if not self._held:
            return b""
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
            self.refuse(route.alert, route.reason or "rejected by router")
            return
        if route not in self.state.targets:
            # Never an open proxy: a router may only return configured targets.
            self.log.error("router returned an unconfigured target {route!r}", route=route)
            self.fail(InternalError("router returned an unconfigured target"))
            return
        info = self.info
        assert info is not None
        client: ClientSide = self
        handler: Handler | None = None
        # A lean engine's transport (echfront.front.leantransport) relays
        # plain TCP backends itself; for any other target it first hands the
        # socket to a Twisted transport and answers None.
        engine_handler = getattr(self.transport, "handler_for", None)
        if engine_handler is not None:
            handler = engine_handler(
                client, info, route, metrics=self.factory.metrics, settings=self.state.settings
            )
        if handler is None:
            if isinstance(route, Backend):
                handler = Relay(
                    client,
                    info,
                    route,
                    self.reactor,
                    metrics=self.factory.metrics,
                    settings=self.state.settings,
                )
            else:
                handler = LocalHandoff(client, info, route, metrics=self.factory.metrics)
        self._handler = handler
        # Built once, here: bytes that came with the ClientHello, then any
        # a transport ignoring the pause delivered while routing.
        handler.start(info.rest + self._take_held())

    # -- the ClientSide of the handlers (echfront.front.connection) ------------

    def set_input(self, sink: Callable[[bytes], object]) -> None:
        """Send every later read from the client to ``sink``, held reads first."""
        self.dataReceived = sink  # type: ignore[method-assign,assignment]
        held = self._take_held()
        if held:
            sink(held)

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
        self.refuse(error.alert, str(error))

    def refuse(self, alert: AlertDescription, reason: str) -> None:
        """Send a fatal alert and close (RFC 8446 §6.2); ``reason`` is logged."""
        if self._closed:
            return
        self.record.alert = alert
        self.record.close_reason = reason  # reported by the connection's log event
        self.transport.write(alert_record(alert))
        self.close()

    def close(self) -> None:
        """Close after the written bytes are flushed; the backend too, if any.

        A client that never reads could keep the socket open forever; the
        close gets a deadline (the running one, else a first-flight timeout).
        """
        if self._handler is not None:
            self._handler.abort()
        self.transport.loseConnection()
        if not self._closing and not self._closed:
            self._closing = True
            if self._timer is None:
                self._start_timer(self.state.settings.first_flight_timeout, "close timeout")

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
        self._timer_reason = reason
        timer = self._timer
        if timer is not None and timer.active():
            # The next phase's deadline: move the running one (cheaper than
            # cancelling it and queueing another).
            timer.reset(seconds)
        else:
            self._timer = self.reactor.callLater(seconds, self._timed_out)

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _timed_out(self) -> None:
        self._timer = None
        reason = self._timer_reason
        if self.handed_off and not self._closing:
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
        handler, self._handler = self._handler, None
        if handler is not None:
            handler.client_lost(reason)
        # The input sink set on this instance is a bound method (the
        # handler's, or our own _hold): a reference cycle back here.  Back
        # to the class's method, so reference counting frees the connection
        # at once instead of the garbage collector, later.
        self.__dict__.pop("dataReceived", None)
        self.factory.connection_closed(self)


class FrontFactory(Factory):
    """Builds :class:`FrontProtocol` instances and keeps what they share.

    :ivar state: the state new connections get; assign to reload.
    :ivar reactor: for every timer (a test passes a MemoryReactorClock), and
        for backend connects.
    :ivar metrics: the front's metrics.
    :ivar limits: unfinished first flights, per-address demand and HPKE
        buckets (:mod:`echfront.front.limits`; they survive reloads).
    :ivar connections: the open connections.
    """

    protocol = FrontProtocol  # type: ignore[assignment]
    noisy = False

    def __init__(
        self, state: FrontState, reactor: IReactorTime, metrics: Metrics | None = None
    ) -> None:
        """Serve with ``state`` on ``reactor``."""
        self.state = state
        self.reactor = reactor
        self.metrics = metrics if metrics is not None else Metrics()
        self.metrics.bind(reactor)
        self.limits = AddressLimits(reactor.seconds)
        #: Connection log events, emitted in batches.
        self.connection_log = ConnectionLog(reactor)
        self.connections: set[FrontProtocol] = set()
        self._sweeper: IDelayedCall | None = None

    @property
    def open_connections(self) -> int:
        """Number of open client connections."""
        return len(self.connections)

    def buildProtocol(self, addr: IAddress) -> FrontProtocol | None:  # type: ignore[override]
        """Build a protocol bound to the current state, or None to refuse at once.

        Listeners use :meth:`listener`, which closes refused sockets on any
        kind of endpoint.
        """
        return self.build(addr, proxied=False)

    def listener(self, *, proxied: bool = False, bare_port: bool = False) -> ListenerFactory:
        """The factory an endpoint listens with (an :class:`~.accept.ListenerFactory`).

        :param proxied: a ``[proxy] listen`` endpoint.
        :param bare_port: the endpoint listens with Twisted's own port
            (:func:`~echfront.front.accept.closes_refused`).
        """
        return ListenerFactory(self, proxied=proxied, bare_port=bare_port)

    def build(self, addr: IAddress, *, proxied: bool) -> FrontProtocol | None:
        """A connection from ``addr``, or None when a limit refuses it (counted).

        :param proxied: ``addr`` is a balancer's, whose PROXY header names
            the client: only configured balancer networks are served, and
            the client is accounted once its header is read
            (:meth:`proxy_header_read`).
        """
        settings = self.state.settings
        if settings.max_connections and len(self.connections) >= settings.max_connections:
            self.metrics.limited.labels("max_connections").inc()
            return None
        host = getattr(addr, "host", None)
        if proxied:
            if not trusted(host, settings.proxy_from):
                # A header from anyone else would be a spoofed address.
                self.metrics.limited.labels("proxy_untrusted").inc()
                return None
            key = ""
            self.limits.start_first_flight(key, 0)
        else:
            key = address_key(host) if isinstance(host, str) else ""
            refusal = self.limits.admit(
                key,
                cap=settings.max_first_flights_per_address,
                saturation=settings.saturation_first_flights,
            )
            if refusal:
                self.metrics.limited.labels(refusal).inc()
                return None
        proto = FrontProtocol(self.state, self.reactor, proxied=proxied)
        proto.factory = self
        proto.record.address = key
        proto.pending_key = key
        self.connections.add(proto)
        self.metrics.active.inc()
        self._schedule_sweep()
        return proto

    def proxy_header_read(self, proto: FrontProtocol, header: ProxyHeader) -> bool:
        """A balancer's PROXY header is in: account the connection to the real client.

        From here the client's address drives the limits, the HPKE shares,
        the router, the logs, the metrics and the PROXY header to backends.
        A header that keeps the connection's own endpoints (a health check)
        leaves the balancer's.

        :returns: False if a limit refused the client (the connection is aborted).
        """
        addresses = proxied_addresses(header)
        if addresses is not None:
            proto.record.proxied = addresses
            proto.record.peer = format_address(addresses[0])
            host = getattr(addresses[0], "host", None)
        else:
            host = getattr(proto.transport.getPeer(), "host", None)
        key = address_key(host) if isinstance(host, str) else ""
        self._end_pending(proto)
        proto.record.address = key
        settings = proto.state.settings
        refusal = self.limits.admit(
            key,
            cap=settings.max_first_flights_per_address,
            saturation=settings.saturation_first_flights,
        )
        if refusal:
            proto.abort(f"refused ({refusal})", limit=refusal)
            return False
        proto.pending_key = key
        return True

    def _end_pending(self, proto: FrontProtocol) -> None:
        """The connection's first flight no longer counts as unfinished (once)."""
        if proto.pending_key is not None:
            self.limits.end_first_flight(proto.pending_key)
            proto.pending_key = None

    def first_flight_done(self, proto: FrontProtocol, size: int) -> None:
        """The connection's ClientHello is complete."""
        self._end_pending(proto)
        proto.record.first_flight_bytes = size
        self.metrics.first_flight_bytes.observe(size)
        self.metrics.first_flight_seconds.observe(self.reactor.seconds() - proto.record.started)

    def connection_closed(self, proto: FrontProtocol) -> None:
        """Called once per connection when it closes: account and log it."""
        self.connections.discard(proto)
        self._end_pending(proto)  # closed before its ClientHello was complete
        self.metrics.active.dec()
        self.metrics.closed(proto.record)
        self.connection_log.add(
            proto.record,
            self.reactor.seconds(),
            log_server_names=proto.state.settings.log_server_names,
        )
        if not self.connections:
            # No timer runs while the front is idle, and no line waits.
            self._stop_sweep()
            self.connection_log.flush()

    # -- the idle sweep -------------------------------------------------------

    def _schedule_sweep(self) -> None:
        if self._sweeper is None:
            interval = self.state.settings.idle_timeout / 2 or 30.0
            self._sweeper = self.reactor.callLater(interval, self._sweep)

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

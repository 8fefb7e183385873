# -*- test-case-name: tests.test_datagram -*-
"""ECH split mode over QUIC: the UDP listener, its flow table and the datagram relay.

:class:`QuicFront` is a thin Twisted ``DatagramProtocol`` on the front's UDP
port that drives the sans-IO wing :mod:`echfront.quic` (see the driving loop
in :mod:`echfront.quic.flow`):

* A datagram of no known flow goes through
  :func:`~echfront.quic.admission.admit`: unknown versions get a Version
  Negotiation packet (RFC 9000 §6.1), anything but a client Initial of 1200
  bytes or more is dropped.  Then the table's bounds
  (:class:`~echfront.quic.admission.QuicSettings`): a connection beyond
  ``max_flows`` or ``max_flows_per_address`` gets CONNECTION_REFUSED in an
  Initial packet (RFC 9000 §5.2.2), so the client falls back to TCP at once.
* Each flow is an :class:`~echfront.quic.flow.InitialFlow`.  Once its first
  ClientHello is whole it is decided exactly as a TCP connection is: the same
  :class:`~echfront.front.state.FrontState` (decoder, router, allowed
  targets, ``require_ech``), the same per-address HPKE budget
  (:class:`~echfront.front.limits.AddressLimits`, shared with TCP), the same
  outcome and route metrics (``transport="quic"``) and the same connection
  log event (with ``transport=quic``).  A refusal is the TLS alert TCP would
  send, as CRYPTO_ERROR 0x100 + alert in a CONNECTION_CLOSE (RFC 9001 §4.8).
* The flow then gets its own connected UDP socket to the target's QUIC
  address (:attr:`QuicState.endpoints`), and every later datagram goes both
  ways unchanged, except client Initial packets carrying CRYPTO data on an
  ECH-accepted flow, which the flow translates (the second ClientHello after
  a HelloRetryRequest with the first one's HPKE context, RFC 9849 §7.1.1).

Targets: a :class:`~echfront.targets.Backend` is reached at its
``quic_endpoint``.  A :class:`~echfront.targets.Local` target (the public
name, whose TLS the front terminates over TCP) is TCP-only: QUIC for it goes
to that local service's configured ``quic_endpoint`` (a QUIC server for the
same names) or, without one, is refused with CONNECTION_REFUSED, and the
client falls back to TCP, where the front serves it.

The flow table (:class:`~echfront.quic.table.FlowTable`) is keyed by client
address, then connection ID; the relay teaches it each Source Connection ID
the backend uses, from the backend's long headers.  Deadlines (a
ClientHello that takes too long, an idle flow) are checked by one sweep a
second for the whole table, not by a timer per flow.

Not handled: connection migration (a client whose address changes loses its
flow; RFC 9000 §9 lets the client fall back), and the front sends no Retry:
a Retry needs the backend to echo the front's connection IDs in its
transport parameters (RFC 9000 §7.3), which an unmodified backend cannot.
A backend's own Retry is relayed and followed.

Why this module is long: it is one protocol, the only place where QUIC
meets Twisted, and its per-flow socket; the parts that need no reactor
already live in the sans-IO wing (:mod:`~echfront.quic.admission`,
:mod:`~echfront.quic.flow`, :mod:`~echfront.quic.table`).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol, cast

from twisted.application.service import Service
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.error import CannotListenError, MessageLengthError
from twisted.internet.interfaces import IReadDescriptor
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import ILogObserver, Logger
from zope.interface import implementer

from echfront.errors import AlertDescription, AlertError, InternalError
from echfront.front.connection import ConnectionRecord
from echfront.front.connlog import ConnectionLog
from echfront.front.limits import address_key
from echfront.quic.admission import QuicSettings, admit
from echfront.quic.errors import QuicError, TransportErrorCode, crypto_error_code
from echfront.quic.flow import FlowLimits, FlowOutput, FlowPhase, InitialFlow
from echfront.quic.hello import decode_first_hello, release
from echfront.quic.protection import initial_keys
from echfront.quic.rewrite import close_datagram
from echfront.quic.table import FlowTable, long_header_cids
from echfront.targets import Backend, Local, Reject, Route

if TYPE_CHECKING:
    from twisted.internet.interfaces import IAddress, IDelayedCall, IListeningPort, IReactorTime
    from twisted.python.failure import Failure

    from echfront.ech.decoder import ClientHelloInfo
    from echfront.front.limits import AddressLimits
    from echfront.front.metrics import Metrics
    from echfront.front.state import FrontState
    from echfront.quic.packets import LongHeader

__all__ = [
    "MAX_DATAGRAM",
    "SOCKET_BUFFER",
    "Address",
    "QuicEvents",
    "QuicFront",
    "QuicListener",
    "QuicState",
    "UDPReactor",
    "listen_udp",
]

#: A UDP peer as Twisted gives it: (host, port).
Address = tuple[str, int]

#: The largest datagram read or relayed: QUIC allows up to 65527 bytes of
#: payload (RFC 9000 §14, ``max_udp_payload_size``); Twisted's default 8192
#: would truncate a large one silently.
MAX_DATAGRAM = 65535
#: Socket buffer asked for on the listening port (the kernel caps it at
#: net.core.rmem_max and wmem_max): one socket carries every flow's client side.
SOCKET_BUFFER = 4 * 1024 * 1024
_CONNECTION_REFUSED = TransportErrorCode.CONNECTION_REFUSED
#: TLS alerts by number, to read one back from a CRYPTO_ERROR code (RFC 9001 §4.8).
_ALERTS = {int(alert): alert for alert in AlertDescription}

#: Where connection events go (the global log publisher, in this namespace).
_events = Logger(namespace="echfront.connection")


class UDPReactor(Protocol):
    """What :class:`QuicFront` needs of its reactor (IReactorTime, IReactorFDSet)."""

    def seconds(self) -> float:
        """The reactor's clock."""

    def callLater(
        self, delay: float, callable: Callable[..., object], *args: object, **kw: object
    ) -> IDelayedCall:
        """Schedule a call."""

    def addReader(self, reader: IReadDescriptor) -> object:
        """Watch a flow's backend socket."""

    def removeReader(self, reader: IReadDescriptor) -> object:
        """Stop watching it."""


@dataclass(frozen=True)
class QuicState:
    """What a QUIC flow is decided with; replaced whole on reload, like FrontState.

    :ivar front: the TCP front's state: decoder, router, targets, settings.
    :ivar endpoints: the QUIC address (IP, port) of each target that has one.
    :ivar settings: the flow table's bounds.
    """

    front: FrontState
    endpoints: Mapping[Backend | Local, Address] = field(default_factory=dict)
    settings: QuicSettings = field(default_factory=QuicSettings)


@implementer(ILogObserver)
class QuicEvents:
    """Passes connection events on with ``transport=quic`` added (field and text)."""

    def __init__(self, observer: ILogObserver) -> None:
        """Forward to ``observer``."""
        self.observer = observer

    def __call__(self, event: dict[str, Any]) -> None:
        """Mark one event as a QUIC flow's and pass it on."""
        event["transport"] = "quic"
        event["text"] = f"{event.get('text', '')} transport=quic"
        self.observer(event)


class _Flow:
    """One client connection in the table: the sans-IO flow and its Twisted side."""

    __slots__ = (
        "backend",
        "cids",
        "client",
        "closed",
        "first_flight",
        "info",
        "initial",
        "key",
        "last_active",
        "peer",
        "record",
        "relaying",
        "retry_counted",
        "state",
    )

    def __init__(
        self,
        client: Address,
        key: str,
        initial: InitialFlow,
        state: QuicState,
        record: ConnectionRecord,
    ) -> None:
        self.client = client
        self.key = key
        self.initial = initial
        self.state = state
        self.record = record
        self.peer: IAddress = (
            IPv6Address("UDP", *client) if ":" in client[0] else IPv4Address("UDP", *client)
        )
        self.cids: set[bytes] = {initial.original_dcid}
        self.backend: _BackendLink | None = None
        self.info: ClientHelloInfo | None = None
        self.last_active = record.started
        #: PASSTHROUGH: datagrams go both ways without a look.
        self.relaying = False
        self.retry_counted = False
        self.closed = False
        #: Counted in AddressLimits' unfinished first flights until the hello is whole.
        self.first_flight = False


@implementer(IReadDescriptor)
class _BackendLink:
    """A flow's connected UDP socket to its target's QUIC address, read by the reactor.

    A plain socket rather than a ``listenUDP`` port: a Twisted port logs two
    lines per flow (start and close), and a connected socket is all a flow
    needs.  Connected, the kernel delivers only the backend's datagrams to
    it, and reports the backend's ICMP port unreachable as ECONNREFUSED.
    """

    #: Datagrams read per wake-up before yielding to other sockets.
    READS_PER_CALL = 256

    def __init__(
        self, front: QuicFront, flow: _Flow, reactor: UDPReactor, address: Address
    ) -> None:
        """Open the socket and start reading; raise OSError if that fails."""
        self.front = front
        self.flow = flow
        self.reactor = reactor
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.socket: socket.socket | None = socket.socket(family, socket.SOCK_DGRAM)
        try:
            self.socket.setblocking(False)
            self.socket.connect(address)
        except OSError:
            self.socket.close()
            self.socket = None
            raise
        reactor.addReader(self)

    def fileno(self) -> int:
        """The socket's descriptor (-1 once closed)."""
        return -1 if self.socket is None else self.socket.fileno()

    def logPrefix(self) -> str:
        """How the reactor names this descriptor in its logs."""
        return "QuicBackend"

    def doRead(self) -> None:
        """Relay what the backend sent, a bounded batch at a time."""
        for _ in range(self.READS_PER_CALL):
            if self.socket is None:
                return
            try:
                datagram = self.socket.recv(MAX_DATAGRAM)
            except BlockingIOError:
                return
            except ConnectionRefusedError:
                self.front.backend_refused(self.flow)
                return
            except OSError:
                self.front.dropped += 1
                return
            self.front.from_backend(self.flow, datagram)

    def connectionLost(self, reason: Failure) -> None:
        """The reactor dropped the descriptor (shutdown): close the socket."""
        self.stop()

    def send(self, datagram: bytes) -> bool:
        """Write to the backend; False if the kernel refused (UDP: a loss, QUIC recovers)."""
        if self.socket is None:
            return False
        try:
            self.socket.send(datagram)
        except ConnectionRefusedError:
            # Reported on the next call, not from inside this send.
            self.reactor.callLater(0, self.front.backend_refused, self.flow)
            return False
        except OSError:
            return False
        return True

    def stop(self) -> None:
        """Stop reading and close the socket."""
        if self.socket is not None:
            self.reactor.removeReader(self)
            self.socket.close()
            self.socket = None


class QuicFront(DatagramProtocol):
    """The QUIC listener: admission, the flow table, decisions, relaying (module docstring).

    The reactor listens with this protocol (:func:`listen_udp`, or
    ``listenUDP`` with ``maxPacketSize=MAX_DATAGRAM``); each flow's backend
    socket is a reader on the same reactor.

    :ivar state: what new flows are decided with; assign to reload.
    :ivar table: the flows.
    :ivar dropped: datagrams dropped since start (unadmitted, unauthenticated,
        refused by the kernel), for tests and diagnostics.
    :param limits: the per-address HPKE budget, shared with the TCP front.
    """

    noisy = False
    #: Seconds between sweeps of the table (hello deadlines, idle flows).
    SWEEP_INTERVAL = 1.0
    log = Logger()

    def __init__(
        self,
        state: QuicState,
        reactor: UDPReactor,
        *,
        metrics: Metrics,
        limits: AddressLimits,
    ) -> None:
        """Serve with ``state`` on ``reactor``."""
        self.state = state
        self.reactor = reactor
        self.metrics = metrics
        self.limits = limits
        self.table: FlowTable[_Flow] = FlowTable()
        #: Connection log events, emitted in batches as the TCP front's are.
        clock = cast("IReactorTime", reactor)  # UDPReactor includes IReactorTime's calls
        self.connection_log = ConnectionLog(clock, QuicEvents(_events.observer))
        self.dropped = 0
        self._sweeper: IDelayedCall | None = None

    # -- from the client ------------------------------------------------------

    def datagramReceived(self, datagram: bytes, addr: Address) -> None:
        """One datagram from a client: relay it, hold it, or start a flow."""
        flow = self.table.find(addr, datagram)
        if flow is None:
            flow = self._admit(datagram, addr)
            if flow is None:
                return
        flow.last_active = now = self.reactor.seconds()
        if flow.relaying:
            flow.record.bytes_from_client += len(datagram)
            if flow.backend is not None and not flow.backend.send(datagram):
                self.dropped += 1
            return
        if flow.backend is not None:
            flow.record.bytes_from_client += len(datagram)
        else:
            flow.record.first_flight_bytes += len(datagram)
        initial = flow.initial
        out = initial.client_datagram(datagram, now)
        self._apply(flow, out)
        if out.hello is not None and not flow.closed:
            self._decide(flow, out.hello)
            return
        if initial.hello_retried and not flow.retry_counted:
            flow.retry_counted = flow.record.hello_retry = True
            self.metrics.hello_retry(transport="quic")
        if (
            not datagram[0] & 0x80
            and initial.phase is FlowPhase.TRANSLATING
            and initial.deadline is None
        ):
            # A 1-RTT packet: the client has sent Handshake packets, so it
            # has discarded its Initial keys (RFC 9001 §4.9.1) and will send
            # no Initial packet to translate again.
            flow.relaying = True

    def _admit(self, datagram: bytes, client: Address) -> _Flow | None:
        """Start a flow for a client's first Initial, within the table's bounds."""
        admission = admit(datagram)
        if admission.reply is not None:
            self._send(admission.reply, client)
        header = admission.header
        if header is None:
            self.dropped += 1
            return None
        settings = self.state.settings
        key = address_key(client[0])
        limit = ""
        if settings.max_flows and len(self.table) >= settings.max_flows:
            limit = "max_flows"
        elif (
            key
            and settings.max_flows_per_address
            and self.table.count(key) >= settings.max_flows_per_address
        ):
            limit = "flows_per_address"
        else:
            # As TCP does at accept: counts toward the address's demand and
            # the unfinished first flights (the saturation signal they share).
            front = self.state.front.settings
            limit = self.limits.admit(
                key,
                cap=front.max_first_flights_per_address,
                saturation=front.saturation_first_flights,
            )
        if limit:
            self.metrics.limit(limit, transport="quic")
            self._send(_refusal(header, f"{limit} reached"), client)
            return None
        now = self.reactor.seconds()
        initial = InitialFlow(
            header, now=now, limits=FlowLimits(hello_timeout=settings.hello_timeout)
        )
        record = ConnectionRecord(started=now, address=key)
        flow = _Flow(client, key, initial, self.state, record)
        flow.first_flight = True
        record.peer = (
            f"[{client[0]}]:{client[1]}" if ":" in client[0] else f"{client[0]}:{client[1]}"
        )
        self.table.add(flow)
        self.metrics.quic_flows.inc()
        self._schedule_sweep()
        return flow

    # -- deciding -------------------------------------------------------------

    def _decide(self, flow: _Flow, hello: bytes) -> None:
        """The first ClientHello is whole: decode it and route it, as over TCP."""
        front = flow.state.front
        self._first_flight_done(flow)
        started = time.perf_counter()
        try:
            info = decode_first_hello(
                front.decoder, hello, may_decrypt=partial(self._may_decrypt, flow)
            )
        except AlertError as error:
            self._refuse(flow, QuicError.from_alert(error), alert=error.alert)
            return
        if info.config_id is not None:
            self.metrics.decode_seconds.observe(time.perf_counter() - started)
        flow.info = info
        flow.record.hello = info.summary
        try:
            route = front.router.route(info, flow.peer)
        except Exception:
            self.log.failure("router failed")
            self._refuse_alert(flow, InternalError("router failed"))
            return
        if isinstance(route, Deferred):
            route.addCallbacks(partial(self._routed, flow), partial(self._route_failed, flow))
        else:
            self._routed(flow, route)

    def _may_decrypt(self, flow: _Flow) -> bool:
        """The decoder asks before spending an HPKE operation (RFC 9849 §10.4), as over TCP."""
        settings = flow.state.front.settings
        key = flow.record.address
        if not self.limits.take_hpke(key, settings.hpke_rate, settings.hpke_burst):
            flow.record.limit = "hpke_rate"
            return False
        if self.limits.shed(key, settings.saturation_first_flights):
            flow.record.limit = "hpke_fair_share"  # saturated; this address asks far more
            return False
        return True

    def _first_flight_done(self, flow: _Flow) -> None:
        """The flow's ClientHello is whole, or the flow ended before it was."""
        if flow.first_flight:
            flow.first_flight = False
            self.limits.end_first_flight(flow.key)

    def _route_failed(self, flow: _Flow, failure: Failure) -> None:
        if flow.closed:
            return
        self.log.failure("router failed", failure)
        self._refuse_alert(flow, InternalError("router failed"))

    def _routed(self, flow: _Flow, route: Route) -> None:
        """Connect the flow to its target's QUIC address, or refuse it."""
        if flow.closed:
            return
        flow.record.route = route.name if isinstance(route, Backend | Local | Reject) else "?"
        if isinstance(route, Reject):
            error = QuicError("rejected", code=crypto_error_code(route.alert))
            self._refuse(
                flow, error, alert=route.alert, reason=route.reason or "rejected by router"
            )
            return
        if route not in flow.state.front.targets:
            # Never an open proxy: a router may only return configured targets.
            self.log.error("router returned an unconfigured target {route!r}", route=route)
            self._refuse_alert(flow, InternalError("router returned an unconfigured target"))
            return
        address = flow.state.endpoints.get(route)
        if address is None:
            reason = f"no QUIC endpoint for {route.name}"
            self._refuse(flow, QuicError(reason, code=_CONNECTION_REFUSED), reason=reason)
            return
        try:
            link = _BackendLink(self, flow, self.reactor, address)
        except OSError as error:
            self.metrics.backend_failures.labels(route.name, "other").inc()
            reason = f"cannot reach {route.name} over UDP: {error}"
            self._refuse(flow, QuicError(reason, code=_CONNECTION_REFUSED), reason=reason)
            return
        flow.backend = link
        info = flow.info
        assert info is not None
        flow.info = None  # the flow keeps what it needs (the second hello's decoder)
        out = release(flow.initial, info)
        flow.relaying = flow.initial.phase is FlowPhase.PASSTHROUGH
        self._apply(flow, out)

    # -- from the backend -------------------------------------------------------

    def from_backend(self, flow: _Flow, datagram: bytes) -> None:
        """A datagram from the flow's backend: relay it to the client unchanged."""
        if flow.closed or not datagram:
            return
        flow.last_active = self.reactor.seconds()
        if datagram[0] & 0x80:
            cids = long_header_cids(datagram)
            if cids is not None and cids[1] not in flow.cids:
                # The client's next packets name the backend's connection ID.
                self.table.add_cid(flow, cids[1])
            if not flow.relaying:
                flow.initial.server_datagram(datagram)
        flow.record.bytes_to_client += len(datagram)
        self._send(datagram, flow.client)

    def backend_refused(self, flow: _Flow) -> None:
        """The backend's address is closed: tell a client still in its handshake."""
        if flow.closed:
            return
        link, flow.backend = flow.backend, None
        if link is not None:
            link.stop()
        route = flow.record.route or "none"
        self.metrics.backend_failures.labels(route, "refused").inc()
        reason = f"{route} refused over UDP"
        if flow.record.bytes_to_client:
            self._close(flow, reason)  # past the handshake: the client's own timers decide
        else:
            self._refuse(flow, QuicError(reason, code=_CONNECTION_REFUSED), reason=reason)

    # -- output and closing ---------------------------------------------------------

    def _send(self, datagram: bytes, client: Address) -> None:
        transport: Any = self.transport
        if transport is None:
            return
        try:
            transport.write(datagram, client)
        except (OSError, MessageLengthError):
            self.dropped += 1

    def _apply(self, flow: _Flow, out: FlowOutput) -> None:
        """Send what the flow produced; close it if it ended."""
        if out.to_backend and flow.backend is not None:
            for datagram in out.to_backend:
                if not flow.backend.send(datagram):
                    self.dropped += 1
        for datagram in out.to_client:
            self._send(datagram, flow.client)
        self.dropped += out.dropped
        if out.error is not None:
            self._note_error(flow, out.error)
        if out.timed_out:
            self._close(flow, "hello timeout", limit="hello_timeout")
        elif flow.initial.closed:
            self._close(flow, "client closed")

    def _note_error(self, flow: _Flow, error: QuicError, reason: str = "") -> None:
        record = flow.record
        if record.alert is None:
            record.alert = _ALERTS.get(error.code - TransportErrorCode.CRYPTO_ERROR)
        record.close_reason = record.close_reason or reason or str(error)

    def _refuse_alert(self, flow: _Flow, error: AlertError) -> None:
        self._refuse(flow, QuicError.from_alert(error), alert=error.alert)

    def _refuse(
        self,
        flow: _Flow,
        error: QuicError,
        *,
        alert: AlertDescription | None = None,
        reason: str = "",
    ) -> None:
        """Close the flow with CONNECTION_CLOSE ``error`` (and the backend's side, if any)."""
        if flow.closed:
            return
        if alert is not None:
            flow.record.alert = alert
        self._note_error(flow, error, reason)
        self._apply(flow, flow.initial.refuse(error))
        self._close(flow)

    def _close(self, flow: _Flow, reason: str = "", *, limit: str = "") -> None:
        """Forget a flow: its socket, its table entries; count and log it once."""
        if flow.closed:
            return
        flow.closed = True
        self.table.remove(flow)
        self._first_flight_done(flow)
        if flow.backend is not None:
            flow.backend.stop()
            flow.backend = None
        record = flow.record
        record.close_reason = record.close_reason or reason
        record.limit = record.limit or limit
        self.metrics.quic_flows.dec()
        self.metrics.closed(record, transport="quic")
        self.connection_log.add(
            record,
            self.reactor.seconds(),
            log_server_names=flow.state.front.settings.log_server_names,
        )
        if not len(self.table):
            self.connection_log.flush()  # no line waits while the front is idle

    # -- the sweep ------------------------------------------------------------------

    def _schedule_sweep(self) -> None:
        if self._sweeper is None:
            self._sweeper = self.reactor.callLater(self.SWEEP_INTERVAL, self._sweep)

    def _sweep(self) -> None:
        """Close flows past their hello deadline or idle too long; one timer for all."""
        self._sweeper = None
        now = self.reactor.seconds()
        for flow in list(self.table):
            deadline = flow.initial.deadline
            if deadline is not None and now >= deadline:
                self._apply(flow, flow.initial.expire(now))
                continue
            idle = flow.state.settings.idle_timeout
            if idle and now - flow.last_active >= idle:
                self._close(flow, "idle timeout", limit="idle_timeout")
        settings = self.state.front.settings
        self.limits.sweep(settings.hpke_rate, settings.hpke_burst)
        if len(self.table):
            self._schedule_sweep()

    def stopProtocol(self) -> None:
        """The listener is gone: close every flow (each is logged) and stop the sweep."""
        for flow in list(self.table):
            self._close(flow, "shutdown")
        if self._sweeper is not None and self._sweeper.active():
            self._sweeper.cancel()
        self._sweeper = None


def listen_udp(
    reactor: Any, port: int, interface: str, protocol: QuicFront, *, reuse_port: bool = False
) -> IListeningPort:
    """Listen for ``protocol`` on a UDP port (the reactor's ``adoptDatagramPort``).

    The socket is made here so that it can get a larger buffer and, under
    ``--workers``, ``SO_REUSEPORT``: every worker binds the same port and the
    kernel picks the socket by the datagram's addresses, so a client's
    datagrams keep reaching the worker that holds its flow.

    :param interface: an IP address; "" for every IPv4 address.
    :raises CannotListenError: when the port cannot be bound.
    """
    family = socket.AF_INET6 if ":" in interface else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)
        try:
            sock.bind((interface or "0.0.0.0", port))  # noqa: S104 (the operator's choice)
        except OSError as error:
            raise CannotListenError(interface, port, error) from None
        sock.setblocking(False)
        listening: IListeningPort = reactor.adoptDatagramPort(
            sock.fileno(), family, protocol, MAX_DATAGRAM
        )
    finally:
        sock.close()  # the reactor holds its own descriptor
    return listening


class QuicListener(Service):
    """A ``listen_quic`` port for a :class:`QuicFront`, bound while the service runs.

    It binds in ``privilegedStartService`` (before twistd drops privileges,
    as TCP endpoint services do) or, added to a running parent, in
    ``startService``; stopping it closes the port, and the front's flows
    with it.
    """

    def __init__(
        self,
        reactor: Any,
        port: int,
        interface: str,
        protocol: QuicFront,
        *,
        reuse_port: bool = False,
    ) -> None:
        """Listen on ``interface``:``port`` for ``protocol`` once started."""
        self.reactor = reactor
        self.address = (interface, port)
        self.protocol = protocol
        self.reuse_port = reuse_port
        self.port: IListeningPort | None = None

    def _listen(self) -> None:
        if self.port is None:
            interface, port = self.address
            self.port = listen_udp(
                self.reactor, port, interface, self.protocol, reuse_port=self.reuse_port
            )

    def privilegedStartService(self) -> None:
        """Bind now (see the class docstring)."""
        self._listen()
        super().privilegedStartService()  # type: ignore[no-untyped-call]

    def startService(self) -> None:
        """Bind, if not bound yet."""
        self._listen()
        super().startService()  # type: ignore[no-untyped-call]

    def stopService(self) -> Deferred[None] | None:
        """Close the port (the protocol closes its flows)."""
        super().stopService()  # type: ignore[no-untyped-call]
        port, self.port = self.port, None
        return None if port is None else port.stopListening()


def _refusal(header: LongHeader, reason: str) -> bytes:
    """CONNECTION_REFUSED in a server Initial, for a connection the table will not take."""
    version = header.quic_version
    assert version is not None  # admit() only starts flows of supported versions
    return close_datagram(
        version,
        initial_keys(header.dcid, version),
        from_server=True,
        dcid=header.scid,
        scid=header.dcid,
        packet_number=0,
        error=QuicError(reason, code=_CONNECTION_REFUSED),
    )

# -*- test-case-name: tests.test_engine -*-
"""A client connection on the lean engine, in the shape of a Twisted TCP transport.

:class:`LeanTransport` is what the factory's protocol (normally
:class:`~echfront.front.protocol.FrontProtocol`) sees as its transport when
the connection was accepted by a :class:`~echfront.front.leanport.LeanPort`:
reads are delivered to ``dataReceived``, writes go straight to the socket
and are buffered only when the socket is full (a registered producer is
then paused until it drains), half-close and the two ways of closing
behave as Twisted's TCP transport does (``loseConnection`` after the buffer
drains, ``abortConnection`` with a reset; ``connectionLost`` always after
the current event, never inside a call).

The engine asks the transport for the connection's handler when the front
has routed it (:meth:`LeanTransport.handler_for`, the hook
:meth:`~echfront.front.protocol.FrontProtocol._routed` looks for): a
:class:`~echfront.front.leanrelay.LeanRelay` for a plain TCP backend; the
front's own local TLS hand-off for a local service, on this transport; for
any other backend the socket goes to a Twisted transport
(``adoptStreamConnection``) under the same protocol, whose relay is then
built exactly as on any Twisted transport.
"""

from __future__ import annotations

import _socket
import contextlib
import socket
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import ConnectionAborted, ConnectionDone, ConnectionLost
from twisted.internet.interfaces import (
    IConsumer,
    IHalfCloseableProtocol,
    IPushProducer,
    IReactorSocket,
    ITCPTransport,
)
from twisted.internet.protocol import Protocol as TwistedProtocol
from twisted.internet.protocol import ServerFactory
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from echfront.front.engine import (
    EVENTS_BROKEN,
    EVENTS_END,
    EVENTS_IN,
    EVENTS_OUT,
    RECV_SIZE,
    LeanEngine,
    plain_tcp_target,
)
from echfront.front.leanrelay import LeanRelay
from echfront.targets import Backend, Local

if TYPE_CHECKING:
    from twisted.internet.interfaces import IAddress, IProtocol

    from echfront.ech.decoder import ClientHelloInfo
    from echfront.front.connection import ClientSide, Handler
    from echfront.front.metrics import Metrics
    from echfront.front.state import FrontSettings

__all__ = ["LeanTransport"]

_log = Logger(namespace="echfront.engine")


class _Reason(Failure):
    """A ``connectionLost`` reason built once, whose message is rendered once.

    Every connection that ends the same way gets the same object, and the
    front reads its message for every connection's log line: rendering it
    (``str`` of a Twisted error) each time cost more than the rest of the
    close.
    """

    def __init__(self, error: Exception) -> None:
        super().__init__(error)  # type: ignore[no-untyped-call]
        self._message = super().getErrorMessage()

    def getErrorMessage(self) -> str:
        """The error's message, as :class:`~twisted.python.failure.Failure` renders it."""
        return self._message


#: The reasons ``connectionLost`` gets, as Twisted's TCP transport gives them.
_DONE = _Reason(ConnectionDone("Connection done"))
_LOST = _Reason(ConnectionLost("Connection lost"))
_ABORTED = _Reason(ConnectionAborted())
_LINGER_RESET = struct.pack("ii", 1, 0)
#: What a closed transport's protocol is: nothing reaches it any more.
_GONE = TwistedProtocol()


@implementer(ITCPTransport, IPushProducer, IConsumer)
class LeanTransport:
    """One accepted TCP connection on the lean engine (see the module docstring).

    :param engine: the reactor's lean engine.
    :param sock: the accepted, non-blocking socket (the C socket type, or
        Python's subclass of it).
    :param peer: the client's address (as given to ``buildProtocol``).
    :param protocol: the protocol built for it.
    :param host: the listening address, for :meth:`getHost` should the
        socket be gone.
    """

    __slots__ = (
        "_buffer",
        "_closed",
        "_closing",
        "_half_closeable",
        "_host",
        "_paused",
        "_producer",
        "_producer_paused",
        "_read_closed",
        "_shut_write",
        "_watching_writes",
        "engine",
        "fd",
        "handed_over",
        "peer",
        "protocol",
        "socket",
        "takeover",
    )

    def __init__(
        self,
        engine: LeanEngine,
        sock: _socket.socket,
        peer: IPv4Address | IPv6Address,
        protocol: IProtocol,
        host: IPv4Address | IPv6Address,
    ) -> None:
        """Wrap ``sock``; :meth:`start` connects the protocol."""
        self.engine = engine
        self.socket = sock
        self.fd = sock.fileno()
        self.peer = peer
        self.protocol = protocol
        self._host = host
        self._buffer = bytearray()
        self._paused = False
        self._read_closed = False
        self._closing = False
        self._closed = False
        #: 0: open; 1: FIN to send once the buffer drains; 2: sent.
        self._shut_write = 0
        self._watching_writes = False
        self._producer: Any = None
        self._producer_paused = False
        self._half_closeable = IHalfCloseableProtocol.providedBy(protocol)
        #: While splicing, the relay handles this socket's events itself.
        self.takeover: Callable[[int], None] | None = None
        self.handed_over = False

    def start(self) -> None:
        """Connect the protocol, then watch the socket (unless it closed at once)."""
        self.protocol.makeConnection(self)
        if not self._closed:
            self.engine.register(self.fd, self)

    # -- events ----------------------------------------------------------------

    def events(self, mask: int) -> None:
        """The socket is readable or writable (edge-triggered: drain what is there)."""
        takeover = self.takeover
        if takeover is not None:
            takeover(mask)
            return
        if mask & EVENTS_OUT and self._buffer:
            self._flush()
        if mask & EVENTS_IN and not (self._closed or self._read_closed):
            if not self._paused:
                self._read(bool(mask & EVENTS_END))
            elif mask & EVENTS_BROKEN:
                # A reset while paused (say, while the backend is being
                # connected): nothing will be read any more, so say so now.
                self._check_reset()

    def crashed(self, failure: Failure) -> None:
        """An event handler raised: log it and drop the connection."""
        _log.failure("lean connection failed", failure)
        self.abortConnection()

    def _read(self, to_end: bool) -> None:
        """Read until the socket is empty (or the protocol pauses or closes).

        A short read leaves the socket empty (edge-triggered epoll reports
        data arriving later as a new event), unless the peer's FIN is
        already in: then read on to the end of stream (``to_end``).
        """
        recv_into = self.socket.recv_into
        buffer = self.engine.recv_buffer
        while True:
            try:
                size = recv_into(buffer)
            except BlockingIOError:
                return
            except InterruptedError:
                continue
            except OSError:
                self._close(_LOST)
                return
            if not size:
                self._eof()
                return
            self.protocol.dataReceived(bytes(buffer[:size]))
            if self._paused or self._closed or self._read_closed or self.takeover:
                return
            if size < RECV_SIZE and not to_end:
                return

    def _check_reset(self) -> None:
        """Close if the socket has a pending error (the peer reset it)."""
        try:
            error = self.socket.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        except OSError:
            error = 1
        if error:
            self._close(_LOST)

    def _eof(self) -> None:
        self._read_closed = True
        if self._half_closeable:
            self.protocol.readConnectionLost()  # type: ignore[attr-defined]
        else:
            self._close(_DONE)

    # -- writing -------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        """Send ``data``; what the socket does not take now is buffered (IConsumer)."""
        if self._closed or self._shut_write or not data:
            return
        buffer = self._buffer
        if buffer:
            buffer += data
            return
        try:
            sent = self.socket.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            # The peer is gone; tell the protocol after this call, as
            # Twisted would (never from inside its own write).
            self.engine.soon(self._lost)
            return
        if sent < len(data):
            buffer += memoryview(data)[sent:]
            self.watch_writes()
            producer = self._producer
            if producer is not None and not self._producer_paused:
                self._producer_paused = True
                producer.pauseProducing()

    def writeSequence(self, data: Any) -> None:
        """Send every chunk of ``data`` (ITransport)."""
        self.write(b"".join(data))

    def _flush(self) -> None:
        """The socket takes more: send the buffer, then what waited for it to drain."""
        buffer = self._buffer
        send = self.socket.send
        while buffer:
            try:
                sent = send(buffer)
            except BlockingIOError:
                return
            except InterruptedError:
                continue
            except OSError:
                self._close(_LOST)
                return
            del buffer[:sent]
        self._drained()

    def _drained(self) -> None:
        if self._producer_paused and self._producer is not None:
            self._producer_paused = False
            self._producer.resumeProducing()
        if self._shut_write == 1:
            self._shutdown_write()
        if self._closing:
            self._close(_DONE)

    def watch_writes(self) -> None:
        """Have the engine report this socket writable (once a write had to wait)."""
        if not self._watching_writes and not self._closed:
            self._watching_writes = True
            self.engine.watch_writes(self.fd)

    def _lost(self) -> None:
        self._close(_LOST)

    @property
    def buffered(self) -> int:
        """Bytes written but not yet taken by the socket."""
        return len(self._buffer)

    # -- closing ---------------------------------------------------------------------

    def loseConnection(self) -> None:
        """Close once the buffer is sent; reading stops now (ITransport)."""
        if self._closed or self._closing:
            return
        if self._buffer:
            self._closing = True
            self._paused = True
        else:
            self._close(_DONE)

    def abortConnection(self) -> None:
        """Close at once, with a reset; buffered bytes are dropped (ITCPTransport)."""
        if self._closed:
            return
        with contextlib.suppress(OSError):  # already reset by the peer
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        self._close(_ABORTED)

    def loseWriteConnection(self) -> None:
        """Send FIN once the buffer is sent; reading goes on (ITCPTransport)."""
        if self._closed or self._shut_write:
            return
        self._shut_write = 1
        if not self._buffer:
            self._shutdown_write()

    def _shutdown_write(self) -> None:
        self._shut_write = 2
        try:
            self.socket.shutdown(socket.SHUT_WR)
        except OSError:  # the peer is gone; the read side will tell
            return
        if self._half_closeable:
            self.protocol.writeConnectionLost()  # type: ignore[attr-defined]

    def _close(self, reason: Failure) -> None:
        if self._closed:
            return
        self._closed = True
        self._producer = None
        self.engine.closed(self.fd)
        self.socket.close()
        self.engine.soon(lambda: self._connection_lost(reason))

    def _connection_lost(self, reason: Failure) -> None:
        # The protocol is forgotten first, as Twisted's transports do: it
        # points back here, and a cycle would keep both (and what they
        # hold) until a full garbage collection.
        protocol, self.protocol = self.protocol, _GONE
        protocol.connectionLost(reason)

    @property
    def disconnected(self) -> bool:
        """Whether the socket is closed (or handed over)."""
        return self._closed

    # -- producer and consumer --------------------------------------------------------

    def pauseProducing(self) -> None:
        """Stop reading (IPushProducer)."""
        self._paused = True

    def resumeProducing(self) -> None:
        """Read again, starting with whatever arrived meanwhile (IPushProducer)."""
        if not self._paused or self._closed or self._closing:
            return
        self._paused = False
        if not self._read_closed:
            self.engine.soon(self._resume_read)

    def _resume_read(self) -> None:
        if not (self._paused or self._closed or self._read_closed or self.takeover):
            # Edges that came while paused were not acted on: read to the end.
            self._read(True)

    def stopProducing(self) -> None:
        """Close (IProducer)."""
        self.loseConnection()

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        """Pause ``producer`` whenever writes wait for the socket (IConsumer)."""
        self._producer = producer
        self._producer_paused = False
        if self._buffer:
            self._producer_paused = True
            producer.pauseProducing()

    def unregisterProducer(self) -> None:
        """Forget the producer (IConsumer)."""
        self._producer = None
        self._producer_paused = False

    # -- addresses and options -----------------------------------------------------------

    def getPeer(self) -> IPv4Address | IPv6Address:
        """The client's address."""
        return self.peer

    def getHost(self) -> IPv4Address | IPv6Address:
        """The address the client connected to."""
        if not self._closed:
            try:
                host, port = self.socket.getsockname()[:2]
            except OSError:
                return self._host
            kind = IPv6Address if self.socket.family == socket.AF_INET6 else IPv4Address
            return kind("TCP", host, port)
        return self._host

    def getHandle(self) -> _socket.socket:
        """The socket."""
        return self.socket

    def getTcpNoDelay(self) -> bool:
        """Whether Nagle's algorithm is off (ITCPTransport)."""
        return bool(self.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

    def setTcpNoDelay(self, enabled: bool) -> None:
        """Turn Nagle's algorithm off or on (ITCPTransport)."""
        self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, enabled)

    def getTcpKeepAlive(self) -> bool:
        """Whether TCP keepalive is on (ITCPTransport)."""
        return bool(self.socket.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE))

    def setTcpKeepAlive(self, enabled: bool) -> None:
        """Turn TCP keepalive on or off (ITCPTransport)."""
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, enabled)

    # -- the hand-off ------------------------------------------------------------------

    def handler_for(
        self,
        client: ClientSide,
        info: ClientHelloInfo,
        route: Backend | Local,
        *,
        metrics: Metrics,
        settings: FrontSettings,
    ) -> Handler | None:
        """The handler for a routed connection, if the engine carries ``route`` itself.

        A plain TCP backend (an IP address, no PROXY header) gets a
        :class:`~echfront.front.leanrelay.LeanRelay`.  A local service gets
        None: the caller's local TLS runs on this transport as on any other.
        For any other backend the socket goes to a Twisted transport under
        the same protocol first (:meth:`hand_over`) and None is returned: the
        caller then builds its usual relay, on that transport.
        """
        target = plain_tcp_target(route)
        if target is not None and not self._closed:
            return LeanRelay(client, self, info, target, metrics=metrics, settings=settings)
        if isinstance(route, Local):
            # Local TLS needs only a transport's calls: it stays here, and
            # saves the hand-over (and Twisted's transport) per connection.
            return None
        self.hand_over()
        return None

    def hand_over(self) -> None:
        """Give the socket to a Twisted TCP transport; the protocol goes on there.

        The protocol's deadlines switch back to the reactor's timers, and
        whatever waited in this transport's buffer is written first.
        """
        if self._closed:
            return
        self._closed = True
        self.handed_over = True
        protocol = self.protocol
        clock = self.engine.clock
        if getattr(protocol, "reactor", None) is clock:
            protocol.reactor = self.engine.time  # type: ignore[attr-defined]
        # Unregister explicitly: epoll watches the open file, which the
        # Twisted transport's duplicate of the descriptor keeps open.
        self.engine.unregister(self.fd)
        continued = _Continued(protocol, paused=self._paused, pending=bytes(self._buffer))
        reactor = IReactorSocket(self.engine.reactor)
        try:
            reactor.adoptStreamConnection(
                self.fd, socket.AddressFamily(self.socket.family), _ContinueFactory(continued)
            )
        finally:
            self.socket.close()  # Twisted holds its own duplicate


@implementer(IHalfCloseableProtocol)
class _Continued(TwistedProtocol):
    """The protocol of a handed-over connection, carried on a Twisted transport.

    It forwards every event to the protocol that was on the lean transport
    and makes the new transport that protocol's own.
    """

    def __init__(self, protocol: IProtocol, *, paused: bool, pending: bytes) -> None:
        self.protocol = protocol
        self._paused = paused
        self._pending = pending

    def makeConnection(self, transport: Any) -> None:
        """Take the transport over without a second connectionMade."""
        self.transport = transport
        self.connected = 1
        self.protocol.transport = transport  # type: ignore[attr-defined]
        if self._paused:
            transport.pauseProducing()
        if self._pending:
            transport.write(self._pending)

    def dataReceived(self, data: bytes) -> None:
        """Forward a read."""
        self.protocol.dataReceived(data)

    def readConnectionLost(self) -> None:
        """Forward the client's FIN (a protocol that cannot half-close is closed)."""
        if IHalfCloseableProtocol.providedBy(self.protocol):
            self.protocol.readConnectionLost()
        elif self.transport is not None:
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        """Forward the end of our write side."""
        if IHalfCloseableProtocol.providedBy(self.protocol):
            self.protocol.writeConnectionLost()

    def connectionLost(self, reason: Failure = _DONE) -> None:
        """Forward the end of the connection."""
        self.protocol.connectionLost(reason)


class _ContinueFactory(ServerFactory):
    """Gives ``adoptStreamConnection`` the continuing protocol."""

    noisy = False

    def __init__(self, continued: _Continued) -> None:
        self.continued = continued

    def buildProtocol(self, addr: IAddress) -> _Continued:  # type: ignore[override]
        """The one protocol this factory was made for."""
        return self.continued

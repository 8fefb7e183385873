"""In-memory connections for the front, relay and local tests (no sockets).

:class:`MemoryTransport` is a stream transport that records what a
protocol does to it (pause, resume, producers, half-close, abort) and,
unlike ``iosim.FakeTransport``, honours those calls: a paused transport
delivers nothing, ``loseWriteConnection`` reaches the peer as a
``readConnectionLost`` after the bytes before it, and reads can be cut
into chunks of any size.  A :class:`Network` moves bytes between the
transports of its :class:`Pipe` objects (and any ``iosim.IOPump``) and
advances a clock by zero between steps, so Twisted's buffered TLS
writes leave (twisted-design.md §A2, §E).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import (
    IAddress,
    IConsumer,
    IHalfCloseableDescriptor,
    IHalfCloseableProtocol,
    IProtocol,
    IPushProducer,
    ITransport,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from zope.interface import implementer

from echfront.tls.hello import (
    HRR_RANDOM,
    encode_client_hello_body,
    encode_extensions,
    handshake_message,
)
from tests.echhello import frame, key_share, sni, versions

CLIENT_ADDRESS = IPv4Address("TCP", "192.0.2.7", 50123)
FRONT_ADDRESS = IPv4Address("TCP", "198.51.100.1", 443)
RELAY_ADDRESS = IPv4Address("TCP", "10.0.0.1", 40000)


@implementer(ITransport, IConsumer, IPushProducer, IHalfCloseableDescriptor)
class MemoryTransport:
    """One end of an in-memory TCP connection that records every call.

    :ivar sent: every byte the protocol wrote, including bytes written
        after the transport was closed (see :attr:`late`).
    :ivar late: bytes written after loseConnection/abortConnection (a real
        transport drops them).
    :ivar received: every byte delivered to the protocol.
    :ivar reads: the sizes of the ``dataReceived`` calls.
    :ivar calls: names of the flow-control and closing calls, in order.
    """

    def __init__(
        self,
        protocol: IProtocol,
        *,
        host: IAddress,
        peer: IAddress,
        read_size: int | None = None,
    ) -> None:
        """A transport for ``protocol``; reads are cut to ``read_size`` bytes."""
        self.protocol = protocol
        self.host = host
        self.peer = peer
        self.read_size = read_size
        self.outgoing = bytearray()
        self.incoming = bytearray()
        self.sent = bytearray()
        self.late = bytearray()
        self.received = bytearray()
        self.reads: list[int] = []
        self.calls: list[str] = []
        self.paused = False
        #: False makes the transport deliver reads (and FIN) while paused,
        #: as a transport that ignores pauseProducing would.
        self.honours_pause = True
        self.producer: object | None = None
        self.streaming: bool | None = None
        self.write_closed = False  # we sent FIN
        self.eof_pending = False  # the peer's FIN is behind ``incoming``
        self.read_closed = False  # readConnectionLost was delivered
        self.disconnecting = False
        self.aborted = False
        self.lost = False

    def __repr__(self) -> str:
        """Name the protocol, for failure messages."""
        return f"<MemoryTransport of {type(self.protocol).__name__}>"

    # -- ITransport ------------------------------------------------------

    def write(self, data: bytes) -> None:
        """Queue ``data`` for the peer (dropped, but recorded, once closed)."""
        assert isinstance(data, bytes), f"write({type(data).__name__})"
        self.sent += data
        if self.disconnecting or self.write_closed or self.lost:
            self.late += data
            return
        self.outgoing += data

    def writeSequence(self, data: Iterable[bytes]) -> None:
        """Write the pieces in order."""
        for piece in data:
            self.write(piece)

    def loseConnection(self) -> None:
        """Close once the queued bytes are sent."""
        self.calls.append("loseConnection")
        self.disconnecting = True

    def abortConnection(self) -> None:
        """Close at once; queued bytes are discarded."""
        self.calls.append("abortConnection")
        self.disconnecting = True
        self.aborted = True

    def loseWriteConnection(self) -> None:
        """Send FIN after the queued bytes (IHalfCloseableDescriptor)."""
        self.calls.append("loseWriteConnection")
        self.write_closed = True

    def readConnectionLost(self, reason: Failure) -> None:
        """Part of IHalfCloseableDescriptor; the pipe signals FIN itself."""

    def writeConnectionLost(self, reason: Failure) -> None:
        """Part of IHalfCloseableDescriptor; the pipe signals FIN itself."""

    def getPeer(self) -> IAddress:
        """The remote address."""
        return self.peer

    def getHost(self) -> IAddress:
        """The local address."""
        return self.host

    # -- IPushProducer / IConsumer -----------------------------------------

    def pauseProducing(self) -> None:
        """Stop delivering reads."""
        self.calls.append("pauseProducing")
        self.paused = True

    def resumeProducing(self) -> None:
        """Deliver reads again (on the next network step)."""
        self.calls.append("resumeProducing")
        self.paused = False

    def stopProducing(self) -> None:
        """Stop for good: the connection closes."""
        self.calls.append("stopProducing")
        self.disconnecting = True

    def registerProducer(self, producer: object, streaming: bool) -> None:
        """Record the producer; a second one is an error, as in Twisted."""
        self.calls.append("registerProducer")
        if self.producer is not None:
            raise RuntimeError("Cannot register two producers")
        self.producer = producer
        self.streaming = streaming

    def unregisterProducer(self) -> None:
        """Forget the producer."""
        self.calls.append("unregisterProducer")
        self.producer = None
        self.streaming = None

    # -- driven by Pipe ----------------------------------------------------

    @property
    def reading(self) -> bool:
        """Whether reads are delivered now."""
        return not self.lost and not (self.paused and self.honours_pause)

    def deliver(self) -> bool:
        """Hand arrived bytes (then a pending FIN) to the protocol."""
        moved = False
        while self.incoming and self.reading:
            size = self.read_size or len(self.incoming)
            chunk = bytes(self.incoming[:size])
            del self.incoming[:size]
            self.received += chunk
            self.reads.append(len(chunk))
            self.protocol.dataReceived(chunk)
            moved = True
        if self.eof_pending and not self.incoming and self.reading:
            self.eof_pending = False
            self.read_closed = True
            moved = True
            if IHalfCloseableProtocol.providedBy(self.protocol):
                self.protocol.readConnectionLost()
            else:
                self.disconnecting = True  # Twisted closes a plain protocol on EOF
        return moved

    def connection_lost(self, *, aborted: bool) -> None:
        """Tell the protocol the connection is gone (once)."""
        if self.lost:
            return
        self.lost = True
        self.outgoing.clear()
        reason = ConnectionLost() if aborted else ConnectionDone()
        self.protocol.connectionLost(Failure(reason))


class Pipe:
    """A connection between two protocols over two :class:`MemoryTransport`."""

    def __init__(
        self,
        client: IProtocol,
        server: IProtocol,
        *,
        client_address: IAddress = CLIENT_ADDRESS,
        server_address: IAddress = FRONT_ADDRESS,
        client_read: int | None = None,
        server_read: int | None = None,
    ) -> None:
        """Connect ``client`` to ``server`` (the server side is made first)."""
        self.client = MemoryTransport(
            client, host=client_address, peer=server_address, read_size=client_read
        )
        self.server = MemoryTransport(
            server, host=server_address, peer=client_address, read_size=server_read
        )
        self.closed = False
        server.makeConnection(self.server)
        client.makeConnection(self.client)

    def step(self) -> bool:
        """Move bytes, FINs and closes one round; whether anything happened."""
        if self.closed:
            return False
        moved = False
        ends = ((self.client, self.server), (self.server, self.client))
        for source, target in ends:
            if source.outgoing and not source.aborted:
                target.incoming += source.outgoing
                source.outgoing.clear()
                moved = True
            if (
                source.write_closed
                and not source.outgoing
                and not source.aborted
                and not target.read_closed
                and not target.eof_pending
            ):
                target.eof_pending = True
                moved = True
        for transport in (self.client, self.server):
            moved |= transport.deliver()
        for source, target in ends:
            if source.disconnecting and (source.aborted or not source.outgoing):
                # The closing side's queued bytes are with the peer; let it
                # read them (unless it is paused), then both ends are down.
                target.deliver()
                self.closed = True
                aborted = source.aborted
                source.connection_lost(aborted=aborted)
                target.connection_lost(aborted=aborted)
                return True
        return moved


class Network:
    """Steps pipes (and iosim pumps) on one clock until nothing moves."""

    def __init__(self, clock: MemoryReactorClock) -> None:
        """Use ``clock`` for ``advance(0)`` between steps."""
        self.clock = clock
        self.pipes: list[Pipe] = []
        self.pumps: list[Any] = []

    def connect(
        self,
        client: IProtocol,
        server: IProtocol,
        **options: Any,
    ) -> Pipe:
        """Connect two protocols with a new :class:`Pipe`."""
        pipe = Pipe(client, server, **options)
        self.pipes.append(pipe)
        return pipe

    def flush(self) -> None:
        """Run until quiet."""
        for _ in range(100_000):
            self.clock.advance(0)
            moved = False
            for pipe in list(self.pipes):
                moved |= pipe.step()
            for pump in self.pumps:
                moved |= bool(pump.pump(advanceClock=False))
            now = self.clock.seconds()
            if not moved and all(c.getTime() > now for c in self.clock.getDelayedCalls()):
                return
        raise AssertionError("the network never went quiet")

    def complete_backend(
        self, reactor: MemoryReactorClock, *, read_size: int | None = None
    ) -> tuple[Pipe, IProtocol, IProtocol]:
        """Complete the oldest ``connectTCP`` on ``reactor`` to its listener.

        :returns: the pipe, the connecting protocol (an endpoint wrapper)
            and the listening side's protocol.
        """
        host, port, factory, _timeout, _bind = reactor.tcpClients.pop(0)
        reactor.connectors.pop(0)
        listeners = [f for (p, f, _backlog, _iface) in reactor.tcpServers if p == port]
        assert listeners, f"nothing listens on port {port}"
        address = IPv4Address("TCP", host, port)
        client = factory.buildProtocol(address)
        server = listeners[0].buildProtocol(RELAY_ADDRESS)
        assert client is not None and server is not None
        pipe = self.connect(
            client,
            server,
            client_address=RELAY_ADDRESS,
            server_address=address,
            server_read=read_size,
        )
        return pipe, client, server


@implementer(IHalfCloseableProtocol)
class RecordingServer(Protocol):
    """A backend (or application) protocol the test controls.

    :ivar data: everything received.
    :ivar events: ``"made"``, ``"eof"``, ``"lost"`` in order.
    """

    def __init__(self) -> None:
        """Start empty."""
        self.data = bytearray()
        self.chunks: list[bytes] = []
        self.events: list[str] = []
        self.on_data: Callable[[RecordingServer, bytes], None] | None = None

    def connectionMade(self) -> None:
        """Record the connection."""
        self.events.append("made")

    def send(self, data: bytes) -> None:
        """Write ``data`` to the peer."""
        assert self.transport is not None
        self.transport.write(data)

    def half_close(self) -> None:
        """Send FIN, keep reading."""
        transport: object = self.transport
        assert isinstance(transport, MemoryTransport)
        transport.loseWriteConnection()

    def close(self) -> None:
        """Close after the queued bytes."""
        assert self.transport is not None
        self.transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        """Record ``data`` and call :attr:`on_data` if set."""
        self.data += data
        self.chunks.append(data)
        if self.on_data is not None:
            self.on_data(self, data)

    def readConnectionLost(self) -> None:
        """Record the peer's FIN."""
        self.events.append("eof")

    def writeConnectionLost(self) -> None:
        """Record that our FIN went out."""
        self.events.append("write-closed")

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:  # noqa: B008
        """Record the close."""
        self.events.append("lost")


class RecordingFactory(Factory):
    """Builds :class:`RecordingServer` instances and keeps them."""

    noisy = False

    def __init__(self, protocol: Callable[[], RecordingServer] = RecordingServer) -> None:
        """Build instances with ``protocol``."""
        self.make = protocol
        self.built: list[RecordingServer] = []

    def buildProtocol(self, addr: IAddress) -> RecordingServer:  # type: ignore[override]
        """Build and remember one protocol."""
        proto = self.make()
        proto.factory = self
        self.built.append(proto)
        return proto


def wrapped(protocol: object) -> Protocol:
    """The protocol inside a client endpoint's ``_WrappingProtocol``."""
    inner = getattr(protocol, "_wrappedProtocol", protocol)
    assert isinstance(inner, Protocol)
    return inner


# -- TLS bytes ----------------------------------------------------------------

CCS = bytes.fromhex("140303000101")
EARLY_DATA = b"\x17\x03\x03\x00\x05early"


def alert(description: int) -> bytes:
    """The fatal alert record the front sends (RFC 8446 §6)."""
    return bytes((0x15, 0x03, 0x03, 0x00, 0x02, 0x02, description))


def plain_hello(
    name: str = "plain.example",
    *,
    record_sizes: tuple[int, ...] = (),
    version: int = 0x0301,
    padding: int = 0,
) -> bytes:
    """Records of an ordinary TLS 1.3 ClientHello (no ECH) for ``name``.

    :param padding: length of a padding extension (RFC 7685) to add.
    """
    body = encode_client_hello_body(
        random=bytes(range(100, 132)),
        session_id=bytes(32),
        cipher_suites=(0x1301, 0x1302),
        extensions=[
            (0x0000, sni(name)),
            (0x000A, bytes.fromhex("0004001d0017")),
            (0x000D, bytes.fromhex("0006040308040401")),
            (0x0033, key_share(7)),
            (0x002B, versions((0x0304,))),
            *([(0x0015, bytes(padding))] if padding else []),
        ],
    )
    return frame(handshake_message(1, body), version, record_sizes)


def server_hello(*, retry: bool = False, session_id: bytes = bytes(range(0xE0, 0x100))) -> bytes:
    """A TLS 1.3 ServerHello record, or a HelloRetryRequest (RFC 8446 §4.1.3-4)."""
    random = HRR_RANDOM if retry else bytes(range(0x80, 0xA0))
    extensions = encode_extensions(
        [(0x002B, b"\x03\x04"), (0x0033, b"\x00\x17" if retry else key_share(9))]
    )
    body = (
        b"\x03\x03" + random + bytes((len(session_id),)) + session_id + b"\x13\x01\x00" + extensions
    )
    message = handshake_message(2, body)
    return b"\x16\x03\x03" + len(message).to_bytes(2, "big") + message

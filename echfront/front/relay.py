# -*- test-case-name: tests.test_relay -*-
"""Relaying a connection to its backend (RFC 9849 split mode).

The relay connects to the backend (:mod:`echfront.front.backend`: any
Twisted client endpoint), sends the rewritten first flight, then moves
bytes both ways with producers registered in both directions (bounded
memory against a slow peer) and half-close honoured in both directions.

While ECH is accepted and the backend has not yet sent its ServerHello,
the relay keeps watching (checklist §1.H):

* backend to client: bytes are forwarded as they come, and parsed until
  the ServerHello is known;
* client to backend: only whole records are forwarded (CCS and 0-RTT data
  may arrive), so that if the ServerHello is a HelloRetryRequest the second
  ClientHello starts at a record boundary; it is then reassembled (CCS and
  early data still pass, HRR-9), decrypted with the first hello's HPKE
  context and rewritten (§7.1.1).

After that both directions switch to the fast path: each side's
``dataReceived`` becomes a short closure that adds the byte count to the
connection record and calls the other transport's ``write``; counting costs
one addition per read, and it is what the idle sweep, the logs and the
metrics read.  On Linux, once the connection has relayed 64 KiB past the
handshake and both write buffers have drained, the relay goes further and
hands both sockets to a :class:`~echfront.front.splice.SpliceSession`, which
moves bytes inside the kernel (``[relay] splice``, on by default).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from twisted.internet.defer import CancelledError
from twisted.internet.interfaces import IHalfCloseableDescriptor, IReactorFDSet
from twisted.logger import Logger

from echfront.ech.hrrwatch import HelloRetryWatch
from echfront.errors import AlertDescription, AlertError
from echfront.front import splice
from echfront.front.backend import BackendProtocol, connect_backend, connect_failure
from echfront.front.connection import client_endpoints
from echfront.front.proxyproto import proxy_header

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorTime
    from twisted.python.failure import Failure

    from echfront.ech.decoder import ClientHelloInfo
    from echfront.front.connection import ClientSide, ConnectionRecord, StreamTransport
    from echfront.front.metrics import Metrics
    from echfront.front.state import FrontSettings
    from echfront.targets import Backend

__all__ = ["Relay"]

#: How many times to wait for the write buffers to drain before giving up on
#: splicing this connection (waits grow 2 ms, 4 ms, ...: about 1.6 s in all).
_SPLICE_ATTEMPTS = 40
#: Bytes a connection relays past the handshake before it is spliced: short
#: exchanges (most requests, every handshake-only connection) finish on the
#: ordinary path, which costs them less than setting up and tearing down a
#: splice session, and answers a few milliseconds sooner.
_SPLICE_AFTER = 64 * 1024


def _nothing() -> None:
    """What follows a relayed chunk when nothing needs to."""


def _counted_from_client(
    record: ConnectionRecord,
    sink: Callable[[bytes], object],
    then: Callable[[], object] = _nothing,
) -> Callable[[bytes], None]:
    """``sink``, counting what the client sends; ``then`` is called after each chunk."""

    def receive(data: bytes) -> None:
        record.bytes_from_client += len(data)
        sink(data)
        then()

    return receive


def _counted_to_client(
    record: ConnectionRecord,
    sink: Callable[[bytes], object],
    then: Callable[[], object] = _nothing,
) -> Callable[[bytes], None]:
    """``sink``, counting what goes to the client; ``then`` is called after each chunk."""

    def receive(data: bytes) -> None:
        record.bytes_to_client += len(data)
        sink(data)
        then()

    return receive


def _half_close(transport: StreamTransport) -> None:
    """Send FIN if the transport can; otherwise wait for the full close."""
    if IHalfCloseableDescriptor.providedBy(transport):
        transport.loseWriteConnection()  # type: ignore[attr-defined]


class Relay:
    """Moves one client connection's bytes to and from its backend.

    It satisfies :class:`~echfront.front.connection.Handler`.

    :param client: the client's connection; the relay rebinds its input.
    :param info: the decoded first ClientHello (what to forward, HPKE state).
    :param backend: the target.
    :param reactor: for the connect and its timeout, and the splice timers;
        ``tcp:`` backends connect with its ``connectTCP`` when it has one,
        and splicing needs it to provide ``IReactorFDSet``.
    :param metrics: where backend connects, failures and HelloRetryRequests
        are counted.
    :param settings: the connection's settings (``splice``, and
        ``max_first_flight`` for a second ClientHello).
    """

    log = Logger()

    def __init__(
        self,
        client: ClientSide,
        info: ClientHelloInfo,
        backend: Backend,
        reactor: IReactorTime,
        *,
        metrics: Metrics,
        settings: FrontSettings,
    ) -> None:
        """Prepare; :meth:`start` starts the work."""
        self.client = client
        self.info: ClientHelloInfo | None = info
        self.backend = backend
        self.reactor = reactor
        self.metrics = metrics
        self._max_second_hello = settings.max_first_flight
        #: What the client sent past its ClientHello, until the backend is connected.
        self._pending = b""
        self._cancel_connect: Callable[[], object] | None = None
        self._splice: splice.SpliceSession | None = None
        self._splice_attempts = 0
        #: The reactor as splice sessions need it (one that watches descriptors).
        self._fd_reactor: IReactorFDSet | None = (
            reactor if IReactorFDSet.providedBy(reactor) else None
        )
        #: Whether bulk data moves to splice(2) once it flows (see _SPLICE_AFTER).
        self._splicing = settings.splice and splice.AVAILABLE and self._fd_reactor is not None
        #: Total bytes relayed at which to splice; None: not (or no longer) watching.
        self._splice_at: int | None = None
        self._connect_started = 0.0
        self._peer: BackendProtocol | None = None
        self._client_eof = False
        self._backend_eof = False
        self._done = False
        self._inspecting = False
        #: The watch of an ECH-accepted connection until its ServerHello (and
        #: second ClientHello); None on the fast path.
        self._hello_watch: HelloRetryWatch | None = None

    # -- connecting -------------------------------------------------------

    def start(self, pending: bytes) -> None:
        """Connect to the backend; the client stays paused until then.

        :param pending: what the client sent past its ClientHello, forwarded
            after the first flight.
        """
        self._pending = pending
        self._connect_started = self.reactor.seconds()
        cancel = connect_backend(self.backend, self.reactor, self)
        if self._peer is None and not self._done:  # an endpoint may have answered already
            self._cancel_connect = cancel

    def connect_failed(self, failure: Failure) -> None:
        """The backend could not be reached: tell the client with an alert."""
        self._cancel_connect = None
        if self._done:
            return
        if failure.check(CancelledError):
            return  # the client went away first
        kind, reason, expected = connect_failure(failure)
        if not expected:
            self.log.failure("unexpected backend connect failure", failure)
        self.metrics.backend_failures.labels(self.backend.name, kind).inc()
        self.log.info("{backend}: {reason}", backend=self.backend.name, reason=reason)
        self.client.refuse(AlertDescription.INTERNAL_ERROR, reason)

    def connected(self, peer: BackendProtocol) -> None:
        """The backend connection is up: send the first flight and start relaying."""
        self._cancel_connect = None
        if self._done:
            peer.transport.abortConnection()
            return
        self._peer = peer
        self.metrics.connect_seconds.labels(self.backend.name).observe(
            self.reactor.seconds() - self._connect_started
        )
        client = self.client.transport
        backend = peer.transport
        info = self.info
        assert info is not None
        self.info = None  # only the second-hello decoder is needed from here on
        record = self.client.record
        if self.backend.proxy_protocol:
            source, destination = client_endpoints(self.client)
            backend.write(proxy_header(self.backend.proxy_protocol, source, destination, info))
        backend.write(info.forward)
        pending, self._pending = self._pending, b""
        if info.second_hello is not None:
            # ECH accepted: a HelloRetryRequest would need the second
            # ClientHello rewritten, so inspect until the ServerHello.
            self._inspecting = True
            self._hello_watch = HelloRetryWatch(info.second_hello, self._max_second_hello)
            receive = _counted_from_client(record, self._client_watched)
            if pending:
                receive(pending)
            # After the pending bytes: set_input first passes on what the
            # client sent while the backend was being connected.
            self.client.set_input(receive)
        else:
            # No ECH to keep: the backend sees exactly what the client sends.
            if pending:
                record.bytes_from_client += len(pending)
                backend.write(pending)
            self._fast_path_both()
        # Flow control: a full socket on either side pauses reading on the other.
        client.registerProducer(backend, True)
        backend.registerProducer(client, True)
        if self._client_eof:
            self._forward_client_eof()
        client.resumeProducing()

    # -- inspection -------------------------------------------------------

    def from_backend(self, data: bytes) -> None:
        """Backend bytes before the fast path: learn the ServerHello, then forward.

        The watch (:class:`~echfront.ech.hrrwatch.HelloRetryWatch`) is
        updated before the bytes leave, so the client direction is ready for
        a second ClientHello before the client can send one.
        """
        watch = self._hello_watch
        if watch is not None and not watch.server_done:
            assert self._peer is not None
            try:
                known = watch.from_server(data, self._peer.transport.write)
            except AlertError as error:  # held client bytes that cannot start a hello
                self.client.refuse(error.alert, str(error))
                return
            if known:
                self._server_said(watch)
        self.client.record.bytes_to_client += len(data)
        self.client.transport.write(data)

    def _server_said(self, watch: HelloRetryWatch) -> None:
        """The backend's first handshake message is known: its direction needs no watching."""
        assert self._peer is not None
        self._peer.dataReceived = _counted_to_client(  # type: ignore[method-assign,assignment]
            self.client.record, self.client.transport.write, self._after_chunk()
        )
        if watch.hello_retry:
            self.client.record.hello_retry = True
            self.metrics.hello_retry_requests.inc()
        if watch.client_done:
            self._fast_path_client()

    def _client_watched(self, data: bytes) -> None:
        """Client bytes while watching: whole records, then the second ClientHello rewritten."""
        watch = self._hello_watch
        assert watch is not None and self._peer is not None
        try:
            watch.from_client(data, self._peer.transport.write)
        except AlertError as error:
            self.client.refuse(error.alert, str(error))
            return
        if watch.client_done:
            self._fast_path_client()

    # -- fast path -----------------------------------------------------------

    def _fast_path_client(self) -> None:
        assert self._peer is not None
        self._inspecting = False
        self._hello_watch = None
        record = self.client.record
        self.client.set_input(
            _counted_from_client(record, self._peer.transport.write, self._after_chunk())
        )
        self.client.handshake_done()
        if self._splicing:
            self._splice_at = record.bytes_from_client + record.bytes_to_client + _SPLICE_AFTER

    def _after_chunk(self) -> Callable[[], None]:
        """What to call after each relayed chunk (see _SPLICE_AFTER).

        Asked when a direction's sink is built, not kept on the relay: a
        bound method of its own would make a reference cycle, and the relay
        would wait for the garbage collector to be freed.
        """
        return self._watch_bulk if self._splicing else _nothing

    def _watch_bulk(self) -> None:
        """After a relayed chunk: start splicing once the connection carries bulk data."""
        at = self._splice_at
        if at is not None:
            record = self.client.record
            if record.bytes_from_client + record.bytes_to_client >= at:
                self._splice_at = None
                # The bytes just written may still be in Twisted's buffers;
                # splicing starts once they are out.
                self._splice_attempts = 0
                self.reactor.callLater(0, self._try_splice)

    # -- zero copy ---------------------------------------------------------------

    def _try_splice(self) -> None:
        """Hand both sockets to a SpliceSession when it is safe to (see echfront.front.splice)."""
        peer = self._peer
        fd_reactor = self._fd_reactor
        if self._done or self._client_eof or self._backend_eof or peer is None:
            return
        if fd_reactor is None:  # _splicing is False without one; this narrows the type
            return
        client, backend = self.client.transport, peer.transport
        client_socket, backend_socket = splice.socket_of(client), splice.socket_of(backend)
        if client_socket is None or backend_socket is None:
            return  # TLS-wrapped or in-memory transports: the ordinary path it is
        if not (splice.write_buffer_empty(client) and splice.write_buffer_empty(backend)):
            self._splice_attempts += 1
            if self._splice_attempts <= _SPLICE_ATTEMPTS:
                self.reactor.callLater(0.002 * self._splice_attempts, self._try_splice)
            return
        session = splice.SpliceSession(
            fd_reactor, client_socket, backend_socket, self.client.record, self._spliced
        )
        for transport in (client, backend):
            transport.unregisterProducer()
            getattr(transport, "stopReading")()  # noqa: B009 (not in the typing protocol)
            getattr(transport, "stopWriting")()  # noqa: B009
        self._splice = session
        self.client.record.zero_copy = True
        session.start()

    def _spliced(self, error: BaseException | None) -> None:
        """The splice session ended: give the sockets back to Twisted to close."""
        self._splice = None
        peer = self._peer
        assert peer is not None
        if error is None:
            # Both directions ended and each FIN was passed on already.
            record = self.client.record
            record.close_reason = record.close_reason or "both sides closed"
            self.client.transport.loseConnection()
            peer.transport.loseConnection()
        else:
            self.client.record.close_reason = f"relay error: {error}"
            self.client.transport.abortConnection()
            peer.transport.abortConnection()

    def _fast_path_both(self) -> None:
        assert self._peer is not None
        self._peer.dataReceived = _counted_to_client(  # type: ignore[method-assign,assignment]
            self.client.record, self.client.transport.write, self._after_chunk()
        )
        self._fast_path_client()

    # -- closing -----------------------------------------------------------

    def handshake_pending(self) -> bool:
        """Whether the relay is still connecting or inspecting."""
        return self._peer is None or self._inspecting

    def client_eof(self) -> None:
        """The client sent FIN: pass it on, keep the other direction open.

        Once the relay is done (the backend failed and the client is being
        told, or either side is gone) this is a no-op: the client's FIN and
        a backend reset can arrive in the same reactor turn, and the
        backend's transport is closed by then.
        """
        if self._done or self._client_eof:
            return
        self._client_eof = True
        if self._peer is not None:
            self._forward_client_eof()
        self._maybe_finish()

    def _forward_client_eof(self) -> None:
        assert self._peer is not None
        if self._hello_watch is not None:
            held = self._hello_watch.client_eof()
            if held:
                self._peer.transport.write(held)
        _half_close(self._peer.transport)

    def backend_eof(self) -> None:
        """The backend sent FIN: pass it on.

        A FIN before the backend's first byte is a failure like a reset: the
        client gets internal_error (see :meth:`backend_lost`), not a bare
        close.  A no-op once the relay is done (see :meth:`client_eof`).
        """
        if self._done or self._backend_eof:
            return
        if self.client.record.bytes_to_client == 0:
            self._backend_failed("backend closed before answering")
            return
        self._backend_eof = True
        _half_close(self.client.transport)
        self._maybe_finish()

    def _maybe_finish(self) -> None:
        # Twisted never closes a half-closeable connection by itself once
        # both directions have ended; do it here.
        if self._client_eof and self._backend_eof:
            self._done = True
            self.client.transport.loseConnection()
            if self._peer is not None:
                self._peer.transport.loseConnection()

    def backend_lost(self, reason: Failure) -> None:
        """The backend is gone: close the client after what is already queued.

        A backend that goes away before sending a single byte (it refused the
        ClientHello, or a ``tls:`` link to it failed its certificate check)
        has told the client nothing, so the front says internal_error rather
        than closing silently.
        """
        self._stop_splice()
        if self._done:
            return
        record = self.client.record
        if record.bytes_to_client == 0:
            self._backend_failed(f"backend closed before answering: {reason.getErrorMessage()}")
            return
        self._done = True
        if record.close_reason == "":
            record.close_reason = "backend closed"
        self.client.transport.loseConnection()

    def _backend_failed(self, reason: str) -> None:
        """The backend ended before its first byte: internal_error to the client.

        Nothing reached the client yet, so the alert starts a record of its
        own (RFC 8446 §6.2).  The relay is done from here: the client's
        refusal aborts the backend side, and whatever either side reports
        afterwards is ignored.
        """
        self._done = True
        self.metrics.backend_failures.labels(self.backend.name, "closed").inc()
        self.client.refuse(AlertDescription.INTERNAL_ERROR, reason)

    def _stop_splice(self) -> None:
        if self._splice is not None:
            self._splice.stop()
            self._splice = None

    def client_lost(self, reason: Failure) -> None:
        """The client is gone: stop connecting, or close the backend gently."""
        self._stop_splice()
        self._done = True
        if self._cancel_connect is not None:
            self._cancel_connect()
        elif self._peer is not None:
            self._peer.transport.loseConnection()

    def abort(self) -> None:
        """Drop the backend side at once (the front refuses or timed out)."""
        self._stop_splice()
        self._done = True
        if self._cancel_connect is not None:
            self._cancel_connect()
        elif self._peer is not None:
            self._peer.transport.abortConnection()

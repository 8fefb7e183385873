# -*- test-case-name: tests.test_engine -*-
"""Relaying to a plain TCP backend on the lean engine (RFC 9849 split mode).

:class:`LeanRelay` is the :class:`~echfront.front.connection.Handler` the
lean transport supplies for a backend that is a plain ``tcp:`` address
with an IP literal and no PROXY header (:func:`plain_tcp_target`).  It does
what :class:`~echfront.front.relay.Relay` does, with the same rules and the
same shared helper for the ServerHello/HelloRetryRequest watch
(:class:`~echfront.ech.hrrwatch.HelloRetryWatch`, checklist §1.H,
RFC 9849 §7.1.1), but owns the backend socket itself on the engine's
epoll: a non-blocking connect whose first write is tried at once (on a
near backend the connection is often up by then), a coarse connect
deadline, direct writes with flow control both ways (a full socket stops
reading on the other side; one read's worth is buffered at most), half-close
both ways, and once 64 KiB have been relayed past the handshake,
``splice(2)`` between the two sockets without leaving the engine (the
sockets stay registered as they are).

Failures are told and counted as the Twisted relay tells them: a connect
that fails or times out is an ``internal_error`` alert and an
``echfront_backend_failures_total`` sample, and a backend that ends (by
reset or by FIN) before its first byte leaves the client an
``internal_error`` too.

Why this module is long: it is one connection's state machine (connect,
watch, relay, half-close, the failures of each), whose transitions read
and set the same few fields; the parts that stand alone are elsewhere
(:mod:`~echfront.front.leansplice`, :class:`~echfront.ech.hrrwatch.HelloRetryWatch`).
"""

from __future__ import annotations

import _socket
import contextlib
import errno
import os
import socket
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from twisted.internet.defer import TimeoutError
from twisted.internet.error import ConnectionLost, getConnectError
from twisted.logger import Logger
from twisted.python.failure import Failure

from echfront.ech.hrrwatch import HelloRetryWatch
from echfront.errors import AlertDescription, AlertError
from echfront.front.backend import connect_failure
from echfront.front.engine import (
    AVAILABLE,
    EVENTS_END,
    EVENTS_IN,
    EVENTS_OUT,
    RECV_SIZE,
    LeanEngine,
    PlainTarget,
)
from echfront.front.leansplice import SpliceLink

if TYPE_CHECKING:
    from twisted.internet.interfaces import IDelayedCall

    from echfront.ech.decoder import ClientHelloInfo
    from echfront.front.connection import ClientSide
    from echfront.front.metrics import Metrics
    from echfront.front.state import FrontSettings

__all__ = ["LeanClient", "LeanRelay"]

#: Bytes relayed past the handshake before splicing (as the Twisted relay).
SPLICE_AFTER = 64 * 1024
_LINGER_RESET = struct.pack("ii", 1, 0)
_LOST_MESSAGE = Failure(ConnectionLost("Connection lost")).getErrorMessage()


class LeanClient(Protocol):
    """What the relay needs of the client's lean transport."""

    engine: LeanEngine
    fd: int
    takeover: Callable[[int], None] | None

    def write(self, data: bytes) -> None: ...
    def loseConnection(self) -> None: ...
    def abortConnection(self) -> None: ...
    def loseWriteConnection(self) -> None: ...
    def pauseProducing(self) -> None: ...
    def resumeProducing(self) -> None: ...
    def registerProducer(self, producer: object, streaming: bool) -> None: ...
    def watch_writes(self) -> None: ...

    @property
    def buffered(self) -> int: ...

    @property
    def disconnected(self) -> bool: ...


class LeanRelay:
    """Relays one client connection to a plain TCP backend (see the module docstring).

    It satisfies :class:`~echfront.front.connection.Handler`.

    :param client: the client's side, as the front declares it.
    :param transport: the client's lean transport (the relay writes to it,
        and splices from its socket).
    :param info: the decoded first ClientHello.
    :param target: the backend, as :func:`plain_tcp_target` made it.
    :param metrics: where connects, failures and HelloRetryRequests are counted.
    :param settings: ``splice`` and ``max_first_flight`` (second ClientHello).
    """

    __slots__ = (
        "_backend_eof",
        "_client_eof",
        "_closing_backend",
        "_connect_started",
        "_connected",
        "_deadline",
        "_done",
        "_inspecting",
        "_link",
        "_max_second_hello",
        "_out",
        "_pending",
        "_reads_paused",
        "_shut_backend",
        "_splice_at",
        "_splicing",
        "_watch",
        "_watching_writes",
        "backend",
        "client",
        "engine",
        "fd",
        "info",
        "metrics",
        "sock",
        "target",
        "transport",
    )

    log = Logger(namespace="echfront.front.relay")

    def __init__(
        self,
        client: ClientSide,
        transport: LeanClient,
        info: ClientHelloInfo,
        target: PlainTarget,
        *,
        metrics: Metrics,
        settings: FrontSettings,
    ) -> None:
        """Prepare; :meth:`start` connects."""
        self.client = client
        self.transport = transport
        self.engine = transport.engine
        self.info: ClientHelloInfo | None = info
        self.target = target
        self.backend = target.backend
        self.metrics = metrics
        self._max_second_hello = settings.max_first_flight
        self._splicing = settings.splice and AVAILABLE
        self.sock: _socket.socket | None = None
        self.fd = -1
        #: Bytes waiting for the backend socket to take them.
        self._out = bytearray()
        self._pending = b""
        self._connected = False
        self._connect_started = 0.0
        self._deadline: IDelayedCall | None = None
        self._watch: HelloRetryWatch | None = None
        self._inspecting = False
        self._client_eof = False
        self._backend_eof = False
        self._done = False
        #: 0: open; 1: FIN to send once _out drains; 2: sent.
        self._shut_backend = 0
        self._closing_backend = False
        self._reads_paused = False
        self._watching_writes = False
        self._splice_at: int | None = None
        self._link: SpliceLink | None = None

    # -- connecting -------------------------------------------------------------

    def start(self, pending: bytes) -> None:
        """Connect to the backend; the client stays paused until then.

        :param pending: what the client sent past its ClientHello.
        """
        self._pending = pending
        engine = self.engine
        self._connect_started = engine.time.seconds()
        try:
            # The C socket type: the Python-level wrapper adds nothing used here.
            sock = _socket.socket(
                self.target.family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC
            )
        except OSError as error:
            self._connect_failed(error.errno or errno.EMFILE)
            return
        code = sock.connect_ex(self.target.address)
        if code not in (0, errno.EINPROGRESS):
            sock.close()
            self._connect_failed(code)
            return
        self.sock = sock
        self.fd = sock.fileno()
        # Often up already (a near backend): then reads are all to watch for,
        # and the connect needs no deadline.
        connected = self._try_first_write()
        if self.sock is not None:
            if not connected:
                self._deadline = engine.clock.callLater(
                    self.backend.connect_timeout, self._connect_timed_out
                )
            # (A first write that had to wait asked for writability already.)
            writes = self._watching_writes or not connected
            engine.register(self.fd, self, writes=writes)
            self._watching_writes = writes

    def _try_first_write(self) -> bool:
        """Send the first flight if the connection is up; a failed connect shows here.

        :returns: whether the connection is up.
        """
        sock = self.sock
        info = self.info
        assert sock is not None and info is not None
        try:
            sent = sock.send(info.forward)
        except (BlockingIOError, InterruptedError):
            return False  # still connecting: the socket's first writable event tells
        except OSError as error:
            self._close_backend(gentle=False)
            self._connect_failed(error.errno or errno.ECONNREFUSED)
            return False
        self._on_connected(info, sent)
        return True

    def _connect_failed(self, code: int) -> None:
        """The backend could not be reached: tell the client with an alert."""
        self._cancel_deadline()
        if self._done:
            return
        failure = Failure(getConnectError((code, os.strerror(code))))
        self._fail_connect(failure)

    def _connect_timed_out(self) -> None:
        self._deadline = None
        if self._connected or self._done:
            return
        self._close_backend(gentle=False)
        self._fail_connect(Failure(TimeoutError(self.backend.connect_timeout, "backend connect")))

    def _fail_connect(self, failure: Failure) -> None:
        kind, reason, expected = connect_failure(failure)
        if not expected:
            self.log.failure("unexpected backend connect failure", failure)
        self.metrics.backend_failures.labels(self.backend.name, kind).inc()
        self.log.info("{backend}: {reason}", backend=self.backend.name, reason=reason)
        self._done = True
        self.client.refuse(AlertDescription.INTERNAL_ERROR, reason)

    def _on_connected(self, info: ClientHelloInfo, sent: int) -> None:
        """The backend connection is up and took ``sent`` bytes of the first flight."""
        self._connected = True
        self._cancel_deadline()
        self.metrics.connect_seconds.labels(self.backend.name).observe(
            self.engine.time.seconds() - self._connect_started
        )
        self.info = None  # only the second-hello decoder is needed from here on
        if sent < len(info.forward):
            self._out += memoryview(info.forward)[sent:]
            self._watch_backend_writes()
        record = self.client.record
        pending, self._pending = self._pending, b""
        if info.second_hello is not None:
            # ECH accepted: a HelloRetryRequest would need the second
            # ClientHello rewritten, so watch until the ServerHello.
            self._inspecting = True
            self._watch = HelloRetryWatch(info.second_hello, self._max_second_hello)
            if pending:
                self._client_watched(pending)
            self.client.set_input(self._client_watched)
        else:
            # No ECH to keep: the backend sees exactly what the client sends.
            if pending:
                record.bytes_from_client += len(pending)
                self._send(pending)
            self._fast_path_client()
        # Flow control the other way: a full client socket pauses backend reads.
        self.transport.registerProducer(self, True)
        if self._client_eof:
            self._forward_client_eof()
        self.transport.resumeProducing()

    def _cancel_deadline(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    # -- the backend socket's events ------------------------------------------------

    def events(self, mask: int) -> None:
        """The backend socket is ready (edge-triggered)."""
        link = self._link
        if link is not None:
            link.backend_events(mask)
            return
        if not self._connected:
            if self.sock is not None and self.info is not None:
                self._try_first_write()
            return
        if mask & EVENTS_OUT and self._out:
            self._flush_out()
        if mask & EVENTS_IN and not (self._reads_paused or self._backend_eof or self._done):
            self._read_backend(bool(mask & EVENTS_END))

    def crashed(self, failure: Failure) -> None:
        """An event handler raised: log it and drop the connection."""
        self.log.failure("lean relay failed", failure)
        self.abort()
        self.transport.abortConnection()

    def _read_backend(self, to_end: bool) -> None:
        """Read until the socket is empty (see LeanTransport._read)."""
        buffer = self.engine.recv_buffer
        while True:
            sock = self.sock
            if sock is None:
                return
            try:
                size = sock.recv_into(buffer)
            except BlockingIOError:
                return
            except InterruptedError:
                continue
            except OSError:
                self._backend_lost(_LOST_MESSAGE)
                return
            if not size:
                self._backend_ended()
                return
            # Until the client direction is settled, the watch sees the
            # backend's bytes (it lets them pass once the ServerHello is known).
            if self._watch is None:
                self._from_backend_fast(bytes(buffer[:size]))
            else:
                self._from_backend_watched(bytes(buffer[:size]))
            if self._reads_paused or self._done or self._link is not None:
                return
            if size < RECV_SIZE and not to_end:
                return

    def _from_backend_watched(self, data: bytes) -> None:
        """Backend bytes before the ServerHello is known: watch, then forward."""
        watch = self._watch
        if watch is not None and not watch.server_done:
            try:
                known = watch.from_server(data, self._send)
            except AlertError as error:  # held client bytes that cannot start a hello
                self.client.refuse(error.alert, str(error))
                return
            if known:
                self._server_said(watch)
        self.client.record.bytes_to_client += len(data)
        self.transport.write(data)

    def _from_backend_fast(self, data: bytes) -> None:
        record = self.client.record
        record.bytes_to_client += len(data)
        self.transport.write(data)
        at = self._splice_at
        if at is not None and record.bytes_from_client + record.bytes_to_client >= at:
            self._maybe_splice()

    def _server_said(self, watch: HelloRetryWatch) -> None:
        """The backend's first handshake message is known: its direction needs no watching."""
        if watch.hello_retry:
            self.client.record.hello_retry = True
            self.metrics.hello_retry_requests.inc()
        if watch.client_done:
            self._fast_path_client()

    # -- the client's bytes -------------------------------------------------------------

    def _client_watched(self, data: bytes) -> None:
        """Client bytes while watching: whole records, then the second ClientHello rewritten."""
        self.client.record.bytes_from_client += len(data)
        watch = self._watch
        assert watch is not None
        try:
            watch.from_client(data, self._send)
        except AlertError as error:
            self.client.refuse(error.alert, str(error))
            return
        if watch.client_done:
            self._fast_path_client()

    def _client_fast(self, data: bytes) -> None:
        record = self.client.record
        record.bytes_from_client += len(data)
        self._send(data)
        at = self._splice_at
        if at is not None and record.bytes_from_client + record.bytes_to_client >= at:
            self._maybe_splice()

    def _fast_path_client(self) -> None:
        self._inspecting = False
        self._watch = None
        record = self.client.record
        self.client.set_input(self._client_fast)
        self.client.handshake_done()
        if self._splicing:
            self._splice_at = record.bytes_from_client + record.bytes_to_client + SPLICE_AFTER

    def _send(self, data: bytes) -> None:
        """Write to the backend; a full socket pauses reading from the client."""
        out = self._out
        if out:
            out += data
            return
        sock = self.sock
        if sock is None:
            return
        try:
            sent = sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            # Told after this call (the read side will see it too).
            self.engine.soon(lambda: self._backend_lost(_LOST_MESSAGE))
            return
        if sent < len(data):
            out += memoryview(data)[sent:]
            self._watch_backend_writes()
            self.transport.pauseProducing()

    def _watch_backend_writes(self) -> None:
        if not self._watching_writes and self.sock is not None and self.fd >= 0:
            self._watching_writes = True
            if self.fd in self.engine.registered:
                self.engine.watch_writes(self.fd)

    def _flush_out(self) -> None:
        out = self._out
        sock = self.sock
        assert sock is not None
        while out:
            try:
                sent = sock.send(out)
            except BlockingIOError:
                return
            except InterruptedError:
                continue
            except OSError:
                self._backend_lost(_LOST_MESSAGE)
                return
            del out[:sent]
        if self._shut_backend == 1:
            self._shutdown_backend()
        if self._closing_backend:
            self._close_backend(gentle=False, reset=False)
            return
        if not (self._done or self._client_eof):
            self.transport.resumeProducing()

    # -- the client transport's producer (flow control toward the client) -------------

    def pauseProducing(self) -> None:
        """The client's socket is full: stop reading the backend."""
        self._reads_paused = True

    def resumeProducing(self) -> None:
        """The client's socket drained: read the backend again."""
        if not self._reads_paused:
            return
        self._reads_paused = False
        if self._connected and not (self._backend_eof or self._done):
            self.engine.soon(self._resume_backend)

    def _resume_backend(self) -> None:
        if not (self._reads_paused or self._backend_eof or self._done or self._link):
            self._read_backend(True)

    def stopProducing(self) -> None:
        """The client transport is closing: drop the backend side."""
        self.abort()

    # -- half-close and closing (the Handler interface) -----------------------------------

    def handshake_pending(self) -> bool:
        """Whether the relay is still connecting or watching the handshake."""
        return not self._connected or self._inspecting

    def client_eof(self) -> None:
        """The client sent FIN: pass it on after its bytes, keep the other direction."""
        if self._done or self._client_eof:
            return
        self._client_eof = True
        if self._connected:
            self._forward_client_eof()
        self._maybe_finish()

    def _forward_client_eof(self) -> None:
        if self._watch is not None:
            held = self._watch.client_eof()
            if held:
                self._send(held)
        if self._backend_eof:
            return  # both ends are done: closing the backend sends its FIN
        self._shut_backend = max(self._shut_backend, 1)
        if not self._out:
            self._shutdown_backend()

    def _shutdown_backend(self) -> None:
        self._shut_backend = 2
        if self.sock is not None:
            try:
                self.sock.shutdown(socket.SHUT_WR)
            except OSError:  # the backend is gone; its read side tells
                return

    def _backend_ended(self) -> None:
        """The backend sent FIN: pass it on (before its first byte it is a failure)."""
        if self._done or self._backend_eof:
            return
        if self.client.record.bytes_to_client == 0:
            self._backend_failed("backend closed before answering")
            return
        self._backend_eof = True
        if not self._client_eof:
            self.transport.loseWriteConnection()
        # Else both directions have ended: the close that follows sends the
        # client its FIN after what is queued, without a shutdown first.
        self._maybe_finish()

    def _maybe_finish(self) -> None:
        if self._client_eof and self._backend_eof:
            self._done = True
            self.transport.loseConnection()
            self._close_backend(gentle=True)

    def _backend_lost(self, message: str) -> None:
        """The backend connection broke: close the client after what is queued."""
        if self._done:
            return
        record = self.client.record
        if record.bytes_to_client == 0:
            self._backend_failed(f"backend closed before answering: {message}")
            return
        self._done = True
        self._close_backend(gentle=False, reset=False)
        if record.close_reason == "":
            record.close_reason = "backend closed"
        self.transport.loseConnection()

    def _backend_failed(self, reason: str) -> None:
        """The backend ended before its first byte: internal_error to the client."""
        self._done = True
        self.metrics.backend_failures.labels(self.backend.name, "closed").inc()
        self.client.refuse(AlertDescription.INTERNAL_ERROR, reason)

    def client_lost(self, reason: Failure) -> None:
        """The client is gone: stop connecting, or close the backend gently."""
        self._done = True
        self._cancel_deadline()
        self._close_backend(gentle=self._connected)

    def abort(self) -> None:
        """Drop the backend side at once (the front refuses or timed out)."""
        self._done = True
        self._cancel_deadline()
        self._close_backend(gentle=False)

    def _close_backend(self, *, gentle: bool, reset: bool = True) -> None:
        """Close the backend socket: ``gentle`` after its buffer drains, else at once.

        An immediate close sends a reset unless ``reset`` is False (the
        backend itself broke the connection, or asked nothing more of it).
        """
        self._stop_splice()
        sock = self.sock
        if sock is None:
            return
        if gentle and self._out:
            self._closing_backend = True
            return
        if reset and not gentle:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        self.sock = None
        self.engine.closed(self.fd)
        sock.close()

    # -- zero copy ----------------------------------------------------------------------

    def _maybe_splice(self) -> None:
        """Move both directions into the kernel once nothing waits in user space."""
        transport = self.transport
        if self._done or self._client_eof or self._backend_eof or self.sock is None:
            self._splice_at = None
            return
        if self._out or transport.buffered or transport.disconnected:
            return  # tried again after the next chunk
        self._splice_at = None
        # The pumps wait for room on either side.
        self._watch_backend_writes()
        transport.watch_writes()
        link = self._link = SpliceLink(
            self.engine,
            transport.fd,
            self.fd,
            self.client.record,
            shut_client=transport.loseWriteConnection,
            shut_backend=self._shutdown_backend,
            finished=self._spliced,
        )
        transport.takeover = link.client_events
        link.start()

    def _spliced(self, error: OSError | None) -> None:
        """The splice link ended: both directions (None), or a socket error."""
        self._link = None
        if self._done:
            return
        self._done = True
        self.transport.takeover = None
        record = self.client.record
        if error is None:
            # Both directions ended and each FIN was passed on already.
            record.close_reason = record.close_reason or "both sides closed"
            self.transport.loseConnection()
            self._close_backend(gentle=False, reset=False)
        else:
            record.close_reason = f"relay error: {error}"
            self._close_backend(gentle=False)
            self.transport.abortConnection()

    def _stop_splice(self) -> None:
        link, self._link = self._link, None
        if link is not None:
            link.stop()

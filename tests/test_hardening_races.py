# Trial's assertions are untyped, and calls through a subclass escape
# the project's untyped_calls_exclude = ["twisted"]:
# mypy: disable-error-code="no-untyped-call"
"""Close races and half-close in the relay (issue 12, item 3).

A relay has two connections whose ends can arrive in one reactor turn.
Once the relay is done, whatever the other side reports later must be a
no-op (no half-close of a dead transport: epoll refuses descriptor -1 with
a ValueError, logged as "Unhandled Error"), and a backend that ends before
its first byte, by reset or by FIN, must leave the client an
``internal_error`` alert rather than a bare close.

Each ordering is tested twice:

* in memory (:mod:`tests.twistedhelpers`), where the two events are
  delivered back to back by hand, so the order is exact;
* on real loopback sockets, where the test resets or half-closes the plain
  sockets of the client and the backend in one synchronous step and checks,
  with a turn counter, that the front saw both events in the same reactor
  turn and in the intended order.  Trial fails a test that logs an
  unhandled error, so the old ValueError would fail it.
"""

from __future__ import annotations

import contextlib
import socket
import struct
from collections.abc import Callable
from typing import Any

from twisted.internet import reactor as global_reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from echfront.ech.decoder import ECHDecoder
from echfront.ech.keyset import KeySet
from echfront.front.protocol import FrontFactory, FrontProtocol
from echfront.front.relay import Relay
from echfront.front.state import FrontSettings, FrontState
from echfront.targets import Backend
from tests.echhello import seal_hello
from tests.test_relay import KEY, FixedRouter, RelayTestCase
from tests.twistedhelpers import Pipe, RecordingServer, alert

INTERNAL_ERROR = alert(80)
reactor: Any = global_reactor
#: What a race does to the client and backend sockets.
Action = Callable[[socket.socket, socket.socket], None]


# -- in memory: the exact orderings ---------------------------------------------


class MemoryOrderingTests(RelayTestCase):
    """Both events delivered back to back, before the network moves again."""

    def inspecting(self) -> tuple[Pipe, FrontProtocol, RecordingServer, Pipe, RecordingServer]:
        """An ECH-accepted connection whose backend has not answered yet."""
        pipe, front, client, backend_pipe, backend = self.relay_to(seal_hello(KEY.config).records)
        self.assertEqual(bytes(client.data), b"")
        self.assertFalse(front.handed_off)
        return pipe, front, client, backend_pipe, backend

    @staticmethod
    def client_fin(pipe: Pipe) -> None:
        """The front reads the client's FIN now."""
        pipe.server.eof_pending = True
        pipe.server.deliver()

    @staticmethod
    def backend_fin(backend_pipe: Pipe) -> None:
        """The front reads the backend's FIN now."""
        backend_pipe.client.eof_pending = True
        backend_pipe.client.deliver()

    def assert_alerted(self, pipe: Pipe, client: RecordingServer, backend_pipe: Pipe) -> None:
        self.net.flush()
        self.assertEqual(bytes(client.data), INTERNAL_ERROR)
        self.assertEqual(client.events[-1], "lost")
        # Nothing was half-closed after the backend's end was known.
        self.assertNotIn("loseWriteConnection", backend_pipe.client.calls)
        self.assertEqual(bytes(pipe.server.late), b"")
        self.assertEqual(self.factory.open_connections, 0)
        self.assertEqual(
            self.factory.metrics.registry.get_sample_value(
                "echfront_backend_failures_total", {"backend": "be", "reason": "closed"}
            ),
            1,
        )

    def test_backend_reset_then_client_fin(self) -> None:
        pipe, _front, client, backend_pipe, _backend = self.inspecting()
        backend_pipe.client.connection_lost(aborted=True)
        self.client_fin(pipe)
        self.assert_alerted(pipe, client, backend_pipe)

    def test_client_fin_then_backend_reset(self) -> None:
        pipe, _front, client, backend_pipe, _backend = self.inspecting()
        self.client_fin(pipe)
        # The FIN went on to the backend before it reset.
        self.assertEqual(backend_pipe.client.calls[-1], "loseWriteConnection")
        backend_pipe.client.calls.clear()
        backend_pipe.client.connection_lost(aborted=True)
        self.assert_alerted(pipe, client, backend_pipe)

    def test_backend_fin_before_its_first_byte(self) -> None:
        pipe, _front, client, backend_pipe, _backend = self.inspecting()
        self.backend_fin(backend_pipe)
        self.assert_alerted(pipe, client, backend_pipe)
        self.assertNotIn("loseWriteConnection", pipe.server.calls)

    def test_backend_fin_then_client_fin_before_its_first_byte(self) -> None:
        pipe, _front, client, backend_pipe, _backend = self.inspecting()
        self.backend_fin(backend_pipe)
        self.client_fin(pipe)
        self.assert_alerted(pipe, client, backend_pipe)

    def test_backend_fin_after_bytes_is_passed_on(self) -> None:
        # With a byte already relayed an alert would break the record
        # stream: the FIN is passed on, as before.
        pipe, _front, client, backend_pipe, backend = self.inspecting()
        backend.send(b"\x16\x03\x03")
        self.net.flush()
        self.backend_fin(backend_pipe)
        self.net.flush()
        self.assertEqual(bytes(client.data), b"\x16\x03\x03")
        self.assertEqual(client.events, ["made", "eof"])
        self.assertEqual(pipe.server.calls[-1], "loseWriteConnection")

    def test_client_reset_then_backend_fin(self) -> None:
        pipe, _front, _client, backend_pipe, backend = self.inspecting()
        backend.send(b"\x16\x03\x03")
        self.net.flush()
        pipe.server.connection_lost(aborted=True)
        pipe.server.calls.clear()
        self.backend_fin(backend_pipe)
        self.net.flush()
        self.assertNotIn("loseWriteConnection", pipe.server.calls)
        self.assertIn("loseConnection", backend_pipe.client.calls)
        self.assertEqual(self.factory.open_connections, 0)

    def test_backend_fin_then_client_reset(self) -> None:
        pipe, _front, client, backend_pipe, backend = self.inspecting()
        backend.send(b"\x16\x03\x03")
        self.net.flush()
        self.backend_fin(backend_pipe)
        self.assertEqual(pipe.server.calls[-1], "loseWriteConnection")
        pipe.server.connection_lost(aborted=True)
        backend_pipe.client.calls.clear()
        # The backend's own close after the client is gone changes nothing.
        backend_pipe.client.connection_lost(aborted=False)
        self.net.flush()
        self.assertEqual(backend_pipe.client.calls, [])
        self.assertEqual(self.factory.open_connections, 0)
        self.assertEqual(bytes(client.data), b"\x16\x03\x03")

    def test_events_after_both_fins_are_no_ops(self) -> None:
        pipe, _front, client, backend_pipe, backend = self.inspecting()
        backend.send(b"\x16\x03\x03")
        self.net.flush()
        self.backend_fin(backend_pipe)
        self.client_fin(pipe)
        self.assertIn("loseConnection", pipe.server.calls)
        pipe.server.calls.clear()
        backend_pipe.client.calls.clear()
        # A late reset of either side: nothing more is done to the other.
        backend_pipe.client.connection_lost(aborted=True)
        self.assertEqual(pipe.server.calls, [])
        self.net.flush()
        self.assertEqual(bytes(client.data), b"\x16\x03\x03")


# -- real sockets: the same turn -------------------------------------------------


class TurnCounter:
    """Counts reactor turns with a zero-delay call that re-arms itself."""

    def __init__(self, clock: IReactorTime) -> None:
        self.clock = clock
        self.turn = 0
        self._call: IDelayedCall = clock.callLater(0, self._tick)

    def _tick(self) -> None:
        self.turn += 1
        self._call = self.clock.callLater(0, self._tick)

    def stop(self) -> None:
        if self._call.active():
            self._call.cancel()


def reset(sock: socket.socket) -> None:
    """Close with RST (SO_LINGER 0)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def fin(sock: socket.socket) -> None:
    """Half-close: send FIN, keep reading."""
    sock.shutdown(socket.SHUT_WR)


class RealSocketOrderingTests(TestCase):
    """A real front between a plain client socket and a plain backend socket."""

    timeout = 30

    def setUp(self) -> None:
        self.backend_listener = socket.socket()
        self.backend_listener.bind(("127.0.0.1", 0))
        self.backend_listener.listen(8)
        self.backend_listener.setblocking(False)
        self.addCleanup(self.backend_listener.close)
        host, port = self.backend_listener.getsockname()
        backend = Backend(
            "be", TCP4ClientEndpoint(reactor, host, port), "tcp", 5.0, 0, (host, port)
        )
        state = FrontState(
            ECHDecoder(KeySet([KEY])), FixedRouter(backend), frozenset({backend}), FrontSettings()
        )
        self.factory = FrontFactory(state, reactor)
        self.port = reactor.listenTCP(0, self.factory, interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        self.events: list[tuple[str, int]] = []
        self.counter: TurnCounter | None = None
        for name in ("client_eof", "client_lost", "backend_eof", "backend_lost"):
            self.patch(Relay, name, self._recording(name, getattr(Relay, name)))

    def _recording(self, name: str, method: Callable[..., None]) -> Callable[..., None]:
        def record(relay: Relay, *args: object) -> None:
            self.events.append((name, -1 if self.counter is None else self.counter.turn))
            method(relay, *args)

        return record

    @inlineCallbacks
    def wait_for(self, ready: Callable[[], object], what: str) -> Any:
        """Poll ``ready`` every 5 ms for up to 5 s; its first true value."""
        for _ in range(1000):
            value = ready()
            if value:
                return value
            yield deferLater(reactor, 0.005, lambda: None)
        self.fail(f"timed out waiting for {what}")

    @inlineCallbacks
    def connected_pair(self) -> Any:
        """A client socket whose ECH hello reached the backend socket, unanswered."""
        client = socket.create_connection(("127.0.0.1", self.port.getHost().port))
        client.setblocking(False)
        self.addCleanup(client.close)
        client.sendall(seal_hello(KEY.config).records)
        backend: socket.socket = yield self.wait_for(self._accept, "the backend connection")
        self.addCleanup(backend.close)
        backend.setblocking(False)
        received = bytearray()

        def hello_arrived() -> bool:
            with contextlib.suppress(BlockingIOError):
                received.extend(backend.recv(65536))
            return len(received) > 5 and len(received) >= 5 + int.from_bytes(received[3:5])

        yield self.wait_for(hello_arrived, "the forwarded ClientHello")
        return client, backend

    def _accept(self) -> socket.socket | None:
        try:
            return self.backend_listener.accept()[0]
        except BlockingIOError:
            return None

    @staticmethod
    def read_all(sock: socket.socket) -> tuple[bytes, str]:
        """What the socket can read now, and how it ended (eof, reset, open)."""
        data = bytearray()
        while True:
            try:
                chunk = sock.recv(65536)
            except BlockingIOError:
                return bytes(data), "open"
            except ConnectionResetError:
                return bytes(data), "reset"
            if not chunk:
                return bytes(data), "eof"
            data += chunk

    @inlineCallbacks
    def race(self, first: Action, second: Action, expected: tuple[str, str]) -> Any:
        """Run ``first`` and ``second`` in one step; the front must see ``expected`` in one turn.

        The kernel hands both events over before the reactor polls again, so
        one turn normally sees both; a run where it did not is repeated (up
        to five times) rather than passed.

        :returns: the client and backend sockets of the run that did.
        """
        for _attempt in range(5):
            self.events.clear()
            client, backend = yield self.connected_pair()
            self.counter = TurnCounter(reactor)
            first(client, backend)
            second(client, backend)
            yield self.wait_for(lambda: not self.factory.connections, "the front to close")
            self.counter.stop()
            seen = [(name, turn) for name, turn in self.events if name in expected]
            names = tuple(name for name, _turn in seen[:2])
            turns = {turn for _name, turn in seen[:2]}
            if names == expected and len(turns) == 1:
                return client, backend
            client.close()
            backend.close()
        self.fail(f"never saw {expected} in one reactor turn: {self.events}")

    def outcome(self, sock: socket.socket) -> Deferred[tuple[bytes, str]]:
        """Everything ``sock`` receives until its connection ends, and how it ended."""
        received = bytearray()

        def ended() -> tuple[bytes, str] | None:
            data, end = self.read_all(sock)
            received.extend(data)
            return (bytes(received), end) if end != "open" else None

        result: Deferred[tuple[bytes, str]] = self.wait_for(ended, "the connection to end")
        return result

    @inlineCallbacks
    def test_backend_reset_and_client_fin_in_one_turn(self) -> Any:
        client, _backend = yield self.race(
            lambda c, b: reset(b), lambda c, b: fin(c), ("backend_lost", "client_eof")
        )
        data, end = yield self.outcome(client)
        self.assertEqual((data, end), (INTERNAL_ERROR, "eof"))

    @inlineCallbacks
    def test_client_fin_and_backend_reset_in_one_turn(self) -> Any:
        client, _backend = yield self.race(
            lambda c, b: fin(c), lambda c, b: reset(b), ("client_eof", "backend_lost")
        )
        data, end = yield self.outcome(client)
        self.assertEqual((data, end), (INTERNAL_ERROR, "eof"))

    @inlineCallbacks
    def test_client_reset_and_backend_fin_in_one_turn(self) -> Any:
        _client, backend = yield self.race(
            lambda c, b: reset(c), lambda c, b: fin(b), ("client_lost", "backend_eof")
        )
        # The backend's connection is closed too, not left half open.
        _data, end = yield self.outcome(backend)
        self.assertIn(end, ("eof", "reset"))

    @inlineCallbacks
    def test_backend_fin_and_client_reset_in_one_turn(self) -> Any:
        _client, backend = yield self.race(
            lambda c, b: fin(b), lambda c, b: reset(c), ("backend_eof", "client_lost")
        )
        _data, end = yield self.outcome(backend)
        self.assertIn(end, ("eof", "reset"))

    @inlineCallbacks
    def test_backend_fin_before_its_first_byte(self) -> Any:
        client, backend = yield self.connected_pair()
        fin(backend)
        data, end = yield self.outcome(client)
        self.assertEqual((data, end), (INTERNAL_ERROR, "eof"))
        yield self.wait_for(lambda: not self.factory.connections, "the front to close")
        self.assertEqual(
            self.factory.metrics.registry.get_sample_value(
                "echfront_backend_failures_total", {"backend": "be", "reason": "closed"}
            ),
            1,
        )

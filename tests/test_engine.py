# Trial's assertions are untyped, and calls through a subclass escape
# the project's untyped_calls_exclude = ["twisted"]:
# mypy: disable-error-code="no-untyped-call"
"""The lean engine (echfront.front.engine, leanport, leantransport, leanrelay, leansplice).

Connections here are real loopback sockets: a client socket, the front on
a :class:`~echfront.front.leanport.LeanPort`, and a backend socket the test
accepts and drives.  The engine runs on a ``MemoryReactorClock`` (its epoll
descriptor and the listening socket are "readers" of that reactor), and
:class:`LeanHarness` pumps it by hand: whatever the kernel has delivered is
handled, then the clock's zero-delay calls run, until nothing moves.  So the
tests are synchronous and time is the clock's, while every byte crosses
real sockets.

:class:`LeanHarness` is also one of the two harnesses the relay's
behaviour tests in tests/test_relay.py run on (the other drives the Twisted
relay in memory); the tests here cover what is the engine's own: the
deadline clock, accepting, flow control, splicing, the hand-over to
Twisted for other targets, and that nothing is left behind.
"""

from __future__ import annotations

import contextlib
import gc
import os
import select
import shutil
import socket
import struct
import tempfile
import weakref
from typing import Any

import pytest
from twisted.internet import reactor as global_reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, serverFromString
from twisted.internet.protocol import Factory
from twisted.internet.task import deferLater
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from echfront.ech.decoder import ECHDecoder
from echfront.ech.keyset import KeySet
from echfront.front.deadlines import DeadlineClock
from echfront.front.engine import AVAILABLE, engine_for, plain_tcp_target
from echfront.front.leanport import LeanPort, LeanServerEndpoint, adopt_port, lean_endpoint
from echfront.front.leanrelay import LeanRelay
from echfront.front.leantransport import LeanTransport
from echfront.front.local import local_target
from echfront.front.protocol import FrontFactory, FrontProtocol
from echfront.front.state import FrontSettings, FrontState
from echfront.front.tlsoptions import load_certificate_options
from echfront.interfaces import IRouter
from echfront.targets import Backend, Local
from tests.echhello import InnerSpec, seal_hello
from tests.test_local import CA, ISSUED, EchoServer
from tests.test_local import PUBLIC_NAME as LOCAL_NAME
from tests.test_relay import KEY, FixedRouter, inner_records
from tests.twistedhelpers import plain_hello, server_hello

pytestmark = pytest.mark.skipif(not AVAILABLE, reason="the lean engine is Linux only")

MiB = 1024 * 1024
#: How long the harness waits for the kernel between rounds with nothing to do.
QUIET = 0.01
#: SO_LINGER on, 0 seconds: close sends a reset.
RESET_LINGER = struct.pack("ii", 1, 0)
#: Rounds with nothing moving before the harness calls it settled.
QUIET_ROUNDS = 3


def socket_path(test: SynchronousTestCase) -> str:
    """A UNIX socket path in a fresh temporary directory (not trial's mktemp,
    which writes below the working directory), removed after the test."""
    directory = tempfile.mkdtemp(prefix="echfront-engine-")
    test.addCleanup(shutil.rmtree, directory, True)
    return os.path.join(directory, "sock")


def _nonblocking(sock: socket.socket) -> socket.socket:
    sock.setblocking(False)
    return sock


class SocketLink:
    """One client connection through a lean front, and its backend connection.

    The test writes with the ``client_*`` and ``backend_*`` methods and reads
    what each end received in :attr:`client_data` and :attr:`backend_data`;
    :attr:`client_end` and :attr:`backend_end` say how each end's stream
    ended (None, "eof" or "reset").
    """

    def __init__(self, harness: LeanHarness, client: socket.socket) -> None:
        self.harness = harness
        self.client = _nonblocking(client)
        #: The front's protocol for this connection (set once accepted).
        self.front: Any = None
        self.backend: socket.socket | None = None
        self.client_data = bytearray()
        self.backend_data = bytearray()
        self.client_end: str | None = None
        self.backend_end: str | None = None
        self.client_closed = False
        self.backend_closed = False
        #: Whether the harness reads what reaches the backend (a test may
        #: stop it, to see flow control).
        self.backend_reading = True

    @property
    def client_ended(self) -> bool:
        """Whether the client's stream from the front ended (FIN or reset)."""
        return self.client_end is not None

    @property
    def backend_ended(self) -> bool:
        """Whether the backend's stream from the front ended (FIN or reset)."""
        return self.backend_end is not None

    @property
    def record(self) -> Any:
        """The front's record of this connection."""
        return self.front.record

    # -- the client ---------------------------------------------------------------

    def client_send_pieces(self, data: bytes, size: int) -> None:
        """Send ``data`` ``size`` bytes at a time, letting the front read each."""
        for start in range(0, len(data), size):
            self.client_send(data[start : start + size])

    def client_send(self, data: bytes) -> None:
        self.client.setblocking(True)
        self.client.settimeout(5)
        self.client.sendall(data)
        self.client.setblocking(False)
        self.harness.settle()

    def client_shutdown(self) -> None:
        self.client.shutdown(socket.SHUT_WR)
        self.harness.settle()

    def client_close(self) -> None:
        self.client.close()
        self.client_closed = True
        self.harness.settle()

    def client_reset(self) -> None:
        self.client.setsockopt(
            socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
        )
        self.client_close()

    # -- the backend ---------------------------------------------------------------

    def _backend(self) -> socket.socket:
        assert self.backend is not None, "the front has not connected to the backend"
        return self.backend

    def backend_send(self, data: bytes) -> None:
        sock = self._backend()
        sock.setblocking(True)
        sock.settimeout(5)
        sock.sendall(data)
        sock.setblocking(False)
        self.harness.settle()

    def backend_shutdown(self) -> None:
        self._backend().shutdown(socket.SHUT_WR)
        self.harness.settle()

    def backend_close(self) -> None:
        self._backend().close()
        self.backend_closed = True
        self.harness.settle()

    def backend_reset(self) -> None:
        sock = self._backend()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RESET_LINGER)
        sock.close()
        self.backend_closed = True
        self.harness.settle()

    # -- collecting ------------------------------------------------------------------

    def collect(self) -> bool:
        """Read what has arrived at either end; whether anything did."""
        moved = False
        if not self.client_closed and self.client_end is None:
            moved |= self._drain(self.client, self.client_data, "client")
        backend = self.backend
        reading = self.backend_reading and not self.backend_closed and self.backend_end is None
        if backend is not None and reading:
            moved |= self._drain(backend, self.backend_data, "backend")
        return moved

    def _drain(self, sock: socket.socket, into: bytearray, end: str) -> bool:
        moved = False
        while True:
            try:
                data = sock.recv(1 << 20)
            except BlockingIOError:
                return moved
            except ConnectionResetError:
                setattr(self, f"{end}_end", "reset")
                return True
            if not data:
                setattr(self, f"{end}_end", "eof")
                return True
            into += data
            moved = True

    def close(self) -> None:
        self.client.close()
        self.client_closed = True
        if self.backend is not None:
            self.backend.close()
            self.backend_closed = True


class LeanHarness:
    """A lean front on loopback sockets, pumped by hand (see the module docstring).

    :ivar clock: the reactor the engine and the front run on.
    :ivar backend_server: where the front's backend connections arrive.
    """

    def __init__(self) -> None:
        self.clock = MemoryReactorClock()
        self.backend_server = _nonblocking(socket.create_server(("127.0.0.1", 0)))
        self.links: list[SocketLink] = []
        self.port: LeanPort | None = None
        self.factory: FrontFactory | None = None
        self.refused_port = self._closed_port()
        self.silent: list[socket.socket] = []

    def _silent_port(self) -> int:
        """A listener whose accept queue is full: a new connect's SYN is dropped."""
        silent = socket.socket()
        silent.bind(("127.0.0.1", 0))
        silent.listen(0)
        self.silent = [silent]
        for _ in range(2):  # backlog 0 still queues one; fill it up
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(silent.getsockname())
            self.silent.append(filler)
        port: int = silent.getsockname()[1]
        return port

    @staticmethod
    def _closed_port() -> int:
        """A port nothing listens on (connects to it are refused)."""
        with socket.create_server(("127.0.0.1", 0)) as sock:
            port: int = sock.getsockname()[1]
        return port

    @property
    def engine(self) -> Any:
        return engine_for(self.clock)

    def backend(
        self, *, name: str = "be", kind: str = "ok", port: int | None = None, timeout: float = 5.0
    ) -> Backend:
        """A plain TCP backend at the harness's backend socket (or ``port``).

        :param kind: "ok"; "refused" (nothing listens there); "silent"
            (connects never complete: a listener whose queue is full).
        """
        if kind == "refused":
            port = self.refused_port
        elif kind == "silent":
            port = self._silent_port()
        port = self.backend_server.getsockname()[1] if port is None else port
        return Backend(
            name,
            TCP4ClientEndpoint(self.clock, "127.0.0.1", port),
            description=f"tcp:host=127.0.0.1:port={port}",
            connect_timeout=timeout,
            address=("127.0.0.1", port),
        )

    def serve(
        self,
        router: IRouter,
        targets: frozenset[Backend | Local],
        settings: FrontSettings | None = None,
    ) -> FrontFactory:
        """Listen with a front of ``router`` and ``targets`` (replacing any before)."""
        if self.port is not None:
            self.port.stopListening()
        state = FrontState(ECHDecoder(KeySet([KEY])), router, targets, settings or FrontSettings())
        self.factory = FrontFactory(state, self.clock)
        self.port = LeanPort(self.clock, self.factory, interface="127.0.0.1")
        self.port.startListening()
        return self.factory

    def open(self, first: bytes = b"") -> SocketLink:
        """Connect a client and send ``first``."""
        assert self.port is not None and self.factory is not None
        before = set(self.factory.connections)
        client = socket.create_connection(("127.0.0.1", self.port.getHost().port), timeout=5)
        link = SocketLink(self, client)
        self.links.append(link)
        self.settle()
        accepted = set(self.factory.connections) - before
        if accepted:
            (link.front,) = accepted
        if first:
            link.client_send(first)
        return link

    def step(self) -> bool:
        """One round: accept, handle the engine's events, run zero-delay calls."""
        port = self.port
        engine = self.engine
        readers: list[Any] = [self.backend_server, engine.epoll]
        if port is not None and port.listening:
            readers.append(port.socket)
        ready, _, _ = select.select(readers, [], [], QUIET)
        moved = False
        if port is not None and port.listening and port.socket in ready:
            port.doRead()
            moved = True
        if engine.epoll in ready and engine in self.clock.readers:
            engine.doRead()
            moved = True
        if self.backend_server in ready:
            with contextlib.suppress(BlockingIOError):
                sock, _ = self.backend_server.accept()
                waiting = [link for link in self.links if link.backend is None]
                assert waiting, "a backend connection nobody waits for"
                waiting[0].backend = _nonblocking(sock)
                moved = True
        # A zero-delay call, or the engine's 1 ms pause after a bulk wake-up.
        self.clock.advance(0.002 if engine._moderating is not None else 0)
        for link in self.links:
            moved |= link.collect()
        return moved

    def settle(self) -> None:
        """Step until nothing has moved for a few rounds (bounded)."""
        quiet = 0
        for _ in range(2000):
            quiet = 0 if self.step() else quiet + 1
            if quiet >= QUIET_ROUNDS:
                return
        raise AssertionError("the lean front never went quiet")

    def advance(self, seconds: float) -> None:
        """Move the clock (deadlines), then settle."""
        self.clock.advance(seconds)
        self.settle()

    def close(self) -> None:
        for link in self.links:
            link.close()
        if self.port is not None:
            self.port.stopListening()
        self.settle()
        self.backend_server.close()
        for sock in self.silent:
            sock.close()
        self.engine.close()


class LeanTestCase(SynchronousTestCase):
    """A lean front routing everything to one backend."""

    def setUp(self) -> None:
        self.net = LeanHarness()
        self.addCleanup(self.net.close)
        self.backend = self.net.backend()
        self.factory = self.net.serve(FixedRouter(self.backend), frozenset({self.backend}))

    def use(self, backend: Backend, settings: FrontSettings | None = None) -> None:
        self.backend = backend
        self.factory = self.net.serve(FixedRouter(backend), frozenset({backend}), settings)

    def connections(self) -> list[Any]:
        return list(self.factory.connections)


# -- the deadline clock ---------------------------------------------------------------


class DeadlineClockTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.clock = DeadlineClock(self.reactor)
        self.calls: list[str] = []

    def test_long_delays_are_coarse_never_early(self) -> None:
        self.clock.callLater(10, self.calls.append, "a")
        self.reactor.advance(9.95)
        self.assertEqual(self.calls, [])
        self.reactor.advance(0.1)
        self.assertEqual(self.calls, ["a"])

    def test_short_delays_go_to_the_reactor(self) -> None:
        call = self.clock.callLater(0.5, self.calls.append, "b")
        self.assertIn(call, self.reactor.getDelayedCalls())
        self.reactor.advance(0.5)
        self.assertEqual(self.calls, ["b"])

    def test_one_timer_for_many_deadlines_and_none_when_all_are_cancelled(self) -> None:
        deadlines = [self.clock.callLater(10 + i, self.calls.append, str(i)) for i in range(50)]
        self.assertEqual(len(self.reactor.getDelayedCalls()), 1)
        for deadline in deadlines:
            self.assertTrue(deadline.active())
            deadline.cancel()
            self.assertFalse(deadline.active())
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        self.assertEqual(self.clock.queued, 0)
        self.reactor.advance(100)
        self.assertEqual(self.calls, [])

    def test_cancelled_entries_are_dropped_in_bulk(self) -> None:
        keep = self.clock.callLater(1000, self.calls.append, "kept")
        for _ in range(3000):
            self.clock.callLater(20, self.calls.append, "x").cancel()
        self.assertLess(self.clock.queued, 2 * 1 + 1024 + 2)
        self.assertEqual(self.clock.pending, 1)
        self.reactor.advance(1000.1)
        self.assertEqual(self.calls, ["kept"])
        self.assertFalse(keep.active())

    def test_reset_and_delay(self) -> None:
        deadline = self.clock.callLater(5, self.calls.append, "c")
        self.reactor.advance(4)
        deadline.reset(5)
        self.reactor.advance(4.5)
        self.assertEqual(self.calls, [])
        deadline.delay(2)  # due at 11
        self.reactor.advance(2.4)
        self.assertEqual(self.calls, [])
        self.reactor.advance(0.2)
        self.assertEqual(self.calls, ["c"])
        self.assertEqual(self.reactor.getDelayedCalls(), [])


# -- the lean path end to end ------------------------------------------------------------


class LeanRelayTests(LeanTestCase):
    def test_accepted_ech_is_relayed_with_byte_counts_and_no_timers(self) -> None:
        sealed = seal_hello(KEY.config, InnerSpec())
        link = self.net.open(sealed.records)
        self.assertEqual(bytes(link.backend_data), inner_records(sealed))
        (front,) = self.connections()
        self.assertIsInstance(front.transport, LeanTransport)
        self.assertIs(front.reactor, self.net.engine.clock)
        link.backend_send(server_hello() + b"\x17\x03\x03\x00\x02hi")
        link.client_send(b"\x17\x03\x03\x00\x01z")
        self.assertTrue(bytes(link.backend_data).endswith(b"\x17\x03\x03\x00\x01z"))
        self.assertEqual(front.record.bytes_to_client, len(server_hello()) + 7)
        self.assertEqual(front.record.bytes_from_client, 6)
        # Past the handshake: no deadline, and only the factory's idle sweep.
        self.assertEqual(self.net.engine.clock.pending, 0)
        calls = self.net.clock.getDelayedCalls()
        sweeps = [c for c in calls if getattr(c, "func", None) == self.factory._sweep]
        self.assertEqual(self.net.clock.getDelayedCalls(), sweeps)

    def test_connection_is_logged_and_counted_like_any_other(self) -> None:
        link = self.net.open(plain_hello())
        link.backend_send(server_hello())
        link.client_shutdown()
        link.backend_shutdown()
        self.assertEqual(link.client_end, "eof")
        self.assertEqual(self.factory.open_connections, 0)
        registry = self.factory.metrics.registry
        self.assertEqual(
            registry.get_sample_value(
                "echfront_connections_total",
                {"ech": "not_offered", "alert": "none", "route": "be"},
            ),
            1,
        )
        self.assertEqual(
            registry.get_sample_value("echfront_backend_connect_seconds_count", {"backend": "be"}),
            1,
        )
        self.assertEqual(registry.get_sample_value("echfront_active_connections"), 0)
        self.assertEqual(len(self.factory.connection_log), 0)  # flushed once idle

    def test_refused_connection_closes_the_socket(self) -> None:
        self.use(self.backend, FrontSettings(max_connections=1))
        first = self.net.open(plain_hello())
        second = self.net.open()
        self.assertEqual(second.client_end, "eof")
        self.assertIsNone(first.client_end)
        self.assertEqual(
            self.factory.metrics.registry.get_sample_value(
                "echfront_limited_connections_total", {"limit": "max_connections"}
            ),
            1,
        )

    def test_backend_by_host_name_or_with_proxy_header_is_not_plain(self) -> None:
        named = Backend("n", self.backend.endpoint, address=("localhost", 1))
        proxied = Backend("p", self.backend.endpoint, address=("127.0.0.1", 1), proxy_protocol=2)
        self.assertIsNone(plain_tcp_target(named))
        self.assertIsNone(plain_tcp_target(proxied))
        target = plain_tcp_target(self.backend)
        assert target is not None
        self.assertEqual(target.family, socket.AF_INET)
        self.assertIs(plain_tcp_target(self.backend), target)  # computed once

    def test_first_flight_deadline_is_the_engines(self) -> None:
        self.use(self.backend, FrontSettings(first_flight_timeout=3))
        link = self.net.open(plain_hello()[:20])
        self.net.advance(2.9)
        self.assertIsNone(link.client_end)
        self.net.advance(0.2)
        self.assertEqual(link.client_end, "reset")
        self.assertEqual(self.factory.open_connections, 0)
        self.assertEqual(self.net.engine.clock.queued, 0)


class FlowControlTests(LeanTestCase):
    def test_a_backend_that_does_not_read_stalls_the_client(self) -> None:
        """Nothing piles up in user space: one read's worth at most, each way."""
        self.use(self.backend, FrontSettings(splice=False))
        link = self.net.open(plain_hello())
        link.backend_send(server_hello())
        (front,) = self.connections()
        relay = front._handler
        link.backend_reading = False
        client = link.client
        chunk = b"\x17" * 65536
        sent = 0
        blocked = 0
        for _ in range(3000):  # bounded: 187 MiB at most
            try:
                sent += client.send(chunk)
                blocked = 0
            except BlockingIOError:
                blocked += 1
                if blocked > 5:
                    break
            self.net.step()
        backend = link._backend()
        # Kernel buffers hold what the client could send (Linux grows a
        # receive buffer that is read quickly, up to tcp_rmem's maximum).
        kernel = sum(
            sock.getsockopt(socket.SOL_SOCKET, option)
            for sock, option in (
                (client, socket.SO_SNDBUF),
                (front.transport.socket, socket.SO_RCVBUF),
                (relay.sock, socket.SO_SNDBUF),
                (backend, socket.SO_RCVBUF),
            )
        )
        self.assertGreater(blocked, 5)
        self.assertLessEqual(sent, kernel + 65536)
        self.assertLessEqual(len(relay._out), 65536)
        self.assertTrue(front.transport._paused)
        # The backend reads everything now; the client's bytes all arrive.
        link.backend_reading = True
        for _ in range(3000):
            if len(link.backend_data) - len(plain_hello()) >= sent:
                break
            self.net.step()
        self.assertEqual(len(link.backend_data) - len(plain_hello()), sent)
        self.assertEqual(front.record.bytes_from_client, sent)
        self.assertFalse(front.transport._paused)


class SpliceTests(LeanTestCase):
    def test_bulk_is_spliced_with_half_close_and_counts(self) -> None:
        link = self.net.open(plain_hello())
        link.backend_send(server_hello())
        (front,) = self.connections()
        upload = os.urandom(3 * MiB)
        view = memoryview(upload)
        sent = 0
        for _ in range(20000):
            if sent < len(upload):
                with contextlib.suppress(BlockingIOError):
                    sent += link.client.send(view[sent : sent + 65536])
                if sent == len(upload):
                    link.client.shutdown(socket.SHUT_WR)
            self.net.step()
            if link.backend_end is not None:
                break
        self.assertEqual(bytes(link.backend_data), plain_hello() + upload)
        self.assertEqual(link.backend_end, "eof")
        self.assertTrue(front.record.zero_copy)
        self.assertEqual(front.record.bytes_from_client, len(upload))
        self.assertGreater(self.net.engine.moderations, 0)
        reply = os.urandom(MiB)
        backend = link._backend()
        backend.setblocking(True)
        backend.sendall(reply)
        backend.shutdown(socket.SHUT_WR)
        backend.setblocking(False)
        for _ in range(2000):
            self.net.step()
            if link.client_end is not None:
                break
        self.assertEqual(bytes(link.client_data), server_hello() + reply)
        self.assertEqual(link.client_end, "eof")
        self.assertEqual(front.record.close_reason, "both sides closed")
        self.assertEqual(front.record.bytes_to_client, len(server_hello()) + len(reply))
        self.assertEqual(self.factory.open_connections, 0)
        self.assertEqual(self.net.engine.sockets, 0)

    def test_short_exchanges_are_not_spliced(self) -> None:
        link = self.net.open(plain_hello())
        link.backend_send(server_hello())
        link.client_send(b"\x17\x03\x03\x00\x02ok" * 100)
        (front,) = self.connections()
        self.assertFalse(front.record.zero_copy)


# -- hand-over to Twisted --------------------------------------------------------------


@pytest.mark.skipif(global_reactor.__class__.__name__ != "EPollReactor", reason="needs epoll")
class HandOverTests(TestCase):
    """Local TLS on the lean transport, and other backends on Twisted's, on the real reactor."""

    timeout = 30

    def setUp(self) -> None:
        self.sockets: list[socket.socket] = []

    def tearDown(self) -> None:
        for sock in self.sockets:
            sock.close()

    def listen(self, router: IRouter, targets: frozenset[Backend | Local]) -> LeanPort:
        state = FrontState(ECHDecoder(KeySet([KEY])), router, targets, FrontSettings())
        self.factory = FrontFactory(state, global_reactor)
        port = LeanPort(global_reactor, self.factory, interface="127.0.0.1")
        port.startListening()
        self.addCleanup(port.stopListening)
        return port

    def test_local_termination_stays_on_the_lean_transport(self) -> Deferred[None]:
        options = load_certificate_options(ISSUED.chain, ISSUED.key)
        target = local_target("local", options, Factory.forProtocol(EchoServer), global_reactor)
        port = self.listen(FixedRouter(target), frozenset({target}))
        import ssl  # noqa: PLC0415 (the client side of this one test)

        context = ssl.create_default_context(cafile=str(CA.cert_path))
        raw = socket.create_connection(("127.0.0.1", port.getHost().port), timeout=5)
        self.sockets.append(raw)
        raw.setblocking(False)
        tls = context.wrap_socket(raw, server_hostname=LOCAL_NAME, do_handshake_on_connect=False)
        answers: list[bytes] = []

        def drive() -> bool:
            try:
                if not answers:
                    tls.do_handshake()
                    tls.sendall(b"hello\n")
                    answers.append(b"")
                answers.append(tls.recv(100))
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
                return False
            return b"hello" in b"".join(answers)

        def check(_: object) -> Deferred[None]:
            self.assertIn(b"hello", b"".join(answers))
            (front,) = self.factory.connections
            transport = front.transport
            assert isinstance(transport, LeanTransport)
            self.assertFalse(transport.handed_over)
            tls.close()
            return poll_until(lambda: not self.factory.connections)

        return poll_until(drive).addCallback(check)

    def test_unix_backend_goes_to_a_twisted_relay(self) -> Deferred[None]:
        path = socket_path(self)
        received: list[bytes] = []
        listener = serverFromString(global_reactor, f"unix:{path}")
        backends = Factory.forProtocol(EchoServer)

        def listening(unix_port: Any) -> Deferred[None]:
            self.addCleanup(unix_port.stopListening)
            from twisted.internet.endpoints import UNIXClientEndpoint  # noqa: PLC0415

            backend = Backend("u", UNIXClientEndpoint(global_reactor, path))
            port = self.listen(FixedRouter(backend), frozenset({backend}))
            client = socket.create_connection(("127.0.0.1", port.getHost().port), timeout=5)
            self.sockets.append(client)
            client.sendall(plain_hello())
            client.setblocking(False)

            def drive() -> bool:
                with contextlib.suppress(BlockingIOError):
                    received.append(client.recv(1 << 16))
                return b"".join(received).startswith(plain_hello())

            def check(_: object) -> Deferred[None]:
                (front,) = self.factory.connections
                self.assertNotIsInstance(front.transport, LeanTransport)
                self.assertEqual(b"".join(received)[: len(plain_hello())], plain_hello())
                client.close()
                return poll_until(lambda: not self.factory.connections)

            return poll_until(drive).addCallback(check)

        started: Deferred[None] = listener.listen(backends).addCallback(listening)
        return started


def poll_until(done: Any, timeout: float = 10.0) -> Deferred[None]:
    """Call ``done`` every 10 ms on the real reactor until it is true (bounded)."""
    result: Deferred[None] = Deferred()
    deadline = global_reactor.seconds() + timeout

    def check() -> None:
        if done():
            result.callback(None)
        elif global_reactor.seconds() > deadline:
            result.errback(AssertionError("timed out"))
        else:
            deferLater(global_reactor, 0.01, check)

    check()
    return result


# -- endpoints and adoption -----------------------------------------------------------


class EndpointTests(SynchronousTestCase):
    def test_plain_tcp_endpoints_become_lean(self) -> None:
        reactor = global_reactor
        lean = lean_endpoint(reactor, serverFromString(reactor, "tcp:0:interface=127.0.0.1"))
        self.assertIsInstance(lean, LeanServerEndpoint)
        self.assertEqual((lean.interface, lean.port), ("127.0.0.1", 0))
        unix = serverFromString(reactor, f"unix:{socket_path(self)}")
        self.assertIs(lean_endpoint(reactor, unix), unix)
        other = TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")
        other._port = "not a port"
        self.assertIs(lean_endpoint(reactor, other), other)  # anything unexpected: Twisted's

    def test_adopted_listening_socket(self) -> None:
        harness = LeanHarness()
        self.addCleanup(harness.close)
        backend = harness.backend()
        state = FrontState(
            ECHDecoder(KeySet([KEY])), FixedRouter(backend), frozenset({backend}), FrontSettings()
        )
        factory = FrontFactory(state, harness.clock)
        with socket.create_server(("127.0.0.1", 0)) as listening:
            sock = socket.socket(
                socket.AF_INET, socket.SOCK_STREAM, 0, socket.dup(listening.fileno())
            )
        port = LeanPort(harness.clock, factory, sock=sock)
        port.startListening()
        # On a reactor that watches descriptors, adopt_port makes the same.
        with socket.create_server(("127.0.0.1", 0)) as other:
            adopted = adopt_port(global_reactor, other.fileno(), socket.AF_INET, factory)
        self.assertIsInstance(adopted, LeanPort)
        adopted.stopListening()
        # A reactor that does not watch real descriptors keeps its own ports.
        self.assertNotIsInstance(
            adopt_port(harness.clock, sock.fileno(), socket.AF_INET, factory), LeanPort
        )
        harness.port = port
        harness.factory = factory
        link = harness.open(plain_hello())
        self.assertEqual(bytes(link.backend_data), plain_hello())


class NothingLeftBehindTests(LeanTestCase):
    def test_descriptors_and_readers_are_released(self) -> None:
        baseline = len(os.listdir("/proc/self/fd"))
        links = [self.net.open(plain_hello()) for _ in range(20)]
        for link in links:
            link.backend_send(server_hello())
        self.assertEqual(self.net.engine.sockets, 40)
        for link in links:
            link.client_close()
            link.backend_close()
        self.assertEqual(self.net.engine.sockets, 0)
        self.assertNotIn(self.net.engine, self.net.clock.readers)
        self.assertEqual(self.factory.open_connections, 0)
        # The test's own sockets are closed too; the front holds nothing.
        self.assertLessEqual(len(os.listdir("/proc/self/fd")), baseline)

    def test_connections_are_freed_without_the_garbage_collector(self) -> None:
        # A connection's objects point at each other while it is open; once
        # it closes, none of those references may form a cycle, or every
        # connection would wait for a collection to be freed (and the
        # collector would trace them meanwhile).
        gc.collect()
        gc.disable()
        self.addCleanup(gc.enable)
        hellos = [plain_hello(), seal_hello(KEY.config, InnerSpec()).records]
        freed: list[weakref.ref[FrontProtocol]] = []
        kinds: set[type] = set()
        for records in hellos:
            link = self.net.open(records)
            link.backend_send(server_hello())
            (front,) = self.connections()
            kinds.update({type(front), type(front.transport), type(front._handler)})
            freed.append(weakref.ref(front))
            link.client_close()
            link.backend_close()
            link.front = None  # the harness keeps its links, and each its protocol
            del front
        self.assertEqual(kinds, {FrontProtocol, LeanTransport, LeanRelay})
        self.assertEqual(self.factory.open_connections, 0)
        self.assertEqual([ref() for ref in freed], [None, None])
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            gc.collect()
            left = {type(o) for o in gc.garbage} & kinds
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
        self.assertEqual(left, set())

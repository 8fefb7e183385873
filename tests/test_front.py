# Trial's assertions are untyped, and calls through a subclass escape
# the project's untyped_calls_exclude = ["twisted"]:
# mypy: disable-error-code="no-untyped-call"
"""The client-facing protocol (echfront.front.protocol), in memory.

Every test drives a :class:`~echfront.front.protocol.FrontProtocol` built by a
:class:`~echfront.front.protocol.FrontFactory` over a recording in-memory transport
(:mod:`tests.twistedhelpers`): the first flight in any fragmentation, the
pause once the ClientHello is complete, timers on a ``MemoryReactorClock``,
every refusal's exact alert bytes, routing (synchronous, deferred, failing,
unconfigured targets) and reload semantics.  Backends are reached through
``TCP4ClientEndpoint`` on the memory reactor, so a connection attempt is
visible as ``reactor.tcpClients``.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.interfaces import IAddress
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from echfront.ech.decoder import ClientHelloInfo, ECHDecoder, ECHStatus
from echfront.ech.keyset import KeySet, generate_key
from echfront.errors import AlertDescription
from echfront.front.protocol import FrontFactory, FrontProtocol
from echfront.front.state import FrontSettings, FrontState
from echfront.interfaces import IRouter
from echfront.routing import Rule, StaticRouter
from echfront.targets import Backend, Local, Reject, Route
from echfront.tls.records import CONTENT_HANDSHAKE, HandshakeFlight, frame_records
from tests.echhello import InnerSpec, grease_extension, seal_hello
from tests.twistedhelpers import (
    CCS,
    CLIENT_ADDRESS,
    EARLY_DATA,
    Network,
    Pipe,
    RecordingFactory,
    RecordingServer,
    alert,
    plain_hello,
)

PUBLIC_NAME = "public.example"
SECRET_NAME = "secret.example.org"
KEY = generate_key(PUBLIC_NAME, config_id=0x42, maximum_name_length=32)
OTHER_KEY = generate_key(PUBLIC_NAME, config_id=0x17)
BACKEND_PORT = 4433


class CountingDecoder(ECHDecoder):
    """An ECHDecoder that remembers every flight it was asked to decode."""

    __slots__ = ("flights",)

    def __init__(self, keys: KeySet) -> None:
        super().__init__(keys)
        self.flights: list[HandshakeFlight] = []

    def decode(
        self, flight: HandshakeFlight, *, may_decrypt: Callable[[], bool] | None = None
    ) -> ClientHelloInfo:
        self.flights.append(flight)
        return super().decode(flight, may_decrypt=may_decrypt)


@implementer(IRouter)
class RecordingRouter:
    """A router whose answer the test chooses; it records its calls."""

    def __init__(self, answer: Callable[[ClientHelloInfo], Route | Deferred[Route]]) -> None:
        self.answer = answer
        self.calls: list[tuple[ClientHelloInfo, IAddress]] = []

    def route(self, hello: ClientHelloInfo, peer: IAddress) -> Route | Deferred[Route]:
        self.calls.append((hello, peer))
        return self.answer(hello)


class FrontTestCase(SynchronousTestCase):
    """A memory reactor with one listening backend, and helpers to open connections."""

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.net = Network(self.clock)
        self.backends = RecordingFactory()
        TCP4ServerEndpoint(self.clock, BACKEND_PORT).listen(self.backends)
        self.backend = Backend(
            "be", TCP4ClientEndpoint(self.clock, "127.0.0.1", BACKEND_PORT), connect_timeout=5
        )
        self.decoder = CountingDecoder(KeySet([KEY]))

    def make_factory(
        self,
        router: IRouter,
        *,
        targets: frozenset[Backend | Local] | None = None,
        settings: FrontSettings | None = None,
        decoder: ECHDecoder | None = None,
    ) -> FrontFactory:
        state = FrontState(
            decoder=decoder or self.decoder,
            router=router,
            targets=frozenset({self.backend}) if targets is None else targets,
            settings=settings or FrontSettings(),
        )
        return FrontFactory(state, self.clock)

    def open(
        self, factory: FrontFactory, *, read_size: int | None = None
    ) -> tuple[Pipe, FrontProtocol, RecordingServer]:
        """Accept one client connection; the client is a recording protocol."""
        front = factory.buildProtocol(CLIENT_ADDRESS)
        assert front is not None
        client = RecordingServer()
        pipe = self.net.connect(client, front, server_read=read_size)
        return pipe, front, client

    def backend_data(self) -> bytes:
        """Complete the pending backend connection and return what it received."""
        self.net.complete_backend(self.clock)
        self.net.flush()
        return bytes(self.backends.built[-1].data)

    def to_backend(self) -> RecordingRouter:
        return RecordingRouter(lambda hello: self.backend)


class FirstFlightTests(FrontTestCase):
    """Reading the ClientHello in any fragmentation, and what follows it."""

    def test_byte_at_a_time_decoded_once_and_routed(self) -> None:
        sealed = seal_hello(KEY.config, InnerSpec())
        router = self.to_backend()
        pipe, front, _client = self.open(self.make_factory(router), read_size=1)
        pipe.client.write(sealed.records)
        self.net.flush()

        self.assertEqual(len(self.decoder.flights), 1)
        self.assertEqual(self.decoder.flights[0].records, sealed.records)
        self.assertEqual(set(pipe.server.reads), {1})
        self.assertEqual(len(router.calls), 1)
        info, peer = router.calls[0]
        self.assertIs(info.status, ECHStatus.ACCEPTED)
        self.assertEqual(info.server_name, SECRET_NAME)
        self.assertEqual(peer, pipe.server.getPeer())
        self.assertIs(front.info, info)
        self.assertEqual(len(self.clock.tcpClients), 1)
        self.assertEqual(
            self.backend_data(),
            frame_records(CONTENT_HANDSHAKE, 0x0301, sealed.inner_message),
        )

    def test_hundred_byte_records_forwarded_as_received(self) -> None:
        records = plain_hello(record_sizes=(100,) * 20, padding=400)
        self.assertGreater(records.count(b"\x16\x03\x01\x00\x64"), 2)
        router = self.to_backend()
        pipe, _front, _client = self.open(self.make_factory(router), read_size=7)
        pipe.client.write(records)
        self.net.flush()

        self.assertEqual(len(self.decoder.flights), 1)
        self.assertEqual(len(router.calls), 1)
        self.assertIs(router.calls[0][0].status, ECHStatus.NOT_OFFERED)
        self.assertEqual(router.calls[0][0].server_name, "plain.example")
        self.assertEqual(self.backend_data(), records)

    def test_ech_hello_in_hundred_byte_records(self) -> None:
        sealed = seal_hello(KEY.config, InnerSpec(), record_sizes=(100,) * 20)
        router = self.to_backend()
        pipe, _front, _client = self.open(self.make_factory(router))
        for start in range(0, len(sealed.records), 100):
            pipe.client.write(sealed.records[start : start + 100])
            self.net.flush()

        self.assertEqual(len(self.decoder.flights), 1)
        self.assertEqual(len(router.calls), 1)
        self.assertIs(router.calls[0][0].status, ECHStatus.ACCEPTED)
        # The rebuilt inner hello is re-framed in one record with the
        # client's record version (FWD-4), whatever the client's framing.
        self.assertEqual(
            self.backend_data(),
            frame_records(CONTENT_HANDSHAKE, 0x0301, sealed.inner_message),
        )

    def test_bytes_after_the_hello_in_the_same_read_follow_untouched(self) -> None:
        sealed = seal_hello(KEY.config, InnerSpec())
        pipe, _front, _client = self.open(self.make_factory(self.to_backend()))
        pipe.client.write(sealed.records + CCS + EARLY_DATA)
        self.net.flush()

        (flight,) = self.decoder.flights
        self.assertEqual(flight.rest, CCS + EARLY_DATA)
        self.assertEqual(
            self.backend_data(),
            frame_records(CONTENT_HANDSHAKE, 0x0301, sealed.inner_message) + CCS + EARLY_DATA,
        )

    def test_bytes_after_a_plain_hello_follow_untouched(self) -> None:
        records = plain_hello()
        pipe, _front, _client = self.open(self.make_factory(self.to_backend()))
        pipe.client.write(records + CCS + EARLY_DATA + b"\x17\x03")
        self.net.flush()
        self.assertEqual(self.backend_data(), records + CCS + EARLY_DATA + b"\x17\x03")

    def test_client_paused_once_the_hello_is_complete(self) -> None:
        records = plain_hello()
        pending: Deferred[Route] = Deferred()
        router = RecordingRouter(lambda hello: pending)
        pipe, _front, _client = self.open(self.make_factory(router))
        pipe.client.write(records[:-1])
        self.net.flush()
        self.assertFalse(pipe.server.paused)
        self.assertNotIn("pauseProducing", pipe.server.calls)

        pipe.client.write(records[-1:] + EARLY_DATA)
        self.net.flush()
        self.assertTrue(pipe.server.paused)
        self.assertEqual(pipe.server.calls, ["pauseProducing"])
        self.assertEqual(len(router.calls), 1)

        # The bytes that arrive while paused stay in the transport until
        # the hand-off resumes it, then reach the backend in order.
        pipe.client.write(b"\x17\x03\x03\x00\x01X")
        self.net.flush()
        self.assertEqual(bytes(pipe.server.incoming), b"\x17\x03\x03\x00\x01X")
        pending.callback(self.backend)
        self.assertEqual(self.backend_data(), records + EARLY_DATA + b"\x17\x03\x03\x00\x01X")
        self.assertFalse(pipe.server.paused)
        self.assertEqual(pipe.server.calls[-1], "resumeProducing")


class TimeoutTests(FrontTestCase):
    def test_first_flight_timeout_aborts_without_alert(self) -> None:
        settings = FrontSettings(first_flight_timeout=5)
        factory = self.make_factory(self.to_backend(), settings=settings)
        pipe, front, client = self.open(factory)
        pipe.client.write(plain_hello()[:50])
        self.net.flush()

        self.clock.advance(4.9)
        self.net.flush()
        self.assertFalse(pipe.server.disconnecting)

        self.clock.advance(0.1)
        self.assertEqual(pipe.server.calls, ["abortConnection"])
        self.net.flush()
        self.assertEqual(bytes(pipe.server.sent), b"")
        self.assertEqual(bytes(client.data), b"")
        self.assertEqual(client.events, ["made", "lost"])
        self.assertEqual(front.record.close_reason, "first flight timeout")
        self.assertEqual(self.clock.tcpClients, [])
        self.assertEqual(factory.open_connections, 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_first_flight_timer_is_not_reset_by_data(self) -> None:
        settings = FrontSettings(first_flight_timeout=5)
        pipe, _front, _client = self.open(self.make_factory(self.to_backend(), settings=settings))
        records = plain_hello()
        for i in range(4):  # a slowloris trickle
            pipe.client.write(records[i : i + 1])
            self.net.flush()
            self.clock.advance(1.2)
        self.assertFalse(pipe.server.disconnecting)
        self.clock.advance(0.2)
        self.assertEqual(pipe.server.calls, ["abortConnection"])

    def test_timer_replaced_by_handshake_timeout_once_routed(self) -> None:
        settings = FrontSettings(first_flight_timeout=5, handshake_timeout=8)
        pending: Deferred[Route] = Deferred()
        pipe, front, _client = self.open(
            self.make_factory(RecordingRouter(lambda hello: pending), settings=settings)
        )
        pipe.client.write(plain_hello())
        self.net.flush()
        self.clock.advance(7.9)
        self.assertFalse(pipe.server.disconnecting)
        self.clock.advance(0.1)
        self.assertEqual(pipe.server.calls, ["pauseProducing", "abortConnection"])
        self.assertEqual(front.record.close_reason, "handshake timeout")
        self.assertEqual(bytes(pipe.server.sent), b"")


class RefusalTests(FrontTestCase):
    """Every refusal is one exact alert, then a graceful close."""

    def assert_refused(self, pipe: Pipe, client: RecordingServer, description: int) -> None:
        self.net.flush()
        self.assertEqual(bytes(client.data), alert(description))
        self.assertIn("loseConnection", pipe.server.calls)
        self.assertNotIn("abortConnection", pipe.server.calls)
        self.assertEqual(client.events, ["made", "lost"])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_garbage_gets_unexpected_message(self) -> None:
        factory = self.make_factory(self.to_backend())
        pipe, front, client = self.open(factory)
        pipe.client.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        self.net.flush()
        self.assertEqual(bytes(client.data), bytes.fromhex("15 03 03 00 02 02 0a"))
        self.assertEqual(pipe.server.calls, ["loseConnection"])
        self.assert_refused(pipe, client, 10)
        self.assertEqual(front.record.alert, AlertDescription.UNEXPECTED_MESSAGE)
        self.assertEqual(self.decoder.flights, [])
        self.assertEqual(factory.open_connections, 0)

    def test_oversized_declared_hello_gets_illegal_parameter(self) -> None:
        pipe, _front, client = self.open(self.make_factory(self.to_backend()))
        # One 100-byte record whose ClientHello header declares 64 KiB + 4.
        pipe.client.write(b"\x16\x03\x01\x00\x64" + b"\x01\x01\x00\x00" + bytes(96))
        self.assert_refused(pipe, client, 47)
        self.assertEqual(self.decoder.flights, [])

    def test_flight_over_the_configured_bound_gets_illegal_parameter(self) -> None:
        settings = FrontSettings(max_first_flight=256)
        pipe, _front, client = self.open(self.make_factory(self.to_backend(), settings=settings))
        records = plain_hello(record_sizes=(100,) * 10, padding=200)
        self.assertGreater(len(records), 256)
        pipe.client.write(records)
        self.assert_refused(pipe, client, 47)

    def test_router_exception_gets_internal_error(self) -> None:
        def explode(hello: ClientHelloInfo) -> Route:
            raise RuntimeError("router bug")

        pipe, front, client = self.open(self.make_factory(RecordingRouter(explode)))
        pipe.client.write(plain_hello())
        self.assert_refused(pipe, client, 80)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(front.record.alert, AlertDescription.INTERNAL_ERROR)
        self.assertEqual(self.clock.tcpClients, [])

    def test_router_deferred_failure_gets_internal_error(self) -> None:
        pending: Deferred[Route] = Deferred()
        pipe, _front, client = self.open(self.make_factory(RecordingRouter(lambda h: pending)))
        pipe.client.write(plain_hello())
        self.net.flush()
        self.assertEqual(bytes(client.data), b"")
        pending.errback(RuntimeError("lookup failed"))
        self.assert_refused(pipe, client, 80)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_unconfigured_backend_is_refused_without_connecting(self) -> None:
        rogue = Backend("rogue", TCP4ClientEndpoint(self.clock, "203.0.113.9", BACKEND_PORT))
        factory = self.make_factory(RecordingRouter(lambda hello: rogue))
        pipe, front, client = self.open(factory)
        pipe.client.write(plain_hello())
        self.assert_refused(pipe, client, 80)
        self.assertEqual(self.clock.tcpClients, [])
        self.assertEqual(self.backends.built, [])
        self.assertEqual(front.record.route, "rogue")
        self.assertEqual(factory.open_connections, 0)

    def test_equal_looking_backend_is_still_unconfigured(self) -> None:
        # Targets compare by identity: a copy with the same fields is not allowed.
        copy = Backend(self.backend.name, self.backend.endpoint)
        pipe, _front, client = self.open(self.make_factory(RecordingRouter(lambda h: copy)))
        pipe.client.write(plain_hello())
        self.assert_refused(pipe, client, 80)
        self.assertEqual(self.clock.tcpClients, [])

    def test_reject_route_sends_its_alert(self) -> None:
        router = StaticRouter.from_rules([Rule("allowed.example", self.backend)])
        pipe, front, client = self.open(self.make_factory(router))
        pipe.client.write(plain_hello("other.example"))
        self.assert_refused(pipe, client, 112)
        self.assertEqual(front.record.route, "reject:unrecognized_name")
        self.assertEqual(self.clock.tcpClients, [])

    def test_custom_reject_alert(self) -> None:
        reject = Reject(AlertDescription.HANDSHAKE_FAILURE, "closed for maintenance")
        pipe, front, client = self.open(self.make_factory(RecordingRouter(lambda h: reject)))
        pipe.client.write(plain_hello())
        self.assert_refused(pipe, client, 40)
        self.assertEqual(front.record.close_reason, "closed for maintenance")


class RoutingTests(FrontTestCase):
    def test_router_deferred_fires_later(self) -> None:
        pending: Deferred[Route] = Deferred()
        router = RecordingRouter(lambda hello: pending)
        pipe, front, client = self.open(self.make_factory(router))
        records = plain_hello()
        pipe.client.write(records)
        self.net.flush()
        self.clock.advance(1)
        self.net.flush()
        self.assertEqual(self.clock.tcpClients, [])
        self.assertEqual(bytes(client.data), b"")

        pending.callback(self.backend)
        self.assertEqual(len(self.clock.tcpClients), 1)
        self.assertEqual(self.backend_data(), records)
        self.assertEqual(front.record.route, "be")

    def test_router_deferred_fires_after_the_client_left(self) -> None:
        pending: Deferred[Route] = Deferred()
        factory = self.make_factory(RecordingRouter(lambda hello: pending))
        pipe, _front, _client = self.open(factory)
        pipe.client.write(plain_hello())
        self.net.flush()
        pipe.client.loseConnection()
        self.net.flush()
        self.assertEqual(factory.open_connections, 0)
        pending.callback(self.backend)
        self.assertEqual(self.clock.tcpClients, [])

    def test_static_router_routes_by_inner_name(self) -> None:
        router = StaticRouter.from_rules([Rule(SECRET_NAME, self.backend)])
        sealed = seal_hello(KEY.config, InnerSpec())
        pipe, _front, _client = self.open(self.make_factory(router, targets=router.targets))
        pipe.client.write(sealed.records)
        self.net.flush()
        self.assertEqual(
            self.backend_data(), frame_records(CONTENT_HANDSHAKE, 0x0301, sealed.inner_message)
        )


class CloseTests(FrontTestCase):
    def test_half_close_before_the_hello_completes_closes(self) -> None:
        factory = self.make_factory(self.to_backend())
        pipe, front, client = self.open(factory)
        pipe.client.write(plain_hello()[:40])
        pipe.client.loseWriteConnection()
        self.net.flush()
        self.assertEqual(pipe.server.calls, ["loseConnection"])
        self.assertEqual(bytes(client.data), b"")
        self.assertEqual(client.events, ["made", "lost"])
        self.assertEqual(front.record.close_reason, "client closed")
        self.assertEqual(factory.open_connections, 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.decoder.flights, [])

    def test_half_close_while_routing_closes(self) -> None:
        pending: Deferred[Route] = Deferred()
        factory = self.make_factory(RecordingRouter(lambda hello: pending))
        pipe, _front, client = self.open(factory)
        # A paused TCP transport reads no FIN; one that ignores the pause does.
        pipe.server.honours_pause = False
        pipe.client.write(plain_hello())
        pipe.client.loseWriteConnection()
        self.net.flush()
        self.assertEqual(pipe.server.calls, ["pauseProducing", "loseConnection"])
        self.assertEqual(factory.open_connections, 0)
        pending.callback(self.backend)
        self.assertEqual(self.clock.tcpClients, [])
        self.assertEqual(bytes(client.data), b"")

    def test_bytes_while_routing_are_bounded(self) -> None:
        pending: Deferred[Route] = Deferred()
        settings = FrontSettings(max_first_flight=1024)
        factory = self.make_factory(RecordingRouter(lambda hello: pending), settings=settings)
        pipe, front, client = self.open(factory)
        pipe.server.honours_pause = False  # a transport that ignores the pause
        pipe.client.write(plain_hello())
        self.net.flush()
        pipe.client.write(bytes(1024))
        self.net.flush()
        self.assertFalse(pipe.server.disconnecting)
        pipe.client.write(b"\x00")
        self.net.flush()
        self.assertEqual(pipe.server.calls, ["pauseProducing", "abortConnection"])
        self.assertEqual(bytes(client.data), b"")
        self.assertEqual(front.record.close_reason, "client sent too much before the hand-off")
        self.assertEqual(factory.open_connections, 0)

    def test_open_connections_counts_back_to_zero(self) -> None:
        factory = self.make_factory(
            self.to_backend(), settings=FrontSettings(first_flight_timeout=3)
        )
        opened = [self.open(factory) for _ in range(4)]
        self.assertEqual(factory.open_connections, 4)
        garbage, timed_out, closed, relayed = opened
        garbage[0].client.write(b"\x00\x00\x00\x00\x00\x00")
        closed[0].client.loseConnection()
        relayed[0].client.write(plain_hello())
        self.net.flush()
        self.assertEqual(factory.open_connections, 2)
        self.clock.advance(3)
        self.net.flush()
        self.assertEqual(factory.open_connections, 1)
        self.assertTrue(timed_out[0].server.aborted)
        self.net.complete_backend(self.clock)
        self.net.flush()
        relayed[0].client.loseConnection()
        self.net.flush()
        self.assertEqual(factory.open_connections, 0)
        self.assertEqual(self.backends.built[0].events, ["made", "lost"])


class ReloadTests(FrontTestCase):
    def test_connection_keeps_the_state_it_was_accepted_with(self) -> None:
        factory = self.make_factory(self.to_backend())
        old_state = factory.state
        pipe, front, _client = self.open(factory, read_size=1)
        sealed = seal_hello(KEY.config, InnerSpec())
        pipe.client.write(sealed.records[:60])
        self.net.flush()

        # Reload: KEY is gone, every name is refused.
        new_decoder = CountingDecoder(KeySet([OTHER_KEY]))
        new_router = RecordingRouter(lambda hello: Reject(AlertDescription.UNRECOGNIZED_NAME))
        factory.state = FrontState(new_decoder, new_router, frozenset())
        self.assertIs(front.state, old_state)

        pipe.client.write(sealed.records[60:])
        self.net.flush()
        self.assertEqual(len(self.decoder.flights), 1)
        self.assertEqual(new_decoder.flights, [])
        self.assertIs(front.info and front.info.status, ECHStatus.ACCEPTED)
        self.assertEqual(
            self.backend_data(), frame_records(CONTENT_HANDSHAKE, 0x0301, sealed.inner_message)
        )

        # A connection accepted after the reload gets the new state.
        pipe2, front2, client2 = self.open(factory)
        self.assertIs(front2.state, factory.state)
        pipe2.client.write(seal_hello(KEY.config, InnerSpec()).records)
        self.net.flush()
        self.assertEqual(len(new_decoder.flights), 1)
        self.assertIs(new_router.calls[0][0].status, ECHStatus.REJECTED)
        self.assertEqual(bytes(client2.data), alert(112))

    def test_grease_is_routed_by_the_outer_name(self) -> None:
        router = self.to_backend()
        pipe, _front, _client = self.open(self.make_factory(router))
        grease = seal_hello(KEY.config, InnerSpec(), ech_extension=grease_extension())
        pipe.client.write(grease.records)
        self.net.flush()
        info = router.calls[0][0]
        self.assertIs(info.status, ECHStatus.REJECTED)
        self.assertEqual(info.server_name, PUBLIC_NAME)
        self.assertEqual(self.backend_data(), grease.records)


def test_settings_state_and_hand_off_load_no_twisted() -> None:
    """The configuration reads FrontSettings' defaults without starting a front."""
    script = (
        "import sys\n"
        "import echfront.front.connection, echfront.front.state\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('twisted', 'OpenSSL')))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.strip() == "[]"

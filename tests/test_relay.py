# Trial's assertions are untyped, and calls through a subclass escape
# the project's untyped_calls_exclude = ["twisted"]:
# mypy: disable-error-code="no-untyped-call"
"""Relaying to a backend (echfront.front.relay), in memory.

The front is a real :class:`~echfront.front.protocol.FrontProtocol`; the backend is
a :class:`~tests.twistedhelpers.RecordingServer` listening on a
``MemoryReactorClock`` and reached through ``TCP4ClientEndpoint``.  The
tests check the bytes each side receives, exactly: the rewritten first
flight, whole-record forwarding before the ServerHello, the
HelloRetryRequest path with a second ClientHello sealed by
:mod:`tests.echhello` (RFC 9849 §7.1.1, checklist §1.H), the fast path
(twisted-design.md §B), producers, half-close, connect failures and the
PROXY protocol v2 header.

At the bottom, :class:`RelayBehaviour` states what any relay does (bytes,
alerts, half-close, deadlines, limits, metrics and logs), and runs twice:
on this relay in memory, and on the lean engine's relay over real loopback
sockets (:mod:`echfront.front.leanrelay`).
"""

from __future__ import annotations

import gc
import ipaddress
import struct
from collections.abc import Callable
from typing import Any

from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.interfaces import IAddress
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs
from twisted.python.failure import Failure
from twisted.test.iosim import ConnectionCompleter, IOPump
from twisted.trial.unittest import SkipTest, SynchronousTestCase
from zope.interface import implementer

from echfront.ech.decoder import ClientHelloInfo, ECHDecoder, ECHStatus
from echfront.ech.keyset import KeySet, generate_key
from echfront.errors import AlertDescription
from echfront.front.backend import BackendProtocol
from echfront.front.connection import ConnectionRecord, StreamTransport
from echfront.front.deadlines import DeadlineClock
from echfront.front.engine import AVAILABLE
from echfront.front.metrics import Metrics
from echfront.front.protocol import FrontFactory, FrontProtocol
from echfront.front.relay import Relay
from echfront.front.state import FrontSettings, FrontState
from echfront.interfaces import IRouter
from echfront.targets import Backend, Local, Route
from echfront.tls.records import CONTENT_HANDSHAKE, frame_records
from tests.echhello import (
    EXT_GROUPS,
    EXT_KEY_SHARE,
    EXT_SIGALGS,
    EXT_SNI,
    InnerSpec,
    SealedHello,
    grease_extension,
    read_flight,
    seal_hello,
    sni,
)
from tests.twistedhelpers import (
    CCS,
    CLIENT_ADDRESS,
    EARLY_DATA,
    FRONT_ADDRESS,
    MemoryTransport,
    Network,
    Pipe,
    RecordingFactory,
    RecordingServer,
    alert,
    plain_hello,
    server_hello,
    wrapped,
)

PUBLIC_NAME = "public.example"
SECRET_NAME = "secret.example.org"
KEY = generate_key(PUBLIC_NAME, config_id=0x42, maximum_name_length=32)
BACKEND_PORT = 4433
APP_DATA = b"\x17\x03\x03\x00\x0aearly-data"
SERVER_CCS = bytes.fromhex("140303000101")


def inner_records(sealed: SealedHello, version: int = 0x0301) -> bytes:
    """What the front must forward for ``sealed``: its inner hello, re-framed."""
    return frame_records(CONTENT_HANDSHAKE, version, sealed.inner_message)


@implementer(IRouter)
class FixedRouter:
    def __init__(self, target: Route) -> None:
        self.target = target

    def route(self, hello: ClientHelloInfo, peer: IAddress) -> Route:
        return self.target


class RelayTestCase(SynchronousTestCase):
    """A front routing everything to one backend on a memory reactor."""

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.net = Network(self.clock)
        self.backends = RecordingFactory()
        TCP4ServerEndpoint(self.clock, BACKEND_PORT).listen(self.backends)
        self.use_backend(Backend("be", TCP4ClientEndpoint(self.clock, "127.0.0.1", BACKEND_PORT)))

    def use_backend(self, backend: Backend, settings: FrontSettings | None = None) -> None:
        self.backend = backend
        state = FrontState(
            ECHDecoder(KeySet([KEY])),
            FixedRouter(backend),
            frozenset({backend}),
            settings or FrontSettings(),
        )
        self.factory = FrontFactory(state, self.clock)

    def assert_no_connection_timers(self) -> None:
        """On the fast path no per-connection timer runs; only the factory's
        coarse idle sweep may be scheduled (issue 4: no per-chunk timers)."""
        calls = self.clock.getDelayedCalls()
        self.assertEqual([c for c in calls if getattr(c, "func", None) != self.factory._sweep], [])

    def open(self, first: bytes) -> tuple[Pipe, FrontProtocol, RecordingServer]:
        """Accept a client and deliver ``first`` to the front."""
        front = self.factory.buildProtocol(CLIENT_ADDRESS)
        assert front is not None
        client = RecordingServer()
        pipe = self.net.connect(client, front)
        pipe.client.write(first)
        self.net.flush()
        return pipe, front, client

    def relay_to(
        self, first: bytes
    ) -> tuple[Pipe, FrontProtocol, RecordingServer, Pipe, RecordingServer]:
        """Open a client connection and complete its backend connection.

        :returns: client pipe, front, client, backend pipe, backend.
        """
        pipe, front, client = self.open(first)
        self.assertEqual(len(self.clock.tcpClients), 1)
        backend_pipe, _relay_side, _server = self.net.complete_backend(self.clock)
        self.net.flush()
        backend = self.backends.built[-1]
        return pipe, front, client, backend_pipe, backend

    def assert_fast_path(self, front: FrontProtocol, pipe: Pipe, backend_pipe: Pipe) -> None:
        """Both directions are bound to a counter around the other transport's write."""
        relay_side = wrapped(backend_pipe.client.protocol)
        self.assertEqual(forwards_to(front.dataReceived), backend_pipe.client.write)
        self.assertEqual(forwards_to(relay_side.dataReceived), pipe.server.write)

    def assert_not_fast_path(self, front: FrontProtocol, backend_pipe: Pipe) -> None:
        self.assertNotEqual(forwards_to(front.dataReceived), backend_pipe.client.write)


def forwards_to(receive: object) -> object:
    """The write a fast-path counting closure forwards to (or the callable itself)."""
    cells = getattr(receive, "__closure__", None) or ()
    names = getattr(getattr(receive, "__code__", None), "co_freevars", ())
    sinks = [c.cell_contents for name, c in zip(names, cells, strict=True) if name == "sink"]
    return sinks[0] if sinks else receive


class ForwardingTests(RelayTestCase):
    def test_accepted_forwards_inner_records_then_rest(self) -> None:
        sealed = seal_hello(KEY.config, InnerSpec())
        _pipe, front, client, _bp, backend = self.relay_to(sealed.records + CCS + APP_DATA)
        assert front.info is not None
        self.assertIs(front.info.status, ECHStatus.ACCEPTED)
        self.assertEqual(front.info.forward, inner_records(sealed))
        self.assertEqual(bytes(backend.data), inner_records(sealed) + CCS + APP_DATA)
        self.assertEqual(bytes(backend.data[:3]), b"\x16\x03\x01")
        self.assertEqual(bytes(client.data), b"")

    def test_accepted_keeps_the_client_record_version(self) -> None:
        sealed = seal_hello(KEY.config, InnerSpec(), record_version=0x0303)
        *_, backend = self.relay_to(sealed.records)
        self.assertEqual(bytes(backend.data), inner_records(sealed, 0x0303))

    def test_producers_registered_both_ways(self) -> None:
        sealed = seal_hello(KEY.config, InnerSpec())
        pipe, _front, _client, backend_pipe, _backend = self.relay_to(sealed.records)
        self.assertIs(pipe.server.producer, backend_pipe.client)
        self.assertIs(pipe.server.streaming, True)
        self.assertIs(backend_pipe.client.producer, pipe.server)
        self.assertIs(backend_pipe.client.streaming, True)
        # Paused from the ClientHello until the backend is there.
        self.assertEqual(
            pipe.server.calls, ["pauseProducing", "registerProducer", "resumeProducing"]
        )
        self.assertFalse(pipe.server.paused)

    def test_client_bytes_while_connecting_are_forwarded_in_order(self) -> None:
        records = plain_hello()
        pipe, _front, _client = self.open(records + EARLY_DATA[:3])
        pipe.client.write(EARLY_DATA[3:] + APP_DATA)
        self.net.flush()
        self.net.complete_backend(self.clock)
        self.net.flush()
        self.assertEqual(bytes(self.backends.built[0].data), records + EARLY_DATA + APP_DATA)

    def held_while_connecting(self, first: bytes) -> bytes:
        """What the backend gets when the client's transport ignores the pause:
        ``first`` + CCS, then APP_DATA read (and held) while connecting."""
        front = self.factory.buildProtocol(CLIENT_ADDRESS)
        assert front is not None
        pipe = self.net.connect(RecordingServer(), front)
        pipe.server.honours_pause = False
        pipe.client.write(first + CCS)
        self.net.flush()
        pipe.client.write(APP_DATA)
        self.net.flush()
        self.assertEqual(self.backends.built, [])
        self.net.complete_backend(self.clock)
        self.net.flush()
        return bytes(self.backends.built[0].data)

    def test_bytes_held_while_connecting_follow_the_pending_ones(self) -> None:
        records = plain_hello()
        self.assertEqual(self.held_while_connecting(records), records + CCS + APP_DATA)

    def test_bytes_held_while_connecting_follow_the_pending_ones_when_inspecting(self) -> None:
        sealed = seal_hello(KEY.config, InnerSpec())
        self.assertEqual(
            self.held_while_connecting(sealed.records), inner_records(sealed) + CCS + APP_DATA
        )

    def test_only_whole_records_before_the_server_hello(self) -> None:
        sealed = seal_hello(KEY.config, InnerSpec())
        pipe, front, client, backend_pipe, backend = self.relay_to(
            sealed.records + APP_DATA + EARLY_DATA[:3]
        )
        self.assertEqual(bytes(backend.data), inner_records(sealed) + APP_DATA)
        pipe.client.write(EARLY_DATA[3:6])
        self.net.flush()
        self.assertEqual(bytes(backend.data), inner_records(sealed) + APP_DATA)
        self.assert_not_fast_path(front, backend_pipe)

        # The ServerHello ends inspection: the held partial record goes out
        # and both directions take the fast path.
        hello = server_hello()
        backend.send(hello + SERVER_CCS)
        self.net.flush()
        self.assertEqual(bytes(client.data), hello + SERVER_CCS)
        self.assertEqual(bytes(backend.data), inner_records(sealed) + APP_DATA + EARLY_DATA[:6])
        self.assert_fast_path(front, pipe, backend_pipe)

        pipe.client.write(EARLY_DATA[6:] + b"\x17\x03\x03")
        backend.send(b"\x17\x03\x03\x00\x02hi")
        self.net.flush()
        self.assertEqual(
            bytes(backend.data), inner_records(sealed) + APP_DATA + EARLY_DATA + b"\x17\x03\x03"
        )
        self.assertEqual(bytes(client.data), hello + SERVER_CCS + b"\x17\x03\x03\x00\x02hi")
        self.assert_no_connection_timers()

    def test_server_hello_in_small_reads(self) -> None:
        sealed = seal_hello(KEY.config, InnerSpec())
        pipe, front, client, backend_pipe, backend = self.relay_to(sealed.records)
        backend_pipe.client.read_size = 3
        hello = server_hello()
        backend.send(hello)
        self.net.flush()
        self.assertEqual(bytes(client.data), hello)
        self.assert_fast_path(front, pipe, backend_pipe)

    def test_grease_goes_straight_to_the_fast_path(self) -> None:
        grease = seal_hello(KEY.config, InnerSpec(), ech_extension=grease_extension())
        pipe, front, client = self.open(grease.records + CCS)
        assert front.info is not None
        self.assertIs(front.info.status, ECHStatus.REJECTED)
        self.assertIsNone(front.info.second_hello)
        completed = ConnectionCompleter(self.clock).succeedOnce()
        assert isinstance(completed, IOPump)
        self.net.pumps.append(completed)
        self.net.flush()
        backend = self.backends.built[0]
        relay_side = wrapped(completed.client)
        self.assertEqual(forwards_to(front.dataReceived), completed.clientIO.write)
        self.assertEqual(forwards_to(relay_side.dataReceived), pipe.server.write)
        self.assertIs(pipe.server.producer, completed.clientIO)
        self.assertIs(completed.clientIO.producer, pipe.server)
        self.assertEqual(bytes(backend.data), grease.records + CCS)

        # No second-hello inspection: an HRR and anything after it pass as is.
        backend.send(server_hello(retry=True))
        self.net.flush()
        pipe.client.write(b"\x16\x03\x03\x00\x01")  # would be refused by an inspector
        self.net.flush()
        self.assertEqual(bytes(client.data), server_hello(retry=True))
        self.assertEqual(bytes(backend.data), grease.records + CCS + b"\x16\x03\x03\x00\x01")
        self.assertFalse(pipe.server.disconnecting)

    def test_backend_alert_instead_of_a_server_hello_passes(self) -> None:
        sealed = seal_hello(KEY.config, InnerSpec())
        pipe, front, client, backend_pipe, backend = self.relay_to(sealed.records)
        backend.send(alert(40))
        self.net.flush()
        self.assertEqual(bytes(client.data), alert(40))
        self.assert_fast_path(front, pipe, backend_pipe)

    def test_splicing_starts_only_once_bulk_data_flows(self) -> None:
        """Short exchanges stay on the ordinary path; 64 KiB relayed starts splicing."""
        pipe, front, _client, _backend_pipe, backend = self.relay_to(plain_hello())
        relay = front._handler
        assert isinstance(relay, Relay)
        tried: list[int] = []
        relay._try_splice = lambda: tried.append(1)  # type: ignore[method-assign]
        chunk = b"\x17\x03\x03\x40\x00" + bytes(0x4000)
        for _ in range(3):  # 48 KiB and a little, both ways
            pipe.client.write(chunk)
            backend.send(b"\x17\x03\x03\x00\x02ok")
            self.net.flush()
        self.assertEqual(tried, [])
        pipe.client.write(chunk)  # past 64 KiB
        self.net.flush()
        self.assertEqual(tried, [1])
        pipe.client.write(chunk)
        backend.send(b"\x17\x03\x03\x00\x02ok")
        self.net.flush()
        self.assertEqual(tried, [1])  # once per connection
        self.assertEqual(front.record.bytes_from_client, 5 * len(chunk))

    def test_without_splice_nothing_is_watched(self) -> None:
        self.use_backend(self.backend, FrontSettings(splice=False))
        pipe, front, _client, _backend_pipe, _backend = self.relay_to(plain_hello())
        relay = front._handler
        assert isinstance(relay, Relay)
        self.assertFalse(relay._splicing)
        for _ in range(5):
            pipe.client.write(b"\x17\x03\x03\x40\x00" + bytes(0x4000))
        self.net.flush()
        self.assertIsNone(relay._splice_at)
        self.assert_no_connection_timers()

    def test_plain_hello_goes_straight_to_the_fast_path(self) -> None:
        records = plain_hello()
        pipe, front, _client, backend_pipe, backend = self.relay_to(records)
        self.assert_fast_path(front, pipe, backend_pipe)
        self.assertEqual(bytes(backend.data), records)
        self.assert_no_connection_timers()


class HelloRetryTests(RelayTestCase):
    """HRR handling (RFC 9849 §7.1.1; checklist HRR-1, -3, -6, -9)."""

    def start(
        self,
    ) -> tuple[SealedHello, Pipe, FrontProtocol, RecordingServer, Pipe, RecordingServer]:
        sealed = seal_hello(KEY.config, InnerSpec())
        pipe, front, client, backend_pipe, backend = self.relay_to(sealed.records)
        backend.send(server_hello(retry=True) + SERVER_CCS)
        self.net.flush()
        self.assertEqual(bytes(client.data), server_hello(retry=True) + SERVER_CCS)
        self.assert_not_fast_path(front, backend_pipe)
        # The backend direction needs no more inspection after an HRR.
        self.assertEqual(
            forwards_to(wrapped(backend_pipe.client.protocol).dataReceived),
            pipe.server.write,
        )
        pipe.server.read_size = 5
        return sealed, pipe, front, client, backend_pipe, backend

    def test_second_hello_rewritten_after_ccs_and_early_data(self) -> None:
        sealed, pipe, front, client, backend_pipe, backend = self.start()
        second = sealed.second()
        self.assertEqual(second.enc, b"")
        first_read = len(pipe.server.reads)
        after = b"\x17\x03\x03\x00\x03abc"
        pipe.client.write(CCS + APP_DATA + second.records + after)
        self.net.flush()

        self.assertEqual(set(pipe.server.reads[first_read:-1]), {5})
        self.assertEqual(
            bytes(backend.data),
            inner_records(sealed) + CCS + APP_DATA + inner_records(second, 0x0303) + after,
        )
        self.assert_fast_path(front, pipe, backend_pipe)
        self.assert_no_connection_timers()

        hello = server_hello()
        backend.send(hello)
        pipe.client.write(b"\x17\x03\x03\x00\x01Z")
        self.net.flush()
        self.assertEqual(bytes(client.data), server_hello(retry=True) + SERVER_CCS + hello)
        self.assertTrue(bytes(backend.data).endswith(b"\x17\x03\x03\x00\x01Z"))

    def test_ccs_and_early_data_before_the_hrr_are_forwarded(self) -> None:
        sealed = seal_hello(KEY.config, InnerSpec())
        second = sealed.second()
        pipe, front, _client, backend_pipe, backend = self.relay_to(sealed.records + APP_DATA)
        pipe.client.write(CCS[:2])  # a partial record is held back
        self.net.flush()
        self.assertEqual(bytes(backend.data), inner_records(sealed) + APP_DATA)
        backend.send(server_hello(retry=True))
        self.net.flush()
        pipe.client.write(CCS[2:] + second.records)
        self.net.flush()
        self.assertEqual(
            bytes(backend.data),
            inner_records(sealed) + APP_DATA + CCS + inner_records(second, 0x0303),
        )
        self.assert_fast_path(front, pipe, backend_pipe)

    def test_corrupted_second_hello_gets_decrypt_error(self) -> None:
        sealed, pipe, _front, client, backend_pipe, backend = self.start()
        second = sealed.second()
        records = bytearray(second.records)
        records[5 + 4 + second.payload_offset + 3] ^= 0x01
        pipe.client.write(CCS)
        self.net.flush()
        pipe.client.write(bytes(records))
        self.net.flush()

        self.assertEqual(bytes(client.data), server_hello(retry=True) + SERVER_CCS + alert(51))
        self.assertEqual(bytes(backend.data), inner_records(sealed) + CCS)
        self.assertIn("abortConnection", backend_pipe.client.calls)
        self.assertIn("loseConnection", pipe.server.calls)
        self.assertEqual(backend.events, ["made", "lost"])
        self.assertEqual(client.events, ["made", "lost"])
        self.assertEqual(self.factory.open_connections, 0)

    def test_second_hello_without_ech_gets_missing_extension(self) -> None:
        sealed, pipe, _front, client, backend_pipe, backend = self.start()
        # The same hello, minus the encrypted_client_hello extension.
        second = sealed.second(
            outer=[(EXT_SNI, sni(PUBLIC_NAME)), EXT_GROUPS, EXT_SIGALGS, EXT_KEY_SHARE]
        )
        pipe.client.write(second.records)
        self.net.flush()
        self.assertEqual(bytes(client.data), server_hello(retry=True) + SERVER_CCS + alert(109))
        self.assertEqual(bytes(backend.data), inner_records(sealed))
        self.assertTrue(backend_pipe.client.aborted)

    def test_second_hello_with_fresh_enc_gets_illegal_parameter(self) -> None:
        sealed, pipe, _front, client, _backend_pipe, backend = self.start()
        fresh = seal_hello(KEY.config, InnerSpec(), record_version=0x0303)
        pipe.client.write(fresh.records)
        self.net.flush()
        self.assertEqual(bytes(client.data)[-7:], alert(47))
        self.assertEqual(bytes(backend.data), inner_records(sealed))

    def test_second_hello_from_another_context_gets_decrypt_error(self) -> None:
        # Right config_id, suite and empty enc, but sealed under a context
        # the front never set up: it must not open at sequence 1 (HRR-6).
        sealed, pipe, _front, client, _backend_pipe, backend = self.start()
        stranger = seal_hello(KEY.config, InnerSpec(), enc=b"", record_version=0x0303)
        pipe.client.write(stranger.records)
        self.net.flush()
        self.assertEqual(bytes(client.data)[-7:], alert(51))
        self.assertEqual(bytes(backend.data), inner_records(sealed))


class ConnectTests(RelayTestCase):
    def test_connect_timeout_gets_internal_error(self) -> None:
        self.use_backend(
            Backend(
                "slow",
                TCP4ClientEndpoint(self.clock, "127.0.0.1", BACKEND_PORT),
                connect_timeout=3,
            )
        )
        _pipe, front, client = self.open(plain_hello())
        connector = self.clock.connectors[0]
        self.clock.advance(2.9)
        self.net.flush()
        self.assertEqual(bytes(client.data), b"")
        self.clock.advance(0.1)
        self.net.flush()
        self.assertEqual(bytes(client.data), alert(80))
        self.assertTrue(connector.stoppedConnecting)
        self.assertEqual(client.events, ["made", "lost"])
        self.assertEqual(front.record.close_reason, "backend connect timed out")
        self.assertEqual(self.factory.open_connections, 0)

    def test_connection_refused_gets_internal_error(self) -> None:
        pipe, front, client = self.open(plain_hello())
        ConnectionCompleter(self.clock).failOnce(Failure(ConnectionRefusedError()))
        self.net.flush()
        self.assertEqual(bytes(client.data), alert(80))
        self.assertIn("loseConnection", pipe.server.calls)
        self.assertTrue(front.record.close_reason.startswith("backend connect failed"))
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.factory.open_connections, 0)

    def test_client_leaving_while_connecting_cancels_the_connect(self) -> None:
        pipe, _front, client = self.open(plain_hello())
        connector = self.clock.connectors[0]
        pipe.client.loseConnection()
        self.net.flush()
        self.assertTrue(connector.stoppedConnecting)
        self.assertEqual(bytes(client.data), b"")
        self.assertEqual(self.factory.open_connections, 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.backends.built, [])

    def test_handshake_timeout_while_inspecting_aborts_both(self) -> None:
        self.use_backend(self.backend, FrontSettings(handshake_timeout=6))
        sealed = seal_hello(KEY.config, InnerSpec())
        pipe, front, client, backend_pipe, _backend = self.relay_to(sealed.records)
        self.clock.advance(5.9)
        self.net.flush()
        self.assertFalse(pipe.server.disconnecting)
        self.clock.advance(0.1)
        self.net.flush()
        self.assertTrue(pipe.server.aborted)
        self.assertTrue(backend_pipe.client.aborted)
        self.assertEqual(bytes(client.data), b"")
        self.assertEqual(front.record.close_reason, "handshake timeout")

    def test_handshake_timer_stops_at_the_server_hello(self) -> None:
        self.use_backend(self.backend, FrontSettings(handshake_timeout=6))
        sealed = seal_hello(KEY.config, InnerSpec())
        pipe, _front, _client, _backend_pipe, backend = self.relay_to(sealed.records)
        backend.send(server_hello())
        self.net.flush()
        self.clock.advance(60)
        self.net.flush()
        self.assertFalse(pipe.server.disconnecting)


class ClientSideOnly:
    """No front at all: just what echfront.front.connection.ClientSide declares."""

    def __init__(self) -> None:
        self.transport: StreamTransport = MemoryTransport(
            Protocol(), host=FRONT_ADDRESS, peer=CLIENT_ADDRESS
        )
        self.record = ConnectionRecord(started=0.0)
        self.sinks: list[Callable[[bytes], object]] = []
        self.handshakes_done = 0
        self.refused: list[tuple[AlertDescription, str]] = []

    def set_input(self, sink: Callable[[bytes], object]) -> None:
        self.sinks.append(sink)

    def handshake_done(self) -> None:
        self.handshakes_done += 1

    def refuse(self, alert: AlertDescription, reason: str) -> None:
        self.refused.append((alert, reason))


class HandOffTests(SynchronousTestCase):
    """A relay works with what it is handed (issue 10): a ClientSide, the
    reactor, metrics, settings and the pending bytes; never a front protocol."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.net = Network(self.reactor)
        self.backends = RecordingFactory()
        TCP4ServerEndpoint(self.reactor, BACKEND_PORT).listen(self.backends)
        self.client = ClientSideOnly()
        self.metrics = Metrics()
        backend = Backend(
            "be",
            TCP4ClientEndpoint(self.reactor, "127.0.0.1", BACKEND_PORT),
            address=("127.0.0.1", BACKEND_PORT),
        )
        info = ECHDecoder(KeySet([KEY])).decode(read_flight(plain_hello()))
        self.relay = Relay(
            self.client,
            info,
            backend,
            self.reactor,
            metrics=self.metrics,
            settings=FrontSettings(splice=False),
        )

    def test_pending_bytes_follow_the_first_flight(self) -> None:
        self.relay.start(CCS + APP_DATA)
        self.net.complete_backend(self.reactor)
        self.net.flush()
        self.assertEqual(bytes(self.backends.built[0].data), plain_hello() + CCS + APP_DATA)
        self.assertEqual(self.client.record.bytes_from_client, len(CCS + APP_DATA))
        self.assertEqual(len(self.client.sinks), 1)  # the fast path, at once
        self.assertEqual(self.client.handshakes_done, 1)
        self.assertEqual(
            self.metrics.registry.get_sample_value(
                "echfront_backend_connect_seconds_count", {"backend": "be"}
            ),
            1.0,
        )

    def test_refused_connect_is_refused_through_the_client_side_and_counted(self) -> None:
        self.relay.start(b"")
        ConnectionCompleter(self.reactor).failOnce(Failure(ConnectionRefusedError()))
        ((alert_sent, reason),) = self.client.refused
        self.assertIs(alert_sent, AlertDescription.INTERNAL_ERROR)
        self.assertTrue(reason.startswith("backend connect failed"))
        self.assertEqual(
            self.metrics.registry.get_sample_value(
                "echfront_backend_failures_total", {"backend": "be", "reason": "refused"}
            ),
            1.0,
        )


class HalfCloseTests(RelayTestCase):
    def connected(self) -> tuple[Pipe, RecordingServer, Pipe, RecordingServer]:
        pipe, _front, client, backend_pipe, backend = self.relay_to(plain_hello())
        return pipe, client, backend_pipe, backend

    def test_client_fin_half_closes_the_backend(self) -> None:
        pipe, client, backend_pipe, backend = self.connected()
        pipe.client.write(APP_DATA)
        pipe.client.loseWriteConnection()
        self.net.flush()
        self.assertEqual(backend_pipe.client.calls[-1], "loseWriteConnection")
        self.assertEqual(backend.events, ["made", "eof"])
        self.assertTrue(bytes(backend.data).endswith(APP_DATA))
        # The other direction still works.
        backend.send(b"reply")
        self.net.flush()
        self.assertEqual(bytes(client.data), b"reply")
        self.assertFalse(pipe.server.disconnecting)
        self.assertEqual(client.events, ["made"])

    def test_backend_fin_half_closes_the_client(self) -> None:
        pipe, client, backend_pipe, backend = self.connected()
        backend.send(b"last words")
        backend.half_close()
        self.net.flush()
        self.assertEqual(pipe.server.calls[-1], "loseWriteConnection")
        self.assertEqual(bytes(client.data), b"last words")
        self.assertEqual(client.events, ["made", "eof"])
        pipe.client.write(b"still talking")
        self.net.flush()
        self.assertTrue(bytes(backend.data).endswith(b"still talking"))
        self.assertFalse(backend_pipe.client.disconnecting)

    def test_both_fins_close_both(self) -> None:
        pipe, client, backend_pipe, backend = self.connected()
        pipe.client.loseWriteConnection()
        self.net.flush()
        backend.send(b"answer after EOF")
        backend.half_close()
        self.net.flush()
        self.assertEqual(bytes(client.data), b"answer after EOF")
        self.assertIn("loseConnection", pipe.server.calls)
        self.assertIn("loseConnection", backend_pipe.client.calls)
        self.assertEqual(client.events, ["made", "eof", "lost"])
        self.assertEqual(backend.events, ["made", "eof", "lost"])
        self.assertEqual(self.factory.open_connections, 0)

    def test_client_fin_while_connecting_reaches_the_backend_after_its_bytes(self) -> None:
        sealed = seal_hello(KEY.config, InnerSpec())
        front = self.factory.buildProtocol(CLIENT_ADDRESS)
        assert front is not None
        pipe = self.net.connect(RecordingServer(), front)
        # A TCP transport reads no FIN while paused; one that ignores the
        # pause (front.py handles that case) delivers it while connecting.
        pipe.server.honours_pause = False
        pipe.client.write(sealed.records + APP_DATA + EARLY_DATA[:4])
        pipe.client.loseWriteConnection()
        self.net.flush()
        self.net.complete_backend(self.clock)
        self.net.flush()
        backend = self.backends.built[0]
        # Everything the client sent, then its FIN (as Relay.client_eof does
        # once connected: "the backend may as well see exactly what the
        # client sent").
        self.assertEqual(backend.events, ["made", "eof"])
        self.assertEqual(bytes(backend.data), inner_records(sealed) + APP_DATA + EARLY_DATA[:4])

    def test_backend_close_closes_the_client_after_queued_bytes(self) -> None:
        pipe, client, _backend_pipe, backend = self.connected()
        backend.send(b"x" * 1000)
        backend.close()
        self.net.flush()
        self.assertEqual(bytes(client.data), b"x" * 1000)
        self.assertEqual(client.events, ["made", "lost"])
        self.assertIn("loseConnection", pipe.server.calls)
        self.assertNotIn("abortConnection", pipe.server.calls)
        self.assertEqual(self.factory.open_connections, 0)

    def test_client_close_closes_the_backend(self) -> None:
        pipe, _client, backend_pipe, backend = self.connected()
        pipe.client.write(APP_DATA)
        pipe.client.loseConnection()
        self.net.flush()
        self.assertTrue(bytes(backend.data).endswith(APP_DATA))
        self.assertEqual(backend.events[-1], "lost")
        self.assertNotIn("abortConnection", backend_pipe.client.calls)

    def test_closed_connections_do_not_wait_for_the_garbage_collector(self) -> None:
        # Once both sides have closed, nothing of the relay may be held in a
        # reference cycle: reference counting frees it at once.
        gc.collect()
        gc.disable()
        self.addCleanup(gc.enable)
        for hello in (plain_hello(), seal_hello(KEY.config).records):
            pipe, _front, _client, backend_pipe, _backend = self.relay_to(hello)
            backend_pipe.server.write(server_hello())
            self.net.flush()
            pipe.client.loseConnection()
            self.net.flush()
        self.assertEqual(self.factory.open_connections, 0)
        del pipe, _front, _client, backend_pipe, _backend
        for link in self.net.pipes:
            # Twisted's transports forget their protocol once it is lost; the
            # test's memory transports keep it, a cycle that is not the front's.
            link.client.protocol = link.server.protocol = None  # type: ignore[assignment]
        self.net = self.backends = None  # type: ignore[assignment]
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            gc.collect()
            left = {type(o) for o in gc.garbage} & {FrontProtocol, Relay, BackendProtocol}
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
        self.assertEqual(left, set())


class ProxyProtocolTests(RelayTestCase):
    def test_v2_header_before_the_first_flight(self) -> None:
        self.use_backend(
            Backend(
                "pp",
                TCP4ClientEndpoint(self.clock, "127.0.0.1", BACKEND_PORT),
                proxy_protocol=2,
            )
        )
        sealed = seal_hello(KEY.config, InnerSpec())
        *_, backend = self.relay_to(sealed.records + APP_DATA)
        data = bytes(backend.data)

        self.assertEqual(data[:12], b"\r\n\r\n\x00\r\nQUIT\n")
        self.assertEqual(data[12], 0x21)  # version 2, PROXY
        self.assertEqual(data[13], 0x11)  # TCP over IPv4
        (length,) = struct.unpack("!H", data[14:16])
        body = data[16 : 16 + length]
        src, dst = body[0:4], body[4:8]
        src_port, dst_port = struct.unpack("!HH", body[8:12])
        assert isinstance(CLIENT_ADDRESS.host, str) and isinstance(FRONT_ADDRESS.host, str)
        self.assertEqual(src, ipaddress.IPv4Address(CLIENT_ADDRESS.host).packed)
        self.assertEqual(dst, ipaddress.IPv4Address(FRONT_ADDRESS.host).packed)
        self.assertEqual((src_port, dst_port), (CLIENT_ADDRESS.port, FRONT_ADDRESS.port))
        tlvs: dict[int, bytes] = {}
        pos = 12
        while pos < len(body):
            kind, size = struct.unpack("!BH", body[pos : pos + 3])
            tlvs[kind] = body[pos + 3 : pos + 3 + size]
            pos += 3 + size
        self.assertEqual(pos, len(body))
        self.assertEqual(
            tlvs, {0x02: SECRET_NAME.encode(), 0xE0: b"\x02", 0xE1: bytes((KEY.config_id,))}
        )
        self.assertEqual(data[16 + length :], inner_records(sealed) + APP_DATA)

    def test_v2_header_for_a_hello_without_ech(self) -> None:
        self.use_backend(
            Backend(
                "pp",
                TCP4ClientEndpoint(self.clock, "127.0.0.1", BACKEND_PORT),
                proxy_protocol=2,
            )
        )
        records = plain_hello("plain.example")
        *_, backend = self.relay_to(records)
        data = bytes(backend.data)
        (length,) = struct.unpack("!H", data[14:16])
        tlvs = data[16 + 12 : 16 + length]
        self.assertEqual(tlvs, b"\x02\x00\x0dplain.example" + b"\xe0\x00\x01\x00")
        self.assertEqual(data[16 + length :], records)


# -- the same behaviour on both engines ---------------------------------------------
#
# Every test below runs twice: on the Twisted relay, in memory (MemoryHarness,
# the tools of the tests above), and on the lean engine over real loopback
# sockets (tests.test_engine.LeanHarness).  Both harnesses give a link with
# the same interface: the client's and the backend's writes, half-closes and
# closes, and what each end received.  Deadlines on the lean engine are
# coarse (up to DeadlineClock.RESOLUTION late), so timeouts are checked with
# that much room, never earlier.


class MemoryLink:
    """A client connection through the Twisted relay, in memory."""

    def __init__(self, harness: MemoryHarness, pipe: Pipe, client: RecordingServer) -> None:
        self.harness = harness
        self.pipe = pipe
        self.client = client
        self.front: FrontProtocol = pipe.server.protocol  # type: ignore[assignment]
        self.backend: RecordingServer | None = None

    @property
    def client_data(self) -> bytes:
        return bytes(self.client.data)

    @property
    def backend_data(self) -> bytes:
        return b"" if self.backend is None else bytes(self.backend.data)

    @property
    def client_ended(self) -> bool:
        return "eof" in self.client.events or "lost" in self.client.events

    @property
    def backend_ended(self) -> bool:
        events = [] if self.backend is None else self.backend.events
        return "eof" in events or "lost" in events

    @property
    def record(self) -> ConnectionRecord:
        return self.front.record

    def client_send(self, data: bytes) -> None:
        self.pipe.client.write(data)
        self.harness.settle()

    def client_send_pieces(self, data: bytes, size: int) -> None:
        self.pipe.server.read_size = size
        self.client_send(data)

    def client_shutdown(self) -> None:
        self.pipe.client.loseWriteConnection()
        self.harness.settle()

    def client_close(self) -> None:
        self.pipe.client.loseConnection()
        self.harness.settle()

    def client_reset(self) -> None:
        self.pipe.client.abortConnection()
        self.harness.settle()

    def _backend(self) -> RecordingServer:
        assert self.backend is not None, "the front has not connected to the backend"
        return self.backend

    def backend_send(self, data: bytes) -> None:
        self._backend().send(data)
        self.harness.settle()

    def backend_shutdown(self) -> None:
        self._backend().half_close()
        self.harness.settle()

    def backend_close(self) -> None:
        self._backend().close()
        self.harness.settle()

    def backend_reset(self) -> None:
        transport = self._backend().transport
        assert transport is not None
        transport.abortConnection()  # type: ignore[attr-defined]
        self.harness.settle()


class MemoryHarness:
    """The Twisted relay on a memory reactor, with LeanHarness's interface."""

    def __init__(self) -> None:
        self.clock = MemoryReactorClock()
        self.net = Network(self.clock)
        self.backends = RecordingFactory()
        TCP4ServerEndpoint(self.clock, BACKEND_PORT).listen(self.backends)
        self.links: list[MemoryLink] = []
        self.factory: FrontFactory | None = None
        #: How the backend's connects end: "ok", "refused" or "silent".
        self.kind = "ok"

    def backend(self, *, name: str = "be", kind: str = "ok", timeout: float = 5.0) -> Backend:
        self.kind = kind
        endpoint = TCP4ClientEndpoint(self.clock, "127.0.0.1", BACKEND_PORT)
        return Backend(name, endpoint, connect_timeout=timeout)

    def serve(
        self,
        router: IRouter,
        targets: frozenset[Backend | Local],
        settings: FrontSettings | None = None,
    ) -> FrontFactory:
        state = FrontState(ECHDecoder(KeySet([KEY])), router, targets, settings or FrontSettings())
        self.factory = FrontFactory(state, self.clock)
        return self.factory

    def open(self, first: bytes = b"") -> MemoryLink:
        assert self.factory is not None
        front = self.factory.buildProtocol(CLIENT_ADDRESS)
        assert front is not None
        client = RecordingServer()
        link = MemoryLink(self, self.net.connect(client, front), client)
        self.links.append(link)
        if first:
            link.client_send(first)
        return link

    def settle(self) -> None:
        self.net.flush()
        while self.clock.tcpClients and self.kind != "silent":
            if self.kind == "refused":
                ConnectionCompleter(self.clock).failOnce(Failure(ConnectionRefusedError()))
            else:
                self.net.complete_backend(self.clock)
                waiting = [link for link in self.links if link.backend is None]
                waiting[0].backend = self.backends.built[-1]
            self.net.flush()

    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)
        self.settle()

    def close(self) -> None:
        """Nothing to release in memory."""


class RelayBehaviour:
    """What a relay does, whichever engine runs it (the harness is the subclass's)."""

    harness: Any
    #: Extra time a deadline may take on this harness.
    late = 0.0

    def make_harness(self) -> Any:
        raise TypeError("each concrete class says which harness it runs on")

    def setUp(self) -> None:
        self.harness = self.make_harness()
        self.addCleanup(self.harness.close)  # type: ignore[attr-defined]
        self.serve()

    def serve(self, *, kind: str = "ok", timeout: float = 5.0, **settings: Any) -> None:
        self.backend = self.harness.backend(kind=kind, timeout=timeout)
        self.factory = self.harness.serve(
            FixedRouter(self.backend), frozenset({self.backend}), FrontSettings(**settings)
        )

    def sample(self, name: str, **labels: str) -> float | None:
        value: float | None = self.factory.metrics.registry.get_sample_value(name, labels)
        return value

    # -- forwarding ----------------------------------------------------------------

    def test_accepted_forwards_inner_records_then_rest(self) -> None:
        sealed = seal_hello(KEY.config, InnerSpec())
        link = self.harness.open(sealed.records + CCS + APP_DATA)
        assert link.backend_data == inner_records(sealed) + CCS + APP_DATA
        assert link.client_data == b""
        assert link.record.hello.status is ECHStatus.ACCEPTED

    def test_only_whole_records_before_the_server_hello(self) -> None:
        sealed = seal_hello(KEY.config, InnerSpec())
        link = self.harness.open(sealed.records + APP_DATA + EARLY_DATA[:3])
        assert link.backend_data == inner_records(sealed) + APP_DATA
        link.client_send(EARLY_DATA[3:6])
        assert link.backend_data == inner_records(sealed) + APP_DATA
        hello = server_hello()
        link.backend_send(hello + SERVER_CCS)
        assert link.client_data == hello + SERVER_CCS
        assert link.backend_data == inner_records(sealed) + APP_DATA + EARLY_DATA[:6]
        link.client_send(EARLY_DATA[6:] + b"\x17\x03\x03")
        link.backend_send(b"\x17\x03\x03\x00\x02hi")
        assert link.backend_data == inner_records(sealed) + APP_DATA + EARLY_DATA + b"\x17\x03\x03"
        assert link.client_data == hello + SERVER_CCS + b"\x17\x03\x03\x00\x02hi"
        assert not link.record.hello_retry

    def test_grease_is_not_watched(self) -> None:
        grease = seal_hello(KEY.config, InnerSpec(), ech_extension=grease_extension())
        link = self.harness.open(grease.records + CCS)
        assert link.backend_data == grease.records + CCS
        link.backend_send(server_hello(retry=True))
        link.client_send(b"\x16\x03\x03\x00\x01")  # an inspector would refuse this
        assert link.client_data == server_hello(retry=True)
        assert link.backend_data == grease.records + CCS + b"\x16\x03\x03\x00\x01"
        assert not link.client_ended

    def test_backend_alert_instead_of_a_server_hello_passes(self) -> None:
        sealed = seal_hello(KEY.config, InnerSpec())
        link = self.harness.open(sealed.records)
        link.backend_send(alert(40))
        link.client_send(APP_DATA)
        assert link.client_data == alert(40)
        assert link.backend_data == inner_records(sealed) + APP_DATA

    def test_plain_hello_is_forwarded_as_sent(self) -> None:
        records = plain_hello()
        link = self.harness.open(records + EARLY_DATA)
        assert link.backend_data == records + EARLY_DATA
        link.backend_send(server_hello())
        assert link.client_data == server_hello()
        assert link.record.bytes_from_client == len(EARLY_DATA)
        assert link.record.bytes_to_client == len(server_hello())

    # -- HelloRetryRequest (RFC 9849 §7.1.1) ------------------------------------------

    def retried(self) -> tuple[SealedHello, Any]:
        sealed = seal_hello(KEY.config, InnerSpec())
        link = self.harness.open(sealed.records)
        link.backend_send(server_hello(retry=True) + SERVER_CCS)
        assert link.client_data == server_hello(retry=True) + SERVER_CCS
        return sealed, link

    def test_second_hello_rewritten_after_ccs_and_early_data(self) -> None:
        sealed, link = self.retried()
        second = sealed.second()
        after = b"\x17\x03\x03\x00\x03abc"
        link.client_send_pieces(CCS + APP_DATA + second.records + after, 37)
        assert link.backend_data == (
            inner_records(sealed) + CCS + APP_DATA + inner_records(second, 0x0303) + after
        )
        link.backend_send(server_hello())
        link.client_send(b"\x17\x03\x03\x00\x01Z")
        assert link.client_data == server_hello(retry=True) + SERVER_CCS + server_hello()
        assert link.backend_data.endswith(b"\x17\x03\x03\x00\x01Z")
        assert link.record.hello_retry
        assert self.sample("echfront_hello_retry_requests_total") == 1

    def test_ccs_and_early_data_before_the_hrr_are_forwarded(self) -> None:
        sealed = seal_hello(KEY.config, InnerSpec())
        second = sealed.second()
        link = self.harness.open(sealed.records + APP_DATA)
        link.client_send(CCS[:2])  # a partial record is held back
        assert link.backend_data == inner_records(sealed) + APP_DATA
        link.backend_send(server_hello(retry=True))
        link.client_send(CCS[2:] + second.records)
        assert link.backend_data == (
            inner_records(sealed) + APP_DATA + CCS + inner_records(second, 0x0303)
        )

    def test_corrupted_second_hello_gets_decrypt_error(self) -> None:
        sealed, link = self.retried()
        second = sealed.second()
        records = bytearray(second.records)
        records[5 + 4 + second.payload_offset + 3] ^= 0x01
        link.client_send(CCS)
        link.client_send(bytes(records))
        assert link.client_data == server_hello(retry=True) + SERVER_CCS + alert(51)
        assert link.backend_data == inner_records(sealed) + CCS
        assert link.client_ended and link.backend_ended
        assert self.factory.open_connections == 0

    def test_second_hello_without_ech_gets_missing_extension(self) -> None:
        sealed, link = self.retried()
        second = sealed.second(
            outer=[(EXT_SNI, sni(PUBLIC_NAME)), EXT_GROUPS, EXT_SIGALGS, EXT_KEY_SHARE]
        )
        link.client_send(second.records)
        assert link.client_data == server_hello(retry=True) + SERVER_CCS + alert(109)
        assert link.backend_data == inner_records(sealed)
        assert link.backend_ended

    def test_second_hello_with_fresh_enc_gets_illegal_parameter(self) -> None:
        sealed, link = self.retried()
        link.client_send(seal_hello(KEY.config, InnerSpec(), record_version=0x0303).records)
        assert link.client_data[-7:] == alert(47)
        assert link.backend_data == inner_records(sealed)

    # -- connecting ----------------------------------------------------------------------

    def test_connection_refused_gets_internal_error(self) -> None:
        self.serve(kind="refused")
        link = self.harness.open(plain_hello())
        assert link.client_data == alert(80)
        assert link.client_ended
        assert link.record.close_reason.startswith("backend connect failed")
        assert self.sample("echfront_backend_failures_total", backend="be", reason="refused") == 1
        assert self.factory.open_connections == 0

    def test_connect_timeout_gets_internal_error(self) -> None:
        self.serve(kind="silent", timeout=3)
        link = self.harness.open(plain_hello())
        self.harness.advance(2.9)
        assert link.client_data == b""
        self.harness.advance(0.1 + self.late)
        assert link.client_data == alert(80)
        assert link.client_ended
        assert link.record.close_reason == "backend connect timed out"
        assert self.sample("echfront_backend_failures_total", backend="be", reason="timeout") == 1
        assert self.factory.open_connections == 0

    def test_client_reset_while_connecting_cancels_the_connect(self) -> None:
        # (A FIN alone cannot end it: a client may half-close and still
        # wait for the answer; TCP shows both the same.)
        self.serve(kind="silent")
        link = self.harness.open(plain_hello())
        link.client_reset()
        assert self.factory.open_connections == 0
        assert link.backend_data == b""

    def test_handshake_timeout_while_inspecting_aborts_both(self) -> None:
        self.serve(handshake_timeout=6)
        link = self.harness.open(seal_hello(KEY.config, InnerSpec()).records)
        self.harness.advance(5.9)
        assert not link.client_ended
        self.harness.advance(0.1 + self.late)
        assert link.client_ended and link.backend_ended
        assert link.client_data == b""
        assert link.record.close_reason == "handshake timeout"

    def test_handshake_deadline_ends_at_the_server_hello(self) -> None:
        self.serve(handshake_timeout=6)
        link = self.harness.open(seal_hello(KEY.config, InnerSpec()).records)
        link.backend_send(server_hello())
        self.harness.advance(60)
        assert not link.client_ended and not link.backend_ended

    # -- half-close and closing -----------------------------------------------------------

    def test_client_fin_half_closes_the_backend(self) -> None:
        link = self.harness.open(plain_hello())
        link.client_send(APP_DATA)
        link.client_shutdown()
        assert link.backend_ended
        assert link.backend_data.endswith(APP_DATA)
        link.backend_send(b"reply")
        assert link.client_data == b"reply"
        assert not link.client_ended

    def test_backend_fin_half_closes_the_client(self) -> None:
        link = self.harness.open(plain_hello())
        link.backend_send(b"last words")
        link.backend_shutdown()
        assert link.client_data == b"last words"
        assert link.client_ended
        link.client_send(b"still talking")
        assert link.backend_data.endswith(b"still talking")

    def test_both_fins_close_both(self) -> None:
        link = self.harness.open(plain_hello())
        link.client_shutdown()
        link.backend_send(b"answer after EOF")
        link.backend_shutdown()
        assert link.client_data == b"answer after EOF"
        assert link.client_ended and link.backend_ended
        assert self.factory.open_connections == 0
        assert link.record.bytes_to_client == len(b"answer after EOF")

    def test_backend_close_closes_the_client_after_queued_bytes(self) -> None:
        link = self.harness.open(plain_hello())
        link.backend_send(b"x" * 1000)
        link.backend_close()
        assert link.client_data == b"x" * 1000
        assert link.client_ended
        # (Over TCP the backend's close is a FIN: the client may still send
        # until it closes too.)
        link.client_close()
        assert self.factory.open_connections == 0

    def test_backend_closing_before_answering_gets_internal_error(self) -> None:
        link = self.harness.open(plain_hello())
        link.backend_close()
        assert link.client_data == alert(80)
        assert link.client_ended
        assert self.sample("echfront_backend_failures_total", backend="be", reason="closed") == 1

    def test_backend_reset_before_answering_gets_internal_error(self) -> None:
        link = self.harness.open(plain_hello())
        link.backend_reset()
        assert link.client_data == alert(80)
        assert link.client_ended
        assert link.record.close_reason.startswith("backend closed before answering")

    def test_client_close_closes_the_backend(self) -> None:
        link = self.harness.open(plain_hello())
        link.client_send(APP_DATA)
        link.client_close()
        assert link.backend_data.endswith(APP_DATA)
        assert link.backend_ended
        link.backend_close()
        assert self.factory.open_connections == 0

    # -- limits, logs and metrics ------------------------------------------------------------

    def test_first_flight_deadline(self) -> None:
        self.serve(first_flight_timeout=3)
        link = self.harness.open(plain_hello()[:30])
        self.harness.advance(2.9)
        assert not link.client_ended
        self.harness.advance(0.1 + self.late)
        assert link.client_ended
        assert link.record.limit == "first_flight_timeout"
        assert self.sample("echfront_limited_connections_total", limit="first_flight_timeout") == 1

    def test_refusal_alert_before_routing(self) -> None:
        link = self.harness.open(b"GET / HTTP/1.0\r\n\r\n")
        assert link.client_data == alert(10)
        assert link.client_ended
        assert self.sample(
            "echfront_connections_total", ech="error", alert="unexpected_message", route="none"
        )

    def test_connection_is_counted_and_logged(self) -> None:
        sealed = seal_hello(KEY.config, InnerSpec())
        with capturedLogs() as events:
            link = self.harness.open(sealed.records)
            link.backend_send(server_hello())
            link.client_send(APP_DATA)
            link.client_shutdown()
            link.backend_shutdown()
        (event,) = [e for e in events if e.get("log_namespace") == "echfront.connection"]
        assert (event["ech"], event["route"], event["alert"]) == ("accepted", "be", None)
        assert event["bytes_from_client"] == len(APP_DATA)
        assert event["bytes_to_client"] == len(server_hello())
        assert event["first_flight_bytes"] == len(sealed.records)
        assert (
            self.sample("echfront_connections_total", ech="accepted", alert="none", route="be") == 1
        )
        assert self.sample("echfront_backend_connect_seconds_count", backend="be") == 1
        assert self.sample("echfront_active_connections") == 0


class MemoryRelayBehaviourTests(RelayBehaviour, SynchronousTestCase):
    """The Twisted relay (echfront.front.relay), in memory."""

    def make_harness(self) -> Any:
        return MemoryHarness()


class LeanRelayBehaviourTests(RelayBehaviour, SynchronousTestCase):
    """The lean engine's relay (echfront.front.leanrelay), on loopback sockets."""

    late = DeadlineClock.RESOLUTION + 0.01

    def make_harness(self) -> Any:
        if not AVAILABLE:
            raise SkipTest("the lean engine is Linux only")
        # Imported here: tests.test_engine imports this module's helpers.
        from tests.test_engine import LeanHarness  # noqa: PLC0415

        return LeanHarness()

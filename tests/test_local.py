# Trial's assertions are untyped, and calls through a subclass escape
# the project's untyped_calls_exclude = ["twisted"]:
# mypy: disable-error-code="no-untyped-call"
"""Local TLS termination (echfront.front.local), with real pyOpenSSL on both ends.

A Twisted TLS client (``optionsForClientTLS`` trusting a
:class:`~echfront.app.certs.TestCA` root) talks through a
:class:`~echfront.front.protocol.FrontProtocol` to a ``Local`` target built by
:func:`~echfront.front.local.local_target`, all in memory on one
``MemoryReactorClock`` that also drives Twisted's buffered TLS writes
(twisted-design.md §A2, §E).
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path

from twisted.internet.interfaces import IAddress
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.internet.testing import MemoryReactorClock
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from echfront.app.certs import TestCA
from echfront.ech.decoder import ClientHelloInfo, ECHDecoder, ECHStatus
from echfront.ech.keyset import KeySet
from echfront.errors import ConfigError
from echfront.front.local import LocalHandoff, hello_info_for, local_target
from echfront.front.protocol import FrontFactory, FrontProtocol
from echfront.front.state import FrontSettings, FrontState
from echfront.front.tlsoptions import load_certificate_options
from echfront.interfaces import IRouter
from echfront.targets import Local, Route
from tests.twistedhelpers import CLIENT_ADDRESS, Network, Pipe

PUBLIC_NAME = "public.example"
_TMP = tempfile.TemporaryDirectory(prefix="echfront-test-local-")
CA = TestCA(Path(_TMP.name) / "ca")
ISSUED = CA.issue([PUBLIC_NAME])
OTHER = CA.issue(["other.example"])


class EchoServer(Protocol):
    """The local application: echoes, and looks up its hello info."""

    def __init__(self) -> None:
        self.info: ClientHelloInfo | None = None
        self.data = bytearray()
        self.lost: Failure | None = None

    def connectionMade(self) -> None:
        self.info = hello_info_for(self.transport)

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        assert self.transport is not None
        self.transport.write(data)

    def connectionLost(self, reason: Failure = Failure(Exception())) -> None:  # noqa: B008
        self.lost = reason


class TLSClientApp(Protocol):
    """The client's application protocol: sends a greeting, records replies."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.lost: Failure | None = None

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(b"ping over TLS")

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Failure = Failure(Exception())) -> None:  # noqa: B008
        self.lost = reason


@implementer(IRouter)
class ToLocal:
    def __init__(self, target: Local) -> None:
        self.target = target

    def route(self, hello: ClientHelloInfo, peer: IAddress) -> Route:
        return self.target


class LocalTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.net = Network(self.clock)
        self.servers: list[EchoServer] = []

        def make_server() -> EchoServer:
            server = EchoServer()
            self.servers.append(server)
            return server

        self.make_server = make_server
        self.serve(alpn=())

    def serve(self, *, alpn: Sequence[str]) -> None:
        """Route everything to a local service negotiating ``alpn``."""
        options = load_certificate_options(ISSUED.chain, ISSUED.key, alpn=alpn)
        factory = Factory.forProtocol(self.make_server)
        self.target = local_target("local", options, factory, self.clock)
        state = FrontState(
            ECHDecoder(KeySet()),
            ToLocal(self.target),
            frozenset({self.target}),
            FrontSettings(first_flight_timeout=5, handshake_timeout=7),
        )
        self.factory = FrontFactory(state, self.clock)

    def connect(
        self, *, read_size: int | None = None, alpn: Sequence[bytes] | None = None
    ) -> tuple[Pipe, FrontProtocol, TLSMemoryBIOProtocol, TLSClientApp]:
        trust = Certificate.loadPEM(CA.cert_path.read_bytes())
        client_factory = TLSMemoryBIOFactory(
            optionsForClientTLS(PUBLIC_NAME, trustRoot=trust, acceptableProtocols=alpn),
            True,
            Factory.forProtocol(TLSClientApp),
            clock=self.clock,
        )
        tls_client = client_factory.buildProtocol(CLIENT_ADDRESS)
        front = self.factory.buildProtocol(CLIENT_ADDRESS)
        assert front is not None
        pipe = self.net.connect(tls_client, front, server_read=read_size)
        app = tls_client.wrappedProtocol
        assert isinstance(app, TLSClientApp)
        return pipe, front, tls_client, app

    def assert_echoed(self, front: FrontProtocol, app: TLSClientApp) -> None:
        self.assertEqual(bytes(app.data), b"ping over TLS")
        self.assertIsNone(app.lost)
        (server,) = self.servers
        self.assertEqual(bytes(server.data), b"ping over TLS")
        info = server.info
        assert info is not None
        self.assertIs(info, front.info)
        self.assertEqual(info.server_name, PUBLIC_NAME)
        self.assertIs(info.status, ECHStatus.NOT_OFFERED)
        self.assertIsInstance(front._handler, LocalHandoff)

    def test_handshake_and_echo_through_the_front(self) -> None:
        pipe, front, tls_client, app = self.connect()
        self.net.flush()
        self.assert_echoed(front, app)
        self.assertTrue(tls_client._handshakeDone)
        self.assertFalse(pipe.server.paused)
        self.assertEqual(pipe.server.calls, ["pauseProducing", "resumeProducing"])

        # The client closes: the TLS close_notify and the close reach the app.
        tls_client.loseConnection()
        self.net.flush()
        self.assertIsNotNone(self.servers[0].lost)
        self.assertEqual(self.factory.open_connections, 0)

    def test_client_alpn_without_configured_alpn_is_ignored(self) -> None:
        """RFC 7301 §3.2: a server without ALPN ignores the client's offer."""
        _pipe, front, tls_client, app = self.connect(alpn=[b"h2", b"http/1.1"])
        self.net.flush()
        self.assert_echoed(front, app)
        self.assertIsNone(tls_client.negotiatedProtocol)

    def test_configured_alpn_picks_the_service_preference(self) -> None:
        self.serve(alpn=["h2", "http/1.1"])
        _pipe, front, tls_client, app = self.connect(alpn=[b"http/1.1", b"h2"])
        self.net.flush()
        self.assert_echoed(front, app)
        self.assertEqual(tls_client.negotiatedProtocol, b"h2")

    def test_no_overlapping_alpn_is_refused_with_no_application_protocol(self) -> None:
        self.serve(alpn=["h2"])
        _pipe, _front, tls_client, app = self.connect(alpn=[b"imap"])
        self.net.flush()
        self.assertEqual(bytes(app.data), b"")
        self.assertIsNotNone(app.lost)
        # The client's TLS stack reports the server's alert 120.
        assert app.lost is not None
        self.assertIn("tlsv1 alert no application protocol", str(app.lost.value))
        (server,) = self.servers
        self.assertEqual(bytes(server.data), b"")
        self.assertEqual(self.factory.open_connections, 0)
        self.assertFalse(tls_client._handshakeDone)

    def test_first_flight_in_one_byte_reads(self) -> None:
        pipe, front, _tls_client, app = self.connect(read_size=1)
        self.net.flush()
        self.assert_echoed(front, app)
        self.assertEqual(set(pipe.server.reads), {1})
        self.assertGreater(len(pipe.server.reads), 200)

    def test_stalled_client_aborted_at_handshake_timeout(self) -> None:
        pipe, front, _tls_client, app = self.connect()
        # The client sends its ClientHello, then never reads the server's flight.
        pipe.client.pauseProducing()
        self.net.flush()
        assert front.info is not None
        self.assertEqual(front.info.server_name, PUBLIC_NAME)
        self.assertGreater(len(pipe.client.incoming), 0)
        self.clock.advance(6.9)
        self.net.flush()
        self.assertFalse(pipe.server.disconnecting)
        self.clock.advance(0.1)
        self.assertEqual(pipe.server.calls[-1], "abortConnection")
        self.assertEqual(front.record.close_reason, "handshake timeout")
        pipe.client.resumeProducing()
        self.net.flush()
        self.assertEqual(bytes(app.data), b"")
        self.assertEqual(self.factory.open_connections, 0)

    def test_completed_handshake_outlives_the_timer(self) -> None:
        pipe, front, tls_client, app = self.connect()
        self.net.flush()
        self.assert_echoed(front, app)
        self.clock.advance(7)
        self.net.flush()
        self.clock.advance(100)
        self.net.flush()
        self.assertFalse(pipe.server.disconnecting)
        self.assertNotIn("abortConnection", pipe.server.calls)
        tls_client.write(b" again")
        self.net.flush()
        self.assertEqual(bytes(app.data), b"ping over TLS again")


class CertificateOptionsTests(SynchronousTestCase):
    def test_separate_and_combined_files_load(self) -> None:
        for options in (
            load_certificate_options(ISSUED.chain, ISSUED.key),
            load_certificate_options(ISSUED.combined),
            load_certificate_options(ISSUED.chain, ISSUED.key, alpn=["h2", "http/1.1"]),
        ):
            self.assertIsNotNone(options.getContext())

    def test_missing_certificate_file(self) -> None:
        missing = Path(_TMP.name) / "nope.pem"
        with self.assertRaises(ConfigError) as caught:
            load_certificate_options(missing, ISSUED.key)
        self.assertIn(str(missing), str(caught.exception))

    def test_missing_key_file(self) -> None:
        missing = Path(_TMP.name) / "nope.key"
        with self.assertRaises(ConfigError) as caught:
            load_certificate_options(ISSUED.chain, missing)
        self.assertIn(str(missing), str(caught.exception))

    def test_key_that_does_not_match(self) -> None:
        with self.assertRaises(ConfigError) as caught:
            load_certificate_options(ISSUED.chain, OTHER.key)
        message = str(caught.exception)
        self.assertIn(str(ISSUED.chain), message)
        self.assertIn("does not match", message)

    def test_file_without_a_certificate(self) -> None:
        with self.assertRaises(ConfigError) as caught:
            load_certificate_options(ISSUED.key, ISSUED.key)
        message = str(caught.exception)
        self.assertIn(str(ISSUED.key), message)
        self.assertIn("no PEM CERTIFICATE", message)

    def test_combined_file_without_a_key(self) -> None:
        with self.assertRaises(ConfigError) as caught:
            load_certificate_options(ISSUED.chain)
        self.assertIn(str(ISSUED.chain), str(caught.exception))
        self.assertIn("private key", str(caught.exception))

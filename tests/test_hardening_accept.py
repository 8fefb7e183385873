# Trial's assertions are untyped, and calls through a subclass escape
# the project's untyped_calls_exclude = ["twisted"]:
# mypy: disable-error-code="no-untyped-call"
"""At accept (issue 12, items 1, 2 and 4), on real loopback sockets.

* Every refusal closes the socket and is counted, on every kind of
  listening endpoint: ``tcp:``, ``unix:``, ``systemd:`` (a socket passed in
  LISTEN_FDS), a ``[proxy] listen`` endpoint, and under a wrapping factory
  (which is where None from ``buildProtocol`` used to leave it open).
* A ``[proxy] listen`` endpoint: only balancers from ``[proxy] from`` are
  served; the PROXY header's client address drives the per-address limits
  and the HPKE rate, the logs and the PROXY header sent on to a backend;
  half-close and splice still work; a real haproxy 2.6 sending PROXY v2 in
  front of a :class:`~echfront.app.service.FrontService`.
* A refusal's close has a deadline even after the handshake timer stopped.
* The listen backlog: the value passed for each endpoint kind, the cap by
  ``net.core.somaxconn``, and a burst of connects that all complete at once
  (with Twisted's 50 they do not).
* At stop, the connections waiting in a listening socket's accept queue are
  accepted and served, on the lean engine and on Twisted's port, not reset.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import select
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import reactor as global_reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import inlineCallbacks
from twisted.internet.endpoints import (
    TCP4ClientEndpoint,
    _SystemdParser,
    serverFromString,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.internet.tcp import Port as TwistedPort
from twisted.internet.testing import MemoryReactor, MemoryReactorClock
from twisted.logger import ILogObserver, LogEvent, globalLogPublisher
from twisted.protocols.policies import WrappingFactory
from twisted.python import usage
from twisted.python.systemd import ListenFDs
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import provider

from echfront.app.listeners import ListenerService
from echfront.app.service import FrontService
from echfront.config.build import listen_endpoints, listen_plan, proxy_listen_endpoints
from echfront.config.endpoints import DEFAULT_BACKLOG, default_backlog, with_backlog
from echfront.config.schema import parse_config
from echfront.ech.decoder import ECHDecoder
from echfront.ech.keyset import KeySet
from echfront.errors import ConfigError
from echfront.front import splice
from echfront.front.accept import accept_queued, closes_refused
from echfront.front.connection import CONNECTION_EVENT
from echfront.front.leanport import LeanPort, lean_endpoint
from echfront.front.protocol import FrontFactory
from echfront.front.proxyproto import ProxyHeaderReader, v2_header
from echfront.front.state import FrontSettings, FrontState
from echfront.keys.keyfile import write_key_file
from echfront.tap import Options
from echfront.targets import Backend
from tests.echhello import seal_hello
from tests.processes import stop_process
from tests.test_relay import KEY, FixedRouter, RelayTestCase
from tests.twistedhelpers import alert, plain_hello, server_hello

reactor: Any = global_reactor
HANDSHAKE_FAILURE = alert(40)
INTERNAL_ERROR = alert(80)
#: A client address a balancer may speak for (never a real peer in these tests).
CLIENT_A = ("198.51.100.23", 40001)
CLIENT_B = ("203.0.113.9", 40002)


def scratch(case: SynchronousTestCase) -> Path:
    """A fresh directory, removed after ``case``."""
    directory = Path(tempfile.mkdtemp(prefix="echfront-test-"))
    case.addCleanup(shutil.rmtree, directory, ignore_errors=True)
    return directory


class Address:
    """A Twisted-like address for :func:`v2_header` (``host`` and ``port``)."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port


def v2(client: tuple[str, int], front: tuple[str, int] = ("192.0.2.1", 443)) -> bytes:
    """The PROXY v2 header a balancer sends for ``client`` (no TLVs)."""
    return v2_header(Address(*client), Address(*front), None)


def read_available(sock: socket.socket) -> tuple[bytes, str]:
    """What a non-blocking socket holds now, and whether it ended (eof, reset, open)."""
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


class RealFrontCase(TestCase):
    """A FrontFactory on the real reactor; plain sockets for clients and the backend."""

    timeout = 60

    def setUp(self) -> None:
        self.backend_listener = socket.socket()
        self.backend_listener.bind(("127.0.0.1", 0))
        self.backend_listener.listen(64)
        self.backend_listener.setblocking(False)
        self.addCleanup(self.backend_listener.close)
        self.events: list[dict[str, Any]] = []

        @provider(ILogObserver)
        def observe(event: LogEvent) -> None:
            if event.get(CONNECTION_EVENT):
                self.events.append(event)

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)

    def make_factory(self, proxy_protocol: int = 0, **settings: Any) -> FrontFactory:
        host, port = self.backend_listener.getsockname()
        backend = Backend(
            "be", TCP4ClientEndpoint(reactor, host, port), "tcp", 5.0, proxy_protocol, (host, port)
        )
        state = FrontState(
            ECHDecoder(KeySet([KEY])),
            FixedRouter(backend),
            frozenset({backend}),
            FrontSettings(**settings),
        )
        factory = FrontFactory(state, reactor)
        self.addCleanup(self.wait_closed, factory)
        return factory

    def listen_tcp(self, factory: Any) -> int:
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return int(port.getHost().port)

    def connect(self, port: int, *, source: str = "127.0.0.1") -> socket.socket:
        sock = socket.socket()
        sock.bind((source, 0))
        sock.connect(("127.0.0.1", port))
        sock.setblocking(False)
        self.addCleanup(sock.close)
        return sock

    @inlineCallbacks
    def wait_for(self, ready: Callable[[], Any], what: str, seconds: float = 5.0) -> Any:
        """Poll ``ready`` every 5 ms (bounded); its first true value."""
        for _ in range(int(seconds / 0.005)):
            value = ready()
            if value:
                return value
            yield deferLater(reactor, 0.005, lambda: None)
        self.fail(f"timed out waiting for {what}")

    def ended(self, sock: socket.socket) -> Any:
        """Wait until ``sock`` is closed by the front; (bytes, how)."""
        received = bytearray()

        def done() -> tuple[bytes, str] | None:
            data, end = read_available(sock)
            received.extend(data)
            return (bytes(received), end) if end != "open" else None

        return self.wait_for(done, "the front to close the connection")

    def accept_backend(self) -> Any:
        def accepted() -> socket.socket | None:
            try:
                sock = self.backend_listener.accept()[0]
            except BlockingIOError:
                return None
            sock.setblocking(False)
            self.addCleanup(sock.close)
            return sock

        return self.wait_for(accepted, "the backend connection")

    def wait_closed(self, factory: FrontFactory) -> Any:
        """Cleanup: every connection of ``factory`` gone (aborted if need be)."""
        for proto in list(factory.connections):
            proto.abort("test over")
        return self.wait_for(lambda: not factory.connections, "the connections to close")

    def limited(self, factory: FrontFactory, limit: str) -> float:
        value = factory.metrics.registry.get_sample_value(
            "echfront_limited_connections_total", {"limit": limit}
        )
        return 0.0 if value is None else value

    def event_of(self, **match: Any) -> dict[str, Any]:
        found = [e for e in self.events if all(e.get(k) == v for k, v in match.items())]
        self.assertEqual(len(found), 1, f"{match} in {self.events}")
        return found[0]


# -- every refusal closes the socket, on every kind of endpoint -------------------


class RefusalOnEveryEndpointTests(RealFrontCase):
    """With max_connections = 1, the second connection is closed at once and counted."""

    @inlineCallbacks
    def listen(self, kind: str, factory: FrontFactory, *, bare: bool) -> Any:
        """Listen on an endpoint of ``kind`` as the service does; what opens a connection.

        ``bare``: answer refusals with None where the endpoint's port closes
        the socket itself (``closes_refused``), as the service does;
        otherwise always with a Refused protocol.
        """
        if kind == "systemd":
            # What systemd passes: a listening socket in LISTEN_FDS, named.
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sock.listen(8)
            # Handed over: the endpoint closes its descriptor once adopted.
            self.patch(_SystemdParser, "_sddaemon", ListenFDs([sock.detach()], ["https"]))
            description = "systemd:domain=INET:name=https"
        elif kind == "unix":
            path = str(scratch(self) / "front.sock")
            description = f"unix:{path}"
        else:
            description = "tcp:0:interface=127.0.0.1"
        endpoint = serverFromString(reactor, description)
        self.assertEqual(closes_refused(endpoint), True)
        if kind == "lean":
            # The lean engine's port (the default for plain tcp: listeners).
            endpoint = lean_endpoint(reactor, endpoint)
        listener = factory.listener(
            proxied=kind == "proxy", bare_port=bare and closes_refused(endpoint)
        )
        if kind == "wrapped":
            # A wrapping factory (as a TLS wrapper is): it cannot take None,
            # and the service never passes bare_port for such an endpoint.
            self.assertFalse(closes_refused(object()))
            listener = factory.listener()
            wrapped: Any = WrappingFactory(listener)
            listening = yield endpoint.listen(wrapped)
        else:
            listening = yield endpoint.listen(listener)
        self.addCleanup(listening.stopListening)
        if kind == "unix":

            def connect_unix() -> socket.socket:
                sock = socket.socket(socket.AF_UNIX)
                sock.connect(path)
                sock.setblocking(False)
                self.addCleanup(sock.close)
                return sock

            return connect_unix
        port = listening.getHost().port
        if kind == "proxy":

            def connect_proxied() -> socket.socket:
                sock = self.connect(port)
                sock.sendall(v2(CLIENT_A))
                return sock

            return connect_proxied
        return lambda: self.connect(port)

    @inlineCallbacks
    def refused_on(self, kind: str, *, bare: bool = False) -> Any:
        settings: dict[str, Any] = {"max_connections": 1}
        if kind == "proxy":
            settings["proxy_from"] = parse_config(
                {"proxy": {"listen": ["tcp:1"], "from": ["127.0.0.0/8"]}}, base=Path("/")
            ).settings.proxy_from
        factory = self.make_factory(**settings)
        connect = yield self.listen(kind, factory, bare=bare)
        first = connect()
        yield self.wait_for(lambda: factory.connections, "the first connection")
        second = connect()
        data, end = yield self.ended(second)
        self.assertEqual(data, b"")
        self.assertIn(end, ("eof", "reset"))
        self.assertEqual(self.limited(factory, "max_connections"), 1)
        # The first is untouched.
        self.assertEqual(read_available(first), (b"", "open"))
        self.assertEqual(factory.open_connections, 1)

    def test_tcp(self) -> Any:
        return self.refused_on("tcp")

    def test_tcp_bare(self) -> Any:
        return self.refused_on("tcp", bare=True)

    def test_unix(self) -> Any:
        return self.refused_on("unix")

    def test_unix_bare(self) -> Any:
        return self.refused_on("unix", bare=True)

    def test_systemd(self) -> Any:
        return self.refused_on("systemd")

    def test_systemd_bare(self) -> Any:
        return self.refused_on("systemd", bare=True)

    def test_proxy(self) -> Any:
        return self.refused_on("proxy")

    def test_proxy_bare(self) -> Any:
        return self.refused_on("proxy", bare=True)

    def test_under_a_wrapping_factory(self) -> Any:
        return self.refused_on("wrapped")

    def test_lean_engine(self) -> Any:
        return self.refused_on("lean")

    def test_lean_engine_bare(self) -> Any:
        return self.refused_on("lean", bare=True)

    @inlineCallbacks
    def test_a_balancer_outside_proxy_from_is_refused(self) -> Any:
        networks = parse_config(
            {"proxy": {"listen": ["tcp:1"], "from": ["10.0.0.0/8", "fd00::/8"]}}, base=Path("/")
        ).settings.proxy_from
        factory = self.make_factory(proxy_from=networks)
        port = self.listen_tcp(factory.listener(proxied=True))
        sock = self.connect(port)
        sock.sendall(v2(CLIENT_A) + plain_hello())
        data, end = yield self.ended(sock)
        self.assertEqual((data, end in ("eof", "reset")), (b"", True))
        self.assertEqual(self.limited(factory, "proxy_untrusted"), 1)
        self.assertEqual(factory.open_connections, 0)

    @inlineCallbacks
    def test_a_connection_without_a_valid_header_is_dropped_and_counted(self) -> Any:
        networks = parse_config(
            {"proxy": {"listen": ["tcp:1"], "from": ["127.0.0.1"]}}, base=Path("/")
        ).settings.proxy_from
        factory = self.make_factory(proxy_from=networks)
        port = self.listen_tcp(factory.listener(proxied=True))
        sock = self.connect(port)
        sock.sendall(plain_hello())  # TLS straight away: no header
        data, _end = yield self.ended(sock)
        self.assertEqual(data, b"")  # a balancer gets no TLS alert
        yield self.wait_for(lambda: not factory.connections, "the close")
        self.assertEqual(self.limited(factory, "proxy_header"), 1)
        self.assertEqual(self.event_of(route="none")["close_reason"], "no PROXY protocol header")

    @inlineCallbacks
    def test_a_header_that_never_completes_meets_the_first_flight_timeout(self) -> Any:
        networks = parse_config(
            {"proxy": {"listen": ["tcp:1"], "from": ["127.0.0.1"]}}, base=Path("/")
        ).settings.proxy_from
        factory = self.make_factory(proxy_from=networks, first_flight_timeout=0.3)
        port = self.listen_tcp(factory.listener(proxied=True))
        sock = self.connect(port)
        sock.sendall(v2(CLIENT_A)[:10])
        started = time.monotonic()
        _data, end = yield self.ended(sock)
        self.assertIn(end, ("eof", "reset"))
        self.assertLess(time.monotonic() - started, 3.0)
        yield self.wait_for(lambda: not factory.connections, "the close")
        self.assertEqual(self.limited(factory, "first_flight_timeout"), 1)


# -- behind a balancer -----------------------------------------------------------------


def trusting_loopback(**settings: Any) -> dict[str, Any]:
    """Settings with 127.0.0.0/8 as the balancers' network."""
    networks = parse_config(
        {"proxy": {"listen": ["tcp:1"], "from": ["127.0.0.0/8"]}}, base=Path("/")
    ).settings.proxy_from
    return {"proxy_from": networks, **settings}


class ProxyListenerTests(RealFrontCase):
    """A balancer (the test) sends PROXY v2 headers for clients it speaks for."""

    @inlineCallbacks
    def test_the_client_address_goes_to_logs_and_to_the_backend(self) -> Any:
        factory = self.make_factory(proxy_protocol=2, **trusting_loopback())
        port = self.listen_tcp(factory.listener(proxied=True))
        balancer = self.connect(port)
        sealed = seal_hello(KEY.config)
        # The header and the hello in one write: the hello is not taken for it.
        balancer.sendall(v2(CLIENT_A) + sealed.records)
        backend = yield self.accept_backend()
        received = bytearray()

        def header_read() -> Any:
            received.extend(read_available(backend)[0])
            return ProxyHeaderReader().feed(bytes(received)) if len(received) > 16 else None

        header, rest = yield self.wait_for(header_read, "the backend's PROXY header")
        self.assertEqual(header.source, (ipaddress.ip_address(CLIENT_A[0]), CLIENT_A[1]))
        self.assertEqual(str(header.destination[0]), "192.0.2.1")
        self.assertTrue(rest.startswith(b"\x16\x03"))
        backend.sendall(server_hello() + b"\x17\x03\x03\x00\x02hi")
        backend.close()
        data, _end = yield self.ended(balancer)
        self.assertEqual(data, server_hello() + b"\x17\x03\x03\x00\x02hi")
        balancer.close()  # the client's FIN ends the half-closed relay
        yield self.wait_for(lambda: not factory.connections, "the close")
        event = self.event_of(route="be")
        self.assertEqual(event["peer"], f"{CLIENT_A[0]}:{CLIENT_A[1]}")
        self.assertEqual(event["ech"], "accepted")

    @inlineCallbacks
    def test_first_flight_cap_counts_clients_not_the_balancer(self) -> Any:
        factory = self.make_factory(**trusting_loopback(max_first_flights_per_address=1))
        port = self.listen_tcp(factory.listener(proxied=True))
        first = self.connect(port)
        first.sendall(v2(CLIENT_A))
        other = self.connect(port)
        other.sendall(v2(CLIENT_B))
        yield self.wait_for(
            lambda: factory.limits.first_flights(CLIENT_B[0]) == 1, "both headers read"
        )
        self.assertEqual(factory.limits.first_flights(CLIENT_A[0]), 1)
        # A second unfinished first flight of client A is one too many;
        # client B's and the balancer's own address are not affected.
        again = self.connect(port)
        again.sendall(v2(CLIENT_A))
        _data, end = yield self.ended(again)
        self.assertIn(end, ("eof", "reset"))
        yield self.wait_for(
            lambda: self.limited(factory, "first_flights_per_address") == 1, "the count"
        )
        self.assertEqual(read_available(first), (b"", "open"))
        self.assertEqual(read_available(other), (b"", "open"))
        self.assertEqual(factory.limits.first_flights("127.0.0.1"), 0)

    @inlineCallbacks
    def test_hpke_rate_counts_clients_not_the_balancer(self) -> Any:
        factory = self.make_factory(**trusting_loopback(hpke_rate=1, hpke_burst=1))
        port = self.listen_tcp(factory.listener(proxied=True))
        for client in (CLIENT_A, CLIENT_A, CLIENT_B):
            self.connect(port).sendall(v2(client) + seal_hello(KEY.config).records)
        # One of A's two hellos is over A's rate; B has a bucket of its own.
        for _ in range(2):
            backend = yield self.accept_backend()
            backend.close()
        yield self.wait_for(lambda: not factory.connections, "the close")
        self.assertEqual(self.limited(factory, "hpke_rate"), 1)
        refused = self.event_of(alert="handshake_failure")
        self.assertEqual(refused["peer"], f"{CLIENT_A[0]}:{CLIENT_A[1]}")
        self.assertEqual(refused["alert"], "handshake_failure")
        self.assertEqual(len([e for e in self.events if e["ech"] == "accepted"]), 2)

    @inlineCallbacks
    def test_half_close_through_the_proxy_listener(self) -> Any:
        factory = self.make_factory(**trusting_loopback())
        port = self.listen_tcp(factory.listener(proxied=True))
        balancer = self.connect(port)
        balancer.sendall(v2(CLIENT_A) + plain_hello() + b"request")
        balancer.shutdown(socket.SHUT_WR)
        backend = yield self.accept_backend()
        got = bytearray()

        def until_eof() -> bool:
            data, end = read_available(backend)
            got.extend(data)
            return end == "eof"

        yield self.wait_for(until_eof, "the client's FIN at the backend")
        self.assertEqual(bytes(got), plain_hello() + b"request")
        # The backend answers after the client's FIN: the answer still arrives.
        backend.sendall(b"answer after EOF")
        backend.shutdown(socket.SHUT_WR)
        data, end = yield self.ended(balancer)
        self.assertEqual((data, end), (b"answer after EOF", "eof"))

    @inlineCallbacks
    def test_splice_through_the_proxy_listener(self) -> Any:
        if not splice.AVAILABLE:
            raise pytest.skip("splice(2) is Linux only")
        factory = self.make_factory(**trusting_loopback())
        port = self.listen_tcp(factory.listener(proxied=True))
        balancer = self.connect(port)
        balancer.sendall(v2(CLIENT_A) + plain_hello())
        backend = yield self.accept_backend()
        bulk = os.urandom(512 * 1024)
        sent = {"client": 0, "backend": 0}
        got = {"client": bytearray(), "backend": bytearray()}

        def pump() -> bool:
            for name, sock in (("client", balancer), ("backend", backend)):
                if sent[name] < len(bulk):
                    with contextlib.suppress(BlockingIOError):
                        sent[name] += sock.send(bulk[sent[name] : sent[name] + 65536])
            got["backend"].extend(read_available(backend)[0])
            got["client"].extend(read_available(balancer)[0])
            return len(got["client"]) >= len(bulk) and len(got["backend"]) >= len(
                plain_hello() + bulk
            )

        yield self.wait_for(pump, "the bulk data both ways", seconds=20)
        self.assertEqual(bytes(got["backend"]), plain_hello() + bulk)
        self.assertEqual(bytes(got["client"]), bulk)
        balancer.close()
        backend.close()
        yield self.wait_for(lambda: not factory.connections, "the close")
        self.assertTrue(self.event_of(route="be")["zero_copy"])


class HaproxyTests(RealFrontCase):
    """haproxy 2.6 in ``mode tcp`` with ``send-proxy-v2``, in front of a FrontService."""

    timeout = 60

    @inlineCallbacks
    def test_haproxy_v2_in_front_of_the_service(self) -> Any:
        haproxy = "/usr/sbin/haproxy"
        if not Path(haproxy).exists():
            raise pytest.skip("haproxy is not installed")
        directory = scratch(self)
        key_file = directory / "ech.pem"
        write_key_file(key_file, [KEY], overwrite=True)
        front_port, haproxy_port = free_port(), free_port()
        backend_port = self.backend_listener.getsockname()[1]
        config = parse_config(
            {
                "listen": [],
                "proxy": {
                    "listen": [f"tcp:{front_port}:interface=127.0.0.1"],
                    "from": ["127.0.0.1/32"],
                },
                "ech": {"keys": [{"file": str(key_file)}]},
                "backends": {
                    "app": {
                        "endpoint": f"tcp:host=127.0.0.1:port={backend_port}",
                        "proxy_protocol": 1,
                    }
                },
                "routes": [{"name": "secret.example.org", "backend": "app"}],
            },
            base=directory,
        )
        service = FrontService(lambda: config, reactor)
        service.startService()
        self.addCleanup(service.stopService)
        (directory / "haproxy.cfg").write_text(
            "global\n  maxconn 100\n"
            "defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 30s\n"
            "  timeout server 30s\n"
            f"listen lb\n  bind 127.0.0.1:{haproxy_port}\n"
            f"  server front 127.0.0.1:{front_port} send-proxy-v2\n"
        )
        proc = subprocess.Popen(
            [haproxy, "-db", "-f", str(directory / "haproxy.cfg")],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.addCleanup(stop_process, proc, 10.0)

        def listening() -> bool:
            try:
                with socket.create_connection(("127.0.0.1", haproxy_port), timeout=0.2):
                    return True
            except OSError:
                return False

        yield self.wait_for(listening, "haproxy to listen", seconds=10)
        # The client connects from 127.0.0.2; haproxy from 127.0.0.1.
        client = self.connect(haproxy_port, source="127.0.0.2")
        client_port = client.getsockname()[1]
        client.sendall(seal_hello(KEY.config).records)
        backend = yield self.accept_backend()
        received = bytearray()

        def first_line() -> bytes | None:
            received.extend(read_available(backend)[0])
            end = received.find(b"\r\n")
            return bytes(received[:end]) if end >= 0 else None

        line = yield self.wait_for(first_line, "the backend's PROXY v1 line")
        self.assertEqual(line.split(b" ")[:3], [b"PROXY", b"TCP4", b"127.0.0.2"])
        self.assertEqual(int(line.split(b" ")[4]), client_port)
        backend.sendall(server_hello())
        backend.close()
        data, _end = yield self.ended(client)
        self.assertEqual(data, server_hello())
        client.close()
        yield self.wait_for(lambda: not service.factory.connections, "the close")
        event = self.event_of(route="app")
        self.assertEqual(event["peer"], f"127.0.0.2:{client_port}")
        self.assertEqual(event["ech"], "accepted")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- a close always has a deadline -----------------------------------------------------


class CloseDeadlineTests(RelayTestCase):
    def test_a_refusal_after_the_handshake_timer_keeps_a_deadline(self) -> None:
        pipe, front, client, backend_pipe, _backend = self.relay_to(plain_hello())
        # A plain hello goes straight to the fast path: no handshake timer.
        self.assert_no_connection_timers()
        # The backend ends before its first byte; the client is told, but
        # never reads: the close must not wait forever.
        backend_pipe.client.eof_pending = True
        backend_pipe.client.deliver()
        self.assertIn("loseConnection", pipe.server.calls)
        self.assertFalse(pipe.server.aborted)
        self.clock.advance(FrontSettings().first_flight_timeout)
        self.assertTrue(pipe.server.aborted)
        self.assertEqual(front.record.limit, "close_timeout")
        self.assertEqual(bytes(pipe.server.sent), INTERNAL_ERROR)
        self.net.flush()
        self.assertEqual(client.events[-1], "lost")


# -- the listen backlog --------------------------------------------------------------------


class BacklogTests(SynchronousTestCase):
    def config(self, **data: Any) -> Any:
        return parse_config(data, base=Path("/"))

    def test_the_default_is_passed_for_tcp_tcp6_and_unix(self) -> None:
        memory = MemoryReactor()
        config = self.config(
            listen=["tcp:8443:interface=127.0.0.1", "tcp6:8444:interface=\\:\\:1", "unix:/x.sock"]
        )
        for endpoint in listen_endpoints(config, memory):
            endpoint.listen(Factory.forProtocol(Protocol))
        backlogs = [backlog for _port, _f, backlog, _i in memory.tcpServers]
        self.assertEqual(backlogs, [default_backlog(), default_backlog()])
        unix = [server[2] for server in memory.unixServers]
        self.assertEqual(unix, [default_backlog()])

    def test_a_backlog_the_operator_set_is_kept(self) -> None:
        memory = MemoryReactor()
        config = self.config(listen=["tcp:8443:backlog=7"])
        for endpoint in listen_endpoints(config, memory):
            endpoint.listen(Factory.forProtocol(Protocol))
        self.assertEqual(memory.tcpServers[0][2], 7)

    def test_proxy_listeners_and_worker_plans_get_it_too(self) -> None:
        memory = MemoryReactor()
        config = self.config(listen=["tcp:1"], proxy={"listen": ["tcp:2"], "from": ["10.0.0.0/8"]})
        for endpoint in proxy_listen_endpoints(config, memory):
            endpoint.listen(Factory.forProtocol(Protocol))
        self.assertEqual(memory.tcpServers[0][2], default_backlog())
        self.assertEqual(
            listen_plan(config),
            [
                (f"tcp:1:backlog={default_backlog()}", False),
                (f"tcp:2:backlog={default_backlog()}", True),
            ],
        )

    def test_systemd_sockets_are_left_as_systemd_made_them(self) -> None:
        self.assertEqual(
            with_backlog("systemd:domain=INET:name=https", 4096), "systemd:domain=INET:name=https"
        )
        self.assertEqual(with_backlog("unix:/run/x\\:y.sock", 9), "unix:/run/x\\:y.sock:backlog=9")

    def test_capped_by_somaxconn(self) -> None:
        somaxconn = scratch(self) / "somaxconn"
        somaxconn.write_text("128\n")
        self.assertEqual(default_backlog(somaxconn), 128)
        somaxconn.write_text("65535\n")
        self.assertEqual(default_backlog(somaxconn), DEFAULT_BACKLOG)
        self.assertEqual(default_backlog(somaxconn.parent / "missing"), DEFAULT_BACKLOG)


def connect_burst(port: int, count: int, wait: float) -> int:
    """Open ``count`` connects at once, nothing accepting; how many completed in ``wait``."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.setblocking(False)
            sock.connect_ex(("127.0.0.1", port))
            sockets.append(sock)
        pending = {sock.fileno(): sock for sock in sockets}
        done = 0
        poller = select.poll()
        for fd in pending:
            poller.register(fd, select.POLLOUT)
        deadline = time.monotonic() + wait
        while pending and time.monotonic() < deadline:
            for fd, _event in poller.poll(max(1, int((deadline - time.monotonic()) * 1000))):
                sock = pending.pop(fd)
                poller.unregister(fd)
                if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                    done += 1
        return done
    finally:
        for sock in sockets:
            sock.close()


class BurstTests(TestCase):
    """While the reactor is busy (here: blocked by the test), connects queue in the kernel.

    The listening socket is made by the real reactor from the endpoint
    string, as the front's are (:func:`~echfront.config.build.listen_endpoints`).
    """

    @inlineCallbacks
    def burst(self, description: str, count: int) -> Any:
        config = parse_config({"listen": [description]}, base=Path("/"))
        (endpoint,) = listen_endpoints(config, reactor)
        port = yield endpoint.listen(Factory.forProtocol(Protocol))
        try:
            completed = connect_burst(port.getHost().port, count, wait=0.5)
        finally:
            yield port.stopListening()
        return completed

    @inlineCallbacks
    def test_a_burst_of_connects_completes_at_once(self) -> Any:
        count = min(1000, default_backlog())
        completed = yield self.burst("tcp:0:interface=127.0.0.1", count)
        self.assertEqual(completed, count)

    @inlineCallbacks
    def test_with_twisteds_default_of_50_it_does_not(self) -> Any:
        # The same burst against an explicit backlog=50: most SYNs are dropped
        # and wait for their retransmission (1 s), so this test can fail.
        completed = yield self.burst("tcp:0:interface=127.0.0.1:backlog=50", 1000)
        self.assertLess(completed, 200)


class QueuedAtStopTests(RealFrontCase):
    """Connections the kernel has queued when a listener stops are served, not reset.

    The test holds the reactor while clients connect and send their
    ClientHello, so every connection waits in the listening socket's accept
    queue when the service stops; closing the socket then would reset them
    all.
    """

    COUNT = 12

    def receive(self, sock: socket.socket, size: int) -> Any:
        """Wait until ``size`` bytes have arrived on ``sock``; all it received."""
        buffer = bytearray()

        def arrived() -> bytes | None:
            buffer.extend(read_available(sock)[0])
            return bytes(buffer) if len(buffer) >= size else None

        return self.wait_for(arrived, f"{size} bytes")

    @inlineCallbacks
    def served_after_stop(self, engine: str, port_type: type) -> Any:
        config = parse_config(
            {"listen": ["tcp:0:interface=127.0.0.1"], "front": {"engine": engine}}, base=Path("/")
        )
        (endpoint,) = listen_endpoints(config, reactor)
        factory = self.make_factory()
        service = ListenerService(endpoint, factory)
        service.startService()
        self.assertIsInstance(service.port, port_type)
        assert service.port is not None
        address = service.port.getHost()
        assert isinstance(address, IPv4Address)
        clients = [self.connect(address.port) for _ in range(self.COUNT)]
        for client in clients:
            client.sendall(plain_hello())
        self.assertEqual(len(factory.connections), 0)  # all still queued

        yield service.stopService()
        self.assertEqual(len(factory.connections), self.COUNT)
        backends = []
        for _ in range(self.COUNT):
            backends.append((yield self.accept_backend()))
        for backend in backends:
            hello = yield self.receive(backend, len(plain_hello()))
            self.assertEqual(hello, plain_hello())
            backend.sendall(server_hello())
        for client in clients:
            answer = yield self.receive(client, len(server_hello()))
            self.assertEqual(answer, server_hello())
        # And nothing listens any more.
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", address.port), timeout=1).close()

    @pytest.mark.skipif(
        global_reactor.__class__.__name__ != "EPollReactor", reason="the lean engine needs epoll"
    )
    def test_on_the_lean_engine(self) -> Any:
        return self.served_after_stop("lean", LeanPort)

    def test_on_twisteds_port(self) -> Any:
        return self.served_after_stop("twisted", TwistedPort)

    def test_a_flood_is_taken_up_to_the_limit(self) -> None:
        # Twisted's port on a reactor that never runs: connects only queue.
        clock = MemoryReactorClock()
        port = TwistedPort(0, Factory.forProtocol(Protocol), 1024, "127.0.0.1", reactor=clock)
        port.startListening()
        self.addCleanup(port.connectionLost, None)
        clients = [self.connect(port.getHost().port) for _ in range(300)]
        accept_queued(port, limit=150)
        # Twisted accepts in batches of numberAccepts (100, then 120): two batches.
        self.assertEqual(port.sessionno, 220)
        accept_queued(port)
        self.assertEqual(port.sessionno, len(clients))


# -- configuration ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"listen": ["haproxy:tcp:443"]}, "listen: 'haproxy:tcp:443': haproxy: endpoints"),
        (
            {"proxy": {"listen": ["haproxy:tcp:8443"], "from": ["10.0.0.0/8"]}},
            "proxy.listen: 'haproxy:tcp:8443': haproxy: endpoints",
        ),
        ({"proxy": {"listen": ["tcp:8443"]}}, "proxy.from: required with proxy.listen"),
        ({"proxy": {"from": ["10.0.0.0/8"]}}, "proxy.listen: required with proxy.from"),
        (
            {"proxy": {"listen": ["tcp:8443"], "from": ["10.0.0.1/8"]}},
            "proxy.from: '10.0.0.1/8' is not a network",
        ),
        ({"proxy": {"listen": ["tcp:8443"], "from": ["balancer"]}}, "proxy.from: 'balancer'"),
        ({"proxy": {"listen": ["tcp:1"], "from": ["10.0.0.0/8"], "to": 1}}, "proxy.to: unknown"),
    ],
)
def test_proxy_configuration_errors(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(data, base=Path("/"))
    assert str(caught.value).startswith(message), str(caught.value)
    assert "\n" not in str(caught.value)


def test_proxy_configuration() -> None:
    config = parse_config(
        {"listen": [], "proxy": {"listen": ["tcp:8443"], "from": ["10.0.0.0/8", "fd00::/8"]}},
        base=Path("/"),
    )
    assert config.listen == ()
    assert config.proxy_listen == ("tcp:8443",)
    assert [str(n) for n in config.settings.proxy_from] == ["10.0.0.0/8", "fd00::/8"]
    # An empty listen without [proxy] still means the default.
    assert parse_config({"listen": []}, base=Path("/")).listen == ("tcp:443",)


def test_the_haproxy_wrapper_is_refused_on_the_command_line() -> None:
    with pytest.raises(usage.UsageError, match=r"\[proxy\] listen"):
        Options().parseOptions(["--listen", "haproxy:tcp:8443"])


def test_listeners_log_as_the_front() -> None:
    # Operators (and tests/test_operations.py) read "FrontFactory starting on PORT".
    factory = FrontFactory.__new__(FrontFactory)
    assert factory.listener().logPrefix() == "FrontFactory"
    assert factory.listener(proxied=True).logPrefix() == "FrontFactory (PROXY protocol)"

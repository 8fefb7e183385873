"""The QUIC listener (echfront.front.datagram): admission, flow table, decisions, relaying.

The front runs on a fake reactor (a ``Clock`` that records the backend
sockets it is asked to watch), with a recording transport for its
listening port; each flow's backend socket is a real connected UDP socket
to a real loopback socket owned by the test, so what the backend receives
is read from the kernel.  Client Initials are built independently of the
code under test (tests.test_quic_flow's ``Client``: ClientHellos sealed with
pyhpke, packets protected by aioquic), and the backend's view is opened
with aioquic.  Also: the sans-IO flow table, the configuration of
``listen_quic``, ``[quic]`` and ``quic_endpoint``, and the metrics' second
transport.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, LogEvent, globalLogPublisher
from zope.interface import implementer

from echfront.app.service import FrontService, listen_quic
from echfront.config.build import build_quic_state
from echfront.config.endpoints import quic_address, stream_host_port, udp_listen_address
from echfront.config.schema import (
    NO_QUIC,
    BackendConfig,
    Config,
    LocalConfig,
    RouteConfig,
    parse_config,
)
from echfront.ech.decoder import ClientHelloInfo, ECHDecoder
from echfront.errors import AlertDescription, ConfigError
from echfront.front.connection import CONNECTION_EVENT
from echfront.front.datagram import QuicFront, QuicState
from echfront.front.limits import AddressLimits
from echfront.front.metrics import Metrics
from echfront.front.state import FrontSettings, FrontState
from echfront.interfaces import IRouter
from echfront.quic.admission import QuicSettings
from echfront.quic.errors import TransportErrorCode, crypto_error_code
from echfront.quic.packets import VERSION_1, PacketType, parse_long_header
from echfront.quic.table import MAX_CIDS, FlowTable, long_header_cids
from echfront.routing import Rule, StaticRouter
from echfront.targets import Backend, Local, Route
from tests.echhello import grease_extension, seal_hello
from tests.test_quic_flow import (
    DCID,
    KEY,
    KEYS,
    SCID,
    SPEC,
    Client,
    close_frame,
    crypto_stream,
    open_backend,
    sealed,
)

SECRET_NAME = "secret.example.org"
CLIENT = ("192.0.2.7", 50123)
OTHER_CLIENT = ("192.0.2.8", 40000)
SERVER_CID = bytes.fromhex("5e4e7e4c1d00aa01")


class FakeReactor(Clock):
    """A Clock that records the readers (backend sockets) the front registers."""

    def __init__(self) -> None:
        super().__init__()
        self.readers: list[Any] = []

    def addReader(self, reader: Any) -> None:
        self.readers.append(reader)

    def removeReader(self, reader: Any) -> None:
        self.readers.remove(reader)

    def read_all(self) -> None:
        """Let every backend socket read what has arrived (as the reactor would)."""
        for reader in list(self.readers):
            reader.doRead()


class Sent:
    """The front's listening port: records what it sends, and to whom."""

    def __init__(self) -> None:
        self.datagrams: list[tuple[bytes, tuple[str, int]]] = []

    def write(self, datagram: bytes, addr: tuple[str, int]) -> None:
        self.datagrams.append((datagram, addr))

    def take(self) -> list[tuple[bytes, tuple[str, int]]]:
        taken, self.datagrams = self.datagrams, []
        return taken


class LoopbackBackend:
    """A real UDP socket on 127.0.0.1 standing for the backend's QUIC port."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(2.0)
        self.address: tuple[str, int] = self.sock.getsockname()
        self.peer: tuple[str, int] | None = None

    def receive(self, count: int) -> list[bytes]:
        datagrams = []
        for _ in range(count):
            data, self.peer = self.sock.recvfrom(65536)
            datagrams.append(data)
        return datagrams

    def drain(self) -> list[bytes]:
        """Everything that arrives until the socket has been quiet for 0.2 s."""
        datagrams = []
        self.sock.settimeout(0.2)
        try:
            while True:
                data, self.peer = self.sock.recvfrom(65536)
                datagrams.append(data)
        except TimeoutError:
            return datagrams
        finally:
            self.sock.settimeout(2.0)

    def nothing(self) -> bool:
        self.sock.settimeout(0.05)
        try:
            self.sock.recvfrom(65536)
        except TimeoutError:
            return True
        finally:
            self.sock.settimeout(2.0)
        return False

    def send(self, datagram: bytes) -> None:
        assert self.peer is not None
        self.sock.sendto(datagram, self.peer)


@pytest.fixture
def backend() -> Iterator[LoopbackBackend]:
    server = LoopbackBackend()
    yield server
    server.sock.close()


@pytest.fixture
def events() -> Iterator[list[LogEvent]]:
    captured: list[LogEvent] = []

    @implementer(ILogObserver)
    def observe(event: LogEvent) -> None:
        if event.get(CONNECTION_EVENT):
            captured.append(event)

    globalLogPublisher.addObserver(observe)
    yield captured
    globalLogPublisher.removeObserver(observe)


class Harness:
    """A QuicFront on a fake reactor, one Backend target at ``backend``'s address."""

    def __init__(
        self,
        backend: LoopbackBackend,
        *,
        settings: FrontSettings | None = None,
        quic: QuicSettings | None = None,
        router: Any = None,
        local_endpoint: bool = False,
    ) -> None:
        self.reactor = FakeReactor()
        self.target = Backend("app", endpoint=None)  # type: ignore[arg-type]
        self.local = Local("public", tls_factory=None)  # type: ignore[arg-type]
        rules = [Rule(SECRET_NAME, self.target), Rule("public.example", self.local)]
        self.router = router or StaticRouter(tuple(rules))
        front = FrontState(
            ECHDecoder(KEYS),
            self.router,
            frozenset({self.target, self.local}),
            settings or FrontSettings(),
        )
        endpoints: dict[Backend | Local, tuple[str, int]] = {self.target: backend.address}
        if local_endpoint:
            endpoints[self.local] = backend.address
        self.metrics = Metrics()
        self.front = QuicFront(
            QuicState(front, endpoints, quic or QuicSettings()),
            self.reactor,
            metrics=self.metrics,
            limits=AddressLimits(self.reactor.seconds),
        )
        self.sent = Sent()
        self.front.transport = self.sent  # type: ignore[assignment]

    def receive(self, datagrams: list[bytes], client: tuple[str, int] = CLIENT) -> None:
        for datagram in datagrams:
            self.front.datagramReceived(datagram, client)

    def sample(self, name: str, **labels: str) -> float | None:
        return self.metrics.registry.get_sample_value(name, labels)

    def limited(self, limit: str) -> float | None:
        return self.sample("echfront_limited_connections_total", limit=limit, transport="quic")

    def sweep_all(self) -> None:
        """Advance past every deadline, so every flow is closed (and counted)."""
        self.reactor.advance(QuicSettings().idle_timeout + 5)
        self.reactor.advance(2)


def server_datagram(dcid: bytes = SCID, scid: bytes = SERVER_CID, size: int = 1200) -> bytes:
    """A stand-in for a backend's first datagram: a long header naming its connection ID."""
    first = 0xC0 | (VERSION_1.type_bits_of(PacketType.HANDSHAKE)) | 0x03
    header = bytes((first,)) + VERSION_1.number.to_bytes(4, "big")
    header += bytes((len(dcid),)) + dcid + bytes((len(scid),)) + scid
    rest = size - len(header) - 2
    return header + (0x4000 | rest).to_bytes(2, "big") + bytes(rest)


def relaying(flow: Any) -> bool:
    """Whether a flow relays without a look (read through a call: mypy would pin it)."""
    return bool(flow.relaying)


def short_datagram(dcid: bytes, body: bytes = b"payload") -> bytes:
    return b"\x40" + dcid + body


# -- the relay ------------------------------------------------------------------------


def test_ech_flow_is_rewritten_then_relayed_both_ways(
    backend: LoopbackBackend, events: list[LogEvent]
) -> None:
    """ECH accepted: the backend reads the inner hello; later datagrams pass unchanged."""
    harness = Harness(backend)
    hello = sealed()
    client = Client()
    harness.receive(client.hello(hello.outer_message, pieces=2, shuffle=3))
    assert len(harness.reactor.readers) == 1  # one connected socket for the flow
    rewritten = backend.drain()
    assert crypto_stream(open_backend(rewritten)) == hello.inner_message
    # The backend answers from its own connection ID; the client gets it as sent.
    answer = server_datagram()
    backend.send(answer)
    time.sleep(0.05)
    harness.reactor.read_all()
    assert harness.sent.take() == [(answer, CLIENT)]
    # The client now names the backend's connection ID; short headers pass too.
    later = [server_datagram(dcid=SERVER_CID, scid=SCID), short_datagram(SERVER_CID)]
    (flow,) = harness.front.table
    harness.receive(later[:1])
    assert not relaying(flow)  # a long header: Initial packets may still come
    harness.receive(later[1:])
    assert relaying(flow)  # 1-RTT: the client has left the Initial space (RFC 9001 §4.9.1)
    assert backend.receive(2) == later
    backend.send(short_datagram(SCID, b"data" * 100))
    time.sleep(0.05)
    harness.reactor.read_all()
    assert harness.sent.take() == [(short_datagram(SCID, b"data" * 100), CLIENT)]
    assert harness.sample("echfront_quic_flows") == 1
    harness.sweep_all()
    assert harness.reactor.readers == []
    assert harness.sample("echfront_quic_flows") == 0
    labels = {"ech": "accepted", "alert": "none", "route": "app", "transport": "quic"}
    assert harness.sample("echfront_connections_total", **labels) == 1
    relayed = harness.sample(
        "echfront_relayed_bytes_total", direction="backend_to_client", transport="quic"
    )
    assert relayed == len(answer) + len(short_datagram(SCID, b"data" * 100))
    assert (
        harness.sample("echfront_connections_total", ech="accepted", alert="none", route="app")
        is None
    )
    (event,) = events
    assert (event["transport"], event["ech"], event["route"], event["close_reason"]) == (
        "quic",
        "accepted",
        "app",
        "idle timeout",
    )
    assert "server_name" not in event  # the inner name is the secret ECH keeps
    assert event["first_flight_bytes"] == 2 * 1252
    assert "transport=quic" in event["text"]


@pytest.mark.parametrize("mode", ["grease", "no-ech"])
def test_other_flows_route_by_the_outer_name_unchanged(
    backend: LoopbackBackend, mode: str, events: list[LogEvent]
) -> None:
    """GREASE or no ECH: routed by the outer SNI as over TCP, every datagram as it came."""
    outer_sni = [(0, b"\x00\x15\x00\x00\x12" + SECRET_NAME.encode())]
    if mode == "grease":
        hello = seal_hello(
            KEY.config, SPEC, outer=[*outer_sni, 0xFE0D], ech_extension=grease_extension()
        )
    else:
        hello = seal_hello(KEY.config, SPEC, outer=outer_sni)
    harness = Harness(backend)
    client = Client()
    datagrams = client.hello(hello.outer_message, pieces=2, shuffle=5)
    harness.receive(datagrams)
    assert backend.receive(2) == datagrams
    later = client.datagram(b"\x01\x00\x00")
    harness.receive([later, b"\x41" + SERVER_CID])
    assert backend.receive(2) == [later, b"\x41" + SERVER_CID]
    harness.sweep_all()
    (event,) = events
    ech = "rejected" if mode == "grease" else "not_offered"
    assert (event["route"], event["ech"], event["server_name"]) == ("app", ech, SECRET_NAME)


def test_unknown_version_gets_version_negotiation(backend: LoopbackBackend) -> None:
    harness = Harness(backend)
    datagram = (
        bytes((0xC0,)) + (0x1A2A3A4A).to_bytes(4, "big") + b"\x08" + DCID[:8] + b"\x02" + SCID
    )
    harness.receive([datagram + bytes(1200 - len(datagram)), b"\x40" + bytes(30), bytes(1199)])
    ((reply, to),) = harness.sent.take()
    header = parse_long_header(reply)
    assert (to, header.version, header.dcid, header.scid) == (CLIENT, 0, SCID, DCID[:8])
    assert harness.front.dropped == 3 and len(harness.front.table) == 0


@pytest.mark.parametrize(
    ("quic", "clients", "limit"),
    [
        (QuicSettings(max_flows=1), [CLIENT, OTHER_CLIENT], "max_flows"),
        (
            QuicSettings(max_flows_per_address=1),
            [CLIENT, ("192.0.2.7", 50124)],
            "flows_per_address",
        ),
    ],
)
def test_flow_bounds_refuse_with_connection_refused(
    backend: LoopbackBackend, quic: QuicSettings, clients: list[tuple[str, int]], limit: str
) -> None:
    """RFC 9000 §5.2.2: a connection the table will not take gets CONNECTION_REFUSED at once."""
    harness = Harness(backend, quic=quic)
    first, second = Client(), Client(dcid=bytes(range(12)), scid=b"\x77" * 4)
    harness.receive(first.hello(sealed().outer_message, pieces=1), clients[0])
    harness.receive(second.hello(sealed().outer_message, pieces=1), clients[1])
    ((refusal, to),) = harness.sent.take()
    assert to == clients[1]
    code, _frame, reason = close_frame(refusal, server=True, key_dcid=second.dcid)
    assert code == TransportErrorCode.CONNECTION_REFUSED and reason == b"connection_refused"
    assert len(harness.front.table) == 1
    assert harness.limited(limit) == 1


def test_unrouted_name_gets_the_tcp_alert_as_a_crypto_error(
    backend: LoopbackBackend, events: list[LogEvent]
) -> None:
    """The router's Reject: CRYPTO_ERROR 0x100 + unrecognized_name (RFC 9001 §4.8)."""
    harness = Harness(backend, router=StaticRouter(()))
    client = Client()
    harness.receive(client.hello(sealed().outer_message, pieces=1))
    ((refusal, _to),) = harness.sent.take()
    code, _frame, _reason = close_frame(refusal, server=True)
    assert code == crypto_error_code(AlertDescription.UNRECOGNIZED_NAME)
    assert harness.reactor.readers == [] and backend.nothing()
    (event,) = events
    assert (event["alert"], event["route"]) == ("unrecognized_name", "reject:unrecognized_name")
    labels = {"ech": "accepted", "alert": "unrecognized_name", "transport": "quic"}
    assert (
        harness.sample("echfront_connections_total", route="reject:unrecognized_name", **labels)
        == 1
    )


def public_hello() -> bytes:
    """A stale-config hello: ECH rejected, outer name the public name."""
    from echfront.ech.keyset import generate_key  # noqa: PLC0415

    stale = generate_key("public.example", config_id=0x42)
    return seal_hello(stale.config, SPEC, session_id=b"").outer_message


def test_local_target_without_quic_endpoint_is_refused(
    backend: LoopbackBackend, events: list[LogEvent]
) -> None:
    """The public name is served over TCP only: QUIC to it is refused, the client falls back."""
    harness = Harness(backend)
    harness.receive(Client().hello(public_hello(), pieces=1))
    ((refusal, _to),) = harness.sent.take()
    code, _frame, _reason = close_frame(refusal, server=True)
    assert code == TransportErrorCode.CONNECTION_REFUSED
    (event,) = events
    assert (event["route"], event["ech"], event["close_reason"]) == (
        "public",
        "rejected",
        "no QUIC endpoint for public",
    )


def test_local_target_with_quic_endpoint_is_relayed(backend: LoopbackBackend) -> None:
    """With a QUIC endpoint for the local service, a stale config goes there (as on TCP)."""
    harness = Harness(backend, local_endpoint=True)
    datagrams = Client().hello(public_hello(), pieces=2)
    harness.receive(datagrams)
    assert backend.receive(2) == datagrams and harness.sent.take() == []


def test_hpke_rate_is_shared_and_refuses_with_handshake_failure(backend: LoopbackBackend) -> None:
    harness = Harness(backend, settings=FrontSettings(hpke_rate=1.0, hpke_burst=1.0))
    harness.receive(Client().hello(sealed().outer_message, pieces=1))
    assert harness.sent.take() == []
    second = Client(dcid=bytes(range(9)))
    harness.receive(second.hello(sealed().outer_message, pieces=1), ("192.0.2.7", 50124))
    ((refusal, _to),) = harness.sent.take()
    code, _frame, _reason = close_frame(refusal, server=True, key_dcid=second.dcid)
    assert code == crypto_error_code(AlertDescription.HANDSHAKE_FAILURE)
    assert (
        harness.sample("echfront_limited_connections_total", limit="hpke_rate", transport="quic")
        == 1
    )


def test_hello_timeout_closes_silently_from_the_sweep(
    backend: LoopbackBackend, events: list[LogEvent]
) -> None:
    """Half a ClientHello: the one-second sweep closes the flow after hello_timeout."""
    harness = Harness(backend, quic=QuicSettings(hello_timeout=2.0))
    first, _second = Client().hello(sealed().outer_message, pieces=2)
    harness.receive([first])
    assert len(harness.reactor.getDelayedCalls()) == 1  # one sweep, not a timer per flow
    harness.reactor.advance(1.0)
    assert len(harness.front.table) == 1
    harness.reactor.advance(1.0)
    assert len(harness.front.table) == 0 and harness.sent.take() == []
    (event,) = events
    assert event["close_reason"] == "hello timeout"
    assert (
        harness.sample(
            "echfront_limited_connections_total", limit="hello_timeout", transport="quic"
        )
        == 1
    )
    assert harness.reactor.getDelayedCalls() == []  # no timer while the table is empty


def test_idle_timeout(backend: LoopbackBackend) -> None:
    harness = Harness(backend, quic=QuicSettings(idle_timeout=10.0))
    harness.receive(Client().hello(sealed().outer_message, pieces=1))
    backend.receive(1)
    for _ in range(9):
        harness.reactor.advance(1.0)
    harness.receive([short_datagram(SCID)])  # activity restarts the clock
    harness.reactor.advance(9.0)
    assert len(harness.front.table) == 1
    harness.reactor.advance(1.0)
    assert len(harness.front.table) == 0
    assert (
        harness.sample("echfront_limited_connections_total", limit="idle_timeout", transport="quic")
        == 1
    )


def test_backend_port_closed_refuses_a_client_in_its_handshake(backend: LoopbackBackend) -> None:
    """ICMP port unreachable on the flow's connected socket: CONNECTION_REFUSED to the client."""
    harness = Harness(backend)
    backend.sock.close()  # nothing listens there now: the kernel answers with ICMP
    harness.receive(Client().hello(sealed().outer_message, pieces=1))
    deadline = time.monotonic() + 2
    while harness.front.table and time.monotonic() < deadline:
        time.sleep(0.02)
        harness.reactor.advance(0)  # a refusal seen by send() is reported on the next turn
        harness.reactor.read_all()
    assert len(harness.front.table) == 0
    (refusal, _to), *_ = harness.sent.take()
    assert close_frame(refusal, server=True)[0] == TransportErrorCode.CONNECTION_REFUSED
    assert harness.sample("echfront_backend_failures_total", backend="app", reason="refused") == 1


def test_two_connections_from_one_address(backend: LoopbackBackend) -> None:
    """Long headers pick the flow by connection ID; short ones by the backend's connection ID."""
    harness = Harness(backend)
    one, two = Client(), Client(dcid=bytes(range(10, 20)), scid=b"\x22" * 4)
    harness.receive(one.hello(sealed().outer_message, pieces=1))
    harness.receive(two.hello(sealed().outer_message, pieces=1))
    assert len(harness.front.table) == 2 and len(harness.reactor.readers) == 2
    first, second = harness.reactor.readers
    (to_one,) = backend.receive(1)
    one_peer = backend.peer
    (to_two,) = backend.receive(1)
    two_peer = backend.peer
    assert parse_long_header(to_one).dcid == DCID and parse_long_header(to_two).dcid == two.dcid
    for peer, scid, cid in ((one_peer, SCID, b"\xaa" * 8), (two_peer, b"\x22" * 4, b"\xbb" * 8)):
        assert peer is not None
        backend.sock.sendto(server_datagram(dcid=scid, scid=cid), peer)
    time.sleep(0.05)
    harness.reactor.read_all()
    harness.sent.take()
    for_two, for_one = short_datagram(b"\xbb" * 8, b"2"), short_datagram(b"\xaa" * 8, b"1")
    harness.receive([for_two, for_one])
    got = {backend.receive(1)[0]: backend.peer for _ in range(2)}
    assert got == {for_two: two_peer, for_one: one_peer}
    assert first is not second


def test_async_router_and_reload(backend: LoopbackBackend) -> None:
    """A router's Deferred is waited for; a reload applies to new flows only."""
    pending: list[Deferred[Route]] = []

    @implementer(IRouter)
    class SlowRouter:
        def route(self, hello: ClientHelloInfo, peer: object) -> Deferred[Route]:
            pending.append(Deferred())
            return pending[-1]

    harness = Harness(backend, router=SlowRouter())
    client = Client()
    datagrams = client.hello(sealed().outer_message, pieces=2)
    harness.receive(datagrams[:1])
    harness.receive(datagrams[1:])
    assert len(pending) == 1 and backend.nothing()
    old_state = harness.front.state
    harness.front.state = QuicState(
        FrontState(ECHDecoder(KEYS), StaticRouter(()), frozenset()), {}, QuicSettings()
    )
    pending[0].callback(harness.target)
    assert crypto_stream(open_backend(backend.drain())) == sealed().inner_message
    assert next(iter(harness.front.table)).state is old_state
    # A new flow is decided with the new state: no route now.
    harness.receive(Client(dcid=bytes(9)).hello(sealed().outer_message, pieces=1), OTHER_CLIENT)
    ((_refusal, to),) = harness.sent.take()
    assert to == OTHER_CLIENT


def test_stop_closes_every_flow(backend: LoopbackBackend, events: list[LogEvent]) -> None:
    harness = Harness(backend)
    harness.receive(Client().hello(sealed().outer_message, pieces=1))
    harness.front.stopProtocol()
    assert len(harness.front.table) == 0 and harness.reactor.readers == []
    assert [e["close_reason"] for e in events] == ["shutdown"]
    assert harness.reactor.getDelayedCalls() == []


# -- the flow table -----------------------------------------------------------------


class Entry:
    def __init__(self, client: tuple[str, int], key: str, cid: bytes) -> None:
        self.client, self.key, self.cids = client, key, {cid}


def test_flow_table() -> None:
    table: FlowTable[Entry] = FlowTable()
    a, b = Entry(CLIENT, "k", DCID), Entry(CLIENT, "k", b"\x01" * 8)
    c = Entry(OTHER_CLIENT, "", b"\x02" * 8)
    for entry in (a, b, c):
        table.add(entry)
    assert (len(table), table.count("k"), table.count("")) == (3, 2, 0)
    long_a = server_datagram(dcid=DCID, scid=b"")
    assert table.find(CLIENT, long_a) is a
    assert table.find(CLIENT, server_datagram(dcid=b"\x09" * 8)) is None  # a new connection
    assert table.find(CLIENT, short_datagram(b"\x01" * 8)) is b
    assert table.find(CLIENT, short_datagram(b"\x07" * 8)) is None  # ambiguous: dropped
    assert table.find(OTHER_CLIENT, short_datagram(b"\x07" * 8)) is c  # the only one
    assert table.find(("192.0.2.99", 1), long_a) is None
    assert table.find(CLIENT, b"") is None and table.find(CLIENT, b"\xc0\x00") is None
    for n in range(20):
        table.add_cid(a, bytes((n,)) * 4)
    assert len(a.cids) == MAX_CIDS
    table.remove(a)
    table.remove(a)
    assert (len(table), table.count("k"), set(table)) == (2, 1, {b, c})
    table.remove(b)
    assert table.count("k") == 0 and table.find(CLIENT, short_datagram(b"\x01" * 8)) is None


def test_long_header_cids() -> None:
    assert long_header_cids(server_datagram(dcid=b"\x01\x02", scid=b"\x03")) == (
        b"\x01\x02",
        b"\x03",
    )
    assert long_header_cids(b"\xc0\x00\x00\x00\x01\x05\x01") is None
    assert long_header_cids(b"\xc0\x00\x00\x00\x01\x01\x01\x05\x01") is None


# -- configuration -------------------------------------------------------------------


def test_listen_quic_and_quic_table(tmp_path: Path) -> None:
    config = parse_config(
        {
            "listen_quic": ["udp:443", "udp:port=8443:interface=\\:\\:1"],
            "quic": {"idle_timeout": 30, "max_flows": 5, "max_flows_per_address": 0},
        },
        base=tmp_path,
    )
    assert config.listen_quic == ("udp:443", "udp:port=8443:interface=\\:\\:1")
    assert config.quic == QuicSettings(
        idle_timeout=30.0, max_flows=5, max_flows_per_address=0, hello_timeout=3.0
    )
    assert parse_config({}, base=tmp_path).quic == QuicSettings()
    assert udp_listen_address("udp:443:interface=127.0.0.1") == (443, "127.0.0.1")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"listen_quic": ["tcp:443"]}, "listen_quic: 'tcp:443' is not udp:PORT"),
        ({"listen_quic": ["udp:99999"]}, "port must be 1..65535"),
        ({"listen_quic": ["udp:443:interface=any"]}, "interface must be an IP address"),
        ({"listen_quic": ["udp:443:backlog=5"]}, "unknown option 'backlog'"),
        ({"quic": {"max_flows": -1}}, "quic.max_flows: must be 0 or more"),
        ({"quic": {"idle_timeout": 0}}, "quic.idle_timeout: must be greater than 0"),
        ({"quic": {"retry": True}}, "quic.retry: unknown key"),
        (
            {"backends": {"a": {"endpoint": "tcp:h:1", "quic_endpoint": "app.internal:443"}}},
            "backends.a.quic_endpoint: 'app.internal:443': the host must be an IP address",
        ),
        (
            {"backends": {"a": {"endpoint": "tcp:h:1", "quic_endpoint": "10.0.0.1"}}},
            "has no port",
        ),
    ],
)
def test_bad_quic_configuration(data: dict[str, Any], message: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        parse_config(data, base=tmp_path)


@pytest.mark.parametrize(
    ("backend", "expected"),
    [
        (BackendConfig("a", "tcp:host=10.0.0.2:port=443:timeout=5"), ("10.0.0.2", 443)),
        (BackendConfig("a", "tcp:10.0.0.2:8443"), ("10.0.0.2", 8443)),
        (BackendConfig("a", "tcp6:host=\\:\\:1:port=443"), ("::1", 443)),
        (BackendConfig("a", "tcp:host=app.internal:port=443"), None),
        (BackendConfig("a", "unix:path=/run/app.sock"), None),
        (BackendConfig("a", "tcp:10.0.0.2:443", quic_endpoint=NO_QUIC), None),
        (BackendConfig("a", "unix:path=/x", quic_endpoint="[::1]:4433"), ("::1", 4433)),
    ],
)
def test_backend_quic_endpoint_defaults_to_its_tcp_address(
    backend: BackendConfig, expected: tuple[str, int] | None
) -> None:
    target = Backend("a", endpoint=None)  # type: ignore[arg-type]
    public = Local("public", tls_factory=None)  # type: ignore[arg-type]
    state = FrontState(ECHDecoder(KEYS), StaticRouter(()), frozenset({target, public}))
    config = Config(
        backends={"a": backend},
        public=LocalConfig("public", Path("c"), None, "f", quic_endpoint="127.0.0.1:4433"),
        quic=QuicSettings(max_flows=7),
    )
    quic = build_quic_state(config, state)
    assert quic.endpoints.get(target) == expected
    assert quic.endpoints[public] == ("127.0.0.1", 4433)
    assert quic.front is state and quic.settings.max_flows == 7


def test_endpoint_helpers() -> None:
    assert quic_address("[2001:db8::1]:443") == ("2001:db8::1", 443)
    assert stream_host_port("tls:host=10.0.0.1:port=1") is None
    assert stream_host_port("tcp:10.0.0.1:notaport") is None
    with pytest.raises(ValueError, match="host must be an IP address"):
        quic_address("example.com:443")


# -- metrics ---------------------------------------------------------------------------


def test_quic_series_sit_beside_unchanged_tcp_series_in_multiprocess_mode(tmp_path: Path) -> None:
    """With --workers, the supervisor's collector merges both counters of one name."""
    script = """
import sys
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from echfront.front.connection import ConnectionRecord
from echfront.front.metrics import Metrics
metrics = Metrics()
metrics.closed(ConnectionRecord(0.0, route="app", bytes_to_client=5))
metrics.closed(ConnectionRecord(0.0, route="app", bytes_to_client=7), transport="quic")
registry = CollectorRegistry()
MultiProcessCollector(registry, path=sys.argv[1])
print(generate_latest(registry).decode())
"""
    result = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)],
        env={"PROMETHEUS_MULTIPROC_DIR": str(tmp_path), "PYTHONPATH": str(Path.cwd())},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    lines = set(result.stdout.splitlines())
    assert 'echfront_connections_total{alert="none",ech="error",route="app"} 1.0' in lines
    assert (
        'echfront_connections_total{alert="none",ech="error",route="app",transport="quic"} 1.0'
        in lines
    )
    assert (
        'echfront_relayed_bytes_total{direction="backend_to_client",transport="quic"} 7.0' in lines
    )


def test_router_returning_a_fired_deferred(backend: LoopbackBackend) -> None:
    @implementer(IRouter)
    class Immediate:
        def __init__(self, target: Backend) -> None:
            self.target = target

        def route(self, hello: ClientHelloInfo, peer: object) -> Deferred[Route]:
            return succeed(self.target)

    harness = Harness(backend)
    harness.front.state = QuicState(
        FrontState(ECHDecoder(KEYS), Immediate(harness.target), frozenset({harness.target})),
        {harness.target: backend.address},
    )
    harness.receive(Client().hello(sealed().outer_message, pieces=1))
    assert crypto_stream(open_backend(backend.drain())) == sealed().inner_message


# -- the service ------------------------------------------------------------------------


def test_service_builds_one_quic_front_per_port_and_reloads_them() -> None:
    backends = [
        {"a": BackendConfig("a", "tcp:host=127.0.0.1:port=9")},
        {"a": BackendConfig("a", "tcp:host=127.0.0.1:port=9", quic_endpoint="127.0.0.1:10")},
    ]
    configs = iter(
        Config(
            listen=(),
            listen_quic=("udp:4433:interface=127.0.0.1", "udp:4434:interface=127.0.0.1"),
            backends=entry,
            routes=(RouteConfig("x.example", "backend:a"),),
        )
        for entry in backends
    )
    service = FrontService(lambda: next(configs), FakeReactor())
    assert len(service.quic_fronts) == 2
    assert [listener.parent for listener in service.quic_listeners] == [service, service]
    assert [listener.address for listener in service.quic_listeners] == [
        ("127.0.0.1", 4433),
        ("127.0.0.1", 4434),
    ]
    assert list(service.quic_fronts[0].state.endpoints.values()) == [("127.0.0.1", 9)]
    assert service.quic_fronts[0].limits is service.factory.limits  # one HPKE budget
    assert service.reload()
    for quic in service.quic_fronts:
        assert list(quic.state.endpoints.values()) == [("127.0.0.1", 10)]
        assert quic.state.front is service.factory.state


class AdoptingReactor:
    """Records the sockets ``adoptDatagramPort`` is given (as duplicates, still open)."""

    def __init__(self) -> None:
        self.adopted: list[socket.socket] = []

    def adoptDatagramPort(self, fd: int, family: int, protocol: Any, size: int) -> object:
        self.adopted.append(socket.socket(family, socket.SOCK_DGRAM, fileno=os.dup(fd)))
        return Clock()  # anything: the listener keeps it until it stops


def test_listen_udp_binds_with_reuse_port_for_workers() -> None:
    reactor = AdoptingReactor()
    protocol: Any = object()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    listener = listen_quic(reactor, f"udp:{port}:interface=127.0.0.1", protocol, reuse_port=True)
    assert reactor.adopted == []  # bound when the service starts
    listener.privilegedStartService()
    listener.startService()
    (sock,) = reactor.adopted  # once
    assert sock.getsockname() == ("127.0.0.1", port)
    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 1
    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) > 200_000
    second = listen_quic(reactor, f"udp:{port}:interface=127.0.0.1", protocol, reuse_port=True)
    second.startService()  # every worker binds the port
    with pytest.raises(CannotListenError):
        listen_quic(reactor, f"udp:{port}:interface=127.0.0.1", protocol).startService()
    with pytest.raises(ConfigError, match="listen_quic: 'udp:x': port must be"):
        listen_quic(reactor, "udp:x", protocol)
    for adopted in reactor.adopted:
        adopted.close()


def test_flows_share_the_tcp_first_flight_accounting(backend: LoopbackBackend) -> None:
    """A flow is an unfinished first flight until its hello is whole (the saturation signal)."""
    settings = FrontSettings(max_first_flights_per_address=1)
    harness = Harness(backend, settings=settings)
    limits = harness.front.limits
    first, second = Client().hello(sealed().outer_message, pieces=2)
    harness.receive([first])
    assert limits.pending == 1
    # A second connection from the address while the first is unfinished: refused.
    other = Client(dcid=bytes(range(30, 40)))
    harness.receive(other.hello(sealed().outer_message, pieces=1), ("192.0.2.7", 50124))
    ((refusal, _to),) = harness.sent.take()
    code, _frame, _reason = close_frame(refusal, server=True, key_dcid=other.dcid)
    assert code == TransportErrorCode.CONNECTION_REFUSED
    assert harness.limited("first_flights_per_address") == 1
    harness.receive([second])
    assert limits.pending == 0  # decided: no longer a first flight
    # One abandoned after half a hello is released when the sweep drops it.
    late = Client(dcid=bytes(range(50, 60)))
    harness.receive(late.hello(sealed().outer_message, pieces=2)[:1], OTHER_CLIENT)
    assert limits.pending == 1
    harness.reactor.advance(QuicSettings().hello_timeout + 1)
    assert limits.pending == 0 and len(harness.front.table) == 1

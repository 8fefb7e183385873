# Trial's assertions are untyped, and calls through a subclass escape
# the project's untyped_calls_exclude = ["twisted"]:
# mypy: disable-error-code="no-untyped-call"
"""Prometheus metrics (echfront.front.metrics): counting, key info, the endpoint.

:meth:`Metrics.closed` is fed records of every outcome built from real
decoded hellos; then a known mix of connections goes through a real
:class:`~echfront.front.protocol.FrontFactory` in memory and every counter must
equal the mix (the in-memory form of issue 4's scrape proof), relayed
bytes included; finally :class:`MetricsResource` is rendered both with a
``DummyRequest`` and over HTTP through ``iosim``.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Metric
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.test.iosim import connectedServerAndClient
from twisted.web.test.requesthelper import DummyRequest

from echfront.ech.decoder import ClientHelloInfo, ECHDecoder, ECHStatus
from echfront.ech.keyset import KeySet, generate_key
from echfront.errors import AlertDescription
from echfront.front.connection import ConnectionRecord
from echfront.front.local import local_target
from echfront.front.metrics import Metrics, MetricsResource
from echfront.front.protocol import FrontFactory, FrontProtocol
from echfront.front.tlsoptions import load_certificate_options
from echfront.tls.hello import handshake_message
from echfront.web import QuietSite
from tests.echhello import frame, grease_extension, read_flight, seal_hello
from tests.test_front import KEY, FrontTestCase
from tests.test_local import CA, ISSUED, EchoServer, TLSClientApp, ToLocal
from tests.test_local import PUBLIC_NAME as LOCAL_NAME
from tests.twistedhelpers import (
    CLIENT_ADDRESS,
    EARLY_DATA,
    Pipe,
    RecordingServer,
    alert,
    plain_hello,
    server_hello,
)

GREASE_ID = 0xA7


def decoded(records: bytes) -> ClientHelloInfo:
    return ECHDecoder(KeySet([KEY])).decode(read_flight(records))


def accepted_info() -> ClientHelloInfo:
    return decoded(seal_hello(KEY.config).records)


def rejected_info() -> ClientHelloInfo:
    return decoded(seal_hello(KEY.config, ech_extension=grease_extension(GREASE_ID)).records)


def plain_info() -> ClientHelloInfo:
    return decoded(plain_hello())


def sample(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def series(metrics: Metrics, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """Every sample of ``name``, keyed by its sorted labels."""
    found = {}
    for family in metrics.registry.collect():
        for s in family.samples:
            if s.name == name:
                found[tuple(sorted(s.labels.items()))] = s.value
    return found


# -- Metrics.closed -------------------------------------------------------------------


def test_closed_counts_each_ech_outcome() -> None:
    metrics = Metrics()
    metrics.closed(ConnectionRecord(0.0, hello=accepted_info().summary, route="app"))
    metrics.closed(ConnectionRecord(0.0, hello=accepted_info().summary, route="app"))
    metrics.closed(ConnectionRecord(0.0, hello=rejected_info().summary, route="public"))
    metrics.closed(ConnectionRecord(0.0, hello=plain_info().summary, route="public"))
    metrics.closed(
        ConnectionRecord(
            0.0, hello=plain_info().summary, route="", alert=AlertDescription.UNRECOGNIZED_NAME
        )
    )
    metrics.closed(ConnectionRecord(0.0, alert=AlertDescription.DECODE_ERROR))
    metrics.closed(ConnectionRecord(0.0))  # timed out before its ClientHello

    assert series(metrics, "echfront_connections_total") == {
        (("alert", "none"), ("ech", "accepted"), ("route", "app")): 2.0,
        (("alert", "none"), ("ech", "rejected"), ("route", "public")): 1.0,
        (("alert", "none"), ("ech", "not_offered"), ("route", "public")): 1.0,
        (("alert", "unrecognized_name"), ("ech", "not_offered"), ("route", "none")): 1.0,
        (("alert", "decode_error"), ("ech", "error"), ("route", "none")): 1.0,
        (("alert", "none"), ("ech", "error"), ("route", "none")): 1.0,
    }
    # Only hellos that offered ECH are counted by config_id.
    assert series(metrics, "echfront_ech_config_total") == {
        (("config_id", str(KEY.config_id)), ("ech", "accepted")): 2.0,
        (("config_id", str(GREASE_ID)), ("ech", "rejected")): 1.0,
    }
    assert series(metrics, "echfront_relayed_bytes_total") == {}
    assert series(metrics, "echfront_limited_connections_total") == {}


def test_closed_counts_relayed_bytes_each_way() -> None:
    metrics = Metrics()
    metrics.closed(
        ConnectionRecord(0.0, hello=plain_info().summary, bytes_from_client=100, bytes_to_client=7)
    )
    metrics.closed(ConnectionRecord(0.0, hello=plain_info().summary, bytes_to_client=50))
    metrics.closed(ConnectionRecord(0.0, hello=plain_info().summary, first_flight_bytes=512))
    assert sample(metrics, "echfront_relayed_bytes_total", direction="client_to_backend") == 100
    assert sample(metrics, "echfront_relayed_bytes_total", direction="backend_to_client") == 57


def test_closed_counts_the_limit_that_closed_it() -> None:
    metrics = Metrics()
    for limit in ("idle_timeout", "idle_timeout", "hpke_rate", "first_flight_timeout", ""):
        metrics.closed(ConnectionRecord(0.0, limit=limit))
    assert series(metrics, "echfront_limited_connections_total") == {
        (("limit", "idle_timeout"),): 2.0,
        (("limit", "hpke_rate"),): 1.0,
        (("limit", "first_flight_timeout"),): 1.0,
    }


def test_each_front_has_its_own_registry() -> None:
    first, second = Metrics(), Metrics()
    first.closed(ConnectionRecord(0.0))
    assert sample(first, "echfront_connections_total", ech="error", alert="none", route="none")
    assert (
        sample(second, "echfront_connections_total", ech="error", alert="none", route="none")
        is None
    )
    shared = CollectorRegistry()
    assert Metrics(shared).registry is shared


def test_names_follow_prometheus_conventions() -> None:
    metrics = Metrics()
    metrics.closed(
        ConnectionRecord(0.0, hello=accepted_info().summary, bytes_from_client=1, limit="x")
    )
    metrics.set_keys(KeySet([KEY]))
    families = {f.name: f.type for f in metrics.registry.collect()}
    for name, kind in families.items():
        assert name.startswith("echfront_"), name
        samples = _family(metrics, name).samples
        if kind == "counter" and samples:
            # prometheus_client strips _total from a counter family's name.
            assert {s.name for s in samples} <= {f"{name}_total", f"{name}_created"}, name
    assert families["echfront_active_connections"] == "gauge"
    assert families["echfront_first_flight_seconds"] == "histogram"
    assert families["echfront_first_flight_bytes"] == "histogram"
    assert families["echfront_ech_decrypt_seconds"] == "histogram"
    assert families["echfront_backend_connect_seconds"] == "histogram"
    assert families["echfront_ech_key_info"] == "gauge"


def _family(metrics: Metrics, name: str) -> Metric:
    return next(f for f in metrics.registry.collect() if f.name == name)


# -- key info --------------------------------------------------------------------------


def test_set_keys_describes_every_config() -> None:
    current = generate_key("public.example", config_id=1)
    previous = generate_key("public.example", config_id=2).with_role(published=False)
    other = generate_key("other.example", config_id=3)
    metrics = Metrics()
    metrics.set_keys(KeySet([current, previous, other]))
    assert series(metrics, "echfront_ech_key_info") == {
        (
            ("config_id", "1"),
            ("kem", "DHKEM(X25519)"),
            ("public_name", "public.example"),
            ("published", "true"),
        ): 1.0,
        (
            ("config_id", "2"),
            ("kem", "DHKEM(X25519)"),
            ("public_name", "public.example"),
            ("published", "false"),
        ): 1.0,
        (
            ("config_id", "3"),
            ("kem", "DHKEM(X25519)"),
            ("public_name", "other.example"),
            ("published", "true"),
        ): 1.0,
    }


def test_set_keys_retires_configs_that_left_service() -> None:
    # Retired configs drop to 0 (multiprocess mode cannot remove a series);
    # the configs in service are exactly those at 1.
    metrics = Metrics()
    metrics.set_keys(KeySet([generate_key("public.example", config_id=1)]))
    metrics.set_keys(KeySet([generate_key("public.example", config_id=9)]))
    values = {dict(k)["config_id"]: v for k, v in series(metrics, "echfront_ech_key_info").items()}
    assert values == {"1": 0.0, "9": 1.0}
    metrics.set_keys(KeySet())
    values = {dict(k)["config_id"]: v for k, v in series(metrics, "echfront_ech_key_info").items()}
    assert values == {"1": 0.0, "9": 0.0}


def test_set_keys_role_change_is_a_new_series() -> None:
    key = generate_key("public.example", config_id=4)
    metrics = Metrics()
    metrics.set_keys(KeySet([key]))
    metrics.set_keys(KeySet([key.with_role(published=False)]))
    values = {dict(k)["published"]: v for k, v in series(metrics, "echfront_ech_key_info").items()}
    assert values == {"true": 0.0, "false": 1.0}


# -- the resource -------------------------------------------------------------------------


def test_resource_renders_the_text_format() -> None:
    metrics = Metrics()
    metrics.closed(
        ConnectionRecord(0.0, hello=accepted_info().summary, route="app", bytes_to_client=9)
    )
    metrics.set_keys(KeySet([KEY]))
    request = DummyRequest([b"metrics"])
    body = MetricsResource(metrics.registry).render(request)
    assert isinstance(body, bytes)
    assert request.responseHeaders.getRawHeaders(b"content-type") == [CONTENT_TYPE_LATEST.encode()]
    assert CONTENT_TYPE_LATEST.startswith("text/plain; version=")
    text = body.decode()
    assert "# TYPE echfront_connections_total counter" in text
    assert 'echfront_connections_total{alert="none",ech="accepted",route="app"} 1.0' in text
    assert 'echfront_relayed_bytes_total{direction="backend_to_client"} 9.0' in text
    parsed = {
        s.name: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if not s.labels
    }
    assert parsed["echfront_active_connections"] == 0


def test_resource_serves_any_path() -> None:
    registry = CollectorRegistry()
    resource = MetricsResource(registry)
    assert resource.isLeaf
    for path in ([b""], [b"metrics"], [b"a", b"b"]):
        request = DummyRequest(path)
        assert resource.render(request) == b""  # an empty registry renders nothing


class _HTTPClient(Protocol):
    def __init__(self) -> None:
        self.data = b""

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")

    def dataReceived(self, data: bytes) -> None:
        self.data += data


def test_resource_over_http() -> None:
    metrics = Metrics()
    metrics.closed(ConnectionRecord(0.0, limit="hpke_rate"))
    site = QuietSite(MetricsResource(metrics.registry))
    client, _server, pump = connectedServerAndClient(
        lambda: site.buildProtocol(None), _HTTPClient, greet=True
    )
    pump.flush()
    head, _, body = client.data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert f"Content-Type: {CONTENT_TYPE_LATEST}".encode() in head.split(b"\r\n")
    assert b'echfront_limited_connections_total{limit="hpke_rate"} 1.0' in body


# -- through the front: a known mix --------------------------------------------------------


class MixTests(FrontTestCase):
    """Every counter equals a known mix of connections through a FrontFactory."""

    def setUp(self) -> None:
        super().setUp()
        self.factory: FrontFactory = self.make_factory(self.to_backend())
        self.metrics = self.factory.metrics

    def hello(self, records: bytes) -> tuple[Pipe, RecordingServer]:
        front = self.factory.buildProtocol(CLIENT_ADDRESS)
        assert front is not None
        client = RecordingServer()
        pipe = self.net.connect(client, front)
        pipe.client.write(records)
        self.net.flush()
        return pipe, client

    def test_counters_equal_the_mix(self) -> None:
        accepted = [seal_hello(KEY.config).records for _ in range(3)]
        rejected = [
            seal_hello(KEY.config, ech_extension=grease_extension(GREASE_ID)).records
            for _ in range(2)
        ]
        plain = [plain_hello() for _ in range(4)]
        # A complete ClientHello message whose body is malformed.
        malformed = frame(handshake_message(1, b"\x03\x03" + bytes(10)))
        sizes = []
        pipes = []
        for records in [*accepted, *rejected, *plain]:
            pipe, client = self.hello(records)
            self.net.complete_backend(self.clock)
            self.net.flush()
            backend = self.backends.built[-1]
            backend.send(server_hello())
            pipe.client.write(EARLY_DATA)
            self.net.flush()
            sizes.append(len(records))
            pipes.append((pipe, client))
        _bad_pipe, bad_client = self.hello(malformed)
        self.assertEqual(bytes(bad_client.data), alert(50))
        self.assertEqual(
            sample(self.metrics, "echfront_active_connections"), len(pipes)
        )  # the refused one is closed already
        for pipe, _client in pipes:
            pipe.client.loseConnection()
        self.net.flush()
        self.assertEqual(self.factory.open_connections, 0)

        self.assertEqual(
            series(self.metrics, "echfront_connections_total"),
            {
                (("alert", "none"), ("ech", "accepted"), ("route", "be")): 3.0,
                (("alert", "none"), ("ech", "rejected"), ("route", "be")): 2.0,
                (("alert", "none"), ("ech", "not_offered"), ("route", "be")): 4.0,
                (("alert", "decode_error"), ("ech", "error"), ("route", "none")): 1.0,
            },
        )
        self.assertEqual(
            series(self.metrics, "echfront_ech_config_total"),
            {
                (("config_id", str(KEY.config_id)), ("ech", "accepted")): 3.0,
                (("config_id", str(GREASE_ID)), ("ech", "rejected")): 2.0,
            },
        )
        self.assertEqual(sample(self.metrics, "echfront_active_connections"), 0)
        hello_bytes = len(server_hello())
        self.assertEqual(
            sample(self.metrics, "echfront_relayed_bytes_total", direction="client_to_backend"),
            9 * len(EARLY_DATA),
        )
        self.assertEqual(
            sample(self.metrics, "echfront_relayed_bytes_total", direction="backend_to_client"),
            9 * hello_bytes,
        )
        # The malformed hello is a complete flight: it is measured too.
        self.assertEqual(sample(self.metrics, "echfront_first_flight_bytes_count"), len(sizes) + 1)
        self.assertEqual(
            sample(self.metrics, "echfront_first_flight_bytes_sum"), sum(sizes) + len(malformed)
        )
        self.assertEqual(sample(self.metrics, "echfront_first_flight_seconds_count"), 10)
        # HPKE was attempted for the hellos naming a config_id.
        self.assertEqual(sample(self.metrics, "echfront_ech_decrypt_seconds_count"), 5)
        self.assertEqual(
            sample(self.metrics, "echfront_backend_connect_seconds_count", backend="be"), 9
        )
        self.assertEqual(sample(self.metrics, "echfront_hello_retry_requests_total"), 0)

    def test_hello_retry_and_backend_failures_are_counted(self) -> None:
        sealed = seal_hello(KEY.config)
        pipe, _client = self.hello(sealed.records)
        self.net.complete_backend(self.clock)
        self.net.flush()
        self.backends.built[-1].send(server_hello(retry=True))
        self.net.flush()
        self.assertEqual(sample(self.metrics, "echfront_hello_retry_requests_total"), 1)
        pipe.client.loseConnection()
        self.net.flush()

        _pipe, client = self.hello(plain_hello())
        self.clock.advance(5)  # the test backend's connect_timeout
        self.net.flush()
        self.assertEqual(bytes(client.data), alert(80))
        self.assertEqual(
            sample(self.metrics, "echfront_backend_failures_total", backend="be", reason="timeout"),
            1,
        )
        self.assertEqual(
            sample(
                self.metrics,
                "echfront_connections_total",
                ech="not_offered",
                alert="internal_error",
                route="be",
            ),
            1,
        )


# -- what the byte counters count ------------------------------------------------------------


class ByteCountTests(FrontTestCase):
    """bytes_from_client / bytes_to_client: what the client sent after its first
    flight (first_flight_bytes counts that) and everything it was sent, for a
    relayed connection as for a locally terminated one."""

    def assert_counts(self, front: FrontProtocol, pipe: Pipe) -> None:
        record = front.record
        self.assertGreater(record.first_flight_bytes, 0)
        self.assertEqual(
            record.bytes_from_client, len(pipe.server.received) - record.first_flight_bytes
        )
        self.assertEqual(record.bytes_to_client, len(pipe.server.sent))

    def test_relayed_plain_connection(self) -> None:
        factory = self.make_factory(self.to_backend())
        front = factory.buildProtocol(CLIENT_ADDRESS)
        assert front is not None
        pipe = self.net.connect(RecordingServer(), front)
        pipe.client.write(plain_hello() + EARLY_DATA[:3])
        self.net.flush()
        self.net.complete_backend(self.clock)
        self.net.flush()
        backend = self.backends.built[-1]
        pipe.client.write(EARLY_DATA[3:])
        backend.send(server_hello() + b"\x17\x03\x03\x00\x02ok")
        self.net.flush()
        self.assertEqual(front.record.bytes_from_client, len(EARLY_DATA))
        self.assert_counts(front, pipe)

    def test_relayed_ech_connection_with_hello_retry(self) -> None:
        factory = self.make_factory(self.to_backend())
        front = factory.buildProtocol(CLIENT_ADDRESS)
        assert front is not None
        pipe = self.net.connect(RecordingServer(), front)
        sealed = seal_hello(KEY.config)
        pipe.client.write(sealed.records + EARLY_DATA)
        self.net.flush()
        self.net.complete_backend(self.clock)
        self.net.flush()
        backend = self.backends.built[-1]
        backend.send(server_hello(retry=True))
        self.net.flush()
        pipe.client.write(sealed.second().records)
        self.net.flush()
        backend.send(server_hello())
        pipe.client.write(b"\x17\x03\x03\x00\x01z")
        self.net.flush()
        self.assertTrue(front.record.hello_retry)
        self.assertEqual(front.record.first_flight_bytes, len(sealed.records))
        self.assert_counts(front, pipe)

    def test_locally_terminated_connection(self) -> None:
        options = load_certificate_options(ISSUED.chain, ISSUED.key)
        target = local_target("local", options, Factory.forProtocol(EchoServer), self.clock)
        factory = self.make_factory(ToLocal(target), targets=frozenset({target}))
        client_factory = TLSMemoryBIOFactory(
            optionsForClientTLS(
                LOCAL_NAME, trustRoot=Certificate.loadPEM(CA.cert_path.read_bytes())
            ),
            True,
            Factory.forProtocol(TLSClientApp),
            clock=self.clock,
        )
        front = factory.buildProtocol(CLIENT_ADDRESS)
        assert front is not None
        pipe = self.net.connect(client_factory.buildProtocol(CLIENT_ADDRESS), front)
        self.net.flush()
        assert front.record.hello is not None
        self.assertIs(front.record.hello.status, ECHStatus.NOT_OFFERED)
        self.assertGreater(len(pipe.server.sent), 0)
        self.assert_counts(front, pipe)

# -*- test-case-name: tests.test_metrics -*-
"""Prometheus metrics, served on their own endpoint (``--metrics ENDPOINT``).

Names follow Prometheus conventions: ``echfront_`` prefix, ``_total`` for
counters, base units (bytes, seconds).  Label values come only from the
configuration (route and backend names), from small fixed sets (ECH outcome,
alert name, direction) or from config_id (at most 256 values), so no client
can inflate the number of series.  Server names are never labels.

Every front owns its own registry; with ``--workers`` each worker writes
into a shared multiprocess directory and the supervising process serves the
sum (prometheus_client's multiprocess mode).

QUIC flows (:mod:`echfront.front.datagram`) are counted in the same
outcome, route, byte and limit families as TCP connections, with one more
label, ``transport="quic"``.  TCP series keep exactly the labels they had
(no ``transport`` label, which PromQL reads as ``transport=""``), so
existing queries and dashboards see the same series, and a sum by route
covers both transports.  Each such family is two counters of one name
(:class:`_ByTransport`), merged into one family when collected; in
multiprocess mode the supervisor's collector merges them by name the same way.

Counting costs a few attribute operations: the metric classes are those of
:mod:`echfront.front.fastmetrics`, which keep plain numbers and bucket
arrays and turn them into samples only when the registry is collected (a
scrape), with prometheus_client's names, types, labels and samples.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client import Counter as PrometheusCounter
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from twisted.web.resource import Resource

from echfront.errors import alert_name
from echfront.front.fastmetrics import MIRRORS, Counter, Gauge, Histogram

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorTime
    from twisted.web.server import Request

    from echfront.ech.keyset import KeySet
    from echfront.errors import AlertDescription
    from echfront.front.connection import ConnectionRecord

__all__ = ["TRANSPORTS", "FleetMetrics", "Metrics", "MetricsResource", "key_publications_counter"]

#: The transports a connection is counted under; "tcp" series carry no label.
TRANSPORTS = ("tcp", "quic")

_BYTES_BUCKETS = (256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536)
_FAST_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)
_SLOW_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class _ByTransport(Collector):
    """One counter family: TCP series with ``labels``, QUIC series with ``transport`` too.

    :ivar tcp: the counter TCP connections use, with the family's original
        labels (``.labels(...)`` works as it always did).
    :ivar quic: the counter QUIC flows use: the same labels then ``transport``.
    """

    def __init__(
        self, name: str, documentation: str, labels: Sequence[str], registry: CollectorRegistry
    ) -> None:
        # Neither counter is registered on its own: a registry refuses two
        # collectors of one name, so this collector stands for both.
        self.tcp = Counter(name, documentation, labels, registry=None)
        self.quic = Counter(name, documentation, (*labels, "transport"), registry=None)
        registry.register(self)

    def child(self, transport: str, *labels: str) -> Counter:
        """The series of ``labels`` for ``transport`` ("tcp" or "quic")."""
        if transport == "tcp":
            return self.tcp.labels(*labels) if labels else self.tcp
        return self.quic.labels(*labels, transport)

    def describe(self) -> Iterable[Metric]:
        """The family's name, so the registry can refuse a second one."""
        return self.tcp.describe()

    def collect(self) -> Iterable[Metric]:
        """Both counters' samples in one family."""
        (family,) = self.tcp.collect()
        for other in self.quic.collect():
            family.samples.extend(other.samples)
        return [family]


class Metrics:
    """The front's metrics; one instance per front (per worker).

    ``connections``, ``ech_configs``, ``relayed_bytes``, ``limited`` and
    ``hello_retry_requests`` are the TCP counters, labelled as they always
    were; QUIC flows count into the same families through :meth:`closed`,
    :meth:`limit` and :meth:`hello_retry` with ``transport="quic"``.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        """Register every metric in ``registry`` (a new one by default)."""
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self._connections = _ByTransport(
            "echfront_connections_total",
            "Closed connections by ECH outcome (accepted, rejected, not_offered, or error "
            "before decoding), alert sent by the front (none if it sent none), and route; "
            'QUIC flows with transport="quic".',
            ("ech", "alert", "route"),
            r,
        )
        self.connections = self._connections.tcp
        self._ech_configs = _ByTransport(
            "echfront_ech_config_total",
            "ClientHellos offering ECH, by the config_id they named and the outcome.",
            ("config_id", "ech"),
            r,
        )
        self.ech_configs = self._ech_configs.tcp
        self.active = Gauge(
            "echfront_active_connections",
            "Client connections currently open.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.first_flight_bytes = Histogram(
            "echfront_first_flight_bytes",
            "Size of the records carrying the first ClientHello.",
            buckets=_BYTES_BUCKETS,
            registry=r,
        )
        self.first_flight_seconds = Histogram(
            "echfront_first_flight_seconds",
            "Time from accept to a complete first ClientHello.",
            buckets=_SLOW_BUCKETS,
            registry=r,
        )
        self.decode_seconds = Histogram(
            "echfront_ech_decrypt_seconds",
            "Time to decode an ECH ClientHelloOuter (parse, HPKE, rebuild).",
            buckets=_FAST_BUCKETS,
            registry=r,
        )
        self.connect_seconds = Histogram(
            "echfront_backend_connect_seconds",
            "Time to connect to a backend.",
            ("backend",),
            buckets=_SLOW_BUCKETS,
            registry=r,
        )
        self.backend_failures = Counter(
            "echfront_backend_failures_total",
            "Backend connections that failed (refused, timeout, other).",
            ("backend", "reason"),
            registry=r,
        )
        self._relayed_bytes = _ByTransport(
            "echfront_relayed_bytes_total",
            "Bytes between clients and their target (a backend, or a local service) "
            "after the first flight; for QUIC, datagram payloads relayed.",
            ("direction",),
            r,
        )
        self.relayed_bytes = self._relayed_bytes.tcp
        self._hello_retry_requests = _ByTransport(
            "echfront_hello_retry_requests_total",
            "HelloRetryRequests seen from backends on ECH-accepted connections.",
            (),
            r,
        )
        self.hello_retry_requests = self._hello_retry_requests.tcp
        self._limited = _ByTransport(
            "echfront_limited_connections_total",
            "Connections closed by a limit (max_connections, per-address first "
            "flights, HPKE rate, idle timeout, first-flight or handshake timeout; "
            "for QUIC max_flows, flows_per_address, hello_timeout).",
            ("limit",),
            r,
        )
        self.limited = self._limited.tcp
        self.client_alerts = Counter(
            "echfront_client_alerts_total",
            "TLS alerts received from clients on connections the front terminates (the "
            "public name, local names), by alert; close_notify is not counted. "
            "ech_required: clients that wanted ECH and saw it rejected (RFC 9849 §7.1).",
            ("alert",),
            registry=r,
        )
        self.quic_flows = Gauge(
            "echfront_quic_flows",
            "QUIC flows in the front's flow table.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.reloads = Counter(
            "echfront_reloads_total",
            "Configuration reloads by result.",
            ("result",),
            registry=r,
        )
        self.key_publications = key_publications_counter(r)
        #: The series a closed connection counts in, by its facts (see closed()).
        self._closed_series: dict[
            tuple[str, str, AlertDescription | None, str, int | None],
            tuple[Counter, Counter | None],
        ] = {}
        self._relayed_series: dict[str, tuple[Counter, Counter]] = {}
        self._key_labels: set[tuple[str, str, str, str]] = set()
        self.key_info = Gauge(
            "echfront_ech_key_info",
            "ECH configs in service (1) or retired since start (0), by config_id, KEM and role.",
            ("config_id", "kem", "public_name", "published"),
            registry=r,
            # Only live workers count: a dead worker's keys are not in service.
            multiprocess_mode="livemax",
        )

    def bind(self, clock: IReactorTime) -> None:
        """Copy values for the ``--workers`` supervisor on ``clock``'s timer.

        Only in multiprocess mode does anything need copying (see
        :mod:`echfront.front.fastmetrics`); elsewhere this changes nothing.
        """
        MIRRORS.bind(clock)

    def set_keys(self, keys: KeySet) -> None:
        """Describe the key set in service (after start and every reload).

        Configs that left service drop to 0 rather than being removed:
        multiprocess mode (``--workers``) cannot remove series.
        """
        current = {
            (
                str(key.config_id),
                key.config.kem_name,
                key.config.public_name,
                "true" if key.published else "false",
            )
            for key in keys.keys
        }
        for labels in self._key_labels - current:
            self.key_info.labels(*labels).set(0)
        for labels in current:
            self.key_info.labels(*labels).set(1)
        self._key_labels = current

    def closed(self, record: ConnectionRecord, *, transport: str = "tcp") -> None:
        """Count a finished connection (or QUIC flow, ``transport="quic"``).

        Every connection lands in a few series of a small, fixed set (the
        outcomes, alerts, configured routes and key ids), so each series is
        looked up by the connection's facts once and kept.
        """
        info = record.hello
        ech = record.ech
        config_id = None if info is None else info.config_id
        key = (transport, ech, record.alert, record.route, config_id)
        series = self._closed_series.get(key)
        if series is None:
            series = self._closed_series[key] = self._series_for(key)
        connections, ech_config = series
        connections.inc()
        if ech_config is not None:
            ech_config.inc()
        if record.bytes_from_client or record.bytes_to_client:
            relayed = self._relayed_series.get(transport)
            if relayed is None:
                relayed = self._relayed_series[transport] = (
                    self._relayed_bytes.child(transport, "client_to_backend"),
                    self._relayed_bytes.child(transport, "backend_to_client"),
                )
            from_client, to_client = relayed
            from_client.inc(record.bytes_from_client)
            to_client.inc(record.bytes_to_client)
        if record.limit:
            self.limit(record.limit, transport=transport)

    def _series_for(
        self, key: tuple[str, str, AlertDescription | None, str, int | None]
    ) -> tuple[Counter, Counter | None]:
        transport, ech, alert, route, config_id = key
        alert_label = "none" if alert is None else alert_name(alert)
        connections = self._connections.child(transport, ech, alert_label, route or "none")
        if config_id is None:
            return connections, None
        return connections, self._ech_configs.child(transport, str(config_id), ech)

    def limit(self, name: str, *, transport: str = "tcp") -> None:
        """Count a connection (or flow) refused or closed by the limit ``name``."""
        self._limited.child(transport, name).inc()

    def hello_retry(self, *, transport: str = "tcp") -> None:
        """Count a HelloRetryRequest on an ECH-accepted connection."""
        self._hello_retry_requests.child(transport).inc()

    def client_alert(self, description: int) -> None:
        """Count an alert a client sent on a locally terminated connection (RFC 9849 §7.1)."""
        self.client_alerts.labels(alert_name(description)).inc()


def key_publications_counter(registry: CollectorRegistry) -> PrometheusCounter:
    """``echfront_key_publications_total``: the rotation schedule's publications.

    Rotation runs in one process per deployment (the supervisor with
    ``--workers``), so this counter is registered where that process
    serves its metrics.  A few events a day: prometheus_client's own counter.
    """
    return PrometheusCounter(
        "echfront_key_publications_total",
        "Publications of new ECH keys to DNS (with verification), by result.",
        ("result",),
        registry=registry,
    )


class FleetMetrics:
    """A fleet member's view of the fleet (``[keys] store = "etcd"``; docs/operations.rst).

    Registered only by fronts in a fleet.  Every front exports them, so a
    dashboard sees the fleet from any front; ``echfront_fleet_leader`` is 1
    on exactly one front while the fleet has a leader.
    """

    def __init__(self, registry: CollectorRegistry, phases: Sequence[str]) -> None:
        """Register the fleet gauges; ``phases`` are the rotation phases' names."""
        r = registry
        self.phases = tuple(phases)
        self.members = Gauge(
            "echfront_fleet_members",
            "Live members of the fleet (fronts registered in the key store), as last seen.",
            registry=r,
        )
        self.store_up = Gauge(
            "echfront_fleet_store_up",
            "1 while this front follows the key store; 0 while it cannot reach it "
            "(it serves its last key set; the rotation pauses).",
            registry=r,
        )
        self.leader = Gauge(
            "echfront_fleet_leader",
            "1 on the front that leads the fleet's key rotation, else 0.",
            registry=r,
        )
        self.phase = Gauge(
            "echfront_fleet_rotation_phase",
            "The rotation phase the leader last recorded (1), the others 0.",
            ("phase",),
            registry=r,
        )
        self.since_rotation = Gauge(
            "echfront_fleet_seconds_since_rotation",
            "Seconds since new keys last became active in the fleet.",
            registry=r,
        )
        self.barrier_wait = Gauge(
            "echfront_fleet_barrier_wait_seconds",
            "How long the rotation waits at a barrier (load: every member loaded the "
            "pending keys; dns: every authoritative server shows them): the current "
            "wait, else the last one.",
            ("barrier",),
            registry=r,
        )

    def update(
        self,
        *,
        members: int,
        store_up: bool,
        leader: bool,
        phase: str | None,
        since_rotation: float | None,
        load_wait: float | None,
        dns_wait: float | None,
    ) -> None:
        """Set every gauge (after each look at the store)."""
        self.members.set(members)
        self.store_up.set(1 if store_up else 0)
        self.leader.set(1 if leader else 0)
        for name in self.phases:
            self.phase.labels(name).set(1 if name == phase else 0)
        if since_rotation is not None:
            self.since_rotation.set(since_rotation)
        if load_wait is not None:
            self.barrier_wait.labels("load").set(load_wait)
        if dns_wait is not None:
            self.barrier_wait.labels("dns").set(dns_wait)


class MetricsResource(Resource):
    """``GET /metrics`` (any path): the text exposition format."""

    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        """Serve ``registry``."""
        super().__init__()  # type: ignore[no-untyped-call]
        self._registry = registry

    def render_GET(self, request: Request) -> bytes:
        """Render every metric of the registry."""
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode())
        return generate_latest(self._registry)

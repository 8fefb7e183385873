# -*- test-case-name: tests.test_config -*-
"""The configuration's schema: TOML (and command-line flags) to frozen, validated values.

:func:`parse_config` checks a document's shape and values, every table
including ``[publish]``, and returns a frozen :class:`Config`; it reads no
file and makes no socket, so a bad value is reported before anything is
built.  Every problem is one :class:`~echfront.errors.ConfigError` line
naming the key.  :mod:`echfront.config.build` then turns a :class:`Config`
into running objects.

Why this module is long: it is the whole schema, thirteen tables, in one
reader, so that every key is checked the same way (one ``_Section`` per
table, unknown keys refused) and in one pass; ``[publish]`` used to have a
second validator of its own, and splitting the tables over modules would
invite that again.

Defaults of the ``[limits]``, ``[log]`` and ``[relay]`` settings are read
from :class:`~echfront.front.state.FrontSettings`, the one place they are
written; those of ``[quic]`` from
:class:`~echfront.quic.admission.QuicSettings`.  The reference for every key
is docs/configuration.rst (the ``_Section(...)`` calls below list the known
keys; tests.test_docs reads them).
"""

from __future__ import annotations

import ipaddress
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import dns.exception
import dns.name

from echfront.config.endpoints import check_listen, quic_address, udp_listen_address
from echfront.dns.rfc2136 import DEFAULT_TTL, TSIG_ALGORITHMS
from echfront.dns.svcb import validate_alpn_id
from echfront.dns.verify import DEFAULT_TIMEOUT, DNSServer, absolute_name
from echfront.ech.echconfig import option_names, validate_public_name
from echfront.ech.padding import derive_maximum_name_length
from echfront.errors import AlertDescription, ConfigError
from echfront.front.state import FrontSettings
from echfront.keys.etcdapi import EtcdSettings
from echfront.keys.rotation import RotationPolicy, parse_duration
from echfront.keys.stores import check_member_name
from echfront.quic.admission import QuicSettings
from echfront.routing import validate_pattern

__all__ = [
    "ALERTS",
    "DEFAULT_LISTEN",
    "DEFAULT_PUBLIC_FACTORY",
    "ENGINES",
    "NO_QUIC",
    "BackendConfig",
    "Config",
    "ExitConfig",
    "FleetConfig",
    "KeyFileConfig",
    "LocalConfig",
    "PublishConfig",
    "RouteConfig",
    "load_config_file",
    "parse_config",
    "parse_publish",
]

DEFAULT_LISTEN = "tcp:443"
_Network = ipaddress.IPv4Network | ipaddress.IPv6Network
DEFAULT_PUBLIC_FACTORY = "echfront.web:public_service"
#: ``reject:NAME`` targets: the alerts the front sends, by name.
ALERTS = {a.name.lower(): a for a in AlertDescription}


@dataclass(frozen=True)
class KeyFileConfig:
    """One RFC 9934 key file and its role."""

    path: Path
    published: bool = True


#: ``quic_endpoint`` value: no QUIC for this target.
NO_QUIC = "none"


@dataclass(frozen=True)
class BackendConfig:
    """A backend reached through a client endpoint string.

    :ivar quic_endpoint: ``IP:PORT`` of its QUIC server, :data:`NO_QUIC`, or
        None for the default: the host and port of a ``tcp:`` endpoint whose
        host is an IP address (else no QUIC).
    """

    name: str
    endpoint: str
    connect_timeout: float = 10.0
    proxy_protocol: int = 0
    quic_endpoint: str | None = None


@dataclass(frozen=True)
class LocalConfig:
    """A locally terminated service: certificate plus application factory.

    :ivar quic_endpoint: ``IP:PORT`` of a QUIC server for the same names;
        the front terminates TLS over TCP only, so without one QUIC for
        them is refused (the client falls back to TCP).
    """

    name: str
    cert: Path
    key: Path | None
    factory: str
    alpn: tuple[str, ...] = ()
    options: Mapping[str, Any] = field(default_factory=dict)
    quic_endpoint: str | None = None


@dataclass(frozen=True)
class ExitConfig:
    """``[exit]``: take relayed ClientHelloInners from fronts over mutual TLS.

    Every listener wraps its connections in TLS with ``cert``/``key`` and
    requires a client certificate issued by ``client_ca``; on such a
    connection a ClientHello carrying the inner ECH extension counts as ECH
    accepted (the front decrypted it; RFC 9849 §10.10.6).
    """

    cert: Path
    key: Path | None
    client_ca: Path


@dataclass(frozen=True)
class RouteConfig:
    """One routing rule: a name pattern to a target."""

    name: str
    target: str  # "backend:NAME", "local:NAME", "public" or "reject:ALERT"
    alpn: tuple[str, ...] | None = None
    require_ech: bool = False


@dataclass(frozen=True)
class PublishConfig:
    """``[publish]``: how rotation puts new configs into DNS, and checks them.

    Paths are absolute (relative ones were taken relative to the
    configuration file).  With ``method = "none"`` only :attr:`names` is
    kept: the other keys were checked for being known, not for their
    values, so publication can be switched off without deleting them.
    """

    method: str = "none"
    names: tuple[str, ...] = ()
    server: DNSServer | None = None
    zone: str | None = None
    tsig_key_name: str | None = None
    tsig_algorithm: str | None = None
    tsig_secret_file: Path | None = None
    ttl: int = DEFAULT_TTL
    command: tuple[str, ...] = ()
    timeout: float = DEFAULT_TIMEOUT
    verify_servers: tuple[DNSServer, ...] = ()
    doh: str | None = None


@dataclass(frozen=True)
class FleetConfig:
    """``[keys] store = "etcd"`` and ``[keys.etcd]``: a fleet sharing its keys in etcd.

    Files are only named here (absolute paths); they are read when the
    store is built (:mod:`echfront.app.fleet`).  See docs/configuration.rst.

    :ivar etcd: how to reach the cluster (the password is read later from
        :attr:`password_file`, so it is None here).
    :ivar member: this front's name in the fleet; None: the host name.
    """

    etcd: EtcdSettings
    kek_file: Path
    previous_kek_files: tuple[Path, ...] = ()
    password_file: Path | None = None
    member: str | None = None
    member_ttl: float = 15.0


@dataclass(frozen=True)
class Config:
    """A validated configuration (see docs/configuration.rst)."""

    listen: tuple[str, ...] = (DEFAULT_LISTEN,)
    listen_quic: tuple[str, ...] = ()
    quic: QuicSettings = field(default_factory=QuicSettings)
    #: Endpoints whose connections come from balancers and start with a
    #: PROXY header (``[proxy] listen``); who may send one is
    #: ``settings.proxy_from``.
    proxy_listen: tuple[str, ...] = ()
    keys: tuple[KeyFileConfig, ...] = ()
    public_name: str | None = None
    public: LocalConfig | None = None
    backends: Mapping[str, BackendConfig] = field(default_factory=dict)
    locals: Mapping[str, LocalConfig] = field(default_factory=dict)
    routes: tuple[RouteConfig, ...] = ()
    default: str = "reject:unrecognized_name"
    router: str | None = None
    router_options: Mapping[str, Any] = field(default_factory=dict)
    settings: FrontSettings = field(default_factory=FrontSettings)
    trial_decryption: bool = False
    require_public_name: bool = False
    grease: bool = True
    source: Path | None = None
    metrics_listen: str | None = None
    watch: bool = False
    watch_interval: float = 5.0
    workers: int = 1
    rejected: str | None = None
    key_directory: Path | None = None
    rotation: RotationPolicy | None = None
    publish: PublishConfig = field(default_factory=PublishConfig)
    exit: ExitConfig | None = None
    fleet: FleetConfig | None = None
    #: ``[front] engine``: what serves plain ``tcp:`` listeners (one of
    #: :data:`ENGINES`); applied at start, like ``listen``.
    engine: str = "lean"
    #: ``[front] record_padding``: the TLS the front terminates itself pads
    #: its records to a multiple of this many bytes (RFC 9849 §6.1.3); 0 is
    #: off.  Applied at start (echfront.app.localtls).
    record_padding: int = 512

    def routed_names(self) -> tuple[str, ...]:
        """The private names clients may ask for: route patterns, then ``[publish] names``.

        What ``maximum_name_length`` is derived from (RFC 9849 §6.1.3).
        """
        return (*(route.name for route in self.routes), *self.publish.names)

    def watched_files(self) -> tuple[Path, ...]:
        """Files whose change triggers a reload when ``[reload] watch`` is on."""
        files = [entry.path for entry in self.keys]
        for local in (self.public, *self.locals.values()):
            if local is not None:
                files.append(local.cert)
                if local.key is not None:
                    files.append(local.key)
        if self.key_directory is not None:
            files.append(self.key_directory)  # its mtime changes as keys come and go
        if self.publish.tsig_secret_file is not None:
            files.append(self.publish.tsig_secret_file)
        if self.source is not None:
            files.insert(0, self.source)
        return tuple(files)


class _Section:
    """Typed, checked access to one TOML table; unknown keys are errors."""

    def __init__(self, data: Mapping[str, Any], where: str, known: Iterable[str]) -> None:
        self.data = data
        self.where = where
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ConfigError(f"{self._key(unknown[0])}: unknown key")

    def _key(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
        value = self.data.get(key, default)
        if value is default:
            return default
        if isinstance(value, bool) and kind in (int, float, (int, float)):
            raise ConfigError(f"{self._key(key)}: expected a number, got a boolean")
        if not isinstance(value, kind):
            names = (
                kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            )
            raise ConfigError(f"{self._key(key)}: expected {names}, got {type(value).__name__}")
        return value

    def non_negative(self, key: str, default: float) -> float:
        value = self.get(key, (int, float), default)
        if value < 0:
            raise ConfigError(f"{self._key(key)}: must be 0 or more")
        return float(value)

    def count(self, key: str, default: int) -> int:
        value: int = self.get(key, int, default)
        if value < 0:
            raise ConfigError(f"{self._key(key)}: must be 0 or more")
        return value

    def positive(self, key: str, default: float) -> float:
        value = self.get(key, (int, float), default)
        if value <= 0:
            raise ConfigError(f"{self._key(key)}: must be greater than 0")
        return float(value)

    def strings(self, key: str) -> tuple[str, ...] | None:
        value = self.get(key, list)
        if value is None:
            return None
        if not all(isinstance(v, str) and v for v in value):
            raise ConfigError(f"{self._key(key)}: expected a list of non-empty strings")
        return tuple(value)

    def table(self, key: str) -> Mapping[str, Any]:
        value: Mapping[str, Any] = self.get(key, dict, {})
        return value

    def text(self, key: str, *, required: bool = False) -> str | None:
        value = self.data.get(key)
        if value is None:
            if required:
                raise ConfigError(f"{self._key(key)}: required")
            return None
        if not isinstance(value, str) or not value:
            raise ConfigError(
                f"{self._key(key)}: expected a non-empty string, got {type(value).__name__}"
            )
        return value

    def texts(self, key: str) -> tuple[str, ...] | None:
        value = self.data.get(key)
        if value is None:
            return None
        if not isinstance(value, list) or not value:
            raise ConfigError(f"{self._key(key)}: expected a non-empty list of strings")
        if not all(isinstance(v, str) and v for v in value):
            raise ConfigError(f"{self._key(key)}: expected a list of non-empty strings")
        return tuple(value)

    def domain(self, key: str, text: str) -> dns.name.Name:
        try:
            return absolute_name(text)
        except dns.exception.DNSException as error:
            raise ConfigError(
                f"{self._key(key)}: {text!r} is not a domain name ({error})"
            ) from None

    def server(self, key: str, text: str) -> DNSServer:
        try:
            return DNSServer.parse(text)
        except ValueError as error:
            raise ConfigError(f"{self._key(key)}: {error}") from None

    def path(self, key: str, base: Path, *, required: bool = True) -> Path | None:
        value = self.get(key, str)
        if value is None:
            if required:
                raise ConfigError(f"{self._key(key)}: required")
            return None
        path = Path(value).expanduser()
        return path if path.is_absolute() else base / path


_TOP = (
    "listen",
    "listen_quic",
    "quic",
    "proxy",
    "public_name",
    "default",
    "ech",
    "limits",
    "public",
    "backends",
    "locals",
    "routes",
    "router",
    "log",
    "reload",
    "metrics",
    "workers",
    "relay",
    "front",
    "keys",
    "publish",
    "rejected",
    "exit",
)


def parse_config(data: Mapping[str, Any], *, base: Path, source: Path | None = None) -> Config:
    """Validate a configuration document (already parsed from TOML).

    :param base: directory that relative paths are relative to.
    :raises ConfigError: one line naming the key and the problem.
    """
    top = _Section(data, "", _TOP)
    proxy_listen, proxy_from = _proxy_section(
        _Section(top.table("proxy"), "proxy", ("listen", "from"))
    )
    listen = top.strings("listen")
    if listen is None or not (listen or proxy_listen):
        # An empty list means the default, unless [proxy] listen serves.
        listen = (DEFAULT_LISTEN,)
    for description in listen:
        check_listen(description, "listen")
    listen_quic = top.strings("listen_quic") or ()
    for description in listen_quic:
        try:
            udp_listen_address(description)
        except ValueError as error:
            raise ConfigError(f"listen_quic: {error}") from None
    quic = _quic_settings(
        _Section(
            top.table("quic"),
            "quic",
            ("idle_timeout", "max_flows", "max_flows_per_address", "hello_timeout"),
        )
    )
    public_name = top.get("public_name", str)
    if public_name is not None:
        try:
            public_name = validate_public_name(public_name)
        except ConfigError as error:
            raise ConfigError(f"public_name: {error}") from None

    ech = _Section(
        top.table("ech"), "ech", ("keys", "trial_decryption", "require_public_name", "grease")
    )
    grease = ech.get("grease", bool, True)
    keys = []
    key_entries = ech.get("keys", list, [])
    for index, entry in enumerate(key_entries):
        if not isinstance(entry, dict):
            raise ConfigError(f"ech.keys[{index}]: expected a table with file = ...")
        section = _Section(entry, f"ech.keys[{index}]", ("file", "published"))
        path = section.path("file", base)
        assert path is not None
        keys.append(KeyFileConfig(path, section.get("published", bool, True)))

    limits = _Section(
        top.table("limits"),
        "limits",
        (
            "first_flight_timeout",
            "handshake_timeout",
            "max_first_flight",
            "idle_timeout",
            "max_connections",
            "max_first_flights_per_address",
            "hpke_rate",
            "hpke_burst",
            "saturation_first_flights",
            "shutdown_grace",
        ),
    )
    settings = _settings(
        limits,
        _Section(top.table("log"), "log", ("server_names",)),
        _Section(top.table("relay"), "relay", ("splice",)),
        proxy_from,
    )

    public = None
    if "public" in data:
        public = _local_config("public", top.table("public"), base, DEFAULT_PUBLIC_FACTORY)

    backends = {}
    for name, entry in top.table("backends").items():
        backends[name] = _backend_config(name, entry)
    locals_ = {}
    for name, entry in top.table("locals").items():
        if name == "public":
            raise ConfigError("locals.public: the name 'public' is reserved for [public]")
        if not isinstance(entry, dict):
            raise ConfigError(f"locals.{name}: expected a table")
        locals_[name] = _local_config(f"locals.{name}", entry, base, None, name=name)

    routes = []
    route_entries = top.get("routes", list, [])
    for index, entry in enumerate(route_entries):
        if not isinstance(entry, dict):
            raise ConfigError(f"routes[{index}]: expected a table")
        routes.append(_route_config(index, entry, backends, locals_, public is not None))

    default = _target_of(
        "default", top.get("default", str, "reject"), backends, locals_, public is not None
    )
    rejected_text = top.get("rejected", str)
    rejected = None
    if rejected_text is not None:
        rejected = _target_of("rejected", rejected_text, backends, locals_, public is not None)
    key_directory, rotation = _keys_section(top.table("keys"), base, public_name)
    fleet = _fleet_config(top.table("keys"), base, key_directory)
    publish_table = top.table("publish")
    publish = parse_publish(publish_table, base=base)
    if set(publish_table) - {"names"} and rotation is None:
        raise ConfigError("publish: needs [keys] directory and rotate (what to publish)")
    publishing = rotation is not None and publish.method != "none"
    if fleet is not None and publishing and fleet.member_ttl < publish.timeout + 2:
        # The fleet's leader holds its lease through a whole publication.
        raise ConfigError("keys.etcd.member_ttl: must be at least publish.timeout + 2 seconds")
    if rotation is not None:
        rotation = replace(rotation, grease=grease)  # GREASE, RFC 9849 §6.2.2
    if rotation is not None and "max_name_length" not in top.table("keys"):
        # Keys the front makes pad to the names it routes (RFC 9849 §6.1.3).
        names = (*(route.name for route in routes), *publish.names)
        rotation = replace(rotation, maximum_name_length=derive_maximum_name_length(names))

    router_section = _Section(top.table("router"), "router", ("factory", "options"))
    router = router_section.get("factory", str)
    reload_section = _Section(top.table("reload"), "reload", ("watch", "interval"))
    metrics_section = _Section(top.table("metrics"), "metrics", ("listen",))
    workers = top.get("workers", int, 1)
    if not 1 <= workers <= 256:
        raise ConfigError("workers: must be 1..256")
    front = _Section(top.table("front"), "front", ("engine", "record_padding"))
    exit_link = _exit_config(top.table("exit"), base) if "exit" in data else None
    if exit_link is not None and workers > 1:
        raise ConfigError("exit: serves in one process; set workers = 1")
    return Config(
        listen=listen,
        listen_quic=listen_quic,
        quic=quic,
        proxy_listen=proxy_listen,
        keys=tuple(keys),
        public_name=public_name,
        public=public,
        backends=backends,
        locals=locals_,
        routes=tuple(routes),
        default=default,
        router=router,
        router_options=router_section.table("options"),
        settings=settings,
        trial_decryption=ech.get("trial_decryption", bool, False),
        require_public_name=ech.get("require_public_name", bool, False),
        grease=grease,
        source=source,
        metrics_listen=metrics_section.get("listen", str),
        watch=reload_section.get("watch", bool, False),
        watch_interval=reload_section.positive("interval", 5.0),
        workers=workers,
        rejected=rejected,
        key_directory=key_directory,
        rotation=rotation,
        publish=publish,
        exit=exit_link,
        fleet=fleet,
        engine=_engine(front),
        record_padding=_record_padding(front),
    )


#: The connection engines ``[front] engine`` names: ``lean`` (echfront's own,
#: echfront.front.engine) and ``twisted`` (Twisted's TCP transports).
ENGINES = ("lean", "twisted")


def _engine(section: _Section) -> str:
    """``[front] engine``; the default is :class:`Config`'s."""
    engine: str = section.get("engine", str, Config.engine)
    if engine not in ENGINES:
        raise ConfigError(f"front.engine: must be one of {', '.join(ENGINES)}, not {engine!r}")
    return engine


def _record_padding(section: _Section) -> int:
    """``[front] record_padding``: 0 (off) or a block size OpenSSL takes (2..16384)."""
    value: int = section.get("record_padding", int, Config.record_padding)
    if value != 0 and not 2 <= value <= 16384:
        raise ConfigError("front.record_padding: must be 0 (off) or 2..16384 bytes")
    return value


def _proxy_section(section: _Section) -> tuple[tuple[str, ...], tuple[_Network, ...]]:
    """``[proxy]``: endpoints behind balancers, and the balancers' networks.

    A PROXY header from any other peer would be a spoofed address, so
    ``listen`` needs ``from``; ``from`` alone would accept nothing.
    """
    listen = section.strings("listen") or ()
    for description in listen:
        check_listen(description, "proxy.listen")
    networks = []
    for text in section.strings("from") or ():
        try:
            networks.append(ipaddress.ip_network(text, strict=True))
        except ValueError as error:
            raise ConfigError(f"proxy.from: {text!r} is not a network ({error})") from None
    if listen and not networks:
        raise ConfigError("proxy.from: required with proxy.listen (the balancers' networks)")
    if networks and not listen:
        raise ConfigError("proxy.listen: required with proxy.from (where balancers connect)")
    return listen, tuple(networks)


def _settings(
    limits: _Section, log: _Section, relay: _Section, proxy_from: tuple[_Network, ...] = ()
) -> FrontSettings:
    """``[limits]``, ``[log]`` and ``[relay]``; defaults from :class:`FrontSettings`."""
    default = FrontSettings()
    max_flight = limits.get("max_first_flight", int, default.max_first_flight)
    if not 512 <= max_flight <= 1024 * 1024:
        raise ConfigError("limits.max_first_flight: must be 512..1048576 bytes")
    hpke_rate = limits.non_negative("hpke_rate", default.hpke_rate)
    # Unset, the burst is twice a rate the file sets (else the dataclass's).
    rate_set = "hpke_rate" in limits.data and hpke_rate
    burst = max(hpke_rate * 2, 1.0) if rate_set else default.hpke_burst
    hpke_burst = limits.non_negative("hpke_burst", burst)
    if hpke_rate and hpke_burst < 1:
        raise ConfigError("limits.hpke_burst: must be at least 1 when hpke_rate is set")
    return FrontSettings(
        first_flight_timeout=limits.positive("first_flight_timeout", default.first_flight_timeout),
        handshake_timeout=limits.positive("handshake_timeout", default.handshake_timeout),
        max_first_flight=max_flight,
        idle_timeout=limits.non_negative("idle_timeout", default.idle_timeout),
        max_connections=limits.count("max_connections", default.max_connections),
        max_first_flights_per_address=limits.count(
            "max_first_flights_per_address", default.max_first_flights_per_address
        ),
        hpke_rate=hpke_rate,
        hpke_burst=hpke_burst,
        saturation_first_flights=limits.count(
            "saturation_first_flights", default.saturation_first_flights
        ),
        proxy_from=proxy_from,
        log_server_names=log.get("server_names", bool, default.log_server_names),
        shutdown_grace=limits.non_negative("shutdown_grace", default.shutdown_grace),
        splice=relay.get("splice", bool, default.splice),
    )


def _quic_settings(section: _Section) -> QuicSettings:
    """``[quic]``: the QUIC flow table's bounds; defaults from :class:`QuicSettings`."""
    default = QuicSettings()
    return QuicSettings(
        idle_timeout=section.positive("idle_timeout", default.idle_timeout),
        max_flows=section.count("max_flows", default.max_flows),
        max_flows_per_address=section.count("max_flows_per_address", default.max_flows_per_address),
        hello_timeout=section.positive("hello_timeout", default.hello_timeout),
    )


def _quic_endpoint(section: _Section, *, allow_none: bool) -> str | None:
    """A ``quic_endpoint`` value: ``IP:PORT`` (or ``"none"`` where a default exists)."""
    text: str | None = section.get("quic_endpoint", str)
    if text is None or (allow_none and text == NO_QUIC):
        return text
    try:
        quic_address(text)
    except ValueError as error:
        raise ConfigError(f"{section.where}.quic_endpoint: {error}") from None
    return text


def _keys_section(
    table: Mapping[str, Any], base: Path, public_name: str | None
) -> tuple[Path | None, RotationPolicy | None]:
    """``[keys]``: the key directory and, with ``rotate``, the rotation policy."""
    section = _Section(
        table,
        "keys",
        (
            "directory",
            "rotate",
            "grace",
            "kems",
            "max_name_length",
            "check_interval",
            "verify_timeout",
            "public_name",
            "store",
            "etcd",
        ),
    )
    directory = section.path("directory", base, required=False)
    if "rotate" not in table:
        stores = len({"store", "etcd"} & set(table))
        if len(table) - stores > (1 if directory is not None else 0):
            raise ConfigError('keys: rotation settings need rotate = ... (e.g. "24h")')
        return directory, None
    if directory is None and table.get("store") != "etcd":
        raise ConfigError('keys.directory: required for rotation (or store = "etcd")')
    name = section.get("public_name", str, public_name)
    if not name:
        raise ConfigError("keys.public_name: required for rotation (or set public_name)")
    try:
        name = validate_public_name(name)
    except ConfigError as error:
        raise ConfigError(f"keys.public_name: {error}") from None
    kems = option_names("KEM")
    kem_names = section.strings("kems") or ("x25519",)
    unknown = [k for k in kem_names if k not in kems]
    if unknown:
        raise ConfigError(f"keys.kems: unknown KEM {unknown[0]!r} ({', '.join(kems)})")
    rotate = parse_duration(table["rotate"], "keys.rotate")
    grace = parse_duration(table.get("grace", "48h"), "keys.grace")
    max_name_length = section.get("max_name_length", int, 0)
    if not 0 <= max_name_length <= 255:
        raise ConfigError("keys.max_name_length: must be 0..255")
    policy = RotationPolicy(
        public_name=name,
        rotate_every=rotate,
        grace=grace,
        kems=tuple(kems[k] for k in kem_names),
        maximum_name_length=max_name_length,
        check_interval=parse_duration(table.get("check_interval", "1m"), "keys.check_interval")
        or 60.0,
        verify_timeout=parse_duration(table.get("verify_timeout", "1m"), "keys.verify_timeout"),
    )
    return directory, policy


def _fleet_config(
    table: Mapping[str, Any], base: Path, directory: Path | None
) -> FleetConfig | None:
    """``[keys] store`` and ``[keys.etcd]``: where a fleet's keys live (None: a directory)."""
    store = table.get("store", "directory")
    if store not in ("directory", "etcd"):
        raise ConfigError(f'keys.store: expected "directory" or "etcd", got {store!r}')
    if store == "directory":
        if "etcd" in table:
            raise ConfigError('keys.etcd: only used with store = "etcd"')
        return None
    if directory is not None:
        raise ConfigError('keys.directory: not used with store = "etcd" (the keys live in etcd)')
    if not isinstance(table.get("etcd"), dict):
        raise ConfigError('keys.etcd: required with store = "etcd" (endpoints and kek_file)')
    section = _Section(
        table["etcd"],
        "keys.etcd",
        (
            "endpoints",
            "prefix",
            "ca_file",
            "cert_file",
            "key_file",
            "user",
            "password_file",
            "kek_file",
            "previous_kek_files",
            "member",
            "member_ttl",
            "timeout",
        ),
    )
    endpoints = section.texts("endpoints")
    if endpoints is None:
        raise ConfigError("keys.etcd.endpoints: required (client URLs like https://10.0.0.1:2379)")
    user = section.text("user")
    password_file = section.path("password_file", base, required=False)
    if (user is None) != (password_file is None):
        raise ConfigError("keys.etcd: user and password_file go together")
    timeout = parse_duration(section.data.get("timeout", "5s"), "keys.etcd.timeout")
    if timeout <= 0:
        raise ConfigError("keys.etcd.timeout: must be greater than 0")
    try:
        settings = EtcdSettings(
            endpoints,
            section.text("prefix") or "/echfront/",
            section.path("ca_file", base, required=False),
            section.path("cert_file", base, required=False),
            section.path("key_file", base, required=False),
            user,
            None if user is None else "",
            timeout,
        )
    except ConfigError as error:
        raise ConfigError(f"keys.{error}") from None
    kek_file = section.path("kek_file", base)
    assert kek_file is not None  # required
    previous = section.strings("previous_kek_files") or ()
    member = section.text("member")
    if member is not None:
        try:
            check_member_name(member)
        except ConfigError as error:
            raise ConfigError(f"keys.etcd.{error}") from None
    member_ttl = parse_duration(section.data.get("member_ttl", "15s"), "keys.etcd.member_ttl")
    if member_ttl < 2:
        raise ConfigError("keys.etcd.member_ttl: must be at least 2 seconds")
    return FleetConfig(
        etcd=settings,
        kek_file=kek_file,
        previous_kek_files=tuple(
            path if path.is_absolute() else base / path
            for path in (Path(p).expanduser() for p in previous)
        ),
        password_file=password_file,
        member=member,
        member_ttl=member_ttl,
    )


#: Keys only one publication method uses.
_METHOD_KEYS = {
    "rfc2136": ("server", "zone", "tsig_key_name", "tsig_algorithm", "tsig_secret_file", "ttl"),
    "command": ("command",),
}


def parse_publish(table: Mapping[str, Any], *, base: Path) -> PublishConfig:
    """Validate the ``[publish]`` table (docs/configuration.rst has every key).

    Nothing is read here: the TSIG secret file and the command's program are
    looked at when the publisher is built (:mod:`echfront.config.build`).

    :param base: directory that relative paths are relative to.
    :raises ConfigError: one line naming ``publish.KEY``.
    """
    section = _Section(
        table,
        "publish",
        (
            "method",
            "names",
            "server",
            "zone",
            "tsig_key_name",
            "tsig_algorithm",
            "tsig_secret_file",
            "ttl",
            "command",
            "timeout",
            "verify_servers",
            "doh",
        ),
    )
    names = table.get("names", [])
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        raise ConfigError("publish.names: expected a list of host names")
    # An empty table, or one with only names, is "none".
    method = section.text("method", required=bool(set(table) - {"names"})) or "none"
    if method not in ("rfc2136", "command", "none"):
        raise ConfigError(
            f'publish.method: expected "rfc2136", "command" or "none", got {method!r}'
        )
    if method == "none":
        return PublishConfig(names=tuple(names))
    for other, keys in _METHOD_KEYS.items():
        for key in keys:
            if other != method and key in table:
                raise ConfigError(f'publish.{key}: only used with method = "{other}"')
    if not names:
        raise ConfigError("publish.names: required to publish (the HTTPS records to update)")
    absolute = [section.domain("names", name) for name in names]
    timeout = table.get("timeout", DEFAULT_TIMEOUT)
    if isinstance(timeout, bool) or not isinstance(timeout, int | float):
        raise ConfigError(f"publish.timeout: expected a number, got {type(timeout).__name__}")
    if not 0 < timeout <= 3600:
        raise ConfigError("publish.timeout: must be more than 0 and at most 3600 seconds")
    server_text = section.text("server", required=method == "rfc2136")
    server = section.server("server", server_text) if server_text is not None else None
    verify_texts = section.texts("verify_servers")
    if verify_texts is not None:
        verify_servers = tuple(section.server("verify_servers", text) for text in verify_texts)
    elif server is not None:
        verify_servers = (server,)
    else:
        raise ConfigError(f'publish.verify_servers: required with method = "{method}"')
    doh = section.text("doh")
    if doh is not None:
        _check_doh(doh)
    common = PublishConfig(
        method,
        tuple(names),
        server,
        timeout=float(timeout),
        verify_servers=verify_servers,
        doh=doh,
    )
    if method == "command":
        argv = section.texts("command")
        if argv is None:
            raise ConfigError('publish.command: required with method = "command"')
        program = Path(argv[0]).expanduser()
        if "/" in argv[0] and not program.is_absolute():
            # Like every other path in the configuration: relative to it.
            argv = (str(base / program), *argv[1:])
        return replace(common, command=argv)
    zone = section.text("zone")
    if zone is not None:
        apex = section.domain("zone", zone)
        for name, name_absolute in zip(names, absolute, strict=True):
            if not name_absolute.is_subdomain(apex):
                raise ConfigError(f"publish.zone: {name} is not in zone {zone}")
    ttl = table.get("ttl", DEFAULT_TTL)
    if isinstance(ttl, bool) or not isinstance(ttl, int) or not 0 <= ttl <= 0x7FFFFFFF:
        raise ConfigError("publish.ttl: expected a whole number of seconds, 0 to 2147483647")
    secret_file = section.text("tsig_secret_file", required=True)
    assert secret_file is not None
    key_name = section.text("tsig_key_name")
    if key_name is not None:
        section.domain("tsig_key_name", key_name)
    algorithm = section.text("tsig_algorithm")
    if algorithm is not None:
        algorithm = algorithm.lower().rstrip(".")
        if algorithm not in TSIG_ALGORITHMS:
            raise ConfigError(
                f"publish.tsig_algorithm: {algorithm!r} is not one of {', '.join(TSIG_ALGORITHMS)}"
            )
    path = Path(secret_file).expanduser()
    return replace(
        common,
        zone=zone,
        tsig_key_name=key_name,
        tsig_algorithm=algorithm,
        tsig_secret_file=path if path.is_absolute() else base / path,
        ttl=ttl,
    )


def _check_doh(url: str) -> None:
    """A DoH URL: https, or http to a loopback address (tests, local resolvers)."""
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ConfigError(f"publish.doh: {url!r} is not an https:// URL")
    if parts.scheme == "http":
        host = parts.hostname
        try:
            loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            raise ConfigError("publish.doh: plain http:// is only allowed to a loopback address")


def _exit_config(table: Mapping[str, Any], base: Path) -> ExitConfig:
    """``[exit]``: the exit's certificate and the CA of its fronts' client certificates."""
    section = _Section(table, "exit", ("cert", "key", "client_ca"))
    cert = section.path("cert", base)
    client_ca = section.path("client_ca", base)
    assert cert is not None and client_ca is not None  # required paths
    return ExitConfig(cert, section.path("key", base, required=False), client_ca)


def _backend_config(name: str, entry: object) -> BackendConfig:
    where = f"backends.{name}"
    if isinstance(entry, str):
        entry = {"endpoint": entry}
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: expected an endpoint string or a table")
    section = _Section(
        entry, where, ("endpoint", "connect_timeout", "proxy_protocol", "quic_endpoint")
    )
    endpoint = section.get("endpoint", str)
    if not endpoint:
        raise ConfigError(f"{where}.endpoint: required")
    proxy = section.get("proxy_protocol", int, 0)
    if proxy not in (0, 1, 2):
        raise ConfigError(f"{where}.proxy_protocol: must be 0 (off), 1 or 2")
    return BackendConfig(
        name,
        endpoint,
        section.positive("connect_timeout", 10.0),
        proxy,
        _quic_endpoint(section, allow_none=True),
    )


def _local_config(
    where: str, entry: Mapping[str, Any], base: Path, default_factory: str | None, name: str = ""
) -> LocalConfig:
    section = _Section(entry, where, ("cert", "key", "factory", "alpn", "options", "quic_endpoint"))
    cert = section.path("cert", base)
    assert cert is not None
    factory = section.get("factory", str, default_factory)
    if factory is None:
        raise ConfigError(f"{where}.factory: required (a dotted name, module:callable)")
    alpn = section.strings("alpn") or ()
    for alpn_id in alpn:
        try:
            validate_alpn_id(alpn_id)
        except ConfigError as error:
            raise ConfigError(f"{where}.alpn: {error}") from None
    return LocalConfig(
        name or "public",
        cert,
        section.path("key", base, required=False),
        factory,
        alpn,
        section.table("options"),
        _quic_endpoint(section, allow_none=False),
    )


def _target_of(
    where: str,
    text: str,
    backends: Mapping[str, BackendConfig],
    locals_: Mapping[str, LocalConfig],
    has_public: bool,
) -> str:
    """Validate a target reference: ``backend:N``, ``local:N``, ``public``, ``reject[:alert]``."""
    kind, _, name = text.partition(":")
    if kind == "backend" and name in backends:
        return text
    if kind == "local" and name in locals_:
        return text
    if kind == "public" and not name:
        if not has_public:
            raise ConfigError(f"{where}: 'public' needs a [public] section (its certificate)")
        return text
    if kind == "reject":
        alert = name or "unrecognized_name"
        if alert not in ALERTS:
            raise ConfigError(f"{where}: unknown alert {alert!r} (e.g. unrecognized_name)")
        return f"reject:{alert}"
    if kind in ("backend", "local"):
        raise ConfigError(f"{where}: no {kind} named {name!r}")
    raise ConfigError(f"{where}: {text!r} is not backend:NAME, local:NAME, public or reject")


def _route_config(
    index: int,
    entry: Mapping[str, Any],
    backends: Mapping[str, BackendConfig],
    locals_: Mapping[str, LocalConfig],
    has_public: bool,
) -> RouteConfig:
    where = f"routes[{index}]"
    section = _Section(
        entry, where, ("name", "backend", "local", "public", "reject", "alpn", "require_ech")
    )
    name = section.get("name", str)
    if not name:
        raise ConfigError(f"{where}.name: required")
    chosen = [k for k in ("backend", "local", "public", "reject") if k in entry]
    if len(chosen) != 1:
        raise ConfigError(f"{where}: give exactly one of backend, local, public or reject")
    kind = chosen[0]
    if kind == "public":
        if section.get("public", bool) is not True:
            raise ConfigError(f"{where}.public: must be true")
        text = "public"
    else:
        text = f"{kind}:{section.get(kind, str)}"
    target = _target_of(f"{where}.{kind}", text, backends, locals_, has_public)
    try:
        validate_pattern(name)
    except ConfigError as error:
        raise ConfigError(f"{where}.name: {error}") from None
    return RouteConfig(
        name, target, section.strings("alpn"), section.get("require_ech", bool, False)
    )


def load_config_file(path: Path) -> Config:
    """Read and validate a TOML configuration file.

    :raises ConfigError: for an unreadable file, bad TOML or bad values.
    """
    try:
        text = path.read_bytes()
    except OSError as error:
        raise ConfigError(f"{path}: cannot read ({error.strerror})") from None
    try:
        data = tomllib.loads(text.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: not valid TOML ({error})") from None
    try:
        return parse_config(data, base=path.parent.resolve(), source=path)
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None

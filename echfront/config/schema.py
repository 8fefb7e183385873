# -*- test-case-name: tests.test_config -*-
"""Configuration: TOML (and command-line flags) to validated settings, then to a FrontState.

Loading happens in two steps, both of which report a problem as one
:class:`~echfront.errors.ConfigError` line naming the key:

1. :func:`parse_config` checks the document's shape and values and returns
   a frozen :class:`Config` (no files are read, no sockets made);
2. :func:`build_state` reads key and certificate files, builds endpoints,
   local TLS services and the router, and returns the
   :class:`~echfront.front.protocol.FrontState` the front serves with.

A reload runs both steps again and swaps the state only if both succeed.
The reference for every key is docs/configuration.rst.
"""

from __future__ import annotations

import importlib
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twisted.internet.endpoints import clientFromString, serverFromString
from twisted.internet.interfaces import IProtocolFactory
from zope.interface.interface import InterfaceClass

from echfront.dns.svcb import validate_alpn_id
from echfront.ech.decoder import ECHDecoder
from echfront.ech.echconfig import validate_public_name
from echfront.ech.keyset import KeySet, read_key_file
from echfront.errors import AlertDescription, ConfigError
from echfront.front.local import load_certificate_options, local_target
from echfront.front.protocol import FrontSettings, FrontState
from echfront.interfaces import IRouter, ServiceContext
from echfront.keys.keydir import KEM_NAMES, KeyDirectory
from echfront.keys.rotation import RotationPolicy, parse_duration
from echfront.routing import Rule, StaticRouter, validate_pattern
from echfront.targets import UNRECOGNIZED, Backend, Local, Reject, Route

__all__ = [
    "BackendConfig",
    "Config",
    "KeyFileConfig",
    "LocalConfig",
    "RouteConfig",
    "build_state",
    "load_config_file",
    "load_key_set",
    "parse_config",
    "resolve_dotted",
]

DEFAULT_LISTEN = "tcp:443"
DEFAULT_PUBLIC_FACTORY = "echfront.web:public_service"


@dataclass(frozen=True)
class KeyFileConfig:
    """One RFC 9934 key file and its role."""

    path: Path
    published: bool = True


@dataclass(frozen=True)
class BackendConfig:
    """A backend reached through a client endpoint string."""

    name: str
    endpoint: str
    connect_timeout: float = 10.0
    proxy_protocol: int = 0


@dataclass(frozen=True)
class LocalConfig:
    """A locally terminated service: certificate plus application factory."""

    name: str
    cert: Path
    key: Path | None
    factory: str
    alpn: tuple[str, ...] = ()
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RouteConfig:
    """One routing rule: a name pattern to a target."""

    name: str
    target: str  # "backend:NAME", "local:NAME", "public" or "reject:ALERT"
    alpn: tuple[str, ...] | None = None
    require_ech: bool = False


@dataclass(frozen=True)
class Config:
    """A validated configuration (see docs/configuration.rst)."""

    listen: tuple[str, ...] = (DEFAULT_LISTEN,)
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
    source: Path | None = None
    metrics_listen: str | None = None
    watch: bool = False
    watch_interval: float = 5.0
    workers: int = 1
    rejected: str | None = None
    key_directory: Path | None = None
    rotation: RotationPolicy | None = None
    publish: Mapping[str, Any] = field(default_factory=dict)
    publish_names: tuple[str, ...] = ()

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
        if self.source is not None:
            files.insert(0, self.source)
        return tuple(files)


# -- step 1: shape and values ------------------------------------------------


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
    "keys",
    "publish",
    "rejected",
)


def parse_config(data: Mapping[str, Any], *, base: Path, source: Path | None = None) -> Config:
    """Validate a configuration document (already parsed from TOML).

    :param base: directory that relative paths are relative to.
    :raises ConfigError: one line naming the key and the problem.
    """
    top = _Section(data, "", _TOP)
    listen = top.strings("listen") or (DEFAULT_LISTEN,)
    public_name = top.get("public_name", str)
    if public_name is not None:
        try:
            public_name = validate_public_name(public_name)
        except ConfigError as error:
            raise ConfigError(f"public_name: {error}") from None

    ech = _Section(top.table("ech"), "ech", ("keys", "trial_decryption", "require_public_name"))
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
            "shutdown_grace",
        ),
    )
    max_flight = limits.get("max_first_flight", int, 64 * 1024)
    if not 512 <= max_flight <= 1024 * 1024:
        raise ConfigError("limits.max_first_flight: must be 512..1048576 bytes")
    log = _Section(top.table("log"), "log", ("server_names",))
    relay = _Section(top.table("relay"), "relay", ("splice",))
    hpke_rate = limits.non_negative("hpke_rate", 200.0)
    hpke_burst = limits.non_negative("hpke_burst", max(hpke_rate * 2, 1.0))
    if hpke_rate and hpke_burst < 1:
        raise ConfigError("limits.hpke_burst: must be at least 1 when hpke_rate is set")
    settings = FrontSettings(
        first_flight_timeout=limits.positive("first_flight_timeout", 10.0),
        handshake_timeout=limits.positive("handshake_timeout", 30.0),
        max_first_flight=max_flight,
        idle_timeout=limits.non_negative("idle_timeout", 300.0),
        max_connections=limits.count("max_connections", 10000),
        max_first_flights_per_address=limits.count("max_first_flights_per_address", 64),
        hpke_rate=hpke_rate,
        hpke_burst=hpke_burst,
        log_server_names=log.get("server_names", bool, False),
        shutdown_grace=limits.non_negative("shutdown_grace", 30.0),
        splice=relay.get("splice", bool, True),
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
    publish_table = dict(top.table("publish"))
    publish_names = publish_table.pop("names", [])
    if not isinstance(publish_names, list) or not all(
        isinstance(n, str) and n for n in publish_names
    ):
        raise ConfigError("publish.names: expected a list of host names")
    if publish_table.get("method", "none") != "none" and not publish_names:
        raise ConfigError("publish.names: required to publish (the HTTPS records to update)")
    if publish_table and rotation is None:
        raise ConfigError("publish: needs [keys] directory and rotate (what to publish)")

    router_section = _Section(top.table("router"), "router", ("factory", "options"))
    router = router_section.get("factory", str)
    reload_section = _Section(top.table("reload"), "reload", ("watch", "interval"))
    metrics_section = _Section(top.table("metrics"), "metrics", ("listen",))
    workers = top.get("workers", int, 1)
    if not 1 <= workers <= 256:
        raise ConfigError("workers: must be 1..256")
    return Config(
        listen=listen,
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
        source=source,
        metrics_listen=metrics_section.get("listen", str),
        watch=reload_section.get("watch", bool, False),
        watch_interval=reload_section.positive("interval", 5.0),
        workers=workers,
        rejected=rejected,
        key_directory=key_directory,
        rotation=rotation,
        publish=publish_table,
        publish_names=tuple(publish_names),
    )


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
        ),
    )
    directory = section.path("directory", base, required=False)
    if "rotate" not in table:
        if len(table) > (1 if directory is not None else 0):
            raise ConfigError('keys: rotation settings need rotate = ... (e.g. "24h")')
        return directory, None
    if directory is None:
        raise ConfigError("keys.directory: required for rotation")
    name = section.get("public_name", str, public_name)
    if not name:
        raise ConfigError("keys.public_name: required for rotation (or set public_name)")
    try:
        name = validate_public_name(name)
    except ConfigError as error:
        raise ConfigError(f"keys.public_name: {error}") from None
    kem_names = section.strings("kems") or ("x25519",)
    unknown = [k for k in kem_names if k not in KEM_NAMES]
    if unknown:
        raise ConfigError(f"keys.kems: unknown KEM {unknown[0]!r} (x25519, mlkem768-x25519)")
    rotate = parse_duration(table["rotate"], "keys.rotate")
    grace = parse_duration(table.get("grace", "48h"), "keys.grace")
    max_name_length = section.get("max_name_length", int, 0)
    if not 0 <= max_name_length <= 255:
        raise ConfigError("keys.max_name_length: must be 0..255")
    policy = RotationPolicy(
        public_name=name,
        rotate_every=rotate,
        grace=grace,
        kems=tuple(KEM_NAMES[k] for k in kem_names),
        maximum_name_length=max_name_length,
        check_interval=parse_duration(table.get("check_interval", "1m"), "keys.check_interval")
        or 60.0,
        verify_timeout=parse_duration(table.get("verify_timeout", "1m"), "keys.verify_timeout"),
    )
    return directory, policy


def _backend_config(name: str, entry: object) -> BackendConfig:
    where = f"backends.{name}"
    if isinstance(entry, str):
        entry = {"endpoint": entry}
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: expected an endpoint string or a table")
    section = _Section(entry, where, ("endpoint", "connect_timeout", "proxy_protocol"))
    endpoint = section.get("endpoint", str)
    if not endpoint:
        raise ConfigError(f"{where}.endpoint: required")
    proxy = section.get("proxy_protocol", int, 0)
    if proxy not in (0, 1, 2):
        raise ConfigError(f"{where}.proxy_protocol: must be 0 (off), 1 or 2")
    return BackendConfig(name, endpoint, section.positive("connect_timeout", 10.0), proxy)


def _local_config(
    where: str, entry: Mapping[str, Any], base: Path, default_factory: str | None, name: str = ""
) -> LocalConfig:
    section = _Section(entry, where, ("cert", "key", "factory", "alpn", "options"))
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
    )


_ALERTS = {a.name.lower(): a for a in AlertDescription}


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
        if alert not in _ALERTS:
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


# -- step 2: files, endpoints, services ---------------------------------------


def resolve_dotted(name: str, where: str) -> Any:
    """Import ``package.module:attribute`` (or ``package.module.attribute``).

    :raises ConfigError: if it cannot be imported.
    """
    module_name, sep, attribute = name.partition(":")
    if not sep:
        module_name, _, attribute = name.rpartition(".")
    if not module_name or not attribute:
        raise ConfigError(f"{where}: {name!r} is not a dotted name like package.module:callable")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ConfigError(f"{where}: cannot import {module_name!r} ({error})") from None
    try:
        value = module
        for part in attribute.split("."):
            value = getattr(value, part)
    except AttributeError:
        raise ConfigError(f"{where}: {module_name!r} has no attribute {attribute!r}") from None
    return value


def split_endpoint_description(description: str) -> list[str]:
    r"""Split a Twisted endpoint string on unescaped colons, unescaping ``\:``."""
    parts: list[str] = []
    current = ""
    escaped = False
    for char in description:
        if escaped:
            current += char
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == ":":
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    return parts


def tcp_client_address(description: str) -> tuple[str, int] | None:
    """(host, port) of a plain ``tcp:host=H:port=P`` client endpoint string, else None.

    Strings with other options (``bindAddress``) keep the generic endpoint.
    """
    kind, *rest = split_endpoint_description(description)
    if kind != "tcp":
        return None
    options = dict(item.partition("=")[::2] for item in rest)
    options.pop("timeout", None)  # the backend's connect_timeout applies
    host, port = options.pop("host", ""), options.pop("port", "")
    if options or not host or not port.isdigit():
        return None
    return host, int(port)


def load_key_set(config: Config) -> KeySet:
    """Every key the front serves: ``[ech] keys`` files and the ``[keys]`` directory."""
    keys = []
    for entry in config.keys:
        keys.extend(read_key_file(entry.path, published=entry.published))
    if config.key_directory is not None:
        keys.extend(KeyDirectory(config.key_directory).load_keys())
    return KeySet(keys)


def _public_name(config: Config, keys: KeySet) -> str | None:
    if config.public_name:
        return config.public_name
    names = sorted({k.config.public_name for k in keys.keys})
    return names[0] if names else None


def _call_factory(
    maker: Callable[[Any], Any],
    context: object,
    *,
    where: str,
    dotted: str,
    interface: InterfaceClass,
    what: str,
) -> Any:
    """Call an operator's factory; what it returns must provide ``interface``.

    :raises ConfigError: naming ``where`` when it fails or returns something else.
    """
    try:
        made = maker(context)
    except Exception as error:  # the operator's code: any failure is a config error
        raise ConfigError(f"{where}: {dotted} failed: {error}") from None
    # (A bool first: mypy-zope wrongly narrows a providedBy on a variable interface.)
    provides: bool = interface.providedBy(made)
    if not provides:
        raise ConfigError(f"{where}: {dotted} did not return {what}")
    return made


def build_state(config: Config, reactor: Any, current_keys: Callable[[], KeySet]) -> FrontState:
    """Read files and build everything a :class:`~echfront.front.protocol.FrontState` holds.

    :param current_keys: returns the key set in service at call time; local
        services (the origin-svcb document) call it per request, so they
        follow reloads.
    :raises ConfigError: one line naming the file or key and the problem.
    """
    keys = load_key_set(config)
    public_name = _public_name(config, keys)

    def make_local(where: str, local: LocalConfig) -> Local:
        options = load_certificate_options(local.cert, local.key, alpn=local.alpn)
        maker = resolve_dotted(local.factory, f"{where}.factory")
        context = ServiceContext(reactor, local.options, current_keys, public_name, local.alpn)
        app_factory = _call_factory(
            maker,
            context,
            where=f"{where}.factory",
            dotted=local.factory,
            interface=IProtocolFactory,
            what="a protocol factory",
        )
        return local_target(local.name, options, app_factory, reactor)

    locals_: dict[str, Local] = {}
    if config.public is not None:
        locals_["public"] = make_local("public", config.public)
    for name, local in config.locals.items():
        locals_[name] = make_local(f"locals.{name}", local)

    backends: dict[str, Backend] = {}
    for name, backend in config.backends.items():
        try:
            endpoint = clientFromString(reactor, backend.endpoint)
        except Exception as error:  # Twisted raises ValueError, KeyError, TypeError...
            raise ConfigError(f"backends.{name}.endpoint: {error}") from None
        backends[name] = Backend(
            name,
            endpoint,
            backend.endpoint,
            backend.connect_timeout,
            backend.proxy_protocol,
            tcp_client_address(backend.endpoint),
        )

    def target(text: str) -> Route:
        kind, _, name = text.partition(":")
        if kind == "backend":
            return backends[name]
        if kind == "local":
            return locals_[name]
        if kind == "public":
            return locals_["public"]
        if name == "unrecognized_name":
            return UNRECOGNIZED
        return Reject(_ALERTS[name], "configured rejection")

    rules = [
        Rule(
            route.name,
            target(route.target),
            None if route.alpn is None else frozenset(a.encode() for a in route.alpn),
            route.require_ech,
        )
        for route in config.routes
    ]
    if public_name and "public" in locals_ and not any(r.pattern == public_name for r in rules):
        # The public name always reaches the public service (the ECH
        # rejection path lands here: RFC 9849 §6.1.6 needs it authenticated).
        rules.append(Rule(public_name, locals_["public"]))
    rejected = None if config.rejected is None else target(config.rejected)
    public_names = frozenset(
        {k.config.public_name for k in keys.keys} | ({public_name} if public_name else set())
    )
    static = StaticRouter(tuple(rules), target(config.default), rejected, public_names)
    router: IRouter = static
    if config.router is not None:
        maker = resolve_dotted(config.router, "router.factory")
        context = ServiceContext(
            reactor,
            config.router_options,
            current_keys,
            public_name,
            (),
            backends,
            locals_,
            static,
        )
        router = _call_factory(
            maker,
            context,
            where="router.factory",
            dotted=config.router,
            interface=IRouter,
            what="an IRouter",
        )
    targets: frozenset[Backend | Local] = frozenset((*backends.values(), *locals_.values()))
    decoder = ECHDecoder(
        keys,
        trial_decryption=config.trial_decryption,
        require_public_name=config.require_public_name,
    )
    return FrontState(decoder, router, targets, config.settings)


def listen_endpoints(config: Config, reactor: Any) -> list[Any]:
    """Server endpoints for ``config.listen``.

    :raises ConfigError: naming the bad endpoint string.
    """
    endpoints = []
    for description in config.listen:
        try:
            endpoints.append(serverFromString(reactor, description))
        except Exception as error:
            raise ConfigError(f"listen: {description!r}: {error}") from None
    return endpoints

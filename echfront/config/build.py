# -*- test-case-name: tests.test_config -*-
"""Building running objects from a :class:`~echfront.config.schema.Config`.

Here the configuration meets the files and the reactor: key files and the
key directory are read, certificates loaded into pyOpenSSL contexts,
endpoint strings turned into Twisted endpoints, operator factories (local
services, routers) called, and the ``[publish]`` publisher assembled from
the DNS wing's classes.  :func:`build_state` returns the
:class:`~echfront.front.state.FrontState` the front serves with; a reload
calls it again and swaps the state only if it succeeds.  Every problem is
one :class:`~echfront.errors.ConfigError` line naming the file or key.
"""

from __future__ import annotations

import importlib
import ipaddress
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import dns.exception
import dns.name
from twisted.internet.endpoints import clientFromString, serverFromString
from twisted.internet.interfaces import IProtocolFactory
from twisted.logger import Logger
from zope.interface.interface import InterfaceClass

from echfront.config.endpoints import (
    default_backlog,
    quic_address,
    stream_host_port,
    tcp_client_address,
    with_backlog,
)
from echfront.config.schema import (
    ALERTS,
    NO_QUIC,
    BackendConfig,
    Config,
    LocalConfig,
    PublishConfig,
)
from echfront.dns.command import CommandPublisher
from echfront.dns.rfc2136 import TSIG_ALGORITHMS, RFC2136Publisher, TSIGKey, parse_tsig_secret_file
from echfront.dns.verify import Verifier, absolute_name, describe_error
from echfront.ech.decoder import ECHDecoder
from echfront.ech.keyset import ECHKey, KeySet
from echfront.ech.padding import longest_name
from echfront.errors import ConfigError
from echfront.front.datagram import Address, QuicState
from echfront.front.exitlink import ExitListenEndpoint, exit_tls_options
from echfront.front.leanport import lean_endpoint
from echfront.front.local import local_target
from echfront.front.state import FrontState
from echfront.front.tlsoptions import load_certificate_options
from echfront.interfaces import IPublisher, IRouter, ServiceContext
from echfront.keys.keydir import KeyDirectory
from echfront.keys.keyfile import read_key_file
from echfront.routing import Rule, StaticRouter
from echfront.targets import UNRECOGNIZED, Backend, Local, Reject, Route

__all__ = [
    "build_publisher",
    "build_quic_state",
    "build_state",
    "listen_endpoints",
    "listen_plan",
    "load_key_set",
    "load_tsig_key",
    "padding_warning",
    "proxy_listen_endpoints",
    "resolve_dotted",
]

_log = Logger()


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


def load_key_set(config: Config, store_keys: Sequence[ECHKey] = ()) -> KeySet:
    """Every key the front serves: ``[ech] keys`` files, the ``[keys]`` directory, ``store_keys``.

    :param store_keys: a fleet's keys, from its key store (``[keys] store``).
    """
    keys = []
    for entry in config.keys:
        keys.extend(read_key_file(entry.path, published=entry.published))
    if config.key_directory is not None:
        keys.extend(KeyDirectory(config.key_directory).load_keys())
    keys.extend(store_keys)
    return KeySet(keys, grease=config.grease)


def padding_warning(config: Config, keys: KeySet) -> str | None:
    """One line when a routed name is longer than a served config's ``maximum_name_length``.

    Clients pad the inner server_name up to that value (RFC 9849 §6.1.3), so
    a longer name makes a longer ClientHello.  The line names the route by
    its position, never the name itself (names stay out of logs).
    """
    longest = longest_name(config.routed_names())
    published = [key.config for key in keys.keys if key.published]
    if longest is None or not published:
        return None
    index, length = longest
    short = sorted({c.config_id for c in published if c.maximum_name_length < length})
    if not short:
        return None
    routes = len(config.routes)
    where = f"routes[{index}]" if index < routes else f"publish.names[{index - routes}]"
    value = min(c.maximum_name_length for c in published)
    ids = ", ".join(map(str, short))
    return (
        f"ECH padding: the longest routed name ({where}) is {length} octets, more than the "
        f"maximum_name_length {value} of config_id {ids}; ClientHellos for it are longer than "
        "for other names (RFC 9849 §6.1.3): make new keys with --config (echfront keygen, "
        "echfront keys add) or let [keys] rotation make them"
    )


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


def build_state(
    config: Config,
    reactor: Any,
    current_keys: Callable[[], KeySet],
    *,
    store_keys: Sequence[ECHKey] = (),
) -> FrontState:
    """Read files and build everything a :class:`~echfront.front.state.FrontState` holds.

    :param current_keys: returns the key set in service at call time; local
        services (the origin-svcb document) call it per request, so they
        follow reloads.
    :param store_keys: a fleet's keys, from its key store (``[keys] store``).
    :raises ConfigError: one line naming the file or key and the problem.
    """
    keys = load_key_set(config, store_keys)
    warning = padding_warning(config, keys)
    if warning is not None:
        _log.warn("{warning}", warning=warning)
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
        return Reject(ALERTS[name], "configured rejection")

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


def _backend_quic_address(backend: BackendConfig) -> Address | None:
    """A backend's QUIC address: ``quic_endpoint``, else its TCP IP and port."""
    if backend.quic_endpoint == NO_QUIC:
        return None
    if backend.quic_endpoint is not None:
        return quic_address(backend.quic_endpoint)
    address = stream_host_port(backend.endpoint)
    if address is None:
        return None
    try:
        ipaddress.ip_address(address[0])
    except ValueError:
        return None  # a host name: the default needs an IP address
    return address


def build_quic_state(config: Config, state: FrontState) -> QuicState:
    """What QUIC flows are decided with: ``state`` and each target's QUIC address.

    Targets are matched to their configuration by kind and name; a target
    a router made up has no QUIC address (it is refused anyway).
    """
    endpoints: dict[Backend | Local, Address] = {}
    locals_ = {"public": config.public, **config.locals}
    for target in state.targets:
        address: Address | None = None
        if isinstance(target, Backend):
            backend = config.backends.get(target.name)
            address = None if backend is None else _backend_quic_address(backend)
        else:
            local = locals_.get(target.name)
            if local is not None and local.quic_endpoint is not None:
                address = quic_address(local.quic_endpoint)
        if address is not None:
            endpoints[target] = address
    return QuicState(state, endpoints, config.quic)


def listen_endpoints(config: Config, reactor: Any) -> list[Any]:
    """Server endpoints for ``config.listen``; with ``[exit]``, behind the exit's TLS.

    With ``[front] engine = "lean"`` (the default) plain ``tcp:`` listeners
    run on the lean engine (:func:`echfront.front.leanport.lean_endpoint`).

    :raises ConfigError: naming the bad endpoint string or ``[exit]`` file.
    """
    endpoints = [_server_endpoint(reactor, description, "listen") for description in config.listen]
    if config.exit is not None:
        link = config.exit
        options = exit_tls_options(link.cert, link.key, link.client_ca)
        endpoints = [ExitListenEndpoint(endpoint, options, reactor) for endpoint in endpoints]
    elif config.engine == "lean":
        endpoints = [lean_endpoint(reactor, endpoint) for endpoint in endpoints]
    return endpoints


def listen_plan(config: Config) -> list[tuple[str, bool]]:
    """Every listen entry as workers open it: (description, whether PROXY headers come).

    ``listen`` first, then ``[proxy] listen``; each with the default backlog
    unless it sets one.
    """
    backlog = default_backlog()
    return [(with_backlog(d, backlog), False) for d in config.listen] + [
        (with_backlog(d, backlog), True) for d in config.proxy_listen
    ]


def proxy_listen_endpoints(config: Config, reactor: Any) -> list[Any]:
    """Server endpoints for ``[proxy] listen`` (balancers; a PROXY header comes first).

    :raises ConfigError: naming the bad endpoint string.
    """
    return [_server_endpoint(reactor, d, "proxy.listen") for d in config.proxy_listen]


def _server_endpoint(reactor: Any, description: str, where: str) -> Any:
    """A server endpoint, with a backlog fit for a front unless the string sets one."""
    try:
        return serverFromString(reactor, with_backlog(description, default_backlog()))
    except Exception as error:  # Twisted raises ValueError, KeyError, TypeError...
        raise ConfigError(f"{where}: {description!r}: {error}") from None


def load_tsig_key(publish: PublishConfig) -> TSIGKey:
    """The TSIG key (RFC 8945) of an ``rfc2136`` ``[publish]`` table, read from its file.

    The name and algorithm default to the file's when it holds one key, the
    algorithm then to ``hmac-sha256`` (formats: see
    :func:`~echfront.dns.rfc2136.parse_tsig_secret_file`).

    :raises ConfigError: naming ``publish.tsig_*``.
    """
    path = publish.tsig_secret_file
    assert path is not None  # the schema requires it for rfc2136
    try:
        text = path.read_text("utf-8")
    except (OSError, UnicodeDecodeError) as error:
        problem = f"cannot read ({describe_error(error)})"
        raise ConfigError(f"publish.tsig_secret_file: {problem}") from None
    try:
        keys = parse_tsig_secret_file(text)
    except ValueError as error:
        raise ConfigError(f"publish.tsig_secret_file: {path}: {error}") from None
    name = publish.tsig_key_name
    if name is not None:
        wanted = absolute_name(name)
        keys = [k for k in keys if k[0] is None or _key_name(k[0], path) == wanted]
        if not keys:
            raise ConfigError(f"publish.tsig_key_name: {name} is not in {path}")
    if len(keys) != 1:
        raise ConfigError(f"publish.tsig_key_name: {path} holds several keys: name one")
    file_name, file_algorithm, secret = keys[0]
    name = name or file_name
    if name is None:
        raise ConfigError(f"publish.tsig_key_name: required ({path} does not name the key)")
    algorithm = publish.tsig_algorithm or (file_algorithm or "hmac-sha256").rstrip(".")
    if algorithm not in TSIG_ALGORITHMS:
        raise ConfigError(
            f"publish.tsig_algorithm: {algorithm!r} is not one of {', '.join(TSIG_ALGORITHMS)}"
        )
    if file_algorithm is not None and file_algorithm.rstrip(".") != algorithm:
        raise ConfigError(f"publish.tsig_algorithm: {path} says the key is {file_algorithm}")
    return TSIGKey(name, secret, algorithm)


def _key_name(name: str, path: Path) -> dns.name.Name:
    """A key name read from a TSIG secret file, as a DNS name (compared case-blind)."""
    try:
        return absolute_name(name)
    except dns.exception.DNSException as error:
        problem = f"{path}: key name {name!r} is not a domain name ({error})"
        raise ConfigError(f"publish.tsig_secret_file: {problem}") from None


def build_publisher(
    publish: PublishConfig, *, reactor: Any, tsig: TSIGKey | None = None
) -> IPublisher | None:
    """The publisher ``[publish]`` describes; None for ``method = "none"``.

    :param tsig: the key of an ``rfc2136`` table when already read with
        :func:`load_tsig_key`; read here otherwise.
    :raises ConfigError: naming ``publish.KEY`` (an unreadable TSIG file, a
        command that is not found).
    """
    if publish.method == "none":
        return None
    verifier = Verifier(
        publish.names,
        publish.verify_servers,
        reactor=reactor,
        timeout=publish.timeout,
        doh=publish.doh,
    )
    if publish.method == "command":
        if shutil.which(publish.command[0]) is None:
            raise ConfigError(f"publish.command: {publish.command[0]}: program not found")
        return CommandPublisher(
            publish.command,
            publish.names,
            reactor=reactor,
            verifier=verifier,
            timeout=publish.timeout,
        )
    assert publish.server is not None  # the schema requires it for rfc2136
    return RFC2136Publisher(
        publish.names,
        publish.server,
        tsig if tsig is not None else load_tsig_key(publish),
        reactor=reactor,
        zone=publish.zone,
        ttl=publish.ttl,
        timeout=publish.timeout,
        verifier=verifier,
    )

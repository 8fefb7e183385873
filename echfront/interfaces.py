# -*- test-case-name: tests.test_routing -*-
"""The extension API: every seam where an operator plugs in their own code.

* :class:`IRouter` decides where a connection goes once its first
  ClientHello is decoded.  echfront ships a static table
  (:class:`echfront.routing.StaticRouter`); a custom router is any object
  providing :class:`IRouter`, made by a factory named by dotted path in the
  configuration (see ``docs/routing.rst``).
* :class:`IPublisher` puts ECHConfigLists into the DNS and checks them; key
  rotation drives it (:class:`echfront.keys.rotation.Rotator`).
* :class:`ServiceContext` is what a router factory or local service factory
  named in the configuration is given.

This module is the top of nothing and the bottom of much: it imports no other
echfront module at run time, so every wing may depend on it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from zope.interface import Interface

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred
    from twisted.internet.interfaces import IAddress

    from echfront.ech.decoder import ClientHelloInfo
    from echfront.ech.keyset import KeySet
    from echfront.targets import Backend, Local, Route

__all__ = ["IPublisher", "IRouter", "ServiceContext"]


class IRouter(Interface):
    """Chooses the target of a connection from its decoded ClientHello."""

    def route(hello: ClientHelloInfo, peer: IAddress) -> Route | Deferred[Route]:
        """Return the route for this connection, or a Deferred firing with it.

        :param hello: the decoded first ClientHello.  ``hello.server_name``
            and ``hello.alpn`` are the effective values: from the
            ClientHelloInner when ECH was accepted, else from the outer hello.
            ``hello.status`` tells which.
        :param peer: the client's address.
        :returns: a :class:`~echfront.targets.Backend` or
            :class:`~echfront.targets.Local` target *that the router was given
            by the configuration* (the front refuses any other: it is never an
            open proxy), or a :class:`~echfront.targets.Reject`.
        """


class IPublisher(Interface):
    """Puts an ECHConfigList into the DNS and checks that it is there."""

    def publish(config_list: bytes) -> Deferred[None]:
        """Make the HTTPS records of every configured name carry ``config_list``.

        ``config_list`` is an ECHConfigList with its 2-byte length (RFC 9849
        §4), which becomes the ``ech`` SvcParam (RFC 9848 §3, key 5) of the
        records, keeping every other SvcParam, priority, target and TTL of
        each existing record.  Fails with
        :class:`~echfront.dns.publish.PublishError`.
        """

    def verify(config_list: bytes) -> Deferred[bool]:
        """True when every configured name's records carry exactly ``config_list``.

        The records are queried from the authoritative server(s), and from
        the DoH resolver when one is configured.  False when answers came
        back without it; fails with :class:`~echfront.dns.publish.PublishError`
        when a source could not be asked.
        """


@dataclass(frozen=True)
class ServiceContext:
    """What a local factory or router factory named in the config is given.

    :ivar reactor: the reactor (use it; never import the global one).
    :ivar options: the ``options`` table of its section.
    :ivar keys: returns the key set currently in service (changes on reload).
    :ivar public_name: the public name, if known.
    :ivar alpn: the ALPN ids configured for the service.
    :ivar backends: for routers: configured backends by name.
    :ivar locals: for routers: configured local services by name; the
        public-name service, when configured, is ``locals["public"]``.
    :ivar static: for routers: the router built from ``[[routes]]``, to
        delegate to.
    """

    reactor: Any
    options: Mapping[str, Any]
    keys: Callable[[], KeySet]
    public_name: str | None = None
    alpn: tuple[str, ...] = ()
    backends: Mapping[str, Backend] = field(default_factory=dict)
    locals: Mapping[str, Local] = field(default_factory=dict)
    static: IRouter | None = None

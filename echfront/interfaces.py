# -*- test-case-name: tests.test_routing -*-
"""The interfaces where operators extend echfront.

A router decides where a connection goes once its first ClientHello is
decoded.  echfront ships a static table (:class:`echfront.routing.StaticRouter`);
a custom router is any object providing :class:`IRouter`, named by dotted
path in the configuration (see ``docs/routing.rst``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from zope.interface import Interface

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred
    from twisted.internet.interfaces import IAddress

    from echfront.ech.decoder import ClientHelloInfo
    from echfront.routing import Route

__all__ = ["IRouter"]


class IRouter(Interface):
    """Chooses the target of a connection from its decoded ClientHello."""

    def route(hello: ClientHelloInfo, peer: IAddress) -> Route | Deferred[Route]:
        """Return the route for this connection, or a Deferred firing with it.

        :param hello: the decoded first ClientHello.  ``hello.server_name``
            and ``hello.alpn`` are the effective values: from the
            ClientHelloInner when ECH was accepted, else from the outer hello.
            ``hello.status`` tells which.
        :param peer: the client's address.
        :returns: a :class:`~echfront.routing.Backend` or
            :class:`~echfront.routing.Local` target *that the router was given
            by the configuration* (the front refuses any other: it is never an
            open proxy), or a :class:`~echfront.routing.Reject`.
        """

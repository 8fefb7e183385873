# -*- test-case-name: tests.test_hardening_accept,tests.test_tap -*-
"""The front's listening services: ``listen`` entries, ``listen_quic`` ports, ``[metrics] listen``.

A ``listen`` entry's :class:`ListenerService` accepts, when it stops, the
connections already waiting in its socket's accept queue (their TCP
handshake done by the kernel) before the socket closes: closing would reset
them (:func:`echfront.front.accept.accept_queued`; the lean engine's ports
do it themselves).
"""

from __future__ import annotations

from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort

from echfront.config.endpoints import udp_listen_address
from echfront.errors import ConfigError
from echfront.front.accept import accept_queued
from echfront.front.datagram import QuicFront, QuicListener
from echfront.front.metrics import MetricsResource
from echfront.web import QuietSite

__all__ = ["ListenerService", "listen_quic", "metrics_service"]


class ListenerService(StreamServerEndpointService):
    """A ``listen`` entry's service: at stop, what is queued is accepted before the port closes.

    Closing a listening socket resets the connections its accept queue holds
    (:func:`echfront.front.accept.accept_queued`); the lean engine's ports
    take them themselves, Twisted's are asked to here.
    """

    def __init__(self, endpoint: Any, factory: Any) -> None:
        super().__init__(_KeepsPort(endpoint, self), factory)  # type: ignore[no-untyped-call]
        #: The listening port, once listening.
        self.port: IListeningPort | None = None

    def stopService(self) -> Deferred[None]:
        """Accept what is queued, then stop listening."""
        if self.port is not None:
            accept_queued(self.port)
            self.port = None
        stopped: Deferred[None] = super().stopService()  # type: ignore[no-untyped-call]
        return stopped


class _KeepsPort:
    """An endpoint that tells its :class:`ListenerService` the port it listens on."""

    def __init__(self, endpoint: Any, service: ListenerService) -> None:
        self.endpoint = endpoint
        self.service = service

    def listen(self, factory: Any) -> Deferred[IListeningPort]:
        def keep(port: IListeningPort) -> IListeningPort:
            self.service.port = port
            return port

        listening: Deferred[IListeningPort] = self.endpoint.listen(factory)
        return listening.addCallback(keep)


def listen_quic(
    reactor: Any, description: str, protocol: QuicFront, *, reuse_port: bool = False
) -> QuicListener:
    """The service of a ``listen_quic`` port (``udp:PORT[:interface=ADDR]``) for ``protocol``.

    :param reuse_port: bind with ``SO_REUSEPORT`` (``--workers``).
    :raises ConfigError: for a description that does not parse.
    """
    try:
        port, interface = udp_listen_address(description)
    except ValueError as error:
        raise ConfigError(f"listen_quic: {error}") from None
    return QuicListener(reactor, port, interface, protocol, reuse_port=reuse_port)


def metrics_service(description: str, registry: Any, reactor: Any) -> StreamServerEndpointService:
    """The ``--metrics`` listener: Prometheus text format on any path."""
    try:
        endpoint = serverFromString(reactor, description)
    except Exception as error:
        raise ConfigError(f"metrics: {description!r}: {error}") from None
    site = QuietSite(MetricsResource(registry))  # type: ignore[no-untyped-call]
    return StreamServerEndpointService(endpoint, site)

# -*- test-case-name: tests.test_hardening_accept -*-
"""At accept: refusals that close the socket, and listeners behind a balancer.

Two things every listening endpoint needs from the front, whatever its kind
(``tcp:``, ``unix:``, ``systemd:``, adopted by a worker, or behind a
balancer):

* a refused connection is closed at once, never left open: every endpoint
  listens with a :class:`ListenerFactory`, which answers a refusal with a
  :class:`Refused` protocol that aborts its transport as soon as it has
  one.  (None from ``buildProtocol`` closes the socket only where the
  listening port itself handles it; under a wrapping factory, such as
  Twisted's ``haproxy:`` endpoint or a TLS wrapper, it fails with an
  AttributeError and leaves the socket open, uncounted.  Where the port is
  known to be Twisted's own, None is answered: it is cheaper.)
* a ``[proxy] listen`` endpoint's :class:`ListenerFactory` is ``proxied``:
  the front accepts connections there only from the configured balancer
  networks (from anywhere else a PROXY header is a spoofed address:
  refused, :func:`trusted`) and reads a PROXY header
  (:mod:`echfront.front.proxyproto`) before the ClientHello.

And one thing at stop: connections the kernel has already queued on a
listening socket are accepted before it closes (closing would reset them),
:func:`accept_queued` for Twisted's own ports, as the lean engine's
:meth:`~echfront.front.leanport.LeanPort.stopListening` does for its own.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import TYPE_CHECKING, Protocol

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.endpoints import (
    AdoptedStreamServerEndpoint,
    TCP4ServerEndpoint,
    TCP6ServerEndpoint,
    UNIXServerEndpoint,
)
from twisted.internet.protocol import Factory
from twisted.internet.protocol import Protocol as TwistedProtocol
from twisted.internet.tcp import Port as TwistedPort

if TYPE_CHECKING:
    from twisted.internet.interfaces import IAddress, IProtocol, ITransport

    from echfront.front.proxyproto import ProxyHeader

__all__ = [
    "FrontBuilder",
    "ListenerFactory",
    "Refused",
    "accept_queued",
    "closes_refused",
    "proxied_addresses",
    "trusted",
]

_Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class Refused(TwistedProtocol):
    """A connection refused at accept: its transport is aborted at once.

    The refusal was counted by whoever built this; nothing is read or sent.
    """

    def makeConnection(self, transport: ITransport) -> None:
        """Abort the connection (RST on TCP: no TIME_WAIT kept for a refusal)."""
        self.transport = transport
        abort = getattr(transport, "abortConnection", None)
        if abort is not None:
            abort()
        else:
            transport.loseConnection()


#: Endpoints that listen with Twisted's own port (``tcp.Port``, ``unix.Port``),
#: which closes the socket when the factory answers None.
_BARE_PORT_ENDPOINTS = (
    TCP4ServerEndpoint,
    TCP6ServerEndpoint,
    UNIXServerEndpoint,
    AdoptedStreamServerEndpoint,
)


def closes_refused(endpoint: object) -> bool:
    """Whether ``endpoint`` listens with a port that closes the socket of a refusal (None).

    True for ``tcp:``, ``tcp6:``, ``unix:`` and ``systemd:`` endpoints, and
    for any endpoint that says so with a true ``closes_refused`` attribute
    (its port closes the socket of a None itself); False for anything that
    may wrap the factory (TLS, plugins).
    """
    return type(endpoint) in _BARE_PORT_ENDPOINTS or getattr(endpoint, "closes_refused", 0) is True


#: Queued connections :func:`accept_queued` takes at most (a full backlog
#: of the lean engine's default size), so a flood cannot hold a port open.
ACCEPT_QUEUED_LIMIT = 1024


def accept_queued(port: object, limit: int = ACCEPT_QUEUED_LIMIT) -> None:
    """Accept the connections queued on Twisted's listening ``port``, before it is closed.

    Closing a listening socket resets the connections in its accept queue,
    whose TCP handshake the kernel has already completed; accepted, they are
    served like any other open connection.  Twisted's ``Port.doRead``
    accepts up to ``numberAccepts`` at a time and raises that number by 20
    only when it found no end to the queue, so the loop stops at the first
    call that did.  Other ports are left alone (the lean engine's drains
    itself); so is a port already closing.
    """
    if not isinstance(port, TwistedPort) or not port.connected or port.disconnecting:
        return
    taken = 0
    while taken < limit:
        batch = port.numberAccepts
        port.doRead()
        if port.numberAccepts != batch + 20:
            return
        taken += batch


def trusted(host: object, networks: Iterable[_Network]) -> bool:
    """Whether ``host`` (an address's text) is in one of ``networks``."""
    if not isinstance(host, str):
        return False
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # a dual-stack socket's view of an IPv4 balancer
    return any(ip.version == network.version and ip in network for network in networks)


def proxied_addresses(header: ProxyHeader) -> tuple[IAddress, IAddress] | None:
    """The client's and the balancer's addresses a PROXY header gives, as Twisted's.

    None when the header says to keep the connection's own endpoints.
    """
    if header.source is None or header.destination is None:
        return None
    (source, source_port), (destination, destination_port) = header.source, header.destination
    kind = IPv4Address if source.version == 4 else IPv6Address
    return (
        kind("TCP", str(source), source_port),
        kind("TCP", str(destination), destination_port),
    )


class FrontBuilder(Protocol):
    """What a :class:`ListenerFactory` needs of the front's factory."""

    def build(self, addr: IAddress, *, proxied: bool) -> IProtocol | None:
        """A protocol for a connection from ``addr``, None to refuse (counted already).

        ``proxied``: the connection starts with a PROXY header.
        """

    def doStart(self) -> None:
        """A listener starts using the factory."""

    def doStop(self) -> None:
        """A listener stops using the factory."""


class ListenerFactory(Factory):
    """The factory every listening endpoint listens with.

    Connections are built by the front's own factory, so every listener
    shares its connections, limits and metrics.  A refusal (None from the
    front) becomes a :class:`Refused` protocol, which closes the socket on
    any kind of endpoint, wrapped or not.  Starting and stopping are passed
    on, so the front's factory counts this listener among its ports.

    :param proxied: a ``[proxy] listen`` endpoint: connections start with a
        balancer's PROXY header.
    :param bare_port: the factory is called by Twisted's own listening port
        (:func:`closes_refused`), which closes the socket of a None at once:
        then None is answered, which costs about half as much as a
        :class:`Refused` protocol (no transport is built), and a flood is
        shed twice as fast.
    """

    noisy = False

    def __init__(
        self, front: FrontBuilder, *, proxied: bool = False, bare_port: bool = False
    ) -> None:
        """Build connections with ``front``."""
        self.front = front
        self.proxied = proxied
        self.bare_port = bare_port

    def buildProtocol(self, addr: IAddress) -> IProtocol | None:  # type: ignore[override]
        """The front's connection, or a refusal that closes the socket."""
        protocol = self.front.build(addr, proxied=self.proxied)
        if protocol is None and not self.bare_port:
            return Refused()
        return protocol

    def logPrefix(self) -> str:
        """The front's name in the port's log lines ("FrontFactory starting on 443")."""
        name = type(self.front).__name__
        return f"{name} (PROXY protocol)" if self.proxied else name

    def doStart(self) -> None:
        """Tell the front's factory a listener started."""
        self.front.doStart()

    def doStop(self) -> None:
        """Tell the front's factory a listener stopped."""
        self.front.doStop()

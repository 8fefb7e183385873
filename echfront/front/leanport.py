# -*- test-case-name: tests.test_engine -*-
"""Listening on the lean engine: a raw accept loop under a Twisted listening port's API.

:class:`LeanPort` is an ``IListeningPort``: the reactor watches its socket,
and each wake-up accepts until the queue is empty (bounded per wake-up, so
a flood cannot starve the connections already open).  Every accepted
socket becomes a :class:`~echfront.front.leantransport.LeanTransport` with
the protocol the factory builds for it, exactly as a Twisted port would
(a factory that returns None closes the socket).  A
:class:`~echfront.front.protocol.FrontProtocol` gets its deadlines from the
engine's :class:`~echfront.front.deadlines.DeadlineClock`.

:class:`LeanServerEndpoint` makes a ``tcp:``/``tcp6:`` server endpoint
listen this way (:func:`lean_endpoint` wraps one made by
``serverFromString``), and :func:`adopt_port` does the same for a listening
socket a ``--workers`` process was handed or opened with ``SO_REUSEPORT``.
"""

from __future__ import annotations

import _socket
import errno
import socket
from typing import TYPE_CHECKING, Any

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, execute
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint
from twisted.internet.interfaces import (
    IListeningPort,
    IReactorFDSet,
    IReadDescriptor,
    IStreamServerEndpoint,
)
from twisted.internet.posixbase import PosixReactorBase
from twisted.logger import Logger
from zope.interface import implementer

from echfront.front.engine import AVAILABLE, engine_for
from echfront.front.leantransport import LeanTransport
from echfront.front.protocol import FrontProtocol

if TYPE_CHECKING:
    from twisted.internet.interfaces import IProtocolFactory
    from twisted.python.failure import Failure

__all__ = ["DEFAULT_BACKLOG", "LeanPort", "LeanServerEndpoint", "adopt_port", "lean_endpoint"]

#: Listen backlog when none is given (Twisted's 50 drops a burst's SYNs).
DEFAULT_BACKLOG = 1024
#: Connections accepted per wake-up at most.
ACCEPT_BATCH = 128
#: Queued connections accepted at most when a port closes (see
#: :meth:`LeanPort.stopListening`): a full default backlog.
DRAIN_LIMIT = DEFAULT_BACKLOG
#: accept(2) errors that mean "not now" for this one connection or wake-up.
_ACCEPT_LATER = frozenset(
    (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM, errno.ECONNABORTED, errno.EPROTO)
)

_log = Logger(namespace="echfront.engine")


def _address(family: int, sockaddr: Any) -> IPv4Address | IPv6Address:
    if family == socket.AF_INET6:
        return IPv6Address("TCP", sockaddr[0], sockaddr[1])
    return IPv4Address("TCP", sockaddr[0], sockaddr[1])


@implementer(IListeningPort, IReadDescriptor)
class LeanPort:
    """A listening TCP socket whose connections run on the lean engine.

    :param reactor: watches the listening socket; its engine runs the connections.
    :param factory: builds each connection's protocol.
    :param sock: a listening socket to use (adopted); otherwise one is made
        by :meth:`startListening` from ``port``, ``interface`` and ``backlog``.
    """

    def __init__(
        self,
        reactor: Any,
        factory: IProtocolFactory,
        *,
        port: int = 0,
        interface: str = "",
        backlog: int = DEFAULT_BACKLOG,
        sock: socket.socket | None = None,
    ) -> None:
        """Prepare; nothing listens until :meth:`startListening`."""
        self.reactor = reactor
        self.engine = engine_for(IReactorFDSet(reactor))
        self.factory = factory
        self.port = port
        self.interface = interface
        self.backlog = backlog
        self.socket = sock
        self._host: IPv4Address | IPv6Address | None = None
        self.listening = False

    def startListening(self) -> None:
        """Bind and listen (unless adopted), then accept as the reactor says."""
        sock = self.socket
        if sock is None:
            family = socket.AF_INET6 if ":" in self.interface else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind((self.interface, self.port))
                sock.listen(self.backlog)
            except OSError:
                sock.close()
                raise
            self.socket = sock
        sock.setblocking(False)
        self._host = _address(sock.family, sock.getsockname())
        self.factory.doStart()
        self.listening = True
        self.reactor.addReader(self)
        # The line Twisted's own port logs, so both engines read the same.
        _log.info("{prefix} starting on {port}", prefix=self._prefix(), port=self._host.port)

    def _prefix(self) -> str:
        log_prefix = getattr(self.factory, "logPrefix", None)
        return log_prefix() if callable(log_prefix) else type(self.factory).__name__

    def doRead(self) -> None:
        """Accept what is queued (up to :data:`ACCEPT_BATCH`), each onto the engine."""
        if self.socket is not None and self.listening:
            self._accept(ACCEPT_BATCH)

    def _accept(self, limit: int) -> None:
        """Accept queued connections until the queue is empty, ``limit`` at most."""
        sock = self.socket
        assert sock is not None
        engine = self.engine
        host = self._host
        assert host is not None
        family = sock.family
        factory = self.factory
        # The C methods: socket.socket.accept would build a Python-level
        # socket object per connection around the same descriptor.
        accept = sock._accept  # type: ignore[attr-defined]
        for _ in range(limit):
            try:
                fd, sockaddr = accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:
                if error.errno in _ACCEPT_LATER:
                    _log.warn("accept failed: {error}", error=error)
                    return
                raise
            conn = _socket.socket(family, socket.SOCK_STREAM, 0, fd)
            conn.setblocking(False)
            peer = _address(family, sockaddr)
            try:
                protocol = factory.buildProtocol(peer)
            except Exception:
                _log.failure("buildProtocol failed")
                conn.close()
                continue
            if protocol is None:
                conn.close()
                continue
            if isinstance(protocol, FrontProtocol) and protocol.reactor is engine.time:
                # Its first-flight, handshake and close deadlines: coarse,
                # from the engine's one timer (see DeadlineClock).
                protocol.reactor = engine.clock
            LeanTransport(engine, conn, peer, protocol, host).start()

    def stopListening(self) -> None:
        """Accept what is already queued, then close the listening socket; open connections go on.

        Closing a listening socket resets every connection in its accept
        queue: clients whose handshake the kernel already completed (and
        whose ClientHello may be on the way) would see a reset instead of an
        answer.  They are accepted first and served like any other open
        connection (at shutdown, within ``shutdown_grace``).  At most the
        larger of the backlog and :data:`DRAIN_LIMIT` are taken, so a flood
        cannot hold the port open.
        """
        if not self.listening:
            return
        self.reactor.removeReader(self)
        sock = self.socket
        if sock is not None:
            try:
                self._accept(max(self.backlog, DRAIN_LIMIT))
            except OSError as error:
                _log.warn("accept failed while closing: {error}", error=error)
        self.listening = False
        if sock is not None:
            sock.close()
        self.factory.doStop()
        if self._host is not None:
            _log.info("({prefix} Port {port} Closed)", prefix="TCP", port=self._host.port)

    def connectionLost(self, reason: Failure) -> None:
        """The reactor dropped the listening socket."""
        self.stopListening()

    def fileno(self) -> int:
        """The listening socket's descriptor (-1 once closed)."""
        return -1 if self.socket is None else self.socket.fileno()

    def logPrefix(self) -> str:
        """Name in Twisted's logs."""
        return "LeanPort"

    def getHost(self) -> IPv4Address | IPv6Address:
        """The address listened on."""
        assert self._host is not None, "not listening"
        return self._host


@implementer(IStreamServerEndpoint)
class LeanServerEndpoint:
    """A TCP server endpoint whose port is a :class:`LeanPort`."""

    def __init__(
        self, reactor: Any, port: int, *, interface: str = "", backlog: int = DEFAULT_BACKLOG
    ) -> None:
        """Listen on ``interface``:``port`` with ``backlog``."""
        self.reactor = reactor
        self.port = port
        self.interface = interface
        self.backlog = backlog

    def listen(self, protocolFactory: IProtocolFactory) -> Deferred[IListeningPort]:  # noqa: N803
        """Start a :class:`LeanPort` for ``protocolFactory``."""

        def start() -> IListeningPort:
            port = LeanPort(
                self.reactor,
                protocolFactory,
                port=self.port,
                interface=self.interface,
                backlog=self.backlog,
            )
            port.startListening()
            return port

        return execute(start)


def lean_endpoint(reactor: Any, endpoint: Any) -> Any:
    """``endpoint`` listening on the lean engine, if it is a plain TCP one; else unchanged.

    A ``tcp:``/``tcp6:`` endpoint from ``serverFromString`` carries its port,
    interface and backlog (Twisted's ``_TCPServerEndpoint`` keeps them as
    ``_port``, ``_interface`` and ``_backlog``; anything that does not is
    left to Twisted), and the reactor must be one that watches real
    descriptors (a posix reactor, on Linux).
    """
    if not AVAILABLE or not isinstance(endpoint, TCP4ServerEndpoint | TCP6ServerEndpoint):
        return endpoint
    if not isinstance(reactor, PosixReactorBase):
        return endpoint
    port = getattr(endpoint, "_port", None)
    interface = getattr(endpoint, "_interface", None)
    backlog = getattr(endpoint, "_backlog", None)
    if not isinstance(port, int) or not isinstance(interface, str) or not isinstance(backlog, int):
        return endpoint
    if isinstance(endpoint, TCP6ServerEndpoint) and not interface:
        interface = "::"
    return LeanServerEndpoint(reactor, port, interface=interface, backlog=backlog)


def adopt_port(reactor: Any, fd: int, family: int, factory: IProtocolFactory) -> IListeningPort:
    """Listen on an inherited listening socket ``fd`` on the lean engine.

    As ``reactor.adoptStreamPort``: the descriptor is duplicated (the caller
    may close its own).  UNIX sockets, and reactors that do not watch real
    descriptors, get Twisted's port instead.
    """
    if (
        not AVAILABLE
        or family not in (socket.AF_INET, socket.AF_INET6)
        or not isinstance(reactor, PosixReactorBase)
    ):
        twisted_port: IListeningPort = reactor.adoptStreamPort(fd, family, factory)
        return twisted_port
    sock = socket.socket(family, socket.SOCK_STREAM, 0, socket.dup(fd))
    port = LeanPort(reactor, factory, sock=sock)
    port.startListening()
    return port

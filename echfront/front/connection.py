"""The hand-off between the front protocol and its handlers, declared once.

:class:`~echfront.front.protocol.FrontProtocol` reads the first flight and
decides; a handler (:class:`~echfront.front.relay.Relay`,
:class:`~echfront.front.local.LocalHandoff`) carries the connection from
there.  Each side needs a few things of the other, and each need is
declared here as a :class:`typing.Protocol`, so neither module imports the
other:

* :class:`ClientSide`: what a handler needs of the client's connection
  (the front protocol satisfies it);
* :class:`Handler`: what the front protocol needs of a handler.

Also here, because every layer of one connection shares them: the
:class:`ConnectionRecord` that logs and metrics report, the
:class:`StreamTransport` shape of a connected transport, and the fields of
the connection's log event (:func:`connection_event_fields`, documented in
docs/operations.rst).  Nothing here imports Twisted at run time.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from echfront.ech.decoder import ECHStatus
from echfront.errors import alert_name

if TYPE_CHECKING:
    from twisted.internet.interfaces import IAddress
    from twisted.python.failure import Failure

    from echfront.ech.decoder import HelloSummary
    from echfront.errors import AlertDescription

__all__ = [
    "CONNECTION_EVENT",
    "CONNECTION_FIELDS",
    "ClientSide",
    "ConnectionRecord",
    "Handler",
    "StreamTransport",
    "client_endpoints",
    "connection_event_fields",
    "format_address",
]


class StreamTransport(Protocol):
    """What the front needs of a connected stream transport (TCP, UNIX, TLS...).

    Twisted types ``Protocol.transport`` as an optional ``ITransport``; the
    producer and abort methods used here are on every stream transport
    Twisted has, so protocols here narrow the attribute to this.
    """

    def write(self, data: bytes) -> None: ...
    def loseConnection(self) -> None: ...
    def abortConnection(self) -> None: ...
    def getPeer(self) -> IAddress: ...
    def getHost(self) -> IAddress: ...
    def pauseProducing(self) -> None: ...
    def resumeProducing(self) -> None: ...
    def registerProducer(self, producer: Any, streaming: bool) -> None: ...
    def unregisterProducer(self) -> None: ...


#: Each ECH outcome's name (its value), looked up in a dict: Enum.value is
#: a descriptor call, and every connection's metrics and log line ask.
_ECH_NAMES = {status: status.value for status in ECHStatus}


@dataclass(slots=True)
class ConnectionRecord:
    """Facts about one connection, filled in as it progresses (for logs, metrics).

    :ivar started: the reactor's seconds at accept.
    :ivar address: the client address as limits account it.
    :ivar limit: the limit that closed the connection, if one did.
    :ivar proxied: the client's address and the address it connected to, as
        a balancer's PROXY header told them; None when the transport's own
        endpoints are the client's (see :func:`client_endpoints`).
    """

    started: float
    peer: str = ""
    address: str = ""
    hello: HelloSummary | None = None
    route: str = ""
    alert: AlertDescription | None = None
    close_reason: str = ""
    limit: str = ""
    first_flight_bytes: int = 0
    hello_retry: bool = False
    bytes_from_client: int = 0
    bytes_to_client: int = 0
    zero_copy: bool = False
    proxied: tuple[IAddress, IAddress] | None = None

    @property
    def ech(self) -> str:
        """The ECH outcome as logs and metrics name it; ``error`` before decoding."""
        return "error" if self.hello is None else _ECH_NAMES[self.hello.status]


class ClientSide(Protocol):
    """What a handler needs of the client's connection; the front protocol is one.

    :ivar transport: the client's transport; the handler writes to it and
        closes it, and registers it as a producer.
    :ivar record: the connection's facts; the handler counts bytes into it.
    """

    transport: StreamTransport
    record: ConnectionRecord

    def set_input(self, sink: Callable[[bytes], object]) -> None:
        """Send every later read from the client to ``sink``.

        Bytes the front held since the hand-off started (from a transport
        that ignored its pause) go to ``sink`` first.
        """

    def handshake_done(self) -> None:
        """The inspected phase is over: stop its deadline, release the hellos."""

    def refuse(self, alert: AlertDescription, reason: str) -> None:
        """Send a fatal ``alert`` and close; ``reason`` is logged (RFC 8446 §6.2)."""


class Handler(Protocol):
    """What the front protocol needs of the handler it hands a connection to."""

    def start(self, pending: bytes) -> None:
        """Take the connection; ``pending`` is what the client sent past the ClientHello."""

    def handshake_pending(self) -> bool:
        """Whether the handler is still in its inspected (handshake) phase.

        The handshake deadline and the idle sweep ask this: a local TLS
        handshake ends inside Twisted's TLS layer, which tells no one but
        the application, so the front cannot learn it any other way.
        """

    def client_eof(self) -> None:
        """The client sent FIN."""

    def client_lost(self, reason: Failure) -> None:
        """The client connection is gone."""

    def abort(self) -> None:
        """The front is dropping the connection: release the handler's side at once."""


def client_endpoints(client: ClientSide) -> tuple[IAddress, IAddress]:
    """The client's address and the address it connected to, as the front knows them.

    Behind a balancer that sends a PROXY header, the header's; otherwise
    the transport's peer and host.
    """
    proxied = client.record.proxied
    if proxied is not None:
        return proxied
    return client.transport.getPeer(), client.transport.getHost()


def format_address(address: object) -> str:
    """``host:port`` (``[host]:port`` for IPv6), or the address's own text."""
    host = getattr(address, "host", None)
    port = getattr(address, "port", None)
    if isinstance(host, str) and isinstance(port, int):
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    name = getattr(address, "name", None)
    return name.decode("utf-8", "replace") if isinstance(name, bytes) else str(address)


#: The key (valued True) that marks a connection's log event, so that
#: observers (echfront.logs) can write its fields out.
CONNECTION_EVENT = "echfront_connection"

#: The fields of a connection event, in the order the text form shows them.
CONNECTION_FIELDS = (
    "peer",
    "route",
    "ech",
    "config_id",
    "alert",
    "hrr",
    "bytes_from_client",
    "bytes_to_client",
    "first_flight_bytes",
    "duration",
    "close_reason",
    "zero_copy",
    "worker",
    "server_name",
)


#: This process's id for the ``worker`` field, read once rather than with a
#: system call per connection, and read again in a forked child.
_pid = os.getpid()


def _forked() -> None:
    global _pid  # noqa: PLW0603 - the one cached value, reset by fork
    _pid = os.getpid()


os.register_at_fork(after_in_child=_forked)


def connection_event_fields(
    record: ConnectionRecord, now: float, *, log_server_names: bool
) -> dict[str, Any]:
    """The fields of one connection's log event (see :mod:`echfront.logs`).

    The server name of an ECH-accepted connection is the secret ECH
    protects (RFC 9849 §10.5), so it is included only when
    ``log_server_names``; names the client sent in the clear are included.
    """
    info = record.hello
    fields: dict[str, Any] = {
        "peer": record.peer,
        "route": record.route or "none",
        "ech": record.ech,
        "config_id": None if info is None else info.config_id,
        "alert": None if record.alert is None else alert_name(record.alert),
        "hrr": record.hello_retry,
        "bytes_from_client": record.bytes_from_client,
        "bytes_to_client": record.bytes_to_client,
        "first_flight_bytes": record.first_flight_bytes,
        "duration": round(now - record.started, 6),
        "close_reason": record.close_reason,
        "zero_copy": record.zero_copy,
        "worker": _pid,
    }
    if info is not None and (log_server_names or info.status is not ECHStatus.ACCEPTED):
        fields["server_name"] = info.server_name
    return fields

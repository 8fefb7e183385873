# -*- test-case-name: tests.test_routing -*-
"""What a router returns: the targets of a connection.

A connection goes to one of three kinds of target:

* :class:`Backend`: relay raw bytes to a backend reached through a Twisted
  client endpoint; the backend terminates TLS (and confirms ECH), RFC 9849
  split mode (§3.1);
* :class:`Local`: terminate TLS here with pyOpenSSL and hand the plaintext to
  a Twisted protocol factory;
* :class:`Reject`: send a TLS alert and close.

Targets are plain values: they name what to connect to, and the front does
the connecting.  The front only connects to targets the configuration
defined, so a router can never make it an open proxy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeAlias

from echfront.errors import AlertDescription

if TYPE_CHECKING:
    from twisted.internet.interfaces import IStreamClientEndpoint
    from twisted.protocols.tls import TLSMemoryBIOFactory

__all__ = [
    "ECH_REQUIRED_REFUSAL",
    "UNRECOGNIZED",
    "Backend",
    "Local",
    "Reject",
    "Route",
]


@dataclass(frozen=True, eq=False)
class Backend:
    """Relay to a backend that terminates TLS itself (RFC 9849 split mode).

    :ivar name: the configuration name, used in logs and metrics.
    :ivar endpoint: how to reach it (any Twisted client endpoint).
    :ivar description: the endpoint string, for logs.
    :ivar connect_timeout: seconds to wait for the connection.
    :ivar proxy_protocol: 0 (none), 1 or 2: send a PROXY protocol header first.
    :ivar address: (host, port) when the endpoint is a plain ``tcp:`` one;
        the relay then connects with the reactor's connectTCP directly.
    """

    name: str
    endpoint: IStreamClientEndpoint
    description: str = ""
    connect_timeout: float = 10.0
    proxy_protocol: int = 0
    address: tuple[str, int] | None = None


@dataclass(frozen=True, eq=False)
class Local:
    """Terminate TLS in the front and serve the plaintext with a local factory.

    :ivar name: the configuration name.
    :ivar tls_factory: a TLSMemoryBIOFactory (server side) wrapping the
        application factory, with the certificate for the names routed here.
    """

    name: str
    tls_factory: TLSMemoryBIOFactory


@dataclass(frozen=True)
class Reject:
    """Refuse the connection with a TLS alert."""

    alert: AlertDescription
    reason: str = ""

    @property
    def name(self) -> str:
        """A name for logs and metrics: ``reject:<alert>``."""
        return f"reject:{self.alert.name.lower()}"


Route: TypeAlias = Backend | Local | Reject

#: The target for a name that has no route, by default.
UNRECOGNIZED = Reject(AlertDescription.UNRECOGNIZED_NAME, "no route for this server name")
#: The target for a require_ech name reached without ECH.
ECH_REQUIRED_REFUSAL = Reject(AlertDescription.UNRECOGNIZED_NAME, "route requires ECH")

"""What a connection is decided with: settings and state, replaced whole on reload.

Everything a connection needs (decoder, router, allowed targets, limits) is
one immutable :class:`FrontState`.  The factory holds the current state and
a reload swaps it; each connection keeps the state it was accepted with.
The defaults of every setting live here, on :class:`FrontSettings`, and
nowhere else.  This module imports no Twisted at run time (the
configuration's parser reads these defaults without starting a front).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from ipaddress import IPv4Network, IPv6Network
from typing import TYPE_CHECKING

from echfront.tls.records import DEFAULT_MAX_FLIGHT

if TYPE_CHECKING:
    from echfront.ech.decoder import ECHDecoder
    from echfront.interfaces import IRouter
    from echfront.targets import Backend, Local

__all__ = ["FrontSettings", "FrontState"]


@dataclass(frozen=True)
class FrontSettings:
    """Limits and switches that may change on reload, each with a safe default.

    :ivar first_flight_timeout: seconds to receive the whole ClientHello;
        a client that is slower is aborted (slowloris, checklist PAR-10).
    :ivar handshake_timeout: seconds from the ClientHello to the end of the
        inspected phase: the backend's ServerHello when relaying, the TLS
        handshake when terminating locally.
    :ivar max_first_flight: bytes of records the ClientHello may occupy.
    :ivar idle_timeout: seconds without a byte either way after which a
        relayed or locally served connection is closed (0: never).  Checked
        by a sweep every ``idle_timeout / 2`` seconds, so a connection is
        closed after between one and one and a half times this.
    :ivar max_connections: open client connections; new ones beyond it are
        closed at once (0: unlimited).
    :ivar max_first_flights_per_address: a hard cap on unfinished first
        flights per client address (IPv6: per /64); more are closed at once
        (0: none, the default; see ``saturation_first_flights``).
    :ivar hpke_rate: a hard cap on HPKE decryptions per second per client
        address (0: none, the default); a ClientHello beyond it gets
        handshake_failure.
    :ivar hpke_burst: how many of those may come at once.
    :ivar saturation_first_flights: the front counts as saturated while
        more first flights than this are unfinished; only then are
        connections and decryptions shed, from the addresses asking most
        beyond a fair share (:mod:`echfront.front.limits`; 0: never).
    :ivar proxy_from: the networks whose connections to a ``[proxy] listen``
        endpoint may carry a PROXY protocol header; others are refused.
    :ivar log_server_names: log the inner server name of ECH connections.
    :ivar shutdown_grace: seconds open connections get to finish on shutdown.
    :ivar splice: relay with splice(2) once inspection is over (Linux).
    """

    first_flight_timeout: float = 10.0
    handshake_timeout: float = 30.0
    max_first_flight: int = DEFAULT_MAX_FLIGHT
    idle_timeout: float = 300.0
    max_connections: int = 10000
    max_first_flights_per_address: int = 0
    hpke_rate: float = 0.0
    hpke_burst: float = 0.0
    saturation_first_flights: int = 256
    proxy_from: tuple[IPv4Network | IPv6Network, ...] = ()
    log_server_names: bool = False
    shutdown_grace: float = 30.0
    splice: bool = True


@dataclass(frozen=True)
class FrontState:
    """What a connection is decided with; replaced as a whole on reload.

    :ivar targets: the only connectable targets; a router returning any
        other is refused, so the front is never an open proxy.
    """

    decoder: ECHDecoder
    router: IRouter
    targets: frozenset[Backend | Local]
    settings: FrontSettings = field(default_factory=FrontSettings)

# -*- test-case-name: tests.test_quic_packets -*-
"""Whether a datagram of no known flow starts one, sans-IO (RFC 9000 §5.2.2, §6.1, §7.2, §14.1).

The first step of a datagram relay: :func:`admit` answers "start a flow
(here is the client's first Initial)", "send this Version Negotiation
packet", or "drop it (here is why)", without keeping any state, so
unsolicited datagrams cost the front nothing but this parse.

:class:`QuicSettings` holds the bounds a relay's flow table applies on top
(how many flows, per address, for how long); its defaults are written here
once and read by the configuration's parser, which must not load Twisted.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from echfront.quic.errors import QuicDrop
from echfront.quic.packets import (
    MIN_INITIAL_DATAGRAM,
    LongHeader,
    PacketType,
    build_version_negotiation,
    parse_long_header,
)

__all__ = ["MIN_CLIENT_DCID", "Admission", "QuicSettings", "admit"]

#: RFC 9000 §7.2: a client's first Destination Connection ID has at least 8 bytes.
MIN_CLIENT_DCID = 8


@dataclass(frozen=True, slots=True)
class QuicSettings:
    """The flow table's bounds (``[quic]`` in the configuration), each with a safe default.

    :ivar idle_timeout: seconds without a datagram either way after which a
        flow is forgotten; keep it above the backends' QUIC
        ``max_idle_timeout`` (RFC 9000 §10.1), or idle connections that are
        still alive lose their way through the front.
    :ivar max_flows: flows at once (each holds one UDP socket); a new
        connection beyond it is refused with CONNECTION_REFUSED (RFC 9000
        §5.2.2).  0: unlimited.
    :ivar max_flows_per_address: a hard cap on flows per client address
        (IPv6: per /64), likewise.  0 (the default): none, as for TCP
        connections; the front's fair-share shedding applies to QUIC too.
    :ivar hello_timeout: seconds a ClientHello may take to arrive whole
        (also a second one after a HelloRetryRequest).
    """

    idle_timeout: float = 120.0
    max_flows: int = 10000
    max_flows_per_address: int = 0
    hello_timeout: float = 3.0


@dataclass(frozen=True, slots=True)
class Admission:
    """What to do with a datagram that belongs to no flow.

    :ivar header: set when a flow should start: the client's first Initial.
    :ivar reply: a Version Negotiation packet to send back, if any.
    :ivar reason: why nothing starts, for logs ("" when it does).
    """

    header: LongHeader | None
    reply: bytes | None
    reason: str


def admit(datagram: bytes, *, random: Callable[[int], bytes] = os.urandom) -> Admission:
    """Decide whether a datagram of no known flow starts one (RFC 9000 §5.2.2, §6.1, §14.1).

    Datagrams under 1200 bytes are dropped whatever they hold (§14.1 for
    Initials, §5.2.2 for unknown versions); an unknown version gets a Version
    Negotiation packet; a supported one must be an Initial whose Destination
    Connection ID has at least 8 bytes (§7.2).
    """
    if len(datagram) < MIN_INITIAL_DATAGRAM:
        return Admission(None, None, "datagram shorter than 1200 bytes")
    try:
        header = parse_long_header(datagram)
    except QuicDrop as drop:
        return Admission(None, None, str(drop))
    if header.version == 0:
        return Admission(None, None, "Version Negotiation packet from a client")
    if header.quic_version is None:
        reply = build_version_negotiation(header, random=random)
        return Admission(None, reply, f"unsupported version 0x{header.version:08x}")
    if header.packet_type is not PacketType.INITIAL:
        return Admission(None, None, f"{header.packet_type} packet before any Initial")
    if len(header.dcid) < MIN_CLIENT_DCID:
        return Admission(None, None, "client Destination Connection ID shorter than 8 bytes")
    return Admission(header, None, "")

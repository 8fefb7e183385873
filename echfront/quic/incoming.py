# -*- test-case-name: tests.test_quic_flow -*-
"""A client datagram taken apart: Initial packets decrypted, the rest kept raw (RFC 9000 §12.2).

:func:`read_client_datagram` walks the packets coalesced in a datagram,
removes protection from the Initial ones with the flow's keys (RFC 9001 §5)
and parses their frames (RFC 9000 §12.4).  Other long-header packets (0-RTT,
Handshake) and a trailing short-header packet are not the front's to read:
they are kept, byte for byte, as the datagram's ``tail``.  Initial packets
that fail authentication are counted and dropped (RFC 9001 §5.3); a frame
that an Initial must not carry is a connection error for the caller.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from echfront.quic.errors import QuicDrop
from echfront.quic.frames import InitialPayload, parse_initial_frames
from echfront.quic.packets import (
    MIN_INITIAL_DATAGRAM,
    LongHeader,
    PacketType,
    QuicVersion,
    split_datagram,
)
from echfront.quic.protection import PacketKeys, Unprotected, unprotect

__all__ = ["ClientDatagram", "ClientInitial", "read_client_datagram"]


class ClientInitial(NamedTuple):
    """One client Initial packet with protection removed."""

    header: LongHeader
    version: QuicVersion
    plain: Unprotected
    frames: InitialPayload


class ClientDatagram(NamedTuple):
    """A client datagram: its Initial packets read, everything else raw.

    :ivar raw: the datagram as received.
    :ivar initials: its Initial packets that authenticated, in datagram order.
    :ivar tail: its other packets, concatenated as they came.
    :ivar dropped: packets discarded (failed authentication, Retry, unknown).
    """

    raw: bytes
    initials: list[ClientInitial]
    tail: bytes
    dropped: int


def read_client_datagram(
    datagram: bytes, keys_for: Callable[[QuicVersion], PacketKeys], largest_pn: int | None
) -> ClientDatagram:
    """Split a long-header client datagram and open its Initial packets.

    :param keys_for: the client-direction Initial keys of a version.
    :param largest_pn: the largest client Initial packet number so far, for
        packet number decoding (RFC 9000 §17.1).
    :raises QuicDrop: when the first packet is unreadable, or the datagram
        carries an Initial in fewer than 1200 bytes (RFC 9000 §14.1: a server
        MUST discard it).
    :raises QuicError: for frames an Initial packet must not carry.
    """
    packets, rest = split_datagram(datagram)
    if len(datagram) < MIN_INITIAL_DATAGRAM and any(
        p.packet_type is PacketType.INITIAL for p in packets
    ):
        raise QuicDrop("Initial packet in a datagram shorter than 1200 bytes")
    initials: list[ClientInitial] = []
    tail: list[bytes] = []
    dropped = 0
    for header in packets:
        version = header.quic_version
        if header.packet_type is not PacketType.INITIAL or version is None:
            if header.packet_type is not PacketType.RETRY and version is not None:
                tail.append(datagram[header.start : header.end])
            else:
                dropped += 1
            continue
        try:
            plain = unprotect(datagram, header, keys_for(version), largest_pn)
        except QuicDrop:
            dropped += 1
            continue
        initials.append(ClientInitial(header, version, plain, parse_initial_frames(plain.payload)))
        if largest_pn is None or plain.packet_number > largest_pn:
            largest_pn = plain.packet_number
    if rest < len(datagram) and datagram[rest] & 0x40:
        tail.append(datagram[rest:])  # a short-header packet, coalesced last
    return ClientDatagram(datagram, initials, b"".join(tail), dropped)

# -*- test-case-name: tests.test_quic_flow -*-
"""Building the Initial packets a backend receives in place of the client's, sans-IO.

Two pure steps the flow (:mod:`echfront.quic.flow`) composes:

* :class:`Segment` and :func:`backend_ranges`: where client CRYPTO bytes
  land in the backend's CRYPTO stream.  The client's stream holds the
  ClientHelloOuter (and, after a HelloRetryRequest, the second outer hello);
  the backend's holds the ClientHelloInner(s), of different lengths.  A
  segment that was just completed is sent whole.  A retransmission of part of
  an older segment maps to the *proportional* part of the inner hello,
  rounded outwards, so whenever a client's retransmissions cover its hello
  they cover the inner one too, and a retransmission costs about what it
  carried.
* :func:`close_datagram`: the front's own CONNECTION_CLOSE in an Initial,
  either direction.
* :func:`pack_initials`: CRYPTO data and the client's other frames (ACK,
  PING, CONNECTION_CLOSE) into protected Initial packets, one per client
  packet, under the client's header fields (connection IDs, token), coalesced
  into datagrams of at most ``max_datagram`` bytes, each padded to at least
  1200 bytes (RFC 9000 §14.1).  Packet numbers are always encoded on four
  bytes: the front does not see the backend's acknowledgements, and four
  bytes decode against any plausible largest acknowledged (RFC 9000 §17.1).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Collection, Iterable
from typing import NamedTuple

from echfront.quic.errors import QuicError
from echfront.quic.frames import (
    FRAME_PING,
    crypto_frame_overhead,
    encode_connection_close,
    encode_crypto,
)
from echfront.quic.packets import (
    MIN_INITIAL_DATAGRAM,
    TAG_LENGTH,
    PacketType,
    QuicVersion,
    encode_long_header,
    varint_length,
)
from echfront.quic.protection import InitialKeys, PacketKeys, protect

__all__ = [
    "OutgoingInitial",
    "Segment",
    "backend_ranges",
    "close_datagram",
    "merge_ranges",
    "pack_initials",
]

#: Every rewritten packet number is sent on four bytes.
PN_LENGTH = 4
#: Do not start a CRYPTO frame with less room than this; the next packet has more.
_MIN_CRYPTO_CHUNK = 16


class Segment(NamedTuple):
    """One ClientHello: its bytes in the client's and in the backend's CRYPTO stream."""

    client_start: int
    client_end: int
    backend_start: int
    backend_end: int


def backend_ranges(
    segments: Iterable[Segment], start: int, end: int, fresh: Collection[Segment] = ()
) -> list[tuple[int, int]]:
    """The backend stream ranges that client range ``[start, end)`` stands for.

    :param fresh: segments completed by this batch: any overlap with one
        yields the whole of its backend range, since the backend has none of it.
    """
    ranges: list[tuple[int, int]] = []
    for seg in segments:
        lo, hi = max(start, seg.client_start), min(end, seg.client_end)
        if lo >= hi:
            continue
        if seg in fresh:
            ranges.append((seg.backend_start, seg.backend_end))
            continue
        client_len = seg.client_end - seg.client_start
        backend_len = seg.backend_end - seg.backend_start
        # Floor the start and ceil the end: the union of mapped ranges then
        # covers the inner hello whenever the client ranges cover the outer.
        b_lo = seg.backend_start + (lo - seg.client_start) * backend_len // client_len
        b_hi = seg.backend_start + -(-(hi - seg.client_start) * backend_len // client_len)
        if b_lo < b_hi:
            ranges.append((b_lo, b_hi))
    return ranges


def merge_ranges(ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sort ranges and merge overlapping or adjacent ones."""
    merged: list[tuple[int, int]] = []
    for lo, hi in sorted(ranges):
        if merged and lo <= merged[-1][1]:
            if hi > merged[-1][1]:
                merged[-1] = (merged[-1][0], hi)
        else:
            merged.append((lo, hi))
    return merged


class OutgoingInitial(NamedTuple):
    """What one rewritten Initial packet is made of, before CRYPTO data is placed.

    :ivar version: the client packet's version.
    :ivar dcid, scid, token: the client packet's header fields, kept.
    :ivar fixed_bit: the client's Fixed Bit (RFC 9287 lets it be greased).
    :ivar packet_number: the number the backend sees.
    :ivar kept: the client's ACK, PING and CONNECTION_CLOSE frames, raw.
    :ivar needs_ack: the client packet was ack-eliciting, so this one must be.
    :ivar has_ping: ``kept`` contains a PING.
    """

    version: QuicVersion
    dcid: bytes
    scid: bytes
    token: bytes
    fixed_bit: bool
    packet_number: int
    kept: bytes
    needs_ack: bool
    has_ping: bool

    def header_length(self) -> int:
        """Bytes of the header, packet number included (2-byte Length field)."""
        token = varint_length(len(self.token)) + len(self.token)
        return 7 + len(self.dcid) + len(self.scid) + token + 2 + PN_LENGTH


class _Plan(NamedTuple):
    packet: OutgoingInitial
    payload: bytes


def _fill(queue: deque[tuple[int, bytes]], room: int) -> tuple[list[bytes], int]:
    """Take CRYPTO frames from ``queue`` into ``room`` bytes; return them and the room left."""
    frames: list[bytes] = []
    while queue:
        offset, data = queue[0]
        overhead = crypto_frame_overhead(offset, len(data))
        if room - overhead < min(_MIN_CRYPTO_CHUNK, len(data)):
            break
        take = min(len(data), room - overhead)
        frames.append(encode_crypto(offset, data[:take]))
        room -= crypto_frame_overhead(offset, take) + take
        if take == len(data):
            queue.popleft()
        else:
            queue[0] = (offset + take, data[take:])
    return frames, room


def pack_initials(
    packets: list[OutgoingInitial],
    crypto: list[tuple[int, bytes]],
    keys_for: Callable[[QuicVersion], PacketKeys],
    allocate: Callable[[], int],
    max_datagram: int,
) -> list[bytes]:
    """Protected datagrams carrying ``crypto`` and each packet's kept frames.

    :param packets: in the order the backend should see them; each keeps its
        packet number.  A packet left with nothing to carry and no need of an
        acknowledgement is omitted: a gap in packet numbers is legal.
    :param crypto: (backend offset, data) pieces, in offset order.
    :param keys_for: the client-direction Initial keys of a version.
    :param allocate: a fresh packet number, for packets added when the data
        does not fit the client's packets (then under the last one's header).
    :param max_datagram: the largest datagram to build (at least 1200).
    """
    if not packets:
        raise ValueError("pack_initials needs at least one client packet to follow")
    queue = deque(crypto)
    plans: list[_Plan] = []
    for packet in packets:
        room = max_datagram - packet.header_length() - TAG_LENGTH - len(packet.kept)
        frames, _room = _fill(queue, room)
        if not frames and packet.needs_ack and not packet.has_ping:
            # The client's packet asked for an acknowledgement; this one
            # stands for it, so it must ask too (RFC 9000 §13.2.1).
            frames.append(bytes((FRAME_PING,)))
        if not frames and not packet.kept:
            continue
        plans.append(_Plan(packet, packet.kept + b"".join(frames)))
    template = packets[-1]
    while queue:
        extra = template._replace(
            packet_number=allocate(), kept=b"", needs_ack=True, has_ping=False
        )
        frames, _room = _fill(queue, max_datagram - extra.header_length() - TAG_LENGTH)
        if not frames:
            raise ValueError(f"max_datagram {max_datagram} leaves no room for CRYPTO data")
        plans.append(_Plan(extra, b"".join(frames)))
    return _datagrams(plans, keys_for, max_datagram)


def _size(plan: _Plan) -> int:
    return plan.packet.header_length() + len(plan.payload) + TAG_LENGTH


def _datagrams(
    plans: list[_Plan], keys_for: Callable[[QuicVersion], PacketKeys], max_datagram: int
) -> list[bytes]:
    """Coalesce planned packets into datagrams, pad each to 1200 bytes, protect."""
    groups: list[list[_Plan]] = []
    total = 0
    for plan in plans:
        size = _size(plan)
        if groups and total + size <= max_datagram:
            groups[-1].append(plan)
            total += size
        else:
            groups.append([plan])
            total = size
    datagrams = []
    for group in groups:
        deficit = MIN_INITIAL_DATAGRAM - sum(_size(p) for p in group)
        if deficit > 0:
            last = group[-1]
            # PADDING frames are zero bytes (RFC 9000 §19.1).
            group[-1] = last._replace(payload=last.payload + bytes(deficit))
        datagrams.append(b"".join(_protect(plan, keys_for) for plan in group))
    return datagrams


def _protect(plan: _Plan, keys_for: Callable[[QuicVersion], PacketKeys]) -> bytes:
    packet = plan.packet
    header = encode_long_header(
        packet.version,
        PacketType.INITIAL,
        dcid=packet.dcid,
        scid=packet.scid,
        token=packet.token,
        payload_length=len(plan.payload),
        packet_number=packet.packet_number,
        pn_length=PN_LENGTH,
        fixed_bit=packet.fixed_bit,
    )
    return protect(header, PN_LENGTH, packet.packet_number, plan.payload, keys_for(packet.version))


def close_datagram(
    version: QuicVersion,
    keys: InitialKeys,
    *,
    from_server: bool,
    dcid: bytes,
    scid: bytes,
    packet_number: int,
    error: QuicError,
    token: bytes = b"",
) -> bytes:
    """An Initial packet carrying CONNECTION_CLOSE 0x1c, padded to 1200 bytes (RFC 9000 §10.2.3).

    The reason phrase is the error's public name only (RFC 9849 §10.5).
    """
    packet = OutgoingInitial(
        version=version,
        dcid=dcid,
        scid=scid,
        token=token,
        fixed_bit=True,
        packet_number=packet_number,
        kept=encode_connection_close(error.code, error.frame_type, error.name.encode("ascii")),
        needs_ack=False,
        has_ping=False,
    )
    direction = keys.server if from_server else keys.client
    (datagram,) = pack_initials(
        [packet], [], lambda _v: direction, _no_allocation, MIN_INITIAL_DATAGRAM
    )
    return datagram


def _no_allocation() -> int:
    raise AssertionError("a CONNECTION_CLOSE packet never needs a second packet")

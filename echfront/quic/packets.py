# -*- test-case-name: tests.test_quic_packets -*-
"""QUIC long headers, versions, packet numbers and Version Negotiation, sans-IO.

* :class:`QuicVersion` holds what differs between QUIC v1 (RFC 9000/9001)
  and v2 (RFC 9369 §3): the version number, the long-header type bits, the
  Initial salt, the HKDF labels and the Retry integrity key.
* :func:`parse_long_header` reads one long-header packet (RFC 9000 §17.2)
  up to its protected packet number; :func:`split_datagram` walks the
  packets coalesced in one datagram (§12.2).
* :func:`encode_varint`/:func:`decode_varint` (§16), packet number
  encoding and decoding (§17.1, Appendix A), and
  :func:`build_version_negotiation` (§17.2.1).

Nothing here decrypts: :mod:`echfront.quic.protection` does.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import NamedTuple

from echfront.quic.errors import QuicDrop

__all__ = [
    "MAX_CID_LENGTH",
    "MAX_VARINT",
    "MIN_INITIAL_DATAGRAM",
    "SUPPORTED_VERSIONS",
    "TAG_LENGTH",
    "VERSION_1",
    "VERSION_2",
    "LongHeader",
    "PacketType",
    "QuicVersion",
    "build_version_negotiation",
    "decode_packet_number",
    "decode_varint",
    "encode_long_header",
    "encode_varint",
    "packet_number_length",
    "parse_long_header",
    "split_datagram",
    "varint_length",
]

#: RFC 9000 §14.1: a datagram carrying a client Initial is at least this long.
MIN_INITIAL_DATAGRAM = 1200
#: RFC 9000 §17.2: v1 (and v2) connection IDs are at most 20 bytes.
MAX_CID_LENGTH = 20
#: RFC 9000 §16: the largest value a variable-length integer holds.
MAX_VARINT = (1 << 62) - 1


class PacketType(enum.Enum):
    """The long-header packet types (RFC 9000 §17.2, RFC 9369 §3.2)."""

    INITIAL = "initial"
    ZERO_RTT = "0rtt"
    HANDSHAKE = "handshake"
    RETRY = "retry"


@dataclass(frozen=True, slots=True)
class QuicVersion:
    """The version-specific constants of a QUIC version the front reads.

    :ivar number: the 32-bit Version field.
    :ivar type_bits: the two Type bits of Initial, 0-RTT, Handshake and
        Retry, in that order.
    :ivar initial_salt: HKDF-Extract salt for Initial secrets (RFC 9001 §5.2).
    :ivar key_label, iv_label, hp_label: HKDF-Expand-Label labels
        (RFC 9001 §5.1, §5.4; RFC 9369 §3.3.2).
    :ivar retry_key, retry_nonce: the fixed AEAD key and nonce of the Retry
        integrity tag (RFC 9001 §5.8, RFC 9369 §3.3.3).
    """

    name: str
    number: int
    type_bits: tuple[int, int, int, int]
    initial_salt: bytes
    key_label: bytes
    iv_label: bytes
    hp_label: bytes
    retry_key: bytes
    retry_nonce: bytes

    def packet_type(self, first_byte: int) -> PacketType:
        """The packet type a long-header first byte carries in this version."""
        return _TYPE_ORDER[self.type_bits.index((first_byte >> 4) & 0x03)]

    def type_bits_of(self, packet_type: PacketType) -> int:
        """The two Type bits for ``packet_type``, already shifted into place (0x30)."""
        return self.type_bits[_TYPE_ORDER.index(packet_type)] << 4


_TYPE_ORDER = (PacketType.INITIAL, PacketType.ZERO_RTT, PacketType.HANDSHAKE, PacketType.RETRY)

VERSION_1 = QuicVersion(
    name="v1",
    number=0x00000001,
    type_bits=(0b00, 0b01, 0b10, 0b11),  # RFC 9000 §17.2 Table 5
    initial_salt=bytes.fromhex("38762cf7f55934b34d179ae6a4c80cadccbb7f0a"),  # RFC 9001 §5.2
    key_label=b"quic key",
    iv_label=b"quic iv",
    hp_label=b"quic hp",
    retry_key=bytes.fromhex("be0c690b9f66575a1d766b54e368c84e"),  # RFC 9001 §5.8
    retry_nonce=bytes.fromhex("461599d35d632bf2239825bb"),
)
VERSION_2 = QuicVersion(
    name="v2",
    number=0x6B3343CF,  # RFC 9369 §3.1
    type_bits=(0b01, 0b10, 0b11, 0b00),  # RFC 9369 §3.2
    initial_salt=bytes.fromhex("0dede3def700a6db819381be6e269dcbf9bd2ed9"),  # §3.3.1
    key_label=b"quicv2 key",  # §3.3.2
    iv_label=b"quicv2 iv",
    hp_label=b"quicv2 hp",
    retry_key=bytes.fromhex("8fb4b01b56ac48e260fbcbcead7ccc92"),  # §3.3.3
    retry_nonce=bytes.fromhex("d86969bc2d7c6d9990efb04a"),
)
#: The versions the front reads, by Version field.  Listed in Version
#: Negotiation packets in this order.
SUPPORTED_VERSIONS: dict[int, QuicVersion] = {v.number: v for v in (VERSION_1, VERSION_2)}


def varint_length(value: int) -> int:
    """Bytes needed to encode ``value`` as a variable-length integer (RFC 9000 §16)."""
    if value < 0x40:
        return 1
    if value < 0x4000:
        return 2
    if value < 0x4000_0000:
        return 4
    if value <= MAX_VARINT:
        return 8
    raise ValueError(f"{value} does not fit a QUIC variable-length integer")


def encode_varint(value: int, length: int | None = None) -> bytes:
    """Encode ``value`` on ``length`` bytes (the shortest form by default), RFC 9000 §16."""
    size = varint_length(value) if length is None else length
    if size not in (1, 2, 4, 8) or value >= 1 << (8 * size - 2) or value < 0:
        raise ValueError(f"{value} does not fit a {size}-byte variable-length integer")
    prefix = {1: 0x00, 2: 0x40, 4: 0x80, 8: 0xC0}[size]
    encoded = bytearray(value.to_bytes(size, "big"))
    encoded[0] |= prefix
    return bytes(encoded)


def decode_varint(data: bytes, pos: int, end: int | None = None) -> tuple[int, int]:
    """Decode a variable-length integer at ``pos``; return it and the next position.

    :param end: where the readable region ends (default ``len(data)``).
    :raises ValueError: when the integer is truncated.  Callers turn it into
        a drop or a FRAME_ENCODING_ERROR, whichever their context demands.
    """
    limit = len(data) if end is None else end
    if pos >= limit:
        raise ValueError("truncated variable-length integer")
    first = data[pos]
    size = 1 << (first >> 6)
    if pos + size > limit:
        raise ValueError("truncated variable-length integer")
    value = first & 0x3F
    for i in range(pos + 1, pos + size):
        value = (value << 8) | data[i]
    return value, pos + size


def packet_number_length(full_pn: int, largest_acked: int | None) -> int:
    """Bytes to encode ``full_pn`` so a peer can decode it (RFC 9000 §17.1, App. A.2)."""
    unacked = full_pn + 1 if largest_acked is None else full_pn - largest_acked
    # ceil((log2(unacked) + 1) / 8) in integers: the smallest k with
    # unacked <= 2^(8k - 1).
    return max(1, ((unacked - 1).bit_length() + 8) // 8)


def decode_packet_number(largest_pn: int | None, truncated: int, length: int) -> int:
    """Recover a full packet number from its truncated form (RFC 9000 Appendix A.3)."""
    expected = 0 if largest_pn is None else largest_pn + 1
    win = 1 << (8 * length)
    hwin = win // 2
    mask = win - 1
    candidate = (expected & ~mask) | truncated
    if candidate <= expected - hwin and candidate < (1 << 62) - win:
        return candidate + win
    if candidate > expected + hwin and candidate >= win:
        return candidate - win
    return candidate


class LongHeader(NamedTuple):
    """One long-header packet of a datagram, read up to its packet number (RFC 9000 §17.2).

    Offsets are into the datagram.  For a version the front does not read,
    or a Version Negotiation packet (version 0), only the version-independent
    fields (RFC 8999 §5.1) are meaningful and the packet runs to the end.

    :ivar packet_type: None for version 0 and unsupported versions.
    :ivar token: the Initial token (RFC 9000 §17.2.2); for Retry the Retry
        token (without the integrity tag); else empty.
    :ivar pn_offset: where the protected packet number starts; -1 when the
        packet has none (Retry, Version Negotiation, unsupported).
    """

    start: int
    end: int
    first_byte: int
    version: int
    dcid: bytes
    scid: bytes
    packet_type: PacketType | None
    token: bytes
    pn_offset: int

    @property
    def quic_version(self) -> QuicVersion | None:
        """The :class:`QuicVersion` of a supported version, else None."""
        return SUPPORTED_VERSIONS.get(self.version)


#: AEAD tag length of every Initial cipher (AES-128-GCM, RFC 9001 §5.3).
TAG_LENGTH = 16
#: Header protection samples 16 bytes starting 4 bytes after the packet
#: number (RFC 9001 §5.4.2), so a protected packet has at least 20 bytes there.
_MIN_AFTER_PN = 4 + 16
_RETRY_TAG_LENGTH = 16


def parse_long_header(datagram: bytes, start: int = 0) -> LongHeader:
    """Read the long header of the packet at ``start`` (RFC 9000 §17.2).

    :raises QuicDrop: for a short header, truncation, a v1/v2 connection ID
        over 20 bytes or a Length beyond the datagram (RFC 9000 §12.2: such a
        packet and what follows are dropped).
    """
    end = len(datagram)
    if start + 7 > end:
        raise QuicDrop("datagram too short for a long header")
    first = datagram[start]
    if not first & 0x80:
        raise QuicDrop("not a long header")
    version = int.from_bytes(datagram[start + 1 : start + 5], "big")
    known = SUPPORTED_VERSIONS.get(version)
    pos = start + 5
    dcid_len = datagram[pos]
    if known is not None and dcid_len > MAX_CID_LENGTH:
        raise QuicDrop("destination connection ID longer than 20 bytes")
    pos += 1
    dcid = datagram[pos : pos + dcid_len]
    pos += dcid_len
    if pos >= end:
        raise QuicDrop("truncated destination connection ID")
    scid_len = datagram[pos]
    if known is not None and scid_len > MAX_CID_LENGTH:
        raise QuicDrop("source connection ID longer than 20 bytes")
    pos += 1
    scid = datagram[pos : pos + scid_len]
    pos += scid_len
    if pos > end:
        raise QuicDrop("truncated source connection ID")
    if known is None:
        # Version 0 (Version Negotiation) or an unknown version: nothing
        # past the connection IDs is defined for us (RFC 8999 §5.1).
        return LongHeader(start, end, first, version, dcid, scid, None, b"", -1)
    packet_type = known.packet_type(first)
    token = b""
    if packet_type is PacketType.RETRY:
        if end - pos < _RETRY_TAG_LENGTH:
            raise QuicDrop("Retry packet shorter than its integrity tag")
        token = datagram[pos : end - _RETRY_TAG_LENGTH]
        return LongHeader(start, end, first, version, dcid, scid, packet_type, token, -1)
    try:
        if packet_type is PacketType.INITIAL:
            token_len, pos = decode_varint(datagram, pos)
            if pos + token_len > end:
                raise QuicDrop("Initial token overruns the datagram")
            token = datagram[pos : pos + token_len]
            pos += token_len
        length, pos = decode_varint(datagram, pos)
    except ValueError as error:
        raise QuicDrop(str(error)) from None
    packet_end = pos + length
    if packet_end > end:
        raise QuicDrop("packet Length overruns the datagram")
    if length < _MIN_AFTER_PN:
        raise QuicDrop("packet too short to sample for header protection")
    return LongHeader(start, packet_end, first, version, dcid, scid, packet_type, token, pos)


def split_datagram(datagram: bytes) -> tuple[list[LongHeader], int]:
    """Walk the long-header packets coalesced in a datagram (RFC 9000 §12.2).

    :returns: the packets, and where the rest starts: a short-header packet,
        padding, or a packet that did not parse (``len(datagram)`` when the
        long headers cover it all).  Later packets are never worse than
        dropped: only the first packet's failure raises.
    :raises QuicDrop: when the first packet is not a readable long header.
    """
    packets = [parse_long_header(datagram, 0)]
    pos = packets[0].end
    end = len(datagram)
    while pos < end and packets[-1].pn_offset >= 0 and datagram[pos] & 0x80:
        try:
            header = parse_long_header(datagram, pos)
        except QuicDrop:
            break
        packets.append(header)
        pos = header.end
    return packets, pos


def encode_long_header(
    version: QuicVersion,
    packet_type: PacketType,
    *,
    dcid: bytes,
    scid: bytes,
    token: bytes,
    payload_length: int,
    packet_number: int,
    pn_length: int,
    fixed_bit: bool = True,
) -> bytes:
    """The unprotected header of an Initial, 0-RTT or Handshake packet (RFC 9000 §17.2).

    The Length field (packet number, payload and AEAD tag) is always encoded
    on two bytes, as RFC 9001 Appendix A does, so a caller can size padding
    before it knows the final length.

    :param payload_length: plaintext frame bytes (the tag is added here).
    """
    if packet_type is PacketType.RETRY:
        raise ValueError("a Retry packet has no packet number; use build_retry")
    if not 1 <= pn_length <= 4:
        raise ValueError("packet number length must be 1 to 4 bytes")
    first = 0x80 | (0x40 if fixed_bit else 0) | version.type_bits_of(packet_type) | (pn_length - 1)
    parts = [
        bytes((first,)),
        version.number.to_bytes(4, "big"),
        bytes((len(dcid),)),
        dcid,
        bytes((len(scid),)),
        scid,
    ]
    if packet_type is PacketType.INITIAL:
        parts += [encode_varint(len(token)), token]
    parts.append(encode_varint(pn_length + payload_length + TAG_LENGTH, 2))
    parts.append((packet_number & ((1 << (8 * pn_length)) - 1)).to_bytes(pn_length, "big"))
    return b"".join(parts)


def build_version_negotiation(
    header: LongHeader,
    versions: Iterable[int] = SUPPORTED_VERSIONS,
    *,
    random: Callable[[int], bytes] = os.urandom,
) -> bytes:
    """A Version Negotiation packet answering ``header`` (RFC 9000 §17.2.1).

    Its Destination Connection ID is the client's Source Connection ID and
    vice versa; the seven unused bits are random with 0x40 set (§17.2.1).
    The caller sends it only for a datagram of at least 1200 bytes with an
    unsupported version and never answers version 0 (§6.1, §5.2.2).
    """
    if header.version == 0:
        raise ValueError("never answer a Version Negotiation packet with one (RFC 9000 §6.1)")
    first = 0x80 | 0x40 | (random(1)[0] & 0x3F)
    listed = b"".join(v.to_bytes(4, "big") for v in versions)
    return b"".join(
        (
            bytes((first,)),
            b"\x00\x00\x00\x00",
            bytes((len(header.scid),)),
            header.scid,
            bytes((len(header.dcid),)),
            header.dcid,
            listed,
        )
    )

"""Long headers, versions, packet numbers and Version Negotiation (RFC 9000 §16, §17, App. A)."""

from __future__ import annotations

import pytest
from aioquic._buffer import Buffer
from aioquic.quic.packet import pull_quic_header
from hypothesis import given, settings
from hypothesis import strategies as st

from echfront.quic.admission import admit
from echfront.quic.errors import QuicDrop
from echfront.quic.packets import (
    SUPPORTED_VERSIONS,
    VERSION_1,
    VERSION_2,
    PacketType,
    QuicVersion,
    build_version_negotiation,
    decode_packet_number,
    decode_varint,
    encode_long_header,
    encode_varint,
    packet_number_length,
    parse_long_header,
    split_datagram,
)
from echfront.quic.protection import initial_keys, protect

DCID = bytes.fromhex("8394c8f03e515708")
SCID = bytes.fromhex("c0ffee")


@pytest.mark.parametrize(
    ("encoded", "value"),
    [
        # RFC 9000 Appendix A.1 sample variable-length integers.
        ("c2197c5eff14e88c", 151288809941952652),
        ("9d7f3e7d", 494878333),
        ("7bbd", 15293),
        ("25", 37),
        ("4025", 37),
    ],
)
def test_varint_samples(encoded: str, value: int) -> None:
    data = bytes.fromhex(encoded)
    assert decode_varint(data, 0) == (value, len(data))
    assert encode_varint(value, len(data)) == data


@given(st.integers(min_value=0, max_value=2**62 - 1))
def test_varint_round_trip(value: int) -> None:
    encoded = encode_varint(value)
    assert decode_varint(encoded, 0) == (value, len(encoded))
    with pytest.raises(ValueError, match="truncated"):
        decode_varint(encoded[:-1], 0)


def test_varint_limits() -> None:
    with pytest.raises(ValueError, match="does not fit"):
        encode_varint(2**62)
    with pytest.raises(ValueError, match="does not fit"):
        encode_varint(64, 1)


def test_packet_number_samples() -> None:
    """RFC 9000 Appendix A.2 and A.3 examples."""
    assert packet_number_length(0xAC5C02, 0xABE8B3) == 2
    assert packet_number_length(0xACE8FE, 0xABE8B3) == 3
    assert packet_number_length(0, None) == 1
    assert decode_packet_number(0xA82F30EA, 0x9B32, 2) == 0xA82F9B32


@given(
    largest=st.integers(min_value=0, max_value=2**40),
    delta=st.integers(min_value=1, max_value=2**20),
)
def test_packet_number_round_trip(largest: int, delta: int) -> None:
    """Truncating with the A.2 length always decodes back (A.3) for the next expected."""
    full = largest + delta
    length = packet_number_length(full, largest)
    truncated = full & ((1 << (8 * length)) - 1)
    assert decode_packet_number(largest, truncated, length) == full


def initial(
    version: QuicVersion = VERSION_1,
    *,
    dcid: bytes = DCID,
    scid: bytes = SCID,
    token: bytes = b"",
    payload: bytes = b"\x01" + bytes(1180),
    packet_number: int = 0,
    packet_type: PacketType = PacketType.INITIAL,
) -> bytes:
    """A protected long-header packet (Initial keys, whatever its type: tests only)."""
    header = encode_long_header(
        version,
        packet_type,
        dcid=dcid,
        scid=scid,
        token=token,
        payload_length=len(payload),
        packet_number=packet_number,
        pn_length=4,
    )
    return protect(header, 4, packet_number, payload, initial_keys(dcid, version).client)


@pytest.mark.parametrize("version", [VERSION_1, VERSION_2], ids=["v1", "v2"])
@pytest.mark.parametrize(
    "packet_type", [PacketType.INITIAL, PacketType.ZERO_RTT, PacketType.HANDSHAKE]
)
def test_type_bits_round_trip(version: QuicVersion, packet_type: PacketType) -> None:
    """v1 and v2 encode the packet types differently (RFC 9369 §3.2)."""
    packet = initial(
        version, packet_type=packet_type, token=b"tok" if packet_type is PacketType.INITIAL else b""
    )
    header = parse_long_header(packet)
    assert header.packet_type is packet_type
    assert header.version == version.number
    assert (header.dcid, header.scid) == (DCID, SCID)
    assert header.end == len(packet)
    # aioquic parses the same header the same way.
    theirs = pull_quic_header(Buffer(data=packet), host_cid_length=8)
    assert (theirs.destination_cid, theirs.source_cid, theirs.version) == (
        DCID,
        SCID,
        version.number,
    )
    assert theirs.packet_type.name.lower().replace("_", "") == packet_type.name.lower().replace(
        "_", ""
    )


def test_v2_initial_bits() -> None:
    """An Initial's type bits: 0b00 in v1, 0b01 in v2 (RFC 9369 §3.2)."""
    assert initial(VERSION_1)[0] & 0x30 == 0x00
    assert initial(VERSION_2)[0] & 0x30 == 0x10
    assert VERSION_2.packet_type(0xC0) is PacketType.RETRY
    assert VERSION_1.packet_type(0xF0) is PacketType.RETRY


def test_coalesced_packets() -> None:
    """RFC 9000 §12.2: Initial, Handshake and a trailing short header in one datagram."""
    first = initial(payload=b"\x01" + bytes(300))
    second = initial(packet_type=PacketType.HANDSHAKE, payload=b"\x01" + bytes(100))
    short = b"\x40" + bytes(30)
    packets, rest = split_datagram(first + second + short)
    assert [p.packet_type for p in packets] == [PacketType.INITIAL, PacketType.HANDSHAKE]
    assert (packets[0].start, packets[0].end) == (0, len(first))
    assert (packets[1].start, packets[1].end) == (len(first), len(first) + len(second))
    assert rest == len(first) + len(second)


def test_coalesced_garbage_after_a_good_packet_is_left_over() -> None:
    first = initial(payload=b"\x01" + bytes(300))
    packets, rest = split_datagram(first + b"\xc0\x00\x00\x00\x01\x30")
    assert len(packets) == 1
    assert rest == len(first)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "too short"),
        (b"\x40" + bytes(40), "not a long header"),
        (b"\xc0\x00\x00\x00\x01\x15" + bytes(40), "longer than 20"),
        (b"\xc0\x00\x00\x00\x01\x08" + bytes(8) + b"\x15" + bytes(40), "longer than 20"),
        (b"\xc0\x00\x00\x00\x01\x08" + bytes(3), "truncated destination"),
        (b"\xc0\x00\x00\x00\x01\x00\x05\x00", "truncated source"),
        (b"\xc0\x00\x00\x00\x01\x00\x00\x44\xff", "token overruns"),
        (b"\xc0\x00\x00\x00\x01\x00\x00\x00\x40", "truncated variable-length"),
        (b"\xc0\x00\x00\x00\x01\x00\x00\x00\x44\x00" + bytes(30), "overruns the datagram"),
        (b"\xc0\x00\x00\x00\x01\x00\x00\x00\x05" + bytes(5), "too short to sample"),
        (b"\xf0\x00\x00\x00\x01\x00\x00" + bytes(5), "shorter than its integrity tag"),
    ],
)
def test_malformed_headers_are_dropped(data: bytes, message: str) -> None:
    with pytest.raises(QuicDrop, match=message):
        parse_long_header(data)


def test_unknown_version_reads_only_invariant_fields() -> None:
    """RFC 8999 §5.1: connection IDs of any length for versions we do not know."""
    data = b"\xc0\x1a\x2a\x3a\x4a\x30" + bytes(range(48)) + b"\x00" + bytes(1200)
    header = parse_long_header(data)
    assert (header.version, len(header.dcid), header.packet_type) == (0x1A2A3A4A, 48, None)
    assert header.end == len(data)


def test_version_negotiation_packet() -> None:
    """RFC 9000 §17.2.1: CIDs swapped, version 0, our versions listed, 0x40 set."""
    data = b"\xc0\x1a\x2a\x3a\x4a\x08" + DCID + b"\x03" + SCID + bytes(1200)
    reply = build_version_negotiation(parse_long_header(data), random=lambda n: b"\xff" * n)
    assert reply == b"\xff\x00\x00\x00\x00\x03" + SCID + b"\x08" + DCID + bytes.fromhex(
        "000000016b3343cf"
    )
    theirs = pull_quic_header(Buffer(data=reply), host_cid_length=3)
    assert theirs.supported_versions == list(SUPPORTED_VERSIONS)
    with pytest.raises(ValueError, match="never answer"):
        build_version_negotiation(parse_long_header(reply))


@pytest.mark.parametrize(
    ("datagram", "starts", "replies", "reason"),
    [
        (initial(), True, False, ""),
        (initial(VERSION_2), True, False, ""),
        (initial()[:1000], False, False, "shorter than 1200"),
        (b"\x40" + bytes(1300), False, False, "not a long header"),
        (b"\xc0\x1a\x2a\x3a\x4a\x08" + DCID + b"\x00" + bytes(1200), False, True, "unsupported"),
        (
            b"\xc0\x00\x00\x00\x00\x08" + DCID + b"\x00" + bytes(1200),
            False,
            False,
            "Version Negotiation",
        ),
        (initial(packet_type=PacketType.HANDSHAKE), False, False, "before any Initial"),
        (initial(dcid=b"\x01\x02\x03\x04"), False, False, "shorter than 8"),
    ],
)
def test_admit(datagram: bytes, starts: bool, replies: bool, reason: str) -> None:
    """Which datagrams of no flow start one (RFC 9000 §5.2.2, §6.1, §7.2, §14.1)."""
    admission = admit(datagram)
    assert (admission.header is not None, admission.reply is not None) == (starts, replies)
    assert reason in admission.reason


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=1500))
def test_fuzz_garbage(data: bytes) -> None:
    """Garbage is a clean drop or parses; nothing else escapes."""
    try:
        packets, rest = split_datagram(data)
    except QuicDrop:
        return
    assert 0 < packets[0].end <= len(data)
    assert rest <= len(data)
    admit(data)


@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=0), st.sampled_from([VERSION_1, VERSION_2]))
def test_fuzz_truncations(cut: int, version: QuicVersion) -> None:
    """Every truncation of a real Initial is a drop, never an exception."""
    packet = initial(version, token=b"\x42" * 20)
    with pytest.raises(QuicDrop):
        parse_long_header(packet[: cut % len(packet)])
    assert not admit(packet[: cut % len(packet)]).header


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(min_size=1, max_size=200), min_size=1, max_size=5), st.data())
def test_fuzz_coalesced(junk: list[bytes], data: st.DataObject) -> None:
    """Good packets coalesced with junk: the good prefix parses, the rest is left over."""
    good = [initial(payload=b"\x01" + bytes(data.draw(st.integers(30, 200)))) for _ in junk]
    datagram = b"".join(g + j for g, j in zip(good, junk, strict=True))
    packets, rest = split_datagram(datagram)
    assert packets[0].end == len(good[0])
    assert rest <= len(datagram)
    for header in packets:
        assert header.end <= len(datagram)

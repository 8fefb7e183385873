"""Tests for :mod:`echfront.tls.records`: record splitting and handshake reassembly.

The ClientHello used throughout is the real ClientHelloOuter of the Go-client
known-answer vector (``tests/vectors/ech-kat-go-client.json``), re-framed in
records of various sizes and fed in reads of various sizes (checklist PAR-1).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from echfront.errors import (
    AlertDescription,
    AlertError,
    DecodeError,
    IllegalParameter,
    RecordOverflow,
    UnexpectedMessage,
)
from echfront.tls.hello import HRR_RANDOM, handshake_message
from echfront.tls.records import (
    CONTENT_APPLICATION_DATA,
    CONTENT_CHANGE_CIPHER_SPEC,
    CONTENT_HANDSHAKE,
    MAX_CIPHERTEXT,
    MAX_PLAINTEXT,
    HandshakeFlight,
    HandshakeReader,
    RecordSplitter,
    frame_records,
)

_KAT: dict[str, Any] = json.loads(
    (Path(__file__).parent / "vectors" / "ech-kat-go-client.json").read_text()
)
#: The first TLS record a Go ECH client sent: one record, version 0x0301.
KAT_RECORD = bytes.fromhex(_KAT["record"])
#: The ClientHelloOuter handshake message (4-byte header + 1670-byte body).
CLIENT_HELLO = KAT_RECORD[5:]

CCS = bytes.fromhex("140303000101")
APP_DATA = bytes.fromhex("1703030005") + b"early"
#: Header and 3 of 10 bytes of an application_data record.
PARTIAL = bytes.fromhex("170303000a") + b"abc"
TRAILER = CCS + APP_DATA + PARTIAL

PASS = frozenset((CONTENT_CHANGE_CIPHER_SPEC, CONTENT_APPLICATION_DATA))


def record(content_type: int, payload: bytes, version: int = 0x0303) -> bytes:
    """One record with an explicit header (no length checks)."""
    return (
        bytes((content_type,))
        + version.to_bytes(2, "big")
        + len(payload).to_bytes(2, "big")
        + payload
    )


def split_records(
    payload: bytes, size: int, version: int = 0x0301, content_type: int = CONTENT_HANDSHAKE
) -> bytes:
    """``payload`` framed as records carrying at most ``size`` bytes each."""
    return b"".join(
        record(content_type, payload[i : i + size], version) for i in range(0, len(payload), size)
    )


def chunks(data: bytes, size: int) -> list[bytes]:
    """``data`` cut into reads of ``size`` bytes."""
    return [data[i : i + size] for i in range(0, len(data), size)]


def read_flight(
    reader: HandshakeReader, data: bytes, read_size: int
) -> tuple[HandshakeFlight, bytes]:
    """Feed ``data`` in reads; return the flight and every byte after its records.

    The reader is finished once it returns a flight, so reads that were not
    fed yet belong to the caller and are appended to ``flight.rest``.
    """
    pieces = chunks(data, read_size)
    for index, piece in enumerate(pieces):
        flight = reader.feed(piece)
        if flight is not None:
            return flight, flight.rest + b"".join(pieces[index + 1 :])
    raise AssertionError("the handshake message never completed")


def feed_until_error(
    reader: HandshakeReader, data: bytes, read_size: int
) -> tuple[AlertError, int]:
    """Feed ``data`` in reads until the reader raises; return the error and bytes fed."""
    fed = 0
    for piece in chunks(data, read_size):
        fed += len(piece)
        try:
            flight = reader.feed(piece)
        except AlertError as error:
            return error, fed
        assert flight is None, "unexpectedly completed"
    raise AssertionError("no error raised")


# --- HandshakeReader: reassembly --------------------------------------------------------------


def test_kat_vector_shape() -> None:
    assert KAT_RECORD[:3] == bytes.fromhex("160301")
    assert int.from_bytes(KAT_RECORD[3:5], "big") == len(CLIENT_HELLO) == 1674
    assert CLIENT_HELLO[0] == 1
    assert int.from_bytes(CLIENT_HELLO[1:4], "big") == len(CLIENT_HELLO) - 4


@pytest.mark.parametrize("record_size", [1, 7, 100, 2**14])
@pytest.mark.parametrize("read_size", [1, 5, 7, 4096])
def test_client_hello_reassembled(record_size: int, read_size: int) -> None:
    records = split_records(CLIENT_HELLO, record_size)
    reader = HandshakeReader(1)
    flight, rest = read_flight(reader, records + TRAILER, read_size)
    assert flight.message == CLIENT_HELLO
    assert flight.records == records
    assert flight.record_version == 0x0301
    assert rest == TRAILER
    # A CCS in ``rest`` is never handed out as "passed".
    assert reader.take_passed() == b""


@pytest.mark.parametrize("record_size", [1, 7, 100, 2**14])
@pytest.mark.parametrize("read_size", [1, 7, 4096])
def test_client_hello_without_trailer(record_size: int, read_size: int) -> None:
    records = split_records(CLIENT_HELLO, record_size)
    flight, rest = read_flight(HandshakeReader(1), records, read_size)
    assert flight.message == CLIENT_HELLO
    assert flight.records == records
    assert flight.rest == rest == b""


def test_kat_record_as_received() -> None:
    flight = HandshakeReader(1).feed(KAT_RECORD)
    assert flight is not None
    assert flight.records == KAT_RECORD
    assert flight.message == CLIENT_HELLO
    assert flight.rest == b""


def test_whole_flight_and_trailer_in_one_read() -> None:
    flight = HandshakeReader(1).feed(KAT_RECORD + TRAILER)
    assert flight is not None
    assert flight.records == KAT_RECORD
    assert flight.rest == TRAILER


@pytest.mark.parametrize("version", [0x0301, 0x0303, 0x0300, 0x03FF])
def test_record_version_of_first_record(version: int) -> None:
    # Later records may carry another version; the first one is what counts.
    first = record(CONTENT_HANDSHAKE, CLIENT_HELLO[:10], version)
    second = record(CONTENT_HANDSHAKE, CLIENT_HELLO[10:], 0x0303)
    flight = HandshakeReader(1).feed(first + second)
    assert flight is not None
    assert flight.record_version == version
    assert flight.records == first + second


def test_rest_is_untouched_garbage() -> None:
    # Bytes after the message are not the reader's to judge: the caller owns them.
    garbage = b"GET / HTTP/1.1\r\n" + bytes(range(256))
    flight = HandshakeReader(1).feed(KAT_RECORD + garbage)
    assert flight is not None
    assert flight.rest == garbage


def test_started_and_buffered() -> None:
    reader = HandshakeReader(1)
    assert not reader.started
    assert reader.buffered == 0
    assert reader.feed(KAT_RECORD[:3]) is None
    assert not reader.started
    assert reader.buffered == 3
    records = split_records(CLIENT_HELLO, 100)
    reader = HandshakeReader(1)
    assert reader.feed(records[:105]) is None
    assert reader.started
    assert reader.buffered == 105


# --- HandshakeReader: errors with exact alerts ------------------------------------------------


def assert_alert(error: AlertError, cls: type[AlertError], alert: int) -> None:
    assert isinstance(error, cls)
    assert int(error.alert) == alert


@pytest.mark.parametrize("read_size", [1, 4096])
def test_application_data_first_is_unexpected(read_size: int) -> None:
    error, fed = feed_until_error(HandshakeReader(1), APP_DATA + KAT_RECORD, read_size)
    assert_alert(error, UnexpectedMessage, 10)
    if read_size == 1:
        assert fed == 1  # the record type alone decides


@pytest.mark.parametrize("content_type", [CONTENT_CHANGE_CIPHER_SPEC, 21])
def test_other_record_types_first_are_unexpected(content_type: int) -> None:
    with pytest.raises(UnexpectedMessage) as info:
        HandshakeReader(1).feed(record(content_type, b"\x01") + KAT_RECORD)
    assert info.value.alert == AlertDescription.UNEXPECTED_MESSAGE


@pytest.mark.parametrize("msg_type", [0, 2, 4, 8, 20, 254])
def test_wrong_handshake_type_is_unexpected(msg_type: int) -> None:
    message = bytes((msg_type,)) + CLIENT_HELLO[1:]
    with pytest.raises(UnexpectedMessage):
        HandshakeReader(1).feed(record(CONTENT_HANDSHAKE, message, 0x0301))


def test_wrong_handshake_type_detected_before_the_record_completes() -> None:
    reader = HandshakeReader(1)
    head = record(CONTENT_HANDSHAKE, b"\x02" + CLIENT_HELLO[1:], 0x0301)[:6]
    assert reader.feed(head[:5]) is None
    with pytest.raises(UnexpectedMessage):
        reader.feed(head[5:])


def test_wrong_handshake_type_in_one_byte_records() -> None:
    message = b"\x02" + CLIENT_HELLO[1:]
    error, fed = feed_until_error(HandshakeReader(1), split_records(message, 1), 1)
    assert_alert(error, UnexpectedMessage, 10)
    assert fed <= 4 * 6  # known once the 4-byte handshake header is in


@pytest.mark.parametrize(
    "first", [b"GET /", b"G", b"\x00", b"\x19", b"\x80", b"\xff", b"SSH-2.0-x\r\n"]
)
def test_unknown_record_type_from_first_byte(first: bytes) -> None:
    reader = HandshakeReader(1, pass_types=PASS)
    with pytest.raises(UnexpectedMessage) as info:
        reader.feed(first[:1])
    assert info.value.alert == 10
    with pytest.raises(UnexpectedMessage):
        HandshakeReader(1).feed(first)


@pytest.mark.parametrize("version", [b"\x02\x00", b"\x00\x03", b"\xfe\xff", b"\x04\x03"])
def test_non_tls_version_is_decode_error(version: bytes) -> None:
    with pytest.raises(DecodeError) as info:
        HandshakeReader(1).feed(b"\x16" + version + KAT_RECORD[3:])
    assert info.value.alert == 50


def test_non_tls_version_in_a_later_record() -> None:
    first = record(CONTENT_HANDSHAKE, CLIENT_HELLO[:100], 0x0301)
    second = b"\x16\x02\x00" + len(CLIENT_HELLO[100:]).to_bytes(2, "big") + CLIENT_HELLO[100:]
    with pytest.raises(DecodeError):
        HandshakeReader(1).feed(first + second)


@pytest.mark.parametrize("length", [2**14 + 1, 2**14 + 256, 0xFFFF])
def test_oversized_handshake_record_is_record_overflow(length: int) -> None:
    reader = HandshakeReader(1, max_bytes=1 << 20)
    with pytest.raises(RecordOverflow) as info:
        reader.feed(b"\x16\x03\x01" + length.to_bytes(2, "big"))
    assert info.value.alert == 22


def test_record_of_exactly_two_to_the_fourteen_is_fine() -> None:
    body = bytes(2**14 - 4)
    message = handshake_message(1, body)
    flight = HandshakeReader(1).feed(record(CONTENT_HANDSHAKE, message))
    assert flight is not None
    assert flight.message == message


def test_zero_length_first_record_is_decode_error() -> None:
    with pytest.raises(DecodeError) as info:
        HandshakeReader(1).feed(b"\x16\x03\x01\x00\x00" + KAT_RECORD)
    assert info.value.alert == 50


@pytest.mark.parametrize("read_size", [1, 4096])
def test_zero_length_record_inside_the_message_is_decode_error(read_size: int) -> None:
    data = (
        record(CONTENT_HANDSHAKE, CLIENT_HELLO[:100], 0x0301)
        + record(CONTENT_HANDSHAKE, b"", 0x0301)
        + record(CONTENT_HANDSHAKE, CLIENT_HELLO[100:], 0x0301)
    )
    error, _ = feed_until_error(HandshakeReader(1), data, read_size)
    assert_alert(error, DecodeError, 50)


@pytest.mark.parametrize("pass_types", [frozenset(), PASS])
@pytest.mark.parametrize("read_size", [1, 4096])
def test_ccs_interleaved_in_client_hello_is_unexpected(
    pass_types: frozenset[int], read_size: int
) -> None:
    data = (
        record(CONTENT_HANDSHAKE, CLIENT_HELLO[:800], 0x0301)
        + CCS
        + record(CONTENT_HANDSHAKE, CLIENT_HELLO[800:], 0x0301)
    )
    reader = HandshakeReader(1, pass_types=pass_types)
    error, fed = feed_until_error(reader, data, read_size)
    assert_alert(error, UnexpectedMessage, 10)
    if read_size == 1:
        assert fed == 805 + 1  # refused on the CCS's first byte
    assert reader.take_passed() == b""


def test_application_data_interleaved_is_unexpected() -> None:
    data = record(CONTENT_HANDSHAKE, CLIENT_HELLO[:800], 0x0301) + APP_DATA
    with pytest.raises(UnexpectedMessage):
        HandshakeReader(1, pass_types=PASS).feed(data)


@pytest.mark.parametrize("read_size", [1, 7, 105])
def test_declared_message_length_over_max_bytes(read_size: int) -> None:
    records = split_records(CLIENT_HELLO, 100)
    error, fed = feed_until_error(HandshakeReader(1, max_bytes=1000), records, read_size)
    assert_alert(error, IllegalParameter, 47)
    # Refused as soon as the first record (which holds the handshake header)
    # is in, long before the 1674 bytes of the message arrive.
    assert fed <= 105 + read_size < len(records)


def test_declared_length_far_beyond_max_bytes_in_small_records() -> None:
    message = b"\x01\xff\xff\xff" + bytes(100)
    error, fed = feed_until_error(HandshakeReader(1), split_records(message, 1), 1)
    assert_alert(error, IllegalParameter, 47)
    assert fed <= 4 * 6


def test_flight_over_max_bytes() -> None:
    records = split_records(CLIENT_HELLO, 100)  # 17 records: 1674 + 85 bytes
    assert len(records) == 1759
    # The message itself (1674 bytes) fits, the records carrying it do not.
    error, _fed = feed_until_error(HandshakeReader(1, max_bytes=1700), records, 4096)
    assert_alert(error, IllegalParameter, 47)
    flight = HandshakeReader(1, max_bytes=1759).feed(records)
    assert flight is not None
    assert flight.message == CLIENT_HELLO


def test_flight_over_max_bytes_detected_from_the_record_header() -> None:
    reader = HandshakeReader(1, max_bytes=1000)
    with pytest.raises(IllegalParameter):
        reader.feed(KAT_RECORD[:5])  # a 1674-byte record cannot fit in 1000


def test_endless_one_byte_records_hit_max_bytes() -> None:
    # A header declaring 60000 bytes (under the 64 KiB default) followed by
    # 1-byte records: each costs 6 raw bytes, so the flight bound trips.
    message = b"\x01" + (60000).to_bytes(3, "big") + bytes(60000)
    reader = HandshakeReader(1)
    error, fed = feed_until_error(reader, split_records(message, 1), 4096)
    assert_alert(error, IllegalParameter, 47)
    assert fed <= 64 * 1024 + 4096


@pytest.mark.parametrize("extra", [b"\x14", b"\x14\x00\x00\x0c" + bytes(12), b"\x01\x00\x00\x00"])
def test_extra_handshake_bytes_after_client_hello_are_unexpected(extra: bytes) -> None:
    with pytest.raises(UnexpectedMessage) as info:
        HandshakeReader(1).feed(record(CONTENT_HANDSHAKE, CLIENT_HELLO + extra, 0x0301))
    assert info.value.alert == 10


def test_extra_handshake_bytes_in_last_of_several_records() -> None:
    data = split_records(CLIENT_HELLO[:1000], 500) + record(
        CONTENT_HANDSHAKE, CLIENT_HELLO[1000:] + b"\x14\x00", 0x0301
    )
    with pytest.raises(UnexpectedMessage):
        HandshakeReader(1).feed(data)


# --- HandshakeReader: pass-through records ----------------------------------------------------


@pytest.mark.parametrize("read_size", [1, 5, 7, 4096])
def test_pass_types_before_the_message(read_size: int) -> None:
    big = record(CONTENT_APPLICATION_DATA, bytes(MAX_CIPHERTEXT))
    before = CCS + APP_DATA + big + CCS
    records = split_records(CLIENT_HELLO, 2**14)
    # max_bytes fits the ClientHello records exactly: passed records do not count.
    reader = HandshakeReader(1, max_bytes=len(records), pass_types=PASS)
    passed = b""
    flight = None
    pieces = chunks(before + records + TRAILER, read_size)
    for index, piece in enumerate(pieces):
        flight = reader.feed(piece)
        passed += reader.take_passed()
        if flight is not None:
            rest = flight.rest + b"".join(pieces[index + 1 :])
            break
    assert flight is not None
    assert passed == before
    assert flight.records == records
    assert flight.message == CLIENT_HELLO
    assert rest == TRAILER


def test_passed_records_are_handed_out_as_they_complete() -> None:
    reader = HandshakeReader(1, pass_types=PASS)
    assert reader.feed(CCS + APP_DATA[:3]) is None
    assert reader.take_passed() == CCS
    assert reader.take_passed() == b""
    assert reader.feed(APP_DATA[3:]) is None
    assert reader.take_passed() == APP_DATA
    assert not reader.started
    flight = reader.feed(KAT_RECORD)
    assert flight is not None
    assert reader.take_passed() == b""


def test_passed_records_keep_their_order() -> None:
    reader = HandshakeReader(1, pass_types=PASS)
    sequence = [CCS, APP_DATA, record(CONTENT_APPLICATION_DATA, b"x"), CCS]
    assert reader.feed(b"".join(sequence)) is None
    assert reader.take_passed() == b"".join(sequence)


def test_oversized_passed_record_is_record_overflow() -> None:
    with pytest.raises(RecordOverflow):
        HandshakeReader(1, pass_types=PASS).feed(
            b"\x17\x03\x03" + (MAX_CIPHERTEXT + 1).to_bytes(2, "big")
        )


def test_alert_record_is_not_passed_unless_asked() -> None:
    with pytest.raises(UnexpectedMessage):
        HandshakeReader(1, pass_types=PASS).feed(bytes.fromhex("15030300020228"))


# --- HandshakeReader: ServerHello ---------------------------------------------------------------


def server_hello(random: bytes = bytes(range(32))) -> bytes:
    body = (
        b"\x03\x03"
        + random
        + b"\x20"
        + bytes(32)
        + b"\x13\x01\x00"
        + bytes.fromhex("0006002b00020304")
    )
    return handshake_message(2, body)


def test_server_hello_with_trailing_handshake_data() -> None:
    sh = server_hello()
    more = handshake_message(11, bytes(20))  # e.g. a TLS 1.2 Certificate in the same record
    rec = record(CONTENT_HANDSHAKE, sh + more)
    reader = HandshakeReader(2, require_boundary=False, pass_types=PASS)
    flight = reader.feed(rec + CCS)
    assert flight is not None
    assert flight.message == sh
    assert flight.records == rec
    assert flight.record_version == 0x0303
    assert flight.rest == CCS


def test_server_hello_with_trailing_data_refused_when_boundary_required() -> None:
    sh = server_hello()
    with pytest.raises(UnexpectedMessage):
        HandshakeReader(2).feed(record(CONTENT_HANDSHAKE, sh + b"\x08\x00\x00\x00"))


def test_hello_retry_request_read_byte_by_byte() -> None:
    hrr = server_hello(HRR_RANDOM)
    data = record(CONTENT_HANDSHAKE, hrr) + CCS
    flight, rest = read_flight(HandshakeReader(2, require_boundary=False), data, 1)
    assert flight.message == hrr
    assert flight.message[6:38] == HRR_RANDOM
    assert rest == CCS


def test_server_hello_reader_refuses_client_hello() -> None:
    with pytest.raises(UnexpectedMessage):
        HandshakeReader(2, require_boundary=False).feed(KAT_RECORD)


# --- HandshakeReader: memory bound ----------------------------------------------------------


JUNK_TOTAL = 10 * 1024 * 1024


@pytest.mark.parametrize(
    ("header", "max_bytes", "alert", "limit"),
    [
        # Oversized record header: refused on its 5th byte.
        (b"\x16\x03\x01\xff\xff", 65536, 22, 5),
        (b"\x16\x03\x01\x40\x01", 65536, 22, 5),
        # Valid 2^14 record whose handshake header declares 16 MiB: refused
        # once that record is in.
        (b"\x16\x03\x01\x40\x00\x01\xff\xff\xff", 65536, 47, 5 + 2**14),
        # A record header that does not fit max_bytes: refused on its 5th byte.
        (b"\x16\x03\x01\x40\x00", 8192, 47, 5),
    ],
)
def test_junk_after_oversized_header_raises_promptly(
    header: bytes, max_bytes: int, alert: int, limit: int
) -> None:
    reader = HandshakeReader(1, max_bytes=max_bytes)
    started = time.monotonic()
    fed = 0
    junk = b"\x00"
    with pytest.raises(AlertError) as info:
        for byte in header:
            fed += 1
            assert reader.feed(bytes((byte,))) is None
        for _ in range(JUNK_TOTAL):
            fed += 1
            assert reader.feed(junk) is None
            assert reader.buffered <= 5 + MAX_PLAINTEXT
    assert int(info.value.alert) == alert
    assert fed <= limit
    assert time.monotonic() - started < 5.0


def test_buffer_bounded_for_junk_in_pass_records() -> None:
    # Passed records are handed out, not kept: a stream of them never grows the buffer.
    reader = HandshakeReader(1, pass_types=PASS)
    rec = record(CONTENT_APPLICATION_DATA, bytes(1000))
    for _ in range(200):
        assert reader.feed(rec) is None
        assert reader.take_passed() == rec
        assert reader.buffered == 0


# --- RecordSplitter -------------------------------------------------------------------------


def test_splitter_returns_whole_records_and_keeps_the_tail() -> None:
    splitter = RecordSplitter()
    assert splitter.feed(KAT_RECORD + CCS + PARTIAL) == KAT_RECORD + CCS
    assert splitter.buffered == len(PARTIAL)
    assert splitter.feed(b"") == b""
    assert splitter.feed(b"defghij") == PARTIAL + b"defghij"
    assert splitter.buffered == 0


@pytest.mark.parametrize("read_size", [1, 5, 7, 4096])
def test_splitter_in_small_reads(read_size: int) -> None:
    stream = split_records(CLIENT_HELLO, 100) + TRAILER
    splitter = RecordSplitter()
    out = b"".join(splitter.feed(piece) for piece in chunks(stream, read_size))
    assert out == stream[: -len(PARTIAL)]
    assert splitter.pending() == PARTIAL
    assert splitter.buffered == 0
    assert splitter.pending() == b""


def test_splitter_output_is_record_aligned() -> None:
    stream = split_records(CLIENT_HELLO, 7)
    splitter = RecordSplitter()
    for piece in chunks(stream, 13):
        out = splitter.feed(piece)
        while out:
            assert out[0] == CONTENT_HANDSHAKE
            length = int.from_bytes(out[3:5], "big")
            assert len(out) >= 5 + length
            out = out[5 + length :]


def test_splitter_pending_of_partial_header() -> None:
    splitter = RecordSplitter()
    assert splitter.feed(b"\x17\x03") == b""
    assert splitter.pending() == b"\x17\x03"


def test_splitter_limit_is_two_to_the_fourteen_plus_256() -> None:
    ok = record(CONTENT_APPLICATION_DATA, bytes(MAX_CIPHERTEXT))
    assert RecordSplitter().feed(ok) == ok
    with pytest.raises(RecordOverflow) as info:
        RecordSplitter().feed(b"\x17\x03\x03" + (MAX_CIPHERTEXT + 1).to_bytes(2, "big"))
    assert info.value.alert == 22


def test_splitter_custom_limit() -> None:
    splitter = RecordSplitter(max_length=MAX_PLAINTEXT)
    with pytest.raises(RecordOverflow):
        splitter.feed(b"\x16\x03\x03" + (MAX_PLAINTEXT + 1).to_bytes(2, "big"))


def test_splitter_refuses_unknown_type_from_first_byte() -> None:
    splitter = RecordSplitter()
    with pytest.raises(UnexpectedMessage):
        splitter.feed(CCS + b"G")


def test_splitter_refuses_non_tls_version() -> None:
    with pytest.raises(DecodeError):
        RecordSplitter().feed(b"\x17\x02\x00\x00\x01x")


# --- frame_records ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "expected"),
    [(1, [1]), (2**14, [2**14]), (2**14 + 1, [2**14, 1]), (3 * 2**14 + 5, [2**14] * 3 + [5])],
)
@pytest.mark.parametrize("version", [0x0301, 0x0303])
def test_frame_records_fragments_at_two_to_the_fourteen(
    size: int, expected: list[int], version: int
) -> None:
    payload = bytes(i % 251 for i in range(size))
    framed = frame_records(CONTENT_HANDSHAKE, version, payload)
    lengths = []
    pos = 0
    while pos < len(framed):
        assert framed[pos] == CONTENT_HANDSHAKE
        assert int.from_bytes(framed[pos + 1 : pos + 3], "big") == version
        length = int.from_bytes(framed[pos + 3 : pos + 5], "big")
        lengths.append(length)
        pos += 5 + length
    assert lengths == expected
    assert len(framed) == size + 5 * len(expected)
    assert b"".join(chunks_of_records(framed)) == payload


def chunks_of_records(framed: bytes) -> list[bytes]:
    """The payloads of a sequence of records."""
    out = []
    pos = 0
    while pos < len(framed):
        length = int.from_bytes(framed[pos + 3 : pos + 5], "big")
        out.append(framed[pos + 5 : pos + 5 + length])
        pos += 5 + length
    return out


def test_frame_records_round_trips_through_the_reader() -> None:
    message = handshake_message(1, bytes(40000))
    framed = frame_records(CONTENT_HANDSHAKE, 0x0303, message)
    flight = HandshakeReader(1).feed(framed)
    assert flight is not None
    assert flight.message == message
    assert flight.records == framed
    assert flight.record_version == 0x0303


def test_frame_records_small_fragment() -> None:
    framed = frame_records(CONTENT_HANDSHAKE, 0x0301, CLIENT_HELLO, max_fragment=100)
    assert framed == split_records(CLIENT_HELLO, 100, 0x0301)
    assert frame_records(CONTENT_HANDSHAKE, 0x0301, CLIENT_HELLO) == KAT_RECORD

"""Frames allowed in Initial packets, and everything else refused (RFC 9000 §12.4, §19)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from echfront.errors import AlertDescription, IllegalParameter
from echfront.quic.errors import (
    FrameEncodingError,
    ProtocolViolation,
    QuicError,
    TransportErrorCode,
    crypto_error_code,
)
from echfront.quic.frames import (
    FRAME_ACK,
    FRAME_ACK_ECN,
    FRAME_CONNECTION_CLOSE,
    FRAME_CRYPTO,
    FRAME_PADDING,
    FRAME_PING,
    encode_connection_close,
    encode_crypto,
    parse_initial_frames,
)

# ACK: largest 5, delay 0, one more range, first range 1 (5-4), gap 0, length 1 (2-1).
ACK = bytes.fromhex("02050001010001")
ACK_ECN = bytes.fromhex("03050001010001010203")


def test_every_allowed_frame() -> None:
    payload = b"".join(
        (
            b"\x00\x00\x00",
            b"\x01",
            ACK,
            ACK_ECN,
            encode_crypto(10, b"hello"),
            encode_connection_close(0x0A, 0x06, b"why"),
            b"\x00" * 5,
        )
    )
    parsed = parse_initial_frames(payload)
    assert [f.type for f in parsed.frames] == [
        FRAME_PADDING,
        FRAME_PING,
        FRAME_ACK,
        FRAME_ACK_ECN,
        FRAME_CRYPTO,
        FRAME_CONNECTION_CLOSE,
        FRAME_PADDING,
    ]
    assert [(f.offset, f.data) for f in parsed.crypto] == [(10, b"hello")]
    assert parsed.kept == b"\x01" + ACK + ACK_ECN + encode_connection_close(0x0A, 0x06, b"why")
    assert parsed.ack_eliciting
    assert parsed.close is not None
    assert (parsed.close.error_code, parsed.close.data) == (0x0A, b"why")
    assert b"".join(f.raw for f in parsed.frames) == payload


@pytest.mark.parametrize(
    ("payload", "eliciting"),
    [
        (ACK + b"\x00" * 10, False),
        (b"\x00" * 10, False),
        (b"\x01", True),
        (encode_crypto(0, b"x"), True),
    ],
)
def test_ack_eliciting(payload: bytes, eliciting: bool) -> None:
    """RFC 9000 §13.2: PADDING, ACK and CONNECTION_CLOSE elicit no acknowledgement."""
    assert parse_initial_frames(payload).ack_eliciting is eliciting


@pytest.mark.parametrize(
    "frame_type",
    [0x04, 0x05, 0x07, 0x08, 0x0F, 0x10, 0x18, 0x19, 0x1A, 0x1B, 0x1D, 0x1E, 0x30, 0x40, 0xFF],
)
def test_frames_not_allowed_in_initial(frame_type: int) -> None:
    """RFC 9000 §12.4 Table 3: anything else in an Initial is PROTOCOL_VIOLATION."""
    with pytest.raises(ProtocolViolation) as caught:
        parse_initial_frames(b"\x01" + bytes((frame_type,)) + bytes(20))
    assert caught.value.code == TransportErrorCode.PROTOCOL_VIOLATION
    assert caught.value.frame_type == frame_type


def test_empty_payload() -> None:
    with pytest.raises(ProtocolViolation, match="without frames"):
        parse_initial_frames(b"")


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"\x06\x00", "truncated"),
        (b"\x06\x00\x05abc", "overruns"),
        (b"\x06\xc0\x00\x00\x00\x00\x00\x00\x00\x44\x00", "overruns"),
        (encode_crypto(2**62 - 2, b"abc"), r"past 2\^62-1"),
        (b"\x02\x05\x00\x00\x06", "below packet number 0"),
        (b"\x02\x05\x00\x01\x01\x03\x00", "below packet number 0"),
        (b"\x02\x05\x00\x30\x00", "range count"),
        (b"\x03\x05\x00\x00\x00\x01", "truncated"),
        (b"\x1c\x0a\x00\x05ab", "overruns"),
        (b"\x1c\x0a", "truncated"),
    ],
)
def test_malformed_frames(payload: bytes, message: str) -> None:
    """RFC 9000 §12.4: a frame that cannot be parsed is FRAME_ENCODING_ERROR."""
    with pytest.raises(FrameEncodingError, match=message) as caught:
        parse_initial_frames(payload)
    assert caught.value.code == TransportErrorCode.FRAME_ENCODING_ERROR


def test_crypto_error_codes() -> None:
    """RFC 9001 §4.8: a TLS alert is CRYPTO_ERROR 0x100 + alert; names are public."""
    assert crypto_error_code(47) == 0x12F
    error = QuicError.from_alert(IllegalParameter("something private"))
    assert (error.code, error.name) == (
        0x100 + AlertDescription.ILLEGAL_PARAMETER,
        "crypto_error_47",
    )
    assert ProtocolViolation("x").name == "protocol_violation"
    assert QuicError("x", code=0x4242).name == "error_0x4242"
    with pytest.raises(ValueError, match="out of range"):
        crypto_error_code(256)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_frames(payload: bytes) -> None:
    """Random payloads parse or fail with a QUIC error, nothing else."""
    try:
        parsed = parse_initial_frames(payload)
    except QuicError as error:
        assert error.code in (
            TransportErrorCode.PROTOCOL_VIOLATION,
            TransportErrorCode.FRAME_ENCODING_ERROR,
        )
        return
    assert b"".join(f.raw for f in parsed.frames) == payload


@given(st.integers(0, 2**40), st.binary(max_size=2000))
def test_crypto_frame_round_trip(offset: int, data: bytes) -> None:
    parsed = parse_initial_frames(encode_crypto(offset, data))
    assert [(f.offset, f.data) for f in parsed.crypto] == [(offset, data)]

# -*- test-case-name: tests.test_quic_frames -*-
"""The frames of a client Initial packet, parsed and encoded, sans-IO (RFC 9000 §19).

RFC 9000 §12.4 Table 3 allows five frame kinds in Initial packets: PADDING,
PING, ACK (with or without ECN counts), CRYPTO and CONNECTION_CLOSE of type
0x1c.  :func:`parse_initial_frames` reads exactly those and refuses any other
type with PROTOCOL_VIOLATION (§12.4: "an endpoint MUST treat receipt of a
frame in a packet type that is not permitted as a connection error of type
PROTOCOL_VIOLATION"), and malformed ones with FRAME_ENCODING_ERROR (§12.4).
"""

from __future__ import annotations

from typing import NamedTuple

from echfront.quic.errors import FrameEncodingError, ProtocolViolation
from echfront.quic.packets import MAX_VARINT, decode_varint, encode_varint, varint_length

__all__ = [
    "FRAME_ACK",
    "FRAME_ACK_ECN",
    "FRAME_CONNECTION_CLOSE",
    "FRAME_CRYPTO",
    "FRAME_PADDING",
    "FRAME_PING",
    "Frame",
    "InitialPayload",
    "crypto_frame_overhead",
    "encode_connection_close",
    "encode_crypto",
    "parse_initial_frames",
]

FRAME_PADDING = 0x00
FRAME_PING = 0x01
FRAME_ACK = 0x02
FRAME_ACK_ECN = 0x03
FRAME_CRYPTO = 0x06
FRAME_CONNECTION_CLOSE = 0x1C
#: CONNECTION_CLOSE of the application variant: 1-RTT only (RFC 9000 §12.4).
_FRAME_APPLICATION_CLOSE = 0x1D


class Frame(NamedTuple):
    """One frame of an Initial packet.

    :ivar type: the frame type (for PADDING, one frame stands for a run).
    :ivar raw: the frame's bytes as received.
    :ivar offset: CRYPTO only: the stream offset of ``data``.
    :ivar data: CRYPTO: the stream data; CONNECTION_CLOSE: the reason phrase.
    :ivar error_code: CONNECTION_CLOSE only.
    """

    type: int
    raw: bytes
    offset: int = 0
    data: bytes = b""
    error_code: int = 0


class InitialPayload(NamedTuple):
    """The frames of one Initial packet, grouped the way the rewriter uses them.

    :ivar frames: every frame in order (a PADDING run counts as one).
    :ivar crypto: the CRYPTO frames.
    :ivar kept: the raw ACK, PING and CONNECTION_CLOSE frames, concatenated:
        what a rewritten packet carries besides new CRYPTO data.
    :ivar ack_eliciting: whether the packet needs an acknowledgement (§13.2).
    :ivar close: the client's CONNECTION_CLOSE frame, if any.
    """

    frames: tuple[Frame, ...]
    crypto: tuple[Frame, ...]
    kept: bytes
    ack_eliciting: bool
    close: Frame | None


def _varint(data: bytes, pos: int, frame_type: int) -> tuple[int, int]:
    try:
        return decode_varint(data, pos)
    except ValueError:
        raise FrameEncodingError("truncated frame", frame_type=frame_type) from None


def _skip_ack(payload: bytes, pos: int, frame_type: int) -> int:
    """Validate an ACK frame at ``pos`` (after its type) and return its end (§19.3)."""
    largest, pos = _varint(payload, pos, frame_type)
    _delay, pos = _varint(payload, pos, frame_type)
    count, pos = _varint(payload, pos, frame_type)
    first_range, pos = _varint(payload, pos, frame_type)
    # Each further range takes at least two bytes: a count beyond that is
    # truncated by construction, refused before looping over it.
    if count > (len(payload) - pos) // 2:
        raise FrameEncodingError("ACK range count exceeds the frame", frame_type=frame_type)
    smallest = largest - first_range
    if smallest < 0:
        raise FrameEncodingError("ACK range below packet number 0", frame_type=frame_type)
    for _ in range(count):
        gap, pos = _varint(payload, pos, frame_type)
        length, pos = _varint(payload, pos, frame_type)
        # §19.3.1: largest = previous smallest - gap - 2; smallest = largest - length.
        smallest -= gap + 2 + length
        if smallest < 0:
            raise FrameEncodingError("ACK range below packet number 0", frame_type=frame_type)
    if frame_type == FRAME_ACK_ECN:
        for _ in range(3):
            _count, pos = _varint(payload, pos, frame_type)
    return pos


def parse_initial_frames(payload: bytes) -> InitialPayload:
    """Parse the plaintext payload of a client Initial packet (RFC 9000 §12.4, §19).

    :raises ProtocolViolation: for an empty payload (§12.4), a frame type not
        allowed in Initial packets, or a non-minimal frame type encoding.
    :raises FrameEncodingError: for a truncated or inconsistent frame, or a
        CRYPTO frame ending past 2^62-1 (§19.6).
    """
    if not payload:
        raise ProtocolViolation("Initial packet without frames")
    frames: list[Frame] = []
    crypto: list[Frame] = []
    kept: list[bytes] = []
    eliciting = False
    close: Frame | None = None
    end = len(payload)
    pos = 0
    while pos < end:
        start = pos
        frame_type = payload[pos]
        pos += 1
        if frame_type == FRAME_PADDING:
            while pos < end and payload[pos] == FRAME_PADDING:
                pos += 1
            frames.append(Frame(FRAME_PADDING, payload[start:pos]))
            continue
        if frame_type == FRAME_PING:
            eliciting = True
        elif frame_type in (FRAME_ACK, FRAME_ACK_ECN):
            pos = _skip_ack(payload, pos, frame_type)
        elif frame_type == FRAME_CRYPTO:
            offset, pos = _varint(payload, pos, frame_type)
            length, pos = _varint(payload, pos, frame_type)
            if pos + length > end:
                raise FrameEncodingError("CRYPTO data overruns the packet", frame_type=frame_type)
            if offset + length > MAX_VARINT:
                raise FrameEncodingError("CRYPTO data ends past 2^62-1", frame_type=frame_type)
            data = payload[pos : pos + length]
            frame = Frame(frame_type, payload[start : pos + length], offset, data)
            pos += length
            frames.append(frame)
            crypto.append(frame)
            eliciting = True
            continue
        elif frame_type == FRAME_CONNECTION_CLOSE:
            code, pos = _varint(payload, pos, frame_type)
            _trigger, pos = _varint(payload, pos, frame_type)
            length, pos = _varint(payload, pos, frame_type)
            if pos + length > end:
                raise FrameEncodingError("reason phrase overruns the packet", frame_type=frame_type)
            reason = payload[pos : pos + length]
            close = Frame(frame_type, payload[start : pos + length], 0, reason, code)
            pos += length
            frames.append(close)
            kept.append(close.raw)
            continue
        elif frame_type == _FRAME_APPLICATION_CLOSE:
            raise ProtocolViolation(
                "application CONNECTION_CLOSE in an Initial packet", frame_type=frame_type
            )
        else:
            # Any other type, including a longer encoding of an allowed one
            # (first byte >= 0x40), is not permitted in an Initial packet.
            raise ProtocolViolation(
                f"frame type 0x{frame_type:02x} in an Initial packet", frame_type=frame_type
            )
        raw = payload[start:pos]
        frames.append(Frame(frame_type, raw))
        kept.append(raw)
    return InitialPayload(tuple(frames), tuple(crypto), b"".join(kept), eliciting, close)


def crypto_frame_overhead(offset: int, length: int) -> int:
    """Bytes of a CRYPTO frame besides its data (§19.6)."""
    return 1 + varint_length(offset) + varint_length(length)


def encode_crypto(offset: int, data: bytes) -> bytes:
    """A CRYPTO frame (§19.6)."""
    return b"".join((b"\x06", encode_varint(offset), encode_varint(len(data)), data))


def encode_connection_close(code: int, frame_type: int = 0, reason: bytes = b"") -> bytes:
    """A CONNECTION_CLOSE frame of type 0x1c, the only one allowed in Initial packets (§19.19)."""
    return b"".join(
        (
            b"\x1c",
            encode_varint(code),
            encode_varint(frame_type),
            encode_varint(len(reason)),
            reason,
        )
    )

# -*- test-case-name: tests.test_quic_crypto_stream -*-
"""Reassembly of the Initial CRYPTO stream, bounded, sans-IO (RFC 9000 §19.6, RFC 9001 §4.1.3).

CRYPTO frames carry a byte stream per packet number space; a browser-sized
ClientHello spans two or more Initial packets, and real clients send its
pieces out of order, interleaved with PING and PADDING, and retransmit them
with overlaps (quic-facts.md).  :class:`CryptoReassembler` keeps the stream
by offset and hands out a complete handshake message once its bytes are
contiguous: the 4-byte handshake header (type, uint24 length) and the body
(RFC 8446 §4).

Bounds: no byte at or beyond ``max_bytes`` is accepted (RFC 9000 §7.5:
CRYPTO_BUFFER_EXCEEDED), and the stream may have at most ``max_ranges``
disjoint pieces, so many tiny scattered frames cannot cost more than a few
comparisons each.  Overlapping data must equal what arrived before
(RFC 9000 §19.6 lets an endpoint refuse a change; PROTOCOL_VIOLATION).
"""

from __future__ import annotations

import bisect

from echfront.errors import UnexpectedMessage
from echfront.quic.errors import CryptoBufferExceeded, ProtocolViolation

__all__ = ["DEFAULT_MAX_CRYPTO_BYTES", "CryptoReassembler"]

#: Default bound on the Initial CRYPTO stream of one flow: both ClientHellos.
DEFAULT_MAX_CRYPTO_BYTES = 64 * 1024
_HANDSHAKE_HEADER = 4


class CryptoReassembler:
    """The CRYPTO stream of one packet number space, by offset, bounded.

    :param max_bytes: no stream byte at an offset of ``max_bytes`` or more.
    :param max_ranges: at most this many disjoint received pieces.
    """

    __slots__ = ("_buffer", "_ends", "_max_bytes", "_max_ranges", "_starts")

    def __init__(self, max_bytes: int = DEFAULT_MAX_CRYPTO_BYTES, max_ranges: int = 64) -> None:
        """Start with an empty stream."""
        self._max_bytes = max_bytes
        self._max_ranges = max_ranges
        self._buffer = bytearray()
        # Disjoint, non-adjacent received ranges [start, end), sorted.
        self._starts: list[int] = []
        self._ends: list[int] = []

    @property
    def received(self) -> tuple[tuple[int, int], ...]:
        """The received ranges, merged and sorted."""
        return tuple(zip(self._starts, self._ends, strict=True))

    @property
    def highest(self) -> int:
        """One past the highest offset received (0 for an empty stream)."""
        return self._ends[-1] if self._ends else 0

    def contiguous_from(self, offset: int) -> int:
        """The end of the received bytes that run without a gap from ``offset``."""
        index = bisect.bisect_right(self._starts, offset) - 1
        if index < 0 or self._ends[index] <= offset:
            return offset
        return self._ends[index]

    def add(self, offset: int, data: bytes, *, frame_type: int = 0x06) -> None:
        """Add the data of one CRYPTO frame.

        :raises CryptoBufferExceeded: past ``max_bytes`` or ``max_ranges``.
        :raises ProtocolViolation: if it changes bytes received before.
        """
        if not data:
            return
        end = offset + len(data)
        if end > self._max_bytes:
            raise CryptoBufferExceeded(
                f"CRYPTO data up to offset {end} exceeds {self._max_bytes} bytes",
                frame_type=frame_type,
            )
        starts, ends = self._starts, self._ends
        buffer = self._buffer
        # Ranges touching [offset, end]: the first whose end reaches offset
        # through the last whose start is at most end (adjacent ones merge).
        first = bisect.bisect_left(ends, offset)
        last = bisect.bisect_right(starts, end)
        for i in range(first, last):
            lo = max(starts[i], offset)
            hi = min(ends[i], end)
            if lo < hi and buffer[lo:hi] != data[lo - offset : hi - offset]:
                raise ProtocolViolation("retransmitted CRYPTO data differs", frame_type=frame_type)
        if first == last and len(starts) >= self._max_ranges:
            raise CryptoBufferExceeded("CRYPTO data in too many pieces", frame_type=frame_type)
        if len(buffer) < end:
            buffer.extend(bytes(end - len(buffer)))
        buffer[offset:end] = data
        new_start = min(offset, starts[first]) if first < last else offset
        new_end = max(end, ends[last - 1]) if first < last else end
        starts[first:last] = [new_start]
        ends[first:last] = [new_end]

    def read(self, start: int, end: int) -> bytes:
        """Bytes ``[start, end)``, which must have been received."""
        if self.contiguous_from(start) < end:
            raise ValueError("reading CRYPTO bytes that have not arrived")
        return bytes(self._buffer[start:end])

    def message_at(self, start: int, *, message_type: int = 1) -> bytes | None:
        """The complete handshake message at ``start``, or None while incomplete.

        :param message_type: the handshake type expected there (1, ClientHello).
        :raises UnexpectedMessage: for another handshake type (the caller maps
            it to CRYPTO_ERROR, RFC 9001 §4.8).
        :raises CryptoBufferExceeded: when the announced length cannot fit
            under ``max_bytes``.
        """
        have = self.contiguous_from(start)
        if have - start < 1:
            return None
        if self._buffer[start] != message_type:
            raise UnexpectedMessage(
                f"handshake message type {self._buffer[start]}, expected {message_type}"
            )
        if have - start < _HANDSHAKE_HEADER:
            return None
        length = int.from_bytes(self._buffer[start + 1 : start + 4], "big")
        end = start + _HANDSHAKE_HEADER + length
        if end > self._max_bytes:
            raise CryptoBufferExceeded(
                f"a handshake message of {length} bytes exceeds the CRYPTO bound"
            )
        if have < end:
            return None
        return bytes(self._buffer[start:end])

"""CRYPTO stream reassembly: any order, any split, overlaps, and bounds (RFC 9000 §19.6)."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from echfront.errors import UnexpectedMessage
from echfront.quic.crypto_stream import CryptoReassembler
from echfront.quic.errors import CryptoBufferExceeded, ProtocolViolation


def hello(length: int) -> bytes:
    """A ClientHello-typed handshake message of ``length`` body bytes."""
    body = bytes((i * 7) % 256 for i in range(length))
    return b"\x01" + length.to_bytes(3, "big") + body


def test_in_order() -> None:
    message = hello(1800)
    stream = CryptoReassembler()
    stream.add(0, message[:1000])
    assert stream.message_at(0) is None
    stream.add(1000, message[1000:])
    assert stream.message_at(0) == message
    assert stream.received == ((0, len(message)),)


def test_end_first_like_firefox() -> None:
    """Firefox sends the end of the hello first (quic-facts.md)."""
    message = hello(1792)
    stream = CryptoReassembler()
    stream.add(1100, message[1100:])
    assert stream.message_at(0) is None
    assert stream.highest == len(message)
    stream.add(0, message[:3])
    assert stream.message_at(0) is None  # not even the length yet
    stream.add(3, message[3:1100])
    assert stream.message_at(0) == message


def test_overlapping_retransmission() -> None:
    message = hello(500)
    stream = CryptoReassembler()
    stream.add(100, message[100:300])
    stream.add(0, message[:200])
    stream.add(250, message[250:])
    stream.add(0, message)
    assert stream.message_at(0) == message
    assert stream.received == ((0, len(message)),)


def test_changed_retransmission_is_refused() -> None:
    message = hello(100)
    stream = CryptoReassembler()
    stream.add(0, message)
    with pytest.raises(ProtocolViolation, match="differs"):
        stream.add(50, b"\xff" + message[51:60])


def test_byte_bound() -> None:
    stream = CryptoReassembler(max_bytes=1000)
    stream.add(990, bytes(10))
    with pytest.raises(CryptoBufferExceeded):
        stream.add(995, bytes(6))
    with pytest.raises(CryptoBufferExceeded):
        stream.add(2**61, b"x")  # a huge offset allocates nothing


def test_announced_length_beyond_bound() -> None:
    stream = CryptoReassembler(max_bytes=1000)
    stream.add(0, b"\x01\x00\x10\x00")
    with pytest.raises(CryptoBufferExceeded, match="exceeds"):
        stream.message_at(0)


def test_range_bound() -> None:
    stream = CryptoReassembler(max_ranges=4)
    for i in range(4):
        stream.add(i * 10, b"x")
    stream.add(1, b"x")  # extends a piece: fine
    with pytest.raises(CryptoBufferExceeded, match="pieces"):
        stream.add(100, b"x")


def test_wrong_message_type() -> None:
    stream = CryptoReassembler()
    stream.add(0, b"\x02")
    with pytest.raises(UnexpectedMessage):
        stream.message_at(0)


def test_second_message_at_offset() -> None:
    first, second = hello(300), hello(400)
    stream = CryptoReassembler()
    stream.add(len(first), second)
    stream.add(0, first)
    assert stream.message_at(0) == first
    assert stream.message_at(len(first)) == second
    assert stream.read(10, 20) == first[10:20]
    with pytest.raises(ValueError, match="not arrived"):
        stream.read(0, len(first) + len(second) + 1)


@st.composite
def splits(draw: st.DrawFn) -> tuple[bytes, list[tuple[int, bytes]]]:
    """A message cut into pieces (with overlapping duplicates), shuffled."""
    message = hello(draw(st.integers(0, 3000)))
    cuts = sorted(draw(st.lists(st.integers(1, max(1, len(message) - 1)), max_size=12)))
    bounds = [0, *cuts, len(message)]
    pieces = [(a, message[a:b]) for a, b in itertools.pairwise(bounds) if a < b]
    for _ in range(draw(st.integers(0, 4))):
        a = draw(st.integers(0, len(message) - 1))
        b = draw(st.integers(a + 1, len(message)))
        pieces.append((a, message[a:b]))
    return message, draw(st.permutations(pieces))


@settings(max_examples=300, deadline=None)
@given(splits())
def test_any_order_any_split(case: tuple[bytes, list[tuple[int, bytes]]]) -> None:
    """Property: whatever the order, split and overlaps, the message comes out once whole."""
    message, pieces = case
    stream = CryptoReassembler()
    for index, (offset, data) in enumerate(pieces):
        stream.add(offset, data)
        got = stream.message_at(0)
        covered = stream.contiguous_from(0) >= len(message)
        assert (got is not None) == covered, index
    assert stream.message_at(0) == message
    assert stream.received == ((0, len(message)),)

"""The HelloRetryRequest watch, sans-IO: how it learns the backend's first answer.

A ServerHello whose first record holds its random settles the watch from
that first read, with no reassembly; a HelloRetryRequest, a ServerHello cut
into records too small to hold the random, one that arrives a few bytes at
a time, or anything else goes through the handshake reader.  The outcome
(HRR or not, client bytes held back then released) is the same on both
paths (RFC 8446 §4.1.3; RFC 9849 §7.1.1).
"""

from __future__ import annotations

from typing import Any

import pytest

from echfront.ech import hrrwatch
from echfront.ech.decoder import ECHDecoder
from echfront.ech.hrrwatch import HelloRetryWatch
from echfront.ech.keyset import KeySet
from echfront.tls.hello import HANDSHAKE_SERVER_HELLO
from echfront.tls.records import HandshakeReader
from tests.echhello import InnerSpec, frame, seal_hello
from tests.test_relay import KEY
from tests.twistedhelpers import server_hello

CLIENT_CCS = b"\x14\x03\x03\x00\x01\x01"


def nothing_released(data: bytes) -> None:
    """The ``forward`` of a call that must release no client bytes."""
    raise AssertionError(f"released {data!r}")


def watch() -> HelloRetryWatch:
    """A watch for an ECH-accepted connection, as a relay makes it."""
    sealed = seal_hello(KEY.config, InnerSpec())
    flight = HandshakeReader(1).feed(sealed.records)
    assert flight is not None
    info = ECHDecoder(KeySet([KEY])).decode(flight)
    assert info.second_hello is not None
    return HelloRetryWatch(info.second_hello, 16384)


def feed_server(subject: HelloRetryWatch, data: bytes, step: int) -> tuple[bool, list[bytes]]:
    """Give the watch ``data`` from the backend ``step`` bytes at a time."""
    released: list[bytes] = []
    known = False
    for start in range(0, len(data), step):
        known = subject.from_server(data[start : start + step], released.append)
    return known, released


def resplit(record: bytes, sizes: list[int]) -> bytes:
    """A handshake record's message cut into records of ``sizes`` (then the rest)."""
    return frame(record[5:], 0x0303, sizes)


@pytest.mark.parametrize("step", [4096, 1, 7, 43])
def test_a_server_hello_is_known_and_held_client_bytes_follow(step: int) -> None:
    subject = watch()
    subject.from_client(CLIENT_CCS[:3], nothing_released)  # a partial record is held back
    known, released = feed_server(subject, server_hello(), step)
    assert known and subject.server_done and subject.client_done
    assert not subject.hello_retry
    assert released == [CLIENT_CCS[:3]]


@pytest.fixture
def readers_made(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The message types of the handshake readers the watch makes (after setup)."""
    made: list[int] = []

    def counting(message_type: int, **options: Any) -> HandshakeReader:
        made.append(message_type)
        return HandshakeReader(message_type, **options)

    monkeypatch.setattr(hrrwatch, "HandshakeReader", counting)
    return made


def test_a_server_hello_in_one_read_needs_no_reader(readers_made: list[int]) -> None:
    subject = watch()
    assert subject.from_server(server_hello()[:43], nothing_released)
    assert subject.server_done and not subject.hello_retry
    assert readers_made == []


@pytest.mark.parametrize("step", [4096, 1, 43])
@pytest.mark.parametrize("sizes", [[], [10], [37], [38, 1]], ids=["one", "10", "37", "38+1"])
def test_a_hello_retry_request_is_found_however_it_is_cut(step: int, sizes: list[int]) -> None:
    subject = watch()
    known, released = feed_server(subject, resplit(server_hello(retry=True), sizes), step)
    assert known and subject.server_done and subject.hello_retry
    assert not subject.client_done  # the second ClientHello is still to come
    assert released == []


@pytest.mark.parametrize("sizes", [[10], [37]], ids=["10", "37"])
def test_a_server_hello_in_small_records_goes_through_the_reader(
    sizes: list[int], readers_made: list[int]
) -> None:
    subject = watch()
    data = resplit(server_hello(), sizes)
    assert subject.from_server(data, nothing_released)
    assert subject.server_done and not subject.hello_retry
    assert readers_made == [HANDSHAKE_SERVER_HELLO]


def test_an_alert_first_steps_aside() -> None:
    subject = watch()
    assert subject.from_server(b"\x15\x03\x03\x00\x02\x02\x28", nothing_released)
    assert subject.server_done and subject.client_done and not subject.hello_retry

# -*- test-case-name: tests.test_records -*-
"""TLS record framing, sans-IO (RFC 8446 §5.1).

Two layers:

* :class:`RecordSplitter` cuts a byte stream into whole records and keeps the
  unfinished tail; the relay uses it to forward whole records only while it
  still may have to rewrite a second ClientHello.
* :class:`HandshakeReader` reassembles one handshake message (a ClientHello
  or a ServerHello) spread over any number of records and reads, and returns
  the raw records it consumed plus every byte after them untouched (CCS,
  early data): the front must never parse, or drop, what it does not own.

Both are bounded: a record may not exceed the RFC 8446 limits and the whole
flight may not exceed ``max_bytes``; no input makes them buffer more.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from echfront.errors import DecodeError, IllegalParameter, RecordOverflow, UnexpectedMessage

__all__ = [
    "CONTENT_ALERT",
    "CONTENT_APPLICATION_DATA",
    "CONTENT_CHANGE_CIPHER_SPEC",
    "CONTENT_HANDSHAKE",
    "DEFAULT_MAX_FLIGHT",
    "MAX_CIPHERTEXT",
    "MAX_PLAINTEXT",
    "HandshakeFlight",
    "HandshakeReader",
    "RecordSplitter",
    "frame_records",
]

CONTENT_CHANGE_CIPHER_SPEC = 20
CONTENT_ALERT = 21
CONTENT_HANDSHAKE = 22
CONTENT_APPLICATION_DATA = 23
_CONTENT_TYPES = frozenset(
    (CONTENT_CHANGE_CIPHER_SPEC, CONTENT_ALERT, CONTENT_HANDSHAKE, CONTENT_APPLICATION_DATA)
)

HEADER_LENGTH = 5
#: A record header, read in one call: content type, the version's two
#: bytes, length.
_RECORD_HEADER = struct.Struct(">BBBH").unpack_from
#: A handshake message header: msg_type (the top byte) and its 24-bit length.
_MESSAGE_HEADER = struct.Struct(">I").unpack_from
#: Writes a record header: content type, version, length.
_PACK_HEADER = struct.Struct(">BHH").pack
#: RFC 8446 §5.1: TLSPlaintext.length MUST NOT exceed 2^14.
MAX_PLAINTEXT = 2**14
#: RFC 8446 §5.2: TLSCiphertext.length MUST NOT exceed 2^14 + 256.
MAX_CIPHERTEXT = 2**14 + 256
#: Default bound on the bytes of a first flight (records carrying the ClientHello).
DEFAULT_MAX_FLIGHT = 64 * 1024


def _check_header(data: bytes | bytearray, pos: int, max_length: int) -> int:
    """Validate the record header at ``pos`` and return its payload length."""
    content_type = data[pos]
    if content_type not in _CONTENT_TYPES:
        raise UnexpectedMessage(f"unknown TLS record type {content_type}")
    if data[pos + 1] != 3:
        raise DecodeError(f"record version 0x{data[pos + 1]:02x}{data[pos + 2]:02x} is not TLS")
    length = (data[pos + 3] << 8) | data[pos + 4]
    if length > max_length:
        raise RecordOverflow(f"record of {length} bytes exceeds {max_length}")
    return length


class RecordSplitter:
    """Cut a stream into whole TLS records (RFC 8446 §5.1), keeping the rest.

    At most one unfinished record is buffered, so memory is bounded by
    ``5 + max_length`` bytes however the peer behaves.
    """

    __slots__ = ("_buffer", "_max_length")

    def __init__(self, max_length: int = MAX_CIPHERTEXT) -> None:
        """Accept records whose payload is at most ``max_length`` bytes."""
        self._buffer = bytearray()
        self._max_length = max_length

    def feed(self, data: bytes) -> bytes:
        """Add ``data`` and return every whole record now available, joined.

        :raises AlertError: on an unknown record type, a non-TLS version or an
            oversized record.
        """
        buffer = self._buffer
        buffer += data
        pos = 0
        end = len(buffer)
        while end - pos >= HEADER_LENGTH:
            record_end = pos + HEADER_LENGTH + _check_header(buffer, pos, self._max_length)
            if record_end > end:
                break
            pos = record_end
        if pos < end:
            # An unfinished record gets its type checked at once, so garbage
            # is refused without waiting for more of it.
            _check_first_byte(buffer[pos])
        whole = bytes(buffer[:pos])
        del buffer[:pos]
        return whole

    def pending(self) -> bytes:
        """Return and forget the buffered bytes of an unfinished record."""
        rest = bytes(self._buffer)
        self._buffer.clear()
        return rest

    @property
    def buffered(self) -> int:
        """Number of bytes held back (part of one record)."""
        return len(self._buffer)


def _check_first_byte(content_type: int) -> None:
    if content_type not in _CONTENT_TYPES:
        raise UnexpectedMessage(f"unknown TLS record type {content_type}")


class HandshakeFlight(NamedTuple):
    """One reassembled handshake message and the bytes around it.

    A named tuple: one is built per connection (two when the backend's
    ServerHello needs reassembling), and a tuple builds in a quarter of a
    frozen dataclass's time.

    :ivar message: the handshake message, 4-byte header included.
    :ivar records: the raw records that carried it, exactly as received.
    :ivar record_version: ``legacy_record_version`` of the first such record;
        a rewritten message must be framed with it (checklist FWD-4).
    :ivar rest: every byte that followed the last of those records, unparsed.
    """

    message: bytes
    records: bytes
    record_version: int
    rest: bytes


class HandshakeReader:
    """Reassemble one handshake message of a given type from a byte stream.

    RFC 8446 §5.1 lets a handshake message span records and forbids
    interleaving other record types inside it.  Records of ``pass_types``
    that arrive *before* the message starts (a CCS, or 0-RTT application data
    sent before a second ClientHello, checklist HRR-9) are handed out by
    :meth:`take_passed` as they complete, so they can be forwarded at once
    and never accumulate.

    :param message_type: the expected handshake type (1 ClientHello, 2 ServerHello).
    :param max_bytes: bound on the raw records that carry the message.
    :param pass_types: record types allowed, and passed on, before the message.
    :param require_boundary: the message must end at a record boundary, as a
        ClientHello must (it precedes a key change, or ends the flight).
        ServerHello readers disable it: a TLS 1.2 server packs more handshake
        messages into the same record.
    """

    __slots__ = (
        "_buffer",
        "_fragments",
        "_have",
        "_max_bytes",
        "_message_type",
        "_need",
        "_pass_types",
        "_passed",
        "_raw_length",
        "_record_version",
        "_records",
        "_require_boundary",
    )

    def __init__(
        self,
        message_type: int,
        *,
        max_bytes: int = DEFAULT_MAX_FLIGHT,
        pass_types: frozenset[int] = frozenset(),
        require_boundary: bool = True,
    ) -> None:
        """Prepare to read one message of ``message_type``."""
        self._message_type = message_type
        self._max_bytes = max_bytes
        self._pass_types = pass_types
        self._require_boundary = require_boundary
        self._buffer = b""
        self._records: list[bytes] = []
        self._fragments: list[bytes] = []
        self._passed: list[bytes] = []
        self._have = 0
        self._need = -1
        self._raw_length = 0
        self._record_version = 0

    @property
    def buffered(self) -> int:
        """Bytes held so far: records of the message plus an unfinished record."""
        return self._raw_length + len(self._buffer)

    @property
    def started(self) -> bool:
        """Whether the first record of the message has been seen."""
        return bool(self._records)

    def take_passed(self) -> bytes:
        """Return, and forget, the pass-through records completed so far."""
        if not self._passed:
            return b""
        passed = b"".join(self._passed)
        self._passed.clear()
        return passed

    def feed(self, data: bytes) -> HandshakeFlight | None:
        """Add bytes; return the flight once the message is complete.

        After a flight is returned the reader is finished; it must not be fed
        again (the caller owns ``rest``).

        :raises AlertError: for anything RFC 8446 §5.1 or the bounds forbid.
        """
        buffer = self._buffer + data if self._buffer else data
        pos = 0
        end = len(buffer)
        while end - pos >= HEADER_LENGTH:
            content_type, major, minor, length = _RECORD_HEADER(buffer, pos)
            if content_type != CONTENT_HANDSHAKE:
                if self._records or content_type not in self._pass_types:
                    kind = "inside" if self._records else "before"
                    raise UnexpectedMessage(
                        f"record type {content_type} {kind} the handshake message"
                    )
                record_end = pos + HEADER_LENGTH + _check_header(buffer, pos, MAX_CIPHERTEXT)
                if record_end > end:
                    break
                self._passed.append(buffer[pos:record_end])
                pos = record_end
                continue
            # _check_header, written out: every hello's records pass here.
            if major != 3:
                raise DecodeError(f"record version 0x{major:02x}{minor:02x} is not TLS")
            if length > MAX_PLAINTEXT:
                raise RecordOverflow(f"record of {length} bytes exceeds {MAX_PLAINTEXT}")
            if length == 0:
                # RFC 8446 §5.1: zero-length handshake fragments MUST NOT be sent.
                raise DecodeError("zero-length handshake record")
            raw_length = self._raw_length + HEADER_LENGTH + length
            if raw_length > self._max_bytes:
                raise IllegalParameter(f"handshake flight exceeds {self._max_bytes} bytes")
            record_end = pos + HEADER_LENGTH + length
            if record_end > end:
                # An unfinished handshake record whose header passed the
                # checks above: all that is left to refuse early is the
                # message type, once its first byte is in (what
                # _check_partial would check, without checking the header twice).
                if (
                    not self._records
                    and end - pos > HEADER_LENGTH
                    and buffer[pos + HEADER_LENGTH] != self._message_type
                ):
                    raise UnexpectedMessage(
                        f"handshake message type {buffer[pos + HEADER_LENGTH]}, "
                        f"expected {self._message_type}"
                    )
                self._buffer = buffer[pos:]
                return None
            records = self._records
            if not records:
                if length >= 4:
                    # The message's header is in its first record (the only
                    # record, for almost every hello): read it here.
                    (word,) = _MESSAGE_HEADER(buffer, pos + HEADER_LENGTH)
                    if word >> 24 != self._message_type:
                        raise UnexpectedMessage(
                            f"handshake message type {word >> 24}, expected {self._message_type}"
                        )
                    need = 4 + (word & 0xFFFFFF)
                    if need > self._max_bytes:
                        raise IllegalParameter(
                            f"handshake message of {need} bytes exceeds {self._max_bytes}"
                        )
                    if need == length:
                        # Exactly one record: no reassembly to do.
                        record = buffer[pos:record_end]
                        records.append(record)  # for .started
                        self._raw_length = raw_length  # for .buffered
                        self._buffer = b""
                        return HandshakeFlight(
                            record[HEADER_LENGTH:],
                            record,
                            (major << 8) | minor,
                            buffer[record_end:],
                        )
                    self._need = need
                self._record_version = (major << 8) | minor
            records.append(buffer[pos:record_end])
            self._fragments.append(buffer[pos + HEADER_LENGTH : record_end])
            self._raw_length = raw_length
            self._have += length
            pos = record_end
            if self._need < 0 and self._have >= 4:
                self._learn_length()
            if 0 <= self._need <= self._have:
                return self._finish(buffer[pos:])
        self._check_partial(buffer, pos, end)
        self._buffer = buffer[pos:]
        return None

    def _learn_length(self) -> None:
        """Read the 4-byte handshake header once enough payload is in."""
        head = self._fragments[0] if len(self._fragments[0]) >= 4 else b"".join(self._fragments)
        if head[0] != self._message_type:
            raise UnexpectedMessage(
                f"handshake message type {head[0]}, expected {self._message_type}"
            )
        self._need = 4 + int.from_bytes(head[1:4], "big")
        if self._need > self._max_bytes:
            raise IllegalParameter(
                f"handshake message of {self._need} bytes exceeds {self._max_bytes}"
            )

    def _check_partial(self, buffer: bytes, pos: int, end: int) -> None:
        """Refuse what can already be refused in an unfinished record."""
        if pos >= end:
            return
        content_type = buffer[pos]
        _check_first_byte(content_type)
        if content_type != CONTENT_HANDSHAKE and (
            self._records or content_type not in self._pass_types
        ):
            raise UnexpectedMessage(f"record type {content_type} where a handshake was expected")
        if end - pos >= HEADER_LENGTH and content_type == CONTENT_HANDSHAKE:
            length = _check_header(buffer, pos, MAX_PLAINTEXT)
            if self._raw_length + HEADER_LENGTH + length > self._max_bytes:
                raise IllegalParameter(f"handshake flight exceeds {self._max_bytes} bytes")
            if not self._records and end - pos > HEADER_LENGTH:
                first = buffer[pos + HEADER_LENGTH]
                if first != self._message_type:
                    raise UnexpectedMessage(
                        f"handshake message type {first}, expected {self._message_type}"
                    )

    def _finish(self, rest: bytes) -> HandshakeFlight:
        fragments = self._fragments
        payload = fragments[0] if len(fragments) == 1 else b"".join(fragments)
        if self._have > self._need and self._require_boundary:
            raise UnexpectedMessage("more handshake data after the message in its last record")
        message = payload if self._have == self._need else payload[: self._need]
        records = self._records[0] if len(self._records) == 1 else b"".join(self._records)
        self._buffer = b""
        return HandshakeFlight(message, records, self._record_version, rest)


def frame_records(
    content_type: int, record_version: int, payload: bytes, max_fragment: int = MAX_PLAINTEXT
) -> bytes:
    """Frame ``payload`` as records of ``content_type`` (RFC 8446 §5.1).

    Used to forward a rebuilt ClientHelloInner: it keeps the client's
    ``legacy_record_version`` (checklist FWD-4: Go rejects a second ClientHello
    whose record version changed) and fragments at 2^14 bytes.
    """
    if len(payload) <= max_fragment:
        return _PACK_HEADER(content_type, record_version, len(payload)) + payload
    parts = []
    for start in range(0, len(payload), max_fragment):
        chunk = payload[start : start + max_fragment]
        parts.append(_PACK_HEADER(content_type, record_version, len(chunk)) + chunk)
    return b"".join(parts)

# -*- test-case-name: tests.test_decoder -*-
"""The split-mode ECH decoder, sans-IO (RFC 9849 §5, §7.1, §7.1.1).

:class:`ECHDecoder` turns the reassembled first ClientHello into a
:class:`ClientHelloInfo`: which hello decides routing (inner or outer), the
effective server name and ALPN list, the ECH outcome, and the exact bytes to
forward.  When ECH was accepted the info also carries a
:class:`SecondHelloDecoder` holding the HPKE context, which rewrites the
client's second ClientHello if the backend answers with a HelloRetryRequest.

Not every failure is an error.  RFC 9849 §7.1: when no candidate key
decrypts the payload (GREASE, a stale config, an unknown config_id), the
server "MUST ignore the extension and proceed with the connection" using
the outer hello; that is ``ECHStatus.REJECTED``.  Real errors (malformed
structures, forbidden values) raise :class:`~echfront.errors.AlertError`
subclasses carrying the alert, and nothing else escapes.

Why this module is long: the first and second ClientHello go through the
same steps (outer ECH extension, HPKE open, inner rebuild, inner checks),
and keeping those steps beside both callers keeps the two paths identical.
"""

from __future__ import annotations

import enum
import functools
import struct
from collections.abc import Callable
from dataclasses import dataclass, replace
from itertools import accumulate
from typing import NamedTuple

from echfront.ech.hpke import HPKEError, RecipientContext
from echfront.ech.keyset import ECHKey, KeySet
from echfront.errors import (
    AlertError,
    DecodeError,
    DecryptError,
    HandshakeFailure,
    IllegalParameter,
    MissingExtension,
)
from echfront.tls.hello import (
    EXT_ECH,
    EXT_ECH_OUTER_EXTENSIONS,
    HANDSHAKE_CLIENT_HELLO,
    ClientHello,
    Extension,
)
from echfront.tls.records import CONTENT_HANDSHAKE, HandshakeFlight, frame_records

__all__ = [
    "ClientHelloInfo",
    "ECHDecoder",
    "ECHStatus",
    "HelloSummary",
    "OuterECH",
    "RebuiltInner",
    "RejectReason",
    "SecondHello",
    "SecondHelloDecoder",
    "parse_outer_ech",
    "rebuild_inner",
]

_ECH_TYPE_OUTER = 0
_ECH_TYPE_INNER = 1
#: Offset of enc within ECHClientHello(outer): type, kdf_id, aead_id, config_id, enc length.
_ENC_OFFSET = 1 + 2 + 2 + 1 + 2
#: kdf_id, aead_id, config_id and the length of enc, read from offset 1.
_ECH_FIXED = struct.Struct(">HHBH").unpack_from


class ECHStatus(enum.Enum):
    """What happened to ECH on a connection (RFC 9849 §7.1)."""

    #: No encrypted_client_hello extension: an ordinary TLS client.
    NOT_OFFERED = "not_offered"
    #: Offered but not decrypted: GREASE, unknown config_id or a failed open.
    #: These are indistinguishable by design (§10.10.4, checklist REJ-7).
    REJECTED = "rejected"
    #: Decrypted: routing and forwarding use the ClientHelloInner.
    ACCEPTED = "accepted"


class RejectReason(enum.Enum):
    """Which of the three rejection paths the decoder took (RFC 9849 §7.1).

    The three look the same to the client by design (§10.10.4, checklist
    REJ-7): the outcome is ``ECHStatus.REJECTED`` and the connection goes on
    with the outer hello.  The reason is a diagnostic on
    :class:`ClientHelloInfo` (what routers and local services receive, and
    what the decoder's tests check path by path); the front neither logs
    nor counts it (it is not in :class:`HelloSummary`), and nothing may act
    on it.
    """

    UNKNOWN_CONFIG_ID = "unknown_config_id"
    UNSUPPORTED_SUITE = "unsupported_suite"
    DECRYPT_FAILED = "decrypt_failed"


class OuterECH(NamedTuple):
    """An ECHClientHello of type outer (RFC 9849 §5).

    :ivar payload_offset: where ``payload`` starts in the ClientHelloOuter
        body; the AAD zeroes exactly those bytes (§5.2, checklist AAD-2).
    """

    kdf_id: int
    aead_id: int
    config_id: int
    enc: bytes
    payload: bytes
    payload_offset: int

    def aad(self, outer_body: bytes) -> bytes:
        """ClientHelloOuterAAD: the outer body with the payload zeroed (§5.2)."""
        start = self.payload_offset
        length = len(self.payload)
        return b"".join((outer_body[:start], bytes(length), outer_body[start + length :]))


def parse_outer_ech(
    extension: Extension,
    *,
    inner_type_alert: type[DecodeError | IllegalParameter] = IllegalParameter,
) -> OuterECH:
    """Parse the encrypted_client_hello extension of a ClientHelloOuter (§5).

    :param inner_type_alert: the error for an extension of type inner.  For a
        first ClientHello a split-mode front answers illegal_parameter (§7,
        checklist PAR-5); for the second one Go and BoringSSL answer
        decode_error (HRR-5).
    :raises IllegalParameter: for an unknown type (PAR-6).
    :raises DecodeError: for truncation, trailing bytes or an empty payload (PAR-7).
    """
    return _parse_outer_ech(extension.data, extension.offset, inner_type_alert)


def _parse_outer_ech(
    data: bytes, offset: int, inner_type_alert: type[DecodeError | IllegalParameter]
) -> OuterECH:
    """:func:`parse_outer_ech` of extension data found at ``offset`` in its body."""
    if not data:
        raise DecodeError("empty encrypted_client_hello extension")
    ech_type = data[0]
    if ech_type != _ECH_TYPE_OUTER:
        if ech_type == _ECH_TYPE_INNER:
            raise inner_type_alert("encrypted_client_hello of type inner in a ClientHelloOuter")
        raise IllegalParameter(f"unknown ECHClientHello type {ech_type}")
    end = len(data)
    if end < _ENC_OFFSET:
        raise DecodeError("truncated ECHClientHello")
    kdf_id, aead_id, config_id, enc_len = _ECH_FIXED(data, 1)
    payload_len_at = _ENC_OFFSET + enc_len
    if end < payload_len_at + 2:
        raise DecodeError("truncated ECHClientHello enc")
    payload_len = (data[payload_len_at] << 8) | data[payload_len_at + 1]
    payload_at = payload_len_at + 2
    if payload_len == 0:
        raise DecodeError("empty ECHClientHello payload")
    if payload_at + payload_len != end:
        raise DecodeError("ECHClientHello payload length does not match the extension")
    return OuterECH(
        kdf_id,
        aead_id,
        config_id,
        data[_ENC_OFFSET:payload_len_at],  # enc
        data[payload_at:],  # payload
        offset + payload_at,  # payload_offset
    )


def _hello_ech(
    hello: ClientHello, inner_type_alert: type[DecodeError | IllegalParameter]
) -> OuterECH | None:
    """:func:`parse_outer_ech` of ``hello``'s encrypted_client_hello, or None without one.

    Reads the extension's bytes straight from the hello's index (no
    :class:`Extension` built): this runs for every hello.
    """
    if EXT_ECH not in hello:
        return None
    bounds = hello.extension_bounds
    index = hello.extension_types.index(EXT_ECH)
    start = bounds[index] + 4
    return _parse_outer_ech(hello.body[start : bounds[index + 1]], start, inner_type_alert)


class RebuiltInner(NamedTuple):
    """A rebuilt ClientHelloInner: the exact message bytes, and its parsed form."""

    message: bytes
    hello: ClientHello


_TYPE_AND_LENGTH = struct.Struct(">HH").unpack_from
_U32 = struct.Struct(">I").pack
#: A ClientHello's handshake header, less its 24-bit length (RFC 8446 §4).
_CLIENT_HELLO_HEADER = HANDSHAKE_CLIENT_HELLO << 24


def rebuild_inner(outer: ClientHello, encoded: bytes) -> RebuiltInner:
    """Rebuild the ClientHelloInner from an EncodedClientHelloInner (§5.1).

    Copies the outer legacy_session_id in (REC-2), checks the padding is all
    zeros (REC-1) and replaces the one ``ech_outer_extensions`` extension, in
    place, by the referenced outer extensions.  Expansion is linear
    (App. A, REC-9): one cursor walks the outer extensions forwards and is
    never rewound, which also enforces order (REC-7), existence (REC-4) and
    single use (REC-5) at once.  Every referenced extension is used at most
    once, so the result is never larger than outer plus payload (SEC-2).

    This runs once per ECH connection, so it does the work in as few steps
    as it can: each extension is copied as one slice (found, for a
    reference, by one C-level search), the body is joined once, the new
    extension index is summed from the slices' lengths, and the fixed
    fields are checked here, as they are read, rather than by parsing the
    result again.

    :returns: the handshake message (4-byte header and body), byte-exact
        what the client hashes (REC-12), and the parsed hello.
    :raises IllegalParameter: for the §5.1 violations the checklist maps to 47.
    :raises DecodeError: for structural errors.
    """
    end = len(encoded)
    if end < 35:
        raise DecodeError("EncodedClientHelloInner too short")
    if encoded[34] != 0:
        raise IllegalParameter("EncodedClientHelloInner has a non-empty legacy_session_id")
    if end < 37:
        raise DecodeError("EncodedClientHelloInner truncated")
    suites_length = (encoded[35] << 8) | encoded[36]
    pos = 37 + suites_length
    if pos + 1 > end:
        raise DecodeError("EncodedClientHelloInner truncated in cipher_suites")
    compression_at = pos + 1
    pos = compression_at + encoded[pos]
    if pos + 2 > end:
        raise DecodeError("EncodedClientHelloInner has no extensions")
    # The checks ClientHello.parse makes of these fields (the message says
    # nothing of the encrypted values, SEC-3).
    if suites_length < 2 or suites_length % 2 or pos == compression_at:
        raise DecodeError("malformed ClientHelloInner")
    ext_block_at = pos
    ext_end = pos + 2 + ((encoded[pos] << 8) | encoded[pos + 1])
    if ext_end > end:
        raise DecodeError("EncodedClientHelloInner extensions overrun the payload")
    if encoded.count(0, ext_end) != end - ext_end:
        raise IllegalParameter("EncodedClientHelloInner padding is not all zeros")

    sid = outer.session_id
    outer_bounds = outer.extension_bounds
    outer_body = outer.body
    find = outer.extension_types.index
    count = len(outer_bounds) - 1
    cursor = -1
    expanded = False
    # The new extension block, extension by extension: types and bytes
    # (from the encoded inner, or referenced in the outer body).
    types: list[int] = []
    pieces: list[bytes] = []
    pos = ext_block_at + 2
    last = ext_end - 4
    while pos < ext_end:
        if pos > last:
            raise DecodeError("truncated extension in EncodedClientHelloInner")
        ext_type, length = _TYPE_AND_LENGTH(encoded, pos)
        data_end = pos + 4 + length
        if data_end > ext_end:
            raise DecodeError("extension overruns EncodedClientHelloInner")
        if ext_type != EXT_ECH_OUTER_EXTENSIONS:
            types.append(ext_type)
            pieces.append(encoded[pos:data_end])
            pos = data_end
            continue
        if expanded:
            raise IllegalParameter("ech_outer_extensions appears twice")
        expanded = True
        # OuterExtensions: ExtensionType OuterExtensions<2..254> (§5.1).
        size = encoded[pos + 4] if length else 0
        if not length or size != length - 1 or size < 2 or size % 2:
            raise DecodeError("bad ech_outer_extensions length")
        wanted = _uint16s(size // 2).unpack_from(encoded, pos + 5)
        # Messages here say what is wrong, never which values the
        # encrypted hello held (SEC-3).
        if EXT_ECH in wanted or EXT_ECH_OUTER_EXTENSIONS in wanted:
            raise IllegalParameter("ech_outer_extensions references an ECH extension")
        add_piece = pieces.append
        try:
            for wanted_type in wanted:
                # One cursor, moved forwards only (tuple.index from just
                # after the previous find): each reference must lie after
                # the previous one, which checks order (REC-7), existence
                # (REC-4) and single use (REC-5) at once, in time linear in
                # the outer's extensions (REC-9).
                cursor = find(wanted_type, cursor + 1, count)
                add_piece(outer_body[outer_bounds[cursor] : outer_bounds[cursor + 1]])
        except ValueError:
            raise IllegalParameter(
                "an ech_outer_extensions reference is missing, repeated or out of order"
            ) from None
        types += wanted
        pos = data_end
    # Where the extension block starts in the rebuilt body (the outer
    # session id replaces the empty one), then where each extension starts.
    bounds = list(accumulate(map(len, pieces), initial=ext_block_at + len(sid) + 2))
    body = b"".join(
        (
            encoded[:34],
            bytes((len(sid),)),
            sid,
            encoded[35:ext_block_at],
            (bounds[-1] - bounds[0]).to_bytes(2, "big"),
            *pieces,
        )
    )
    try:
        hello = ClientHello.assembled(
            body,
            legacy_version=(encoded[0] << 8) | encoded[1],
            random=encoded[2:34],
            session_id=sid,
            cipher_suites=encoded[37 : 37 + suites_length],
            compression_methods=encoded[compression_at:ext_block_at],
            types=types,
            bounds=bounds,
        )
    except AlertError as error:
        # Same alert, but a message that repeats nothing from the encrypted
        # hello (SEC-3): the generic parser names extension types.
        raise type(error)("malformed ClientHelloInner") from None
    message = _U32(_CLIENT_HELLO_HEADER | len(body)) + body
    return RebuiltInner(message, hello)


@functools.lru_cache(maxsize=128)
def _uint16s(count: int) -> struct.Struct:
    """A Struct reading ``count`` big-endian uint16 values."""
    return struct.Struct(f">{count}H")


#: The whole inner ECH extension: type 0xfe0d, length 1, ECHClientHelloType inner.
_INNER_ECH_EXTENSION = b"\xfe\x0d\x00\x01\x01"


def _validate_inner(inner: ClientHello) -> None:
    """Check a rebuilt ClientHelloInner (RFC 9849 §7.1, FWD-1, FWD-2)."""
    if inner.raw_extension(EXT_ECH) != _INNER_ECH_EXTENSION:
        raise IllegalParameter("ClientHelloInner lacks an encrypted_client_hello of type inner")
    if not inner.offers_tls13_only():
        raise IllegalParameter("ClientHelloInner must offer TLS 1.3 and nothing older")


def _open_inner(
    context: RecipientContext, outer: ClientHello, ech: OuterECH
) -> tuple[ClientHello, bytes] | None:
    """Open the payload and rebuild the inner hello; None if the open fails."""
    try:
        encoded = context.open(ech.aad(outer.body), ech.payload)
    except HPKEError:
        return None
    message, inner = rebuild_inner(outer, encoded)
    _validate_inner(inner)
    return inner, message


class HelloSummary(NamedTuple):
    """What outlives the handshake of a connection: enough for logs and metrics."""

    status: ECHStatus
    config_id: int | None
    server_name: str | None


@dataclass(frozen=True, slots=True)
class ClientHelloInfo:
    """Routing metadata for one connection, and the bytes to forward.

    :ivar outer: the ClientHello as received (the ClientHelloOuter when ECH
        was offered).
    :ivar inner: the rebuilt ClientHelloInner when ECH was accepted.
    :ivar status: the ECH outcome.
    :ivar config_id: the config_id the client used, when ECH was offered.
    :ivar key: the key that decrypted, when accepted.
    :ivar reject_reason: which rejection path was taken (see :class:`RejectReason`).
    :ivar server_name: the effective SNI: inner when accepted, else outer.
    :ivar alpn: the effective ALPN protocol list, likewise.
    :ivar forward: records to send to the backend in place of the client's
        first flight: the ClientHelloInner re-framed with the client's record
        version (FWD-4) when accepted, else the client's records unchanged.
    :ivar rest: bytes that followed the ClientHello, to forward untouched.
    :ivar second_hello: decodes the second ClientHello after a
        HelloRetryRequest; present only when accepted.
    """

    outer: ClientHello
    inner: ClientHello | None
    status: ECHStatus
    config_id: int | None
    key: ECHKey | None
    reject_reason: RejectReason | None
    server_name: str | None
    alpn: tuple[bytes, ...]
    forward: bytes
    rest: bytes
    second_hello: SecondHelloDecoder | None

    @property
    def summary(self) -> HelloSummary:
        """The few facts kept once the hellos themselves are released."""
        return HelloSummary(self.status, self.config_id, self.server_name)


@dataclass(frozen=True, slots=True)
class SecondHello:
    """The rewritten second ClientHello (RFC 9849 §7.1.1)."""

    inner: ClientHello
    forward: bytes


class SecondHelloDecoder:
    """Decrypts the second ClientHello after a HelloRetryRequest (§7.1.1).

    It reuses the first hello's HPKE context, so the payload opens at
    sequence number 1 (HRR-2, HRR-6), and requires the same config_id and
    cipher suite with an empty ``enc`` (HRR-4).  It can be used once.
    """

    __slots__ = ("_context", "_first", "_used")

    def __init__(self, context: RecipientContext, first: OuterECH) -> None:
        """Keep the context and the first hello's ECH parameters."""
        self._context = context
        self._first = first
        self._used = False

    def decode(self, flight: HandshakeFlight) -> SecondHello:
        """Decode the client's second ClientHello and rebuild its inner hello.

        :raises MissingExtension: if it has no encrypted_client_hello (HRR-3).
        :raises IllegalParameter: if config_id or suite changed, or enc is
            not empty (HRR-4), or for §5.1 violations in the rebuild (HRR-7).
        :raises DecryptError: if the payload does not open (HRR-6).
        :raises DecodeError: for malformed input (HRR-5).
        """
        if self._used:
            raise RuntimeError("a second ClientHello is decoded only once")
        self._used = True
        outer = ClientHello.from_message(flight.message)
        if EXT_ECH_OUTER_EXTENSIONS in outer:
            raise IllegalParameter("ech_outer_extensions in a ClientHelloOuter")
        ech = _hello_ech(outer, DecodeError)
        if ech is None:
            raise MissingExtension("second ClientHello lacks encrypted_client_hello")
        first = self._first
        if (ech.kdf_id, ech.aead_id, ech.config_id) != (
            first.kdf_id,
            first.aead_id,
            first.config_id,
        ):
            raise IllegalParameter("second ClientHello changed the ECH config or cipher suite")
        if ech.enc:
            raise IllegalParameter("second ClientHello has a non-empty enc")
        opened = _open_inner(self._context, outer, ech)
        if opened is None:
            raise DecryptError("second ClientHello did not decrypt")
        inner, message = opened
        return SecondHello(inner, frame_records(CONTENT_HANDSHAKE, flight.record_version, message))


class ECHDecoder:
    """Decides, for a first ClientHello, which hello routes the connection.

    :param keys: the key set (immutable; a reload makes a new decoder).
    :param trial_decryption: try every key regardless of config_id.  Off by
        default: RFC 9849 §7.1 forbids it unless configured (DEC-2), and it
        multiplies the cost an attacker can force.
    :param require_public_name: refuse (illegal_parameter) a hello that
        decrypts under a config whose public_name differs from the outer SNI
        (§7.1 permits this, DEC-7).
    """

    __slots__ = ("keys", "require_public_name", "trial_decryption")

    def __init__(
        self, keys: KeySet, *, trial_decryption: bool = False, require_public_name: bool = False
    ) -> None:
        """Decode against ``keys``."""
        self.keys = keys
        self.trial_decryption = trial_decryption
        self.require_public_name = require_public_name

    def decode(
        self, flight: HandshakeFlight, *, may_decrypt: Callable[[], bool] | None = None
    ) -> ClientHelloInfo:
        """Decode a first flight whose message is a ClientHello.

        :param may_decrypt: asked once, before the first HPKE operation this
            hello would cost; False refuses the hello (a rate limit, RFC 9849
            §10.4).  Hellos that cost no HPKE (no ECH, GREASE with an unknown
            config_id) never ask.
        :raises HandshakeFailure: when ``may_decrypt`` says no.
        :raises AlertError: for malformed or forbidden input; never anything else.
        """
        outer = ClientHello.from_message(flight.message)
        if EXT_ECH_OUTER_EXTENSIONS in outer:
            raise IllegalParameter("ech_outer_extensions in a ClientHelloOuter")  # PAR-8
        ech = _hello_ech(outer, IllegalParameter)
        if ech is None:
            return self._plain(outer, flight, ECHStatus.NOT_OFFERED, None, None)
        candidates = (
            self.keys.decrypting if self.trial_decryption else (self.keys.candidates(ech.config_id))
        )
        if not candidates:
            return self._plain(
                outer, flight, ECHStatus.REJECTED, ech.config_id, RejectReason.UNKNOWN_CONFIG_ID
            )
        reason = RejectReason.UNSUPPORTED_SUITE
        for key in candidates:
            # DEC-3: only a config that lists the client's suite is a candidate.
            if key.recipient is None or not key.config.supports(ech.kdf_id, ech.aead_id):
                continue
            first_attempt = reason is RejectReason.UNSUPPORTED_SUITE
            if first_attempt and may_decrypt is not None and not may_decrypt():
                raise HandshakeFailure("HPKE rate limit for this client address")
            reason = RejectReason.DECRYPT_FAILED
            try:
                context = key.recipient.setup(ech.kdf_id, ech.aead_id, ech.enc, key.info)
            except HPKEError:
                continue  # DEC-5: a bad enc is a failed candidate, not an error
            opened = _open_inner(context, outer, ech)
            if opened is None:
                continue
            inner, message = opened
            if self.require_public_name and outer.server_name() != key.config.public_name:
                # Checked only once a key has decrypted: a GREASE hello whose
                # random config_id collides with ours must still take the
                # rejection path (REJ-1), not this alert.
                raise IllegalParameter("outer server_name is not the config's public_name")
            return ClientHelloInfo(
                outer=outer,
                inner=inner,
                status=ECHStatus.ACCEPTED,
                config_id=ech.config_id,
                key=key,
                reject_reason=None,
                server_name=inner.server_name(),
                alpn=inner.alpn_protocols(),
                forward=frame_records(CONTENT_HANDSHAKE, flight.record_version, message),
                rest=flight.rest,
                second_hello=SecondHelloDecoder(context, ech),
            )
        return self._plain(outer, flight, ECHStatus.REJECTED, ech.config_id, reason)

    def decode_relayed(
        self, flight: HandshakeFlight, *, may_decrypt: Callable[[], bool] | None = None
    ) -> ClientHelloInfo:
        """Decode a first flight that a front relayed to an exit (RFC 9849 §10.10.6).

        Only for a link whose peer proved it is a front (echfront.front.exitlink):
        a ClientHelloInner, marked by the inner-type ECH extension (§5), was
        decrypted there; it gets the FWD-1/FWD-2 checks, counts as ECH accepted
        and is forwarded unchanged (a second ClientHello too: no HPKE here).
        Anything else is decoded by :meth:`decode`, as on every other connection.
        """
        inner = ClientHello.from_message(flight.message)
        relayed = inner.raw_extension(EXT_ECH) == _INNER_ECH_EXTENSION
        if not relayed or EXT_ECH_OUTER_EXTENSIONS in inner:
            return self.decode(flight, may_decrypt=may_decrypt)
        _validate_inner(inner)
        return replace(self._plain(inner, flight, ECHStatus.ACCEPTED, None, None), inner=inner)

    @staticmethod
    def _plain(
        outer: ClientHello,
        flight: HandshakeFlight,
        status: ECHStatus,
        config_id: int | None,
        reason: RejectReason | None,
    ) -> ClientHelloInfo:
        """Route by the outer hello and forward the client's records as they came."""
        return ClientHelloInfo(
            outer=outer,
            inner=None,
            status=status,
            config_id=config_id,
            key=None,
            reject_reason=reason,
            server_name=outer.server_name(),
            alpn=outer.alpn_protocols(),
            forward=flight.records,
            rest=flight.rest,
            second_hello=None,
        )

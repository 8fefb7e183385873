# -*- test-case-name: tests.test_probe -*-
"""An ECH client's first flight and its verdict on the answer, sans-IO (RFC 9849 §6.1).

``echfront check`` proves that a published ECHConfig works by doing what
a client does: :func:`build_probe` builds a real ClientHelloInner for the
target name, encodes and pads it (§5.1, §6.1.3), and seals it into a
ClientHelloOuter addressed to the config's public_name (§6.1, §6.1.1)
with :func:`echfront.ech.hpke.seal_context`.  :class:`ResponseReader` then
reads the server's first handshake message and decides, as §6.1.4 says a
client decides, whether ECH was accepted: the ServerHello's random ends
with the §7.2 accept_confirmation, or a HelloRetryRequest carries the
§7.2.1 hrr_accept_confirmation in its encrypted_client_hello extension.
Both are computed here from the ClientHelloInner this module built.

Nothing beyond the first handshake message is read and no handshake keys
are derived: the verdict needs neither.  Everything here works on bytes;
the socket that carries them is the command line's
(:func:`echfront.cli.check_probe.send_probe`).

Why this module is long: building the first flight and judging the answer
are one client step (RFC 9849 §6.1, §6.1.4).  The verdict is computed from
what only the builder knows, the ClientHelloInner's bytes and random and
the suites it offered; kept together, those stay inside :class:`ProbeHello`
instead of becoming an interface between two modules.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from echfront.ech.echconfig import ECHConfig, SymmetricSuite
from echfront.ech.hpke import (
    SUPPORTED_AEADS,
    SUPPORTED_KDFS,
    SUPPORTED_KEMS,
    HPKEError,
    seal_context,
)
from echfront.ech.keyset import ECH_INFO_PREFIX
from echfront.errors import AlertError, ConfigError, alert_name
from echfront.tls.hello import (
    EXT_ALPN,
    EXT_ECH,
    EXT_KEY_SHARE,
    EXT_SERVER_NAME,
    EXT_SUPPORTED_VERSIONS,
    HANDSHAKE_CLIENT_HELLO,
    HANDSHAKE_SERVER_HELLO,
    TLS13,
    ServerHello,
    encode_alpn,
    encode_client_hello_body,
    encode_server_name,
    encode_supported_versions,
    handshake_message,
    normalize_server_name,
)
from echfront.tls.records import (
    CONTENT_ALERT,
    CONTENT_HANDSHAKE,
    HandshakeReader,
    frame_records,
)

__all__ = [
    "DEFAULT_ALPN",
    "TLS13_CIPHER_SUITES",
    "ProbeError",
    "ProbeHello",
    "ProbeResult",
    "ProbeStatus",
    "ResponseReader",
    "accept_confirmation",
    "build_probe",
    "hkdf_expand_label",
    "judge",
]

#: TLS_AES_128_GCM_SHA256, TLS_AES_256_GCM_SHA384, TLS_CHACHA20_POLY1305_SHA256
#: (RFC 8446 §B.4), with the hash each one's transcript uses.
TLS13_CIPHER_SUITES: dict[int, str] = {0x1301: "sha256", 0x1302: "sha384", 0x1303: "sha256"}
#: TLS 1.2 ECDHE suites, offered only in the ClientHelloOuter, so that a
#: server without TLS 1.3 answers with a ServerHello (verdict: not TLS 1.3)
#: rather than an alert.
_TLS12_CIPHER_SUITES = (0xC02B, 0xC02F, 0xC02C, 0xC030, 0xCCA9, 0xCCA8)

DEFAULT_ALPN = (b"h2", b"http/1.1")

_EXT_SUPPORTED_GROUPS = 0x000A
_EXT_EC_POINT_FORMATS = 0x000B
_EXT_SIGNATURE_ALGORITHMS = 0x000D
_EXT_EXTENDED_MASTER_SECRET = 0x0017
_EXT_PSK_KEY_EXCHANGE_MODES = 0x002D

_X25519 = 0x001D
#: x25519 first with the only key share; secp256r1 and secp384r1 are listed
#: so that a server preferring them answers with a HelloRetryRequest
#: (RFC 8446 §4.1.4) instead of failing: that exercises §7.2.1.
_GROUPS = (_X25519, 0x0017, 0x0018)
#: ecdsa_secp256r1_sha256, rsa_pss_rsae_sha256, ed25519, ecdsa_secp384r1_sha384,
#: rsa_pss_rsae_sha384, rsa_pss_rsae_sha512, rsa_pkcs1_sha256, rsa_pkcs1_sha384
#: (RFC 8446 §4.2.3; the PKCS#1 ones for certificate signatures and TLS 1.2).
_SIGNATURE_ALGORITHMS = (0x0403, 0x0804, 0x0807, 0x0503, 0x0805, 0x0806, 0x0401, 0x0501)
_PSK_DHE_KE = 1
_TLS12 = 0x0303

_ECH_OUTER = 0
_ECH_INNER = 1
_AEAD_TAG_LENGTH = 16  # AES-128-GCM, AES-256-GCM and ChaCha20Poly1305 alike
#: RFC 9849 §7.2: accept_confirmation is 8 bytes, the end of ServerHello.random.
_CONFIRMATION_LENGTH = 8
#: RFC 8446 §4.4.1: the synthetic handshake type replacing ClientHello1.
_MESSAGE_HASH = 254
#: A ServerHello is well under this; the bound keeps a hostile peer from
#: making the probe buffer more.
_MAX_ANSWER = 64 * 1024

_ACCEPT_LABEL = b"ech accept confirmation"
_HRR_ACCEPT_LABEL = b"hrr ech accept confirmation"


class ProbeError(ConfigError):
    """An ECHConfig this client cannot use (unsupported KEM or suites, bad key)."""


# -- building the ClientHello ------------------------------------------------------


def _u16_list(values: Sequence[int]) -> bytes:
    body = b"".join(v.to_bytes(2, "big") for v in values)
    return len(body).to_bytes(2, "big") + body


def _key_share() -> bytes:
    """KeyShareClientHello with one fresh X25519 share (RFC 8446 §4.2.8)."""
    public = X25519PrivateKey.generate().public_key().public_bytes_raw()
    entry = _X25519.to_bytes(2, "big") + len(public).to_bytes(2, "big") + public
    return len(entry).to_bytes(2, "big") + entry


def _pick_suite(config: ECHConfig) -> SymmetricSuite:
    """The first of the config's suites this client supports (RFC 9849 §6.1)."""
    for suite in config.cipher_suites:
        if suite.kdf_id in SUPPORTED_KDFS and suite.aead_id in SUPPORTED_AEADS:
            return suite
    raise ProbeError(f"config_id {config.config_id} lists no cipher suite this client supports")


def _padding(encoded_length: int, name_length: int, maximum_name_length: int) -> int:
    """Zero bytes to append to an EncodedClientHelloInner (RFC 9849 §6.1.3).

    First max(0, L - D) for a server_name of D bytes, L being the config's
    maximum_name_length; then enough to round the whole to a multiple of 32.
    """
    padding = max(0, maximum_name_length - name_length)
    length = encoded_length + padding
    return padding + 31 - ((length - 1) % 32)


def _host_name(target: str) -> bytes:
    """The server_name bytes for ``target``: an A-label host name, no final dot.

    :raises ProbeError: for something that is not a host name.
    """
    try:
        raw = target.rstrip(".").encode("idna")
        return normalize_server_name(raw).encode("ascii")
    except (UnicodeError, AlertError):
        raise ProbeError(f"{target!r} is not a host name") from None


@dataclass(frozen=True, slots=True)
class ProbeHello:
    """A first flight offering ECH, and what judging the answer needs.

    :ivar records: the ClientHelloOuter framed as TLS records: send these.
    :ivar outer: the ClientHelloOuter handshake message.
    :ivar inner: the ClientHelloInner handshake message, exactly as the
        server reconstructs it (outer legacy_session_id copied in, §5.1): the
        first message of the transcript when ECH is accepted.
    :ivar target: the name in the inner server_name.
    :ivar config: the ECHConfig the payload was sealed to.
    :ivar suite: the HPKE KDF and AEAD used.
    """

    records: bytes
    outer: bytes
    inner: bytes
    target: str
    config: ECHConfig
    suite: SymmetricSuite

    @property
    def inner_random(self) -> bytes:
        """ClientHelloInner.random, the input of HKDF-Extract in §7.2."""
        return self.inner[6:38]


def build_probe(
    target: str,
    config: ECHConfig,
    *,
    alpn: Sequence[bytes] = DEFAULT_ALPN,
    cipher_suites: Sequence[int] = tuple(TLS13_CIPHER_SUITES),
    suite: SymmetricSuite | None = None,
) -> ProbeHello:
    """Build a ClientHelloOuter for ``target`` sealed to ``config`` (RFC 9849 §6.1).

    The ClientHelloInner offers TLS 1.3 only, ``cipher_suites``, x25519
    with one key share, the common signature algorithms, psk_dhe_ke,
    ``alpn`` and an encrypted_client_hello of type inner (§5).  Its
    EncodedClientHelloInner has an empty legacy_session_id and no
    ech_outer_extensions, padded as §6.1.3 recommends.  The
    ClientHelloOuter carries the config's public_name as server_name, its
    own random and key share, the same legacy_session_id (§6.1 rule 3),
    TLS 1.3 and 1.2, and the ECH extension last, whose payload is
    ``context.Seal(ClientHelloOuterAAD, EncodedClientHelloInner)`` with
    the AAD the outer body with that payload zeroed (§5.2, §6.1.1).

    :param suite: the HPKE suite; default the first one of the config's
        that this client supports.
    :raises ProbeError: for an unsupported KEM or suite, or a public key
        that does not encapsulate.
    """
    if config.kem_id not in SUPPORTED_KEMS:
        raise ProbeError(
            f"config_id {config.config_id} uses {config.kem_name}, which this client lacks"
        )
    if not cipher_suites or any(s not in TLS13_CIPHER_SUITES for s in cipher_suites):
        raise ValueError("cipher_suites must be TLS 1.3 suites this module knows")
    hpke_suite = suite if suite is not None else _pick_suite(config)
    if not config.supports(hpke_suite.kdf_id, hpke_suite.aead_id):
        raise ValueError(f"config_id {config.config_id} does not list {hpke_suite}")
    name = _host_name(target)
    session_id = secrets.token_bytes(32)  # RFC 8446 Appendix D.4 compatibility mode

    shared: list[tuple[int, bytes]] = [
        (_EXT_SUPPORTED_GROUPS, _u16_list(_GROUPS)),
        (_EXT_SIGNATURE_ALGORITHMS, _u16_list(_SIGNATURE_ALGORITHMS)),
        (_EXT_PSK_KEY_EXCHANGE_MODES, bytes((1, _PSK_DHE_KE))),
    ]
    alpn_extension = [(EXT_ALPN, encode_alpn(alpn))] if alpn else []
    inner_extensions = [
        (EXT_SERVER_NAME, encode_server_name(name)),
        *shared,
        (EXT_SUPPORTED_VERSIONS, encode_supported_versions([TLS13])),
        (EXT_KEY_SHARE, _key_share()),
        *alpn_extension,
        (EXT_ECH, bytes((_ECH_INNER,))),
    ]
    inner_random = secrets.token_bytes(32)
    inner_body = encode_client_hello_body(
        random=inner_random,
        session_id=session_id,
        cipher_suites=cipher_suites,
        extensions=inner_extensions,
    )
    # EncodedClientHelloInner (§5.1): the same ClientHello with an empty
    # legacy_session_id (the server copies the outer one back in), then zeros.
    encoded = encode_client_hello_body(
        random=inner_random,
        session_id=b"",
        cipher_suites=cipher_suites,
        extensions=inner_extensions,
    )
    encoded += bytes(_padding(len(encoded), len(name), config.maximum_name_length))

    info = ECH_INFO_PREFIX + config.encode()
    try:
        enc, context = seal_context(
            config.kem_id, hpke_suite.kdf_id, hpke_suite.aead_id, config.public_key, info
        )
    except HPKEError as error:
        raise ProbeError(f"config_id {config.config_id}: {error}") from None
    payload_length = len(encoded) + _AEAD_TAG_LENGTH

    def ech_extension(payload: bytes) -> bytes:
        """ECHClientHello of type outer (§5)."""
        return b"".join(
            (
                bytes((_ECH_OUTER,)),
                hpke_suite.kdf_id.to_bytes(2, "big"),
                hpke_suite.aead_id.to_bytes(2, "big"),
                bytes((config.config_id,)),
                len(enc).to_bytes(2, "big"),
                enc,
                len(payload).to_bytes(2, "big"),
                payload,
            )
        )

    outer_extensions = [
        (EXT_SERVER_NAME, encode_server_name(config.public_name.encode("ascii"))),
        *shared,
        (_EXT_EC_POINT_FORMATS, b"\x01\x00"),  # uncompressed, for TLS 1.2 (RFC 8422 §5.1.2)
        (_EXT_EXTENDED_MASTER_SECRET, b""),  # for TLS 1.2 (RFC 7627)
        (EXT_SUPPORTED_VERSIONS, encode_supported_versions([TLS13, _TLS12])),
        (EXT_KEY_SHARE, _key_share()),
        *alpn_extension,
    ]

    outer_random = secrets.token_bytes(32)  # fresh, never the inner one (§6.1 rule 4)
    outer_suites = (*cipher_suites, *_TLS12_CIPHER_SUITES)

    def outer_body(payload: bytes) -> bytes:
        return encode_client_hello_body(
            random=outer_random,
            session_id=session_id,
            cipher_suites=outer_suites,
            extensions=[*outer_extensions, (EXT_ECH, ech_extension(payload))],
        )

    # ClientHelloOuterAAD: the outer body with a zeroed payload of the final
    # length, so the lengths are right and the payload is swapped in place.
    payload = context.seal(outer_body(bytes(payload_length)), encoded)
    body = outer_body(payload)
    outer = handshake_message(HANDSHAKE_CLIENT_HELLO, body)
    return ProbeHello(
        records=frame_records(CONTENT_HANDSHAKE, 0x0301, outer),
        outer=outer,
        inner=handshake_message(HANDSHAKE_CLIENT_HELLO, inner_body),
        target=name.decode("ascii"),
        config=config,
        suite=hpke_suite,
    )


# -- judging the answer ------------------------------------------------------------


class ProbeStatus(enum.Enum):
    """What the server's first answer says about ECH (RFC 9849 §6.1.4)."""

    #: The accept_confirmation (§7.2) or hrr_accept_confirmation (§7.2.1) matched.
    ACCEPTED = "accepted"
    #: TLS 1.3, but no matching confirmation: the server used ClientHelloOuter.
    REJECTED = "rejected"
    #: The server answered with an alert.
    ALERT = "alert"
    #: The server negotiated TLS 1.2 or older, which rejects ECH (§6.1.4).
    NOT_TLS13 = "not_tls13"
    #: Nothing, or not a whole message, before the connection closed or the time ran out.
    NO_ANSWER = "no_answer"
    #: An answer that is not a valid TLS ServerHello, HelloRetryRequest or alert.
    INVALID = "invalid"


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """The verdict on one probe.

    :ivar status: the outcome.
    :ivar detail: one line for the operator: the alert's name, the version
        or cipher suite, or what was wrong.
    :ivar alert: the alert description, for :attr:`ProbeStatus.ALERT`.
    :ivar hello_retry: whether the answer was a HelloRetryRequest.
    :ivar cipher_suite: the TLS cipher suite the server chose, if it did.
    """

    status: ProbeStatus
    detail: str = ""
    alert: int | None = None
    hello_retry: bool = False
    cipher_suite: int | None = None

    def __str__(self) -> str:
        """``accepted``, ``server alert 112 (unrecognized_name)``, and so on."""
        if self.status is ProbeStatus.ALERT:
            return f"server alert {self.alert} ({alert_name(self.alert or 0)})"
        text = self.status.value.replace("_", " ")
        if self.status is ProbeStatus.NOT_TLS13:
            text = "not TLS 1.3"
        return f"{text} ({self.detail})" if self.detail else text


def _hkdf_extract(hash_name: str, salt: bytes, ikm: bytes) -> bytes:
    """HKDF-Extract (RFC 5869 §2.2); an empty salt is Hash.length zero bytes."""
    return hmac.digest(salt, ikm, hash_name)


def hkdf_expand_label(
    hash_name: str, secret: bytes, label: bytes, context: bytes, length: int
) -> bytes:
    """HKDF-Expand-Label(Secret, Label, Context, Length) (RFC 8446 §7.1).

    HKDF-Expand (RFC 5869 §2.3) with info = HkdfLabel: uint16 length,
    opaque label<7..255> = "tls13 " + Label, opaque context<0..255>.
    """
    full_label = b"tls13 " + label
    if not 7 <= len(full_label) <= 255 or len(context) > 255:
        raise ValueError("HkdfLabel field out of range")
    info = (
        length.to_bytes(2, "big")
        + bytes((len(full_label),))
        + full_label
        + bytes((len(context),))
        + context
    )
    digest_size = hashlib.new(hash_name).digest_size
    if length > 255 * digest_size:
        raise ValueError("HKDF-Expand length too large")
    output = b""
    block = b""
    counter = 1
    while len(output) < length:
        block = hmac.digest(secret, block + info + bytes((counter,)), hash_name)
        output += block
        counter += 1
    return output[:length]


def accept_confirmation(
    hash_name: str, inner_random: bytes, transcript_hash: bytes, *, hello_retry: bool = False
) -> bytes:
    """The 8-byte ECH acceptance signal (RFC 9849 §7.2, §7.2.1).

    HKDF-Expand-Label(HKDF-Extract(0, ClientHelloInner.random), label,
    transcript hash, 8), where "0" is Hash.length zero bytes and the label
    is "ech accept confirmation", or "hrr ech accept confirmation" for a
    HelloRetryRequest.
    """
    zeros = bytes(hashlib.new(hash_name).digest_size)
    secret = _hkdf_extract(hash_name, zeros, inner_random)
    label = _HRR_ACCEPT_LABEL if hello_retry else _ACCEPT_LABEL
    return hkdf_expand_label(hash_name, secret, label, transcript_hash, _CONFIRMATION_LENGTH)


def _negotiated_version(hello: ServerHello) -> int:
    """supported_versions.selected_version (RFC 8446 §4.2.1), else legacy_version."""
    extension = hello.get(EXT_SUPPORTED_VERSIONS)
    if extension is None:
        return hello.legacy_version
    if len(extension.data) != 2:
        raise ValueError("malformed supported_versions in the ServerHello")
    return int.from_bytes(extension.data, "big")


def judge(probe: ProbeHello, message: bytes) -> ProbeResult:
    """Decide from the server's first handshake message whether ECH was accepted (§6.1.4).

    A ServerHello accepts when the last 8 bytes of its random equal
    accept_confirmation over the transcript ClientHelloInner ||
    ServerHello-with-those-8-bytes-zeroed (§7.2).  A HelloRetryRequest
    accepts when it carries an encrypted_client_hello extension of 8 bytes
    equal to hrr_accept_confirmation over the transcript of
    ClientHelloInner1 and the HelloRetryRequest with that payload zeroed
    (§7.2.1); the transcript is RFC 8446 §4.4.1's, in which a
    HelloRetryRequest replaces ClientHello1 with the synthetic
    message_hash message.  The hash is that of the cipher suite the
    server chose.

    :param message: the whole handshake message, header included.
    """
    try:
        hello = ServerHello.from_message(message)
        version = _negotiated_version(hello)
    except (AlertError, ValueError) as error:
        return ProbeResult(ProbeStatus.INVALID, f"malformed ServerHello: {error}")
    retry = hello.is_hello_retry_request
    suite = hello.cipher_suite
    if version != TLS13:
        return ProbeResult(
            ProbeStatus.NOT_TLS13, f"version 0x{version:04x}", hello_retry=retry, cipher_suite=suite
        )
    hash_name = TLS13_CIPHER_SUITES.get(suite)
    if hash_name is None:
        return ProbeResult(
            ProbeStatus.INVALID,
            f"the server chose cipher suite 0x{suite:04x}, which was not offered",
            hello_retry=retry,
            cipher_suite=suite,
        )
    transcript = hashlib.new(hash_name)
    if not retry:
        # §7.2: ServerHello with random[24:32] zeroed; in the message the
        # random is at 4 (header) + 2 (legacy_version).
        end = 4 + 2 + 32
        received = message[end - _CONFIRMATION_LENGTH : end]
        transcript.update(probe.inner)
        transcript.update(message[: end - _CONFIRMATION_LENGTH] + bytes(8) + message[end:])
    else:
        extension = hello.get(EXT_ECH)
        if extension is None:
            return ProbeResult(ProbeStatus.REJECTED, "", hello_retry=True, cipher_suite=suite)
        if len(extension.data) != _CONFIRMATION_LENGTH:
            # §6.1.4: a client aborts with decode_error.
            return ProbeResult(
                ProbeStatus.INVALID,
                f"HelloRetryRequest encrypted_client_hello of {len(extension.data)} bytes, not 8",
                hello_retry=True,
                cipher_suite=suite,
            )
        received = extension.data
        start = 4 + extension.offset
        inner_hash = hashlib.new(hash_name, probe.inner).digest()
        transcript.update(bytes((_MESSAGE_HASH, 0, 0, len(inner_hash))) + inner_hash)
        transcript.update(message[:start] + bytes(8) + message[start + _CONFIRMATION_LENGTH :])
    expected = accept_confirmation(
        hash_name, probe.inner_random, transcript.digest(), hello_retry=retry
    )
    status = (
        ProbeStatus.ACCEPTED if hmac.compare_digest(expected, received) else ProbeStatus.REJECTED
    )
    return ProbeResult(status, "", hello_retry=retry, cipher_suite=suite)


class ResponseReader:
    """Read the server's answer up to its first handshake message, sans-IO.

    Feed bytes as they arrive; the first call that returns a
    :class:`ProbeResult` ends the reading.  At most 64 KiB are buffered.
    """

    __slots__ = ("_buffer", "_done", "_handshake", "_in_handshake", "_probe")

    def __init__(self, probe: ProbeHello) -> None:
        """Judge answers to ``probe``."""
        self._probe = probe
        self._buffer = b""
        self._handshake = HandshakeReader(
            HANDSHAKE_SERVER_HELLO, max_bytes=_MAX_ANSWER, require_boundary=False
        )
        self._in_handshake = False
        self._done = False

    def feed(self, data: bytes) -> ProbeResult | None:
        """Add bytes; return the verdict once there is one."""
        if self._done:
            raise RuntimeError("the answer was already judged")
        result = self._feed(data)
        if result is not None:
            self._done = True
        return result

    def _feed(self, data: bytes) -> ProbeResult | None:
        if self._in_handshake:
            return self._handshake_bytes(data)
        self._buffer += data
        buffer = self._buffer
        if not buffer:
            return None
        if buffer[0] == CONTENT_ALERT:
            # RFC 8446 §6: a plaintext alert before any keys: level, description.
            if len(buffer) < 7:
                return None
            if buffer[1] != 3 or int.from_bytes(buffer[3:5], "big") != 2:
                return ProbeResult(ProbeStatus.INVALID, "malformed alert record")
            return ProbeResult(ProbeStatus.ALERT, alert=buffer[6])
        if buffer[0] != CONTENT_HANDSHAKE:
            return ProbeResult(ProbeStatus.INVALID, _describe_garbage(buffer))
        self._buffer = b""
        self._in_handshake = True
        return self._handshake_bytes(buffer)

    def _handshake_bytes(self, data: bytes) -> ProbeResult | None:
        try:
            flight = self._handshake.feed(data)
        except AlertError as error:
            return ProbeResult(ProbeStatus.INVALID, f"not a TLS ServerHello ({error})")
        if flight is None:
            return None
        return judge(self._probe, flight.message)

    def eof(self) -> ProbeResult:
        """The verdict when the connection closed before a complete answer."""
        held = len(self._buffer) + self._handshake.buffered
        if held:
            return ProbeResult(
                ProbeStatus.NO_ANSWER, f"connection closed after {held} bytes of an answer"
            )
        return ProbeResult(ProbeStatus.NO_ANSWER, "connection closed without an answer")


def _describe_garbage(data: bytes) -> str:
    """One line about a non-TLS answer, e.g. an HTTP server on the port."""
    if data[:5] == b"HTTP/":
        return "the server answered in HTTP, not TLS"
    return f"not TLS (first byte 0x{data[0]:02x})"

# -*- test-case-name: tests.test_quic_protection -*-
"""Initial packet protection and the Retry integrity tag, sans-IO (RFC 9001 §5).

Why our own code and not aioquic.  aioquic does all of this, but only as
internal API: ``aioquic.quic.crypto.CryptoPair.setup_initial`` and
``aioquic._crypto`` (AEAD and HeaderProtection classes whose signatures are
private and changed between releases), ``aioquic.quic.packet`` header helpers
that read from its own ``Buffer`` type.  Using them would tie a security
boundary to unversioned internals of a library that, as a whole, is a QUIC
endpoint; the front needs a thin slice of it: HKDF-Expand-Label for three
labels, AES-128-GCM with a per-packet nonce, one AES-ECB block for header
protection, and the Retry tag, for two versions.  That is about 200 lines
on ``cryptography``, which the project already depends on, and they are
checked against the RFC 9001 Appendix A and RFC 9369 Appendix A vectors and,
in the tests only, against aioquic as an independent implementation.

* :func:`initial_keys` derives both directions' :class:`PacketKeys` from the
  client's first Destination Connection ID (RFC 9001 §5.2).
* :func:`unprotect` removes header protection (§5.4) and opens the payload
  (§5.3); :func:`protect` does the reverse for a header built by
  :func:`~echfront.quic.packets.encode_long_header`.
* :func:`build_retry` and :func:`verify_retry` handle the Retry integrity
  tag (§5.8).

Only AES-128-GCM is implemented: it is the one cipher of Initial packets.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Callable
from typing import NamedTuple

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from echfront.quic.errors import ProtocolViolation, QuicDrop
from echfront.quic.packets import (
    TAG_LENGTH,
    LongHeader,
    PacketType,
    QuicVersion,
    decode_packet_number,
)

__all__ = [
    "InitialKeys",
    "PacketKeys",
    "Unprotected",
    "build_retry",
    "hkdf_expand_label",
    "hkdf_extract",
    "initial_keys",
    "initial_secrets",
    "protect",
    "retry_integrity_tag",
    "unmask_packet_number",
    "unprotect",
    "verify_retry",
]

_SAMPLE_LENGTH = 16


def hkdf_extract(salt: bytes, ikm: bytes) -> bytes:
    """HKDF-Extract with SHA-256 (RFC 5869 §2.2)."""
    return hmac.digest(salt, ikm, hashlib.sha256)


def hkdf_expand_label(secret: bytes, label: bytes, length: int, context: bytes = b"") -> bytes:
    """TLS 1.3 HKDF-Expand-Label with SHA-256 (RFC 8446 §7.1), as RFC 9001 §5.1 uses it."""
    full_label = b"tls13 " + label
    info = b"".join(
        (
            length.to_bytes(2, "big"),
            bytes((len(full_label),)),
            full_label,
            bytes((len(context),)),
            context,
        )
    )
    # HKDF-Expand (RFC 5869 §2.3): every output here is at most 32 bytes,
    # but loop anyway so the function is correct for any length.
    output = b""
    block = b""
    counter = 1
    while len(output) < length:
        block = hmac.digest(secret, block + info + bytes((counter,)), hashlib.sha256)
        output += block
        counter += 1
    return output[:length]


class PacketKeys:
    """AEAD key, IV and header protection key of one direction (RFC 9001 §5.1).

    :ivar secret: the traffic secret they were derived from.
    """

    __slots__ = ("_aead", "_hp", "hp", "iv", "key", "secret")

    def __init__(self, secret: bytes, version: QuicVersion) -> None:
        """Derive the keys for AES-128-GCM from ``secret`` with ``version``'s labels."""
        self.secret = secret
        self.key = hkdf_expand_label(secret, version.key_label, 16)
        self.iv = hkdf_expand_label(secret, version.iv_label, 12)
        self.hp = hkdf_expand_label(secret, version.hp_label, 16)
        self._aead = AESGCM(self.key)
        # ECB over one block is the header protection function of §5.4.3;
        # the encryptor is stateless between blocks, so one serves them all.
        self._hp = Cipher(algorithms.AES(self.hp), modes.ECB()).encryptor()  # noqa: S305

    def nonce(self, packet_number: int) -> bytes:
        """The AEAD nonce: the IV XOR the left-padded packet number (§5.3)."""
        value = int.from_bytes(self.iv, "big") ^ packet_number
        return value.to_bytes(12, "big")

    def mask(self, sample: bytes) -> bytes:
        """The 5-byte header protection mask for a 16-byte sample (§5.4.3)."""
        return self._hp.update(sample)[:5]

    def seal(self, packet_number: int, header: bytes, payload: bytes) -> bytes:
        """AEAD-encrypt ``payload`` with the header as associated data (§5.3)."""
        return self._aead.encrypt(self.nonce(packet_number), payload, header)

    def open(self, packet_number: int, header: bytes, ciphertext: bytes) -> bytes:
        """AEAD-decrypt; raises :class:`QuicDrop` if authentication fails (§5.3)."""
        try:
            return self._aead.decrypt(self.nonce(packet_number), ciphertext, header)
        except InvalidTag:
            raise QuicDrop("packet failed authentication") from None


class InitialKeys(NamedTuple):
    """Both directions' Initial keys for one connection (RFC 9001 §5.2)."""

    client: PacketKeys
    server: PacketKeys


def initial_secrets(dcid: bytes, version: QuicVersion) -> tuple[bytes, bytes]:
    """The client and server Initial secrets for a Destination Connection ID (§5.2)."""
    initial_secret = hkdf_extract(version.initial_salt, dcid)
    return (
        hkdf_expand_label(initial_secret, b"client in", 32),
        hkdf_expand_label(initial_secret, b"server in", 32),
    )


def initial_keys(dcid: bytes, version: QuicVersion) -> InitialKeys:
    """Initial keys from the client's first Destination Connection ID (§5.2)."""
    client, server = initial_secrets(dcid, version)
    return InitialKeys(PacketKeys(client, version), PacketKeys(server, version))


class Unprotected(NamedTuple):
    """A packet with header and payload protection removed.

    :ivar header: the unprotected header bytes, packet number included.
    :ivar first_byte: the unprotected first byte.
    :ivar packet_number: the full (decoded) packet number.
    :ivar pn_length: how many bytes the packet number was encoded on.
    :ivar payload: the plaintext frames.
    """

    header: bytes
    first_byte: int
    packet_number: int
    pn_length: int
    payload: bytes


def unmask_packet_number(
    datagram: bytes, header: LongHeader, keys: PacketKeys, largest_pn: int | None
) -> tuple[bytes, int, int]:
    """Remove header protection only (RFC 9001 §5.4.1).

    :returns: the unprotected header, the full packet number and its length.
    """
    pn_offset = header.pn_offset
    if pn_offset < 0:
        raise QuicDrop("packet has no packet number to unprotect")
    sample = datagram[pn_offset + 4 : pn_offset + 4 + _SAMPLE_LENGTH]
    if len(sample) < _SAMPLE_LENGTH:
        raise QuicDrop("packet too short to sample for header protection")
    mask = keys.mask(sample)
    first = datagram[header.start] ^ (mask[0] & 0x0F)
    pn_length = (first & 0x03) + 1
    truncated = int.from_bytes(datagram[pn_offset : pn_offset + pn_length], "big")
    truncated ^= int.from_bytes(mask[1 : 1 + pn_length], "big")
    plain = bytearray(datagram[header.start : pn_offset + pn_length])
    plain[0] = first
    plain[pn_offset - header.start :] = truncated.to_bytes(pn_length, "big")
    return bytes(plain), decode_packet_number(largest_pn, truncated, pn_length), pn_length


def unprotect(
    datagram: bytes, header: LongHeader, keys: PacketKeys, largest_pn: int | None
) -> Unprotected:
    """Remove header and payload protection from one long-header packet (§5.3, §5.4).

    :param largest_pn: the largest packet number received in this packet
        number space so far, for packet number decoding.
    :raises QuicDrop: if the packet fails authentication (dropped, §5.3).
    :raises ProtocolViolation: if the reserved bits are not zero once it is
        authenticated (RFC 9000 §17.2).
    """
    plain, packet_number, pn_length = unmask_packet_number(datagram, header, keys, largest_pn)
    payload = keys.open(packet_number, plain, datagram[header.start + len(plain) : header.end])
    first = plain[0]
    if first & 0x0C:
        raise ProtocolViolation("reserved header bits are not zero")
    return Unprotected(plain, first, packet_number, pn_length, payload)


def protect(
    header: bytes, pn_length: int, packet_number: int, payload: bytes, keys: PacketKeys
) -> bytes:
    """Protect a packet: AEAD over the payload, then header protection (§5.3, §5.4).

    :param header: the unprotected header ending with the packet number,
        as built by :func:`~echfront.quic.packets.encode_long_header`.
    :raises ValueError: if the packet is too short to sample; the caller pads.
    """
    if pn_length + len(payload) + TAG_LENGTH < 4 + _SAMPLE_LENGTH:
        raise ValueError("payload too short for a header protection sample; pad it")
    ciphertext = keys.seal(packet_number, header, payload)
    pn_offset = len(header) - pn_length
    sample_at = 4 - pn_length
    mask = keys.mask(ciphertext[sample_at : sample_at + _SAMPLE_LENGTH])
    masked = bytearray(header)
    masked[0] ^= mask[0] & (0x0F if header[0] & 0x80 else 0x1F)
    for i in range(pn_length):
        masked[pn_offset + i] ^= mask[1 + i]
    return bytes(masked) + ciphertext


def retry_integrity_tag(version: QuicVersion, odcid: bytes, retry_without_tag: bytes) -> bytes:
    """The Retry Integrity Tag over the Retry Pseudo-Packet (RFC 9001 §5.8)."""
    pseudo = bytes((len(odcid),)) + odcid + retry_without_tag
    return AESGCM(version.retry_key).encrypt(version.retry_nonce, b"", pseudo)


def build_retry(
    version: QuicVersion,
    *,
    odcid: bytes,
    dcid: bytes,
    scid: bytes,
    token: bytes,
    random: Callable[[int], bytes] = os.urandom,
) -> bytes:
    """A Retry packet (RFC 9000 §17.2.5) with its integrity tag (RFC 9001 §5.8).

    :param odcid: the Destination Connection ID of the client's Initial.
    :param dcid: the client's Source Connection ID.
    :param scid: the connection ID the client must use next.
    :param token: the Retry token; RFC 9000 §17.2.5.2 makes a client discard
        a Retry with an empty one.

    A Retry from the front is only half of stateless retry: the backend must
    accept the token and send ``original_destination_connection_id`` and
    ``retry_source_connection_id`` transport parameters matching it
    (RFC 9000 §7.3), which a backend that did not send the Retry cannot do
    unaided.
    """
    if not token:
        raise ValueError("a Retry token must not be empty (RFC 9000 §17.2.5.2)")
    first = 0x80 | 0x40 | version.type_bits_of(PacketType.RETRY) | (random(1)[0] & 0x0F)
    body = b"".join(
        (
            bytes((first,)),
            version.number.to_bytes(4, "big"),
            bytes((len(dcid),)),
            dcid,
            bytes((len(scid),)),
            scid,
            token,
        )
    )
    return body + retry_integrity_tag(version, odcid, body)


def verify_retry(version: QuicVersion, odcid: bytes, packet: bytes) -> bool:
    """Whether a Retry packet's integrity tag is right for ``odcid`` (RFC 9001 §5.8)."""
    if len(packet) < TAG_LENGTH:
        return False
    expected = retry_integrity_tag(version, odcid, packet[:-TAG_LENGTH])
    return hmac.compare_digest(expected, packet[-TAG_LENGTH:])

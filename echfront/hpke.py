# -*- test-case-name: tests.test_hpke -*-
"""HPKE recipients for ECH (RFC 9180 mode_base, as RFC 9849 §7.1 uses it).

This is the only module that talks to the HPKE library (pyhpke).  The
decoder sees :class:`RecipientKey` and :class:`RecipientContext`: set up a
context from ``enc`` and ``info`` (SetupBaseR), then open one ciphertext per
ClientHello on it.  The context keeps its sequence number, so the second
ClientHello after a HelloRetryRequest is opened at sequence 1 on the same
context (RFC 9849 §7.1.1).

Every failure, whatever the library raised for it (an ``enc`` of the wrong
length or a low-order point, an authentication failure, an export-only
AEAD), becomes :class:`HPKEError`: for ECH they all mean "this candidate key
did not work".
"""

from __future__ import annotations

from functools import cache

import pyhpke
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from echfront.echconfig import (
    AEAD_AES_128_GCM,
    AEAD_AES_256_GCM,
    AEAD_CHACHA20_POLY1305,
    KDF_HKDF_SHA256,
    KEM_X25519_HKDF_SHA256,
    SymmetricSuite,
)

__all__ = [
    "DEFAULT_SUITES",
    "SUPPORTED_AEADS",
    "SUPPORTED_KDFS",
    "SUPPORTED_KEMS",
    "HPKEError",
    "RecipientContext",
    "RecipientKey",
]

SUPPORTED_KEMS = frozenset((KEM_X25519_HKDF_SHA256,))
SUPPORTED_KDFS = frozenset((KDF_HKDF_SHA256, 0x0002, 0x0003))
#: Export-only (0xFFFF) is deliberately absent: it cannot open (checklist CFG-8).
SUPPORTED_AEADS = frozenset((AEAD_AES_128_GCM, AEAD_AES_256_GCM, AEAD_CHACHA20_POLY1305))

#: What a new key offers: the mandatory suite first (RFC 9849 §9), then the
#: others Chrome and Go use.
DEFAULT_SUITES = (
    SymmetricSuite(KDF_HKDF_SHA256, AEAD_AES_128_GCM),
    SymmetricSuite(KDF_HKDF_SHA256, AEAD_AES_256_GCM),
    SymmetricSuite(KDF_HKDF_SHA256, AEAD_CHACHA20_POLY1305),
)


class HPKEError(Exception):
    """SetupBaseR or Open failed; for ECH this candidate key did not work."""


@cache
def _cipher_suite(kem_id: int, kdf_id: int, aead_id: int) -> pyhpke.CipherSuite:
    """Return the (cached) pyhpke suite; raises HPKEError if unsupported."""
    if (
        kem_id not in SUPPORTED_KEMS
        or kdf_id not in SUPPORTED_KDFS
        or aead_id not in SUPPORTED_AEADS
    ):
        raise HPKEError(f"unsupported HPKE suite 0x{kem_id:04x}/0x{kdf_id:04x}/0x{aead_id:04x}")
    return pyhpke.CipherSuite.new(
        pyhpke.KEMId(kem_id), pyhpke.KDFId(kdf_id), pyhpke.AEADId(aead_id)
    )


class RecipientContext:
    """A receiver context (RFC 9180 §5.2) that opens ciphertexts in sequence."""

    __slots__ = ("_context",)

    def __init__(self, context: pyhpke.ContextInterface) -> None:
        """Wrap a library context."""
        self._context = context

    def open(self, aad: bytes, ciphertext: bytes) -> bytes:
        """Open the next ciphertext (RFC 9180 §5.2 ContextR.Open).

        A failed open also consumes a sequence number (a pyhpke quirk);
        ECH never retries on the same context, so that is harmless.

        :raises HPKEError: if authentication fails.
        """
        try:
            return bytes(self._context.open(ciphertext, aad=aad))
        except Exception as error:  # pyhpke raises OpenError, NotSupportedError, ...
            raise HPKEError("HPKE open failed") from error


class RecipientKey:
    """An HPKE private key, ready for SetupBaseR under any supported suite.

    :ivar kem_id: the HPKE KEM identifier.
    :ivar public_key: the KEM-encoded public key (what an ECHConfig carries).
    """

    __slots__ = ("_kem_key", "_private_bytes", "kem_id", "public_key")

    def __init__(self, kem_id: int, private_bytes: bytes) -> None:
        """Load a raw private key of ``kem_id`` (32 bytes for X25519).

        :raises ValueError: for an unsupported KEM or a malformed key.
        """
        if kem_id != KEM_X25519_HKDF_SHA256:
            raise ValueError(f"unsupported KEM 0x{kem_id:04x}")
        if len(private_bytes) != 32:
            raise ValueError("an X25519 private key is 32 bytes")
        private = X25519PrivateKey.from_private_bytes(private_bytes)
        self.kem_id = kem_id
        self._private_bytes = bytes(private_bytes)
        self.public_key = private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        self._kem_key = pyhpke.KEMKey.from_pyca_cryptography_key(private)

    @classmethod
    def generate(cls, kem_id: int = KEM_X25519_HKDF_SHA256) -> RecipientKey:
        """Generate a new key pair for ``kem_id``."""
        if kem_id != KEM_X25519_HKDF_SHA256:
            raise ValueError(f"unsupported KEM 0x{kem_id:04x}")
        private = X25519PrivateKey.generate()
        return cls(kem_id, private.private_bytes_raw())

    @property
    def private_bytes(self) -> bytes:
        """The raw private key; only key files ever see it."""
        return self._private_bytes

    def setup(self, kdf_id: int, aead_id: int, enc: bytes, info: bytes) -> RecipientContext:
        """SetupBaseR(enc, skR, info) (RFC 9180 §5.1.1).

        :raises HPKEError: for an unsupported suite or an invalid ``enc``
            (wrong length, low-order point: RFC 9180 §7.1.4).
        """
        suite = _cipher_suite(self.kem_id, kdf_id, aead_id)
        try:
            context = suite.create_recipient_context(enc, self._kem_key, info=info)
        except Exception as error:  # ValueError for enc, pyhpke errors otherwise
            raise HPKEError("HPKE setup failed") from error
        return RecipientContext(context)

    def __repr__(self) -> str:
        """Never show the private key."""
        return f"<RecipientKey kem=0x{self.kem_id:04x} public={self.public_key.hex()}>"

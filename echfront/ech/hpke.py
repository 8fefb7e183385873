# -*- test-case-name: tests.test_hpke -*-
"""HPKE recipients for ECH: RFC 9180 mode_base, as RFC 9849 §7.1 uses it.

The decoder sees :class:`RecipientKey` and :class:`RecipientContext`: set up
a context from ``enc`` and ``info`` (SetupBaseR, RFC 9180 §5.1.1), then open
one ciphertext per ClientHello on it.  The context keeps its sequence
number, so the second ClientHello after a HelloRetryRequest opens at
sequence 1 on the same context (RFC 9849 §7.1.1).

Why this is written here rather than delegated to pyhpke: an attacker can
make the front run SetupBaseR once per ClientHello, so its cost matters.
pyhpke builds several key, KDF and HMAC objects and recomputes per-key
values on every call, which made HPKE alone 2-3x the X25519 exchange it
must do (benchmarks/bench_decoder.py measures both).  Here everything that
depends only on the key, the suite and the info string (pkR, psk_id_hash,
info_hash, the whole key_schedule_context and both Expand inputs: a
``_Schedule`` per key and suite) is computed once.  The only per-call work
is the KEM's Diffie-Hellman, five HMACs and the AEAD's key setup.  The
HMACs are written out (RFC 2104 §2) over hashlib's SHA-2 objects rather
than called as ``hmac.digest``: written out, a key's padded block is hashed
once and shared by the HMACs under that key (the zero salt of Extract, the
two Expands under ``secret``), which halved the HMACs' cost (about 21 to
11 µs a setup on the benchmark machine).  hashlib's objects are OpenSSL's,
which use the CPU's SHA instructions where it has them: there a one-block
digest took 0.31 µs against 0.50 µs for CPython's own ``_sha256``, and a
setup's key schedule 4.0 µs against 5.3 µs.  Correctness is
pinned by the RFC 9180 test vectors and by cross-checks against pyhpke,
an independent implementation, in tests/test_hpke.py.

A KEM is a small object with ``kem_id``, ``enc_length``, ``load``,
``generate`` and ``decap``; the key schedule and AEAD are shared by every
KEM, so there is one HPKE code path however many KEMs are added.  Two are
here: DHKEM(X25519, HKDF-SHA256) (RFC 9180 §7.1) and the post-quantum
hybrid MLKEM768-X25519, a.k.a. X-Wing (draft-ietf-hpke-pq §3,
draft-connolly-cfrg-xwing-kem §5), built on cryptography's ML-KEM-768 and
X25519 primitives.  Every failure, whatever the primitive raised (an
``enc`` of the wrong length, a low-order point, an authentication
failure), becomes :class:`HPKEError`: for ECH they all mean "this
candidate key did not work".

The sender side, :func:`seal_context` (SetupBaseS, RFC 9180 §5.1.1) and
:class:`SenderContext` (ContextS.Seal, §5.2), exists for ``echfront
check``, which builds a real ClientHelloOuter (RFC 9849 §6.1.1) to prove
that a published config decrypts.  Its Encap is the mirror of each KEM's
Decap above, and its key schedule is :func:`_key_schedule`, the same
derivation the recipient performs (tests/test_probe.py opens what it seals
with :class:`RecipientKey`, and pyhpke's recipient opens it too).

Why this module is long: recipient and sender share every constant and the
key schedule, and each KEM's Decap sits next to its Encap; kept together,
the two sides cannot drift apart.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from cryptography.exceptions import InvalidTag, UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric.mlkem import MLKEM768PrivateKey, MLKEM768PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from echfront.ech.echconfig import (
    AEAD_AES_128_GCM,
    AEAD_AES_256_GCM,
    AEAD_CHACHA20_POLY1305,
    KDF_HKDF_SHA256,
    KDF_HKDF_SHA384,
    KDF_HKDF_SHA512,
    KEM_MLKEM768_X25519,
    KEM_X25519_HKDF_SHA256,
    SymmetricSuite,
    hex_preview,
)

__all__ = [
    "DEFAULT_SUITES",
    "SUPPORTED_AEADS",
    "SUPPORTED_KDFS",
    "SUPPORTED_KEMS",
    "HPKEError",
    "RecipientContext",
    "RecipientKey",
    "SenderContext",
    "seal_context",
]

_KDF_HASHES = {KDF_HKDF_SHA256: "sha256", KDF_HKDF_SHA384: "sha384", KDF_HKDF_SHA512: "sha512"}
_AEADS: dict[int, tuple[Callable[[bytes], AESGCM | ChaCha20Poly1305], int]] = {
    # aead_id: (constructor, Nk); Nn is 12 and Nt 16 for all three.
    AEAD_AES_128_GCM: (AESGCM, 16),
    AEAD_AES_256_GCM: (AESGCM, 32),
    AEAD_CHACHA20_POLY1305: (ChaCha20Poly1305, 32),
}
_NONCE_LENGTH = 12

SUPPORTED_KEMS = frozenset((KEM_X25519_HKDF_SHA256, KEM_MLKEM768_X25519))
SUPPORTED_KDFS = frozenset(_KDF_HASHES)
#: Export-only (0xFFFF) is deliberately absent: it cannot open (checklist CFG-8).
SUPPORTED_AEADS = frozenset(_AEADS)

#: What a new key offers: the mandatory suite first (RFC 9849 §9), then the
#: others Chrome and Go use.
DEFAULT_SUITES = (
    SymmetricSuite(KDF_HKDF_SHA256, AEAD_AES_128_GCM),
    SymmetricSuite(KDF_HKDF_SHA256, AEAD_AES_256_GCM),
    SymmetricSuite(KDF_HKDF_SHA256, AEAD_CHACHA20_POLY1305),
)

_HPKE_V1 = b"HPKE-v1"


class HPKEError(Exception):
    """SetupBaseR or Open failed; for ECH this candidate key did not work."""


#: X25519PublicKey.from_public_bytes without its per-call import and
#: support check (the recipient key loaded, so X25519 is supported): the
#: function it returns through, from cryptography's own binding.
try:
    from cryptography.hazmat.bindings._rust import openssl as _rust_openssl

    _x25519_public: Callable[[bytes], X25519PublicKey] = _rust_openssl.x25519.from_public_bytes
except (ImportError, AttributeError):  # pragma: no cover (another cryptography layout)
    _x25519_public = X25519PublicKey.from_public_bytes

# -- HMAC (RFC 2104) -------------------------------------------------------------


class _HashObject(Protocol):
    """A running hash (what hashlib's constructors return)."""

    def update(self, data: bytes, /) -> None:
        """Absorb ``data``."""
        ...

    def digest(self) -> bytes:
        """The hash of everything absorbed so far."""
        ...

    def copy(self) -> _HashObject:
        """An independent copy of the running state."""
        ...


#: Key bytes XOR ipad and XOR opad (RFC 2104 §2), as bytes.translate tables.
_IPAD = bytes(b ^ 0x36 for b in range(256))
_OPAD = bytes(b ^ 0x5C for b in range(256))


@dataclass(frozen=True)
class _Hash:
    """A hash function for HMAC (RFC 2104), as HKDF-SHA256/384/512 use it.

    :ivar new: the constructor, ``new(data)``.
    :ivar zeros: B zero bytes (B the block size): pads a key to a block.
    """

    new: Callable[[bytes], _HashObject]
    zeros: bytes

    def pads(self, key: bytes) -> tuple[_HashObject, _HashObject]:
        """HMAC's inner and outer hashes with their key block absorbed.

        Every HMAC under ``key`` continues a copy of these two states, so a
        key used twice (both Expands under ``secret``, or the zero salt of
        every Extract) has its block hashed once.
        """
        if len(key) > len(self.zeros):  # never for HPKE's keys, which are <= Nh
            key = self.new(key).digest()
        key += self.zeros[len(key) :]
        return self.new(key.translate(_IPAD)), self.new(key.translate(_OPAD))

    def hmac(self, key: bytes, message: bytes) -> bytes:
        """HMAC(key, message) (RFC 2104 §2): H(K ^ opad || H(K ^ ipad || message))."""
        if len(key) > len(self.zeros):  # never for HPKE's keys, which are <= Nh
            key = self.new(key).digest()
        key += self.zeros[len(key) :]
        new = self.new
        return new(key.translate(_OPAD) + new(key.translate(_IPAD) + message).digest()).digest()


_HASHES = {
    "sha256": _Hash(hashlib.sha256, bytes(64)),
    "sha384": _Hash(hashlib.sha384, bytes(128)),
    "sha512": _Hash(hashlib.sha512, bytes(128)),
}
_SHA256 = _HASHES["sha256"]
_SHA256_NEW = _SHA256.new
_SHA256_HALF_BLOCK = bytes(32)


def _extract(hash_name: str, salt: bytes, ikm: bytes) -> bytes:
    """HKDF-Extract (RFC 5869 §2.2); an empty salt means Nh zero bytes."""
    return _HASHES[hash_name].hmac(salt, ikm)  # HMAC pads a short key with zeros


def _expand_one_block(hash_name: str, prk: bytes, info: bytes, length: int) -> bytes:
    """HKDF-Expand (RFC 5869 §2.3) for length <= Nh: one HMAC block."""
    return _HASHES[hash_name].hmac(prk, info + b"\x01")[:length]


# -- KEMs ----------------------------------------------------------------------


class _KEM(Protocol):
    """What the key schedule needs of a KEM (RFC 9180 §4)."""

    kem_id: int
    #: Nenc: the length of ``enc``.
    enc_length: int

    def load(self, private_bytes: bytes) -> tuple[object, bytes]:
        """DeserializePrivateKey: the key object ``decap`` takes, and pkRm.

        :raises ValueError: for a malformed key.
        """
        ...

    def generate(self) -> bytes:
        """A new serialised private key (what :meth:`load` takes)."""
        ...

    def decap(self, enc: bytes, private: object) -> bytes:
        """Return the shared secret; raise ValueError for a bad ``enc``."""
        ...


@dataclass(frozen=True)
class _X25519Private:
    """An X25519 recipient key with its serialised public key (pkRm), kept.

    :ivar expand_tail: pkRm || 0x01, the fixed end of Decap's Expand input.
    """

    key: X25519PrivateKey
    public: bytes
    expand_tail: bytes


class _DHKEMX25519:
    """DHKEM(X25519, HKDF-SHA256) Decap (RFC 9180 §4.1, §7.1.3)."""

    kem_id = KEM_X25519_HKDF_SHA256
    enc_length = 32
    #: The KEM's own labels use suite_id = "KEM" || I2OSP(kem_id, 2).
    _SUITE = b"KEM" + KEM_X25519_HKDF_SHA256.to_bytes(2, "big")
    _EAE_PRK = _HPKE_V1 + _SUITE + b"eae_prk"
    #: I2OSP(Nsecret = 32, 2) || "HPKE-v1" || suite_id || "shared_secret"
    _SHARED_SECRET = b"\x00\x20" + _HPKE_V1 + _SUITE + b"shared_secret"
    #: LabeledExtract("", "eae_prk", dh) has a fixed key (the empty salt) and
    #: a fixed start: its inner hash with the key block and the label
    #: absorbed, and its outer hash, kept for every Decap.
    _EAE_INNER, _EAE_OUTER = _SHA256.pads(b"")
    _EAE_INNER.update(_EAE_PRK)

    def load(self, private_bytes: bytes) -> tuple[object, bytes]:
        """The raw 32-byte scalar (RFC 9180 §7.1.2 SerializePrivateKey)."""
        if len(private_bytes) != 32:
            raise ValueError("an X25519 private key is 32 bytes")
        key = X25519PrivateKey.from_private_bytes(private_bytes)
        public = key.public_key().public_bytes_raw()
        return _X25519Private(key, public, public + b"\x01"), public

    def generate(self) -> bytes:
        """A random X25519 scalar."""
        return X25519PrivateKey.generate().private_bytes_raw()

    def decap(self, enc: bytes, private: object) -> bytes:
        """Decap(enc, skR): DH, then ExtractAndExpand(dh, enc || pkRm)."""
        assert isinstance(private, _X25519Private)
        # from_public_bytes refuses a wrong length; exchange refuses the
        # all-zero result of a low-order point (RFC 9180 §7.1.4).
        dh = private.key.exchange(_x25519_public(enc))
        # Extract with an empty salt (from the kept states), then one Expand
        # block whose info ends in pkRm || 0x01, precomputed with the key.
        inner = self._EAE_INNER.copy()
        inner.update(dh)
        outer = self._EAE_OUTER.copy()
        outer.update(inner.digest())
        # The Expand: HMAC(eae_prk, ...) written out as _Hash.hmac computes
        # it (one Python call fewer per connection); eae_prk is one
        # SHA-256 digest, half a block, so padding it is all the key needs.
        block = outer.digest() + _SHA256_HALF_BLOCK
        inner_digest = _SHA256_NEW(
            block.translate(_IPAD) + self._SHARED_SECRET + enc + private.expand_tail
        ).digest()
        return _SHA256_NEW(block.translate(_OPAD) + inner_digest).digest()


@dataclass(frozen=True)
class _XWingPrivate:
    """An expanded X-Wing decapsulation key (draft-connolly-cfrg-xwing-kem §5.5.1).

    :ivar combiner_tail: pk_X || XWingLabel, the fixed end of the combiner
        input, so each Decap hashes one precomputed suffix.
    """

    mlkem: MLKEM768PrivateKey
    x25519: X25519PrivateKey
    combiner_tail: bytes


class _MLKEM768X25519:
    """MLKEM768-X25519 (X-Wing), KEM id 0x647a (draft-ietf-hpke-pq §3).

    The private key is a 32-byte seed; SHAKE256 expands it into the
    ML-KEM-768 seed d || z and the X25519 scalar.  The public key is
    pk_M (1184 bytes) || pk_X (32), ``enc`` is ct_M (1088) || ct_X (32),
    and the shared secret is SHA3-256(ss_M || ss_X || ct_X || pk_X ||
    XWingLabel) (draft-connolly-cfrg-xwing-kem §5.2-§5.5; Go's
    crypto/hpke implements the same).  The expansion, which includes the
    ML-KEM key generation, runs once per key, at load.
    """

    kem_id = KEM_MLKEM768_X25519
    enc_length = 1088 + 32
    _SEED_LENGTH = 32
    _MLKEM_CIPHERTEXT_LENGTH = 1088
    #: XWingLabel, the ASCII art \./ over /^\ (draft-connolly-cfrg-xwing-kem §5.3).
    _LABEL = bytes.fromhex("5c2e2f2f5e5c")

    def load(self, private_bytes: bytes) -> tuple[object, bytes]:
        """expandDecapsulationKey(sk) (draft-connolly-cfrg-xwing-kem §5.2)."""
        if len(private_bytes) != self._SEED_LENGTH:
            raise ValueError("an MLKEM768-X25519 private key is a 32-byte seed")
        expanded = hashlib.shake_256(private_bytes).digest(96)
        try:
            # FIPS 203 seed form d || z, as ML-KEM-768.KeyGen_internal takes.
            mlkem = MLKEM768PrivateKey.from_seed_bytes(expanded[:64])
        except UnsupportedAlgorithm as error:
            raise ValueError(f"ML-KEM-768 is not available here ({error})") from None
        x25519 = X25519PrivateKey.from_private_bytes(expanded[64:])
        pk_x = x25519.public_key().public_bytes_raw()
        public = mlkem.public_key().public_bytes_raw() + pk_x
        return _XWingPrivate(mlkem, x25519, pk_x + self._LABEL), public

    def generate(self) -> bytes:
        """GenerateKeyPair's sk = random(32) (draft-connolly-cfrg-xwing-kem §5.2)."""
        return secrets.token_bytes(self._SEED_LENGTH)

    def decap(self, enc: bytes, private: object) -> bytes:
        """Decapsulate(ct, sk) (draft-connolly-cfrg-xwing-kem §5.5).

        ML-KEM rejects implicitly: a tampered ct_M yields a pseudorandom
        ss_M, and the failure shows only at the AEAD.  A low-order ct_X makes
        the X25519 result all zeros, which cryptography refuses (ValueError)
        as Go's crypto/ecdh does, so such an ``enc`` fails here as in Go.
        """
        assert isinstance(private, _XWingPrivate)
        ct_m, ct_x = enc[: self._MLKEM_CIPHERTEXT_LENGTH], enc[self._MLKEM_CIPHERTEXT_LENGTH :]
        ss_m = private.mlkem.decapsulate(ct_m)
        ss_x = private.x25519.exchange(X25519PublicKey.from_public_bytes(ct_x))
        return hashlib.sha3_256(ss_m + ss_x + ct_x + private.combiner_tail).digest()


_KEMS: dict[int, _KEM] = {
    KEM_X25519_HKDF_SHA256: _DHKEMX25519(),
    KEM_MLKEM768_X25519: _MLKEM768X25519(),
}


# -- key schedule ----------------------------------------------------------------


@dataclass(frozen=True)
class _Suite:
    """Constants of one (KEM, KDF, AEAD) combination (RFC 9180 §5.1)."""

    hash_name: str
    aead: Callable[[bytes], AESGCM | ChaCha20Poly1305]
    key_length: int
    suite_id: bytes
    psk_id_hash: bytes
    secret_label: bytes
    key_label: bytes
    nonce_label: bytes

    @classmethod
    def build(cls, kem_id: int, kdf_id: int, aead_id: int) -> _Suite:
        hash_name = _KDF_HASHES[kdf_id]
        aead, key_length = _AEADS[aead_id]
        suite_id = b"HPKE" + b"".join(i.to_bytes(2, "big") for i in (kem_id, kdf_id, aead_id))
        prefix = _HPKE_V1 + suite_id
        return cls(
            hash_name=hash_name,
            aead=aead,
            key_length=key_length,
            suite_id=suite_id,
            # mode_base: psk_id = "", so psk_id_hash is a constant of the suite.
            psk_id_hash=_extract(hash_name, b"", prefix + b"psk_id_hash"),
            secret_label=prefix + b"secret",
            key_label=key_length.to_bytes(2, "big") + prefix + b"key",
            nonce_label=_NONCE_LENGTH.to_bytes(2, "big") + prefix + b"base_nonce",
        )

    def info_hash(self, info: bytes) -> bytes:
        """LabeledExtract("", "info_hash", info)."""
        return _extract(self.hash_name, b"", _HPKE_V1 + self.suite_id + b"info_hash" + info)


_SUITES: dict[tuple[int, int, int], _Suite] = {
    (kem, kdf, aead): _Suite.build(kem, kdf, aead)
    for kem in SUPPORTED_KEMS
    for kdf in SUPPORTED_KDFS
    for aead in SUPPORTED_AEADS
}


class _Context:
    """The AEAD, base_nonce and sequence number of an HPKE context (RFC 9180 §5.2)."""

    __slots__ = ("_aead", "_base_nonce", "_seq")

    def __init__(self, aead: AESGCM | ChaCha20Poly1305, base_nonce: bytes) -> None:
        """Start at sequence number 0."""
        self._aead = aead
        self._base_nonce = base_nonce
        self._seq = 0

    def _nonce(self) -> bytes:
        """ComputeNonce(seq): base_nonce XOR the sequence number."""
        if not self._seq:  # the first (for ECH usually the only) message
            return self._base_nonce
        value = int.from_bytes(self._base_nonce, "big") ^ self._seq
        return value.to_bytes(_NONCE_LENGTH, "big")


class RecipientContext(_Context):
    """A receiver context (RFC 9180 §5.2) that opens ciphertexts in sequence."""

    __slots__ = ()

    def open(self, aad: bytes, ciphertext: bytes) -> bytes:
        """ContextR.Open (RFC 9180 §5.2): the sequence advances only on success.

        :raises HPKEError: if authentication fails.
        """
        nonce = self._nonce() if self._seq else self._base_nonce
        try:
            plaintext = self._aead.decrypt(nonce, ciphertext, aad)
        except InvalidTag:
            raise HPKEError("HPKE open failed") from None
        self._seq += 1
        return plaintext


class RecipientKey:
    """An HPKE private key, ready for SetupBaseR under any supported suite.

    :ivar kem_id: the HPKE KEM identifier.
    :ivar public_key: the serialised public key (what an ECHConfig carries).
    """

    __slots__ = ("_kem", "_private", "_private_bytes", "_schedules", "kem_id", "public_key")

    def __init__(self, kem_id: int, private_bytes: bytes) -> None:
        """Load a serialised private key of ``kem_id``.

        That is the raw 32-byte scalar for X25519 and the 32-byte seed for
        MLKEM768-X25519 (RFC 9180 §7.1.2; draft-ietf-hpke-pq §3).

        :raises ValueError: for an unsupported KEM or a malformed key.
        """
        kem = _KEMS.get(kem_id)
        if kem is None:
            raise ValueError(f"unsupported KEM 0x{kem_id:04x}")
        self._private, self.public_key = kem.load(bytes(private_bytes))
        self.kem_id = kem_id
        self._kem = kem
        self._private_bytes = bytes(private_bytes)
        self._schedules: dict[tuple[int, int, bytes], _Schedule] = {}

    @classmethod
    def generate(cls, kem_id: int = KEM_X25519_HKDF_SHA256) -> RecipientKey:
        """Generate a new key pair for ``kem_id``.

        :raises ValueError: for an unsupported KEM.
        """
        kem = _KEMS.get(kem_id)
        if kem is None:
            raise ValueError(f"unsupported KEM 0x{kem_id:04x}")
        return cls(kem_id, kem.generate())

    @property
    def private_bytes(self) -> bytes:
        """The raw private key; only key files ever see it."""
        return self._private_bytes

    def setup(self, kdf_id: int, aead_id: int, enc: bytes, info: bytes) -> RecipientContext:
        """SetupBaseR(enc, skR, info) (RFC 9180 §5.1.1).

        :raises HPKEError: for an unsupported suite or an invalid ``enc``
            (wrong length, low-order point: RFC 9180 §7.1.4).  The KEM is
            the key's; only the KDF and AEAD come from the client.
        """
        # info is "tls ech" || 0 || ECHConfig: a constant per key and suite,
        # so everything the key schedule derives from it is computed once.
        cache_key = (kdf_id, aead_id, info)
        schedule = self._schedules.get(cache_key)
        if schedule is None:
            suite = _SUITES.get((self.kem_id, kdf_id, aead_id))
            if suite is None:
                raise HPKEError(f"unsupported HPKE suite 0x{kdf_id:04x}/0x{aead_id:04x}")
            if len(self._schedules) >= 64:  # bounded, whatever callers pass
                self._schedules.clear()
            schedule = self._schedules[cache_key] = _Schedule(suite, suite.info_hash(info))
        if len(enc) != self._kem.enc_length:
            # Checked before any public-key work: an enc sized for another
            # KEM, or truncated, costs nothing (ECHClientHello.enc is
            # <0..2^16-1>, so its length is the client's choice).
            raise HPKEError(f"enc is {len(enc)} bytes, not {self._kem.enc_length}")
        try:
            shared_secret = self._kem.decap(enc, self._private)
        except ValueError as error:  # wrong length, low-order point
            raise HPKEError("HPKE decapsulation failed") from error
        return schedule.context(shared_secret)

    def __repr__(self) -> str:
        """Never show the private key."""
        return f"<RecipientKey kem=0x{self.kem_id:04x} public={hex_preview(self.public_key)}>"


class _Schedule:
    """The mode_base key schedule of one suite and info string, precomputed (RFC 9180 §5.1).

    With psk_id and psk empty (mode_base) and info fixed, key_schedule_context
    is a constant, and so are the two Expand inputs; only the shared secret
    varies, so a setup costs three HMACs and the AEAD's key setup.
    """

    __slots__ = (
        "_aead",
        "_key_info",
        "_key_length",
        "_new",
        "_nonce_info",
        "_secret_label",
        "_zeros",
    )

    def __init__(self, suite: _Suite, info_hash: bytes) -> None:
        """Precompute the Expand inputs of ``suite`` for an info whose hash is ``info_hash``."""
        context = b"\x00" + suite.psk_id_hash + info_hash  # mode_base
        hash_function = _HASHES[suite.hash_name]
        self._new = hash_function.new
        self._zeros = hash_function.zeros
        self._aead = suite.aead
        self._key_length = suite.key_length
        self._secret_label = suite.secret_label
        self._key_info = suite.key_label + context + b"\x01"
        self._nonce_info = suite.nonce_label + context + b"\x01"

    def context(self, shared_secret: bytes) -> RecipientContext:
        """A context keyed with KeySchedule's key and base_nonce for ``shared_secret``.

        The three HMACs are written out here, as :class:`_Hash` computes
        them, rather than called through it: this runs once per ECH
        connection, and each Python call saved is worth about as much as
        the hashing it wraps.
        """
        new = self._new
        zeros = self._zeros
        # secret = HMAC(shared_secret, secret_label): the key (Nsecret = 32
        # bytes) is shorter than a block, so it is only padded (RFC 2104 §2).
        block = shared_secret + zeros[len(shared_secret) :]
        inner_digest = new(block.translate(_IPAD) + self._secret_label).digest()
        secret = new(block.translate(_OPAD) + inner_digest).digest()
        # key and base_nonce are both HMACs under secret: its key block is
        # hashed once, and the key's HMAC continues copies of those states.
        block = secret + zeros[len(secret) :]
        inner = new(block.translate(_IPAD))
        outer = new(block.translate(_OPAD))
        key_inner = inner.copy()
        key_inner.update(self._key_info)
        key_outer = outer.copy()
        key_outer.update(key_inner.digest())
        inner.update(self._nonce_info)
        outer.update(inner.digest())
        key = key_outer.digest()[: self._key_length]
        return RecipientContext(self._aead(key), outer.digest()[:_NONCE_LENGTH])


# -- sender ------------------------------------------------------------------------
#
# For ``echfront check`` (echfront/probe.py).  Each Encap mirrors the Decap
# of the same KEM above, with the same constants; both sides share
# _key_schedule.


def _key_schedule(
    suite: _Suite, shared_secret: bytes, info_hash: bytes
) -> tuple[AESGCM | ChaCha20Poly1305, bytes]:
    """KeySchedule for mode_base (RFC 9180 §5.1): the AEAD keyed with ``key``, and base_nonce.

    ``info_hash`` is :meth:`_Suite.info_hash` of the info string; psk_id is
    empty in mode_base, so psk_id_hash is the suite's constant.
    """
    context = b"\x00" + suite.psk_id_hash + info_hash  # mode_base
    secret = _extract(suite.hash_name, shared_secret, suite.secret_label)
    key = _expand_one_block(suite.hash_name, secret, suite.key_label + context, suite.key_length)
    nonce = _expand_one_block(suite.hash_name, secret, suite.nonce_label + context, _NONCE_LENGTH)
    return suite.aead(key), nonce


def _encap_x25519(public_key: bytes, ephemeral: bytes | None) -> tuple[bytes, bytes]:
    """Encap(pkR) of DHKEM(X25519, HKDF-SHA256) (RFC 9180 §4.1): (shared_secret, enc).

    ``ephemeral`` fixes skE, for the RFC 9180 Appendix A vectors only.

    :raises ValueError: for a public key that is not 32 bytes, or a
        low-order point (the all-zero DH result, RFC 9180 §7.1.4).
    """
    kem = _DHKEMX25519
    peer = X25519PublicKey.from_public_bytes(public_key)
    private = (
        X25519PrivateKey.generate()
        if ephemeral is None
        else X25519PrivateKey.from_private_bytes(ephemeral)
    )
    dh = private.exchange(peer)
    enc = private.public_key().public_bytes_raw()
    # ExtractAndExpand(dh, kem_context = enc || pkRm), exactly as Decap does it.
    eae_prk = _extract("sha256", b"", kem._EAE_PRK + dh)
    shared_secret = _expand_one_block("sha256", eae_prk, kem._SHARED_SECRET + enc + public_key, 32)
    return shared_secret, enc


def _encap_xwing(public_key: bytes) -> tuple[bytes, bytes]:
    """Encapsulate(pk) of X-Wing (draft-connolly-cfrg-xwing-kem §5.4): (ss, ct).

    pk = pk_M (1184 bytes) || pk_X (32); ct = ct_M || ct_X with ct_X the
    ephemeral X25519 public key; ss = SHA3-256(ss_M || ss_X || ct_X ||
    pk_X || XWingLabel), the combiner Decap computes.

    :raises ValueError: for a malformed public key or a low-order pk_X.
    """
    kem = _MLKEM768X25519
    if len(public_key) != 1184 + 32:
        raise ValueError("an MLKEM768-X25519 public key is 1216 bytes")
    pk_m, pk_x = public_key[:1184], public_key[1184:]
    try:
        mlkem = MLKEM768PublicKey.from_public_bytes(pk_m)
    except UnsupportedAlgorithm as error:
        raise ValueError(f"ML-KEM-768 is not available here ({error})") from None
    ss_m, ct_m = mlkem.encapsulate()
    ephemeral = X25519PrivateKey.generate()
    ct_x = ephemeral.public_key().public_bytes_raw()
    ss_x = ephemeral.exchange(X25519PublicKey.from_public_bytes(pk_x))
    shared_secret = hashlib.sha3_256(ss_m + ss_x + ct_x + pk_x + kem._LABEL).digest()
    return shared_secret, ct_m + ct_x


class SenderContext(_Context):
    """A sender context (RFC 9180 §5.2) that seals plaintexts in sequence.

    For ECH the first ClientHelloOuter seals at sequence 0 and a second one,
    after a HelloRetryRequest, at sequence 1 on the same context (RFC 9849
    §6.1.5).
    """

    __slots__ = ()

    def seal(self, aad: bytes, plaintext: bytes) -> bytes:
        """ContextS.Seal (RFC 9180 §5.2): ciphertext and tag; the sequence advances.

        :raises HPKEError: once the sequence number would overflow (§5.2:
            MessageLimitReachedError), never in practice.
        """
        if self._seq >= (1 << (8 * _NONCE_LENGTH)) - 1:
            raise HPKEError("HPKE message limit reached")
        ciphertext = self._aead.encrypt(self._nonce(), plaintext, aad)
        self._seq += 1
        return ciphertext


def _setup_base_s(
    kem_id: int,
    kdf_id: int,
    aead_id: int,
    public_key: bytes,
    info: bytes,
    *,
    ephemeral: bytes | None = None,
) -> tuple[bytes, SenderContext]:
    """SetupBaseS; ``ephemeral`` fixes skE for the RFC 9180 X25519 vectors only."""
    suite = _SUITES.get((kem_id, kdf_id, aead_id))
    if suite is None:
        raise HPKEError(f"unsupported HPKE suite 0x{kem_id:04x}/0x{kdf_id:04x}/0x{aead_id:04x}")
    try:
        if kem_id == KEM_MLKEM768_X25519:
            if ephemeral is not None:
                raise ValueError("a fixed ephemeral key is for DHKEM(X25519) vectors only")
            shared_secret, enc = _encap_xwing(bytes(public_key))
        else:
            shared_secret, enc = _encap_x25519(bytes(public_key), ephemeral)
    except ValueError as error:
        raise HPKEError(f"HPKE encapsulation failed ({error})") from None
    aead, nonce = _key_schedule(suite, shared_secret, suite.info_hash(info))
    return enc, SenderContext(aead, nonce)


def seal_context(
    kem_id: int, kdf_id: int, aead_id: int, public_key: bytes, info: bytes
) -> tuple[bytes, SenderContext]:
    """SetupBaseS(pkR, info) (RFC 9180 §5.1.1): ``enc`` and a sender context.

    ``public_key`` is the serialised pkR an ECHConfig carries; for ECH,
    ``info`` is "tls ech" || 0x00 || ECHConfig (RFC 9849 §6.1).

    :raises HPKEError: for an unsupported KEM, KDF or AEAD, a malformed
        public key, or a low-order X25519 point.
    """
    return _setup_base_s(kem_id, kdf_id, aead_id, public_key, info)

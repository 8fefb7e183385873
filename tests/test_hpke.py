"""The HPKE recipient (RFC 9180 mode_base): test vectors and pyhpke cross-checks."""

from __future__ import annotations

import os

import pyhpke
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from echfront.ech.echconfig import algorithm_name, option_names
from echfront.ech.hpke import (
    SUPPORTED_AEADS,
    SUPPORTED_KDFS,
    SUPPORTED_KEMS,
    HPKEError,
    RecipientKey,
)

# RFC 9180 Appendix A.1.1: DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, AES-128-GCM, mode_base.
RFC_INFO = bytes.fromhex("4f6465206f6e2061204772656369616e2055726e")
RFC_SKR = bytes.fromhex("4612c550263fc8ad58375df3f557aac531d26850903e55a9f23f21d8534e8ac8")
RFC_PKR = bytes.fromhex("3948cfe0ad1ddb695d780e59077195da6c56506b027329794ab02bca80815c4d")
RFC_ENC = bytes.fromhex("37fda3567bdbd628e88668c3c8d7e97d1d1253b6d4ea6d44c150f741f1bf4431")
RFC_PT = bytes.fromhex("4265617574792069732074727574682c20747275746820626561757479")
RFC_ENCRYPTIONS = {
    0: (
        "436f756e742d30",
        "f938558b5d72f1a23810b4be2ab4f84331acc02fc97babc53a52ae8218a355a96d8770ac83d07bea87e13c512a",
    ),
    1: (
        "436f756e742d31",
        "af2d7e9ac9ae7e270f46ba1f975be53c09f8d875bdc8535458c2494e8a6eab251c03d0c22a56b8ca42c2063b84",
    ),
}


def test_rfc9180_a11_vector_sequence() -> None:
    """Sequence 0 then 1 on one context: what ECH uses (first and second ClientHello)."""
    key = RecipientKey(0x0020, RFC_SKR)
    assert key.public_key == RFC_PKR
    context = key.setup(1, 1, RFC_ENC, RFC_INFO)
    for seq in (0, 1):
        aad, ct = (bytes.fromhex(h) for h in RFC_ENCRYPTIONS[seq])
        assert context.open(aad, ct) == RFC_PT
    # The sequence-1 ciphertext does not open at sequence 0.
    aad, ct = (bytes.fromhex(h) for h in RFC_ENCRYPTIONS[1])
    with pytest.raises(HPKEError):
        key.setup(1, 1, RFC_ENC, RFC_INFO).open(aad, ct)


def test_failed_open_does_not_advance_the_sequence() -> None:
    # RFC 9180 §5.2: the sequence number increments only on success (pyhpke
    # increments on failure too; ECH never retries, but be exact).
    context = RecipientKey(0x0020, RFC_SKR).setup(1, 1, RFC_ENC, RFC_INFO)
    aad0, ct0 = (bytes.fromhex(h) for h in RFC_ENCRYPTIONS[0])
    with pytest.raises(HPKEError):
        context.open(b"wrong aad", ct0)
    assert context.open(aad0, ct0) == RFC_PT


@pytest.mark.parametrize(
    ("kdf", "aead", "enc", "info"),
    [
        (1, 1, RFC_ENC[:-1], RFC_INFO),  # short enc
        (1, 1, RFC_ENC + b"\x00", RFC_INFO),  # long enc
        (1, 1, bytes(32), RFC_INFO),  # all-zero point: low order
        (1, 1, b"\x01" + bytes(31), RFC_INFO),  # u = 1: low order
        (1, 0xFFFF, RFC_ENC, RFC_INFO),  # export-only AEAD cannot open
        (9, 1, RFC_ENC, RFC_INFO),  # unknown KDF
    ],
)
def test_bad_setups_are_hpke_errors(kdf: int, aead: int, enc: bytes, info: bytes) -> None:
    with pytest.raises(HPKEError):
        RecipientKey(0x0020, RFC_SKR).setup(kdf, aead, enc, info)


def test_wrong_info_fails_to_open() -> None:
    context = RecipientKey(0x0020, RFC_SKR).setup(1, 1, RFC_ENC, RFC_INFO + b"x")
    aad0, ct0 = (bytes.fromhex(h) for h in RFC_ENCRYPTIONS[0])
    with pytest.raises(HPKEError):
        context.open(aad0, ct0)


def test_key_validation() -> None:
    with pytest.raises(ValueError, match="unsupported KEM"):
        RecipientKey(0x0010, RFC_SKR)
    with pytest.raises(ValueError, match="unsupported KEM"):
        RecipientKey.generate(0x0010)
    with pytest.raises(ValueError, match="32 bytes"):
        RecipientKey(0x0020, RFC_SKR[:31])
    key = RecipientKey.generate()
    assert key.kem_id == 0x0020
    assert key.private_bytes.hex() not in repr(key)
    assert key.public_key.hex() in repr(key)  # 32 bytes: shown whole


def test_supported_kems() -> None:
    # DHKEM(X25519, HKDF-SHA256) and MLKEM768-X25519 (tests/test_pq.py).
    assert frozenset({0x0020, 0x647A}) == SUPPORTED_KEMS


def test_enc_of_another_kems_length_is_refused_before_the_kem() -> None:
    # An X-Wing-sized enc sent to an X25519 key: the length check names it.
    with pytest.raises(HPKEError, match="enc is 1120 bytes, not 32"):
        RecipientKey(0x0020, RFC_SKR).setup(1, 1, bytes(1120), RFC_INFO)


SUITES = [(kdf, aead) for kdf in sorted(SUPPORTED_KDFS) for aead in sorted(SUPPORTED_AEADS)]


@settings(max_examples=60, deadline=None)
@given(
    suite=st.sampled_from(SUITES),
    info=st.binary(max_size=200),
    messages=st.lists(
        st.tuples(st.binary(max_size=64), st.binary(max_size=300)), min_size=1, max_size=3
    ),
)
def test_agrees_with_pyhpke(
    suite: tuple[int, int], info: bytes, messages: list[tuple[bytes, bytes]]
) -> None:
    """pyhpke (an independent implementation) seals; this recipient opens, in sequence."""
    kdf, aead = suite
    private = X25519PrivateKey.generate()
    reference = pyhpke.CipherSuite.new(
        pyhpke.KEMId.DHKEM_X25519_HKDF_SHA256, pyhpke.KDFId(kdf), pyhpke.AEADId(aead)
    )
    pk = pyhpke.KEMKey.from_pyca_cryptography_key(private.public_key())
    enc, sender = reference.create_sender_context(pk, info=info)
    context = RecipientKey(0x0020, private.private_bytes_raw()).setup(kdf, aead, enc, info)
    for aad, plaintext in messages:
        assert context.open(aad, sender.seal(plaintext, aad=aad)) == plaintext


def test_second_open_is_the_hrr_case() -> None:
    """Two opens on one context: the second ClientHello after HelloRetryRequest."""
    private = X25519PrivateKey.generate()
    reference = pyhpke.CipherSuite.new(
        pyhpke.KEMId.DHKEM_X25519_HKDF_SHA256, pyhpke.KDFId(1), pyhpke.AEADId(1)
    )
    pk = pyhpke.KEMKey.from_pyca_cryptography_key(private.public_key())
    enc, sender = reference.create_sender_context(pk, info=b"tls ech\x00cfg")
    first, second = sender.seal(b"one", aad=b"a1"), sender.seal(b"two", aad=b"a2")
    key = RecipientKey(0x0020, private.private_bytes_raw())
    context = key.setup(1, 1, enc, b"tls ech\x00cfg")
    assert context.open(b"a1", first) == b"one"
    assert context.open(b"a2", second) == b"two"
    # The second ciphertext on a fresh context (sequence 0) does not open.
    with pytest.raises(HPKEError):
        key.setup(1, 1, enc, b"tls ech\x00cfg").open(b"a2", second)


def test_random_enc_fails_cleanly() -> None:
    key = RecipientKey.generate()
    for _ in range(50):
        try:
            context = key.setup(1, 1, os.urandom(32), b"info")
        except HPKEError:
            continue  # a random 32-byte string can be a low-order point
        with pytest.raises(HPKEError):
            context.open(b"", os.urandom(48))


@pytest.mark.parametrize(
    ("kind", "supported"),
    [("KEM", SUPPORTED_KEMS), ("KDF", SUPPORTED_KDFS), ("AEAD", SUPPORTED_AEADS)],
)
def test_name_table_offers_exactly_what_this_recipient_implements(
    kind: str, supported: frozenset[int]
) -> None:
    """Configuration and CLI names (the one HPKE name table) cover every usable id, no other."""
    assert set(option_names(kind).values()) == set(supported)
    for ident in supported:
        assert not algorithm_name(kind, ident).startswith(f"{kind} 0x")

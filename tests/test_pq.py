"""Post-quantum ECH: the MLKEM768-X25519 (X-Wing, 0x647a) HPKE KEM and its key files.

Oracles, none of them this code:

* the draft-ietf-hpke-pq test vectors for KEM 0x647a, copied into
  ``tests/vectors/hpke-pq-xwing.json`` and, when Go is installed, read from
  Go's ``src/crypto/hpke/testdata/hpke-pq.json`` in full (pyhpke has no
  ML-KEM): skRm -> pkRm, enc -> shared_secret, and HPKE open of every
  ciphertext in sequence;
* draft-connolly-cfrg-xwing-kem Appendix D, the PKCS#8 encoding of the key
  whose seed is 00 01 .. 1f;
* a ClientHelloOuter recorded from Go 1.27.3's crypto/tls client
  (``tests/vectors/ech-kat-go-xwing.json``), decoded offline.

Live interop with Go and BoringSSL is in ``tests/test_interop_pq.py``.
"""

from __future__ import annotations

import base64
import json
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric.mlkem import MLKEM768PrivateKey

from echfront.ech.decoder import ECHDecoder, ECHStatus, RejectReason, parse_outer_ech
from echfront.ech.echconfig import (
    KEM_MLKEM768_X25519,
    KEM_X25519_HKDF_SHA256,
    ECHConfig,
    decode_config_list,
)
from echfront.ech.hpke import _KEMS, DEFAULT_SUITES, HPKEError, RecipientKey
from echfront.ech.keyset import ECHKey, KeySet, generate_key
from echfront.errors import ConfigError
from echfront.keys.keyfile import dump_pem, load_pem, read_key_file, write_key_file
from echfront.tls.hello import EXT_ECH
from echfront.tls.records import DEFAULT_MAX_FLIGHT, HandshakeReader
from tests.gotools import find_go

VECTORS = Path(__file__).parent / "vectors"
COPIED = json.loads((VECTORS / "hpke-pq-xwing.json").read_text())["vectors"]
KAT = json.loads((VECTORS / "ech-kat-go-xwing.json").read_text())

#: draft-connolly-cfrg-xwing-kem Appendix D: the private key 00 01 .. 1f.
APPENDIX_D_SEED = bytes(range(32))
APPENDIX_D_PEM = (
    b"-----BEGIN PRIVATE KEY-----\n"
    b"MDQCAQAwDQYLKwYBBAGD5i2ByHoEIAABAgMEBQYHCAkKCwwNDg8QERITFBUWFxgZ\n"
    b"GhscHR4f\n"
    b"-----END PRIVATE KEY-----\n"
)


@cache
def go_vectors() -> list[dict[str, Any]] | None:
    """The 0x647a entries of Go's hpke-pq.json, or None without Go."""
    go = find_go()
    if go is None:
        return None
    root = subprocess.run(
        [str(go), "env", "GOROOT"], capture_output=True, text=True, timeout=60, check=True
    ).stdout.strip()
    path = Path(root) / "src" / "crypto" / "hpke" / "testdata" / "hpke-pq.json"
    return [v for v in json.loads(path.read_text()) if v["kem_id"] == KEM_MLKEM768_X25519]


def vector_sets() -> list[Any]:
    """The copied vectors, and Go's (skipped with a reason when Go is absent)."""
    go_missing = pytest.mark.skipif(find_go() is None, reason="Go toolchain not found")
    return [
        pytest.param("copied", id="copied"),
        pytest.param("go", id="go-hpke-pq.json", marks=go_missing),
    ]


def vectors(source: str) -> list[dict[str, Any]]:
    found = COPIED if source == "copied" else go_vectors()
    assert found, "no MLKEM768-X25519 vectors"
    return found


def h(text: str) -> bytes:
    return bytes.fromhex(text)


# --- draft-ietf-hpke-pq vectors ----------------------------------------------------------------


@pytest.mark.skipif(find_go() is None, reason="Go toolchain not found")
def test_copied_vectors_are_gos() -> None:
    assert go_vectors() == COPIED


@pytest.mark.parametrize("source", vector_sets())
def test_seed_gives_the_vector_public_key(source: str) -> None:
    for vector in vectors(source):
        key = RecipientKey(KEM_MLKEM768_X25519, h(vector["skRm"]))
        assert key.public_key == h(vector["pkRm"])
        assert len(key.public_key) == 1216


@pytest.mark.parametrize("source", vector_sets())
def test_enc_gives_the_vector_shared_secret(source: str) -> None:
    # Every vector, whatever its KDF: the KEM alone (draft-ietf-hpke-pq §3).
    for vector in vectors(source):
        key = RecipientKey(KEM_MLKEM768_X25519, h(vector["skRm"]))
        enc = h(vector["enc"])
        assert len(enc) == 1120
        shared = _KEMS[KEM_MLKEM768_X25519].decap(enc, key._private)
        assert shared == h(vector["shared_secret"])


@pytest.mark.parametrize("source", vector_sets())
def test_vector_ciphertexts_open_in_sequence(source: str) -> None:
    """SetupBaseR + Open through the shared key schedule: what ECH uses."""
    opened = 0
    for vector in vectors(source):
        if vector["kdf_id"] not in (1, 2, 3) or vector["mode"] != 0:
            continue  # one-stage KDFs (0x0010..) are not ECH's
        key = RecipientKey(KEM_MLKEM768_X25519, h(vector["skRm"]))
        context = key.setup(
            vector["kdf_id"], vector["aead_id"], h(vector["enc"]), h(vector["info"])
        )
        for encryption in vector["encryptions"]:
            plaintext = context.open(h(encryption["aad"]), h(encryption["ct"]))
            assert plaintext == h(encryption["pt"])
            opened += 1
    assert opened >= 10


def test_vector_ciphertext_fails_under_another_info() -> None:
    (vector,) = [v for v in COPIED if v["kdf_id"] == 1]
    key = RecipientKey(KEM_MLKEM768_X25519, h(vector["skRm"]))
    context = key.setup(1, vector["aead_id"], h(vector["enc"]), h(vector["info"]) + b"x")
    encryption = vector["encryptions"][0]
    with pytest.raises(HPKEError):
        context.open(h(encryption["aad"]), h(encryption["ct"]))


# --- malformed enc ---------------------------------------------------------------------------

VECTOR = next(v for v in COPIED if v["kdf_id"] == 1)
VECTOR_KEY = RecipientKey(KEM_MLKEM768_X25519, h(VECTOR["skRm"]))
VECTOR_ENC = h(VECTOR["enc"])


@pytest.mark.parametrize(
    "enc",
    [
        b"",
        VECTOR_ENC[:32],  # an X25519-sized enc (a client that used the wrong KEM)
        VECTOR_ENC[:-1],
        VECTOR_ENC + b"\x00",
        VECTOR_ENC[:1088],  # ct_M alone
        VECTOR_ENC[:1088] + bytes(32),  # ct_X all zeros: a low-order point
        VECTOR_ENC[:1088] + b"\x01" + bytes(31),  # ct_X = 1: low order
    ],
    ids=["empty", "32", "1119", "1121", "1088", "zero-ct_X", "one-ct_X"],
)
def test_malformed_enc_is_an_hpke_error(enc: bytes) -> None:
    with pytest.raises(HPKEError):
        VECTOR_KEY.setup(1, VECTOR["aead_id"], enc, h(VECTOR["info"]))


@pytest.mark.parametrize("where", [0, 500, 1087, 1088, 1119], ids=lambda i: f"byte{i}")
def test_tampered_enc_fails_at_open(where: int) -> None:
    # ML-KEM rejects implicitly and a changed ct_X is another point: setup
    # succeeds with another shared secret, and the AEAD catches it.
    enc = bytearray(VECTOR_ENC)
    enc[where] ^= 0x40
    context = VECTOR_KEY.setup(1, VECTOR["aead_id"], bytes(enc), h(VECTOR["info"]))
    encryption = VECTOR["encryptions"][0]
    with pytest.raises(HPKEError):
        context.open(h(encryption["aad"]), h(encryption["ct"]))


# --- keys ------------------------------------------------------------------------------------


def test_recipient_key_validation_and_generation() -> None:
    with pytest.raises(ValueError, match="32-byte seed"):
        RecipientKey(KEM_MLKEM768_X25519, bytes(31))
    with pytest.raises(ValueError, match="32-byte seed"):
        RecipientKey(KEM_MLKEM768_X25519, bytes(64))  # an ML-KEM seed is not an X-Wing key
    first = RecipientKey.generate(KEM_MLKEM768_X25519)
    second = RecipientKey.generate(KEM_MLKEM768_X25519)
    assert first.kem_id == KEM_MLKEM768_X25519
    assert len(first.private_bytes) == 32 and len(first.public_key) == 1216
    assert first.public_key != second.public_key
    # Deterministic from the seed: the seed is the whole private key.
    assert RecipientKey(KEM_MLKEM768_X25519, first.private_bytes).public_key == first.public_key
    shown = repr(first)
    assert first.private_bytes.hex() not in shown
    assert "(1216 bytes)" in shown and len(shown) < 120


def pq_config(recipient: RecipientKey) -> ECHConfig:
    """An ECHConfig for ``recipient`` with the default suites."""
    return ECHConfig(
        config_id=7,
        kem_id=recipient.kem_id,
        public_key=recipient.public_key,
        cipher_suites=DEFAULT_SUITES,
        maximum_name_length=0,
        public_name="public.example",
    )


def test_appendix_d_private_key_encoding() -> None:
    """draft-connolly-cfrg-xwing-kem Appendix D: echfront writes and reads exactly this."""
    recipient = RecipientKey(KEM_MLKEM768_X25519, APPENDIX_D_SEED)
    config = pq_config(recipient)
    data = dump_pem([ECHKey(config, recipient)])
    assert data.startswith(APPENDIX_D_PEM)
    (loaded,) = load_pem(data)
    assert loaded.recipient is not None
    assert loaded.recipient.kem_id == KEM_MLKEM768_X25519
    assert loaded.recipient.private_bytes == APPENDIX_D_SEED
    assert loaded.config == config


def test_generated_pq_key_file_round_trip(tmp_path: Path) -> None:
    key = generate_key("public.example", kem_id=KEM_MLKEM768_X25519, maximum_name_length=32)
    assert key.config.kem_id == KEM_MLKEM768_X25519
    assert len(key.config.public_key) == 1216
    assert key.recipient is not None
    path = tmp_path / "pq.pem"
    write_key_file(path, [key])
    (loaded,) = read_key_file(path)
    assert loaded.config == key.config
    assert loaded.recipient is not None
    assert loaded.recipient.private_bytes == key.recipient.private_bytes
    # One PKCS#8 block of 54 bytes (22-byte prefix + seed), then the list.
    der = base64.b64decode(path.read_bytes().split(b"-----")[2])
    assert len(der) == 54 and der.endswith(key.recipient.private_bytes)


def xwing_pem(der: bytes) -> bytes:
    text = base64.b64encode(der).decode()
    return f"-----BEGIN PRIVATE KEY-----\n{text}\n-----END PRIVATE KEY-----\n".encode()


PREFIX = base64.b64decode(APPENDIX_D_PEM.split(b"-----")[2])[:22]


@pytest.mark.parametrize(
    ("der", "phrase"),
    [
        (PREFIX + bytes(31), "malformed MLKEM768-X25519"),  # short seed
        (PREFIX + bytes(33), "malformed MLKEM768-X25519"),  # trailing byte
        # version 1 with attributes: not the draft's encoding, and OpenSSL
        # (through cryptography) does not know the OID at all.
        (
            bytes.fromhex("3038020101300d060b2b0601040183e62d81c87a0420")
            + bytes(32)
            + bytes.fromhex("a000"),
            "unreadable private key",
        ),
        # parameters present (NULL): the draft says they MUST be absent.
        (
            bytes.fromhex("3036020100300f060b2b0601040183e62d81c87a05000420") + bytes(32),
            "unreadable private key",
        ),
    ],
    ids=["short-seed", "long-seed", "attributes", "parameters"],
)
def test_malformed_pq_private_keys_are_refused(der: bytes, phrase: str) -> None:
    key = generate_key("public.example", kem_id=KEM_MLKEM768_X25519)
    ech = dump_pem([key]).split(b"-----END PRIVATE KEY-----\n")[1]
    with pytest.raises(ConfigError, match=phrase) as caught:
        load_pem(xwing_pem(der) + ech, source="pq.pem")
    assert str(caught.value).startswith("pq.pem: ")


def test_pq_key_with_an_x25519_config_is_refused() -> None:
    pq = generate_key("public.example", kem_id=KEM_MLKEM768_X25519)
    classic = generate_key("public.example")
    private = dump_pem([pq]).split(b"-----BEGIN ECHCONFIG-----")[0]
    ech = dump_pem([classic]).split(b"-----END PRIVATE KEY-----\n")[1]
    with pytest.raises(ConfigError, match="does not match"):
        load_pem(private + ech)


# --- a recorded Go client hello ---------------------------------------------------------------


def kat_keys() -> tuple[ECHKey, ECHKey]:
    pq = ECHKey(
        ECHConfig.decode(h(KAT["echconfig"])), RecipientKey(KEM_MLKEM768_X25519, h(KAT["sk"]))
    )
    classic = ECHKey(
        ECHConfig.decode(h(KAT["x25519_echconfig"])),
        RecipientKey(KEM_X25519_HKDF_SHA256, h(KAT["x25519_sk"])),
    )
    return pq, classic


def kat_flight() -> Any:
    # The default first-flight bound: a PQ ClientHelloOuter fits with room.
    flight = HandshakeReader(1, max_bytes=DEFAULT_MAX_FLIGHT).feed(h(KAT["record"]))
    assert flight is not None
    return flight


def test_go_pq_hello_decrypts_with_the_pq_key() -> None:
    pq, classic = kat_keys()
    expected = KAT["expected"]
    assert decode_config_list(h(KAT["echconfiglist"])).configs == (pq.config, classic.config)
    record = h(KAT["record"])
    assert len(record) == expected["record_length"] < DEFAULT_MAX_FLIGHT // 16
    info = ECHDecoder(KeySet([classic, pq])).decode(kat_flight())
    assert info.status is ECHStatus.ACCEPTED
    assert info.key is pq
    assert info.key.config.kem_id == KEM_MLKEM768_X25519
    assert info.config_id == expected["config_id"]
    assert info.server_name == expected["inner_server_name"]
    assert info.alpn == tuple(a.encode() for a in expected["alpn"])
    extension = info.outer.get(EXT_ECH)
    assert extension is not None
    assert len(parse_outer_ech(extension).enc) == expected["enc_length"] == 1120


def test_go_pq_hello_without_the_pq_key_is_rejected() -> None:
    _, classic = kat_keys()
    info = ECHDecoder(KeySet([classic])).decode(kat_flight())
    assert info.status is ECHStatus.REJECTED
    assert info.reject_reason is RejectReason.UNKNOWN_CONFIG_ID
    # With trial decryption the X25519 key is tried and fails on the enc length.
    info = ECHDecoder(KeySet([classic]), trial_decryption=True).decode(kat_flight())
    assert info.status is ECHStatus.REJECTED
    assert info.reject_reason is RejectReason.DECRYPT_FAILED


def test_benchmark_vector_is_the_kat_capture() -> None:
    # benchmarks/bench_decoder.py times this hello; keep it the tested one.
    bench = Path(__file__).parent.parent / "benchmarks" / "vectors" / "go-xwing-hello.json"
    vector = json.loads(bench.read_text())
    assert (vector["sk"], vector["echconfig"], vector["record"]) == (
        KAT["sk"],
        KAT["echconfig"],
        KAT["record"],
    )
    assert vector["inner_server_name"] == KAT["expected"]["inner_server_name"]


def test_without_ml_kem_key_files_fail_with_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    # A cryptography built against an OpenSSL without ML-KEM: a config error
    # naming the file, never a traceback.
    key = generate_key("public.example", kem_id=KEM_MLKEM768_X25519)
    data = dump_pem([key])

    def unsupported(seed: bytes) -> None:
        raise UnsupportedAlgorithm("ML-KEM-768 is not supported by this backend.")

    monkeypatch.setattr(MLKEM768PrivateKey, "from_seed_bytes", unsupported)
    with pytest.raises(ConfigError, match=r"^pq\.pem: ML-KEM-768 is not available"):
        load_pem(data, source="pq.pem")
    with pytest.raises(ConfigError, match="ML-KEM-768 is not available"):
        generate_key("public.example", kem_id=KEM_MLKEM768_X25519)

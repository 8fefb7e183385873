"""Tests for :mod:`echfront.ech.keyset`: key generation, RFC 9934 PEM files, KeySet.

OpenSSL interop.  ``openssl ech -public_name NAME -out FILE`` (OpenSSL 4.0,
``OSSL_ECHSTORE_new_config`` + ``OSSL_ECHSTORE_write_pem`` in
``ssl/ech/ech_store.c``) writes, in this order:

* the private key with ``PEM_write_bio_PrivateKey``: an unencrypted PKCS#8
  ``PRIVATE KEY`` block, for X25519 a 48-byte DER
  (``302e020100300506032b656e04220420`` + 32 key bytes), one 64-character line;
* the ECHConfigList with ``PEM_write_bio(out, "ECHCONFIG", ...)``: base64 of
  the list **including its 2-byte length prefix** (the encoding is built with
  ``WPACKET_start_sub_packet_u16`` around the version, so a one-config file
  starts ``AD7+DQ...`` = ``003e fe0d``), wrapped at 64 characters;
  random config_id, one suite (default x25519/hkdf-sha256/aes128gcm),
  ``maximum_name_length`` 0 unless ``-max_name_len``, no extensions.

OpenSSL's own test files (``test/certs/echconfig.pem``, ``test/certs/echdir/*``)
also hold the base64 on one long line, and one (``echwithexts.pem``) carries
extensions 0xffca..0xffcc, which have the mandatory bit set; OpenSSL's
loader (``ech_final_config_checks``) refuses those too.

The test below rebuilds that structure with a freshly generated key (no third
party key material is copied).
"""

from __future__ import annotations

import base64
import importlib
import os
import re
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    BestAvailableEncryption,
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

from echfront.ech.echconfig import (
    ECHConfig,
    ECHConfigExtension,
    SymmetricSuite,
    decode_config_list,
    encode_config_list,
)
from echfront.ech.grease import GREASE_OPTIONAL_TYPES
from echfront.ech.hpke import DEFAULT_SUITES, RecipientKey
from echfront.ech.keyset import ECH_INFO_PREFIX, ECHKey, KeySet, generate_key, preference_order
from echfront.errors import ConfigError
from echfront.keys.keyfile import dump_pem, load_pem, read_key_file, write_key_file

PKCS8_X25519_PREFIX = bytes.fromhex("302e020100300506032b656e04220420")


def pem_block(label: str, der: bytes, width: int = 64) -> bytes:
    text = base64.b64encode(der).decode()
    lines = [text[i : i + width] for i in range(0, len(text), width)]
    return (f"-----BEGIN {label}-----\n" + "\n".join(lines) + f"\n-----END {label}-----\n").encode()


def private_pem(key: ECHKey) -> bytes:
    assert key.recipient is not None
    return X25519PrivateKey.from_private_bytes(key.recipient.private_bytes).private_bytes(
        Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()
    )


def config_pem(*configs: ECHConfig) -> bytes:
    return pem_block("ECHCONFIG", encode_config_list(configs))


def blocks(data: bytes) -> list[tuple[str, bytes]]:
    return [
        (m.group(1).decode(), base64.b64decode(b"".join(m.group(2).split())))
        for m in re.finditer(rb"-----BEGIN ([A-Z ]+)-----\n(.*?)-----END \1-----\n", data, re.S)
    ]


# --- generate_key ---------------------------------------------------------------------------


def test_generate_key_defaults() -> None:
    key = generate_key("Public.Example")
    config = key.config
    assert config.public_name == "public.example"
    assert config.kem_id == 0x0020
    assert len(config.public_key) == 32
    assert config.cipher_suites == DEFAULT_SUITES
    assert config.cipher_suites[0] == SymmetricSuite(1, 1)  # the mandatory suite first
    assert config.maximum_name_length == 0
    # One reserved optional (GREASE) extension, RFC 9849 §6.2.2 (tests/test_grease.py).
    (grease,) = config.extensions
    assert grease.type in GREASE_OPTIONAL_TYPES
    assert 0 <= config.config_id <= 255
    assert key.recipient is not None
    assert key.recipient.public_key == config.public_key
    assert key.published
    assert key.info == ECH_INFO_PREFIX + config.encode()
    assert key.config_id == config.config_id


def test_generate_key_post_quantum() -> None:
    key = generate_key("public.example", kem_id=0x647A, config_id=5)
    assert key.config.kem_id == 0x647A
    assert key.config.kem_name == "MLKEM768-X25519"
    assert len(key.config.public_key) == 1216
    assert key.config.cipher_suites == DEFAULT_SUITES
    assert key.recipient is not None
    assert key.recipient.kem_id == 0x647A
    assert key.recipient.public_key == key.config.public_key


@pytest.mark.parametrize("kem_id", [0x0010, 0x0041, 0])
def test_generate_key_unsupported_kem(kem_id: int) -> None:
    with pytest.raises(ConfigError, match="unsupported KEM"):
        generate_key("public.example", kem_id=kem_id)


def test_generated_keys_differ() -> None:
    keys = [generate_key("public.example") for _ in range(40)]
    assert len({k.config.public_key for k in keys}) == 40
    # Random config_id (RFC 9849 §4.1): 40 draws from 256 values all equal
    # has probability 256**-39.
    assert len({k.config_id for k in keys}) > 1


@pytest.mark.parametrize("free", [0, 7, 128, 255])
def test_config_id_avoids_taken(free: int) -> None:
    taken = [i for i in range(256) if i != free]
    assert generate_key("public.example", taken_ids=taken).config_id == free


def test_config_id_random_among_free() -> None:
    taken = set(range(0, 256, 2))
    ids = {generate_key("public.example", taken_ids=taken).config_id for _ in range(30)}
    assert not ids & taken
    assert len(ids) > 1


def test_all_config_ids_taken() -> None:
    with pytest.raises(ConfigError, match="256"):
        generate_key("public.example", taken_ids=range(256))


def test_fixed_config_id() -> None:
    assert generate_key("public.example", config_id=0).config_id == 0
    assert generate_key("public.example", config_id=255, taken_ids=[1, 2]).config_id == 255
    for bad in (256, -1):
        with pytest.raises(ConfigError):
            generate_key("public.example", config_id=bad)
    with pytest.raises(ConfigError, match="already in use"):
        generate_key("public.example", config_id=9, taken_ids=[9])


@pytest.mark.parametrize("length", [0, 32, 255])
def test_maximum_name_length(length: int) -> None:
    key = generate_key("public.example", maximum_name_length=length)
    assert key.config.maximum_name_length == length
    assert key.config.encode()[4 + 1 + 2 + 2 + 32 + 2 + 12] == length


@pytest.mark.parametrize("length", [-1, 256])
def test_bad_maximum_name_length(length: int) -> None:
    with pytest.raises(ConfigError):
        generate_key("public.example", maximum_name_length=length)


def test_custom_suites() -> None:
    suites = (SymmetricSuite(1, 3), SymmetricSuite(3, 2))
    assert generate_key("public.example", suites=suites).config.cipher_suites == suites


@pytest.mark.parametrize(
    "suite",
    [SymmetricSuite(1, 0xFFFF), SymmetricSuite(4, 1), SymmetricSuite(0, 1), SymmetricSuite(1, 4)],
)
def test_unsupported_suite(suite: SymmetricSuite) -> None:
    with pytest.raises(ConfigError, match="unsupported"):
        generate_key("public.example", suites=(SymmetricSuite(1, 1), suite))


def test_no_suites_is_config_error() -> None:
    # Settings problems are ConfigError (echfront.errors); an empty suite
    # list must not escape as a bare ValueError.
    with pytest.raises(ConfigError):
        generate_key("public.example", suites=())


@pytest.mark.parametrize("name", ["1.2.3.4", "a..b", "-a.com", ""])
def test_generate_key_validates_public_name(name: str) -> None:
    with pytest.raises(ConfigError):
        generate_key(name)


def test_generate_key_with_extensions() -> None:
    ext = ECHConfigExtension(0x1A1A, b"grease")
    key = generate_key("public.example", extensions=[ext])
    assert key.config.extensions == (ext,)


def test_ech_key_refuses_mismatched_private_key() -> None:
    a, b = generate_key("public.example"), generate_key("public.example")
    with pytest.raises(ConfigError, match="does not match"):
        ECHKey(a.config, b.recipient, source="x.pem")


def test_with_role() -> None:
    key = generate_key("public.example")
    old = key.with_role(published=False)
    assert not old.published
    assert old.config == key.config
    assert old.recipient is key.recipient
    assert old.info == key.info


# --- dump_pem / load_pem --------------------------------------------------------------------


def test_round_trip() -> None:
    key = generate_key("public.example", maximum_name_length=40)
    (loaded,) = load_pem(dump_pem([key]), source="k.pem")
    assert loaded.config == key.config
    assert loaded.config.encode() == key.config.encode()
    assert loaded.recipient is not None and key.recipient is not None
    assert loaded.recipient.private_bytes == key.recipient.private_bytes
    assert loaded.recipient.public_key == key.recipient.public_key
    assert loaded.published
    assert loaded.source == "k.pem"
    assert loaded.info == key.info


def test_round_trip_decrypt_only_role() -> None:
    (loaded,) = load_pem(dump_pem([generate_key("public.example")]), published=False)
    assert not loaded.published


def test_file_layout() -> None:
    key = generate_key("public.example")
    data = dump_pem([key])
    text = data.decode("ascii")
    assert text.startswith("-----BEGIN PRIVATE KEY-----\n")
    assert text.endswith("-----END ECHCONFIG-----\n")
    assert text.index("-----END PRIVATE KEY-----\n-----BEGIN ECHCONFIG-----\n") > 0
    assert all(len(line) <= 64 for line in text.splitlines())
    (label1, der), (label2, listing) = blocks(data)
    assert (label1, label2) == ("PRIVATE KEY", "ECHCONFIG")
    assert der[:16] == PKCS8_X25519_PREFIX and len(der) == 48
    assert key.recipient is not None
    assert der[16:] == key.recipient.private_bytes
    # The ECHCONFIG block is the whole ECHConfigList, 2-byte length included,
    # i.e. the same base64 string as DNS ech= (RFC 9934 §3, RFC 9848).
    assert listing == encode_config_list([key.config])
    assert int.from_bytes(listing[:2], "big") == len(listing) - 2
    assert listing[2:4] == b"\xfe\x0d"


def test_several_configs_sharing_one_key() -> None:
    key = generate_key("public.example", config_id=1)
    other = ECHKey(
        ECHConfig(
            2, key.config.kem_id, key.config.public_key, (SymmetricSuite(1, 3),), 0, "other.example"
        ),
        key.recipient,
    )
    data = dump_pem([key, other])
    assert [label for label, _ in blocks(data)] == ["PRIVATE KEY", "ECHCONFIG"]
    loaded = load_pem(data)
    assert [k.config for k in loaded] == [key.config, other.config]
    assert all(k.recipient is loaded[0].recipient for k in loaded)


def test_dump_pem_refuses_bad_input() -> None:
    with pytest.raises(ValueError):
        dump_pem([])
    with pytest.raises(ValueError):
        dump_pem([generate_key("a.example"), generate_key("b.example")])


def test_retry_only_file() -> None:
    key = generate_key("public.example")
    retry = ECHKey(key.config, None)
    data = dump_pem([retry])
    assert data.startswith(b"-----BEGIN ECHCONFIG-----\n")
    assert b"PRIVATE KEY" not in data
    (loaded,) = load_pem(data, source="retry.pem")
    assert loaded.recipient is None
    assert loaded.config == key.config
    assert loaded.published


# --- load_pem errors, each naming the file ----------------------------------------------------


def ed25519_pem() -> bytes:
    return Ed25519PrivateKey.generate().private_bytes(
        Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()
    )


def encrypted_x25519_pem() -> bytes:
    return X25519PrivateKey.generate().private_bytes(
        Encoding.PEM, PrivateFormat.PKCS8, BestAvailableEncryption(b"secret")
    )


def unknown_algorithm_pem() -> bytes:
    # A well-formed PKCS#8 PrivateKeyInfo whose algorithm OID (1.2.3.4) no
    # library knows.
    der = bytes.fromhex("302e020100300506032a030404220420") + bytes(range(32))
    assert len(der) == 48
    return pem_block("PRIVATE KEY", der)


def short_x25519_pem(length: int) -> bytes:
    # An X25519 PKCS#8 key whose private key is not 32 bytes (a damaged file).
    der = bytes.fromhex("020100300506032b656e") + bytes((4, length + 2, 4, length)) + bytes(length)
    return pem_block("PRIVATE KEY", b"\x30" + bytes((len(der),)) + der)


def _bad_files() -> dict[str, bytes]:
    key = generate_key("public.example")
    other = generate_key("public.example")
    good_config = config_pem(key.config)
    mandatory = ECHKey(
        ECHConfig(
            key.config_id,
            key.config.kem_id,
            key.config.public_key,
            key.config.cipher_suites,
            0,
            "public.example",
            (ECHConfigExtension(0xFFCA, b""),),
        ),
        key.recipient,
    )
    bad_list = pem_block("ECHCONFIG", encode_config_list([key.config])[:-1])
    return {
        "empty": b"",
        "no blocks": b"just some text\n",
        "only a private key": private_pem(key),
        "certificate label": pem_block("CERTIFICATE", b"\x30\x00") + good_config,
        "EC PRIVATE KEY label": pem_block("EC PRIVATE KEY", b"\x30\x00") + good_config,
        "mismatched END": b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END ECHCONFIG-----\n",
        "misspelt label": private_pem(key) + good_config.replace(b"ECHCONFIG", b"ECHCONFIGS"),
        "two private keys": private_pem(key) + private_pem(key) + good_config,
        "Ed25519 key": ed25519_pem() + good_config,
        "encrypted key": encrypted_x25519_pem() + good_config,
        "key not matching": private_pem(other) + good_config,
        "private key bad base64": b"-----BEGIN PRIVATE KEY-----\n!!!!\n-----END PRIVATE KEY-----\n"
        + good_config,
        "private key garbage DER": pem_block("PRIVATE KEY", b"\x30\x03\x02\x01\x00") + good_config,
        "config bad base64": private_pem(key)
        + b"-----BEGIN ECHCONFIG-----\nAD7+DQ=A\n-----END ECHCONFIG-----\n",
        "config truncated list": private_pem(key) + bad_list,
        "config only unknown versions": pem_block("ECHCONFIG", b"\x00\x06\xfe\x0a\x00\x02ab"),
        "unknown mandatory extension": dump_pem([mandatory]),
        "unknown key algorithm": unknown_algorithm_pem() + good_config,
        "X25519 key of 31 bytes": short_x25519_pem(31) + good_config,
        "X25519 key of 0 bytes": short_x25519_pem(0) + good_config,
    }


BAD_FILES = _bad_files()


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_load_pem_errors_name_the_file(name: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_pem(BAD_FILES[name], source="/etc/echfront/keys/front-1.pem")
    message = str(info.value)
    assert message.startswith("/etc/echfront/keys/front-1.pem: ")
    assert "\n" not in message


@pytest.mark.parametrize(
    ("name", "phrase"),
    [
        ("no blocks", "no PEM blocks"),
        ("only a private key", "no ECHCONFIG"),
        ("Ed25519 key", "neither X25519 nor X-Wing"),
        ("encrypted key", "encrypted"),
        ("key not matching", "does not match"),
        ("config bad base64", "base64"),
        ("unknown mandatory extension", "mandatory"),
        ("certificate label", "CERTIFICATE"),
    ],
)
def test_load_pem_error_messages(name: str, phrase: str) -> None:
    with pytest.raises(ConfigError, match=phrase):
        load_pem(BAD_FILES[name], source="k.pem")


def test_read_key_file_errors_name_the_path(tmp_path: Path) -> None:
    path = tmp_path / "broken.pem"
    path.write_bytes(BAD_FILES["key not matching"])
    with pytest.raises(ConfigError) as info:
        read_key_file(path)
    assert str(path) in str(info.value)
    missing = tmp_path / "missing.pem"
    with pytest.raises(ConfigError) as info:
        read_key_file(missing)
    assert str(missing) in str(info.value)


def test_trailing_content_after_echconfig_is_ignored() -> None:
    key = generate_key("public.example")
    tail = (
        b"# comment\n"
        + pem_block("PRIVATE KEY", b"\x00\x01")
        + pem_block("ECHCONFIG", b"\xff\xff")
        + b"-----BEGIN garbage\n\x00\xff\n"
    )
    (loaded,) = load_pem(dump_pem([key]) + tail)
    assert loaded.config == key.config
    assert loaded.recipient is not None


def test_leading_text_is_ignored() -> None:
    key = generate_key("public.example")
    (loaded,) = load_pem(b"Generated by echfront\n\n" + dump_pem([key]))
    assert loaded.config == key.config


def test_crlf_line_endings() -> None:
    key = generate_key("public.example")
    (loaded,) = load_pem(dump_pem([key]).replace(b"\n", b"\r\n"))
    assert loaded.config == key.config
    assert loaded.recipient is not None


# --- OpenSSL (RFC 9934) interop ---------------------------------------------------------------


def openssl_style_file(
    public_name: str, *, width: int = 64
) -> tuple[bytes, X25519PrivateKey, bytes]:
    """Build a file the way ``openssl ech -public_name NAME -out FILE`` does, with our own key."""
    private = X25519PrivateKey.generate()
    public = private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    config_id = os.urandom(1)
    name = public_name.encode()
    contents = (
        config_id
        + b"\x00\x20"  # kem_id x25519
        + len(public).to_bytes(2, "big")
        + public
        + b"\x00\x04\x00\x01\x00\x01"  # one suite: hkdf-sha256 / aes128gcm
        + b"\x00"  # maximum_name_length
        + bytes((len(name),))
        + name
        + b"\x00\x00"  # no extensions
    )
    config = b"\xfe\x0d" + len(contents).to_bytes(2, "big") + contents
    listing = len(config).to_bytes(2, "big") + config  # WPACKET_start_sub_packet_u16
    der = private.private_bytes(Encoding.DER, PrivateFormat.PKCS8, NoEncryption())
    data = pem_block("PRIVATE KEY", der) + pem_block("ECHCONFIG", listing, width)
    return data, private, listing


def test_openssl_generated_file_structure_loads() -> None:
    data, private, listing = openssl_style_file("example.com")
    text = data.decode()
    lines = text.splitlines()
    assert lines[0] == "-----BEGIN PRIVATE KEY-----"
    assert lines[1].startswith("MC4CAQAwBQYDK2VuBCIEI")  # PKCS#8 X25519, one line
    assert len(lines[1]) == 64
    assert lines[2] == "-----END PRIVATE KEY-----"
    assert lines[3] == "-----BEGIN ECHCONFIG-----"
    assert lines[4].startswith("AD")  # 2-byte list length 0x003?
    assert lines[-1] == "-----END ECHCONFIG-----"
    assert base64.b64decode("".join(lines[4:-1]))[:4] == listing[:4]
    (key,) = load_pem(data, source="openssl.pem")
    assert key.recipient is not None
    assert key.recipient.private_bytes == private.private_bytes_raw()
    assert key.config.public_name == "example.com"
    assert key.config.cipher_suites == (SymmetricSuite(1, 1),)
    assert encode_config_list([key.config]) == listing
    # echfront writes the very same bytes for that key and config.
    assert dump_pem([key]) == data


def test_openssl_file_with_unwrapped_base64_line() -> None:
    # As in openssl test/certs/echconfig.pem: the ECHCONFIG base64 on one line.
    data, _, listing = openssl_style_file("example.com", width=10_000)
    assert max(len(line) for line in data.splitlines()) > 64
    (key,) = load_pem(data)
    assert encode_config_list([key.config]) == listing


def test_openssl_list_without_length_prefix_is_refused() -> None:
    # A bare ECHConfig (no ECHConfigList length) is not RFC 9934: refused, not misread.
    data, _, listing = openssl_style_file("example.com")
    head, _, _ = data.partition(b"-----BEGIN ECHCONFIG-----")
    with pytest.raises(ConfigError):
        load_pem(head + pem_block("ECHCONFIG", listing[2:]))


def test_openssl_multi_version_retry_list() -> None:
    # As openssl test/ech_test.c pem_4_to_2: old draft versions mixed in are skipped.
    key = generate_key("example.com")
    old = b"\xfe\x0a\x00\x05" + b"x" * 5
    listing_body = old + key.config.encode() + b"\xfe\x09\x00\x00"
    listing = len(listing_body).to_bytes(2, "big") + listing_body
    (loaded,) = load_pem(pem_block("ECHCONFIG", listing))
    assert loaded.recipient is None
    assert loaded.config == key.config
    assert decode_config_list(listing).skipped_versions == (0xFE0A, 0xFE09)


def test_openssl_extra_non_matching_config_with_key_is_refused() -> None:
    # RFC 9934 only needs one matching config; echfront refuses a list that
    # also holds configs its key cannot decrypt (they would be published).
    key = generate_key("example.com")
    other = generate_key("example.com")
    data = private_pem(key) + config_pem(key.config, other.config)
    with pytest.raises(ConfigError, match="does not match"):
        load_pem(data, source="mixed.pem")


# --- write_key_file -------------------------------------------------------------------------


def test_write_key_file(tmp_path: Path) -> None:
    key = generate_key("public.example")
    path = tmp_path / "front.pem"
    write_key_file(path, [key])
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes() == dump_pem([key])
    (loaded,) = read_key_file(path)
    assert loaded.config == key.config
    assert sorted(p.name for p in tmp_path.iterdir()) == ["front.pem"]


def test_write_key_file_mode_ignores_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        path = tmp_path / "k.pem"
        write_key_file(str(path), [generate_key("public.example")])
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_write_key_file_refuses_to_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "front.pem"
    path.write_bytes(b"precious")
    with pytest.raises(ConfigError) as info:
        write_key_file(path, [generate_key("public.example")])
    assert str(path) in str(info.value)
    assert path.read_bytes() == b"precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["front.pem"]


def test_write_key_file_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "front.pem"
    path.write_bytes(b"old")
    key = generate_key("public.example")
    write_key_file(path, [key], overwrite=True)
    assert path.read_bytes() == dump_pem([key])
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_write_key_file_missing_directory(tmp_path: Path) -> None:
    path = tmp_path / "nope" / "front.pem"
    with pytest.raises(ConfigError) as info:
        write_key_file(path, [generate_key("public.example")])
    assert str(path) in str(info.value)


def test_write_key_file_failure_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing_fsync(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    path = tmp_path / "front.pem"
    with pytest.raises(ConfigError):
        write_key_file(path, [generate_key("public.example")])
    assert list(tmp_path.iterdir()) == []


def test_write_key_file_relative_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    write_key_file("rel.pem", [generate_key("public.example")])
    assert (tmp_path / "rel.pem").exists()


# --- KeySet ---------------------------------------------------------------------------------


def test_keyset_roles() -> None:
    published = generate_key("public.example", config_id=1)
    same_id = generate_key("public.example", config_id=1)
    old = generate_key("public.example", config_id=2).with_role(published=False)
    retry_only = ECHKey(generate_key("elsewhere.example", config_id=3).config, None)
    keys = KeySet([published, old, retry_only, same_id])
    assert len(keys) == 4
    assert keys
    assert keys.candidates(1) == (published, same_id)
    assert keys.candidates(2) == (old,)
    assert keys.candidates(3) == ()  # no private key: never a candidate
    assert keys.candidates(4) == ()
    assert keys.decrypting == (published, old, same_id)
    assert keys.published == (published, retry_only, same_id)
    # retry_configs: published configs only, decrypt-only keys excluded.
    assert keys.retry_config_list == encode_config_list(
        [published.config, retry_only.config, same_id.config]
    )
    assert keys.config_ids == frozenset((1, 2, 3))


def test_keyset_publishes_post_quantum_configs_first() -> None:
    """Clients take the first config they support: PQ first, else the load order."""
    classic = generate_key("public.example", config_id=1)
    pq = generate_key("public.example", config_id=2, kem_id=0x647A)
    classic_2 = generate_key("public.example", config_id=3)
    old_pq = generate_key("public.example", config_id=4, kem_id=0x647A).with_role(published=False)
    pq_2 = generate_key("public.example", config_id=5, kem_id=0x647A)
    keys = KeySet([classic, pq, classic_2, old_pq, pq_2])
    assert keys.published == (pq, pq_2, classic, classic_2)
    assert keys.retry_config_list == encode_config_list(
        [pq.config, pq_2.config, classic.config, classic_2.config]
    )
    # Decryption is by config_id and in load order: the order is only what clients see.
    assert keys.decrypting == (classic, pq, classic_2, old_pq, pq_2)
    assert keys.candidates(4) == (old_pq,)


def test_preference_order_is_stable() -> None:
    configs = [
        generate_key("public.example", config_id=i, kem_id=kem).config
        for i, kem in enumerate([0x0020, 0x0020, 0x647A, 0x0020, 0x647A])
    ]
    assert [c.config_id for c in preference_order(configs)] == [2, 4, 0, 1, 3]
    assert preference_order([]) == []


def test_keyset_empty_and_decrypt_only() -> None:
    empty = KeySet()
    assert not empty
    assert len(empty) == 0
    assert empty.retry_config_list is None
    assert empty.candidates(0) == ()
    old = KeySet([generate_key("public.example").with_role(published=False)])
    assert old.retry_config_list is None
    assert len(old.decrypting) == 1


def test_keyset_from_loaded_files(tmp_path: Path) -> None:
    current = generate_key("public.example")
    previous = generate_key("public.example", taken_ids=[current.config_id])
    write_key_file(tmp_path / "current.pem", [current])
    write_key_file(tmp_path / "previous.pem", [previous])
    keys = KeySet(
        read_key_file(tmp_path / "current.pem")
        + read_key_file(tmp_path / "previous.pem", published=False)
    )
    assert keys.retry_config_list == encode_config_list([current.config])
    assert [k.config for k in keys.candidates(previous.config_id)] == [previous.config]


@pytest.mark.parametrize("kem_id", [0x0020, 0x647A])
def test_recipient_key_repr_hides_private_key(kem_id: int) -> None:
    key = generate_key("public.example", kem_id=kem_id)
    assert key.recipient is not None
    assert key.recipient.private_bytes.hex() not in repr(key.recipient)
    assert key.recipient.private_bytes.hex() not in repr(key)
    assert isinstance(key.recipient, RecipientKey)


@pytest.mark.parametrize(
    ("name", "home"),
    [
        ("KeySet", "echfront.ech.keyset"),
        ("generate_key", "echfront.ech.keyset"),
        ("read_key_file", "echfront.keys.keyfile"),
        ("dump_pem", "echfront.keys.keyfile"),
    ],
)
def test_old_echfront_keys_names_warn_and_resolve(name: str, home: str) -> None:
    """``echfront.keys`` was a module (0.1.0); its names still work, with a warning."""
    import echfront.keys  # noqa: PLC0415

    with pytest.warns(DeprecationWarning, match=rf"echfront\.keys\.{name} moved to {home}"):
        value = getattr(echfront.keys, name)
    assert value is getattr(importlib.import_module(home), name)
    with pytest.raises(AttributeError):
        echfront.keys.no_such_name  # noqa: B018
